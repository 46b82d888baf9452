import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { SplitInflight, splitInflightQueueSize } from "../../src/virtq/inflight.ts";
import { SplitQueue } from "../../src/virtq/split.ts";

// A split ring of 8 in 1 MiB of guest memory, and an inflight area in a plain buffer
// (the same bytes a memfd shared with the front-end would hold).
const SIZE = 8, DESC = 0x1000, AVAIL = 0x2000, USED = 0x3000, UVA = 0x7000_0000;
let mem: GuestMemory;
let ram: DataView;
let area: Uint8Array;
let availIdx = 0;
const r = new Pieces(), w = new Pieces();

function publish(head: number): void {
  ram.setUint32(DESC + head * 16, 0x10000 + head * 0x100, true);
  ram.setUint32(DESC + head * 16 + 8, 16, true);
  ram.setUint16(AVAIL + 4 + 2 * (availIdx % SIZE), head, true);
  availIdx = (availIdx + 1) & 0xffff;
  ram.setUint16(AVAIL + 2, availIdx, true);
}

/** A back-end instance: a new queue over the same ring and the same inflight area. */
function backend(base: number): SplitQueue {
  const q = new SplitQueue(0, mem);
  q.setRings(SIZE, mem.uvaSpan(UVA + DESC, 16 * SIZE), mem.uvaSpan(UVA + AVAIL, 6 + 2 * SIZE), mem.uvaSpan(UVA + USED, 6 + 8 * SIZE));
  q.setBase(base);
  q.setInflight(new SplitInflight(area, SIZE));
  q.startInflight();
  return q;
}

beforeEach(() => {
  const fd = sys.memfdCreate("inflight-test");
  sys.ftruncate(fd, 1 << 20);
  mem = new GuestMemory();
  const reg = mem.add({ guestPhysAddr: 0, memorySize: 1 << 20, userAddr: UVA, mmapOffset: 0 }, fd);
  sys.close(fd);
  ram = new DataView(reg.windows[0]!.buffer, 0, 1 << 20);
  area = new Uint8Array(splitInflightQueueSize(SIZE));
  availIdx = 0;
});
afterEach(() => mem.clear());

describe("SplitInflight", () => {
  test("splitInflightQueueSize() is 16 + 16 per entry, rounded up to 64", () => {
    expect(splitInflightQueueSize(8)).toBe(192);
    expect(splitInflightQueueSize(128)).toBe(2048 + 64);
  });

  test("a fresh area is initialised: version 1, desc_num, used_idx from the ring", () => {
    ram.setUint16(USED + 2, 5, true);
    backend(5);
    const dv = new DataView(area.buffer);
    expect(dv.getUint16(8, true)).toBe(1);
    expect(dv.getUint16(10, true)).toBe(SIZE);
    expect(dv.getUint16(14, true)).toBe(5);
  });

  test("pop() marks a chain in flight with increasing counters; flush() clears it and records used_idx", () => {
    const q = backend(0);
    publish(2);
    publish(5);
    expect(q.pop(r, w)).toBe(2);
    expect(q.pop(r, w)).toBe(5);
    const dv = new DataView(area.buffer);
    expect(area[16 + 16 * 2]).toBe(1);
    expect(area[16 + 16 * 5]).toBe(1);
    expect(dv.getUint32(16 + 16 * 2 + 8, true)).toBeLessThan(dv.getUint32(16 + 16 * 5 + 8, true));
    q.push(5, 0);
    // Pushed but not published: still in flight (the driver cannot see it yet).
    expect(area[16 + 16 * 5]).toBe(1);
    expect(dv.getUint16(12, true)).toBe(5); // last_batch_head
    q.flush();
    expect(area[16 + 16 * 5]).toBe(0);
    expect(area[16 + 16 * 2]).toBe(1);
    expect(dv.getUint16(14, true)).toBe(1);
  });

  test("after a restart, chains left in flight are resubmitted first, in the order they were taken", () => {
    const a = backend(0);
    for (const h of [6, 1, 4, 3]) publish(h);
    expect([a.pop(r, w), a.pop(r, w), a.pop(r, w)]).toEqual([6, 1, 4]);
    a.push(1, 0);
    a.flush();
    // The back-end dies. QEMU rewinds the base to used.idx (1) and reconnects.
    const b = backend(1);
    expect(b.pop(r, w)).toBe(6);
    expect(r.total).toBe(16);
    expect(b.pop(r, w)).toBe(4);
    // Then the avail ring continues after the three chains taken before: head 3.
    expect(b.pop(r, w)).toBe(3);
    expect(b.pop(r, w)).toBe(-1);
    for (const h of [6, 4, 3]) b.push(h, 0);
    b.flush();
    expect(ram.getUint16(USED + 2, true)).toBe(4);
    // Nothing left in flight for a third instance.
    const c = backend(4);
    expect(c.pop(r, w)).toBe(-1);
  });

  test("a back-end that died between publishing used.idx and clearing the batch does not resubmit that batch", () => {
    const a = backend(0);
    for (const h of [0, 1, 2]) publish(h);
    a.pop(r, w); a.pop(r, w); a.pop(r, w);
    a.push(2, 0);
    a.push(0, 0);
    // Publish used.idx by hand without the inflight bookkeeping that follows it: the crash window.
    ram.setUint16(USED + 2, 2, true);
    const b = backend(2);
    expect(b.pop(r, w)).toBe(1);
    expect(b.pop(r, w)).toBe(-1);
  });

  test("an in-flight head past the ring in a hostile area breaks the queue", () => {
    const a = backend(0);
    publish(3);
    a.pop(r, w);
    const dv = new DataView(area.buffer);
    // Claim desc_num 8 but a smaller ring: recover() refuses the mismatch.
    dv.setUint16(10, 4, true);
    expect(() => backend(0)).toThrow(/inflight area for 4 descriptors/);
  });
});

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { VirtqError } from "../../src/errors.ts";
import {
  SplitQueue, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, vringNeedEvent,
} from "../../src/virtq/split.ts";

// Guest memory of 1 MiB at gpa 0; rings at fixed addresses; buffers from 0x10000 up.
const SIZE = 8;
const DESC = 0x1000, AVAIL = 0x2000, USED = 0x3000, UVA = 0x7000_0000;
let mem: GuestMemory;
let ram: DataView;
let q: SplitQueue;
const r = new Pieces(), w = new Pieces();

function desc(i: number, addr: number, len: number, flags: number, next = 0, base = DESC) {
  const o = base + i * 16;
  ram.setUint32(o, addr % 2 ** 32, true);
  ram.setUint32(o + 4, Math.floor(addr / 2 ** 32), true);
  ram.setUint32(o + 8, len, true);
  ram.setUint16(o + 12, flags, true);
  ram.setUint16(o + 14, next, true);
}
let availIdx = 0;
function publish(head: number) {
  ram.setUint16(AVAIL + 4 + 2 * (availIdx % SIZE), head, true);
  availIdx = (availIdx + 1) & 0xffff;
  ram.setUint16(AVAIL + 2, availIdx, true);
}
const usedIdx = () => ram.getUint16(USED + 2, true);
const usedElem = (i: number) => [ram.getUint32(USED + 4 + 8 * (i % SIZE), true), ram.getUint32(USED + 8 + 8 * (i % SIZE), true)];

function pop(): number {
  const h = q.peekHead();
  if (h >= 0) q.take(h, r, w);
  return h;
}
function popError(): VirtqError {
  try {
    pop();
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqError);
    expect(q.broken).toBe(e as VirtqError);
    return e as VirtqError;
  }
  throw new Error("pop() did not throw");
}

beforeEach(() => {
  const fd = sys.memfdCreate("split-test");
  sys.ftruncate(fd, 1 << 20);
  mem = new GuestMemory();
  const reg = mem.add({ guestPhysAddr: 0, memorySize: 1 << 20, userAddr: UVA, mmapOffset: 0 }, fd);
  sys.close(fd);
  ram = new DataView(reg.windows[0]!.buffer, 0, 1 << 20);
  availIdx = 0;
  q = new SplitQueue(0, mem);
  q.setRings(SIZE, mem.uvaSpan(UVA + DESC, 16 * SIZE), mem.uvaSpan(UVA + AVAIL, 6 + 2 * SIZE), mem.uvaSpan(UVA + USED, 6 + 8 * SIZE));
});
afterEach(() => {
  q.detach();
  mem.clear();
});

describe("SplitQueue", () => {
  test("peekHead() returns -1 on an empty ring", () => {
    expect(q.peekHead()).toBe(-1);
  });

  test("take() walks a chain: readable header, writable data and status", () => {
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 1);
    desc(1, 0x20000, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    desc(2, 0x30000, 1, VRING_DESC_F_WRITE);
    publish(0);
    expect(pop()).toBe(0);
    expect(r.total).toBe(16);
    expect(w.total).toBe(4097);
    expect(w.count).toBe(2);
    expect(q.lastAvail).toBe(1);
    expect(pop()).toBe(-1);
  });

  test("push() + flush() publish the used element and index, and honour NO_INTERRUPT", () => {
    desc(3, 0x10000, 16, 0);
    publish(3);
    pop();
    q.push(3, 17);
    expect(usedIdx()).toBe(0); // not visible before flush
    expect(q.flush()).toBe(true);
    expect(usedIdx()).toBe(1);
    expect(usedElem(0)).toEqual([3, 17]);
    ram.setUint16(AVAIL, VRING_AVAIL_F_NO_INTERRUPT, true);
    publish(3);
    pop();
    q.push(3, 0);
    expect(q.flush()).toBe(false);
  });

  test("take() follows one level of indirect descriptors with NEXT inside the table", () => {
    const T = 0x40000;
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 1, T);
    desc(1, 0x20000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2, T);
    desc(2, 0x30000, 1, VRING_DESC_F_WRITE, 0, T);
    desc(5, T, 48, VRING_DESC_F_INDIRECT);
    publish(5);
    expect(pop()).toBe(5);
    expect(r.total).toBe(16);
    expect(w.total).toBe(513);
  });

  test("take() reads an unaligned indirect table through a bounce copy", () => {
    const T = 0x40002;
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 1, T);
    desc(1, 0x20000, 7, VRING_DESC_F_WRITE, 0, T);
    desc(0, T, 32, VRING_DESC_F_INDIRECT);
    publish(0);
    expect(pop()).toBe(0);
    expect([r.total, w.total]).toEqual([16, 7]);
  });

  test("rejects a head index >= queue size (HEAD_RANGE)", () => {
    publish(SIZE);
    expect(popError().code).toBe("HEAD_RANGE");
  });

  test("rejects a next index >= queue size (NEXT_RANGE)", () => {
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, SIZE + 3);
    publish(0);
    expect(popError().code).toBe("NEXT_RANGE");
  });

  test("rejects a descriptor loop (LOOP)", () => {
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 1);
    desc(1, 0x10000, 16, VRING_DESC_F_NEXT, 0);
    publish(0);
    expect(popError().code).toBe("LOOP");
  });

  test("rejects a loop inside an indirect table (LOOP)", () => {
    const T = 0x40000;
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 0, T);
    desc(0, T, 32, VRING_DESC_F_INDIRECT);
    publish(0);
    expect(popError().code).toBe("LOOP");
  });

  test("rejects nested indirect tables (NESTED_INDIRECT)", () => {
    const T = 0x40000;
    desc(0, T + 0x100, 16, VRING_DESC_F_INDIRECT, 0, T);
    desc(0, T, 16, VRING_DESC_F_INDIRECT);
    publish(0);
    expect(popError().code).toBe("NESTED_INDIRECT");
  });

  test("rejects an indirect table length that is not a multiple of 16 (INDIRECT_LEN)", () => {
    desc(0, 0x40000, 24, VRING_DESC_F_INDIRECT);
    publish(0);
    expect(popError().code).toBe("INDIRECT_LEN");
  });

  test("rejects INDIRECT together with NEXT (INDIRECT_NEXT)", () => {
    desc(0, 0x40000, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
    publish(0);
    expect(popError().code).toBe("INDIRECT_NEXT");
  });

  test("rejects an indirect table outside guest memory (BAD_ADDR)", () => {
    desc(0, (1 << 20) - 16, 32, VRING_DESC_F_INDIRECT);
    publish(0);
    expect(popError().code).toBe("BAD_ADDR");
  });

  test("rejects a readable descriptor after a writable one (ORDER)", () => {
    desc(0, 0x10000, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
    desc(1, 0x20000, 16, 0);
    publish(0);
    expect(popError().code).toBe("ORDER");
  });

  test("rejects a zero-length buffer (ZERO_LEN)", () => {
    desc(0, 0x10000, 0, 0);
    publish(0);
    expect(popError().code).toBe("ZERO_LEN");
  });

  test("rejects buffers outside guest memory, and addresses past 2^53 (BAD_ADDR)", () => {
    desc(0, (1 << 20) - 8, 16, 0);
    publish(0);
    expect(popError().code).toBe("BAD_ADDR");
    desc(1, 2 ** 60, 16, 0);
    q.broken = null;
    q.lastAvail = 1;
    publish(1);
    expect(popError().code).toBe("BAD_ADDR");
  });

  test("rejects a chain whose lengths add up past 4 GiB (TOTAL_LEN)", () => {
    desc(0, 0x10000, 0xffffffff, VRING_DESC_F_NEXT, 1);
    desc(1, 0x10000, 2, 0);
    publish(0);
    // The first buffer is already outside 1 MiB of memory: either check may fire first; both are errors.
    expect(["TOTAL_LEN", "BAD_ADDR"]).toContain(popError().code);
  });

  test("rejects avail.idx moving more than the ring size (AVAIL_IDX_JUMP)", () => {
    ram.setUint16(AVAIL + 2, SIZE + 1, true);
    expect(popError().code).toBe("AVAIL_IDX_JUMP");
  });

  test("setRings() refuses sizes that are not a power of two", () => {
    const s = mem.uvaSpan(UVA + DESC, 16);
    expect(() => q.setRings(6, s, mem.uvaSpan(UVA + AVAIL, 8), mem.uvaSpan(UVA + USED, 8))).toThrow(VirtqError);
  });

  test("EVENT_IDX: flush() notifies only when used_event is crossed, across the 16-bit wrap", () => {
    q.eventIdx = true;
    desc(0, 0x10000, 16, 0);
    // Start near the wrap: both indexes at 65533.
    q.lastAvail = 65533;
    availIdx = 65533;
    q.usedIdx = 65533;
    ram.setUint16(USED + 2, 65533, true);
    const usedEvent = (v: number) => ram.setUint16(AVAIL + 4 + 2 * SIZE, v, true);
    usedEvent(65534); // driver wants an interrupt once used.idx passes 65534
    const one = () => { publish(0); pop(); q.push(0, 1); return q.flush(); };
    expect(one()).toBe(true); // used 65534: the first flush always notifies (nothing signalled before)
    expect(one()).toBe(true); // used 65535: the entry at 65534 = used_event was just added
    expect(one()).toBe(false); // used 0 (wrapped): used_event 65534 already passed
    usedEvent(0);
    expect(one()).toBe(true); // used 1: entry 0 = used_event added, across the wrap
    expect(one()).toBe(false);
    expect(usedIdx()).toBe(2);
  });

  test("vringNeedEvent() follows the §2.7.10 formula, including wrap-around", () => {
    expect(vringNeedEvent(5, 6, 5)).toBe(true);
    expect(vringNeedEvent(5, 5, 4)).toBe(false);
    expect(vringNeedEvent(5, 10, 3)).toBe(true);
    expect(vringNeedEvent(65535, 0, 65535)).toBe(true);
    expect(vringNeedEvent(65535, 2, 0)).toBe(false);
    expect(vringNeedEvent(1, 3, 65530)).toBe(true);
  });

  test("enableNotification() writes avail_event = lastAvail under EVENT_IDX and reports late arrivals", () => {
    q.eventIdx = true;
    desc(0, 0x10000, 16, 0);
    publish(0);
    pop();
    expect(q.enableNotification()).toBe(false);
    expect(ram.getUint16(USED + 4 + 8 * SIZE, true)).toBe(1);
    publish(0);
    expect(q.enableNotification()).toBe(true);
  });
});

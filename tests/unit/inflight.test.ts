import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { PackedInflight, SplitInflight, packedInflightQueueSize, splitInflightQueueSize } from "../../src/virtq/inflight.ts";
import { SplitQueue } from "../../src/virtq/split.ts";
import { PackedQueue } from "../../src/virtq/packed.ts";
import { GuestRam } from "../../src/frontend/guest_ram.ts";
import { PackedDriver } from "../../src/frontend/packed_driver.ts";
import { fillRandom, rng } from "../support/random.ts";

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

// ---- packed rings ------------------------------------------------------------------------

function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

type Crash = "beforeFlush" | "beforePublish" | "afterPublish";
const CRASH = new Error("back-end killed");

/**
 * PackedDriver and PackedQueue over one GuestRam with a packed inflight
 * area; the device completes in random order and batches and is "killed"
 * every `crashEvery` rounds at a point of `crashes` (pushes not flushed; the
 * area updated but the batch not published; the batch published but the area
 * not cleared), losing all its memory. A new PackedQueue then starts from the
 * ring, the area and the driver's own base. Every request must reach the
 * driver exactly once, with the device's bytes and length.
 */
function packedCrashRun(o: { size: number; seed: number; requests: number; crashEvery: number; crashes: Crash[]; inOrder?: boolean }) {
  const n = o.size;
  const rand = lcg(o.seed);
  const gr = new GuestRam({ size: 16 << 20 });
  const gm = new GuestMemory();
  for (const reg of gr.memRegions()) gm.add(reg, gr.fd);
  const drv = new PackedDriver(gr, { size: n, indirectMax: 4, inOrder: o.inOrder });
  const area = new Uint8Array(packedInflightQueueSize(n));
  let resubmitted = 0;
  try {
    const mk = () => {
      const q = new PackedQueue(0, gm);
      q.inOrder = o.inOrder ?? false;
      q.setRings(n, gm.uvaSpan(gr.uva(drv.descGpa), 16 * n), gm.uvaSpan(gr.uva(drv.driverGpa), 4), gm.uvaSpan(gr.uva(drv.deviceGpa), 4));
      // What our front-end sends after a back-end died: its own view (QEMU 7.2 cannot rewind packed rings).
      q.setBase(drv.vringBase);
      const log = new PackedInflight(area, n);
      q.setInflight(log);
      resubmitted += q.startInflight();
      return { q, log };
    };
    let { q, log } = mk();
    const SLOT = 4096;
    const slots = gr.alloc(n * SLOT, 4096);
    const tagOf = new Int32Array(n), lenOf = new Int32Array(n), slotOf = new Int32Array(n);
    const free = Array.from({ length: n }, (_, i) => i);
    const seen = new Uint8Array(o.requests);
    const rp = new Pieces(4), wp = new Pieces(4);
    let inflight: { id: number; len: number }[] = [];
    let submitted = 0, done = 0, round = 0, crashes = 0, idle = 0;
    while (done < o.requests) {
      let progress = 0;
      for (let b = 1 + Math.floor(rand() * 4); b > 0 && submitted < o.requests && free.length; b--) {
        const nw = 1 + Math.floor(rand() * 2);
        const indirect = rand() < 0.3;
        if (!drv.canAdd(1 + nw, indirect)) break;
        const s = free.pop()!;
        const base = slots + s * SLOT;
        gr.dv.setUint32(gr.offset(base, 4), submitted, true);
        drv.begin(indirect);
        drv.add(base, 16, false);
        let wl = 0;
        for (let k = 0; k < nw; k++) {
          const len = 8 + Math.floor(rand() * 100);
          drv.add(base + 64 + 256 * k, len, true);
          wl += len;
        }
        const id = drv.commit();
        tagOf[id] = submitted++;
        lenOf[id] = wl;
        slotOf[id] = s;
        progress++;
      }
      drv.publish();
      for (let id; (id = q.pop(rp, wp)) >= 0; progress++) {
        // The device's work, idempotent (a resubmitted request does it again): tag ^ K into the first writable bytes.
        const t = rp.win[0]![rp.off[0]!]! | (rp.win[0]![rp.off[0]! + 1]! << 8) | (rp.win[0]![rp.off[0]! + 2]! << 16) | (rp.win[0]![rp.off[0]! + 3]! << 24);
        const x = (t ^ 0x5a5a5a5a) >>> 0;
        for (let b = 0; b < 4; b++) wp.win[0]![wp.off[0]! + b] = (x >>> (8 * b)) & 0xff;
        inflight.push({ id, len: wp.total });
      }
      const crashNow = ++round % o.crashEvery === 0;
      const mode = o.crashes[Math.floor(rand() * o.crashes.length)]!;
      let unflushed = 0;
      try {
        for (let k = Math.floor(rand() * (inflight.length + 1)); k > 0; k--) {
          const j = Math.floor(rand() * inflight.length);
          const e = inflight[j]!;
          inflight[j] = inflight[inflight.length - 1]!;
          inflight.pop();
          q.push(e.id, e.len);
          unflushed++;
          if (rand() < 0.3 && !crashNow) {
            q.flush();
            unflushed = 0;
          }
        }
        if (crashNow) {
          // A crash inside flush needs a batch to publish; without one the back-end dies here.
          if (unflushed === 0) throw CRASH;
          if (mode === "beforePublish") {
            const orig = log.beforePublish.bind(log);
            log.beforePublish = (p: number, w: number) => { orig(p, w); throw CRASH; };
          } else if (mode === "afterPublish") {
            log.afterPublish = () => { throw CRASH; };
          } else {
            throw CRASH;
          }
        }
        q.flush();
        // In order, the pushes may all be held back (an older buffer still runs): nothing to publish, die after.
        if (crashNow && o.inOrder) throw CRASH;
        if (crashNow) throw new Error(`no crash in mode ${mode}`);
      } catch (e) {
        if (e !== CRASH) throw e;
        // Killed: everything the device held in memory is gone; a new one starts over the same ring and area.
        // The driver runs on meanwhile and may reap what the dead one published.
        crashes++;
        inflight = [];
        q.detach();
        if (rand() < 0.5) progress += reapAll();
        ({ q, log } = mk());
      }
      progress += reapAll();
      if (progress === 0 && ++idle > 50) throw new Error(`stalled: ${done}/${o.requests}, ${drv.inFlight} in flight, base 0x${q.getBase().toString(16)}`);
      if (progress) idle = 0;
    }
    function reapAll(): number {
      let got = 0;
      while (drv.reap()) {
        const id = drv.usedId;
        const tag = tagOf[id]!;
        expect(seen[tag]).toBe(0);
        seen[tag] = 1;
        expect(drv.usedLen).toBe(lenOf[id]!);
        expect(gr.dv.getUint32(gr.offset(slots + slotOf[id]! * SLOT + 64, 4), true)).toBe((tag ^ 0x5a5a5a5a) >>> 0);
        free.push(slotOf[id]!);
        done++;
        got++;
      }
      return got;
    }
    expect(seen.every((v) => v === 1)).toBe(true);
    return { crashes, resubmitted };
  } finally {
    drv.close();
    gm.clear();
    gr.close();
  }
}

describe("PackedInflight", () => {
  test("a hostile area (random bytes, then random edits of a valid one) gives InflightAreaError or sane buffers, nothing else", () => {
    // The front-end owns the area's contents (SET_INFLIGHT_FD): recovery must never trust an index.
    const rnd = rng(0x9e3779b9);
    const outcomes = { refused: 0, recovered: 0 };
    for (const n of [1, 3, 8, 64]) {
      const area = new Uint8Array(packedInflightQueueSize(n));
      for (let round = 0; round < 400; round++) {
        if (round % 2 === 0) {
          fillRandom(area, rnd);
          // Often keep the header plausible so that recovery goes past the first checks.
          if (round % 4 === 0) area.set([n & 0xff, n >> 8], 10);
        } else {
          const log = new PackedInflight(area, n);
          log.init(rnd() % n, rnd() & 1);
          for (let k = 0; k < 8; k++) area[rnd() % area.length] = rnd() & 0xff;
        }
        const log = new PackedInflight(area, n);
        try {
          const bufs = log.recover(() => (rnd() & 1) === 1);
          const ids = new Set<number>();
          for (const b of bufs) {
            expect(b.id).toBeLessThan(n);
            expect(b.head).toBeLessThan(n);
            expect(b.num).toBeGreaterThan(0);
            expect(b.num).toBeLessThanOrEqual(n);
            ids.add(b.id);
            const d = { addr: 0, len: 0, flags: 0 };
            for (let k = 0; k < b.num; k++) {
              try {
                log.stored(b.head, k, d);
              } catch (e) {
                expect((e as Error).name).toBe("InflightAreaError");
              }
            }
          }
          expect(ids.size).toBe(bufs.length);
          outcomes.recovered++;
        } catch (e) {
          expect((e as Error).name).toBe("InflightAreaError");
          outcomes.refused++;
        }
      }
    }
    expect(outcomes.refused).toBeGreaterThan(0);
    expect(outcomes.recovered).toBeGreaterThan(0);
  });

  test("packedInflightQueueSize() is 32 + 32 per entry, rounded up to 64", () => {
    expect(packedInflightQueueSize(8)).toBe(320);
    expect(packedInflightQueueSize(128)).toBe(4096 + 64);
  });

  test("pop() copies the chain into free entries before the device sees it; flush() frees them after publishing", () => {
    const gr = new GuestRam({ size: 4 << 20 });
    const gm = new GuestMemory();
    for (const reg of gr.memRegions()) gm.add(reg, gr.fd);
    const drv = new PackedDriver(gr, { size: 8 });
    const area = new Uint8Array(packedInflightQueueSize(8));
    try {
      const q = new PackedQueue(0, gm);
      q.setRings(8, gm.uvaSpan(gr.uva(drv.descGpa), 128), gm.uvaSpan(gr.uva(drv.driverGpa), 4), gm.uvaSpan(gr.uva(drv.deviceGpa), 4));
      q.setBase(drv.vringBase);
      q.setInflight(new PackedInflight(area, 8));
      q.startInflight();
      const dv = new DataView(area.buffer);
      expect(dv.getUint16(8, true)).toBe(1); // version
      expect(area[20]).toBe(1); // used wrap counter of a fresh ring
      drv.begin();
      drv.add(0x1000, 16, false);
      drv.add(0x2000, 100, true);
      const id = drv.commit();
      drv.publish();
      expect(q.pop(r, w)).toBe(id);
      // Head entry 0 in flight with 2 descriptors (entries 0, 1); free list now starts at 2.
      expect(area[32]).toBe(1);
      expect(dv.getUint16(32 + 6, true)).toBe(2);
      expect(dv.getUint16(32 + 4, true)).toBe(1); // last
      expect(dv.getUint16(12, true)).toBe(2); // free_head
      expect(dv.getUint16(14, true)).toBe(2); // old_free_head
      expect(Number(dv.getBigUint64(32 + 32 + 24, true))).toBe(0x2000); // entry 1: the writable buffer
      expect(dv.getUint32(32 + 32 + 20, true)).toBe(100);
      expect(dv.getUint16(32 + 32 + 16, true)).toBe(id);
      q.push(id, 100);
      expect(area[32]).toBe(1); // pushed, not published
      q.flush();
      expect(area[32]).toBe(0);
      expect(dv.getUint16(12, true)).toBe(0); // entries back at the head of the free list
      expect(dv.getUint16(16, true)).toBe(2); // used_idx: position 2
      expect(dv.getUint16(18, true)).toBe(2); // old_used_idx committed
      expect(drv.reap()).toBe(true);
    } finally {
      drv.close();
      gm.clear();
      gr.close();
    }
  });

  for (const size of [4, 7, 64]) {
    test(`size ${size}: killed with pushes not flushed, nothing lost or completed twice`, () => {
      const s = packedCrashRun({ size, seed: size, requests: 3000, crashEvery: 7, crashes: ["beforeFlush"] });
      expect(s.crashes).toBeGreaterThan(50);
      expect(s.resubmitted).toBeGreaterThan(0);
    });
  }

  test("killed between recording the batch and publishing it: rolled back and resubmitted", () => {
    const s = packedCrashRun({ size: 16, seed: 5, requests: 3000, crashEvery: 5, crashes: ["beforePublish"] });
    expect(s.crashes).toBeGreaterThan(50);
    expect(s.resubmitted).toBeGreaterThan(0);
  });

  test("killed between publishing the batch and clearing it: committed, not completed twice", () => {
    const s = packedCrashRun({ size: 16, seed: 6, requests: 3000, crashEvery: 5, crashes: ["afterPublish"] });
    expect(s.crashes).toBeGreaterThan(50);
  });

  test("all crash points mixed, with VIRTIO_F_IN_ORDER", () => {
    const s = packedCrashRun({ size: 13, seed: 8, requests: 4000, crashEvery: 3, crashes: ["beforeFlush", "beforePublish", "afterPublish"], inOrder: true });
    expect(s.crashes).toBeGreaterThan(100);
  });
});

describe("inflight areas after a clean stop (ring reset)", () => {
  test("SplitQueue.startInflight(true) starts a fresh area even for another ring size", () => {
    const a = backend(0);
    publish(1);
    a.pop(r, w);
    a.push(1, 0);
    a.flush();
    // GET_VRING_BASE stopped the ring cleanly; it restarts with 4 entries at used.idx 0 (a ring reset).
    ram.setUint16(USED + 2, 0, true);
    const q = new SplitQueue(0, mem);
    q.setRings(4, mem.uvaSpan(UVA + DESC, 16 * 4), mem.uvaSpan(UVA + AVAIL, 6 + 2 * 4), mem.uvaSpan(UVA + USED, 6 + 8 * 4));
    q.setBase(0);
    q.setInflight(new SplitInflight(area, 4));
    // Without `fresh` the area (for 8 entries) would be refused.
    expect(() => q.startInflight()).toThrow(/inflight area for 8 descriptors/);
    expect(q.startInflight(true)).toBe(0);
    expect(new DataView(area.buffer).getUint16(10, true)).toBe(4);
  });
});

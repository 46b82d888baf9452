import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { VirtqError } from "../../src/errors.ts";
import { GuestRam } from "../../src/frontend/guest_ram.ts";
import { SplitDriver } from "../../src/frontend/split_driver.ts";
import { InOrderHold } from "../../src/virtq/queue.ts";
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

// ---- SplitDriver ↔ SplitQueue: in order ------------------------------------------------


function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

/**
 * SplitDriver and SplitQueue over one GuestRam, both with VIRTIO_F_IN_ORDER:
 * random chains (sometimes indirect), completed by the device in random order
 * and random batches, some written only partly; optional GET_VRING_BASE /
 * SET_VRING_BASE restarts. The driver must get every request back once, in
 * submission order, with its exact length, and free descriptors in ring order.
 */
function splitPair(o: { size: number; seed: number; requests: number; eventIdx?: boolean; short?: number; restartEvery?: number; base?: number }) {
  const n = o.size;
  const rand = lcg(o.seed);
  const gr = new GuestRam({ size: 16 << 20 });
  const gm = new GuestMemory();
  for (const reg of gr.memRegions()) gm.add(reg, gr.fd);
  const drv = new SplitDriver(gr, { size: n, eventIdx: o.eventIdx, indirectMax: 4, inOrder: true, base: o.base ?? 0 });
  try {
    const mk = (base: number) => {
      const q = new SplitQueue(0, gm);
      q.eventIdx = o.eventIdx ?? false;
      q.inOrder = true;
      q.setRings(n, gm.uvaSpan(gr.uva(drv.descGpa), 16 * n), gm.uvaSpan(gr.uva(drv.availGpa), 6 + 2 * n), gm.uvaSpan(gr.uva(drv.usedGpa), 6 + 8 * n));
      q.setBase(base);
      return q;
    };
    let dq = mk(drv.vringBase);
    const SLOT = 4096;
    const slots = gr.alloc(n * SLOT, 4096);
    const tagOf = new Int32Array(n), wlenOf = new Int32Array(n), expLen = new Int32Array(n), slotOf = new Int32Array(n);
    const free = Array.from({ length: n }, (_, i) => i);
    const rp = new Pieces(4), wp = new Pieces(4);
    const inflight: { id: number; len: number }[] = [];
    let submitted = 0, done = 0, lastTag = -1, restarts = 0, idle = 0, expectHead = 0;
    for (;;) {
      if (done === o.requests) break;
      let progress = 0;
      for (let b = 1 + Math.floor(rand() * 4); b > 0 && submitted < o.requests; b--) {
        const nw = 1 + Math.floor(rand() * 2);
        const indirect = rand() < 0.3;
        if (!drv.canAdd(1 + nw, indirect) || free.length === 0) break;
        const s = free.pop()!;
        const base = slots + s * SLOT;
        gr.dv.setUint32(gr.offset(base, 4), submitted, true);
        // Ring order (§2.7.9 driver requirement): a direct chain starts where the last one ended.
        if (!indirect) expect(drv["freeHead"]).toBe(expectHead);
        drv.begin(indirect);
        drv.add(base, 16, false);
        let wl = 0;
        for (let k = 0; k < nw; k++) {
          const len = 8 + Math.floor(rand() * 100);
          drv.add(base + 64 + 256 * k, len, true);
          wl += len;
        }
        const id = drv.commit();
        expectHead = (id + (indirect ? 1 : 1 + nw)) % n;
        tagOf[id] = submitted++;
        wlenOf[id] = wl;
        slotOf[id] = s;
        progress++;
      }
      drv.kick();
      for (let id; (id = dq.pop(rp, wp)) >= 0; progress++) {
        const len = o.short && rand() < o.short ? 1 + Math.floor(rand() * (wp.total - 1)) : wp.total;
        expLen[id] = len;
        inflight.push({ id, len });
      }
      for (let k = Math.floor(rand() * (inflight.length + 1)); k > 0; k--) {
        const j = Math.floor(rand() * inflight.length);
        const e = inflight[j]!;
        inflight[j] = inflight[inflight.length - 1]!;
        inflight.pop();
        dq.push(e.id, e.len);
        if (rand() < 0.3) dq.flush();
      }
      dq.flush();
      while (drv.reap()) {
        const id = drv.usedId;
        expect(tagOf[id]).toBe(lastTag + 1);
        lastTag = tagOf[id]!;
        expect(drv.usedLen).toBe(expLen[id]!);
        free.push(slotOf[id]!);
        done++;
        progress++;
      }
      if (o.restartEvery && done >= (restarts + 1) * o.restartEvery) {
        while (inflight.length) {
          const e = inflight.pop()!;
          dq.push(e.id, e.len);
        }
        dq.flush();
        const base = dq.getBase();
        dq.detach();
        dq = mk(base);
        restarts++;
      }
      if (progress === 0 && ++idle > 50) throw new Error(`stalled at ${done}/${o.requests}`);
      if (progress) idle = 0;
    }
    expect(drv.inFlight).toBe(0);
    expect(drv.numFree).toBe(n);
    return { usedEntries: drv.usedEntries, restarts };
  } finally {
    drv.close();
    gm.clear();
    gr.close();
  }
}

describe("SplitQueue, VIRTIO_F_IN_ORDER (raw ring)", () => {
  test("completions held back until their turn; one used element per run of whole buffers, idx moved by the run", () => {
    q.inOrder = true;
    for (const h of [0, 1, 2, 3]) {
      desc(h, 0x10000 + h * 0x100, 64, VRING_DESC_F_WRITE);
      publish(h);
    }
    for (const h of [0, 1, 2, 3]) expect(q.pop(r, w)).toBe(h);
    ram.setUint32(USED + 4, 0xeeee, true); // stale element 0, must be overwritten
    q.push(2, 64);
    q.push(1, 64);
    q.flush();
    expect(usedIdx()).toBe(0); // 0 is not done: 1 and 2 wait
    q.push(0, 64);
    q.push(3, 10); // written partly: ends a run, but it is the last one anyway
    q.flush();
    // One element for the run 0, 1, 2, 3 (all but the last written whole): id 3, its length; idx + 4.
    expect(usedIdx()).toBe(4);
    expect(usedElem(0)).toEqual([3, 10]);
  });

  test("a partly written buffer inside a run closes the run there (its length is kept exactly)", () => {
    q.inOrder = true;
    for (const h of [4, 5, 6]) {
      desc(h, 0x10000 + h * 0x100, 64, VRING_DESC_F_WRITE);
      publish(h);
    }
    for (const h of [4, 5, 6]) q.pop(r, w);
    q.push(4, 64);
    q.push(5, 7);
    q.push(6, 64);
    q.flush();
    expect(usedIdx()).toBe(3);
    expect(usedElem(0)).toEqual([5, 7]); // run 4, 5 (5 partly written: last of its run)
    expect(usedElem(2)).toEqual([6, 64]); // run 6 at index 2; index 1 is not written
  });

  test("a head made available more times than the ring holds breaks the queue (HEAD_BUSY), never overfills the hold", () => {
    q.inOrder = true;
    desc(0, 0x10000, 64, VRING_DESC_F_WRITE);
    for (let i = 0; i < SIZE; i++) publish(0);
    for (let i = 0; i < SIZE; i++) q.pop(r, w);
    publish(0); // one more: within the ring-size bound of avail.idx, but a ninth chain in flight on a ring of 8
    expect(() => q.pop(r, w)).toThrow(VirtqError);
    expect(q.broken?.code).toBe("HEAD_BUSY");
  });
});

describe("VIRTIO_F_NOTIFICATION_DATA (driver side)", () => {
  test("SplitDriver: each notification computes vq index | next avail index << 16, past the 15-bit wrap", () => {
    const gr = new GuestRam({ size: 4 << 20 });
    const drv = new SplitDriver(gr, { size: 8, index: 3, notificationData: true, base: 0x7fff });
    try {
      expect(drv.notifyData).toBe(-1);
      drv.begin();
      drv.add(0x1000, 16, false);
      drv.commit();
      expect(drv.kick()).toBe(true);
      expect(drv.notifyData).toBe(((0x8000 << 16) | 3) >>> 0); // next_off 0, next_wrap 1 (bit 15 of the index)
    } finally {
      drv.close();
      gr.close();
    }
  });

  test("SplitDriver without it computes nothing", () => {
    const gr = new GuestRam({ size: 4 << 20 });
    const drv = new SplitDriver(gr, { size: 8 });
    try {
      drv.begin();
      drv.add(0x1000, 16, false);
      drv.commit();
      drv.kick();
      expect(drv.notifyData).toBe(-1);
    } finally {
      drv.close();
      gr.close();
    }
  });
});

describe("SplitDriver ↔ SplitQueue, VIRTIO_F_IN_ORDER", () => {
  for (const size of [1, 4, 16, 256]) {
    test(`size ${size}: out-of-order device completions come back in order; whole buffers share used elements`, () => {
      const s = splitPair({ size, seed: size + 3, requests: 4000, eventIdx: true });
      if (size === 1) expect(s.usedEntries).toBe(4000);
      else expect(s.usedEntries).toBeLessThan(size >= 16 ? 4000 * 0.7 : 4000);
    });
  }

  test("partly written buffers end runs: every length exact; across the 16-bit index wrap", () => {
    const s = splitPair({ size: 32, seed: 9, requests: 4000, short: 0.3, base: 65000 });
    expect(s.usedEntries).toBeLessThan(4000);
  });

  test("GET_VRING_BASE / SET_VRING_BASE restarts mid-run keep the order", () => {
    const s = splitPair({ size: 8, seed: 10, requests: 3000, short: 0.1, restartEvery: 89 });
    expect(s.restarts).toBeGreaterThan(20);
  });

  test("a used element naming a chain past used.idx is refused (BAD_USED)", () => {
    const gr = new GuestRam({ size: 4 << 20 });
    const drv = new SplitDriver(gr, { size: 8, inOrder: true });
    try {
      const heads: number[] = [];
      for (let i = 0; i < 3; i++) {
        drv.begin();
        drv.add(0x1000, 16, true);
        heads.push(drv.commit());
      }
      drv.publish();
      // A device claims a run ending at the third chain but moves used.idx by 2 only.
      const u = gr.offset(drv.usedGpa, 6 + 8 * 8);
      gr.dv.setUint32(u + 4, heads[2]!, true);
      gr.dv.setUint16(u + 2, 2, true);
      expect(() => drv.reap()).toThrow(/past used.idx/);
    } finally {
      drv.close();
      gr.close();
    }
  });
});

describe("InOrderHold", () => {
  test("done() emits in taken order, holding back completions whose turn has not come, across the circle", () => {
    const h = new InOrderHold();
    h.reset(4);
    const out: number[] = [];
    const emit = (id: number, len: number) => out.push(id * 100 + len);
    for (let round = 0; round < 3; round++) {
      h.taken(3); h.taken(1); h.taken(2);
      h.done(2, 7, emit);
      h.done(1, 5, emit);
      expect(out).toEqual([]);
      h.done(3, 9, emit);
      expect(out).toEqual([309, 105, 207]);
      out.length = 0;
      expect(h.pending).toBe(0);
    }
  });
});

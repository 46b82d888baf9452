/**
 * Packed virtqueues (VIRTIO 1.2 §2.8): PackedQueue (device side) over raw
 * descriptors written with DataView into memfd-backed guest memory,
 * PackedDriver (driver side) over GuestRam checked against raw memory, and
 * the two paired over the same memory for thousands of random requests.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { VirtqError } from "../../src/errors.ts";
import { FrontendError } from "../../src/frontend/client.ts";
import { GuestRam } from "../../src/frontend/guest_ram.ts";
import { PackedDriver, encodePackedDescs, eventPassed } from "../../src/frontend/packed_driver.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import {
  PACKED_INITIAL_BASE, PACKED_RING_SIZES, PackedQueue, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE, packedBase, packedNeedEvent,
} from "../../src/virtq/packed.ts";

const AVAIL = VIRTQ_DESC_F_AVAIL, USED = VIRTQ_DESC_F_USED, NEXT = VIRTQ_DESC_F_NEXT, WRITE = VIRTQ_DESC_F_WRITE;
const INDIRECT = VIRTQ_DESC_F_INDIRECT;

// Guest memory of 1 MiB at gpa 0: descriptor ring at 0x1000 (up to 2048 entries), event areas at 0x9000/0x9004.
const MEM = 1 << 20;
const DESC = 0x1000, DRV = 0x9000, DEV = 0x9004, UVA = 0x7000_0000;
let mem: GuestMemory;
let ram: DataView;
let q: PackedQueue;
let g: Guest;
const r = new Pieces(), w = new Pieces();

/** Deterministic PRNG (mulberry32) so failures replay. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

function writeDesc(at: number, addr: number, len: number, id: number, flags: number | null) {
  ram.setUint32(at, addr % 2 ** 32, true);
  ram.setUint32(at + 4, Math.floor(addr / 2 ** 32), true);
  ram.setUint32(at + 8, len, true);
  ram.setUint16(at + 12, id, true);
  if (flags !== null) ram.setUint16(at + 14, flags, true);
}
const flagsAt = (pos: number) => ram.getUint16(DESC + 16 * pos + 14, true);
const idAt = (pos: number) => ram.getUint16(DESC + 16 * pos + 12, true);
const lenAt = (pos: number) => ram.getUint32(DESC + 16 * pos + 8, true);
const setDriverArea = (flags: number, offWrap = 0) => {
  ram.setUint16(DRV, offWrap, true);
  ram.setUint16(DRV + 2, flags, true);
};
const deviceArea = () => ({ offWrap: ram.getUint16(DEV, true), flags: ram.getUint16(DEV + 2, true) });

interface D { addr: number; len: number; flags?: number; id?: number }

/**
 * A minimal raw driver written for these tests (independent of PackedDriver):
 * writes chains at its positions with the avail bits of its wrap counter, the
 * first descriptor's flags last, and reads used descriptors in ring order.
 */
class Guest {
  pos = 0;
  wrap = 1;
  usedPos = 0;
  usedWrap = 1;
  readonly lens = new Map<number, number>();
  private held: [number, number] | null = null;
  constructor(readonly n: number) {}

  static bits(wrap: number): number {
    return wrap ? AVAIL : USED;
  }

  /** Makes chain `id` available (NEXT added to all but the last); `hold` keeps the first flags for `release`. */
  chain(id: number, ds: D[], hold = false): number {
    const first = this.pos;
    let firstFlags = 0;
    ds.forEach((d, k) => {
      const flags = (d.flags ?? 0) | (k < ds.length - 1 ? NEXT : 0) | Guest.bits(this.wrap);
      writeDesc(DESC + 16 * this.pos, d.addr, d.len, d.id ?? id, k === 0 ? null : flags);
      if (k === 0) firstFlags = flags;
      if (++this.pos === this.n) {
        this.pos = 0;
        this.wrap ^= 1;
      }
    });
    this.lens.set(id, ds.length);
    if (hold) this.held = [first, firstFlags];
    else ram.setUint16(DESC + 16 * first + 14, firstFlags, true);
    return first;
  }

  release(): void {
    const [p, f] = this.held!;
    ram.setUint16(DESC + 16 * p + 14, f, true);
    this.held = null;
  }

  /** The next used descriptor, or null; skips the chain's length. */
  used(): { id: number; len: number; flags: number } | null {
    const f = flagsAt(this.usedPos);
    const a = (f >>> 7) & 1, u = (f >>> 15) & 1;
    if (a !== this.usedWrap || u !== this.usedWrap) return null;
    const id = idAt(this.usedPos), len = lenAt(this.usedPos);
    const k = this.lens.get(id);
    if (k === undefined) throw new Error(`used id ${id} was never made available`);
    this.lens.delete(id);
    this.usedPos += k;
    if (this.usedPos >= this.n) {
      this.usedPos -= this.n;
      this.usedWrap ^= 1;
    }
    return { id, len, flags: f };
  }
}

const span = (gpa: number, len: number) => mem.uvaSpan(UVA + gpa, len);
function setup(n: number): void {
  ram.setUint32(DRV, 0, true);
  ram.setUint32(DEV, 0, true);
  new Uint8Array(ram.buffer, ram.byteOffset + DESC, 16 * 2048).fill(0);
  q = new PackedQueue(0, mem);
  q.setRings(n, span(DESC, 16 * n), span(DRV, 4), span(DEV, 4));
  g = new Guest(n);
}

function popError(): VirtqError {
  try {
    q.pop(r, w);
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqError);
    expect(q.broken).toBe(e as VirtqError);
    return e as VirtqError;
  }
  throw new Error("pop() did not throw");
}

beforeEach(() => {
  const fd = sys.memfdCreate("packed-test");
  sys.ftruncate(fd, MEM);
  mem = new GuestMemory();
  const reg = mem.add({ guestPhysAddr: 0, memorySize: MEM, userAddr: UVA, mmapOffset: 0 }, fd);
  sys.close(fd);
  ram = new DataView(reg.windows[0]!.buffer, 0, MEM);
  setup(8);
});
afterEach(() => {
  q.detach();
  mem.clear();
});

describe("PackedQueue", () => {
  test("PACKED_RING_SIZES: descriptor ring 16 × n, event suppression areas 4 bytes each", () => {
    expect([PACKED_RING_SIZES.desc(7), PACKED_RING_SIZES.driver(7), PACKED_RING_SIZES.device(7)]).toEqual([112, 4, 4]);
    expect(q.layout).toBe("packed");
  });

  test("pop() returns -1 on a zeroed ring and for a descriptor with the previous lap's bits", () => {
    expect(q.pop(r, w)).toBe(-1);
    writeDesc(DESC, 0x10000, 16, 0, USED); // AVAIL 0, USED 1: available only for wrap counter 0
    expect(q.pop(r, w)).toBe(-1);
    writeDesc(DESC, 0x10000, 16, 0, AVAIL | USED); // a used descriptor
    expect(q.pop(r, w)).toBe(-1);
  });

  test("pop() walks a chain and takes the buffer id from its last descriptor", () => {
    g.chain(4, [
      { addr: 0x10000, len: 16, id: 0xffff }, // ids before the last are not looked at (§2.8.6)
      { addr: 0x20000, len: 4096, flags: WRITE, id: 0x1234 },
      { addr: 0x30000, len: 1, flags: WRITE },
    ]);
    expect(q.pop(r, w)).toBe(4);
    expect([r.total, w.total, w.count]).toEqual([16, 4097, 2]);
    expect([q.availPos, q.inflightDescs]).toEqual([3, 3]);
    expect(q.pop(r, w)).toBe(-1);
  });

  test("push() + flush() write one used descriptor (id, len, AVAIL|USED, WRITE iff len) at the used position", () => {
    g.chain(6, [{ addr: 0x10000, len: 16 }, { addr: 0x20000, len: 512, flags: WRITE }]);
    g.chain(2, [{ addr: 0x10000, len: 16 }]);
    expect(q.pop(r, w)).toBe(6);
    expect(q.pop(r, w)).toBe(2);
    q.push(6, 513);
    expect(flagsAt(0)).toBe(AVAIL | NEXT); // still the driver's descriptor until flush
    expect(q.flush()).toBe(true);
    expect([idAt(0), lenAt(0), flagsAt(0)]).toEqual([6, 513, AVAIL | USED | WRITE]);
    expect(q.usedPos).toBe(2); // skipped the chain's two descriptors
    q.push(2, 0);
    q.flush();
    expect([idAt(2), lenAt(2), flagsAt(2)]).toEqual([2, 0, AVAIL | USED]);
    expect(g.used()).toEqual({ id: 6, len: 513, flags: AVAIL | USED | WRITE });
    expect(g.used()?.id).toBe(2);
    expect(q.inflightDescs).toBe(0);
  });

  for (const n of [1, 2, 3, 5, 7, 127, 256]) {
    test(`wraps around a ring of ${n} with chains of 1..4 descriptors, also across the end`, () => {
      setup(n);
      const rand = rng(n);
      let crossed = 0;
      const rounds = Math.max(4 * n + 3, 300);
      for (let i = 0; i < rounds; i++) {
        const len = 1 + Math.floor(rand() * Math.min(n, 4));
        const id = Math.floor(rand() * n);
        const ds: D[] = [{ addr: 0x10000 + i, len: 10 + len }];
        for (let k = 1; k < len; k++) ds.push({ addr: 0x20000 + 64 * k, len: 7 * k, flags: WRITE });
        if (g.pos + len > n) crossed++;
        g.chain(id, ds);
        expect(q.pop(r, w)).toBe(id);
        expect(r.total).toBe(10 + len);
        expect(w.total).toBe((7 * len * (len - 1)) / 2);
        expect([q.availPos, q.availWrap]).toEqual([g.pos, g.wrap]);
        q.push(id, w.total);
        expect(q.flush()).toBe(true);
        const flags = (g.usedWrap ? AVAIL | USED : 0) | (w.total ? WRITE : 0);
        expect(g.used()).toEqual({ id, len: w.total, flags });
        expect([q.usedPos, q.usedWrap]).toEqual([g.usedPos, g.usedWrap]);
        expect(q.getBase()).toBe(packedBase(g.pos, g.wrap, g.usedPos, g.usedWrap));
        expect(q.pop(r, w)).toBe(-1);
      }
      if (n >= 2) expect(crossed).toBeGreaterThan(0);
    });
  }

  test("pop() follows a chain across the end of the ring, where the wrap counter flips", () => {
    setup(5);
    for (let i = 0; i < 3; i++) {
      g.chain(0, [{ addr: 0x10000, len: 8 }]);
      q.pop(r, w);
      q.push(0, 0);
      q.flush();
      g.used();
    }
    g.chain(1, [{ addr: 0x11000, len: 1 }, { addr: 0x12000, len: 2 }, { addr: 0x13000, len: 3, flags: WRITE }, { addr: 0x14000, len: 4, flags: WRITE }]);
    expect([g.pos, g.wrap]).toEqual([2, 0]);
    expect(q.pop(r, w)).toBe(1);
    expect([...r.host.subarray(0, r.count)].map((h) => h - mem.regions[0]!.host)).toEqual([0x11000, 0x12000]);
    expect([r.total, w.total]).toEqual([3, 7]);
    expect([q.availPos, q.availWrap]).toEqual([2, 0]);
    q.push(1, 7);
    q.flush();
    expect(g.used()).toEqual({ id: 1, len: 7, flags: AVAIL | USED | WRITE }); // written at 3, still lap 1
    expect([q.usedPos, q.usedWrap]).toEqual([2, 0]);
    g.chain(3, [{ addr: 0x10000, len: 8 }]);
    expect(q.pop(r, w)).toBe(3);
    q.push(3, 1);
    q.flush();
    expect(flagsAt(2)).toBe(WRITE); // lap 0: AVAIL = USED = 0
    expect(g.used()?.id).toBe(3);
  });

  test("completion out of order: used descriptors in completion order, each skipping its own chain", () => {
    g.chain(5, [{ addr: 0x10000, len: 8 }, { addr: 0x20000, len: 8, flags: WRITE }]); // positions 0-1
    g.chain(2, [{ addr: 0x10000, len: 8 }]); // 2
    g.chain(7, [{ addr: 0x10000, len: 8 }, { addr: 0x10000, len: 8 }, { addr: 0x20000, len: 8, flags: WRITE }]); // 3-5
    expect([q.pop(r, w), q.pop(r, w), q.pop(r, w)]).toEqual([5, 2, 7]);
    q.push(2, 0); // written at 0
    q.push(7, 8); // at 1
    q.push(5, 3); // at 4
    // Batch: everything but the first entry's flags is in place; the driver still sees its own descriptor at 0.
    expect(flagsAt(0)).toBe(AVAIL | NEXT);
    expect(flagsAt(1)).toBe(AVAIL | USED | WRITE);
    expect(flagsAt(4)).toBe(AVAIL | USED | WRITE);
    expect(g.used()).toBeNull();
    expect(q.flush()).toBe(true);
    expect([g.used()?.id, g.used()?.id, g.used()?.id, g.used()]).toEqual([2, 7, 5, null]);
    expect([q.usedPos, q.availPos, q.inflightDescs]).toEqual([6, 6, 0]);
  });

  test("pop() reads a packed indirect table: WRITE counts, NEXT and ids inside are ignored, the ring id is used", () => {
    const T = 0x40000;
    new Uint8Array(ram.buffer, T, 48).set(encodePackedDescs([
      { addr: 0x10000, len: 16, flags: 0, id: 77 },
      { addr: 0x20000, len: 512, flags: WRITE },
      { addr: 0x30000, len: 1, flags: WRITE | NEXT }, // NEXT in a table: reserved, ignored
    ]));
    g.chain(3, [{ addr: T, len: 48, flags: INDIRECT | WRITE }]); // WRITE on the indirect descriptor: ignored
    expect(q.pop(r, w)).toBe(3);
    expect([r.total, w.total]).toEqual([16, 513]);
    expect(q.inflightDescs).toBe(1);
    q.push(3, 513);
    q.flush();
    expect(g.used()?.id).toBe(3);
    expect(q.usedPos).toBe(1);
  });

  test("pop() reads an unaligned indirect table through a private copy", () => {
    const T = 0x40002;
    new Uint8Array(ram.buffer, T, 32).set(encodePackedDescs([{ addr: 0x10000, len: 16, flags: 0 }, { addr: 0x20000, len: 7, flags: WRITE }]));
    g.chain(1, [{ addr: T, len: 32, flags: INDIRECT }]);
    expect(q.pop(r, w)).toBe(1);
    expect([r.total, w.total]).toEqual([16, 7]);
  });

  test("flush() follows the driver area: DISABLE, ENABLE, DESC without EVENT_IDX, reserved 3", () => {
    const one = (flags: number) => {
      setDriverArea(flags);
      g.chain(0, [{ addr: 0x10000, len: 8 }]);
      q.pop(r, w);
      q.push(0, 0);
      return q.flush();
    };
    expect(one(RING_EVENT_FLAGS_DISABLE)).toBe(false);
    expect(one(RING_EVENT_FLAGS_ENABLE)).toBe(true);
    expect(one(RING_EVENT_FLAGS_DESC)).toBe(true); // DESC is not valid without EVENT_IDX: treated as ENABLE
    expect(one(3)).toBe(true);
    expect(q.flush()).toBe(false); // nothing pushed
  });

  test("EVENT_IDX: flush() notifies only when the batch covers the driver's off_wrap, across the wrap", () => {
    setup(4);
    q.eventIdx = true;
    const batch = (k: number) => {
      const ids: number[] = [];
      for (let i = 0; i < k; i++) {
        g.chain(i, [{ addr: 0x10000, len: 8 }]);
        ids.push(q.pop(r, w));
      }
      for (const id of ids) q.push(id, 0);
      const got = q.flush();
      while (g.used()) { /* reap */ }
      return got;
    };
    setDriverArea(RING_EVENT_FLAGS_DESC, 0x8000 | 3);
    expect(batch(1)).toBe(true); // the first flush always notifies (nothing signalled yet)
    expect(batch(1)).toBe(false); // position 1: not 3
    expect(batch(2)).toBe(true); // positions 2, 3 (lap 1)
    expect(batch(1)).toBe(false); // position 0 of lap 0; the event named lap 1
    setDriverArea(RING_EVENT_FLAGS_DESC, 0x0000 | 0); // position 0 of lap 0: already passed
    expect(batch(1)).toBe(false);
    setDriverArea(RING_EVENT_FLAGS_DESC, 0x8000 | 1); // position 1 of lap 2 (wrap 1 again)
    expect([q.usedPos, q.usedWrap]).toEqual([2, 0]);
    expect(batch(3)).toBe(false); // positions 2, 3 (lap 1) and 0 (lap 2): 1 is next
    expect(batch(1)).toBe(true);
  });

  test("enableNotification()/disableNotification() write the device area and report late arrivals", () => {
    q.disableNotification();
    expect(deviceArea().flags).toBe(RING_EVENT_FLAGS_DISABLE);
    expect(q.enableNotification()).toBe(false);
    expect(deviceArea().flags).toBe(RING_EVENT_FLAGS_ENABLE);
    g.chain(0, [{ addr: 0x10000, len: 8 }]);
    expect(q.enableNotification()).toBe(true);
    q.pop(r, w);
    q.push(0, 0);
    q.flush();
    q.eventIdx = true;
    for (let i = 0; i < 9; i++) {
      g.chain(i % 8, [{ addr: 0x10000, len: 8 }]);
      q.pop(r, w);
      q.push(i % 8, 0);
      q.flush();
    }
    expect([q.availPos, q.availWrap]).toEqual([2, 0]);
    expect(q.enableNotification()).toBe(false);
    expect(deviceArea()).toEqual({ flags: RING_EVENT_FLAGS_DESC, offWrap: 2 }); // position 2, wrap counter 0
    g.chain(1, [{ addr: 0x10000, len: 8 }]);
    expect(q.enableNotification()).toBe(true);
  });

  test("getBase() starts at 0x80008000 and setBase() round-trips positions and wrap counters", () => {
    expect(q.getBase()).toBe(PACKED_INITIAL_BASE);
    expect(packedBase(0, 1, 0, 1)).toBe(PACKED_INITIAL_BASE);
    q.setBase(packedBase(5, 0, 3, 0));
    expect([q.availPos, q.availWrap, q.usedPos, q.usedWrap, q.inflightDescs]).toEqual([5, 0, 3, 0, 2]);
    expect(q.getBase()).toBe(0x00030005);
    q.setBase(packedBase(1, 1, 6, 0)); // avail wrapped past the end, used not yet: 3 in flight
    expect(q.inflightDescs).toBe(3);
  });

  test("setBase() with only the avail half (DPDK virtio-user) takes used = avail: nothing in flight", () => {
    q.setBase(0x8000 | 3);
    expect([q.availPos, q.availWrap, q.usedPos, q.usedWrap, q.inflightDescs]).toEqual([3, 1, 3, 1, 0]);
    q.setBase(5);
    expect([q.availPos, q.availWrap, q.usedPos, q.usedWrap, q.inflightDescs]).toEqual([5, 0, 5, 0, 0]);
  });

  test("setBase() refuses positions past the ring and avail more than a ring ahead of used (RING_ADDR)", () => {
    expect(() => q.setBase(packedBase(8, 1, 0, 1))).toThrow(VirtqError);
    expect(q.broken?.code).toBe("RING_ADDR");
    setup(8);
    expect(() => q.setBase(packedBase(0, 1, 9, 1))).toThrow(VirtqError);
    setup(8);
    expect(() => q.setBase(packedBase(2, 1, 1, 0))).toThrow(VirtqError); // avail is 9 past used
    setup(8);
    expect(() => q.setBase(2 ** 32)).toThrow(VirtqError);
  });

  test("setBase() before setRings() is checked when the rings are set", () => {
    const p = new PackedQueue(1, mem);
    p.setBase(packedBase(100, 1, 100, 1));
    expect(() => p.setRings(8, span(DESC, 128), span(DRV, 4), span(DEV, 4))).toThrow(VirtqError);
    p.setBase(packedBase(3, 0, 3, 0));
    p.setRings(8, span(DESC, 128), span(DRV, 4), span(DEV, 4));
    expect(p.broken).toBeNull();
    expect(p.getBase()).toBe(packedBase(3, 0, 3, 0));
  });

  test("setRings() takes any size in 1..32768 and refuses 0, 32769 and misaligned areas", () => {
    const ok = new PackedQueue(2, mem);
    ok.setRings(3, span(DESC, 48), span(DRV, 4), span(DEV, 4));
    expect(ok.size).toBe(3);
    expect(() => ok.setRings(0, span(DESC, 16), span(DRV, 4), span(DEV, 4))).toThrow(VirtqError);
    expect(() => ok.setRings(32769, span(DESC, 16), span(DRV, 4), span(DEV, 4))).toThrow(VirtqError);
    expect(() => ok.setRings(2, span(DESC + 8, 32), span(DRV, 4), span(DEV, 4))).toThrow(VirtqError);
    expect(() => ok.setRings(2, span(DESC, 32), span(DRV + 2, 4), span(DEV, 4))).toThrow(VirtqError);
    expect(ok.broken?.code).toBe("RING_ADDR");
  });

  test("a resumed queue (new PackedQueue + setBase) continues exactly where GET_VRING_BASE stopped", () => {
    setup(7);
    for (let i = 0; i < 10; i++) {
      g.chain(i % 7, [{ addr: 0x10000, len: 8 }, { addr: 0x20000, len: 8, flags: WRITE }]);
      expect(q.pop(r, w)).toBe(i % 7);
      q.push(i % 7, 8);
      q.flush();
      g.used();
    }
    g.chain(4, [{ addr: 0x10000, len: 8 }]); // available, not taken before the stop
    const base = q.getBase();
    expect(base).toBe(packedBase(6, 1, 6, 1)); // 20 descriptors on a ring of 7: two laps and 6
    q.detach();
    const q2 = new PackedQueue(0, mem);
    q = q2;
    q2.setRings(7, span(DESC, 112), span(DRV, 4), span(DEV, 4));
    q2.setBase(base);
    expect(q2.pop(r, w)).toBe(4);
    q2.push(4, 0);
    q2.flush();
    expect(g.used()?.id).toBe(4);
    expect(q2.pop(r, w)).toBe(-1);
  });

  describe("malformed rings: VirtqError, broken set", () => {
    test("a buffer id >= queue size (HEAD_RANGE)", () => {
      g.chain(8, [{ addr: 0x10000, len: 8 }]);
      expect(popError().code).toBe("HEAD_RANGE");
    });

    test("a chain longer than the ring (LOOP)", () => {
      for (let i = 0; i < 8; i++) writeDesc(DESC + 16 * i, 0x10000, 8, 0, NEXT | AVAIL);
      expect(popError().code).toBe("LOOP");
    });

    test("a zero-length buffer (ZERO_LEN), also in an indirect table", () => {
      g.chain(0, [{ addr: 0x10000, len: 8 }, { addr: 0x10000, len: 0 }]);
      expect(popError().code).toBe("ZERO_LEN");
      setup(8);
      new Uint8Array(ram.buffer, 0x40000, 16).set(encodePackedDescs([{ addr: 0x10000, len: 0, flags: 0 }]));
      g.chain(0, [{ addr: 0x40000, len: 16, flags: INDIRECT }]);
      expect(popError().code).toBe("ZERO_LEN");
    });

    test("a readable descriptor after a writable one (ORDER), also in an indirect table", () => {
      g.chain(0, [{ addr: 0x10000, len: 8, flags: WRITE }, { addr: 0x10000, len: 8 }]);
      expect(popError().code).toBe("ORDER");
      setup(8);
      new Uint8Array(ram.buffer, 0x40000, 32).set(encodePackedDescs([{ addr: 0x10000, len: 8, flags: WRITE }, { addr: 0x10000, len: 8, flags: 0 }]));
      g.chain(0, [{ addr: 0x40000, len: 32, flags: INDIRECT }]);
      expect(popError().code).toBe("ORDER");
    });

    test("an indirect table inside an indirect table (NESTED_INDIRECT)", () => {
      new Uint8Array(ram.buffer, 0x40000, 16).set(encodePackedDescs([{ addr: 0x40100, len: 16, flags: INDIRECT }]));
      g.chain(0, [{ addr: 0x40000, len: 16, flags: INDIRECT }]);
      expect(popError().code).toBe("NESTED_INDIRECT");
    });

    test("an indirect table length that is 0 or not a multiple of 16 (INDIRECT_LEN)", () => {
      g.chain(0, [{ addr: 0x40000, len: 24, flags: INDIRECT }]);
      expect(popError().code).toBe("INDIRECT_LEN");
      setup(8);
      g.chain(0, [{ addr: 0x40000, len: 0, flags: INDIRECT }]);
      expect(popError().code).toBe("INDIRECT_LEN");
    });

    test("INDIRECT with NEXT, or inside a chain (INDIRECT_NEXT)", () => {
      writeDesc(DESC, 0x40000, 16, 0, INDIRECT | NEXT | AVAIL);
      expect(popError().code).toBe("INDIRECT_NEXT");
      setup(8);
      g.chain(0, [{ addr: 0x10000, len: 8 }, { addr: 0x40000, len: 16, flags: INDIRECT }]);
      expect(popError().code).toBe("INDIRECT_NEXT");
    });

    test("buffers and tables outside guest memory, addresses past 2^53 (BAD_ADDR)", () => {
      g.chain(0, [{ addr: MEM - 8, len: 16 }]);
      expect(popError().code).toBe("BAD_ADDR");
      setup(8);
      g.chain(0, [{ addr: 2 ** 60, len: 16 }]);
      expect(popError().code).toBe("BAD_ADDR");
      setup(8);
      g.chain(0, [{ addr: MEM - 16, len: 32, flags: INDIRECT }]);
      expect(popError().code).toBe("BAD_ADDR");
      setup(8);
      new Uint8Array(ram.buffer, 0x40000, 16).set(encodePackedDescs([{ addr: 2 ** 53, len: 8, flags: 0 }]));
      g.chain(0, [{ addr: 0x40000, len: 16, flags: INDIRECT }]);
      expect(popError().code).toBe("BAD_ADDR");
    });

    test("a chain that runs into a descriptor the driver did not make available (NEXT_RANGE)", () => {
      writeDesc(DESC + 16, 0x10000, 8, 0, USED); // previous lap's bits
      writeDesc(DESC, 0x10000, 8, 0, NEXT | AVAIL);
      expect(popError().code).toBe("NEXT_RANGE");
    });

    test("a buffer id already in flight (HEAD_BUSY)", () => {
      g.chain(3, [{ addr: 0x10000, len: 8 }]);
      g.chain(3, [{ addr: 0x10000, len: 8 }]);
      expect(q.pop(r, w)).toBe(3);
      expect(popError().code).toBe("HEAD_BUSY");
    });

    test("more descriptors available than the ring holds (AVAIL_IDX_JUMP)", () => {
      setup(4);
      for (let i = 0; i < 4; i++) {
        g.chain(i, [{ addr: 0x10000, len: 8 }]);
        q.pop(r, w);
      }
      // All four positions are in flight; the driver "reuses" position 0 without seeing it used.
      g.chain(0, [{ addr: 0x10000, len: 8 }]);
      expect(popError().code).toBe("AVAIL_IDX_JUMP");
    });

    test("push() of an id that is not in flight (USED_HEAD)", () => {
      expect(() => q.push(5, 0)).toThrow(VirtqError);
      expect(q.broken?.code).toBe("USED_HEAD");
      setup(8);
      expect(() => q.push(8, 0)).toThrow(VirtqError);
    });

    test("a broken queue: pop() throws again, push()/flush()/enableNotification() do nothing, setRings() clears it", () => {
      g.chain(8, [{ addr: 0x10000, len: 8 }]);
      const e = popError();
      expect(() => q.pop(r, w)).toThrow(e);
      q.push(0, 0);
      expect(q.flush()).toBe(false);
      expect(q.enableNotification()).toBe(false);
      q.setRings(8, span(DESC, 128), span(DRV, 4), span(DEV, 4));
      expect(q.broken).toBeNull();
    });
  });
});

describe("PackedQueue over 5 GiB of sparse guest memory", () => {
  test("rejects a chain whose lengths add up past 4 GiB (TOTAL_LEN)", () => {
    const big = new GuestMemory();
    const fd = sys.memfdCreate("packed-big");
    const size = 5 * 2 ** 30;
    try {
      sys.ftruncate(fd, size);
      const reg = big.add({ guestPhysAddr: 0, memorySize: size, userAddr: 0x1_0000_0000, mmapOffset: 0 }, fd);
      const dv = new DataView(reg.windows[0]!.buffer, 0, 0x10000);
      const put = (pos: number, addr: number, len: number, flags: number) => {
        dv.setUint32(0x1000 + 16 * pos, addr % 2 ** 32, true);
        dv.setUint32(0x1000 + 16 * pos + 4, Math.floor(addr / 2 ** 32), true);
        dv.setUint32(0x1000 + 16 * pos + 8, len, true);
        dv.setUint16(0x1000 + 16 * pos + 14, flags, true);
      };
      const p = new PackedQueue(0, big);
      const s = (gpa: number, len: number) => big.uvaSpan(0x1_0000_0000 + gpa, len);
      p.setRings(4, s(0x1000, 64), s(0x2000, 4), s(0x2004, 4));
      put(1, 2 ** 32, 2, WRITE | AVAIL);
      put(0, 0x10000, 0xffffffff, NEXT | AVAIL);
      expect(() => p.pop(r, w)).toThrow(VirtqError);
      expect(p.broken?.code).toBe("TOTAL_LEN");
      p.detach();
    } finally {
      sys.close(fd);
      big.clear();
    }
  });
});

describe("packedNeedEvent() / eventPassed()", () => {
  test("agree with each other and with a brute-force walk for every small case", () => {
    for (let n = 1; n <= 7; n++) {
      for (let e = 0; e < 2 * (n + 1); e++) {
        const offWrap = (e % (n + 1)) | (e > n ? 0x8000 : 0); // offsets 0..n (n itself is out of range), both wrap bits
        for (let pos = 0; pos < n; pos++) {
          for (const wrap of [0, 1]) {
            for (let count = 0; count <= 2 * n; count++) {
              // Walk back `count` positions from (pos, wrap) and look for (off, w).
              let p = pos, wr = wrap, hit = false;
              for (let k = 0; k < count; k++) {
                if (--p < 0) {
                  p = n - 1;
                  wr ^= 1;
                }
                if (p === (offWrap & 0x7fff) && wr === offWrap >>> 15) hit = true;
              }
              const want = (offWrap & 0x7fff) >= n || count >= 2 * n || hit;
              expect(packedNeedEvent(n, offWrap, pos, wrap, count)).toBe(want);
              expect(eventPassed(n, offWrap, pos, wrap, count)).toBe(want);
            }
          }
        }
      }
    }
  });
});

// ---- driver side --------------------------------------------------------------------

const MiB = 1 << 20;
const opened: { close(): void }[] = [];
const track = <T extends { close(): void }>(x: T): T => (opened.push(x), x);
afterEach(() => {
  while (opened.length) opened.pop()!.close();
});

/** The device's raw view of a PackedDriver's ring in `ram`. */
function rawDevice(gr: GuestRam, d: PackedDriver) {
  const dv = gr.dv;
  const at = (gpa: number) => gr.offset(gpa, 1);
  const desc = (base: number, i: number) => {
    const o = at(base + 16 * i);
    return {
      addr: dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 2 ** 32, len: dv.getUint32(o + 8, true),
      id: dv.getUint16(o + 12, true), flags: dv.getUint16(o + 14, true),
    };
  };
  return {
    desc: (i: number) => desc(d.descGpa, i),
    table: (gpa: number, i: number) => desc(gpa, i),
    use(pos: number, id: number, len: number, flags: number) {
      const o = at(d.descGpa + 16 * pos);
      dv.setUint32(o + 8, len, true);
      dv.setUint16(o + 12, id, true);
      dv.setUint16(o + 14, flags, true);
    },
    setDeviceArea(flags: number, offWrap = 0) {
      dv.setUint16(at(d.deviceGpa), offWrap, true);
      dv.setUint16(at(d.deviceGpa + 2), flags, true);
    },
  };
}

describe("PackedDriver", () => {
  test("PackedDriver.commit() writes the chain with avail bits and the id; publish() stores the first flags last", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 6 }));
    const dev = rawDevice(gr, d);
    expect(d.descGpa % 16).toBe(0);
    expect([d.driverGpa - d.descGpa, d.deviceGpa - d.driverGpa]).toEqual([96, 4]);
    expect([d.availGpa, d.usedGpa]).toEqual([d.driverGpa, d.deviceGpa]);
    d.begin();
    d.add(0x1000, 16, false);
    d.add(0x2000, 512, true);
    d.add(0x3000, 1, true);
    const id = d.commit();
    expect(id).toBe(0);
    expect(dev.desc(0).flags).toBe(0); // held back
    expect(dev.desc(1)).toEqual({ addr: 0x2000, len: 512, id: 0, flags: AVAIL | WRITE | NEXT });
    expect(dev.desc(2)).toEqual({ addr: 0x3000, len: 1, id: 0, flags: AVAIL | WRITE });
    d.publish();
    expect(dev.desc(0)).toEqual({ addr: 0x1000, len: 16, id: 0, flags: AVAIL | NEXT });
    expect([d.numFree, d.inFlight, d.availIndex]).toEqual([3, 1, 0x8003]);
  });

  test("PackedDriver holds back only the oldest unpublished chain's first descriptor", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 4 }));
    const dev = rawDevice(gr, d);
    for (let i = 0; i < 3; i++) {
      d.begin();
      d.add(0x1000, 8, false);
      d.commit();
    }
    expect([dev.desc(0).flags, dev.desc(1).flags, dev.desc(2).flags]).toEqual([0, AVAIL, AVAIL]);
    d.publish();
    expect(dev.desc(0).flags).toBe(AVAIL);
  });

  test("PackedDriver.reap() takes used descriptors in device order, skipping each chain, and frees the ids", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 4 }));
    const dev = rawDevice(gr, d);
    d.begin(); d.add(0x1000, 8, false); d.add(0x2000, 8, true); const a = d.commit(); // positions 0-1
    d.begin(); d.add(0x1000, 8, false); const b = d.commit(); // 2
    d.kick();
    expect(d.reap()).toBe(false);
    dev.use(0, b, 0, AVAIL | USED); // b completes first: at 0, one descriptor
    dev.use(1, a, 5, AVAIL | USED | WRITE); // then a: at 1
    expect(d.pending()).toBe(2);
    expect(d.reap()).toBe(true);
    expect([d.usedId, d.usedLen]).toEqual([b, 0]);
    expect(d.reap()).toBe(true);
    expect([d.usedId, d.usedLen, d.numFree, d.inFlight, d.lastUsedIndex]).toEqual([a, 5, 4, 0, 0x8003]);
    expect(d.reap()).toBe(false);
  });

  test("PackedDriver.reap() reads len only with WRITE (§2.8.4) and throws BAD_USED for an id not in flight", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 4 }));
    const dev = rawDevice(gr, d);
    d.begin(); d.add(0x1000, 8, false); d.commit();
    d.begin(); d.add(0x1000, 8, false); d.commit();
    d.kick();
    dev.use(0, 0, 99, AVAIL | USED);
    expect(d.reap()).toBe(true);
    expect(d.usedLen).toBe(0);
    dev.use(1, 3, 0, AVAIL | USED);
    expect(() => d.reap()).toThrow(FrontendError);
  });

  test("PackedDriver.commit() of an indirect chain uses one ring descriptor and the id's table", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 8, indirectMax: 4 }));
    const dev = rawDevice(gr, d);
    d.begin(true);
    d.add(0x1000, 16, false);
    d.add(0x2000, 100, true);
    const id = d.commit();
    d.publish();
    expect(dev.desc(0)).toEqual({ addr: d.tableGpa(id), len: 32, id, flags: AVAIL | INDIRECT });
    expect(dev.table(d.tableGpa(id), 1)).toEqual({ addr: 0x2000, len: 100, id, flags: WRITE });
    expect(d.numFree).toBe(7);
    expect(d.canAdd(5, true)).toBe(false);
  });

  test("PackedDriver.kick() follows the device area: ENABLE, DISABLE, DESC under EVENT_IDX, force", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const submit = (d: PackedDriver) => {
      d.begin();
      d.add(0x1000, 8, false);
      d.commit();
    };
    const plain = track(new PackedDriver(gr, { size: 4 }));
    const pdev = rawDevice(gr, plain);
    expect(plain.kick()).toBe(false); // nothing new
    submit(plain);
    expect(plain.kick()).toBe(true);
    pdev.setDeviceArea(RING_EVENT_FLAGS_DISABLE);
    submit(plain);
    expect(plain.kick()).toBe(false);
    expect(plain.kick(true)).toBe(true);
    pdev.setDeviceArea(RING_EVENT_FLAGS_DESC, 0x8000 | 3); // DESC without EVENT_IDX: kick
    submit(plain);
    expect(plain.kick()).toBe(true);

    const ev = track(new PackedDriver(gr, { size: 4, eventIdx: true }));
    const edev = rawDevice(gr, ev);
    edev.setDeviceArea(RING_EVENT_FLAGS_DESC, 0x8000 | 1);
    submit(ev); // position 0
    expect(ev.kick()).toBe(false);
    submit(ev); // position 1: the one the device asked for
    expect(ev.kick()).toBe(true);
    submit(ev);
    expect(ev.kick()).toBe(false);
    expect(ev.kicks).toBe(1);
  });

  test("PackedDriver writes the driver area: ENABLE, DESC at the next used position under EVENT_IDX, DISABLE when polling", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    expect(track(new PackedDriver(gr, { size: 4 })).driverEvent()).toEqual({ flags: RING_EVENT_FLAGS_ENABLE, offWrap: 0 });
    expect(track(new PackedDriver(gr, { size: 4, polling: true, eventIdx: true })).driverEvent().flags).toBe(RING_EVENT_FLAGS_DISABLE);
    const d = track(new PackedDriver(gr, { size: 3, eventIdx: true }));
    const dev = rawDevice(gr, d);
    expect(d.driverEvent()).toEqual({ flags: RING_EVENT_FLAGS_DESC, offWrap: 0x8000 });
    d.begin(); d.add(0x1000, 8, false); d.add(0x1000, 8, false); d.add(0x1000, 8, true); const id = d.commit();
    d.kick();
    dev.use(0, id, 1, AVAIL | USED | WRITE);
    d.reap();
    expect(d.driverEvent()).toEqual({ flags: RING_EVENT_FLAGS_DESC, offWrap: 0 }); // position 0, wrap counter 0
  });

  test("PackedDriver base option: a ring that starts at position 2 with wrap counter 0", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 5, base: 2 }));
    expect(d.vringBase).toBe(0x00020002);
    const dev = rawDevice(gr, d);
    d.begin(); d.add(0x1000, 8, false); d.commit();
    d.begin(); d.add(0x1000, 8, false); d.add(0x1000, 8, false); d.add(0x1000, 8, false); d.commit();
    d.publish();
    expect([dev.desc(2).flags, dev.desc(3).flags, dev.desc(4).flags, dev.desc(0).flags]).toEqual([USED, USED | NEXT, USED | NEXT, AVAIL]);
    expect(d.availIndex).toBe(0x8001);
    expect(() => new PackedDriver(gr, { size: 5, base: 5 })).toThrow(RangeError);
  });

  test("PackedDriver.pushRaw() writes stale bits, bogus ids, NEXT on the last and nested tables as asked", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 8, indirectMax: 2 }));
    const dev = rawDevice(gr, d);
    const id = d.pushRaw([{ addr: 0x1000, len: 8 }, { addr: 0x2000, len: 8, stale: true, id: 99, flags: NEXT }]);
    d.publish();
    expect(dev.desc(0).flags).toBe(AVAIL | NEXT);
    expect(dev.desc(1)).toEqual({ addr: 0x2000, len: 8, id: 99, flags: USED | NEXT });
    const t = d.pushRaw([{ table: [{ addr: 0, len: 16, flags: INDIRECT }] }]);
    d.publish();
    expect(dev.desc(2)).toEqual({ addr: d.tableGpa(t), len: 16, id: t, flags: AVAIL | INDIRECT });
    expect(dev.table(d.tableGpa(t), 0).flags).toBe(INDIRECT);
    expect([id, d.numFree]).toEqual([0, 5]);
    expect(() => d.pushRaw([{ table: [{}, {}, {}] }])).toThrow(RangeError);
    expect(d.numFree).toBe(5);
  });

  test("PackedDriver.wait() wakes on the call eventfd and times out without one", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const d = track(new PackedDriver(gr, { size: 4 }));
    const dev = rawDevice(gr, d);
    d.begin(); d.add(0x1000, 8, false); const id = d.commit();
    d.kick();
    expect(d.wait(20)).toBe("timeout");
    dev.use(0, id, 0, AVAIL | USED);
    sys.eventfdWrite(d.callFd, 1);
    expect(d.wait(1000)).toBe("used");
    const p = track(new PackedDriver(gr, { size: 4, polling: true }));
    p.begin(); p.add(0x1000, 8, false); p.commit();
    p.kick();
    expect(p.wait(15)).toBe("timeout");
  });
});

// ---- driver and device paired ----------------------------------------------------------

interface PairOptions {
  size: number;
  seed: number;
  requests: number;
  eventIdx?: boolean;
  indirectMax?: number;
  polling?: boolean;
  /** Stop and resume the device (GET_VRING_BASE, new PackedQueue, SET_VRING_BASE) every this many requests. */
  restartEvery?: number;
  /** VIRTIO_F_IN_ORDER on both sides: buffers must come back in submission order, whatever order the device completes them. */
  inOrder?: boolean;
  /** Share of requests the device writes only partly (not the whole writable length). */
  short?: number;
}

/**
 * PackedDriver and PackedQueue over one GuestRam: random chains (1-2
 * readable, 1-3 writable descriptors, sometimes indirect), completed in
 * random order in random batches. The device copies each request's tag into
 * its first writable bytes; the driver checks tag and length. Kicks and
 * interrupts are honoured: the device pops only when kicked (or when its
 * re-enable finds more), the driver reaps only when interrupted (or when
 * polling), so a suppressed notification that was needed stalls the run.
 */
function pair(o: PairOptions): { kicks: number; interrupts: number; flushes: number; restarts: number; usedWritten: number } {
  const n = o.size;
  const rand = rng(o.seed);
  const gr = track(new GuestRam({ size: 16 * MiB }));
  const gm = new GuestMemory();
  for (const reg of gr.memRegions()) gm.add(reg, gr.fd);
  try {
    const drv = track(new PackedDriver(gr, { size: n, eventIdx: o.eventIdx, indirectMax: o.indirectMax, polling: o.polling, inOrder: o.inOrder }));
    const mkQueue = (base: number) => {
      const dq = new PackedQueue(0, gm);
      dq.eventIdx = o.eventIdx ?? false;
      dq.inOrder = o.inOrder ?? false;
      dq.setRings(n, gm.uvaSpan(gr.uva(drv.descGpa), 16 * n), gm.uvaSpan(gr.uva(drv.driverGpa), 4), gm.uvaSpan(gr.uva(drv.deviceGpa), 4));
      dq.setBase(base);
      return dq;
    };
    let dq = mkQueue(drv.vringBase);
    const SLOT = 4096;
    const slots = gr.alloc(n * SLOT, 4096);
    const freeSlots = Array.from({ length: n }, (_, i) => n - 1 - i);
    const slotOf = new Int32Array(n).fill(-1);
    const tagOf = new Int32Array(n);
    const wlenOf = new Int32Array(n);
    const expLen = new Int32Array(n);
    let lastTag = -1;
    const seen = new Uint8Array(o.requests);
    const rp = new Pieces(4), wp = new Pieces(4);
    const inflight: { id: number; len: number }[] = [];
    let submitted = 0, done = 0, kickPending = false, callPending = false, idle = 0, restarts = 0, flushes = 0, interrupts = 0;
    const dvw = gr.dv;

    const notified = (yes: boolean) => {
      if (!yes) return;
      callPending = true;
      interrupts++;
    };

    const submit = () => {
      const nr = 1 + Math.floor(rand() * 2), nw = 1 + Math.floor(rand() * 3);
      const indirect = (o.indirectMax ?? 0) >= nr + nw && rand() < 0.3;
      if (!drv.canAdd(nr + nw, indirect)) return false;
      const s = freeSlots.pop()!;
      const base = slots + s * SLOT;
      const tag = submitted;
      dvw.setUint32(gr.offset(base, 4), tag, true);
      dvw.setUint32(gr.offset(base + 64, 4), 0xdeadbeef, true);
      drv.begin(indirect);
      if (nr === 1) drv.add(base, 16, false);
      else {
        drv.add(base, 8, false);
        drv.add(base + 8, 8, false);
      }
      let wlen = 0;
      for (let k = 0; k < nw; k++) {
        const len = 4 + Math.floor(rand() * 200);
        drv.add(base + 64 + 256 * k, len, true);
        wlen += len;
      }
      const id = drv.commit();
      slotOf[id] = s;
      tagOf[id] = tag;
      wlenOf[id] = wlen;
      submitted++;
      return true;
    };

    const process = () => {
      for (;;) {
        dq.disableNotification();
        for (;;) {
          const id = dq.pop(rp, wp);
          if (id < 0) break;
          // The device's work: tag (read through the readable pieces) xor a constant into the first writable bytes.
          const tag = rp.win[0]![rp.off[0]!]! | (rp.win[0]![rp.off[0]! + 1]! << 8) | (rp.win[0]![rp.off[0]! + 2]! << 16) | (rp.win[0]![rp.off[0]! + 3]! << 24);
          const x = (tag ^ 0x5a5a5a5a) >>> 0;
          for (let b = 0; b < 4; b++) wp.win[0]![wp.off[0]! + b] = (x >>> (8 * b)) & 0xff;
          const len = o.short && rand() < o.short ? 4 + Math.floor(rand() * (wp.total - 4)) : wp.total;
          expLen[id] = len;
          inflight.push({ id, len });
        }
        if (!dq.enableNotification()) break;
      }
    };

    const complete = () => {
      // A random subset, in random order, pushed in random batches.
      let k = Math.floor(rand() * (inflight.length + 1));
      while (k-- > 0) {
        const j = Math.floor(rand() * inflight.length);
        const e = inflight[j]!;
        inflight[j] = inflight[inflight.length - 1]!;
        inflight.pop();
        dq.push(e.id, e.len);
        if (rand() < 0.3) {
          flushes++;
          notified(dq.flush());
        }
      }
      flushes++;
      notified(dq.flush());
    };

    const reapAll = () => {
      let got = 0;
      while (drv.reap()) {
        const id = drv.usedId;
        const s = slotOf[id]!;
        expect(s).toBeGreaterThanOrEqual(0);
        const base = slots + s * SLOT;
        const tag = tagOf[id]!;
        expect(seen[tag]).toBe(0);
        seen[tag] = 1;
        if (o.inOrder) expect(tag).toBe(lastTag + 1);
        lastTag = tag;
        expect(drv.usedLen).toBe(expLen[id]!);
        expect(expLen[id]!).toBeLessThanOrEqual(wlenOf[id]!);
        expect(dvw.getUint32(gr.offset(base + 64, 4), true)).toBe((tag ^ 0x5a5a5a5a) >>> 0);
        slotOf[id] = -1;
        freeSlots.push(s);
        done++;
        got++;
      }
      return got;
    };

    /** GET_VRING_BASE as Vring.stop does it: no new pops, in-flight completed and flushed; then a new queue. */
    const restart = () => {
      while (inflight.length) {
        const e = inflight.pop()!;
        dq.push(e.id, e.len);
      }
      flushes++;
      notified(dq.flush());
      const base = dq.getBase();
      dq.detach();
      dq = mkQueue(base);
      restarts++;
      kickPending = true; // a started ring processes what is already available
    };

    while (done < o.requests) {
      let progress = 0;
      const burst = 1 + Math.floor(rand() * 4);
      for (let i = 0; i < burst && submitted < o.requests; i++) if (submit()) progress++;
      if (drv.kick()) kickPending = true;
      if (kickPending) {
        kickPending = false;
        const before = inflight.length;
        process();
        progress += inflight.length - before;
      }
      if (inflight.length) complete();
      if (callPending || o.polling) {
        callPending = false;
        progress += reapAll();
      }
      if (o.restartEvery && done >= (restarts + 1) * o.restartEvery) restart();
      if (progress === 0 && ++idle > 50) {
        throw new Error(`stalled: ${done}/${o.requests} done, ${drv.inFlight} in flight at the driver, ${inflight.length} at the device, base 0x${dq.getBase().toString(16)}`);
      }
      if (progress > 0) idle = 0;
    }
    expect(seen.every((v) => v === 1)).toBe(true);
    expect(drv.inFlight).toBe(0);
    expect(dq.getBase()).toBe(drv.vringBase);
    return { kicks: drv.kicks, interrupts, flushes, restarts, usedWritten: drv.usedEntries };
  } finally {
    gm.clear();
  }
}

describe("PackedDriver, VIRTIO_F_NOTIFICATION_DATA", () => {
  test("each notification computes vq index | next position << 16 | driver wrap counter << 31", () => {
    const gr = track(new GuestRam({ size: 4 * MiB }));
    const drv = track(new PackedDriver(gr, { size: 3, index: 1, notificationData: true }));
    for (let i = 0; i < 4; i++) {
      drv.begin();
      drv.add(0x1000, 16, false);
      drv.commit();
      drv.kick(true);
      // Next positions 1, 2, 0 (wrap 0), 1 (wrap 0).
      expect(drv.notifyData).toBe(((drv.availIndex << 16) | 1) >>> 0);
      // Play the device: mark the buffer used, so that the ring of 3 has room for the next.
      const dev = rawDevice(gr, drv);
      const pos = drv.lastUsedIndex & 0x7fff, wrap = drv.lastUsedIndex >>> 15;
      dev.use(pos, dev.desc(pos).id, 0, wrap ? AVAIL | USED : 0);
      expect(drv.reap()).toBe(true);
    }
    expect(drv.notifyData >>> 31).toBe(0); // the 4th buffer went in on the second lap
  });
});

describe("PackedDriver ↔ PackedQueue", () => {
  for (const size of [1, 3, 5, 7, 127, 256]) {
    test(`size ${size}: 4000 random requests, random completion order and batches, EVENT_IDX`, () => {
      pair({ size, seed: size * 7 + 1, requests: 4000, eventIdx: true, indirectMax: 5 });
    });
  }

  for (const size of [1, 3, 7, 64, 256]) {
    test(`IN_ORDER, size ${size}: completed out of order, used in order; runs of whole buffers share one used descriptor`, () => {
      const s = pair({ size, seed: size * 13 + 5, requests: 4000, eventIdx: true, indirectMax: 5, inOrder: true });
      // Every buffer was written whole, so a flush publishes its completions as one run (size 1: one buffer at a time).
      if (size === 1) expect(s.usedWritten).toBe(4000);
      else expect(s.usedWritten).toBeLessThan(size >= 7 ? 4000 * 0.7 : 4000);
    });
  }

  test("IN_ORDER with partly written buffers: every length is exact (a run ends at a partly written buffer)", () => {
    const s = pair({ size: 32, seed: 77, requests: 4000, eventIdx: true, indirectMax: 5, inOrder: true, short: 0.3 });
    expect(s.usedWritten).toBeLessThan(4000);
  });

  test("IN_ORDER across GET_VRING_BASE / SET_VRING_BASE restarts and wraps", () => {
    const s = pair({ size: 7, seed: 78, requests: 3000, eventIdx: false, indirectMax: 4, restartEvery: 97, inOrder: true, short: 0.1 });
    expect(s.restarts).toBeGreaterThan(20);
  });

  test("size 64 without EVENT_IDX (ENABLE/DISABLE both ways)", () => {
    pair({ size: 64, seed: 11, requests: 3000 });
  });

  test("size 10, polling driver (driver area DISABLE: the device never interrupts)", () => {
    pair({ size: 10, seed: 12, requests: 2000, eventIdx: true, polling: true });
  });

  test("EVENT_IDX suppresses kicks: fewer kicks than submissions", () => {
    const s = pair({ size: 128, seed: 13, requests: 3000, eventIdx: true });
    expect(s.kicks).toBeLessThan(3000);
    expect(s.interrupts).toBeLessThan(s.flushes);
  });

  for (const size of [3, 7, 100]) {
    test(`size ${size}: GET_VRING_BASE / new queue / SET_VRING_BASE mid-run loses and repeats nothing`, () => {
      const s = pair({ size, seed: 100 + size, requests: 3000, eventIdx: size !== 7, indirectMax: 4, restartEvery: 97 });
      expect(s.restarts).toBeGreaterThan(20);
    });
  }
});


import { afterEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory, newSpan } from "../../src/memory/guest_memory.ts";
import { Iotlb, IotlbAccessError, IotlbEntryError, IotlbMiss, PERM_RO, PERM_RW, PERM_WO } from "../../src/memory/iotlb.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { GuestMemoryError } from "../../src/errors.ts";
import { decodeRequest } from "../../src/protocol/decode.ts";
import { encodeMessage } from "../../src/protocol/encode.ts";
import { HDR_SIZE, IOTLB_INVALIDATE, IOTLB_UPDATE, Req } from "../../src/protocol/messages.ts";
import { PackedInflight, SplitInflight, packedInflightQueueSize, splitInflightQueueSize } from "../../src/virtq/inflight.ts";
import { SplitQueue } from "../../src/virtq/split.ts";
import { PackedQueue } from "../../src/virtq/packed.ts";
import { GuestRam } from "../../src/frontend/guest_ram.ts";
import { PackedDriver } from "../../src/frontend/packed_driver.ts";

const UVA = 0x7f00_0000_0000;
const GPA = 0x10_0000;
const SIZE = 1 << 20;

let mem: GuestMemory;

/** 1 MiB of guest RAM at gpa 1 MiB, front-end address UVA; plus a second region at UVA + 16 MiB (gpa 32 MiB). */
function setup(): { mem: GuestMemory; t: Iotlb } {
  mem = new GuestMemory();
  for (const [gpa, uva] of [[GPA, UVA], [32 << 20, UVA + (16 << 20)]] as const) {
    const fd = sys.memfdCreate("iotlb-test");
    sys.ftruncate(fd, SIZE);
    mem.add({ guestPhysAddr: gpa, memorySize: SIZE, userAddr: uva, mmapOffset: 0 }, fd);
    sys.close(fd);
  }
  const t = new Iotlb(mem);
  mem.iotlb = t;
  return { mem, t };
}

afterEach(() => mem?.clear());

/** The bytes behind pieces, to check which guest memory a translation reached. */
function gpas(p: Pieces): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < p.count; i++) out.push([p.gpa[i]!, p.len[i]!]);
  return out;
}

describe("Iotlb", () => {
  test("Iotlb.pieces() translates an IOVA different from the GPA and carries the GPA for dirty logging", () => {
    const { t } = setup();
    t.update(0xfff0_0000, 0x2000, UVA + 0x3000, PERM_RW);
    const p = new Pieces();
    expect(t.pieces(0xfff0_0010, 0x100, false, p)).toBe(true);
    expect(gpas(p)).toEqual([[GPA + 0x3010, 0x100]]);
    // The bytes are really those of guest memory at that GPA.
    const s = mem.uvaSpan(UVA + 0x3010, 4, newSpan());
    s.win[s.off] = 0xab;
    expect(p.win[0]![p.off[0]!]).toBe(0xab);
  });

  test("Iotlb.pieces() splits a buffer across entries that are not contiguous in guest memory", () => {
    const { t } = setup();
    t.update(0x1_0000, 0x1000, UVA + 0x8000, PERM_RW);
    t.update(0x1_1000, 0x1000, UVA + 0x2000, PERM_RW);
    t.update(0x1_2000, 0x1000, UVA + (16 << 20), PERM_RW); // second region
    const p = new Pieces();
    expect(t.pieces(0x1_0800, 0x2000, true, p)).toBe(true);
    expect(gpas(p)).toEqual([[GPA + 0x8800, 0x800], [GPA + 0x2000, 0x1000], [32 << 20, 0x800]]);
    expect(p.total).toBe(0x2000);
  });

  test("Iotlb.update() replaces the overlapped part of older entries (newest wins)", () => {
    const { t } = setup();
    t.update(0x10_0000, 0x4000, UVA, PERM_RW);
    t.update(0x10_1000, 0x1000, UVA + 0x9000, PERM_RO);
    expect(t.entries()).toEqual([
      { iova: 0x10_0000, size: 0x1000, uaddr: UVA, perm: PERM_RW },
      { iova: 0x10_1000, size: 0x1000, uaddr: UVA + 0x9000, perm: PERM_RO },
      { iova: 0x10_2000, size: 0x2000, uaddr: UVA + 0x2000, perm: PERM_RW },
    ]);
    // An update covering several entries replaces them all.
    t.update(0x0f_f000, 0x6000, UVA + 0x10000, PERM_WO);
    expect(t.entries()).toEqual([{ iova: 0x0f_f000, size: 0x6000, uaddr: UVA + 0x10000, perm: PERM_WO }]);
  });

  test("Iotlb.pieces() refuses a device write into a read-only mapping and a read of a write-only one", () => {
    const { t } = setup();
    t.update(0x2000, 0x1000, UVA, PERM_RO);
    t.update(0x3000, 0x1000, UVA + 0x1000, PERM_WO);
    const p = new Pieces();
    expect(t.pieces(0x2000, 0x10, false, p)).toBe(true);
    expect(() => t.pieces(0x2000, 0x10, true, p)).toThrow(IotlbAccessError);
    expect(() => t.pieces(0x3000, 0x10, false, p)).toThrow(IotlbAccessError);
    // A write that starts in the writable entry and runs into the read-only one is refused too.
    t.update(0x4000, 0x1000, UVA + 0x4000, PERM_RO);
    p.reset();
    const e = (() => { try { t.pieces(0x3f00, 0x200, true, p); } catch (x) { return x; } })() as IotlbAccessError;
    expect(e).toBeInstanceOf(IotlbAccessError);
    expect(e.code).toBe("IOTLB_PERM");
    expect(e.iova).toBe(0x4000);
    // Rings: ringSpan asks for both permissions where the device reads and writes.
    expect(() => mem.ringSpan(0x2000, 16, PERM_RW)).toThrow(IotlbAccessError);
    t.update(0x5000, 0x1000, UVA + 0x5000, PERM_RW);
    expect(mem.ringSpan(0x5000, 16, PERM_RW).host).toBe(mem.uvaSpan(UVA + 0x5000, 16).host);
  });

  test("Iotlb.pieces() reports a miss with the address and the access it needs", () => {
    const { t } = setup();
    t.update(0x1000, 0x1000, UVA, PERM_RW);
    const p = new Pieces();
    let miss: IotlbMiss | null = null;
    try { t.pieces(0x1800, 0x1000, true, p); } catch (e) { miss = e as IotlbMiss; }
    expect(miss).toBeInstanceOf(IotlbMiss);
    expect(miss!.iova).toBe(0x2000);
    expect(miss!.perm).toBe(PERM_WO);
    expect(() => mem.gpaSpan(0x9000, 4)).toThrow(IotlbMiss);
    // A ring spanning two page entries contiguous in guest memory is one span; a gap is a miss.
    expect(() => mem.ringSpan(0x1f00, 0x200, PERM_RO)).toThrow(IotlbMiss);
    t.update(0x2000, 0x1000, UVA + 0x1000, PERM_RW);
    expect(mem.ringSpan(0x1f00, 0x200, PERM_RO).host).toBe(mem.uvaSpan(UVA + 0xf00, 4).host);
    // Adjacent entries that are not contiguous in guest memory cannot be one view.
    t.update(0x3000, 0x1000, UVA + 0x8000, PERM_RW);
    expect(() => mem.ringSpan(0x2f00, 0x200, PERM_RO)).toThrow(GuestMemoryError);
  });

  test("Iotlb.invalidate() removes a range, trimming and splitting the entries it cuts", () => {
    const { t } = setup();
    t.update(0x10000, 0x10000, UVA, PERM_RW);
    t.update(0x30000, 0x1000, UVA + 0x20000, PERM_RO);
    expect(t.overlaps(0x20000, 0x10000)).toBe(false);
    expect(t.invalidate(0x20000, 0x10000)).toBe(false);
    const g = t.generation;
    expect(t.invalidate(0x14000, 0x2000)).toBe(true);
    expect(t.generation).toBeGreaterThan(g);
    expect(t.entries()).toEqual([
      { iova: 0x10000, size: 0x4000, uaddr: UVA, perm: PERM_RW },
      { iova: 0x16000, size: 0xa000, uaddr: UVA + 0x6000, perm: PERM_RW },
      { iova: 0x30000, size: 0x1000, uaddr: UVA + 0x20000, perm: PERM_RO },
    ]);
    expect(() => t.pieces(0x15000, 1, false, new Pieces())).toThrow(IotlbMiss);
    // One range cutting the tail of one entry, dropping another and trimming the head of a third.
    t.invalidate(0x12000, 0x1e800);
    expect(t.entries()).toEqual([
      { iova: 0x10000, size: 0x2000, uaddr: UVA, perm: PERM_RW },
      { iova: 0x30800, size: 0x800, uaddr: UVA + 0x20800, perm: PERM_RO },
    ]);
    // Everything (the vIOMMU's "invalidate all" arrives clamped at 2^53 by the decoder).
    t.update(0x40000, 0x1000, UVA, PERM_RW);
    t.invalidate(0, 2 ** 53);
    expect(t.count).toBe(0);
  });

  test("Iotlb.update() refuses empty, overflowing and permission-less entries", () => {
    const { t } = setup();
    expect(() => t.update(0x1000, 0, UVA, PERM_RW)).toThrow(IotlbEntryError);
    expect(() => t.update(2 ** 53 - 0x1000, 0x2000, UVA, PERM_RW)).toThrow(/ends past 2\^53/);
    expect(() => t.update(0x1000, 0x1000, 2 ** 53 - 0x800, PERM_RW)).toThrow(/uaddr/);
    expect(() => t.update(0x1000, 0x1000, UVA, 0)).toThrow(/perm/);
    expect(t.count).toBe(0);
  });

  test("decodeRequest() refuses an UPDATE whose iova + size overflows u64 and clamps an INVALIDATE of everything", () => {
    const buf = new DataView(new ArrayBuffer(HDR_SIZE + 32));
    const msg = (type: number, iova: number, size: bigint) => {
      encodeMessage({ request: Req.IOTLB_MSG, flags: 0, fds: [], iotlb: { iova, size: 0, uaddr: UVA, perm: PERM_RW, type } }, buf);
      buf.setBigUint64(HDR_SIZE + 8, size, true);
      const h = { request: Req.IOTLB_MSG, flags: 1, size: 32 };
      return decodeRequest(h, new DataView(buf.buffer, HDR_SIZE, 32), []);
    };
    expect(() => msg(IOTLB_UPDATE, 0x1000, (1n << 64n) - 0x800n)).toThrow(/iotlb.size/);
    expect(() => msg(IOTLB_UPDATE, 2 ** 52, 2n ** 52n + 1n)).toThrow(/iotlb.iova/);
    const inv = msg(IOTLB_INVALIDATE, 0x1000, (1n << 64n) - 1n).iotlb!;
    expect(inv.iova + inv.size).toBe(2 ** 53);
  });

  test("Iotlb.update() refuses entries pointing outside every memory region (or across a hole)", () => {
    const { t } = setup();
    expect(() => t.update(0x1000, 0x1000, UVA - 0x1000, PERM_RW)).toThrow(/not inside the memory table/);
    expect(() => t.update(0x1000, 0x2000, UVA + SIZE - 0x1000, PERM_RW)).toThrow(/not inside the memory table/);
    expect(() => t.update(0x1000, 0x1000, 0x1000, PERM_RW)).toThrow(IotlbEntryError);
    expect(t.count).toBe(0);
    // An entry left dangling by a memory table change never reaches memory: the walk says "not in guest memory".
    t.update(0x1000, 0x1000, UVA + (16 << 20), PERM_RW);
    mem.remove(32 << 20, SIZE);
    const p = new Pieces();
    expect(t.pieces(0x1000, 0x10, false, p)).toBe(false);
    expect(p.count).toBe(0);
  });

  test("Iotlb evicts its oldest entry when full", () => {
    setup();
    const t = new Iotlb(mem, 4);
    for (let i = 0; i < 5; i++) t.update(0x10000 * (5 - i), 0x1000, UVA + i * 0x1000, PERM_RO);
    expect(t.count).toBe(4);
    expect(t.find(0x50000)).toBe(-1);
    expect(t.find(0x10000)).toBeGreaterThanOrEqual(0);
  });

  test("GuestMemory without an IOTLB still takes guest-physical addresses (ACCESS_PLATFORM without a vIOMMU)", () => {
    setup();
    mem.iotlb = null;
    const p = new Pieces();
    expect(mem.gpaPieces(GPA + 0x10, 0x10, p, true)).toBe(true);
    expect(gpas(p)).toEqual([[GPA + 0x10, 0x10]]);
    expect(mem.ringSpan(UVA, 16, PERM_RW).host).toBe(mem.uvaSpan(UVA, 16).host);
  });
});

/** The miss a call throws (null: none). */
function missOf(f: () => unknown): IotlbMiss | null {
  try {
    f();
  } catch (e) {
    if (e instanceof IotlbMiss) return e;
    throw e;
  }
  return null;
}

describe("resubmission after a restart behind the IOTLB", () => {
  // A restarted back-end starts with an empty table: the first walk of a resubmitted chain misses.
  test("SplitQueue.pop() retries a resubmitted chain that missed once the UPDATE arrives (never skips it)", () => {
    const { t } = setup();
    const N = 8, DESC = 0x1000, AVAIL = 0x2000, USED = 0x3000, IOVA = 0x4000_0000;
    const ram = new DataView(mem.regions[0]!.windows[0]!.buffer, 0, SIZE);
    const area = new Uint8Array(splitInflightQueueSize(N));
    let availIdx = 0;
    const map = (tbl: Iotlb, h: number) => tbl.update(IOVA + h * 0x1000, 0x1000, UVA + 0x10000 + h * 0x1000, PERM_RW);
    const publish = (h: number) => {
      ram.setUint32(DESC + h * 16, IOVA + h * 0x1000, true);
      ram.setUint32(DESC + h * 16 + 8, 16, true);
      ram.setUint16(AVAIL + 4 + 2 * (availIdx % N), h, true);
      availIdx++;
      ram.setUint16(AVAIL + 2, availIdx, true);
    };
    const backend = (base: number) => {
      const q = new SplitQueue(0, mem);
      // The rings themselves are reached directly here; only the buffers go through the table.
      q.setRings(N, mem.uvaSpan(UVA + DESC, 16 * N), mem.uvaSpan(UVA + AVAIL, 6 + 2 * N), mem.uvaSpan(UVA + USED, 6 + 8 * N));
      q.setBase(base);
      q.setInflight(new SplitInflight(area, N));
      q.startInflight();
      return q;
    };
    const r = new Pieces(), w = new Pieces();
    for (const h of [6, 1, 4, 3]) map(t, h);
    const a = backend(0);
    for (const h of [6, 1, 4]) publish(h);
    expect([a.pop(r, w), a.pop(r, w), a.pop(r, w)]).toEqual([6, 1, 4]);
    a.push(1, 0);
    a.flush();
    // The back-end dies with 6 and 4 in flight; its successor's table is empty.
    const t2 = new Iotlb(mem);
    mem.iotlb = t2;
    const b = backend(1);
    expect(b.pendingResubmits()).toBe(2);
    const miss = missOf(() => b.pop(r, w));
    expect(miss?.iova).toBe(IOVA + 6 * 0x1000);
    // Asked again without an answer: the same miss, the chain still waits.
    expect(missOf(() => b.pop(r, w))?.iova).toBe(IOVA + 6 * 0x1000);
    expect(b.pendingResubmits()).toBe(2);
    map(t2, 6);
    expect(b.pop(r, w)).toBe(6);
    expect(gpas(r)).toEqual([[GPA + 0x10000 + 6 * 0x1000, 16]]);
    expect(missOf(() => b.pop(r, w))?.iova).toBe(IOVA + 4 * 0x1000);
    map(t2, 4);
    expect(b.pop(r, w)).toBe(4);
    expect(b.pendingResubmits()).toBe(0);
    publish(3);
    map(t2, 3);
    expect(b.pop(r, w)).toBe(3);
    expect(b.pop(r, w)).toBe(-1);
  });

  test("PackedQueue.pop() retries a resubmitted buffer that missed once the UPDATE arrives (never skips it)", () => {
    const IOVA = 0x4000_0000;
    const gr = new GuestRam({ size: 4 << 20 });
    const gm = new GuestMemory();
    for (const reg of gr.memRegions()) gm.add(reg, gr.fd);
    const drv = new PackedDriver(gr, { size: 8 });
    const area = new Uint8Array(packedInflightQueueSize(8));
    const map = (tbl: Iotlb, k: number) => tbl.update(IOVA + k * 0x1000, 0x1000, gr.uva(0x10_0000 + k * 0x1000), PERM_RW);
    const backend = () => {
      const q = new PackedQueue(0, gm);
      q.setRings(8, gm.uvaSpan(gr.uva(drv.descGpa), 128), gm.uvaSpan(gr.uva(drv.driverGpa), 4), gm.uvaSpan(gr.uva(drv.deviceGpa), 4));
      q.setBase(drv.vringBase);
      q.setInflight(new PackedInflight(area, 8));
      q.startInflight();
      return q;
    };
    const r = new Pieces(), w = new Pieces();
    try {
      const t = new Iotlb(gm);
      gm.iotlb = t;
      for (let k = 0; k < 4; k++) map(t, k);
      const a = backend();
      const ids: number[] = [];
      for (let k = 0; k < 2; k++) {
        drv.begin();
        drv.add(IOVA + 2 * k * 0x1000, 16, false);
        drv.add(IOVA + (2 * k + 1) * 0x1000, 100, true);
        ids.push(drv.commit());
      }
      drv.publish();
      expect([a.pop(r, w), a.pop(r, w)]).toEqual(ids);
      // The back-end dies with both buffers in flight; its successor's table is empty.
      const t2 = new Iotlb(gm);
      gm.iotlb = t2;
      const b = backend();
      expect(b.pendingResubmits()).toBe(2);
      expect(missOf(() => b.pop(r, w))?.iova).toBe(IOVA);
      map(t2, 0);
      // The readable part is there now, the writable one still misses: the buffer still waits.
      expect(missOf(() => b.pop(r, w))?.iova).toBe(IOVA + 0x1000);
      expect(b.pendingResubmits()).toBe(2);
      map(t2, 1);
      expect(b.pop(r, w)).toBe(ids[0]!);
      expect(w.total).toBe(100);
      expect(missOf(() => b.pop(r, w))?.iova).toBe(IOVA + 0x2000);
      map(t2, 2);
      map(t2, 3);
      expect(b.pop(r, w)).toBe(ids[1]!);
      expect(b.pendingResubmits()).toBe(0);
      expect(b.pop(r, w)).toBe(-1);
    } finally {
      drv.close();
      gm.clear();
      gr.close();
    }
  });
});

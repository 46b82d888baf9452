import { afterAll, describe, expect, test } from "bun:test";
import { toArrayBuffer } from "bun:ffi";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, chmodSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../../ffi/sys.ts";
import { MAP_SHARED, PROT_READ, PROT_WRITE, TMPFS_MAGIC } from "../../ffi/constants.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { ChainReader, ChainWriter, ChainRangeError } from "../../src/virtq/chain_io.ts";
import { PENDING, type Device, type Request } from "../../src/device/api.ts";
import { EpollLoop } from "../../src/server/epoll_loop.ts";
import {
  createBlk, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from "../../src/devices/blk.ts";
import {
  BlkBackingError, nullBacking, openFileBacking, ramBacking, resolveAio, resolveAioPath, type Backing,
} from "../../src/devices/blk_backing.ts";

// ---- guest memory: a memfd mapped like a front-end's region -----------------------------------

const GUEST = 32 << 20;
const gfd = sys.memfdCreate("blk-test-guest");
sys.ftruncate(gfd, GUEST);
const gptr = sys.mmap(GUEST, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
const mem = new Uint8Array(toArrayBuffer(gptr as any, 0, GUEST));
let next = 0;

const tmp = mkdtempSync(join(process.env.TMPDIR ?? tmpdir(), "blk-test-"));
const shm = (() => {
  try {
    return mkdtempSync("/dev/shm/blk-test-");
  } catch {
    return null;
  }
})();

afterAll(() => {
  sys.munmap(gptr, GUEST);
  sys.close(gfd);
  rmSync(tmp, { recursive: true, force: true });
  if (shm) rmSync(shm, { recursive: true, force: true });
});

interface Buf { off: number; len: number }

/** Guest buffer space: page-aligned (plus `misalign`), never adjacent to the previous one, so pieces stay apart. */
function alloc(len: number, misalign = 0): number {
  if (next + misalign + len + 4096 > GUEST) next = 0;
  const off = next + misalign;
  next = Math.ceil((off + len + 1) / 4096) * 4096;
  return off;
}

/** Copies `bytes` into guest memory as pieces of the given sizes (the rest in a last piece). */
function readable(bytes: Uint8Array, sizes: number[] = [], misalign = 0): Buf[] {
  const bufs: Buf[] = [];
  let at = 0;
  for (const s of [...sizes, bytes.length - sizes.reduce((a, b) => a + b, 0)]) {
    if (s <= 0) continue;
    const off = alloc(s, misalign);
    mem.set(bytes.subarray(at, at + s), off);
    bufs.push({ off, len: s });
    at += s;
  }
  return bufs;
}

/** Writable buffers of the given sizes, pre-filled with 0xAA so untouched bytes show (the walker never yields empty ones). */
function writable(sizes: number[], misalign = 0): Buf[] {
  return sizes.filter((len) => len > 0).map((len) => {
    const off = alloc(len, misalign);
    mem.fill(0xaa, off, off + len);
    return { off, len };
  });
}

function pieces(bufs: Buf[]): Pieces {
  const p = new Pieces(4);
  for (const b of bufs) p.add(mem, b.off, b.len, gptr + b.off);
  return p;
}

function gather(bufs: Buf[]): Uint8Array {
  const out = new Uint8Array(bufs.reduce((a, b) => a + b.len, 0));
  let at = 0;
  for (const b of bufs) {
    out.set(mem.subarray(b.off, b.off + b.len), at);
    at += b.len;
  }
  return out;
}

function header(type: number, sector: bigint | number = 0): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0x1234, true); // reserved (ioprio): ignored
  dv.setBigUint64(8, BigInt(sector), true);
  return h;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function segment(sector: bigint | number, count: number, flags: number): Uint8Array {
  const s = new Uint8Array(16);
  const dv = new DataView(s.buffer);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, count, true);
  dv.setUint32(12, flags, true);
  return s;
}

interface Result { status: number; used: number; out: Uint8Array }

/** Runs one request; `out` is every writable byte after handle() returned. */
function run(dev: Device, rd: Buf[], wr: Buf[]): Result {
  const req: Request = {
    queue: 0, head: 0, in: new ChainReader(pieces(rd)), out: new ChainWriter(pieces(wr)),
    complete() { throw new Error("complete() called for a synchronous request"); },
  };
  const r = dev.handle(req);
  expect(r).toBeUndefined(); // synchronous: no Promise
  const out = gather(wr);
  return { status: out[out.length - 1]!, used: req.out.pos, out };
}

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

function blkWrite(dev: Device, sector: bigint | number, data: Uint8Array, sizes: number[] = [], misalign = 0): Result {
  return run(dev, [...readable(header(VIRTIO_BLK_T_OUT, sector)), ...readable(data, sizes, misalign)], writable([1]));
}

/** Reads `len` bytes; the writable pieces are `sizes` then the rest, then a separate status byte unless `sizes` ends it. */
function blkRead(dev: Device, sector: bigint | number, len: number, sizes: number[] = [len], misalign = 0) {
  const rest = len + 1 - sizes.reduce((a, b) => a + b, 0);
  const wr = writable(rest > 0 ? [...sizes, rest] : sizes, misalign);
  const r = run(dev, readable(header(VIRTIO_BLK_T_IN, sector)), wr);
  return { ...r, data: r.out.subarray(0, len) };
}

function ram(size = 1 << 20, extra: Partial<Parameters<typeof createBlk>[0]> = {}) {
  const backing = ramBacking(size);
  return { backing, dev: createBlk({ backing, ...extra }) };
}

/** Counts flushes and can fail on demand, around a real backing. */
function spy(inner: Backing) {
  const s = { flushes: 0, fail: false, backing: null as unknown as Backing };
  const check = () => {
    if (s.fail) throw new Error("injected backing failure");
  };
  s.backing = {
    size: inner.size, readonly: inner.readonly, name: "spy",
    read: (o, p, l) => (check(), inner.read(o, p, l)),
    write: (i, p, l) => (check(), inner.write(i, p, l)),
    flush: () => (check(), s.flushes++, inner.flush()),
    discard: (p, l) => (check(), inner.discard(p, l)),
    writeZeroes: (p, l, u) => (check(), inner.writeZeroes(p, l, u)),
    close: () => inner.close(),
  };
  return s;
}

const bit = (n: number) => 1n << BigInt(n);

// ---- config space and features --------------------------------------------------------------

describe("createBlk() config and features", () => {
  test("createBlk().config() puts each field at its VIRTIO 1.2 §5.2.4 offset", () => {
    const dev = createBlk({ backing: nullBacking(1000 * 512), queues: 4, queueSize: 64, logicalBlockSize: 4096 });
    const c = dev.config();
    expect(c.length).toBe(72);
    const dv = new DataView(c.buffer, c.byteOffset, c.byteLength);
    expect(dv.getBigUint64(0, true)).toBe(1000n); // capacity in 512-byte sectors, whatever blk_size is
    expect(dv.getUint32(12, true)).toBe(62); // seg_max = min(queueSize, 128) - 2
    expect(dv.getUint32(16, true)).toBe(0); // geometry
    expect(dv.getUint32(20, true)).toBe(4096); // blk_size
    expect(dv.getUint8(33)).toBe(0); // unused0
    expect(dv.getUint16(34, true)).toBe(4); // num_queues
    expect(dv.getUint32(36, true)).toBeGreaterThan(0); // max_discard_sectors
    expect(dv.getUint32(40, true)).toBeGreaterThan(0); // max_discard_seg
    expect(dv.getUint32(44, true)).toBe(8); // discard_sector_alignment, in 512-byte sectors
    expect(dv.getUint32(48, true)).toBeGreaterThan(0); // max_write_zeroes_sectors
    expect(dv.getUint32(52, true)).toBeGreaterThan(0); // max_write_zeroes_seg
    expect(dv.getUint8(56)).toBe(1); // write_zeroes_may_unmap
    expect([...c.subarray(57, 60)]).toEqual([0, 0, 0]); // unused1
    expect([...c.subarray(60, 72)]).toEqual(new Array(12).fill(0)); // secure erase: not offered
  });

  test("createBlk().config() capacity above 2^32 sectors uses both halves", () => {
    const dev = createBlk({ backing: nullBacking(2 ** 42) });
    const dv = new DataView(dev.config().buffer);
    expect(dv.getBigUint64(0, true)).toBe(2n ** 33n);
  });

  test("createBlk() defaults: 1 queue of up to 1024, seg_max for a 128-entry ring, 512-byte blocks, serial bunvhost", () => {
    const { dev } = ram();
    expect(dev.type).toBe(2);
    expect(dev.queues).toBe(1);
    expect(dev.queueSize).toBe(1024);
    const dv = new DataView(dev.config().buffer);
    expect(dv.getUint32(12, true)).toBe(126);
    expect(dv.getUint32(20, true)).toBe(512);
    expect(dv.getUint16(34, true)).toBe(1);
    const r = run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([21]));
    expect(new TextDecoder().decode(r.out.subarray(0, 8))).toBe("bunvhost");
  });

  test("createBlk().features offers SEG_MAX, BLK_SIZE, FLUSH, MQ, DISCARD, WRITE_ZEROES and not RO when writable", () => {
    const { dev } = ram();
    for (const b of [VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
      VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]) {
      expect(dev.features & bit(b)).toBe(bit(b));
    }
    expect(dev.features & bit(VIRTIO_BLK_F_RO)).toBe(0n);
    expect(dev.features >> 24n).toBe(0n); // device bits only
  });

  test("createBlk({ readonly: true }).features offers RO", () => {
    const { dev } = ram(1 << 20, { readonly: true });
    expect(dev.features & bit(VIRTIO_BLK_F_RO)).toBe(bit(VIRTIO_BLK_F_RO));
  });

  test("createBlk() rejects out-of-range options with the value in the message", () => {
    const backing = nullBacking(1 << 20);
    expect(() => createBlk({ backing, queues: 0 })).toThrow(/queues 0/);
    expect(() => createBlk({ backing, queues: 70000 })).toThrow(/queues 70000/);
    expect(() => createBlk({ backing, queueSize: 100 })).toThrow(/queueSize 100/);
    expect(() => createBlk({ backing, queueSize: 2 })).toThrow(/queueSize 2/);
    expect(() => createBlk({ backing, logicalBlockSize: 1000 })).toThrow(/logicalBlockSize 1000/);
    expect(() => createBlk({ backing, serial: "x".repeat(21) })).toThrow(/serial/);
    expect(() => createBlk({ backing, serial: "disk\u00e9" })).toThrow(/serial/);
    expect(() => createBlk({ backing: nullBacking(512), logicalBlockSize: 4096 })).toThrow(/less than one 4096-byte block/);
  });

  test("ramBacking() and nullBacking() reject sizes that are not whole sectors", () => {
    expect(() => ramBacking(1000)).toThrow(BlkBackingError);
    expect(() => ramBacking(0)).toThrow(BlkBackingError);
    expect(() => nullBacking(-512)).toThrow(BlkBackingError);
  });
});

// ---- reads and writes ---------------------------------------------------------------------------

describe("Blk.handle() IN and OUT", () => {
  test("handle() OUT then IN round-trips data on ramBacking with used lengths 1 and data + 1", () => {
    const { dev } = ram();
    const data = pattern(8192, 1);
    const w = blkWrite(dev, 10, data);
    expect(w).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
    const r = blkRead(dev, 10, 8192);
    expect(r.status).toBe(VIRTIO_BLK_S_OK);
    expect(r.used).toBe(8193);
    expect(r.data).toEqual(data);
    // Neighbouring sectors are still zero.
    expect(blkRead(dev, 9, 512).data).toEqual(new Uint8Array(512));
    expect(blkRead(dev, 26, 512).data).toEqual(new Uint8Array(512));
  });

  test("handle() IN and OUT with header, data and status split over many pieces", () => {
    const { dev } = ram();
    const data = pattern(4096, 2);
    const hdr = header(VIRTIO_BLK_T_OUT, 3);
    // Header cut in three (3 + 9 + 4), data in pieces of 1, 511, 1000 and the rest.
    const rd = [...readable(hdr, [3, 9]), ...readable(data, [1, 511, 1000])];
    expect(rd.length).toBe(7);
    expect(run(dev, rd, writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
    // Data in pieces of 100, 2000 and 1996, status in its own piece.
    const r = blkRead(dev, 3, 4096, [100, 2000, 1996]);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 4097 });
    expect(r.data).toEqual(data);
    // Status sharing the last data piece.
    const r2 = blkRead(dev, 3, 4096, [1000, 3097]);
    expect(r2).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 4097 });
    expect(r2.data).toEqual(data);
  });

  test("handle() IN of the last sector succeeds and one past the end is IOERR", () => {
    const { dev } = ram(64 * 512);
    expect(blkRead(dev, 63, 512).status).toBe(VIRTIO_BLK_S_OK);
    expect(blkRead(dev, 62, 1024).status).toBe(VIRTIO_BLK_S_OK);
    expect(blkRead(dev, 64, 0).status).toBe(VIRTIO_BLK_S_OK); // empty read at the end
    const r = blkRead(dev, 63, 1024);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1025 });
    expect(r.data).toEqual(new Uint8Array(1024)); // not stale guest bytes, not disk bytes: zeroed
    expect(blkRead(dev, 64, 512).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(blkRead(dev, 65, 0).status).toBe(VIRTIO_BLK_S_IOERR);
  });

  test("handle() OUT past the end is IOERR and writes nothing", () => {
    const { dev } = ram(64 * 512);
    expect(blkWrite(dev, 63, pattern(1024, 3))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
    expect(blkRead(dev, 63, 512).data).toEqual(new Uint8Array(512));
  });

  test("handle() rejects huge sectors (2^53 + 1, 2^63, 2^64 - 1) with IOERR and no throw", () => {
    const { dev } = ram(64 * 512);
    for (const s of [2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 2n, 2n ** 55n]) {
      expect(blkRead(dev, s, 512)).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 513 });
      expect(blkWrite(dev, s, pattern(512, 4))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
    }
  });

  test("handle() IN and OUT with data not a multiple of 512 are IOERR", () => {
    const { dev } = ram();
    const r = blkRead(dev, 0, 100);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 101 });
    expect(blkWrite(dev, 0, pattern(513, 5))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
    expect(blkRead(dev, 0, 1024).data).toEqual(new Uint8Array(1024));
  });

  test("handle() with a header shorter than 16 bytes is IOERR", () => {
    const { dev } = ram();
    for (const n of [0, 1, 8, 15]) {
      const rd = n ? readable(header(VIRTIO_BLK_T_IN).subarray(0, n)) : [];
      expect(run(dev, rd, writable([513]))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 513 });
    }
    // 15 header bytes in two pieces, then data that must not be taken as the rest of the header.
    const rd = [...readable(header(VIRTIO_BLK_T_OUT).subarray(0, 15), [7])];
    expect(run(dev, rd, writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
  });

  test("handle() throws ChainRangeError when there is no writable byte, and writes nothing", () => {
    const { dev } = ram();
    const rd = [...readable(header(VIRTIO_BLK_T_OUT, 0)), ...readable(pattern(512, 6))];
    expect(() => run(dev, rd, [])).toThrow(ChainRangeError);
    expect(() => run(dev, readable(header(VIRTIO_BLK_T_IN, 0)), [])).toThrow(ChainRangeError);
    expect(blkRead(dev, 0, 512).data).toEqual(new Uint8Array(512));
  });

  test("handle() OUT on a read-only device is IOERR and leaves the disk unchanged", () => {
    const backing = ramBacking(1 << 20);
    const rw = createBlk({ backing });
    const data = pattern(1024, 7);
    expect(blkWrite(rw, 4, data).status).toBe(VIRTIO_BLK_S_OK);
    const ro = createBlk({ backing, readonly: true });
    expect(blkWrite(ro, 4, pattern(1024, 8))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
    expect(blkRead(ro, 4, 1024)).toMatchObject({ status: VIRTIO_BLK_S_OK, data });
    expect(run(ro, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1])).status).toBe(VIRTIO_BLK_S_OK);
  });

  test("handle() OUT with more than one writable byte puts the status last and zeroes the rest", () => {
    const { dev } = ram();
    const rd = [...readable(header(VIRTIO_BLK_T_OUT, 0)), ...readable(pattern(512, 9))];
    const r = run(dev, rd, writable([3, 2]));
    expect(r.used).toBe(5);
    expect([...r.out]).toEqual([0, 0, 0, 0, VIRTIO_BLK_S_OK]);
  });

  test("handle() reports IOERR when the backing throws", () => {
    const s = spy(ramBacking(1 << 20));
    const dev = createBlk({ backing: s.backing });
    s.fail = true;
    const r = blkRead(dev, 0, 1024);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1025 });
    expect(blkWrite(dev, 0, pattern(512, 1)).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(run(dev, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1])).status).toBe(VIRTIO_BLK_S_IOERR);
  });

  test("handle() flushes after every write until FLUSH is negotiated (stable writes)", () => {
    const s = spy(ramBacking(1 << 20));
    const dev = createBlk({ backing: s.backing });
    dev.setFeatures!(0n);
    blkWrite(dev, 0, pattern(512, 1));
    expect(s.flushes).toBe(1);
    dev.setFeatures!(bit(VIRTIO_BLK_F_FLUSH));
    blkWrite(dev, 0, pattern(512, 1));
    blkRead(dev, 0, 512);
    expect(s.flushes).toBe(1);
    expect(run(dev, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1]))).toMatchObject({ status: 0, used: 1 });
    expect(s.flushes).toBe(2);
    dev.reset!();
    blkWrite(dev, 0, pattern(512, 1));
    expect(s.flushes).toBe(3);
  });

  test("handle() with an unknown type is UNSUPP", () => {
    const { dev } = ram();
    for (const t of [2, 3, 5, 10, 14, 15, 16, 0x80000000, 0x80000001, 0xffffffff]) {
      expect(run(dev, readable(header(t)), writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_UNSUPP, used: 1 });
    }
  });

  test("handle() IN on a 4 GiB+ ramBacking (memfd) round-trips above 4 GiB", () => {
    const { dev } = ram(2 ** 33);
    const sector = 2 ** 33 / 512 - 8;
    const data = pattern(4096, 11);
    expect(blkWrite(dev, sector, data, [100]).status).toBe(VIRTIO_BLK_S_OK);
    expect(blkRead(dev, sector, 4096, [1000]).data).toEqual(data);
    const wz = run(dev, [...readable(header(VIRTIO_BLK_T_WRITE_ZEROES)), ...readable(segment(sector + 2, 2, 1))], writable([1]));
    expect(wz.status).toBe(VIRTIO_BLK_S_OK);
    const after = blkRead(dev, sector, 4096).data;
    expect(after.subarray(0, 1024)).toEqual(data.subarray(0, 1024));
    expect(after.subarray(1024, 2048)).toEqual(new Uint8Array(1024));
    expect(after.subarray(2048)).toEqual(data.subarray(2048));
  });
});

describe("nullBacking", () => {
  test("nullBacking IN leaves the guest buffer untouched but counts it in the used length", () => {
    const dev = createBlk({ backing: nullBacking(1 << 20) });
    const r = blkRead(dev, 8, 2048, [1000]);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 2049 });
    expect(r.data).toEqual(new Uint8Array(2048).fill(0xaa));
  });

  test("nullBacking OUT is accepted and discarded", () => {
    const dev = createBlk({ backing: nullBacking(1 << 20) });
    expect(blkWrite(dev, 0, pattern(4096, 1))).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
    expect(blkRead(dev, 0, 512).data).toEqual(new Uint8Array(512).fill(0xaa));
    expect(blkWrite(dev, 2048, pattern(512, 1)).status).toBe(VIRTIO_BLK_S_IOERR); // still bounds-checked
  });
});

// ---- GET_ID and FLUSH ----------------------------------------------------------------------------

describe("Blk.handle() GET_ID and FLUSH", () => {
  test("handle() GET_ID writes the serial NUL-padded to 20 bytes, used length 21", () => {
    const { dev } = ram(1 << 20, { serial: "disk-7" });
    const r = run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([21]));
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 21 });
    expect(r.out.subarray(0, 20)).toEqual(concat(new TextEncoder().encode("disk-7"), new Uint8Array(14)));
  });

  test("handle() GET_ID with a 20-character serial has no NUL, even split over pieces", () => {
    const serial = "ABCDEFGHIJKLMNOPQRST";
    const { dev } = ram(1 << 20, { serial });
    const r = run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([7, 13, 1]));
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 21 });
    expect(new TextDecoder().decode(r.out.subarray(0, 20))).toBe(serial);
  });

  test("handle() GET_ID with less than 20 bytes writes what fits and reports IOERR", () => {
    const { dev } = ram(1 << 20, { serial: "ABCDEFGHIJKLMNOPQRST" });
    const r = run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([9]));
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 9 });
    expect(new TextDecoder().decode(r.out.subarray(0, 8))).toBe("ABCDEFGH");
    expect(run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 1 });
  });

  test("handle() GET_ID with more than 20 bytes NUL-pads up to the status byte", () => {
    const { dev } = ram(1 << 20, { serial: "ABCDEFGHIJKLMNOPQRST" });
    const r = run(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([30]));
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 30 });
    expect(r.out.subarray(20, 29)).toEqual(new Uint8Array(9));
  });

  test("handle() FLUSH completes with OK and used length 1", () => {
    const { dev } = ram();
    expect(run(dev, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
  });
});

// ---- DISCARD and WRITE_ZEROES ------------------------------------------------------------------------

function segReq(dev: Device, type: number, segs: Uint8Array[], sizes: number[] = []): Result {
  const body = concat(...segs);
  return run(dev, [...readable(header(type)), ...(body.length ? readable(body, sizes) : [])], writable([1]));
}

describe("Blk.handle() DISCARD and WRITE_ZEROES", () => {
  function filled() {
    const r = ram(1 << 20);
    expect(blkWrite(r.dev, 0, pattern(64 * 512, 12)).status).toBe(VIRTIO_BLK_S_OK);
    return r;
  }
  const expectSectors = (dev: Device, from: number, count: number, zero: boolean) => {
    const d = blkRead(dev, from, count * 512).data;
    const want = zero ? new Uint8Array(count * 512) : pattern(64 * 512, 12).subarray(from * 512, (from + count) * 512);
    expect(d).toEqual(want);
  };

  test("handle() WRITE_ZEROES zeroes each segment, with and without UNMAP, and nothing else", () => {
    const { dev } = filled();
    const r = segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(2, 3, 0), segment(10, 1, 1), segment(20, 0, 0)], [5]);
    expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
    expectSectors(dev, 0, 2, false);
    expectSectors(dev, 2, 3, true);
    expectSectors(dev, 5, 5, false);
    expectSectors(dev, 10, 1, true);
    expectSectors(dev, 11, 53, false);
  });

  test("handle() DISCARD succeeds and leaves sectors outside the segments alone", () => {
    const { dev } = filled();
    expect(segReq(dev, VIRTIO_BLK_T_DISCARD, [segment(8, 8, 0)])).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
    expectSectors(dev, 0, 8, false);
    expectSectors(dev, 16, 48, false);
  });

  test("handle() DISCARD with the UNMAP flag is UNSUPP and changes nothing", () => {
    const { dev } = filled();
    expect(segReq(dev, VIRTIO_BLK_T_DISCARD, [segment(0, 4, 1)]).status).toBe(VIRTIO_BLK_S_UNSUPP);
    expectSectors(dev, 0, 4, false);
  });

  test("handle() DISCARD and WRITE_ZEROES with reserved flag bits are UNSUPP and change nothing", () => {
    const { dev } = filled();
    for (const t of [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]) {
      for (const f of [2, 0x80000000, 0x80000001, 0xfffffffe]) {
        expect(segReq(dev, t, [segment(0, 1, 0), segment(4, 4, f)]).status).toBe(VIRTIO_BLK_S_UNSUPP);
      }
    }
    expectSectors(dev, 0, 8, false);
  });

  test("handle() WRITE_ZEROES with more segments than max_write_zeroes_seg is IOERR; exactly the maximum is OK", () => {
    const { dev } = filled();
    const dv = new DataView(dev.config().buffer);
    const maxWz = dv.getUint32(52, true), maxDiscard = dv.getUint32(40, true);
    const segs = (n: number) => Array.from({ length: n }, (_, i) => segment(i, 1, 0));
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, segs(maxWz + 1)).status).toBe(VIRTIO_BLK_S_IOERR);
    expectSectors(dev, 0, maxWz + 1, false);
    expect(segReq(dev, VIRTIO_BLK_T_DISCARD, segs(maxDiscard + 1)).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, segs(maxWz)).status).toBe(VIRTIO_BLK_S_OK);
    expectSectors(dev, 0, maxWz, true);
    expectSectors(dev, maxWz, 64 - maxWz, false);
  });

  test("handle() DISCARD and WRITE_ZEROES with no segment or a partial segment are IOERR", () => {
    const { dev } = filled();
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, []).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(segReq(dev, VIRTIO_BLK_T_DISCARD, []).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 1, 0).subarray(0, 12)]).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 1, 0), segment(1, 1, 0).subarray(0, 15)]).status)
      .toBe(VIRTIO_BLK_S_IOERR);
    expectSectors(dev, 0, 2, false);
  });

  test("handle() WRITE_ZEROES past the end, with huge sectors or too many sectors is IOERR and zeroes nothing", () => {
    const { dev } = filled();
    const cap = (1 << 20) / 512;
    const maxSectors = new DataView(dev.config().buffer).getUint32(48, true);
    for (const bad of [segment(cap - 1, 2, 0), segment(cap + 1, 0, 0), segment(2n ** 64n - 1n, 1, 0),
      segment(2n ** 63n, 0xffffffff, 0), segment(0, maxSectors + 1, 0), segment(0, 0xffffffff, 1)]) {
      expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 4, 0), bad]).status).toBe(VIRTIO_BLK_S_IOERR);
    }
    expectSectors(dev, 0, 4, false);
    expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(cap - 1, 1, 0)]).status).toBe(VIRTIO_BLK_S_OK);
  });

  test("handle() DISCARD and WRITE_ZEROES on a read-only device are IOERR and change nothing", () => {
    const { backing, dev } = filled();
    const ro = createBlk({ backing, readonly: true });
    expect(segReq(ro, VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 4, 0)]).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(segReq(ro, VIRTIO_BLK_T_DISCARD, [segment(0, 4, 0)]).status).toBe(VIRTIO_BLK_S_IOERR);
    expectSectors(dev, 0, 4, false);
  });
});

// ---- file backings ----------------------------------------------------------------------------------

function makeFile(dir: string, name: string, size: number, fill?: Uint8Array): string {
  const p = join(dir, name);
  writeFileSync(p, fill ?? new Uint8Array(0));
  truncateSync(p, size);
  return p;
}

describe("openFileBacking()", () => {
  const dirs = [["$TMPDIR", tmp], ["/dev/shm", shm]] as const;
  for (const [label, dir] of dirs) {
    test.skipIf(!dir)(`openFileBacking() on ${label}: OUT lands in the file at sector * 512 and IN reads it back`, () => {
      const path = makeFile(dir!, "rw.img", 1 << 20);
      const backing = openFileBacking(path);
      const dev = createBlk({ backing });
      try {
        expect(backing.readonly).toBe(false);
        const data = pattern(12288, 13);
        expect(blkWrite(dev, 100, data, [512, 4096])).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
        expect(readFileSync(path).subarray(100 * 512, 100 * 512 + 12288)).toEqual(Buffer.from(data));
        const r = blkRead(dev, 100, 12288, [4096, 3]);
        expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 12289 });
        expect(r.data).toEqual(data);
        expect(run(dev, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1])).status).toBe(VIRTIO_BLK_S_OK);
      } finally {
        dev.close!();
      }
    });

    test.skipIf(!dir)(`openFileBacking() on ${label}: WRITE_ZEROES (UNMAP and not) and DISCARD read back as zeroes`, () => {
      const path = makeFile(dir!, "wz.img", 1 << 20);
      writeFileSync(path, pattern(1 << 20, 14));
      const dev = createBlk({ backing: openFileBacking(path) });
      try {
        expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(8, 8, 0)]).status).toBe(VIRTIO_BLK_S_OK);
        expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(24, 8, 1)]).status).toBe(VIRTIO_BLK_S_OK);
        // 4 KiB-aligned, so a hole punch really frees the range and reads back as zeroes.
        expect(segReq(dev, VIRTIO_BLK_T_DISCARD, [segment(64, 16, 0)]).status).toBe(VIRTIO_BLK_S_OK);
        const file = readFileSync(path);
        const orig = pattern(1 << 20, 14);
        expect(file.length).toBe(1 << 20); // KEEP_SIZE
        expect(file.subarray(0, 8 * 512)).toEqual(Buffer.from(orig.subarray(0, 8 * 512)));
        expect(file.subarray(8 * 512, 16 * 512)).toEqual(Buffer.alloc(8 * 512));
        expect(file.subarray(16 * 512, 24 * 512)).toEqual(Buffer.from(orig.subarray(16 * 512, 24 * 512)));
        expect(file.subarray(24 * 512, 32 * 512)).toEqual(Buffer.alloc(8 * 512));
        expect(file.subarray(32 * 512, 64 * 512)).toEqual(Buffer.from(orig.subarray(32 * 512, 64 * 512)));
        expect(file.subarray(80 * 512)).toEqual(Buffer.from(orig.subarray(80 * 512)));
        expect(blkRead(dev, 8, 4096).data).toEqual(new Uint8Array(4096));
      } finally {
        dev.close!();
      }
    });
  }

  test.skipIf(!shm)("openFileBacking().writeZeroes() writes zeroes where ZERO_RANGE is unsupported (tmpfs)", () => {
    const path = makeFile(shm!, "zr.img", 1 << 20);
    writeFileSync(path, pattern(1 << 20, 15));
    // Confirm the premise: tmpfs refuses FALLOC_FL_ZERO_RANGE, so the fallback path runs.
    const fd = sys.open(path, 2);
    let zeroRange = true;
    try {
      sys.fallocate(fd, 0x10 | 0x01, 0, 512);
    } catch {
      zeroRange = false;
    } finally {
      sys.close(fd);
    }
    writeFileSync(path, pattern(1 << 20, 15));
    const backing = openFileBacking(path);
    try {
      backing.writeZeroes(3 * 512, 5 * 512, false);
      const file = readFileSync(path);
      expect(file.subarray(3 * 512, 8 * 512)).toEqual(Buffer.alloc(5 * 512));
      expect(file.subarray(0, 3 * 512)).toEqual(Buffer.from(pattern(1 << 20, 15).subarray(0, 3 * 512)));
      expect(file.subarray(8 * 512, 9 * 512)).toEqual(Buffer.from(pattern(1 << 20, 15).subarray(8 * 512, 9 * 512)));
      if (zeroRange) console.log("note: this tmpfs supports ZERO_RANGE; the write-zeroes fallback was not exercised");
    } finally {
      backing.close();
    }
  });

  test("openFileBacking({ readonly: true }) makes the device RO: OUT is IOERR and the file is unchanged", () => {
    const orig = pattern(64 * 512, 16);
    const path = makeFile(tmp, "ro.img", 64 * 512, orig);
    const backing = openFileBacking(path, { readonly: true });
    const dev = createBlk({ backing });
    try {
      expect(backing.readonly).toBe(true);
      expect(dev.features & bit(VIRTIO_BLK_F_RO)).toBe(bit(VIRTIO_BLK_F_RO));
      expect(blkWrite(dev, 0, pattern(512, 17)).status).toBe(VIRTIO_BLK_S_IOERR);
      expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 1, 0)]).status).toBe(VIRTIO_BLK_S_IOERR);
      expect(blkRead(dev, 0, 1024).data).toEqual(orig.subarray(0, 1024));
      expect(readFileSync(path)).toEqual(Buffer.from(orig));
      expect(() => backing.write(new ChainReader(pieces(readable(pattern(512, 1)))), 0, 512)).toThrow(BlkBackingError);
    } finally {
      dev.close!();
    }
  });

  test("openFileBacking() opens a file it may not write read-only", () => {
    const path = makeFile(tmp, "noperm.img", 4096);
    chmodSync(path, 0o444);
    if (process.getuid?.() !== 0) {
      const backing = openFileBacking(path);
      expect(backing.readonly).toBe(true);
      backing.close();
      expect(() => openFileBacking(path, { readonly: false })).toThrow(/EACCES/);
      return;
    }
    // Root may write any file: check in a child process without CAP_DAC_OVERRIDE (still root, so it reads the
    // repository wherever it was cloned, even under a 0700 directory, but file modes now apply to it).
    const script = `import { openFileBacking } from ${JSON.stringify(join(import.meta.dir, "../../src/devices/blk_backing.ts"))};
      const b = openFileBacking(${JSON.stringify(path)}); console.log("readonly=" + b.readonly); b.close();
      try { openFileBacking(${JSON.stringify(path)}, { readonly: false }); console.log("opened rw"); } catch (e) { console.log(String(e)); }`;
    const r = Bun.spawnSync(["setpriv", "--bounding-set=-dac_override,-dac_read_search", process.execPath, "-e", script], { cwd: tmp });
    const out = r.stdout.toString();
    expect(out + r.stderr.toString()).toContain("readonly=true");
    expect(out).toMatch(/EACCES/);
  });

  test("openFileBacking() refuses what is not a regular file or block device, and missing files", () => {
    expect(() => openFileBacking(tmp)).toThrow(); // a directory: EISDIR on O_RDWR
    expect(() => openFileBacking(tmp, { readonly: true })).toThrow(/NOT_A_DISK/);
    expect(() => openFileBacking("/dev/null")).toThrow(/NOT_A_DISK/);
    expect(() => openFileBacking(join(tmp, "missing.img"))).toThrow(/ENOENT/);
    expect(() => openFileBacking(makeFile(tmp, "tiny.img", 100))).toThrow(/SIZE/);
  });

  test("openFileBacking() IN after the file shrank under it is IOERR, not stale data", () => {
    const path = makeFile(tmp, "shrink.img", 64 * 512, pattern(64 * 512, 18));
    const dev = createBlk({ backing: openFileBacking(path) });
    try {
      truncateSync(path, 8 * 512);
      const r = blkRead(dev, 4, 8 * 512);
      expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 8 * 512 + 1 });
    } finally {
      dev.close!();
    }
  });

  test("openFileBacking() capacity is the file size rounded down to whole sectors", () => {
    const path = makeFile(tmp, "odd.img", 10 * 512 + 100);
    const dev = createBlk({ backing: openFileBacking(path) });
    try {
      expect(new DataView(dev.config().buffer).getBigUint64(0, true)).toBe(10n);
      expect(blkRead(dev, 9, 512).status).toBe(VIRTIO_BLK_S_OK);
      expect(blkRead(dev, 10, 512).status).toBe(VIRTIO_BLK_S_IOERR);
    } finally {
      dev.close!();
    }
  });
});

describe("openFileBacking({ direct: true })", () => {
  const directPath = join(tmp, "direct.img");
  const directOk = (() => {
    makeFile(tmp, "direct.img", 4 << 20);
    try {
      openFileBacking(directPath, { direct: true }).close();
      return true;
    } catch (e) {
      if (e instanceof BlkBackingError && e.code === "NO_DIRECT") return false;
      throw e;
    }
  })();
  const reason = directOk ? "" : ` (skipped: ${tmp} does not support O_DIRECT)`;

  test.skipIf(!directOk)(`O_DIRECT OUT and IN round-trip with aligned guest buffers${reason}`, () => {
    const dev = createBlk({ backing: openFileBacking(directPath, { direct: true }) });
    try {
      const data = pattern(3 << 20, 19); // larger than the bounce buffer
      expect(blkWrite(dev, 8, data, [4096, 1 << 20])).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1 });
      const r = blkRead(dev, 8, 3 << 20, [8192, 2 << 20]);
      expect(r).toMatchObject({ status: VIRTIO_BLK_S_OK, used: (3 << 20) + 1 });
      expect(r.data).toEqual(data);
      expect(readFileSync(directPath).subarray(8 * 512, 8 * 512 + 4096)).toEqual(Buffer.from(data.subarray(0, 4096)));
    } finally {
      dev.close!();
    }
  });

  test.skipIf(!directOk)(`O_DIRECT with guest buffers off 512-byte alignment goes through the bounce buffer${reason}`, () => {
    const dev = createBlk({ backing: openFileBacking(directPath, { direct: true }) });
    try {
      const data = pattern((1 << 20) + 4096, 20); // more than one bounce-buffer chunk
      expect(blkWrite(dev, 16, data, [1000, 24], 3).status).toBe(VIRTIO_BLK_S_OK);
      const odd = blkRead(dev, 16, data.length, [777, 4096], 5);
      expect(odd).toMatchObject({ status: VIRTIO_BLK_S_OK, used: data.length + 1 });
      expect(odd.data).toEqual(data);
      const even = blkRead(dev, 16, data.length);
      expect(even.data).toEqual(data);
      expect(segReq(dev, VIRTIO_BLK_T_WRITE_ZEROES, [segment(16, 2, 0), segment(20, 2, 1)]).status).toBe(VIRTIO_BLK_S_OK);
      const z = blkRead(dev, 16, 8 * 512, [100], 1).data;
      expect(z.subarray(0, 1024)).toEqual(new Uint8Array(1024));
      expect(z.subarray(1024, 2048)).toEqual(data.subarray(1024, 2048));
      expect(z.subarray(2048, 3072)).toEqual(new Uint8Array(1024));
    } finally {
      dev.close!();
    }
  });

  test.skipIf(!directOk)(`O_DIRECT read the kernel refuses (EINVAL) throws instead of completing${reason}`, () => {
    const backing = openFileBacking(directPath, { direct: true });
    try {
      // A negative offset is refused by preadv and pread alike: the direct attempt and the bounce retry both fail.
      const w = new ChainWriter(pieces(writable([512])));
      expect(() => backing.read(w, -512, 512)).toThrow(/EINVAL/);
      const r = new ChainReader(pieces(readable(pattern(512, 21))));
      expect(() => backing.write(r, -512, 512)).toThrow(/EINVAL/);
    } finally {
      backing.close();
    }
  });
});

// ---- asynchronous path: a file backing attached to a real epoll loop, completing through io_uring ----

describe("--aio auto", () => {
  test("auto is synchronous for a buffered image on tmpfs, io_uring on ext4 and with O_DIRECT", () => {
    const shmDir = existsSync("/dev/shm") ? mkdtempSync("/dev/shm/bunvhost-auto-") : null;
    const extDir = mkdtempSync("/tmp/bunvhost-auto-");
    try {
      const onExt = makeFile(extDir, "a.img", 1 << 20);
      const fd = openSync(onExt, "r");
      try {
        // /tmp is ext4 on these machines; were it tmpfs, auto would rightly choose sync.
        expect(resolveAio("auto", fd, false)).toBe(sys.fsType(fd) === TMPFS_MAGIC ? "sync" : "uring");
        expect(resolveAio("auto", fd, true)).toBe("uring");
        expect(resolveAio("sync", fd, true)).toBe("sync");
      } finally {
        closeSync(fd);
      }
      if (shmDir) {
        const onShm = makeFile(shmDir, "a.img", 1 << 20);
        expect(resolveAioPath("auto", onShm, false)).toBe("sync");
        expect(resolveAioPath("uring", onShm, false)).toBe("uring");
      }
    } finally {
      rmSync(extDir, { recursive: true, force: true });
      if (shmDir) rmSync(shmDir, { recursive: true, force: true });
    }
  });
});

describe("Blk over io_uring (attach)", () => {
  /** Runs one request that may go PENDING; waits (reaping the ring) until req.complete() is called. */
  async function runAsync(dev: Device, rd: Buf[], wr: Buf[]): Promise<Result & { pending: boolean }> {
    let completed = 0;
    const req: Request = {
      queue: 0, head: 0, in: new ChainReader(pieces(rd)), out: new ChainWriter(pieces(wr)),
      complete() { completed++; },
    };
    const r = dev.handle(req);
    const pending = r === PENDING;
    if (pending) {
      expect(completed).toBe(0);
      for (let i = 0; i < 2000 && completed === 0; i++) {
        await Bun.sleep(1); // the ring is entered at the end of the microtask turn
        dev.poll!();
      }
    } else {
      expect(r).toBeUndefined();
    }
    expect(completed).toBe(pending ? 1 : 0);
    const out = gather(wr);
    return { status: out[out.length - 1]!, used: req.out.pos, out, pending };
  }

  test("IN, OUT (write-through: then fdatasync) and FLUSH return PENDING and complete once, with the bytes in place", async () => {
    const path = makeFile(tmp, "uring.img", 1 << 20);
    const backing = openFileBacking(path, { aio: "uring" });
    const dev = createBlk({ backing });
    const loop = new EpollLoop();
    try {
      dev.attach!(loop);
      const data = pattern(12288, 31);
      const w = await runAsync(dev, [...readable(header(VIRTIO_BLK_T_OUT, 40)), ...readable(data, [512, 4096])], writable([1]));
      expect(w).toMatchObject({ status: VIRTIO_BLK_S_OK, used: 1, pending: true });
      expect(readFileSync(path).subarray(40 * 512, 40 * 512 + 12288)).toEqual(Buffer.from(data));
      const r = await runAsync(dev, readable(header(VIRTIO_BLK_T_IN, 40)), writable([4096, 3, 8190]));
      expect([r.status, r.used, r.pending]).toEqual([VIRTIO_BLK_S_OK, 12289, true]);
      expect(r.out.subarray(0, 12288)).toEqual(data);
      expect(await runAsync(dev, readable(header(VIRTIO_BLK_T_FLUSH)), writable([1]))).toMatchObject({ status: VIRTIO_BLK_S_OK, pending: true });
      // Synchronous requests stay synchronous: GET_ID, an IN past the end (IOERR at once).
      expect(await runAsync(dev, readable(header(VIRTIO_BLK_T_GET_ID)), writable([20, 1]))).toMatchObject({ status: VIRTIO_BLK_S_OK, pending: false });
      expect(await runAsync(dev, readable(header(VIRTIO_BLK_T_IN, 2048)), writable([512, 1]))).toMatchObject({ status: VIRTIO_BLK_S_IOERR, pending: false });
    } finally {
      dev.close!();
      loop.close();
    }
  });

  test("an IN the file no longer holds (shrunk under us) completes with IOERR, its bytes zero-padded to the status", async () => {
    const path = makeFile(tmp, "uring-shrink.img", 1 << 20);
    const backing = openFileBacking(path, { aio: "uring" });
    const dev = createBlk({ backing });
    const loop = new EpollLoop();
    try {
      dev.attach!(loop);
      truncateSync(path, 4096);
      const r = await runAsync(dev, readable(header(VIRTIO_BLK_T_IN, 4)), writable([8192, 1]));
      expect(r).toMatchObject({ status: VIRTIO_BLK_S_IOERR, used: 8193, pending: true });
    } finally {
      dev.close!();
      loop.close();
    }
  });

  test("aio: \"sync\", RAM and null disks never go PENDING", async () => {
    const path = makeFile(tmp, "sync.img", 1 << 20);
    const loop = new EpollLoop();
    for (const backing of [openFileBacking(path, { aio: "sync" }), ramBacking(1 << 20), nullBacking(1 << 20)]) {
      const dev = createBlk({ backing });
      dev.attach?.(loop);
      try {
        expect(await runAsync(dev, readable(header(VIRTIO_BLK_T_IN, 0)), writable([4096, 1]))).toMatchObject({ status: VIRTIO_BLK_S_OK, pending: false });
      } finally {
        dev.close!();
      }
    }
    loop.close();
  });
});

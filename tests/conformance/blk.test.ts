/**
 * vhost-user-blk conformance: one suite, run against every back-end in
 * tests/support/backends.ts (ours and qemu-storage-daemon) through the
 * TypeScript front-end in src/frontend/. Each back-end serves a 32 MiB raw
 * image on /dev/shm, filled with a seeded pattern; the test keeps a shadow
 * copy and checks every byte it reads against it.
 *
 * Ring layouts: bunvhost runs the whole suite twice, over split rings and over
 * packed rings (VIRTIO_F_RING_PACKED); the titles say which. qsd runs it over
 * split rings only, and a separate test asserts that it does not offer packed
 * ones. Only the ring-index and hostile-chain tests differ by layout.
 *
 * Disk areas (in MiB): [0, 24) random I/O with a shadow model, [24, 28)
 * request-type tests, [28, 30) reconnects, [30, 32) the ring-index tests.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { backendKinds, bunvhostMainLoop, scratchDir, type Backend, type BackendKind } from "../support/backends.ts";
import {
  BlkDriver, FrontendError, PACKED_FRESH_BASE, SplitDriver, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
  type RawDesc, type ReqOpts,
} from "../../src/frontend/index.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, type PackedRawDesc } from "../../src/frontend/packed_driver.ts";
import {
  bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/protocol/features.ts";
import { fillRandom, rng } from "../support/random.ts";

const MiB = 1 << 20;
const DISK = 32 * MiB;
const SECTORS = DISK / 512;
const RANDOM_AREA = 24 * MiB;
const TYPES_AT = (24 * MiB) / 512;
const RECONNECT_AT = (28 * MiB) / 512;
const RING_AT = (30 * MiB) / 512;



const same = (a: Uint8Array, b: Uint8Array) => a.length === b.length && Buffer.compare(a, b) === 0;

/** A back-end and the ring layout the suite drives it with. */
interface Variant {
  kind: BackendKind;
  packed: boolean;
  label: string;
}
const variants: Variant[] = [...backendKinds, bunvhostMainLoop].flatMap((kind) =>
  // qsd has no packed rings: see "qsd, packed ring" below.
  (kind.name === "qsd" ? [false] : [false, true]).map((packed) => ({ kind, packed, label: `${kind.label}, ${packed ? "packed" : "split"} ring` })));

/** The packed vhost-user base `k` descriptors after `base` on a ring of `size` (both halves alike). */
function packedAdvance(base: number, k: number, size: number): number {
  let pos = (base & 0x7fff) + k, wrap = (base >>> 15) & 1;
  for (; pos >= size; pos -= size) wrap ^= 1;
  // (pos | wrap << 15) ≤ 0xffff, so the product stays below 2^32 and is exact.
  return ((pos | (wrap << 15)) * 0x10001) >>> 0;
}

describe("vhost-user-blk conformance: qsd, packed ring", () => {
  const qsd = backendKinds.find((k) => k.name === "qsd")!;
  const skip = qsd.skipReason();
  // qemu-storage-daemon 7.2 exports through libvhost-user, which has split rings only: its
  // GET_FEATURES never sets VIRTIO_F_RING_PACKED (and QEMU's vhost-user-blk then runs split rings
  // whatever packed=on says). So the packed suite cannot run against it; assert the refusal, so a
  // qsd that gains packed rings shows up here.
  test.skipIf(skip !== null)(`does not offer VIRTIO_F_RING_PACKED; BlkDriver { packed: true } fails with NOT_OFFERED${skip === null ? "" : ` [skipped: ${skip}]`}`, async () => {
    const be = await qsd.start({ size: MiB });
    try {
      let err: unknown = null;
      try {
        BlkDriver.connect(be.socket, { packed: true }).close();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(FrontendError);
      expect((err as FrontendError).code).toBe("NOT_OFFERED");
      // The same back-end still serves a split front-end, and its offer has no packed bit.
      using d = BlkDriver.connect(be.socket);
      expect(d.deviceFeatures & bit(VIRTIO_F_RING_PACKED)).toBe(0n);
      expect(d.read(0, new Uint8Array(512))).toBe(VIRTIO_BLK_S_OK);
    } finally {
      await be.stop();
    }
  });
});

describe.each(variants)("vhost-user-blk conformance: $label", ({ kind, packed }) => {
  const skip = kind.skipReason();
  const it = (name: string, fn: () => void | Promise<void>, timeoutMs = 15_000) =>
    test.skipIf(skip !== null)(skip === null ? name : `${name} [skipped: ${skip}]`, fn, timeoutMs);

  let dir = "";
  let image = "";
  let be: Backend | null = null;
  /** What the disk holds, as far as the tests know. */
  let shadow: Uint8Array = new Uint8Array(0);

  beforeAll(async () => {
    if (skip !== null) return;
    dir = scratchDir("bunvhost-conf-");
    image = join(dir, "disk.img");
    shadow = fillRandom(new Uint8Array(DISK), rng(0x5eed));
    writeFileSync(image, shadow);
    be = await kind.start({ size: DISK, image });
  });

  afterAll(async () => {
    await be?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  type Opts = ConstructorParameters<typeof BlkDriver>[1];
  /** Connects and sets up like QEMU does. */
  const connect = (o: Opts = {}): BlkDriver => BlkDriver.connect(be!.socket, { timeoutMs: 5000, packed, ...o });

  it("offers VERSION_1, EVENT_IDX, INDIRECT_DESC and the protocol features a driver needs", () => {
    using d = connect();
    expect(d.deviceFeatures & bit(VIRTIO_F_VERSION_1)).toBe(bit(VIRTIO_F_VERSION_1));
    expect(d.deviceFeatures & bit(VHOST_USER_F_PROTOCOL_FEATURES)).not.toBe(0n);
    expect(d.deviceFeatures & bit(VIRTIO_RING_F_EVENT_IDX)).not.toBe(0n);
    expect(d.deviceFeatures & bit(VIRTIO_RING_F_INDIRECT_DESC)).not.toBe(0n);
    // Packed rings differ: qsd (libvhost-user) does not offer VIRTIO_F_RING_PACKED, so the offer is
    // not asserted; what was accepted follows the layout asked for.
    expect(d.features & bit(VIRTIO_F_RING_PACKED)).toBe(packed ? bit(VIRTIO_F_RING_PACKED) : 0n);
    if (kind.name === "bunvhost") expect(d.deviceFeatures & bit(VIRTIO_F_RING_PACKED)).toBe(bit(VIRTIO_F_RING_PACKED));
    // What we accepted is a subset of the offer and includes what we asked for.
    expect(d.features & ~d.deviceFeatures).toBe(0n);
    expect(d.features & bit(VIRTIO_RING_F_EVENT_IDX)).not.toBe(0n);
    for (const p of [ProtocolFeature.CONFIG, ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK]) {
      expect(d.deviceProtocolFeatures & bit(p)).toBe(bit(p));
    }
    expect(d.queueNum).toBeGreaterThanOrEqual(1);
    // Flush is a SHOULD for devices (§5.2.5.1); both offer it.
    expect(d.deviceFeatures & bit(VIRTIO_BLK_F_FLUSH)).not.toBe(0n);
    expect(d.read(0, new Uint8Array(512))).toBe(VIRTIO_BLK_S_OK);
  });

  it("works with EVENT_IDX, INDIRECT_DESC and REPLY_ACK all declined", () => {
    using d = connect({ eventIdx: false, indirect: false, replyAck: false });
    expect(d.features & (bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC))).toBe(0n);
    const buf = new Uint8Array(64 << 10);
    for (let i = 0; i < 20; i++) {
      const sector = i * 128;
      expect(d.read(sector, buf, { segments: 1 + (i % 4) })).toBe(VIRTIO_BLK_S_OK);
      expect(same(buf, shadow.subarray(sector * 512, sector * 512 + buf.length))).toBe(true);
    }
  });

  it("config space: capacity matches the image, blk_size, seg_max, num_queues", () => {
    using d = connect();
    const c = d.config!;
    expect(c).not.toBeNull();
    expect(c.capacity).toBe(SECTORS);
    if (d.has(VIRTIO_BLK_F_BLK_SIZE)) expect(c.blkSize).toBe(512);
    if (d.has(VIRTIO_BLK_F_SEG_MAX)) expect(c.segMax).toBeGreaterThanOrEqual(1);
    if (d.has(VIRTIO_BLK_F_MQ)) expect(c.numQueues).toBe(1);
    if (d.has(VIRTIO_BLK_F_DISCARD)) {
      expect(c.maxDiscardSectors).toBeGreaterThan(0);
      expect(c.maxDiscardSeg).toBeGreaterThanOrEqual(1);
    }
    if (d.has(VIRTIO_BLK_F_WRITE_ZEROES)) expect(c.maxWriteZeroesSectors).toBeGreaterThan(0);
    // A partial read returns the same bytes. qsd ignores the offset (its get_config copies from the
    // start of config space; QEMU only ever asks for offset 0), so it is only asked for a prefix.
    expect(same(d.fe.getConfig(0, 8), c.raw.subarray(0, 8))).toBe(true);
    if (kind.name !== "qsd") expect(same(d.fe.getConfig(8, 12), c.raw.subarray(8, 20))).toBe(true);
  });

  it("serves several queues when started with num-queues 2", async () => {
    const other = await kind.start({ size: 4 * MiB, queues: 2 });
    try {
      using d = BlkDriver.connect(other.socket, { queues: 2, packed });
      expect(d.config!.numQueues).toBe(2);
      expect(d.queueNum).toBeGreaterThanOrEqual(2);
      const a = fillRandom(new Uint8Array(8192), rng(1));
      const b = fillRandom(new Uint8Array(8192), rng(2));
      expect(d.write(0, a, { queue: 0 })).toBe(VIRTIO_BLK_S_OK);
      expect(d.write(16, b, { queue: 1 })).toBe(VIRTIO_BLK_S_OK);
      const r = new Uint8Array(8192);
      expect(d.read(0, r, { queue: 1 })).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, a)).toBe(true);
      expect(d.read(16, r, { queue: 0 })).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, b)).toBe(true);
    } finally {
      await other.stop();
    }
  });

  it("random writes and reads (512 B-128 KiB; split, indirect, region-crossing) match the shadow copy", () => {
    using d = connect({ depth: 16 });
    const next = rng(0xb10c);
    const done: { write: boolean; sector: number; len: number }[] = [];
    let bad = "";
    let ops = 0, crossed = 0, indirect = 0, split = 0;
    const readBuf = new Uint8Array(128 << 10);
    d.onComplete = (slot, status, usedLen) => {
      const r = done[slot]!;
      if (status !== VIRTIO_BLK_S_OK) bad ||= `${r.write ? "write" : "read"} of ${r.len} at ${r.sector}: status ${status}`;
      // The used length is what the device wrote: data + status for a read, the status for a write (§2.7.8.2).
      if (usedLen !== (r.write ? 1 : r.len + 1)) bad ||= `used length ${usedLen} for a ${r.write ? "write" : "read"} of ${r.len}`;
      if (!r.write) {
        const got = readBuf.subarray(0, r.len);
        d.slotRead(slot, got);
        if (!same(got, shadow.subarray(r.sector * 512, r.sector * 512 + r.len))) bad ||= `read of ${r.len} at sector ${r.sector}: data differs`;
      }
    };
    while (ops < 480) {
      const k = 1 + (next() % 8);
      const batch: { sector: number; len: number }[] = [];
      let crossUsed = false;
      for (let j = 0; j < k; j++) {
        const len = next() % 3 === 0 ? 512 << (next() % 9) : 512 * (1 + (next() % 256));
        const sector = next() % ((RANDOM_AREA - len) / 512);
        // Requests in flight together must not overlap: their order is not defined (§5.2.6).
        if (batch.some((b) => sector < b.sector + b.len / 512 && b.sector < sector + len / 512)) continue;
        batch.push({ sector, len });
        const write = (next() & 1) === 1;
        const o: ReqOpts = {};
        if (next() % 4 === 0) (o.segments = 2 + (next() % 7)), split++;
        if (next() % 3 === 0) (o.indirect = true), indirect++;
        // Crossing buffers inside indirect tables are a separate test (qsd fails them).
        if (!crossUsed && !o.indirect && next() % 5 === 0) (o.cross = true), (crossUsed = true), crossed++;
        else if (next() % 10 === 0) o.compact = true;
        let slot: number;
        if (write) {
          const data = fillRandom(new Uint8Array(len), next);
          slot = d.enqueue(VIRTIO_BLK_T_OUT, sector, len, o, data);
          shadow.set(data, sector * 512);
        } else {
          slot = d.enqueue(VIRTIO_BLK_T_IN, sector, len, o);
        }
        done[slot] = { write, sector, len };
        ops++;
      }
      d.kick();
      d.drain();
      expect(bad).toBe("");
    }
    expect(crossed).toBeGreaterThan(10);
    expect(indirect).toBeGreaterThan(50);
    expect(split).toBeGreaterThan(50);
    // Everything written is on disk (and the reads above were not served from our own buffers).
    d.onComplete = null;
    const all = new Uint8Array(128 << 10);
    for (let off = 0; off < RANDOM_AREA; off += all.length) {
      expect(d.read(off / 512, all)).toBe(VIRTIO_BLK_S_OK);
      if (!same(all, shadow.subarray(off, off + all.length))) throw new Error(`disk differs from the shadow in [${off}, +128K)`);
    }
  });

  it("an indirect table may hold buffers that cross a memory region boundary", () => {
    const data = fillRandom(new Uint8Array(12288), rng(4));
    const r = new Uint8Array(12288);
    if (kind.name === "qsd") {
      // qsd 7.2 differs (a libvhost-user bug): it counts iovecs, not table entries, against the
      // indirect table's length, panics "Looped descriptor" and hangs up. Assert that, so a fixed
      // qsd shows up here.
      using d = connect({ timeoutMs: 1000 });
      expect(() => d.write(TYPES_AT, data, { indirect: true, cross: true, segments: 3 })).toThrow(FrontendError);
      return;
    }
    using d = connect();
    for (const segments of [1, 3]) {
      expect(d.write(TYPES_AT, data, { indirect: true, cross: true, segments })).toBe(VIRTIO_BLK_S_OK);
      expect(d.read(TYPES_AT, r, { indirect: true, cross: true, segments })).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, data)).toBe(true);
    }
  });

  it("polling mode (no interrupts) reads and writes", () => {
    using d = connect({ polling: true });
    const next = rng(77);
    for (let i = 0; i < 100; i++) {
      const sector = TYPES_AT + (i % 64) * 8;
      const data = fillRandom(new Uint8Array(4096), next);
      expect(d.write(sector, data)).toBe(VIRTIO_BLK_S_OK);
      const r = new Uint8Array(4096);
      expect(d.read(sector, r, { indirect: (i & 1) === 1 })).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, data)).toBe(true);
    }
  });

  it("every request type: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES (with UNMAP), unknown → UNSUPP", () => {
    using d = connect();
    const at = TYPES_AT + 1024;
    const data = fillRandom(new Uint8Array(16384), rng(9));
    const r = new Uint8Array(16384);
    // OUT/IN in every chain layout.
    for (const o of [{}, { compact: true }, { splitHeader: true }, { segments: 5, indirect: true }, { compact: true, indirect: true }] as ReqOpts[]) {
      data[0]!++;
      expect(d.write(at, data, o)).toBe(VIRTIO_BLK_S_OK);
      expect(d.lastUsedLen).toBe(1);
      r.fill(0);
      expect(d.read(at, r, o)).toBe(VIRTIO_BLK_S_OK);
      expect(d.lastUsedLen).toBe(r.length + 1);
      expect(same(r, data)).toBe(true);
    }
    expect(d.flush()).toBe(VIRTIO_BLK_S_OK);

    // GET_ID: at most 20 bytes, NUL-terminated when shorter (§5.2.6). The used length differs:
    // qsd reports the whole 21-byte writable area, whatever the id's length.
    const id = d.getId();
    expect(id.status).toBe(VIRTIO_BLK_S_OK);
    expect(id.id.length).toBeGreaterThan(0);
    expect(id.id).toMatch(/^[\x20-\x7e]+$/);
    expect(d.lastUsedLen).toBeGreaterThanOrEqual(1);

    if (d.has(VIRTIO_BLK_F_WRITE_ZEROES)) {
      for (const unmap of [false, true]) {
        expect(d.write(at, data)).toBe(VIRTIO_BLK_S_OK);
        expect(d.writeZeroes({ sector: at + 8, sectors: 16 }, unmap)).toBe(VIRTIO_BLK_S_OK);
        expect(d.read(at, r)).toBe(VIRTIO_BLK_S_OK);
        const want = data.slice();
        want.fill(0, 8 * 512, 24 * 512);
        expect(same(r, want)).toBe(true);
      }
      // Unknown flag bits: UNSUPP (§5.2.6.2).
      expect(d.writeZeroes({ sector: at, sectors: 8, flags: 0x80 })).toBe(VIRTIO_BLK_S_UNSUPP);
    }
    if (d.has(VIRTIO_BLK_F_DISCARD)) {
      expect(d.discard({ sector: at, sectors: 32 })).toBe(VIRTIO_BLK_S_OK);
      // Discard with the UNMAP flag: UNSUPP (§5.2.6.2: "the unmap flag ... for discard commands").
      expect(d.discard({ sector: at, sectors: 8, flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP })).toBe(VIRTIO_BLK_S_UNSUPP);
    }
    // An unknown request type, with and without a data buffer.
    expect(d.request(0x55, 0, { inLen: 512 }).status).toBe(VIRTIO_BLK_S_UNSUPP);
    expect(d.request(0x56, 0).status).toBe(VIRTIO_BLK_S_UNSUPP);
    // The device still works afterwards.
    expect(d.read(at, r)).toBe(VIRTIO_BLK_S_OK);
  });

  it("reads and writes past the capacity fail with IOERR", () => {
    using d = connect();
    const b = new Uint8Array(1024);
    expect(d.read(SECTORS, b.subarray(0, 512))).toBe(VIRTIO_BLK_S_IOERR);
    expect(d.read(SECTORS - 1, b)).toBe(VIRTIO_BLK_S_IOERR);
    expect(d.read(2 ** 40, b)).toBe(VIRTIO_BLK_S_IOERR);
    expect(d.write(SECTORS, b.subarray(0, 512))).toBe(VIRTIO_BLK_S_IOERR);
    expect(d.write(SECTORS - 1, b)).toBe(VIRTIO_BLK_S_IOERR);
    expect(d.write(2 ** 40, b)).toBe(VIRTIO_BLK_S_IOERR);
    if (d.has(VIRTIO_BLK_F_WRITE_ZEROES)) expect(d.writeZeroes({ sector: SECTORS - 4, sectors: 8 })).toBe(VIRTIO_BLK_S_IOERR);
    // The last sector itself is fine, and the refused write changed nothing.
    expect(d.read(SECTORS - 1, b.subarray(0, 512))).toBe(VIRTIO_BLK_S_OK);
    expect(same(b.subarray(0, 512), shadow.subarray(DISK - 512))).toBe(true);
  });

  it("a read-only disk offers RO and refuses writes, discards and write-zeroes", async () => {
    const img = join(dir, "ro.img");
    const content = fillRandom(new Uint8Array(4 * MiB), rng(3));
    writeFileSync(img, content);
    const ro = await kind.start({ size: content.length, image: img, readonly: true });
    try {
      using d = BlkDriver.connect(ro.socket, { packed });
      expect(d.deviceFeatures & bit(VIRTIO_BLK_F_RO)).not.toBe(0n);
      const r = new Uint8Array(4096);
      expect(d.read(8, r)).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, content.subarray(4096, 8192))).toBe(true);
      expect(d.write(8, new Uint8Array(4096))).toBe(VIRTIO_BLK_S_IOERR);
      if (d.has(VIRTIO_BLK_F_WRITE_ZEROES)) expect(d.writeZeroes({ sector: 8, sectors: 8 })).not.toBe(VIRTIO_BLK_S_OK);
      if (d.has(VIRTIO_BLK_F_DISCARD)) expect(d.discard({ sector: 8, sectors: 8 })).not.toBe(VIRTIO_BLK_S_OK);
      expect(d.read(8, r)).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, content.subarray(4096, 8192))).toBe(true);
    } finally {
      await ro.stop();
    }
  });

  if (!packed) {
    it("GET_VRING_BASE returns the avail index after N requests, also across the u16 wrap", () => {
      for (const base of [0, 65530]) {
        using d = connect({ base });
        const n = 37;
        const b = new Uint8Array(4096);
        for (let i = 0; i < n; i++) expect(d.read(RING_AT + i * 8, b)).toBe(VIRTIO_BLK_S_OK);
        expect((d.vqs[0] as SplitDriver).usedIndex()).toBe((base + n) & 0xffff);
        expect(d.getVringBase(0)).toBe((base + n) & 0xffff);
      }
    });
  } else {
    it("GET_VRING_BASE returns positions and wrap counters after N requests, also across the ring wrap on a ring of 100", () => {
      // Each read is 3 ring descriptors (header, data, status): 37 reads take 111 positions. From a
      // fresh ring that stays in lap 1; from position 95 of a wrap-0 lap on a ring of 100 it wraps twice.
      for (const [size, base] of [[128, PACKED_FRESH_BASE], [100, 95 * 0x10001]] as const) {
        using d = connect({ base, queueSize: size });
        expect(d.vqs[0]!.vringBase).toBe(base);
        const n = 37;
        const b = new Uint8Array(4096);
        for (let i = 0; i < n; i++) expect(d.read(RING_AT + i * 8, b)).toBe(VIRTIO_BLK_S_OK);
        const want = packedAdvance(base, 3 * n, size);
        expect(d.vqs[0]!.vringBase).toBe(want);
        expect(d.getVringBase(0)).toBe(want);
      }
      // A base with descriptors in flight (halves differ) or a position past the ring cannot start a
      // driver: refused before SET_FEATURES, and the back-end serves the next front-end.
      expect(() => connect({ base: 0x80058000 })).toThrow(RangeError);
      expect(() => connect({ base: 200 * 0x10001, queueSize: 100 })).toThrow(RangeError);
      using d = connect();
      expect(d.read(RING_AT, new Uint8Array(512))).toBe(VIRTIO_BLK_S_OK);
    });
  }

  if (!packed) it("hostile chains (loop, next past the table, head past the ring, hole, zero length) end the connection", () => {
    const hdr = new Uint8Array(16); // VIRTIO_BLK_T_IN of sector 0
    const cases: [string, (h: number, data: number, st: number) => { descs: RawDesc[]; availEntry?: number }][] = [
      ["loop", (h, data) => ({ descs: [{ addr: h, len: 16 }, { addr: data, len: 512, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, nextRel: 0 }] })],
      ["next index past the table", (h, _d, st) => ({ descs: [{ addr: h, len: 16, next: 500 }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }] })],
      ["head index past the ring", (h, _d, st) => ({ descs: [{ addr: h, len: 16 }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }], availEntry: 300 })],
      ["buffer in a memory hole", (h, _d, st) => ({ descs: [{ addr: h, len: 16 }, { addr: 0x7000_0000, len: 512, flags: VRING_DESC_F_WRITE }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }] })],
      ["zero-length buffer", (h, data, st) => ({ descs: [{ addr: h, len: 16 }, { addr: data, len: 0, flags: VRING_DESC_F_WRITE }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }] })],
    ];
    // Not here, because the two differ where the spec sets no device rule: an INDIRECT flag inside
    // an indirect table (qsd reads the entry as a plain buffer; we refuse it), and a header with
    // version 2 (qsd ignores it; we hang up).
    for (const [name, make] of cases) {
      using d = connect({ timeoutMs: 1000 });
      const h = d.ram.alloc(16);
      d.ram.write(h, hdr);
      const data = d.ram.alloc(4096);
      const st = d.ram.alloc(1);
      const { descs, availEntry } = make(h, data, st);
      const r = d.submitRaw(descs, { availEntry, statusGpa: st });
      expect(`${name}: ${r.outcome}`).toBe(`${name}: disconnected`);
      expect(r.status).toBe(0xff);
    }
    // The back-end still serves the next front-end.
    using d = connect();
    expect(d.read(0, new Uint8Array(512))).toBe(VIRTIO_BLK_S_OK);
  });

  if (packed) {
    it("hostile packed chains (id past the ring, longer than the ring, zero length, nested indirect, …) end the connection", async () => {
      const SIZE = 16;
      const W = VIRTQ_DESC_F_WRITE;
      const hdr = new Uint8Array(16); // VIRTIO_BLK_T_IN of sector 0
      // Each case with the VirtqCode the back-end must log for it.
      const cases: [string, string, (h: number, data: number, st: number) => PackedRawDesc[]][] = [
        ["buffer id past the ring", "HEAD_RANGE", (h, _d, st) => [{ addr: h, len: 16, id: 300 }, { addr: st, len: 1, flags: W, id: 300 }]],
        // All 16 positions, the last one still saying NEXT (§2.8.17: no list longer than the queue).
        ["chain longer than the ring", "LOOP", (h, data, st) => [
          { addr: h, len: 16 },
          ...Array.from({ length: SIZE - 2 }, (_, k): PackedRawDesc => ({ addr: data + 16 * k, len: 16, flags: W })),
          { addr: st, len: 1, flags: W | VIRTQ_DESC_F_NEXT },
        ]],
        ["zero-length buffer", "ZERO_LEN", (h, data, st) => [{ addr: h, len: 16 }, { addr: data, len: 0, flags: W }, { addr: st, len: 1, flags: W }]],
        ["nested indirect table", "NESTED_INDIRECT", (h, data, st) => [{
          table: [{ addr: h, len: 16 }, { addr: data, len: 32, flags: VIRTQ_DESC_F_INDIRECT }, { addr: st, len: 1, flags: W }],
        }]],
        ["indirect table of 20 bytes", "INDIRECT_LEN", (h, _d, st) => [{ table: [{ addr: h, len: 16 }, { addr: st, len: 1, flags: W }], len: 20 }]],
        ["indirect descriptor inside a chain", "INDIRECT_NEXT", (h, _d, st) => [{ addr: h, len: 16 }, { table: [{ addr: st, len: 1, flags: W }] }]],
        ["buffer in a memory hole", "BAD_ADDR", (h, _d, st) => [{ addr: h, len: 16 }, { addr: 0x7000_0000, len: 512, flags: W }, { addr: st, len: 1, flags: W }]],
        // The middle descriptor carries the previous lap's avail bits: the list runs into a hole.
        ["chain continuing into a descriptor not made available", "NEXT_RANGE", (h, data, st) => [
          { addr: h, len: 16 }, { addr: data, len: 512, flags: W, stale: true }, { addr: st, len: 1, flags: W },
        ]],
      ];
      for (const [name, code, make] of cases) {
        const logFrom = be!.stderr().length;
        {
          using d = connect({ timeoutMs: 1000, queueSize: SIZE });
          const h = d.ram.alloc(16);
          d.ram.write(h, hdr);
          const data = d.ram.alloc(4096);
          const st = d.ram.alloc(1);
          const r = d.submitRawPacked(make(h, data, st), { statusGpa: st });
          expect(`${name}: ${r.outcome}`).toBe(`${name}: disconnected`);
          expect(r.status).toBe(0xff);
        }
        // The server may write its log line a moment after it hangs up.
        const want = new RegExp(`device broken: queue 0: ${code} at`);
        for (let i = 0; i < 50 && !want.test(be!.stderr().slice(logFrom)); i++) await Bun.sleep(10);
        expect(`${name}: ${want.test(be!.stderr().slice(logFrom)) ? code : be!.stderr().slice(logFrom)}`).toBe(`${name}: ${code}`);
      }
      // The back-end still serves the next front-end, in either layout.
      for (const layout of [true, false]) {
        using d = connect({ packed: layout });
        expect(d.read(0, new Uint8Array(512))).toBe(VIRTIO_BLK_S_OK);
      }
    });
  }

  it("100 reconnects (connect, set up, one I/O, disconnect) keep the data", () => {
    const block = (i: number) => fillRandom(new Uint8Array(4096), rng(1000 + i));
    const r = new Uint8Array(4096);
    for (let i = 0; i < 100; i++) {
      using d = connect({ depth: 2, maxIo: 8192, queueSize: 16 });
      expect(d.write(RECONNECT_AT + i * 8, block(i))).toBe(VIRTIO_BLK_S_OK);
    }
    using d = connect();
    for (let i = 0; i < 100; i++) {
      expect(d.read(RECONNECT_AT + i * 8, r)).toBe(VIRTIO_BLK_S_OK);
      expect(same(r, block(i))).toBe(true);
    }
  }, 30_000);
});

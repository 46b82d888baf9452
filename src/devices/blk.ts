/**
 * virtio-blk (VIRTIO 1.2 §5.2): a disk over a Backing. Reads, writes and
 * flushes go to the backing asynchronously when it can (a file on io_uring,
 * once attached to a loop: handle() returns PENDING and the backing's
 * callback completes the request); everything else, and every request on a
 * RAM or null disk, is handled synchronously. The status byte goes in the last writable byte, and
 * any writable byte the request does not define is zeroed before it, so the
 * used length is always the whole writable area.
 */
import { ChainRangeError, OptionError, PENDING, VIRTIO_ID_BLOCK } from "../device/api.ts";
import type { ChainReader, ChainWriter, Device, DeviceOptions, EventLoop, OptionValues, PrepareContext, Request } from "../device/api.ts";
import { resolve } from "node:path";
import { uringUnavailable } from "../io/uring.ts";
import type { Backing } from "./blk_backing.ts";

import { openBacking, resolveAioPath, shareBacking, type Aio, type BackingSpec } from "./blk_backing.ts";
export { nullBacking, openFileBacking, ramBacking, openBacking, shareBacking } from "./blk_backing.ts";
export type { Backing, BackingSpec } from "./blk_backing.ts";

// Feature bit numbers (§5.2.3).
export const VIRTIO_BLK_F_SIZE_MAX = 1, VIRTIO_BLK_F_SEG_MAX = 2, VIRTIO_BLK_F_GEOMETRY = 4, VIRTIO_BLK_F_RO = 5,
  VIRTIO_BLK_F_BLK_SIZE = 6, VIRTIO_BLK_F_FLUSH = 9, VIRTIO_BLK_F_TOPOLOGY = 10, VIRTIO_BLK_F_CONFIG_WCE = 11,
  VIRTIO_BLK_F_MQ = 12, VIRTIO_BLK_F_DISCARD = 13, VIRTIO_BLK_F_WRITE_ZEROES = 14, VIRTIO_BLK_F_LIFETIME = 15,
  VIRTIO_BLK_F_SECURE_ERASE = 16, VIRTIO_BLK_F_ZONED = 17;

// Request types (§5.2.6).
export const VIRTIO_BLK_T_IN = 0, VIRTIO_BLK_T_OUT = 1, VIRTIO_BLK_T_FLUSH = 4, VIRTIO_BLK_T_GET_ID = 8,
  VIRTIO_BLK_T_GET_LIFETIME = 10, VIRTIO_BLK_T_DISCARD = 11, VIRTIO_BLK_T_WRITE_ZEROES = 13,
  VIRTIO_BLK_T_SECURE_ERASE = 14;

export const VIRTIO_BLK_S_OK = 0, VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2;

/** `flags` bit 0 of a discard/write-zeroes segment. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const VIRTIO_BLK_ID_BYTES = 20;
/** struct virtio_blk_config up to and including the secure-erase fields. */
export const VIRTIO_BLK_CONFIG_SIZE = 72;

/** Limits advertised in the config space; a segment of the maximum size costs one bounded stall of the queue. */
/** seg_max is sized for a ring of this many entries (QEMU's default queue-size). */
export const BLK_SEG_MAX_RING = 128;
export const BLK_MAX_DISCARD_SECTORS = 1 << 16, BLK_MAX_WRITE_ZEROES_SECTORS = 1 << 16, BLK_MAX_SEGMENTS = 16;

const SECTOR = 512, HEADER = 16, SEGMENT = 16;
/** execute(): the request went to the backing asynchronously; its callback finishes it. */
const ASYNC = -1;

export interface BlkOptions {
  backing: Backing;
  /** Offer VIRTIO_BLK_F_RO and refuse writes even if the backing is writable. */
  readonly?: boolean;
  /** Request queues, 1..65535 (default 1). */
  queues?: number;
  /**
   * Largest queue size accepted, a power of two in 4..32768 (default 1024, QEMU's maximum:
   * vhost-user cannot tell the front-end a limit, so a smaller one leaves QEMU's device dead).
   */
  queueSize?: number;
  /** GET_ID string: printable ASCII, at most 20 bytes (default "bunvhost"). */
  serial?: string;
  /** blk_size: a power of two in 512..65536 (default 512); the protocol still counts 512-byte sectors. */
  logicalBlockSize?: number;
}

const bit = (n: number) => 1n << BigInt(n);
const pow2 = (n: number, lo: number, hi: number) => Number.isInteger(n) && n >= lo && n <= hi && (n & (n - 1)) === 0;

class Blk implements Device {
  readonly name = "blk";
  readonly type = VIRTIO_ID_BLOCK;
  readonly features: bigint;
  private sectors: number;
  private readonly cfg = new Uint8Array(VIRTIO_BLK_CONFIG_SIZE);
  private readonly id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  /** Until FLUSH is negotiated every write is made durable before it completes (§5.2.6.2, stable writes). */
  private writethrough = true;
  private readonly segSector = new Float64Array(BLK_MAX_SEGMENTS);
  private readonly segCount = new Float64Array(BLK_MAX_SEGMENTS);
  private readonly segUnmap = new Uint8Array(BLK_MAX_SEGMENTS);

  constructor(private readonly backing: Backing, private readonly ro: boolean, readonly queues: number,
    readonly queueSize: number, serial: Uint8Array, blockSize: number) {
    this.sectors = Math.floor(backing.size / SECTOR);
    this.id.set(serial);
    this.features = bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH) |
      bit(VIRTIO_BLK_F_MQ) | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES) |
      (ro ? bit(VIRTIO_BLK_F_RO) : 0n);
    const c = new DataView(this.cfg.buffer);
    this.setCapacity();
    // seg_max must fit the ring the driver actually picks (QEMU's default is 128) when it
    // does not use indirect descriptors; the config is read before the ring size is known.
    c.setUint32(12, Math.min(queueSize, BLK_SEG_MAX_RING) - 2, true);
    c.setUint32(20, blockSize, true);
    c.setUint16(34, queues, true);
    c.setUint32(36, BLK_MAX_DISCARD_SECTORS, true);
    c.setUint32(40, BLK_MAX_SEGMENTS, true);
    c.setUint32(44, blockSize / SECTOR, true);
    c.setUint32(48, BLK_MAX_WRITE_ZEROES_SECTORS, true);
    c.setUint32(52, BLK_MAX_SEGMENTS, true);
    c.setUint8(56, 1);
  }

  config(): Uint8Array {
    return this.cfg;
  }

  private setCapacity(): void {
    const c = new DataView(this.cfg.buffer);
    c.setUint32(0, this.sectors % 2 ** 32, true);
    c.setUint32(4, Math.floor(this.sectors / 2 ** 32), true);
  }

  /** The image was resized by its owner: take the new capacity; returns whether it changed. */
  refresh(): boolean {
    if (!this.backing.resync) return false;
    const sectors = Math.floor(this.backing.resync() / SECTOR);
    if (sectors === this.sectors) return false;
    this.sectors = sectors;
    this.setCapacity();
    return true;
  }

  setFeatures(features: bigint): void {
    this.writethrough = (features & bit(VIRTIO_BLK_F_FLUSH)) === 0n;
  }

  reset(): void {
    this.writethrough = true;
  }

  close(): void {
    this.backing.close();
  }

  attach(loop: EventLoop): void {
    this.backing.attach?.(loop);
  }

  poll(): boolean {
    return this.backing.poll?.() ?? false;
  }

  handle(req: Request): void | typeof PENDING {
    const w = req.out;
    if (w.remaining < 1) throw new ChainRangeError(`virtio-blk: no writable byte for the status (head ${req.head})`);
    let status: number;
    try {
      status = this.execute(req, req.in, w);
    } catch {
      status = VIRTIO_BLK_S_IOERR;
    }
    if (status === ASYNC) return PENDING;
    this.finish(w, status);
  }

  private finish(w: ChainWriter, status: number): void {
    const gap = w.remaining - 1;
    if (gap > 0) w.fill(gap);
    w.writeU8(status);
  }

  // Completions of asynchronous requests (made once; `res` is the bytes moved or -errno).
  // IN consumed every writable byte but the status; OUT every readable byte after the header.
  private readonly readDone = (req: Request, res: number) => this.asyncDone(req, res === req.out.pos);
  private readonly writeDone = (req: Request, res: number) => this.asyncDone(req, res === req.in.pos - HEADER);
  private readonly flushDone = (req: Request, res: number) => this.asyncDone(req, res === 0);

  private asyncDone(req: Request, ok: boolean): void {
    this.finish(req.out, ok ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR);
    req.complete();
  }

  private execute(req: Request, r: ChainReader, w: ChainWriter): number {
    if (r.remaining < HEADER) return VIRTIO_BLK_S_IOERR;
    const type = r.readU32();
    r.skip(4);
    const sector = r.readU64();
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const len = w.remaining - 1;
        if (len % SECTOR !== 0 || !this.inRange(sector, len / SECTOR)) return VIRTIO_BLK_S_IOERR;
        if (this.backing.readAsync?.(w, sector * SECTOR, len, req, this.readDone)) return ASYNC;
        this.backing.read(w, sector * SECTOR, len);
        return VIRTIO_BLK_S_OK;
      }
      case VIRTIO_BLK_T_OUT: {
        const len = r.remaining;
        if (this.ro || len % SECTOR !== 0 || !this.inRange(sector, len / SECTOR)) return VIRTIO_BLK_S_IOERR;
        if (this.backing.writeAsync?.(r, sector * SECTOR, len, this.writethrough, req, this.writeDone)) return ASYNC;
        this.backing.write(r, sector * SECTOR, len);
        if (this.writethrough) this.backing.flush();
        return VIRTIO_BLK_S_OK;
      }
      case VIRTIO_BLK_T_FLUSH:
        if (!this.ro && this.backing.flushAsync?.(req, this.flushDone)) return ASYNC;
        if (!this.ro) this.backing.flush();
        return VIRTIO_BLK_S_OK;
      case VIRTIO_BLK_T_GET_ID: {
        const avail = w.remaining - 1;
        if (avail >= VIRTIO_BLK_ID_BYTES) {
          w.copyFrom(this.id);
          return VIRTIO_BLK_S_OK;
        }
        // The driver MUST give 20 bytes (§5.2.6.1); a cut-off id is not reported as complete.
        w.copyFrom(this.id.subarray(0, avail));
        return VIRTIO_BLK_S_IOERR;
      }
      case VIRTIO_BLK_T_DISCARD:
        return this.segments(r, false);
      case VIRTIO_BLK_T_WRITE_ZEROES:
        return this.segments(r, true);
      default:
        return VIRTIO_BLK_S_UNSUPP;
    }
  }

  /**
   * `sector` comes from readU64 and may be far above 2^53 (then rounded), but
   * any such value is above `sectors` (< 2^44), so every comparison and
   * difference here is on exact integers and nothing can wrap.
   */
  private inRange(sector: number, count: number): boolean {
    return sector <= this.sectors && count <= this.sectors - sector;
  }

  private segments(r: ChainReader, zeroes: boolean): number {
    const bytes = r.remaining;
    if (bytes === 0 || bytes % SEGMENT !== 0 || bytes / SEGMENT > BLK_MAX_SEGMENTS) return VIRTIO_BLK_S_IOERR;
    const n = bytes / SEGMENT;
    const max = zeroes ? BLK_MAX_WRITE_ZEROES_SECTORS : BLK_MAX_DISCARD_SECTORS;
    let status = VIRTIO_BLK_S_OK;
    for (let i = 0; i < n; i++) {
      const sector = r.readU64(), count = r.readU32(), flags = r.readU32();
      // §5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
      if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0 || (!zeroes && flags !== 0)) return VIRTIO_BLK_S_UNSUPP;
      if (count > max || !this.inRange(sector, count)) status = VIRTIO_BLK_S_IOERR;
      this.segSector[i] = sector;
      this.segCount[i] = count;
      this.segUnmap[i] = flags;
    }
    if (status !== VIRTIO_BLK_S_OK || this.ro) return VIRTIO_BLK_S_IOERR;
    for (let i = 0; i < n; i++) {
      const pos = this.segSector[i]! * SECTOR, len = this.segCount[i]! * SECTOR;
      if (len === 0) continue;
      if (zeroes) this.backing.writeZeroes(pos, len, this.segUnmap[i] !== 0);
      else this.backing.discard(pos, len);
    }
    if (this.writethrough) this.backing.flush();
    return VIRTIO_BLK_S_OK;
  }

  /** Migration state: "BVBK", u16 version 1, u16 flags (bit 0 writethrough), u64 sectors, u32 blk_size, u32 FNV-1a of the rest. */
  saveState(): Uint8Array {
    const b = new Uint8Array(BLK_STATE_BYTES);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, BLK_STATE_MAGIC, true);
    dv.setUint16(4, BLK_STATE_VERSION, true);
    dv.setUint16(6, this.writethrough ? 1 : 0, true);
    dv.setUint32(8, this.sectors % 2 ** 32, true);
    dv.setUint32(12, Math.floor(this.sectors / 2 ** 32), true);
    dv.setUint32(16, new DataView(this.cfg.buffer).getUint32(20, true), true);
    dv.setUint32(20, fnv1a(b.subarray(0, 20)), true);
    return b;
  }

  loadState(data: Uint8Array): void {
    if (data.length !== BLK_STATE_BYTES) throw new RangeError(`virtio-blk state: ${data.length} bytes, expected ${BLK_STATE_BYTES}`);
    const dv = new DataView(data.buffer, data.byteOffset, data.length);
    if (dv.getUint32(0, true) !== BLK_STATE_MAGIC) throw new RangeError("virtio-blk state: bad magic (not a virtio-blk state)");
    const version = dv.getUint16(4, true);
    if (version !== BLK_STATE_VERSION) throw new RangeError(`virtio-blk state: version ${version}, this server reads version ${BLK_STATE_VERSION}`);
    if (dv.getUint32(20, true) !== fnv1a(data.subarray(0, 20))) throw new RangeError("virtio-blk state: checksum mismatch (corrupted)");
    const flags = dv.getUint16(6, true);
    if ((flags & ~1) !== 0) throw new RangeError(`virtio-blk state: unknown flags 0x${flags.toString(16)}`);
    const sectors = dv.getUint32(8, true) + dv.getUint32(12, true) * 2 ** 32;
    if (sectors !== this.sectors) throw new RangeError(`virtio-blk state: capacity ${sectors} sectors, this disk has ${this.sectors}`);
    const blkSize = dv.getUint32(16, true);
    const mine = new DataView(this.cfg.buffer).getUint32(20, true);
    if (blkSize !== mine) throw new RangeError(`virtio-blk state: blk_size ${blkSize}, this disk has ${mine}`);
    this.writethrough = (flags & 1) !== 0;
  }
}

const BLK_STATE_MAGIC = 0x4b425642, BLK_STATE_VERSION = 1, BLK_STATE_BYTES = 24;

function fnv1a(b: Uint8Array): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < b.length; i++) h = Math.imul(h ^ b[i]!, 0x01000193) >>> 0;
  return h;
}

/**
 * A virtio-blk device over `opts.backing`.
 * @example
 * const dev = createBlk({ backing: openFileBacking("disk.raw"), queues: 4 });
 */
export function createBlk(opts: BlkOptions): Device {
  const queues = opts.queues ?? 1, queueSize = opts.queueSize ?? 1024, blockSize = opts.logicalBlockSize ?? 512;
  const serial = opts.serial ?? "bunvhost";
  if (!Number.isInteger(queues) || queues < 1 || queues > 65535) {
    throw new RangeError(`virtio-blk: queues ${queues}: must be an integer in 1..65535`);
  }
  if (!pow2(queueSize, 4, 32768)) throw new RangeError(`virtio-blk: queueSize ${queueSize}: must be a power of two in 4..32768`);
  if (!pow2(blockSize, SECTOR, 65536)) {
    throw new RangeError(`virtio-blk: logicalBlockSize ${blockSize}: must be a power of two in 512..65536`);
  }
  if (!/^[\x20-\x7e]{0,20}$/.test(serial)) {
    throw new RangeError(`virtio-blk: serial ${JSON.stringify(serial)}: must be at most 20 printable ASCII characters`);
  }
  if (opts.backing.size < blockSize) {
    throw new RangeError(`virtio-blk: backing ${opts.backing.name} holds ${opts.backing.size} bytes, less than one ${blockSize}-byte block`);
  }
  const id = new TextEncoder().encode(serial);
  return new Blk(opts.backing, opts.readonly === true || opts.backing.readonly, queues, queueSize, id, blockSize);
}

/** BlkOptions with the backing as plain data: what an I/O thread needs to build its own instance. */
export interface BlkSpec extends Omit<BlkOptions, "backing"> {
  backing: BackingSpec;
}

/**
 * The device factory for threads: every thread that serves queues of this
 * device calls it with the same spec (see shareBacking) and gets its own
 * instance over the same disk.
 * @example const dev = createDevice({ backing: { kind: "null", size: 1 << 30 }, queues: 2 });
 */
export function createDevice(spec: BlkSpec): Device {
  return createBlk({ ...spec, backing: openBacking(spec.backing) });
}

export default createDevice;

/** Command-line options of `bun run server.ts blk` (the default device). */
export const options = {
  image: { type: "string", metavar: "FILE", help: "serve a raw image file or block device" },
  size: { type: "size", help: "serve an in-memory disk of SIZE (default 256M)" },
  null: { type: "size", metavar: "SIZE", help: "serve a null disk of SIZE (reads leave buffers, writes are dropped)" },
  readonly: { type: "boolean", help: "refuse writes (VIRTIO_BLK_F_RO)" },
  direct: { type: "boolean", help: "open --image with O_DIRECT" },
  aio: {
    type: "string", choices: ["auto", "uring", "sync"],
    help: "how --image is read and written: io_uring (many requests in flight per queue without blocking the loop), synchronous syscalls, or auto (default): io_uring, but synchronous for a buffered image on tmpfs/ramfs (memory copies)",
  },
  queues: { type: "number", default: 1, min: 1, max: 256, help: "number of virtqueues" },
  "queue-size": { type: "number", default: 1024, min: 2, max: 32768, help: "largest queue size accepted, a power of 2" },
  serial: { type: "string", default: "bunvhost", metavar: "ID", help: "GET_ID string, at most 20 bytes" },
} satisfies DeviceOptions;

/** Options → the spec every thread's createDevice() gets (a RAM disk allocated once, shared). */
export function prepare(v: OptionValues, ctx: PrepareContext): BlkSpec {
  const image = v.image as string | undefined, size = v.size as number | undefined, nul = v.null as number | undefined;
  if ([image, size, nul].filter((x) => x !== undefined).length > 1) throw new OptionError("give at most one of --image, --size, --null");
  const queueSize = v["queue-size"] as number;
  if (!Number.isInteger(queueSize) || (queueSize & (queueSize - 1)) !== 0) throw new OptionError("--queue-size must be a power of 2");
  if (!Number.isInteger(v.queues)) throw new OptionError("--queues must be an integer");
  const serial = v.serial as string;
  if (new TextEncoder().encode(serial).length > 20) throw new OptionError("--serial must be at most 20 bytes");
  if (v.direct && !image) throw new OptionError("--direct needs --image");
  if (v.aio !== undefined && !image) throw new OptionError("--aio needs --image");
  for (const [name, n] of [["size", size], ["null", nul]] as const) {
    if (n !== undefined && (n <= 0 || n % 512 !== 0)) throw new OptionError(`--${name} must be a positive multiple of 512 bytes`);
  }
  let backing: BackingSpec;
  if (image) {
    const path = resolve(image);
    let aio = (v.aio ?? "auto") as Aio;
    if (aio === "auto") {
      try {
        aio = resolveAioPath(aio, path, v.direct === true);
      } catch {
        // Opening the image fails again in createDevice, with the error the user needs.
      }
    }
    const noUring = aio === "uring" ? uringUnavailable() : null;
    if (noUring !== null) {
      ctx.log.warn(`io_uring unavailable (${noUring}); --image uses synchronous I/O`);
      aio = "sync";
    }
    backing = { kind: "file", path, readonly: v.readonly === true || undefined, direct: v.direct === true, aio };
  } else {
    backing = nul !== undefined ? { kind: "null", size: nul } : { kind: "ram", size: size ?? 256 * 2 ** 20 };
  }
  return { backing: ctx.threads > 0 ? shareBacking(backing) : backing, readonly: v.readonly === true, queues: v.queues as number, queueSize, serial };
}

/** The start message's description of the disk. */
export function describe(spec: BlkSpec): string {
  const b = spec.backing;
  const what = b.kind === "file" ? `image ${b.path}${b.aio === "uring" ? " on io_uring" : ""}` : b.kind === "null" ? `null disk of ${b.size} bytes` : `RAM disk of ${b.size} bytes`;
  return `${what}${spec.readonly ? ", read-only" : ""}`;
}

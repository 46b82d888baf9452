/**
 * BlkDriver: a virtio-blk driver that talks vhost-user directly, so tests and
 * benchmarks can drive any vhost-user-blk back-end without a VM.
 *
 * Theory of operation. `BlkDriver.connect` runs the handshake QEMU runs
 * (GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
 * GET_CONFIG, SET_FEATURES, SET_MEM_TABLE, then per queue SET_VRING_NUM /
 * BASE / ADDR / CALL / KICK and SET_VRING_ENABLE). Each queue has `depth`
 * request slots, preallocated in guest RAM: one page holding the 16-byte
 * request header at its end, then `maxIo` data bytes, then the status byte.
 *
 * A request is `enqueue` (header, data copied in, chain built; nothing
 * visible yet), then `kick` for a whole batch, then `wait`, which reaps used
 * elements and hands each finished slot to `onComplete`. The synchronous
 * helpers (`read`, `write`, `flush`, …) do the three steps for one request
 * and return the virtio status; the used length lands in `lastUsedLen`.
 * ReqOpts shape the chain: data split over several descriptors, an indirect
 * table, the data placed across a guest RAM region boundary, or the compact
 * layout (header and data in one descriptor; data and status in one).
 *
 * Ring layout. By default every queue is split (SplitDriver). With `packed`
 * the driver negotiates VIRTIO_F_RING_PACKED and every queue is a
 * PackedDriver; both implement VirtqDriver, so everything above is the same
 * code for both. What differs is at set-up (SET_VRING_BASE carries the
 * 32-bit packed encoding, SET_VRING_ADDR the descriptor ring and the two
 * event suppression areas) and for hand-made chains: `submitRaw` makes any
 * split chain available (see SplitDriver.pushRaw), `submitRawPacked` any
 * packed one (PackedDriver.pushRaw); both report whether the device used it,
 * timed out, or hung up.
 *
 * Stop and resume: `getVringBase` stops a queue in the back-end; `poll`
 * then reaps what it used, and a new BlkDriver with that `base` continues
 * where the ring stopped (requests still in flight were never seen by the
 * device: submit them again).
 *
 * Spec: VIRTIO 1.2 §5.2 (Block Device), §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues).
 */
import * as sys from "../../ffi/sys.ts";
import { VhostUserFrontend, FrontendError, type FrontendOptions } from "./client.ts";
import type { InflightInfo } from "../protocol/messages.ts";
import { GuestRam, type GuestRamOptions } from "./guest_ram.ts";
import { SplitDriver, type RawDesc, type VirtqDriver } from "./split_driver.ts";
import { PackedDriver, type PackedRawDesc } from "./packed_driver.ts";
import {
  bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_RESET,
} from "../protocol/features.ts";

// Our own copies of the spec constants (VIRTIO 1.2 §5.2): the driver shares no code with the device it tests.
export const VIRTIO_BLK_F_SIZE_MAX = 1, VIRTIO_BLK_F_SEG_MAX = 2, VIRTIO_BLK_F_GEOMETRY = 4, VIRTIO_BLK_F_RO = 5,
  VIRTIO_BLK_F_BLK_SIZE = 6, VIRTIO_BLK_F_FLUSH = 9, VIRTIO_BLK_F_TOPOLOGY = 10, VIRTIO_BLK_F_CONFIG_WCE = 11,
  VIRTIO_BLK_F_MQ = 12, VIRTIO_BLK_F_DISCARD = 13, VIRTIO_BLK_F_WRITE_ZEROES = 14, VIRTIO_BLK_F_LIFETIME = 15,
  VIRTIO_BLK_F_SECURE_ERASE = 16;
export const VIRTIO_BLK_T_IN = 0, VIRTIO_BLK_T_OUT = 1, VIRTIO_BLK_T_FLUSH = 4, VIRTIO_BLK_T_GET_ID = 8,
  VIRTIO_BLK_T_GET_LIFETIME = 10, VIRTIO_BLK_T_DISCARD = 11, VIRTIO_BLK_T_WRITE_ZEROES = 13,
  VIRTIO_BLK_T_SECURE_ERASE = 14;
export const VIRTIO_BLK_S_OK = 0, VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2;
export const VIRTIO_BLK_ID_BYTES = 20;
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const SECTOR_SIZE = 512;
/**
 * SET_VRING_BASE of a packed ring that never ran: position 0 and wrap
 * counter 1 (§2.8.1) for both the avail half (bits 0-15) and the used half
 * (bits 16-31), the vhost-user encoding.
 */
export const PACKED_FRESH_BASE = 0x80008000;

/** Device bits the driver accepts by default: everything it knows how to use or ignore. */
export const BLK_DRIVER_FEATURES = [
  VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
].reduce((m, b) => m | bit(b), 0n);

/** Protocol features the driver uses when offered. */
export const BLK_DRIVER_PROTOCOL_FEATURES = [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG]
  .reduce((m, b) => m | bit(b), 0n);

/** struct virtio_blk_config (§5.2.4); fields past the bytes the device returned read 0. */
export interface BlkConfig {
  /** In 512-byte sectors, whatever blk_size is. */
  capacity: number;
  sizeMax: number;
  segMax: number;
  geometry: { cylinders: number; heads: number; sectors: number };
  blkSize: number;
  physicalBlockExp: number;
  alignmentOffset: number;
  minIoSize: number;
  optIoSize: number;
  writeback: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: number;
  raw: Uint8Array;
}

/** Reads a virtio_blk_config; short input leaves the missing fields 0. */
export function parseBlkConfig(b: Uint8Array): BlkConfig {
  const full = new Uint8Array(64);
  full.set(b.subarray(0, 64));
  const dv = new DataView(full.buffer);
  return {
    capacity: dv.getUint32(0, true) + dv.getUint32(4, true) * 2 ** 32,
    sizeMax: dv.getUint32(8, true),
    segMax: dv.getUint32(12, true),
    geometry: { cylinders: dv.getUint16(16, true), heads: dv.getUint8(18), sectors: dv.getUint8(19) },
    blkSize: dv.getUint32(20, true),
    physicalBlockExp: dv.getUint8(24),
    alignmentOffset: dv.getUint8(25),
    minIoSize: dv.getUint16(26, true),
    optIoSize: dv.getUint32(28, true),
    writeback: dv.getUint8(32),
    numQueues: dv.getUint16(34, true),
    maxDiscardSectors: dv.getUint32(36, true),
    maxDiscardSeg: dv.getUint32(40, true),
    discardSectorAlignment: dv.getUint32(44, true),
    maxWriteZeroesSectors: dv.getUint32(48, true),
    maxWriteZeroesSeg: dv.getUint32(52, true),
    writeZeroesMayUnmap: dv.getUint8(56),
    raw: b,
  };
}

/** One DISCARD / WRITE_ZEROES segment. */
export interface BlkRange {
  sector: number;
  sectors: number;
  flags?: number;
}

/** How to lay out one request's chain. */
export interface ReqOpts {
  queue?: number;
  /** Split the data over this many descriptors, cut at arbitrary bytes (default 1; size_max also cuts). */
  segments?: number;
  /** Put the whole chain in an indirect table. */
  indirect?: boolean;
  /** Place the data across the first region boundary of guest RAM (one such request in flight at a time). */
  cross?: boolean;
  /** One descriptor for header + data (device-readable data) or data + status (device-writable data). */
  compact?: boolean;
  /** Send the 16-byte header as two descriptors of 8. */
  splitHeader?: boolean;
  /** Override the data direction (default: by request type; unknown types are device-writable). */
  writable?: boolean;
  /** Allow more segments than seg_max. */
  ignoreLimits?: boolean;
}

export interface BlkDriverOptions extends FrontendOptions {
  /** Queues to set up (default 1); more than 1 needs VIRTIO_BLK_F_MQ. */
  queues?: number;
  /** Ring size (default 128): a power of 2 for split rings, any of 1..32768 for packed ones. */
  queueSize?: number;
  /**
   * Use packed virtqueues (VIRTIO_F_RING_PACKED) for every queue (default
   * false); fails with FrontendError NOT_OFFERED when the back-end does not offer them.
   */
  packed?: boolean;
  /** Request slots per queue (default min(queueSize, 32)). */
  depth?: number;
  /** Largest data length of a request, bytes (default 128 KiB). */
  maxIo?: number;
  /**
   * Fill device-writable data with 0xA5 before each request (default true), so
   * bytes the device should have written but did not show up; benchmarks turn it off.
   */
  poison?: boolean;
  /** Negotiate EVENT_IDX / INDIRECT_DESC when offered (default true). */
  eventIdx?: boolean;
  indirect?: boolean;
  /** Spin on used.idx instead of sleeping on the call eventfd (default false). */
  polling?: boolean;
  /**
   * Negotiate VIRTIO_F_IN_ORDER (default false); fails with NOT_OFFERED when
   * the back-end does not offer it. The rings then expect buffers used in
   * the order they were made available, possibly one used entry per run.
   */
  inOrder?: boolean;
  /** Negotiate VIRTIO_F_NOTIFICATION_DATA when offered (default false): kicks compute their data (`notifyData`). */
  notificationData?: boolean;
  /** Negotiate VIRTIO_F_RING_RESET when offered (default false), for `resetQueue`. */
  ringReset?: boolean;
  /**
   * Use INFLIGHT_SHMFD (default false; NOT_OFFERED when the back-end lacks
   * it): GET_INFLIGHT_FD once, SET_INFLIGHT_FD at every start, so that
   * `reconnect` to a restarted back-end loses no request.
   */
  inflight?: boolean;
  /** Use REPLY_ACK when offered (default true): every request is acknowledged. */
  replyAck?: boolean;
  /** Device feature bits to accept if offered (default BLK_DRIVER_FEATURES). */
  features?: bigint;
  /** Protocol features to accept if offered (default BLK_DRIVER_PROTOCOL_FEATURES). */
  protocolFeatures?: bigint;
  /** Guest RAM layout (default: sized to fit, two swapped halves). */
  ram?: GuestRamOptions;
  /**
   * Initial ring state (SET_VRING_BASE), one value for every queue or one per
   * queue. Split: the avail index, 0..65535 (default 0). Packed: the 32-bit
   * vhost-user encoding (default PACKED_FRESH_BASE); both halves must be equal,
   * since nothing can be in flight in a ring that starts.
   */
  base?: number | readonly number[];
  /** GET_CONFIG size in bytes (default 60: up to write_zeroes_may_unmap and its padding). */
  configSize?: number;
  /** Stop after GET_CONFIG (no SET_FEATURES, memory or rings); `start()` does the rest. */
  negotiateOnly?: boolean;
}

/** What happened to a raw chain. */
export interface RawResult {
  outcome: "used" | "timeout" | "disconnected";
  /** The chain's head (split) or buffer id (packed). */
  head: number;
  usedLen: number;
  /** The byte at `statusGpa` afterwards, or -1 when none was given. */
  status: number;
}

/** Where and how long a hand-made chain runs. */
export interface RawOpts {
  queue?: number;
  /** A status byte to set to 0xff first and read back afterwards. */
  statusGpa?: number;
  timeoutMs?: number;
}

const NO_OPTS: ReqOpts = {};
const SLOT_FREE = 0, SLOT_BUSY = 1, SLOT_DONE = 2;
/** Status of a request that a reset queue (`resetQueue`) handed back unused: not a virtio-blk status. */
export const RECLAIMED = 0xff;
const RAW_HEAD = -2;
const PAGE = 4096;
const alignUp = (v: number, a: number) => Math.ceil(v / a) * a;

function deviceWritable(type: number): boolean {
  switch (type) {
    case VIRTIO_BLK_T_OUT: case VIRTIO_BLK_T_FLUSH: case VIRTIO_BLK_T_DISCARD: case VIRTIO_BLK_T_WRITE_ZEROES:
    case VIRTIO_BLK_T_SECURE_ERASE:
      return false;
    default:
      return true;
  }
}

export class BlkDriver {
  readonly queues: number;
  readonly queueSize: number;
  readonly depth: number;
  readonly maxIo: number;
  timeoutMs: number;
  deviceFeatures = 0n;
  /** What SET_FEATURES acknowledged. */
  features = 0n;
  deviceProtocolFeatures = 0n;
  protocolFeatures = 0n;
  /** GET_QUEUE_NUM, or -1 without the MQ protocol feature. */
  queueNum = -1;
  config: BlkConfig | null = null;
  ram!: GuestRam;
  /** Packed virtqueues (the `packed` option); otherwise split. */
  readonly packed: boolean;
  /** One driver per queue: SplitDriver or PackedDriver instances (see `packed`). */
  readonly vqs: VirtqDriver[] = [];
  /** Called for each finished request submitted with `enqueue`; the slot is freed when it returns. */
  onComplete: ((slot: number, status: number, usedLen: number) => void) | null = null;
  /** Status and used length of the last synchronous request. */
  lastStatus = -1;
  lastUsedLen = 0;

  private started = false;
  private readonly poison: boolean;
  private readonly o: BlkDriverOptions;
  private sizeMax = 0;
  private segMax = 0;
  private slotPage!: Float64Array; // gpa of each slot's page
  private slotOff!: Float64Array; // u8 offset of each slot's data
  private slotData!: Float64Array; // data gpa of the request in the slot
  private slotLen!: Float64Array;
  private slotState!: Uint8Array;
  private slotSync!: Uint8Array;
  private slotCross!: Uint8Array;
  private slotWritable!: Uint8Array;
  /** Status byte and used length of each finished slot. */
  slotStatus!: Uint8Array;
  slotUsedLen!: Uint32Array;
  private freeSlots!: Int32Array;
  private freeTop!: Int32Array;
  private headSlot!: Int32Array;
  private rawUsed = new Map<number, number>();
  private indirectMax = 0;
  /** The INFLIGHT_SHMFD buffer (fd owned here), kept across reconnects. */
  private inflightFd = -1;
  private inflightInfo: InflightInfo | null = null;
  private crossBusy = false;

  /** Runs the handshake on an open connection (see the file comment); closes nothing on failure. */
  constructor(public fe: VhostUserFrontend, o: BlkDriverOptions = {}) {
    this.o = o;
    this.queues = o.queues ?? 1;
    this.queueSize = o.queueSize ?? 128;
    this.depth = o.depth ?? Math.min(this.queueSize, 32);
    this.maxIo = o.maxIo ?? 128 << 10;
    this.timeoutMs = o.timeoutMs ?? 5000;
    this.poison = o.poison ?? true;
    this.packed = o.packed === true;
    if (this.maxIo % SECTOR_SIZE !== 0 || this.maxIo <= 0) throw new RangeError(`maxIo ${this.maxIo}: a positive multiple of 512`);
    this.negotiate();
    if (!o.negotiateOnly) this.start();
  }

  /**
   * Connects to `path` and runs the whole handshake.
   * @example
   * using d = BlkDriver.connect("/dev/shm/t/blk.sock");
   * const buf = new Uint8Array(4096);
   * d.read(0, buf) === VIRTIO_BLK_S_OK;
   */
  static connect(path: string, o: BlkDriverOptions = {}): BlkDriver {
    const fe = VhostUserFrontend.connect(path, o);
    try {
      return new BlkDriver(fe, o);
    } catch (e) {
      fe.close();
      throw e;
    }
  }

  /** Capacity in 512-byte sectors (0 without CONFIG). */
  get capacity(): number {
    return this.config?.capacity ?? 0;
  }

  has(feature: number): boolean {
    return (this.features & bit(feature)) !== 0n;
  }

  private negotiate(): void {
    const fe = this.fe;
    const o = this.o;
    this.deviceFeatures = fe.getFeatures();
    if (this.deviceFeatures & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      this.deviceProtocolFeatures = fe.getProtocolFeatures();
      let accept = o.protocolFeatures ?? BLK_DRIVER_PROTOCOL_FEATURES;
      if (o.inflight) accept |= bit(ProtocolFeature.INFLIGHT_SHMFD);
      this.protocolFeatures = this.deviceProtocolFeatures & accept;
      fe.setProtocolFeatures(this.protocolFeatures);
      if (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK) && o.replyAck !== false) fe.replyAck = true;
      if (this.protocolFeatures & bit(ProtocolFeature.MQ)) this.queueNum = fe.getQueueNum();
    }
    fe.setOwner();
    if (this.protocolFeatures & bit(ProtocolFeature.CONFIG)) {
      this.config = parseBlkConfig(fe.getConfig(0, o.configSize ?? 60));
    }
  }

  /** SET_FEATURES, memory table and rings (after `negotiateOnly`). */
  start(): void {
    if (this.started) throw new Error("BlkDriver.start: already started");
    this.started = true;
    const o = this.o;
    const fe = this.fe;
    let want = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (o.features ?? BLK_DRIVER_FEATURES);
    if (o.eventIdx !== false) want |= bit(VIRTIO_RING_F_EVENT_IDX);
    if (o.indirect !== false) want |= bit(VIRTIO_RING_F_INDIRECT_DESC);
    if (this.packed) {
      if ((this.deviceFeatures & bit(VIRTIO_F_RING_PACKED)) === 0n) {
        throw new FrontendError("NOT_OFFERED", "VIRTIO_F_RING_PACKED", `the back-end offers 0x${this.deviceFeatures.toString(16)}, without bit ${VIRTIO_F_RING_PACKED}`);
      }
      want |= bit(VIRTIO_F_RING_PACKED);
    }
    if (o.inOrder) {
      if ((this.deviceFeatures & bit(VIRTIO_F_IN_ORDER)) === 0n) {
        throw new FrontendError("NOT_OFFERED", "VIRTIO_F_IN_ORDER", `the back-end offers 0x${this.deviceFeatures.toString(16)}, without bit ${VIRTIO_F_IN_ORDER}`);
      }
      want |= bit(VIRTIO_F_IN_ORDER);
    }
    if (o.notificationData) want |= bit(VIRTIO_F_NOTIFICATION_DATA);
    if (o.ringReset) want |= bit(VIRTIO_F_RING_RESET);
    this.features = this.deviceFeatures & want;
    if (this.queues > 1) {
      const n = this.has(VIRTIO_BLK_F_MQ) ? this.config?.numQueues ?? 0 : 1;
      if (n < this.queues || (this.queueNum >= 0 && this.queueNum < this.queues)) {
        throw new FrontendError("NOT_OFFERED", "queues", `asked ${this.queues}, device has ${n}, GET_QUEUE_NUM ${this.queueNum}`);
      }
    }
    if (this.config !== null) {
      if (this.has(VIRTIO_BLK_F_SIZE_MAX)) this.sizeMax = this.config.sizeMax;
      if (this.has(VIRTIO_BLK_F_SEG_MAX)) this.segMax = this.config.segMax;
    }
    const bases: number[] = [];
    for (let q = 0; q < this.queues; q++) bases.push(this.baseOf(q));
    fe.setFeatures(this.features);
    // After SET_FEATURES, as QEMU does (vhost_dev_prepare_inflight): the back-end sizes the area for the layout.
    if (o.inflight) this.setupInflight();

    const n = this.queueSize;
    const indirectMax = this.has(VIRTIO_RING_F_INDIRECT_DESC) ? Math.min(n, (this.segMax || 126) + 3) : 0;
    this.indirectMax = indirectMax;
    const slotBytes = PAGE + alignUp(this.maxIo + 1, PAGE);
    const perQueue = 32 * n + 2 * PAGE + n * indirectMax * 16 + this.depth * slotBytes;
    const zone = this.maxIo + (64 << 10);
    const half = alignUp(this.queues * perQueue + zone + (2 << 20), 2 << 20);
    this.ram = new GuestRam(o.ram ?? { regions: [{ gpa: half, size: half }, { gpa: 0, size: half }], crossZone: zone });
    try {
      this.allocSlots(slotBytes);
      fe.setMemTable(this.ram.memRegions(), this.ram.fileOrder.map(() => this.ram.fd));
      for (let q = 0; q < this.queues; q++) {
        const base = bases[q]!;
        const ring = this.ringOptions(q, indirectMax);
        // A packed driver starts both halves at one position | wrap (baseOf checked that they are equal).
        const vq: VirtqDriver = this.packed ? new PackedDriver(this.ram, { ...ring, base: base & 0xffff }) : new SplitDriver(this.ram, { ...ring, base });
        this.vqs.push(vq);
        fe.setVringNum(q, n);
        fe.setVringBase(q, vq.vringBase);
        // Packed: availGpa is the driver event suppression area and usedGpa the device one, where
        // vhost-user (and QEMU) put them in SET_VRING_ADDR.
        fe.setVringAddr({
          index: q, flags: 0, desc: this.ram.uva(vq.descGpa), used: this.ram.uva(vq.usedGpa), avail: this.ram.uva(vq.availGpa), log: 0,
        });
        fe.setVringCall(q, vq.callFd);
        fe.setVringKick(q, vq.kickFd);
      }
      if (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
        for (let q = 0; q < this.queues; q++) fe.setVringEnable(q, true);
      }
    } catch (e) {
      this.releaseMemory();
      throw e;
    }
  }

  /** GET_INFLIGHT_FD the first time, then SET_INFLIGHT_FD with the same buffer at every start. */
  private setupInflight(): void {
    if ((this.protocolFeatures & bit(ProtocolFeature.INFLIGHT_SHMFD)) === 0n) {
      throw new FrontendError("NOT_OFFERED", "INFLIGHT_SHMFD", `protocol features 0x${this.deviceProtocolFeatures.toString(16)}`);
    }
    if (this.inflightFd < 0) {
      const { info, fd } = this.fe.getInflightFd(this.queues, this.queueSize);
      if (fd < 0) throw new FrontendError("BAD_REPLY", "GET_INFLIGHT_FD", "no fd");
      this.inflightFd = fd;
      this.inflightInfo = info;
    }
    this.fe.setInflightFd(this.inflightInfo!, this.inflightFd);
  }

  /** Queue `q`'s ring to the back-end: SET_VRING_NUM/BASE/ADDR/CALL/KICK (ENABLE is the caller's). */
  private sendRing(q: number, base: number): void {
    const vq = this.vqs[q]!, fe = this.fe;
    fe.setVringNum(q, vq.size);
    fe.setVringBase(q, base);
    fe.setVringAddr({
      index: q, flags: 0, desc: this.ram.uva(vq.descGpa), used: this.ram.uva(vq.usedGpa), avail: this.ram.uva(vq.availGpa), log: 0,
    });
    fe.setVringCall(q, vq.callFd);
    fe.setVringKick(q, vq.kickFd);
  }

  /**
   * Connects to a back-end that replaced the one we lost (same socket path,
   * e.g. restarted after a crash) and hands it the same state: features,
   * the inflight buffer (`inflight` option), the memory table and every ring
   * where it is. Requests in flight stay in flight: with INFLIGHT_SHMFD the
   * back-end resubmits what the dead one had taken and not completed. The
   * ring base sent is our own view (split: used.idx, as QEMU rewinds;
   * packed: `vringBase`): only the back-end's inflight area knows more.
   * @example
   * const d = BlkDriver.connect(sock, { packed: true, inflight: true });
   * // ... the back-end process dies and is restarted on `sock` ...
   * d.reconnect(sock);
   * d.wait(0); // requests submitted before the crash complete
   */
  reconnect(path: string): void {
    if (!this.started) throw new Error("BlkDriver.reconnect: never started");
    this.fe.close();
    this.fe = VhostUserFrontend.connect(path, this.o);
    this.negotiate();
    this.fe.setFeatures(this.features);
    if (this.o.inflight) this.setupInflight();
    this.fe.setMemTable(this.ram.memRegions(), this.ram.fileOrder.map(() => this.ram.fd));
    for (let q = 0; q < this.queues; q++) {
      const vq = this.vqs[q]!;
      this.sendRing(q, this.packed ? vq.vringBase : (vq as SplitDriver).usedIndex());
    }
    if (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (let q = 0; q < this.queues; q++) this.fe.setVringEnable(q, true);
    }
  }

  /**
   * VIRTIO_F_RING_RESET: resets queue `q` alone while the others run, and
   * starts it again fresh with `size` entries (at most the `queueSize`
   * option) in new ring memory. Over vhost-user: SET_VRING_ENABLE 0,
   * GET_VRING_BASE (the back-end stops the ring, its requests complete and
   * are reaped here), `during()` if given (the ring is stopped), then
   * SET_VRING_NUM/BASE/ADDR/CALL/KICK and SET_VRING_ENABLE 1. Requests the
   * back-end never took are reclaimed: each finishes with status
   * RECLAIMED (0xff, via onComplete). Returns how many were reclaimed.
   */
  resetQueue(q: number, size = this.queueSize, during?: () => void): number {
    if (!this.has(VIRTIO_F_RING_RESET)) throw new FrontendError("NOT_OFFERED", "VIRTIO_F_RING_RESET", "not negotiated (ringReset option)");
    if (!Number.isInteger(size) || size < 1 || size > this.queueSize || (!this.packed && (size & (size - 1)) !== 0)) {
      throw new RangeError(`resetQueue: size ${size} (1..${this.queueSize}${this.packed ? "" : ", a power of 2"})`);
    }
    const fe = this.fe;
    const old = this.vqs[q]!;
    const pf = (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n;
    if (pf) fe.setVringEnable(q, false);
    fe.getVringBase(q);
    // Everything the back-end took is used and published by now: reap it.
    this.poll(q);
    let reclaimed = 0;
    for (let id = 0; id < this.queueSize; id++) {
      const at = q * this.queueSize + id;
      const slot = this.headSlot[at]!;
      if (slot === -1) continue;
      this.headSlot[at] = -1;
      reclaimed++;
      if (slot === RAW_HEAD) continue;
      this.slotStatus[slot] = RECLAIMED;
      this.slotUsedLen[slot] = 0;
      this.slotState[slot] = SLOT_DONE;
      if (this.slotSync[slot] === 0) {
        try {
          this.onComplete?.(slot, RECLAIMED, 0);
        } finally {
          this.releaseSlot(slot);
        }
      }
    }
    during?.();
    old.close();
    const o = this.ringOptions(q, this.indirectMax);
    const vq: VirtqDriver = this.packed ? new PackedDriver(this.ram, { ...o, size }) : new SplitDriver(this.ram, { ...o, size });
    this.vqs[q] = vq;
    this.sendRing(q, vq.vringBase);
    if (pf) fe.setVringEnable(q, true);
    return reclaimed;
  }

  /** Driver options of queue `q`'s ring from the negotiated features. */
  private ringOptions(q: number, indirectMax: number) {
    return {
      size: this.queueSize, index: q, eventIdx: this.has(VIRTIO_RING_F_EVENT_IDX), indirectMax, polling: this.o.polling,
      inOrder: this.has(VIRTIO_F_IN_ORDER), notificationData: this.has(VIRTIO_F_NOTIFICATION_DATA),
    };
  }

  /** The `base` option for queue `q`, checked for the layout. */
  private baseOf(q: number): number {
    const b = this.o.base;
    const v = b === undefined ? undefined : typeof b === "number" ? b : b[q];
    if (!this.packed) {
      if (v === undefined) return 0;
      if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new RangeError(`base ${v} of queue ${q}: a split ring index is 0..65535`);
      return v;
    }
    if (v === undefined) return PACKED_FRESH_BASE;
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new RangeError(`base ${v} of queue ${q}: a packed ring base is a u32`);
    if ((v & 0xffff) !== v >>> 16) {
      throw new RangeError(`base 0x${v.toString(16)} of queue ${q}: avail half 0x${(v & 0xffff).toString(16)} and used half 0x${(v >>> 16).toString(16)} differ (descriptors in flight cannot be resumed)`);
    }
    if ((v & 0x7fff) >= this.queueSize) throw new RangeError(`base 0x${v.toString(16)} of queue ${q}: position ${v & 0x7fff} past the ring size ${this.queueSize}`);
    return v;
  }

  private allocSlots(slotBytes: number): void {
    const total = this.queues * this.depth;
    this.slotPage = new Float64Array(total);
    this.slotOff = new Float64Array(total);
    this.slotData = new Float64Array(total);
    this.slotLen = new Float64Array(total);
    this.slotState = new Uint8Array(total);
    this.slotSync = new Uint8Array(total);
    this.slotCross = new Uint8Array(total);
    this.slotWritable = new Uint8Array(total);
    this.slotStatus = new Uint8Array(total);
    this.slotUsedLen = new Uint32Array(total);
    this.freeSlots = new Int32Array(total);
    this.freeTop = new Int32Array(this.queues);
    this.headSlot = new Int32Array(this.queues * this.queueSize).fill(-1);
    for (let s = 0; s < total; s++) {
      this.slotPage[s] = this.ram.alloc(slotBytes, PAGE);
      this.slotOff[s] = this.ram.offset(this.slotPage[s]! + PAGE, this.maxIo + 1);
    }
    for (let q = 0; q < this.queues; q++) {
      // Pop order 0, 1, 2, … so a serial run reuses slot 0.
      for (let i = 0; i < this.depth; i++) this.freeSlots[q * this.depth + i] = q * this.depth + this.depth - 1 - i;
      this.freeTop[q] = this.depth;
    }
  }

  // ---- requests ------------------------------------------------------------------

  /** Free request slots on queue `q`. */
  freeSlotCount(q = 0): number {
    return this.freeTop[q]!;
  }

  /** Requests enqueued on `q` and not finished. */
  inFlight(q = 0): number {
    return this.depth - this.freeTop[q]!;
  }

  /** The data area of `slot` (maxIo bytes; a request's data starts here unless it crossed or was compact). */
  slotBuffer(slot: number): Uint8Array {
    const off = this.slotOff[slot]!;
    return this.ram.u8.subarray(off, off + this.maxIo);
  }

  /**
   * Builds one request in a free slot of `o.queue` and puts it in the avail
   * ring (visible at the next `kick`). `src` is copied in as the data of a
   * device-readable request. Returns the slot.
   */
  enqueue(type: number, sector: number, len: number, o: ReqOpts = NO_OPTS, src?: Uint8Array | null): number {
    const q = o.queue ?? 0;
    const vq = this.vqs[q];
    if (vq === undefined) throw new RangeError(`queue ${q}: only ${this.vqs.length} set up`);
    if (len < 0 || len > this.maxIo) throw new RangeError(`request of ${len} bytes; maxIo is ${this.maxIo}`);
    if (this.freeTop[q] === 0) throw new FrontendError("QUEUE_FULL", `queue ${q}`, `all ${this.depth} request slots in flight`);
    const writable = o.writable ?? deviceWritable(type);
    const ram = this.ram;
    const slot = this.freeSlots[q * this.depth + this.freeTop[q]! - 1]!;
    const dataBase = this.slotPage[slot]! + PAGE;
    const hdr = dataBase - 16;
    const status = dataBase + this.maxIo;
    const cross = o.cross === true && len > 1;
    const compact = o.compact === true && !cross && len > 0;
    let data = dataBase;
    if (cross) {
      if (this.crossBusy) throw new Error("BlkDriver: a region-crossing request is already in flight");
      // An odd split point: the boundary falls inside a sector.
      data = ram.crossing(len, Math.max(1, (len >>> 1) | 1));
    } else if (compact && writable) {
      data = status - len;
    }

    // Count data descriptors before touching anything.
    const segs = Math.max(1, o.segments ?? 1);
    let nData = 0;
    if (len > 0 && !compact) {
      for (let k = 0; k < segs; k++) {
        const piece = Math.floor((len * (k + 1)) / segs) - Math.floor((len * k) / segs);
        if (piece > 0) nData += this.sizeMax > 0 ? Math.ceil(piece / this.sizeMax) : 1;
      }
      if (this.segMax > 0 && nData > this.segMax && !o.ignoreLimits) {
        throw new RangeError(`${nData} data segments; the device's seg_max is ${this.segMax}`);
      }
    }
    const nDesc = compact && !writable ? 2 : (o.splitHeader ? 2 : 1) + nData + 1;
    const indirect = o.indirect === true;
    if (!vq.canAdd(nDesc, indirect)) {
      throw new FrontendError("QUEUE_FULL", `queue ${q}`, `${nDesc} descriptors${indirect ? " (indirect)" : ""}, ${vq.numFree} free`);
    }

    const u8 = ram.u8;
    const dv = ram.dv;
    const hOff = this.slotOff[slot]! - 16;
    dv.setUint32(hOff, type >>> 0, true);
    dv.setUint32(hOff + 4, 0, true);
    dv.setUint32(hOff + 8, sector >>> 0, true);
    dv.setUint32(hOff + 12, Math.floor(sector / 4294967296), true);
    u8[this.slotOff[slot]! + this.maxIo] = 0xff; // status: a device that never writes it is caught
    if (writable && this.poison && len > 0) {
      if (cross) ram.fill(data, len, 0xa5);
      else u8.fill(0xa5, this.slotOff[slot]! + (data - dataBase), this.slotOff[slot]! + (data - dataBase) + len);
    }
    if (src != null && len > 0) {
      const n = Math.min(src.length, len);
      if (cross) ram.write(data, n === src.length ? src : src.subarray(0, n));
      else u8.set(n === src.length ? src : src.subarray(0, n), this.slotOff[slot]! + (data - dataBase));
    }

    vq.begin(indirect);
    if (compact && !writable) {
      vq.add(hdr, 16 + len, false);
    } else {
      if (o.splitHeader) {
        vq.add(hdr, 8, false);
        vq.add(hdr + 8, 8, false);
      } else {
        vq.add(hdr, 16, false);
      }
      if (len > 0 && !compact) {
        for (let k = 0; k < segs; k++) {
          let at = data + Math.floor((len * k) / segs);
          let piece = Math.floor((len * (k + 1)) / segs) - Math.floor((len * k) / segs);
          while (piece > 0) {
            const n = this.sizeMax > 0 ? Math.min(piece, this.sizeMax) : piece;
            vq.add(at, n, writable);
            at += n;
            piece -= n;
          }
        }
      }
    }
    if (compact && writable) vq.add(data, len + 1, true);
    else vq.add(status, 1, true);
    const head = vq.commit();

    this.freeTop[q]!--;
    this.headSlot[q * this.queueSize + head] = slot;
    this.slotState[slot] = SLOT_BUSY;
    this.slotSync[slot] = 0;
    this.slotData[slot] = data;
    this.slotLen[slot] = len;
    this.slotWritable[slot] = writable ? 1 : 0;
    this.slotCross[slot] = cross ? 1 : 0;
    if (cross) this.crossBusy = true;
    return slot;
  }

  /** Publishes queue `q`'s new requests and notifies the device if it wants it. */
  kick(q = 0): boolean {
    return this.vqs[q]!.kick();
  }

  /** Makes queue `q`'s new requests visible without notifying the device (it finds them when it next looks). */
  publish(q = 0): void {
    this.vqs[q]!.publish();
  }

  private releaseSlot(slot: number): void {
    const q = Math.floor(slot / this.depth);
    this.slotState[slot] = SLOT_FREE;
    if (this.slotCross[slot]) {
      this.slotCross[slot] = 0;
      this.crossBusy = false;
    }
    this.freeSlots[q * this.depth + this.freeTop[q]!] = slot;
    this.freeTop[q]!++;
  }

  /** Takes one used element of queue `q`; false when none is pending. */
  private reapOne(q: number): boolean {
    const vq = this.vqs[q]!;
    if (!vq.reap()) return false;
    const at = q * this.queueSize + vq.usedId;
    const slot = this.headSlot[at]!;
    this.headSlot[at] = -1;
    if (slot === RAW_HEAD) {
      this.rawUsed.set(q * 65536 + vq.usedId, vq.usedLen);
      return true;
    }
    const status = this.ram.u8[this.slotOff[slot]! + this.maxIo]!;
    this.slotStatus[slot] = status;
    this.slotUsedLen[slot] = vq.usedLen;
    this.slotState[slot] = SLOT_DONE;
    if (this.slotSync[slot] === 0) {
      try {
        this.onComplete?.(slot, status, vq.usedLen);
      } finally {
        this.releaseSlot(slot);
      }
    }
    return true;
  }

  /**
   * Reaps what queue `q` has finished, blocking until at least one request
   * is done; returns how many. Throws TIMEOUT, or DISCONNECTED when the
   * back-end hangs up meanwhile.
   */
  wait(q = 0, timeoutMs = this.timeoutMs): number {
    let n = 0;
    while (this.reapOne(q)) n++;
    if (n > 0) return n;
    const vq = this.vqs[q]!;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const r = vq.wait(Math.max(0, deadline - performance.now()), this.fe.fd);
      if (r === "used") {
        while (this.reapOne(q)) n++;
        if (n > 0) return n;
      } else if (r === "timeout") {
        throw new FrontendError("TIMEOUT", `queue ${q}`, `${vq.inFlight} chains in flight, none used within ${timeoutMs} ms`);
      } else if (!this.fe.alive()) {
        throw new FrontendError("DISCONNECTED", `queue ${q}`, "the back-end closed the connection with requests in flight");
      }
    }
  }

  /** Reaps what queue `q` has finished without blocking; returns how many. */
  poll(q = 0): number {
    let n = 0;
    while (this.reapOne(q)) n++;
    return n;
  }

  /** Waits until nothing is in flight on `q`. */
  drain(q = 0): void {
    while (this.vqs[q]!.inFlight > 0) this.wait(q);
  }

  /** Enqueue + kick + wait for this one request; returns the slot (still holding its data). */
  private sync(type: number, sector: number, len: number, o: ReqOpts, src?: Uint8Array | null): number {
    const q = o.queue ?? 0;
    const slot = this.enqueue(type, sector, len, o, src);
    this.slotSync[slot] = 1;
    try {
      this.kick(q);
      while (this.slotState[slot] !== SLOT_DONE) this.wait(q);
    } catch (e) {
      this.slotSync[slot] = 0; // if it ever completes, free it then
      throw e;
    }
    this.lastStatus = this.slotStatus[slot]!;
    this.lastUsedLen = this.slotUsedLen[slot]!;
    return slot;
  }

  /** Copies the data of the request in `slot` (e.g. from `onComplete`) into `out`. */
  slotRead(slot: number, out: Uint8Array): void {
    this.copyOut(slot, out);
  }

  /** Length of the data of the request in `slot`. */
  slotLength(slot: number): number {
    return this.slotLen[slot]!;
  }

  private copyOut(slot: number, out: Uint8Array): void {
    const len = Math.min(out.length, this.slotLen[slot]!);
    const data = this.slotData[slot]!;
    if (this.slotCross[slot]) {
      this.ram.read(data, len === out.length ? out : out.subarray(0, len));
    } else {
      const off = this.ram.offset(data, len);
      out.set(this.ram.u8.subarray(off, off + len));
    }
  }

  /** VIRTIO_BLK_T_IN of `out.length` bytes at `sector` into `out`; returns the status. */
  read(sector: number, out: Uint8Array, o: ReqOpts = NO_OPTS): number {
    const slot = this.sync(VIRTIO_BLK_T_IN, sector, out.length, o);
    this.copyOut(slot, out);
    this.releaseSlot(slot);
    return this.lastStatus;
  }

  /** VIRTIO_BLK_T_OUT of `data` at `sector`; returns the status. */
  write(sector: number, data: Uint8Array, o: ReqOpts = NO_OPTS): number {
    this.releaseSlot(this.sync(VIRTIO_BLK_T_OUT, sector, data.length, o, data));
    return this.lastStatus;
  }

  flush(o: ReqOpts = NO_OPTS): number {
    this.releaseSlot(this.sync(VIRTIO_BLK_T_FLUSH, 0, 0, o));
    return this.lastStatus;
  }

  /** GET_ID: the status and the 20 id bytes (NUL-padded; `id` cut at the first NUL). */
  getId(o: ReqOpts = NO_OPTS): { status: number; id: string; bytes: Uint8Array } {
    const bytes = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    const slot = this.sync(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, o);
    this.copyOut(slot, bytes);
    this.releaseSlot(slot);
    const nul = bytes.indexOf(0);
    return { status: this.lastStatus, id: new TextDecoder().decode(bytes.subarray(0, nul < 0 ? bytes.length : nul)), bytes };
  }

  private ranges(type: number, ranges: BlkRange | BlkRange[], flags: number, o: ReqOpts): number {
    const list = Array.isArray(ranges) ? ranges : [ranges];
    const b = new Uint8Array(16 * list.length);
    const dv = new DataView(b.buffer);
    list.forEach((r, i) => {
      dv.setUint32(16 * i, r.sector >>> 0, true);
      dv.setUint32(16 * i + 4, Math.floor(r.sector / 4294967296), true);
      dv.setUint32(16 * i + 8, r.sectors >>> 0, true);
      dv.setUint32(16 * i + 12, (r.flags ?? flags) >>> 0, true);
    });
    this.releaseSlot(this.sync(type, 0, b.length, o, b));
    return this.lastStatus;
  }

  /** DISCARD of one or more ranges (flags 0 unless a range says otherwise). */
  discard(ranges: BlkRange | BlkRange[], o: ReqOpts = NO_OPTS): number {
    return this.ranges(VIRTIO_BLK_T_DISCARD, ranges, 0, o);
  }

  /** WRITE_ZEROES of one or more ranges, with the UNMAP flag when `unmap`. */
  writeZeroes(ranges: BlkRange | BlkRange[], unmap = false, o: ReqOpts = NO_OPTS): number {
    return this.ranges(VIRTIO_BLK_T_WRITE_ZEROES, ranges, unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0, o);
  }

  /**
   * Any request type: `data` is sent device-readable, or `inLen` bytes are
   * offered device-writable and returned in `data`.
   */
  request(type: number, sector: number, o: ReqOpts & { data?: Uint8Array; inLen?: number } = {}): { status: number; usedLen: number; data: Uint8Array } {
    const writable = o.writable ?? (o.data === undefined);
    const len = o.data?.length ?? o.inLen ?? 0;
    const slot = this.sync(type, sector, len, { ...o, writable }, o.data);
    const data = writable ? new Uint8Array(len) : o.data!;
    if (writable) this.copyOut(slot, data);
    this.releaseSlot(slot);
    return { status: this.lastStatus, usedLen: this.lastUsedLen, data };
  }

  /**
   * Makes a hand-made chain available on split queue `o.queue` (see
   * SplitDriver.pushRaw), kicks, and waits for the device to use it, time
   * out, or hang up.
   */
  submitRaw(descs: RawDesc[], o: RawOpts & { availEntry?: number } = {}): RawResult {
    const q = o.queue ?? 0;
    const vq = this.vqs[q];
    if (!(vq instanceof SplitDriver)) throw new RangeError(`queue ${q} is ${vq ? "packed: use submitRawPacked" : "not set up"}`);
    return this.runRaw(q, vq.pushRaw(descs, o.availEntry), o);
  }

  /**
   * Makes a hand-made chain available on packed queue `o.queue` (see
   * PackedDriver.pushRaw: any flags, ids, stale avail bits, nested tables),
   * kicks, and waits for the device to use it, time out, or hang up.
   */
  submitRawPacked(descs: PackedRawDesc[], o: RawOpts = {}): RawResult {
    const q = o.queue ?? 0;
    const vq = this.vqs[q];
    if (!(vq instanceof PackedDriver)) throw new RangeError(`queue ${q} is ${vq ? "split: use submitRaw" : "not set up"}`);
    return this.runRaw(q, vq.pushRaw(descs), o);
  }

  private runRaw(q: number, head: number, o: RawOpts): RawResult {
    const vq = this.vqs[q]!;
    this.headSlot[q * this.queueSize + head] = RAW_HEAD;
    if (o.statusGpa !== undefined) this.ram.fill(o.statusGpa, 1, 0xff);
    const key = q * 65536 + head;
    const result = (outcome: RawResult["outcome"]): RawResult => {
      const usedLen = this.rawUsed.get(key) ?? 0;
      this.rawUsed.delete(key);
      const status = o.statusGpa === undefined ? -1 : this.ram.read(o.statusGpa, new Uint8Array(1))[0]!;
      return { outcome, head, usedLen, status };
    };
    try {
      vq.kick(true);
    } catch (e) {
      return result("disconnected");
    }
    const deadline = performance.now() + (o.timeoutMs ?? this.timeoutMs);
    for (;;) {
      while (this.reapOne(q)) { /* records raw heads in rawUsed */ }
      if (this.rawUsed.has(key)) return result("used");
      const left = deadline - performance.now();
      if (left <= 0) return result("timeout");
      const r = vq.wait(left, this.fe.fd);
      if (r === "socket" && !this.fe.alive()) return result("disconnected");
    }
  }

  /**
   * GET_VRING_BASE: stops queue `q` in the back-end and returns its state:
   * split, its next avail index; packed, the 32-bit encoding of its positions
   * and wrap counters (see PACKED_FRESH_BASE).
   */
  getVringBase(q = 0): number {
    return this.fe.getVringBase(q);
  }

  private releaseMemory(): void {
    for (const vq of this.vqs) vq.close();
    this.vqs.length = 0;
    this.ram?.close();
  }

  /** Disconnects and frees everything. Idempotent. */
  close(): void {
    this.fe.close();
    sys.closeQuiet(this.inflightFd);
    this.inflightFd = -1;
    this.releaseMemory();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

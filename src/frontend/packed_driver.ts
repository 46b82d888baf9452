/**
 * The driver side of a packed virtqueue (VIRTIO 1.2 §2.8), in GuestRam.
 *
 * Theory of operation. The descriptor ring (16-aligned), the driver event
 * suppression area and the device event suppression area (4 bytes each) are
 * allocated back to back. Ring positions are used strictly in order: a chain
 * of k descriptors takes the next k positions, and the device's used
 * descriptor for it lands wherever the device's own position is then, so
 * freeing is per buffer id: each id remembers how many ring descriptors its
 * chain took (shadow arrays, never read back from guest memory), and `reap`
 * skips that many. Free ids are a stack; each id owns a preallocated indirect
 * table of `indirectMax` entries.
 *
 * Submitting is `begin` / `add`… / `commit` per chain, then one `kick` per
 * batch, as with SplitDriver. `commit` writes every descriptor of the chain
 * with the avail bits of its position; the flags of the first descriptor of
 * the oldest chain not yet published are held back and stored by `publish`
 * (called by `kick`), so a batch becomes visible at once (§2.8.21.1: the
 * device polls one position and finds nothing until that store). `kick` then
 * reads the device event suppression area (§2.8.21.2): DISABLE no
 * notification, DESC (with EVENT_IDX) only if the batch passed the named
 * position, otherwise a notification.
 *
 * Completions are taken with `reap` (one used descriptor per call, into
 * `usedId`/`usedLen`), in the order the device wrote them, whatever order the
 * ids were submitted in. The driver event suppression area says what we want:
 * DESC naming our next used position (EVENT_IDX), ENABLE, or DISABLE when
 * polling. `wait` blocks on the call eventfd, or spins in polling mode.
 *
 * Ordering: the first descriptor's flags are stored with Atomics.store after
 * everything else of the batch (§2.8.21.1.1); used flags are read with
 * Atomics.load before the id and length (pairs with the device's store).
 *
 * For hostile tests `pushRaw` writes a chain exactly as described (any
 * flags, any id, stale avail bits, nested tables).
 */
import * as sys from "../../ffi/sys.ts";
import { FrontendError } from "./client.ts";
import type { GuestRam } from "./guest_ram.ts";
import type { VirtqDriver } from "./split_driver.ts";
import { CallWait, type WaitResult } from "./call_wait.ts";

// Our own copies of the spec constants (§2.8): the driver shares no code with the device it tests.
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
export const RING_EVENT_FLAGS_DESC = 2;
const PACKED_MAX_QUEUE_SIZE = 32768;

/**
 * §2.8.10: were the `count` positions just before (`pos`, `wrap`) passing
 * over the position `offWrap` names (offset | wrap counter << 15)? Counts how
 * many steps back from `pos` the named position lies (1 = the one just
 * written); a count of two laps or more, or an offset past the ring, says yes.
 * @example eventPassed(8, 0x8000 | 6, 1, 0, 3) // true: 6 and 7 of lap 1, then 0 of lap 0
 */
export function eventPassed(size: number, offWrap: number, pos: number, wrap: number, count: number): boolean {
  const off = offWrap & 0x7fff, w = offWrap >>> 15;
  if (off >= size || count >= 2 * size) return true;
  let back: number;
  if (off < pos) back = pos - off + (w === wrap ? 0 : size); // this lap, or the one before the last
  else back = pos + size - off + (w !== wrap ? 0 : size); // the last lap, or the one before
  return back >= 1 && back <= count;
}

const DESC_SIZE = 16;

/** One packed descriptor (§2.8.13), for hand-placed indirect tables. */
export interface PackedDesc {
  addr: number;
  len: number;
  id?: number;
  flags: number;
}

/**
 * Encodes packed descriptors as a table (16 bytes each: addr, len, id, flags).
 * @example encodePackedDescs([{ addr: 0x1000, len: 16, flags: 0 }]).length === 16
 */
export function encodePackedDescs(descs: PackedDesc[]): Uint8Array {
  const b = new Uint8Array(descs.length * DESC_SIZE);
  const dv = new DataView(b.buffer);
  descs.forEach((d, i) => {
    dv.setUint32(i * 16, d.addr >>> 0, true);
    dv.setUint32(i * 16 + 4, Math.floor(d.addr / 2 ** 32), true);
    dv.setUint32(i * 16 + 8, d.len >>> 0, true);
    dv.setUint16(i * 16 + 12, d.id ?? 0, true);
    dv.setUint16(i * 16 + 14, d.flags, true);
  });
  return b;
}

/** One descriptor of a hand-made chain (`pushRaw`). */
export interface PackedRawDesc {
  /** Guest physical address (for a `table`: defaults to the id's table). */
  addr?: number;
  /** Byte length (for a `table`: defaults to 16 × entries). */
  len?: number;
  /** WRITE / INDIRECT / NEXT as given; NEXT is added to all but the last unless `noAutoNext`. */
  flags?: number;
  noAutoNext?: boolean;
  /** Buffer id written in this descriptor (default: the id allocated for the chain). */
  id?: number;
  /** Write the AVAIL/USED bits of the previous lap (the device must not take it as available). */
  stale?: boolean;
  /** Entries of an indirect table written for this descriptor (sets INDIRECT, addr, len unless given); written exactly as given. */
  table?: PackedRawDesc[];
}

export interface PackedDriverOptions {
  /** Queue size: 1..32768, any value (§2.8.10.1). */
  size: number;
  /** Queue index (for messages). */
  index?: number;
  /** Use RING_EVENT_FLAGS_DESC both ways (VIRTIO_F_RING_EVENT_IDX negotiated). */
  eventIdx?: boolean;
  /** Entries of each buffer id's indirect table; 0 allocates none (default 0). */
  indirectMax?: number;
  /**
   * Where both sides start: position | wrap counter << 15, i.e. one half of
   * the vhost-user packed base (default 0x8000: position 0, counter 1).
   * SET_VRING_BASE then carries `vringBase`.
   */
  base?: number;
  /** Spin on the ring instead of sleeping on the call eventfd; asks the device not to interrupt. */
  polling?: boolean;
  /** VIRTIO_F_IN_ORDER negotiated: one used descriptor may stand for a run of buffers (`reap` expands it). */
  inOrder?: boolean;
  /** VIRTIO_F_NOTIFICATION_DATA negotiated: each kick computes `notifyData`. */
  notificationData?: boolean;
}


/**
 * The driver side of one packed virtqueue, with SplitDriver's surface
 * (begin/add/commit, publish/kick, reap/pending/wait, pushRaw, close).
 * @example
 * const vq = new PackedDriver(ram, { size: 100, eventIdx: true, indirectMax: 8 });
 * fe.setVringNum(0, vq.size);
 * fe.setVringBase(0, vq.vringBase);        // 0x80008000 for a fresh ring
 * fe.setVringAddr({ index: 0, flags: 0, desc: ram.uva(vq.descGpa), avail: ram.uva(vq.driverGpa), used: ram.uva(vq.deviceGpa), log: 0 });
 * vq.begin(); vq.add(hdr, 16, false); vq.add(status, 1, true); const id = vq.commit();
 * vq.kick();
 * while (vq.wait(1000) === "used" && vq.reap()) console.log(vq.usedId, vq.usedLen);
 */
export class PackedDriver implements VirtqDriver {
  readonly size: number;
  readonly index: number;
  readonly eventIdx: boolean;
  readonly polling: boolean;
  readonly indirectMax: number;
  readonly inOrder: boolean;
  readonly notificationData: boolean;
  /** The value of the last notification (VIRTIO_F_NOTIFICATION_DATA), -1 before; see SplitDriver.notifyData. */
  notifyData = -1;
  /** Descriptor ring; SET_VRING_ADDR `desc`. */
  readonly descGpa: number;
  /** Driver event suppression area; SET_VRING_ADDR `avail` (QEMU passes the driver area there). */
  readonly driverGpa: number;
  /** Device event suppression area; SET_VRING_ADDR `used`. */
  readonly deviceGpa: number;
  /** Start of the indirect tables (id i's table is at + i × indirectMax × 16); -1 when none. */
  readonly indirectGpa: number;
  /** Eventfds we own: we write kick, the device writes call. */
  readonly kickFd: number;
  readonly callFd: number;

  /** Set by `reap`: the used descriptor just taken (len is 0 unless the device set WRITE, §2.8.4). */
  usedId = 0;
  usedLen = 0;
  /** Notifications sent and interrupts received (for benchmarks). */
  kicks = 0;
  /** Used entries read from the ring (fewer than buffers reaped when in-order runs are batched). */
  usedEntries = 0;
  /** Call eventfd signals consumed while waiting. */
  get calls(): number {
    return this.waiter.calls;
  }
  /** Free ring positions (descriptors not in flight). */
  numFree: number;

  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly desc32: number; // u32 index of descriptor 0
  private readonly drv32: number; // u32 index of the driver area
  private readonly dev32: number; // u32 index of the device area
  private readonly ind32: number; // u32 index of id 0's indirect table
  private nextAvail: number;
  private availWrap: number;
  private nextUsed: number;
  private usedWrap: number;
  /** Descriptors made available since the last kick (for the event test). */
  private sinceKick = 0;
  private readonly freeIds: Uint16Array;
  private freeTop: number;
  private busyCount = 0;
  private readonly count: Uint16Array;
  private readonly busy: Uint8Array;
  // The open chain.
  private cId = -1;
  private cN = 0;
  private cIndirect = false;
  private cPos = 0;
  private cWrap = 0;
  private cFirstAt = 0; // u16 index of the first descriptor's flags
  private cFirstFlags = 0;
  private cPrevAt = -1; // u16 index of the previous descriptor's flags
  // The first flags of the oldest chain not yet published (-1: none).
  private pubAt = -1;
  private pubFlags = 0;
  private cW = 0;
  /** Device-writable bytes of each buffer in flight (a run's skipped buffers were written whole). */
  private readonly wlen: Uint32Array;
  /** In order: buffer ids in the order they were made available (a circle), and each id's sequence number. */
  private readonly fifo: Uint16Array;
  private fifoHead = 0;
  private readonly seqOf: Float64Array;
  private nextSeq = 0;
  private headSeq = 0;
  /** In order: sequence number of the last buffer of the run being reaped (-1: none) and its length. */
  private runEnd = -1;
  private runLen = 0;
  private readonly waiter: CallWait;
  private closed = false;

  constructor(readonly ram: GuestRam, o: PackedDriverOptions) {
    const n = o.size;
    if (!Number.isInteger(n) || n < 1 || n > PACKED_MAX_QUEUE_SIZE) throw new RangeError(`queue size ${n}: not in 1..32768`);
    const base = o.base ?? 0x8000;
    if (!Number.isInteger(base) || base < 0 || base > 0xffff || (base & 0x7fff) >= n) {
      throw new RangeError(`base 0x${base.toString(16)}: position | wrap << 15 with position < ${n}`);
    }
    this.size = n;
    this.index = o.index ?? 0;
    this.eventIdx = o.eventIdx ?? false;
    this.polling = o.polling ?? false;
    this.indirectMax = o.indirectMax ?? 0;
    this.inOrder = o.inOrder ?? false;
    this.notificationData = o.notificationData ?? false;
    this.wlen = new Uint32Array(n);
    this.fifo = new Uint16Array(n);
    this.seqOf = new Float64Array(n);
    this.nextAvail = this.nextUsed = base & 0x7fff;
    this.availWrap = this.usedWrap = base >>> 15;

    // §2.8.10.1: descriptor ring 16-aligned, both event suppression areas 4-aligned.
    const total = DESC_SIZE * n + 8;
    this.descGpa = ram.alloc(total, 16);
    this.driverGpa = this.descGpa + DESC_SIZE * n;
    this.deviceGpa = this.driverGpa + 4;
    const off = ram.offset(this.descGpa, total);
    // §2.8.13: "The descriptor ring is zero-initialized."
    ram.u8.fill(0, off, off + total);
    this.u16 = new Uint16Array(ram.u8.buffer, ram.u8.byteOffset, ram.size >>> 1);
    this.u32 = new Uint32Array(ram.u8.buffer, ram.u8.byteOffset, ram.size >>> 2);
    this.desc32 = off >>> 2;
    this.drv32 = this.desc32 + 4 * n;
    this.dev32 = this.drv32 + 1;
    if (this.indirectMax > 0) {
      const t = n * this.indirectMax * DESC_SIZE;
      this.indirectGpa = ram.alloc(t, 16);
      this.ind32 = ram.offset(this.indirectGpa, t) >>> 2;
    } else {
      this.indirectGpa = -1;
      this.ind32 = 0;
    }
    this.writeDriverEvent();

    this.freeIds = new Uint16Array(n);
    // Pop order 0, 1, 2, …
    for (let i = 0; i < n; i++) this.freeIds[i] = n - 1 - i;
    this.freeTop = n;
    this.numFree = n;
    this.count = new Uint16Array(n);
    this.busy = new Uint8Array(n);
    this.kickFd = sys.eventfd();
    try {
      this.callFd = sys.eventfd();
    } catch (e) {
      sys.closeQuiet(this.kickFd);
      throw e;
    }
    this.waiter = new CallWait(this.callFd, this.polling, () => this.ready());
  }

  /** SET_VRING_ADDR `avail` for a packed ring: the driver area. */
  get availGpa(): number {
    return this.driverGpa;
  }

  /** SET_VRING_ADDR `used` for a packed ring: the device area. */
  get usedGpa(): number {
    return this.deviceGpa;
  }

  /** Next position to make available | driver wrap counter << 15. */
  get availIndex(): number {
    return this.nextAvail | (this.availWrap << 15);
  }

  /** Next position to reap a used descriptor at | used wrap counter << 15. */
  get lastUsedIndex(): number {
    return this.nextUsed | (this.usedWrap << 15);
  }

  /**
   * The SET_VRING_BASE `num` matching this driver's state (vhost-user
   * "descriptor indices for packed virtqueues"); equal to the device's
   * GET_VRING_BASE once everything made available was used and reaped.
   */
  get vringBase(): number {
    return (this.availIndex | (this.lastUsedIndex << 16)) >>> 0;
  }

  /** Buffers (chains) made available and not yet reaped. */
  get inFlight(): number {
    return this.busyCount;
  }

  /** The device event suppression area as it is now (tests). */
  deviceEvent(): { flags: number; offWrap: number } {
    const v = Atomics.load(this.u32, this.dev32);
    return { flags: v >>> 16, offWrap: v & 0xffff };
  }

  /** The driver event suppression area as it is now (tests). */
  driverEvent(): { flags: number; offWrap: number } {
    const v = Atomics.load(this.u32, this.drv32);
    return { flags: v >>> 16, offWrap: v & 0xffff };
  }

  /** Overwrites the driver area (hostile tests; the next `reap` writes it back under EVENT_IDX). */
  setDriverEvent(flags: number, offWrap: number): void {
    Atomics.store(this.u32, this.drv32, ((offWrap & 0xffff) | ((flags & 0xffff) << 16)) >>> 0);
  }

  /** Our wish for used buffer notifications, in one 32-bit store (the device reads both halves at once). */
  private writeDriverEvent(): void {
    let v: number;
    if (this.polling) v = RING_EVENT_FLAGS_DISABLE << 16;
    else if (this.eventIdx) v = (RING_EVENT_FLAGS_DESC << 16) | this.nextUsed | (this.usedWrap << 15);
    else v = RING_EVENT_FLAGS_ENABLE << 16;
    Atomics.store(this.u32, this.drv32, v >>> 0);
  }

  // ---- descriptors -------------------------------------------------------------

  private putDesc(at32: number, addr: number, len: number, id: number): void {
    const u32 = this.u32;
    u32[at32] = addr >>> 0;
    u32[at32 + 1] = Math.floor(addr / 4294967296);
    u32[at32 + 2] = len >>> 0;
    this.u16[2 * at32 + 6] = id;
  }

  /** §2.8.1: AVAIL = wrap counter, USED = its inverse. */
  private static availBits(wrap: number): number {
    return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
  }

  /** Gpa of buffer id `i`'s indirect table. */
  tableGpa(i: number): number {
    if (this.indirectMax === 0) throw new RangeError("this queue has no indirect tables (indirectMax 0)");
    return this.indirectGpa + i * this.indirectMax * DESC_SIZE;
  }

  /** Whether a chain of `n` buffers fits now. */
  canAdd(n: number, indirect = false): boolean {
    return indirect ? this.numFree >= 1 && n <= this.indirectMax : this.numFree >= n;
  }

  /** Starts a chain; buffers follow with `add`, then `commit`. */
  begin(indirect = false): void {
    if (this.cId >= 0) throw new Error(`queue ${this.index}: begin() while a chain is open`);
    if (this.numFree === 0) throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, "no free descriptor");
    if (indirect && this.indirectMax === 0) throw new RangeError(`queue ${this.index}: no indirect tables`);
    // Ids in flight ≤ descriptors in flight < size, so one is free.
    this.cId = this.freeIds[--this.freeTop]!;
    this.cN = 0;
    this.cIndirect = indirect;
    this.cW = 0;
    this.cPos = this.nextAvail;
    this.cWrap = this.availWrap;
    this.cPrevAt = -1;
  }

  /** Appends a buffer to the open chain: device-readable, or device-writable when `writable`. */
  add(gpa: number, len: number, writable: boolean): void {
    if (this.cId < 0) throw new Error(`queue ${this.index}: add() without begin()`);
    const w = writable ? VIRTQ_DESC_F_WRITE : 0;
    if (writable) this.cW += len;
    if (this.cIndirect) {
      if (this.cN >= this.indirectMax) {
        this.abort();
        throw new RangeError(`queue ${this.index}: more than ${this.indirectMax} buffers in an indirect chain`);
      }
      // §2.8.7: in a table only WRITE counts; ids are reserved (we write the buffer id anyway).
      const t32 = this.ind32 + (this.cId * this.indirectMax + this.cN) * 4;
      this.putDesc(t32, gpa, len, this.cId);
      this.u16[2 * t32 + 7] = w;
    } else {
      if (this.cN >= this.numFree) {
        this.abort();
        throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, `chain needs more than ${this.numFree} free descriptors`);
      }
      const at32 = this.desc32 + this.cPos * 4;
      const flags = w | PackedDriver.availBits(this.cWrap);
      if (this.cN === 1) this.cFirstFlags |= VIRTQ_DESC_F_NEXT;
      else if (this.cN > 1) this.u16[this.cPrevAt]! |= VIRTQ_DESC_F_NEXT;
      // §2.8.6: the buffer id belongs in the last descriptor; every descriptor gets it (harmless).
      this.putDesc(at32, gpa, len, this.cId);
      if (this.cN === 0) {
        this.cFirstAt = 2 * at32 + 7;
        this.cFirstFlags = flags;
      } else {
        // Invisible until the first descriptor's flags are stored.
        this.u16[2 * at32 + 7] = flags;
      }
      this.cPrevAt = 2 * at32 + 7;
      if (++this.cPos === this.size) {
        this.cPos = 0;
        this.cWrap ^= 1;
      }
    }
    this.cN++;
  }

  /** Drops the open chain (nothing was made available). */
  abort(): void {
    if (this.cId < 0) return;
    this.freeIds[this.freeTop++] = this.cId;
    this.cId = -1;
  }

  /** Closes the chain; it becomes visible at the next `publish`/`kick`. Returns its buffer id. */
  commit(): number {
    const id = this.cId;
    if (id < 0 || this.cN === 0) throw new Error(`queue ${this.index}: commit() without buffers`);
    let ringN = this.cN;
    if (this.cIndirect) {
      const at32 = this.desc32 + this.nextAvail * 4;
      this.putDesc(at32, this.tableGpa(id), this.cN * DESC_SIZE, id);
      this.cFirstAt = 2 * at32 + 7;
      this.cFirstFlags = VIRTQ_DESC_F_INDIRECT | PackedDriver.availBits(this.availWrap);
      this.cPos = this.nextAvail + 1;
      this.cWrap = this.availWrap;
      if (this.cPos === this.size) {
        this.cPos = 0;
        this.cWrap ^= 1;
      }
      ringN = 1;
    }
    this.cId = -1;
    this.wlen[id] = this.cW;
    this.take(id, ringN);
    return id;
  }

  /** Bookkeeping for a chain of `ringN` ring descriptors ending before cPos/cWrap, and its first flags. */
  private take(id: number, ringN: number): void {
    this.count[id] = ringN;
    this.busy[id] = 1;
    // In order: ids come back in this order (busyCount ≤ size, so the circle never overflows).
    let at = this.fifoHead + this.busyCount;
    if (at >= this.size) at -= this.size;
    this.fifo[at] = id;
    this.seqOf[id] = this.nextSeq++;
    this.busyCount++;
    this.numFree -= ringN;
    this.sinceKick += ringN;
    if (this.pubAt < 0) {
      this.pubAt = this.cFirstAt;
      this.pubFlags = this.cFirstFlags;
    } else {
      // Behind an unpublished first descriptor: the device cannot reach it yet.
      this.u16[this.cFirstAt] = this.cFirstFlags;
    }
    this.nextAvail = this.cPos;
    this.availWrap = this.cWrap;
  }

  // ---- raw chains (hostile tests) --------------------------------------------------------

  /**
   * Writes `descs` at the next ring positions exactly as described (visible
   * at the next `publish`/`kick`) and returns the buffer id allocated for it.
   * It counts as in flight, `descs.length` positions long, until the device
   * uses that id.
   */
  pushRaw(descs: PackedRawDesc[]): number {
    const n = descs.length;
    if (n === 0) throw new RangeError("pushRaw: empty chain");
    if (this.cId >= 0) throw new Error(`queue ${this.index}: pushRaw() while a chain is open`);
    if (n > this.numFree) throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, `raw chain of ${n} > ${this.numFree} free`);
    for (const d of descs) {
      if (d.table !== undefined && d.table.length > this.indirectMax) {
        throw new RangeError(`pushRaw: table of ${d.table.length} > indirectMax ${this.indirectMax}; place it yourself (encodePackedDescs)`);
      }
    }
    const id = this.freeIds[--this.freeTop]!;
    this.cPos = this.nextAvail;
    this.cWrap = this.availWrap;
    for (let k = 0; k < n; k++) {
      const d = descs[k]!;
      let flags = d.flags ?? 0;
      let addr = d.addr ?? 0;
      let len = d.len ?? 0;
      if (d.table !== undefined) {
        const t = d.table;
        const t32 = this.ind32 + id * this.indirectMax * 4;
        t.forEach((e, m) => {
          this.putDesc(t32 + m * 4, e.addr ?? 0, e.len ?? 0, e.id ?? id);
          this.u16[2 * (t32 + m * 4) + 7] = e.flags ?? 0;
        });
        if (d.addr === undefined) addr = this.tableGpa(id);
        if (d.len === undefined) len = t.length * DESC_SIZE;
        flags |= VIRTQ_DESC_F_INDIRECT;
      }
      if (k < n - 1 && !d.noAutoNext) flags |= VIRTQ_DESC_F_NEXT;
      flags = (flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | PackedDriver.availBits(d.stale ? this.cWrap ^ 1 : this.cWrap);
      const at32 = this.desc32 + this.cPos * 4;
      this.putDesc(at32, addr, len, d.id ?? id);
      if (k === 0) {
        this.cFirstAt = 2 * at32 + 7;
        this.cFirstFlags = flags;
      } else {
        this.u16[2 * at32 + 7] = flags;
      }
      if (++this.cPos === this.size) {
        this.cPos = 0;
        this.cWrap ^= 1;
      }
    }
    this.take(id, n);
    return id;
  }

  // ---- notify ----------------------------------------------------------------------

  /** Makes every committed chain visible (stores the held-back first flags). */
  publish(): void {
    if (this.pubAt < 0) return;
    // Release: every descriptor of the batch is written before this store (§2.8.21.1.1).
    Atomics.store(this.u16, this.pubAt, this.pubFlags);
    this.pubAt = -1;
  }

  /**
   * Publishes and notifies the device unless it asked not to be (§2.8.21.2:
   * DISABLE; under EVENT_IDX, DESC naming a position this batch did not
   * pass). Returns whether it kicked.
   */
  kick(force = false): boolean {
    this.publish();
    // The seq-cst store in publish and this seq-cst load are the barrier §2.8.21.3.1 asks for
    // (pairs with the device's store to its area before re-checking the ring).
    const e = Atomics.load(this.u32, this.dev32);
    const flags = (e >>> 16) & 3;
    let need: boolean;
    if (this.sinceKick === 0 || flags === RING_EVENT_FLAGS_DISABLE) need = false;
    else if (flags === RING_EVENT_FLAGS_DESC && this.eventIdx) need = eventPassed(this.size, e & 0xffff, this.nextAvail, this.availWrap, this.sinceKick);
    else need = true;
    this.sinceKick = 0;
    if (!need && !force) return false;
    // §2.9 (packed): vqn | next position << 16 | driver wrap counter << 31 (see notifyData).
    if (this.notificationData) this.notifyData = ((this.availIndex << 16) | this.index) >>> 0;
    sys.eventfdWrite(this.kickFd, 1);
    this.kicks++;
    return true;
  }

  // ---- completions -----------------------------------------------------------------

  /** §2.8.1: used = AVAIL and USED both equal to the wrap counter. */
  private usedAt(pos: number, wrap: number): boolean {
    // Acquire: the id and length are read after the flags (pairs with the device's release store).
    const f = Atomics.load(this.u16, 2 * (this.desc32 + pos * 4) + 7);
    return ((f >>> 7) & 1) === wrap && ((f >>> 15) & 1) === wrap;
  }

  /** Used descriptors the device has published and we have not reaped. */
  pending(): number {
    if (this.runEnd >= 0) return this.runEnd - this.headSeq + 1; // the rest of an in-order run (at least)
    let pos = this.nextUsed, wrap = this.usedWrap, left = this.size - this.numFree, k = 0;
    while (left > 0 && this.usedAt(pos, wrap)) {
      const id = this.u16[2 * (this.desc32 + pos * 4) + 6]!;
      if (id >= this.size || this.busy[id] === 0) break; // reap() reports it
      k++;
      left -= this.count[id]!;
      pos += this.count[id]!;
      if (pos >= this.size) {
        pos -= this.size;
        wrap ^= 1;
      }
    }
    return k;
  }

  /**
   * Takes one used descriptor into `usedId`/`usedLen` and frees its chain;
   * false when there is none. Throws BAD_USED for an id that is not a buffer
   * in flight (the device broke the ring rules).
   */
  reap(): boolean {
    if (this.numFree === this.size) return false; // nothing in flight: the ring holds only stale entries
    let id: number, len: number;
    if (this.runEnd >= 0) {
      // Inside an in-order run: the ring at nextUsed is stale, the order says which buffer it is.
      id = this.fifo[this.fifoHead]!;
      if (this.headSeq === this.runEnd) {
        len = this.runLen;
        this.runEnd = -1;
      } else {
        len = this.wlen[id]!;
      }
    } else {
      if (!this.usedAt(this.nextUsed, this.usedWrap)) return false;
      const at32 = this.desc32 + this.nextUsed * 4;
      const flags = this.u16[2 * at32 + 7]!;
      id = this.u16[2 * at32 + 6]!;
      this.usedEntries++;
      if (id >= this.size || this.busy[id] === 0) {
        throw new FrontendError("BAD_USED", `queue ${this.index}`, `used descriptor at ${this.nextUsed}: id ${id} is not a buffer in flight`);
      }
      // §2.8.4: "Element Length is reserved for used descriptors without the VIRTQ_DESC_F_WRITE flag".
      len = flags & VIRTQ_DESC_F_WRITE ? this.u32[at32 + 2]! : 0;
      if (this.inOrder) {
        const expect = this.fifo[this.fifoHead]!;
        if (id !== expect) {
          // §2.8 in-order: the id of a later buffer ends a run that starts with the oldest one.
          this.runEnd = this.seqOf[id]!;
          this.runLen = len;
          id = expect;
          len = this.wlen[id]!;
        }
      }
    }
    if (this.inOrder) {
      if (++this.fifoHead === this.size) this.fifoHead = 0;
      this.headSeq++;
    }
    const n = this.count[id]!;
    this.busy[id] = 0;
    this.busyCount--;
    this.freeIds[this.freeTop++] = id;
    this.numFree += n;
    let p = this.nextUsed + n;
    if (p >= this.size) {
      p -= this.size;
      this.usedWrap ^= 1;
    }
    this.nextUsed = p;
    this.usedId = id;
    this.usedLen = len;
    if (this.eventIdx && !this.polling) this.writeDriverEvent();
    return true;
  }

  /** Waits until a used buffer is there to reap (see CallWait): "used", "timeout" or "socket". */
  wait(timeoutMs: number, watchFd = -1): WaitResult {
    return this.waiter.wait(timeoutMs, watchFd);
  }

  /** Whether the next used descriptor is there (cheaper than `pending`). */
  private ready(): boolean {
    return this.numFree !== this.size && (this.runEnd >= 0 || this.usedAt(this.nextUsed, this.usedWrap));
  }

  /** Closes the eventfds (the back-end keeps its own copies). The ring stays in `ram`. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.closeQuiet(this.kickFd);
    sys.closeQuiet(this.callFd);
    this.waiter.close();
  }
}

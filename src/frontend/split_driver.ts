/**
 * The driver side of a split virtqueue (VIRTIO 1.2 §2.7), in GuestRam.
 *
 * Theory of operation. The three rings are allocated back to back in one
 * region (descriptor table 16-aligned, avail ring right after it, used ring at
 * the next 4-byte boundary: the tightest layout §2.7 allows). Free
 * descriptors form a list threaded through a shadow `next` array (never read
 * back from guest memory, so a device that scribbles on the table cannot
 * confuse us); a direct chain takes a prefix of that list, so freeing it is
 * one splice. Each descriptor index owns an indirect table of `indirectMax`
 * entries, preallocated.
 *
 * Submitting is `begin` / `add`… / `commit` per chain (writes the descriptors
 * and the avail ring entry), then one `kick` per batch: it publishes
 * avail.idx and notifies the device unless suppressed (used.flags, or
 * avail_event under EVENT_IDX). Completions are taken with `reap` (one used
 * element per call, into `usedId`/`usedLen`); `wait` blocks on the call
 * eventfd, or spins on used.idx in polling mode.
 *
 * Ring indexes are free-running u16 values kept as numbers masked with
 * 0xffff. Ordering: avail.idx is stored with Atomics.store after the ring
 * entries (§2.7.13: "the driver performs a suitable memory barrier before the
 * idx update") and used.idx is read with Atomics.load before the used
 * elements (pairs with the device's barrier before its used.idx store).
 *
 * For hostile tests `pushRaw` writes a chain exactly as described (any flags,
 * any next index, nested tables, an arbitrary avail entry).
 */
import * as sys from "../../ffi/sys.ts";
import { FrontendError } from "./client.ts";
import type { GuestRam } from "./guest_ram.ts";

export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
export const DESC_SIZE = 16;

/**
 * §2.7.10: does moving an index from `oldIdx` to `newIdx` pass `eventIdx`?
 * @example needEvent(5, 6, 5) // true: entry 5 was the one asked for
 */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Encodes descriptors as a table (16 bytes each), for hand-placed indirect tables. */
export function encodeDescs(descs: { addr: number; len: number; flags: number; next: number }[]): Uint8Array {
  const b = new Uint8Array(descs.length * DESC_SIZE);
  const dv = new DataView(b.buffer);
  descs.forEach((d, i) => {
    dv.setUint32(i * 16, d.addr >>> 0, true);
    dv.setUint32(i * 16 + 4, Math.floor(d.addr / 2 ** 32), true);
    dv.setUint32(i * 16 + 8, d.len >>> 0, true);
    dv.setUint16(i * 16 + 12, d.flags, true);
    dv.setUint16(i * 16 + 14, d.next, true);
  });
  return b;
}

/** One descriptor of a hand-made chain (`pushRaw`). */
export interface RawDesc {
  /** Guest physical address (for a `table`: defaults to the table's place). */
  addr?: number;
  /** Byte length (for a `table`: defaults to 16 × entries). */
  len?: number;
  /** WRITE / INDIRECT / NEXT as given; NEXT is added to all but the last unless `noAutoNext`. */
  flags?: number;
  noAutoNext?: boolean;
  /** Absolute next index (a table entry: index in its table). */
  next?: number;
  /** Next as a position in this chain (0 = the head): makes loops easy. */
  nextRel?: number;
  /** Entries of an indirect table written for this descriptor (sets INDIRECT, addr, len unless given). */
  table?: RawDesc[];
}

export interface SplitDriverOptions {
  /** Queue size: a power of 2, 1..32768. */
  size: number;
  /** Queue index (for messages). */
  index?: number;
  /** Use used_event/avail_event (VIRTIO_RING_F_EVENT_IDX negotiated). */
  eventIdx?: boolean;
  /** Entries of each descriptor's indirect table; 0 allocates none (default 0). */
  indirectMax?: number;
  /** Initial avail and used index (what SET_VRING_BASE will say), default 0. */
  base?: number;
  /** Spin on used.idx instead of sleeping on the call eventfd; asks the device not to interrupt. */
  polling?: boolean;
  /**
   * VIRTIO_F_IN_ORDER negotiated: descriptors are used in ring order (§2.7.9:
   * allocated round the table, never from a free list), and a used element
   * may stand for a run of chains (`reap` expands it).
   */
  inOrder?: boolean;
  /** VIRTIO_F_NOTIFICATION_DATA negotiated: each kick computes `notifyData`. */
  notificationData?: boolean;
}

/** What `wait` saw: a used element, the deadline, or activity on the watched socket. */
import { CallWait, type WaitResult } from "./call_wait.ts";
export type { WaitResult } from "./call_wait.ts";

/**
 * The driver side of one virtqueue, whatever its layout: what BlkDriver
 * uses, implemented by SplitDriver (§2.7) and PackedDriver (§2.8). Heads of
 * split chains and buffer ids of packed ones are both below `size` and come
 * back in `usedId`.
 * @example
 * const vq: VirtqDriver = packed ? new PackedDriver(ram, { size: 100 }) : new SplitDriver(ram, { size: 128 });
 * vq.begin(); vq.add(hdr, 16, false); vq.add(status, 1, true); vq.commit(); vq.kick();
 * while (vq.wait(1000) === "used" && vq.reap()) console.log(vq.usedId, vq.usedLen);
 */
export interface VirtqDriver {
  readonly size: number;
  readonly index: number;
  readonly eventIdx: boolean;
  readonly polling: boolean;
  readonly indirectMax: number;
  /** VIRTIO_F_IN_ORDER: the device uses chains in the order they were made available (and may batch). */
  readonly inOrder: boolean;
  /**
   * VIRTIO_F_NOTIFICATION_DATA: the value of the last notification (vq index
   * | next avail index << 16; packed: | next position and wrap << 16), or -1.
   * vhost-user has nowhere to carry it (the kick is an eventfd counter), so
   * it is computed and kept, and the device must not need it.
   */
  readonly notifyData: number;
  /** SET_VRING_ADDR desc, avail (split: avail ring; packed: driver area), used (split: used ring; packed: device area). */
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly kickFd: number;
  readonly callFd: number;
  readonly usedId: number;
  readonly usedLen: number;
  readonly kicks: number;
  readonly usedEntries: number;
  readonly calls: number;
  /** Free descriptors (split: table entries; packed: ring positions). */
  readonly numFree: number;
  /** Split: the free-running u16 avail index; packed: position | wrap counter << 15. */
  readonly availIndex: number;
  /** Split: the next used index to reap (u16); packed: position | wrap counter << 15. */
  readonly lastUsedIndex: number;
  /** The SET_VRING_BASE `num` for this driver's state (equal to GET_VRING_BASE once all made available was used and reaped). */
  readonly vringBase: number;
  /** Chains made available and not yet reaped. */
  readonly inFlight: number;
  tableGpa(i: number): number;
  canAdd(n: number, indirect?: boolean): boolean;
  begin(indirect?: boolean): void;
  add(gpa: number, len: number, writable: boolean): void;
  abort(): void;
  commit(): number;
  publish(): void;
  kick(force?: boolean): boolean;
  pending(): number;
  reap(): boolean;
  wait(timeoutMs: number, watchFd?: number): WaitResult;
  close(): void;
}


export class SplitDriver implements VirtqDriver {
  readonly size: number;
  readonly index: number;
  readonly eventIdx: boolean;
  readonly polling: boolean;
  readonly indirectMax: number;
  readonly inOrder: boolean;
  readonly notificationData: boolean;
  notifyData = -1;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  /** Start of the indirect tables (descriptor i's table is at + i × indirectMax × 16); -1 when none. */
  readonly indirectGpa: number;
  /** Eventfds we own: we write kick, the device writes call. */
  readonly kickFd: number;
  readonly callFd: number;

  /** Set by `reap`: the used element just taken. */
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
  /** Free descriptors. */
  numFree: number;

  private readonly mask: number;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly desc32: number; // u32 index of descriptor 0
  private readonly avail16: number; // u16 index of avail.flags
  private readonly used16: number; // u16 index of used.flags
  private readonly used32: number; // u32 index of used.flags|idx
  private readonly ind32: number; // u32 index of descriptor 0's indirect table
  private availIdx: number;
  private kickedIdx: number;
  private lastUsed: number;
  private freeHead = 0;
  private readonly nextFree: Uint16Array;
  private readonly tail: Uint16Array;
  private readonly count: Uint16Array;
  private readonly busy: Uint8Array;
  private cHead = -1;
  private cPrev = -1;
  private cN = 0;
  private cIndirect = false;
  private cW = 0;
  /** In order: the head at each avail index (shadow), where each head was made available, its writable bytes. */
  private readonly order: Uint16Array;
  private readonly availAt: Uint16Array;
  private readonly wlen: Uint32Array;
  /** In order: the used index of the last chain of the run being reaped (-1: none) and its length. */
  private runEnd = -1;
  private runLen = 0;
  private readonly waiter: CallWait;
  private closed = false;

  constructor(readonly ram: GuestRam, o: SplitDriverOptions) {
    const n = o.size;
    if (!Number.isInteger(n) || n < 1 || n > 32768 || (n & (n - 1)) !== 0) throw new RangeError(`queue size ${n}: a power of 2 in 1..32768`);
    this.size = n;
    this.mask = n - 1;
    this.index = o.index ?? 0;
    this.eventIdx = o.eventIdx ?? false;
    this.polling = o.polling ?? false;
    this.indirectMax = o.indirectMax ?? 0;
    this.inOrder = o.inOrder ?? false;
    this.notificationData = o.notificationData ?? false;
    this.order = new Uint16Array(n);
    this.availAt = new Uint16Array(n);
    this.wlen = new Uint32Array(n);
    const base = (o.base ?? 0) & 0xffff;
    this.availIdx = this.kickedIdx = this.lastUsed = base;

    // §2.7: descriptor table 16-aligned, avail 2-aligned, used 4-aligned.
    const availOff = DESC_SIZE * n;
    const usedOff = (availOff + 6 + 2 * n + 3) & ~3;
    const total = usedOff + 6 + 8 * n;
    this.descGpa = ram.alloc(total, 16);
    this.availGpa = this.descGpa + availOff;
    this.usedGpa = this.descGpa + usedOff;
    const off = ram.offset(this.descGpa, total);
    ram.u8.fill(0, off, off + total);
    this.u16 = new Uint16Array(ram.u8.buffer, ram.u8.byteOffset, ram.size >>> 1);
    this.u32 = new Uint32Array(ram.u8.buffer, ram.u8.byteOffset, ram.size >>> 2);
    this.desc32 = off >>> 2;
    this.avail16 = (off + availOff) >>> 1;
    this.used16 = (off + usedOff) >>> 1;
    this.used32 = (off + usedOff) >>> 2;
    if (this.indirectMax > 0) {
      const t = n * this.indirectMax * DESC_SIZE;
      this.indirectGpa = ram.alloc(t, 16);
      this.ind32 = ram.offset(this.indirectGpa, t) >>> 2;
    } else {
      this.indirectGpa = -1;
      this.ind32 = 0;
    }
    this.u16[this.avail16 + 1] = base;
    this.u16[this.used16 + 1] = base;
    // avail_event belongs to the device, but until it runs the driver's zeroed ring is all there
    // is: start it at `base` so that the first kick is not suppressed by a stale 0.
    this.u16[this.used16 + 2 + 4 * n] = base;
    if (this.polling) {
      // Without EVENT_IDX the flag asks for no interrupts (§2.7.7); with it, used_event one behind
      // the next entry does the same until the index wraps around.
      this.u16[this.avail16] = VRING_AVAIL_F_NO_INTERRUPT;
      this.u16[this.avail16 + 2 + n] = (base - 1) & 0xffff;
    } else {
      this.u16[this.avail16 + 2 + n] = base;
    }

    this.nextFree = new Uint16Array(n);
    // In order the free descriptors are always one stretch of the table, taken and given back
    // round it (a circle: chains may wrap from n-1 to 0).
    for (let i = 0; i < n; i++) this.nextFree[i] = this.inOrder ? (i + 1) % n : (i + 1) & 0xffff;
    this.numFree = n;
    this.tail = new Uint16Array(n);
    this.count = new Uint16Array(n);
    this.busy = new Uint8Array(n);
    this.kickFd = sys.eventfd();
    try {
      this.callFd = sys.eventfd();
    } catch (e) {
      sys.closeQuiet(this.kickFd);
      throw e;
    }
    this.waiter = new CallWait(this.callFd, this.polling, () => this.pending() > 0);
  }

  /** Avail index the driver has published (or will at the next kick). */
  get availIndex(): number {
    return this.availIdx;
  }

  /** Next used index the driver will reap. */
  get lastUsedIndex(): number {
    return this.lastUsed;
  }

  /**
   * The SET_VRING_BASE `num` matching this driver's state: the avail index,
   * which is the device's GET_VRING_BASE (its next avail index) once every
   * chain made available was used.
   */
  get vringBase(): number {
    return this.availIdx;
  }

  /** Chains made available and not yet reaped. */
  get inFlight(): number {
    return (this.availIdx - this.lastUsed) & 0xffff;
  }

  // ---- descriptors -------------------------------------------------------------

  private putDesc(at32: number, addr: number, len: number, flags: number, next: number): void {
    const u32 = this.u32;
    u32[at32] = addr >>> 0;
    u32[at32 + 1] = Math.floor(addr / 4294967296);
    u32[at32 + 2] = len >>> 0;
    const at16 = (at32 + 3) << 1;
    this.u16[at16] = flags;
    this.u16[at16 + 1] = next;
  }

  /** Gpa of descriptor `i`'s indirect table. */
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
    if (this.cHead >= 0) throw new Error(`queue ${this.index}: begin() while a chain is open`);
    if (this.numFree === 0) throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, "no free descriptor");
    if (indirect && this.indirectMax === 0) throw new RangeError(`queue ${this.index}: no indirect tables`);
    this.cHead = this.freeHead;
    this.cPrev = -1;
    this.cN = 0;
    this.cW = 0;
    this.cIndirect = indirect;
  }

  /** Appends a buffer to the open chain: device-readable, or device-writable when `writable`. */
  add(gpa: number, len: number, writable: boolean): void {
    const flags = writable ? VRING_DESC_F_WRITE : 0;
    if (writable) this.cW += len;
    if (this.cIndirect) {
      if (this.cN >= this.indirectMax) {
        this.cHead = -1;
        throw new RangeError(`queue ${this.index}: more than ${this.indirectMax} buffers in an indirect chain`);
      }
      const t32 = this.ind32 + this.cHead * this.indirectMax * 4;
      if (this.cN > 0) this.u16[(t32 + (this.cN - 1) * 4 + 3) << 1]! |= VRING_DESC_F_NEXT;
      this.putDesc(t32 + this.cN * 4, gpa, len, flags, this.cN + 1);
    } else {
      if (this.cN >= this.numFree) {
        this.cHead = -1;
        throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, `chain needs more than ${this.numFree} free descriptors`);
      }
      const i = this.cN === 0 ? this.cHead : this.nextFree[this.cPrev]!;
      if (this.cPrev >= 0) this.u16[(this.desc32 + this.cPrev * 4 + 3) << 1]! |= VRING_DESC_F_NEXT;
      this.putDesc(this.desc32 + i * 4, gpa, len, flags, this.nextFree[i]!);
      this.cPrev = i;
    }
    this.cN++;
  }

  /** Drops the open chain (nothing was made available). */
  abort(): void {
    this.cHead = -1;
  }

  /** Closes the chain and puts its head in the avail ring (visible at the next `kick`); returns the head. */
  commit(): number {
    const head = this.cHead;
    if (head < 0 || this.cN === 0) throw new Error(`queue ${this.index}: commit() without buffers`);
    if (this.cIndirect) {
      this.putDesc(this.desc32 + head * 4, this.tableGpa(head), this.cN * DESC_SIZE, VRING_DESC_F_INDIRECT, this.nextFree[head]!);
      this.tail[head] = head;
      this.count[head] = 1;
    } else {
      this.tail[head] = this.cPrev;
      this.count[head] = this.cN;
    }
    this.take(head);
    this.wlen[head] = this.cW;
    this.cHead = -1;
    this.putAvail(head);
    return head;
  }

  private take(head: number): void {
    this.freeHead = this.nextFree[this.tail[head]!]!;
    this.numFree -= this.count[head]!;
    this.busy[head] = 1;
  }

  private putAvail(value: number): void {
    this.u16[this.avail16 + 2 + (this.availIdx & this.mask)] = value;
    this.order[this.availIdx & this.mask] = value;
    if (value < this.size) this.availAt[value] = this.availIdx;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  // ---- raw chains (hostile tests) --------------------------------------------------------

  /**
   * Writes `descs` into free descriptors exactly as described and puts
   * `availEntry` (default: the real head) in the avail ring. Returns the head.
   * The chain counts as in flight until the device uses the head.
   */
  pushRaw(descs: RawDesc[], availEntry?: number): number {
    const n = descs.length;
    if (n === 0) throw new RangeError("pushRaw: empty chain");
    if (n > this.numFree) throw new FrontendError("QUEUE_FULL", `queue ${this.index}`, `raw chain of ${n} > ${this.numFree} free`);
    const idx: number[] = [];
    for (let k = 0, j = this.freeHead; k < n; k++, j = this.nextFree[j]!) idx.push(j);
    for (let k = 0; k < n; k++) {
      const d = descs[k]!;
      let flags = d.flags ?? 0;
      let addr = d.addr ?? 0;
      let len = d.len ?? 0;
      if (d.table !== undefined) {
        const t = d.table;
        if (t.length > this.indirectMax) throw new RangeError(`pushRaw: table of ${t.length} > indirectMax ${this.indirectMax}; place it yourself (encodeDescs)`);
        const t32 = this.ind32 + idx[k]! * this.indirectMax * 4;
        t.forEach((e, m) => {
          let ef = e.flags ?? 0;
          if (m < t.length - 1 && !e.noAutoNext) ef |= VRING_DESC_F_NEXT;
          this.putDesc(t32 + m * 4, e.addr ?? 0, e.len ?? 0, ef, (e.next ?? e.nextRel ?? m + 1) & 0xffff);
        });
        if (d.addr === undefined) addr = this.tableGpa(idx[k]!);
        if (d.len === undefined) len = t.length * DESC_SIZE;
        flags |= VRING_DESC_F_INDIRECT;
      }
      if (k < n - 1 && !d.noAutoNext) flags |= VRING_DESC_F_NEXT;
      const next = d.next ?? (d.nextRel !== undefined ? idx[d.nextRel]! : k < n - 1 ? idx[k + 1]! : this.nextFree[idx[k]!]!);
      this.putDesc(this.desc32 + idx[k]! * 4, addr, len, flags, next & 0xffff);
    }
    const head = idx[0]!;
    this.tail[head] = idx[n - 1]!;
    this.count[head] = n;
    this.take(head);
    this.putAvail(availEntry ?? head);
    return head;
  }

  /** Puts any value in the next avail ring slot, with no bookkeeping (hostile tests). */
  pushAvail(value: number): void {
    this.putAvail(value & 0xffff);
  }

  /** Publishes an arbitrary avail.idx (hostile tests: jumps past the ring size). */
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    Atomics.store(this.u16, this.avail16 + 1, this.availIdx);
  }

  // ---- notify ----------------------------------------------------------------------

  /** Makes every committed chain visible (stores avail.idx). */
  publish(): void {
    // Release: descriptors and ring entries are written before the index (§2.7.13).
    Atomics.store(this.u16, this.avail16 + 1, this.availIdx);
  }

  /**
   * Publishes and notifies the device unless it asked not to be (§2.7.10 under
   * EVENT_IDX: avail_event; otherwise used.flags NO_NOTIFY). Returns whether it kicked.
   */
  kick(force = false): boolean {
    this.publish();
    // The seq-cst store above and load below order "publish idx" before "read the suppression",
    // the full barrier §2.7.13.4 asks for (pairs with the device's store of avail_event).
    let need: boolean;
    if (this.eventIdx) need = needEvent(Atomics.load(this.u16, this.used16 + 2 + 4 * this.size), this.availIdx, this.kickedIdx);
    else need = (Atomics.load(this.u16, this.used16) & VRING_USED_F_NO_NOTIFY) === 0 && this.availIdx !== this.kickedIdx;
    this.kickedIdx = this.availIdx;
    if (!need && !force) return false;
    // §2.9 (split): vqn | next avail index << 16; the eventfd cannot carry it (see notifyData).
    if (this.notificationData) this.notifyData = ((this.availIdx << 16) | this.index) >>> 0;
    sys.eventfdWrite(this.kickFd, 1);
    this.kicks++;
    return true;
  }

  // ---- completions -----------------------------------------------------------------

  /** Used elements the device has published and we have not reaped. */
  pending(): number {
    return (Atomics.load(this.u16, this.used16 + 1) - this.lastUsed) & 0xffff;
  }

  /** The device's used.idx as it is in memory now. */
  usedIndex(): number {
    return Atomics.load(this.u16, this.used16 + 1);
  }

  /**
   * Takes one used element into `usedId`/`usedLen` and frees its chain;
   * false when there is none. Throws BAD_USED for an element that is not a
   * chain in flight (the device broke the ring rules).
   */
  reap(): boolean {
    // Acquire: the used element is read after the index (pairs with the device's barrier).
    const idx = Atomics.load(this.u16, this.used16 + 1);
    if (idx === this.lastUsed) return false;
    if (((idx - this.lastUsed) & 0xffff) > this.inFlight) {
      throw new FrontendError("BAD_USED", `queue ${this.index}`, `used.idx ${idx} is ${(idx - this.lastUsed) & 0xffff} ahead, only ${this.inFlight} in flight`);
    }
    let id: number, len: number;
    if (this.inOrder) {
      const p = this.reapInOrder(idx);
      id = p[0];
      len = p[1];
    } else {
      const e = this.used32 + 1 + 2 * (this.lastUsed & this.mask);
      id = this.u32[e]!;
      len = this.u32[e + 1]!;
      this.usedEntries++;
    }
    if (id >= this.size || this.busy[id] === 0) {
      throw new FrontendError("BAD_USED", `queue ${this.index}`, `used element ${this.lastUsed}: id ${id} is not a chain in flight`);
    }
    // In order the freed chain is the oldest: the free stretch grows at its end by itself.
    if (!this.inOrder) {
      this.nextFree[this.tail[id]!] = this.freeHead;
      this.freeHead = id;
    }
    this.numFree += this.count[id]!;
    this.busy[id] = 0;
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    this.usedId = id;
    this.usedLen = len;
    // used_event: interrupt at the next element (or, polling, stay one behind: no interrupts).
    this.u16[this.avail16 + 2 + this.size] = this.polling ? (this.lastUsed - 1) & 0xffff : this.lastUsed;
    return true;
  }

  private readonly pair: [number, number] = [0, 0];

  /**
   * In order (§2.7.9): the chain at used index lastUsed is the one made
   * available at that index. A used element whose id is a later chain ends a
   * run: the chains before it were used whole (their writable length), the
   * last one with the element's length; the elements in between are stale.
   */
  private reapInOrder(idx: number): [number, number] {
    const r = this.pair;
    const expect = this.order[this.lastUsed & this.mask]!;
    if (this.runEnd < 0) {
      const e = this.used32 + 1 + 2 * (this.lastUsed & this.mask);
      const id = this.u32[e]!, len = this.u32[e + 1]!;
      this.usedEntries++;
      if (id >= this.size || this.busy[id] === 0) {
        throw new FrontendError("BAD_USED", `queue ${this.index}`, `used element ${this.lastUsed}: id ${id} is not a chain in flight`);
      }
      const d = (this.availAt[id]! - this.lastUsed) & 0xffff;
      if (d >= ((idx - this.lastUsed) & 0xffff)) {
        throw new FrontendError("BAD_USED", `queue ${this.index}`, `used element ${this.lastUsed}: id ${id} ends a run of ${d + 1} past used.idx ${idx}`);
      }
      if (d === 0) {
        r[0] = id;
        r[1] = len;
        return r;
      }
      this.runEnd = this.availAt[id]!;
      this.runLen = len;
    }
    r[0] = expect;
    if (this.lastUsed === this.runEnd) {
      r[1] = this.runLen;
      this.runEnd = -1;
    } else {
      r[1] = this.wlen[expect]!;
    }
    return r;
  }

  /** Waits until a used buffer is there to reap (see CallWait): "used", "timeout" or "socket". */
  wait(timeoutMs: number, watchFd = -1): WaitResult {
    return this.waiter.wait(timeoutMs, watchFd);
  }

  /** Closes the eventfds (the back-end keeps its own copies). The rings stay in `ram`. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.closeQuiet(this.kickFd);
    sys.closeQuiet(this.callFd);
    this.waiter.close();
  }
}

/**
 * The device side of a split virtqueue (VIRTIO 1.2 §2.7).
 *
 * Theory of operation: the driver publishes chain heads in the avail ring and
 * bumps avail.idx; `pop` takes the next head, walks its chain (direct and one
 * level of indirect descriptors) and appends every buffer, cut at region and
 * window boundaries, to a readable and a writable Pieces list. Completed
 * chains are written to the used ring by `push` and made visible by one
 * `flush` per batch, which also decides whether the driver wants an
 * interrupt. Every index and length read from guest memory is checked before
 * use; a violation throws a VirtqError and the queue stays broken.
 *
 * Rings are read through whole-window Uint16Array/Uint32Array views with base
 * indexes computed once at `setRings`, so walking allocates nothing.
 */
import { GuestMemoryError, VirtqError, type VirtqCode } from "../errors.ts";
import type { GuestMemory, Span } from "../memory/guest_memory.ts";
import { newSpan } from "../memory/guest_memory.ts";
import { Pieces } from "../memory/pieces.ts";
import { InOrderHold, type RingSizes, type VirtQueue } from "./queue.ts";
import type { SplitInflight } from "./inflight.ts";

export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
export const MAX_QUEUE_SIZE = 32768;

/** Bytes of each split ring part for a queue of `n` entries (§2.7: with the event-idx fields). */
export const descTableSize = (n: number) => 16 * n;
export const availRingSize = (n: number) => 6 + 2 * n;
export const usedRingSize = (n: number) => 6 + 8 * n;
export const SPLIT_RING_SIZES: RingSizes = { desc: descTableSize, driver: availRingSize, device: usedRingSize };

/** The 16-bit index arithmetic of §2.7.10: does the driver want an event for `newIdx`? */
export function vringNeedEvent(eventIdx: number, newIdx: number, old: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - old) & 0xffff);
}

export class SplitQueue implements VirtQueue {
  readonly layout = "split";
  size = 0;
  /** Next avail index to take (free-running u16). */
  lastAvail = 0;
  /** Next used index to fill (shadow of used.idx, published by flush). */
  usedIdx = 0;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  eventIdx = false;
  /** VIRTIO_F_IN_ORDER negotiated (see InOrderHold). */
  inOrder = false;
  broken: VirtqError | null = null;
  // In-order: completions held back until their turn, the device-writable bytes of each chain
  // in flight, and the run being built (one used element at gStart for gN buffers, §2.7.9).
  private readonly hold = new InOrderHold();
  private fullLen = new Uint32Array(0);
  private wTotal = 0;
  private gStart = 0;
  private gN = 0;
  private gId = 0;
  private gLen = 0;
  private readonly emitFn = (id: number, len: number) => this.emitInOrder(id, len);

  // Whole-window views and base indexes (in elements of the view) of each ring.
  private d16: Uint16Array = new Uint16Array(0);
  private d32: Uint32Array = new Uint32Array(0);
  private dBase = 0; // u32 index of descriptor 0
  private a16: Uint16Array = new Uint16Array(0);
  private aBase = 0; // u16 index of avail.flags
  private u16: Uint16Array = new Uint16Array(0);
  private u32: Uint32Array = new Uint32Array(0);
  private uBase16 = 0; // u16 index of used.flags
  private uBase32 = 0; // u32 index of used.flags|idx
  private signalledUsed = 0;
  private signalledValid = false;
  private readonly span: Span = newSpan();
  private bounce: Uint32Array = new Uint32Array(0);
  /** INFLIGHT_SHMFD tracking, and the chains a previous back-end left in flight (taken first). */
  private inflight: SplitInflight | null = null;
  private resubmit: number[] = [];
  private resubmitPos = 0;

  constructor(readonly index: number, private readonly mem: GuestMemory) {}

  private fail(code: VirtqCode, at: number, detail = ""): never {
    throw (this.broken = new VirtqError(code, this.index, at, detail));
  }

  /**
   * Points the queue at its rings, given as spans from GuestMemory (the
   * caller translated and bounds-checked each whole ring). Reads used.idx so
   * that a ring resumed after a reconnect continues where the driver sees it.
   */
  setRings(size: number, desc: Span, avail: Span, used: Span): void {
    if (size <= 0 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) this.fail("RING_ADDR", size, "size not a power of 2 in 1..32768");
    if ((desc.host & 15) !== 0 || (avail.host & 1) !== 0 || (used.host & 3) !== 0) this.fail("RING_ADDR", 0, "misaligned ring");
    this.size = size;
    this.d16 = desc.u16;
    this.d32 = desc.u32;
    this.dBase = desc.off >>> 2;
    this.a16 = avail.u16;
    this.aBase = avail.off >>> 1;
    this.u16 = used.u16;
    this.u32 = used.u32;
    this.uBase16 = used.off >>> 1;
    this.uBase32 = used.off >>> 2;
    this.usedIdx = Atomics.load(this.u16, this.uBase16 + 1);
    this.signalledValid = false;
    this.broken = null;
    // Called with nothing in flight (quiesced): nothing is held back.
    this.hold.reset(size);
    if (this.fullLen.length !== size) this.fullLen = new Uint32Array(size);
    this.gN = 0;
  }

  /** Forgets the ring views (before the memory behind them is unmapped). */
  detach(): void {
    this.size = 0;
    this.d16 = new Uint16Array(0);
    this.d32 = new Uint32Array(0);
    this.a16 = new Uint16Array(0);
    this.u16 = new Uint16Array(0);
    this.u32 = new Uint32Array(0);
    this.bounce = new Uint32Array(0);
  }

  get ready(): boolean {
    return this.size !== 0;
  }

  /** avail.idx as the driver last published it (acquire: pairs with the driver's release store). */
  availIdx(): number {
    return Atomics.load(this.a16, this.aBase + 1);
  }

  /** Number of chains waiting; throws when the driver moved avail.idx by more than the ring size. */
  pending(): number {
    const n = (this.availIdx() - this.lastAvail) & 0xffff;
    if (n > this.size) this.fail("AVAIL_IDX_JUMP", this.lastAvail, `avail.idx moved ${n} entries on a ring of ${this.size}`);
    return n;
  }

  /**
   * The next chain's head (without taking it), or -1 when the ring is empty.
   */
  peekHead(): number {
    if (this.pending() === 0) return -1;
    const head = this.a16[this.aBase + 2 + (this.lastAvail & (this.size - 1))]!;
    if (head >= this.size) this.fail("HEAD_RANGE", head, `head ${head} >= queue size ${this.size}`);
    return head;
  }

  /**
   * Takes the chain at `head` (from peekHead) and appends its buffers to `r`
   * (device-readable) and `w` (device-writable), both reset first.
   */
  take(head: number, r: Pieces, w: Pieces): void {
    this.walk(head, r, w);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    // Marked before the device sees the chain (inflight tracking).
    this.inflight?.taken(head);
  }

  /** Walks the chain at `head` into `r` and `w` (both reset first). */
  private walk(head: number, r: Pieces, w: Pieces): void {
    r.reset();
    w.reset();
    let t16 = this.d16, t32 = this.d32, base = this.dBase;
    let tableSize = this.size;
    let ttl = this.size;
    let indirect = false;
    let seenWrite = false;
    let total = 0;
    let wTotal = 0;
    let i = head;
    const mem = this.mem;
    for (;;) {
      if (ttl-- === 0) this.fail("LOOP", head, `chain longer than ${indirect ? "its indirect table" : "the queue"}`);
      const o = base + i * 4;
      const lo = t32[o]!, hi = t32[o + 1]!, len = t32[o + 2]!;
      const fw = t32[o + 3]!;
      const flags = fw & 0xffff, next = fw >>> 16;
      if (hi >= 0x200000) this.fail("BAD_ADDR", i, `address 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} past 2^53`);
      const addr = lo + hi * 2 ** 32;
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) this.fail("NESTED_INDIRECT", i);
        if (flags & VRING_DESC_F_NEXT) this.fail("INDIRECT_NEXT", i, "indirect descriptor with NEXT");
        if (len === 0 || (len & 15) !== 0) this.fail("INDIRECT_LEN", i, `table length ${len}`);
        const n = len >>> 4;
        if (n > MAX_QUEUE_SIZE) this.fail("INDIRECT_LEN", i, `table of ${n} descriptors`);
        const s = this.indirectTable(addr, len, i);
        t16 = s.u16; t32 = s.u32; base = s.off >>> 2;
        tableSize = n;
        ttl = n;
        indirect = true;
        i = 0;
        continue;
      }
      if (len === 0) this.fail("ZERO_LEN", i);
      total += len;
      if (total > 0xffffffff) this.fail("TOTAL_LEN", i, "chain longer than 4 GiB");
      if (flags & VRING_DESC_F_WRITE) {
        seenWrite = true;
        wTotal += len;
        if (!mem.gpaPieces(addr, len, w, true)) this.fail("BAD_ADDR", i, `0x${addr.toString(16)}+${len} not in guest memory`);
      } else {
        if (seenWrite) this.fail("ORDER", i, "readable descriptor after a writable one");
        if (!mem.gpaPieces(addr, len, r)) this.fail("BAD_ADDR", i, `0x${addr.toString(16)}+${len} not in guest memory`);
      }
      if (!(flags & VRING_DESC_F_NEXT)) break;
      if (next >= tableSize) this.fail("NEXT_RANGE", i, `next ${next} >= ${tableSize}`);
      i = next;
    }
    this.wTotal = wTotal;
  }

  /** A view of an indirect table; copied to a bounce buffer when not 4-aligned or not contiguous. */
  private indirectTable(addr: number, len: number, at: number): Span {
    const s = this.span;
    try {
      this.mem.gpaSpan(addr, len, s);
      if ((s.off & 3) === 0) return s;
    } catch (e) {
      if (!(e instanceof GuestMemoryError)) throw e;
    }
    // Rare: gather the table from pieces into an aligned private copy.
    if (this.bounce.length < len >>> 2) this.bounce = new Uint32Array(len >>> 2);
    const dst = new Uint8Array(this.bounce.buffer, 0, len);
    let done = 0;
    const p = tmpPieces();
    if (!this.mem.gpaPieces(addr, len, p)) this.fail("BAD_ADDR", at, `indirect table 0x${addr.toString(16)}+${len} not in guest memory`);
    for (let k = 0; k < p.count; k++) {
      dst.set(p.win[k]!.subarray(p.off[k]!, p.off[k]! + p.len[k]!), done);
      done += p.len[k]!;
    }
    s.u32 = this.bounce;
    s.u16 = new Uint16Array(this.bounce.buffer);
    s.off = 0;
    return s;
  }

  unpop(head: number): boolean {
    if (this.resubmit.length > 0) return false; // popped from what a previous back-end left: keep it simple
    const prev = (this.lastAvail - 1) & 0xffff;
    if (this.size === 0 || this.a16[this.aBase + 2 + (prev & (this.size - 1))] !== head) return false;
    if (this.inOrder && !this.hold.untaken(head)) return false;
    this.lastAvail = prev;
    this.inflight?.untaken(head);
    return true;
  }

  pop(r: Pieces, w: Pieces): number {
    let head: number;
    if (this.resubmitPos < this.resubmit.length) {
      head = this.resubmit[this.resubmitPos]!;
      this.walk(head, r, w);
      // Only after a whole walk: an IOTLB miss leaves the chain to be retried after the UPDATE.
      this.resubmitPos++;
    } else {
      head = this.peekHead();
      if (head < 0) return head;
      this.take(head, r, w);
    }
    if (this.inOrder) {
      // A head made available twice is caught by the caller (HEAD_BUSY); never let it overfill the hold.
      if (this.hold.pending >= this.size) this.fail("HEAD_BUSY", head, `more than ${this.size} chains in flight`);
      this.hold.taken(head);
      this.fullLen[head] = this.wTotal;
    }
    return head;
  }

  /** Chains of a previous back-end not resubmitted yet. */
  pendingResubmits(): number {
    return this.resubmit.length - this.resubmitPos;
  }

  /** Tracks in-flight chains in `log` (null: stop tracking). */
  setInflight(log: SplitInflight | null): void {
    this.inflight = log;
    this.resubmit = [];
    this.resubmitPos = 0;
  }

  /**
   * The ring starts: with a fresh inflight area, begin tracking; with one a
   * previous back-end filled, queue its in-flight chains for resubmission (in
   * the order they were taken) and continue the avail ring after them:
   * chains taken = chains used + chains in flight.
   */
  startInflight(fresh = false): number {
    const log = this.inflight;
    if (log === null || !this.ready) return 0;
    // `fresh`: this process stopped the ring cleanly (nothing in flight), e.g. a ring reset with a new size.
    if (fresh || log.version === 0) {
      log.init(this.usedIdx);
      this.resubmit = [];
    } else {
      this.resubmit = log.recover(this.usedIdx);
      for (const h of this.resubmit) if (h >= this.size) this.fail("HEAD_RANGE", h, "in-flight head past the ring");
      this.lastAvail = (this.usedIdx + this.resubmit.length) & 0xffff;
    }
    this.resubmitPos = 0;
    return this.resubmit.length;
  }

  getBase(): number {
    return this.lastAvail;
  }

  setBase(num: number): void {
    if (num > 0xffff || num < 0) this.fail("RING_ADDR", num, "split ring base above 65535");
    this.lastAvail = num;
  }

  /**
   * Puts a completed chain in the used ring (visible to the driver after
   * flush). In order (VIRTIO_F_IN_ORDER), a chain completed before those
   * made available earlier waits for them.
   */
  push(head: number, len: number): void {
    if (head >= this.size) this.fail("USED_HEAD", head);
    if (this.inOrder) return this.hold.done(head, len, this.emitFn);
    const e = this.uBase32 + 1 + 2 * (this.usedIdx & (this.size - 1));
    this.u32[e] = head;
    this.u32[e + 1] = len >>> 0;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.inflight?.pushed(head);
  }

  /**
   * The next buffer in availability order is done. It extends the current
   * run when the run's last buffer was written whole (the driver takes a
   * skipped buffer as fully written), else the run is closed and a new one
   * starts here. Each buffer still counts one used index (§2.7.9: "increments
   * the used idx by the size of the batch").
   */
  private emitInOrder(head: number, len: number): void {
    if (this.gN > 0 && this.gLen === this.fullLen[this.gId]) {
      this.gN++;
    } else {
      if (this.gN > 0) this.closeRun();
      this.gStart = this.usedIdx;
      this.gN = 1;
    }
    this.gId = head;
    this.gLen = len;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.inflight?.pushed(head);
  }

  /** Writes the run's one used element (id and length of its last buffer) at the run's first index. */
  private closeRun(): void {
    const e = this.uBase32 + 1 + 2 * (this.gStart & (this.size - 1));
    this.u32[e] = this.gId;
    this.u32[e + 1] = this.gLen >>> 0;
    this.gN = 0;
  }

  /**
   * Publishes used.idx and says whether the driver wants to be notified.
   * The Atomics.store is a release (sequentially consistent) store: the used
   * elements written by `push` are visible before the index; the driver's
   * load-acquire of used.idx pairs with it.
   */
  flush(): boolean {
    if (this.gN > 0) this.closeRun();
    const newIdx = this.usedIdx;
    Atomics.store(this.u16, this.uBase16 + 1, newIdx);
    // Only now is the batch out of flight (the driver can see it).
    this.inflight?.published(newIdx);
    if (this.eventIdx) {
      // Store-load ordering between used.idx and used_event: both SC atomics.
      const old = this.signalledUsed;
      const valid = this.signalledValid;
      this.signalledUsed = newIdx;
      this.signalledValid = true;
      if (!valid) return true;
      const usedEvent = Atomics.load(this.a16, this.aBase + 2 + this.size);
      return vringNeedEvent(usedEvent, newIdx, old);
    }
    return (Atomics.load(this.a16, this.aBase) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Asks the driver to kick for the next chain (EVENT_IDX: avail_event =
   * lastAvail) and returns true if chains arrived meanwhile, so the caller
   * processes them instead of sleeping (the re-check after re-enabling).
   */
  enableNotification(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.u16, this.uBase16 + 2 + 4 * this.size, this.lastAvail);
    } else {
      Atomics.store(this.u16, this.uBase16, Atomics.load(this.u16, this.uBase16) & ~VRING_USED_F_NO_NOTIFY);
    }
    return this.availIdx() !== this.lastAvail;
  }

  /** Tells the driver not to kick while we are processing (without EVENT_IDX only). */
  disableNotification(): void {
    if (!this.eventIdx) Atomics.store(this.u16, this.uBase16, Atomics.load(this.u16, this.uBase16) | VRING_USED_F_NO_NOTIFY);
  }
}

let tmp: Pieces | null = null;
function tmpPieces(): Pieces {
  (tmp ??= new Pieces(16)).reset();
  return tmp;
}

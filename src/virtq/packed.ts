/**
 * The device side of a packed virtqueue (VIRTIO 1.2 §2.8).
 *
 * Theory of operation. One ring of 16-byte descriptors is shared by both
 * sides. The driver makes a buffer available by writing its descriptors at
 * its next positions, with VIRTQ_DESC_F_AVAIL equal to its ring wrap counter
 * and VIRTQ_DESC_F_USED the inverse, the first descriptor's flags last. `pop`
 * looks at exactly one place, the descriptor at `availPos`, and when its
 * flags say "available for `availWrap`" walks the chain (NEXT, or one
 * indirect table), appending every buffer to a readable and a writable Pieces
 * list. The buffer id is the one in the chain's last descriptor (§2.8.6).
 *
 * Completion writes one used descriptor per buffer at `usedPos`, in
 * completion order (ids may complete in any order: §2.8.12, "in the order in
 * which they complete"), and moves
 * `usedPos` on by the number of ring descriptors that buffer's chain took
 * (remembered per id at pop; §2.8.6 "skips forward"). With VIRTIO_F_IN_ORDER
 * completions are held back until their turn and a run of them is written as
 * one used descriptor (InOrderHold, `emitInOrder`). A batch of `push`es is
 * made visible by one `flush` (see `push` for the ordering), which then reads
 * the driver's event suppression area to decide whether to interrupt.
 *
 * Both sides run the same positions and wrap counters, so the number of
 * descriptors in flight is always the distance from `usedPos` to `availPos`
 * (at most the ring size); it is what lets `pop` refuse a driver that makes
 * more descriptors available than the ring has room for.
 *
 * Every value read from guest memory is checked before use; a violation
 * throws a VirtqError and the queue stays broken until `setRings`. Rings are
 * read through whole-window typed arrays with base indexes computed once at
 * `setRings`: pop, push and flush allocate nothing.
 */
import { GuestMemoryError, VirtqError, type VirtqCode } from "../errors.ts";
import type { GuestMemory, Span } from "../memory/guest_memory.ts";
import { newSpan } from "../memory/guest_memory.ts";
import { Pieces } from "../memory/pieces.ts";
import { InOrderHold, type RingSizes, type VirtQueue } from "./queue.ts";
import { InflightAreaError, type PackedInflight, type PackedInflightBuffer } from "./inflight.ts";

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** §2.8.1: the two bits that mark a packed descriptor available or used. */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;
/** §2.8.10 event suppression `flags`; DESC is valid only with VIRTIO_F_RING_EVENT_IDX; 3 is reserved. */
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
export const RING_EVENT_FLAGS_DESC = 2;
/** §2.8: "Packed virtqueues support up to 2^15 entries each". */
export const PACKED_MAX_QUEUE_SIZE = 32768;

/**
 * Bytes of each packed ring part (§2.8.10.1): descriptor ring 16 × n,
 * driver and device event suppression 4 each.
 * @example PACKED_RING_SIZES.desc(256) === 4096 && PACKED_RING_SIZES.driver(256) === 4
 */
export const PACKED_RING_SIZES: RingSizes = { desc: (n) => 16 * n, driver: () => 4, device: () => 4 };

/**
 * The ring state as vhost-user carries it for a packed ring in
 * SET_VRING_BASE / GET_VRING_BASE `num` ("Vring descriptor indices for packed
 * virtqueues", docs/interop/vhost-user.rst): bits 0–14 the next available
 * position the back-end will read, bit 15 the driver ring wrap counter, bits
 * 16–30 the position where the back-end writes its next used descriptor,
 * bit 31 the device ring wrap counter. QEMU builds and reads it the same way
 * (hw/virtio/virtio.c `virtio_queue_packed_get_last_avail_idx` /
 * `…_set_last_avail_idx`; vhost.c `vhost_virtqueue_start` sends it in
 * SET_VRING_BASE and restores it from GET_VRING_BASE). Positions are below
 * the ring size, not free-running.
 * @example packedBase(0, 1, 0, 1) === 0x80008000 // a fresh ring: both wrap counters start at 1 (§2.8.1)
 */
export function packedBase(availPos: number, availWrap: number, usedPos: number, usedWrap: number): number {
  return (availPos | (availWrap << 15) | ((usedPos | (usedWrap << 15)) << 16)) >>> 0;
}

/** What SET_VRING_BASE carries for a ring that never ran (QEMU's virtio_reset: both counters true). */
export const PACKED_INITIAL_BASE = 0x80008000;

/**
 * The event test of §2.8.10 (Descriptor Ring Change Event Offset/Wrap): did
 * the last `count` descriptors, ending just before position `pos` with wrap
 * counter `wrap`, include the one `offWrap` names? Positions are compared on
 * a circle of 2 × `size` (the wrap counter is the lap's parity), so the test
 * is exact across the wrap for any ring size; QEMU and Linux do the same on
 * u16 arithmetic, which is exact only for powers of two. An offset past the
 * ring, or `count` of two laps or more, answers true (a spurious
 * notification is harmless, a missed one hangs).
 * @example packedNeedEvent(8, 0x8000 | 6, 1, 0, 3) // true: positions 6, 7 (wrap 1) and 0 (wrap 0) were passed
 */
export function packedNeedEvent(size: number, offWrap: number, pos: number, wrap: number, count: number): boolean {
  const off = offWrap & 0x7fff;
  const m = 2 * size;
  if (off >= size || count >= m) return true;
  // Lap parity: wrap 1 ↦ [0, size), wrap 0 ↦ [size, 2 size); one step past size-1 (wrap 1) is size (wrap 0).
  const ev = off + (offWrap & 0x8000 ? 0 : size);
  const now = pos + (wrap ? 0 : size);
  return (now - ev - 1 + 2 * m) % m < count;
}

/** §2.8.1: available = AVAIL matches the wrap counter and USED does not. */
const isAvail = (flags: number, wrap: number) => ((flags >>> 7) & 1) === wrap && ((flags >>> 15) & 1) !== wrap;

/**
 * The device side of one packed virtqueue; Vring drives it through VirtQueue.
 * @example
 * const q = new PackedQueue(0, mem);
 * q.eventIdx = true;                       // VIRTIO_F_RING_EVENT_IDX negotiated
 * q.setRings(n, descSpan, driverSpan, deviceSpan);
 * q.setBase(PACKED_INITIAL_BASE);          // SET_VRING_BASE of a fresh ring
 * for (let id; (id = q.pop(r, w)) >= 0; ) q.push(id, handle(r, w));
 * if (q.flush()) signalCall();
 */
export class PackedQueue implements VirtQueue {
  readonly layout = "packed";
  size = 0;
  /** Next ring position to look at for an available descriptor, and the driver wrap counter expected there. */
  availPos = 0;
  availWrap = 1;
  /** Next ring position to write a used descriptor at, and the device wrap counter. */
  usedPos = 0;
  usedWrap = 1;
  /** Descriptors popped and not yet pushed (= distance from usedPos to availPos). */
  inflightDescs = 0;
  /** VIRTIO_F_RING_EVENT_IDX negotiated: RING_EVENT_FLAGS_DESC is valid both ways. */
  eventIdx = false;
  /** VIRTIO_F_IN_ORDER negotiated (see InOrderHold). */
  inOrder = false;
  broken: VirtqError | null = null;
  // In-order: held-back completions, the device-writable bytes of each buffer in flight, and the
  // run being built (one used descriptor at gPos/gWrap for gN buffers, skipping their positions).
  private readonly hold = new InOrderHold();
  private fullLen = new Uint32Array(0);
  private wTotal = 0;
  private gPos = 0;
  private gWrap = 0;
  private gN = 0;
  private gId = 0;
  private gLen = 0;
  private readonly emitFn = (id: number, len: number) => this.emitInOrder(id, len);
  /** INFLIGHT_SHMFD tracking, and the buffers a previous back-end left in flight (taken first). */
  private inflight: PackedInflight | null = null;
  private resubmit: PackedInflightBuffer[] = [];
  private resubmitPos = 0;
  private readonly stored = { addr: 0, len: 0, flags: 0 };

  // Whole-window views and base indexes (in elements of the view) of the three areas.
  private d16: Uint16Array = new Uint16Array(0);
  private d32: Uint32Array = new Uint32Array(0);
  private dBase = 0; // u32 index of descriptor 0
  private drv32: Uint32Array = new Uint32Array(0);
  private drvBase = 0; // u32 index of the driver area (off_wrap | flags << 16)
  private dev32: Uint32Array = new Uint32Array(0);
  private devBase = 0; // u32 index of the device area
  /** Device area as last written (off_wrap | flags << 16), -1 when unknown. */
  private devShadow = -1;
  /** Ring descriptors taken by each buffer id in flight; 0 = not in flight. */
  private chainLen = new Uint16Array(0);
  /** Where each buffer in flight started (for unpop). */
  private popPos = new Uint16Array(0);
  private popWrap = new Uint8Array(0);
  // The batch pushed since the last flush: its first entry's flags wait for flush.
  private batchCount = 0;
  private batchDescs = 0;
  private batchFlagsAt = 0; // u16 index (in d16) of the first entry's flags
  private batchFlags = 0;
  private signalledValid = false;
  private readonly span: Span = newSpan();
  private bounce32 = new Uint32Array(0);
  private bounce16 = new Uint16Array(0);
  private bounce8 = new Uint8Array(0);
  private tmp: Pieces | null = null;

  constructor(readonly index: number, private readonly mem: GuestMemory) {}

  private fail(code: VirtqCode, at: number, detail = ""): never {
    throw (this.broken = new VirtqError(code, this.index, at, detail));
  }

  /**
   * Points the queue at its descriptor ring and the driver and device event
   * suppression areas, given as spans from GuestMemory (the caller translated
   * and bounds-checked each to PACKED_RING_SIZES). Any size in 1..32768 is
   * valid (§2.8.10.1: "does not have to be a power of 2"). Positions and wrap
   * counters are kept (they come from SET_VRING_BASE, before or after this);
   * a batch not flushed is dropped, so callers flush first. Leaves the device
   * area at RING_EVENT_FLAGS_ENABLE.
   */
  setRings(size: number, desc: Span, driver: Span, device: Span): void {
    if (!Number.isInteger(size) || size <= 0 || size > PACKED_MAX_QUEUE_SIZE) this.fail("RING_ADDR", size, "size not in 1..32768");
    // §2.8.10.1: descriptor ring 16-aligned, event suppression areas 4-aligned.
    if (((desc.host | desc.off) & 15) !== 0 || ((driver.host | driver.off) & 3) !== 0 || ((device.host | device.off) & 3) !== 0) {
      this.fail("RING_ADDR", 0, "misaligned ring");
    }
    if (size !== this.size && this.chainLen.length !== size) {
      this.chainLen = new Uint16Array(size);
      this.popPos = new Uint16Array(size);
      this.popWrap = new Uint8Array(size);
    }
    if (this.fullLen.length !== size) this.fullLen = new Uint32Array(size);
    // Called with nothing in flight (quiesced): nothing is held back.
    this.hold.reset(size);
    this.gN = 0;
    this.size = size;
    this.d16 = desc.u16;
    this.d32 = desc.u32;
    this.dBase = desc.off >>> 2;
    this.drv32 = driver.u32;
    this.drvBase = driver.off >>> 2;
    this.dev32 = device.u32;
    this.devBase = device.off >>> 2;
    this.batchCount = 0;
    this.batchDescs = 0;
    this.signalledValid = false;
    this.broken = null;
    this.devShadow = -1;
    this.setDeviceEvent(RING_EVENT_FLAGS_ENABLE, 0);
    this.checkBase();
  }

  /** Forgets the ring views (before the memory behind them is unmapped). Positions are kept. */
  detach(): void {
    this.size = 0;
    this.d16 = new Uint16Array(0);
    this.d32 = new Uint32Array(0);
    this.drv32 = new Uint32Array(0);
    this.dev32 = new Uint32Array(0);
    this.bounce32 = new Uint32Array(0);
    this.bounce16 = new Uint16Array(0);
    this.bounce8 = new Uint8Array(0);
    this.batchCount = 0;
    this.batchDescs = 0;
    this.gN = 0;
  }

  get ready(): boolean {
    return this.size !== 0;
  }

  /** Checks the positions against the ring size and derives how many descriptors are in flight. */
  private checkBase(): void {
    const n = this.size;
    if (this.availPos >= n || this.usedPos >= n) {
      this.fail("RING_ADDR", this.availPos, `base 0x${this.getBase().toString(16)}: a position is past the ring size ${n}`);
    }
    const m = 2 * n;
    const d = (this.availPos + (this.availWrap ? 0 : n) - this.usedPos - (this.usedWrap ? 0 : n) + m) % m;
    if (d > n) this.fail("RING_ADDR", this.availPos, `base 0x${this.getBase().toString(16)}: avail is ${d} descriptors past used on a ring of ${n}`);
    this.inflightDescs = d;
  }

  /**
   * Takes the next available buffer, appending its elements to `r`
   * (device-readable) and `w` (device-writable), both reset first. Returns
   * its buffer id, or -1 when the descriptor at `availPos` is not available.
   */
  unpop(id: number): boolean {
    const n = this.size;
    if (n === 0 || id >= n || this.inflight !== null || this.resubmit.length > 0) return false;
    const count = this.chainLen[id]!;
    if (count === 0) return false;
    let pos = this.availPos - count, wrap = this.availWrap;
    if (pos < 0) {
      pos += n;
      wrap ^= 1;
    }
    // Only the last chain popped: it starts where the one before it ended.
    if (this.popPos[id] !== pos || this.popWrap[id] !== wrap) return false;
    if (this.inOrder && !this.hold.untaken(id)) return false;
    this.chainLen[id] = 0;
    this.inflightDescs -= count;
    this.availPos = pos;
    this.availWrap = wrap;
    return true;
  }

  pop(r: Pieces, w: Pieces): number {
    if (this.broken !== null) throw this.broken;
    const n = this.size;
    if (n === 0) return -1;
    if (this.resubmitPos < this.resubmit.length) return this.popStored(r, w);
    const d16 = this.d16, d32 = this.d32, base = this.dBase;
    let pos = this.availPos, wrap = this.availWrap;
    let o = base + pos * 4;
    // Acquire: pairs with the driver's barrier before its store of the first descriptor's flags
    // (§2.8.21.1.1 "Updating flags"); the chain, written before, is visible from here on.
    let flags = Atomics.load(d16, 2 * o + 7);
    if (!isAvail(flags, wrap)) return -1;
    r.reset();
    w.reset();
    const mem = this.mem;
    let count = 0;
    let total = 0;
    let wTotal = 0;
    let seenWrite = false;
    let id = 0;
    for (;;) {
      count++;
      const lo = d32[o]!, hi = d32[o + 1]!, len = d32[o + 2]!;
      id = d16[2 * o + 6]!;
      if (hi >= 0x200000) this.fail("BAD_ADDR", pos, `address 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} past 2^53`);
      const addr = lo + hi * 2 ** 32;
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        // §2.8.19: an indirect descriptor is never part of a NEXT-linked list (its WRITE bit is ignored).
        if (flags & VIRTQ_DESC_F_NEXT) this.fail("INDIRECT_NEXT", pos, "indirect descriptor with NEXT");
        if (count > 1) this.fail("INDIRECT_NEXT", pos, "indirect descriptor inside a chain");
        this.walkIndirect(addr, len, pos, r, w);
        wTotal = this.wTotal;
        break;
      }
      if (len === 0) this.fail("ZERO_LEN", pos);
      total += len;
      if (total > 0xffffffff) this.fail("TOTAL_LEN", pos, "chain longer than 4 GiB");
      if (flags & VIRTQ_DESC_F_WRITE) {
        seenWrite = true;
        wTotal += len;
        if (!mem.gpaPieces(addr, len, w, true)) this.fail("BAD_ADDR", pos, `0x${addr.toString(16)}+${len} not in guest memory`);
      } else {
        if (seenWrite) this.fail("ORDER", pos, "readable descriptor after a writable one");
        if (!mem.gpaPieces(addr, len, r)) this.fail("BAD_ADDR", pos, `0x${addr.toString(16)}+${len} not in guest memory`);
      }
      if (!(flags & VIRTQ_DESC_F_NEXT)) break;
      // §2.8.17: "MUST NOT create a descriptor list longer than the Queue Size".
      if (count === n) this.fail("LOOP", this.availPos, `chain longer than the ring (${n})`);
      if (++pos === n) {
        pos = 0;
        wrap ^= 1;
      }
      o = base + pos * 4;
      // Ordered by the acquire above. §2.8.6: every descriptor of the list carries the avail bits.
      flags = d16[2 * o + 7]!;
      if (!isAvail(flags, wrap)) this.fail("NEXT_RANGE", pos, `chain continues into descriptor ${pos}, which is not available`);
    }
    if (id >= n) this.fail("HEAD_RANGE", id, `buffer id ${id} >= queue size ${n}`);
    // A driver reuses a position only after seeing it used: more than the ring in flight is a driver bug.
    if (this.inflightDescs + count > n) {
      this.fail("AVAIL_IDX_JUMP", this.availPos, `${count} more descriptors with ${this.inflightDescs} in flight on a ring of ${n}`);
    }
    if (this.chainLen[id] !== 0) this.fail("HEAD_BUSY", id, `buffer id ${id} already in flight`);
    // Recorded before the device sees the buffer (the specification's order).
    if (this.inflight !== null) {
      try {
        this.inflight.taken(id, d16, d32, base, this.availPos, count, n);
      } catch (e) {
        if (e instanceof InflightAreaError || e instanceof RangeError) this.fail("RING_ADDR", id, `inflight area: ${e.message}`);
        throw e;
      }
    }
    this.chainLen[id] = count;
    this.popPos[id] = this.availPos;
    this.popWrap[id] = this.availWrap;
    this.inflightDescs += count;
    if (this.inOrder) {
      this.hold.taken(id);
      this.fullLen[id] = wTotal;
    }
    if (++pos === n) {
      pos = 0;
      wrap ^= 1;
    }
    this.availPos = pos;
    this.availWrap = wrap;
    return id;
  }

  /**
   * Appends the buffers of an indirect table (§2.8.7): `len / 16` packed
   * descriptors read in order. WRITE is the only flag that counts; NEXT and
   * the ids are reserved and ignored (the spec's words). INDIRECT is refused
   * rather than ignored: no driver may set it (§2.8.19), and reading a table
   * as data would hand the device the wrong bytes.
   */
  private walkIndirect(addr: number, len: number, at: number, r: Pieces, w: Pieces): void {
    if (len === 0 || (len & 15) !== 0) this.fail("INDIRECT_LEN", at, `table length ${len}`);
    const cnt = len >>> 4;
    if (cnt > PACKED_MAX_QUEUE_SIZE) this.fail("INDIRECT_LEN", at, `table of ${cnt} descriptors`);
    const s = this.indirectTable(addr, len, at);
    const t16 = s.u16, t32 = s.u32;
    const mem = this.mem;
    let o = s.off >>> 2;
    let total = 0;
    let wTotal = 0;
    let seenWrite = false;
    for (let k = 0; k < cnt; k++, o += 4) {
      const lo = t32[o]!, hi = t32[o + 1]!, dl = t32[o + 2]!;
      const f = t16[2 * o + 7]!;
      if (f & VIRTQ_DESC_F_INDIRECT) this.fail("NESTED_INDIRECT", k);
      if (hi >= 0x200000) this.fail("BAD_ADDR", k, `address 0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")} past 2^53`);
      const a = lo + hi * 2 ** 32;
      if (dl === 0) this.fail("ZERO_LEN", k, "in indirect table");
      total += dl;
      if (total > 0xffffffff) this.fail("TOTAL_LEN", k, "chain longer than 4 GiB");
      if (f & VIRTQ_DESC_F_WRITE) {
        seenWrite = true;
        wTotal += dl;
        if (!mem.gpaPieces(a, dl, w, true)) this.fail("BAD_ADDR", k, `0x${a.toString(16)}+${dl} not in guest memory`);
      } else {
        if (seenWrite) this.fail("ORDER", k, "readable descriptor after a writable one");
        if (!mem.gpaPieces(a, dl, r)) this.fail("BAD_ADDR", k, `0x${a.toString(16)}+${dl} not in guest memory`);
      }
    }
    this.wTotal = wTotal;
  }

  /** A view of an indirect table; copied to a private buffer when not 4-aligned or not contiguous (rare). */
  private indirectTable(addr: number, len: number, at: number): Span {
    const s = this.span;
    try {
      this.mem.gpaSpan(addr, len, s);
      if ((s.off & 3) === 0) return s;
    } catch (e) {
      if (!(e instanceof GuestMemoryError)) throw e;
    }
    if (this.bounce8.length < len) {
      this.bounce32 = new Uint32Array(len >>> 2);
      this.bounce16 = new Uint16Array(this.bounce32.buffer);
      this.bounce8 = new Uint8Array(this.bounce32.buffer);
    }
    const p = (this.tmp ??= new Pieces(16));
    p.reset();
    if (!this.mem.gpaPieces(addr, len, p)) this.fail("BAD_ADDR", at, `indirect table 0x${addr.toString(16)}+${len} not in guest memory`);
    let done = 0;
    for (let k = 0; k < p.count; k++) {
      const off = p.off[k]!, n = p.len[k]!;
      this.bounce8.set(p.win[k]!.subarray(off, off + n), done);
      done += n;
    }
    s.win = this.bounce8;
    s.u16 = this.bounce16;
    s.u32 = this.bounce32;
    s.off = 0;
    return s;
  }

  /**
   * Writes the used descriptor of buffer `id` (`len` bytes written) at
   * `usedPos` and moves `usedPos` past the ring descriptors its chain took.
   *
   * Ordering (the batch becomes visible at once, cf. §2.8.9 "Multi-buffer
   * requests"): id and len are plain stores; the flags of every entry but
   * the batch's first are stored (release) right here, after their own id and
   * len; the first entry's flags wait for `flush`. The driver reads used
   * descriptors in ring order from the batch's first position, where it finds
   * the descriptor it made available (not used), so it sees none of the batch
   * until `flush` stores those flags, and then all of it.
   */
  push(id: number, len: number): void {
    if (this.broken !== null || this.size === 0) return;
    const n = this.size;
    if (!(id >= 0 && id < n) || this.chainLen[id] === 0) this.fail("USED_HEAD", id, `buffer id ${id} is not in flight`);
    if (this.inOrder) return this.hold.done(id, len, this.emitFn);
    const count = this.chainLen[id]!;
    this.chainLen[id] = 0;
    this.inflightDescs -= count;
    this.inflight?.pushed(id);
    this.writeUsed(this.usedPos, this.usedWrap, id, len);
    this.advanceUsed(count);
  }

  /** Writes one used descriptor at `pos` (flags held back for the batch's first, see `push`). */
  private writeUsed(pos: number, wrap: number, id: number, len: number): void {
    const o = this.dBase + pos * 4;
    this.d32[o + 2] = len >>> 0;
    this.d16[2 * o + 6] = id;
    // §2.8.1: used = AVAIL and USED both equal to the device wrap counter; §2.8.3: WRITE when data was written.
    let flags = wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0;
    if (len !== 0) flags |= VIRTQ_DESC_F_WRITE;
    if (this.batchCount === 0) {
      this.batchFlagsAt = 2 * o + 7;
      this.batchFlags = flags;
    } else {
      Atomics.store(this.d16, 2 * o + 7, flags);
    }
    this.batchCount++;
  }

  /** Moves the used position past `count` ring descriptors (§2.8.6: "skips forward"). */
  private advanceUsed(count: number): void {
    this.batchDescs += count;
    let p = this.usedPos + count;
    if (p >= this.size) {
      p -= this.size;
      this.usedWrap ^= 1;
    }
    this.usedPos = p;
  }

  /**
   * In order: the next buffer in availability order is done. It extends the
   * current run while the run's last buffer was written whole (a driver
   * takes skipped buffers as fully written); otherwise the run is closed and
   * a new one starts at the used position. The run's one used descriptor
   * (written by closeRun) carries the id of its last buffer, and the used
   * position skips every descriptor of the run (packed "In-order use of descriptors").
   */
  private emitInOrder(id: number, len: number): void {
    const count = this.chainLen[id]!;
    this.chainLen[id] = 0;
    this.inflightDescs -= count;
    this.inflight?.pushed(id);
    if (this.gN > 0 && this.gLen === this.fullLen[this.gId]) {
      this.gN++;
    } else {
      if (this.gN > 0) this.closeRun();
      this.gPos = this.usedPos;
      this.gWrap = this.usedWrap;
      this.gN = 1;
    }
    this.gId = id;
    this.gLen = len;
    this.advanceUsed(count);
  }

  private closeRun(): void {
    this.writeUsed(this.gPos, this.gWrap, this.gId, this.gLen);
    this.gN = 0;
  }

  /**
   * Publishes the pushed batch (its first entry's flags) and says whether the
   * driver wants a used buffer notification (§2.8.10, §2.8.14): DISABLE no, ENABLE
   * yes, DESC (with EVENT_IDX) when the batch covered the position the driver
   * named. Returns false when nothing was pushed.
   */
  flush(): boolean {
    if (this.broken !== null || this.size === 0) return false;
    if (this.gN > 0) this.closeRun();
    if (this.batchCount === 0) return false;
    // Inflight: entries freed and used_idx recorded before the driver can see the batch, cleared after.
    this.inflight?.beforePublish(this.usedPos, this.usedWrap);
    // Release: every id, len and flags of the batch is visible before the first entry's flags.
    Atomics.store(this.d16, this.batchFlagsAt, this.batchFlags);
    this.inflight?.afterPublish();
    const count = this.batchDescs;
    this.batchCount = 0;
    this.batchDescs = 0;
    // The SC store above and this SC load are the full barrier between "publish used" and "read the
    // driver's suppression"; it pairs with the driver's barrier between writing its suppression and
    // re-checking for used descriptors. One 32-bit load reads off_wrap and flags together.
    const e = Atomics.load(this.drv32, this.drvBase);
    const flags = (e >>> 16) & 3;
    const valid = this.signalledValid;
    this.signalledValid = true;
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    // ENABLE, reserved 3, or DESC without EVENT_IDX negotiated: notify (cf. Linux vhost_notify_packed).
    if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) return true;
    return !valid || packedNeedEvent(this.size, e & 0xffff, this.usedPos, this.usedWrap, count);
  }

  /** Buffers of a previous back-end not resubmitted yet. */
  pendingResubmits(): number {
    return this.resubmit.length - this.resubmitPos;
  }

  /** Tracks in-flight buffers in `log` (null: stop tracking). */
  setInflight(log: PackedInflight | null): void {
    this.inflight = log;
    this.resubmit = [];
    this.resubmitPos = 0;
  }

  /**
   * The ring starts: with a fresh area (or `fresh`: the ring was stopped
   * cleanly by this process, so nothing is in flight), begin tracking from
   * the current used position. With an area a previous back-end filled,
   * queue its in-flight buffers for resubmission (in the order they were
   * taken) and continue where it was: the used position and wrap counter
   * from the area, the avail position that many descriptors further (both
   * sides step positions alike), whatever SET_VRING_BASE said (a front-end
   * cannot know what the dead back-end had taken). Returns the count.
   */
  startInflight(fresh = false): number {
    const log = this.inflight;
    if (log === null || !this.ready) return 0;
    this.resubmit = [];
    this.resubmitPos = 0;
    if (fresh || log.version === 0) {
      log.init(this.usedPos, this.usedWrap);
      return 0;
    }
    const n = this.size;
    let bufs: PackedInflightBuffer[];
    try {
      bufs = log.recover((p, wrap) => !isAvail(Atomics.load(this.d16, 2 * (this.dBase + p * 4) + 7), wrap));
    } catch (e) {
      if (e instanceof InflightAreaError || e instanceof RangeError) this.fail("RING_ADDR", 0, `inflight area: ${e.message}`);
      throw e;
    }
    this.chainLen.fill(0);
    let total = 0;
    for (const b of bufs) {
      if (this.chainLen[b.id] !== 0) this.fail("HEAD_BUSY", b.id, "inflight area: buffer id in flight twice");
      this.chainLen[b.id] = b.num;
      total += b.num;
    }
    if (total > n) this.fail("AVAIL_IDX_JUMP", total, `inflight area: ${total} descriptors in flight on a ring of ${n}`);
    this.usedPos = log.usedIdx;
    this.usedWrap = log.usedWrap & 1;
    // The positions of the buffers in flight belong to the device. The dead back-end may have left
    // used descriptors there that it never published (all of a batch but its first, see `push`):
    // the driver would take them for used when it reaches them, and the buffer, resubmitted, would
    // complete twice. Mark them available again (their contents are in the inflight area).
    let p = this.usedPos, wr = this.usedWrap;
    for (let k = 0; k < total; k++) {
      const at = 2 * (this.dBase + p * 4) + 7;
      const f = this.d16[at]!;
      if (((f >>> 7) & 1) === wr && ((f >>> 15) & 1) === wr) {
        this.d16[at] = (f & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | (wr ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
      }
      if (++p === n) {
        p = 0;
        wr ^= 1;
      }
    }
    this.availPos = p;
    this.availWrap = wr;
    this.inflightDescs = total;
    this.hold.reset(n);
    this.gN = 0;
    this.batchCount = 0;
    this.batchDescs = 0;
    this.signalledValid = false;
    this.resubmit = bufs;
    return bufs.length;
  }

  /**
   * Walks a resubmitted buffer from the descriptor copies in the inflight
   * area (its ring slots may hold other buffers' used descriptors by now),
   * with the checks of `pop`.
   */
  private popStored(r: Pieces, w: Pieces): number {
    // The position moves only after a whole walk: an IOTLB miss leaves the buffer to be retried.
    const b = this.resubmit[this.resubmitPos]!;
    const log = this.inflight!;
    const d = this.stored;
    r.reset();
    w.reset();
    let total = 0, wTotal = 0, seenWrite = false;
    for (let k = 0; k < b.num; k++) {
      try {
        log.stored(b.head, k, d);
      } catch (e) {
        if (e instanceof InflightAreaError || e instanceof RangeError) this.fail("RING_ADDR", b.id, `inflight area: ${e.message}`);
        throw e;
      }
      if (d.addr < 0) this.fail("BAD_ADDR", b.id, "stored address past 2^53");
      if (d.flags & VIRTQ_DESC_F_INDIRECT) {
        if (b.num !== 1) this.fail("INDIRECT_NEXT", b.id, "indirect descriptor inside a chain");
        this.walkIndirect(d.addr, d.len, b.id, r, w);
        wTotal = this.wTotal;
        break;
      }
      if (d.len === 0) this.fail("ZERO_LEN", b.id);
      total += d.len;
      if (total > 0xffffffff) this.fail("TOTAL_LEN", b.id, "chain longer than 4 GiB");
      if (d.flags & VIRTQ_DESC_F_WRITE) {
        seenWrite = true;
        wTotal += d.len;
        if (!this.mem.gpaPieces(d.addr, d.len, w, true)) this.fail("BAD_ADDR", b.id, `0x${d.addr.toString(16)}+${d.len} not in guest memory`);
      } else {
        if (seenWrite) this.fail("ORDER", b.id, "readable descriptor after a writable one");
        if (!this.mem.gpaPieces(d.addr, d.len, r)) this.fail("BAD_ADDR", b.id, `0x${d.addr.toString(16)}+${d.len} not in guest memory`);
      }
    }
    this.resubmitPos++;
    if (this.inOrder) {
      this.hold.taken(b.id);
      this.fullLen[b.id] = wTotal;
    }
    return b.id;
  }

  /** Writes the device area (one 32-bit store: the driver reads off_wrap and flags together). */
  private setDeviceEvent(flags: number, offWrap: number): void {
    const v = (offWrap | (flags << 16)) >>> 0;
    if (v === this.devShadow) return;
    this.devShadow = v;
    Atomics.store(this.dev32, this.devBase, v);
  }

  /**
   * Asks the driver to notify for the next available buffer: RING_EVENT_FLAGS_DESC
   * naming `availPos` under EVENT_IDX, else ENABLE. Returns true if a buffer
   * became available meanwhile, so the caller processes it instead of sleeping.
   */
  enableNotification(): boolean {
    if (this.broken !== null || this.size === 0) return false;
    if (this.eventIdx) this.setDeviceEvent(RING_EVENT_FLAGS_DESC, this.availPos | (this.availWrap << 15));
    else this.setDeviceEvent(RING_EVENT_FLAGS_ENABLE, this.devShadow < 0 ? 0 : this.devShadow & 0xffff);
    // SC store (above) then SC load: the re-check after re-enabling; pairs with the driver's barrier
    // between making a descriptor available and reading this area (§2.8.21.3.1).
    return isAvail(Atomics.load(this.d16, 2 * (this.dBase + this.availPos * 4) + 7), this.availWrap);
  }

  /** Asks the driver not to notify while we process (RING_EVENT_FLAGS_DISABLE, as QEMU does in both modes). */
  disableNotification(): void {
    if (this.broken !== null || this.size === 0) return;
    this.setDeviceEvent(RING_EVENT_FLAGS_DISABLE, this.devShadow < 0 ? 0 : this.devShadow & 0xffff);
  }

  /** GET_VRING_BASE: the positions and wrap counters in the vhost-user encoding (see `packedBase`). */
  getBase(): number {
    return packedBase(this.availPos, this.availWrap, this.usedPos, this.usedWrap);
  }

  /**
   * SET_VRING_BASE (encoding: `packedBase`). Checked against the ring size
   * when the rings are set (now, or at the next `setRings`); a used position
   * behind the avail position leaves that many descriptors counted in flight
   * (the front-end resubmits or forgets them). Setting the current value
   * again changes nothing (Vring re-applies the base around setRings).
   */
  setBase(num: number): void {
    if (!Number.isInteger(num) || num < 0 || num > 0xffffffff) this.fail("RING_ADDR", 0, `packed ring base ${num} is not a u32`);
    if (num === this.getBase()) return;
    this.availPos = num & 0x7fff;
    this.availWrap = (num >>> 15) & 1;
    if (num >>> 16 === 0 && (num & 0xffff) !== 0) {
      // Only the avail half (DPDK's virtio-user sends avail index | wrap << 15 and nothing
      // above): the used position is the same one, nothing in flight (as DPDK's and
      // libvhost-user's back-ends read it). (Both halves 0 is a fresh ring: the same.)
      this.usedPos = this.availPos;
      this.usedWrap = this.availWrap;
    } else {
      this.usedPos = (num >>> 16) & 0x7fff;
      this.usedWrap = num >>> 31;
    }
    this.chainLen.fill(0);
    this.inflightDescs = 0;
    this.hold.reset(this.chainLen.length);
    this.gN = 0;
    this.batchCount = 0;
    this.batchDescs = 0;
    this.signalledValid = false;
    if (this.size !== 0) this.checkBase();
  }
}

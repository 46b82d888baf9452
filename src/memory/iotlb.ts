/**
 * The device IOTLB (VIRTIO_F_ACCESS_PLATFORM with a vIOMMU): I/O virtual
 * addresses to front-end virtual addresses, with access permissions.
 *
 * Theory of operation: with ACCESS_PLATFORM negotiated, ring addresses
 * (SET_VRING_ADDR) and descriptor addresses are IOVAs. The front-end sends
 * IOTLB_MSG UPDATE (iova, size, uaddr, perm) and INVALIDATE (iova, size);
 * `uaddr` is a front-end virtual address inside the memory table, which
 * GuestMemory turns into a view of our mapping. A lookup that finds no entry
 * throws `IotlbMiss` (the ring asks the front-end with a back-end IOTLB_MSG
 * MISS and retries once the UPDATE arrives); an entry without the needed
 * permission throws `IotlbAccessError` (nothing is read or written).
 *
 * The table is sorted by iova with no two entries overlapping: an UPDATE
 * replaces whatever it overlaps (newest wins), an INVALIDATE removes or
 * trims. Each thread keeps its own table, changed by the same messages in
 * the same order (see VuDev and io_thread_worker.ts).
 */
import { GuestMemoryError } from "../errors.ts";
import type { GuestMemory, Span } from "./guest_memory.ts";
import type { Pieces } from "./pieces.ts";

/** struct vhost_iotlb_msg `perm` bits: the device may read (RO), write (WO), or both. */
export const PERM_RO = 1, PERM_WO = 2, PERM_RW = 3;

/** Addresses stay below 2^53 so that plain numbers are exact (the decoder refuses larger ones). */
const LIMIT = 2 ** 53;

/** No entry covers `iova`: ask the front-end (back-end IOTLB_MSG MISS with `perm`), then retry. */
export class IotlbMiss extends Error {
  override name = "IotlbMiss";
  constructor(readonly iova: number, readonly perm: number) {
    super(`IOTLB miss at iova 0x${iova.toString(16)} (${permName(perm)})`);
  }
}

/** An entry covers the range but lacks the permission: the access is refused, never made. */
export class IotlbAccessError extends Error {
  override name = "IotlbAccessError";
  readonly code = "IOTLB_PERM";
  constructor(readonly iova: number, readonly len: number, readonly perm: number, readonly has: number) {
    super(`IOTLB_PERM: ${permName(perm)} access to iova 0x${iova.toString(16)}+0x${len.toString(16)} refused: mapping is ${permName(has)}`);
  }
}

/** A front-end IOTLB entry we refuse (zero size, overflow, no permission, outside guest memory). */
export class IotlbEntryError extends Error {
  override name = "IotlbEntryError";
  constructor(readonly field: string, detail: string) {
    super(`IOTLB_MSG.${field}: ${detail}`);
  }
}

export function permName(p: number): string {
  return p === PERM_RW ? "read-write" : p === PERM_RO ? "read-only" : p === PERM_WO ? "write-only" : "no access";
}

/** One entry as plain data (tests, traces). */
export interface IotlbEntry { iova: number; size: number; uaddr: number; perm: number }

/**
 * The translation table of one thread, over that thread's GuestMemory.
 * @example
 * const t = new Iotlb(mem);                       // mem holds a region at uva 0x7f0000000000
 * t.update(0x1000_0000, 0x1000, 0x7f00_0000_0000, PERM_RW);
 * mem.iotlb = t;                                  // gpaPieces/gpaSpan now take IOVAs
 */
export class Iotlb {
  private start = new Float64Array(16);
  private end = new Float64Array(16);
  private uaddr = new Float64Array(16);
  private perm = new Uint8Array(16);
  /** Insertion order, to evict the oldest entry when full. */
  private seq = new Float64Array(16);
  private nextSeq = 0;
  private last = -1;
  count = 0;
  /** Bumped by every change. */
  generation = 0;
  /** Bumped when entries go (invalidation, eviction, clear): a miss asked before may need asking again. */
  drops = 0;

  constructor(private readonly mem: GuestMemory, readonly capacity = 8192) {}

  /** The entries in iova order. */
  entries(): IotlbEntry[] {
    const out: IotlbEntry[] = [];
    for (let i = 0; i < this.count; i++) {
      out.push({ iova: this.start[i]!, size: this.end[i]! - this.start[i]!, uaddr: this.uaddr[i]!, perm: this.perm[i]! });
    }
    return out;
  }

  clear(): void {
    this.count = 0;
    this.last = -1;
    this.generation++;
    this.drops++;
  }

  /**
   * UPDATE: maps [iova, iova + size) to [uaddr, uaddr + size) with `perm`,
   * replacing any overlapped part of older entries.
   * @throws IotlbEntryError for an empty or overflowing range, perm 0 or > 3,
   *   or a uaddr range not wholly inside the front-end's memory table
   */
  update(iova: number, size: number, uaddr: number, perm: number): void {
    if (!(size > 0) || !Number.isInteger(size)) throw new IotlbEntryError("size", `${size}`);
    if (!(iova >= 0) || iova > LIMIT - size) throw new IotlbEntryError("iova", `0x${iova.toString(16)} + 0x${size.toString(16)} ends past 2^53`);
    if (!(uaddr >= 0) || uaddr > LIMIT - size) throw new IotlbEntryError("uaddr", `0x${uaddr.toString(16)} + 0x${size.toString(16)} ends past 2^53`);
    if (perm < PERM_RO || perm > PERM_RW) throw new IotlbEntryError("perm", `${perm} grants no access`);
    if (!this.mem.uvaCovered(uaddr, size)) {
      throw new IotlbEntryError("uaddr", `0x${uaddr.toString(16)}+0x${size.toString(16)} is not inside the memory table`);
    }
    this.remove(iova, iova + size);
    if (this.count === this.capacity) this.evictOldest();
    const i = this.lowerBound(iova);
    this.insertAt(i, iova, iova + size, uaddr, perm);
    this.generation++;
  }

  /** INVALIDATE: removes [iova, iova + size) (entries overlapping it are trimmed). Returns whether anything changed. */
  invalidate(iova: number, size: number): boolean {
    if (!(size > 0)) return false;
    const end = Math.min(LIMIT, iova + size);
    const changed = this.remove(iova, end);
    if (changed) {
      this.generation++;
      this.drops++;
    }
    return changed;
  }

  /** Whether any entry overlaps [iova, iova + size). */
  overlaps(iova: number, size: number): boolean {
    const end = iova + size;
    const i = this.lowerBound(iova);
    if (i > 0 && this.end[i - 1]! > iova) return true;
    return i < this.count && this.start[i]! < end;
  }

  /** Index of the entry containing `iova`, or -1. */
  find(iova: number): number {
    const l = this.last;
    if (l >= 0 && l < this.count && iova >= this.start[l]! && iova < this.end[l]!) return l;
    const i = this.lowerBound(iova + 1) - 1;
    if (i >= 0 && iova < this.end[i]!) return (this.last = i);
    return -1;
  }

  /**
   * Appends the guest memory behind [iova, iova + len) to `out`, cut at
   * entry, region and window boundaries (pieces carry guest-physical
   * addresses, for dirty logging). Returns false when an entry points
   * outside guest memory.
   * @throws IotlbMiss when a byte of the range has no entry
   * @throws IotlbAccessError when an entry lacks the needed permission
   */
  pieces(iova: number, len: number, write: boolean, out: Pieces): boolean {
    const need = write ? PERM_WO : PERM_RO;
    while (len > 0) {
      const i = this.find(iova);
      if (i < 0) throw new IotlbMiss(iova, need);
      const has = this.perm[i]!;
      if ((has & need) === 0) throw new IotlbAccessError(iova, len, need, has);
      const n = Math.min(len, this.end[i]! - iova);
      if (!this.mem.uvaPieces(this.uaddr[i]! + (iova - this.start[i]!), n, out)) return false;
      iova += n;
      len -= n;
    }
    return true;
  }

  /**
   * Front-end virtual address of [iova, iova + len) when the whole range is
   * covered by entries with `perm` that are contiguous in the front-end's
   * address space (a ring spanning several page entries); otherwise throws.
   * @throws IotlbMiss, IotlbAccessError, or GuestMemoryError when the entries are not contiguous
   */
  uvaOf(iova: number, len: number, need: number): number {
    let i = this.find(iova);
    if (i < 0) throw new IotlbMiss(iova, need);
    const uva = this.uaddr[i]! + (iova - this.start[i]!);
    let at = iova;
    const end = iova + len;
    for (;;) {
      const has = this.perm[i]!;
      if ((has & need) !== need) throw new IotlbAccessError(iova, len, need, has);
      const e = this.end[i]!;
      if (e >= end) return uva;
      // The next entry must start where this one ends and continue the same user range.
      at = e;
      const j = i + 1;
      if (j >= this.count || this.start[j]! !== at) throw new IotlbMiss(at, need);
      if (this.uaddr[j]! !== uva + (at - iova)) throw new GuestMemoryError(iova, len, "IOTLB entries not contiguous in the front-end's memory");
      i = j;
    }
  }

  /** A contiguous view of [iova, iova + len); `need` is PERM_RO, PERM_WO or PERM_RW. */
  span(iova: number, len: number, need: number, out: Span): Span {
    return this.mem.uvaSpan(this.uvaOf(iova, len, need), len, out);
  }

  /** Guest-physical address behind `iova`, or -1 (no entry, or outside guest memory). */
  toGpa(iova: number): number {
    const i = this.find(iova);
    if (i < 0) return -1;
    return this.mem.uvaToGpa(this.uaddr[i]! + (iova - this.start[i]!));
  }

  /** First index whose start is >= iova. */
  private lowerBound(iova: number): number {
    let lo = 0, hi = this.count;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.start[mid]! < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Removes [s, e) from the table, trimming or splitting entries that straddle it. */
  private remove(s: number, e: number): boolean {
    let changed = false;
    let i = this.lowerBound(s);
    // An entry starting before s may reach into the range.
    if (i > 0 && this.end[i - 1]! > s) {
      const k = i - 1;
      const kEnd = this.end[k]!;
      this.end[k] = s;
      changed = true;
      if (kEnd > e) {
        // The range is strictly inside entry k: keep its tail as a new entry.
        this.insertAt(i, e, kEnd, this.uaddr[k]! + (e - this.start[k]!), this.perm[k]!, this.seq[k]!);
        this.last = -1;
        return true;
      }
    }
    let j = i;
    while (j < this.count && this.end[j]! <= e) j++;
    if (j > i) {
      this.deleteRange(i, j);
      changed = true;
    }
    if (i < this.count && this.start[i]! < e) {
      // Trim the head of the entry that continues past e.
      this.uaddr[i] = this.uaddr[i]! + (e - this.start[i]!);
      this.start[i] = e;
      changed = true;
    }
    if (changed) this.last = -1;
    return changed;
  }

  private insertAt(i: number, s: number, e: number, u: number, p: number, q = this.nextSeq++): void {
    if (this.count === this.start.length) this.grow();
    const n = this.count;
    this.start.copyWithin(i + 1, i, n);
    this.end.copyWithin(i + 1, i, n);
    this.uaddr.copyWithin(i + 1, i, n);
    this.perm.copyWithin(i + 1, i, n);
    this.seq.copyWithin(i + 1, i, n);
    this.start[i] = s;
    this.end[i] = e;
    this.uaddr[i] = u;
    this.perm[i] = p;
    this.seq[i] = q;
    this.count = n + 1;
    this.last = -1;
  }

  private deleteRange(i: number, j: number): void {
    const n = this.count;
    this.start.copyWithin(i, j, n);
    this.end.copyWithin(i, j, n);
    this.uaddr.copyWithin(i, j, n);
    this.perm.copyWithin(i, j, n);
    this.seq.copyWithin(i, j, n);
    this.count = n - (j - i);
    this.last = -1;
  }

  /** Full table: drop the entry inserted first (the front-end answers a later miss again). */
  private evictOldest(): void {
    let k = 0;
    for (let i = 1; i < this.count; i++) if (this.seq[i]! < this.seq[k]!) k = i;
    this.deleteRange(k, k + 1);
    this.drops++;
  }

  private grow(): void {
    const n = this.start.length * 2;
    const g = (a: Float64Array) => { const b = new Float64Array(n); b.set(a); return b; };
    this.start = g(this.start);
    this.end = g(this.end);
    this.uaddr = g(this.uaddr);
    this.seq = g(this.seq);
    const p = new Uint8Array(n);
    p.set(this.perm);
    this.perm = p;
  }
}

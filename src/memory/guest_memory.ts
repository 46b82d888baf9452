/**
 * Guest memory: the regions a front-end shared, and address translation.
 *
 * Two address spaces arrive from the front-end: guest physical addresses
 * (descriptors, indirect tables) and the front-end's own virtual addresses
 * (SET_VRING_ADDR). Every translation checks the whole range against one
 * region; nothing outside a region is ever viewed. Addresses are plain
 * numbers below 2^53 (the decoder refuses larger ones), so sums cannot lose
 * precision.
 */
import { GuestMemoryError } from "../errors.ts";
import type { MemRegion } from "../protocol/messages.ts";
import { DEFAULT_WINDOW_SIZE, MappedRegion, WINDOW_OVERLAP, type SharedRegion } from "./region.ts";
import type { Pieces } from "./pieces.ts";
import type { Iotlb } from "./iotlb.ts";

/** A contiguous view of guest memory: `win[off .. off + len)`. */
export interface Span {
  win: Uint8Array;
  /** The same window as u16 and u32 arrays (index = (off >> 1) or (off >> 2) when aligned). */
  u16: Uint16Array;
  u32: Uint32Array;
  off: number;
  host: number;
}

/** A Span to pass as `out` (translation fills it in place). */
export const newSpan = (): Span => ({ win: EMPTY, u16: EMPTY16, u32: EMPTY32, off: 0, host: 0 });

export class GuestMemory {
  readonly regions: MappedRegion[] = [];
  private last: MappedRegion | null = null;
  private lastUva: MappedRegion | null = null;
  /**
   * The device IOTLB while VIRTIO_F_ACCESS_PLATFORM is negotiated (null: off).
   * When set, the addresses given to gpaSpan/gpaPieces/ringSpan/ringGpa are
   * I/O virtual addresses, translated through it (see iotlb.ts).
   */
  iotlb: Iotlb | null = null;

  constructor(readonly windowSize = DEFAULT_WINDOW_SIZE) {}

  /**
   * Maps a region from `fd` (the fd is not kept). Refuses regions that overlap
   * an existing one in guest-physical or front-end-virtual space.
   */
  add(r: MemRegion, fd: number, maxRegions = Infinity): MappedRegion {
    if (this.regions.length >= maxRegions) {
      throw new GuestMemoryError(r.guestPhysAddr, r.memorySize, `no free memory slot (max ${maxRegions})`);
    }
    for (const o of this.regions) {
      if (r.guestPhysAddr < o.gpaEnd && o.gpa < r.guestPhysAddr + r.memorySize) {
        throw new GuestMemoryError(r.guestPhysAddr, r.memorySize, `overlaps region at gpa 0x${o.gpa.toString(16)}`);
      }
      if (r.userAddr < o.uvaEnd && o.uva < r.userAddr + r.memorySize) {
        throw new GuestMemoryError(r.userAddr, r.memorySize, `user address range overlaps region at 0x${o.uva.toString(16)}`);
      }
    }
    const m = MappedRegion.map(r, fd, this.windowSize);
    this.regions.push(m);
    return m;
  }

  /** Unmaps the region with exactly this gpa and size; returns whether one was found. */
  remove(gpa: number, size: number, uva?: number): boolean {
    const i = this.regions.findIndex((m) => m.gpa === gpa && m.size === size && (uva === undefined || m.uva === uva));
    if (i < 0) return false;
    const [m] = this.regions.splice(i, 1);
    if (this.last === m) this.last = null;
    if (this.lastUva === m) this.lastUva = null;
    m!.unmap();
    return true;
  }

  /** The regions as plain data, for another thread's `borrow`. */
  describe(): SharedRegion[] {
    return this.regions.map((m) => m.describe());
  }

  /** Replaces this memory's regions by views of regions mapped by another thread. */
  borrow(regions: readonly SharedRegion[]): void {
    this.clear();
    for (const d of regions) this.regions.push(MappedRegion.borrow(d, this.windowSize));
  }

  /** Unmaps everything (borrowed regions: drops the views only). */
  clear(): void {
    for (const m of this.regions) m.unmap();
    this.regions.length = 0;
    this.last = null;
    this.lastUva = null;
  }

  get size(): number {
    return this.regions.length;
  }

  private findGpa(gpa: number): MappedRegion | null {
    const l = this.last;
    if (l !== null && gpa >= l.gpa && gpa < l.gpaEnd) return l;
    const rs = this.regions;
    for (let i = 0; i < rs.length; i++) {
      const m = rs[i]!;
      if (gpa >= m.gpa && gpa < m.gpaEnd) return (this.last = m);
    }
    return null;
  }

  private contiguous(m: MappedRegion, off: number, len: number, addr: number, out: Span): Span {
    if (len > WINDOW_OVERLAP && Math.floor(off / this.windowSize) !== Math.floor((off + len - 1) / this.windowSize)) {
      throw new GuestMemoryError(addr, len, "longer than a window overlap and crosses a window");
    }
    const k = Math.floor(off / this.windowSize);
    out.win = m.windows[k]!;
    out.u16 = m.windows16[k]!;
    out.u32 = m.windows32[k]!;
    out.off = off - k * this.windowSize;
    out.host = m.host + off;
    return out;
  }

  /**
   * A contiguous view of `len` bytes at guest physical address `gpa`; throws
   * when the range is not inside one region (or is longer than a window overlap
   * and crosses a window).
   */
  gpaSpan(gpa: number, len: number, out: Span = newSpan()): Span {
    if (this.iotlb !== null) return this.iotlb.span(gpa, len, 1, out);
    const m = this.findGpa(gpa);
    if (m === null || len > m.gpaEnd - gpa) throw new GuestMemoryError(gpa, len);
    return this.contiguous(m, gpa - m.gpa, len, gpa, out);
  }

  /** As gpaSpan, for a front-end virtual address (ring addresses of SET_VRING_ADDR). */
  uvaSpan(uva: number, len: number, out: Span = newSpan()): Span {
    for (const m of this.regions) {
      if (uva >= m.uva && uva < m.uvaEnd) {
        if (len > m.uvaEnd - uva) break;
        return this.contiguous(m, uva - m.uva, len, uva, out);
      }
    }
    throw new GuestMemoryError(uva, len, "not in the front-end's shared memory");
  }

  /** Guest physical address of a front-end virtual address, or -1. */
  uvaToGpa(uva: number): number {
    for (const m of this.regions) if (uva >= m.uva && uva < m.uvaEnd) return m.gpa + (uva - m.uva);
    return -1;
  }

  /**
   * Appends `len` bytes at `gpa` to `out` as one or more pieces, cut at region
   * and window boundaries. Returns false (appending nothing further) when a
   * byte of the range is outside guest memory.
   */
  gpaPieces(gpa: number, len: number, out: Pieces, write = false): boolean {
    // With an IOTLB, `gpa` is an IOVA and `write` is checked against the entry's permission.
    if (this.iotlb !== null) return this.iotlb.pieces(gpa, len, write, out);
    const ws = this.windowSize;
    while (len > 0) {
      const m = this.findGpa(gpa);
      if (m === null) return false;
      const off = gpa - m.gpa;
      const k = Math.floor(off / ws);
      const inWin = off - k * ws;
      // Pieces are cut at window starts (not at the overlapped end) so that
      // a long buffer maps each byte exactly once.
      const n = Math.min(len, m.gpaEnd - gpa, ws - inWin);
      out.add(m.windows[k]!, inWin, n, m.host + off, gpa);
      gpa += n;
      len -= n;
    }
    return true;
  }

  private findUva(uva: number): MappedRegion | null {
    const l = this.lastUva;
    if (l !== null && uva >= l.uva && uva < l.uvaEnd) return l;
    const rs = this.regions;
    for (let i = 0; i < rs.length; i++) {
      const m = rs[i]!;
      if (uva >= m.uva && uva < m.uvaEnd) return (this.lastUva = m);
    }
    return null;
  }

  /** As gpaPieces, for a front-end virtual address (IOTLB entries point there). */
  uvaPieces(uva: number, len: number, out: Pieces): boolean {
    const ws = this.windowSize;
    while (len > 0) {
      const m = this.findUva(uva);
      if (m === null) return false;
      const off = uva - m.uva;
      const k = Math.floor(off / ws);
      const inWin = off - k * ws;
      const n = Math.min(len, m.uvaEnd - uva, ws - inWin);
      out.add(m.windows[k]!, inWin, n, m.host + off, m.gpa + off);
      uva += n;
      len -= n;
    }
    return true;
  }

  /** Whether every byte of [uva, uva + len) lies in some region. */
  uvaCovered(uva: number, len: number): boolean {
    while (len > 0) {
      const m = this.findUva(uva);
      if (m === null) return false;
      const n = Math.min(len, m.uvaEnd - uva);
      uva += n;
      len -= n;
    }
    return true;
  }

  /**
   * A ring of SET_VRING_ADDR: a front-end virtual address, or an IOVA needing
   * `perm` (1 read, 2 write, 3 both) while the IOTLB is on.
   * @throws GuestMemoryError, or IotlbMiss / IotlbAccessError with the IOTLB
   */
  ringSpan(addr: number, len: number, perm: number, out: Span = newSpan()): Span {
    return this.iotlb !== null ? this.iotlb.span(addr, len, perm, out) : this.uvaSpan(addr, len, out);
  }

  /** Guest physical address of a ring address (front-end virtual, or IOVA with the IOTLB), or -1. */
  ringGpa(addr: number): number {
    return this.iotlb !== null ? this.iotlb.toGpa(addr) : this.uvaToGpa(addr);
  }
}

const EMPTY = new Uint8Array(0);
const EMPTY16 = new Uint16Array(0);
const EMPTY32 = new Uint32Array(0);

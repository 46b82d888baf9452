/**
 * One guest memory region mapped into this process.
 *
 * `toArrayBuffer` refuses more than 4 GiB, so a region is viewed through
 * windows of WINDOW_SIZE bytes. Windows overlap by WINDOW_OVERLAP bytes: any
 * range up to that length (every ring, every indirect table) lies inside one
 * window and gets one contiguous view; longer guest buffers are cut at window
 * starts into several pieces.
 */
import { toArrayBuffer } from "bun:ffi";
import * as sys from "../../ffi/sys.ts";
import { MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE } from "../../ffi/constants.ts";
import { GuestMemoryError } from "../errors.ts";
import type { MemRegion } from "../protocol/messages.ts";

export const DEFAULT_WINDOW_SIZE = 1 << 30;
export const WINDOW_OVERLAP = 4 << 20;

/** A view of `len` bytes at host address `host` (memory mapped by this process, e.g. the inflight buffer). */
export function hostView(host: number, len: number): Uint8Array {
  return new Uint8Array(toArrayBuffer(host as any, 0, len));
}

/** A mapped region as passed between threads (plain data). */
export interface SharedRegion { gpa: number; size: number; uva: number; mmapOffset: number; host: number }

export class MappedRegion {
  /** Views over the mapping; window k starts at byte k * windowSize of the region. */
  readonly windows: Uint8Array[] = [];
  /** The same windows as u16/u32 arrays (rings and descriptor tables are read through these, no per-request views). */
  readonly windows16: Uint16Array[] = [];
  readonly windows32: Uint32Array[] = [];
  readonly gpaEnd: number;
  readonly uvaEnd: number;
  private mapped = true;

  /** What another thread needs to view this region (the mapping stays owned here). */
  describe(): SharedRegion {
    return { gpa: this.gpa, size: this.size, uva: this.uva, mmapOffset: this.mmapOffset, host: this.host };
  }

  /**
   * Views a region mapped by another thread of this process. The views are
   * dropped by unmap(); the mapping itself belongs to the thread that made it,
   * which unmaps only after every borrower dropped its views.
   */
  static borrow(d: SharedRegion, windowSize = DEFAULT_WINDOW_SIZE): MappedRegion {
    return new MappedRegion(d.gpa, d.size, d.uva, d.mmapOffset, d.host, 0, 0, windowSize);
  }

  private constructor(
    readonly gpa: number, readonly size: number, readonly uva: number, readonly mmapOffset: number,
    /** Address of the region's first byte in this process. */
    readonly host: number,
    private readonly mapBase: number, private readonly mapLen: number,
    readonly windowSize: number,
  ) {
    this.gpaEnd = gpa + size;
    this.uvaEnd = uva + size;
    for (let start = 0; start < size; start += windowSize) {
      const len = Math.min(size - start, windowSize + WINDOW_OVERLAP);
      const ab = toArrayBuffer((host + start) as any, 0, len);
      this.windows.push(new Uint8Array(ab));
      this.windows16.push(new Uint16Array(ab, 0, len >>> 1));
      this.windows32.push(new Uint32Array(ab, 0, len >>> 2));
    }
  }

  /**
   * Maps `r` from `fd` (shared, read/write). The fd is not kept: the mapping
   * holds the memory, so the caller closes the fd right after.
   * @example const reg = MappedRegion.map({ guestPhysAddr: 0, memorySize: 1 << 20, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }, memfd)
   */
  static map(r: MemRegion, fd: number, windowSize = DEFAULT_WINDOW_SIZE): MappedRegion {
    if (windowSize <= 0 || windowSize % 4096 !== 0 || windowSize + WINDOW_OVERLAP > 2 ** 32) {
      throw new RangeError(`window size ${windowSize}`);
    }
    // mmap needs a page-aligned offset; map from the page below and skip the rest.
    // A mapping past the end of the file faults with SIGBUS on first touch,
    // which would kill the process: check the size before mapping.
    const st = sys.fstat(fd);
    if ((st.isRegular || st.isBlock) && st.size < r.mmapOffset + r.memorySize) {
      throw new GuestMemoryError(r.guestPhysAddr, r.memorySize,
        `fd holds ${st.size} bytes, region needs offset ${r.mmapOffset} + ${r.memorySize}`);
    }
    const pageOff = r.mmapOffset % 4096;
    const base = r.mmapOffset - pageOff;
    const len = r.memorySize + pageOff;
    const p = sys.mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, base);
    try {
      return new MappedRegion(r.guestPhysAddr, r.memorySize, r.userAddr, r.mmapOffset, p + pageOff, p, len, windowSize);
    } catch (e) {
      sys.munmap(p, len);
      throw e;
    }
  }

  get isMapped(): boolean {
    return this.mapped;
  }

  /** Drops the views and unmaps. Callers make sure no request still uses the views. */
  unmap(): void {
    if (!this.mapped) return;
    this.mapped = false;
    this.windows.length = 0;
    this.windows16.length = 0;
    this.windows32.length = 0;
    if (this.mapLen > 0) sys.munmap(this.mapBase, this.mapLen);
  }
}

/**
 * "Guest RAM" of the test front-end: one memfd, mapped once in this process,
 * shared with the back-end as one or more vhost-user memory regions.
 *
 * Theory of operation. The memfd is cut, in file order, into regions; each
 * region gets a guest physical address (gpa) of its own, so the gpa layout can
 * differ from the file layout: by default the memfd's two halves are swapped
 * (file [0, S/2) is gpa [S/2, S), file [S/2, S) is gpa [0, S/2)). The two
 * regions still touch in gpa space, so a buffer can cross from one into the
 * other while the back-end must map them separately: a back-end that assumes
 * a buffer is contiguous in its own address space reads the wrong bytes.
 * Layouts with holes (gpa ranges no region covers) are one option away.
 *
 * Like QEMU, the front-end's own address of each region (our mmap plus the
 * region's file offset) is its "user address": SET_VRING_ADDR speaks in user
 * addresses, descriptors in gpas.
 *
 * Allocation is a bump pointer per region, in gpa order; `mark`/`release`
 * rewind it. Around each boundary where two regions touch, a zone is kept out
 * of ordinary allocation so that `crossing()` can always hand out a buffer
 * that straddles the boundary.
 */
import * as sys from "../../ffi/sys.ts";
import { Pinned } from "../../ffi/structs.ts";
import { MAP_SHARED, PROT_READ, PROT_WRITE } from "../../ffi/constants.ts";
import { GuestMemoryError } from "../errors.ts";
import type { MemRegion } from "../protocol/messages.ts";

/** One region in the layout: where it sits in guest physical space and how big it is. */
export interface RamLayout {
  gpa: number;
  size: number;
}

export interface GuestRamOptions {
  /** Total bytes (default 64 MiB); with `regions`, the sum of their sizes. */
  size?: number;
  /** Regions in memfd order; each a multiple of 4 KiB. Default: the two halves, swapped (see the file comment). */
  regions?: RamLayout[];
  /** Bytes kept free on each side of every boundary for `crossing()` (default 1 MiB, capped at a quarter region). */
  crossZone?: number;
  /** memfd name (shows in /proc/PID/maps of the back-end). */
  name?: string;
}

/** A region as mapped: gpa range, place in the memfd, front-end ("user") address. */
export interface RamRegion {
  readonly gpa: number;
  readonly size: number;
  readonly gpaEnd: number;
  /** Offset in the memfd, and in `GuestRam.u8`. */
  readonly fileOffset: number;
  /** Our virtual address of the region's first byte (sent as `userAddr`). */
  readonly userAddr: number;
}

interface Bump {
  r: RamRegion;
  next: number; // next free gpa
  limit: number; // ordinary allocation ends here (a crossing zone may follow)
  floor: number; // ordinary allocation starts here (a crossing zone may precede)
}

const PAGE = 4096;
const alignUp = (v: number, a: number) => Math.ceil(v / a) * a;

export class GuestRam {
  /** The memfd; passed with SET_MEM_TABLE / ADD_MEM_REG (the kernel duplicates it). */
  readonly fd: number;
  readonly size: number;
  /** Our address of the mapping (file offset 0). */
  readonly host: number;
  /** The whole memfd, indexed by file offset. */
  readonly u8: Uint8Array;
  readonly dv: DataView;
  /** Regions sorted by gpa. */
  readonly regions: readonly RamRegion[];
  /** Regions in memfd order (the order of `memRegions()`). */
  readonly fileOrder: readonly RamRegion[];
  /** Gpas where one region ends and the next begins (buffers may cross these). */
  readonly boundaries: readonly number[];
  readonly crossZone: number;
  private readonly bumps: Bump[];
  private readonly mem: Pinned;
  private closed = false;

  constructor(o: GuestRamOptions = {}) {
    const layout = o.regions ?? GuestRam.swappedHalves(o.size ?? 64 << 20);
    if (layout.length === 0) throw new RangeError("GuestRam: no regions");
    let size = 0;
    for (const l of layout) {
      if (l.size <= 0 || l.size % PAGE !== 0 || l.gpa % PAGE !== 0) {
        throw new RangeError(`GuestRam: region gpa 0x${l.gpa.toString(16)} size 0x${l.size.toString(16)} not page-aligned`);
      }
      size += l.size;
    }
    if (size >= 2 ** 32) throw new RangeError(`GuestRam: ${size} bytes; at most 4 GiB - 1 can be viewed`);
    this.size = size;
    this.fd = sys.memfdCreate(o.name ?? "bunvhost-guest-ram");
    try {
      sys.ftruncate(this.fd, size);
      const p = sys.mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, 0);
      this.mem = new Pinned(p, size);
    } catch (e) {
      sys.closeQuiet(this.fd);
      throw e;
    }
    this.host = this.mem.ptr;
    this.u8 = this.mem.u8;
    this.dv = this.mem.dv;

    const file: RamRegion[] = [];
    let off = 0;
    for (const l of layout) {
      file.push({ gpa: l.gpa, size: l.size, gpaEnd: l.gpa + l.size, fileOffset: off, userAddr: this.host + off });
      off += l.size;
    }
    this.fileOrder = file;
    const sorted = [...file].sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < sorted.length; i++) {
      if (sorted[i]!.gpa < sorted[i - 1]!.gpaEnd) throw new RangeError("GuestRam: regions overlap in gpa space");
    }
    this.regions = sorted;
    const minRegion = Math.min(...sorted.map((r) => r.size));
    this.crossZone = Math.min(o.crossZone ?? 1 << 20, Math.floor(minRegion / 4 / PAGE) * PAGE);
    const b: number[] = [];
    this.bumps = sorted.map((r) => ({ r, next: r.gpa, floor: r.gpa, limit: r.gpaEnd }));
    for (let i = 1; i < sorted.length; i++) {
      if (sorted[i]!.gpa === sorted[i - 1]!.gpaEnd) {
        b.push(sorted[i]!.gpa);
        this.bumps[i - 1]!.limit -= this.crossZone;
        this.bumps[i]!.floor += this.crossZone;
        this.bumps[i]!.next = this.bumps[i]!.floor;
      }
    }
    this.boundaries = b;
  }

  /** The default layout: two halves of `size`, touching at gpa size/2, in swapped file order. */
  static swappedHalves(size: number): RamLayout[] {
    const half = alignUp(Math.ceil(size / 2), 2 << 20);
    return [{ gpa: half, size: half }, { gpa: 0, size: half }];
  }

  /** The SET_MEM_TABLE regions (memfd order); send `fd` once per region. */
  memRegions(): MemRegion[] {
    return this.fileOrder.map((r) => ({
      guestPhysAddr: r.gpa, memorySize: r.size, userAddr: r.userAddr, mmapOffset: r.fileOffset,
    }));
  }

  /** The region holding `gpa`, or null. */
  regionOf(gpa: number): RamRegion | null {
    for (const r of this.regions) if (gpa >= r.gpa && gpa < r.gpaEnd) return r;
    return null;
  }

  /** Offset in `u8` of `[gpa, gpa+len)`, which must lie in one region. */
  offset(gpa: number, len: number): number {
    const r = this.regionOf(gpa);
    if (r === null || gpa + len > r.gpaEnd) throw new GuestMemoryError(gpa, len, "not inside one region of the front-end's RAM");
    return r.fileOffset + (gpa - r.gpa);
  }

  /** Our user address of `gpa` (what SET_VRING_ADDR carries for a ring there). */
  uva(gpa: number): number {
    return this.host + this.offset(gpa, 1);
  }

  /** A view of `[gpa, gpa+len)` (one region); valid until `close()`. */
  view(gpa: number, len: number): Uint8Array {
    const o = this.offset(gpa, len);
    return this.u8.subarray(o, o + len);
  }

  /** Copies `src` to `gpa`, across region boundaries if it must. */
  write(gpa: number, src: Uint8Array): void {
    let done = 0;
    while (done < src.length) {
      const r = this.regionOf(gpa + done);
      if (r === null) throw new GuestMemoryError(gpa + done, src.length - done, "not in the front-end's RAM");
      const n = Math.min(src.length - done, r.gpaEnd - (gpa + done));
      this.u8.set(src.subarray(done, done + n), r.fileOffset + (gpa + done - r.gpa));
      done += n;
    }
  }

  /** Copies `[gpa, gpa+out.length)` into `out`, across region boundaries if it must. */
  read(gpa: number, out: Uint8Array): Uint8Array {
    let done = 0;
    while (done < out.length) {
      const r = this.regionOf(gpa + done);
      if (r === null) throw new GuestMemoryError(gpa + done, out.length - done, "not in the front-end's RAM");
      const n = Math.min(out.length - done, r.gpaEnd - (gpa + done));
      const o = r.fileOffset + (gpa + done - r.gpa);
      out.set(this.u8.subarray(o, o + n), done);
      done += n;
    }
    return out;
  }

  fill(gpa: number, len: number, byte: number): void {
    let done = 0;
    while (done < len) {
      const r = this.regionOf(gpa + done);
      if (r === null) throw new GuestMemoryError(gpa + done, len - done, "not in the front-end's RAM");
      const n = Math.min(len - done, r.gpaEnd - (gpa + done));
      const o = r.fileOffset + (gpa + done - r.gpa);
      this.u8.fill(byte, o, o + n);
      done += n;
    }
  }

  /**
   * `len` bytes aligned to `align`, inside one region, outside the crossing
   * zones; throws RangeError when no region has room.
   */
  alloc(len: number, align = 16): number {
    if (len <= 0) throw new RangeError(`GuestRam.alloc: length ${len}`);
    for (const b of this.bumps) {
      const at = alignUp(b.next, align);
      if (at + len <= b.limit) {
        b.next = at + len;
        return at;
      }
    }
    throw new RangeError(`GuestRam.alloc: no region has ${len} free bytes (RAM ${this.size} bytes)`);
  }

  /** The allocation state, for `release`. */
  mark(): number[] {
    return this.bumps.map((b) => b.next);
  }

  /** Frees everything allocated since `m = mark()`. */
  release(m: number[]): void {
    this.bumps.forEach((b, i) => (b.next = m[i]!));
  }

  /**
   * A gpa such that `[gpa, gpa+len)` crosses boundary `i`, with `before`
   * bytes below it. The zone is shared: one crossing buffer per boundary may
   * be in use at a time (two ranges that both hold the boundary overlap).
   */
  crossing(len: number, before = len >>> 1, i = 0): number {
    const at = this.boundaries[i];
    if (at === undefined) throw new RangeError(`GuestRam.crossing: no boundary ${i} (layout has ${this.boundaries.length})`);
    if (before <= 0 || before >= len || before > this.crossZone || len - before > this.crossZone) {
      throw new RangeError(`GuestRam.crossing: ${len} bytes with ${before} before the boundary; zone is ${this.crossZone} each side`);
    }
    return at - before;
  }

  /** Unmaps and closes the memfd; views taken from this object must not be used afterwards. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.mem.free();
    sys.closeQuiet(this.fd);
  }
}

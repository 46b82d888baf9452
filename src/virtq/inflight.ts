/**
 * Inflight I/O tracking for split rings (SplitInflight) and packed rings
 * (PackedInflight, further down) (vhost-user INFLIGHT_SHMFD,
 * "Inflight I/O tracking" in the specification): a per-queue area of shared
 * memory that outlives the back-end process. A chain is marked in flight
 * (with a global counter giving the order) before the device sees it, and
 * cleared only after its used entry is published; a back-end that restarts
 * reads the area and resubmits what was in flight, in order. Layout (little
 * endian), one area per queue, each 64-byte aligned:
 *
 *   0  u64 features   8 u16 version   10 u16 desc_num   12 u16 last_batch_head   14 u16 used_idx
 *   16 + 16*i: u8 inflight, 5 bytes padding, u16 next, u64 counter     (i < desc_num)
 */

export const INFLIGHT_ALIGN = 64;
export const INFLIGHT_VERSION = 1;
const HDR = 16, DESC = 16;

/** Bytes of one queue's area for a ring of `queueSize` entries. */
export function splitInflightQueueSize(queueSize: number): number {
  return Math.ceil((HDR + DESC * queueSize) / INFLIGHT_ALIGN) * INFLIGHT_ALIGN;
}

export class SplitInflight {
  private readonly dv: DataView;
  private readonly u8: Uint8Array;
  /** Next counter value (orders the chains taken). */
  private counter = 1;
  /** Heads pushed since the last publish (the batch the area's last_batch_head list describes). */
  private batch: Uint16Array;
  private batchLen = 0;

  /** `area` is this queue's area of the shared buffer, at least splitInflightQueueSize(descNum) bytes. */
  constructor(area: Uint8Array, readonly descNum: number) {
    if (area.length < splitInflightQueueSize(descNum)) throw new RangeError(`inflight area of ${area.length} bytes < ${splitInflightQueueSize(descNum)}`);
    this.u8 = area;
    this.dv = new DataView(area.buffer, area.byteOffset, area.length);
    this.batch = new Uint16Array(descNum);
  }

  get version(): number {
    return this.dv.getUint16(8, true);
  }

  /** A fresh area (version 0): start tracking from the ring's current used index. */
  init(usedIdx: number): void {
    this.u8.fill(0, 0, HDR + DESC * this.descNum);
    this.dv.setUint16(10, this.descNum, true);
    this.dv.setUint16(14, usedIdx, true);
    this.dv.setUint16(8, INFLIGHT_VERSION, true);
    this.counter = 1;
  }

  /**
   * After a restart: fixes up the last batch if the previous back-end died
   * between publishing used.idx and clearing the batch, and returns the
   * heads still in flight in the order they were taken.
   */
  recover(usedIdx: number): number[] {
    const dv = this.dv;
    if (dv.getUint16(10, true) !== this.descNum) throw new RangeError(`inflight area for ${dv.getUint16(10, true)} descriptors, ring has ${this.descNum}`);
    const logged = dv.getUint16(14, true);
    if (logged !== usedIdx) {
      // used.idx was published for a batch whose entries were not cleared yet: clear them now.
      let n = (usedIdx - logged) & 0xffff;
      let h = dv.getUint16(12, true);
      for (let guard = 0; n > 0 && guard < this.descNum && h < this.descNum; n--, guard++) {
        this.u8[HDR + DESC * h] = 0;
        h = dv.getUint16(HDR + DESC * h + 6, true);
      }
      dv.setUint16(14, usedIdx, true);
    }
    const found: [number, number][] = [];
    let max = 0;
    for (let i = 0; i < this.descNum; i++) {
      if (this.u8[HDR + DESC * i] !== 1) continue;
      const c = Number(dv.getBigUint64(HDR + DESC * i + 8, true));
      found.push([c, i]);
      if (c > max) max = c;
    }
    found.sort((a, b) => a[0] - b[0]);
    this.counter = max + 1;
    return found.map((f) => f[1]);
  }

  /** The device is about to see chain `head`. */
  taken(head: number): void {
    const o = HDR + DESC * head;
    this.dv.setUint32(o + 8, this.counter % 2 ** 32, true);
    this.dv.setUint32(o + 12, Math.floor(this.counter / 2 ** 32), true);
    this.counter++;
    this.u8[o] = 1;
  }

  /** Chain `head` was given back unused (it is available again, not in flight). */
  untaken(head: number): void {
    this.u8[HDR + DESC * head] = 0;
  }

  /** Chain `head` is in the used ring (not yet published). */
  pushed(head: number): void {
    this.dv.setUint16(HDR + DESC * head + 6, this.dv.getUint16(12, true), true);
    this.dv.setUint16(12, head, true);
    this.batch[this.batchLen++] = head;
  }

  /** used.idx = `usedIdx` is published: the batch is no longer in flight. */
  published(usedIdx: number): void {
    const b = this.batch;
    for (let i = 0; i < this.batchLen; i++) this.u8[HDR + DESC * b[i]!] = 0;
    this.batchLen = 0;
    this.dv.setUint16(14, usedIdx, true);
  }
}

/*
 * Packed rings (QueueRegionPacked / DescStatePacked of the specification).
 * One queue's area, little endian:
 *
 *   0 u64 features  8 u16 version  10 u16 desc_num  12 u16 free_head  14 u16 old_free_head
 *   16 u16 used_idx  18 u16 old_used_idx  20 u8 used_wrap_counter  21 u8 old_used_wrap_counter  (padding to 32)
 *   32 + 32*i: u8 inflight, u8 pad, u16 next, u16 last, u16 num, u64 counter, u16 id, u16 flags, u32 len, u64 addr
 *
 * A buffer's ring descriptors are copied into entries taken from a free list
 * (the driver may overwrite its ring slots with used descriptors of other
 * buffers, so the ring alone cannot say what was in flight). Taking follows
 * the specification's steps (head marked in flight with the global counter,
 * then each descriptor copied, then old_free_head moved on); giving back
 * happens for a whole published batch in `flush` order: entries relinked to
 * the free list and used_idx/wrap stored before the driver can see the batch,
 * in-flight flags cleared and the old_* copies committed after. A restart
 * that finds old_* and the current values apart looks at the ring to decide
 * whether the batch was published (commit) or not (roll back).
 */
const PHDR = 32, PDESC = 32;

/** Bytes of one queue's packed area for a ring of `queueSize` entries (64-byte aligned). */
export function packedInflightQueueSize(queueSize: number): number {
  return Math.ceil((PHDR + PDESC * queueSize) / INFLIGHT_ALIGN) * INFLIGHT_ALIGN;
}

/** Bytes of one queue's area for either layout. */
export function inflightQueueSize(queueSize: number, packed: boolean): number {
  return packed ? packedInflightQueueSize(queueSize) : splitInflightQueueSize(queueSize);
}

/** One in-flight buffer found in a packed area after a restart. */
export interface PackedInflightBuffer {
  /** First entry of its descriptor copies (follow `next` for `num` entries). */
  head: number;
  id: number;
  /** Ring descriptors the buffer took. */
  num: number;
}

/** Thrown for an area whose contents cannot be a valid packed inflight area (a front-end bug or attack). */
export class InflightAreaError extends Error {
  override name = "InflightAreaError";
}

export class PackedInflight {
  private readonly dv: DataView;
  private readonly u8: Uint8Array;
  private counter = 1;
  /** Head entry of each buffer id in flight. */
  readonly entryOf: Int32Array;
  /** Head entries of the batch pushed since the last publish. */
  private batch: Uint16Array;
  private batchLen = 0;

  /** `area` is this queue's area, at least packedInflightQueueSize(descNum) bytes. */
  constructor(area: Uint8Array, readonly descNum: number) {
    if (area.length < packedInflightQueueSize(descNum)) throw new RangeError(`inflight area of ${area.length} bytes < ${packedInflightQueueSize(descNum)}`);
    this.u8 = area;
    this.dv = new DataView(area.buffer, area.byteOffset, area.length);
    this.entryOf = new Int32Array(descNum).fill(-1);
    this.batch = new Uint16Array(descNum);
  }

  get version(): number {
    return this.dv.getUint16(8, true);
  }
  get freeHead(): number {
    return this.dv.getUint16(12, true);
  }
  get usedIdx(): number {
    return this.dv.getUint16(16, true);
  }
  get usedWrap(): number {
    return this.u8[20]!;
  }

  /** A fresh area: every entry free (a list 0 → 1 → …), used position where the ring is now. */
  init(usedPos: number, usedWrap: number): void {
    const n = this.descNum, dv = this.dv;
    this.u8.fill(0, 0, PHDR + PDESC * n);
    dv.setUint16(10, n, true);
    for (let i = 0; i < n; i++) dv.setUint16(PHDR + PDESC * i + 2, i + 1, true);
    dv.setUint16(16, usedPos, true);
    dv.setUint16(18, usedPos, true);
    this.u8[20] = this.u8[21] = usedWrap;
    dv.setUint16(8, INFLIGHT_VERSION, true);
    this.counter = 1;
    this.entryOf.fill(-1);
    this.batchLen = 0;
  }

  private entry(e: number): number {
    if (!(e >= 0 && e < this.descNum)) throw new InflightAreaError(`inflight entry ${e} >= ${this.descNum} (free list corrupt)`);
    return PHDR + PDESC * e;
  }

  /**
   * The device is about to see buffer `id`: its `count` ring descriptors,
   * read from `d16`/`d32` (the descriptor ring views, descriptor 0 at u32
   * index `base`) from position `pos` on, are copied into free entries.
   */
  taken(id: number, d16: Uint16Array, d32: Uint32Array, base: number, pos: number, count: number, size: number): void {
    const dv = this.dv;
    const h = dv.getUint16(14, true); // old_free_head (= free_head between buffers)
    const ho = this.entry(h);
    dv.setUint16(ho + 6, 0, true);
    dv.setUint32(ho + 8, this.counter % 2 ** 32, true);
    dv.setUint32(ho + 12, Math.floor(this.counter / 2 ** 32), true);
    this.counter++;
    this.u8[ho] = 1;
    let f = dv.getUint16(12, true);
    for (let k = 0; k < count; k++) {
      const eo = this.entry(f);
      if (k === count - 1) dv.setUint16(ho + 4, f, true);
      dv.setUint16(ho + 6, k + 1, true);
      const o = base + pos * 4;
      dv.setUint16(eo + 16, d16[2 * o + 6]!, true);
      dv.setUint16(eo + 18, d16[2 * o + 7]!, true);
      dv.setUint32(eo + 20, d32[o + 2]!, true);
      dv.setUint32(eo + 24, d32[o]!, true);
      dv.setUint32(eo + 28, d32[o + 1]!, true);
      f = dv.getUint16(eo + 2, true);
      if (++pos === size) pos = 0;
    }
    dv.setUint16(12, f, true);
    dv.setUint16(14, f, true);
    this.entryOf[id] = h;
  }

  /** Buffer `id` is in the used ring (published by the next flush). */
  pushed(id: number): void {
    const h = this.entryOf[id]!;
    if (h < 0) return;
    this.entryOf[id] = -1;
    this.batch[this.batchLen++] = h;
  }

  /** Before the batch becomes visible: entries back to the free list, the new used position recorded. */
  beforePublish(usedPos: number, usedWrap: number): void {
    const dv = this.dv;
    let free = dv.getUint16(12, true);
    for (let i = 0; i < this.batchLen; i++) {
      const h = this.batch[i]!;
      const last = dv.getUint16(this.entry(h) + 4, true);
      dv.setUint16(this.entry(last) + 2, free, true);
      free = h;
    }
    dv.setUint16(12, free, true);
    dv.setUint16(16, usedPos, true);
    this.u8[20] = usedWrap;
  }

  /** After the batch is visible: no longer in flight; the state committed (old_* = current). */
  afterPublish(): void {
    for (let i = 0; i < this.batchLen; i++) this.u8[this.entry(this.batch[i]!)] = 0;
    this.batchLen = 0;
    const dv = this.dv;
    dv.setUint16(14, dv.getUint16(12, true), true);
    dv.setUint16(18, dv.getUint16(16, true), true);
    this.u8[21] = this.u8[20]!;
  }

  /**
   * After a restart (the specification's "When reconnecting"): commits or
   * rolls back a batch the previous back-end was publishing (`published`
   * says whether the ring shows the descriptor at the old used position as
   * used, i.e. no longer available for its old wrap counter), frees what is
   * on the free list, and returns the buffers still in flight in the order
   * they were taken. Throws InflightAreaError for an inconsistent area.
   */
  recover(published: (pos: number, wrap: number) => boolean): PackedInflightBuffer[] {
    const dv = this.dv, n = this.descNum;
    if (dv.getUint16(10, true) !== n) throw new InflightAreaError(`inflight area for ${dv.getUint16(10, true)} descriptors, ring has ${n}`);
    const oldUsed = dv.getUint16(18, true), oldWrap = this.u8[21]! & 1;
    if (oldUsed >= n || dv.getUint16(16, true) >= n) throw new InflightAreaError(`used index past the ring of ${n}`);
    if (dv.getUint16(16, true) !== oldUsed || (this.u8[20]! & 1) !== oldWrap) {
      if (published(oldUsed, oldWrap)) {
        dv.setUint16(14, dv.getUint16(12, true), true);
        dv.setUint16(18, dv.getUint16(16, true), true);
        this.u8[21] = this.u8[20]!;
      }
    }
    dv.setUint16(12, dv.getUint16(14, true), true);
    dv.setUint16(16, dv.getUint16(18, true), true);
    this.u8[20] = this.u8[21]!;
    // Everything on the free list is not in flight (a buffer half taken when we died, or a batch committed above).
    let f = dv.getUint16(12, true);
    for (let guard = 0; f < n && guard < n; guard++) {
      this.u8[PHDR + PDESC * f] = 0;
      f = dv.getUint16(PHDR + PDESC * f + 2, true);
    }
    const found: { c: number; b: PackedInflightBuffer }[] = [];
    let max = 0;
    this.entryOf.fill(-1);
    for (let h = 0; h < n; h++) {
      const ho = PHDR + PDESC * h;
      if (this.u8[ho] !== 1) continue;
      const num = dv.getUint16(ho + 6, true), last = dv.getUint16(ho + 4, true);
      if (num === 0 || num > n || last >= n) throw new InflightAreaError(`entry ${h}: ${num} descriptors, last ${last}`);
      const id = dv.getUint16(PHDR + PDESC * last + 16, true);
      if (id >= n) throw new InflightAreaError(`entry ${h}: buffer id ${id} >= ${n}`);
      if (this.entryOf[id] !== -1) throw new InflightAreaError(`buffer id ${id} in flight twice`);
      this.entryOf[id] = h;
      const c = Number(dv.getBigUint64(ho + 8, true));
      if (c > max) max = c;
      found.push({ c, b: { head: h, id, num } });
    }
    found.sort((a, b) => a.c - b.c);
    this.counter = max + 1;
    this.batchLen = 0;
    return found.map((x) => x.b);
  }

  /** Descriptor copy `k` (0-based) of the buffer whose head entry is `head`, into `out` (addr -1: past 2^53). */
  stored(head: number, k: number, out: { addr: number; len: number; flags: number }): void {
    let e = head;
    for (let i = 0; i < k; i++) e = this.dv.getUint16(this.entry(e) + 2, true);
    const o = this.entry(e);
    const hi = this.dv.getUint32(o + 28, true);
    out.addr = hi >= 0x200000 ? -1 : this.dv.getUint32(o + 24, true) + hi * 2 ** 32;
    out.len = this.dv.getUint32(o + 20, true);
    out.flags = this.dv.getUint16(o + 18, true);
  }
}

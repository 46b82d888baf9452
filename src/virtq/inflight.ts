/**
 * Inflight I/O tracking for split rings (vhost-user INFLIGHT_SHMFD,
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

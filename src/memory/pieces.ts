/**
 * An iovec-like list of guest buffer pieces, reused for every request of a
 * queue (no allocation per request). Each piece is a window view, an offset
 * into it, a length, and the host address of its first byte (for preadv/pwritev).
 */
export class Pieces {
  win: Uint8Array[];
  off: Float64Array;
  len: Float64Array;
  host: Float64Array;
  /** Guest physical address of each piece (-1: unknown), for dirty logging. */
  gpa: Float64Array;
  count = 0;
  /** Sum of `len` over all pieces. */
  total = 0;

  constructor(capacity = 64) {
    this.win = new Array(capacity);
    this.off = new Float64Array(capacity);
    this.len = new Float64Array(capacity);
    this.host = new Float64Array(capacity);
    this.gpa = new Float64Array(capacity);
  }

  reset(): void {
    this.count = 0;
    this.total = 0;
  }

  add(win: Uint8Array, off: number, len: number, host: number, gpa = -1): void {
    let i = this.count;
    if (i === this.off.length) this.grow();
    // Merge with the previous piece when contiguous in the same window.
    if (i > 0 && this.win[i - 1] === win && this.off[i - 1]! + this.len[i - 1]! === off) {
      this.len[i - 1]! += len;
      this.total += len;
      return;
    }
    this.win[i] = win;
    this.off[i] = off;
    this.len[i] = len;
    this.host[i] = host;
    this.gpa[i] = gpa;
    this.count = i + 1;
    this.total += len;
  }

  private grow(): void {
    const n = this.off.length * 2;
    const grow = (a: Float64Array) => { const b = new Float64Array(n); b.set(a); return b; };
    this.off = grow(this.off);
    this.len = grow(this.len);
    this.host = grow(this.host);
    this.gpa = grow(this.gpa);
    this.win.length = n;
  }
}

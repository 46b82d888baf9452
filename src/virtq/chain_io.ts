/**
 * Cursors over a descriptor chain's buffers, the only way a device touches
 * guest memory. A ChainReader walks the device-readable pieces, a ChainWriter
 * the device-writable ones; both are reused for every request of a slot.
 * Bounds are the pieces' lengths, which the walker already checked against
 * guest memory, so nothing here can reach outside a region.
 */
import * as sys from "../../ffi/sys.ts";
import { Pinned, IOVEC_SIZE } from "../../ffi/structs.ts";
import { Pieces } from "../memory/pieces.ts";

/** Raised when a device reads or writes past the end of a chain's buffers. */
export class ChainRangeError extends RangeError {
  override name = "ChainRangeError";
}

/** iovec tables handed to preadv/pwritev; one per thread, reused (not reentrant across awaits). */
const IOV_MAX = 1024;
let iovTable: Pinned | null = null;
function iov(): Pinned {
  return (iovTable ??= Pinned.alloc(IOV_MAX * IOVEC_SIZE));
}

class Cursor {
  /** Current piece and offset inside it. */
  protected i = 0;
  protected po = 0;
  /** Bytes consumed so far. */
  pos = 0;

  constructor(readonly pieces: Pieces) {}

  /** Total bytes of the buffers. */
  get length(): number {
    return this.pieces.total;
  }

  get remaining(): number {
    return this.pieces.total - this.pos;
  }

  /** Back to the start (the walker calls this after filling the pieces). */
  rewind(): void {
    this.i = 0;
    this.po = 0;
    this.pos = 0;
  }

  protected need(n: number, what: string): void {
    if (n < 0 || n > this.pieces.total - this.pos) {
      throw new ChainRangeError(`${what}: ${n} bytes at ${this.pos}, buffers hold ${this.pieces.total}`);
    }
  }

  /**
   * The window holding the next `n` bytes when they are contiguous (in one
   * piece), else null; the bytes start at `peekViewOffset` in it, and the
   * position does not move. For parsing (reader) or filling (writer) a
   * header in place; a reader's window must not be written.
   * @example const v = req.in.peekView(14); if (v) etherType = (v[req.in.peekViewOffset + 12]! << 8) | v[req.in.peekViewOffset + 13]!;
   */
  peekView(n: number): Uint8Array | null {
    const p = this.pieces;
    if (this.i >= p.count || this.po + n > p.len[this.i]!) return null;
    this.peekViewOffset = p.off[this.i]! + this.po;
    return p.win[this.i]!;
  }
  /** Where peekView()'s bytes start in the view it returned. */
  peekViewOffset = 0;

  /** Advances by `n` bytes without touching them. */
  skip(n: number): void {
    this.need(n, "skip");
    this.advance(n);
  }

  /** @internal Piece and offset of the position (for chain-to-chain copies). */
  get pieceIndex(): number {
    return this.i;
  }
  /** @internal */
  get pieceOffset(): number {
    return this.po;
  }
  /** @internal */
  assertRemaining(n: number): void {
    this.need(n, "copy");
  }
  /** @internal Advance by `n` already checked. */
  skipUnchecked(n: number): void {
    this.advance(n);
  }

  protected advance(n: number): void {
    const p = this.pieces;
    this.pos += n;
    while (n > 0) {
      const left = p.len[this.i]! - this.po;
      if (n < left) {
        this.po += n;
        return;
      }
      n -= left;
      this.i++;
      this.po = 0;
    }
    // Normalise: never rest at the end of a piece when another follows.
    while (this.i < p.count && this.po === p.len[this.i]) {
      this.i++;
      this.po = 0;
    }
  }

  /** Calls `fn(view, offset)` for the next `n` bytes piece by piece and advances; `offset` counts from the first byte. */
  protected each(n: number, fn: (view: Uint8Array, done: number) => void): void {
    const p = this.pieces;
    let done = 0;
    while (done < n) {
      const take = Math.min(n - done, p.len[this.i]! - this.po);
      const o = p.off[this.i]! + this.po;
      fn(p.win[this.i]!.subarray(o, o + take), done);
      done += take;
      this.advance(take);
    }
  }

  /**
   * Copies between `buf[start..end)` and the next bytes of the chain (into the
   * chain when `into`), piece by piece, and advances; bounds checked by the caller.
   * Short runs by a loop (no view allocated), long ones by set().
   */
  protected transfer(buf: Uint8Array, start: number, end: number, into: boolean): void {
    const p = this.pieces;
    for (let at = start; at < end;) {
      const take = Math.min(end - at, p.len[this.i]! - this.po);
      const o = p.off[this.i]! + this.po;
      const w = p.win[this.i]!;
      if (take <= 256) {
        if (into) for (let k = 0; k < take; k++) w[o + k] = buf[at + k]!;
        else for (let k = 0; k < take; k++) buf[at + k] = w[o + k]!;
      } else if (into) w.set(buf.subarray(at, at + take), o);
      else buf.set(w.subarray(o, o + take), at);
      at += take;
      this.advance(take);
    }
  }

  /** Fills the iovec table with the next `n` bytes; returns the entry count. */
  protected iovecs(n: number): number {
    const p = this.pieces;
    const t = iov();
    let cnt = 0, done = 0, i = this.i, po = this.po;
    while (done < n) {
      if (cnt === IOV_MAX) throw new ChainRangeError(`more than ${IOV_MAX} pieces in one transfer`);
      const take = Math.min(n - done, p.len[i]! - po);
      t.dv.setBigUint64(cnt * IOVEC_SIZE, BigInt(p.host[i]! + po), true);
      t.dv.setBigUint64(cnt * IOVEC_SIZE + 8, BigInt(take), true);
      cnt++;
      done += take;
      i++;
      po = 0;
    }
    return cnt;
  }
}

/**
 * Reads the device-readable part of a request.
 * @example
 * const type = req.in.readU32(); req.in.skip(4); const sector = req.in.readU64();
 */
export class ChainReader extends Cursor {
  readU8(): number {
    this.need(1, "readU8");
    const p = this.pieces;
    const v = p.win[this.i]![p.off[this.i]! + this.po]!;
    this.advance(1);
    return v;
  }

  readU16(): number {
    return this.readU8() | (this.readU8() << 8);
  }

  readU32(): number {
    this.need(4, "readU32");
    const p = this.pieces;
    if (p.len[this.i]! - this.po >= 4) {
      const w = p.win[this.i]!, o = p.off[this.i]! + this.po;
      this.advance(4);
      return (w[o]! | (w[o + 1]! << 8) | (w[o + 2]! << 16) | (w[o + 3]! << 24)) >>> 0;
    }
    return (this.readU8() | (this.readU8() << 8) | (this.readU8() << 16) | (this.readU8() << 24)) >>> 0;
  }

  /** A u64 as a number: exact below 2^53, and larger values stay larger than any real bound. */
  readU64(): number {
    const lo = this.readU32();
    return lo + this.readU32() * 2 ** 32;
  }

  /** Copies the next `end - start` bytes into `dst[start..end)` (default: all of `dst`). */
  copyTo(dst: Uint8Array, start = 0, end = dst.length): void {
    this.need(end - start, "copyTo");
    this.transfer(dst, start, end, false);
  }

  /**
   * The byte `at` bytes past the current position, without moving (e.g. a
   * header field); throws ChainRangeError past the end.
   * @example const dstMacFirstByte = req.in.peekU8(12);
   */
  peekU8(at: number): number {
    const p = this.pieces;
    if (this.i < p.count && this.po + at < p.len[this.i]!) return p.win[this.i]![p.off[this.i]! + this.po + at]!;
    this.need(at + 1, "peekU8");
    let i = this.i, o = this.po + at;
    while (o >= p.len[i]!) o -= p.len[i++]!;
    return p.win[i]![p.off[i]! + o]!;
  }

  /** Calls `fn` with views of the next `n` bytes (zero-copy), piece by piece. */
  forEach(n: number, fn: (view: Uint8Array, offset: number) => void): void {
    this.need(n, "forEach");
    this.each(n, fn);
  }

  /** Writes the next `n` bytes to `fd` at file offset `pos` (pwritev, zero-copy). Returns the bytes written. */
  pwriteTo(fd: number, pos: number, n: number): number {
    this.need(n, "pwriteTo");
    let done = 0;
    while (done < n) {
      const cnt = this.iovecs(n - done);
      const w = sys.pwritev(fd, iov().ptr, cnt, pos + done);
      if (w <= 0) break;
      this.advance(w);
      done += w;
    }
    return done;
  }
}

/**
 * Writes the device-writable part of a request; `pos` is the used length.
 * @example
 * req.out.preadFrom(fd, sector * 512, len); req.out.writeU8(VIRTIO_BLK_S_OK);
 */
export class ChainWriter extends Cursor {
  writeU8(v: number): void {
    this.need(1, "writeU8");
    const p = this.pieces;
    p.win[this.i]![p.off[this.i]! + this.po] = v;
    this.advance(1);
  }

  writeU16(v: number): void {
    this.writeU8(v & 0xff);
    this.writeU8((v >>> 8) & 0xff);
  }

  writeU32(v: number): void {
    this.writeU16(v & 0xffff);
    this.writeU16((v >>> 16) & 0xffff);
  }

  writeU64(v: number): void {
    this.writeU32(v % 2 ** 32);
    this.writeU32(Math.floor(v / 2 ** 32));
  }

  /** Copies `src[start..end)` (default: all of it) into the buffers. */
  copyFrom(src: Uint8Array, start = 0, end = src.length): void {
    this.need(end - start, "copyFrom");
    this.transfer(src, start, end, true);
  }

  /**
   * Copies the next `n` bytes of another chain (a reader at its position)
   * into the buffers: guest memory to guest memory in one pass, e.g. a
   * network packet from one port's TX chain into another port's RX buffers.
   * Both cursors advance.
   * @example rx.out.copyFromChain(tx.in, tx.in.remaining);
   */
  copyFromChain(src: ChainReader, n: number): void {
    this.need(n, "copyFromChain");
    src.assertRemaining(n);
    const dp = this.pieces, sp = src.pieces;
    let done = 0;
    while (done < n) {
      const si = src.pieceIndex, spo = src.pieceOffset;
      const take = Math.min(n - done, dp.len[this.i]! - this.po, sp.len[si]! - spo);
      if (take < 16) {
        const d = dp.win[this.i]!, dO = dp.off[this.i]! + this.po;
        const s = sp.win[si]!, sO = sp.off[si]! + spo;
        for (let k = 0; k < take; k++) d[dO + k] = s[sO + k]!;
      } else {
        // Both are mapped guest memory with host addresses: one libc call, no view allocated.
        sys.memcpy(dp.host[this.i]! + this.po, sp.host[si]! + spo, take);
      }
      done += take;
      this.advance(take);
      src.skipUnchecked(take);
    }
  }

  /** Writes `n` bytes of `byte` (zero by default). */
  fill(n: number, byte = 0): void {
    this.need(n, "fill");
    this.each(n, (v) => v.fill(byte));
  }

  /** Calls `fn` with writable views of the next `n` bytes, piece by piece. */
  forEach(n: number, fn: (view: Uint8Array, offset: number) => void): void {
    this.need(n, "forEach");
    this.each(n, fn);
  }

  /** Reads `n` bytes from `fd` at file offset `pos` into the buffers (preadv, zero-copy); short at end of file. */
  preadFrom(fd: number, pos: number, n: number): number {
    this.need(n, "preadFrom");
    let done = 0;
    while (done < n) {
      const cnt = this.iovecs(n - done);
      const r = sys.preadv(fd, iov().ptr, cnt, pos + done);
      if (r <= 0) break;
      this.advance(r);
      done += r;
    }
    return done;
  }
}

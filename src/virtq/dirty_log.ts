/**
 * The dirty page log of live migration (VHOST_F_LOG_ALL with LOG_SHMFD): a
 * bitmap shared with the front-end, one bit per 4 KiB page of guest physical
 * memory. While the front-end has logging on, every guest byte the back-end
 * writes (device-writable buffers, the used ring) has its page marked, so
 * the migration copies it again. Bits are set with Atomics.or: several of
 * our threads may mark the same byte while QEMU fetches and clears words.
 */
export const LOG_PAGE = 4096;

export class DirtyLog {
  /** Pages that fell outside the bitmap (a front-end that sized it too small); they cannot be logged. */
  missed = 0;

  constructor(private readonly bits: Uint8Array) {}

  /** Bytes of bitmap needed to cover guest memory up to `gpaEnd`. */
  static bytesFor(gpaEnd: number): number {
    return Math.ceil(gpaEnd / LOG_PAGE / 8);
  }

  /** Marks every page that [gpa, gpa + len) touches. */
  mark(gpa: number, len: number): void {
    if (len <= 0 || gpa < 0) return;
    const first = Math.floor(gpa / LOG_PAGE);
    const last = Math.floor((gpa + len - 1) / LOG_PAGE);
    const bits = this.bits;
    for (let p = first; p <= last; p++) {
      const byte = Math.floor(p / 8);
      if (byte >= bits.length) {
        this.missed += last - p + 1;
        return;
      }
      Atomics.or(bits, byte, 1 << (p % 8));
    }
  }

  isDirty(gpa: number): boolean {
    const p = Math.floor(gpa / LOG_PAGE);
    return ((this.bits[Math.floor(p / 8)] ?? 0) & (1 << (p % 8))) !== 0;
  }
}

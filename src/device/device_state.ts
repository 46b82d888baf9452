/**
 * Back-end state transfer for migration (vhost-user.rst "Migrating back-end
 * state", SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE).
 *
 * Theory of operation. The front-end hands us one end of a pipe-like channel.
 * Saving, we write the device's serialised state into it and close it (EOF
 * ends the transfer); loading, we read until EOF, then give the bytes to the
 * device. Either way the main loop is never blocked: the fd is made
 * non-blocking, a load is driven by the loop's readable watch, a save writes
 * what the pipe takes and retries on a short timer (the loop API watches
 * readability only). A transfer that makes no progress for `idleMs` fails, so
 * a front-end that never reads or never closes cannot pin the fd forever.
 * CHECK_DEVICE_STATE awaits `done`, which resolves to null (success) or an
 * error text; it never rejects.
 */
import * as sys from "../../ffi/sys.ts";
import type { EventLoop } from "./loop.ts";

/** Largest state we accept when loading (a device's state is small; this bounds a hostile stream). */
export const MAX_DEVICE_STATE_BYTES = 16 << 20;
/** A transfer with no progress for this long fails. */
export const DEVICE_STATE_IDLE_MS = 30_000;

const S_IFMT = 0o170000, S_IFIFO = 0o010000, S_IFSOCK = 0o140000;

/**
 * Why `fd` cannot carry a state stream, or null when it is a pipe or a
 * socket ("it must generally behave like a pipe"). A regular file, memfd or
 * eventfd is refused: an eventfd would "read" 8-byte counters forever.
 * @example pipeLikeError(eventfdFd); // "fd is not a pipe or socket (mode 0o600)"
 */
export function pipeLikeError(fd: number): string | null {
  let mode: number;
  try {
    mode = sys.fstat(fd).mode;
  } catch (e) {
    return (e as Error).message;
  }
  const fmt = mode & S_IFMT;
  if (fmt === S_IFIFO || fmt === S_IFSOCK) return null;
  return `fd is not a pipe or socket (mode 0o${mode.toString(8)})`;
}

/** One transfer in progress; owns its fd until it ends. */
export class StateTransfer {
  /** Resolves with null on success or the error text; never rejects. */
  readonly done: Promise<string | null>;
  /** Bytes moved so far. */
  bytes = 0;
  private resolve!: (r: string | null) => void;
  private fd: number;
  private watchId = -1;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private lastProgress = performance.now();
  private finished = false;

  private constructor(fd: number, private readonly loop: EventLoop, private readonly idleMs: number) {
    this.fd = fd;
    this.done = new Promise((r) => (this.resolve = r));
    sys.setNonBlocking(fd, true);
  }

  /**
   * Writes `data` into `fd`, then closes it.
   * @example const t = StateTransfer.save(pipeW, dev.saveState(), loop); await t.done; // null
   */
  static save(fd: number, data: Uint8Array, loop: EventLoop, idleMs = DEVICE_STATE_IDLE_MS): StateTransfer {
    const t = new StateTransfer(fd, loop, idleMs);
    t.pumpOut(data);
    return t;
  }

  /**
   * Reads `fd` to EOF (at most `max` bytes), closes it, then calls `apply`
   * with the bytes; an exception from `apply` fails the transfer with its message.
   * @example const t = StateTransfer.load(pipeR, loop, (b) => dev.loadState(b)); await t.done;
   */
  static load(fd: number, loop: EventLoop, apply: (data: Uint8Array) => void, max = MAX_DEVICE_STATE_BYTES,
    idleMs = DEVICE_STATE_IDLE_MS): StateTransfer {
    const t = new StateTransfer(fd, loop, idleMs);
    t.pumpIn(apply, max);
    return t;
  }

  /** Ends the transfer now (disconnect, reset, a new SET_DEVICE_STATE_FD) with `reason` as its error. */
  cancel(reason: string): void {
    this.finish(reason);
  }

  private finish(err: string | null): void {
    if (this.finished) return;
    this.finished = true;
    if (this.watchId >= 0) this.loop.unwatch(this.watchId);
    this.watchId = -1;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    sys.closeQuiet(this.fd);
    this.fd = -1;
    this.resolve(err);
  }

  private idle(): boolean {
    return performance.now() - this.lastProgress > this.idleMs;
  }

  private pumpOut(data: Uint8Array): void {
    let off = 0;
    let delay = 1;
    const step = (): void => {
      this.timer = null;
      if (this.finished) return;
      try {
        while (off < data.length) {
          const n = sys.write(this.fd, data.subarray(off));
          if (n === null) {
            if (this.idle()) return this.finish(`save: the front-end read nothing for ${this.idleMs} ms (${off} of ${data.length} bytes sent)`);
            // The pipe is full: try again shortly, backing off to 50 ms for a slow reader.
            this.timer = setTimeout(step, delay);
            delay = Math.min(delay * 2, 50);
            return;
          }
          off += n;
          this.bytes = off;
          this.lastProgress = performance.now();
          delay = 1;
        }
      } catch (e) {
        // EPIPE: the front-end closed its end before reading everything.
        return this.finish(`save: ${(e as Error).message} after ${off} of ${data.length} bytes`);
      }
      this.finish(null);
    };
    step();
  }

  private pumpIn(apply: (data: Uint8Array) => void, max: number): void {
    const chunk = new Uint8Array(64 << 10);
    const parts: Uint8Array[] = [];
    const onReadable = (): void => {
      if (this.finished) return;
      try {
        for (;;) {
          const n = sys.read(this.fd, chunk);
          if (n === null) return; // drained; the loop calls again
          if (n === 0) break; // EOF: the front-end closed its end
          if (this.bytes + n > max) return this.finish(`load: more than ${max} bytes of state`);
          parts.push(chunk.slice(0, n));
          this.bytes += n;
          this.lastProgress = performance.now();
        }
      } catch (e) {
        return this.finish(`load: ${(e as Error).message} after ${this.bytes} bytes`);
      }
      const data = new Uint8Array(this.bytes);
      let o = 0;
      for (const p of parts) {
        data.set(p, o);
        o += p.length;
      }
      // Close our end before applying, so the fd is released whatever the device says.
      if (this.watchId >= 0) this.loop.unwatch(this.watchId);
      this.watchId = -1;
      let err: string | null = null;
      try {
        apply(data);
      } catch (e) {
        err = `load: ${(e as Error).message}`;
      }
      this.finish(err);
    };
    this.watchId = this.loop.watch(this.fd, onReadable);
    const check = (): void => {
      this.timer = null;
      if (this.finished) return;
      if (this.idle()) return this.finish(`load: the front-end sent nothing for ${this.idleMs} ms (${this.bytes} bytes so far) and did not close`);
      this.timer = setTimeout(check, 1000);
    };
    this.timer = setTimeout(check, 1000);
  }
}

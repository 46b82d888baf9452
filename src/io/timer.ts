/**
 * Periodic callbacks on a device's event loop (a timerfd watched like any
 * fd), for what must happen with time but not per request: aging a MAC
 * table, auto-repeat, statistics. Works on the main loop and in I/O threads
 * alike (an I/O thread sleeps in epoll_wait, where Bun's own timers never
 * fire).
 */
import * as sys from "../../ffi/sys.ts";
import type { EventLoop } from "../device/loop.ts";

export interface LoopTimer {
  stop(): void;
}

/**
 * Calls `cb` every `intervalMs` on `loop` until stopped.
 * @example
 * attach(loop) { this.timer = every(loop, 1000, () => { this.now = performance.now(); }); }
 * close() { this.timer?.stop(); }
 */
export function every(loop: EventLoop, intervalMs: number, cb: () => void): LoopTimer {
  if (!(intervalMs > 0)) throw new RangeError(`every: interval ${intervalMs} ms`);
  const fd = sys.timerfd(intervalMs);
  const id = loop.watch(fd, () => {
    sys.eventfdRead(fd);
    cb();
  });
  let stopped = false;
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      loop.unwatch(id);
      sys.closeQuiet(fd);
    },
  };
}

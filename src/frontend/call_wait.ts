/**
 * Waiting for used buffers, for both ring drivers: in interrupt mode sleep
 * on the call eventfd and, if given, a watched fd (the vhost-user socket: the
 * back-end hanging up ends the wait); in polling mode spin on the ring and
 * look at the watched fd every 20 ms.
 */
import * as sys from "../../ffi/sys.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN, EPOLLRDHUP, POLLIN } from "../../ffi/constants.ts";

export type WaitResult = "used" | "timeout" | "socket";

const now = () => performance.now();

export class CallWait {
  private ep = -1;
  private events: sys.EpollEvents | null = null;
  private watched = -1;
  /** Call eventfd signals consumed. */
  calls = 0;

  /** `ready` says whether a used buffer is there to reap (the driver's own ring check). */
  constructor(private readonly callFd: number, private readonly polling: boolean, private readonly ready: () => boolean) {}

  wait(timeoutMs: number, watchFd: number): WaitResult {
    if (this.ready()) return "used";
    const deadline = now() + timeoutMs;
    if (this.polling) {
      let spins = 0;
      let nextCheck = now() + 20;
      for (;;) {
        if (this.ready()) return "used";
        if ((++spins & 1023) === 0) {
          const t = now();
          if (t >= deadline) return "timeout";
          if (watchFd >= 0 && t >= nextCheck) {
            nextCheck = t + 20;
            if (sys.poll1(watchFd, POLLIN, 0) !== 0) return this.ready() ? "used" : "socket";
          }
        }
      }
    }
    this.watch(watchFd);
    const ev = this.events!;
    for (;;) {
      // The driver asked for an event at its last reap; re-check after that is in place, since
      // the device may have published just before reading it (§2.7.10, §2.8.10).
      if (this.ready()) return "used";
      const left = deadline - now();
      if (left <= 0) return "timeout";
      const n = ev.wait(this.ep, Math.ceil(left));
      let sock = false;
      for (let i = 0; i < n; i++) {
        if (ev.data(i) === 1) sock = true;
        else if (sys.eventfdRead(this.callFd) !== null) this.calls++;
      }
      if (this.ready()) return "used";
      if (sock) return "socket";
    }
  }

  private watch(fd: number): void {
    if (this.ep < 0) {
      this.ep = sys.epollCreate();
      this.events = new sys.EpollEvents(4);
      sys.epollCtl(this.ep, EPOLL_CTL_ADD, this.callFd, EPOLLIN, 0);
    }
    if (fd === this.watched) return;
    if (this.watched >= 0) {
      try {
        sys.epollCtl(this.ep, EPOLL_CTL_DEL, this.watched, 0, 1);
      } catch {
        // already closed: epoll dropped it by itself
      }
    }
    this.watched = fd;
    if (fd >= 0) sys.epollCtl(this.ep, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, 1);
  }

  close(): void {
    if (this.ep >= 0) sys.closeQuiet(this.ep);
    this.ep = -1;
    this.events?.mem.free();
    this.events = null;
  }
}

/**
 * Bun's main loop as an EventLoop.
 *
 * Bun gives no way to wait for an fd to become readable without reading it
 * (its streams would swallow SCM_RIGHTS fds). So a small Worker blocks in
 * epoll_wait on an epoll set that this thread fills, and posts the ready
 * watch ids back; the callbacks run here on the main thread. Every fd is
 * registered EPOLLONESHOT and re-armed after its callback ran, so the Worker
 * never spins on an fd the main thread has not drained yet. Idle cost: one
 * thread asleep in epoll_wait.
 */
import * as sys from "../../ffi/sys.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN } from "../../ffi/constants.ts";
import type { EventLoop } from "../device/loop.ts";

const EPOLLONESHOT = 1 << 30;

interface Watch { fd: number; cb: () => void }

export class MainLoop implements EventLoop {
  private readonly ep: number;
  private readonly wake: number;
  private readonly worker: Worker;
  private readonly watches = new Map<number, Watch>();
  private nextId = 1;
  private closed = false;

  constructor() {
    this.ep = sys.epollCreate();
    this.wake = sys.eventfd();
    // Watch id 0 is the stop signal for the poller.
    sys.epollCtl(this.ep, EPOLL_CTL_ADD, this.wake, EPOLLIN, 0);
    this.worker = new Worker(new URL("./poller_worker.ts", import.meta.url).href);
    this.worker.onmessage = (ev: MessageEvent<number[]>) => this.dispatch(ev.data);
    this.worker.postMessage({ ep: this.ep });
    this.worker.unref();
  }

  private dispatch(ids: number[]): void {
    for (const id of ids) {
      const w = this.watches.get(id);
      if (!w) continue; // unwatched meanwhile
      try {
        w.cb();
      } catch (e) {
        // A callback's own errors are handled where they arise; anything else is our bug: keep serving.
        console.error(`bunvhost: error: internal error in an fd callback: ${e instanceof Error ? e.stack : e}`);
      } finally {
        // Re-arm only if still watched: the callback may have unwatched (and closed) the fd.
        if (this.watches.get(id) === w) sys.epollCtl(this.ep, EPOLL_CTL_MOD, w.fd, EPOLLIN | EPOLLONESHOT, id);
      }
    }
  }

  watch(fd: number, cb: () => void): number {
    if (this.closed) throw new Error("MainLoop.watch: loop closed");
    const id = this.nextId++;
    this.watches.set(id, { fd, cb });
    sys.epollCtl(this.ep, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLONESHOT, id);
    return id;
  }

  unwatch(id: number): void {
    const w = this.watches.get(id);
    if (!w) return;
    this.watches.delete(id);
    try {
      sys.epollCtl(this.ep, EPOLL_CTL_DEL, w.fd, 0, 0);
    } catch {
      // Already closed: the kernel dropped it from the set.
    }
  }

  /** While anything is watched the process stays alive. */
  ref(on: boolean): void {
    if (on) this.worker.ref();
    else this.worker.unref();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const id of [...this.watches.keys()]) this.unwatch(id);
    sys.eventfdWrite(this.wake);
    this.worker.terminate();
    // The worker may still be inside epoll_wait on `ep`; closing it is safe (it returns EBADF or the wake event).
    setTimeout(() => {
      sys.closeQuiet(this.ep);
      sys.closeQuiet(this.wake);
    }, 50).unref();
  }
}

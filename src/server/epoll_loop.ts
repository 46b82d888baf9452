/**
 * An event loop of its own for an I/O thread: one epoll set, blocking in
 * epoll_wait through FFI (a Worker may block without stalling Bun's main
 * thread). Callbacks run on this thread; between rounds the loop awaits, so
 * promise continuations (device completions, control commands) run too.
 * Optional polling (`pollUs`, server.ts --poll-us; off by default): after a
 * round with work, keep calling the `pollers` (which look at the avail rings
 * and the io_uring CQ in shared memory, no syscall) between non-blocking
 * epoll_waits for up to that long, and only then sleep (as QEMU's aio poll
 * does); any work found extends the window. With it off, an idle loop sleeps
 * in epoll_wait and uses no CPU.
 */
import * as sys from "../../ffi/sys.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN } from "../../ffi/constants.ts";
import type { EventLoop } from "../device/loop.ts";

interface Watch { fd: number; cb: () => void }

export class EpollLoop implements EventLoop {
  private readonly ep = sys.epollCreate();
  private readonly watches = new Map<number, Watch>();
  private nextId = 1;
  private running = false;
  private readonly evs = new sys.EpollEvents(64);
  /** Rounds run (for tests and stats). */
  rounds = 0;
  /** Busy-poll window after a round with work, in microseconds (0: off). */
  pollUs = 0;
  /** Each looks for work without sleeping and does it; returns whether it found some. */
  pollers: (() => boolean)[] = [];
  /** Rounds in which a poller found work (for tests and stats). */
  polled = 0;
  /**
   * 0: nothing pending; 1: a control command in progress (poll, don't sleep);
   * 2: requests completing through Promises in flight (sleep at most 1 ms; requests
   * completed from fd events, like io_uring's eventfd, need no such turns). Says whether promises this thread awaits are still unsettled (a command
   * in progress, an asynchronous request). Then the loop does not sleep in
   * epoll_wait but yields to Bun's loop between rounds, so they can settle.
   */
  busy: () => number = () => 0;

  watch(fd: number, cb: () => void): number {
    const id = this.nextId++;
    this.watches.set(id, { fd, cb });
    sys.epollCtl(this.ep, EPOLL_CTL_ADD, fd, EPOLLIN, id);
    return id;
  }

  unwatch(id: number): void {
    const w = this.watches.get(id);
    if (!w) return;
    this.watches.delete(id);
    try {
      sys.epollCtl(this.ep, EPOLL_CTL_DEL, w.fd, 0, 0);
    } catch {
      // closed already: the kernel dropped it
    }
  }

  /** Runs until stop(); resolves then. */
  async run(): Promise<void> {
    this.running = true;
    const evs = this.evs;
    let pollUntil = 0;
    while (this.running) {
      const b = this.busy();
      const polling = pollUntil > 0 && performance.now() < pollUntil;
      const n = evs.wait(this.ep, b === 1 || polling ? 0 : b === 2 ? 1 : -1);
      this.rounds++;
      for (let i = 0; i < n; i++) {
        const w = this.watches.get(evs.data(i));
        if (!w) continue;
        try {
          w.cb();
        } catch (e) {
          console.error(`bunvhost: error: internal error in an fd callback: ${e instanceof Error ? e.stack : e}`);
        }
      }
      if (this.pollUs > 0) {
        let work = n > 0;
        if (polling) {
          for (const p of this.pollers) {
            try {
              if (p()) work = true;
            } catch (e) {
              console.error(`bunvhost: error: internal error in a poller: ${e instanceof Error ? e.stack : e}`);
            }
          }
          if (work) this.polled++;
        }
        if (work) pollUntil = performance.now() + this.pollUs / 1000;
        else if (!polling) pollUntil = 0;
      }
      // Let promise continuations run: a microtask checkpoint when idle, a
      // whole turn of Bun's loop when something is in progress.
      if (this.busy() === 0) await null;
      else await new Promise<void>((r) => setImmediate(r));
    }
  }

  /** Ends run() after the current round (call from a callback on this thread). */
  stop(): void {
    this.running = false;
  }

  close(): void {
    this.watches.clear();
    sys.closeQuiet(this.ep);
  }
}

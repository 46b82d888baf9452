/**
 * What the device layer needs from an event loop: call me when this fd is
 * readable. Implementations live in src/server/event_loop.ts (Bun's main
 * loop) and src/server/io_thread.ts (a Worker's own epoll loop).
 */
export interface EventLoop {
  /** Calls `cb` whenever `fd` becomes readable, until unwatched. Returns a watch id. */
  watch(fd: number, cb: () => void): number;
  /** Stops calling back for this watch id; an event already queued is dropped. Safe to call twice. */
  unwatch(id: number): void;
}

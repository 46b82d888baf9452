/// <reference lib="webworker" />
// The poller behind MainLoop: blocks in epoll_wait and posts ready watch ids.
// Watch id 0 is the stop eventfd.
import { EpollEvents } from "../../ffi/sys.ts";

declare const self: Worker;

self.onmessage = (ev: MessageEvent<{ ep: number }>) => {
  const ep = ev.data.ep;
  const evs = new EpollEvents(64);
  for (;;) {
    let n: number;
    try {
      n = evs.wait(ep, -1);
    } catch {
      break; // the epoll fd was closed
    }
    const ids: number[] = [];
    let stop = false;
    for (let i = 0; i < n; i++) {
      const id = evs.data(i);
      if (id === 0) stop = true;
      else ids.push(id);
    }
    if (ids.length) self.postMessage(ids);
    if (stop) break;
  }
};

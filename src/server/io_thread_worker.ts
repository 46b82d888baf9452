/// <reference lib="webworker" />
/**
 * The body of an I/O thread. It builds its own instance of the device (from
 * the spec's module), its own views of the guest memory the main thread
 * mapped, and one Vring per queue attached to it, and runs them on an
 * EpollLoop. Commands arrive on a MessagePort, announced by an eventfd in the
 * epoll set, and are executed strictly in order; each gets one reply.
 */
import { receiveMessageOnPort, workerData, type MessagePort } from "node:worker_threads";
import * as sys from "../../ffi/sys.ts";
import type { Device, Queues } from "../device/api.ts";
import { importDeviceModule, instantiate } from "./device_module.ts";
import { stderrLogger, type Level } from "../device/log.ts";
import type { RingCommand } from "../device/remote_vring.ts";
import { Vring, type VringHost } from "../device/vring.ts";
import { VirtqError } from "../errors.ts";
import { GuestMemory } from "../memory/guest_memory.ts";
import { EpollLoop } from "./epoll_loop.ts";
import { Iotlb, permName } from "../memory/iotlb.ts";
import { sendIotlbReport } from "../device/iotlb_report.ts";

interface Init {
  port: MessagePort;
  ctl: number;
  name: string;
  module: string;
  options: unknown;
  windowSize: number;
  logLevel: Level;
  pollUs: number;
  /** --trace: log the back-end messages this thread sends itself (IOTLB misses). */
  trace?: boolean;
}

const init = workerData as Init;
const { port, ctl, name } = init;
const log = stderrLogger(init.logLevel, `bunvhost[${name}]`);
const mem = new GuestMemory(init.windowSize);
const loop = new EpollLoop();
const rings = new Map<number, Vring>();
let device: Device;
/** A reload's new instance, built and checked, waiting for reloadSwap. */
let nextDevice: Device | null = null;
/** Receive queues of this thread's instance: chains popped from the rings served here. */
const queues: Queues = { take: (q) => (paused.has(q) ? null : rings.get(q)?.take() ?? null) };
/**
 * Commands received and not yet answered; requests whose handler returned a
 * Promise and has not settled (they need turns of Bun's loop). Requests the
 * device completes from fd events (PENDING: io_uring) let the loop sleep in
 * epoll_wait: their eventfd wakes it.
 */
let commands = 0;
let promises = 0;
/** Chains taken from the rings (the ring poller compares it to see work). */
let popped = 0;
loop.busy = () => (commands > 0 ? 1 : promises > 0 ? 2 : 0);
/** Rings not to poll: quiesced, stopped, detached or being released (a command of the main thread says so). */
const paused = new Set<number>();

const host: VringHost = {
  get device() { return device; },
  mem, log,
  broken: (e: VirtqError) => port.postMessage({ event: "broken", index: e.queue, code: e.code, at: e.index, message: e.message }),
  inflightChanged: (d: number) => { if (d > 0) popped += d; },
  promisesChanged: (d: number) => { promises += d; },
  iotlbReport: (type: number, iova: number, perm: number) => {
    log.debug(`IOTLB ${type === 1 ? "miss" : "access failure"} iova=0x${iova.toString(16)} ${permName(perm)}`);
    return sendIotlbReport(iotlbFd, type, iova, perm, init.trace ? (line) => log.info(line) : undefined);
  },
};
/** The back-end channel, lent by the main thread while the IOTLB is on (taken back, acknowledged, before it is closed). */
let iotlbFd = -1;

/** --poll-us: look at the avail rings of this thread's running queues (never while a command is in progress). */
function pollRings(): boolean {
  if (commands > 0) return false;
  const before = popped;
  for (const [i, v] of rings) if (!paused.has(i)) v.process();
  return popped !== before;
}

function ring(index: number): Vring {
  let v = rings.get(index);
  if (!v) rings.set(index, (v = new Vring(index, host, loop, name)));
  return v;
}

async function exec(c: RingCommand | { op: "exit" }): Promise<unknown> {
  if ("index" in c) {
    if (c.op === "quiesce" || c.op === "stop" || c.op === "detach" || c.op === "reset" || c.op === "release") paused.add(c.index);
    else if (c.op === "resume" || c.op === "kick") paused.delete(c.index);
  }
  switch (c.op) {
    case "mem":
      for (const v of rings.values()) v.detachRings();
      mem.borrow(c.regions);
      return null;
    case "map": {
      const v = ring(c.index);
      v.num = c.num;
      v.addr = c.addr;
      v.setEventIdx(c.eventIdx);
      v.mapRings();
      return null;
    }
    case "base": return ring(c.index).setBase(c.base), null;
    case "eventIdx": return ring(c.index).setEventIdx(c.on), null;
    case "inOrder": return ring(c.index).setInOrder(c.on), null;
    case "layout": return ring(c.index).setLayout(c.packed), null;
    case "inflight": return ring(c.index).setInflight(c.area), null;
    case "log": return ring(c.index).setLog(c.area), null;
    case "refresh": return device.refresh?.() ?? false;
    case "features":
      device.setFeatures?.(c.features);
      return null;
    case "loadState":
      device.loadState?.(c.data);
      return null;
    case "reloadPrepare": {
      const mod = await importDeviceModule(c.module, c.fresh);
      nextDevice = await instantiate(c.module, mod, c.options, { thread: name, log });
      return { type: nextDevice.type, queues: nextDevice.queues, features: nextDevice.features };
    }
    case "reloadSwap": {
      // Every ring of this thread is quiesced: nothing of the old instance is in flight.
      const old = device, next = nextDevice!;
      nextDevice = null;
      const state = old.saveState?.();
      if (state !== undefined && next.loadState) next.loadState(state);
      if (c.features !== null) next.setFeatures?.(c.features);
      next.attach?.(loop, queues);
      device = next;
      old.close?.();
      return null;
    }
    case "reloadDrop":
      nextDevice?.close?.();
      nextDevice = null;
      return null;
    case "iotlb":
      iotlbFd = c.on ? c.fd : -1;
      if (c.on !== (mem.iotlb !== null)) mem.iotlb = c.on ? new Iotlb(mem) : null;
      return null;
    case "iotlbMsg": {
      const t = mem.iotlb;
      if (t === null) return null;
      // Same order and same checks as the main thread's table (which refused bad entries before us).
      if (c.type === 2) t.update(c.iova, c.size, c.uaddr, c.perm);
      else t.invalidate(c.iova, c.size);
      // Rings waiting on a miss retry (not those a command of the main thread paused).
      for (const [i, v] of rings) if (!paused.has(i)) v.process();
      return null;
    }
    case "kick": return ring(c.index).setKick(c.fd), null;
    case "call": return ring(c.index).setCall(c.fd), null;
    case "err": return ring(c.index).setErr(c.fd), null;
    case "enable": return ring(c.index).setEnabled(c.on), null;
    case "stop": return ring(c.index).stop();
    case "quiesce": return ring(c.index).quiesce();
    case "resume": return ring(c.index).resume(), null;
    case "detach": return ring(c.index).detachRings(), null;
    case "reset": {
      const v = rings.get(c.index);
      if (v) {
        await v.quiesce();
        v.reset();
        rings.delete(c.index);
      }
      return null;
    }
    case "release": {
      const st = await ring(c.index).release();
      rings.delete(c.index);
      return st;
    }
    case "exit":
      for (const v of rings.values()) {
        await v.quiesce();
        v.reset();
      }
      rings.clear();
      mem.clear();
      device?.close?.();
      loop.stop();
      return null;
  }
}

// Commands run one after another, each awaited (stop and quiesce wait for in-flight requests).
let chain: Promise<unknown> = Promise.resolve();
/** Commands announced on the eventfd (one write each) but not yet received. */
let announced = 0;
const nap = new Int32Array(new SharedArrayBuffer(4));

function onCtl(): void {
  announced += sys.eventfdRead(ctl) ?? 0;
  // The eventfd can wake us before the message itself lands on the port:
  // the counter says how many are on their way, so wait for each (briefly).
  let spins = 0;
  while (announced > 0) {
    const m = receiveMessageOnPort(port);
    if (!m) {
      if (++spins > 20000) throw new Error(`${name}: ${announced} command(s) announced but never delivered`);
      Atomics.wait(nap, 0, 0, 0.05);
      continue;
    }
    announced--;
    const { id, cmd } = m.message as { id: number; cmd: RingCommand | { op: "exit" } };
    commands++;
    chain = chain.then(() => exec(cmd)).then(
      (value) => { commands--; port.postMessage({ id, ok: true, value }); },
      (e) => { commands--; port.postMessage({ id, ok: false, error: { name: e?.name, message: e?.message ?? String(e), code: e?.code, queue: e?.queue, at: e?.index } }); },
    );
  }
}

async function main(): Promise<void> {
  const mod = await importDeviceModule(init.module);
  device = await instantiate(init.module, mod, init.options, { thread: name, log });
  device.attach?.(loop, queues);
  loop.pollUs = init.pollUs;
  if (init.pollUs > 0) {
    loop.pollers.push(pollRings);
    // Through `device`: a reload swaps the instance under the poller.
    loop.pollers.push(() => device.poll?.() ?? false);
  }
  loop.watch(ctl, onCtl);
  port.postMessage({ event: "ready" });
  await loop.run();
  loop.close();
  port.postMessage({ event: "exited" });
  port.close();
}

main().catch((e) => {
  log.error(`I/O thread failed: ${e instanceof Error ? e.stack : e}`);
  port.postMessage({ event: "failed", message: String(e) });
});

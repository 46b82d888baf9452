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
  /** Ports (sockets) served by this thread's instances (default 1); commands name theirs. */
  ports?: number;
}

const init = workerData as Init;
const { port, ctl, name } = init;
const log = stderrLogger(init.logLevel, `bunvhost[${name}]`);
const loop = new EpollLoop();
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

/**
 * One port: a socket of the server (a multi-port device such as the net
 * switch has several), with its own device instance, guest memory and rings.
 */
class Port {
  private dev!: Device;
  /** This port's instance (a reload swaps it). */
  get device(): Device {
    return this.dev;
  }
  set device(d: Device) {
    this.dev = d;
    // A plain field for the rings' hot path (a getter per request showed in profiles).
    (this.host as { device: Device }).device = d;
  }
  /** A reload's new instance, built and checked, waiting for reloadSwap. */
  nextDevice: Device | null = null;
  readonly mem = new GuestMemory(init.windowSize);
  readonly rings = new Map<number, Vring>();
  /** Rings not to poll: quiesced, stopped, detached or being released (a command of the main thread says so). */
  readonly paused = new Set<number>();
  /** The back-end channel, lent by the main thread while the IOTLB is on (taken back, acknowledged, before it is closed). */
  iotlbFd = -1;
  /** Receive queues of this port's instance: chains popped from the rings served here. */
  readonly queues: Queues = {
    take: (q) => (this.paused.has(q) ? null : this.rings.get(q)?.take() ?? null),
    giveBack: (r) => this.rings.get(r.queue)?.giveBack(r) ?? false,
  };
  readonly host: VringHost;

  constructor(readonly index: number) {
    this.host = {
      device: null as unknown as Device,
      mem: this.mem, log,
      broken: (e: VirtqError) => port.postMessage({ event: "broken", port: index, index: e.queue, code: e.code, at: e.index, message: e.message }),
      inflightChanged: (d: number) => { if (d > 0) popped += d; },
      promisesChanged: (d: number) => { promises += d; },
      iotlbReport: (type: number, iova: number, perm: number) => {
        log.debug(`IOTLB ${type === 1 ? "miss" : "access failure"} iova=0x${iova.toString(16)} ${permName(perm)}`);
        return sendIotlbReport(this.iotlbFd, type, iova, perm, init.trace ? (line) => log.info(line) : undefined);
      },
    };
  }

  ring(index: number): Vring {
    let v = this.rings.get(index);
    if (!v) this.rings.set(index, (v = new Vring(index, this.host, loop, name)));
    return v;
  }
}
const ports: Port[] = Array.from({ length: Math.max(1, init.ports ?? 1) }, (_, i) => new Port(i));

/** --poll-us: look at the avail rings of this thread's running queues (never while a command is in progress). */
function pollRings(): boolean {
  if (commands > 0) return false;
  const before = popped;
  for (const p of ports) for (const [i, v] of p.rings) if (!p.paused.has(i)) v.process();
  return popped !== before;
}

async function exec(c: (RingCommand | { op: "exit" }) & { port?: number }): Promise<unknown> {
  if (c.op === "exit") {
    // Every port's device is closed (its last words logged) even if a ring fails to wind down.
    for (const p of ports) {
      for (const v of p.rings.values()) {
        try {
          await v.quiesce();
          v.reset();
        } catch (e) {
          log.error(`exit: queue ${v.index}${ports.length > 1 ? ` of port ${p.index}` : ""}: ${e instanceof Error ? e.message : e}`);
        }
      }
      p.rings.clear();
      p.mem.clear();
      try {
        p.device?.close?.();
      } catch (e) {
        log.error(`exit: device ${p.device?.name} close() threw: ${e instanceof Error ? e.message : e}`);
      }
    }
    loop.stop();
    return null;
  }
  const p = ports[c.port ?? 0];
  if (!p) throw new Error(`no port ${c.port} in this thread`);
  const { rings, paused, mem } = p;
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
      const v = p.ring(c.index);
      v.num = c.num;
      v.addr = c.addr;
      v.setEventIdx(c.eventIdx);
      v.mapRings();
      return null;
    }
    case "base": return p.ring(c.index).setBase(c.base), null;
    case "eventIdx": return p.ring(c.index).setEventIdx(c.on), null;
    case "inOrder": return p.ring(c.index).setInOrder(c.on), null;
    case "layout": return p.ring(c.index).setLayout(c.packed), null;
    case "inflight": return p.ring(c.index).setInflight(c.area), null;
    case "log": return p.ring(c.index).setLog(c.area), null;
    case "refresh": return p.device.refresh?.() ?? false;
    case "features":
      p.device.setFeatures?.(c.features);
      return null;
    case "loadState":
      p.device.loadState?.(c.data);
      return null;
    case "hook":
      if (c.name === "setMtu") p.device.setMtu?.(c.arg as number);
      else p.device.announce?.(c.arg as Uint8Array);
      return null;
    case "reloadPrepare": {
      const mod = await importDeviceModule(c.module, c.fresh);
      p.nextDevice = await instantiate(c.module, mod, c.options, { thread: name, log, port: p.index });
      return { type: p.nextDevice.type, queues: p.nextDevice.queues, features: p.nextDevice.features };
    }
    case "reloadSwap": {
      // Every ring of this thread is quiesced: nothing of the old instance is in flight.
      const old = p.device, next = p.nextDevice!;
      p.nextDevice = null;
      const state = old.saveState?.();
      if (state !== undefined && next.loadState) next.loadState(state);
      if (c.features !== null) next.setFeatures?.(c.features);
      next.attach?.(loop, p.queues);
      p.device = next;
      old.close?.();
      return null;
    }
    case "reloadDrop":
      p.nextDevice?.close?.();
      p.nextDevice = null;
      return null;
    case "iotlb":
      p.iotlbFd = c.on ? c.fd : -1;
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
    case "kick": return p.ring(c.index).setKick(c.fd), null;
    case "call": return p.ring(c.index).setCall(c.fd), null;
    case "err": return p.ring(c.index).setErr(c.fd), null;
    case "enable": return p.ring(c.index).setEnabled(c.on), null;
    case "stop": return p.ring(c.index).stop();
    case "quiesce": return p.ring(c.index).quiesce();
    case "resume": return p.ring(c.index).resume(), null;
    case "detach": return p.ring(c.index).detachRings(), null;
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
      const st = await p.ring(c.index).release();
      rings.delete(c.index);
      return st;
    }
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
    const { id, cmd } = m.message as { id: number; cmd: (RingCommand | { op: "exit" }) & { port?: number } };
    commands++;
    chain = chain.then(() => exec(cmd)).then(
      (value) => { commands--; port.postMessage({ id, ok: true, value }); },
      (e) => { commands--; port.postMessage({ id, ok: false, error: { name: e?.name, message: e?.message ?? String(e), code: e?.code, queue: e?.queue, at: e?.index } }); },
    );
  }
}

async function main(): Promise<void> {
  const mod = await importDeviceModule(init.module);
  for (const p of ports) {
    p.device = await instantiate(init.module, mod, init.options, { thread: name, log, port: p.index });
    p.device.attach?.(loop, p.queues);
  }
  loop.pollUs = init.pollUs;
  if (init.pollUs > 0) {
    loop.pollers.push(pollRings);
    // Through `p.device`: a reload swaps the instance under the poller.
    for (const p of ports) loop.pollers.push(() => p.device.poll?.() ?? false);
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

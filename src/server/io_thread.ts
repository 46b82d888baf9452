/**
 * An I/O thread, seen from the main thread: a Worker running its own epoll
 * loop (io_thread_worker.ts) that serves the queues attached to it. Commands
 * go through a MessagePort plus an eventfd write (the Worker sleeps in
 * epoll_wait, not in Bun's loop); replies come back as messages.
 */
import { MessageChannel, Worker, type MessagePort } from "node:worker_threads";
import * as sys from "../../ffi/sys.ts";
import type { Level } from "../device/log.ts";
import type { RingChannel, RingCommand } from "../device/remote_vring.ts";
import { GuestMemoryError, ProtocolError, VirtqError } from "../errors.ts";
import { DEFAULT_WINDOW_SIZE } from "../memory/region.ts";

/** How to build a device in any thread: a module exporting `createDevice(options)`, and plain-data options. */
export interface DeviceSpec {
  module: string;
  options: unknown;
}

export interface IoThreadOptions {
  windowSize?: number;
  logLevel?: Level;
  /** Busy-poll window after a round with work, µs (default 0: off; see EpollLoop.pollUs). */
  pollUs?: number;
  /** --trace: the thread logs the back-end messages it sends itself (IOTLB misses). */
  trace?: boolean;
  /** Ports (sockets) whose queues this thread may serve, each with its own instance (default 1). */
  ports?: number;
}

interface Pending { resolve(v: unknown): void; reject(e: unknown): void }

function rebuild(e: { name?: string; message: string; code?: string; queue?: number; at?: number }): Error {
  if (e.name === "VirtqError") return new VirtqError(e.code as any, e.queue ?? 0, e.at ?? 0, e.message);
  if (e.name === "GuestMemoryError") return new GuestMemoryError(0, 0, e.message);
  if (e.name === "ProtocolError") return new ProtocolError("io-thread", "", e.message);
  const err = new Error(e.message);
  err.name = e.name ?? "Error";
  return err;
}

export class IoThread implements RingChannel {
  private readonly worker: Worker;
  private readonly port: MessagePort;
  private readonly ctl: number;
  private readonly pending = new Map<number, Pending>();
  private readonly brokenCbs = new Map<number, (e: VirtqError) => void>();
  private nextId = 1;
  private closed = false;
  private failed = false;
  /** Resolves once the thread has built its device and runs its loop. */
  readonly ready: Promise<void>;

  constructor(readonly name: string, spec: DeviceSpec, o: IoThreadOptions = {}) {
    this.ctl = sys.eventfd();
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    let readyRes!: () => void, readyRej!: (e: Error) => void;
    this.ready = new Promise((res, rej) => { readyRes = res; readyRej = rej; });
    // A thread that failed to start runs no loop: close() must not wait for it to answer.
    this.ready.catch(() => { this.failed = true; });
    this.port.on("message", (m: any) => {
      if (m.event === "ready") return readyRes();
      if (m.event === "failed") return readyRej(new Error(`${name}: ${m.message}`));
      if (m.event === "broken") {
        this.brokenCbs.get((m.port ?? 0) * 0x10000 + m.index)?.(new VirtqError(m.code, m.index, m.at, m.message));
        return;
      }
      if (m.event === "exited") return;
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.ok) p.resolve(m.value);
      else p.reject(rebuild(m.error));
    });
    this.worker = new Worker(new URL("./io_thread_worker.ts", import.meta.url), {
      workerData: {
        port: port2, ctl: this.ctl, name, module: spec.module, options: spec.options,
        windowSize: o.windowSize ?? DEFAULT_WINDOW_SIZE, logLevel: o.logLevel ?? "info", pollUs: o.pollUs ?? 0,
        trace: o.trace ?? false, ports: o.ports ?? 1,
      },
      transferList: [port2],
    } as any);
    this.worker.on("error", (e) => readyRej(e instanceof Error ? e : new Error(String(e))));
    this.worker.unref();
    (this.port as any).unref?.();
  }

  request(cmd: RingCommand | { op: "exit" }, portIndex = 0): Promise<any> {
    if (this.closed) return Promise.reject(new Error(`${this.name}: closed`));
    if (portIndex !== 0) cmd = { ...cmd, port: portIndex } as RingCommand & { port: number };
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.port.postMessage({ id, cmd });
      sys.eventfdWrite(this.ctl);
    });
  }

  onBroken(index: number, cb: ((e: VirtqError) => void) | null, portIndex = 0): void {
    const key = portIndex * 0x10000 + index;
    if (cb) this.brokenCbs.set(key, cb);
    else this.brokenCbs.delete(key);
  }

  /** The line to this thread for one port's rings and instance (a multi-port device's socket). */
  forPort(portIndex: number): RingChannel {
    return {
      name: this.name,
      request: (cmd) => this.request(cmd, portIndex),
      onBroken: (index, cb) => this.onBroken(index, cb, portIndex),
    };
  }

  /** Stops the thread after its rings are quiesced and reset. */
  async close(): Promise<void> {
    if (this.closed) return;
    // The port is unref'd (an idle thread must not keep the server alive), so while we wait
    // for the thread to wind down nothing else may hold the process: without this, a server
    // stopping with nothing else pending exited mid-teardown (its devices' last lines lost).
    (this.port as any).ref?.();
    try {
      if (!this.failed) await this.request({ op: "exit" });
    } catch {
      // the thread is gone already
    }
    this.closed = true;
    await this.worker.terminate();
    this.port.close();
    sys.closeQuiet(this.ctl);
  }
}

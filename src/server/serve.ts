/**
 * serve(): a device on a vhost-user socket, with its I/O threads, control
 * socket and hot reload; what server.ts runs and what a program embedding
 * bunvhost calls.
 */
import { resolve } from "node:path";
import { OptionError, type Device, type DeviceModule, type OptionValues } from "../device/api.ts";
import { stderrLogger, type Level, type Logger } from "../device/log.ts";
import { ControlSocket } from "./control.ts";
import { checkDevice, defaultValues, DeviceModuleError, importDeviceModule, instantiate, resolveDevicePath } from "./device_module.ts";
import { MainLoop } from "./event_loop.ts";
import { IoThread } from "./io_thread.ts";
import { qemuAttachLine } from "./qemu_line.ts";
import { DeviceReloader } from "./reload.ts";
import { VuServer } from "./vu_server.ts";

export interface ServeOptions {
  /** Unix socket path to listen on. */
  socket: string;
  /** Option values of the device module (as its `options` declare them; defaults filled in). */
  options?: OptionValues;
  /** I/O threads (0: Bun's main loop); default: the module's `defaults.threads`, else 1 (a Device object: 0). */
  threads?: number;
  /** Explicit queue→thread map, e.g. "0:0,1:main". */
  queueMap?: string;
  /** I/O threads poll their rings for this many µs after work before sleeping. */
  pollUs?: number;
  /** A line-based control socket ("stats", "move", "resize", "reload"). */
  control?: string;
  /** Log every vhost-user message. */
  trace?: boolean;
  logLevel?: Level;
  log?: Logger;
  /** Reload the device when its file (or a file it imports) changes (module paths only). */
  watch?: boolean;
}

export interface Served {
  server: VuServer;
  /** The device module's file (null for a Device object). */
  file: string | null;
  /** The options every instance was built from (after the module's prepare()). */
  prepared: unknown;
  threads: IoThread[];
  reloader: DeviceReloader | null;
  control: ControlSocket | null;
  /** The device's own description for the start message (its module's describe()), or "". */
  description: string;
  /** QEMU options that attach this device. */
  qemuLine(): string;
  /** Stops listening, completes in-flight requests, ends the threads, closes the device. */
  stop(): Promise<void>;
}

/** "0:0,1:main" → queue → thread (-1: main loop), checked against the counts. */
export function parseQueueMap(spec: string | undefined, queues: number, threads: number): number[] {
  const map = Array.from({ length: queues }, (_, i) => (threads > 0 ? i % threads : -1));
  if (!spec) return map;
  for (const item of spec.split(",")) {
    const m = /^(\d+):(\d+|main)$/.exec(item.trim());
    if (!m) throw new OptionError(`--queue-map: "${item}" is not QUEUE:THREAD`);
    const q = Number(m[1]), t = m[2] === "main" ? -1 : Number(m[2]);
    if (q >= queues) throw new OptionError(`--queue-map: queue ${q} >= the device's ${queues} queue(s)`);
    if (t >= threads) throw new OptionError(`--queue-map: thread ${t} >= --threads ${threads}`);
    map[q] = t;
  }
  return map;
}

/**
 * Serves a device: a built-in name ("blk", "rng", "input"), a module path,
 * or a Device object (served on the main loop).
 * @example
 * const s = await serve("./mydev.ts", { socket: "/tmp/mydev.sock", watch: true });
 * console.log(s.qemuLine());
 * await s.stop();
 */
export async function serve(device: string | Device, o: ServeOptions): Promise<Served> {
  const log = o.log ?? stderrLogger(o.logLevel ?? "info");
  let file: string | null = null;
  let mod: DeviceModule | null = null;
  if (typeof device === "string") {
    file = resolveDevicePath(device);
    mod = await importDeviceModule(file);
  } else {
    checkDevice("device", device);
  }
  const threads = o.threads ?? (mod ? mod.defaults?.threads ?? 1 : 0);
  if (!mod && threads > 0) throw new OptionError("a Device object is served on the main loop: give a module path for I/O threads");
  if (o.watch && !file) throw new OptionError("--watch needs a device file");
  const values = { ...defaultValues(mod?.options), ...o.options };
  const prepared = mod?.prepare ? await mod.prepare(values, { threads, log }) : values;
  const main = mod ? await instantiate(file!, mod, prepared, { thread: "main", log }) : (device as Device);
  const queueThread = parseQueueMap(o.queueMap, main.queues, threads);
  const pool: IoThread[] = [];
  try {
    for (let i = 0; i < threads; i++) {
      pool.push(new IoThread(`io${i}`, { module: file!, options: prepared }, { logLevel: o.logLevel ?? "info", pollUs: o.pollUs ?? 0, trace: o.trace }));
    }
    await Promise.all(pool.map((t) => t.ready));
  } catch (e) {
    for (const t of pool) await t.close().catch(() => {});
    main.close?.();
    throw new DeviceModuleError(file ?? "device", "I/O thread", (e as Error).message);
  }
  const socket = resolve(o.socket);
  const server = new VuServer({ socketPath: socket, device: main, log, trace: o.trace, threads: pool, queueThread, loop: new MainLoop() });
  let control: ControlSocket | null = null;
  let reloader: DeviceReloader | null = null;
  try {
    server.start();
    if (file) reloader = new DeviceReloader(server, file, prepared, pool, log);
    if (o.control) (control = new ControlSocket(resolve(o.control), server, log, reloader)).start();
    if (o.watch) await reloader!.watch();
  } catch (e) {
    reloader?.close();
    await server.stop();
    main.close?.();
    throw e;
  }
  let stopped: Promise<void> | null = null;
  return {
    server, file, prepared, threads: pool, reloader, control,
    description: mod?.describe?.(prepared) ?? "",
    qemuLine: () => qemuAttachLine({ type: server.device.type, queues: server.device.queues, configSize: server.device.config().length }, socket),
    stop: () => (stopped ??= (async () => {
      reloader?.close();
      control?.stop();
      await server.stop();
      server.device.close?.();
    })()),
  };
}

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
  /**
   * Unix socket path to listen on; several for a multi-port device (a module
   * with `multiPort: true`, such as the net switch): one front-end each.
   */
  socket: string | string[];
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
  /** The (first) socket's server. */
  server: VuServer;
  /** One server per socket, in the order given. */
  servers: VuServer[];
  /** The device module's file (null for a Device object). */
  file: string | null;
  /** The options every instance was built from (after the module's prepare()). */
  prepared: unknown;
  threads: IoThread[];
  reloader: DeviceReloader | null;
  control: ControlSocket | null;
  /** The device's own description for the start message (its module's describe()), or "". */
  description: string;
  /** QEMU options that attach this device (the first socket's; `qemuLines()` has one per socket). */
  qemuLine(): string;
  qemuLines(): string[];
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
  const sockets = (Array.isArray(o.socket) ? o.socket : [o.socket]).map((p) => resolve(p));
  if (sockets.length === 0) throw new OptionError("no socket to listen on");
  if (new Set(sockets).size !== sockets.length) throw new OptionError("--socket: the same path given twice");
  const multi = mod?.multiPort === true;
  if (sockets.length > 1 && !multi) throw new OptionError(`${file ? "this device" : "a Device object"} serves one socket (a module with multiPort: true serves several)`);
  if (multi && o.watch) throw new OptionError("--watch: a multi-port device cannot be reloaded yet (its ports share state)");
  const values = { ...defaultValues(mod?.options), ...o.options };
  const prepared = mod?.prepare ? await mod.prepare(values, { threads, log, ports: sockets.length }) : values;
  const mains: Device[] = [];
  const pool: IoThread[] = [];
  const closeMains = () => { for (const d of mains) d.close?.(); };
  try {
    if (mod) for (let i = 0; i < sockets.length; i++) mains.push(await instantiate(file!, mod, prepared, { thread: "main", log, port: i }));
    else mains.push(device as Device);
  } catch (e) {
    closeMains();
    throw e;
  }
  const queueThread = parseQueueMap(o.queueMap, mains[0]!.queues, threads);
  try {
    for (let i = 0; i < threads; i++) {
      pool.push(new IoThread(`io${i}`, { module: file!, options: prepared }, { logLevel: o.logLevel ?? "info", pollUs: o.pollUs ?? 0, trace: o.trace, ports: sockets.length }));
    }
    await Promise.all(pool.map((t) => t.ready));
  } catch (e) {
    for (const t of pool) await t.close().catch(() => {});
    closeMains();
    throw new DeviceModuleError(file ?? "device", "I/O thread", (e as Error).message);
  }
  const servers = sockets.map((socketPath, i) => new VuServer({
    socketPath, device: mains[i]!, log, trace: o.trace, queueThread, loop: new MainLoop(),
    // One socket: the server owns its threads; several share them (closed here, after every server).
    threads: multi ? pool.map((t) => t.forPort(i)) : pool,
  }));
  const server = servers[0]!;
  let control: ControlSocket | null = null;
  let reloader: DeviceReloader | null = null;
  const stopServers = async () => {
    for (const s of servers) await s.stop();
    for (const t of pool) await t.close();
  };
  try {
    for (const s of servers) s.start();
    if (file && !multi) reloader = new DeviceReloader(server, file, prepared, pool, log);
    if (o.control) (control = new ControlSocket(resolve(o.control), server, log, reloader)).start();
    if (o.watch) await reloader!.watch();
  } catch (e) {
    reloader?.close();
    await stopServers();
    closeMains();
    throw e;
  }
  const lineOf = (s: VuServer) => {
    const config = s.device.config();
    const mac = s.device.type === 1 && config.length >= 6 ? [...config.subarray(0, 6)].map((b) => b.toString(16).padStart(2, "0")).join(":") : undefined;
    return qemuAttachLine({ type: s.device.type, queues: s.device.queues, configSize: config.length, mac }, s.opts.socketPath);
  };
  let stopped: Promise<void> | null = null;
  return {
    server, servers, file, prepared, threads: pool, reloader, control,
    description: mod?.describe?.(prepared) ?? "",
    qemuLine: () => lineOf(server),
    qemuLines: () => servers.map(lineOf),
    stop: () => (stopped ??= (async () => {
      reloader?.close();
      control?.stop();
      await stopServers();
      for (const s of servers) s.device.close?.();
    })()),
  };
}

/**
 * startDevice(): a device served on a fresh socket for a test. A Device
 * object is served in this process, on Bun's main loop (DeviceDriver never
 * blocks it); a module path or built-in name is served by a child process
 * running the CLI (`server.ts PATH --socket S ...`), as a user would run it.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { Device, OptionValues } from "../device/api.ts";
import type { Level, Logger } from "../device/log.ts";
import { serve, type Served } from "../server/serve.ts";

/**
 * How startDevice serves the device; every field is optional.
 * @example
 * await startDevice("examples/gpio.ts", { options: { lines: 4 }, threads: 2, args: ["--control", ctl], logLevel: "debug" });
 */
export interface StartOptions {
  /** The device's options by name (`{ kind: "mouse", size: "4M" }`); for a module path, passed as `--name value`. */
  options?: OptionValues;
  /** I/O threads (module paths only; default: the device's default). */
  threads?: number;
  /** More command-line arguments for the child process (e.g. `["--watch"]`, `["--control", path]`). */
  args?: string[];
  /** Socket path (default: a fresh directory under /dev/shm). */
  socket?: string;
  /** What the server prints: in-process, lines at this level and above go to stderr (default "error"; log() has them all); a child logs at this level (default "info"). */
  logLevel?: Level;
}

/**
 * A device being served: its socket (for DeviceDriver.connect, or pass the
 * whole object), its log, and stop().
 * @example
 * const dev = await startDevice(myDevice);
 * try { ... } finally { await dev.stop(); }
 * expect(dev.log()).not.toMatch(/error/);
 */
export interface RunningDevice {
  /** The vhost-user socket path. */
  socket: string;
  /** What the server logged so far (in-process: the lines of its logger). */
  log(): string;
  /** In-process only: the server and its helpers (null for a child process). */
  served: Served | null;
  /** Stops the server (SIGTERM, then SIGKILL after 3 s for a child), removes its directory. */
  stop(): Promise<void>;
}

const ROOT = resolve(import.meta.dir, "../..");

function scratch(): string {
  return mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "bunvhost-kit-"));
}

/**
 * Serves `device` on a fresh socket: a Device object in this process (on
 * Bun's main loop, its log collected in memory), a module path or built-in
 * name ("blk", "rng", "input") through the CLI in a child process (output to
 * a file; ready once it says it listens; stop() sends SIGTERM, SIGKILL after
 * 3 s, and always reaps it).
 * @example
 * const dev = await startDevice(myDevice);                       // in-process
 * const cli = await startDevice("./mydev.ts", { threads: 2 });   // child process
 * const drv = await DeviceDriver.connect(dev.socket);
 * ...; drv.close(); await dev.stop();
 */
export async function startDevice(device: Device | string, o: StartOptions = {}): Promise<RunningDevice> {
  const dir = scratch();
  const socket = o.socket ?? join(dir, "vhost.sock");
  if (typeof device !== "string") {
    const lines: string[] = [];
    const level = o.logLevel ?? "error";
    const rank = { debug: 0, info: 1, warn: 2, error: 3 };
    const out = (l: Level) => (m: string) => {
      lines.push(`bunvhost: ${l}: ${m}`);
      if (rank[l] >= rank[level]) process.stderr.write(`bunvhost: ${l}: ${m}\n`);
    };
    const log: Logger = { level, debug: out("debug"), info: out("info"), warn: out("warn"), error: out("error") };
    let served: Served;
    try {
      served = await serve(device, { socket, log, threads: 0 });
    } catch (e) {
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    let stopped: Promise<void> | null = null;
    return {
      socket, served, log: () => lines.join("\n"),
      stop: () => (stopped ??= served.stop().finally(() => rmSync(dir, { recursive: true, force: true }))),
    };
  }
  const argv = [process.execPath, "run", join(ROOT, "server.ts"), device, "--socket", socket, "--log-level", o.logLevel ?? "info"];
  if (o.threads !== undefined) argv.push("--threads", String(o.threads));
  for (const [k, v] of Object.entries(o.options ?? {})) {
    if (v === undefined || v === false) continue;
    argv.push(`--${k}`);
    if (v !== true) argv.push(String(v));
  }
  argv.push(...(o.args ?? []));
  const logPath = join(dir, "server.log");
  // A file, not a pipe: a test busy elsewhere must never block the server on a full pipe.
  const fd = openSync(logPath, "w");
  let proc: ReturnType<typeof Bun.spawn>;
  try {
    proc = Bun.spawn(argv, { cwd: process.cwd(), stdin: "ignore", stdout: fd, stderr: fd });
  } finally {
    closeSync(fd);
  }
  let last = "";
  // The last text read survives stop(), which removes the directory.
  const log = () => (existsSync(logPath) ? (last = readFileSync(logPath, "utf8")) : last);
  let stopped: Promise<void> | null = null;
  const stop = () => (stopped ??= (async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 3000);
      await proc.exited;
      clearTimeout(t);
    }
    log();
    rmSync(dir, { recursive: true, force: true });
  })());
  const deadline = Date.now() + 15_000;
  while (!/listening on/.test(log())) {
    if (proc.exitCode !== null || proc.signalCode !== null || Date.now() > deadline) {
      const text = log();
      await stop();
      throw new Error(`${argv.slice(2).join(" ")}: ${proc.exitCode !== null ? `exited with status ${proc.exitCode}` : "did not start within 15 s"}\n${text}`);
    }
    await Bun.sleep(10);
  }
  return { socket, served: null, log, stop };
}

/**
 * How tests start vhost-user-blk back-ends: our server (server.ts) and
 * qemu-storage-daemon, each as a child process listening on a unix socket in
 * a fresh directory under /dev/shm. Output goes to files in that directory
 * (never pipes: a test blocked in a synchronous wait cannot drain a pipe, and
 * a back-end blocked on a full pipe would look like a hang). `stop()` sends
 * SIGTERM, waits, then SIGKILLs; the child is always reaped and the
 * directory removed.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import * as sys from "../../ffi/sys.ts";

export interface StartOptions {
  /** Disk size in bytes (used when there is no `image`). */
  size: number;
  /** A raw image file to serve (not removed by `stop`). */
  image?: string;
  queues?: number;
  readonly?: boolean;
  /** More command-line arguments (qsd: appended to the --export option string when they start with ","). */
  extraArgs?: string[];
}

export interface Backend {
  name: string;
  socket: string;
  pid: number;
  /** Everything the back-end wrote to stderr so far. */
  stderr(): string;
  /** SIGTERM, wait up to 3 s, then SIGKILL; always reaped. Idempotent. */
  stop(): Promise<void>;
}

export interface BackendKind {
  name: "bunvhost" | "qsd";
  /** For test titles: the name plus how it runs. */
  label: string;
  /** Why this back-end cannot run here, or null. */
  skipReason(): string | null;
  start(o: StartOptions): Promise<Backend>;
}

/** The repository root (this file is tests/support/backends.ts). */
export const REPO_ROOT = resolve(import.meta.dir, "../..");
export const QSD_PATH = "/usr/bin/qemu-storage-daemon";
const READY_TIMEOUT_MS = 10_000;

/** A fresh directory on tmpfs (falls back to the OS temp dir). */
export function scratchDir(prefix = "bunvhost-"): string {
  return mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), prefix));
}

const readText = (p: string) => {
  try {
    return readFileSync(p, "utf8");
  } catch {
    return "";
  }
};

const accepts = sys.unixAccepts;

async function spawnBackend(
  name: string, argv: string[], dir: string, socket: string, cwd: string,
  ready: (stdout: string) => boolean,
): Promise<Backend> {
  const outPath = join(dir, "stdout.log");
  const errPath = join(dir, "stderr.log");
  const out = openSync(outPath, "w");
  const err = openSync(errPath, "w");
  let proc: ReturnType<typeof Bun.spawn>;
  try {
    proc = Bun.spawn(argv, { cwd, stdin: "ignore", stdout: out, stderr: err });
  } finally {
    closeSync(out);
    closeSync(err);
  }
  let stopped = false;
  let lastStderr: string | null = null; // kept when stop() removes the directory
  const backend: Backend = {
    name,
    socket,
    pid: proc.pid,
    stderr: () => lastStderr ?? readText(errPath),
    async stop() {
      if (stopped) return;
      stopped = true;
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const exited = await Promise.race([proc.exited.then(() => true), Bun.sleep(3000).then(() => false)]);
        if (!exited) proc.kill("SIGKILL");
      }
      await proc.exited;
      lastStderr = readText(errPath);
      rmSync(dir, { recursive: true, force: true });
    },
  };
  const deadline = performance.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      const msg = `${name} exited (${proc.exitCode ?? proc.signalCode}) before it was ready: ${argv.join(" ")}\n${readText(errPath)}${readText(outPath)}`;
      await backend.stop();
      throw new Error(msg);
    }
    if (ready(readText(outPath))) return backend;
    if (performance.now() > deadline) {
      const msg = `${name} not ready after ${READY_TIMEOUT_MS} ms: ${argv.join(" ")}\n${readText(errPath)}`;
      await backend.stop();
      throw new Error(msg);
    }
    await Bun.sleep(5);
  }
}

const qsd: BackendKind = {
  name: "qsd",
  label: "qsd",
  skipReason: () => (existsSync(QSD_PATH) ? null : `${QSD_PATH} is not installed`),
  async start(o) {
    const dir = scratchDir("bunvhost-qsd-");
    const socket = join(dir, "vhost.sock");
    let image = o.image;
    if (image === undefined) {
      image = join(dir, "disk.img");
      closeSync(openSync(image, "w"));
      truncateSync(image, o.size);
    }
    if (/[,=]/.test(image) || /[,=]/.test(socket)) throw new Error(`qsd option strings cannot hold "," or "=": ${image}`);
    const extra = o.extraArgs ?? [];
    const exportOpts = [
      "type=vhost-user-blk", "id=e", "node-name=f", "addr.type=unix", `addr.path=${socket}`,
      ...(o.readonly ? [] : ["writable=on"]),
      ...(o.queues !== undefined ? [`num-queues=${o.queues}`] : []),
    ].join(",") + extra.filter((a) => a.startsWith(",")).join("");
    const argv = [
      QSD_PATH,
      "--blockdev", `driver=file,node-name=f,filename=${image}${o.readonly ? ",read-only=on" : ""}`,
      "--export", exportOpts,
      ...extra.filter((a) => !a.startsWith(",")),
    ];
    return spawnBackend("qsd", argv, dir, socket, dir, () => existsSync(socket));
  },
};

const bunvhost: BackendKind = {
  name: "bunvhost",
  label: "bunvhost",
  skipReason: () => (existsSync(join(REPO_ROOT, "server.ts")) ? null : "server.ts does not exist yet"),
  async start(o) {
    const dir = scratchDir("bunvhost-srv-");
    // A restart passes the socket of the server it replaces (--socket may be given once for blk).
    const given = o.extraArgs?.indexOf("--socket") ?? -1;
    const socket = given >= 0 ? o.extraArgs![given + 1]! : join(dir, "vhost.sock");
    const argv = [
      process.execPath, "run", "server.ts", ...(given >= 0 ? [] : ["--socket", socket]),
      ...(o.image !== undefined ? ["--image", o.image] : ["--size", String(o.size)]),
      "--queues", String(o.queues ?? 1),
      ...(o.readonly ? ["--readonly"] : []),
      ...(o.extraArgs ?? []),
    ];
    const started = performance.now();
    let probed = 0;
    return spawnBackend("bunvhost", argv, dir, socket, REPO_ROOT, (stdout) => {
      if (stdout.includes("listening")) return true;
      // No banner after a second: accept a socket that takes connections, probing at most every
      // 50 ms. Not earlier: a probe is a front-end to the server, and one that has just hung up
      // can make the server turn the test's own connection away.
      const t = performance.now();
      if (t - started < 1000 || !existsSync(socket) || t - probed < 50) return false;
      probed = t;
      return accepts(socket);
    });
  },
};

export const backendKinds: BackendKind[] = [bunvhost, qsd];

/** bunvhost with its queues on Bun's main loop (--threads 0) instead of an I/O thread. */
export const bunvhostMainLoop: BackendKind = {
  ...bunvhost,
  label: "bunvhost (main loop)",
  start: (o) => bunvhost.start({ ...o, extraArgs: ["--threads", "0", ...(o.extraArgs ?? [])] }),
};

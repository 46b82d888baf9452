/**
 * bunvhost: a vhost-user-blk back-end.
 *
 *   bun run server.ts [--socket PATH] [--image FILE | --size SIZE | --null SIZE] [--readonly]
 *                     [--direct] [--aio auto|uring|sync] [--queues N] [--queue-size N] [--threads N]
 *                     [--poll-us N] [--serial ID] [--trace]
 *                     [--log-level debug|info|warn|error]
 */
import { parseArgs } from "node:util";
import { resolve } from "node:path";
import { createDevice, type BlkSpec } from "./src/devices/blk.ts";
import { resolveAioPath, shareBacking, type Aio, type BackingSpec } from "./src/devices/blk_backing.ts";
import { stderrLogger, type Level } from "./src/device/log.ts";
import { VuServer } from "./src/server/vu_server.ts";
import { IoThread } from "./src/server/io_thread.ts";
import { MainLoop } from "./src/server/event_loop.ts";
import { uringUnavailable } from "./src/io/uring.ts";
import { ControlSocket } from "./src/server/control.ts";

const USAGE = `usage: bun run server.ts [options]
  --socket PATH        unix socket to listen on (default ./vhost-user-blk.sock)
  --image FILE         serve a raw image file or block device
  --size SIZE          serve an in-memory disk of SIZE (default 256M)
  --null SIZE          serve a null disk of SIZE (reads leave buffers, writes are dropped)
  --readonly           refuse writes (VIRTIO_BLK_F_RO)
  --direct             open --image with O_DIRECT
  --aio auto|uring|sync  how --image is read and written: io_uring (many requests in flight per
                       queue without blocking the loop), synchronous syscalls, or auto (default):
                       io_uring, but synchronous for a buffered image on tmpfs/ramfs (memory copies)
  --queues N           number of virtqueues (default 1)
  --queue-size N       largest queue size accepted, a power of 2 (default 1024)
  --threads N          I/O threads serving the queues (default 1; 0: Bun's main loop)
  --queue-map LIST     explicit queue→thread map, e.g. 0:0,1:1,2:main (default: round robin)
  --poll-us N          I/O threads keep polling their rings (and io_uring) for up to N µs after
                       work before sleeping: lower latency, more CPU (default 0: off)
  --control PATH       line-based control socket: "stats", "move QUEUE THREAD|main", "resize"
  --serial ID          GET_ID string, at most 20 bytes (default "bunvhost")
  --trace              log every vhost-user message both ways
  --log-level LEVEL    debug, info, warn or error (default info)
SIZE is bytes or a number with K, M, G or T (powers of 1024), e.g. 64M.`;

function usage(msg: string): never {
  process.stderr.write(`server.ts: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

/** "64M" → 67108864; throws on anything else. */
export function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(s.trim());
  if (!m) throw new Error(`bad size "${s}"`);
  const mult = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase() as "" | "K" | "M" | "G" | "T"];
  const v = Number(m[1]) * mult;
  if (!Number.isSafeInteger(v) || v <= 0 || v % 512 !== 0) throw new Error(`size "${s}" must be a positive multiple of 512 bytes`);
  return v;
}

function parseIntArg(name: string, s: string, min: number, max: number): number {
  if (!/^\d+$/.test(s)) usage(`--${name} must be an integer`);
  const v = Number(s);
  if (v < min || v > max) usage(`--${name} must be in ${min}..${max}`);
  return v;
}

function sizeArg(s: string): number {
  try {
    return parseSize(s);
  } catch (e) {
    usage((e as Error).message);
  }
}

async function main(): Promise<void> {
  let args;
  try {
    args = parseArgs({
      args: Bun.argv.slice(2),
      options: {
        socket: { type: "string", default: "./vhost-user-blk.sock" },
        image: { type: "string" }, size: { type: "string" }, null: { type: "string" },
        readonly: { type: "boolean", default: false }, direct: { type: "boolean", default: false },
        aio: { type: "string" }, "poll-us": { type: "string", default: "0" },
        queues: { type: "string", default: "1" }, "queue-size": { type: "string", default: "1024" },
        serial: { type: "string", default: "bunvhost" }, trace: { type: "boolean", default: false },
        threads: { type: "string", default: "1" }, "queue-map": { type: "string" }, control: { type: "string" },
        "log-level": { type: "string", default: "info" }, help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (e) {
    usage((e as Error).message);
  }
  if (args.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  const level = args["log-level"] as Level;
  if (!["debug", "info", "warn", "error"].includes(level)) usage(`--log-level must be debug, info, warn or error`);
  const kinds = [args.image, args.size, args.null].filter((x) => x !== undefined).length;
  if (kinds > 1) usage("give at most one of --image, --size, --null");
  const queues = parseIntArg("queues", args.queues!, 1, 256);
  const queueSize = parseIntArg("queue-size", args["queue-size"]!, 2, 32768);
  if (queueSize & (queueSize - 1)) usage("--queue-size must be a power of 2");
  if (new TextEncoder().encode(args.serial!).length > 20) usage("--serial must be at most 20 bytes");
  if (args.direct && !args.image) usage("--direct needs --image");
  if (args.aio !== undefined && !args.image) usage("--aio needs --image");
  if (args.aio !== undefined && args.aio !== "auto" && args.aio !== "uring" && args.aio !== "sync") usage("--aio must be auto, uring or sync");
  const pollUs = parseIntArg("poll-us", args["poll-us"]!, 0, 1_000_000);

  const threads = parseIntArg("threads", args.threads!, 0, 64);
  const queueThread = Array.from({ length: queues }, (_, i) => (threads > 0 ? i % threads : -1));
  if (args["queue-map"]) {
    for (const item of args["queue-map"].split(",")) {
      const m = /^(\d+):(\d+|main)$/.exec(item.trim());
      if (!m) usage(`--queue-map: "${item}" is not QUEUE:THREAD`);
      const q = Number(m[1]), t = m[2] === "main" ? -1 : Number(m[2]);
      if (q >= queues) usage(`--queue-map: queue ${q} >= --queues ${queues}`);
      if (t >= threads) usage(`--queue-map: thread ${t} >= --threads ${threads}`);
      queueThread[q] = t;
    }
  }

  const log = stderrLogger(level);
  let aio = (args.aio ?? "auto") as Aio;
  if (args.image && aio === "auto") {
    try {
      aio = resolveAioPath(aio, resolve(args.image), args.direct === true);
    } catch {
      // Opening the image fails again below, with the error the user needs.
    }
  }
  const noUring = args.image && aio === "uring" ? uringUnavailable() : null;
  if (noUring !== null) {
    log.warn(`io_uring unavailable (${noUring}); --image uses synchronous I/O`);
    aio = "sync";
  }
  let backing: BackingSpec;
  if (args.image) backing = { kind: "file", path: resolve(args.image), readonly: args.readonly || undefined, direct: args.direct, aio };
  else if (args.null) backing = { kind: "null", size: sizeArg(args.null) };
  else backing = { kind: "ram", size: sizeArg(args.size ?? "256M") };
  const spec: BlkSpec = { backing: threads > 0 ? shareBacking(backing) : backing, readonly: args.readonly, queues, queueSize, serial: args.serial };
  let device;
  try {
    device = createDevice(spec);
  } catch (e) {
    process.stderr.write(`server.ts: ${args.image ? `cannot open ${args.image}: ` : ""}${(e as Error).message}\n`);
    process.exit(1);
  }
  const pool: IoThread[] = [];
  for (let i = 0; i < threads; i++) {
    pool.push(new IoThread(`io${i}`, { module: new URL("./src/devices/blk.ts", import.meta.url).href, options: spec }, { logLevel: level, pollUs, trace: args.trace }));
  }
  try {
    await Promise.all(pool.map((t) => t.ready));
  } catch (e) {
    process.stderr.write(`server.ts: I/O thread failed to start: ${(e as Error).message}\n`);
    process.exit(1);
  }
  const socketPath = resolve(args.socket!);
  // The main thread's device instance serves the queues on Bun's loop (--threads 0, --queue-map N:main, moves).
  const loop = new MainLoop();
  device.attach?.(loop);
  const server = new VuServer({ socketPath, device, log, trace: args.trace, threads: pool, queueThread, loop });
  let control: ControlSocket | null = null;
  try {
    server.start();
    if (args.control) (control = new ControlSocket(resolve(args.control), server, log)).start();
  } catch (e) {
    process.stderr.write(`server.ts: ${(e as Error).message}\n`);
    process.exit(1);
  }
  const backingSize = backing.kind === "file" ? 0 : backing.size;
  const what = args.image ? `image ${args.image}${aio === "uring" ? " on io_uring" : ""}` : args.null ? `null disk of ${backingSize} bytes` : `RAM disk of ${backingSize} bytes`;
  const where = threads === 0 ? "main loop" : `${threads} I/O thread${threads > 1 ? "s" : ""}`;
  process.stdout.write(
    `bunvhost: vhost-user-blk (${what}${args.readonly ? ", read-only" : ""}, ${queues} queue${queues > 1 ? "s" : ""} on ${where}) listening on ${socketPath}; ` +
      `attach with: qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem ` +
      `-chardev socket,id=vu0,path=${socketPath} -device vhost-user-blk-pci,chardev=vu0,num-queues=${queues}\n`,
  );
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    log.info(`${sig}: stopping`);
    control?.stop();
    void server.stop().then(() => {
      device.close?.();
      process.exit(0);
    });
  };
  // Errors are handled where they arise; one that escapes is our bug: log it and keep serving.
  process.on("unhandledRejection", (e) => log.error(`internal error (unhandled rejection): ${e instanceof Error ? e.stack : e}`));
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
}

if (import.meta.main) await main();

/**
 * bunvhost: vhost-user back-ends. One CLI for every device:
 *
 *   bun run server.ts [DEVICE] [options]      DEVICE: blk (default), rng, input, or a .ts/.js module
 *   bun run server.ts DEVICE --help           the device's own options too
 *   bun run server.ts new NAME [--type rng|input|blank]
 *
 * Arguments → validated options → serve() (src/server/serve.ts); prints the
 * QEMU options that attach the device.
 */
import { parseArgs } from "node:util";
import { OptionError, type DeviceModule, type OptionValues } from "./src/device/api.ts";
import { stderrLogger, type Level } from "./src/device/log.ts";
import {
  BUILTIN_DEVICES, DeviceModuleError, importDeviceModule, optionUsage, parseOptionValue, parseSizeValue, resolveDevicePath,
} from "./src/server/device_module.ts";
import { serve } from "./src/server/serve.ts";

const COMMON_USAGE = `common options:
  --socket PATH        unix socket to listen on (default ./vhost-user-DEVICE.sock)
  --threads N          I/O threads serving the queues (default 1, or the device's; 0: Bun's main loop)
  --queue-map LIST     explicit queue→thread map, e.g. 0:0,1:1,2:main (default: round robin)
  --poll-us N          I/O threads keep polling their rings (and io_uring) for up to N µs after
                       work before sleeping: lower latency, more CPU (default 0: off)
  --control PATH       line-based control socket: "stats", "move QUEUE THREAD|main", "resize", "reload"
  --watch              reload the device when its file or a file it imports changes (device files)
  --trace              log every vhost-user message both ways, decoded, one line each (also what
                       we send on the back-end channel)
  --log-level LEVEL    debug, info, warn or error (default info)
  -h, --help           this text (after DEVICE: with the device's options)`;

function usageText(device: string, mod: DeviceModule | null): string {
  const own = mod?.options && Object.keys(mod.options).length > 0 ? `\n${device} options:\n${optionUsage(mod.options)}` : mod ? `\n${device} has no options of its own.` : "";
  return `usage: bun run server.ts [DEVICE] [options]
       bun run server.ts new NAME [--type rng|input|blank]
DEVICE is a built-in device (${Object.keys(BUILTIN_DEVICES).join(", ")}; default blk) or the path of a
.ts/.js module whose default export is a Device or a factory (see docs/DEVICES.md).
${COMMON_USAGE}${own}
SIZE is bytes or a number with K, M, G or T (powers of 1024), e.g. 64M.`;
}

function fail(msg: string, code: number, usage?: string): never {
  process.stderr.write(`server.ts: ${msg}\n${usage ? usage + "\n" : ""}`);
  process.exit(code);
}

function intArg(name: string, s: string | undefined, min: number, max: number, usage: string): number | undefined {
  if (s === undefined) return undefined;
  if (!/^\d+$/.test(s)) fail(`--${name} must be an integer`, 2, usage);
  const v = Number(s);
  if (v < min || v > max) fail(`--${name} must be in ${min}..${max}`, 2, usage);
  return v;
}

export async function main(): Promise<void> {
  const argv = Bun.argv.slice(2);
  if (argv[0] === "new") {
    const { scaffold } = await import("./src/cli/new.ts");
    process.exit(await scaffold(argv.slice(1)));
  }
  const deviceArg = argv[0] !== undefined && !argv[0].startsWith("-") ? argv[0] : "blk";
  const rest = argv[0] === deviceArg ? argv.slice(1) : argv;
  let file: string, mod: DeviceModule;
  try {
    file = resolveDevicePath(deviceArg);
    mod = await importDeviceModule(file);
  } catch (e) {
    if (e instanceof DeviceModuleError) fail(e.message, 1);
    throw e;
  }
  const usage = usageText(deviceArg, mod);
  const declared = mod.options ?? {};
  const deviceOpts: Record<string, { type: "string" | "boolean"; multiple?: boolean }> = {};
  for (const [n, o] of Object.entries(declared)) deviceOpts[n] = { type: o.type === "boolean" ? "boolean" : "string", multiple: o.multiple === true };
  let args: Record<string, string | boolean | string[] | undefined>;
  try {
    args = parseArgs({
      args: rest,
      options: {
        socket: { type: "string", multiple: true }, threads: { type: "string" }, "queue-map": { type: "string" }, "poll-us": { type: "string" },
        control: { type: "string" }, watch: { type: "boolean" }, trace: { type: "boolean" }, "log-level": { type: "string", default: "info" },
        help: { type: "boolean", short: "h" },
        ...deviceOpts,
      },
      strict: true,
      allowPositionals: false,
    }).values as Record<string, string | boolean | string[] | undefined>;
  } catch (e) {
    fail((e as Error).message, 2, usage);
  }
  if (args.help) {
    process.stdout.write(usage + "\n");
    process.exit(0);
  }
  const level = args["log-level"] as Level;
  if (!["debug", "info", "warn", "error"].includes(level)) fail("--log-level must be debug, info, warn or error", 2, usage);
  const threads = intArg("threads", args.threads as string | undefined, 0, 64, usage);
  const pollUs = intArg("poll-us", args["poll-us"] as string | undefined, 0, 1_000_000, usage) ?? 0;
  const values: OptionValues = {};
  for (const [n, o] of Object.entries(declared)) {
    const raw = args[n];
    if (raw === undefined) continue;
    try {
      values[n] = parseOptionValue(n, o, raw);
    } catch (e) {
      fail((e as Error).message, 2, usage);
    }
  }
  const isBuiltin = BUILTIN_DEVICES[deviceArg] !== undefined;
  const given = (args.socket as string[] | undefined) ?? [];
  const socket = given.length > 1 ? given : given[0] ?? `./vhost-user-${isBuiltin ? deviceArg : "device"}.sock`;
  const log = stderrLogger(level);
  const t0 = performance.now();
  let served;
  try {
    served = await serve(file, {
      socket, options: values, threads, queueMap: args["queue-map"] as string | undefined, pollUs,
      control: args.control as string | undefined, trace: args.trace === true, logLevel: level, log, watch: args.watch === true,
    });
  } catch (e) {
    if (e instanceof OptionError) fail(e.message, 2, usage);
    const m = e instanceof Error ? e.message : String(e);
    const image = values.image;
    fail(deviceArg === "blk" && typeof image === "string" && !(e instanceof DeviceModuleError) ? `cannot open ${image}: ${m}` : m, 1);
  }
  // Handlers first: whoever reads the start line may signal us at once.
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    log.info(`${sig}: stopping`);
    void served.stop().then(() => process.exit(0));
  };
  // Errors are handled where they arise; one that escapes is our bug (or a device's): log it and keep serving.
  process.on("unhandledRejection", (e) => log.error(`internal error (unhandled rejection): ${e instanceof Error ? e.stack : e}`));
  process.on("uncaughtException", (e) => log.error(`uncaught exception (a device callback?): ${e instanceof Error ? e.stack : e}`));
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  const dev = served.server.device;
  const nThreads = served.threads.length;
  const where = nThreads === 0 ? "main loop" : `${nThreads} I/O thread${nThreads > 1 ? "s" : ""}`;
  const what = served.description ? `${served.description}, ` : "";
  process.stdout.write(
    `bunvhost: ${dev.name === "blk" ? "vhost-user-blk" : dev.name} (${what}VIRTIO id ${dev.type}, ${dev.queues} queue${dev.queues > 1 ? "s" : ""} on ${where}) ` +
      `listening on ${served.servers.map((s) => s.opts.socketPath).join(", ")}${served.reloader && args.watch ? ", watching for changes" : ""} ` +
      `(started in ${(performance.now() - t0).toFixed(0)} ms); attach with: ${served.qemuLines().join(" ; ")}\n`,
  );
}

/** "64M" → 67108864 (kept for scripts that size disks like the CLI does). */
export const parseSize = (s: string): number => parseSizeValue(s);

if (import.meta.main) await main();

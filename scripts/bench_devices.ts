#!/usr/bin/env bun
/**
 * What a device author waits for: start-up time of the server with a
 * built-in device and with a device file (spawn until the socket accepts a
 * connection), against qemu-storage-daemon's start-up for the blk case, and
 * the pause of a hot reload (rings quiesced, state moved, swapped, resumed)
 * while a front-end keeps two queues busy, measured by the server itself.
 * Medians of several runs; prints a Markdown section for docs/PERFORMANCE.md.
 *
 *   bun scripts/bench_devices.ts [--runs N]
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import * as sys from "../ffi/sys.ts";
import { DeviceDriver, startDevice } from "../src/testing/index.ts";

const ROOT = resolve(import.meta.dir, "..");
const runs = Number(process.argv[process.argv.indexOf("--runs") + 1] ?? 0) || 9;
const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : "/tmp", "bunvhost-bench-dev-"));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const accepts = sys.unixAccepts;

/** ms from spawn until `socket` accepts; the process is then stopped. */
async function startup(argv: string[], socket: string): Promise<number> {
  if (existsSync(socket)) rmSync(socket);
  const t0 = performance.now();
  const p = Bun.spawn(argv, { cwd: ROOT, stdout: "ignore", stderr: "ignore" });
  while (!accepts(socket)) {
    if (p.exitCode !== null) throw new Error(`${argv.join(" ")} exited ${p.exitCode}`);
    await Bun.sleep(1);
  }
  const ms = performance.now() - t0;
  p.kill("SIGTERM");
  await p.exited;
  return ms;
}

const deviceFile = join(dir, "fill.ts");
const source = (v: number) => `import type { Device } from ${JSON.stringify(join(ROOT, "src/index.ts"))};
let count = 0;
export default (): Device => ({
  name: "fill", type: 42, queues: 2, queueSize: 256, features: 0n, config: () => new Uint8Array([${v}]),
  handle(req) { count++; req.out.fill(req.out.remaining, ${v}); },
  saveState: () => new Uint8Array(new Uint32Array([count]).buffer),
  loadState(b) { count = new Uint32Array(b.slice(0, 4).buffer)[0]!; },
});
`;
writeFileSync(deviceFile, source(1));

const sock = join(dir, "s.sock");
const bun = process.execPath;
const cases: [string, string[]][] = [
  ["blk (built-in), --threads 0", [bun, "run", "server.ts", "--size", "64M", "--threads", "0", "--socket", sock]],
  ["blk (built-in), 1 I/O thread", [bun, "run", "server.ts", "--size", "64M", "--socket", sock]],
  ["rng (built-in), 1 I/O thread", [bun, "run", "server.ts", "rng", "--socket", sock]],
  ["device file, --threads 0", [bun, "run", "server.ts", deviceFile, "--threads", "0", "--socket", sock]],
  ["device file, 2 I/O threads", [bun, "run", "server.ts", deviceFile, "--threads", "2", "--socket", sock]],
];
const qsd = Bun.which("qemu-storage-daemon");
if (qsd) {
  cases.push(["qemu-storage-daemon (null-co blk export)", [qsd, "--blockdev", "driver=null-co,node-name=n,size=67108864",
    "--export", `type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=${sock},writable=on`]]);
}

const rows: string[] = [];
for (const [what, argv] of cases) {
  await startup(argv, sock); // warm-up (file cache, transpiler cache)
  const ms: number[] = [];
  for (let i = 0; i < runs; i++) ms.push(await startup(argv, sock));
  rows.push(`| ${what} | ${median(ms).toFixed(0)} | ${Math.min(...ms).toFixed(0)}–${Math.max(...ms).toFixed(0)} |`);
  console.error(`startup: ${what}: median ${median(ms).toFixed(1)} ms`);
}

// Reload pauses under load: 2 queues on 2 I/O threads, 16 requests in flight, reload through the control socket.
const ctl = join(dir, "ctl.sock");
const dev = await startDevice(deviceFile, { threads: 2, args: ["--control", ctl] });
const drv = await DeviceDriver.connect(dev.socket, { queueSize: 256 });
const control = async (cmd: string): Promise<string> => {
  let got = "";
  const s = await Bun.connect({ unix: ctl, socket: { data(_s, d) { got += d.toString(); } } });
  s.write(cmd + "\n");
  while (!got.includes("\n")) await Bun.sleep(1);
  s.end();
  return got.trim();
};
const pauses: number[] = [];
let done = 0;
let stop = false;
const load = (async () => {
  while (!stop) {
    const cs = [0, 1].flatMap((q) => Array.from({ length: 8 }, () => drv.post(q, { writable: 512 })));
    await drv.wait(Promise.all(cs), 10_000);
    done += cs.length;
  }
})();
for (let i = 0; i < runs * 2; i++) {
  writeFileSync(deviceFile, source(i + 2));
  const r = await control("reload");
  const m = /^ok paused ([\d.]+) ms/.exec(r);
  if (!m) throw new Error(`reload: ${r}`);
  pauses.push(Number(m[1]));
  await Bun.sleep(20);
}
stop = true;
await load;
drv.close();
await dev.stop();
rmSync(dir, { recursive: true, force: true });

console.log(`## Device start-up and hot reload (\`bun scripts/bench_devices.ts\`)

Start-up: from spawning the server to its socket accepting a connection (median of ${runs} runs after
one warm-up, ms). The device file is a 10-line device outside the repository, transpiled by Bun at
start.

| server | median ms | min–max |
|---|---|---|
${rows.join("\n")}

Hot reload of that device file through the control socket's \`reload\` while a front-end keeps 16
requests in flight on 2 queues served by 2 I/O threads: rings paused (quiesce, state moved in 3
instances, swap, resume) median **${median(pauses).toFixed(2)} ms** (min ${Math.min(...pauses).toFixed(2)}, max ${Math.max(...pauses).toFixed(2)}; ${pauses.length} reloads,
${done} requests completed meanwhile, none lost: the kit would have timed out).`);

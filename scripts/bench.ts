#!/usr/bin/env bun
/**
 * bunvhost against qemu-storage-daemon: 4 KiB random reads through the same
 * front-end (src/frontend/BlkDriver), medians written to docs/PERFORMANCE.md.
 *
 *   bun scripts/bench.ts [--quick] [--runs N] [--filter REGEX] [--pin MODE] [--polling] [--server DIR] [--out FILE]
 *
 * Theory of operation. A configuration is a backing (null, or a file on
 * tmpfs), a queue count, a queue depth per queue and a CPU placement. For
 * each run index the back-ends are started in turn (bunvhost, bunvhost on
 * the main loop, qsd, qsd with an iothread; for file rows also bunvhost
 * with --aio sync and qsd with aio=io_uring; then again), each as a fresh
 * process, and driven from this process: the driver keeps `depth` reads in
 * flight on every queue, sleeping on the call eventfds (interrupt mode, as a
 * guest does) unless --polling. After a warm-up, one measured interval counts
 * completions (IOPS), times each request from enqueue to reap (mean and p99),
 * and reads CPU time: the back-end's from /proc/PID/stat (utime + stime of
 * all its threads, clock ticks; per thread from schedstat), ours from
 * process.cpuUsage(), the whole machine's from /proc/stat. What neither side
 * used is other jobs' load; a run disturbed by more than OTHER_LIMIT of a CPU
 * is run again. Medians of every figure over the runs go in the tables.
 *
 * Placement: by default this process sits on CPU 0 and the back-end on CPU 1
 * (taskset), so the two never take each other's CPU; the "one CPU"
 * configurations put both on CPU 0. Unpinned, QD1 results were bimodal
 * (a same-CPU wakeup is a context switch, a cross-CPU one costs tens of µs
 * in this VM).
 *
 * The front-end's ceiling: the same loop against an "instant device": the
 * handshake is done with qsd, which is then frozen (SIGSTOP); this process
 * completes every request itself by copying avail entries into the used
 * ring. What is left is the front-end's own cost per I/O.
 *
 * Everything below the hand-written marker of an existing output file is kept.
 */
import { $ } from "zx";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { BlkDriver, VIRTIO_BLK_T_IN, type ReqOpts } from "../src/frontend/blk_driver.ts";
import { needEvent, type SplitDriver } from "../src/frontend/split_driver.ts";
import * as sys from "../ffi/sys.ts";
import { EPOLL_CTL_ADD, EPOLLIN } from "../ffi/constants.ts";

const ROOT = resolve(import.meta.dir, "..");
const QSD = "/usr/bin/qemu-storage-daemon";
const BUN = process.execPath;
const DISK_BYTES = 1 << 30;
const IO_BYTES = 4096;
const QUEUE_SIZE = 256;
const MARKER = "<!-- Hand-written from here on: scripts/bench.ts keeps everything below this line. -->";

const { values: args } = parseArgs({
  args: Bun.argv.slice(2),
  options: {
    quick: { type: "boolean", default: false },
    runs: { type: "string" },
    filter: { type: "string" },
    backends: { type: "string" },
    polling: { type: "boolean", default: false },
    out: { type: "string" },
    server: { type: "string" },
    pin: { type: "string" },
    "no-profile": { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});
if (args.help) {
  console.log(`usage: bun scripts/bench.ts [--quick] [--runs N] [--filter REGEX] [--pin MODE] [--polling] [--server DIR] [--out FILE] [--no-profile]
  --quick        a smoke run (~30 s): 1 run, short intervals, a few configurations; writes no file unless --out
  --runs N       runs per back-end and configuration (default 3)
  --filter RE    only configurations whose name matches RE (e.g. "null 1q")
  --backends RE  only back-ends whose name matches RE (the tables need bunvhost, qsd and qsd+iothread)
  --polling      the front-end spins on used.idx instead of sleeping on the call eventfd
  --out FILE     output file (default docs/PERFORMANCE.md in full mode)
  --pin MODE     placement for every configuration: split (front-end on CPU 0, back-end on CPU 1; the default,
                 plus a few "one CPU" configurations), same (both on CPU 0) or none (the scheduler decides)
  --server DIR   run bunvhost's server.ts from DIR (e.g. a checkout of another commit; default this repository)
  --no-profile   skip the bun --cpu-prof run of bunvhost`);
  process.exit(0);
}
const QUICK = args.quick;
const RUNS = args.runs !== undefined ? Number(args.runs) : QUICK ? 1 : 3;
if (!Number.isInteger(RUNS) || RUNS < 1 || RUNS > 100) throw new RangeError(`--runs ${args.runs}: an integer in 1..100`);
// JSC compiles the hot path in its JIT threads during the first few thousand requests; at QD1 they still
// took ~15% of the back-end's CPU in a 0.5 s warm-up.
const WARMUP_S = QUICK ? 0.2 : 1;
const MEASURE_S = QUICK ? 0.5 : 2;
const OUT = args.out ?? (QUICK ? null : join(ROOT, "docs/PERFORMANCE.md"));
const FILTER = args.filter !== undefined ? new RegExp(args.filter) : null;
const BACKENDS = args.backends !== undefined ? new RegExp(args.backends) : null;
const POLLING = args.polling;
const SERVER_DIR = resolve(args.server ?? ROOT);
type Pin = "split" | "same" | "none";
const PIN = args.pin as Pin | undefined;
if (PIN !== undefined && !["none", "split", "same"].includes(PIN)) throw new RangeError(`--pin ${PIN}: none, split or same`);

$.verbose = true;

// ---- back-ends -------------------------------------------------------------------

/** null: no data; file: a buffered image on tmpfs (page cache); disk: an image on ext4 read with O_DIRECT (the VM's disk). */
type Backing = "null" | "file" | "disk";
interface Config { name: string; backing: Backing; queues: number; depth: number; pin: Pin }
interface Variant {
  name: string;
  /** Only for some configurations (default all). */
  only?: (c: Config) => boolean;
  /** The command line, with the socket (and image) paths filled in. */
  argv(socket: string, c: Config, image: string): string[];
}

const exportOpts = (socket: string, node: string, c: Config, iothread: boolean) =>
  [
    "type=vhost-user-blk", "id=e", `node-name=${node}`, "addr.type=unix", `addr.path=${socket}`, "writable=on",
    `num-queues=${c.queues}`, ...(iothread ? ["iothread=io0"] : []),
  ].join(",");
const qsdBlockdev = (c: Config, image: string) =>
  c.backing === "null"
    ? `driver=null-co,node-name=n,size=${DISK_BYTES},read-zeroes=off`
    : `driver=file,node-name=n,filename=${image}${c.backing === "disk" ? ",cache.direct=on" : ""}`;

const bunvhostArgv = (extra: string[]) => (socket: string, c: Config, image: string) => [
  BUN, "run", "server.ts", "--socket", socket,
  ...(c.backing === "null" ? ["--null", "1G"] : ["--image", image]), ...(c.backing === "disk" ? ["--direct"] : []),
  "--queues", String(c.queues), ...extra,
];
const VARIANTS: Variant[] = [
  { name: "bunvhost", argv: bunvhostArgv([]) },
  {
    name: "qsd",
    argv: (socket, c, image) => [QSD, "--blockdev", qsdBlockdev(c, image), "--export", exportOpts(socket, "n", c, false)],
  },
  {
    name: "qsd+iothread",
    argv: (socket, c, image) => [
      QSD, "--object", "iothread,id=io0", "--blockdev", qsdBlockdev(c, image), "--export", exportOpts(socket, "n", c, true),
    ],
  },
];
// A server with I/O threads (--threads, default 1) is also measured on Bun's main loop, the peer of qsd without an iothread.
const serverHelp = (await $({ cwd: SERVER_DIR, nothrow: true, quiet: true })`${BUN} run server.ts --help`).stdout;
const HAS_THREADS = serverHelp.includes("--threads");
if (HAS_THREADS) {
  VARIANTS.splice(1, 0, { name: "bunvhost main loop", argv: bunvhostArgv(["--threads", "0"]) });
  VARIANTS.splice(2, 0, { name: "bunvhost 2 threads", argv: bunvhostArgv(["--threads", "2"]), only: (c) => c.queues === 2 });
}
// Image rows: the server's default (--aio auto: synchronous on tmpfs, io_uring for an O_DIRECT disk) with the other
// path measured beside it, and qsd on io_uring (aio=io_uring on its file blockdev) beside qsd's default thread pool.
const HAS_AIO = serverHelp.includes("--aio");
const HAS_AUTO = serverHelp.includes("--aio auto");
const fileOnly = (c: Config) => c.backing !== "null";
if (HAS_AIO) {
  if (HAS_AUTO) {
    VARIANTS.push({ name: "bunvhost aio=uring", argv: bunvhostArgv(["--aio", "uring"]), only: (c) => c.backing === "file" });
    VARIANTS.push({ name: "bunvhost aio=sync", argv: bunvhostArgv(["--aio", "sync"]), only: (c) => c.backing === "disk" });
  } else {
    VARIANTS.push({ name: "bunvhost aio=sync", argv: bunvhostArgv(["--aio", "sync"]), only: fileOnly });
  }
}
VARIANTS.push({
  name: "qsd aio=io_uring",
  only: fileOnly,
  argv: (socket, c, image) => [QSD, "--blockdev", `${qsdBlockdev(c, image)},aio=io_uring`, "--export", exportOpts(socket, "n", c, false)],
});

interface Running { pid: number; dir: string; socket: string; log: string; done: Promise<unknown> }

async function startBackend(v: Variant, c: Config, image: string, prefix: string[] = []): Promise<Running> {
  const dir = mkdtempSync("/dev/shm/bunvhost-bench-");
  const socket = join(dir, "vhost.sock");
  const log = join(dir, "backend.log");
  const pin = c.pin === "none" ? [] : ["taskset", "-c", c.pin === "split" ? "1" : "0"];
  const argv = [...pin, ...prefix, ...v.argv(socket, c, image)];
  // exec: the pid is the back-end's own, not a shell's. Output goes to a file, never a pipe this
  // process would have to drain while it blocks in the driver loop.
  const p = $({ cwd: SERVER_DIR, nothrow: true, quiet: true })`exec ${argv} >${log} 2>&1 </dev/null`;
  const pid = p.pid;
  if (pid === undefined) throw new Error(`${v.name}: no pid`);
  return { pid, dir, socket, log, done: p };
}

async function stopBackend(r: Running, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
  try {
    process.kill(r.pid, signal);
  } catch {
    // already gone
  }
  const exited = await Promise.race([r.done.then(() => true), Bun.sleep(5000).then(() => false)]);
  if (!exited) {
    process.kill(r.pid, "SIGKILL");
    await r.done;
  }
  rmSync(r.dir, { recursive: true, force: true });
}

function connect(r: Running, queues: number, depth: number): BlkDriver {
  try {
    return BlkDriver.connect(r.socket, {
      queues, depth, queueSize: QUEUE_SIZE, maxIo: IO_BYTES, poison: false, polling: POLLING,
      connectTimeoutMs: 15_000, timeoutMs: 15_000,
    });
  } catch (e) {
    const log = existsSync(r.log) ? readFileSync(r.log, "utf8") : "";
    throw new Error(`cannot drive the back-end (pid ${r.pid}): ${(e as Error).message}\n${log}`, { cause: e });
  }
}

// ---- CPU accounting ------------------------------------------------------------------

const CLK_TCK = Number((await $`getconf CLK_TCK`).stdout.trim());

/** [utime, stime] (clock ticks) of a process (all its threads) from /proc/PID/stat; zeroes once it is gone. */
function ticks(pid: number): [number, number] {
  let s: string;
  try {
    s = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return [0, 0];
  }
  const f = s.slice(s.lastIndexOf(")") + 2).split(" "); // f[0] is field 3 (state)
  return [Number(f[11]), Number(f[12])]; // fields 14 and 15
}

/** Busy clock ticks of the whole machine (all CPUs; /proc/stat: everything but idle and iowait). */
function machineBusy(): number {
  const f = readFileSync("/proc/stat", "utf8").slice(0, 200).split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  return f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!; // user nice system irq softirq steal
}

/**
 * Per thread name (comm; the thread-group leader is "main"): nanoseconds on a CPU and times scheduled
 * in, from /proc/PID/task/TID/schedstat (finer than the stat ticks).
 */
function threadStats(pid: number): Map<string, { ns: number; runs: number }> {
  const m = new Map<string, { ns: number; runs: number }>();
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return m;
  }
  for (const t of tids) {
    let comm: string, ss: string[];
    try {
      comm = readFileSync(`/proc/${pid}/task/${t}/comm`, "utf8").trim().replace(/\d+$/, "N");
      ss = readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").trim().split(" ");
    } catch {
      continue; // the thread has just exited
    }
    if (t === String(pid)) comm = `main (${comm})`;
    const e = m.get(comm) ?? { ns: 0, runs: 0 };
    e.ns += Number(ss[0]);
    e.runs += Number(ss[2]);
    m.set(comm, e);
  }
  return m;
}

// ---- the load --------------------------------------------------------------------

interface Sample {
  ios: number;
  seconds: number;
  iops: number;
  meanUs: number;
  p99Us: number;
  /** Back-end CPU seconds over the interval (all threads), and per I/O in µs. */
  beCpu: number;
  beUsPerIo: number;
  /** Share of the back-end's CPU time spent in the kernel (stime ÷ (utime + stime)). */
  beSys: number;
  /** Times a back-end thread was scheduled in, per I/O (from schedstat): how often it slept and woke. */
  beRunsPerIo: number;
  feUsPerIo: number;
  /** Front-end CPU seconds per second. */
  feUtil: number;
  kicksPerIo: number;
  callsPerIo: number;
  /** CPUs' worth of busy time over the interval that was neither side's: other jobs on the machine. */
  otherLoad: number;
  /** Per thread name: CPU seconds over the interval. */
  threads: Map<string, number>;
}

const lat = new Float64Array(1 << 23);
let rng = 0x9e3779b9;
const SECTORS_4K = DISK_BYTES / IO_BYTES;
function randomSector(): number {
  // xorshift32: cheap, and the same sequence for every back-end.
  rng ^= rng << 13;
  rng ^= rng >>> 17;
  rng ^= rng << 5;
  return ((rng >>> 0) % SECTORS_4K) * (IO_BYTES / 512);
}

/** The device side of a queue that completes everything at once (front-end ceiling). */
class InstantDevice {
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly avail16: number;
  private readonly used16: number;
  private readonly used32: number;
  private readonly mask: number;
  private lastAvail = 0;
  constructor(private readonly vq: SplitDriver) {
    const ram = vq.ram;
    const n = vq.size;
    this.mask = n - 1;
    this.u16 = new Uint16Array(ram.u8.buffer, ram.u8.byteOffset, ram.u8.byteLength >>> 1);
    this.u32 = new Uint32Array(ram.u8.buffer, ram.u8.byteOffset, ram.u8.byteLength >>> 2);
    this.avail16 = ram.offset(vq.availGpa, 6 + 2 * n) >>> 1;
    const usedOff = ram.offset(vq.usedGpa, 6 + 8 * n);
    this.used16 = usedOff >>> 1;
    this.used32 = usedOff >>> 2;
  }
  /** Uses every available chain, asks for a kick at the next one, and signals if the driver wants it. */
  run(): void {
    const u16 = this.u16, n = this.mask + 1;
    const idx = Atomics.load(u16, this.avail16 + 1);
    const old = u16[this.used16 + 1]!;
    let used = old;
    while (this.lastAvail !== idx) {
      const head = u16[this.avail16 + 2 + (this.lastAvail & this.mask)]!;
      const e = this.used32 + 1 + 2 * (used & this.mask);
      this.u32[e] = head;
      this.u32[e + 1] = IO_BYTES + 1;
      this.lastAvail = (this.lastAvail + 1) & 0xffff;
      used = (used + 1) & 0xffff;
    }
    if (used === old) return;
    Atomics.store(u16, this.used16 + 1, used);
    u16[this.used16 + 2 + 4 * n] = this.lastAvail; // avail_event: kick me for the next one, as an idle device does
    if (needEvent(u16[this.avail16 + 2 + n]!, used, old)) sys.eventfdWrite(this.vq.callFd, 1);
  }
}

/**
 * Keeps `depth` reads in flight on each queue of `d` for warm-up + measure
 * seconds; returns the measured interval's figures. `pid` is the back-end
 * (its CPU is read), or -1 with `instant` devices.
 */
function drive(d: BlkDriver, depth: number, pid: number, instant: InstantDevice[] | null): Sample {
  const queues = d.queues;
  const now = () => performance.now();
  const submitted = new Float64Array(queues * depth);
  let measuring = false;
  let completed = 0;
  let nLat = 0;
  let errors = 0;
  d.onComplete = (slot, status) => {
    completed++;
    if (status !== 0 && instant === null) errors++;
    if (measuring && nLat < lat.length) lat[nLat++] = now() - submitted[slot]!;
  };
  const opts: ReqOpts[] = [];
  for (let q = 0; q < queues; q++) opts.push({ queue: q, indirect: true });
  const fill = (q: number) => {
    const o = opts[q]!;
    while (d.freeSlotCount(q) > 0) {
      const slot = d.enqueue(VIRTIO_BLK_T_IN, randomSector(), IO_BYTES, o);
      submitted[slot] = now();
    }
    d.kick(q);
    if (instant !== null) instant[q]!.run();
  };

  // One epoll set over every queue's call eventfd (BlkDriver.wait sleeps on one queue only).
  const ep = sys.epollCreate();
  const events = new sys.EpollEvents(queues);
  for (let q = 0; q < queues; q++) sys.epollCtl(ep, EPOLL_CTL_ADD, d.vqs[q]!.callFd, EPOLLIN, q);
  let calls = 0;
  const kicks0 = d.vqs.reduce((s, v) => s + v.kicks, 0);
  let kicksAt = 0, callsAt = 0;

  type Th = ReturnType<typeof threadStats>;
  let t0 = 0, n0 = 0, be0: [number, number] = [0, 0], th0: Th = new Map(), fe0 = process.cpuUsage(), m0 = 0;
  let t1 = 0, n1 = 0, be1: [number, number] = [0, 0], th1: Th = new Map(), fe1 = fe0, m1 = 0;
  const start = now();
  const measureAt = start + WARMUP_S * 1000;
  const endAt = measureAt + MEASURE_S * 1000;
  try {
    for (let q = 0; q < queues; q++) fill(q);
    for (;;) {
      let got = 0;
      for (let q = 0; q < queues; q++) {
        if (d.vqs[q]!.pending() > 0) {
          got += d.wait(q);
          fill(q);
        }
      }
      if (got === 0) {
        if (POLLING && instant === null) {
          if (now() > endAt + 15_000) throw new Error("no completion for 15 s");
          continue;
        }
        const n = events.wait(ep, 15_000);
        if (n === 0) throw new Error(`no completion for 15 s (${d.vqs.map((v) => v.inFlight).join("/")} in flight)`);
        for (let i = 0; i < n; i++) if (sys.eventfdRead(d.vqs[events.data(i)]!.callFd) !== null) calls++;
        continue;
      }
      const t = now();
      if (!measuring && t >= measureAt) {
        measuring = true;
        if (pid > 0) {
          be0 = ticks(pid);
          th0 = threadStats(pid);
        }
        fe0 = process.cpuUsage();
        m0 = machineBusy();
        t0 = now();
        n0 = completed;
        kicksAt = d.vqs.reduce((s, v) => s + v.kicks, 0) - kicks0;
        callsAt = calls;
      } else if (measuring && t >= endAt) {
        t1 = now();
        n1 = completed;
        fe1 = process.cpuUsage();
        m1 = machineBusy();
        if (pid > 0) {
          be1 = ticks(pid);
          th1 = threadStats(pid);
        }
        break;
      }
    }
    measuring = false;
    const kicks = d.vqs.reduce((s, v) => s + v.kicks, 0) - kicks0 - kicksAt;
    const callsMeasured = calls - callsAt;
    // Drain: nothing may be in flight when the driver closes.
    for (let q = 0; q < queues; q++) {
      while (d.inFlight(q) > 0) {
        if (d.vqs[q]!.pending() > 0) d.wait(q);
        else if (instant !== null) instant[q]!.run();
        else if (!POLLING) events.wait(ep, 50);
      }
    }
    if (errors > 0) throw new Error(`${errors} reads completed with a non-zero status`);
    const ios = n1 - n0;
    const seconds = (t1 - t0) / 1000;
    const sorted = lat.subarray(0, nLat).sort();
    let sum = 0;
    for (let i = 0; i < nLat; i++) sum += sorted[i]!;
    const beUser = be1[0] - be0[0], beSysT = be1[1] - be0[1];
    const beCpu = (beUser + beSysT) / CLK_TCK;
    const fe = (fe1.user - fe0.user + fe1.system - fe0.system) / 1e6;
    const threads = new Map<string, number>();
    let runs = 0;
    for (const [k, v] of th1) {
      const was = th0.get(k) ?? { ns: 0, runs: 0 };
      threads.set(k, (v.ns - was.ns) / 1e9);
      runs += v.runs - was.runs;
    }
    return {
      ios, seconds, iops: ios / seconds,
      meanUs: (sum / nLat) * 1000, p99Us: sorted[Math.min(nLat - 1, Math.floor(nLat * 0.99))]! * 1000,
      beCpu, beUsPerIo: (beCpu / ios) * 1e6,
      beSys: beUser + beSysT > 0 ? beSysT / (beUser + beSysT) : 0, beRunsPerIo: runs / ios, feUsPerIo: (fe / ios) * 1e6, feUtil: fe / seconds,
      kicksPerIo: kicks / ios, callsPerIo: callsMeasured / ios, threads,
      otherLoad: Math.max(0, ((m1 - m0) / CLK_TCK - beCpu - fe) / seconds),
    };
  } finally {
    d.onComplete = null;
    sys.closeQuiet(ep);
    events.mem.free();
  }
}

// ---- runs ------------------------------------------------------------------------

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

interface Result { samples: Sample[] }
const results = new Map<string, Map<string, Result>>(); // config → variant → samples
const commandLines = new Map<string, string>(); // "variant backing queues" → command line

let fePin: Pin | null = null;
/** Puts every thread of this process (the front-end) on CPU 0, or back on all CPUs. */
async function pinFrontend(pin: Pin): Promise<void> {
  if (pin === fePin) return;
  await $`taskset -a -p -c ${pin === "none" ? "0-" + (navigator.hardwareConcurrency - 1) : "0"} ${process.pid}`;
  fePin = pin;
}

async function runOne(v: Variant, c: Config, image: string): Promise<Sample> {
  await pinFrontend(c.pin);
  const r = await startBackend(v, c, image);
  commandLines.set(`${v.name} ${c.backing} ${c.queues}`, v.argv("$SOCK", c, "$IMG").map(shellWord).join(" "));
  let d: BlkDriver | null = null;
  try {
    d = connect(r, c.queues, c.depth);
    return drive(d, c.depth, r.pid, null);
  } finally {
    d?.close();
    await stopBackend(r);
  }
}

/** The front-end against an instant device: handshake with qsd, freeze it, complete requests here. */
async function runInstant(c: Config): Promise<Sample> {
  await pinFrontend(c.pin);
  const r = await startBackend(VARIANTS.find((v) => v.name === "qsd")!, c, "");
  let d: BlkDriver | null = null;
  try {
    d = connect(r, c.queues, c.depth);
    process.kill(r.pid, "SIGSTOP");
    return drive(d, c.depth, -1, d.vqs.map((vq) => new InstantDevice(vq as SplitDriver)));
  } finally {
    d?.close();
    await stopBackend(r, "SIGKILL");
  }
}

const shellWord = (s: string) => (/^[\w./:,=+@$-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);
const f0 = (x: number) => x.toFixed(0);
const f1 = (x: number) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : "–");
const kiops = (x: number) => (x >= 1e4 ? `${(x / 1000).toFixed(1)} k` : f0(x));

function configs(): Config[] {
  const all: Config[] = [];
  const backings: Backing[] = ["null", "file"];
  for (const backing of backings) {
    for (const queues of [1, 2]) {
      for (const depth of [1, 32, 128]) all.push({ name: `${backing} ${queues}q QD${depth}`, backing, queues, depth, pin: PIN ?? "split" });
    }
  }
  // Both sides on one CPU: IOPS then follows the sum of their CPU costs per I/O, and a wakeup is a context switch
  // on the same CPU instead of a cross-CPU one.
  // O_DIRECT on the VM's own disk: what io_uring is for (a read waits for the device).
  for (const depth of [1, 32, 128]) all.push({ name: `disk 1q QD${depth}`, backing: "disk", queues: 1, depth, pin: PIN ?? "split" });
  if (PIN === undefined) {
    for (const depth of [1, 32, 128]) all.push({ name: `null 1q QD${depth} one CPU`, backing: "null", queues: 1, depth, pin: "same" });
  }
  const quick = new Set(["null 1q QD1", "null 1q QD32", "null 1q QD128", "null 2q QD32", "file 1q QD32", "null 1q QD1 one CPU"]);
  return all.filter((c) => (!QUICK || quick.has(c.name)) && (FILTER === null || FILTER.test(c.name)));
}

// ---- profile -------------------------------------------------------------------------

interface ProfileNode { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; hitCount?: number }

/** bunvhost under `bun --cpu-prof` at QD32 (null, 1 queue); the functions with the most self time. */
async function profile(image: string): Promise<{ rows: [string, number][]; total: number; sample: Sample } | null> {
  const c: Config = { name: "profile", backing: "null", queues: 1, depth: 32, pin: PIN ?? "split" };
  const profDir = mkdtempSync("/dev/shm/bunvhost-prof-");
  const prefix = [BUN, "--cpu-prof", `--cpu-prof-dir=${profDir}`];
  // On the main loop: the profiler samples the main JavaScript thread only, not the I/O threads' Workers.
  const base = VARIANTS.find((x) => x.name === (HAS_THREADS ? "bunvhost main loop" : "bunvhost"))!;
  const v: Variant = { name: "bunvhost", argv: (s, cc, img) => base.argv(s, cc, img).slice(1) };
  await pinFrontend(c.pin);
  const r = await startBackend(v, c, image, prefix);
  let d: BlkDriver | null = null;
  let sample: Sample;
  try {
    d = connect(r, 1, c.depth);
    sample = drive(d, c.depth, r.pid, null);
  } finally {
    d?.close();
    await stopBackend(r);
  }
  const files = readdirSync(profDir).filter((f) => f.endsWith(".cpuprofile"));
  if (files.length === 0) {
    console.log(`profile: bun wrote no .cpuprofile in ${profDir}`);
    return null;
  }
  const prof = JSON.parse(readFileSync(join(profDir, files[0]!), "utf8")) as { nodes: ProfileNode[] };
  rmSync(profDir, { recursive: true, force: true });
  const self = new Map<string, number>();
  let total = 0;
  for (const n of prof.nodes) {
    const hits = n.hitCount ?? 0;
    if (hits === 0) continue;
    const f = n.callFrame;
    const file = f.url.replace(/^file:\/\//, "").replace(ROOT + "/", "");
    const key = `${f.functionName || "(anonymous)"} ${file ? `${file}:${f.lineNumber + 1}` : ""}`.trim();
    self.set(key, (self.get(key) ?? 0) + hits);
    total += hits;
  }
  const rows = [...self].sort((a, b) => b[1] - a[1]).slice(0, 20);
  return { rows, total, sample: sample! };
}

// ---- main --------------------------------------------------------------------------

const started = new Date();
const bunVersion = (await $`${BUN} --version`).stdout.trim();
const qsdVersion = (await $`${QSD} --version`).stdout.split("\n")[0]!.trim();
const nproc = (await $`nproc`).stdout.trim();
const kernel = (await $`uname -r`).stdout.trim();
const cpuModel = (await $`grep -m1 ${"model name"} /proc/cpuinfo`).stdout.replace(/^.*:\s*/, "").trim();

// Which bunvhost was measured: this repository's HEAD (plus whether server code had uncommitted changes), or --server DIR.
// Each run starts server.ts afresh, so a commit made meanwhile would show up in later runs: checked again at the end.
async function revision(): Promise<string> {
  if (SERVER_DIR !== ROOT) return `server.ts in ${SERVER_DIR}`;
  const rev = (await $({ cwd: ROOT, nothrow: true })`git rev-parse --short HEAD`).stdout.trim();
  const dirty = (await $({ cwd: ROOT, nothrow: true })`git status --porcelain -- server.ts src ffi`).stdout.trim() !== "";
  return `commit ${rev}${dirty ? " with uncommitted changes to server.ts/src/ffi" : ""}`;
}
let serverRev = await revision();

const list = configs();
const needFile = list.some((c) => c.backing === "file");
const needDisk = list.some((c) => c.backing === "disk");
const imgDir = mkdtempSync("/dev/shm/bunvhost-img-");
const image = join(imgDir, "disk.img");
if (needFile) await $`fallocate -l ${DISK_BYTES} ${image}`; // real tmpfs pages, not holes
// The disk image lives on the filesystem of the repository (ext4 here), written for real: fallocate would leave
// unwritten extents, which O_DIRECT reads answer with zeroes without touching the device.
mkdirSync(join(ROOT, "build"), { recursive: true });
const diskDir = mkdtempSync(join(ROOT, "build", "bench-disk-"));
const diskImage = join(diskDir, "disk.img");
if (needDisk) await $`dd if=/dev/urandom of=${diskImage} bs=1M count=${DISK_BYTES >> 20} oflag=direct status=none`;
const imageFor = (c: Config) => (c.backing === "disk" ? diskImage : image);
console.log(`\n${list.length} configurations × ${VARIANTS.length} back-ends × ${RUNS} runs, ${WARMUP_S} s warm-up + ${MEASURE_S} s each`);

/** Runs `fn` again (up to MAX_REDO times) while other jobs took more than OTHER_LIMIT CPUs during its interval. */
const OTHER_LIMIT = 0.2, MAX_REDO = QUICK ? 0 : 3;
let redone = 0;
async function quiet(what: string, fn: () => Promise<Sample>): Promise<Sample> {
  let best: Sample | null = null;
  for (let i = 0; i <= MAX_REDO; i++) {
    const s = await fn();
    if (best === null || s.otherLoad < best.otherLoad) best = s;
    if (s.otherLoad <= OTHER_LIMIT) break;
    if (i < MAX_REDO) {
      redone++;
      console.log(`${what}: other jobs used ${f0(100 * s.otherLoad)}% of a CPU during the interval; running it again in 2 s`);
      await Bun.sleep(2000);
    }
  }
  return best!;
}

try {
  for (const c of list) {
    const per = new Map<string, Result>();
    results.set(c.name, per);
    for (let run = 0; run < RUNS; run++) {
      for (const v of VARIANTS) {
        if ((v.only && !v.only(c)) || (BACKENDS !== null && !BACKENDS.test(v.name))) continue;
        const s = await quiet(`${c.name} ${v.name}`, () => runOne(v, c, imageFor(c)));
        if (!per.has(v.name)) per.set(v.name, { samples: [] });
        per.get(v.name)!.samples.push(s);
        console.log(
          `${c.name.padEnd(15)} run ${run + 1}/${RUNS} ${v.name.padEnd(13)} ${kiops(s.iops).padStart(8)} IOPS  ` +
            `mean ${f1(s.meanUs).padStart(5)} µs  p99 ${f1(s.p99Us).padStart(5)} µs  back-end ${f2(s.beUsPerIo).padStart(6)} µs/IO ` +
            `(${f0(100 * s.beCpu / s.seconds)}% CPU, sys ${f0(100 * s.beSys)}%, ${f2(s.beRunsPerIo)} wakeups/IO)  front-end ${f2(s.feUsPerIo)} µs/IO (${f0(100 * s.feUtil)}%)  kicks/IO ${f2(s.kicksPerIo)} calls/IO ${f2(s.callsPerIo)}  other jobs ${f0(100 * s.otherLoad)}%`,
        );
      }
    }
  }

  // Front-end ceiling: 1 queue, the three depths (and 2 queues at QD32).
  const ceiling = new Map<string, Sample[]>();
  const pin = PIN ?? "split";
  const ceilingConfigs: Config[] = [1, 32, 128].map((depth) => ({ name: `1q QD${depth}`, backing: "null" as Backing, queues: 1, depth, pin }));
  if (!QUICK) ceilingConfigs.push({ name: "2q QD32", backing: "null", queues: 2, depth: 32, pin });
  for (const c of ceilingConfigs) {
    const xs: Sample[] = [];
    for (let run = 0; run < RUNS; run++) {
      const s = await quiet(`instant ${c.name}`, () => runInstant(c));
      xs.push(s);
      console.log(`instant device ${c.name.padEnd(9)} run ${run + 1}/${RUNS} ${kiops(s.iops).padStart(8)} IOPS  front-end ${f2(s.feUsPerIo)} µs/IO  mean ${f1(s.meanUs)} µs`);
    }
    ceiling.set(c.name, xs);
  }

  const prof = QUICK || args["no-profile"] ? null : await profile(image);

  const revAtEnd = await revision();
  if (revAtEnd !== serverRev) serverRev = `${serverRev} at the start, ${revAtEnd} at the end (the code changed during the run)`;
  const md = report(ceiling, prof);
  console.log("\n" + md);
  if (OUT !== null) {
    let tail = `${MARKER}\n`;
    if (existsSync(OUT)) {
      const old = readFileSync(OUT, "utf8");
      const at = old.indexOf(MARKER);
      if (at >= 0) tail = old.slice(at);
    }
    writeFileSync(OUT, md + "\n" + tail);
    console.log(`wrote ${OUT}`);
  }
} finally {
  rmSync(imgDir, { recursive: true, force: true });
  rmSync(diskDir, { recursive: true, force: true });
}

function report(ceiling: Map<string, Sample[]>, prof: Awaited<ReturnType<typeof profile>>): string {
  const L: string[] = [];
  const med = (xs: Sample[], k: keyof Sample) => median(xs.map((s) => s[k] as number));
  L.push("# Performance: bunvhost and qemu-storage-daemon");
  L.push("");
  L.push(`Generated by \`bun scripts/bench.ts${process.argv.slice(2).length ? " " + process.argv.slice(2).join(" ") : ""}\` on ` +
    `${started.toISOString().slice(0, 16).replace("T", " ")} UTC. The sections up to the hand-written marker are rewritten by each run.`);
  L.push("");
  L.push(`- Machine: ${nproc} CPUs (\`nproc\`), ${cpuModel}, kernel ${kernel} (\`uname -r\`), no KVM.`);
  L.push(`- Bun ${bunVersion}; ${qsdVersion}. bunvhost: ${serverRev}.`);
  L.push(`- Load: 4 KiB random reads over a 1 GiB disk (the same xorshift sequence for every back-end), \`depth\` requests ` +
    `in flight on each queue (QD is per queue: 2q QD32 keeps 64 in flight), each request one indirect chain ` +
    `(16-byte header, 4 KiB data, status byte) as a Linux guest builds them; ring size ${QUEUE_SIZE}, EVENT_IDX on.`);
  L.push(`- Front-end: src/frontend/BlkDriver in this process, ${POLLING ? "spinning on used.idx (polling)" : "sleeping in epoll_wait on the call eventfds (interrupt mode), as a guest would"}. ` +
    (PIN === undefined
      ? "Placement (taskset): this process, all its threads, on CPU 0 and the back-end, all its threads, on CPU 1, so neither " +
        "side takes the other's CPU; the \"one CPU\" configurations put both on CPU 0. Unpinned, the scheduler sometimes " +
        "puts both on one CPU and sometimes not, and at QD1 the IOPS of the same back-end then varied tenfold from run to run."
      : `Placement for every configuration: --pin ${PIN}.`));
  L.push(`- Each run: a fresh back-end process, ${WARMUP_S} s warm-up, then ${MEASURE_S} s measured. ${RUNS} run(s) per back-end and configuration, ` +
    `back-ends alternating (${VARIANTS.map((v) => v.name).join(", ")}, then again; "bunvhost 2 threads" with 2 queues only); ` +
    `every figure is the median over the runs.`);
  L.push(`- IOPS: completions in the measured interval ÷ its length. Latency: enqueue to reap of each request completed in the interval ` +
    `(mean and 99th percentile). Back-end CPU: utime + stime from /proc/PID/stat (all threads; clock ticks of 1/${CLK_TCK} s) over the ` +
    `interval, ÷ completions; "CPU %" is that time ÷ the interval (100% = one CPU). Front-end CPU: \`process.cpuUsage()\` of this process.`);
  L.push(`- Other jobs share this machine. For each run the busy time of all CPUs (/proc/stat) minus both sides' CPU time gives ` +
    `the other jobs' load; ` + (MAX_REDO > 0
      ? `a run during which it exceeded ${OTHER_LIMIT * 100}% of a CPU was run again (up to ${MAX_REDO} times, 2 s apart, ` +
        `keeping the quietest): ${redone} run(s) were redone. `
      : "--quick runs nothing again. ") + "The summary shows the median of that load per configuration.");
  L.push(`- Null backings: bunvhost \`--null 1G\` (reads leave the guest buffer as it is) against qsd \`null-co\` with \`read-zeroes=off\` ` +
    `(the same: no data touched). File: a 1 GiB image on tmpfs (/dev/shm, allocated with \`fallocate\`), page-cache reads for both ` +
    `(tmpfs has no O_DIRECT). Disk: a 1 GiB image on the repository's filesystem (ext4 on the VM's virtio disk), written with ` +
    `random data first, read with O_DIRECT by both (bunvhost \`--direct\`, qsd \`cache.direct=on\`). ` +
    (HAS_AUTO
      ? "bunvhost: its default `--aio auto` (synchronous preadv on tmpfs, io_uring for the O_DIRECT disk), with the other path " +
        "beside it (`bunvhost aio=uring` on tmpfs, `bunvhost aio=sync` on the disk); "
      : `bunvhost: io_uring${HAS_AIO ? " (`bunvhost aio=sync`: synchronous preadv/pwritev)" : ""}; `) +
    `qsd: its default \`aio=threads\`, and \`qsd aio=io_uring\`.`);
  L.push("");
  L.push("Command lines (`$SOCK` a fresh socket under /dev/shm, `$IMG` the image; run from the repository root; each prefixed " +
    "with `taskset -c 1`, or `taskset -c 0` for one CPU, and this process moved with `taskset -a -p -c 0 PID`):");
  L.push("");
  L.push("```");
  for (const [k, v] of [...commandLines].sort()) L.push(`# ${k.replace(/ (\d)$/, " $1 queue(s)")}\n${v.replace(BUN, "bun")}`);
  L.push("```");
  L.push("");

  // Headline: ours ÷ qsd over all configurations.
  const ourNames = VARIANTS.filter((v) => v.name.startsWith("bunvhost")).map((v) => v.name);
  const ratio = (per: Map<string, Result>, a: string, b: string, k: keyof Sample) =>
    per.has(a) && per.has(b) ? med(per.get(a)!.samples, k) / med(per.get(b)!.samples, k) : NaN;
  L.push("## Summary: bunvhost ÷ qsd");
  L.push("");
  L.push("IOPS ratio (above 1: bunvhost is faster) and back-end CPU per I/O ratio (above 1: bunvhost spends more), medians." +
    (HAS_THREADS ? " \"bunvhost\" is the server's default (its queues on an I/O thread), \"main loop\" is `--threads 0`." : ""));
  L.push("");
  const head = ["configuration", "bunvhost IOPS", "IOPS ÷ qsd", "IOPS ÷ qsd+iothread", "CPU/IO ÷ qsd", "CPU/IO ÷ qsd+iothread"];
  if (HAS_THREADS) head.push("main loop IOPS ÷ qsd", "main loop CPU/IO ÷ qsd");
  head.push("other jobs %");
  L.push(`| ${head.join(" | ")} |`);
  L.push(`| --- |${" ---: |".repeat(head.length - 1)}`);
  for (const [name, per] of results) {
    if (!per.has("bunvhost")) continue;
    const cells = [name, kiops(med(per.get("bunvhost")!.samples, "iops")),
      f2(ratio(per, "bunvhost", "qsd", "iops")), f2(ratio(per, "bunvhost", "qsd+iothread", "iops")),
      f2(ratio(per, "bunvhost", "qsd", "beUsPerIo")), f2(ratio(per, "bunvhost", "qsd+iothread", "beUsPerIo"))];
    if (HAS_THREADS) cells.push(f2(ratio(per, "bunvhost main loop", "qsd", "iops")), f2(ratio(per, "bunvhost main loop", "qsd", "beUsPerIo")));
    cells.push(f0(100 * median([...per.values()].flatMap((r) => r.samples.map((x) => x.otherLoad)))));
    L.push(`| ${cells.join(" | ")} |`);
  }
  L.push("");

  L.push("## Per configuration");
  L.push("");
  L.push("Medians. Back-end CPU: µs per I/O, % of one CPU, the kernel's share of it (sys), and how often its threads were " +
    "scheduled in per I/O (wakeups, from schedstat). Front-end: the same for this process. kicks and calls: eventfd " +
    "notifications per I/O, front-end → back-end and back (calls counted when the front-end slept and read the eventfd). " +
    "\"÷ qsd\": a bunvhost row's IOPS and CPU/IO divided by qsd's / qsd+iothread's (IOPS above 1 and CPU/IO below 1 favour bunvhost).");
  for (const [name, per] of results) {
    L.push("");
    L.push(`### ${name}`);
    L.push("");
    L.push("| back-end | IOPS | mean µs | p99 µs | CPU µs/IO | CPU % | sys % | wakeups/IO | front-end µs/IO | front-end CPU % | " +
      "kicks/IO | calls/IO | IOPS ÷ qsd / qsd+iothread | CPU/IO ÷ qsd / qsd+iothread |");
    L.push(`| --- |${" ---: |".repeat(13)}`);
    for (const [vn, r] of per) {
      const s = r.samples;
      const ours = ourNames.includes(vn);
      const rs = ours
        ? [`${f2(ratio(per, vn, "qsd", "iops"))} / ${f2(ratio(per, vn, "qsd+iothread", "iops"))}`,
          `${f2(ratio(per, vn, "qsd", "beUsPerIo"))} / ${f2(ratio(per, vn, "qsd+iothread", "beUsPerIo"))}`]
        : ["", ""];
      L.push(`| ${vn} | ${kiops(med(s, "iops"))} | ${f1(med(s, "meanUs"))} | ${f1(med(s, "p99Us"))} | ${f2(med(s, "beUsPerIo"))} | ` +
        `${f0(100 * median(s.map((x) => x.beCpu / x.seconds)))} | ${f0(100 * med(s, "beSys"))} | ${f2(med(s, "beRunsPerIo"))} | ` +
        `${f2(med(s, "feUsPerIo"))} | ${f0(100 * med(s, "feUtil"))} | ` +
        `${f2(med(s, "kicksPerIo"))} | ${f2(med(s, "callsPerIo"))} | ${rs.join(" | ")} |`);
    }
  }
  L.push("");

  L.push("## Back-end CPU by thread");
  L.push("");
  L.push("CPU µs per I/O of each back-end thread (schedstat run time), grouped by thread name (\"main\" is the process's first " +
    "thread; digits folded into N), median over the runs; under 0.05 µs/IO left out. bunvhost's I/O threads are Bun Workers " +
    "(\"Worker\"); on the main loop, \"Worker\" is the epoll poller that wakes the main thread. qsd names no threads: " +
    "its iothread and thread-pool workers all show as qemu-storage-da.");
  L.push("");
  L.push("| configuration | back-end | threads (µs/IO) |");
  L.push("| --- | --- | --- |");
  for (const [name, per] of results) {
    if (!/^null .* QD(1|32|128)$/.test(name)) continue;
    for (const [vn, r] of per) {
      const names = new Set(r.samples.flatMap((s) => [...s.threads.keys()]));
      const parts = [...names].map((k) => [k, median(r.samples.map((s) => ((s.threads.get(k) ?? 0) / s.ios) * 1e6))] as const)
        .filter(([, v]) => v >= 0.05)
        .sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${f2(v)}`);
      L.push(`| ${name} | ${vn} | ${parts.join(", ")} |`);
    }
  }
  L.push("");

  L.push("## Front-end ceiling");
  L.push("");
  L.push("The same driver loop against an *instant device*: the handshake is done with qsd, which is then frozen with SIGSTOP; " +
    "this process completes every request itself right after the kick (avail entries copied to the used ring, avail_event " +
    "set so that every batch is still kicked with an eventfd write, the call eventfd written as a device would). Nothing " +
    "waits, so this is the front-end's own cost per I/O on one CPU.");
  L.push("");
  L.push("| configuration | IOPS | front-end CPU µs/IO | mean µs |");
  L.push("| --- | ---: | ---: | ---: |");
  for (const [name, xs] of ceiling) L.push(`| ${name} | ${kiops(med(xs, "iops"))} | ${f2(med(xs, "feUsPerIo"))} | ${f1(med(xs, "meanUs"))} |`);
  L.push("");

  if (prof !== null) {
    L.push("## Where bunvhost's JavaScript time goes");
    L.push("");
    L.push(`One run of \`bun --cpu-prof run server.ts --null 1G${HAS_THREADS ? " --threads 0" : ""}\` at null 1q QD32 (${kiops(prof.sample.iops)} IOPS under the profiler, ` +
      `${f2(prof.sample.beUsPerIo)} µs CPU/IO for the whole process). Self time of the main JavaScript thread by function, ` +
      `${prof.total} samples at 1 ms; "(program)" and "(idle)" are the engine's own accounting, time in native code called through ` +
      `bun:ffi shows as the calling function.`);
    L.push("");
    L.push("| function | samples | share |");
    L.push("| --- | ---: | ---: |");
    for (const [k, n] of prof.rows) L.push(`| \`${k}\` | ${n} | ${f1((100 * n) / prof.total)}% |`);
    L.push("");
  }
  return L.join("\n");
}

/**
 * virtio-net against DPDK: DPDK testpmd's virtio-user is the front-end for
 * both back-ends, in the same run, alternating:
 *
 *   tx   testpmd txonly (CPU 0) → back-end on CPU 1 taking every frame:
 *        DPDK testpmd's vhost PMD in rxonly mode vs `server.ts net` (one port)
 *   fwd  one testpmd on CPU 0 with two virtio-user ports A and B in mac mode
 *        (a frame received on A is sent on B addressed to A, and back): frames
 *        circulate A → back-end → B → testpmd → A …, started by --tx-first
 *        bursts; the back-end on CPU 1 forwards between its two vhost-user
 *        ports: DPDK testpmd with two vhost ports in io mode vs `server.ts net`
 *        with two ports (the switch, MACs learned). Two busy processes on two
 *        CPUs, as for tx.
 *
 * for 64- and 1500-byte frames. The rate is the median of the front-end's
 * per-second Tx-pps (tx) or the receiver's Rx-pps (fwd) over the window; CPU
 * per frame is the back-end process's user+system time over the window
 * divided by the frames. Medians of --runs runs.
 *
 *   bun scripts/bench_net.ts [--seconds 4] [--runs 3] [--sizes 64,1500] [--packed] [--poll-us N] [--write]
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { cpuSeconds, Testpmd, testpmdSkipReason } from "../tests/support/dpdk.ts";

const ROOT = resolve(import.meta.dir, "..");
const { values: a } = parseArgs({
  options: {
    seconds: { type: "string", default: "4" }, runs: { type: "string", default: "3" }, sizes: { type: "string", default: "64,1500" },
    packed: { type: "boolean", default: false }, "poll-us": { type: "string", default: "0" }, write: { type: "boolean", default: false },
    scenarios: { type: "string", default: "tx,fwd" },
  },
});
const seconds = Number(a.seconds), runs = Number(a.runs), packed = a.packed!, pollUs = Number(a["poll-us"]);
const sizes = a.sizes!.split(",").map(Number);
const scenarios = a.scenarios!.split(",") as ("tx" | "fwd")[];
const skip = testpmdSkipReason();
if (skip) {
  console.error(`bench_net: ${skip}`);
  process.exit(1);
}
const dir = mkdtempSync("/tmp/bvh-bench-net-");
let seq = 0;
const median = (xs: number[]) => {
  const s = [...xs].sort((p, q) => p - q);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

interface Backend { pid: number; stop(): Promise<void> }

async function ours(sockets: string[]): Promise<Backend> {
  const args = ["-c", "1", process.execPath, "run", join(ROOT, "server.ts"), "net", ...sockets.flatMap((s) => ["--socket", s]), "--log-level", "warn"];
  if (pollUs > 0) args.push("--poll-us", String(pollUs));
  const p = spawn("taskset", args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  p.stdout!.on("data", (d) => (out += d));
  p.stderr!.on("data", (d) => (out += d));
  const deadline = performance.now() + 15_000;
  while (!/listening on/.test(out)) {
    if (p.exitCode !== null || performance.now() > deadline) throw new Error(`server.ts net did not start:\n${out}`);
    await Bun.sleep(20);
  }
  return {
    pid: p.pid!,
    stop: async () => {
      p.kill("SIGTERM");
      await new Promise((r) => (p.exitCode !== null ? r(null) : p.on("exit", r)));
    },
  };
}

async function dpdk(sockets: string[], mode: "rxonly" | "io"): Promise<Backend & { pmd: Testpmd }> {
  const pmd = Testpmd.start({ role: "vhost", sockets, mode, cpu: 1, prefix: `bnb${process.pid}-${seq}` });
  // The vhost PMD creates its sockets at start.
  const deadline = performance.now() + 15_000;
  while (!sockets.every((s) => existsSync(s))) {
    if (performance.now() > deadline) throw new Error(`testpmd vhost did not create its sockets:\n${pmd.out.slice(-2000)}`);
    await Bun.sleep(20);
  }
  return { pid: pmd.pid, pmd, stop: async () => void (await pmd.stop().catch(() => [])) };
}

interface Sample { mpps: number; nsCpu: number }

/** One measurement: start the back-end, the front-ends, wait for traffic, measure a window. */
async function measure(scn: "tx" | "fwd", peer: "dpdk" | "ours", size: number): Promise<Sample> {
  const id = `${seq++}`;
  const sockets = scn === "tx" ? [join(dir, `t${id}.sock`)] : [join(dir, `a${id}.sock`), join(dir, `b${id}.sock`)];
  const be = peer === "ours" ? await ours(sockets) : await dpdk(sockets, scn === "tx" ? "rxonly" : "io");
  const pmds: Testpmd[] = [];
  try {
    let meter: Testpmd, kind: "Rx-pps" | "Tx-pps";
    if (scn === "tx") {
      meter = Testpmd.start({ role: "virtio-user", sockets, mode: "txonly", cpu: 0, prefix: `bnf${process.pid}-${id}`, packed, size });
      pmds.push(meter);
      kind = "Tx-pps";
    } else {
      const macs = ["02:00:00:00:00:0a", "02:00:00:00:00:0b"];
      meter = Testpmd.start({
        role: "virtio-user", sockets, mode: "mac", cpu: 0, prefix: `bnm${process.pid}-${id}`, packed, size, macs,
        extra: ["--tx-first", "--burst=64", `--eth-peer=0,${macs[1]}`, `--eth-peer=1,${macs[0]}`],
      });
      pmds.push(meter);
      kind = "Rx-pps";
    }
    await meter.waitFor(new RegExp(`${kind}:\\s+[1-9]`), 15_000);
    await Bun.sleep(1500); // past the start-up second
    const from = meter.rates(kind).length;
    const c0 = cpuSeconds(be.pid), t0 = performance.now();
    await Bun.sleep(seconds * 1000);
    const c1 = cpuSeconds(be.pid), t1 = performance.now();
    // Per second, one line per port: fwd adds its two ports' receive rates.
    const all = meter.rates(kind).slice(from);
    const per = scn === "fwd" ? all.reduce<number[]>((acc, r, i) => (i % 2 ? (acc[acc.length - 1]! += r, acc) : (acc.push(r), acc)), []) : all;
    const pps = median(per.filter((r) => r > 0));
    const frames = pps * ((t1 - t0) / 1000);
    return { mpps: pps / 1e6, nsCpu: frames > 0 ? ((c1 - c0) * 1e9) / frames : NaN };
  } finally {
    for (const p of pmds.reverse()) await p.stop().catch(() => p.kill());
    await be.stop();
  }
}

const rows: string[] = [];
const header = `| scenario | frame | DPDK Mpps | bunvhost Mpps | ratio | DPDK ns CPU/frame | bunvhost ns CPU/frame |`;
console.log(`bench_net: ${runs} runs of ${seconds} s, ${packed ? "packed" : "split"} ring${pollUs ? `, --poll-us ${pollUs}` : ""}`);
for (const scn of scenarios) {
  for (const size of sizes) {
    const d: Sample[] = [], o: Sample[] = [];
    for (let r = 0; r < runs; r++) {
      // Alternate which goes first.
      const order: ("dpdk" | "ours")[] = r % 2 ? ["ours", "dpdk"] : ["dpdk", "ours"];
      for (const peer of order) {
        const s = await measure(scn, peer, size);
        (peer === "dpdk" ? d : o).push(s);
        console.log(`  ${scn} ${size} B ${peer}: ${s.mpps.toFixed(2)} Mpps, ${s.nsCpu.toFixed(0)} ns CPU/frame`);
      }
    }
    const dm = median(d.map((s) => s.mpps)), om = median(o.map((s) => s.mpps));
    rows.push(`| ${scn === "tx" ? "guest TX into the back-end" : "forwarding between two front-ends"} | ${size} B | ${dm.toFixed(2)} | ${om.toFixed(2)} | ${(om / dm).toFixed(2)}x | ` +
      `${median(d.map((s) => s.nsCpu)).toFixed(0)} | ${median(o.map((s) => s.nsCpu)).toFixed(0)} |`);
  }
}
const table = [header, "|---|---|---|---|---|---|---|", ...rows].join("\n");
console.log(`\n${table}`);
rmSync(dir, { recursive: true, force: true });

if (a.write) {
  const path = join(ROOT, "docs/PERFORMANCE.md");
  const doc = readFileSync(path, "utf8");
  const title = "## virtio-net against DPDK";
  const start = doc.indexOf(title);
  const measured = `${title}\n\n<!-- bench_net.ts table: replaced by --write -->\nMeasured ${new Date().toISOString().slice(0, 10)} with \`bun scripts/bench_net.ts --runs ${runs} --seconds ${seconds}${packed ? " --packed" : ""}${pollUs ? ` --poll-us ${pollUs}` : ""} --write\` (${packed ? "packed" : "split"} ring, medians of ${runs}):\n\n${table}\n<!-- end of bench_net.ts table -->\n`;
  let next: string;
  if (start < 0) next = `${doc.trimEnd()}\n\n${measured}`;
  else {
    const endMark = "<!-- end of bench_net.ts table -->\n";
    const end = doc.indexOf(endMark, start);
    next = end < 0 ? `${doc.slice(0, start)}${measured}` : `${doc.slice(0, start)}${measured}${doc.slice(end + endMark.length)}`;
  }
  writeFileSync(path, next);
  console.log(`written to ${path}`);
}

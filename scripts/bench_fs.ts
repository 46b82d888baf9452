#!/usr/bin/env bun
/**
 * virtio-fs against virtiofsd, measured from inside a Linux guest (TCG, the
 * test kit's guest): QEMU 7.2's C virtiofsd (`-o cache=none`) vs `server.ts
 * fs --shared-dir DIR --cache never`, each sharing a fresh directory under
 * /tmp (the same host file system for both). One guest boot per back-end
 * per run; the guest times each phase with /proc/uptime (the kit's `now`):
 *
 *   seq write   dd if=/dev/zero of=/mnt/big bs=1M count=64 conv=fsync, --seq-reps times
 *   seq read    drop caches, dd if=/mnt/big of=/dev/null bs=1M, --seq-reps times
 *   rand read   --rand-ops dd processes, each reading 4 KiB at a pseudo-random 4 KiB offset of the 64 MiB file
 *   rand write  the same writing 4 KiB (conv=notrunc)
 *   create      --files `: > f$i` (a shell redirection: no process)
 *   stat        --files `stat f$i >/dev/null` (a process each)
 *   unlink      --files `rm f$i` (a process each)
 *
 * and, as the guest's own floor, the dd, stat and rm loops (--floor-ops) on
 * the guest's tmpfs: what a back-end answering in no time would give.
 * Back-ends alternate which goes first; medians of --runs runs.
 *
 *   bun scripts/bench_fs.ts [--runs 3] [--rand-ops 300] [--files 1000] [--seq-reps 3] [--floor-ops 100] [--write]
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { $ } from "zx";

$.verbose = true;
import { Guest, guestSkipReason } from "../src/testing/guest.ts";
import { startDevice } from "../src/testing/start.ts";

const ROOT = resolve(import.meta.dir, "..");
const VIRTIOFSD = "/usr/lib/qemu/virtiofsd";
const FS_DEVICE = { type: 26, queues: 2, configSize: 40 } as const;
const SEQ_MIB = 64;

const { values: a } = parseArgs({
  options: {
    runs: { type: "string", default: "3" }, "rand-ops": { type: "string", default: "300" }, files: { type: "string", default: "1000" },
    "seq-reps": { type: "string", default: "3" }, "floor-ops": { type: "string", default: "100" }, write: { type: "boolean", default: false },
  },
});
const runs = Number(a.runs), randOps = Number(a["rand-ops"]), files = Number(a.files), seqReps = Number(a["seq-reps"]);
const floorOps = Number(a["floor-ops"]);
for (const [k, v] of Object.entries({ runs, "rand-ops": randOps, files, "seq-reps": seqReps, "floor-ops": floorOps })) {
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${k}: a whole number ≥ 1, got ${JSON.stringify(a[k as keyof typeof a])}`);
}
const skip = existsSync(VIRTIOFSD) ? guestSkipReason() : `no ${VIRTIOFSD}`;
if (skip) {
  console.error(`bench_fs: ${skip}`);
  process.exit(1);
}

const median = (xs: number[]) => {
  const s = [...xs].sort((p, q) => p - q);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/**
 * The guest's script: each phase prints "RESULT: <phase> <seconds>".
 * Offsets come from an LCG (the same sequence for both back-ends); its
 * higher bits pick one of the file's 16384 4-KiB blocks.
 */
const BLOCKS = (SEQ_MIB << 20) / 4096;
const SCRIPT = String.raw`
set -e
mkdir -p /mnt
mount -t virtiofs bunvhost /mnt
span() { awk -v a=$1 -v b=$2 'BEGIN { printf "%.2f", b - a }'; }
t=0; k=0
while [ $k -lt ${seqReps} ]; do
  t0=$(now); dd if=/dev/zero of=/mnt/big bs=1M count=${SEQ_MIB} conv=fsync 2>/dev/null; t1=$(now)
  t=$(awk -v t=$t -v a=$t0 -v b=$t1 'BEGIN { print t + b - a }'); k=$((k+1))
done
result seqwrite $t
t=0; k=0
while [ $k -lt ${seqReps} ]; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); dd if=/mnt/big of=/dev/null bs=1M 2>/dev/null; t1=$(now)
  t=$(awk -v t=$t -v a=$t0 -v b=$t1 'BEGIN { print t + b - a }'); k=$((k+1))
done
result seqread $t
[ $(stat -c %s /mnt/big) = ${SEQ_MIB << 20} ] || fail "big: $(stat -c %s /mnt/big) bytes"
sync; echo 3 > /proc/sys/vm/drop_caches
x=12345; i=0; t0=$(now)
while [ $i -lt ${randOps} ]; do
  x=$(( (x * 1103515245 + 12345) % 2147483648 ))
  dd if=/mnt/big of=/dev/null bs=4096 count=1 skip=$(( (x >> 8) % ${BLOCKS} )) 2>/dev/null; i=$((i+1))
done
result randread $(span $t0 $(now))
x=54321; i=0; t0=$(now)
while [ $i -lt ${randOps} ]; do
  x=$(( (x * 1103515245 + 12345) % 2147483648 ))
  dd if=/dev/zero of=/mnt/big bs=4096 count=1 seek=$(( (x >> 8) % ${BLOCKS} )) conv=notrunc 2>/dev/null; i=$((i+1))
done
result randwrite $(span $t0 $(now))
mkdir /mnt/m; cd /mnt/m
i=0; t0=$(now); while [ $i -lt ${files} ]; do : > f$i; i=$((i+1)); done; result create $(span $t0 $(now))
i=0; t0=$(now); while [ $i -lt ${files} ]; do stat f$i >/dev/null; i=$((i+1)); done; result stat $(span $t0 $(now))
i=0; t0=$(now); while [ $i -lt ${files} ]; do rm f$i; i=$((i+1)); done; result unlink $(span $t0 $(now))
[ -z "$(ls /mnt/m)" ] || fail "files left in /mnt/m"
cd /; rm -r /mnt/m /mnt/big; umount /mnt
dd if=/dev/zero of=/tmp/f bs=1M count=4 2>/dev/null
i=0; t0=$(now); while [ $i -lt ${floorOps} ]; do dd if=/tmp/f of=/dev/null bs=4096 count=1 skip=$((i % 1024)) 2>/dev/null; i=$((i+1)); done
result floor_dd $(span $t0 $(now))
mkdir /tmp/m; cd /tmp/m
i=0; t0=$(now); while [ $i -lt ${floorOps} ]; do : > f$i; i=$((i+1)); done; result floor_create $(span $t0 $(now))
i=0; t0=$(now); while [ $i -lt ${floorOps} ]; do stat f$i >/dev/null; i=$((i+1)); done; result floor_stat $(span $t0 $(now))
i=0; t0=$(now); while [ $i -lt ${floorOps} ]; do rm f$i; i=$((i+1)); done; result floor_unlink $(span $t0 $(now))
`;

type Peer = "virtiofsd" | "bunvhost";
type Sample = Record<string, number>; // phase → seconds

interface Backend { socket: string; log(): string; stop(): Promise<void> }

async function virtiofsd(shared: string, scratch: string): Promise<Backend> {
  const socket = join(scratch, "virtiofsd.sock");
  const argv = [VIRTIOFSD, `--socket-path=${socket}`, "-o", `source=${shared}`, "-o", "cache=none"];
  console.log(`$ ${argv.join(" ")}`);
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
  let err = "";
  void (async () => { for await (const c of proc.stderr) err += new TextDecoder().decode(c); })();
  const deadline = performance.now() + 10_000;
  while (!existsSync(socket)) {
    if (proc.exitCode !== null || performance.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`virtiofsd did not create its socket:\n${err}`);
    }
    await Bun.sleep(20);
  }
  return {
    socket, log: () => err,
    async stop() {
      // virtiofsd exits by itself once its front-end has gone; SIGTERM in case it has not.
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      proc.kill("SIGTERM");
      await proc.exited;
      clearTimeout(t);
    },
  };
}

async function ours(shared: string): Promise<Backend> {
  const args = ["--shared-dir", shared, "--cache", "never"];
  console.log(`$ ${process.execPath} run ${join(ROOT, "server.ts")} fs --socket SOCKET --log-level warn ${args.join(" ")}`);
  const d = await startDevice("fs", { args, logLevel: "warn" });
  return { socket: d.socket, log: d.log, stop: d.stop };
}

let printedQemu = false;

async function measure(peer: Peer): Promise<Sample> {
  const scratch = mkdtempSync("/tmp/bvh-bench-fs-");
  const shared = join(scratch, "shared");
  mkdirSync(shared);
  const be = peer === "virtiofsd" ? await virtiofsd(shared, scratch) : await ours(shared);
  try {
    const g = await Guest.boot({ socket: be.socket, device: FS_DEVICE, script: SCRIPT });
    if (!printedQemu) {
      console.log(`$ qemu-system-x86_64 ${g.qemu.args.join(" ")}`);
      printedQemu = true;
    }
    try {
      const res = await g.finish(120_000);
      const s: Sample = { boot: Number(res.get("BOOTED")), guest: (Date.now() - g.started) / 1000 };
      for (const [k, v] of res) if (k !== "BOOTED" && k !== "END") s[k] = Number(v);
      return s;
    } finally {
      await g.stop();
    }
  } catch (e) {
    throw new Error(`${peer}: ${(e as Error).message}\n--- back-end:\n${be.log()}`);
  } finally {
    await be.stop();
    rmSync(scratch, { recursive: true, force: true });
  }
}

/** Each row: label, the phase's result key, and how a time becomes the figure. */
const ROWS: { label: string; key: string; unit: "MiB/s" | "ops/s"; count: number; floor?: string }[] = [
  { label: `sequential write, ${SEQ_MIB} MiB, 1 MiB blocks, conv=fsync`, key: "seqwrite", unit: "MiB/s", count: SEQ_MIB * seqReps },
  { label: `sequential read, ${SEQ_MIB} MiB, 1 MiB blocks, caches dropped`, key: "seqread", unit: "MiB/s", count: SEQ_MIB * seqReps },
  { label: "random 4 KiB read (one dd each)", key: "randread", unit: "ops/s", count: randOps, floor: "floor_dd" },
  { label: "random 4 KiB write (one dd each)", key: "randwrite", unit: "ops/s", count: randOps, floor: "floor_dd" },
  { label: "create (`: > f$i`)", key: "create", unit: "ops/s", count: files, floor: "floor_create" },
  { label: "stat (`stat f$i`)", key: "stat", unit: "ops/s", count: files, floor: "floor_stat" },
  { label: "unlink (`rm f$i`)", key: "unlink", unit: "ops/s", count: files, floor: "floor_unlink" },
];

const uname = (await $`uname -r`).stdout.trim();
const qemuVersion = (await $`qemu-system-x86_64 --version`).stdout.split("\n")[0]!.trim();
const bunVersion = Bun.version;
// Both shared directories are made under /tmp: say which file system that is.
const tmpFs = (await $`findmnt -n -o FSTYPE --target /tmp`).stdout.trim();
const dev = statSync("/tmp").dev;
// Other work on the host's 2 CPUs shows in TCG timings: the load is recorded with the figures.
const loadStart = loadavg()[0]!;

console.log(`bench_fs: ${runs} runs; rand ops ${randOps}, files ${files}, ${seqReps} × ${SEQ_MIB} MiB; /tmp is ${tmpFs} (dev ${dev})`);
const samples: Record<Peer, Sample[]> = { virtiofsd: [], bunvhost: [] };
const rate = (row: (typeof ROWS)[number], s: Sample) => row.count / s[row.key]!;
for (let r = 0; r < runs; r++) {
  const order: Peer[] = r % 2 ? ["bunvhost", "virtiofsd"] : ["virtiofsd", "bunvhost"];
  for (const peer of order) {
    const s = await measure(peer);
    samples[peer].push(s);
    console.log(`  run ${r + 1} ${peer}: guest ${s.guest!.toFixed(1)} s (boot ${s.boot!.toFixed(1)} s): ` +
      ROWS.map((row) => `${row.key} ${rate(row, s).toFixed(0)} ${row.unit}`).join(", "));
  }
}

const floorOf = (key: string) => median([...samples.virtiofsd, ...samples.bunvhost].map((s) => floorOps / s[key]!));
const header = "| phase (guest side) | virtiofsd | bunvhost | ratio bunvhost/virtiofsd | guest floor (tmpfs) |";
/** "median unit", with the range over the runs when there are several. */
const cell = (xs: number[], unit: string) =>
  `${median(xs).toFixed(0)} ${unit}${xs.length > 1 ? ` (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})` : ""}`;
const rows = ROWS.map((row) => {
  const v = samples.virtiofsd.map((s) => rate(row, s)), o = samples.bunvhost.map((s) => rate(row, s));
  return `| ${row.label} | ${cell(v, row.unit)} | ${cell(o, row.unit)} | ${(median(o) / median(v)).toFixed(2)}x | ${row.floor ? `${floorOf(row.floor).toFixed(0)} ops/s` : "–"} |`;
});
const guestSecs = (p: Peer) => median(samples[p].map((s) => s.guest!)).toFixed(1);
const table = [header, "|---|---|---|---|---|", ...rows].join("\n");
const load = `${loadStart.toFixed(1)} at the start, ${loadavg()[0]!.toFixed(1)} at the end`;
console.log(`\n${table}\n\nguest run (boot to power-off), median: virtiofsd ${guestSecs("virtiofsd")} s, bunvhost ${guestSecs("bunvhost")} s; host load average ${load}`);

if (a.write) {
  const path = join(ROOT, "docs/PERFORMANCE.md");
  const doc = readFileSync(path, "utf8");
  const title = "## virtio-fs against virtiofsd";
  const endMark = "<!-- end of bench_fs.ts section -->\n";
  const cmd = `bun scripts/bench_fs.ts --runs ${runs} --rand-ops ${randOps} --files ${files} --seq-reps ${seqReps} --floor-ops ${floorOps} --write`;
  /** One paragraph, wrapped at 118 columns like the rest of the file. */
  const wrap = (text: string) => {
    const lines: string[] = [];
    let line = "";
    for (const w of text.split(/\s+/).filter(Boolean)) {
      if (line && line.length + 1 + w.length > 118) {
        lines.push(line);
        line = w;
      } else line = line ? `${line} ${w}` : w;
    }
    return [...lines, line].join("\n");
  };
  const setup = wrap(`**Setup.** One Linux guest per back-end per run (the test kit's: host kernel ${uname}, busybox initramfs,
    ${qemuVersion} under TCG, \`-smp 1\`, 256 MiB) on a 2-CPU host, QEMU's \`vhost-user-fs-pci\` (tag \`bunvhost\`, one
    request queue). virtiofsd: QEMU 7.2's C \`/usr/lib/qemu/virtiofsd --socket-path=S -o source=DIR -o cache=none\` (its
    defaults otherwise: thread pool, sandbox=namespace, no_allow_direct_io). bunvhost: \`server.ts fs --socket S
    --shared-dir DIR --cache never\` (Bun ${bunVersion}, one I/O thread). DIR is a fresh directory under /tmp (${tmpFs})
    for every boot. A guest run (boot to power-off) took ${guestSecs("virtiofsd")} s with virtiofsd and
    ${guestSecs("bunvhost")} s with bunvhost (medians); the host's 1-minute load average was ${load}. With cache=none /
    never both reply FOPEN_DIRECT_IO, so every read and write reaches the back-end (no guest page cache). The guest times
    each phase with /proc/uptime (10 ms steps): sequential phases are ${seqReps} × ${SEQ_MIB} MiB (\`dd bs=1M\`, writes
    with \`conv=fsync\`, reads after \`echo 3 > /proc/sys/vm/drop_caches\`); random phases are ${randOps} \`dd bs=4096
    count=1\` processes at pseudo-random 4 KiB offsets of the 64 MiB file; metadata phases are ${files} files created
    with \`: > f$i\`, then \`stat f$i\` and \`rm f$i\` each. The floor column is the same loop on the guest's tmpfs
    (${floorOps} ops).`);
  const reading = wrap(`**Reading it.** The guest's own CPU cost dominates: this is an emulated (TCG) guest, and every
    random-I/O, stat and unlink operation is a busybox process that the emulated CPU forks and execs. The floor column
    is what those loops reach when the file system costs nothing: a back-end's own share of an operation is the gap
    between its time per operation and the floor's, small next to a process start-up, so ratios close to 1x there say
    little about either back-end's cost per request. \`create\` (a shell redirection, no process: about LOOKUP, CREATE,
    FLUSH and RELEASE) and the sequential phases (1 MiB requests) depend most on the back-end. The TCG guest and the
    back-end share the host's 2 CPUs with whatever else runs
    there${runs > 1 ? "; the ranges in brackets are the runs' lowest and highest" : ""}.`);
  const section = `${title}

<!-- bench_fs.ts section: replaced by --write -->
${wrap(`Measured ${new Date().toISOString().slice(0, 10)} with \`${cmd}\`
  (${runs === 1 ? "one run" : `medians of ${runs} runs, back-ends alternating which goes first`}):`)}

${table}

${setup}

${reading}
${endMark}`;
  const start = doc.indexOf(title);
  let next: string;
  if (start < 0) next = `${doc.trimEnd()}\n\n${section}`;
  else {
    const end = doc.indexOf(endMark, start);
    next = end < 0 ? `${doc.slice(0, start)}${section}` : `${doc.slice(0, start)}${section}${doc.slice(end + endMark.length)}`;
  }
  writeFileSync(path, next);
  console.log(`written to ${path}`);
}

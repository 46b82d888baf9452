/**
 * DPDK testpmd as a vhost-user peer for tests and benchmarks: its
 * virtio-user PMD as the front-end (a guest's driver in user space) or its
 * vhost PMD as the back-end we compare with. Command lines as verified in
 * ../shared/NOTES.md §6: no hugepages, a file prefix per process, the main
 * and forwarding lcores pinned to one CPU, periodic stats so it keeps
 * running without a terminal, SIGINT to stop (it prints its totals).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";

export const TESTPMD = "dpdk-testpmd";

/** Why DPDK tests cannot run here, or null. */
export function testpmdSkipReason(): string | null {
  const r = spawnSync("sh", ["-c", `command -v ${TESTPMD}`], { encoding: "utf8" });
  if (r.status !== 0) return "dpdk-testpmd not installed (apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23)";
  return null;
}

export interface TestpmdOptions {
  /** virtio-user: a front-end connecting to `sockets`; vhost: a back-end serving them. */
  role: "virtio-user" | "vhost";
  sockets: string[];
  mode: "txonly" | "rxonly" | "io" | "mac";
  /** The CPU both lcores run on. */
  cpu: number;
  /** --file-prefix, unique per process. */
  prefix: string;
  queues?: number;
  packed?: boolean;
  /** Frame size (--txpkts), default 64. */
  size?: number;
  queueSize?: number;
  /** virtio-user: each port's MAC (mac= devarg), in socket order. */
  macs?: string[];
  /** More testpmd application arguments (after `--`), e.g. ["--tx-first"]. */
  extra?: string[];
}

/** Counts testpmd printed for a port at exit ("Forward statistics for port N"). */
export interface PortTotals {
  rx: number;
  rxDropped: number;
  tx: number;
  txDropped: number;
}

export class Testpmd {
  out = "";
  private readonly exited: Promise<number | null>;

  private constructor(readonly proc: ChildProcess, readonly args: string[]) {
    proc.stdout!.on("data", (d) => (this.out += d.toString()));
    proc.stderr!.on("data", (d) => (this.out += d.toString()));
    this.exited = new Promise((res) => proc.on("exit", (code) => res(code)));
  }

  get pid(): number {
    return this.proc.pid!;
  }

  static start(o: TestpmdOptions): Testpmd {
    const q = o.queues ?? 1;
    const vdevs = o.sockets.map((s, i) =>
      o.role === "vhost"
        ? `net_vhost${i},iface=${s},queues=${q}`
        : `net_virtio_user${i},path=${s},queues=${q},queue_size=${o.queueSize ?? 1024}${o.packed ? ",packed_vq=1" : ""}${o.macs?.[i] ? `,mac=${o.macs[i]}` : ""}`);
    const args = [
      "--lcores", `0@${o.cpu},1@${o.cpu}`, "--no-huge", "-m", "512", `--file-prefix=${o.prefix}`, "--no-pci",
      ...vdevs.flatMap((v) => ["--vdev", v]),
      "--", `--forward-mode=${o.mode}`, "--auto-start", "--stats-period", "1", "--total-num-mbufs=32768",
      ...(q > 1 ? [`--rxq=${q}`, `--txq=${q}`] : []),
      ...(o.size !== undefined ? [`--txpkts=${o.size}`] : []),
      ...(o.extra ?? []),
    ];
    return new Testpmd(spawn(TESTPMD, args, { stdio: ["ignore", "pipe", "pipe"] }), args);
  }

  /** Waits until the output matches `re` (e.g. the first stats block), or throws after `ms`. */
  async waitFor(re: RegExp, ms = 10_000): Promise<void> {
    const deadline = performance.now() + ms;
    while (!re.test(this.out)) {
      if (this.proc.exitCode !== null) throw new Error(`testpmd exited (${this.proc.exitCode}):\n${this.out.slice(-2000)}`);
      if (performance.now() > deadline) throw new Error(`testpmd: no ${re} within ${ms} ms:\n${this.out.slice(-2000)}`);
      await Bun.sleep(50);
    }
  }

  /** The packet rates of the periodic stats blocks so far (one per port per period). */
  rates(kind: "Rx-pps" | "Tx-pps"): number[] {
    return [...this.out.matchAll(new RegExp(`${kind}:\\s+(\\d+)`, "g"))].map((m) => Number(m[1]));
  }

  /** SIGINT, wait for the exit, and the totals per port. */
  async stop(ms = 15_000): Promise<PortTotals[]> {
    if (this.proc.exitCode === null) this.proc.kill("SIGINT");
    const t = setTimeout(() => this.proc.kill("SIGKILL"), ms);
    await this.exited;
    clearTimeout(t);
    const totals: PortTotals[] = [];
    const re = /Forward statistics for port (\d+)\s*-+\s*RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)[^\n]*\n\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)/g;
    for (const m of this.out.matchAll(re)) {
      totals[Number(m[1])] = { rx: Number(m[2]), rxDropped: Number(m[3]), tx: Number(m[4]), txDropped: Number(m[5]) };
    }
    if (totals.length === 0) throw new Error(`testpmd printed no forward statistics:\n${this.out.slice(-3000)}`);
    return totals;
  }

  /** Kills it without waiting for totals (cleanup). */
  kill(): void {
    if (this.proc.exitCode === null) this.proc.kill("SIGKILL");
  }
}

/** CPU time (user + system) a process used so far, in seconds (all its threads). */
export function cpuSeconds(pid: number): number {
  const f = `/proc/${pid}/stat`;
  if (!existsSync(f)) return 0;
  const s = readFileSync(f, "utf8");
  const fields = s.slice(s.lastIndexOf(")") + 2).split(" ");
  // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Counters the net device logged at stop, by label ("port 0", "tap x"). */
export function netCounters(log: string): Map<string, { from: number; to: number; noBuffers: number; tooBig: number; filtered: number; malformed: number }> {
  const out = new Map();
  const re = /net (port \d+|tap \S+): from \w+ (\d+), to \w+ (\d+), dropped: (\d+) no buffers, (\d+) too big, (\d+) filtered, (\d+) malformed/g;
  for (const m of log.matchAll(re)) {
    out.set(m[1], { from: Number(m[2]), to: Number(m[3]), noBuffers: Number(m[4]), tooBig: Number(m[5]), filtered: Number(m[6]), malformed: Number(m[7]) });
  }
  return out;
}

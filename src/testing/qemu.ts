/**
 * Starting QEMU for tests (the test kit's and ours): finds the binary, builds
 * the command line for a q35 TCG machine with shared memfd memory (which
 * vhost-user needs), vhost-user-blk devices and virtio-net NICs on
 * vhost-user netdevs (any other device through `extra`, e.g. from
 * qemuDeviceArgs), runs it with its console on stdout (or
 * on a unix socket QEMU listens on, which we connect to), and always reaps
 * it. Failure messages carry the command line, QEMU's stderr and the console
 * tail.
 */
import { spawn, type Subprocess } from "bun";
import { closeSync, openSync, readFileSync } from "node:fs";
import { createConnection, type Socket } from "node:net";

/** The QEMU binary: $BUNVHOST_QEMU, else qemu-system-x86_64 on PATH (null when there is none). */
export const QEMU: string | null = process.env.BUNVHOST_QEMU || Bun.which("qemu-system-x86_64");

/** Why QEMU cannot run here, or null. */
export function qemuSkipReason(): string | null {
  return QEMU ? null : "qemu-system-x86_64 not installed (apt-get install qemu-system-x86, or set BUNVHOST_QEMU)";
}

/**
 * Why QEMU cannot use KVM here, or null: /dev/kvm must open and the CPU must
 * show VMX or SVM (a sandbox may offer a /dev/kvm that cannot run guests).
 * QEMU 7.2's vhost-user-input-pci and vhost-user-gpu-pci need KVM: their
 * vhost-user-backend refuses to start without KVM's ioeventfds ("vhost
 * initialization failed: requires kvm").
 */
export function kvmSkipReason(): string | null {
  try {
    closeSync(openSync("/dev/kvm", "r+"));
  } catch (e) {
    return `/dev/kvm cannot be opened (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`;
  }
  let cpuinfo = "";
  try {
    cpuinfo = readFileSync("/proc/cpuinfo", "utf8");
  } catch {
    // not Linux /proc: let QEMU tell
    return null;
  }
  return /^flags\s*:.*\b(vmx|svm)\b/m.test(cpuinfo) ? null : "/dev/kvm is there but the CPU shows no vmx/svm flag (KVM cannot run guests here)";
}

/** A vhost-user-blk-pci device with QEMU's own properties (queue count and size, ring layout, reconnect). */
export interface VhostUserBlkOptions {
  socket: string;
  numQueues?: number;
  queueSize?: number;
  packed?: boolean;
  eventIdx?: boolean;
  indirectDesc?: boolean;
  /** -chardev reconnect= in seconds (QEMU 7.2). */
  reconnect?: number;
  /** PCI address such as "04.0". */
  addr?: string;
  id?: string;
}

/**
 * A virtio-net-pci NIC on a vhost-user netdev (`-netdev vhost-user` +
 * `-device virtio-net-pci,…,vectors=0`: QEMU 7.2 segfaults with MSI-X
 * vectors on a vhost-user netdev). QEMU shows the guest its own MAC, not the
 * back-end's config: give each NIC on one switch a distinct `mac` (QEMU's
 * default is 52:54:00:12:34:56 in every process), and the one the back-end
 * expects if it filters by MAC (`server.ts net`: 02:62:76:68:00:NN for
 * port NN - 1, or its --mac).
 */
export interface VhostUserNetOptions {
  socket: string;
  /** Queue pairs (netdev `queues=N`); more than 1 adds `mq=on` (the guest uses min(N, vCPUs) pairs). */
  queues?: number;
  /** Packed rings (`packed=on`); QEMU masks the bit off if the back-end does not offer it. */
  packed?: boolean;
  /** The guest's MAC, e.g. "02:62:76:68:00:01". */
  mac?: string;
  /** -chardev reconnect= in seconds (QEMU 7.2). */
  reconnect?: number;
  /** PCI address such as "05.0". */
  addr?: string;
  /** Chardev id (default vn0, vn1, …); the netdev is ID-net, the device ID-dev. */
  id?: string;
}

/** The machine: memory, CPUs, boot, console, monitor sockets and devices. */
export interface QemuOptions {
  /** The accelerator: "tcg" (default; runs anywhere) or "kvm" (needs /dev/kvm; see kvmSkipReason). */
  accel?: "tcg" | "kvm";
  memMiB?: number;
  /**
   * RAM in KiB; wins over memMiB. Live migration under QEMU 7.2 TCG needs
   * N MiB + 8 KiB: with RAM a multiple of 64 pages, guest-CPU writes made
   * after a dirty sync can be lost (a TCG dirty-bitmap bug fixed upstream).
   */
  memKiB?: number;
  /** Memory hotplug: `-m SIZE,slots=N,maxmem=M` (pc-dimm devices added later through QMP). */
  memSlots?: number;
  maxMemMiB?: number;
  smp?: number;
  blk?: VhostUserBlkOptions[];
  /** virtio-net NICs on vhost-user netdevs (after the blk devices). */
  net?: VhostUserNetOptions[];
  kernel?: string;
  initrd?: string;
  append?: string;
  bios?: string;
  /** -qtest unix:PATH (QEMU connects to a listener there). */
  qtest?: string;
  /**
   * The serial console on a socket chardev QEMU listens on at this path
   * (server=on,wait=off) instead of stdio; QemuProcess connects to it and
   * treats it as it treats stdout and stdin. Not with `qtest`.
   */
  console?: string;
  /** -qmp unix:PATH,server=on,wait=off (connect with Qmp from qmp.ts). */
  qmp?: string;
  /** -incoming VALUE, e.g. "defer" (then QMP migrate-incoming). */
  incoming?: string;
  extra?: string[];
}

const onOff = (b: boolean) => (b ? "on" : "off");

/**
 * The QEMU arguments for `o` (without the binary).
 * @example qemuArgs({ memMiB: 256, extra: qemuDeviceArgs({ type: 4, queues: 1, configSize: 0 }, sock) })
 */
export function qemuArgs(o: QemuOptions): string[] {
  const mem = o.memKiB !== undefined ? `${o.memKiB}K` : `${o.memMiB ?? 256}M`;
  const a = [
    "-machine", `q35,accel=${o.accel ?? "tcg"}`, "-m", mem + (o.memSlots ? `,slots=${o.memSlots},maxmem=${o.maxMemMiB ?? 1024}M` : ""),
    "-smp", String(o.smp ?? 1),
    "-object", `memory-backend-memfd,id=mem,size=${mem},share=on`, "-numa", "node,memdev=mem",
    "-display", "none", "-nodefaults", "-no-reboot",
  ];
  if (o.bios) a.push("-bios", o.bios);
  if (o.kernel) a.push("-kernel", o.kernel);
  if (o.initrd) a.push("-initrd", o.initrd);
  if (o.append) a.push("-append", o.append);
  if (o.qtest) a.push("-qtest", `unix:${o.qtest}`, "-qtest-log", "/dev/null");
  else if (o.console) a.push("-chardev", `socket,id=con0,path=${o.console},server=on,wait=off`, "-serial", "chardev:con0", "-monitor", "none");
  else a.push("-serial", "stdio", "-monitor", "none");
  if (o.qmp) a.push("-qmp", `unix:${o.qmp},server=on,wait=off`);
  if (o.incoming) a.push("-incoming", o.incoming);
  (o.blk ?? []).forEach((b, i) => {
    const id = b.id ?? `vu${i}`;
    a.push("-chardev", `socket,id=${id},path=${b.socket}${b.reconnect !== undefined ? `,reconnect=${b.reconnect}` : ""}`);
    let dev = `vhost-user-blk-pci,chardev=${id},id=${id}dev,num-queues=${b.numQueues ?? 1}`;
    if (b.queueSize !== undefined) dev += `,queue-size=${b.queueSize}`;
    if (b.packed !== undefined) dev += `,packed=${onOff(b.packed)}`;
    if (b.eventIdx !== undefined) dev += `,event_idx=${onOff(b.eventIdx)}`;
    if (b.indirectDesc !== undefined) dev += `,indirect_desc=${onOff(b.indirectDesc)}`;
    if (b.addr) dev += `,addr=${b.addr}`;
    a.push("-device", dev);
  });
  (o.net ?? []).forEach((n, i) => {
    const id = n.id ?? `vn${i}`;
    const pairs = n.queues ?? 1;
    a.push("-chardev", `socket,id=${id},path=${n.socket}${n.reconnect !== undefined ? `,reconnect=${n.reconnect}` : ""}`);
    a.push("-netdev", `vhost-user,id=${id}-net,chardev=${id}${pairs > 1 ? `,queues=${pairs}` : ""}`);
    let dev = `virtio-net-pci,netdev=${id}-net,id=${id}-dev,vectors=0`;
    if (pairs > 1) dev += ",mq=on";
    if (n.packed !== undefined) dev += `,packed=${onOff(n.packed)}`;
    if (n.mac) dev += `,mac=${n.mac}`;
    if (n.addr) dev += `,addr=${n.addr}`;
    a.push("-device", dev);
  });
  a.push(...(o.extra ?? []));
  return a;
}

/**
 * A running QEMU; `output` accumulates its stdout and, with `console`, what
 * the console socket carries (the serial console when not in qtest mode).
 */
export class QemuProcess {
  output = "";
  errors = "";
  readonly exited: Promise<number>;
  /** The console socket once connected (with `console`); rejects if QEMU exits or 10 s pass first (noted in `errors`). */
  readonly console: Promise<Socket> | null;
  private waiters: (() => void)[] = [];
  private consoleSock: Socket | null = null;

  private constructor(readonly proc: Subprocess<"pipe", "pipe", "pipe">, readonly args: string[], consolePath?: string) {
    this.exited = proc.exited;
    void this.pump(proc.stdout, (s) => (this.output += s));
    void this.pump(proc.stderr, (s) => (this.errors += s));
    this.console = consolePath ? this.connectConsole(consolePath) : null;
    this.console?.catch((e: Error) => (this.errors += `[test] ${e.message}\n`)); // so describe() shows it
  }

  static start(o: QemuOptions): QemuProcess {
    if (!QEMU) throw new Error(qemuSkipReason()!);
    const args = qemuArgs(o);
    const proc = spawn([QEMU, ...args], { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    return new QemuProcess(proc, args, o.qtest ? undefined : o.console);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private async pump(s: ReadableStream<Uint8Array>, add: (t: string) => void): Promise<void> {
    const dec = new TextDecoder();
    for await (const chunk of s) {
      add(dec.decode(chunk, { stream: true }));
      this.wake();
    }
    this.wake();
  }

  /** Connects to the console socket as soon as QEMU has created it (wait=off: output before that is lost). */
  private async connectConsole(path: string): Promise<Socket> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) throw new Error(`QEMU exited before its console ${path} accepted`);
      try {
        const sock = await new Promise<Socket>((res, rej) => {
          const s = createConnection(path, () => res(s));
          s.once("error", rej);
        });
        const dec = new TextDecoder();
        sock.on("data", (c: Buffer) => {
          this.output += dec.decode(c, { stream: true });
          this.wake();
        });
        sock.on("error", () => {});
        sock.on("close", () => this.wake());
        this.consoleSock = sock;
        return sock;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`cannot connect to QEMU's console ${path}: ${(e as Error).message}`, { cause: e });
        await Bun.sleep(10);
      }
    }
  }

  get pid(): number {
    return this.proc.pid;
  }

  /** Waits until stdout matches `re`; throws with the console tail and stderr on timeout or exit. */
  async waitFor(re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.output.match(re);
      if (m) return m;
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
        throw new Error(`QEMU exited (${this.proc.exitCode ?? this.proc.signalCode}) before ${re}\n${this.describe()}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${re}\n${this.describe()}`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, Math.min(left, 200));
        this.waiters.push(() => { clearTimeout(t); res(); });
      });
    }
  }

  /** Writes a line to the guest's console input: QEMU's stdin, or the console socket. */
  send(line: string): void {
    if (this.console) {
      if (!this.consoleSock) throw new Error(`QEMU's console is not connected yet\n${this.describe()}`);
      this.consoleSock.write(line + "\n");
      return;
    }
    this.proc.stdin.write(line + "\n");
    this.proc.stdin.flush();
  }

  describe(): string {
    const tail = this.output.split("\n").slice(-30).join("\n");
    return `--- qemu ${this.args.join(" ")}\n--- console tail:\n${tail}\n--- stderr:\n${this.errors}`;
  }

  /** Kills QEMU (SIGTERM, then SIGKILL after `graceMs`) and reaps it. */
  async stop(graceMs = 2000): Promise<number> {
    this.consoleSock?.destroy();
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGTERM");
      const t = setTimeout(() => this.proc.kill("SIGKILL"), graceMs);
      await this.exited;
      clearTimeout(t);
    }
    return this.exited;
  }
}

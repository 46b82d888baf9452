/**
 * A Linux guest under QEMU (TCG) that talks to your device through the
 * guest kernel's own virtio driver: the host's kernel, a busybox initramfs
 * (guest_image.ts) with the driver modules, your shell script appended as
 * /test.sh, and QEMU's front-end for the device on your vhost-user socket.
 *
 * Theory of operation. The script runs under busybox sh as the guest's /init
 * child after the modules are loaded; it reports with
 * `echo "RESULT: key value"` (or the `result key value` shell function) on
 * the serial console, which is QEMU's stdout. /init adds "RESULT: BOOTED
 * <uptime>" before the script and "RESULT: END <exit status>" after it, then
 * powers off. "RESULT: FAIL <why>" (the `fail` function), a non-zero exit
 * status, or a kernel Oops/BUG/I/O error on the console fails the run, and
 * the error carries QEMU's command line, stderr and the console tail. A
 * script can wait for the test with `read -r line` (Guest.send()), and a
 * test can wait for one result while the guest runs (Guest.waitResult()).
 * A script that ends with `commands` runs the lines the test sends, one by
 * one, until "exit": Guest.exec() sends one and waits for its RESULT.
 *
 * Which modules load: `modules` when given, else the drivers for `device`'s
 * VIRTIO id (GUEST_DRIVERS: net, blk, rng, input), else the block set; the
 * virtio-pci transport always comes first. `net` adds virtio-net NICs on
 * vhost-user netdevs (QemuOptions.net) and loads virtio_net for them.
 * Boot to the script takes about 3 s here (TCG, PVH entry). QEMU 7.2's
 * vhost-user-input-pci and -gpu-pci refuse to start without KVM: give
 * `accel: "kvm"` and skip on kvmSkipReason(). GUEST_CONSOLE=1 in the
 * environment prints each guest's console tail and QEMU's stderr when it
 * stops.
 *
 * For live migration, `guest.incoming()` starts a second QEMU with the same
 * machine, kernel, initramfs and command line, waiting for the migration
 * stream (-incoming defer); give both their consoles on sockets (`console`)
 * so the guest's output can continue on the destination's.
 *
 * @example
 * import { serve } from "bunvhost";
 * import { guestSkipReason, runGuest } from "bunvhost/testing";
 * import rng from "./rng.ts";
 * test.skipIf(guestSkipReason() !== null)("the guest reads entropy", async () => {
 *   const s = await serve(rng, { socket: "/tmp/rng.sock" });
 *   const out = await runGuest({
 *     socket: "/tmp/rng.sock", device: rng,
 *     script: `result bytes $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)`,
 *   });
 *   await s.stop();
 *   expect(out.results.get("bytes")).toBe("32");
 * });
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { qemuDeviceArgs, type AttachInfo } from "../server/qemu_line.ts";
import { DEFAULT_MODULES, guestImage, guestImageSkipReason, loadList, withTestScript } from "./guest_image.ts";
import { QemuProcess, qemuSkipReason, type QemuOptions, type VhostUserBlkOptions, type VhostUserNetOptions } from "./qemu.ts";

export {
  kvmSkipReason, QemuProcess, qemuArgs, qemuSkipReason, type QemuOptions, type VhostUserBlkOptions, type VhostUserNetOptions,
} from "./qemu.ts";
export { guestCacheDir, guestImage, guestImageSkipReason, GUEST_MODULES, type GuestImage } from "./guest_image.ts";

/**
 * Why a Linux guest cannot run here (no QEMU, no kernel, no static busybox),
 * as one line for a skipped test's title, or null.
 * @example describe.skipIf(guestSkipReason() !== null)(`guest${guestSkipReason() ? ` [skipped: ${guestSkipReason()}]` : ""}`, ...)
 */
export function guestSkipReason(): string | null {
  return qemuSkipReason() ?? guestImageSkipReason();
}

/** Kernel messages that mean the device or the kernel went wrong even if the script passed. */
export const KERNEL_TROUBLE = /I\/O error|blk_update_request|Buffer I\/O|EXT4-fs error|Oops|BUG:|Call Trace|blocked for more than|Kernel panic/;

/** The guest's driver modules by VIRTIO id (the image has these; see GUEST_MODULES). */
export const GUEST_DRIVERS: Readonly<Record<number, readonly string[]>> = {
  1: ["virtio_net"],
  2: ["virtio_blk"],
  4: ["virtio_rng"],
  18: ["virtio_input", "evdev"],
  26: ["virtiofs"],
};

/** Shell functions every test script can use. */
export const PRELUDE = `
result() { echo "RESULT: $*"; }
fail() { echo "RESULT: FAIL $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
commands() { while read -r line; do [ "$line" = exit ] && break; eval "$line"; done; }
`;

/** What QEMU attaches on `socket`: the device's VIRTIO id, queue count and config size, or the Device itself. */
export type GuestDevice = AttachInfo | { readonly type: number; readonly queues: number; config(): Uint8Array };

export interface GuestOptions {
  /** Shell run by the guest's /init as /test.sh (busybox sh, with PRELUDE's functions). */
  script: string;
  /** The vhost-user socket of the device under test (with `device`). */
  socket?: string;
  /** The device on `socket`; QEMU's front-end for it comes from qemuDeviceArgs (chardev id "vd0"). */
  device?: GuestDevice;
  /** vhost-user-blk devices with QEMU's own properties (chardev ids vu0, vu1, …). */
  blk?: VhostUserBlkOptions[];
  /** virtio-net NICs on vhost-user netdevs (chardev ids vn0, vn1, …; give each a distinct `mac`); loads virtio_net. */
  net?: VhostUserNetOptions[];
  /** Module names to load after virtio_pci ("virtio_rng" or "virtio-rng"); default: see the file header. */
  modules?: string[];
  /** Scratch directory for the per-run initramfs (default: a fresh one, removed at stop()). */
  dir?: string;
  /** vCPUs (default 1); a device's N queues (pairs for net) are used only with N vCPUs. */
  smp?: number;
  /** "tcg" (default) or "kvm" (much faster; needed by QEMU 7.2's vhost-user-input-pci and -gpu-pci; see kvmSkipReason). */
  accel?: "tcg" | "kvm";
  /** Guest RAM (default 256 MiB). */
  memMiB?: number;
  /** RAM in KiB, wins over memMiB (migration needs N MiB + 8 KiB; see QemuOptions). */
  memKiB?: number;
  /** Memory hotplug slots and ceiling (`-m SIZE,slots=N,maxmem=M`; see QemuOptions). */
  memSlots?: number;
  maxMemMiB?: number;
  /** Added to the kernel command line. */
  append?: string;
  /** Serial console on a unix socket at this path instead of QEMU's stdio. */
  console?: string;
  /** A QMP socket at this path. */
  qmp?: string;
  /** More QEMU arguments, after the generated ones (other devices, e.g. behind a vIOMMU). */
  extra?: string[];
}

/** What differs between a migration's source QEMU and its destination. */
export interface IncomingOptions {
  blk: VhostUserBlkOptions[];
  /** The destination's NICs (none when omitted). */
  net?: VhostUserNetOptions[];
  console?: string;
  qmp?: string;
}

/** One "RESULT: key value" line. */
export interface Result {
  key: string;
  value: string;
}

/** What a finished run printed. */
export interface GuestOutput {
  /** The last value of each RESULT key. */
  results: Map<string, string>;
  /** Every RESULT line, in order (BOOTED first, END last). */
  lines: Result[];
  /** The whole serial console. */
  console: string;
  /** Seconds from QEMU's start to the end of the script. */
  seconds: number;
}

/** The modules to load for `o`, virtio_pci first. */
function modulesFor(o: GuestOptions): string[] {
  if (o.modules) return ["virtio_pci", ...o.modules];
  const net = o.net?.length ? ["virtio_net"] : [];
  if (!o.device) return o.net?.length && !o.blk?.length ? ["virtio_pci", ...net] : [...DEFAULT_MODULES, ...net];
  const drivers = GUEST_DRIVERS[o.device.type];
  if (!drivers) throw new Error(`runGuest: no guest driver known for VIRTIO id ${o.device.type}: name the modules to load (options.modules)`);
  return ["virtio_pci", ...drivers, ...(o.blk?.length ? ["virtio_blk"] : []), ...net];
}

function deviceArgs(o: GuestOptions): string[] {
  if (!o.device) return [];
  if (!o.socket) throw new Error("runGuest: `device` needs the `socket` it is served on");
  const d = o.device;
  const info: AttachInfo = "configSize" in d ? d : { type: d.type, queues: d.queues, configSize: d.config().length };
  return qemuDeviceArgs(info, o.socket, "vd0");
}

/** A booted (or booting) guest: its QEMU, its RESULT lines, and the way to stop it. */
export class Guest {
  readonly started = Date.now();

  private constructor(readonly qemu: QemuProcess, private readonly options: QemuOptions, private readonly ownDir: string | null) {}

  /**
   * Starts QEMU and returns at once (then waitResult/send/finish, and always
   * stop). Builds the guest image first if it is missing or stale.
   */
  static async boot(o: GuestOptions): Promise<Guest> {
    const img = await guestImage();
    const load = loadList(modulesFor(o), img.modules);
    const extra = [...deviceArgs(o), ...(o.extra ?? [])];
    const ownDir = o.dir ? null : mkdtempSync(join(tmpdir(), "bunvhost-guest-"));
    const dir = o.dir ?? ownDir!;
    const initrd = withTestScript(img.initrd, PRELUDE + o.script, join(dir, `initrd-${Date.now()}-${Math.random().toString(36).slice(2)}.gz`), load);
    const options: QemuOptions = {
      kernel: img.kernel,
      initrd,
      append: `console=ttyS0 quiet panic=-1 init_on_alloc=0 ${o.append ?? ""}`.trim(),
      accel: o.accel,
      smp: o.smp ?? 1,
      memMiB: o.memMiB ?? 256,
      memKiB: o.memKiB,
      memSlots: o.memSlots,
      maxMemMiB: o.maxMemMiB,
      blk: o.blk,
      net: o.net,
      console: o.console,
      qmp: o.qmp,
      extra,
    };
    try {
      return new Guest(QemuProcess.start(options), options, ownDir);
    } catch (e) {
      if (ownDir) rmSync(ownDir, { recursive: true, force: true });
      throw e;
    }
  }

  /**
   * Starts the destination of a live migration: the same machine, kernel,
   * initramfs and command line, with `-incoming defer` (send QMP
   * migrate-incoming to it, then migrate to the source). Its results are
   * what the guest prints after the switchover.
   */
  incoming(o: IncomingOptions): Guest {
    const options: QemuOptions = { ...this.options, blk: o.blk, net: o.net, console: o.console, qmp: o.qmp, incoming: "defer" };
    return new Guest(QemuProcess.start(options), options, null);
  }

  /** The serial console so far. */
  get console(): string {
    return this.qemu.output;
  }

  /** Every RESULT line so far, in order. */
  results(): Result[] {
    const out: Result[] = [];
    // Whole lines only: a line still arriving would give a cut-off value.
    for (const m of this.qemu.output.matchAll(/^RESULT: (\S+) ?(.*?)\r?\n/gm)) out.push({ key: m[1]!, value: m[2]! });
    return out;
  }

  /** The value of the last RESULT line with `key`, or undefined. */
  result(key: string): string | undefined {
    return this.results().findLast((r) => r.key === key)?.value;
  }

  /** Waits for a RESULT line with `key` and returns its value; throws on FAIL, timeout or QEMU exit. */
  async waitResult(key: string, timeoutMs: number): Promise<string> {
    const re = new RegExp(`^RESULT: (?:${key}|FAIL)\\b ?(.*?)\\r?\\n`, "m");
    const m = await this.qemu.waitFor(re, timeoutMs);
    this.check();
    const v = this.result(key);
    if (v === undefined) throw new Error(`guest: no RESULT ${key} (${m[0]})\n${this.qemu.describe()}`);
    return v;
  }

  /**
   * Sends `command` to a script waiting in `commands` (or `read -r line`)
   * and waits for its RESULT line with `key`: give each call its own key.
   * @example await guest.exec(`ping -c 3 169.254.0.2 >/dev/null; result ping $?`, "ping", 20_000) // "0"
   */
  async exec(command: string, key: string, timeoutMs: number): Promise<string> {
    this.send(command);
    return this.waitResult(key, timeoutMs);
  }

  /** Sends a line to the guest's console (for a script's `read -r line`). */
  send(line: string): void {
    this.qemu.send(line);
  }

  /** Throws if the guest reported FAIL or the kernel logged trouble. */
  check(): void {
    const fails = this.results().filter((r) => r.key === "FAIL");
    if (fails.length) throw new Error(`guest: ${fails.map((f) => `FAIL ${f.value}`).join("; ")}\n${this.qemu.describe()}`);
    const t = this.qemu.output.match(KERNEL_TROUBLE);
    if (t) throw new Error(`guest kernel: "${t[0]}"\n${this.qemu.describe()}`);
  }

  /**
   * Waits for the script to end (RESULT: END 0) and QEMU to exit; returns the
   * results as a map (last value per key). Throws on anything else.
   */
  async finish(timeoutMs: number): Promise<Map<string, string>> {
    await this.qemu.waitFor(/^RESULT: END (\d+)\r?\n/m, timeoutMs);
    this.check();
    const end = this.result("END");
    if (end !== "0") throw new Error(`guest: test script exited with status ${end}\n${this.qemu.describe()}`);
    let timer: Timer | undefined;
    const exit = await Promise.race([
      this.qemu.exited,
      new Promise<null>((res) => (timer = setTimeout(() => res(null), 10_000))),
    ]);
    clearTimeout(timer);
    if (exit === null) throw new Error(`guest: QEMU still running 10 s after END\n${this.qemu.describe()}`);
    return new Map(this.results().map((r) => [r.key, r.value]));
  }

  /** QEMU's command line, stderr and the console tail, for error messages. */
  describe(): string {
    return this.qemu.describe();
  }

  /**
   * Stops QEMU (no-op if it has exited) and removes the scratch directory it
   * made. With GUEST_CONSOLE=1 in the environment, prints the console tail
   * and QEMU's stderr.
   */
  async stop(): Promise<void> {
    await this.qemu.stop();
    if (this.ownDir) rmSync(this.ownDir, { recursive: true, force: true });
    if (process.env.GUEST_CONSOLE === "1") console.log(`--- guest (${((Date.now() - this.started) / 1000).toFixed(1)} s)\n${this.qemu.describe()}`);
  }
}

/**
 * Boots a guest, runs `script` to its end and always stops QEMU; returns
 * what it printed. Throws (with the console tail and QEMU's stderr) on a
 * FAIL line, a non-zero exit status, kernel trouble or the timeout
 * (default 60 s).
 * @example
 * const out = await runGuest({
 *   socket: "/tmp/rng.sock", device: { type: 4, queues: 1, configSize: 0 },
 *   script: `result current $(cat /sys/class/misc/hw_random/rng_current)`,
 * });
 * out.results.get("current"); // "virtio_rng.0"
 */
export async function runGuest(o: GuestOptions & { timeoutMs?: number }): Promise<GuestOutput> {
  const g = await Guest.boot(o);
  try {
    const results = await g.finish(o.timeoutMs ?? 60_000);
    return { results, lines: g.results(), console: g.console, seconds: (Date.now() - g.started) / 1000 };
  } finally {
    await g.stop();
  }
}

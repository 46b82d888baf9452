/**
 * A Linux guest under QEMU (TCG) for tests: boots the kernel and initramfs
 * from scripts/guest_image.ts with a per-test /test.sh appended, collects the
 * "RESULT: <key> <value>" lines the script prints on the serial console, and
 * fails with QEMU's command line, stderr and the console tail.
 *
 * A test script prints results with `echo "RESULT: key value"`; "RESULT: FAIL
 * <why>" fails the run. /init adds "RESULT: BOOTED <uptime>" before the script
 * and "RESULT: END <exit status>" after it, then powers off. The script may
 * wait for the test with `read -r line` (the test calls `guest.send()`).
 * GUEST_CONSOLE=1 in the environment prints each guest's console tail and QEMU's
 * stderr when it stops.
 *
 * For live migration, `guest.incoming()` starts a second QEMU with the same
 * machine, kernel, initramfs and command line, waiting for the migration
 * stream (-incoming defer); give both their consoles on sockets (`console`)
 * so the guest's output can continue on the destination's.
 */
import { join } from "node:path";
import { guestImage, guestSkipReason, withTestScript } from "../../scripts/guest_image.ts";
import { QemuProcess, qemuSkipReason, type QemuOptions, type VhostUserBlkOptions } from "./qemu.ts";
import { closeSync, openSync, readSync } from "node:fs";
import { createHash } from "node:crypto";

/** Why guest tests cannot run here, or null. */
export function guestTestSkipReason(): string | null {
  return qemuSkipReason() ?? guestSkipReason();
}

/** Kernel messages that mean the disk or the kernel went wrong even if the script passed. */
export const KERNEL_TROUBLE = /I\/O error|blk_update_request|Buffer I\/O|EXT4-fs error|Oops|BUG:|Call Trace|blocked for more than|Kernel panic/;

export interface GuestOptions {
  /** Scratch directory for the per-test initramfs. */
  dir: string;
  blk: VhostUserBlkOptions[];
  /** Shell run by the guest's /init as /test.sh (busybox sh). */
  script: string;
  smp?: number;
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
  /** More QEMU arguments, after the generated ones (devices that `blk` cannot describe, e.g. behind a vIOMMU). */
  extra?: string[];
}

/** What differs between a migration's source QEMU and its destination. */
export interface IncomingOptions {
  blk: VhostUserBlkOptions[];
  console?: string;
  qmp?: string;
}

export interface Result {
  key: string;
  value: string;
}

/** Shell functions every test script can use. */
export const PRELUDE = `
result() { echo "RESULT: $*"; }
fail() { echo "RESULT: FAIL $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
`;

export class Guest {
  readonly started = Date.now();

  private constructor(readonly qemu: QemuProcess, private readonly options: QemuOptions) {}

  /** Starts QEMU; returns at once (use waitResult/finish). */
  static async boot(o: GuestOptions): Promise<Guest> {
    const img = await guestImage();
    const initrd = withTestScript(img.initrd, PRELUDE + o.script, join(o.dir, `initrd-${Date.now()}-${Math.random().toString(36).slice(2)}.gz`));
    const options: QemuOptions = {
      kernel: img.kernel,
      initrd,
      append: `console=ttyS0 quiet panic=-1 init_on_alloc=0 ${o.append ?? ""}`.trim(),
      smp: o.smp ?? 1,
      memMiB: o.memMiB ?? 256,
      memKiB: o.memKiB,
      memSlots: o.memSlots,
      maxMemMiB: o.maxMemMiB,
      blk: o.blk,
      console: o.console,
      qmp: o.qmp,
      extra: o.extra,
    };
    return new Guest(QemuProcess.start(options), options);
  }

  /**
   * Starts the destination of a live migration: the same machine, kernel,
   * initramfs and command line, with `-incoming defer` (send QMP
   * migrate-incoming to it, then migrate to the source). Its results are
   * what the guest prints after the switchover.
   */
  incoming(o: IncomingOptions): Guest {
    const options: QemuOptions = { ...this.options, blk: o.blk, console: o.console, qmp: o.qmp, incoming: "defer" };
    return new Guest(QemuProcess.start(options), options);
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

  describe(): string {
    return this.qemu.describe();
  }

  /** Stops QEMU (no-op if it has exited). With GUEST_CONSOLE=1 in the environment, prints the console tail and QEMU's stderr. */
  async stop(): Promise<void> {
    await this.qemu.stop();
    if (process.env.GUEST_CONSOLE === "1") console.log(`--- guest (${((Date.now() - this.started) / 1000).toFixed(1)} s)\n${this.qemu.describe()}`);
  }
}

/** Boots, runs the script to its end, always stops QEMU; returns the results. */
export async function runGuest(o: GuestOptions & { timeoutMs?: number }): Promise<Map<string, string>> {
  const g = await Guest.boot(o);
  try {
    return await g.finish(o.timeoutMs ?? 60_000);
  } finally {
    await g.stop();
  }
}

/** md5 of `len` bytes of `file` at `offset`, as the guest's md5sum prints it. */
export function md5Range(file: string, offset: number, len: number): string {
  const fd = openSync(file, "r");
  try {
    const buf = Buffer.alloc(len);
    let done = 0;
    while (done < len) {
      const n = readSync(fd, buf, done, len - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return createHash("md5").update(buf.subarray(0, done)).digest("hex");
  } finally {
    closeSync(fd);
  }
}

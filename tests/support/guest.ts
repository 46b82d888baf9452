/**
 * The Linux guest of our tests: the test kit's runner (src/testing/guest.ts),
 * so our tests and device authors' use one copy, plus helpers only our tests
 * need: a device served by the CLI in a child process, and md5 of a file
 * range.
 */
import { closeSync, existsSync, openSync, readFileSync, readSync, rmSync } from "node:fs";
import { createHash } from "node:crypto";
import { join, resolve } from "node:path";
import { scratchDir } from "./backends.ts";
import { guestImageSkipReason } from "../../src/testing/guest_image.ts";
import { qemuSkipReason } from "./qemu.ts";
export {
  Guest, KERNEL_TROUBLE, PRELUDE, runGuest, type GuestOptions, type GuestOutput, type IncomingOptions, type Result,
} from "../../src/testing/guest.ts";

/** Why guest tests cannot run here, or null. */
export function guestTestSkipReason(): string | null {
  return qemuSkipReason() ?? guestImageSkipReason();
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

/** A device served by `bun run server.ts DEVICE --socket S ARGS` in a child process. */
export interface ServedDevice {
  socket: string;
  /** The scratch directory the socket is in (removed by stop()). */
  dir: string;
  /** What the server printed so far (stdout and stderr). */
  output(): string;
  /** SIGTERM, then SIGKILL after 3 s; always reaped. Idempotent. */
  stop(): Promise<void>;
}

/**
 * Starts the CLI with a built-in device name or module path and waits for
 * its "listening" line (10 s at most). Output goes to a file, never a pipe
 * (a server blocked on a full pipe would look like a hang).
 */
export async function serveDevice(device: string, args: string[] = []): Promise<ServedDevice> {
  const root = resolve(import.meta.dir, "../..");
  const dir = scratchDir("bunvhost-dev-");
  const socket = join(dir, "vhost.sock");
  const log = join(dir, "server.log");
  const fd = openSync(log, "w");
  const argv = [process.execPath, "run", join(root, "server.ts"), device, "--socket", socket, ...args];
  let proc: ReturnType<typeof Bun.spawn>;
  try {
    proc = Bun.spawn(argv, { cwd: root, stdin: "ignore", stdout: fd, stderr: fd });
  } finally {
    closeSync(fd);
  }
  let last = "";
  const output = () => (existsSync(log) ? (last = readFileSync(log, "utf8")) : last);
  let stopped: Promise<void> | null = null;
  const served: ServedDevice = {
    socket, dir, output,
    stop: () => (stopped ??= (async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), 3000);
        await proc.exited;
        clearTimeout(t);
      }
      output();
      rmSync(dir, { recursive: true, force: true });
    })()),
  };
  const deadline = Date.now() + 10_000;
  while (!/listening on/.test(output())) {
    if (proc.exitCode !== null || proc.signalCode !== null || Date.now() > deadline) {
      const why = proc.exitCode !== null || proc.signalCode !== null ? `exited (${proc.exitCode ?? proc.signalCode})` : "not listening after 10 s";
      await served.stop();
      throw new Error(`${argv.join(" ")}: ${why}\n${served.output()}`);
    }
    await Bun.sleep(10);
  }
  return served;
}

/**
 * The Linux guest of our tests: the test kit's runner (src/testing/guest.ts),
 * so our tests and device authors' use one copy, plus helpers only our tests
 * need: a device served by the CLI in a child process, and md5 of a file
 * range.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { createHash } from "node:crypto";
import { dirname } from "node:path";
import { startDevice } from "../../src/testing/start.ts";
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

/** Starts the CLI with a built-in device name or module path (the kit's startDevice) and waits for its "listening" line. */
export async function serveDevice(device: string, args: string[] = []): Promise<ServedDevice> {
  const r = await startDevice(device, { args });
  return { socket: r.socket, dir: dirname(r.socket), output: r.log, stop: r.stop };
}

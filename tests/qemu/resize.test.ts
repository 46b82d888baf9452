/**
 * A disk image grown by its owner while a Linux guest is attached: after
 * `resize` on the control socket, bunvhost re-reads the image size and sends
 * CONFIG_CHANGE_MSG on the back-end channel; QEMU re-reads the config space
 * and the guest sees the new capacity. (bunvhost only: qemu-storage-daemon
 * resizes through its own QMP block_resize, a different path.)
 */
import { afterAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, rmSync, truncateSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../../ffi/sys.ts";
import { backendKinds, scratchDir } from "../support/backends.ts";
import { Guest, guestTestSkipReason } from "../support/guest.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = guestTestSkipReason() ?? kind.skipReason();
const MiB = 1 << 20;

const SCRIPT = `
result size $(cat /sys/block/vda/size)
read -r line
i=0
while [ $i -lt 100 ] && [ "$(cat /sys/block/vda/size)" = 65536 ]; do sleep 0.1; i=$((i + 1)); done
result resized $(cat /sys/block/vda/size)
`;

/** One control command, one reply line (blocking, with a deadline). */
function control(path: string, line: string): string {
  const fd = sys.socketUnix(false);
  try {
    sys.connectUnix(fd, path);
    sys.write(fd, new TextEncoder().encode(line + "\n"));
    const buf = new Uint8Array(256);
    let text = "";
    const deadline = Date.now() + 5000;
    while (!text.includes("\n") && Date.now() < deadline) {
      if (sys.poll1(fd, 1, 100) === 0) continue;
      const n = sys.read(fd, buf) ?? 0;
      if (n === 0) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    return text.trim();
  } finally {
    sys.closeQuiet(fd);
  }
}

describe.skipIf(skip !== null)(`disk resize seen by a Linux guest${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  const dir = scratchDir("bunvhost-resize-");
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test("bunvhost: an image grown from 32 MiB to 48 MiB shows up in the guest after `resize`", async () => {
    const image = join(dir, "disk.img");
    closeSync(openSync(image, "w"));
    truncateSync(image, 32 * MiB);
    const ctl = join(dir, "ctl.sock");
    const backend = await kind.start({ size: 32 * MiB, image, extraArgs: ["--control", ctl] });
    let guest: Guest | null = null;
    try {
      guest = await Guest.boot({ dir, blk: [{ socket: backend.socket }], script: SCRIPT });
      expect(await guest.waitResult("size", 60_000)).toBe(String(65536));
      expect(control(ctl, "resize")).toBe("ok unchanged");
      truncateSync(image, 48 * MiB);
      expect(control(ctl, "resize")).toBe("ok changed");
      guest.send("go");
      expect(await guest.waitResult("resized", 30_000)).toBe(String(98304));
      expect(backend.stderr()).toMatch(/CONFIG_CHANGE_MSG sent/);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- bunvhost stderr:\n${backend.stderr()}`);
    } finally {
      await guest?.stop();
      await backend.stop();
    }
  }, 120_000);
});

/**
 * virtio-rng (src/devices/rng.ts) seen by a Linux guest: the CLI serves the
 * built-in device (`server.ts rng`), QEMU attaches it with
 * vhost-user-rng-pci, the guest's virtio-rng driver registers it with the
 * hw_random core and /dev/hwrng reads its bytes. A second, short boot does
 * what a device author's test does: serve() the Device object in-process
 * and runGuest() against it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { rmSync } from "node:fs";
import { serve } from "../../src/server/serve.ts";
import { runGuest, type GuestOutput } from "../../src/testing/guest.ts";
import { scratchDir } from "../support/backends.ts";
import rng from "../../src/devices/rng.ts";
import { guestTestSkipReason, serveDevice, type ServedDevice } from "../support/guest.ts";

const skip = guestTestSkipReason();

const SCRIPT = String.raw`
result current $(cat /sys/class/misc/hw_random/rng_current)
result device $(cat /sys/bus/virtio/devices/*/device)
dd if=/dev/hwrng of=/tmp/r bs=64 count=4 iflag=fullblock 2>/tmp/err || fail "dd: $(cat /tmp/err)"
result bytes $(wc -c < /tmp/r)
result distinct $(od -An -v -tx1 /tmp/r | tr -s ' ' '\n' | grep . | sort -u | wc -l)
t=$(now)
result big $(dd if=/dev/hwrng bs=4096 count=64 iflag=fullblock 2>/dev/null | wc -c) $t $(now)
`;

describe.skipIf(skip !== null)(`virtio-rng in a Linux guest${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let server: ServedDevice;
  let out: GuestOutput;

  beforeAll(async () => {
    server = await serveDevice("rng");
    try {
      out = await runGuest({ socket: server.socket, device: rng, script: SCRIPT, timeoutMs: 30_000 });
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- server:\n${server.output()}`);
    }
  }, 60_000);
  afterAll(() => server?.stop());

  test("the guest's hw_random core uses virtio_rng (VIRTIO id 4)", () => {
    expect(out.results.get("current")).toMatch(/^virtio_rng\.\d+$/);
    expect(out.results.get("device")).toBe("0x0004");
  });

  test("dd if=/dev/hwrng bs=64 count=4 returns 256 bytes, not all equal", () => {
    expect(out.results.get("bytes")).toBe("256");
    // 256 random bytes take ~160 distinct values; a device writing zeroes or one byte gives 1.
    expect(Number(out.results.get("distinct"))).toBeGreaterThan(64);
  });

  test("256 KiB read through /dev/hwrng arrive whole", () => {
    const [bytes, t0, t1] = out.results.get("big")!.split(" ");
    expect(bytes).toBe(String(256 * 1024));
    console.log(`rng.test.ts: guest read 256 KiB from /dev/hwrng in ${(Number(t1) - Number(t0)).toFixed(2)} s; run ${out.seconds.toFixed(1)} s`);
  });

  test("the server logged no error", () => {
    expect(server.output()).not.toMatch(/bunvhost: error|broken/);
  });
});

describe.skipIf(skip !== null)(`the test kit's guest runner with an in-process device${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  test("serve(rng) + runGuest(): the guest reads 32 bytes from /dev/hwrng", async () => {
    const dir = scratchDir("bunvhost-rng-kit-");
    const s = await serve(rng, { socket: join(dir, "rng.sock"), logLevel: "warn" });
    try {
      const out = await runGuest({
        socket: join(dir, "rng.sock"),
        device: rng,
        script: "result current $(cat /sys/class/misc/hw_random/rng_current)\nresult bytes $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)",
        timeoutMs: 30_000,
      });
      expect(out.results.get("current")).toMatch(/^virtio_rng\.\d+$/);
      expect(out.results.get("bytes")).toBe("32");
      expect(out.lines[0]!.key).toBe("BOOTED");
      expect(out.lines.at(-1)).toEqual({ key: "END", value: "0" });
      expect(out.console).toContain("RESULT: bytes 32");
    } finally {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);
});

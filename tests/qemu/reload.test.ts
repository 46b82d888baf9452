/**
 * Hot reload under a reading guest: a device file written outside the
 * repository (an entropy device that fills buffers with one byte value) is
 * served with --watch; while the guest reads /dev/hwrng in a loop, the file
 * is rewritten with another value (and a broken version in between, which
 * must be refused while the old code keeps serving). The guest sees the new
 * bytes without an error, a reset or a reconnect; the device's state (a
 * request counter) moves across each reload.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { Guest, guestSkipReason } from "../../src/testing/guest.ts";
import { scratchDir } from "../support/backends.ts";
import { serveDevice, type ServedDevice } from "../support/guest.ts";

const skip = guestSkipReason();
const API = JSON.stringify(resolve(import.meta.dir, "../../src/index.ts"));

/** The device file as its author would write it; `fill` is the byte every buffer gets. */
const source = (fill: number, extra = "") => `import { VIRTIO_ID_RNG, type Device } from ${API};
const FILL = ${fill};
let served = 0;
${extra}
export default {
  name: "fill", type: VIRTIO_ID_RNG, queues: 1, queueSize: 64, features: 0n,
  config: () => new Uint8Array(0),
  handle(req) { served++; req.out.fill(req.out.remaining, FILL); },
  saveState: () => new Uint8Array(new Uint32Array([served]).buffer),
  loadState(b) { served = new Uint32Array(b.slice(0, 4).buffer)[0]!; console.error("fill: state " + served + " requests, now filling with " + FILL); },
} satisfies Device;
`;

// The guest reads 16 bytes at a time in the background, notes the first byte of each read and
// reports its progress every 5 reads; the test tells it when to stop.
const SCRIPT = String.raw`
( n=0; while [ ! -f /tmp/stop ]; do
    b=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 -N1 | tr -d ' ')
    if [ -n "$b" ]; then echo "$b" >> /tmp/seen; else echo x >> /tmp/err; fi
    n=$((n + 1)); [ $((n % 5)) -eq 0 ] && result n $n $b
  done ) &
read -r line
touch /tmp/stop; wait
result first $(head -1 /tmp/seen)
result last $(tail -1 /tmp/seen)
result kinds $(sort -u /tmp/seen | tr '\n' ' ')
result reads $(wc -l < /tmp/seen)
result errors $(cat /tmp/err 2>/dev/null | wc -l)
`;

describe.skipIf(skip !== null)(`--watch under a Linux guest reading the device${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let dir = "";
  let file = "";
  let server: ServedDevice;
  let guest: Guest;
  let results: Map<string, string>;
  const t: Record<string, number> = {};

  beforeAll(async () => {
    dir = scratchDir("bunvhost-reload-");
    file = join(dir, "fill.ts");
    writeFileSync(file, source(0x41));
    server = await serveDevice(file, ["--watch", "--threads", "1"]);
    guest = await Guest.boot({ socket: server.socket, device: { type: 4, queues: 1, configSize: 0 }, script: SCRIPT });
    try {
      await guest.waitResult("n", 60_000);
      await waitFor(() => reads() >= 20, 20_000, "the guest's first reads");
      // A broken edit first: refused, the old code keeps serving.
      writeFileSync(file, source(0x41, "const broken = ;"));
      await waitFor(() => /reload failed/.test(server.output()), 10_000, "the broken version to be refused");
      t.before = reads();
      await waitFor(() => reads() >= t.before + 5, 10_000, "reads to continue after the refused reload");
      // Then a good one, while the guest reads.
      writeFileSync(file, source(0x42));
      await waitFor(() => /reloaded /.test(server.output()), 10_000, "the reload");
      t.reloaded = reads();
      await waitFor(() => reads() >= t.reloaded + 20, 20_000, "reads after the reload");
      guest.send("done");
      results = await guest.finish(30_000);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- server:\n${server.output()}\n--- guest:\n${guest?.describe()}`);
    }
  }, 120_000);
  afterAll(async () => {
    await guest?.stop();
    await server?.stop();
  });

  /** The guest's reads so far (its last progress line). */
  function reads(): number {
    return Number(guest.result("n")?.split(" ")[0] ?? 0);
  }

  test("the guest read the old bytes, then the new ones, and nothing else", () => {
    expect(results.get("first")).toBe("41");
    expect(results.get("last")).toBe("42");
    expect(results.get("kinds")?.trim()).toBe("41 42");
    expect(results.get("errors")).toBe("0");
    console.log(`reload.test.ts: ${results.get("reads")} reads of 16 bytes`);
  });

  test("one front-end connection throughout: no reset, no reconnect (it ends only at the guest's power-off)", () => {
    const out = server.output();
    expect(out.match(/front-end connected/g)?.length).toBe(1);
    expect(out).not.toMatch(/broken|RESET|bunvhost: warn/);
    const gone = out.indexOf("front-end disconnected");
    expect(gone === -1 || gone > out.indexOf("reloaded ")).toBe(true);
  });

  test("the broken version was refused with file:line, the good one swapped in with its pause logged and the state moved", () => {
    const out = server.output();
    expect(out).toMatch(new RegExp(`reload failed, the running device keeps serving: ${file.replace(/\./g, "\\.")}: import: .*${file.replace(/\./g, "\\.")}:4:\\d+`));
    const m = /reloaded .* \(loaded in ([\d.]+) ms, rings paused ([\d.]+) ms\)/.exec(out);
    expect(m).not.toBeNull();
    // Two instances take the state: the main thread's and the I/O thread's.
    expect(out.match(/fill: state \d+ requests, now filling with 66/g)?.length).toBe(2);
    console.log(`reload.test.ts: new code loaded in ${m![1]} ms, rings paused ${m![2]} ms`);
  });
});

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(50);
  }
}

/**
 * 1000 connect / set-up / I/O / disconnect cycles against one server: the
 * number of open fds returns to its baseline and resident memory stays
 * within noise (no leak of fds, mappings or per-connection state).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { BlkDriver, VIRTIO_BLK_S_OK } from "../../src/frontend/index.ts";
import { backendKinds, type Backend } from "../support/backends.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();
const CYCLES = 1000;

const fds = (pid: number) => readdirSync(`/proc/${pid}/fd`).length;
const rssKiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);

describe.skipIf(skip !== null)(`soak against bunvhost${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let be: Backend;
  beforeAll(async () => {
    be = await kind.start({ size: 16 << 20 });
  });
  afterAll(async () => {
    await be?.stop();
  });

  test(`${CYCLES} connect/set-up/I/O/disconnect cycles leak no fds and no memory`, async () => {
    const data = new Uint8Array(4096).fill(0x5a);
    const cycle = (i: number) => {
      using d = BlkDriver.connect(be.socket, { queueSize: 16, depth: 2, maxIo: 8192, timeoutMs: 5000 });
      expect(d.write((i % 256) * 8, data)).toBe(VIRTIO_BLK_S_OK);
    };
    // Warm up (JIT, pools, the I/O thread's first ring), then take the baseline.
    for (let i = 0; i < 50; i++) cycle(i);
    await Bun.sleep(200);
    const fd0 = fds(be.pid), rss0 = rssKiB(be.pid);
    for (let i = 0; i < CYCLES; i++) cycle(i);
    await Bun.sleep(300);
    const fd1 = fds(be.pid), rss1 = rssKiB(be.pid);
    console.log(`soak: ${CYCLES} cycles, fds ${fd0} -> ${fd1}, RSS ${rss0} -> ${rss1} KiB`);
    expect(fd1).toBe(fd0);
    // Each connection maps 1+ MiB of guest memory and allocates rings and slots: a leak
    // of either would add far more than 32 MiB over 1000 cycles.
    expect(rss1 - rss0).toBeLessThan(32 * 1024);
    expect(be.stderr()).not.toMatch(/error/);
  }, 120_000);
});

/**
 * DPDK testpmd's virtio-user (a user-space virtio-net driver) against
 * `server.ts net`, split and packed rings: traffic into one port, through
 * the switch from one front-end to another, and back again, with the
 * counts of both sides compared. testpmd pins both its lcores to one CPU;
 * each run lasts about two seconds.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { startDevice, type RunningDevice } from "../../src/testing/index.ts";
import { netCounters, Testpmd, testpmdSkipReason } from "../support/dpdk.ts";

const skip = testpmdSkipReason();
if (skip) console.log(`net_testpmd.test.ts: skipped: ${skip}`);
const dir = mkdtempSync("/tmp/bvh-pmd-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let seq = 0;

async function server(ports: number): Promise<{ dev: RunningDevice; sockets: string[] }> {
  const sockets = Array.from({ length: ports }, (_, i) => join(dir, `p${seq}-${i}.sock`));
  seq++;
  const dev = await startDevice("net", { socket: sockets[0], args: sockets.slice(1).flatMap((s) => ["--socket", s]) });
  return { dev, sockets };
}

/** Runs `fn`, then stops every testpmd and the server whatever happened. */
async function withAll<T>(dev: RunningDevice, pmds: Testpmd[], fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } finally {
    for (const p of pmds) p.kill();
    await dev.stop();
  }
}

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";
  describe.skipIf(skip !== null)(`DPDK testpmd virtio-user against server.ts net (${ring} ring)`, () => {
    test("txonly into one port: every frame testpmd sent was taken by the switch", async () => {
      const { dev, sockets } = await server(1);
      const tx = Testpmd.start({ role: "virtio-user", sockets, mode: "txonly", cpu: 0, prefix: `bvt${process.pid}a`, packed });
      await withAll(dev, [tx], async () => {
        await tx.waitFor(/Tx-pps:\s+[1-9]/);
        await Bun.sleep(1500);
        const [t] = await tx.stop();
        await dev.stop();
        const c = netCounters(dev.log()).get("port 0")!;
        expect(t!.tx).toBeGreaterThan(10_000);
        // Frames still in the ring when testpmd stopped its port are not taken (at most a ring).
        expect(c.from).toBeLessThanOrEqual(t!.tx);
        expect(c.from).toBeGreaterThan(t!.tx - 1024);
        expect(c.malformed).toBe(0);
        expect(dev.log()).not.toMatch(/error|broken/);
      });
    }, 30_000);

    test("txonly on A, rxonly on B: what A sent reached B or was counted as dropped", async () => {
      const { dev, sockets } = await server(2);
      const rx = Testpmd.start({ role: "virtio-user", sockets: [sockets[1]!], mode: "rxonly", cpu: 1, prefix: `bvt${process.pid}b`, packed });
      const tx = Testpmd.start({ role: "virtio-user", sockets: [sockets[0]!], mode: "txonly", cpu: 0, prefix: `bvt${process.pid}c`, packed });
      await withAll(dev, [rx, tx], async () => {
        await rx.waitFor(/Rx-pps/);
        await tx.waitFor(/Tx-pps:\s+[1-9]/);
        await Bun.sleep(1500);
        const [t] = await tx.stop();
        await Bun.sleep(200);
        const [r] = await rx.stop();
        await dev.stop();
        const c = netCounters(dev.log());
        const a = c.get("port 0")!, b = c.get("port 1")!;
        expect(r!.rx).toBeGreaterThan(1000);
        // Unknown unicast floods to B, the only other port: each frame delivered or counted.
        expect(a.from).toBe(b.to + b.noBuffers + b.filtered + b.tooBig);
        expect(a.from).toBeLessThanOrEqual(t!.tx);
        // testpmd counts what it dequeued; what we put in the ring after it stopped reading it never saw.
        expect(r!.rx).toBeLessThanOrEqual(b.to);
        expect(r!.rx).toBeGreaterThan(b.to - 1024);
      });
    }, 30_000);

    test("A sends, B forwards it back (mac mode): frames cross the switch both ways", async () => {
      const { dev, sockets } = await server(2);
      const back = Testpmd.start({ role: "virtio-user", sockets: [sockets[1]!], mode: "mac", cpu: 1, prefix: `bvt${process.pid}d`, packed });
      const tx = Testpmd.start({ role: "virtio-user", sockets: [sockets[0]!], mode: "txonly", cpu: 0, prefix: `bvt${process.pid}e`, packed });
      await withAll(dev, [back, tx], async () => {
        await back.waitFor(/Rx-pps/);
        await tx.waitFor(/Tx-pps:\s+[1-9]/);
        await Bun.sleep(1500);
        await tx.stop();
        await Bun.sleep(200);
        const [m] = await back.stop();
        await dev.stop();
        const c = netCounters(dev.log());
        const a = c.get("port 0")!, b = c.get("port 1")!;
        expect(m!.rx).toBeGreaterThan(1000);
        expect(m!.tx).toBeGreaterThan(1000);
        // What B sent came into the switch and went to A (delivered or counted: txonly does not read its RX ring).
        expect(b.from).toBe(m!.tx);
        expect(b.from).toBe(a.to + a.noBuffers + a.filtered + a.tooBig);
        expect(a.to).toBeGreaterThan(0);
        expect(dev.log()).not.toMatch(/error|broken/);
      });
    }, 30_000);
  });
}

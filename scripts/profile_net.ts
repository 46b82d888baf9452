/**
 * Where a frame's time goes in the net device, without DPDK: our own
 * front-end (the test kit's driver, in this process) fills 1000 TX chains
 * (and 1000 RX buffers on a second port), kicks once, and the time spent in
 * `Vring.process` (taking, switching, delivering, completing) is divided by
 * the frames. Run on the main loop (--threads 0) so that it can be timed
 * here. Used for the analysis in docs/PERFORMANCE.md ("virtio-net against
 * DPDK"); medians of --runs.
 *
 *   bun scripts/profile_net.ts [--runs 5] [--size 64]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Vring } from "../src/device/vring.ts";
import { serve, type Logger } from "../src/index.ts";
import { DeviceDriver } from "../src/testing/index.ts";

const { values: a } = parseArgs({ options: { runs: { type: "string", default: "5" }, size: { type: "string", default: "64" } } });
const runs = Number(a.runs), size = Number(a.size);

let inProcess = 0;
const process0 = Vring.prototype.process;
Vring.prototype.process = function (this: Vring) {
  const t = performance.now();
  process0.call(this);
  inProcess += performance.now() - t;
};

const quiet: Logger = { level: "error", debug() {}, info() {}, warn() {}, error: (m) => console.error(m) };

async function once(forward: boolean): Promise<number> {
  const dir = mkdtempSync("/tmp/bvh-profile-net-");
  const socks = forward ? [join(dir, "a.sock"), join(dir, "b.sock")] : [join(dir, "a.sock")];
  const s = await serve("net", { socket: socks, threads: 0, log: quiet });
  const A = await DeviceDriver.connect(socks[0]!, { queueSize: 1024, memMiB: 64 });
  const B = forward ? await DeviceDriver.connect(socks[1]!, { queueSize: 1024, memMiB: 64 }) : null;
  try {
    const frame = new Uint8Array(12 + size);
    frame.set([2, 0, 0, 0, 0, 2], 12);
    frame.set([2, 0, 0, 0, 0, 1], 18);
    const G = 48 << 20;
    A.ram.write(G, frame);
    const tx = A.vqs[1]!, rx = B?.vqs[0];
    const N = 1000;
    let frames = 0;
    for (let round = 0; round < 300; round++) {
      if (round === 50) { inProcess = 0; frames = 0; } // after the JIT warmed up
      if (rx) {
        for (let i = 0; i < N; i++) { rx.begin(); rx.add(G + 4096 + i * 2048, 2048, true); rx.commit(); }
        rx.publish();
      }
      for (let i = 0; i < N; i++) { tx.begin(); tx.add(G, frame.length, false); tx.commit(); }
      tx.publish();
      tx.kick(true);
      for (let got = 0; got < N;) {
        while (tx.reap()) got++;
        if (got < N) await Bun.sleep(0);
      }
      if (rx) while (rx.reap());
      frames += N;
    }
    return (inProcess * 1e6) / frames;
  } finally {
    A.close();
    B?.close();
    await s.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

const median = (xs: number[]) => [...xs].sort((p, q) => p - q)[Math.floor(xs.length / 2)]!;
const tx: number[] = [], fwd: number[] = [];
for (let r = 0; r < runs; r++) {
  tx.push(await once(false));
  fwd.push(await once(true));
}
console.log(`${size}-byte frames, ns in Vring.process per frame, median of ${runs}:`);
console.log(`  taken from a guest (one port, flooded to no one): ${median(tx).toFixed(0)} ns  [${tx.map((x) => x.toFixed(0)).join(" ")}]`);
console.log(`  forwarded to another port's RX buffer:           ${median(fwd).toFixed(0)} ns  [${fwd.map((x) => x.toFixed(0)).join(" ")}]`);

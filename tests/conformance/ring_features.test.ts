/**
 * The modern ring features over real sockets, our front-end against `bun run
 * server.ts`, both ring layouts:
 *
 * - VIRTIO_F_IN_ORDER: checksummed random reads and writes on a file image
 *   served through io_uring (completions can finish out of order in the
 *   device); every completion must come back in submission order, with the
 *   right bytes.
 * - VIRTIO_F_RING_RESET: queue 1 is reset again and again (GET_VRING_BASE,
 *   new size and ring memory, base 0) while queue 0 keeps serving requests,
 *   also while queue 1 is stopped; on the main loop and on I/O threads.
 * - INFLIGHT_SHMFD: the back-end process is SIGKILLed with requests
 *   unfinished, restarted on the same socket and image, and our front-end
 *   reconnects with the same inflight buffer and ring state: no request is
 *   lost or completed twice, and the disk holds exactly what was written.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../../ffi/sys.ts";
import { BlkDriver, RECLAIMED, VhostUserFrontend, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../../src/frontend/index.ts";
import { bit, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1 } from "../../src/protocol/features.ts";
import { packedInflightQueueSize, splitInflightQueueSize } from "../../src/virtq/inflight.ts";
import { REPO_ROOT, scratchDir } from "../support/backends.ts";

/** A server.ts child on a socket we choose (so that a restarted one takes the same path). */
class Server {
  proc!: ReturnType<typeof Bun.spawn>;
  private n = 0;
  constructor(readonly dir: string, readonly socket: string, readonly args: string[]) {}

  async start(): Promise<void> {
    const i = this.n++;
    const out = openSync(join(this.dir, `out${i}.log`), "w");
    const err = openSync(join(this.dir, `err${i}.log`), "w");
    try {
      this.proc = Bun.spawn([process.execPath, "run", "server.ts", "--socket", this.socket, ...this.args], {
        cwd: REPO_ROOT, stdin: "ignore", stdout: out, stderr: err,
      });
    } finally {
      closeSync(out);
      closeSync(err);
    }
    const deadline = performance.now() + 15000;
    while (!readFileSync(join(this.dir, `out${i}.log`), "utf8").includes("listening")) {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) throw new Error(`server exited: ${this.stderr(i)}`);
      if (performance.now() > deadline) throw new Error(`server not ready: ${this.stderr(i)}`);
      await Bun.sleep(20);
    }
  }

  stderr(i = this.n - 1): string {
    return readFileSync(join(this.dir, `err${i}.log`), "utf8") + readFileSync(join(this.dir, `out${i}.log`), "utf8");
  }

  /** Everything every instance logged. */
  allLogs(): string {
    let s = "";
    for (let i = 0; i < this.n; i++) s += this.stderr(i);
    return s;
  }

  async kill(): Promise<void> {
    this.proc.kill("SIGKILL");
    await this.proc.exited;
  }

  async stop(): Promise<void> {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGTERM");
      const done = await Promise.race([this.proc.exited.then(() => true), Bun.sleep(3000).then(() => false)]);
      if (!done) this.proc.kill("SIGKILL");
      await this.proc.exited;
    }
  }
}

function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

/** Deterministic contents of a write: (tag, sector) in every 4 bytes. */
function pattern(out: Uint8Array, tag: number, sector: number): void {
  const dv = new DataView(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i + 4 <= out.length; i += 4) dv.setUint32(i, (Math.imul(tag + 1, 2654435761) ^ (sector * 512 + i)) >>> 0, true);
}

const SECTOR = 512;
const dirs: string[] = [];
const servers: Server[] = [];
afterAll(async () => {
  for (const s of servers) await s.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function server(args: string[], image?: number): Promise<Server> {
  const dir = scratchDir("bunvhost-ringfeat-");
  dirs.push(dir);
  const a = [...args];
  if (image !== undefined) {
    const path = join(dir, "disk.img");
    writeFileSync(path, "");
    truncateSync(path, image);
    a.push("--image", path);
  } else {
    a.push("--size", String(64 << 20));
  }
  const s = new Server(dir, join(dir, "vhost.sock"), a);
  servers.push(s);
  await s.start();
  return s;
}

/**
 * Random reads and writes (1-16 sectors) with up to `qd` in flight, never two
 * overlapping in flight; a shadow disk predicts every read. Checks the order
 * of completions when `inOrder`. Returns counts.
 */
function randomIo(d: BlkDriver, o: { seed: number; requests: number; qd: number; sectors: number; inOrder: boolean; queue?: number }) {
  const q = o.queue ?? 0;
  const rand = lcg(o.seed);
  const shadow = new Uint8Array(o.sectors * SECTOR);
  const busy = new Uint8Array(o.sectors);
  const order: number[] = []; // slots in submission order, waiting
  const meta = new Map<number, { write: boolean; sector: number; n: number; tag: number }>();
  let completed = 0, submitted = 0, outOfOrder = 0;
  const buf = new Uint8Array(16 * SECTOR);
  d.onComplete = (slot, status) => {
    expect(status).toBe(VIRTIO_BLK_S_OK);
    const m = meta.get(slot)!;
    if (order[0] !== slot) outOfOrder++;
    order.splice(order.indexOf(slot), 1);
    if (!m.write) {
      const got = buf.subarray(0, m.n * SECTOR);
      d.slotRead(slot, got);
      const want = shadow.subarray(m.sector * SECTOR, (m.sector + m.n) * SECTOR);
      if (Bun.hash(got) !== Bun.hash(want)) throw new Error(`read of ${m.n} sectors at ${m.sector} (request ${m.tag}): wrong data`);
    }
    busy.fill(0, m.sector, m.sector + m.n);
    meta.delete(slot);
    completed++;
  };
  try {
    while (completed < o.requests) {
      while (submitted < o.requests && d.inFlight(q) < o.qd && d.freeSlotCount(q) > 0) {
        const n = 1 + Math.floor(rand() * 16);
        const sector = Math.floor(rand() * (o.sectors - n));
        if (busy.subarray(sector, sector + n).some((b) => b !== 0)) break;
        busy.fill(1, sector, sector + n);
        const write = rand() < 0.5;
        const tag = submitted++;
        let slot: number;
        if (write) {
          const data = buf.subarray(0, n * SECTOR);
          pattern(data, tag, sector);
          shadow.set(data, sector * SECTOR);
          slot = d.enqueue(VIRTIO_BLK_T_OUT, sector, n * SECTOR, { queue: q }, data);
        } else {
          slot = d.enqueue(VIRTIO_BLK_T_IN, sector, n * SECTOR, { queue: q });
        }
        meta.set(slot, { write, sector, n, tag });
        order.push(slot);
      }
      d.kick(q);
      d.wait(q);
    }
  } finally {
    d.onComplete = null;
  }
  if (o.inOrder) expect(outOfOrder).toBe(0);
  return { completed, usedEntries: d.vqs[q]!.usedEntries ?? 0, outOfOrder };
}

for (const packed of [false, true]) {
  const layout = packed ? "packed" : "split";

  describe(`VIRTIO_F_IN_ORDER, ${layout} rings`, () => {
    for (const where of [["--threads", "0"], ["--threads", "1"]]) {
      test(`checksummed random I/O on an io_uring image completes in submission order (${where.join(" ")})`, async () => {
        const s = await server([...where, "--aio", "uring", "--queues", "1"], 32 << 20);
        using d = BlkDriver.connect(s.socket, { packed, inOrder: true, queueSize: packed ? 100 : 128, depth: 32, maxIo: 16 * SECTOR });
        expect(d.vqs[0]!.inOrder).toBe(true);
        const r = randomIo(d, { seed: packed ? 7 : 8, requests: 3000, qd: 32, sectors: 8192, inOrder: true });
        expect(r.completed).toBe(3000);
        // Runs of whole buffers may share a used entry: never more entries than buffers.
        expect(r.usedEntries).toBeLessThanOrEqual(3000);
        console.log(`in-order ${layout} ${where.join(" ")}: 3000 requests, ${r.usedEntries} used entries read`);
        await s.stop();
      }, 60_000);
    }

    test("NOTIFICATION_DATA negotiated: kicks compute vq index | next avail << 16; the device needs none of it", async () => {
      const s = await server(["--threads", "0", "--queues", "2"]);
      using d = BlkDriver.connect(s.socket, { packed, notificationData: true, queues: 2, queueSize: 64 });
      const out = new Uint8Array(4096);
      for (let i = 0; i < 70; i++) expect(d.write(i * 8, out.fill(i), { queue: 1 })).toBe(VIRTIO_BLK_S_OK);
      const vq = d.vqs[1]!;
      expect(vq.notifyData).not.toBe(-1);
      expect(vq.notifyData & 0xffff).toBe(1);
      expect(vq.notifyData >>> 16).toBe(vq.availIndex);
      const back = new Uint8Array(4096);
      expect(d.read(69 * 8, back, { queue: 1 })).toBe(VIRTIO_BLK_S_OK);
      expect(back.every((b) => b === 69)).toBe(true);
      await s.stop();
    }, 30_000);
  });

  describe(`VIRTIO_F_RING_RESET, ${layout} rings`, () => {
    for (const where of [["--threads", "0"], ["--threads", "2"]]) {
      test(`queue 1 reset 20 times (new sizes) while queue 0 runs, ${where.join(" ")}: nothing lost, data intact`, async () => {
        const s = await server([...where, "--queues", "2"]);
        // With an inflight area too: each restart of the reset ring must begin a fresh area for its new size.
        using d = BlkDriver.connect(s.socket, { packed, ringReset: true, inflight: true, queues: 2, queueSize: 128, depth: 32, maxIo: 8 * SECTOR });
        const rand = lcg(packed ? 21 : 22);
        const written = new Map<number, number>(); // sector (of 8) → tag
        let tag = 0, q0During = 0, reclaimedTotal = 0;
        const data = new Uint8Array(8 * SECTOR);
        const pending = new Map<number, { sector: number; tag: number }>();
        d.onComplete = (slot, status) => {
          const p = pending.get(slot)!;
          pending.delete(slot);
          if (status === RECLAIMED) {
            // Never taken by the device: submit it again on the new ring.
            reclaimedTotal++;
            resubmit.push(p);
            return;
          }
          expect(status).toBe(VIRTIO_BLK_S_OK);
          written.set(p.sector, p.tag);
        };
        let resubmit: { sector: number; tag: number }[] = [];
        const submit = (q: number, sector: number, t: number) => {
          // Queue 1 may hold one request after a reset: wait for room.
          while (d.freeSlotCount(q) === 0 || !d.vqs[q]!.canAdd(3)) {
            d.kick(q);
            d.wait(q);
          }
          pattern(data, t, sector);
          pending.set(d.enqueue(VIRTIO_BLK_T_OUT, sector, data.length, { queue: q }, data), { sector, tag: t });
        };
        // Down to a ring that holds exactly one request (header, data, status: 3 descriptors; split: 4).
        const sizes = packed ? [64, 128, 37, 100, 3] : [64, 128, 32, 16, 4];
        for (let round = 0; round < 20; round++) {
          // Each round writes fresh sectors on both queues, so the final disk says which writes landed.
          for (let k = 0; k < 16; k++) submit(0, ((round * 64 + k) * 8), tag++);
          for (let k = 0; k < 16; k++) submit(1, ((round * 64 + 32 + k) * 8), tag++);
          d.kick(0);
          // Every third round queue 1's requests are published without a kick: the reset finds them untaken.
          if (round % 3 === 0) d.publish(1);
          else d.kick(1);
          const size = sizes[round % sizes.length]!;
          d.resetQueue(1, size, () => {
            // Queue 1 is stopped: queue 0 keeps serving, new requests included.
            for (let k = 0; k < 8; k++) submit(0, ((round * 64 + 16 + k) * 8), tag++);
            d.kick(0);
            while (d.inFlight(0) > 0) q0During += d.wait(0);
          });
          expect(d.vqs[1]!.size).toBe(size);
          // The new ring takes what was reclaimed, a few at a time (it may hold one request).
          const again = resubmit;
          resubmit = [];
          for (const p of again) submit(1, p.sector, p.tag);
          d.kick(1);
          while (d.inFlight(1) > 0) d.wait(1);
          while (d.inFlight(0) > 0) d.wait(0);
        }
        d.onComplete = null;
        expect(q0During).toBeGreaterThanOrEqual(20 * 8);
        expect(reclaimedTotal).toBeGreaterThan(0);
        // Every write landed once, with its own bytes.
        const back = new Uint8Array(8 * SECTOR);
        const want = new Uint8Array(8 * SECTOR);
        for (const [sector, t] of written) {
          expect(d.read(sector, back)).toBe(VIRTIO_BLK_S_OK);
          pattern(want, t, sector);
          if (Bun.hash(back) !== Bun.hash(want)) throw new Error(`sector ${sector}: not the bytes of write ${t}`);
        }
        expect(written.size).toBe(20 * 40);
        console.log(`ring reset ${layout} ${where.join(" ")}: 20 resets, ${q0During} queue-0 completions while queue 1 was stopped, ${reclaimedTotal} reclaimed`);
        expect(s.allLogs()).not.toMatch(/broken|error/i);
        await s.stop();
      }, 90_000);
    }
  });

  describe(`INFLIGHT_SHMFD across a SIGKILLed back-end, ${layout} rings`, () => {
    test("GET_INFLIGHT_FD sizes the area for the negotiated layout (before SET_FEATURES: the larger, packed one)", async () => {
      const s = await server(["--threads", "0", "--queues", "2"]);
      const fe = VhostUserFrontend.connect(s.socket);
      try {
        const f = fe.getFeatures();
        fe.setProtocolFeatures(fe.getProtocolFeatures());
        const before = fe.getInflightFd(2, 128);
        sys.close(before.fd);
        expect(before.info.mmapSize).toBe(2 * packedInflightQueueSize(128));
        fe.setFeatures(f & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (packed ? bit(VIRTIO_F_RING_PACKED) : 0n)));
        const after = fe.getInflightFd(2, 128);
        sys.close(after.fd);
        expect(after.info.mmapSize).toBe(2 * (packed ? packedInflightQueueSize(128) : splitInflightQueueSize(128)));
      } finally {
        fe.close();
        await s.stop();
      }
    });

    test("8 kills with requests unfinished: each request completes once, the disk holds every write", async () => {
      const s = await server(["--threads", "0", "--queues", "1", "--aio", "uring"], 64 << 20);
      const d = BlkDriver.connect(s.socket, { packed, inflight: true, queueSize: packed ? 150 : 256, depth: 48, maxIo: 32 * SECTOR });
      try {
        const rand = lcg(packed ? 31 : 32);
        const done = new Map<number, number>(); // tag → completions
        const where = new Map<number, number>(); // sector → tag
        const slotTag = new Map<number, { tag: number; sector: number }>();
        d.onComplete = (slot, status) => {
          expect(status).toBe(VIRTIO_BLK_S_OK);
          const m = slotTag.get(slot)!;
          slotTag.delete(slot);
          done.set(m.tag, (done.get(m.tag) ?? 0) + 1);
          where.set(m.sector, m.tag);
        };
        const data = new Uint8Array(32 * SECTOR);
        let tag = 0;
        for (let kill = 0; kill < 8; kill++) {
          for (let k = 0; k < 48; k++) {
            const sector = (kill * 48 + k) * 32;
            pattern(data, tag, sector);
            slotTag.set(d.enqueue(VIRTIO_BLK_T_OUT, sector, data.length, {}, data), { tag: tag++, sector });
          }
          d.kick(0);
          // Kill it at a random moment of the batch: some requests taken and not completed, some not taken.
          Bun.sleepSync(rand() * 3);
          await s.kill();
          await s.start();
          d.reconnect(s.socket);
          while (d.inFlight(0) > 0) d.wait(0, 10_000);
        }
        d.onComplete = null;
        expect(done.size).toBe(tag);
        for (const [t, c] of done) if (c !== 1) throw new Error(`request ${t} completed ${c} times`);
        const back = new Uint8Array(32 * SECTOR), want = new Uint8Array(32 * SECTOR);
        for (const [sector, t] of where) {
          expect(d.read(sector, back)).toBe(VIRTIO_BLK_S_OK);
          pattern(want, t, sector);
          if (Bun.hash(back) !== Bun.hash(want)) throw new Error(`sector ${sector}: not the bytes of write ${t}`);
        }
        const resubmitted = [...s.allLogs().matchAll(/resubmitting (\d+) request/g)].reduce((a, m) => a + Number(m[1]), 0);
        console.log(`inflight ${layout}: 8 kills, ${tag} requests, ${resubmitted} resubmitted by restarted back-ends`);
        // Kills land while the device works through 48 writes: some were taken and not completed.
        expect(resubmitted).toBeGreaterThan(0);
        expect(s.allLogs()).not.toMatch(/broken/i);
      } finally {
        d.close();
        await s.stop();
      }
    }, 120_000);
  });
}

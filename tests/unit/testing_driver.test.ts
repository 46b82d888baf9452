/**
 * The test kit (bunvhost/testing) driving devices over real sockets, memfd
 * guest RAM and eventfds: an echo device served in this process (round
 * trips, config, config changes over the back-end channel, timeouts, hang-ups,
 * concurrent requests, fds back to baseline), a receive queue device
 * (available/take), a device file served by the CLI with I/O threads and hot
 * reloaded through the control socket under load, and the built-in blk
 * through the CLI.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Device, Queues, Request } from "../../src/device/api.ts";
import { DeviceDriver, FrontendError, startDevice } from "../../src/testing/index.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";
import { BackendReq } from "../../src/protocol/messages.ts";

const fdCount = () => readdirSync("/proc/self/fd").length;

/** Copies the readable bytes into the writable buffers; queue 1 answers with the queue index. Config: 4 bytes, writable. */
function echo(): Device & { cfg: Uint8Array } {
  const cfg = new Uint8Array([1, 2, 3, 4]);
  return {
    cfg, name: "echo", type: 42, queues: 2, queueSize: 256, features: 1n << 3n,
    config: () => cfg,
    setConfig(off, data) { cfg.set(data, off); },
    handle(req: Request) {
      if (req.queue === 1) return req.out.writeU8(1);
      const b = new Uint8Array(Math.min(req.in.remaining, req.out.remaining));
      req.in.copyTo(b);
      req.out.copyFrom(b);
    },
  };
}

describe("DeviceDriver against a device object served in-process", () => {
  beforeAll(async () => {
    // The first server in a process starts threads that stay (the main loop's poller): count fds after.
    const s = await startDevice(echo());
    await (await DeviceDriver.connect(s.socket)).close();
    await s.stop();
  });

  for (const packed of [false, true]) {
    test(`round trips on 2 ${packed ? "packed" : "split"} queues, config read and written, the device's feature bit negotiated`, async () => {
      const base = fdCount();
      const dev = echo();
      const s = await startDevice(dev);
      const drv = await DeviceDriver.connect(s.socket, { packed, queueSize: packed ? 48 : 64 });
      try {
        expect(drv.queueCount).toBe(2);
        expect(drv.features & (1n << 3n)).toBe(1n << 3n);
        const msg = new TextEncoder().encode("hello, device");
        const c = await drv.submit(0, { readable: msg, writable: [5, 100] });
        expect(c.len).toBe(msg.length);
        expect(new TextDecoder().decode(c.data)).toBe("hello, device");
        expect((await drv.submit(1, { writable: 1 })).data).toEqual(new Uint8Array([1]));
        // More chains than the ring holds, in batches: wraps and buffer recycling.
        for (let round = 0; round < 10; round++) {
          const cs = await drv.submitAll(0, Array.from({ length: 20 }, (_, i) => ({ readable: new Uint8Array([round, i]), writable: 2 })));
          expect(cs.map((x) => x.data[1])).toEqual(Array.from({ length: 20 }, (_, i) => i));
        }
        expect(await drv.config(0, 4)).toEqual(new Uint8Array([1, 2, 3, 4]));
        await drv.setConfig(2, new Uint8Array([9]));
        expect(dev.cfg[2]).toBe(9);
        expect(await drv.stop()).toHaveLength(2);
      } finally {
        drv.close();
        await s.stop();
      }
      // Nothing left open. The main loop closes its epoll fd and wake eventfd 50 ms after stop (its
      // poller Worker may still be in epoll_wait), and an earlier server's may still be closing: wait
      // for them, then never more than before.
      const deadline = performance.now() + 1000;
      while (fdCount() > base && performance.now() < deadline) await Bun.sleep(10);
      expect(fdCount()).toBeLessThanOrEqual(base);
    });
  }

  test("a chain the device never uses times out with FrontendError TIMEOUT", async () => {
    const never: Device = { ...echo(), handle: () => new Promise(() => {}) };
    const s = await startDevice(never);
    const drv = await DeviceDriver.connect(s.socket, { timeoutMs: 300 });
    try {
      const e = await drv.submit(0, { writable: 4 }).catch((x) => x);
      expect(e).toBeInstanceOf(FrontendError);
      expect((e as FrontendError).code).toBe("TIMEOUT");
    } finally {
      drv.close();
      // The request stays in flight on the server: stop() waits for it, so do not await here.
      void s.stop();
    }
  });
});

describe("DeviceDriver: what a device author leans on", () => {
  test("a device whose refresh() reports a changed config: CONFIG_CHANGE_MSG counted and recorded, the new config read", async () => {
    let size = 1;
    let seen = 1;
    const dev: Device = {
      ...echo(), config: () => new Uint8Array([size, 0, 0, 0]),
      refresh() { const changed = size !== seen; seen = size; return changed; },
    };
    const s = await startDevice(dev);
    const drv = await DeviceDriver.connect(s);
    try {
      expect(drv.protocolFeatures & bit(ProtocolFeature.BACKEND_REQ)).not.toBe(0n);
      expect(await s.served!.server.refreshDevice()).toBe("unchanged");
      size = 7;
      expect(await s.served!.server.refreshDevice()).toBe("changed");
      await drv.waitConfigChange(2000);
      expect(drv.configChanges).toBe(1);
      expect(drv.backendMessages.map((m) => m.request)).toEqual([BackendReq.CONFIG_CHANGE_MSG]);
      expect((await drv.config(0, 1))[0]).toBe(7);
      // No second message: waiting for one times out.
      const e = await drv.waitConfigChange(50).catch((x) => x);
      expect((e as FrontendError).code).toBe("TIMEOUT");
    } finally {
      drv.close();
      await s.stop();
    }
  });

  test("without the back-end channel (backendChannel: false) the server cannot tell, and says so", async () => {
    let size = 1;
    const dev: Device = { ...echo(), config: () => new Uint8Array([size]), refresh: () => true };
    const s = await startDevice(dev);
    const drv = await DeviceDriver.connect(s, { backendChannel: false });
    try {
      expect(drv.protocolFeatures & bit(ProtocolFeature.BACKEND_REQ)).toBe(0n);
      size = 2;
      expect(await s.served!.server.refreshDevice()).toBe("changed, front-end not told");
      expect(drv.configChanges).toBe(0);
    } finally {
      drv.close();
      await s.stop();
    }
  });

  test("connect(running device): rings default to the device's largest size when it is below 64; a larger one is refused up front", async () => {
    const s = await startDevice({ ...echo(), queueSize: 16 });
    try {
      const drv = await DeviceDriver.connect(s);
      try {
        expect(drv.vqs.map((v) => v.size)).toEqual([16, 16]);
        // The whole ring (8 chains of 2 descriptors) in one batch, three times round.
        for (let i = 0; i < 3; i++) expect((await drv.submitAll(0, Array.from({ length: 8 }, () => ({ readable: new Uint8Array([i]), writable: 1 })))).length).toBe(8);
      } finally {
        drv.close();
      }
      const e = await DeviceDriver.connect(s, { queueSize: 32 }).catch((x) => x);
      expect(e).toBeInstanceOf(RangeError);
      expect((e as Error).message).toBe("queueSize 32: the device takes at most 16");
    } finally {
      await s.stop();
    }
  });

  test("requests and completions awaited together do not steal each other's replies", async () => {
    const s = await startDevice(echo());
    const drv = await DeviceDriver.connect(s);
    try {
      for (let round = 0; round < 20; round++) {
        const [a, c, b, d] = await Promise.all([
          drv.config(0, 4), drv.submit(0, { readable: new Uint8Array([round]), writable: 1 }), drv.config(1, 2),
          drv.submitAll(1, [{ writable: 1 }, { writable: 1 }]),
        ]);
        expect([...a, ...c.data, ...b, d.length]).toEqual([1, 2, 3, 4, round, 2, 3, 2]);
      }
    } finally {
      drv.close();
      await s.stop();
    }
  });

  test("a posted chain settles by itself (await drv.post); buffers are reused, so one held for long pins no RAM", async () => {
    let queues!: Queues;
    const dev: Device = {
      ...echo(), receiveQueues: [1],
      attach(_l, q) { queues = q!; },
      available() {},
    };
    const s = await startDevice(dev);
    const drv = await DeviceDriver.connect(s, { memMiB: 4 });
    try {
      expect((await drv.post(0, { readable: new Uint8Array([5]), writable: 1 })).data[0]).toBe(5);
      const held = drv.post(1, { writable: 8 });
      // 200 × 64 KiB through queue 0 (12.5 MiB) while a buffer stays posted on queue 1, in 4 MiB of RAM.
      const big = new Uint8Array(64 << 10).fill(0x5a);
      for (let i = 0; i < 200; i++) expect((await drv.submit(0, { readable: big, writable: big.length })).len).toBe(big.length);
      const req = queues.take(1)!;
      req.out.writeU32(0xfeed);
      req.complete();
      expect((await held).len).toBe(4);
    } finally {
      drv.close();
      await s.stop();
    }
  });

  test("a chain left posted rejects with DISCONNECTED when the server goes away; submit and config then fail the same way", async () => {
    const dev: Device = { ...echo(), receiveQueues: [1], available() {} };
    const s = await startDevice(dev);
    const drv = await DeviceDriver.connect(s);
    try {
      const posted = drv.post(1, { writable: 4 });
      await s.stop();
      const e = await posted.catch((x) => x);
      expect(e).toBeInstanceOf(FrontendError);
      expect((e as FrontendError).code).toBe("DISCONNECTED");
      expect(((await drv.submit(0, { writable: 1 }).catch((x) => x)) as FrontendError).code).toBe("DISCONNECTED");
      expect(((await drv.config(0, 1).catch((x) => x)) as FrontendError).code).toBe("DISCONNECTED");
    } finally {
      drv.close();
    }
  });

  test("post() refuses what it cannot make: a queue not set up, an empty chain, more descriptors than free; saveState() without DEVICE_STATE", async () => {
    const s = await startDevice({ ...echo(), queueSize: 4 });
    const drv = await DeviceDriver.connect(s, { queues: 1 });
    try {
      expect(drv.queueCount).toBe(1);
      expect(() => drv.post(1, { writable: 1 })).toThrow("post: no queue 1 (1 set up)");
      expect(() => drv.post(0, {})).toThrow("post: a chain needs at least one buffer");
      let e: unknown;
      try { drv.post(0, { writable: [1, 1, 1, 1, 1] }); } catch (x) { e = x; }
      expect((e as FrontendError).code).toBe("QUEUE_FULL");
      expect((await drv.submit(0, { readable: new Uint8Array([9]), writable: [1] })).data[0]).toBe(9);
      // DEVICE_STATE was not asked for.
      expect(((await drv.saveState().catch((x) => x)) as FrontendError).code).toBe("NOT_OFFERED");
    } finally {
      drv.close();
      await s.stop();
    }
  });
});

describe("receive queues: the device takes buffers when it has data", () => {
  test("buffers wait until the device has something; a backlog fills them as they come; stop does not wait for data", async () => {
    let queues!: Queues;
    const backlog: number[] = [];
    const flush = () => {
      let req;
      while (backlog.length > 0 && (req = queues.take(0))) {
        req.out.writeU32(backlog.shift()!);
        req.complete();
      }
    };
    const dev: Device & { push(v: number): void } = {
      name: "events", type: 18, queues: 2, queueSize: 64, features: 0n, config: () => new Uint8Array(0),
      receiveQueues: [0],
      attach(_l, q) { queues = q!; },
      available: () => flush(),
      handle() {},
      push(v) { backlog.push(v); flush(); },
    };
    const s = await startDevice(dev);
    const drv = await DeviceDriver.connect(s.socket);
    try {
      const first = drv.post(0, { writable: 4 });
      const second = drv.post(0, { writable: 4 });
      let settled = false;
      void first.then(() => (settled = true));
      // Nothing to say yet: the buffers stay with the driver's ring, not held by the device.
      for (let i = 0; i < 20; i++) { drv.poll(); await Bun.sleep(2); }
      expect(settled).toBe(false);
      dev.push(7);
      expect(new DataView((await drv.wait(first)).data.buffer).getUint32(0, true)).toBe(7);
      // Three events, one buffer left: one delivered, two wait for buffers.
      dev.push(8); dev.push(9); dev.push(10);
      expect((await drv.wait(second)).data[0]).toBe(8);
      const more = [drv.post(0, { writable: 4 }), drv.post(0, { writable: 4 })];
      expect((await drv.wait(Promise.all(more))).map((c) => c.data[0])).toEqual([9, 10]);
      const last = drv.post(0, { writable: 4 });
      expect(await drv.pollFor(50)).toBe(0);
      // GET_VRING_BASE with a buffer available and no data: answers at once (nothing held)...
      const t0 = performance.now();
      await drv.stop();
      expect(performance.now() - t0).toBeLessThan(1000);
      // ... and the buffer is still the driver's: after a restart the device takes it when it has data.
      await drv.resume();
      dev.push(11);
      expect((await drv.wait(last)).data[0]).toBe(11);
    } finally {
      drv.close();
      await s.stop();
    }
  });
});

describe("a device file served by the CLI (I/O threads), reloaded under load", () => {
  let dir = "";
  const API = JSON.stringify(resolve(import.meta.dir, "../../src/device/api.ts"));
  const source = (version: number, queues = 2) => `import type { Device } from ${API};
let count = 0;
export default (): Device => ({
  name: "versioned", type: 42, queues: ${queues}, queueSize: 128, features: 0n,
  config: () => new Uint8Array([${version}]),
  handle(req) { count++; req.out.writeU8(${version}); req.out.writeU32(count); },
  saveState: () => new Uint8Array(new Uint32Array([count]).buffer),
  loadState(b) { count = new Uint32Array(b.slice(0, 4).buffer)[0]!; },
});
`;
  beforeAll(() => { dir = mkdtempSync("/tmp/bunvhost-kit-"); });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test("reloads through the control socket while 2 queues on 2 threads are busy: no request lost, counters carried over, config change announced, a bad version refused", async () => {
    const file = join(dir, "versioned.ts");
    writeFileSync(file, source(1));
    const ctl = join(dir, "ctl.sock");
    const s = await startDevice(file, { threads: 2, args: ["--control", ctl] });
    const drv = await DeviceDriver.connect(s.socket, { packed: true });
    const control = async (cmd: string) => {
      const sock = await Bun.connect({ unix: ctl, socket: { data(_s, d) { got += d.toString(); } } });
      let got = "";
      sock.write(cmd + "\n");
      while (!got.includes("\n")) await Bun.sleep(5);
      sock.end();
      return got.trim();
    };
    try {
      const seen: number[][] = [[], []];
      let reloads = 0;
      const pauses: string[] = [];
      for (let round = 0; round < 30; round++) {
        const batch = [0, 1].flatMap((q) => Array.from({ length: 8 }, () => drv.post(q, { writable: 5 }).then((c) => [q, c] as const)));
        if (round % 10 === 5) {
          writeFileSync(file, source(round));
          const r = await control("reload");
          expect(r).toMatch(/^ok paused [\d.]+ ms, config changed$/);
          pauses.push(r);
          reloads++;
        }
        for (const [q, c] of await drv.wait(Promise.all(batch), 10_000)) {
          expect(c.len).toBe(5);
          seen[q]!.push(new DataView(c.data.buffer).getUint32(1, true));
        }
      }
      // Each queue's thread counts its own requests: 1..240 without a gap across 3 reloads.
      for (const s of seen) expect(s.sort((a, b) => a - b)).toEqual(Array.from({ length: 240 }, (_, i) => i + 1));
      expect(reloads).toBe(3);
      await drv.waitConfigChange(2000).catch(() => {});
      expect(drv.configChanges).toBeGreaterThanOrEqual(1);
      expect((await drv.config(0, 1))[0]).toBe(25);
      // Another queue count: refused, the running code keeps serving.
      writeFileSync(file, source(99, 3));
      expect(await control("reload")).toContain("3 queues differ from the running device's 2");
      expect((await drv.submit(0, { writable: 5 })).data[0]).toBe(25);
      console.log(`testing_driver.test.ts: reloads under load: ${pauses.join("; ")}`);
    } finally {
      drv.close();
      await s.stop();
    }
    expect(s.log()).toMatch(/front-end connected \(connection 1\)/);
    expect(s.log()).not.toMatch(/connection 2|broken/);
  });

  test("DeviceDriver.saveState/loadState: a state loaded reaches the instance of every I/O thread, not only the main thread's; a bad one is refused", async () => {
    const file = join(dir, "stateful.ts");
    writeFileSync(file, `import type { Device } from ${API};
let state = 0;
export default (): Device => ({
  name: "stateful", type: 42, queues: 2, queueSize: 64, features: 0n, config: () => new Uint8Array(0),
  handle(req) { req.out.writeU8(state); },
  saveState: () => new Uint8Array([state]),
  loadState(b) { if (b.length !== 1) throw new Error("state is 1 byte"); state = b[0]!; },
});
`);
    const s = await startDevice(file, { threads: 2 });
    const drv = await DeviceDriver.connect(s.socket, { protocolFeatures: bit(ProtocolFeature.DEVICE_STATE) });
    try {
      expect((await drv.submit(0, { writable: 1 })).data[0]).toBe(0);
      await drv.stop();
      expect(await drv.saveState()).toEqual(new Uint8Array([0]));
      expect(await drv.loadState(new Uint8Array([1, 2]))).toBe(1);
      expect(await drv.loadState(new Uint8Array([42]))).toBe(0);
      await drv.resume();
      // Queue 0 is served by io0, queue 1 by io1: both instances took the state.
      expect((await drv.submit(0, { writable: 1 })).data[0]).toBe(42);
      expect((await drv.submit(1, { writable: 1 })).data[0]).toBe(42);
    } finally {
      drv.close();
      await s.stop();
    }
    expect(s.log()).toMatch(/device state load: 1 bytes, checked/);
  });

  test("setFeatures() reaches the instance of every I/O thread", async () => {
    const file = join(dir, "features.ts");
    writeFileSync(file, `import type { Device } from ${API};
let negotiated = 0n;
export default (): Device => ({
  name: "features", type: 42, queues: 2, queueSize: 64, features: (1n << 3n) | (1n << 5n), config: () => new Uint8Array(0),
  setFeatures(f) { negotiated = f; },
  handle(req) { req.out.writeU8(Number(negotiated & 0xffn)); },
});
`);
    const s = await startDevice(file, { threads: 2 });
    const drv = await DeviceDriver.connect(s.socket, { features: 1n << 5n });
    try {
      // Queue 0 on io0, queue 1 on io1: both saw bit 5 accepted and bit 3 declined.
      for (const q of [0, 1]) expect((await drv.submit(q, { writable: 1 })).data[0]).toBe(1 << 5);
    } finally {
      drv.close();
      await s.stop();
    }
  });

  test("--watch: a device file that disappears keeps the running device serving", async () => {
    const file = join(dir, "vanishing.ts");
    writeFileSync(file, source(5));
    const s = await startDevice(file, { args: ["--watch"] });
    const drv = await DeviceDriver.connect(s.socket);
    try {
      expect((await drv.submit(0, { writable: 5 })).data[0]).toBe(5);
      unlinkSync(file);
      const deadline = Date.now() + 5000;
      while (!/is gone: keeping the running device/.test(s.log()) && Date.now() < deadline) await Bun.sleep(20);
      expect(s.log()).toContain(`--watch: ${file} is gone: keeping the running device`);
      expect((await drv.submit(1, { writable: 5 })).data[0]).toBe(5);
      // It comes back (an editor's rename): reloaded.
      writeFileSync(file, source(6));
      while (!/reloaded /.test(s.log()) && Date.now() < deadline + 5000) await Bun.sleep(20);
      expect((await drv.submit(0, { writable: 5 })).data[0]).toBe(6);
    } finally {
      drv.close();
      await s.stop();
    }
  });
});

describe('startDevice("blk"): a built-in device through the CLI', () => {
  test("options become command-line flags; a sector written, read back and the serial read over 2 queues; stop reaps the child", async () => {
    const s = await startDevice("blk", { options: { size: "1M", queues: 2, serial: "kit-test" }, threads: 1 });
    const drv = await DeviceDriver.connect(s, { packed: true });
    const header = (type: number, sector: number) => {
      const b = new Uint8Array(16);
      new DataView(b.buffer).setUint32(0, type, true);
      new DataView(b.buffer).setUint32(8, sector, true);
      return b;
    };
    try {
      expect(drv.queueCount).toBe(2);
      // virtio_blk_config.capacity: 1 MiB in 512-byte sectors.
      expect(new DataView((await drv.config(0, 8)).buffer).getUint32(0, true)).toBe(2048);
      const data = new Uint8Array(512).map((_, i) => i * 7);
      const w = await drv.submit(1, { readable: [header(1, 3), data], writable: 1 });
      expect([w.len, ...w.data]).toEqual([1, 0]);
      const r = await drv.submit(0, { readable: header(0, 3), writable: [512, 1] });
      expect(r.len).toBe(513);
      expect(r.data.subarray(0, 512)).toEqual(data);
      expect(r.data[512]).toBe(0);
      const id = await drv.submit(0, { readable: header(8, 0), writable: [20, 1] });
      expect(new TextDecoder().decode(id.data.subarray(0, 8))).toBe("kit-test");
      // Past the end: VIRTIO_BLK_S_IOERR, the connection lives on.
      const past = await drv.submit(0, { readable: header(0, 2048), writable: [512, 1] });
      expect([past.len, past.data[512]]).toEqual([513, 1]);
    } finally {
      drv.close();
      await s.stop();
    }
    expect(s.served).toBeNull();
    expect(s.log()).toMatch(/listening on/);
    expect(s.log()).toMatch(/SIGTERM: stopping/);
  });
});

describe("a device whose callbacks throw never takes the server down", () => {
  test("handle() throws: the request completes (used length 0), logged; setConfig() throws: NACK, connection kept; config() throws: that connection ends, the next front-end is served", async () => {
    let failConfig = false;
    const dev: Device = {
      name: "faulty", type: 42, queues: 1, queueSize: 64, features: 0n,
      config: () => { if (failConfig) throw new Error("config broke"); return new Uint8Array(4); },
      setConfig() { throw new Error("read-only today"); },
      handle(req) { if (req.in.remaining > 0) throw new Error("handle broke"); req.out.writeU8(1); },
    };
    const s = await startDevice(dev);
    try {
      const drv = await DeviceDriver.connect(s.socket);
      expect((await drv.submit(0, { readable: new Uint8Array(1), writable: 1 })).len).toBe(0);
      expect((await drv.submit(0, { writable: 1 })).len).toBe(1);
      const nack = (await drv.setConfig(0, new Uint8Array([1])).catch((e) => e)) as FrontendError;
      expect(nack.code).toBe("NACK");
      expect((await drv.config(0, 4)).length).toBe(4);
      failConfig = true;
      expect(((await drv.config(0, 4).catch((e) => e)) as FrontendError).code).toMatch(/DISCONNECTED|TIMEOUT/);
      drv.close();
      failConfig = false;
      const again = await DeviceDriver.connect(s.socket);
      expect((await again.submit(0, { writable: 1 })).len).toBe(1);
      again.close();
      const log = s.log();
      expect(log).toContain("device faulty failed on request");
      expect(log).toContain("SET_CONFIG refused: device faulty: setConfig() threw: read-only today");
      expect(log).toContain("device error, ending the connection: device faulty: config() threw: config broke");
    } finally {
      await s.stop();
    }
  });
});

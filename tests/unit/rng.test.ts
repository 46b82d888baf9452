/**
 * virtio-rng (src/devices/rng.ts) through the test kit: the device object
 * served in this process and driven over split and packed rings, with
 * chains of writable (and hostile: readable-only, mixed, oversized) buffers,
 * checking the used lengths and bytes; then the built-in name served by the
 * CLI in a child process, as a user runs it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import rng from "../../src/devices/rng.ts";
import { DeviceDriver, startDevice, type RunningDevice } from "../../src/testing/index.ts";

const distinct = (b: Uint8Array) => new Set(b).size;

test("rng is VIRTIO id 4 with one queue, no features, no config space", () => {
  expect([rng.type, rng.queues, rng.features, rng.config().length]).toEqual([4, 1, 0n, 0]);
});

for (const packed of [false, true]) {
  describe(`rng device in-process, ${packed ? "packed" : "split"} ring`, () => {
    let dev: RunningDevice;
    let drv: DeviceDriver;
    beforeAll(async () => {
      dev = await startDevice(rng);
      drv = await DeviceDriver.connect(dev.socket, { packed, queueSize: 16 });
    });
    afterAll(async () => {
      drv?.close();
      await dev?.stop();
    });

    test("rng.handle() fills a 4 KiB writable buffer whole with random bytes", async () => {
      const c = await drv.submit(0, { writable: 4096 });
      expect(c.len).toBe(4096);
      expect(distinct(c.data)).toBeGreaterThan(200); // 4096 random bytes take all 256 values, or nearly
    });

    test("rng.handle() fills every writable buffer of a chain (3 × 10 bytes: used length 30)", async () => {
      const c = await drv.submit(0, { writable: [10, 10, 10] });
      expect(c.len).toBe(30);
      expect(distinct(c.data)).toBeGreaterThan(10);
    });

    test("two requests get different bytes", async () => {
      const [a, b] = await drv.submitAll(0, [{ writable: 32 }, { writable: 32 }]);
      expect(Buffer.compare(a!.data, b!.data)).not.toBe(0);
    });

    test("hostile: a chain with only a readable buffer is completed with used length 0", async () => {
      const c = await drv.submit(0, { readable: new Uint8Array(64).fill(7) });
      expect(c.len).toBe(0);
    });

    test("hostile: readable bytes before the writable buffer are ignored; the writable one is filled", async () => {
      const c = await drv.submit(0, { readable: new Uint8Array(16), writable: 16 });
      expect(c.len).toBe(16);
    });

    test("a 1 MiB writable buffer gets at most 64 KiB per request (§5.4.6.1: the device may use less)", async () => {
      const c = await drv.submit(0, { writable: 1 << 20 });
      expect(c.len).toBe(65536);
      expect(distinct(c.data)).toBe(256);
    });

    test("the queue keeps working after the hostile chains (more chains than the ring holds), and the server logged no error", async () => {
      for (let round = 0; round < 3; round++) {
        const cs = await drv.submitAll(0, Array.from({ length: 8 }, () => ({ writable: 64 })));
        expect(cs.map((c) => c.len)).toEqual(Array(8).fill(64));
      }
      expect(dev.log()).not.toMatch(/bunvhost: error|broken/);
    });
  });
}

test("startDevice(\"rng\"): the CLI serves the built-in device; a round trip, and no error logged", async () => {
  const dev = await startDevice("rng");
  const drv = await DeviceDriver.connect(dev.socket);
  try {
    expect(drv.queueCount).toBe(1);
    const c = await drv.submit(0, { writable: 4096 });
    expect(c.len).toBe(4096);
    expect(distinct(c.data)).toBeGreaterThan(200);
  } finally {
    drv.close();
    await dev.stop();
  }
  expect(dev.log()).toMatch(/listening on/);
  expect(dev.log()).not.toMatch(/bunvhost: error|broken/);
});

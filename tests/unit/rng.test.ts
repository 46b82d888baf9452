/**
 * virtio-rng (src/devices/rng.ts) through a vhost-user driver: the CLI
 * serves the built-in device in a child process; the test posts chains of
 * writable (and hostile: readable-only, mixed, oversized) buffers and checks
 * the used lengths and bytes.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import rng from "../../src/devices/rng.ts";
import { serveDevice, type ServedDevice } from "../support/guest.ts";
import { VhostHarness } from "../support/vhost_harness.ts";

const distinct = (b: Uint8Array) => new Set(b).size;

describe("rng device", () => {
  let server: ServedDevice;
  let h: VhostHarness;
  beforeAll(async () => {
    server = await serveDevice("rng");
    h = VhostHarness.connect(server.socket, { queues: 1, size: 16 });
  });
  afterAll(async () => {
    h?.close();
    await server?.stop();
  });

  test("rng is VIRTIO id 4 with one queue, no features, no config space", () => {
    expect([rng.type, rng.queues, rng.features, rng.config().length]).toEqual([4, 1, 0n, 0]);
  });

  test("rng.handle() fills a 4 KiB writable buffer whole with random bytes", () => {
    h.post(0, { writable: [4096] });
    const [c] = h.completions(0, 1);
    expect(c!.len).toBe(4096);
    expect(distinct(c!.data)).toBeGreaterThan(200); // 4096 random bytes take all 256 values, or nearly
  });

  test("rng.handle() fills every writable buffer of a chain (3 × 10 bytes: used length 30)", () => {
    h.post(0, { writable: [10, 10, 10] });
    const [c] = h.completions(0, 1);
    expect(c!.len).toBe(30);
    expect(distinct(c!.data)).toBeGreaterThan(10);
  });

  test("two requests get different bytes", () => {
    h.post(0, { writable: [32] });
    h.post(0, { writable: [32] });
    const [a, b] = h.completions(0, 2);
    expect(Buffer.compare(a!.data, b!.data)).not.toBe(0);
  });

  test("hostile: a chain with only a readable buffer is completed with used length 0", () => {
    h.post(0, { readable: [new Uint8Array(64).fill(7)] });
    const [c] = h.completions(0, 1);
    expect(c!.len).toBe(0);
  });

  test("hostile: readable bytes before the writable buffer are ignored; the writable one is filled", () => {
    h.post(0, { readable: [new Uint8Array(16)], writable: [16] });
    const [c] = h.completions(0, 1);
    expect(c!.len).toBe(16);
  });

  test("a 1 MiB writable buffer gets at most 64 KiB per request (§5.4.6.1: the device may use less)", () => {
    h.post(0, { writable: [1 << 20] });
    const [c] = h.completions(0, 1);
    expect(c!.len).toBe(65536);
    expect(distinct(c!.data)).toBe(256);
  });

  test("the queue keeps working after the hostile chains, and the server logged no error", () => {
    for (let i = 0; i < 8; i++) h.post(0, { writable: [64] });
    const cs = h.completions(0, 8);
    expect(cs.map((c) => c.len)).toEqual(Array(8).fill(64));
    expect(server.output()).not.toMatch(/bunvhost: error|broken/);
  });
});

/**
 * examples/gpio.ts (virtio-gpio, VIRTIO 1.2 §5.17) through the test kit
 * only: startDevice() serves it in this process (the module's prepare() and
 * factory) or through the CLI (`server.ts examples/gpio.ts`, one I/O
 * thread), and DeviceDriver drives it over real vhost-user on split and
 * packed rings. Every request type, the config space, hostile requests
 * (short, long, split, unknown, out of range, no room for a response), the
 * eventq without VIRTIO_GPIO_F_IRQ, and the line state saved on one server
 * and loaded on another through DEVICE_STATE. No guest: the Debian 6.1
 * kernel here has no CONFIG_GPIO_VIRTIO.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import create, { prepare } from "../../examples/gpio.ts";
import { DeviceDriver, startDevice, type RunningDevice } from "../../src/testing/index.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";

const GET_NAMES = 1, GET_DIRECTION = 2, SET_DIRECTION = 3, GET_VALUE = 4, SET_VALUE = 5, SET_IRQ_TYPE = 6;
const OK = 0, ERR = 1;
const NONE = 0, OUT = 1, IN = 2;
const IRQ_TYPE_EDGE_RISING = 1, IRQ_STATUS_INVALID = 0;
const VIRTIO_GPIO_F_IRQ = 1n << 0n;

/** struct virtio_gpio_request */
function msg(type: number, gpio: number, value = 0): Uint8Array {
  const b = new Uint8Array(8);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, type, true);
  dv.setUint16(2, gpio, true);
  dv.setUint32(4, value, true);
  return b;
}

/** One request with a 2-byte response buffer: [status, value]. */
async function call(drv: DeviceDriver, type: number, gpio: number, value = 0): Promise<number[]> {
  const c = await drv.submit(0, { readable: msg(type, gpio, value), writable: 2 });
  expect(c.len).toBe(2);
  return [...c.data];
}

describe("gpio served in-process (prepare + factory)", () => {
  for (const packed of [false, true]) {
    test(`every message type on ${packed ? "packed" : "split"} rings: names, directions, values, IRQ refused`, async () => {
      const dev = await startDevice(create(prepare({ lines: 6, names: "LED,,BUTTON", levels: "0x6" })));
      const drv = await DeviceDriver.connect(dev.socket, { packed, queueSize: packed ? 32 : 64 });
      try {
        expect(drv.queueCount).toBe(2);
        expect(drv.offered & VIRTIO_GPIO_F_IRQ).toBe(0n);
        // struct virtio_gpio_config: ngpio 6, padding, gpio_names_size = "LED\0" "\0" "BUTTON\0" "\0\0\0" = 15.
        expect([...(await drv.config(0, 8))]).toEqual([6, 0, 0, 0, 15, 0, 0, 0]);

        const names = await drv.submit(0, { readable: msg(GET_NAMES, 0), writable: 1 + 15 });
        expect(names.len).toBe(16);
        expect(names.data[0]).toBe(OK);
        expect(new TextDecoder().decode(names.data.subarray(1)).split("\0")).toEqual(["LED", "", "BUTTON", "", "", "", ""]);

        expect(await call(drv, GET_DIRECTION, 0)).toEqual([OK, NONE]);
        expect(await call(drv, GET_VALUE, 0)).toEqual([ERR, 0]); // inactive: nothing sensed
        // As Linux's direction_output(): the value first, then the direction.
        expect(await call(drv, SET_VALUE, 0, 1)).toEqual([OK, 0]);
        expect(await call(drv, SET_DIRECTION, 0, OUT)).toEqual([OK, 0]);
        expect(await call(drv, GET_DIRECTION, 0)).toEqual([OK, OUT]);
        expect(await call(drv, GET_VALUE, 0)).toEqual([OK, 1]);
        expect(await call(drv, SET_VALUE, 0, 0)).toEqual([OK, 0]);
        expect(await call(drv, GET_VALUE, 0)).toEqual([OK, 0]);

        // Inputs sense --levels 0x6: lines 1 and 2 high, 3 low, whatever the output value.
        for (const [line, level] of [[1, 1], [2, 1], [3, 0]] as const) {
          expect(await call(drv, SET_VALUE, line, 1 - level)).toEqual([OK, 0]);
          expect(await call(drv, SET_DIRECTION, line, IN)).toEqual([OK, 0]);
          expect(await call(drv, GET_DIRECTION, line)).toEqual([OK, IN]);
          expect(await call(drv, GET_VALUE, line)).toEqual([OK, level]);
        }

        // Direction none discards the line's state: back to output, the value is low again.
        expect(await call(drv, SET_VALUE, 5, 1)).toEqual([OK, 0]);
        expect(await call(drv, SET_DIRECTION, 5, NONE)).toEqual([OK, 0]);
        expect(await call(drv, GET_DIRECTION, 5)).toEqual([OK, NONE]);
        expect(await call(drv, SET_DIRECTION, 5, OUT)).toEqual([OK, 0]);
        expect(await call(drv, GET_VALUE, 5)).toEqual([OK, 0]);

        // VIRTIO_GPIO_F_IRQ is not offered: SET_IRQ_TYPE is refused, and an eventq buffer comes back INVALID at once.
        expect(await call(drv, SET_IRQ_TYPE, 1, IRQ_TYPE_EDGE_RISING)).toEqual([ERR, 0]);
        const irq = await drv.submit(1, { readable: new Uint8Array([1, 0]), writable: 1 });
        expect([irq.len, irq.data[0]]).toEqual([1, IRQ_STATUS_INVALID]);

        // Several requests in one batch (different lines, as Linux sends them in parallel).
        const batch = await drv.submitAll(0, [0, 1, 2, 3, 4, 5].map((g) => ({ readable: msg(GET_DIRECTION, g), writable: 2 })));
        expect(batch.map((c) => c.data[1])).toEqual([OUT, IN, IN, IN, NONE, OUT]);
      } finally {
        drv.close();
        await dev.stop();
      }
      expect(dev.log()).not.toMatch(/error|broken/);
    });
  }

  test("hostile requests get status ERR or a short completion, and the device keeps serving", async () => {
    const dev = await startDevice(create(prepare({ lines: 4, names: "A,B" })));
    const drv = await DeviceDriver.connect(dev.socket);
    try {
      const bad = async (chain: { readable?: Uint8Array | Uint8Array[]; writable?: number | number[] }) => {
        const c = await drv.submit(0, chain);
        return [c.len, ...c.data];
      };
      // Wrong request sizes: short, long, none at all.
      expect(await bad({ readable: msg(GET_DIRECTION, 0).subarray(0, 4), writable: 2 })).toEqual([2, ERR, 0]);
      expect(await bad({ readable: new Uint8Array(12), writable: 2 })).toEqual([2, ERR, 0]);
      expect(await bad({ writable: 2 })).toEqual([2, ERR, 0]);
      // A request split across two buffers is still one request.
      const m = msg(SET_VALUE, 1, 1);
      expect(await bad({ readable: [m.subarray(0, 3), m.subarray(3)], writable: [1, 1] })).toEqual([2, OK, 0]);
      // No room for the response: completed with nothing written.
      expect(await bad({ readable: msg(GET_DIRECTION, 0), writable: 1 })).toEqual([0]);
      expect(await bad({ readable: msg(GET_DIRECTION, 0) })).toEqual([0]);
      // Unknown types, lines past ngpio, values out of range.
      for (const t of [0, 7, 0x100, 0xffff]) expect(await call(drv, t, 0)).toEqual([ERR, 0]);
      for (const g of [4, 5, 0xffff]) {
        for (const t of [GET_DIRECTION, SET_DIRECTION, GET_VALUE, SET_VALUE]) expect(await call(drv, t, g, 0)).toEqual([ERR, 0]);
      }
      for (const v of [3, 0x80000000, 0xffffffff]) expect(await call(drv, SET_DIRECTION, 0, v)).toEqual([ERR, 0]);
      for (const v of [2, 0xffffffff]) expect(await call(drv, SET_VALUE, 0, v)).toEqual([ERR, 0]);
      // GET_NAMES with a buffer shorter than 1 + gpio_names_size ("A\0B\0\0\0" = 6).
      expect(await bad({ readable: msg(GET_NAMES, 0), writable: 6 })).toEqual([2, ERR, 0]);
      expect((await bad({ readable: msg(GET_NAMES, 0), writable: 64 }))[0]).toBe(7);
      // The eventq without the feature: a buffer too small for the status comes back empty.
      expect((await drv.submit(1, { readable: new Uint8Array(2) })).len).toBe(0);
      expect((await drv.submit(1, { readable: new Uint8Array(2), writable: 1 })).len).toBe(1);
      // Still serving, state intact: line 1's value was set by the split request.
      expect(await call(drv, SET_DIRECTION, 1, OUT)).toEqual([OK, 0]);
      expect(await call(drv, GET_VALUE, 1)).toEqual([OK, 1]);
    } finally {
      drv.close();
      await dev.stop();
    }
    expect(dev.log()).not.toMatch(/error|broken/);
  });

  test("without --names, gpio_names_size is 0 and GET_NAMES answers ERR", async () => {
    const dev = await startDevice(create(prepare({})));
    const drv = await DeviceDriver.connect(dev.socket, { packed: true });
    try {
      expect([...(await drv.config(0, 8))]).toEqual([8, 0, 0, 0, 0, 0, 0, 0]);
      expect(await call(drv, GET_NAMES, 0)).toEqual([ERR, 0]);
      expect(await call(drv, GET_DIRECTION, 7)).toEqual([OK, NONE]);
      expect(await call(drv, GET_DIRECTION, 8)).toEqual([ERR, 0]);
    } finally {
      drv.close();
      await dev.stop();
    }
  });
});

describe("gpio through the CLI (server.ts examples/gpio.ts, one I/O thread)", () => {
  const DS = bit(ProtocolFeature.DEVICE_STATE);
  let cli: RunningDevice;
  beforeAll(async () => {
    cli = await startDevice("examples/gpio.ts", { options: { lines: 5, names: "RESET,,,STATUS", levels: "0x10" } });
  });
  afterAll(() => cli?.stop());

  test("options from the command line; line state saved there (DEVICE_STATE) and loaded into another server", async () => {
    const drv = await DeviceDriver.connect(cli.socket, { packed: true, protocolFeatures: DS });
    let state: Uint8Array;
    try {
      expect([...(await drv.config(0, 8))]).toEqual([5, 0, 0, 0, 16, 0, 0, 0]);
      const names = await drv.submit(0, { readable: msg(GET_NAMES, 0), writable: 17 });
      expect(new TextDecoder().decode(names.data.subarray(1))).toBe("RESET\0\0\0STATUS\0\0");
      expect(await call(drv, SET_VALUE, 0, 1)).toEqual([OK, 0]);
      expect(await call(drv, SET_DIRECTION, 0, OUT)).toEqual([OK, 0]);
      expect(await call(drv, SET_DIRECTION, 4, IN)).toEqual([OK, 0]);
      expect(await call(drv, GET_VALUE, 4)).toEqual([OK, 1]); // --levels 0x10
      expect(await call(drv, SET_VALUE, 2, 1)).toEqual([OK, 0]); // latched, line still inactive
      await drv.stop();
      // Saved by the main thread's instance while io0 served the requestq: the lines are shared.
      state = await drv.saveState();
      expect([...state]).toEqual([1, 5, 0, OUT | 4, 0, 4, 0, IN]);
    } finally {
      drv.close();
    }

    // Another server (in-process, another levels mask): takes the state; levels stay its own.
    const other = await startDevice(create(prepare({ lines: 5 })));
    const d2 = await DeviceDriver.connect(other.socket, { protocolFeatures: DS });
    try {
      await d2.stop();
      expect(await d2.loadState(state)).toBe(0);
      await d2.resume();
      expect(await call(d2, GET_DIRECTION, 0)).toEqual([OK, OUT]);
      expect(await call(d2, GET_VALUE, 0)).toEqual([OK, 1]);
      expect(await call(d2, GET_VALUE, 4)).toEqual([OK, 0]); // its own levels: all low
      expect(await call(d2, GET_DIRECTION, 2)).toEqual([OK, NONE]);
      expect(await call(d2, SET_DIRECTION, 2, OUT)).toEqual([OK, 0]);
      expect(await call(d2, GET_VALUE, 2)).toEqual([OK, 1]); // the latched value came along
    } finally {
      d2.close();
      await other.stop();
    }
    expect(other.log()).toMatch(/device state load: 8 bytes, checked/);
  });

  test("a state of another version, line count or content is refused (CHECK_DEVICE_STATE 1) and the device keeps serving", async () => {
    const drv = await DeviceDriver.connect(cli.socket, { protocolFeatures: DS });
    try {
      await drv.stop();
      expect(await drv.loadState(new Uint8Array([2, 5, 0, 0, 0, 0, 0, 0]))).toBe(1); // version 2
      expect(await drv.loadState(new Uint8Array([1, 4, 0, 0, 0, 0, 0]))).toBe(1); // 4 lines, the device has 5
      expect(await drv.loadState(new Uint8Array([1, 5, 0, 0, 0, 0]))).toBe(1); // truncated
      expect(await drv.loadState(new Uint8Array([1, 5, 0, 3, 0, 0, 0, 0]))).toBe(1); // direction 3
      expect(await drv.loadState(new Uint8Array([1, 5, 0, 0x80, 0, 0, 0, 0]))).toBe(1); // unknown bit
      expect(await drv.loadState(new Uint8Array(0))).toBe(1);
      expect(await drv.loadState(new Uint8Array([1, 5, 0, IN, IN, IN, IN, IN]))).toBe(0);
      await drv.resume();
      expect(await call(drv, GET_DIRECTION, 3)).toEqual([OK, IN]);
      expect(await call(drv, GET_VALUE, 4)).toEqual([OK, 1]);
    } finally {
      drv.close();
    }
    expect(cli.log()).toMatch(/device state load failed: .*version 2/);
    expect(cli.log()).toMatch(/this device has 5 lines/);
    expect(cli.log()).not.toMatch(/broken|uncaught|internal error/);
  });

  test("bad options exit with the option named", async () => {
    const e = await startDevice("examples/gpio.ts", { options: { lines: 2, names: "A,B,C" } }).catch((x: Error) => x);
    expect(e).toBeInstanceOf(Error);
    expect((e as Error).message).toMatch(/exited with status 2[\s\S]*--names: 3 names for 2 lines/);
  });
});

/**
 * virtio-input (src/devices/input.ts) through a vhost-user driver: the CLI
 * serves the built-in device in a child process (a keyboard with an events
 * socket and a serial, and a tablet); the test reads its config space with
 * select/subsel, posts event buffers on queue 0, injects events through the
 * events socket and checks them in the completions, and sends LED state on
 * the status queue. Hostile input: malformed and oversized event lines,
 * buffers too small for an event, status chains too short.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { scratchDir } from "../support/backends.ts";
import { serveDevice, type ServedDevice } from "../support/guest.ts";
import { VhostHarness, type Completion } from "../support/vhost_harness.ts";

const CFG_ID_NAME = 0x01, CFG_ID_SERIAL = 0x02, CFG_ID_DEVIDS = 0x03, CFG_PROP_BITS = 0x10, CFG_EV_BITS = 0x11, CFG_ABS_INFO = 0x12;
const EV_SYN = 0, EV_KEY = 1, EV_REL = 2, EV_ABS = 3, EV_LED = 0x11, EV_REP = 0x14;

/** Writes select/subsel (as a driver's two config writes) and returns the answer (size bytes of the union). */
function query(h: VhostHarness, select: number, subsel: number): Uint8Array {
  h.fe.setConfig(0, Uint8Array.of(select));
  h.fe.setConfig(1, Uint8Array.of(subsel));
  const c = h.fe.getConfig(0, 136);
  expect([c[0], c[1]]).toEqual([select, subsel]);
  return c.slice(8, 8 + c[2]!);
}

const bits = (b: Uint8Array) => [...b].flatMap((byte, i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((k) => byte & (1 << k)).map((k) => i * 8 + k));
const decode = (c: Completion): [number, number, number] => {
  const dv = new DataView(c.data.buffer, c.data.byteOffset, c.data.length);
  return [dv.getUint16(0, true), dv.getUint16(2, true), dv.getInt32(4, true)];
};
const led = (code: number, value: number) => {
  const b = new Uint8Array(8);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, EV_LED, true);
  dv.setUint16(2, code, true);
  dv.setUint32(4, value, true);
  return b;
};

/** Sends `text` to a unix socket and closes it. */
async function send(path: string, text: string): Promise<void> {
  await new Promise<void>((res, rej) => {
    Bun.connect({ unix: path, socket: { open: (s) => void s.end(text), close: () => res(), error: (_s, e) => rej(e), data() {} } }).catch(rej);
  });
}

describe("input device", () => {
  const dir = scratchDir("bunvhost-input-unit-");
  const events = join(dir, "kbd.events");
  let kbd: ServedDevice, tablet: ServedDevice;
  let k: VhostHarness, t: VhostHarness;

  beforeAll(async () => {
    kbd = await serveDevice("input", ["--kind", "keyboard", "--events", events, "--serial", "SN-42"]);
    tablet = await serveDevice("input", ["--kind", "tablet", "--name", "pen"]);
    k = VhostHarness.connect(kbd.socket, { queues: 2, size: 16 });
    t = VhostHarness.connect(tablet.socket, { queues: 2, size: 16 });
  });
  afterAll(async () => {
    k?.close();
    t?.close();
    await kbd?.stop();
    await tablet?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  describe("config space (select/subsel)", () => {
    test("ID_NAME, ID_SERIAL and ID_DEVIDS (BUS_VIRTUAL, product 1 for a keyboard)", () => {
      expect(new TextDecoder().decode(query(k, CFG_ID_NAME, 0))).toBe("bunvhost keyboard");
      expect(new TextDecoder().decode(query(k, CFG_ID_SERIAL, 0))).toBe("SN-42");
      expect([...query(k, CFG_ID_DEVIDS, 0)]).toEqual([6, 0, 0, 0, 1, 0, 1, 0]);
      expect(new TextDecoder().decode(query(t, CFG_ID_NAME, 0))).toBe("pen");
      expect(query(t, CFG_ID_SERIAL, 0).length).toBe(0); // no --serial: size 0
    });

    test("EV_BITS by event type: keyboard keys 1..248, LEDs 0..2, autorepeat; no REL", () => {
      expect(bits(query(k, CFG_EV_BITS, EV_KEY))).toEqual(Array.from({ length: 248 }, (_, i) => i + 1));
      expect(bits(query(k, CFG_EV_BITS, EV_LED))).toEqual([0, 1, 2]);
      expect(query(k, CFG_EV_BITS, EV_REP).length).toBe(1); // size ≠ 0 is what turns EV_REP on
      expect(query(k, CFG_EV_BITS, EV_REL).length).toBe(0);
      expect(query(k, CFG_EV_BITS, EV_ABS).length).toBe(0);
    });

    test("tablet: buttons, wheel, ABS_X/ABS_Y with ABS_INFO 0..32767; no info for other axes", () => {
      expect(bits(query(t, CFG_EV_BITS, EV_KEY))).toEqual([0x110, 0x111, 0x112]);
      expect(bits(query(t, CFG_EV_BITS, EV_REL))).toEqual([8]);
      expect(bits(query(t, CFG_EV_BITS, EV_ABS))).toEqual([0, 1]);
      for (const axis of [0, 1]) {
        const a = query(t, CFG_ABS_INFO, axis);
        const dv = new DataView(a.buffer, a.byteOffset, a.length);
        expect(a.length).toBe(20);
        expect([0, 4, 8, 12, 16].map((o) => dv.getUint32(o, true))).toEqual([0, 32767, 0, 0, 0]);
      }
      expect(query(t, CFG_ABS_INFO, 2).length).toBe(0);
    });

    test("unknown selects, PROP_BITS (none), UNSET and ID_NAME with a non-zero subsel answer size 0 (§5.8.5.1)", () => {
      for (const [sel, sub] of [[CFG_PROP_BITS, 0], [0x7f, 0], [0, 0], [CFG_ID_NAME, 9]]) expect(query(k, sel!, sub!).length).toBe(0);
      query(k, 0x7f, 0);
      expect(k.fe.getConfig(0, 136).subarray(2).every((b) => b === 0)).toBe(true);
    });

    test("a whole-config write (as QEMU sends) takes only select and subsel", () => {
      const garbage = new Uint8Array(136).fill(0xee);
      garbage[0] = CFG_EV_BITS;
      garbage[1] = EV_LED;
      k.fe.setConfig(0, garbage);
      const c = k.fe.getConfig(0, 136);
      expect([c[0], c[1], c[2], c[8], c[9]]).toEqual([CFG_EV_BITS, EV_LED, 1, 0x07, 0]);
    });
  });

  describe("event queue (receive queue 0)", () => {
    test("a key press and release sent as JSON lines arrive in the driver's buffers, each followed by SYN_REPORT", async () => {
      for (let i = 0; i < 8; i++) k.post(0, { writable: [8] });
      await send(events, '{"type":"key","code":30,"value":1}\n{"type":1,"code":30,"value":0}\n');
      const cs = k.completions(0, 4);
      expect(cs.map((c) => c.len)).toEqual([8, 8, 8, 8]);
      expect(cs.map(decode)).toEqual([[EV_KEY, 30, 1], [EV_SYN, 0, 0], [EV_KEY, 30, 0], [EV_SYN, 0, 0]]);
      expect(k.completions(0, 1, 200)).toEqual([]); // 4 buffers stay posted
    });

    test("a report (array) with its own syn gets no second SYN; events wait for buffers and go in order", async () => {
      // 4 buffers are still posted from the test before: 5 events come, 4 go in, 1 waits for the next buffer.
      await send(events, '[{"type":"rel","code":0,"value":-5},{"type":"rel","code":1,"value":7},{"type":"syn"}]\n[{"type":"abs","code":0,"value":4294967295},{"type":0,"code":0,"value":0}]\n');
      const first = k.completions(0, 4);
      expect(k.completions(0, 1, 200)).toEqual([]);
      k.post(0, { writable: [8] });
      const rest = k.completions(0, 1);
      expect([...first, ...rest].map(decode)).toEqual([[EV_REL, 0, -5], [EV_REL, 1, 7], [EV_SYN, 0, 0], [EV_ABS, 0, -1], [EV_SYN, 0, 0]]);
    });

    test("hostile lines are logged and skipped; the next good line is delivered", async () => {
      const bad = [
        "not json", "[]", '{"type":"bogus","code":1,"value":1}', '{"type":1,"code":768,"value":1}', '{"type":1,"code":30,"value":4294967296}',
        '{"type":1,"code":30}', '"a string"', "[1,2]", "x".repeat(5000),
      ];
      await send(events, bad.join("\n") + '\n{"type":"key","code":2,"value":1}\n');
      for (let i = 0; i < 2; i++) k.post(0, { writable: [8] });
      expect(k.completions(0, 2).map(decode)).toEqual([[EV_KEY, 2, 1], [EV_SYN, 0, 0]]);
      const out = kbd.output();
      expect(out.match(/line skipped/g)!.length).toBe(bad.length - 1);
      expect(out).toMatch(/longer than 4096 bytes skipped/);
    });

    test("hostile: a buffer too small for an event, or readable only, is completed with length 0 and the event waits", async () => {
      k.post(0, { writable: [4] });
      k.post(0, { readable: [new Uint8Array(8)] });
      k.post(0, { writable: [8] });
      k.post(0, { writable: [8] });
      await send(events, '{"type":"key","code":3,"value":1}\n');
      const cs = k.completions(0, 4);
      expect(cs.map((c) => c.len)).toEqual([0, 0, 8, 8]);
      expect(cs.slice(2).map(decode)).toEqual([[EV_KEY, 3, 1], [EV_SYN, 0, 0]]);
    });

    test("with no buffers the backlog keeps the newest 1024 events, dropping whole old reports", async () => {
      const lines = Array.from({ length: 600 }, (_, i) => `{"type":"abs","code":0,"value":${i}}`);
      await send(events, lines.join("\n") + "\n");
      await Bun.sleep(100);
      expect(kbd.output()).toMatch(/dropping the oldest reports/);
      for (let i = 0; i < 16; i++) k.post(0, { writable: [8] });
      const cs = k.completions(0, 16).map(decode);
      // 600 reports of 2 events = 1200 > 1024: the first 88 reports are gone, the 89th is next.
      expect(cs.slice(0, 4)).toEqual([[EV_ABS, 0, 88], [EV_SYN, 0, 0], [EV_ABS, 0, 89], [EV_SYN, 0, 0]]);
      // drain the rest so later tests start clean
      let left = 1024 - 16;
      while (left > 0) {
        const n = Math.min(left, 8);
        for (let i = 0; i < n; i++) k.post(0, { writable: [8] });
        left -= k.completions(0, n).length;
      }
    });
  });

  describe("status queue (1)", () => {
    test("an LED update is completed with length 0 and logged", () => {
      k.post(1, { readable: [led(1, 1)] });
      const [c] = k.completions(1, 1);
      expect(c!.len).toBe(0);
      const deadline = Date.now() + 2000;
      while (!/LED caps lock on/.test(kbd.output()) && Date.now() < deadline) Bun.sleepSync(10);
      expect(kbd.output()).toMatch(/LED caps lock on/);
    });

    test("hostile: chains too short for an event, or writable only, are completed with 0; the device still works", async () => {
      k.post(1, { readable: [new Uint8Array(4)] });
      k.post(1, { writable: [8] });
      k.post(1, { readable: [led(0, 1).subarray(0, 7)] });
      expect(k.completions(1, 3).map((c) => c.len)).toEqual([0, 0, 0]);
      k.post(0, { writable: [8] });
      k.post(0, { writable: [8] });
      await send(events, '{"type":"key","code":4,"value":0}\n');
      expect(k.completions(0, 2).map(decode)).toEqual([[EV_KEY, 4, 0], [EV_SYN, 0, 0]]);
      expect(kbd.output()).not.toMatch(/bunvhost: error|broken/);
    });
  });

  test("a reload (control socket) keeps the events socket: the new instance gets the next lines", async () => {
    const ev = join(dir, "reload.events"), ctl = join(dir, "reload.ctl");
    const srv = await serveDevice("input", ["--events", ev, "--control", ctl]);
    try {
      await send(ev, "first\n");
      const reply = await new Promise<string>((res, rej) => {
        let text = "";
        Bun.connect({
          unix: ctl,
          socket: {
            open: (s) => void s.write("reload\n"),
            data(s, d) {
              text += d.toString();
              if (text.includes("\n")) {
                s.end();
                res(text.trim());
              }
            },
            error: (_s, e) => rej(e),
          },
        }).catch(rej);
      });
      expect(reply).toStartWith("ok");
      await send(ev, "second\n");
      const deadline = Date.now() + 2000;
      while (!/skipped: .*second/.test(srv.output()) && Date.now() < deadline) await Bun.sleep(10);
      expect(srv.output()).toMatch(/skipped: .*first[^]*reloaded[^]*skipped: .*second/);
    } finally {
      await srv.stop();
    }
  });
});

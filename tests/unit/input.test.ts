/**
 * virtio-input (src/devices/input.ts) through the test kit. The config
 * space (select/subsel) is read from device objects the factory builds in
 * this process (a keyboard with a serial, a tablet named "pen"). Events
 * come through the --events socket, so the queues are driven against the
 * CLI serving the built-in device in a child process, over a split and
 * over a packed ring: event buffers posted on queue 0 before events arrive
 * and completed as they are injected, key and relative/absolute reports,
 * LED state sent on the status queue. Hostile input: malformed and oversized
 * event lines, buffers too small for an event, status chains too short.
 * Last, a reload through the control socket keeps the events socket.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import type { DeviceLog, OptionValues } from "../../src/device/api.ts";
import input, { prepare } from "../../src/devices/input.ts";
import { DeviceDriver, startDevice, type Completion, type RunningDevice } from "../../src/testing/index.ts";
import { scratchDir } from "../support/backends.ts";

const CFG_ID_NAME = 0x01, CFG_ID_SERIAL = 0x02, CFG_ID_DEVIDS = 0x03, CFG_PROP_BITS = 0x10, CFG_EV_BITS = 0x11, CFG_ABS_INFO = 0x12;
const EV_SYN = 0, EV_KEY = 1, EV_REL = 2, EV_ABS = 3, EV_LED = 0x11, EV_REP = 0x14;
const SYN: [number, number, number] = [EV_SYN, 0, 0];

/** Writes select/subsel (as a driver's two config writes) and returns the answer (size bytes of the union). */
async function query(drv: DeviceDriver, select: number, subsel: number): Promise<Uint8Array> {
  await drv.setConfig(0, Uint8Array.of(select));
  await drv.setConfig(1, Uint8Array.of(subsel));
  const c = await drv.config(0, 136);
  expect([c[0], c[1]]).toEqual([select, subsel]);
  return c.slice(8, 8 + c[2]!);
}

const text = (b: Uint8Array) => new TextDecoder().decode(b);
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
const eventBuffers = (n: number) => Array.from({ length: n }, () => ({ writable: 8 }));

/** Sends `text` to a unix socket and closes it. */
async function send(path: string, text: string): Promise<void> {
  await new Promise<void>((res, rej) => {
    Bun.connect({ unix: path, socket: { open: (s) => void s.end(text), close: () => res(), error: (_s, e) => rej(e), data() {} } }).catch(rej);
  });
}

/** Reaps for `ms` and returns how many of `ps` the device used meanwhile. */
async function usedWithin(drv: DeviceDriver, ps: Promise<unknown>[], ms: number): Promise<number> {
  let used = 0;
  for (const p of ps) p.then(() => used++, () => {});
  const end = performance.now() + ms;
  do {
    drv.poll();
    await Bun.sleep(5);
  } while (performance.now() < end);
  return used;
}

/** Waits (at most 2 s) until the server's log matches `re`. */
async function logged(dev: RunningDevice, re: RegExp): Promise<string> {
  const deadline = Date.now() + 2000;
  while (!re.test(dev.log()) && Date.now() < deadline) await Bun.sleep(10);
  return dev.log();
}

const dir = scratchDir("bunvhost-input-unit-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("config space (select/subsel), device objects from the factory in-process", () => {
  const lines: string[] = [];
  const log: DeviceLog = {
    debug: (m) => lines.push(`debug: ${m}`), info: (m) => lines.push(`info: ${m}`),
    warn: (m) => lines.push(`warn: ${m}`), error: (m) => lines.push(`error: ${m}`),
  };
  const build = (values: OptionValues) => input(prepare(values, { threads: 0, log }), { thread: "main", log });
  let kbd: RunningDevice, tablet: RunningDevice;
  let k: DeviceDriver, t: DeviceDriver;

  beforeAll(async () => {
    kbd = await startDevice(build({ kind: "keyboard", serial: "SN-42" }));
    tablet = await startDevice(build({ kind: "tablet", name: "pen" }));
    k = await DeviceDriver.connect(kbd.socket, { queueSize: 16 });
    t = await DeviceDriver.connect(tablet.socket, { queueSize: 16, packed: true });
  });
  afterAll(async () => {
    k?.close();
    t?.close();
    await kbd?.stop();
    await tablet?.stop();
  });

  test("ID_NAME, ID_SERIAL and ID_DEVIDS (BUS_VIRTUAL, product 1 for a keyboard)", async () => {
    expect(text(await query(k, CFG_ID_NAME, 0))).toBe("bunvhost keyboard");
    expect(text(await query(k, CFG_ID_SERIAL, 0))).toBe("SN-42");
    expect([...(await query(k, CFG_ID_DEVIDS, 0))]).toEqual([6, 0, 0, 0, 1, 0, 1, 0]);
    expect(text(await query(t, CFG_ID_NAME, 0))).toBe("pen");
    expect((await query(t, CFG_ID_SERIAL, 0)).length).toBe(0); // no serial: size 0
  });

  test("EV_BITS by event type: keyboard keys 1..248, LEDs 0..2, autorepeat; no REL", async () => {
    expect(bits(await query(k, CFG_EV_BITS, EV_KEY))).toEqual(Array.from({ length: 248 }, (_, i) => i + 1));
    expect(bits(await query(k, CFG_EV_BITS, EV_LED))).toEqual([0, 1, 2]);
    expect((await query(k, CFG_EV_BITS, EV_REP)).length).toBe(1); // size ≠ 0 is what turns EV_REP on
    expect((await query(k, CFG_EV_BITS, EV_REL)).length).toBe(0);
    expect((await query(k, CFG_EV_BITS, EV_ABS)).length).toBe(0);
  });

  test("tablet: buttons, wheel, ABS_X/ABS_Y with ABS_INFO 0..32767; no info for other axes", async () => {
    expect(bits(await query(t, CFG_EV_BITS, EV_KEY))).toEqual([0x110, 0x111, 0x112]);
    expect(bits(await query(t, CFG_EV_BITS, EV_REL))).toEqual([8]);
    expect(bits(await query(t, CFG_EV_BITS, EV_ABS))).toEqual([0, 1]);
    for (const axis of [0, 1]) {
      const a = await query(t, CFG_ABS_INFO, axis);
      const dv = new DataView(a.buffer, a.byteOffset, a.length);
      expect(a.length).toBe(20);
      expect([0, 4, 8, 12, 16].map((o) => dv.getUint32(o, true))).toEqual([0, 32767, 0, 0, 0]);
    }
    expect((await query(t, CFG_ABS_INFO, 2)).length).toBe(0);
  });

  test("unknown selects, PROP_BITS (none), UNSET and ID_NAME with a non-zero subsel answer size 0 (§5.8.5.1)", async () => {
    for (const [sel, sub] of [[CFG_PROP_BITS, 0], [0x7f, 0], [0, 0], [CFG_ID_NAME, 9]]) expect((await query(k, sel!, sub!)).length).toBe(0);
    await query(k, 0x7f, 0);
    expect((await k.config(0, 136)).subarray(2).every((b) => b === 0)).toBe(true);
  });

  test("a whole-config write (as QEMU sends) takes only select and subsel", async () => {
    const garbage = new Uint8Array(136).fill(0xee);
    garbage[0] = CFG_EV_BITS;
    garbage[1] = EV_LED;
    await k.setConfig(0, garbage);
    const c = await k.config(0, 136);
    expect([c[0], c[1], c[2], c[8], c[9]]).toEqual([CFG_EV_BITS, EV_LED, 1, 0x07, 0]);
    expect(lines.filter((l) => /^(warn|error)/.test(l))).toEqual([]);
    expect(kbd.log() + tablet.log()).not.toMatch(/bunvhost: error|broken/);
  });
});

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";
  describe(`event and status queues over a ${ring} ring (CLI: input --kind keyboard --events PATH --serial SN-42)`, () => {
    const events = join(dir, `kbd-${ring}.events`);
    let kbd: RunningDevice;
    let k: DeviceDriver;
    /** Event buffers one test leaves posted for the next. */
    let held: Promise<Completion>[] = [];

    beforeAll(async () => {
      kbd = await startDevice("input", { options: { kind: "keyboard", events, serial: "SN-42" } });
      k = await DeviceDriver.connect(kbd.socket, { queueSize: 16, packed });
    });
    afterAll(async () => {
      k?.close();
      await kbd?.stop();
    });

    test("the command-line options reach the device: ID_NAME by default, ID_SERIAL from --serial, 2 queues", async () => {
      expect(k.queueCount).toBe(2);
      expect(text(await query(k, CFG_ID_NAME, 0))).toBe("bunvhost keyboard");
      expect(text(await query(k, CFG_ID_SERIAL, 0))).toBe("SN-42");
    });

    test("receive queue: buffers posted before any event stay on the ring; each report injected completes the next two, in order", async () => {
      const ps = eventBuffers(6).map((c) => k.post(0, c));
      // Nothing to say yet: available() finds an empty backlog and takes no buffer.
      expect(await usedWithin(k, ps, 200)).toBe(0);
      const reports: [number, number, number][] = [[EV_KEY, 16, 1], [EV_KEY, 16, 0], [EV_KEY, 17, 1]];
      for (const [i, [type, code, value]] of reports.entries()) {
        await send(events, JSON.stringify({ type, code, value }) + "\n");
        const pair = await k.wait(Promise.all(ps.slice(2 * i, 2 * i + 2)));
        expect(pair.map((c) => c.len)).toEqual([8, 8]);
        expect(pair.map(decode)).toEqual([[type, code, value], SYN]);
        // The buffers after them still wait for the next report.
        expect(await usedWithin(k, ps.slice(2 * i + 2), 50)).toBe(0);
      }
    });

    test("a key press and release sent as JSON lines arrive in the driver's buffers, each followed by SYN_REPORT", async () => {
      const ps = eventBuffers(8).map((c) => k.post(0, c));
      await send(events, '{"type":"key","code":30,"value":1}\n{"type":1,"code":30,"value":0}\n');
      const cs = await k.wait(Promise.all(ps.slice(0, 4)));
      expect(cs.map((c) => c.len)).toEqual([8, 8, 8, 8]);
      expect(cs.map(decode)).toEqual([[EV_KEY, 30, 1], SYN, [EV_KEY, 30, 0], SYN]);
      held = ps.slice(4);
      expect(await usedWithin(k, held, 200)).toBe(0); // 4 buffers stay posted
    });

    test("a report (array) with its own syn gets no second SYN; events wait for buffers and go in order", async () => {
      // 4 buffers are still posted from the test before: 5 events come, 4 go in, 1 waits for the next buffer.
      expect(held).toHaveLength(4);
      await send(events, '[{"type":"rel","code":0,"value":-5},{"type":"rel","code":1,"value":7},{"type":"syn"}]\n[{"type":"abs","code":0,"value":4294967295},{"type":0,"code":0,"value":0}]\n');
      const first = await k.wait(Promise.all(held));
      held = [];
      await usedWithin(k, [], 200); // the fifth event waits in the backlog
      const rest = await k.submit(0, { writable: 8 });
      expect([...first, rest].map(decode)).toEqual([[EV_REL, 0, -5], [EV_REL, 1, 7], SYN, [EV_ABS, 0, -1], SYN]);
    });

    test("hostile lines are logged and skipped; the next good line is delivered", async () => {
      const bad = [
        "not json", "[]", '{"type":"bogus","code":1,"value":1}', '{"type":1,"code":768,"value":1}', '{"type":1,"code":30,"value":4294967296}',
        '{"type":1,"code":30}', '"a string"', "[1,2]", "x".repeat(5000),
      ];
      await send(events, bad.join("\n") + '\n{"type":"key","code":2,"value":1}\n');
      const cs = await k.submitAll(0, eventBuffers(2));
      expect(cs.map(decode)).toEqual([[EV_KEY, 2, 1], SYN]);
      const out = await logged(kbd, /longer than 4096 bytes skipped/);
      expect(out.match(/line skipped/g)!.length).toBe(bad.length - 1);
      expect(out).toMatch(/longer than 4096 bytes skipped/);
    });

    test("hostile: a buffer too small for an event, or readable only, is completed with length 0 and the event waits", async () => {
      const ps = [k.post(0, { writable: 4 }), k.post(0, { readable: new Uint8Array(8) }), k.post(0, { writable: 8 }), k.post(0, { writable: 8 })];
      await send(events, '{"type":"key","code":3,"value":1}\n');
      const cs = await k.wait(Promise.all(ps));
      expect(cs.map((c) => c.len)).toEqual([0, 0, 8, 8]);
      expect(cs.slice(2).map(decode)).toEqual([[EV_KEY, 3, 1], SYN]);
    });

    test("with no buffers the backlog keeps the newest 1024 events, dropping whole old reports", async () => {
      const lines = Array.from({ length: 600 }, (_, i) => `{"type":"abs","code":0,"value":${i}}`);
      await send(events, lines.join("\n") + "\n");
      await logged(kbd, /dropping the oldest reports/);
      await Bun.sleep(100);
      expect(kbd.log()).toMatch(/dropping the oldest reports/);
      const cs = (await k.submitAll(0, eventBuffers(16))).map(decode);
      // 600 reports of 2 events = 1200 > 1024: the first 88 reports are gone, the 89th is next.
      expect(cs.slice(0, 4)).toEqual([[EV_ABS, 0, 88], SYN, [EV_ABS, 0, 89], SYN]);
      // All 600 lines were in before the first buffer: the drop is reported once, with the whole count.
      expect(await logged(kbd, /report\(s\) were dropped/)).toMatch(/88 report\(s\) were dropped while the driver gave no buffers/);
      // Drain the rest (so later tests start clean): the newest report comes last.
      let last: [number, number, number][] = [];
      for (let left = 1024 - 16; left > 0; left -= 16) last = (await k.submitAll(0, eventBuffers(Math.min(left, 16)))).map(decode);
      expect(last.slice(-2)).toEqual([[EV_ABS, 0, 599], SYN]);
    });

    test("status queue: an LED update is completed with length 0 and logged", async () => {
      const c = await k.submit(1, { readable: led(1, 1) });
      expect(c.len).toBe(0);
      expect(await logged(kbd, /LED caps lock on/)).toMatch(/LED caps lock on/);
    });

    test("status queue, hostile: chains too short for an event, or writable only, are completed with 0; the device still works", async () => {
      const cs = await k.submitAll(1, [{ readable: new Uint8Array(4) }, { writable: 8 }, { readable: led(0, 1).subarray(0, 7) }]);
      expect(cs.map((c) => c.len)).toEqual([0, 0, 0]);
      const ps = eventBuffers(2).map((c) => k.post(0, c));
      await send(events, '{"type":"key","code":4,"value":0}\n');
      expect((await k.wait(Promise.all(ps))).map(decode)).toEqual([[EV_KEY, 4, 0], SYN]);
      expect(kbd.log()).not.toMatch(/bunvhost: error|broken/);
    });
  });
}

test("a reload (control socket) keeps the events socket: the new instance gets the next lines", async () => {
  const ev = join(dir, "reload.events"), ctl = join(dir, "reload.ctl");
  const srv = await startDevice("input", { options: { events: ev }, args: ["--control", ctl] });
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
    expect(await logged(srv, /skipped: .*second/)).toMatch(/skipped: .*first[^]*reloaded[^]*skipped: .*second/);
  } finally {
    await srv.stop();
  }
});

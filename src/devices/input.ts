/**
 * virtio-input (VIRTIO 1.2 §5.8): a keyboard, mouse or tablet whose events
 * come from a unix socket. Linux: drivers/virtio/virtio_input.c, with evdev
 * for /dev/input/eventN.
 *
 *   bun run server.ts input --kind mouse --events /tmp/mouse.events --socket /tmp/mouse.sock
 *   echo '{"type":"rel","code":0,"value":10}' | socat - UNIX-CONNECT:/tmp/mouse.events
 *
 * Queues: the event queue (0) is a receive queue: the driver fills it with
 * 8-byte buffers and each event goes into one of them when there is one;
 * events that find no buffer wait in a bounded backlog (the oldest reports
 * are dropped when it is full). The status queue (1) carries the driver's
 * LED updates (caps lock etc.), which are logged; a chain too short for an
 * event is completed with nothing written.
 *
 * Config (§5.8.4): the driver writes `select` and `subsel`, then reads `size`
 * and the answer (name, serial, ids, property bits, event bits of the event
 * type `subsel`, axis `subsel`'s range); size 0 means "none".
 *
 * Events (--events PATH): the device listens on PATH; every line a client
 * sends is one report: an event `{"type":"key","code":30,"value":1}` or an
 * array of them (type: a number or syn, key, rel, abs, msc, sw, led, snd,
 * rep; codes and values as in linux/input-event-codes.h; code and value may
 * be left out of a syn). A SYN_REPORT is appended unless the line ends with
 * one. Malformed lines are logged and skipped. The guest's input core drops
 * events the kind does not declare. Bun serves the socket on the main loop,
 * so this device runs there (`defaults`: --threads 0); a reload (--watch)
 * hands the socket to the new code without closing it.
 */
import {
  OptionError, VIRTIO_ID_INPUT, type Device, type DeviceOptions, type OptionValues, type PrepareContext,
  type Queues, type Request, type DeviceContext, type DeviceLog,
} from "../device/api.ts";
import { existsSync, lstatSync, unlinkSync } from "node:fs";

/** §5.8.2 */
const EVENTQ = 0, STATUSQ = 1;
/** §5.8.4 enum virtio_input_config_select */
const VIRTIO_INPUT_CFG_ID_NAME = 0x01, VIRTIO_INPUT_CFG_ID_SERIAL = 0x02, VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03,
  VIRTIO_INPUT_CFG_PROP_BITS = 0x10, VIRTIO_INPUT_CFG_EV_BITS = 0x11, VIRTIO_INPUT_CFG_ABS_INFO = 0x12;
/** struct virtio_input_config: u8 select, subsel, size, reserved[5]; then a 128-byte union. */
const CONFIG_SIZE = 136, ANSWER_AT = 8, ANSWER_MAX = 128;
/** struct virtio_input_event: le16 type, le16 code, le32 value. */
const EVENT_SIZE = 8;

/** linux/input-event-codes.h */
const EV_SYN = 0x00, EV_KEY = 0x01, EV_REL = 0x02, EV_ABS = 0x03, EV_MSC = 0x04, EV_SW = 0x05, EV_LED = 0x11,
  EV_SND = 0x12, EV_REP = 0x14, EV_MAX = 0x1f, KEY_MAX = 0x2ff, SYN_REPORT = 0;
const BTN_LEFT = 0x110, BTN_RIGHT = 0x111, BTN_MIDDLE = 0x112, BTN_SIDE = 0x113, BTN_EXTRA = 0x114;
const REL_X = 0x00, REL_Y = 0x01, REL_WHEEL = 0x08, ABS_X = 0x00, ABS_Y = 0x01;
const LED_NUML = 0x00, LED_CAPSL = 0x01, LED_SCROLLL = 0x02;
const LED_NAMES = ["num lock", "caps lock", "scroll lock", "compose", "kana"];
const BUS_VIRTUAL = 0x06;
const TYPES: Record<string, number> = { syn: EV_SYN, key: EV_KEY, rel: EV_REL, abs: EV_ABS, msc: EV_MSC, sw: EV_SW, led: EV_LED, snd: EV_SND, rep: EV_REP };

/** Events waiting for a buffer; events per line; bytes per line. */
const BACKLOG_MAX = 1024, LINE_EVENTS_MAX = 64, LINE_MAX = 4096;

const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

/** What each kind declares: event codes by type (EV_REP: software autorepeat, no codes) and absolute axes. */
const KINDS = {
  keyboard: { product: 1, events: { [EV_KEY]: range(1, 248), [EV_REP]: [], [EV_LED]: [LED_NUML, LED_CAPSL, LED_SCROLLL] }, axes: [] },
  mouse: { product: 2, events: { [EV_KEY]: [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA], [EV_REL]: [REL_X, REL_Y, REL_WHEEL] }, axes: [] },
  tablet: { product: 3, events: { [EV_KEY]: [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE], [EV_REL]: [REL_WHEEL], [EV_ABS]: [ABS_X, ABS_Y] }, axes: [ABS_X, ABS_Y] },
} satisfies Record<string, { product: number; events: Record<number, number[]>; axes: number[] }>;
type Kind = keyof typeof KINDS;
/** Tablet axes: 0..32767 (struct virtio_input_absinfo: min, max, fuzz, flat, res). */
const ABS_MAX = 32767;

export const options = {
  kind: { type: "string", choices: Object.keys(KINDS), default: "keyboard", help: "the device the guest sees" },
  events: { type: "string", metavar: "PATH", help: "unix socket to listen on for events, one JSON report per line" },
  name: { type: "string", help: "device name (ID_NAME; default \"bunvhost KIND\")" },
  serial: { type: "string", help: "serial string (ID_SERIAL; default none)" },
} satisfies DeviceOptions;

export interface InputOptions {
  kind: Kind;
  events?: string;
  name: string;
  serial: string;
}

export const defaults = { threads: 0 };

const utf8 = (s: string) => new TextEncoder().encode(s);

export function prepare(v: OptionValues, ctx: PrepareContext): InputOptions {
  const kind = String(v.kind ?? "keyboard") as Kind;
  const name = v.name === undefined ? `bunvhost ${kind}` : String(v.name);
  const serial = v.serial === undefined ? "" : String(v.serial);
  for (const [opt, s] of [["name", name], ["serial", serial]]) {
    if (utf8(s!).length > ANSWER_MAX) throw new OptionError(`--${opt}: at most ${ANSWER_MAX} bytes`);
  }
  const events = v.events === undefined ? undefined : String(v.events);
  if (events !== undefined) {
    if (ctx.threads > 0) throw new OptionError("--events is served on Bun's main loop: use --threads 0 (input's default)");
    if (existsSync(events) && !lstatSync(events).isSocket()) throw new OptionError(`--events ${events}: exists and is not a socket`);
  }
  return { kind, events, name, serial };
}

export function describe(o: InputOptions): string {
  return `${o.kind} "${o.name}"${o.events ? `, events from ${o.events}` : ", no event source"}`;
}

type Log = (level: "info" | "warn", msg: string) => void;
/** Without a context (a test building the device by hand): stderr, as the server's logger prints. */
const STDERR: DeviceLog = { debug: console.error, info: console.error, warn: console.error, error: console.error };

/** A bitmap with the given bits set (the shortest that holds them). */
function bitmap(bits: readonly number[]): Uint8Array {
  const b = new Uint8Array(bits.length ? (Math.max(...bits) >> 3) + 1 : 1);
  for (const bit of bits) b[bit >> 3]! |= 1 << (bit & 7);
  return b;
}

/** One JSON line → its events as [type, code, value, ...] with the SYN_REPORT, or why it is refused. */
function parseReport(line: string): number[] | string {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    return `not JSON (${(e as Error).message})`;
  }
  const list = Array.isArray(v) ? v : [v];
  if (list.length === 0 || list.length > LINE_EVENTS_MAX) return `a report holds 1 to ${LINE_EVENTS_MAX} events`;
  const out: number[] = [];
  for (const e of list) {
    if (typeof e !== "object" || e === null) return "an event is an object {type, code, value}";
    const { type: t, code = t === "syn" || t === EV_SYN ? SYN_REPORT : undefined, value = t === "syn" || t === EV_SYN ? 0 : undefined } = e as Record<string, unknown>;
    const type = typeof t === "string" ? TYPES[t] : t;
    if (!Number.isInteger(type) || (type as number) < 0 || (type as number) > EV_MAX) return `type ${JSON.stringify(t)}: a number 0..${EV_MAX} or one of ${Object.keys(TYPES).join(", ")}`;
    if (!Number.isInteger(code) || (code as number) < 0 || (code as number) > KEY_MAX) return `code ${JSON.stringify(code)}: an integer 0..${KEY_MAX}`;
    if (!Number.isInteger(value) || (value as number) < -(2 ** 31) || (value as number) >= 2 ** 32) return `value ${JSON.stringify(value)}: a 32-bit integer`;
    out.push(type as number, code as number, (value as number) >>> 0);
  }
  if (out.at(-3) !== EV_SYN || out.at(-2) !== SYN_REPORT) out.push(EV_SYN, SYN_REPORT, 0);
  return out;
}

/**
 * The events sockets of this thread by path, kept on globalThis because a
 * reload evaluates this file again: the new instance takes the socket over
 * (clients stay connected) and the old instance's close() leaves it alone.
 */
interface EventsSocket {
  owner: object;
  onLine(line: string): void;
  log: Log;
  stop(): void;
}
type Client = { buf: string; dec: TextDecoder; skip: boolean };
const SOCKETS = ((globalThis as Record<symbol, unknown>)[Symbol.for("bunvhost.input.events")] ??= new Map()) as Map<string, EventsSocket>;

function listenEvents(path: string, owner: object, onLine: (line: string) => void, log: Log): void {
  const had = SOCKETS.get(path);
  if (had) {
    had.owner = owner;
    had.onLine = onLine;
    had.log = log;
    return;
  }
  if (existsSync(path) && lstatSync(path).isSocket()) unlinkSync(path); // a dead server's
  const entry: EventsSocket = { owner, onLine, log, stop() {} };
  const take = (line: string) => {
    if (line.length > LINE_MAX) entry.log("warn", `--events: a line longer than ${LINE_MAX} bytes skipped`);
    else entry.onLine(line);
  };
  const listener = Bun.listen<Client>({
    unix: path,
    socket: {
      open(s) {
        s.data = { buf: "", dec: new TextDecoder(), skip: false };
      },
      data(s, chunk) {
        const c = s.data;
        c.buf += c.dec.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = c.buf.indexOf("\n")) >= 0) {
          const line = c.buf.slice(0, nl);
          c.buf = c.buf.slice(nl + 1);
          if (c.skip) c.skip = false;
          else take(line);
        }
        if (c.buf.length > LINE_MAX) {
          if (!c.skip) entry.log("warn", `--events: a line longer than ${LINE_MAX} bytes skipped`);
          c.buf = "";
          c.skip = true;
        }
      },
      close(s) {
        if (!s.data.skip && s.data.buf) take(s.data.buf);
        s.data.buf = "";
      },
    },
  });
  entry.stop = () => listener.stop(true); // Bun unlinks the path
  SOCKETS.set(path, entry);
}

function closeEvents(path: string, owner: object): void {
  const e = SOCKETS.get(path);
  if (e?.owner !== owner) return;
  SOCKETS.delete(path);
  e.stop();
}

export default function create(o: InputOptions, ctx?: DeviceContext): Device {
  const logger = ctx?.log ?? STDERR;
  const log: Log = (level, msg) => logger[level](`input: ${msg}`);
  const kind = KINDS[o.kind];
  if (!kind) throw new OptionError(`--kind ${o.kind}: one of ${Object.keys(KINDS).join(", ")}`);

  // Every answer the config space can give, by select << 8 | subsel.
  const answers = new Map<number, Uint8Array>();
  const at = (select: number, subsel: number, a: Uint8Array) => answers.set((select << 8) | subsel, a);
  at(VIRTIO_INPUT_CFG_ID_NAME, 0, utf8(o.name));
  if (o.serial) at(VIRTIO_INPUT_CFG_ID_SERIAL, 0, utf8(o.serial));
  const ids = new DataView(new ArrayBuffer(8)); // struct virtio_input_devids: bustype, vendor, product, version
  ids.setUint16(0, BUS_VIRTUAL, true);
  ids.setUint16(4, kind.product, true);
  ids.setUint16(6, 1, true);
  at(VIRTIO_INPUT_CFG_ID_DEVIDS, 0, new Uint8Array(ids.buffer));
  for (const [type, codes] of Object.entries(kind.events)) at(VIRTIO_INPUT_CFG_EV_BITS, Number(type), bitmap(codes));
  for (const axis of kind.axes) {
    const abs = new DataView(new ArrayBuffer(20));
    abs.setUint32(4, ABS_MAX, true);
    at(VIRTIO_INPUT_CFG_ABS_INFO, axis, new Uint8Array(abs.buffer));
  }

  const cfg = new Uint8Array(CONFIG_SIZE);
  const select = (sel: number, subsel: number) => {
    cfg.fill(0);
    cfg[0] = sel;
    cfg[1] = subsel;
    const a = answers.get((sel << 8) | subsel); // PROP_BITS: none, so size 0 as for anything unknown
    if (a) {
      cfg[2] = a.length;
      cfg.set(a, ANSWER_AT);
    }
  };

  /** Events not yet in a buffer: [type, code, value, ...], whole reports. */
  let backlog: number[] = [];
  let queues: Queues | null = null;
  let leds = 0;
  let dropped = 0;
  const me = {};

  function deliver(): void {
    let done = 0;
    while (queues && done < backlog.length) {
      const req = queues.take(EVENTQ);
      if (!req) break;
      if (req.out.remaining >= EVENT_SIZE) {
        req.out.writeU16(backlog[done]!);
        req.out.writeU16(backlog[done + 1]!);
        req.out.writeU32(backlog[done + 2]!);
        done += 3;
      } // else: a buffer too small for an event goes back empty and the event waits for the next one
      req.complete();
    }
    if (done) backlog = backlog.slice(done);
    if (done && dropped) {
      log("warn", `${dropped} report(s) were dropped while the driver gave no buffers`);
      dropped = 0;
    }
  }

  function queueReport(events: number[]): void {
    backlog.push(...events);
    while (backlog.length > BACKLOG_MAX * 3) {
      let end = 0; // the oldest whole report
      while (end < backlog.length - 3 && (backlog[end] !== EV_SYN || backlog[end + 1] !== SYN_REPORT)) end += 3;
      backlog = backlog.slice(end + 3);
      if (dropped++ === 0) log("warn", `no buffers from the driver: dropping the oldest reports (backlog of ${BACKLOG_MAX} events)`);
    }
    deliver();
  }

  function onLine(line: string): void {
    if (line.trim() === "") return;
    const r = parseReport(line);
    if (typeof r === "string") log("warn", `--events: line skipped: ${r}: ${line.slice(0, 100)}`);
    else queueReport(r);
  }

  return {
    name: "input",
    type: VIRTIO_ID_INPUT,
    queues: 2,
    queueSize: 64,
    features: 0n,
    config: () => cfg,
    setConfig(offset, data) {
      // QEMU writes the whole config space back; only select (0) and subsel (1) are the driver's.
      let sel = cfg[0]!, sub = cfg[1]!;
      if (offset === 0 && data.length > 0) sel = data[0]!;
      if (offset <= 1 && offset + data.length > 1) sub = data[1 - offset]!;
      select(sel, sub);
    },
    receiveQueues: [EVENTQ],
    available: () => deliver(),
    attach(_loop, q) {
      queues = q ?? null;
      if (o.events) listenEvents(o.events, me, onLine, log);
    },
    handle(req: Request) {
      if (req.queue !== STATUSQ) return;
      // §5.8.6.2: the driver reports LED (and sound) state, one event per buffer; nothing is written back.
      while (req.in.remaining >= EVENT_SIZE) {
        const type = req.in.readU16(), code = req.in.readU16(), value = req.in.readU32();
        if (type !== EV_LED || code >= 32) continue;
        const now = value ? leds | (1 << code) : leds & ~(1 << code);
        if (now !== leds) log("info", `LED ${LED_NAMES[code] ?? code} ${value ? "on" : "off"}`);
        leds = now;
      }
    },
    reset() {
      backlog = [];
      leds = 0;
      dropped = 0;
      select(0, 0);
    },
    close() {
      if (o.events) closeEvents(o.events, me);
    },
    saveState() {
      const s = new DataView(new ArrayBuffer(8 + backlog.length * 4));
      s.setUint8(0, 1); // version
      s.setUint8(1, cfg[0]!);
      s.setUint8(2, cfg[1]!);
      s.setUint32(4, leds, true);
      backlog.forEach((v, i) => s.setUint32(8 + 4 * i, v, true));
      return new Uint8Array(s.buffer);
    },
    loadState(data) {
      if (data.length < 8 || data[0] !== 1 || (data.length - 8) % 12 !== 0 || data.length > 8 + BACKLOG_MAX * 12) {
        throw new Error(`input state: ${data.length} bytes, version ${data[0]}: expected version 1 with whole events`);
      }
      const s = new DataView(data.buffer, data.byteOffset, data.length);
      select(data[1]!, data[2]!);
      leds = s.getUint32(4, true);
      backlog = Array.from({ length: (data.length - 8) / 4 }, (_, i) => s.getUint32(8 + 4 * i, true));
    },
  };
}

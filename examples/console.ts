/**
 * virtio-console (VIRTIO 1.2 §5.3, device id 3) with one port (no
 * VIRTIO_CONSOLE_F_MULTIPORT): what the guest writes goes to stdout or a
 * file, what it reads comes from `--input` and from clients of a unix
 * socket. Linux: drivers/char/virtio_console.c (/dev/hvc0).
 *
 *   bun run server.ts examples/console.ts --socket /tmp/console.sock --listen /tmp/console.in --input 'root\n'
 *   socat - UNIX-CONNECT:/tmp/console.in       # type to the guest, see what it writes
 *
 * Queues (§5.3.2): the receiveq (0) is a receive queue: the driver fills it
 * with device-writable buffers and input goes into them when there is some;
 * input that finds no buffer waits in a backlog of at most 64 KiB (past
 * that, new input is dropped, as a UART overruns). The transmitq (1)
 * carries the guest's output, device-readable buffers written out as they
 * come; nothing is written back.
 *
 * Config (§5.3.4): rows and cols (`--rows`, `--cols`; VIRTIO_CONSOLE_F_SIZE
 * is offered when both are given) in the spec's order, rows first; Linux
 * read cols first for years (this Debian 6.1 kernel does:
 * include/uapi/linux/virtio_console.h) and sees the two swapped. Then
 * max_nr_ports 1, and emerg_wr (VIRTIO_CONSOLE_F_EMERG_WRITE):
 * a driver's write of the whole field outputs its low byte (§5.3.5), for
 * output before the queues are up (a NUL is not output).
 *
 * Input: `--input TEXT` (escapes \n \r \t \\ \xHH) is there from the start
 * and goes into the first buffers the driver gives; `--listen PATH` takes
 * bytes from every client and sends the guest's output to every client too
 * (a client that does not keep up loses output). Bun serves the socket on
 * the main loop and the backlog lives in one instance, so with either
 * option this device runs there (`defaults`: --threads 0). Input waiting
 * for buffers survives a device reset, moves with a reload and with
 * DEVICE_STATE (saveState), and a state loaded replaces what was waiting.
 *
 * Tested through the test kit's driver only (tests/examples/console.test.ts):
 * the Debian 6.1 guest kernel has the driver (CONFIG_VIRTIO_CONSOLE), but
 * QEMU 7.2 has no vhost-user front-end for a console (vhost-user-device-pci
 * came in QEMU 8.2).
 */
import {
  OptionError, VIRTIO_ID_CONSOLE, type Device, type DeviceContext, type DeviceLog, type DeviceOptions, type OptionValues,
  type PrepareContext, type Queues,
} from "../src/index.ts";
import { closeSync, existsSync, lstatSync, openSync, unlinkSync, writeSync } from "node:fs";

/** §5.3.2: port 0's queues */
const RECEIVEQ = 0, TRANSMITQ = 1;
/** §5.3.3 */
const VIRTIO_CONSOLE_F_SIZE = 0n, VIRTIO_CONSOLE_F_EMERG_WRITE = 2n;
/** struct virtio_console_config (VIRTIO 1.2): le16 rows, le16 cols, le32 max_nr_ports, le32 emerg_wr. */
const CONFIG_SIZE = 12, EMERG_WR = 8;
/** Input waiting for receive buffers, in bytes. */
const BACKLOG_MAX = 65536;
const STATE_VERSION = 1;

export const options = {
  input: { type: "string", metavar: "TEXT", help: "input the guest reads first (escapes: \\n \\r \\t \\\\ \\xHH)" },
  listen: { type: "string", metavar: "PATH", help: "unix socket: clients type to the guest and see its output" },
  output: { type: "string", metavar: "PATH", help: "append the guest's output to this file (default: stdout)" },
  cols: { type: "number", min: 1, max: 65535, help: "console columns (with --rows: VIRTIO_CONSOLE_F_SIZE)" },
  rows: { type: "number", min: 1, max: 65535, help: "console rows (with --cols)" },
} satisfies DeviceOptions;

export const defaults = { threads: 0 };

export interface ConsoleOptions {
  input: Uint8Array;
  listen?: string;
  output?: string;
  /** 0 without --cols/--rows (no VIRTIO_CONSOLE_F_SIZE). */
  cols: number;
  rows: number;
}

/** `--input` text → bytes: UTF-8, with \n \r \t \\ and \xHH (one raw byte). */
function unescape(s: string): Uint8Array {
  const enc = new TextEncoder();
  const out: number[] = [];
  const re = /\\(?:([nrt\\])|x([0-9a-fA-F]{2}))/g;
  let last = 0;
  for (let m; (m = re.exec(s)); last = re.lastIndex) {
    out.push(...enc.encode(s.slice(last, m.index)));
    out.push(m[1] ? { n: 10, r: 13, t: 9, "\\": 92 }[m[1] as "n"] : parseInt(m[2]!, 16));
  }
  out.push(...enc.encode(s.slice(last)));
  return new Uint8Array(out);
}

export function prepare(v: OptionValues, ctx?: PrepareContext): ConsoleOptions {
  const input = v.input === undefined ? new Uint8Array(0) : unescape(String(v.input));
  if (input.length > BACKLOG_MAX) throw new OptionError(`--input: ${input.length} bytes, at most ${BACKLOG_MAX}`);
  const listen = v.listen === undefined ? undefined : String(v.listen);
  if ((input.length > 0 || listen) && (ctx?.threads ?? 0) > 0) {
    throw new OptionError("--input and --listen keep input in one instance on Bun's main loop: use --threads 0 (console's default)");
  }
  if (listen && existsSync(listen) && !lstatSync(listen).isSocket()) throw new OptionError(`--listen ${listen}: exists and is not a socket`);
  if ((v.cols === undefined) !== (v.rows === undefined)) throw new OptionError("give both --cols and --rows, or neither");
  const cols = Number(v.cols ?? 0), rows = Number(v.rows ?? 0);
  if (!Number.isInteger(cols) || !Number.isInteger(rows)) throw new OptionError("--cols and --rows are integers");
  return { input, listen, output: v.output === undefined ? undefined : String(v.output), cols, rows };
}

export function describe(o: ConsoleOptions): string {
  return `output to ${o.output ?? "stdout"}${o.listen ? `, clients on ${o.listen}` : ""}${o.cols ? `, ${o.cols}x${o.rows}` : ""}`;
}

/**
 * The --listen sockets of this process by path, kept on globalThis because a
 * reload evaluates this file again: the new instance takes the socket and
 * its clients over, and the old instance's close() leaves them alone.
 */
interface Listener {
  owner: object;
  onInput(bytes: Uint8Array): void;
  clients: Set<{ write(b: Uint8Array): number }>;
  stop(): void;
}
const LISTENERS = ((globalThis as Record<symbol, unknown>)[Symbol.for("bunvhost.examples.console")] ??= new Map()) as Map<string, Listener>;

function listen(path: string, owner: object, onInput: (b: Uint8Array) => void): Listener {
  const had = LISTENERS.get(path);
  if (had) return Object.assign(had, { owner, onInput });
  if (existsSync(path) && lstatSync(path).isSocket()) unlinkSync(path); // a dead server's
  const l: Listener = { owner, onInput, clients: new Set(), stop() {} };
  const server = Bun.listen({
    unix: path,
    socket: {
      open: (s) => void l.clients.add(s),
      data: (_s, chunk) => l.onInput(new Uint8Array(chunk)),
      close: (s) => void l.clients.delete(s),
      error: (s) => void l.clients.delete(s),
    },
  });
  l.stop = () => server.stop(true); // Bun unlinks the path
  LISTENERS.set(path, l);
  return l;
}

export default function create(o: ConsoleOptions, ctx?: DeviceContext): Device {
  const log: DeviceLog = ctx?.log ?? { debug() {}, info: console.error, warn: console.error, error: console.error };
  const cfg = new Uint8Array(CONFIG_SIZE);
  const dv = new DataView(cfg.buffer);
  dv.setUint16(0, o.rows, true);
  dv.setUint16(2, o.cols, true);
  dv.setUint32(4, 1, true); // max_nr_ports: meaningful only with MULTIPORT, which is not offered

  const out = o.output === undefined ? 1 : openSync(o.output, "a");
  let outFailed = false;
  let queues: Queues | null = null;
  let listener: Listener | null = null;
  const me = {};

  /** Input not yet in a buffer, oldest first. */
  let backlog: Uint8Array[] = o.input.length ? [o.input] : [];
  let waiting = o.input.length;
  let overrun = false;

  function deliver(): void {
    while (queues && waiting > 0) {
      const req = queues.take(RECEIVEQ);
      if (!req) break;
      // A buffer with no room (none writable) goes back empty; the input waits for the next one.
      while (req.out.remaining > 0 && backlog.length > 0) {
        const head = backlog[0]!;
        const n = Math.min(req.out.remaining, head.length);
        req.out.copyFrom(n === head.length ? head : head.subarray(0, n));
        if (n === head.length) backlog.shift();
        else backlog[0] = head.subarray(n);
        waiting -= n;
      }
      req.complete();
    }
    if (waiting === 0) overrun = false;
  }

  function input(bytes: Uint8Array): void {
    log.debug(`console: ${bytes.length} bytes of input`);
    const room = BACKLOG_MAX - waiting;
    if (bytes.length > room) {
      if (!overrun) log.warn(`console: the guest reads no input: ${waiting} bytes wait, new input dropped until it does`);
      overrun = true;
      bytes = bytes.subarray(0, room);
    }
    if (bytes.length === 0) return;
    backlog.push(bytes);
    waiting += bytes.length;
    deliver();
  }

  function output(bytes: Uint8Array): void {
    try {
      for (let done = 0; done < bytes.length; ) done += writeSync(out, bytes, done, bytes.length - done);
    } catch (e) {
      if (!outFailed) log.warn(`console: output to ${o.output ?? "stdout"} failed (${(e as Error).message}): dropped`);
      outFailed = true;
    }
    if (listener) for (const c of listener.clients) c.write(bytes);
  }

  return {
    name: "console",
    type: VIRTIO_ID_CONSOLE,
    queues: 2,
    queueSize: 128,
    features: (1n << VIRTIO_CONSOLE_F_EMERG_WRITE) | (o.cols ? 1n << VIRTIO_CONSOLE_F_SIZE : 0n),
    config: () => cfg,
    setConfig(offset, data) {
      // §5.3.5: a write to emerg_wr outputs its low byte, even before the driver is set up; the rest is the
      // device's. A NUL is not output: a front-end writing the whole config space back carries emerg_wr 0.
      if (offset > EMERG_WR || offset + data.length < EMERG_WR + 4) return;
      const c = data[EMERG_WR - offset]!;
      if (c !== 0) output(Uint8Array.of(c));
    },
    receiveQueues: [RECEIVEQ],
    available: () => deliver(),
    attach(_loop, q) {
      queues = q ?? null;
      if (o.listen) listener = listen(o.listen, me, input);
    },
    handle(req) {
      if (req.queue !== TRANSMITQ) return;
      req.in.forEach(req.in.remaining, (view) => output(view));
    },
    close() {
      if (out !== 1) closeSync(out);
      if (o.listen && LISTENERS.get(o.listen)?.owner === me) {
        LISTENERS.get(o.listen)!.stop();
        LISTENERS.delete(o.listen);
      }
    },
    saveState() {
      const s = new Uint8Array(1 + waiting);
      s[0] = STATE_VERSION;
      let at = 1;
      for (const b of backlog) {
        s.set(b, at);
        at += b.length;
      }
      return s;
    },
    loadState(s) {
      if (s.length < 1 || s[0] !== STATE_VERSION || s.length - 1 > BACKLOG_MAX) {
        throw new Error(`console state: version ${s[0]}, ${s.length} bytes: expected version ${STATE_VERSION} with at most ${BACKLOG_MAX} bytes of input`);
      }
      backlog = s.length > 1 ? [s.slice(1)] : [];
      waiting = s.length - 1;
      overrun = false;
      deliver();
    },
  };
}

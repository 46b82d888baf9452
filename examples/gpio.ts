/**
 * virtio-gpio (VIRTIO 1.2 §5.17, device id 41): a simulated bank of GPIO
 * lines. Each line has a direction (none, out, in), an output value the
 * driver sets, and an input level fixed by `--levels`; lines may carry names
 * (`--names`). Linux: drivers/gpio/gpio-virtio.c (/dev/gpiochipN).
 *
 *   bun run server.ts examples/gpio.ts --socket /tmp/gpio.sock --lines 8 --names "LED,,BUTTON" --levels 0x4
 *
 * Queues: requestq (0) carries one request (8 device-readable bytes) and
 * one response (device-writable: 2 bytes, 1 + gpio_names_size for
 * GET_NAMES) per chain. A request that is malformed, of an unknown type or
 * for a line past `ngpio` is answered with status ERR; a chain with no room
 * for a response is completed with nothing written.
 *
 * Interrupts are not offered (no VIRTIO_GPIO_F_IRQ, so SET_IRQ_TYPE answers
 * ERR): the eventq holds one buffer pair per line until that line's
 * interrupt fires, but a request taken from a receive queue counts as in
 * flight, and stopping a ring (GET_VRING_BASE), a memory change, a queue
 * move and a reload all wait for requests in flight, so held eventq buffers
 * would stall them until an interrupt. The eventq (1) is still there, as
 * QEMU's vhost-user-gpio-pci sets up two queues: a buffer the driver posts
 * there is returned at once with VIRTIO_GPIO_IRQ_STATUS_INVALID, what
 * §5.17.6.6 asks for an interrupt that was never enabled.
 *
 * Line state lives in a SharedArrayBuffer made by prepare(), so every
 * thread's instance (--threads N) sees the same lines and saveState() on any
 * of them is the whole bank; it moves with a reload and with DEVICE_STATE.
 *
 * Tested through the test kit's driver only (tests/examples/gpio.test.ts):
 * QEMU 7.2 has vhost-user-gpio-pci, but the Debian 6.1 guest kernel here is
 * built without CONFIG_GPIO_VIRTIO, so no guest can drive it.
 */
import {
  OptionError, VIRTIO_ID_GPIO, type Device, type DeviceOptions, type OptionValues, type Request,
} from "../src/index.ts";

/** §5.17.2 */
const REQUESTQ = 0, EVENTQ = 1;
/** §5.17.6 message types */
const VIRTIO_GPIO_MSG_GET_NAMES = 0x0001, VIRTIO_GPIO_MSG_GET_DIRECTION = 0x0002, VIRTIO_GPIO_MSG_SET_DIRECTION = 0x0003,
  VIRTIO_GPIO_MSG_GET_VALUE = 0x0004, VIRTIO_GPIO_MSG_SET_VALUE = 0x0005, VIRTIO_GPIO_MSG_SET_IRQ_TYPE = 0x0006;
const VIRTIO_GPIO_STATUS_OK = 0x0, VIRTIO_GPIO_STATUS_ERR = 0x1;
const VIRTIO_GPIO_DIRECTION_NONE = 0x00, VIRTIO_GPIO_DIRECTION_OUT = 0x01, VIRTIO_GPIO_DIRECTION_IN = 0x02;
/** §5.17.7 */
const VIRTIO_GPIO_IRQ_STATUS_INVALID = 0x0;
/** struct virtio_gpio_request: le16 type, le16 gpio, le32 value. struct virtio_gpio_response: u8 status, u8 value. */
const REQUEST_SIZE = 8, RESPONSE_SIZE = 2;
/** struct virtio_gpio_config: le16 ngpio, u8 padding[2], le32 gpio_names_size. */
const CONFIG_SIZE = 8;

/** One byte per line in the shared state: the direction, the output value, the input level (from --levels). */
const DIR_MASK = 0x03, VALUE_BIT = 0x04, LEVEL_BIT = 0x08;
const STATE_VERSION = 1;

export const options = {
  lines: { type: "number", default: 8, min: 1, max: 65535, help: "number of GPIO lines (ngpio)" },
  names: { type: "string", metavar: "LIST", help: "line names in line order, comma-separated; an empty entry leaves a line unnamed" },
  levels: { type: "string", metavar: "MASK", help: "levels sensed on input lines: a bit mask, bit N for line N (e.g. 0x5); default all low" },
} satisfies DeviceOptions;

export interface GpioOptions {
  lines: number;
  /** The names block of GET_NAMES (one NUL-terminated string per line), empty without --names. */
  names: Uint8Array;
  /** One byte per line, shared by every thread's instance. */
  state: SharedArrayBuffer;
}

export function prepare(v: OptionValues): GpioOptions {
  const lines = Number(v.lines ?? 8);
  if (!Number.isInteger(lines) || lines < 1 || lines > 65535) throw new OptionError(`--lines ${v.lines}: an integer 1..65535`);
  let names = new Uint8Array(0);
  if (v.names !== undefined) {
    const list = String(v.names).split(",");
    if (list.length > lines) throw new OptionError(`--names: ${list.length} names for ${lines} lines`);
    const seen = new Set<string>();
    for (const n of list) {
      // §5.17.6.1: 7-bit ASCII, unique within the device.
      if (!/^[\x20-\x7e]*$/.test(n)) throw new OptionError(`--names: "${n}" is not printable 7-bit ASCII`);
      if (n && seen.has(n)) throw new OptionError(`--names: "${n}" given twice (names are unique)`);
      seen.add(n);
    }
    while (list.length < lines) list.push("");
    names = new TextEncoder().encode(list.map((n) => n + "\0").join(""));
  }
  let levels = 0n;
  if (v.levels !== undefined) {
    try {
      levels = BigInt(String(v.levels));
    } catch {
      throw new OptionError(`--levels ${v.levels}: a number such as 0x5 or 5`);
    }
    if (levels < 0n || levels >> BigInt(lines) !== 0n) throw new OptionError(`--levels ${v.levels}: bits 0..${lines - 1} only`);
  }
  const state = new SharedArrayBuffer(lines);
  const s = new Uint8Array(state);
  for (let i = 0; i < lines; i++) if ((levels >> BigInt(i)) & 1n) s[i] = LEVEL_BIT;
  return { lines, names, state };
}

export function describe(o: GpioOptions): string {
  return `${o.lines} simulated lines${o.names.length ? ", named" : ""}`;
}

export default function create(o: GpioOptions): Device {
  const lines = new Uint8Array(o.state);
  const cfg = new Uint8Array(CONFIG_SIZE);
  const dv = new DataView(cfg.buffer);
  dv.setUint16(0, o.lines, true);
  dv.setUint32(4, o.names.length, true);

  function respond(req: Request, status: number, value = 0): void {
    req.out.writeU8(status);
    req.out.writeU8(value);
  }

  /** §5.17.6: one request, one response; every field of the response is written. */
  function request(req: Request): void {
    if (req.out.remaining < RESPONSE_SIZE) return;
    if (req.in.length !== REQUEST_SIZE) return respond(req, VIRTIO_GPIO_STATUS_ERR);
    const type = req.in.readU16(), gpio = req.in.readU16(), value = req.in.readU32();
    if (type === VIRTIO_GPIO_MSG_GET_NAMES) {
      if (o.names.length === 0 || req.out.remaining < 1 + o.names.length) return respond(req, VIRTIO_GPIO_STATUS_ERR);
      req.out.writeU8(VIRTIO_GPIO_STATUS_OK);
      req.out.copyFrom(o.names);
      return;
    }
    if (gpio >= o.lines) return respond(req, VIRTIO_GPIO_STATUS_ERR);
    const line = lines[gpio]!;
    const dir = line & DIR_MASK;
    switch (type) {
      case VIRTIO_GPIO_MSG_GET_DIRECTION:
        return respond(req, VIRTIO_GPIO_STATUS_OK, dir);
      case VIRTIO_GPIO_MSG_SET_DIRECTION:
        if (value === VIRTIO_GPIO_DIRECTION_NONE) lines[gpio] = line & LEVEL_BIT; // §5.17.6 device requirements: the line's state is discarded
        else if (value === VIRTIO_GPIO_DIRECTION_OUT || value === VIRTIO_GPIO_DIRECTION_IN) lines[gpio] = (line & ~DIR_MASK) | value;
        else return respond(req, VIRTIO_GPIO_STATUS_ERR);
        return respond(req, VIRTIO_GPIO_STATUS_OK);
      case VIRTIO_GPIO_MSG_GET_VALUE:
        if (dir === VIRTIO_GPIO_DIRECTION_OUT) return respond(req, VIRTIO_GPIO_STATUS_OK, line & VALUE_BIT ? 1 : 0);
        if (dir === VIRTIO_GPIO_DIRECTION_IN) return respond(req, VIRTIO_GPIO_STATUS_OK, line & LEVEL_BIT ? 1 : 0);
        return respond(req, VIRTIO_GPIO_STATUS_ERR); // an inactive line senses nothing
      case VIRTIO_GPIO_MSG_SET_VALUE:
        // Kept whatever the direction (§5.17.6.5): drivers set the value before switching a line to output.
        if (value > 1) return respond(req, VIRTIO_GPIO_STATUS_ERR);
        lines[gpio] = value ? line | VALUE_BIT : line & ~VALUE_BIT;
        return respond(req, VIRTIO_GPIO_STATUS_OK);
      case VIRTIO_GPIO_MSG_SET_IRQ_TYPE: // only with VIRTIO_GPIO_F_IRQ, not offered
      default:
        return respond(req, VIRTIO_GPIO_STATUS_ERR);
    }
  }

  return {
    name: "gpio",
    type: VIRTIO_ID_GPIO,
    queues: 2,
    queueSize: 256,
    features: 0n,
    config: () => cfg,
    handle(req) {
      if (req.queue === REQUESTQ) return request(req);
      if (req.queue === EVENTQ && req.out.remaining >= 1) req.out.writeU8(VIRTIO_GPIO_IRQ_STATUS_INVALID);
    },
    reset() {
      for (let i = 0; i < o.lines; i++) lines[i] = lines[i]! & LEVEL_BIT;
    },
    saveState() {
      // Version, ngpio, then direction and output value per line (levels belong to the outside, not the device).
      const s = new Uint8Array(3 + o.lines);
      s[0] = STATE_VERSION;
      s[1] = o.lines & 0xff;
      s[2] = o.lines >> 8;
      for (let i = 0; i < o.lines; i++) s[3 + i] = lines[i]! & (DIR_MASK | VALUE_BIT);
      return s;
    },
    loadState(s) {
      if (s.length < 3 || s[0] !== STATE_VERSION) throw new Error(`gpio state: version ${s[0]} (${s.length} bytes): expected version ${STATE_VERSION}`);
      const n = s[1]! | (s[2]! << 8);
      if (n !== o.lines || s.length !== 3 + n) throw new Error(`gpio state: ${n} lines in ${s.length} bytes: this device has ${o.lines} lines (--lines)`);
      for (let i = 0; i < n; i++) {
        const b = s[3 + i]!;
        if (b & ~(DIR_MASK | VALUE_BIT) || (b & DIR_MASK) > VIRTIO_GPIO_DIRECTION_IN) throw new Error(`gpio state: line ${i}: bad byte 0x${b.toString(16)}`);
      }
      for (let i = 0; i < n; i++) lines[i] = (lines[i]! & LEVEL_BIT) | s[3 + i]!;
    },
  };
}

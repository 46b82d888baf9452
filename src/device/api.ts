/**
 * Everything a device sees. A device declares its features and config space
 * and handles one request (one descriptor chain) at a time per call; the
 * framework pops chains, checks them, tracks them in flight, publishes the
 * used ring and notifies the driver. A device never holds a pointer, a
 * socket or an fd of the front-end.
 *
 * @example
 * // A whole entropy device:
 * const rng: Device = {
 *   name: "rng", type: VIRTIO_ID_RNG, queues: 1, queueSize: 256, features: 0n,
 *   config: () => new Uint8Array(0),
 *   handle(req) { req.out.forEach(req.out.remaining, (v) => crypto.getRandomValues(v)); },
 * };
 */
import type { ChainReader, ChainWriter } from "../virtq/chain_io.ts";
import type { EventLoop } from "./loop.ts";
export type { EventLoop } from "./loop.ts";
export type { ChainReader, ChainWriter } from "../virtq/chain_io.ts";
export { ChainRangeError } from "../virtq/chain_io.ts";

/** One request: a descriptor chain popped from queue `queue`. */
export interface Request {
  /** Index of the queue it came from. */
  readonly queue: number;
  /** Head descriptor index (unique among the queue's requests in flight). */
  readonly head: number;
  /** The device-readable buffers (driver → device). */
  readonly in: ChainReader;
  /** The device-writable buffers (device → driver); the used length is `out.pos` at completion. */
  readonly out: ChainWriter;
  /**
   * Completes a request whose handle() returned PENDING (call exactly once,
   * on the thread that handled it). Until then the request counts as in
   * flight: stop, quiesce, memory changes, queue moves and disconnects wait
   * for it, so its buffers stay mapped.
   */
  complete(): void;
}

/**
 * What handle() returns when the request completes later through
 * `req.complete()`: the asynchronous path without a Promise per request
 * (e.g. a read submitted to io_uring, completed from its eventfd callback).
 * @example
 * handle(req) { ring.read(req.out, pos, len, req, (r) => r.complete()); return PENDING; }
 */
export const PENDING: unique symbol = Symbol("PENDING");

export interface Device {
  /** Short name for logs ("blk"). */
  readonly name: string;
  /** VIRTIO device id (2 for block). */
  readonly type: number;
  /** Number of queues offered (GET_QUEUE_NUM). */
  readonly queues: number;
  /** Largest queue size accepted (a power of two ≤ 32768). */
  readonly queueSize: number;
  /**
   * Within one drain of a queue (a kick's worth of chains), publish the
   * completions every this many (used index stored, the driver notified if
   * it asks). Default 4: the driver reaps and refills while the device
   * works, which suits storage (measured: 1.8x IOPS at QD128). 0: once per
   * drain, one publish and at most one interrupt per burst (network TX,
   * where a completion only frees a buffer).
   */
  readonly publishEvery?: number;
  /** Device-specific feature bits (below bit 24, plus any device bits above 41); ring and transport bits belong to the framework. */
  readonly features: bigint;
  /** The current config space (GET_CONFIG reads a slice of it; the framework checks offset and size). */
  config(): Uint8Array;
  /** SET_CONFIG: the framework has checked that `offset + data.length` lies within config(). */
  setConfig?(offset: number, data: Uint8Array): void;
  /** Called with the negotiated features when the driver sets them (SET_FEATURES), in every thread's instance. */
  setFeatures?(features: bigint): void;
  /**
   * Handles one request. Returning (or resolving) completes it; returning
   * PENDING means the device calls `req.complete()` later (no Promise per
   * request); throwing (or rejecting) with a ChainRangeError means the driver
   * gave buffers too small for the request: the framework then completes it
   * with whatever was written.
   */
  handle(req: Request): void | Promise<void> | typeof PENDING;
  /**
   * The event loop of the thread this instance serves queues on, given once
   * before its first request (each I/O thread builds its own instance; the
   * main thread's instance gets Bun's main loop). A device that completes
   * requests from fd events (io_uring's eventfd) watches them here; without
   * attach() it must complete synchronously.
   */
  attach?(loop: EventLoop, queues?: Queues): void;
  /**
   * Receive queues: queues whose buffers wait until the device has something
   * to put in them (input events, network RX, console input). The framework
   * does not pop these or call handle() for them; it calls available() when
   * the driver adds buffers, and the device takes one with
   * `queues.take(queue)` (the Queues given to attach()) when it has data, so
   * nothing is held while the ring stops, moves or reloads.
   * @example
   * receiveQueues: [0],
   * available(q) { while (this.backlog.length && (req = this.queues.take(q))) fill(req), req.complete(); }
   */
  readonly receiveQueues?: readonly number[];
  /** The driver made buffers available on a receive queue (kick, start, resume, enable). */
  available?(queue: number): void;
  /**
   * Busy polling (server.ts --poll-us): completes what finished without
   * waiting for its fd event (e.g. reaps the io_uring CQ); returns whether it
   * found anything. Must not block.
   */
  poll?(): boolean;
  /**
   * Re-reads what may have changed outside (e.g. an image resized by its
   * owner); returns true when the config space changed, and the framework
   * then tells the driver (CONFIG_CHANGE_MSG over the back-end channel).
   */
  refresh?(): boolean;
  /**
   * Network devices: the front-end set the MTU (NET_SET_MTU; offering
   * PROTOCOL_F_NET_MTU), in every thread's instance. Throw to refuse it.
   */
  setMtu?(mtu: number): void;
  /**
   * Network devices: the guest moved here (live migration) and cannot
   * announce itself, so the front-end asks the device to (SEND_RARP; offering
   * PROTOCOL_F_RARP): broadcast a frame from `mac` so switches learn where it
   * is now. Called in every thread's instance.
   */
  announce?(mac: Uint8Array): void;
  /** The driver reset the device (RESET_OWNER, RESET_DEVICE, disconnect). */
  reset?(): void;
  /** The server is shutting down: release backing resources. */
  close?(): void;
  /**
   * Migration (DEVICE_STATE): the device's own state as bytes, called only
   * while every ring is stopped. Keep it small and versioned.
   * @example saveState() { return new Uint8Array([1, this.mode]); }
   */
  saveState?(): Uint8Array;
  /**
   * Restores what saveState() produced on another server (rings stopped);
   * throws (with a message the front-end's operator can act on) when the
   * bytes are malformed, of another version, or do not fit this device.
   */
  loadState?(data: Uint8Array): void;
}

/**
 * Access to this thread's rings for receive queues (Device.receiveQueues):
 * `take(q)` pops the next chain the driver made available on queue `q` of
 * this instance's thread, or returns null when there is none or the queue is
 * not running here (not started, paused for a memory change, a move or a
 * reload, or served by another thread). Complete a taken request with
 * `req.complete()`, at once or later; published once per microtask turn.
 */
export interface Queues {
  take(queue: number): Request | null;
  /**
   * Returns taken requests unused, newest first (e.g. a network packet that
   * needs three buffers when only two were there): each must be the last one
   * taken from its queue and not completed. Returns false when it cannot;
   * complete the request instead.
   * @example
   * const got = []; while (need > 0 && (r = queues.take(q))) got.push(r), need -= r.out.remaining;
   * if (need > 0) while (got.length) queues.giveBack(got.pop()!); // wait for more buffers
   */
  giveBack(req: Request): boolean;
}

/**
 * A command-line option a device declares (`--NAME VALUE`, or `--NAME` for a
 * boolean); the CLI builds usage, `--help` and errors from these.
 * @example
 * export const options = {
 *   rate: { type: "number", default: 0, min: 0, help: "bytes per second, 0: unlimited" },
 *   events: { type: "string", metavar: "PATH", help: "socket to read events from" },
 * } satisfies DeviceOptions;
 */
export interface DeviceOption {
  /** "size": bytes, or a number with K, M, G or T (powers of 1024). */
  readonly type: "string" | "number" | "boolean" | "size";
  readonly help: string;
  readonly default?: string | number | boolean;
  /** Allowed values of a string option. */
  readonly choices?: readonly string[];
  /** Bounds of a number or size option (inclusive). */
  readonly min?: number;
  readonly max?: number;
  /** A string option that may be given several times: its value is a string[] (empty when absent). */
  readonly multiple?: boolean;
  /** Placeholder in the usage ("PATH"); default from the type. */
  readonly metavar?: string;
}
export type DeviceOptions = Readonly<Record<string, DeviceOption>>;
/** Parsed option values by declared name; absent when not given and without a default. */
export type OptionValues = Record<string, string | number | boolean | string[] | undefined>;

/** Where a device instance runs: each thread serving queues builds its own instance. */
export interface DeviceContext {
  /** "main" (Bun's main thread) or the I/O thread's name ("io0", "io1", …). */
  readonly thread: string;
  /** The server's logger (lines "bunvhost: LEVEL: ..." on stderr; a thread's carry its name). */
  readonly log: DeviceLog;
  /**
   * Which socket this instance serves (0 unless the module is `multiPort`):
   * the index of its `--socket` in the order given.
   */
  readonly port?: number;
}

/** A leveled logger, as devices get it. */
export interface DeviceLog {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

/** A module's default export when it builds its device from options (called once per thread). */
export type DeviceFactory<O = OptionValues> = (options: O, ctx: DeviceContext) => Device | Promise<Device>;

/**
 * What a device module (a file given to `bun run server.ts FILE`) exports;
 * everything but `default` is optional.
 * @example
 * // mydev.ts
 * export const options = { size: { type: "size", default: "4K", help: "buffer size" } } satisfies DeviceOptions;
 * export default (o: OptionValues): Device => ({ name: "mydev", type: 42, ... });
 */
export interface DeviceModule {
  /** The device itself, or a factory called with the options in every thread. */
  default: Device | DeviceFactory<any>;
  /** Options the device takes on the command line. */
  options?: DeviceOptions;
  /**
   * Runs once on the main thread before any instance is built: turns the
   * parsed option values into what every thread's factory receives. The
   * result must be structured-cloneable (it is posted to the I/O threads); a
   * SharedArrayBuffer in it is shared memory between all instances. Throw to
   * refuse the options (the server exits 1 with the message).
   */
  prepare?(values: OptionValues, ctx: PrepareContext): unknown;
  /** Common options this device prefers by default, e.g. `{ threads: 0 }` for a device fed by Bun I/O (sockets, timers), which needs the main loop. */
  defaults?: { threads?: number };
  /**
   * The device serves several sockets (`--socket` given more than once), one
   * front-end each: every thread builds one instance per socket, told its
   * index in `ctx.port`, and the instances of one thread share the module's
   * state (what a switch between ports needs; put all queues on one thread
   * to let every port see every other). Not reloadable.
   */
  multiPort?: boolean;
  /** One line for the start message, from the prepared options ("RAM disk of 256 MiB"). */
  describe?(prepared: any): string;
}

/** What prepare() is told: the thread count and a logger for warnings. */
export interface PrepareContext {
  /** I/O threads that will build instances (0: only the main thread). */
  readonly threads: number;
  /** Sockets served (more than 1 only for a multiPort module). */
  readonly ports?: number;
  readonly log: DeviceLog;
}

/**
 * Thrown by prepare() when option values do not fit together: the server
 * prints the message with the usage and exits 2 (other errors exit 1).
 * @example if (v.image && v.size) throw new OptionError("give at most one of --image, --size");
 */
export class OptionError extends Error {
  override name = "OptionError";
}

/** VIRTIO device ids (VIRTIO 1.2 §5). */
export const VIRTIO_ID_NET = 1, VIRTIO_ID_BLOCK = 2, VIRTIO_ID_CONSOLE = 3, VIRTIO_ID_RNG = 4, VIRTIO_ID_SCSI = 8,
  VIRTIO_ID_GPU = 16, VIRTIO_ID_INPUT = 18, VIRTIO_ID_VSOCK = 19, VIRTIO_ID_CRYPTO = 20, VIRTIO_ID_FS = 26,
  VIRTIO_ID_SOUND = 25, VIRTIO_ID_I2C = 34, VIRTIO_ID_GPIO = 41;

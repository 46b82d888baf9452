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
  /** Device-specific feature bits (below bit 24, plus any device bits above 41); ring and transport bits belong to the framework. */
  readonly features: bigint;
  /** The current config space (GET_CONFIG reads a slice of it; the framework checks offset and size). */
  config(): Uint8Array;
  /** SET_CONFIG: the framework has checked that `offset + data.length` lies within config(). */
  setConfig?(offset: number, data: Uint8Array): void;
  /** Called with the negotiated features when the driver sets them (SET_FEATURES). */
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
  attach?(loop: EventLoop): void;
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

/** VIRTIO device ids (VIRTIO 1.2 §5). */
export const VIRTIO_ID_NET = 1, VIRTIO_ID_BLOCK = 2, VIRTIO_ID_CONSOLE = 3, VIRTIO_ID_RNG = 4;

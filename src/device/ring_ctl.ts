/**
 * The control surface of one virtqueue, wherever it runs: on the main loop
 * (Vring) or in an I/O thread (RemoteVring). VuDev drives rings only through
 * this, awaiting each call, so a ring in another thread changes state in
 * order and a stop or detach returns only once that thread is done with it.
 *
 * Fds (kick, call, err) handed to a ring belong to it from then on: it
 * closes them when they are replaced or on reset, and gives them back
 * unclosed with release() when the ring moves to another loop.
 */
import type { VringAddr } from "../protocol/messages.ts";

/** One ring's area of the INFLIGHT_SHMFD buffer, mapped by the main thread (plain data, for any thread). */
export interface InflightArea { host: number; size: number; queueSize: number }

/** The dirty log bitmap (SET_LOG_BASE), mapped by the main thread; null while logging is off. */
export interface LogArea { host: number; size: number }

/** Everything needed to recreate a ring on another loop, exactly where it stopped. */
export interface RingState {
  num: number;
  addr: VringAddr | null;
  base: number;
  eventIdx: boolean;
  inOrder: boolean;
  packed: boolean;
  enabled: boolean;
  started: boolean;
  kickFd: number;
  callFd: number;
  errFd: number;
  inflight: InflightArea | null;
  log: LogArea | null;
}

export interface RingCtl {
  readonly index: number;
  /** Where it runs, for logs ("main", "io1"). */
  readonly where: string;
  num: number;
  addr: VringAddr | null;
  readonly started: boolean;
  setEventIdx(on: boolean): void | Promise<void>;
  /** VIRTIO_F_IN_ORDER negotiated (set at SET_FEATURES, with the layout). */
  setInOrder(on: boolean): void | Promise<void>;
  /** INFLIGHT_SHMFD area for this ring (null: none); used from the next ring start. */
  setInflight(a: InflightArea | null): void | Promise<void>;
  /** Dirty logging for live migration: mark every guest page this ring writes (null: off). */
  setLog(a: LogArea | null): void | Promise<void>;
  /** Split or packed ring (VIRTIO_F_RING_PACKED), chosen at SET_FEATURES. */
  setLayout(packed: boolean): void | Promise<void>;
  readonly packed: boolean;
  /** SET_VRING_BASE; throws VirtqError when out of range. */
  setBase(num: number): void | Promise<void>;
  setKick(fd: number): void | Promise<void>;
  setCall(fd: number): void | Promise<void>;
  setErr(fd: number): void | Promise<void>;
  setEnabled(on: boolean): void | Promise<void>;
  /** Translates `addr` through guest memory and points the walker at the rings; throws GuestMemoryError. */
  mapRings(): void | Promise<void>;
  /** GET_VRING_BASE: stop taking chains, complete in-flight ones, return the base. */
  stop(): Promise<number>;
  /** Stop taking chains and wait until none is in flight (state kept). */
  quiesce(): Promise<void>;
  /** Undo quiesce. */
  resume(): void | Promise<void>;
  /** Drop every view over guest memory (after quiesce, before unmapping). */
  detachRings(): void | Promise<void>;
  /** Forget everything and close the fds (after quiesce). */
  reset(): void | Promise<void>;
  /** Quiesce, then hand the whole state over (fds unclosed) and forget it. */
  release(): Promise<RingState>;
}

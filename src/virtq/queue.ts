/**
 * What the device layer needs from a virtqueue, whatever its layout: split
 * (split.ts) or packed (packed.ts). A device never sees this; Vring drives it.
 */
import type { VirtqError } from "../errors.ts";
import type { Span } from "../memory/guest_memory.ts";
import type { Pieces } from "../memory/pieces.ts";

export interface VirtQueue {
  readonly index: number;
  readonly layout: "split" | "packed";
  /** Ring size (0 until setRings). */
  readonly size: number;
  /** VIRTIO_F_EVENT_IDX (split) / event suppression structures (packed) negotiated. */
  eventIdx: boolean;
  /** Set when the driver broke the ring rules; the queue does nothing more until setRings. */
  broken: VirtqError | null;
  readonly ready: boolean;

  /**
   * Points the queue at its three areas (split: descriptor table, avail
   * ring, used ring; packed: descriptor ring, driver event suppression,
   * device event suppression), translated and bounds-checked by the caller
   * to `ringBytes(size)` each.
   */
  setRings(size: number, desc: Span, driver: Span, device: Span): void;
  /** Forgets every view over guest memory. */
  detach(): void;

  /**
   * Takes the next available chain, appending its buffers to `r`
   * (device-readable) and `w` (device-writable), both reset first. Returns
   * the chain's id (split: head index; packed: buffer id), below `size`,
   * or -1 when the ring is empty. Throws VirtqError (and sets `broken`).
   */
  pop(r: Pieces, w: Pieces): number;
  /** Marks chain `id` used with `len` bytes written (visible after flush). */
  push(id: number, len: number): void;
  /** Publishes pushed entries; returns whether the driver wants an interrupt. */
  flush(): boolean;
  /** Re-enables kicks; returns true if chains arrived meanwhile (process them before sleeping). */
  enableNotification(): boolean;
  /** Asks the driver not to kick while we process. */
  disableNotification(): void;

  /** The vhost-user ring base (GET_VRING_BASE); packed: index | wrap << 15 for avail (and used in the high half). */
  getBase(): number;
  /** SET_VRING_BASE; throws VirtqError on a value out of range. */
  setBase(num: number): void;
}

/** Bytes of each of the three areas for a ring of `n` entries. */
export interface RingSizes {
  desc(n: number): number;
  driver(n: number): number;
  device(n: number): number;
}

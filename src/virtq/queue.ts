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
  /**
   * VIRTIO_F_IN_ORDER negotiated: buffers are used in the order they were
   * made available (completions held back by `push` until their turn), and a
   * run of them may be published as one used entry (see InOrderHold).
   */
  inOrder: boolean;
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
  /**
   * Puts back chain `id`, popped last and not pushed, as if never popped (a
   * receive queue's buffer the device took but cannot use). Returns false,
   * changing nothing, when `id` is not the last chain popped (or its ring
   * entry changed, or an inflight area tracks this packed ring).
   */
  unpop(id: number): boolean;
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

/**
 * VIRTIO_F_IN_ORDER for either layout (VIRTIO 1.2 §2.7.9 and the packed ring's "In-order
 * use of descriptors"): the device must use buffers in the order they were
 * made available, but our devices may complete them in any order
 * (asynchronous backings). `taken` records each id as it is popped; `done`
 * records a completion and hands every completion whose turn has come, in
 * pop order, to `emit`. Nothing is allocated per request.
 *
 * Batching, the queues' side: the spec lets the device write one used entry
 * (the id of the last buffer of a run) for a whole run. A driver cannot know
 * the lengths of the buffers it skips; it takes them as fully written (Linux
 * does: the chain's whole device-writable length). So a run is extended only
 * while each buffer but the last was written whole (`full(id)` bytes), and
 * the exact length of every buffer survives.
 * @example
 * const h = new InOrderHold(); h.reset(4);
 * h.taken(2); h.taken(0);
 * h.done(0, 1, emit); // nothing yet: 2 was made available first
 * h.done(2, 9, emit); // emit(2, 9), then emit(0, 1)
 */
export class InOrderHold {
  private ord = new Uint16Array(0);
  private lens = new Uint32Array(0);
  private isDone = new Uint8Array(0);
  private head = 0;
  private count = 0;

  /** Forgets everything; room for `size` ids. */
  reset(size: number): void {
    if (this.ord.length !== size) {
      this.ord = new Uint16Array(size);
      this.lens = new Uint32Array(size);
      this.isDone = new Uint8Array(size);
    } else {
      this.isDone.fill(0);
    }
    this.head = 0;
    this.count = 0;
  }

  /** Ids taken and not yet emitted. */
  get pending(): number {
    return this.count;
  }

  /** Id `id` was popped (the next in availability order). */
  taken(id: number): void {
    const n = this.ord.length;
    if (this.count === n) throw new RangeError(`in-order: more than ${n} buffers in flight`);
    let at = this.head + this.count;
    if (at >= n) at -= n;
    this.ord[at] = id;
    this.count++;
  }

  /** Forgets `id` if it is the last id taken (given back unused); returns whether it was. */
  untaken(id: number): boolean {
    if (this.count === 0) return false;
    const n = this.ord.length;
    let at = this.head + this.count - 1;
    if (at >= n) at -= n;
    if (this.ord[at] !== id) return false;
    this.count--;
    return true;
  }

  /** Id `id` completed with `len` bytes written; emits every completion whose turn has come. */
  done(id: number, len: number, emit: (id: number, len: number) => void): void {
    this.isDone[id] = 1;
    this.lens[id] = len;
    const n = this.ord.length;
    while (this.count > 0) {
      const h = this.ord[this.head]!;
      if (this.isDone[h] === 0) break;
      this.isDone[h] = 0;
      if (++this.head === n) this.head = 0;
      this.count--;
      emit(h, this.lens[h]!);
    }
  }
}

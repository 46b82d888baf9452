/**
 * One error class per layer; switch on `code`, never on message text.
 * `isPeerFault` is the one place that decides what an error means: a fault of
 * the front-end or guest ends that connection (or breaks the queue) and the
 * server keeps listening; anything else is our bug.
 */
export { ErrnoError } from "../ffi/errno.ts";

/**
 * A malformed vhost-user message: names the request and the field.
 * @example new ProtocolError("SET_VRING_ADDR", "descriptor", "not 16-byte aligned (0x1008)")
 *   // message: "SET_VRING_ADDR.descriptor: not 16-byte aligned (0x1008)"
 */
export class ProtocolError extends Error {
  override name = "ProtocolError";
  constructor(readonly request: string, readonly field: string, readonly detail: string) {
    super(`${request}.${field}: ${detail}`);
  }
}

/** A guest address range that is not entirely inside guest memory. */
export class GuestMemoryError extends Error {
  override name = "GuestMemoryError";
  constructor(readonly addr: number, readonly len: number, readonly detail = "not in guest memory") {
    super(`guest range 0x${addr.toString(16)}+0x${len.toString(16)}: ${detail}`);
  }
}

export type VirtqCode =
  | "AVAIL_IDX_JUMP" | "HEAD_RANGE" | "NEXT_RANGE" | "LOOP" | "NESTED_INDIRECT" | "INDIRECT_LEN"
  | "INDIRECT_NEXT" | "ORDER" | "ZERO_LEN" | "TOTAL_LEN" | "BAD_ADDR" | "USED_HEAD" | "USED_LEN"
  | "RING_ADDR" | "NOT_READY" | "HEAD_BUSY";

/**
 * A guest broke the virtqueue rules; the queue is marked broken.
 * @example new VirtqError("LOOP", 0, 7, "chain longer than 256")
 */
export class VirtqError extends Error {
  override name = "VirtqError";
  constructor(readonly code: VirtqCode, readonly queue: number, readonly index: number, detail = "") {
    super(`queue ${queue}: ${code} at ${index}${detail && `: ${detail}`}`);
  }
}

/** True for errors caused by the peer (front-end or guest), false for our own bugs. */
export function isPeerFault(e: unknown): boolean {
  return e instanceof ProtocolError || e instanceof GuestMemoryError || e instanceof VirtqError ||
    (e instanceof Error && e.name === "ErrnoError");
}

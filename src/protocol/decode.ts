/**
 * Decoding with validation: every value from the peer is checked here, once.
 *
 * A caller reads the 12-byte header, runs {@link decodeHeader}, reads exactly
 * `size` payload bytes (and the fds that came with the header), then calls the
 * decoder for its direction. Any malformed message throws a `ProtocolError`
 * naming the request and the field (`SET_MEM_TABLE.nregions: 9 regions, at
 * most 8`); the caller then closes the message's fds and the connection.
 * Field names are paths into {@link Message} (`addr.desc`, `regions[2].memorySize`),
 * plus `flags`, `size`, `fds` and `request` for the header and the fd count.
 */
import { ProtocolError } from "../errors.ts";
import {
  FLAG_KNOWN_MASK, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, IOTLB_ACCESS_FAIL, IOTLB_ACCESS_RW,
  IOTLB_INVALIDATE, IOTLB_MISS, IOTLB_UPDATE, MAX_CONFIG_SIZE, MAX_MEM_REGIONS, MAX_PAYLOAD, MAX_QUEUES,
  MAX_SHMEM_REGIONS, SHMEM_MAP_RW, Size, VHOST_USER_VERSION, VHOST_VRING_F_LOG, VRING_IDX_MASK,
  VRING_NOFD_MASK, BACKEND_REQUEST_NAMES, BackendReq, REQUEST_NAMES, Req, backendRequestName, requestName,
  type ConfigSpace, type InflightInfo, type IotlbMsg, type LogInfo, type MemRegion, type Message, type ShmemConfig,
  type ShmemMap, type VringAddr, type VringArea, type VringFd, type VringState,
} from "./messages.ts";

/** A decoded header; `size` is the payload length that follows. */
export interface Header { request: number; flags: number; size: number }

/** Limits the decoder checks beyond the wire format. */
export interface DecodeOptions {
  /** Queue indices must be below this (default {@link MAX_QUEUES}, what an 8-bit vring index can name). */
  queues?: number;
}

const TWO_32 = 2 ** 32;
const LIMIT = 2 ** 53;
/** A u64 whose high half reaches this is ≥ 2^53: not an address we can hold in a number. */
const HI_LIMIT = 2 ** 21;
/** SET_VRING_KICK/CALL/ERR and VRING_HOST_NOTIFIER_MSG: only the index bits and the no-fd bit exist. */
const VRING_U64_MASK = VRING_IDX_MASK | VRING_NOFD_MASK;

/**
 * Decodes and checks a message header: version 1, no flag bits beyond 0x0f, size ≤ MAX_PAYLOAD.
 * @param dv holds at least 12 bytes at `off`
 * @param off byte offset of the header in `dv`
 * @param backend name the request from the back-end request table in errors (back-end channel)
 * @returns the header; the payload of `size` bytes follows it
 * @throws ProtocolError on a bad version, reserved flag bits or an oversized payload
 * @example
 * const dv = new DataView(new ArrayBuffer(12));
 * dv.setUint32(0, Req.GET_FEATURES, true); dv.setUint32(4, 1, true);
 * decodeHeader(dv); // { request: 1, flags: 1, size: 0 }
 */
export function decodeHeader(dv: DataView, off = 0, backend = false): Header {
  const request = dv.getUint32(off, true);
  const flags = dv.getUint32(off + 4, true);
  const size = dv.getUint32(off + 8, true);
  if ((flags & FLAG_VERSION_MASK) !== VHOST_USER_VERSION) {
    throw new ProtocolError(name(request, backend), "flags", `version ${flags & FLAG_VERSION_MASK}, expected ${VHOST_USER_VERSION}`);
  }
  if ((flags & ~FLAG_KNOWN_MASK) !== 0) {
    throw new ProtocolError(name(request, backend), "flags", `reserved bits 0x${((flags & ~FLAG_KNOWN_MASK) >>> 0).toString(16)} set`);
  }
  if (size > MAX_PAYLOAD) {
    throw new ProtocolError(name(request, backend), "size", `${size} exceeds ${MAX_PAYLOAD}`);
  }
  return { request, flags, size };
}

/**
 * Decodes a front-end request (front-end → back-end) and checks it completely: known request id,
 * exact payload size for its layout, the right number of fds, and every count, index and address.
 * @param h the header from {@link decodeHeader}
 * @param payload exactly `h.size` bytes
 * @param fds the fds received with the header; never closed here
 * @param opts `queues` bounds every vring index
 * @returns a Message with exactly the payload field of the request's layout set
 * @throws ProtocolError naming the request and field
 * @example
 * const buf = new DataView(new ArrayBuffer(8));
 * buf.setUint32(0, 1, true); buf.setUint32(4, 256, true);
 * const m = decodeRequest({ request: Req.SET_VRING_NUM, flags: 1, size: 8 }, buf, []);
 * m.state; // { index: 1, num: 256 }
 */
export function decodeRequest(h: Header, payload: DataView, fds: number[], opts?: DecodeOptions): Message {
  const req = h.request;
  const nm = requestName(req);
  const n = payloadLength(h, payload);
  if ((h.flags & FLAG_REPLY) !== 0) throw new ProtocolError(nm, "flags", "reply bit set on a request");
  const queues = opts?.queues ?? MAX_QUEUES;
  const m: Message = { request: req, flags: h.flags, fds };
  switch (req) {
    case Req.GET_FEATURES: case Req.SET_OWNER: case Req.RESET_OWNER: case Req.GET_PROTOCOL_FEATURES:
    case Req.GET_QUEUE_NUM: case Req.POSTCOPY_ADVISE: case Req.POSTCOPY_LISTEN: case Req.POSTCOPY_END:
    case Req.RESET_DEVICE: case Req.GET_MAX_MEM_SLOTS: case Req.GET_STATUS: case Req.CHECK_DEVICE_STATE:
    case Req.GET_SHMEM_CONFIG:
      expectSize(nm, n, 0);
      expectFds(nm, fds, 0);
      break;
    case Req.SET_LOG_FD: case Req.SET_BACKEND_REQ_FD: case Req.GPU_SET_SOCKET:
      expectSize(nm, n, 0);
      expectFds(nm, fds, 1);
      break;
    case Req.SET_FEATURES: case Req.SET_PROTOCOL_FEATURES: case Req.SEND_RARP: case Req.NET_SET_MTU:
    case Req.CLOSE_CRYPTO_SESSION: case Req.SET_STATUS:
      expectSize(nm, n, Size.U64);
      expectFds(nm, fds, 0);
      m.u64 = payload.getBigUint64(0, true);
      break;
    case Req.SET_VRING_NUM: case Req.SET_VRING_BASE: case Req.GET_VRING_BASE: case Req.VRING_KICK:
      // SET_VRING_NUM's num is bounded by the device (it knows its maximum); SET_VRING_BASE uses
      // all 32 bits for packed rings, so neither is range-checked here.
      m.state = readState(payload, nm, n, queues);
      expectFds(nm, fds, 0);
      break;
    case Req.SET_VRING_ENABLE: case Req.SET_VRING_ENDIAN: {
      // Enable: 1 on, 0 off. Endian: 0 little, 1 big; "Other values are invalid" (SET_VRING_ENDIAN).
      const s = readState(payload, nm, n, queues);
      if (s.num > 1) throw new ProtocolError(nm, "state.num", `${s.num}, expected 0 or 1`);
      expectFds(nm, fds, 0);
      m.state = s;
      break;
    }
    case Req.SET_VRING_ADDR:
      m.addr = readVringAddr(payload, nm, n, queues);
      expectFds(nm, fds, 0);
      break;
    case Req.SET_VRING_KICK: case Req.SET_VRING_CALL: case Req.SET_VRING_ERR: {
      const v = readVringFd(payload, nm, n, queues);
      // Bit 8 set means "no fd in the ancillary data" (poll instead), so the count must agree.
      expectFds(nm, fds, v.noFd ? 0 : 1);
      m.vring = v;
      break;
    }
    case Req.SET_MEM_TABLE: {
      const regions = readMemTable(payload, nm, n);
      // "The size and ordering of the fds matches the number and ordering of memory regions."
      if (fds.length !== regions.length) {
        throw new ProtocolError(nm, "fds", `${fds.length} fds for ${regions.length} regions`);
      }
      m.regions = regions;
      break;
    }
    case Req.SET_LOG_BASE:
      // The spec's table says u64, but QEMU sends VhostUserLog (u64 size, u64 offset) with the
      // log fd, and that is what LOG_SHMFD back-ends must parse.
      expectSize(nm, n, Size.LOG);
      expectFds(nm, fds, 1);
      m.log = readLog(payload, nm);
      break;
    case Req.IOTLB_MSG:
      expectSize(nm, n, Size.IOTLB);
      expectFds(nm, fds, 0);
      m.iotlb = readIotlb(payload, nm, false);
      break;
    case Req.GET_CONFIG: case Req.SET_CONFIG:
      m.config = readConfig(payload, nm, n);
      expectFds(nm, fds, 0);
      break;
    case Req.CREATE_CRYPTO_SESSION:
      // VhostUserCryptoSession's size depends on QEMU's crypto structs: carried opaque.
      if (n === 0) throw new ProtocolError(nm, "size", "empty crypto session description");
      expectFds(nm, fds, 0);
      m.raw = copyBytes(payload, 0, n);
      break;
    case Req.GET_INFLIGHT_FD: case Req.SET_INFLIGHT_FD:
      expectSize(nm, n, Size.INFLIGHT);
      expectFds(nm, fds, req === Req.SET_INFLIGHT_FD ? 1 : 0);
      m.inflight = readInflight(payload, nm, true);
      break;
    case Req.ADD_MEM_REG: case Req.REM_MEM_REG:
      // The spec's table lists the request payload as N/A; the text and every front-end send
      // a single memory region description (u64 padding + region).
      expectSize(nm, n, Size.MEM_REG);
      if (req === Req.ADD_MEM_REG) expectFds(nm, fds, 1);
      // REM_MEM_REG: "the back-end MAY accept messages with one file descriptor" (older QEMU sent one).
      else if (fds.length > 1) expectFds(nm, fds, 1);
      m.region = readRegion(payload, 8, nm, -1);
      break;
    case Req.GET_SHARED_OBJECT:
      // QEMU's vhost_user_get_shared_object() fills the UUID but leaves hdr.size at 0, so a real
      // front-end sends no payload; accept that form (uuid left unset) as well as the spec's 16 bytes.
      if (n !== 0) {
        expectSize(nm, n, Size.UUID);
        m.uuid = copyBytes(payload, 0, Size.UUID);
      }
      expectFds(nm, fds, 0);
      break;
    case Req.SET_DEVICE_STATE_FD:
      // direction and phase are not range-checked: an unknown phase deserves an error reply
      // (the u64 status), not a dropped connection.
      expectSize(nm, n, Size.DEVICE_STATE);
      expectFds(nm, fds, 1);
      m.deviceState = { direction: payload.getUint32(0, true), phase: payload.getUint32(4, true) };
      break;
    default:
      throw new ProtocolError(nm, "request", `unknown request id ${req}`);
  }
  return m;
}

/**
 * Decodes the back-end's reply to a front-end request (used by our front-end). Checks that the
 * reply names `expected`, has FLAG_REPLY set and FLAG_NEED_REPLY clear (QEMU refuses any other
 * flags), and has the reply layout of `expected`; requests without a reply body of their own
 * get the REPLY_ACK `u64` status.
 * @param expected the request id this reply answers
 * @throws ProtocolError naming the expected request and the field
 * @example
 * const p = new DataView(new ArrayBuffer(8));
 * p.setBigUint64(0, 0x1_4000_0000n, true);
 * decodeReply({ request: Req.GET_FEATURES, flags: 0x5, size: 8 }, p, [], Req.GET_FEATURES).u64; // 0x140000000n
 */
export function decodeReply(h: Header, payload: DataView, fds: number[], expected: number, opts?: DecodeOptions): Message {
  const nm = requestName(expected);
  const n = payloadLength(h, payload);
  checkReplyHeader(h, nm, expected, requestName);
  const m: Message = { request: h.request, flags: h.flags, fds };
  switch (expected) {
    case Req.GET_VRING_BASE:
      m.state = readState(payload, nm, n, opts?.queues ?? MAX_QUEUES);
      expectFds(nm, fds, 0);
      break;
    case Req.GET_CONFIG:
      // "vhost-user back-end uses zero length of payload to indicate an error": no config then.
      if (n !== 0) m.config = readConfig(payload, nm, n);
      expectFds(nm, fds, 0);
      break;
    case Req.GET_INFLIGHT_FD:
      expectSize(nm, n, Size.INFLIGHT);
      m.inflight = readInflight(payload, nm, false);
      // QEMU only fetches the fd when mmap_size is non-zero.
      expectFds(nm, fds, m.inflight.mmapSize > 0 ? 1 : 0);
      break;
    case Req.SET_DEVICE_STATE_FD: {
      expectSize(nm, n, Size.U64);
      const lo = payload.getUint32(0, true);
      const noFd = (lo & VRING_NOFD_MASK) !== 0;
      // Bits 0-7: status; bit 8: no fd returned. "Must not both indicate an error and return a fd."
      if ((lo & 0xff) !== 0 && !noFd) throw new ProtocolError(nm, "u64", `error 0x${(lo & 0xff).toString(16)} without the no-fd flag`);
      expectFds(nm, fds, noFd ? 0 : 1);
      m.u64 = payload.getBigUint64(0, true);
      break;
    }
    case Req.POSTCOPY_ADVISE:
      // The reply is the userfaultfd alone; QEMU refuses a non-empty payload.
      expectSize(nm, n, 0);
      expectFds(nm, fds, 1);
      break;
    case Req.GET_SHARED_OBJECT:
      // The dma-buf fd on success, no fd otherwise; the u64 is a status.
      expectSize(nm, n, Size.U64);
      if (fds.length > 1) expectFds(nm, fds, 1);
      m.u64 = payload.getBigUint64(0, true);
      break;
    case Req.CREATE_CRYPTO_SESSION:
      if (n === 0) throw new ProtocolError(nm, "size", "empty crypto session description");
      expectFds(nm, fds, 0);
      m.raw = copyBytes(payload, 0, n);
      break;
    case Req.SET_MEM_TABLE:
      // A REPLY_ACK status, or in postcopy the table with the back-end's own mapping addresses.
      expectFds(nm, fds, 0);
      if (n === Size.U64) m.u64 = payload.getBigUint64(0, true);
      else m.regions = readMemTable(payload, nm, n);
      break;
    case Req.ADD_MEM_REG:
      // Likewise: a status, or in postcopy the region with the back-end's mapping address.
      expectFds(nm, fds, 0);
      if (n === Size.U64) m.u64 = payload.getBigUint64(0, true);
      else {
        expectSize(nm, n, Size.MEM_REG);
        m.region = readRegion(payload, 8, nm, -1);
      }
      break;
    case Req.GET_SHMEM_CONFIG:
      expectSize(nm, n, Size.SHMEM_CONFIG);
      expectFds(nm, fds, 0);
      m.shmem = readShmemConfig(payload, nm);
      break;
    default:
      if (REQUEST_NAMES[expected] === undefined) throw new ProtocolError(nm, "request", `unknown request id ${expected}`);
      // GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_STATUS,
      // CHECK_DEVICE_STATE, POSTCOPY_END, SET_LOG_BASE, IOTLB_MSG and every REPLY_ACK status.
      expectSize(nm, n, Size.U64);
      expectFds(nm, fds, 0);
      m.u64 = payload.getBigUint64(0, true);
  }
  return m;
}

/**
 * Decodes a back-end → front-end request from the back-end channel (IOTLB_MSG,
 * CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG, VRING_CALL, VRING_ERR, SHARED_OBJECT_*, SHMEM_*).
 * @throws ProtocolError naming the back-end request and the field
 * @example
 * const p = new DataView(new ArrayBuffer(8));
 * decodeBackendRequest({ request: BackendReq.VRING_CALL, flags: 1, size: 8 }, p, []).state; // { index: 0, num: 0 }
 */
export function decodeBackendRequest(h: Header, payload: DataView, fds: number[], opts?: DecodeOptions): Message {
  const req = h.request;
  const nm = backendRequestName(req);
  const n = payloadLength(h, payload);
  if ((h.flags & FLAG_REPLY) !== 0) throw new ProtocolError(nm, "flags", "reply bit set on a request");
  const queues = opts?.queues ?? MAX_QUEUES;
  const m: Message = { request: req, flags: h.flags, fds };
  switch (req) {
    case BackendReq.IOTLB_MSG:
      expectSize(nm, n, Size.IOTLB);
      expectFds(nm, fds, 0);
      m.iotlb = readIotlb(payload, nm, true);
      break;
    case BackendReq.CONFIG_CHANGE_MSG:
      expectSize(nm, n, 0);
      expectFds(nm, fds, 0);
      break;
    case BackendReq.VRING_HOST_NOTIFIER_MSG:
      m.area = readArea(payload, nm, n, queues);
      // With the no-fd bit the notifier is only removed.
      expectFds(nm, fds, m.area.noFd ? 0 : 1);
      break;
    case BackendReq.VRING_CALL: case BackendReq.VRING_ERR:
      m.state = readState(payload, nm, n, queues);
      expectFds(nm, fds, 0);
      break;
    case BackendReq.SHARED_OBJECT_ADD: case BackendReq.SHARED_OBJECT_REMOVE: case BackendReq.SHARED_OBJECT_LOOKUP:
      expectSize(nm, n, Size.UUID);
      expectFds(nm, fds, 0);
      m.uuid = copyBytes(payload, 0, Size.UUID);
      break;
    case BackendReq.SHMEM_MAP: case BackendReq.SHMEM_UNMAP:
      m.mmap = readShmemMap(payload, nm, n);
      expectFds(nm, fds, req === BackendReq.SHMEM_MAP ? 1 : 0);
      break;
    default:
      throw new ProtocolError(nm, "request", `unknown back-end request id ${req}`);
  }
  return m;
}

/**
 * Decodes the front-end's reply to a back-end request: a u64 status, plus for
 * SHARED_OBJECT_LOOKUP the dma-buf fd when the status is 0.
 * @example
 * const p = new DataView(new ArrayBuffer(8));
 * decodeBackendReply({ request: BackendReq.IOTLB_MSG, flags: 0x5, size: 8 }, p, [], BackendReq.IOTLB_MSG).u64; // 0n
 */
export function decodeBackendReply(h: Header, payload: DataView, fds: number[], expected: number): Message {
  const nm = backendRequestName(expected);
  const n = payloadLength(h, payload);
  checkReplyHeader(h, nm, expected, backendRequestName);
  if (BACKEND_REQUEST_NAMES[expected] === undefined) throw new ProtocolError(nm, "request", `unknown back-end request id ${expected}`);
  expectSize(nm, n, Size.U64);
  const u64 = payload.getBigUint64(0, true);
  if (expected === BackendReq.SHARED_OBJECT_LOOKUP && u64 === 0n) {
    // Success carries the dma-buf fd; a front-end that found nothing to send may still say 0.
    if (fds.length > 1) expectFds(nm, fds, 1);
  } else {
    // Other replies are bare statuses; "if the operation fails, no fd is sent to the backend."
    expectFds(nm, fds, 0);
  }
  return { request: h.request, flags: h.flags, fds, u64 };
}

// ---------------------------------------------------------------------------------------------
// Layout readers. Each checks the fields of its layout; errors carry the request name `nm`.

function name(request: number, backend: boolean): string {
  return backend ? backendRequestName(request) : requestName(request);
}

function payloadLength(h: Header, payload: DataView): number {
  // A mismatch here is the caller's bug (it read the wrong number of bytes), not the peer's.
  if (payload.byteLength !== h.size) throw new RangeError(`payload view is ${payload.byteLength} bytes, header size is ${h.size}`);
  return h.size;
}

function checkReplyHeader(h: Header, nm: string, expected: number, names: (r: number) => string): void {
  if (h.request !== expected) throw new ProtocolError(nm, "request", `reply carries ${names(h.request)}`);
  if ((h.flags & FLAG_REPLY) === 0) throw new ProtocolError(nm, "flags", "reply bit clear on a reply");
  if ((h.flags & FLAG_NEED_REPLY) !== 0) throw new ProtocolError(nm, "flags", "need_reply set on a reply");
}

function expectSize(nm: string, n: number, want: number): void {
  if (n !== want) throw new ProtocolError(nm, "size", `payload is ${n} bytes, expected ${want}`);
}

function expectFds(nm: string, fds: number[], want: number): void {
  if (fds.length !== want) throw new ProtocolError(nm, "fds", `${fds.length} fds, expected ${want}`);
}

function hex64(dv: DataView, off: number): string {
  return `0x${dv.getBigUint64(off, true).toString(16)}`;
}

/** A u64 address or size as a number; refused at 2^53 and above (never RAM, not exact in a double). */
function num(dv: DataView, off: number, nm: string, field: string): number {
  const hi = dv.getUint32(off + 4, true);
  if (hi >= HI_LIMIT) throw new ProtocolError(nm, field, `${hex64(dv, off)} is not below 2^53`);
  return hi * TWO_32 + dv.getUint32(off, true);
}

/** True when the u64s at `a` and `b` add past 2^64 (checked on the halves, no BigInt). */
function sumOverflows(dv: DataView, a: number, b: number): boolean {
  const lo = dv.getUint32(a, true) + dv.getUint32(b, true);
  return dv.getUint32(a + 4, true) + dv.getUint32(b + 4, true) + (lo >= TWO_32 ? 1 : 0) >= TWO_32;
}

function copyBytes(dv: DataView, off: number, len: number): Uint8Array {
  // Copied: the caller reuses its receive buffer for the next message.
  return new Uint8Array(dv.buffer, dv.byteOffset + off, len).slice();
}

function readState(dv: DataView, nm: string, n: number, queues: number): VringState {
  expectSize(nm, n, Size.VRING_STATE);
  const index = dv.getUint32(0, true);
  if (index >= queues) throw new ProtocolError(nm, "state.index", `${index} is not below ${queues} queues`);
  return { index, num: dv.getUint32(4, true) };
}

function readVringFd(dv: DataView, nm: string, n: number, queues: number): VringFd {
  expectSize(nm, n, Size.U64);
  const lo = dv.getUint32(0, true);
  if (dv.getUint32(4, true) !== 0 || (lo & ~VRING_U64_MASK) !== 0) {
    throw new ProtocolError(nm, "vring", `reserved bits set in ${hex64(dv, 0)} (only bits 0-8 exist)`);
  }
  const index = lo & VRING_IDX_MASK;
  if (index >= queues) throw new ProtocolError(nm, "vring.index", `${index} is not below ${queues} queues`);
  return { index, noFd: (lo & VRING_NOFD_MASK) !== 0 };
}

function readVringAddr(dv: DataView, nm: string, n: number, queues: number): VringAddr {
  expectSize(nm, n, Size.VRING_ADDR);
  const index = dv.getUint32(0, true);
  if (index >= queues) throw new ProtocolError(nm, "addr.index", `${index} is not below ${queues} queues`);
  const flags = dv.getUint32(4, true);
  if ((flags & ~VHOST_VRING_F_LOG) !== 0) throw new ProtocolError(nm, "addr.flags", `reserved bits set in 0x${flags.toString(16)}`);
  const desc = num(dv, 8, nm, "addr.desc");
  const used = num(dv, 16, nm, "addr.used");
  const avail = num(dv, 24, nm, "addr.avail");
  const log = num(dv, 32, nm, "addr.log");
  // VIRTIO 1.2 2.7 (split: desc 16, avail 2, used 4) and 2.8 (packed: 16, 4, 4): these are
  // the alignments both ring types share, so they hold before we know which one is in use.
  if (desc % 16 !== 0) throw new ProtocolError(nm, "addr.desc", `not 16-byte aligned (0x${desc.toString(16)})`);
  if (used % 4 !== 0) throw new ProtocolError(nm, "addr.used", `not 4-byte aligned (0x${used.toString(16)})`);
  if (avail % 2 !== 0) throw new ProtocolError(nm, "addr.avail", `not 2-byte aligned (0x${avail.toString(16)})`);
  return { index, flags, desc, used, avail, log };
}

function readMemTable(dv: DataView, nm: string, n: number): MemRegion[] {
  if (n < Size.MEM_TABLE_HDR) expectSize(nm, n, Size.MEM_TABLE_HDR);
  const count = dv.getUint32(0, true);
  if (count > MAX_MEM_REGIONS) throw new ProtocolError(nm, "nregions", `${count} regions, at most ${MAX_MEM_REGIONS}`);
  // QEMU sends only the regions in use (8 + 32 × nregions bytes), not the spec diagram's
  // full array of 8; that exact size is what we require.
  expectSize(nm, n, Size.MEM_TABLE_HDR + Size.MEM_REGION * count);
  const regions: MemRegion[] = new Array(count);
  for (let i = 0; i < count; i++) regions[i] = readRegion(dv, Size.MEM_TABLE_HDR + Size.MEM_REGION * i, nm, i);
  return regions;
}

function regionField(i: number, member: string): string {
  return i < 0 ? `region.${member}` : `regions[${i}].${member}`;
}

/**
 * One 32-byte region at `off` (`i` is its table index, -1 for ADD/REM_MEM_REG). The region is
 * refused if empty, if any base + size wraps u64, or if any value or end lies past 2^53.
 * With XEN_MMAP a region grows by 8 bytes; we never offer that feature, so 32 is exact.
 */
function readRegion(dv: DataView, off: number, nm: string, i: number): MemRegion {
  const gpaAt = off, sizeAt = off + 8, uaddrAt = off + 16, offsetAt = off + 24;
  if (dv.getUint32(sizeAt, true) === 0 && dv.getUint32(sizeAt + 4, true) === 0) {
    throw new ProtocolError(nm, regionField(i, "memorySize"), "zero-sized region");
  }
  if (sumOverflows(dv, gpaAt, sizeAt)) throw overflow(dv, nm, i, "guestPhysAddr", gpaAt, sizeAt);
  if (sumOverflows(dv, uaddrAt, sizeAt)) throw overflow(dv, nm, i, "userAddr", uaddrAt, sizeAt);
  if (sumOverflows(dv, offsetAt, sizeAt)) throw overflow(dv, nm, i, "mmapOffset", offsetAt, sizeAt);
  const memorySize = regionNum(dv, sizeAt, nm, i, "memorySize");
  const guestPhysAddr = regionNum(dv, gpaAt, nm, i, "guestPhysAddr");
  const userAddr = regionNum(dv, uaddrAt, nm, i, "userAddr");
  const mmapOffset = regionNum(dv, offsetAt, nm, i, "mmapOffset");
  // `a > LIMIT - size` is exact where `a + size > LIMIT` could round.
  if (guestPhysAddr > LIMIT - memorySize) throw new ProtocolError(nm, regionField(i, "guestPhysAddr"), "region ends past 2^53");
  if (userAddr > LIMIT - memorySize) throw new ProtocolError(nm, regionField(i, "userAddr"), "region ends past 2^53");
  if (mmapOffset > LIMIT - memorySize) throw new ProtocolError(nm, regionField(i, "mmapOffset"), "region ends past 2^53");
  return { guestPhysAddr, memorySize, userAddr, mmapOffset };
}

function regionNum(dv: DataView, off: number, nm: string, i: number, member: string): number {
  const hi = dv.getUint32(off + 4, true);
  if (hi >= HI_LIMIT) throw new ProtocolError(nm, regionField(i, member), `${hex64(dv, off)} is not below 2^53`);
  return hi * TWO_32 + dv.getUint32(off, true);
}

function overflow(dv: DataView, nm: string, i: number, member: string, at: number, sizeAt: number): ProtocolError {
  return new ProtocolError(nm, regionField(i, member), `${hex64(dv, at)} + memorySize ${hex64(dv, sizeAt)} overflows u64`);
}

function readLog(dv: DataView, nm: string): LogInfo {
  const size = num(dv, 0, nm, "log.size");
  const offset = num(dv, 8, nm, "log.offset");
  if (offset > LIMIT - size) throw new ProtocolError(nm, "log.offset", "log area ends past 2^53");
  return { size, offset };
}

function readInflight(dv: DataView, nm: string, request: boolean): InflightInfo {
  const mmapSize = num(dv, 0, nm, "inflight.mmapSize");
  const mmapOffset = num(dv, 8, nm, "inflight.mmapOffset");
  if (mmapOffset > LIMIT - mmapSize) throw new ProtocolError(nm, "inflight.mmapOffset", "inflight area ends past 2^53");
  const numQueues = dv.getUint16(16, true);
  const queueSize = dv.getUint16(18, true);
  // Requests size the area from these; a reply may leave them as the request had them (QEMU ignores them).
  if (request && numQueues === 0) throw new ProtocolError(nm, "inflight.numQueues", "zero");
  if (request && queueSize === 0) throw new ProtocolError(nm, "inflight.queueSize", "zero");
  return { mmapSize, mmapOffset, numQueues, queueSize };
}

function readConfig(dv: DataView, nm: string, n: number): ConfigSpace {
  if (n < Size.CONFIG_HDR) throw new ProtocolError(nm, "size", `payload is ${n} bytes, at least ${Size.CONFIG_HDR} needed`);
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE) throw new ProtocolError(nm, "config.size", `${size} exceeds ${MAX_CONFIG_SIZE}`);
  if (size !== n - Size.CONFIG_HDR) throw new ProtocolError(nm, "config.size", `${size}, but the payload carries ${n - Size.CONFIG_HDR} data bytes`);
  if (offset > MAX_CONFIG_SIZE - size) throw new ProtocolError(nm, "config.offset", `${offset} + size ${size} exceeds ${MAX_CONFIG_SIZE}`);
  // 0: a guest write, 1: live migration; no other value is defined.
  if (flags > 1) throw new ProtocolError(nm, "config.flags", `0x${flags.toString(16)}, expected 0 or 1`);
  return { offset, size, flags, data: copyBytes(dv, Size.CONFIG_HDR, size) };
}

/**
 * struct vhost_iotlb_msg is 26 bytes of fields padded to 32 by the C compiler; QEMU sends
 * sizeof() = 32. The front-end sends updates and invalidations, the back-end misses and
 * access failures (vhost-user.rst "IOMMU support").
 */
function readIotlb(dv: DataView, nm: string, fromBackend: boolean): IotlbMsg {
  const perm = dv.getUint8(24);
  const type = dv.getUint8(25);
  if (perm > IOTLB_ACCESS_RW) throw new ProtocolError(nm, "iotlb.perm", `${perm}, expected 0-3`);
  const ok = fromBackend ? type === IOTLB_MISS || type === IOTLB_ACCESS_FAIL : type === IOTLB_UPDATE || type === IOTLB_INVALIDATE;
  if (!ok) throw new ProtocolError(nm, "iotlb.type", `${type} is not ${fromBackend ? "1 (miss) or 4 (access fail)" : "2 (update) or 3 (invalidate)"}`);
  const iova = num(dv, 0, nm, "iotlb.iova");
  const uaddr = num(dv, 16, nm, "iotlb.uaddr");
  // A vIOMMU may invalidate "everything from iova" with a huge length; no entry can lie past
  // 2^53, so clamping an invalidation there loses nothing. Other types must fit exactly.
  const inval = type === IOTLB_INVALIDATE;
  const sizeHi = dv.getUint32(12, true);
  let size: number;
  if (sizeHi < HI_LIMIT) size = sizeHi * TWO_32 + dv.getUint32(8, true);
  else if (inval) size = LIMIT - iova;
  else throw new ProtocolError(nm, "iotlb.size", `${hex64(dv, 8)} is not below 2^53`);
  if (iova > LIMIT - size) {
    if (!inval) throw new ProtocolError(nm, "iotlb.iova", "range ends past 2^53");
    size = LIMIT - iova;
  }
  if (type === IOTLB_UPDATE && uaddr > LIMIT - size) throw new ProtocolError(nm, "iotlb.uaddr", "range ends past 2^53");
  return { iova, size, uaddr, perm, type };
}

function readArea(dv: DataView, nm: string, n: number, queues: number): VringArea {
  expectSize(nm, n, Size.VRING_AREA);
  const lo = dv.getUint32(0, true);
  if (dv.getUint32(4, true) !== 0 || (lo & ~VRING_U64_MASK) !== 0) {
    throw new ProtocolError(nm, "area", `reserved bits set in ${hex64(dv, 0)} (only bits 0-8 exist)`);
  }
  const index = lo & VRING_IDX_MASK;
  if (index >= queues) throw new ProtocolError(nm, "area.index", `${index} is not below ${queues} queues`);
  const size = num(dv, 8, nm, "area.size");
  const offset = num(dv, 16, nm, "area.offset");
  if (offset > LIMIT - size) throw new ProtocolError(nm, "area.offset", "area ends past 2^53");
  return { index, noFd: (lo & VRING_NOFD_MASK) !== 0, size, offset };
}

function readShmemMap(dv: DataView, nm: string, n: number): ShmemMap {
  expectSize(nm, n, Size.SHMEM_MAP);
  const shmid = dv.getUint8(0);
  const fdOffset = num(dv, 8, nm, "mmap.fdOffset");
  const shmOffset = num(dv, 16, nm, "mmap.shmOffset");
  const len = num(dv, 24, nm, "mmap.len");
  const flags = dv.getUint32(32, true);
  if (dv.getUint32(36, true) !== 0 || (flags & ~SHMEM_MAP_RW) !== 0) {
    throw new ProtocolError(nm, "mmap.flags", `reserved bits set in ${hex64(dv, 32)}`);
  }
  if (len === 0) throw new ProtocolError(nm, "mmap.len", "zero-length mapping");
  if (fdOffset > LIMIT - len) throw new ProtocolError(nm, "mmap.fdOffset", "mapping ends past 2^53");
  if (shmOffset > LIMIT - len) throw new ProtocolError(nm, "mmap.shmOffset", "mapping ends past 2^53");
  return { shmid, fdOffset, shmOffset, len, flags };
}

function readShmemConfig(dv: DataView, nm: string): ShmemConfig {
  const nregions = dv.getUint32(0, true);
  if (nregions > MAX_SHMEM_REGIONS) throw new ProtocolError(nm, "shmem.nregions", `${nregions} exceeds ${MAX_SHMEM_REGIONS}`);
  const sizes: number[] = new Array(MAX_SHMEM_REGIONS);
  for (let i = 0; i < MAX_SHMEM_REGIONS; i++) sizes[i] = num(dv, 8 + 8 * i, nm, "shmem.sizes");
  return { nregions, sizes };
}

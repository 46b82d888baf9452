/**
 * vhost-user wire format: request ids, header flags, payload layouts.
 *
 * Theory of operation. A message is a 12-byte header (u32 request, u32 flags,
 * u32 size) followed by `size` payload bytes and, in the same `recvmsg`, up to
 * a few file descriptors (vhost-user.rst "Message Specification"). The protocol
 * layer is pure: `decode.ts` turns header + payload + fds into a {@link Message}
 * and refuses anything malformed with a `ProtocolError` naming the request and
 * field; `encode.ts` does the reverse into a caller-owned buffer. No I/O
 * happens here and fds are never closed here: whoever received them owns them.
 * Every value is checked once, at decode; code above trusts a decoded Message.
 *
 * All numbers are little-endian (the spec says "machine native"; virtio hosts
 * we run on are little-endian). A u64 that is an address or size becomes a
 * `number`: it is read as `lo + hi * 2 ** 32` and refused when `hi >= 2 ** 21`
 * (past 2^53 is never RAM); a u64 that is a bit mask or opaque value stays a
 * `bigint` (`Message.u64`).
 *
 * Spec: QEMU docs/interop/vhost-user.rst ("Front-end message types",
 * "Back-end message types"); request 44 and back-end requests 9-10 come from
 * the VIRTIO Shared Memory Region (SHMEM) extension.
 */

/** Header size in bytes: u32 request, u32 flags, u32 size. */
export const HDR_SIZE = 12;
/** The only protocol version (flags bits 0-1). */
export const VHOST_USER_VERSION = 0x1;
/** Header flag bits (vhost-user.rst "Header"). */
export const FLAG_VERSION_MASK = 0x3, FLAG_REPLY = 0x4, FLAG_NEED_REPLY = 0x8;
/** Every flag bit we understand; any other bit set is refused. */
export const FLAG_KNOWN_MASK = 0xf;
/** Largest payload we accept; QEMU's own union is smaller, so nothing real is refused. */
export const MAX_PAYLOAD = 4096;
/** SET_MEM_TABLE carries at most 8 regions (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;
/** Largest virtio config space a GET/SET_CONFIG may carry (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/** SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the vring index, bit 8 says "no fd". */
export const VRING_NOFD_MASK = 0x100, VRING_IDX_MASK = 0xff;
/** Queue indices a vring message can name: the kick/call u64 has 8 index bits. */
export const MAX_QUEUES = VRING_IDX_MASK + 1;
/** SET_VRING_ADDR flags: bit 0 (VHOST_VRING_F_LOG) asks for used-ring logging; others are reserved. */
export const VHOST_VRING_F_LOG = 0x1;
/** GET_SHMEM_CONFIG reply: one size per VIRTIO Shared Memory Region id. */
export const MAX_SHMEM_REGIONS = 256;

/** Payload sizes in bytes of the fixed layouts (vhost-user.rst "Payload"). */
export const Size = {
  U64: 8,
  /** u32 index, u32 num */
  VRING_STATE: 8,
  /** u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log */
  VRING_ADDR: 40,
  /** u64 guest address, u64 size, u64 user address, u64 mmap offset */
  MEM_REGION: 32,
  /** u32 nregions, u32 padding; the regions follow */
  MEM_TABLE_HDR: 8,
  /** u64 padding + one region (ADD_MEM_REG, REM_MEM_REG) */
  MEM_REG: 40,
  /** u64 size, u64 offset (SET_LOG_BASE) */
  LOG: 16,
  /** u64 mmap size, u64 mmap offset, u16 num queues, u16 queue size, 4 bytes of C padding */
  INFLIGHT: 24,
  /** u32 offset, u32 size, u32 flags; `size` data bytes follow */
  CONFIG_HDR: 12,
  /** struct vhost_iotlb_msg: u64 iova, u64 size, u64 uaddr, u8 perm, u8 type, 6 bytes of C padding */
  IOTLB: 32,
  /** u32 direction, u32 phase (SET_DEVICE_STATE_FD) */
  DEVICE_STATE: 8,
  /** VhostUserShared: a 16-byte UUID */
  UUID: 16,
  /** u64 (index bits 0-7, bit 8 no-fd), u64 size, u64 offset (VRING_HOST_NOTIFIER_MSG) */
  VRING_AREA: 24,
  /** u8 shmid, 7 padding, u64 fd offset, u64 shm offset, u64 len, u64 flags (SHMEM_MAP/UNMAP) */
  SHMEM_MAP: 40,
  /** u32 nregions, u32 padding, u64 sizes[256] (GET_SHMEM_CONFIG reply) */
  SHMEM_CONFIG: 8 + 8 * 256,
} as const;

/** Front-end → back-end request ids (vhost-user.rst "Front-end message types"). */
export const Req = {
  GET_FEATURES: 1, SET_FEATURES: 2, SET_OWNER: 3, RESET_OWNER: 4, SET_MEM_TABLE: 5, SET_LOG_BASE: 6,
  SET_LOG_FD: 7, SET_VRING_NUM: 8, SET_VRING_ADDR: 9, SET_VRING_BASE: 10, GET_VRING_BASE: 11,
  SET_VRING_KICK: 12, SET_VRING_CALL: 13, SET_VRING_ERR: 14, GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16, GET_QUEUE_NUM: 17, SET_VRING_ENABLE: 18, SEND_RARP: 19, NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21, IOTLB_MSG: 22, SET_VRING_ENDIAN: 23, GET_CONFIG: 24, SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26, CLOSE_CRYPTO_SESSION: 27, POSTCOPY_ADVISE: 28, POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30, GET_INFLIGHT_FD: 31, SET_INFLIGHT_FD: 32, GPU_SET_SOCKET: 33, RESET_DEVICE: 34,
  VRING_KICK: 35, GET_MAX_MEM_SLOTS: 36, ADD_MEM_REG: 37, REM_MEM_REG: 38, SET_STATUS: 39,
  GET_STATUS: 40, GET_SHARED_OBJECT: 41, SET_DEVICE_STATE_FD: 42, CHECK_DEVICE_STATE: 43,
  /** SHMEM protocol feature (bit 20): the back-end reports its VIRTIO Shared Memory Region sizes. */
  GET_SHMEM_CONFIG: 44,
} as const;

/** Back-end → front-end request ids, sent on the SET_BACKEND_REQ_FD channel ("Back-end message types"). */
export const BackendReq = {
  IOTLB_MSG: 1, CONFIG_CHANGE_MSG: 2, VRING_HOST_NOTIFIER_MSG: 3, VRING_CALL: 4, VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6, SHARED_OBJECT_REMOVE: 7, SHARED_OBJECT_LOOKUP: 8,
  /** SHMEM protocol feature: map an fd into a VIRTIO Shared Memory Region / unmap it. */
  SHMEM_MAP: 9, SHMEM_UNMAP: 10,
} as const;

export type ReqId = (typeof Req)[keyof typeof Req];
export type BackendReqId = (typeof BackendReq)[keyof typeof BackendReq];

function nameTable(ids: Record<string, number>): readonly string[] {
  const names: string[] = [];
  for (const k in ids) names[ids[k]!] = k;
  return names;
}

/** Request names indexed by id (holes for unassigned ids); drives trace output like `vu_request_to_string`. */
export const REQUEST_NAMES: readonly string[] = nameTable(Req);
/** Back-end request names indexed by id. */
export const BACKEND_REQUEST_NAMES: readonly string[] = nameTable(BackendReq);

/**
 * The name of a front-end request id, for errors and traces.
 * @param req a request id from a header
 * @returns the name without the `VHOST_USER_` prefix, or `UNKNOWN(n)`
 * @example
 * requestName(9);  // "SET_VRING_ADDR"
 * requestName(99); // "UNKNOWN(99)"
 */
export function requestName(req: number): string {
  return REQUEST_NAMES[req] ?? `UNKNOWN(${req})`;
}

/**
 * The name of a back-end request id (the `VHOST_USER_BACKEND_` prefix dropped).
 * @example
 * backendRequestName(4);  // "VRING_CALL"
 * backendRequestName(77); // "UNKNOWN(77)"
 */
export function backendRequestName(req: number): string {
  return BACKEND_REQUEST_NAMES[req] ?? `UNKNOWN(${req})`;
}

/** IOTLB message types (struct vhost_iotlb_msg `type`). */
export const IOTLB_MISS = 1, IOTLB_UPDATE = 2, IOTLB_INVALIDATE = 3, IOTLB_ACCESS_FAIL = 4;
/** IOTLB permissions (`perm`): 0 none, 1 read, 2 write, 3 read/write. */
export const IOTLB_ACCESS_RO = 1, IOTLB_ACCESS_WO = 2, IOTLB_ACCESS_RW = 3;
/** GET/SET_CONFIG flags: 0 a guest write to a writable field, 1 live migration (may write read-only fields). */
export const CONFIG_FLAG_WRITABLE = 0, CONFIG_FLAG_MIGRATION = 1;
/** SET_DEVICE_STATE_FD direction and phase. */
export const DEVICE_STATE_SAVE = 0, DEVICE_STATE_LOAD = 1, DEVICE_STATE_PHASE_STOPPED = 0;
/** SHMEM_MAP flags: bit 0 maps read-write (else read-only); other bits are reserved. */
export const SHMEM_MAP_RW = 0x1;

/** One guest memory region (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG). */
export interface MemRegion { guestPhysAddr: number; memorySize: number; userAddr: number; mmapOffset: number }
/** A vring state description: queue index and a request-specific number. */
export interface VringState { index: number; num: number }
/** A vring address description; `flags` bit 0 is VHOST_VRING_F_LOG. */
export interface VringAddr { index: number; flags: number; desc: number; used: number; avail: number; log: number }
/** SET_VRING_KICK/CALL/ERR u64: index bits 0-7, bit 8 = no fd (polling). */
export interface VringFd { index: number; noFd: boolean }
/** SET_LOG_BASE: the log area within the passed fd. */
export interface LogInfo { size: number; offset: number }
/** GET/SET_INFLIGHT_FD: the inflight area within the passed fd. */
export interface InflightInfo { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number }
/** GET/SET_CONFIG: `data.length === size` on decode. */
export interface ConfigSpace { offset: number; size: number; flags: number; data: Uint8Array }
/** struct vhost_iotlb_msg. */
export interface IotlbMsg { iova: number; size: number; uaddr: number; perm: number; type: number }
/** SET_DEVICE_STATE_FD transfer parameters. */
export interface DeviceStateInfo { direction: number; phase: number }
/** VRING_HOST_NOTIFIER_MSG vring area: u64 index/no-fd, then the area within the passed fd. */
export interface VringArea { index: number; noFd: boolean; size: number; offset: number }
/** SHMEM_MAP/SHMEM_UNMAP: map `len` bytes at `fdOffset` of the fd to `shmOffset` in region `shmid`. */
export interface ShmemMap { shmid: number; fdOffset: number; shmOffset: number; len: number; flags: number }
/** GET_SHMEM_CONFIG reply: `sizes[shmid]`, 0 when unused; `sizes.length === MAX_SHMEM_REGIONS` on decode. */
export interface ShmemConfig { nregions: number; sizes: number[] }

/** A decoded message. Exactly the payload field(s) of the request's layout are set. */
export interface Message {
  request: number;
  flags: number;
  /** The fds that came with it (ownership: the caller's). */
  fds: number[];
  /** GET/SET_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM reply, SET_STATUS, NET_SET_MTU, SEND_RARP, GET_STATUS reply, replies with REPLY_ACK status, ... */
  u64?: bigint;
  /** SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE (request and reply), SET_VRING_ENABLE, SET_VRING_ENDIAN, VRING_KICK; back-end VRING_CALL, VRING_ERR */
  state?: VringState;
  /** SET_VRING_ADDR */
  addr?: VringAddr;
  /** SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR */
  vring?: VringFd;
  /** SET_MEM_TABLE (and its postcopy reply) */
  regions?: MemRegion[];
  /** ADD_MEM_REG, REM_MEM_REG (payload: u64 padding + region) */
  region?: MemRegion;
  /** SET_LOG_BASE */
  log?: LogInfo;
  /** GET_INFLIGHT_FD (request and reply), SET_INFLIGHT_FD */
  inflight?: InflightInfo;
  /** GET_CONFIG (request and reply), SET_CONFIG */
  config?: ConfigSpace;
  /** IOTLB_MSG (both directions) */
  iotlb?: IotlbMsg;
  /** SET_DEVICE_STATE_FD */
  deviceState?: DeviceStateInfo;
  /** GET_SHARED_OBJECT, back-end SHARED_OBJECT_ADD/REMOVE/LOOKUP (16 bytes) */
  uuid?: Uint8Array;
  /** back-end VRING_HOST_NOTIFIER_MSG */
  area?: VringArea;
  /** back-end SHMEM_MAP, SHMEM_UNMAP */
  mmap?: ShmemMap;
  /** GET_SHMEM_CONFIG reply */
  shmem?: ShmemConfig;
  /** opaque payloads (CREATE_CRYPTO_SESSION request and reply) */
  raw?: Uint8Array;
}

/**
 * Feature bits the framework owns: virtio ring/transport bits (VIRTIO 1.3
 * section 6 "Reserved Feature Bits"), the vhost bits vhost-user reuses, and the
 * vhost-user protocol features (vhost-user.rst "Protocol features"). Constants
 * are bit numbers; `bit(n)` turns one into a bigint mask. Device-specific bits
 * (blk, net, ...) live with their device, not here.
 */

/** Legacy: notify even when the avail ring is empty. */
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
/** vhost: the front-end logs dirty pages (live migration); the bit VHOST_F_LOG_ALL. */
export const VHOST_F_LOG_ALL = 26;
/** Legacy: no framing assumptions on descriptor layout. */
export const VIRTIO_F_ANY_LAYOUT = 27;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** The legacy UNUSED bit 30, reused to say "GET/SET_PROTOCOL_FEATURES are understood". */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
export const VIRTIO_F_VERSION_1 = 32;
/** Also known as VIRTIO_F_IOMMU_PLATFORM: ring addresses are IOVAs (IOTLB_MSG). */
export const VIRTIO_F_ACCESS_PLATFORM = 33;
export const VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM;
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_IN_ORDER = 35;
export const VIRTIO_F_ORDER_PLATFORM = 36;
export const VIRTIO_F_SR_IOV = 37;
export const VIRTIO_F_NOTIFICATION_DATA = 38;
export const VIRTIO_F_NOTIF_CONFIG_DATA = 39;
export const VIRTIO_F_RING_RESET = 40;
export const VIRTIO_F_ADMIN_VQ = 41;

/**
 * A feature bit number as a bigint mask.
 * @example
 * bit(VIRTIO_F_VERSION_1) === 0x1_0000_0000n; // true
 */
export const bit = (n: number): bigint => 1n << BigInt(n);

/** Feature bits 24..41: transport and ring features (VIRTIO 1.2 §6); the others belong to the device type. */
export const TRANSPORT_FEATURES = ((1n << 42n) - 1n) ^ ((1n << 24n) - 1n);

/** vhost-user protocol feature bit numbers (VHOST_USER_PROTOCOL_F_*). */
export const ProtocolFeature = {
  MQ: 0, LOG_SHMFD: 1, RARP: 2, REPLY_ACK: 3, NET_MTU: 4, BACKEND_REQ: 5, CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7, PAGEFAULT: 8, CONFIG: 9, BACKEND_SEND_FD: 10, HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12, RESET_DEVICE: 13, INBAND_NOTIFICATIONS: 14, CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16, XEN_MMAP: 17, SHARED_OBJECT: 18, DEVICE_STATE: 19,
  /** VIRTIO Shared Memory Regions: GET_SHMEM_CONFIG, back-end SHMEM_MAP/SHMEM_UNMAP. */
  SHMEM: 20,
} as const;

const PROTOCOL_NAMES: string[] = [];
for (const k in ProtocolFeature) PROTOCOL_NAMES[ProtocolFeature[k as keyof typeof ProtocolFeature]] = k;

/** Ring and transport bits by number, in ascending order. */
const VIRTIO_NAMES: ReadonlyArray<readonly [number, string]> = [
  [VIRTIO_F_NOTIFY_ON_EMPTY, "VIRTIO_F_NOTIFY_ON_EMPTY"],
  [VHOST_F_LOG_ALL, "VHOST_F_LOG_ALL"],
  [VIRTIO_F_ANY_LAYOUT, "VIRTIO_F_ANY_LAYOUT"],
  [VIRTIO_RING_F_INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC"],
  [VIRTIO_RING_F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"],
  [VHOST_USER_F_PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"],
  [VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"],
  [VIRTIO_F_ACCESS_PLATFORM, "VIRTIO_F_ACCESS_PLATFORM"],
  [VIRTIO_F_RING_PACKED, "VIRTIO_F_RING_PACKED"],
  [VIRTIO_F_IN_ORDER, "VIRTIO_F_IN_ORDER"],
  [VIRTIO_F_ORDER_PLATFORM, "VIRTIO_F_ORDER_PLATFORM"],
  [VIRTIO_F_SR_IOV, "VIRTIO_F_SR_IOV"],
  [VIRTIO_F_NOTIFICATION_DATA, "VIRTIO_F_NOTIFICATION_DATA"],
  [VIRTIO_F_NOTIF_CONFIG_DATA, "VIRTIO_F_NOTIF_CONFIG_DATA"],
  [VIRTIO_F_RING_RESET, "VIRTIO_F_RING_RESET"],
  [VIRTIO_F_ADMIN_VQ, "VIRTIO_F_ADMIN_VQ"],
];

/**
 * Names of the protocol feature bits set in `mask`, lowest first; unassigned bits read `UNKNOWN(n)`.
 * @example
 * protocolFeatureNames(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(40));
 * // ["MQ", "REPLY_ACK", "UNKNOWN(40)"]
 */
export function protocolFeatureNames(mask: bigint): string[] {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) {
    if ((mask >> BigInt(b)) & 1n) out.push(PROTOCOL_NAMES[b] ?? `UNKNOWN(${b})`);
  }
  return out;
}

/**
 * Names of the ring/transport/vhost bits set in `mask`, lowest first. Device-specific bits
 * are not named here and are left out.
 * @example
 * virtioFeatureNames(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | 1n);
 * // ["VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_VERSION_1"]
 */
export function virtioFeatureNames(mask: bigint): string[] {
  const out: string[] = [];
  for (const [b, name] of VIRTIO_NAMES) if ((mask >> BigInt(b)) & 1n) out.push(name);
  return out;
}

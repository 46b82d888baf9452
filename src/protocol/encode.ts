/**
 * Encoding: a {@link Message} into header + payload bytes in a caller-owned buffer (one per
 * connection, reused). The layout comes from whichever payload field is set, so the same
 * function writes requests, replies (set FLAG_REPLY in `flags`) and, on purpose, malformed
 * messages for tests: counts and size fields are written as given, not checked. What cannot
 * be represented at all (a negative number, an index past 8 bits, two payload fields) is our
 * bug and throws a RangeError. Padding bytes are zeroed, as QEMU's zero-initialised structs are.
 */
import {
  FLAG_VERSION_MASK, HDR_SIZE, MAX_PAYLOAD, MAX_SHMEM_REGIONS, Size, VHOST_USER_VERSION, VRING_IDX_MASK,
  VRING_NOFD_MASK, type MemRegion, type Message,
} from "./messages.ts";

const TWO_32 = 2 ** 32;
const U64_MAX = (1n << 64n) - 1n;

/**
 * Writes header + payload of `m` into `out` at offset 0. `m.flags` gets the version bits set to
 * 1 automatically; for a reply set FLAG_REPLY (and leave FLAG_NEED_REPLY clear: QEMU accepts
 * reply flags of exactly 0x5). The payload layout is chosen by which payload field is set;
 * none set means an empty payload.
 * @param m the message; `m.fds` is not written (the caller passes fds to sendmsg)
 * @param out at least 12 + payload bytes
 * @returns the total byte count (12 + payload)
 * @throws RangeError if `out` is too small, two payload fields are set, or a value cannot be encoded
 * @example
 * const out = new DataView(new ArrayBuffer(HDR_SIZE + MAX_PAYLOAD));
 * encodeMessage({ request: Req.SET_VRING_NUM, flags: 0, fds: [], state: { index: 0, num: 256 } }, out); // 20
 * out.getUint32(4, true); // 1 (version)
 */
export function encodeMessage(m: Message, out: DataView): number {
  return encode(m, out);
}

/**
 * Writes a back-end → front-end message (a back-end request, or our front-end's reply to one)
 * the same way as {@link encodeMessage}; `m.request` is a `BackendReq` id.
 * @example
 * const out = new DataView(new ArrayBuffer(HDR_SIZE + MAX_PAYLOAD));
 * encodeBackendMessage({ request: BackendReq.VRING_CALL, flags: 0, fds: [], state: { index: 1, num: 0 } }, out); // 20
 */
export function encodeBackendMessage(m: Message, out: DataView): number {
  return encode(m, out);
}

function encode(m: Message, out: DataView): number {
  const n = encodePayload(m, out, HDR_SIZE);
  if (n > MAX_PAYLOAD) throw new RangeError(`payload of ${n} bytes exceeds ${MAX_PAYLOAD}`);
  out.setUint32(0, m.request, true);
  out.setUint32(4, ((m.flags & ~FLAG_VERSION_MASK) | VHOST_USER_VERSION) >>> 0, true);
  out.setUint32(8, n, true);
  return HDR_SIZE + n;
}

function payloadFields(m: Message): number {
  let k = 0;
  if (m.u64 !== undefined) k++;
  if (m.state !== undefined) k++;
  if (m.addr !== undefined) k++;
  if (m.vring !== undefined) k++;
  if (m.regions !== undefined) k++;
  if (m.region !== undefined) k++;
  if (m.log !== undefined) k++;
  if (m.inflight !== undefined) k++;
  if (m.config !== undefined) k++;
  if (m.iotlb !== undefined) k++;
  if (m.deviceState !== undefined) k++;
  if (m.uuid !== undefined) k++;
  if (m.area !== undefined) k++;
  if (m.mmap !== undefined) k++;
  if (m.shmem !== undefined) k++;
  if (m.raw !== undefined) k++;
  return k;
}

/** Writes the payload at `o`; returns its length. */
function encodePayload(m: Message, dv: DataView, o: number): number {
  const k = payloadFields(m);
  if (k > 1) throw new RangeError(`message ${m.request} has ${k} payload fields set`);
  if (m.u64 !== undefined) {
    if (m.u64 < 0n || m.u64 > U64_MAX) throw new RangeError(`u64 ${m.u64} out of range`);
    dv.setBigUint64(o, m.u64, true);
    return Size.U64;
  }
  if (m.state !== undefined) {
    dv.setUint32(o, m.state.index, true);
    dv.setUint32(o + 4, m.state.num, true);
    return Size.VRING_STATE;
  }
  if (m.addr !== undefined) {
    const a = m.addr;
    dv.setUint32(o, a.index, true);
    dv.setUint32(o + 4, a.flags, true);
    putNum(dv, o + 8, a.desc);
    putNum(dv, o + 16, a.used);
    putNum(dv, o + 24, a.avail);
    putNum(dv, o + 32, a.log);
    return Size.VRING_ADDR;
  }
  if (m.vring !== undefined) {
    const v = m.vring;
    if (!Number.isInteger(v.index) || v.index < 0 || v.index > VRING_IDX_MASK) throw new RangeError(`vring index ${v.index} does not fit 8 bits`);
    dv.setUint32(o, v.index | (v.noFd ? VRING_NOFD_MASK : 0), true);
    dv.setUint32(o + 4, 0, true);
    return Size.U64;
  }
  if (m.regions !== undefined) {
    // Only the regions present, as QEMU sends them: 8 + 32 × n bytes.
    const r = m.regions;
    dv.setUint32(o, r.length, true);
    dv.setUint32(o + 4, 0, true);
    for (let i = 0; i < r.length; i++) putRegion(dv, o + Size.MEM_TABLE_HDR + Size.MEM_REGION * i, r[i]!);
    return Size.MEM_TABLE_HDR + Size.MEM_REGION * r.length;
  }
  if (m.region !== undefined) {
    putNum(dv, o, 0);
    putRegion(dv, o + 8, m.region);
    return Size.MEM_REG;
  }
  if (m.log !== undefined) {
    putNum(dv, o, m.log.size);
    putNum(dv, o + 8, m.log.offset);
    return Size.LOG;
  }
  if (m.inflight !== undefined) {
    const f = m.inflight;
    putNum(dv, o, f.mmapSize);
    putNum(dv, o + 8, f.mmapOffset);
    dv.setUint16(o + 16, f.numQueues, true);
    dv.setUint16(o + 18, f.queueSize, true);
    dv.setUint32(o + 20, 0, true);
    return Size.INFLIGHT;
  }
  if (m.config !== undefined) {
    // The size field is written as given and the data as given, so a test can make them disagree.
    const c = m.config;
    dv.setUint32(o, c.offset, true);
    dv.setUint32(o + 4, c.size, true);
    dv.setUint32(o + 8, c.flags, true);
    putBytes(dv, o + Size.CONFIG_HDR, c.data);
    return Size.CONFIG_HDR + c.data.length;
  }
  if (m.iotlb !== undefined) {
    const t = m.iotlb;
    putNum(dv, o, t.iova);
    putNum(dv, o + 8, t.size);
    putNum(dv, o + 16, t.uaddr);
    dv.setUint8(o + 24, t.perm);
    dv.setUint8(o + 25, t.type);
    dv.setUint16(o + 26, 0, true);
    dv.setUint32(o + 28, 0, true);
    return Size.IOTLB;
  }
  if (m.deviceState !== undefined) {
    dv.setUint32(o, m.deviceState.direction, true);
    dv.setUint32(o + 4, m.deviceState.phase, true);
    return Size.DEVICE_STATE;
  }
  if (m.uuid !== undefined) {
    if (m.uuid.length !== Size.UUID) throw new RangeError(`uuid is ${m.uuid.length} bytes, expected ${Size.UUID}`);
    putBytes(dv, o, m.uuid);
    return Size.UUID;
  }
  if (m.area !== undefined) {
    const a = m.area;
    if (!Number.isInteger(a.index) || a.index < 0 || a.index > VRING_IDX_MASK) throw new RangeError(`area index ${a.index} does not fit 8 bits`);
    dv.setUint32(o, a.index | (a.noFd ? VRING_NOFD_MASK : 0), true);
    dv.setUint32(o + 4, 0, true);
    putNum(dv, o + 8, a.size);
    putNum(dv, o + 16, a.offset);
    return Size.VRING_AREA;
  }
  if (m.mmap !== undefined) {
    const p = m.mmap;
    putNum(dv, o, 0); // shmid is the low byte; the other 7 bytes are padding
    dv.setUint8(o, p.shmid);
    putNum(dv, o + 8, p.fdOffset);
    putNum(dv, o + 16, p.shmOffset);
    putNum(dv, o + 24, p.len);
    putNum(dv, o + 32, p.flags);
    return Size.SHMEM_MAP;
  }
  if (m.shmem !== undefined) {
    const s = m.shmem;
    if (s.sizes.length > MAX_SHMEM_REGIONS) throw new RangeError(`${s.sizes.length} shmem sizes, at most ${MAX_SHMEM_REGIONS}`);
    dv.setUint32(o, s.nregions, true);
    dv.setUint32(o + 4, 0, true);
    for (let i = 0; i < MAX_SHMEM_REGIONS; i++) putNum(dv, o + 8 + 8 * i, i < s.sizes.length ? s.sizes[i]! : 0);
    return Size.SHMEM_CONFIG;
  }
  if (m.raw !== undefined) {
    putBytes(dv, o, m.raw);
    return m.raw.length;
  }
  return 0;
}

function putRegion(dv: DataView, o: number, r: MemRegion): void {
  putNum(dv, o, r.guestPhysAddr);
  putNum(dv, o + 8, r.memorySize);
  putNum(dv, o + 16, r.userAddr);
  putNum(dv, o + 24, r.mmapOffset);
}

/** A non-negative safe integer as a u64 in two halves (no BigInt). */
function putNum(dv: DataView, o: number, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${n} is not a u64 below 2^53`);
  dv.setUint32(o, n >>> 0, true); // ToUint32 is n mod 2^32, exact below 2^53
  dv.setUint32(o + 4, Math.floor(n / TWO_32), true);
}

function putBytes(dv: DataView, o: number, src: Uint8Array): void {
  if (o + src.length > dv.byteLength) throw new RangeError(`${src.length} bytes do not fit at offset ${o}`);
  new Uint8Array(dv.buffer, dv.byteOffset + o, src.length).set(src);
}

/**
 * Software offloads for a virtio-net switch (VIRTIO 1.2 §5.1.6): what the
 * switch does to a frame one guest sent with offload help before it goes to
 * a port that did not negotiate that help.
 *
 * - NEEDS_CSUM (§5.1.6.2): the guest left a partial checksum; the 16-bit
 *   field at csum_start + csum_offset holds the pseudo-header sum (as Linux
 *   leaves it for CHECKSUM_PARTIAL). `completeChecksum` finishes it.
 * - GSO TCPV4/TCPV6 (+ ECN): one frame carries a TCP payload larger than the
 *   MSS (gso_size). `segmentTcp` cuts it into frames a receiver without
 *   GUEST_TSO accepts, each with full IP and TCP checksums (RFC 791, 9293,
 *   8200).
 * - GSO UDP (UFO): `fragmentUdp4` turns one large UDP/IPv4 datagram into
 *   IPv4 fragments (RFC 791 §2.3 "Fragmentation", §3.2).
 *
 * Everything here is pure: the frame is read, never written (except by
 * `completeChecksum`, which is the point), output goes into a scratch buffer
 * the caller owns and is handed to `emit` one frame at a time, and nothing is
 * allocated per call. Hostile input (the frame comes from a guest) is refused
 * with -1/false: no throw, and every loop is bounded by the frame length.
 * No imports, so a Worker can load this module.
 */

/**
 * virtio_net_hdr.flags bits (§5.1.6).
 * @example (hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0
 */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1, VIRTIO_NET_HDR_F_DATA_VALID = 2;

/**
 * virtio_net_hdr.gso_type values (§5.1.6); GSO_ECN is a flag on TCPV4/TCPV6.
 * @example (hdr[1] & ~GSO_ECN) === GSO_TCPV4
 */
export const GSO_NONE = 0, GSO_TCPV4 = 1, GSO_UDP = 3, GSO_TCPV6 = 4, GSO_ECN = 0x80;

/**
 * Most frames one `segmentTcp` call emits. It cannot be reached from a valid
 * frame (IPv4 total length and IPv6 payload length are 16-bit and jumbograms
 * are refused, so at most 65495 payload bytes, one segment each at MSS 1);
 * the check is the loop's explicit guard.
 * @example segmentTcp(frame, len, GSO_TCPV4, 1, scratch, emit) <= MAX_SEGMENTS
 */
export const MAX_SEGMENTS = 65535;

const ETH_HLEN = 14, VLAN_HLEN = 4;
const ETH_P_IP = 0x0800, ETH_P_IPV6 = 0x86dd, ETH_P_8021Q = 0x8100;
const IPPROTO_TCP = 6, IPPROTO_UDP = 17;
const IPV4_MIN_HLEN = 20, IPV6_HLEN = 40, TCP_MIN_HLEN = 20, UDP_HLEN = 8;
/** RFC 791 §3.1 flags/fragment offset word; bit 15 is reserved and kept as found. */
const IP_DF = 0x4000, IP_MF = 0x2000, IP_OFFMASK = 0x1fff;
/** RFC 9293 §3.1 control bits (byte 13 of the TCP header; CWR/ECE from RFC 3168). */
const TCP_FIN = 0x01, TCP_PSH = 0x08, TCP_CWR = 0x80;
/** RFC 791 §3.2: every internet module forwards a 68-byte datagram without fragmenting it further. */
const IPV4_MIN_MTU = 68;

/**
 * Adds the big-endian 16-bit words of `buf[off, off+len)` to a running
 * ones'-complement sum (RFC 1071 §4.1); an odd last byte is padded with zero,
 * so only the last piece of a checksummed region may have an odd length.
 * Returns the sum folded to 16 bits (not complemented); pass it on as `sum`.
 * Throws RangeError when the range is not inside `buf` (a caller bug).
 * @example
 * const sum = csumPartial(Uint8Array.of(0x45, 0x00, 0x00, 0x1c), 0, 4, 0); // 0x451c
 */
export function csumPartial(buf: Uint8Array, off: number, len: number, sum: number): number {
  if (!(off >= 0 && len >= 0 && off + len <= buf.length)) {
    throw new RangeError(`csumPartial: range [${off}, ${off + len}) not inside [0, ${buf.length}]`);
  }
  const end = off + len;
  let i = off;
  // Words are ≤ 0xffff and a buffer is < 2^32 bytes, so the total stays below 2^53: no fold needed inside the loop.
  for (; i + 1 < end; i += 2) sum += (buf[i]! << 8) | buf[i + 1]!;
  if (i < end) sum += buf[i]! << 8;
  return fold(sum);
}

/**
 * Folds a running sum to 16 bits and complements it: the value a checksum
 * field holds (RFC 1071 §4.1), in host order (store it big-endian).
 * @example csumFold(0x12345) === 0xdcb9 // 0x2345 + 0x1 = 0x2346, complemented
 */
export function csumFold(sum: number): number {
  return ~fold(sum) & 0xffff;
}

/**
 * Completes a NEEDS_CSUM frame in place (§5.1.6.2): the 16-bit field at
 * csumStart + csumOffset holds the pseudo-header sum; the ones' complement of
 * the sum over [csumStart, len) is stored there, big-endian. A result of 0 is
 * stored as 0xffff (RFC 768: 0 means "no checksum" for UDP; for TCP both
 * verify). Returns false, frame untouched, when csumStart ≥ len, the field
 * does not fit before len, or len exceeds the frame.
 * @example
 * if (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM && !completeChecksum(frame, len, hdr.csumStart, hdr.csumOffset)) drop();
 */
export function completeChecksum(frame: Uint8Array, len: number, csumStart: number, csumOffset: number): boolean {
  if (!isLen(frame, len) || !isU16(csumStart) || !isU16(csumOffset)) return false;
  if (csumStart >= len || csumStart + csumOffset + 2 > len) return false;
  const v = csumFold(csumPartial(frame, csumStart, len - csumStart, 0));
  put16(frame, csumStart + csumOffset, v === 0 ? 0xffff : v);
  return true;
}

/**
 * Software TSO: splits one TCP frame (gso_type TCPV4 or TCPV6, GSO_ECN
 * allowed) into frames of at most `gsoSize` payload bytes. Each output frame
 * is a complete Ethernet frame: IPv4 total length, id (original + segment
 * index), header checksum; IPv6 payload length; sequence number; CWR only on
 * the first segment, FIN and PSH only on the last; and a full TCP checksum
 * computed from scratch (the original's, partial or not, is ignored).
 *
 * The header length comes from parsing the frame (the guest's hdr_len is
 * not used): Ethernet with at most one 802.1Q tag, IPv4 with options (not a
 * fragment, total length ≠ 0) or IPv6 whose next header is TCP, TCP with
 * options. Bytes after the IP datagram (Ethernet padding) are dropped.
 *
 * Refused (-1, nothing emitted): gsoSize not in 1..65535; a gso_type other
 * than TCPV4/TCPV6 or not matching the IP version; any parse failure; len
 * beyond the frame; `scratch` shorter than headers + one segment, or
 * overlapping the frame. `emit` gets `scratch` itself and the segment length;
 * it must copy what it keeps before returning. A frame whose payload fits in
 * one segment comes out as one frame (with its checksums recomputed).
 * @example
 * const n = segmentTcp(frame, len, hdr.gsoType, hdr.gsoSize, scratch, (seg, segLen) => port.send(seg, segLen));
 * if (n < 0) stats.dropped++;
 */
export function segmentTcp(
  frame: Uint8Array, len: number, gsoType: number, gsoSize: number, scratch: Uint8Array,
  emit: (seg: Uint8Array, segLen: number) => void,
): number {
  if (!isLen(frame, len) || !isU16(gsoSize) || gsoSize === 0 || !isU8(gsoType)) return -1;
  if (!parseIp(frame, len, IPPROTO_TCP)) return -1;
  // Copied out of `parsed` before `emit` runs, which may call back into this module.
  const l3 = parsed[P_L3]!, l4 = parsed[P_L4]!, end = parsed[P_END]!, v4 = parsed[P_VERSION] === 4;
  const base = gsoType & ~GSO_ECN;
  if (base !== (v4 ? GSO_TCPV4 : GSO_TCPV6)) return -1;
  if (l4 + TCP_MIN_HLEN > end) return -1;
  const tcpHl = (frame[l4 + 12]! >> 4) * 4;
  if (tcpHl < TCP_MIN_HLEN || l4 + tcpHl > end) return -1;
  const hdrLen = l4 + tcpHl, payload = end - hdrLen;
  const nseg = payload === 0 ? 1 : Math.ceil(payload / gsoSize);
  if (nseg > MAX_SEGMENTS) return -1;
  if (scratch.length < hdrLen + Math.min(gsoSize, payload) || overlaps(frame, len, scratch)) return -1;

  const ipHl = l4 - l3, id = get16(frame, l3 + 4), seq = get32(frame, l4 + 4), flags0 = frame[l4 + 13]!;
  // Pseudo-header without the length (RFC 9293 §3.1; RFC 8200 §8.1): addresses and protocol are the same in every segment.
  const pseudo = v4
    ? csumPartial(frame, l3 + 12, 8, IPPROTO_TCP)
    : csumPartial(frame, l3 + 8, 32, IPPROTO_TCP);
  let off = hdrLen;
  for (let i = 0; i < nseg; i++) {
    const pay = Math.min(gsoSize, end - off), tcpLen = tcpHl + pay;
    copyBytes(frame, 0, scratch, 0, hdrLen); // again each time: the callee may have written into scratch
    const paySum = copyAndSum(frame, off, scratch, hdrLen, pay);
    if (v4) {
      put16(scratch, l3 + 2, ipHl + tcpLen);
      put16(scratch, l3 + 4, (id + i) & 0xffff);
      put16(scratch, l3 + 10, 0);
      put16(scratch, l3 + 10, csumFold(csumPartial(scratch, l3, ipHl, 0)));
    } else {
      put16(scratch, l3 + 4, tcpLen);
    }
    // i * gsoSize < 2^32 (payload < 2^16); >>> 0 is the mod-2^32 sequence arithmetic of RFC 9293 §3.4.
    put32(scratch, l4 + 4, (seq + i * gsoSize) >>> 0);
    let flags = flags0;
    if (i > 0) flags &= ~TCP_CWR;
    if (i < nseg - 1) flags &= ~(TCP_FIN | TCP_PSH);
    scratch[l4 + 13] = flags;
    put16(scratch, l4 + 16, 0);
    const sum = csumPartial(scratch, l4, tcpHl, pseudo + tcpLen + paySum);
    put16(scratch, l4 + 16, csumFold(sum));
    emit(scratch, hdrLen + pay);
    off += pay;
  }
  return nseg;
}

/**
 * UFO (gso_type UDP) for IPv4: fragments one UDP datagram so that each IP
 * packet is at most `mtu` bytes (the IP MTU, without the Ethernet header;
 * 68..65535). Non-last fragments carry a multiple of 8 payload bytes and MF;
 * offsets count 8-byte units; the first fragment keeps all IP options, the
 * others only those with the copied flag (RFC 791 §3.1), padded with EOL.
 * With `needsCsum` the UDP checksum is completed over the whole datagram
 * first (as `completeChecksum`, the frame itself is not written). A datagram
 * that already fits comes out as one unfragmented frame.
 *
 * Refused (-1, nothing emitted): IPv6 (UFO over IPv6 would need a fragment
 * header), not UDP, a parse failure or malformed options, an IP datagram that
 * is already a fragment, UDP length ≠ IP payload length, DF set on a datagram
 * that needs fragmenting, csumStart before the UDP header or the field past
 * the datagram, mtu out of range, `scratch` shorter than Ethernet header + mtu
 * (or the whole frame when it fits) or overlapping the frame. Same `emit`
 * convention as `segmentTcp`.
 * @example
 * const n = fragmentUdp4(frame, len, 1500, (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0,
 *   hdr.csumStart, hdr.csumOffset, scratch, (seg, segLen) => port.send(seg, segLen));
 */
export function fragmentUdp4(
  frame: Uint8Array, len: number, mtu: number, needsCsum: boolean, csumStart: number, csumOffset: number,
  scratch: Uint8Array, emit: (seg: Uint8Array, segLen: number) => void,
): number {
  if (!isLen(frame, len) || !isU16(mtu) || mtu < IPV4_MIN_MTU) return -1;
  if (!parseIp(frame, len, IPPROTO_UDP) || parsed[P_VERSION] !== 4) return -1;
  const l3 = parsed[P_L3]!, l4 = parsed[P_L4]!, end = parsed[P_END]!, ipHl = l4 - l3;
  if (l4 + UDP_HLEN > end || get16(frame, l4 + 4) !== end - l4) return -1;
  const copiedLen = copyOptions(frame, l3 + IPV4_MIN_HLEN, l4, null, 0);
  if (copiedLen < 0 || overlaps(frame, len, scratch)) return -1;
  let fieldAt = -1, field = 0;
  if (needsCsum) {
    if (!isU16(csumStart) || !isU16(csumOffset) || csumStart < l4 || csumStart + csumOffset + 2 > end) return -1;
    fieldAt = csumStart + csumOffset;
    const v = csumFold(csumPartial(frame, csumStart, end - csumStart, 0));
    field = v === 0 ? 0xffff : v; // RFC 768: a computed 0 is sent as all ones
  }

  if (end - l3 <= mtu) {
    if (scratch.length < end) return -1;
    copyBytes(frame, 0, scratch, 0, end);
    if (fieldAt >= 0) put16(scratch, fieldAt, field);
    emit(scratch, end);
    return 1;
  }
  if (get16(frame, l3 + 6) & IP_DF) return -1;
  if (scratch.length < l3 + mtu) return -1;

  const otherHl = IPV4_MIN_HLEN + ((copiedLen + 3) & ~3);
  const firstChunk = ((mtu - ipHl) >> 3) << 3, otherChunk = ((mtu - otherHl) >> 3) << 3; // both ≥ 8: mtu ≥ 68, hl ≤ 60
  const reserved = get16(frame, l3 + 6) & 0x8000, dataLen = end - l4;
  let pos = 0, n = 0;
  while (pos < dataLen) {
    const first = pos === 0, hl = first ? ipHl : otherHl;
    const chunk = Math.min(first ? firstChunk : otherChunk, dataLen - pos), last = pos + chunk === dataLen;
    copyBytes(frame, 0, scratch, 0, l3 + IPV4_MIN_HLEN);
    if (first) {
      copyBytes(frame, l3 + IPV4_MIN_HLEN, scratch, l3 + IPV4_MIN_HLEN, ipHl - IPV4_MIN_HLEN);
    } else {
      const w = copyOptions(frame, l3 + IPV4_MIN_HLEN, l4, scratch, l3 + IPV4_MIN_HLEN);
      for (let k = IPV4_MIN_HLEN + w; k < hl; k++) scratch[l3 + k] = 0; // EOL padding
    }
    scratch[l3] = 0x40 | (hl >> 2);
    put16(scratch, l3 + 2, hl + chunk);
    put16(scratch, l3 + 6, reserved | (last ? 0 : IP_MF) | (pos >> 3));
    put16(scratch, l3 + 10, 0);
    put16(scratch, l3 + 10, csumFold(csumPartial(scratch, l3, hl, 0)));
    const dst = l3 + hl;
    copyBytes(frame, l4 + pos, scratch, dst, chunk);
    if (fieldAt >= 0) {
      // The field is patched byte by byte: in principle it may straddle two fragments.
      const r0 = fieldAt - l4 - pos, r1 = r0 + 1;
      if (r0 >= 0 && r0 < chunk) scratch[dst + r0] = field >> 8;
      if (r1 >= 0 && r1 < chunk) scratch[dst + r1] = field & 0xff;
    }
    emit(scratch, dst + chunk);
    n++;
    pos += chunk;
  }
  return n;
}

/**
 * The 48-bit MAC address at `frame[off, off+6)` as a safe integer (first
 * octet most significant): off 0 is the Ethernet destination, 6 the source.
 * Throws RangeError when the six bytes are not inside the frame.
 * @example
 * const dst = macAt(frame, 0), src = macAt(frame, 6);
 */
export function macAt(frame: Uint8Array, off: number): number {
  if (!Number.isInteger(off) || off < 0 || off + 6 > frame.length) {
    throw new RangeError(`macAt: offset ${off} not in [0, ${frame.length - 6}]`);
  }
  const hi = (frame[off]! << 16) | (frame[off + 1]! << 8) | frame[off + 2]!;
  const lo = (frame[off + 3]! << 16) | (frame[off + 4]! << 8) | frame[off + 5]!;
  return hi * 0x1000000 + lo;
}

/**
 * True for a group address: the I/G bit (bit 0 of the first octet, IEEE 802),
 * which includes broadcast ff:ff:ff:ff:ff:ff.
 * @example isMulticast(parseMac("01:00:5e:00:00:01")) && !isMulticast(parseMac("02:00:00:00:00:01"))
 */
export function isMulticast(mac: number): boolean {
  return (Math.floor(mac / 0x10000000000) & 1) === 1;
}

/**
 * A MAC address as six lower-case hex octets joined by ':'. Throws RangeError
 * for anything but an integer in [0, 2^48).
 * @example formatMac(0x020000000001) === "02:00:00:00:00:01"
 */
export function formatMac(mac: number): string {
  if (!Number.isInteger(mac) || mac < 0 || mac >= 0x1000000000000) {
    throw new RangeError(`formatMac: ${mac} is not a 48-bit address (0 to 0xffffffffffff)`);
  }
  const hi = Math.floor(mac / 0x1000000), lo = mac % 0x1000000;
  return [hi >> 16, (hi >> 8) & 0xff, hi & 0xff, lo >> 16, (lo >> 8) & 0xff, lo & 0xff]
    .map((o) => o.toString(16).padStart(2, "0")).join(":");
}

const MAC_RE = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/i;

/**
 * Parses "xx:xx:xx:xx:xx:xx" (hex, either case) into the number `macAt`
 * returns. Throws RangeError for any other string.
 * @example parseMac("02:00:00:00:00:01") === 0x020000000001
 */
export function parseMac(s: string): number {
  if (typeof s !== "string" || !MAC_RE.test(s)) {
    throw new RangeError(`parseMac: ${JSON.stringify(s)} is not six hex octets "xx:xx:xx:xx:xx:xx"`);
  }
  return parseInt(s.slice(0, 8).replaceAll(":", ""), 16) * 0x1000000 + parseInt(s.slice(9).replaceAll(":", ""), 16);
}

// ---- internals ----

/** parseIp results; read into locals right after the call. */
const parsed = new Int32Array(4);
const P_L3 = 0, P_L4 = 1, P_END = 2, P_VERSION = 3;

/**
 * Ethernet (+ one 802.1Q tag) → IPv4 or IPv6 carrying `proto` directly.
 * Fills `parsed`: L3 and L4 offsets, END = end of the IP datagram (≤ len),
 * VERSION. IPv4: IHL ≥ 5, total length covers the header and fits in len,
 * not a fragment. IPv6: no extension headers, payload length fits in len.
 */
function parseIp(frame: Uint8Array, len: number, proto: number): boolean {
  if (len < ETH_HLEN) return false;
  let l3 = ETH_HLEN, type = get16(frame, 12);
  if (type === ETH_P_8021Q) {
    if (len < ETH_HLEN + VLAN_HLEN) return false;
    l3 += VLAN_HLEN;
    type = get16(frame, 16);
  }
  if (type === ETH_P_IP) {
    if (l3 + IPV4_MIN_HLEN > len || frame[l3]! >> 4 !== 4) return false;
    const ihl = (frame[l3]! & 0xf) * 4, total = get16(frame, l3 + 2);
    if (ihl < IPV4_MIN_HLEN || total < ihl || l3 + total > len) return false;
    if (get16(frame, l3 + 6) & (IP_MF | IP_OFFMASK) || frame[l3 + 9] !== proto) return false;
    parsed[P_L3] = l3; parsed[P_L4] = l3 + ihl; parsed[P_END] = l3 + total; parsed[P_VERSION] = 4;
    return true;
  }
  if (type === ETH_P_IPV6) {
    if (l3 + IPV6_HLEN > len || frame[l3]! >> 4 !== 6 || frame[l3 + 6] !== proto) return false;
    const end = l3 + IPV6_HLEN + get16(frame, l3 + 4);
    if (end > len) return false;
    parsed[P_L3] = l3; parsed[P_L4] = l3 + IPV6_HLEN; parsed[P_END] = end; parsed[P_VERSION] = 6;
    return true;
  }
  return false;
}

/**
 * Walks IPv4 options in src[from, to) (RFC 791 §3.1) and writes those with
 * the copied flag (type bit 7) to dst at dstOff when dst is given. Returns
 * the bytes such options take, or -1 when an option is malformed (length < 2
 * or past the header). EOL ends the list; NOP is one byte and not copied.
 */
function copyOptions(src: Uint8Array, from: number, to: number, dst: Uint8Array | null, dstOff: number): number {
  let i = from, w = 0;
  while (i < to) {
    const type = src[i]!;
    if (type === 0) break;
    if (type === 1) { i++; continue; }
    if (i + 1 >= to) return -1;
    const olen = src[i + 1]!;
    if (olen < 2 || i + olen > to) return -1;
    if (type & 0x80) {
      if (dst) copyBytes(src, i, dst, dstOff + w, olen);
      w += olen;
    }
    i += olen;
  }
  return w;
}

function fold(sum: number): number {
  while (sum > 0xffff) sum = (sum % 0x10000) + Math.floor(sum / 0x10000);
  return sum;
}

/** Copies n bytes and returns their ones'-complement sum, pairing from src[s] (odd tail padded). */
function copyAndSum(src: Uint8Array, s: number, dst: Uint8Array, d: number, n: number): number {
  let sum = 0, k = 0;
  for (; k + 1 < n; k += 2) {
    const a = src[s + k]!, b = src[s + k + 1]!;
    dst[d + k] = a; dst[d + k + 1] = b;
    sum += (a << 8) | b;
  }
  if (k < n) { const a = src[s + k]!; dst[d + k] = a; sum += a << 8; }
  return fold(sum);
}

function copyBytes(src: Uint8Array, s: number, dst: Uint8Array, d: number, n: number): void {
  for (let k = 0; k < n; k++) dst[d + k] = src[s + k]!;
}

function overlaps(frame: Uint8Array, len: number, scratch: Uint8Array): boolean {
  if (frame.buffer !== scratch.buffer) return false;
  const a = frame.byteOffset, b = scratch.byteOffset;
  return a < b + scratch.length && b < a + len;
}

function isLen(frame: Uint8Array, len: number): boolean {
  return Number.isInteger(len) && len >= 0 && len <= frame.length;
}
function isU16(v: number): boolean { return Number.isInteger(v) && v >= 0 && v <= 0xffff; }
function isU8(v: number): boolean { return Number.isInteger(v) && v >= 0 && v <= 0xff; }

function get16(b: Uint8Array, o: number): number { return (b[o]! << 8) | b[o + 1]!; }
function get32(b: Uint8Array, o: number): number { return b[o]! * 0x1000000 + ((b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!); }
function put16(b: Uint8Array, o: number, v: number): void { b[o] = v >> 8; b[o + 1] = v; }
function put32(b: Uint8Array, o: number, v: number): void { b[o] = v >>> 24; b[o + 1] = v >> 16; b[o + 2] = v >> 8; b[o + 3] = v; }

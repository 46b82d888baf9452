/**
 * Software offloads for the virtio-net switch (src/devices/net/offload.ts).
 * Frames are built here byte by byte (Ethernet, optional 802.1Q tag, IPv4
 * with options or IPv6, TCP with options or UDP) and every emitted frame is
 * checked field by field; checksums are verified by an independent summer
 * below (whole header, or pseudo-header + segment, must sum to 0xffff), and
 * payloads are reassembled and compared with the original bytes. Hostile
 * frames (truncated, bad IHL / data offset, lengths past the frame) must be
 * refused without throwing. A seeded mutation loop covers the rest.
 */
import { describe, expect, test } from "bun:test";
import {
  GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP, MAX_SEGMENTS, completeChecksum, csumFold, csumPartial, formatMac,
  fragmentUdp4, isMulticast, macAt, parseMac, segmentTcp,
} from "../../src/devices/net/offload.ts";

// ---- an independent checksum (RFC 1071), deliberately naive ----

function sum16(b: Uint8Array, from: number, to: number): number {
  let s = 0;
  for (let i = from; i < to; i += 2) s += b[i]! * 256 + (i + 1 < to ? b[i + 1]! : 0);
  return s;
}
function foldAll(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 65536);
  return s;
}
/** RFC 9293 §3.1 / RFC 8200 §8.1 pseudo-header, built as bytes. */
function pseudoHeader(f: Uint8Array, l3: number, v6: boolean, proto: number, l4len: number): Uint8Array {
  if (v6) {
    const p = new Uint8Array(40);
    p.set(f.subarray(l3 + 8, l3 + 40), 0);
    p[32] = l4len >>> 24; p[33] = (l4len >> 16) & 0xff; p[34] = (l4len >> 8) & 0xff; p[35] = l4len & 0xff;
    p[39] = proto;
    return p;
  }
  const p = new Uint8Array(12);
  p.set(f.subarray(l3 + 12, l3 + 20), 0);
  p[9] = proto; p[10] = l4len >> 8; p[11] = l4len & 0xff;
  return p;
}
/** True when pseudo-header + [l4, end) sums to 0xffff. */
function l4Verifies(f: Uint8Array, l3: number, l4: number, end: number, v6: boolean, proto: number): boolean {
  const p = pseudoHeader(f, l3, v6, proto, end - l4);
  return foldAll(sum16(p, 0, p.length) + sum16(f, l4, end)) === 0xffff;
}
function ipv4HeaderVerifies(f: Uint8Array, l3: number): boolean {
  return foldAll(sum16(f, l3, l3 + (f[l3]! & 15) * 4)) === 0xffff;
}

const get16 = (b: Uint8Array, o: number) => b[o]! * 256 + b[o + 1]!;
const get32 = (b: Uint8Array, o: number) => get16(b, o) * 65536 + get16(b, o + 2);
const put16 = (b: Uint8Array, o: number, v: number) => { b[o] = (v >> 8) & 0xff; b[o + 1] = v & 0xff; };
const put32 = (b: Uint8Array, o: number, v: number) => { put16(b, o, Math.floor(v / 65536) & 0xffff); put16(b, o + 2, v & 0xffff); };

/** Deterministic bytes (xorshift32), so failures reproduce. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
}
function bytes(n: number, seed: number): Uint8Array {
  const r = rng(seed), b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = r() & 0xff;
  return b;
}

// ---- frame builders ----

const TCP_FIN = 0x01, TCP_SYN = 0x02, TCP_PSH = 0x08, TCP_ACK = 0x10, TCP_ECE = 0x40, TCP_CWR = 0x80;
/** Router Alert (copied, RFC 2113) + NOP + Record Route (not copied, 7 bytes) → 12 bytes, IHL 8. */
const IP_OPTS = [0x94, 4, 0, 0, 0x07, 7, 4, 0, 0, 0, 0, 1];
/** MSS, SACK-permitted, timestamps, window scale, padded: 20 bytes → data offset 10. */
const TCP_OPTS = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];

interface Spec {
  v6?: boolean; vlan?: boolean; ipOpts?: number[]; l4Opts?: number[]; payload: Uint8Array;
  proto?: number; seq?: number; id?: number; flags?: number; partial?: boolean; pad?: number; df?: boolean;
}
interface Built { frame: Uint8Array; l3: number; l4: number; hdrLen: number; end: number }

function build(s: Spec): Built {
  const proto = s.proto ?? 6, v6 = s.v6 ?? false;
  const l3 = s.vlan ? 18 : 14;
  const ipHl = v6 ? 40 : 20 + (s.ipOpts?.length ?? 0);
  const l4 = l3 + ipHl;
  const l4Hl = proto === 6 ? 20 + (s.l4Opts?.length ?? 0) : 8;
  const hdrLen = l4 + l4Hl, end = hdrLen + s.payload.length;
  const f = new Uint8Array(end + (s.pad ?? 0));
  f.set([0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01], 0);
  if (s.vlan) { put16(f, 12, 0x8100); put16(f, 14, 0x0064); }
  put16(f, l3 - 2, v6 ? 0x86dd : 0x0800);
  if (v6) {
    f[l3] = 0x60; f[l3 + 1] = 0x01; // traffic class 0, flow label 0x10000
    put16(f, l3 + 4, end - l4); f[l3 + 6] = proto; f[l3 + 7] = 64;
    f.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], l3 + 8);
    f.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], l3 + 24);
  } else {
    f[l3] = 0x40 | (ipHl >> 2); put16(f, l3 + 2, end - l3); put16(f, l3 + 4, s.id ?? 0x1234);
    put16(f, l3 + 6, (s.df ?? proto === 6) ? 0x4000 : 0); f[l3 + 8] = 64; f[l3 + 9] = proto;
    f.set([10, 0, 0, 1, 10, 0, 0, 2], l3 + 12);
    if (s.ipOpts) f.set(s.ipOpts, l3 + 20);
    put16(f, l3 + 10, ~foldAll(sum16(f, l3, l4)) & 0xffff);
  }
  if (proto === 6) {
    put16(f, l4, 40000); put16(f, l4 + 2, 5201); put32(f, l4 + 4, s.seq ?? 1000); put32(f, l4 + 8, 0x01020304);
    f[l4 + 12] = (l4Hl >> 2) << 4; f[l4 + 13] = s.flags ?? TCP_ACK; put16(f, l4 + 14, 65535);
    if (s.l4Opts) f.set(s.l4Opts, l4 + 20);
  } else {
    put16(f, l4, 40000); put16(f, l4 + 2, 5201); put16(f, l4 + 4, end - l4);
  }
  f.set(s.payload, hdrLen);
  const at = l4 + (proto === 6 ? 16 : 6);
  const p = pseudoHeader(f, l3, v6, proto, end - l4);
  if (s.partial) {
    put16(f, at, foldAll(sum16(p, 0, p.length))); // Linux CHECKSUM_PARTIAL: the pseudo-header sum
  } else {
    const c = ~foldAll(sum16(p, 0, p.length) + sum16(f, l4, end)) & 0xffff;
    put16(f, at, proto === 17 && c === 0 ? 0xffff : c);
  }
  return { frame: f, l3, l4, hdrLen, end };
}

function collect(): { segs: Uint8Array[]; emit: (seg: Uint8Array, n: number) => void } {
  const segs: Uint8Array[] = [];
  return { segs, emit: (seg, n) => { segs.push(seg.slice(0, n)); } };
}

const SCRATCH = new Uint8Array(70000);

/** Checks every emitted TCP segment against the original frame; returns the reassembled payload. */
function checkSegments(b: Built, spec: Spec, segs: Uint8Array[], mss: number): Uint8Array {
  const { frame, l3, l4, hdrLen } = b, v6 = spec.v6 ?? false;
  const payload = spec.payload, n = Math.max(1, Math.ceil(payload.length / mss));
  expect(segs.length).toBe(n);
  const out = new Uint8Array(payload.length);
  const flags0 = frame[l4 + 13]!;
  let off = 0;
  for (let i = 0; i < n; i++) {
    const s = segs[i]!, pay = Math.min(mss, payload.length - off);
    if (s.length !== hdrLen + pay) throw new Error(`segment ${i}: length ${s.length}, want ${hdrLen + pay}`);
    // Ethernet (and tag) unchanged
    for (let k = 0; k < l3; k++) if (s[k] !== frame[k]) throw new Error(`segment ${i}: Ethernet byte ${k}`);
    if (v6) {
      if (get16(s, l3 + 4) !== s.length - l3 - 40) throw new Error(`segment ${i}: payload length`);
      for (let k = l3; k < l3 + 40; k++) if (k !== l3 + 4 && k !== l3 + 5 && s[k] !== frame[k]) throw new Error(`seg ${i}: IPv6 byte ${k}`);
    } else {
      if (get16(s, l3 + 2) !== s.length - l3) throw new Error(`segment ${i}: total length`);
      if (get16(s, l3 + 4) !== ((spec.id ?? 0x1234) + i) % 65536) throw new Error(`segment ${i}: id ${get16(s, l3 + 4)}`);
      if (get16(s, l3 + 6) !== get16(frame, l3 + 6)) throw new Error(`segment ${i}: flags/fragment`);
      for (let k = l3 + 12; k < l4; k++) if (s[k] !== frame[k]) throw new Error(`segment ${i}: IPv4 byte ${k}`);
      if (!ipv4HeaderVerifies(s, l3)) throw new Error(`segment ${i}: IPv4 header checksum`);
    }
    const seq = ((spec.seq ?? 1000) + i * mss) % 2 ** 32;
    if (get32(s, l4 + 4) !== seq) throw new Error(`segment ${i}: seq ${get32(s, l4 + 4)}, want ${seq}`);
    let want = flags0;
    if (i > 0) want &= ~TCP_CWR;
    if (i < n - 1) want &= ~(TCP_FIN | TCP_PSH);
    if (s[l4 + 13] !== want) throw new Error(`segment ${i}: flags ${s[l4 + 13]!.toString(16)}, want ${want.toString(16)}`);
    for (let k = l4; k < hdrLen; k++) {
      if (k >= l4 + 4 && k < l4 + 8 || k === l4 + 13 || k === l4 + 16 || k === l4 + 17) continue;
      if (s[k] !== frame[k]) throw new Error(`segment ${i}: TCP byte ${k - l4}`);
    }
    if (!l4Verifies(s, l3, l4, s.length, v6, 6)) throw new Error(`segment ${i}: TCP checksum`);
    out.set(s.subarray(hdrLen), off);
    off += pay;
  }
  return out;
}

describe("csumPartial / csumFold", () => {
  test("csumPartial() gives the RFC 1071 §3 example sum (0xddf2) and csumFold() its checksum (0x220d)", () => {
    const b = Uint8Array.of(0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7);
    expect(csumPartial(b, 0, 8, 0)).toBe(0xddf2);
    expect(csumFold(csumPartial(b, 0, 8, 0))).toBe(0x220d);
  });
  test("csumPartial() chains over even pieces to the same sum, and pads an odd tail with zero", () => {
    const b = bytes(1001, 7);
    const whole = csumPartial(b, 0, 1001, 0);
    expect(csumPartial(b, 500, 501, csumPartial(b, 0, 500, 0))).toBe(whole);
    expect(whole).toBe(foldAll(sum16(b, 0, 1001)));
    expect(csumFold(0x12345)).toBe(0xdcb9);
  });
  test("csumPartial() throws RangeError for a range outside the buffer", () => {
    expect(() => csumPartial(new Uint8Array(4), 2, 3, 0)).toThrow(RangeError);
    expect(() => csumPartial(new Uint8Array(4), -1, 2, 0)).toThrow(RangeError);
  });
});

describe("completeChecksum", () => {
  for (const [name, spec] of [
    ["UDP/IPv4", { proto: 17, payload: bytes(333, 1), partial: true }],
    ["TCP/IPv4 with options", { ipOpts: IP_OPTS, l4Opts: TCP_OPTS, payload: bytes(1000, 2), partial: true }],
    ["TCP/IPv6, 802.1Q", { v6: true, vlan: true, l4Opts: TCP_OPTS, payload: bytes(777, 3), partial: true }],
    ["UDP/IPv6", { v6: true, proto: 17, payload: bytes(64, 4), partial: true }],
  ] as [string, Spec][]) {
    test(`completeChecksum() completes a partial ${name} checksum so the packet verifies`, () => {
      const b = build(spec), proto = spec.proto ?? 6;
      expect(l4Verifies(b.frame, b.l3, b.l4, b.end, spec.v6 ?? false, proto)).toBe(false);
      expect(completeChecksum(b.frame, b.end, b.l4, proto === 6 ? 16 : 6)).toBe(true);
      expect(l4Verifies(b.frame, b.l3, b.l4, b.end, spec.v6 ?? false, proto)).toBe(true);
    });
  }
  test("completeChecksum() stores a computed 0 as 0xffff (RFC 768), which still verifies", () => {
    const payload = bytes(100, 5);
    payload[98] = payload[99] = 0;
    let b = build({ proto: 17, payload, partial: true });
    // pick the last word so the region sums to 0xffff, making the checksum 0
    const s = foldAll(sum16(b.frame, b.l4, b.end));
    payload[98] = (0xffff - s) >> 8; payload[99] = (0xffff - s) & 0xff;
    b = build({ proto: 17, payload, partial: true });
    expect(completeChecksum(b.frame, b.end, b.l4, 6)).toBe(true);
    expect(get16(b.frame, b.l4 + 6)).toBe(0xffff);
    expect(l4Verifies(b.frame, b.l3, b.l4, b.end, false, 17)).toBe(true);
  });
  test("completeChecksum() refuses csumStart ≥ len, a field past len, len > frame, bad numbers; frame untouched", () => {
    const b = build({ proto: 17, payload: bytes(20, 6), partial: true });
    const copy = b.frame.slice();
    for (const [len, start, off] of [
      [b.end, b.end, 0], [b.end, b.end + 100, 0], [b.end, b.end - 1, 0], [b.end, b.l4, b.end - b.l4 - 1],
      [b.frame.length + 1, b.l4, 6], [-1, b.l4, 6], [b.end, -2, 6], [b.end, b.l4, -1], [b.end, 1.5, 6],
      [b.end, 70000, 6], [NaN, b.l4, 6], [b.end, b.l4, 0x10000],
    ]) {
      expect(completeChecksum(b.frame, len!, start!, off!)).toBe(false);
    }
    expect(b.frame).toEqual(copy);
  });
});

describe("segmentTcp", () => {
  // IPv4 total length ≤ 65535: 65535 − 32 (IP + options) − 40 (TCP + options) payload bytes, the most a TSO frame carries.
  const MAX4 = 65535 - 32 - 40, MAX6 = 65535 - 40;
  const cases: [string, Spec, number][] = [];
  for (const mss of [1448, 536]) {
    cases.push([`IPv4 + options, ${MAX4}-byte payload, MSS ${mss}`, { ipOpts: IP_OPTS, l4Opts: TCP_OPTS, payload: bytes(MAX4, 11) }, mss]);
    cases.push([`IPv6 + 802.1Q, ${MAX6}-byte payload, MSS ${mss}`, { v6: true, vlan: true, l4Opts: TCP_OPTS, payload: bytes(MAX6, 12) }, mss]);
  }
  cases.push(["IPv4, 802.1Q, odd payload 10007, MSS 1448", { vlan: true, l4Opts: TCP_OPTS, payload: bytes(10007, 13) }, 1448]);
  cases.push(["IPv6, odd payload 4345, MSS 1447 (odd MSS)", { v6: true, payload: bytes(4345, 14) }, 1447]);
  cases.push(["IPv4, payload exactly 3 × MSS", { payload: bytes(3 * 536, 15) }, 536]);
  cases.push(["IPv4, payload < MSS: one segment", { payload: bytes(100, 16), flags: TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR }, 1448]);
  cases.push(["IPv4, no payload: one segment", { payload: new Uint8Array(0), flags: TCP_ACK | TCP_FIN }, 1448]);
  cases.push(["IPv4, CWR/ECE/PSH/FIN on the original", { payload: bytes(5000, 17), flags: TCP_ACK | TCP_CWR | TCP_ECE | TCP_PSH | TCP_FIN }, 1448]);
  cases.push(["IPv4, sequence number and IP id wrap", { payload: bytes(6000, 18), seq: 0xfffff000, id: 0xfffe }, 1000]);
  cases.push(["IPv4, partial checksum (NEEDS_CSUM) in the original", { payload: bytes(9000, 19), partial: true }, 1448]);
  cases.push(["IPv6, partial checksum (NEEDS_CSUM) in the original", { v6: true, payload: bytes(9000, 20), partial: true }, 1448]);
  cases.push(["IPv4, Ethernet padding after the datagram is dropped", { payload: bytes(3000, 21), pad: 7 }, 1448]);
  for (const [name, spec, mss] of cases) {
    test(`segmentTcp() ${name}`, () => {
      const b = build(spec), { segs, emit } = collect();
      const gso = spec.v6 ? GSO_TCPV6 : GSO_TCPV4;
      const n = segmentTcp(b.frame, b.frame.length, gso, mss, SCRATCH, emit);
      expect(n).toBe(Math.max(1, Math.ceil(spec.payload.length / mss)));
      expect(checkSegments(b, spec, segs, mss)).toEqual(spec.payload);
    });
  }

  test("segmentTcp() with GSO_ECN set behaves as without (CWR on the first segment only)", () => {
    const spec: Spec = { payload: bytes(4000, 22), flags: TCP_ACK | TCP_CWR };
    const b = build(spec), { segs, emit } = collect();
    expect(segmentTcp(b.frame, b.end, GSO_TCPV4 | GSO_ECN, 1448, SCRATCH, emit)).toBe(3);
    checkSegments(b, spec, segs, 1448);
    expect(segs.map((s) => s[b.l4 + 13]! & TCP_CWR)).toEqual([TCP_CWR, 0, 0]);
  });

  test(`segmentTcp() splits a ${MAX4}-byte payload at MSS 1 (${MAX4} segments ≤ MAX_SEGMENTS) in < 1 s`, () => {
    const spec: Spec = { ipOpts: IP_OPTS, l4Opts: TCP_OPTS, payload: bytes(MAX4, 23), flags: TCP_ACK | TCP_PSH };
    const b = build(spec);
    let count = 0;
    const t0 = performance.now();
    const n = segmentTcp(b.frame, b.end, GSO_TCPV4, 1, SCRATCH, () => { count++; });
    const ms = performance.now() - t0;
    expect([n, count]).toEqual([MAX4, MAX4]);
    expect(n).toBeLessThanOrEqual(MAX_SEGMENTS);
    expect(ms).toBeLessThan(1000);
    const { segs, emit } = collect();
    segmentTcp(b.frame, b.end, GSO_TCPV4, 1, SCRATCH, emit);
    expect(checkSegments(b, spec, segs, 1)).toEqual(spec.payload);
  });

  test("segmentTcp() IPv6 at MSS 1 also finishes in < 1 s", () => {
    const b = build({ v6: true, vlan: true, payload: bytes(MAX6, 24) });
    let count = 0;
    const t0 = performance.now();
    expect(segmentTcp(b.frame, b.end, GSO_TCPV6, 1, SCRATCH, () => { count++; })).toBe(MAX6);
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(count).toBe(MAX6);
  });

  test("segmentTcp() passes `scratch` itself to emit and leaves the frame unchanged", () => {
    const b = build({ payload: bytes(3000, 25), partial: true }), copy = b.frame.slice();
    const seen: Uint8Array[] = [];
    segmentTcp(b.frame, b.end, GSO_TCPV4, 1000, SCRATCH, (seg) => { seen.push(seg); });
    expect(seen.every((s) => s === SCRATCH)).toBe(true);
    expect(b.frame).toEqual(copy);
  });

  describe("hostile input: -1, nothing emitted, no throw", () => {
    const good = build({ ipOpts: IP_OPTS, l4Opts: TCP_OPTS, payload: bytes(3000, 30) });
    const good6 = build({ v6: true, vlan: true, l4Opts: TCP_OPTS, payload: bytes(3000, 31) });
    const refuse = (f: Uint8Array, len: number, gso = GSO_TCPV4, mss = 1448, scratch = SCRATCH) => {
      let emitted = 0;
      expect(segmentTcp(f, len, gso, mss, scratch, () => { emitted++; })).toBe(-1);
      expect(emitted).toBe(0);
    };
    const mutate = (b: Built, edit: (f: Uint8Array) => void) => { const f = b.frame.slice(); edit(f); return f; };

    test("segmentTcp() refuses every truncation that cuts into the headers or the IP datagram", () => {
      for (const b of [good, good6]) {
        for (let len = 0; len < b.end; len++) refuse(b.frame.slice(0, len), len, b === good ? GSO_TCPV4 : GSO_TCPV6);
        for (let len = 0; len < b.end; len += 7) refuse(b.frame, len, b === good ? GSO_TCPV4 : GSO_TCPV6);
      }
    });
    test("segmentTcp() refuses IHL < 5 and IHL past the datagram", () => {
      for (let ihl = 0; ihl < 5; ihl++) refuse(mutate(good, (f) => { f[14] = 0x40 | ihl; }), good.end);
      const tiny = build({ payload: new Uint8Array(0) });
      refuse(mutate(tiny, (f) => { f[14] = 0x4f; }), tiny.end); // 60-byte header, total length 40
    });
    test("segmentTcp() refuses TCP data offset < 5 or past the datagram", () => {
      for (let doff = 0; doff < 5; doff++) refuse(mutate(good, (f) => { f[good.l4 + 12] = doff << 4; }), good.end);
      const tiny = build({ payload: bytes(10, 32) });
      refuse(mutate(tiny, (f) => { f[tiny.l4 + 12] = 0xf0; }), tiny.end); // 60 > 30 bytes of TCP
    });
    test("segmentTcp() refuses len > frame.length, negative or fractional len", () => {
      refuse(good.frame, good.frame.length + 1);
      refuse(good.frame, -1);
      refuse(good.frame, 100.5);
      refuse(good.frame, NaN);
    });
    test("segmentTcp() refuses gsoSize 0, > 65535, fractional, NaN", () => {
      for (const mss of [0, 65536, 1.5, NaN, -1]) refuse(good.frame, good.end, GSO_TCPV4, mss);
    });
    test("segmentTcp() refuses a gso_type that is not TCP or does not match the IP version", () => {
      for (const gso of [0, GSO_UDP, GSO_TCPV6, GSO_ECN, GSO_UDP | GSO_ECN, 2, 0x101, -1]) refuse(good.frame, good.end, gso);
      refuse(good6.frame, good6.end, GSO_TCPV4);
    });
    test("segmentTcp() refuses other protocols, ethertypes, IPv4 fragments, IPv6 extension headers, bad version", () => {
      refuse(mutate(good, (f) => { f[23] = 17; }), good.end);                        // UDP
      refuse(mutate(good, (f) => { put16(f, 12, 0x88a8); }), good.end);              // 802.1ad outer tag
      refuse(mutate(good, (f) => { put16(f, 12, 0x0806); }), good.end);              // ARP
      refuse(mutate(good, (f) => { put16(f, 20, 0x2000); }), good.end);              // MF
      refuse(mutate(good, (f) => { put16(f, 20, 0x0001); }), good.end);              // fragment offset 8
      refuse(mutate(good, (f) => { put16(f, 16, 0); }), good.end);                   // total length 0 (BIG TCP)
      refuse(mutate(good, (f) => { f[14] = 0x68; }), good.end);                      // version 6 under 0x0800
      refuse(mutate(good6, (f) => { f[good6.l3 + 6] = 0; }), good6.end, GSO_TCPV6);  // hop-by-hop header
      refuse(mutate(good6, (f) => { f[good6.l3 + 6] = 44; }), good6.end, GSO_TCPV6); // fragment header
      refuse(mutate(good6, (f) => { put16(f, good6.l3 + 4, 0); }), good6.end, GSO_TCPV6); // jumbogram / no TCP
      refuse(mutate(good6, (f) => { put16(f, good6.l3 + 4, 0xffff); }), good6.end, GSO_TCPV6); // past len
    });
    test("segmentTcp() refuses a scratch buffer too small or overlapping the frame", () => {
      refuse(good.frame, good.end, GSO_TCPV4, 1448, new Uint8Array(good.hdrLen + 1447));
      const shared = new Uint8Array(good.end * 3);
      shared.set(good.frame, 0);
      refuse(shared.subarray(0, good.end), good.end, GSO_TCPV4, 1448, shared.subarray(good.end - 10));
      const { segs, emit } = collect(); // adjacent, not overlapping: fine
      expect(segmentTcp(shared.subarray(0, good.end), good.end, GSO_TCPV4, 1448, shared.subarray(good.end), emit)).toBe(3);
      expect(segs.length).toBe(3);
    });
  });

  test("regression: seeded random header mutations never throw; results are -1 or consistent", () => {
    const base = [
      build({ ipOpts: IP_OPTS, l4Opts: TCP_OPTS, payload: bytes(2000, 40) }),
      build({ v6: true, vlan: true, l4Opts: TCP_OPTS, payload: bytes(2000, 41) }),
    ];
    const r = rng(0xc0ffee), scratch = new Uint8Array(4096);
    for (let iter = 0; iter < 5000; iter++) {
      const b = base[iter & 1]!, f = b.frame.slice();
      for (let k = r() % 4; k >= 0; k--) f[r() % b.hdrLen] = r() & 0xff;
      const len = r() % 3 === 0 ? r() % (f.length + 2) : f.length;
      const gso = [GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | GSO_ECN, r() & 0xff][r() % 4]!;
      const mss = [1, 536, 1448, 0, r() & 0xffff][r() % 5]!;
      let emitted = 0;
      const n = segmentTcp(f, len, gso, mss, scratch, (seg, segLen) => {
        emitted++;
        if (seg !== scratch || segLen > scratch.length || segLen > len) throw new Error("bad emit");
      });
      expect(n === -1 ? emitted === 0 : n === emitted && n >= 1).toBe(true);
    }
  });
});

describe("fragmentUdp4", () => {
  interface Frag { off: number; mf: boolean; data: Uint8Array; s: Uint8Array }
  /** Checks each fragment's IP header and returns the fragments in order. */
  function checkFragments(b: Built, segs: Uint8Array[], mtu: number, copiedOpts: number[]): Frag[] {
    const l3 = b.l3, frags: Frag[] = [];
    for (const s of segs) {
      expect(s[l3]! >> 4).toBe(4);
      const hl = (s[l3]! & 15) * 4, total = get16(s, l3 + 2), fo = get16(s, l3 + 6);
      expect(s.length).toBe(l3 + total);
      expect(total).toBeLessThanOrEqual(mtu);
      expect(ipv4HeaderVerifies(s, l3)).toBe(true);
      expect(s.subarray(0, l3)).toEqual(b.frame.subarray(0, l3));
      expect(get16(s, l3 + 4)).toBe(get16(b.frame, l3 + 4)); // same id in every fragment
      expect(fo & 0x4000).toBe(0);
      expect(s.subarray(l3 + 12, l3 + 20)).toEqual(b.frame.subarray(l3 + 12, l3 + 20));
      const f: Frag = { off: (fo & 0x1fff) * 8, mf: (fo & 0x2000) !== 0, data: s.subarray(l3 + hl), s };
      if (f.off === 0) {
        expect(s.subarray(l3 + 20, l3 + hl)).toEqual(b.frame.subarray(l3 + 20, b.l4));
      } else {
        const want = [...copiedOpts]; while (want.length % 4) want.push(0);
        expect([...s.subarray(l3 + 20, l3 + hl)]).toEqual(want);
      }
      frags.push(f);
    }
    let next = 0;
    frags.forEach((f, i) => {
      expect(f.off).toBe(next);
      expect(f.mf).toBe(i < frags.length - 1);
      if (f.mf) expect(f.data.length % 8).toBe(0);
      next += f.data.length;
    });
    expect(next).toBe(b.end - b.l4);
    return frags;
  }
  function reassemble(b: Built, frags: Frag[]): Uint8Array {
    const out = new Uint8Array(b.end - b.l4);
    for (const f of frags) out.set(f.data, f.off);
    return out;
  }

  for (const [name, spec, mtu] of [
    ["8000-byte datagram, MTU 1500", { proto: 17, payload: bytes(8000, 50), partial: true }, 1500],
    ["with IP options (copied + not copied), 802.1Q, MTU 576", { proto: 17, vlan: true, ipOpts: IP_OPTS, payload: bytes(5001, 51), partial: true }, 576],
    ["largest datagram (65507 bytes of data), MTU 68", { proto: 17, payload: bytes(65535 - 28, 52), partial: true }, 68],
    ["odd MTU 1499 (fragment payloads rounded down to 8)", { proto: 17, payload: bytes(4000, 53), partial: true }, 1499],
  ] as [string, Spec, number][]) {
    test(`fragmentUdp4() ${name}: offsets, MF, lengths, checksums, reassembly`, () => {
      const b = build(spec), { segs, emit } = collect(), copy = b.frame.slice();
      const n = fragmentUdp4(b.frame, b.frame.length, mtu, true, b.l4, 6, SCRATCH, emit);
      expect(n).toBe(segs.length);
      expect(n).toBeGreaterThan(1);
      const frags = checkFragments(b, segs, mtu, spec.ipOpts ? [0x94, 4, 0, 0] : []);
      const dgram = reassemble(b, frags);
      expect(dgram.subarray(8)).toEqual(spec.payload);
      expect(dgram.subarray(0, 6)).toEqual(b.frame.subarray(b.l4, b.l4 + 6));
      const whole = b.frame.slice(0, b.end);
      whole.set(dgram, b.l4);
      expect(l4Verifies(whole, b.l3, b.l4, b.end, false, 17)).toBe(true);
      expect(b.frame).toEqual(copy); // the original is not written
    });
  }

  test("fragmentUdp4() without NEEDS_CSUM keeps the UDP checksum as it was", () => {
    const b = build({ proto: 17, payload: bytes(3000, 54) }), { segs, emit } = collect();
    expect(fragmentUdp4(b.frame, b.end, 1500, false, 0, 0, SCRATCH, emit)).toBe(3);
    expect(reassemble(b, checkFragments(b, segs, 1500, []))).toEqual(b.frame.subarray(b.l4, b.end));
  });

  test("fragmentUdp4() emits a datagram that fits as one frame (checksum completed, DF allowed)", () => {
    const b = build({ proto: 17, payload: bytes(1472, 55), partial: true, df: true }), { segs, emit } = collect();
    expect(fragmentUdp4(b.frame, b.end, 1500, true, b.l4, 6, SCRATCH, emit)).toBe(1);
    expect(segs[0]!.length).toBe(b.end);
    expect(get16(segs[0]!, b.l3 + 6)).toBe(0x4000);
    expect(l4Verifies(segs[0]!, b.l3, b.l4, b.end, false, 17)).toBe(true);
  });

  describe("hostile input: -1, nothing emitted, no throw", () => {
    const good = build({ proto: 17, ipOpts: IP_OPTS, payload: bytes(3000, 60), partial: true });
    const refuse = (f: Uint8Array, len: number, o: { mtu?: number; csum?: boolean; start?: number; off?: number; scratch?: Uint8Array } = {}) => {
      let emitted = 0;
      const n = fragmentUdp4(f, len, o.mtu ?? 1500, o.csum ?? true, o.start ?? good.l4, o.off ?? 6, o.scratch ?? SCRATCH, () => { emitted++; });
      expect([n, emitted]).toEqual([-1, 0]);
    };
    const mutate = (edit: (f: Uint8Array) => void) => { const f = good.frame.slice(); edit(f); return f; };

    test("fragmentUdp4() refuses truncations, len > frame.length, bad mtu", () => {
      for (let len = 0; len < good.end; len += 3) refuse(good.frame, len);
      refuse(good.frame, good.frame.length + 1);
      for (const mtu of [0, 67, 65536, 1500.5, NaN]) refuse(good.frame, good.end, { mtu });
    });
    test("fragmentUdp4() refuses IPv6, TCP, IHL < 5, a fragment, DF when fragmenting, UDP length mismatch", () => {
      const v6 = build({ v6: true, proto: 17, payload: bytes(3000, 61), partial: true });
      let emitted = 0;
      expect(fragmentUdp4(v6.frame, v6.end, 1500, true, v6.l4, 6, SCRATCH, () => { emitted++; })).toBe(-1);
      expect(emitted).toBe(0);
      refuse(mutate((f) => { f[23] = 6; }), good.end);
      for (let ihl = 0; ihl < 5; ihl++) refuse(mutate((f) => { f[14] = 0x40 | ihl; }), good.end);
      refuse(mutate((f) => { put16(f, 20, 0x2000); }), good.end);
      refuse(mutate((f) => { put16(f, 20, 0x4000); }), good.end);
      refuse(mutate((f) => { put16(f, good.l4 + 4, 3000); }), good.end);
      refuse(mutate((f) => { put16(f, good.l4 + 4, 0xffff); }), good.end);
    });
    test("fragmentUdp4() refuses malformed IP options (length < 2, past the header)", () => {
      refuse(mutate((f) => { f[14 + 20 + 5] = 1; }), good.end);    // Record Route length 1
      refuse(mutate((f) => { f[14 + 20 + 5] = 20; }), good.end);   // Record Route past the header
      refuse(mutate((f) => { f[14 + 20 + 11] = 0x83; }), good.end); // last byte starts an option with no length
    });
    test("fragmentUdp4() refuses csumStart before UDP, csumStart/field past the datagram", () => {
      refuse(good.frame, good.end, { start: good.l4 - 1 });
      refuse(good.frame, good.end, { start: good.end });
      refuse(good.frame, good.end, { start: good.end - 1, off: 0 });
      refuse(good.frame, good.end, { start: good.l4, off: good.end - good.l4 - 1 });
      refuse(good.frame, good.end, { start: -1 });
      refuse(good.frame, good.end, { start: NaN });
    });
    test("fragmentUdp4() refuses scratch smaller than Ethernet + mtu, or overlapping the frame", () => {
      refuse(good.frame, good.end, { scratch: new Uint8Array(14 + 1499) });
      const shared = new Uint8Array(good.end * 2);
      shared.set(good.frame);
      refuse(shared.subarray(0, good.end), good.end, { scratch: shared.subarray(100) });
    });
    test("regression: seeded random mutations never throw; results are -1 or consistent", () => {
      const r = rng(0xbadf00d), scratch = new Uint8Array(2000);
      for (let iter = 0; iter < 5000; iter++) {
        const f = good.frame.slice();
        for (let k = r() % 4; k >= 0; k--) f[r() % good.l4 + 8] = r() & 0xff;
        const len = r() % 3 === 0 ? r() % (f.length + 2) : f.length;
        let emitted = 0;
        const n = fragmentUdp4(f, len, [68, 576, 1500, r() & 0xffff][r() % 4]!, (r() & 1) === 1, r() % 200, r() % 16, scratch,
          (seg, segLen) => { emitted++; if (seg !== scratch || segLen > scratch.length) throw new Error("bad emit"); });
        expect(n === -1 ? emitted === 0 : n === emitted && n >= 1).toBe(true);
      }
    });
  });
});

describe("MAC helpers", () => {
  const frame = Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0xab, 0xcd, 0xef, 0x08, 0x00);
  test("macAt() reads destination and source as 48-bit integers", () => {
    expect(macAt(frame, 0)).toBe(0xffffffffffff);
    expect(macAt(frame, 6)).toBe(0x020000abcdef);
    expect(Number.isSafeInteger(macAt(frame, 0))).toBe(true);
  });
  test("macAt() throws RangeError past the frame", () => {
    expect(() => macAt(frame, 9)).toThrow(RangeError);
    expect(() => macAt(frame, -1)).toThrow(RangeError);
  });
  test("isMulticast() is the I/G bit: broadcast and 01:00:5e:… yes, unicast and locally administered no", () => {
    expect(isMulticast(0xffffffffffff)).toBe(true);
    expect(isMulticast(0x01005e000001)).toBe(true);
    expect(isMulticast(0x333300000001)).toBe(true);
    expect(isMulticast(0x020000000001)).toBe(false);
    expect(isMulticast(0x000000000001)).toBe(false);
    expect(isMulticast(0xfeffffffffff)).toBe(false);
  });
  test("formatMac() / parseMac() round-trip", () => {
    expect(formatMac(0x020000000001)).toBe("02:00:00:00:00:01");
    expect(formatMac(0xffffffffffff)).toBe("ff:ff:ff:ff:ff:ff");
    expect(formatMac(0)).toBe("00:00:00:00:00:00");
    expect(parseMac("02:00:00:00:00:01")).toBe(0x020000000001);
    expect(parseMac("DE:ad:BE:ef:00:7F")).toBe(0xdeadbeef007f);
    for (const m of [0, 1, 0x020000abcdef, 0xffffffffffff, 0x123456789abc]) expect(parseMac(formatMac(m))).toBe(m);
  });
  test("parseMac() and formatMac() throw RangeError on bad input", () => {
    for (const s of ["", "02:00:00:00:00", "02:00:00:00:00:01:02", "02-00-00-00-00-01", "0g:00:00:00:00:01", "2:0:0:0:0:1", " 02:00:00:00:00:01"]) {
      expect(() => parseMac(s)).toThrow(RangeError);
    }
    for (const m of [-1, 2 ** 48, 1.5, NaN]) expect(() => formatMac(m)).toThrow(RangeError);
  });
});

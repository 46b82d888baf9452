/**
 * src/io/tap.ts against the kernel's tun driver: real taps, a real network
 * namespace (created and deleted here) answering ARP and ping on link-local
 * addresses only (169.254.0.0/16). Needs root and /dev/net/tun.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync } from "node:fs";
import * as sys from "../../ffi/sys.ts";
import { Pinned } from "../../ffi/structs.ts";
import { POLLIN } from "../../ffi/constants.ts";
import { Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN } from "../../src/io/tap.ts";

const hasIp = Bun.which("ip") !== null;
const why = process.platform !== "linux" ? "not Linux"
  : !existsSync("/dev/net/tun") ? "no /dev/net/tun"
  : process.getuid?.() !== 0 ? "not root (taps and netns need CAP_NET_ADMIN)"
  : !hasIp ? "no ip(8)" : null;
const skip = why !== null;
const label = (name: string) => (why ? `${name} [skipped: ${why}]` : name);

const id = process.pid % 10000;
const NS = `bvt-${process.pid}`;
const tapName = (suffix = "") => `bvtap${id}${suffix}`;

function ip(...args: string[]): { ok: boolean; out: string } {
  const p = Bun.spawnSync(["ip", ...args], { stdout: "pipe", stderr: "pipe" });
  return { ok: p.exitCode === 0, out: p.stdout.toString() + p.stderr.toString() };
}
function ipOk(...args: string[]): string {
  const r = ip(...args);
  if (!r.ok) throw new Error(`ip ${args.join(" ")}: ${r.out}`);
  return r.out;
}

// ---- frames ---------------------------------------------------------------------

const OUR_MAC = [2, 0, 0, 0, 0, 2];
const BCAST = [255, 255, 255, 255, 255, 255];

/** The Internet checksum (RFC 1071) of b[off..off+len]. */
function csum(b: Uint8Array, off: number, len: number): number {
  let s = 0;
  for (let i = 0; i < len; i += 2) s += (b[off + i]! << 8) | (i + 1 < len ? b[off + i + 1]! : 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** An ARP request "who has `tpa`? tell `spa`" from OUR_MAC, after `hdr` zero bytes (the vnet header). */
function arpRequest(hdr: number, spa: number[], tpa: number[]): Uint8Array {
  const f = new Uint8Array(hdr + 60); // minimum Ethernet frame without FCS
  const e = f.subarray(hdr);
  e.set(BCAST, 0); e.set(OUR_MAC, 6); e.set([0x08, 0x06], 12);
  e.set([0, 1, 0x08, 0x00, 6, 4, 0, 1], 14); // Ethernet/IPv4, request
  e.set(OUR_MAC, 22); e.set(spa, 28); e.set(tpa, 38);
  return f;
}

/** An ICMP echo request `src` → `dst` with correct IPv4 and ICMP checksums. */
function echoRequest(hdr: number, dstMac: Uint8Array, src: number[], dst: number[], seq: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(hdr + 14 + 20 + 8 + payload.length);
  const e = f.subarray(hdr);
  const dv = new DataView(e.buffer, e.byteOffset);
  e.set(dstMac, 0); e.set(OUR_MAC, 6); dv.setUint16(12, 0x0800);
  dv.setUint8(14, 0x45); dv.setUint16(16, 20 + 8 + payload.length); dv.setUint16(18, 0x1234);
  dv.setUint16(20, 0x4000); dv.setUint8(22, 64); dv.setUint8(23, 1); e.set(src, 26); e.set(dst, 30);
  dv.setUint16(24, csum(e, 14, 20));
  dv.setUint8(34, 8); dv.setUint16(38, 0xbeef); dv.setUint16(40, seq); e.set(payload, 42);
  dv.setUint16(36, csum(e, 34, 8 + payload.length));
  return f;
}

/**
 * Reads frames until `want(frame)` holds (the kernel also sends IPv6 router
 * solicitations and the like once the link is up); fails after `ms`.
 */
function readUntil(tap: Tap, buf: Uint8Array, want: (eth: Uint8Array) => boolean, ms = 2000): Uint8Array {
  const end = Date.now() + ms;
  for (;;) {
    const n = tap.read(buf);
    if (n > 0) {
      const eth = buf.subarray(tap.vnetHdrSize, n);
      if (want(eth)) return eth;
      continue;
    }
    const left = end - Date.now();
    if (left <= 0) throw new Error(`no matching frame on ${tap.name} within ${ms} ms`);
    sys.poll1(tap.fd, POLLIN, Math.min(left, 100));
  }
}

const ethType = (e: Uint8Array) => (e[12]! << 8) | e[13]!;
const eq = (a: ArrayLike<number>, b: ArrayLike<number>) => a.length === b.length && Array.from(a).every((v, i) => v === b[i]);

/** ARP reply for `spa` addressed to us. */
const isArpReplyFrom = (spa: number[]) => (e: Uint8Array) =>
  ethType(e) === 0x0806 && e[21] === 2 && eq(e.subarray(28, 32), spa) && eq(e.subarray(32, 38), OUR_MAC);

/** ICMP echo reply with our id and `seq`. */
const isEchoReply = (seq: number) => (e: Uint8Array) =>
  ethType(e) === 0x0800 && e[23] === 1 && e[34] === 0 && ((e[38]! << 8) | e[39]!) === 0xbeef && ((e[40]! << 8) | e[41]!) === seq;

/** ARP for `tpa`, check the reply, return the tap's MAC as the kernel reports it. */
function arp(tap: Tap, spa: number[], tpa: number[]): Uint8Array {
  expect(tap.write(arpRequest(tap.vnetHdrSize, spa, tpa))).toBe(true);
  const r = readUntil(tap, new Uint8Array(2048), isArpReplyFrom(tpa));
  expect(Array.from(r.subarray(0, 6))).toEqual(OUR_MAC);
  expect(Array.from(r.subarray(38, 42))).toEqual(spa);
  return r.slice(22, 28); // sender hardware address: the tap's MAC inside the namespace
}

function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

// ---- tests -------------------------------------------------------------------------

describe("Tap", () => {
  test.skipIf(skip)(label("Tap.open() creates the link, close() removes it"), () => {
    const name = tapName();
    const tap = Tap.open(name);
    try {
      expect(tap.name).toBe(name);
      expect(tap.fd).toBeGreaterThanOrEqual(0);
      expect(tap.vnetHdrSize).toBe(12);
      const shown = ipOk("-d", "link", "show", name);
      expect(shown).toContain(`${name}:`);
      expect(shown).toMatch(/tun type tap pi off vnet_hdr on persist off/);
      expect(tap.mtu()).toBe(1500);
      tap.setMtu(9000);
      expect(tap.mtu()).toBe(9000);
      expect(ipOk("link", "show", name)).toContain("mtu 9000");
    } finally {
      tap.close();
    }
    expect(tap.fd).toBe(-1);
    expect(ip("link", "show", name).ok).toBe(false);
    tap.close(); // idempotent
    expect(() => tap.read(new Uint8Array(64))).toThrow(TapError);
  });

  test.skipIf(skip)(label("Tap.open() resolves %d in the name and brings the link up with up: true"), () => {
    const tap = Tap.open("bvtap%d", { up: true });
    try {
      expect(tap.name).toMatch(/^bvtap\d+$/);
      expect(ipOk("link", "show", tap.name)).toMatch(/<[^>]*\bUP\b[^>]*>/);
    } finally {
      tap.close();
    }
  });

  test.skipIf(skip)(label("Tap.setOffloads() takes TUN_F_* and the kernel refuses unknown bits with EINVAL"), () => {
    const tap = Tap.open(tapName("o"), { offloads: TUN_F_CSUM });
    try {
      tap.setOffloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
      tap.setOffloads(0);
      let err: unknown;
      try { tap.setOffloads(0x80000); } catch (e) { err = e; }
      expect(err).toBeInstanceOf(TapError);
      expect((err as TapError).code).toBe("EINVAL");
      expect((err as TapError).op).toBe("TUNSETOFFLOAD");
      expect((err as TapError).message).toMatch(/^TUNSETOFFLOAD bvtap\d+o: EINVAL \(22\)/);
      // The kernel's rule: segmentation offloads only together with TUN_F_CSUM.
      expect(() => tap.setOffloads(TUN_F_TSO4)).toThrow(/TUNSETOFFLOAD.*EINVAL/);
    } finally {
      tap.close();
    }
    expect(() => Tap.open(tapName("p"), { vnetHdr: false, offloads: TUN_F_CSUM })).toThrow(/need vnetHdr/);
  });

  test.skipIf(skip)(label("Tap.open() refuses bad names and options before any system call"), () => {
    const before = fdCount();
    for (const bad of ["a".repeat(16), "bv/tap", "bv tap", "bv\ttap", "bv:0", ".."]) {
      let err: unknown;
      try { Tap.open(bad); } catch (e) { err = e; }
      expect(err).toBeInstanceOf(TapError);
      expect((err as TapError).code).toBe("BAD_NAME");
      expect((err as TapError).errno).toBe(0);
    }
    expect(() => Tap.open(tapName("q"), { vnetHdrSize: 11 })).toThrow(/vnetHdrSize 11/);
    expect(fdCount()).toBe(before);
    expect(ip("link", "show", tapName("q")).ok).toBe(false);
    // 15 bytes is the longest name the kernel takes.
    const tap = Tap.open(`bvt${id}`.padEnd(15, "x"));
    expect(tap.name).toHaveLength(15);
    tap.close();
  });

  test.skipIf(skip)(label("Tap errors: EBUSY for a second open, BAD_LENGTH for a short frame, false on a down link"), () => {
    const name = tapName("e");
    const tap = Tap.open(name);
    try {
      let err: unknown;
      try { Tap.open(name); } catch (e) { err = e; }
      expect((err as TapError).code).toBe("EBUSY");
      expect((err as TapError).message).toBe(`TUNSETIFF ${name}: EBUSY (16) — ${name} is attached to another file already (a single-queue tap has one)`);
      // Shorter than the 12-byte vnet header (+ Ethernet header): refused here, no syscall.
      err = undefined;
      try { tap.write(new Uint8Array(11)); } catch (e) { err = e; }
      expect((err as TapError).code).toBe("BAD_LENGTH");
      expect((err as TapError).message).toMatch(/frame of 11 bytes is shorter than the 12-byte vnet header/);
      expect(() => tap.write(new Uint8Array(100), 101)).toThrow(/exceeds its buffer of 100/);
      expect(() => tap.read(new Uint8Array(12))).toThrow(/no room after the 12-byte vnet header/);
      // A new tap is down: the kernel says EIO, write() reports "not now".
      const f = arpRequest(12, [169, 254, 77, 2], [169, 254, 77, 1]);
      expect(tap.write(f)).toBe(false);
      expect(tap.read(new Uint8Array(2048))).toBe(0);
      // A vnet header the kernel refuses (unknown gso_type) is EINVAL from write(2).
      ipOk("link", "set", name, "up");
      expect(tap.write(f)).toBe(true);
      f[1] = 0x77;
      err = undefined;
      try { tap.write(f); } catch (e) { err = e; }
      expect((err as TapError).code).toBe("EINVAL");
      expect((err as TapError).op).toBe("write");
    } finally {
      tap.close();
    }
  });

  describe("through a network namespace", () => {
    let made = false;
    let tap: Tap | null = null;
    let plain: Tap | null = null;
    let tapMac: Uint8Array = new Uint8Array(6);
    const A = [169, 254, 77, 1], B = [169, 254, 77, 2];
    const C = [169, 254, 78, 1], D = [169, 254, 78, 2];

    beforeAll(() => {
      if (skip) return;
      ipOk("netns", "add", NS);
      made = true;
      tap = Tap.open(tapName("n"));
      plain = Tap.open(tapName("m"), { vnetHdr: false });
      // Moving a tap to another namespace keeps its fd working.
      ipOk("link", "set", tap.name, "netns", NS);
      ipOk("link", "set", plain.name, "netns", NS);
      const b = Bun.spawnSync(["ip", "-n", NS, "-batch", "-"], {
        stdin: new TextEncoder().encode([
          `addr add 169.254.77.1/16 dev ${tap.name}`, `link set ${tap.name} up`,
          `addr add 169.254.78.1/24 dev ${plain.name}`, `link set ${plain.name} up`, "",
        ].join("\n")),
        stdout: "pipe", stderr: "pipe",
      });
      if (b.exitCode !== 0) throw new Error(`ip -n ${NS} -batch: ${b.stderr.toString()}`);
    });

    afterAll(() => {
      tap?.close(); // the taps die with their fds, before their namespace
      plain?.close();
      if (made) ip("netns", "del", NS);
    });

    test.skipIf(skip)(label("Tap.write()/read() carry ARP and ping both ways, vnet header first"), () => {
      const t = tap!;
      tapMac = arp(t, B, A);
      expect(tapMac[0]! & 1).toBe(0); // unicast
      const payload = new TextEncoder().encode("bunvhost tap echo 0123456789");
      expect(t.write(echoRequest(12, tapMac, B, A, 1, payload))).toBe(true);
      const buf = new Uint8Array(2048);
      const r = readUntil(t, buf, isEchoReply(1));
      // The vnet header: no offloads were allowed, so no flags and no GSO.
      expect(Array.from(buf.subarray(0, 12))).toEqual(new Array(12).fill(0));
      expect(Array.from(r.subarray(0, 6))).toEqual(OUR_MAC);
      expect(Array.from(r.subarray(26, 30))).toEqual(A);
      expect(Array.from(r.subarray(30, 34))).toEqual(B);
      expect(csum(r, 14, 20)).toBe(0);
      expect(csum(r, 34, r.length - 34)).toBe(0);
      expect(new TextDecoder().decode(r.subarray(42))).toBe("bunvhost tap echo 0123456789");
      // Link settings go by name through this namespace: the moved tap is not here.
      expect(() => t.mtu()).toThrow(/SIOCGIFMTU bvtap\d+n: ENODEV \(19\)/);
    });

    test.skipIf(skip)(label("Tap.writev()/readv() move a frame in pieces"), () => {
      const t = tap!;
      if (tapMac[0] === 0 && tapMac[5] === 0) tapMac = arp(t, B, A);
      const payload = new Uint8Array(300).map((_, i) => i * 7);
      const req = echoRequest(12, tapMac, B, A, 2, payload);
      const mem = Pinned.alloc(8192);
      try {
        // Out: vnet header | Ethernet + IP header | the rest.
        mem.u8.set(req, 0);
        expect(t.writev([mem.ptr, mem.ptr + 12, mem.ptr + 46], [12, 34, req.length - 46], 3)).toBe(true);
        // In: three scattered pieces (header, 100 bytes, the rest) of a second area.
        mem.u8.fill(0xee, 4096);
        const ptrs = new Float64Array([mem.ptr + 4096, mem.ptr + 5000, mem.ptr + 6000]);
        const lens = new Uint32Array([12, 100, 2000]);
        const end = Date.now() + 2000;
        let n = 0;
        let e: Uint8Array = new Uint8Array(0);
        for (;;) {
          n = t.readv(ptrs, lens, 3);
          if (n > 112) {
            e = new Uint8Array(n - 12);
            e.set(mem.u8.subarray(5000, 5100), 0);
            e.set(mem.u8.subarray(6000, 6000 + n - 112), 100);
            if (isEchoReply(2)(e)) break;
          }
          if (Date.now() > end) throw new Error("no echo reply");
          if (n === 0) sys.poll1(t.fd, POLLIN, 100);
        }
        expect(n).toBe(req.length);
        expect(Array.from(mem.u8.subarray(4096, 4108))).toEqual(new Array(12).fill(0));
        expect(mem.u8[5100]).toBe(0xee); // nothing between the pieces was touched
        expect(Array.from(e.subarray(42))).toEqual(Array.from(payload));
        expect(csum(e, 34, e.length - 34)).toBe(0);
      } finally {
        mem.free();
      }
    });

    test.skipIf(skip)(label("Tap.read() cuts a frame longer than the buffer to the buffer's length"), () => {
      const t = tap!;
      if (tapMac[0] === 0 && tapMac[5] === 0) tapMac = arp(t, B, A);
      const payload = new Uint8Array(1000).fill(0x5a);
      const req = echoRequest(12, tapMac, B, A, 3, payload);
      expect(t.write(req)).toBe(true);
      const small = new Uint8Array(12 + 60);
      const end = Date.now() + 2000;
      for (;;) {
        const n = t.read(small);
        if (n > 0 && isEchoReply(3)(small.subarray(12))) {
          expect(n).toBe(small.length); // read(2) on a tap clamps: the 1054-byte frame is cut silently
          break;
        }
        if (Date.now() > end) throw new Error("no echo reply");
        if (n === 0) sys.poll1(t.fd, POLLIN, 100);
      }
    });

    test.skipIf(skip)(label("Tap with vnetHdr: false carries plain Ethernet frames"), () => {
      const t = plain!;
      expect(t.vnetHdrSize).toBe(0);
      const mac = arp(t, D, C);
      const payload = new TextEncoder().encode("no vnet header");
      expect(t.write(echoRequest(0, mac, D, C, 4, payload))).toBe(true);
      const r = readUntil(t, new Uint8Array(2048), isEchoReply(4));
      expect(new TextDecoder().decode(r.subarray(42))).toBe("no vnet header");
      expect(() => t.write(new Uint8Array(13))).toThrow(/frame of 13 bytes is shorter than the 0-byte vnet header \+ 14-byte Ethernet header/);
    });
  });
});

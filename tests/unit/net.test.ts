/**
 * The net switch (src/devices/net.ts, VIRTIO 1.2 §5.1) served in this process
 * by serve("net", ...) with three or four vhost-user ports, each driven by the
 * test kit's DeviceDriver over split and packed rings: learning and flooding,
 * the virtio_net_hdr and the exact bytes in receive buffers (mergeable and
 * not), drops and the per-port counters logged at stop, MAC aging, checksum
 * and TSO offloads done in software for a port that lacks them, the control
 * queue (RX filter, MAC table, MQ), multi-queue, hostile chains, SEND_RARP and
 * NET_SET_MTU, and the switch on an I/O thread.
 */
import { afterEach, beforeAll, afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { serve, type Logger, type OptionValues, type Served } from "../../src/index.ts";
import { DeviceDriver, FrontendError, type Completion, type DriverOptions } from "../../src/testing/index.ts";
import { F } from "../../src/devices/net/port.ts";
import { VRING_DESC_F_NEXT, type SplitDriver } from "../../src/frontend/split_driver.ts";
import { Req } from "../../src/protocol/messages.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";

// ---- set-up: one switch per test, torn down in afterEach ----

let dir = "";
let seq = 0;
beforeAll(() => { dir = mkdtempSync("/tmp/bunvhost-net-test-"); });
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Net {
  s: Served;
  lines: string[];
  socks: string[];
  drv: DeviceDriver[];
}
const live: Net[] = [];

afterEach(async () => {
  for (const n of live.splice(0)) await shutdown(n);
});

/** Every device bit below 24 (the driver accepts only what is offered). */
const ALL = (1n << 24n) - 1n;
const b = (n: number) => 1n << BigInt(n);
const NO_GUEST_OFFLOADS = ALL & ~(b(F.GUEST_CSUM) | b(F.GUEST_TSO4) | b(F.GUEST_TSO6) | b(F.GUEST_ECN));

function collector(lines: string[]): Logger {
  const keep = (level: string) => (m: string) => void lines.push(`${level}: ${m}`);
  return { level: "debug", debug: keep("debug"), info: keep("info"), warn: keep("warn"), error: keep("error") };
}

/** serve("net") on `ports` fresh sockets, then one driver per entry of `drivers` (port i gets drivers[i]). */
async function startNet(o: { ports?: number; options?: OptionValues; threads?: number; drivers?: DriverOptions[] } = {}): Promise<Net> {
  const ports = o.ports ?? 3;
  const socks = Array.from({ length: ports }, (_, i) => join(dir, `${seq++}-p${i}.sock`));
  const lines: string[] = [];
  const s = await serve("net", { socket: socks, threads: o.threads ?? 0, options: { mtu: 1500, queues: 1, ...o.options }, log: collector(lines) });
  const n: Net = { s, lines, socks, drv: [] };
  live.push(n);
  const opts = o.drivers ?? Array.from({ length: ports }, () => ({}));
  for (let i = 0; i < opts.length; i++) n.drv.push(await DeviceDriver.connect(socks[i]!, { queueSize: 256, timeoutMs: 3000, ...opts[i] }));
  return n;
}

async function shutdown(n: Net): Promise<void> {
  for (const d of n.drv) d.close();
  await n.s.stop();
}

interface Counters { from: number; to: number; noBuffers: number; tooBig: number; filtered: number; malformed: number }

/** Stops the switch and returns each port's counters from the stop log lines. */
async function stopCounters(n: Net): Promise<Counters[]> {
  live.splice(live.indexOf(n), 1);
  await shutdown(n);
  const out: Counters[] = [];
  for (const l of n.lines) {
    const m = /net port (\d+): from guest (\d+), to guest (\d+), dropped: (\d+) no buffers, (\d+) too big, (\d+) filtered, (\d+) malformed/.exec(l);
    if (m) out[Number(m[1])] = { from: +m[2]!, to: +m[3]!, noBuffers: +m[4]!, tooBig: +m[5]!, filtered: +m[6]!, malformed: +m[7]! };
  }
  return out;
}

// ---- frames and headers ----

type Mac = readonly number[];
const macA: Mac = [0x02, 0, 0, 0, 0, 0x0a];
const macB: Mac = [0x02, 0, 0, 0, 0, 0x0b];
const macC: Mac = [0x02, 0, 0, 0, 0, 0x0c];
const macX: Mac = [0x02, 0, 0, 0, 0x11, 0x11]; // nobody's
const BCAST: Mac = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
const MCAST: Mac = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];

/** An Ethernet frame of `len` bytes (ethertype 0x88b5, local experimental) with a payload pattern from `tag`. */
function eth(dst: Mac, src: Mac, len: number, tag = 1): Uint8Array {
  const f = new Uint8Array(len);
  f.set(dst, 0);
  f.set(src, 6);
  f[12] = 0x88; f[13] = 0xb5;
  for (let i = 14; i < len; i++) f[i] = (i * 7 + tag * 13) & 0xff;
  return f;
}

interface Hdr { flags?: number; gsoType?: number; hdrLen?: number; gsoSize?: number; csumStart?: number; csumOffset?: number; numBuffers?: number }

function hdr(h: Hdr = {}): Uint8Array {
  const a = new Uint8Array(12);
  const dv = new DataView(a.buffer);
  a[0] = h.flags ?? 0;
  a[1] = h.gsoType ?? 0;
  dv.setUint16(2, h.hdrLen ?? 0, true);
  dv.setUint16(4, h.gsoSize ?? 0, true);
  dv.setUint16(6, h.csumStart ?? 0, true);
  dv.setUint16(8, h.csumOffset ?? 0, true);
  dv.setUint16(10, h.numBuffers ?? 0, true);
  return a;
}

function parseHdr(d: Uint8Array): Required<Hdr> {
  const dv = new DataView(d.buffer, d.byteOffset, 12);
  return {
    flags: d[0]!, gsoType: d[1]!, hdrLen: dv.getUint16(2, true), gsoSize: dv.getUint16(4, true),
    csumStart: dv.getUint16(6, true), csumOffset: dv.getUint16(8, true), numBuffers: dv.getUint16(10, true),
  };
}
const PLAIN = { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0, numBuffers: 1 };

/** Sends one frame on a transmit queue (header and frame in two descriptors, or one with `oneBuffer`). */
async function send(d: DeviceDriver, frame: Uint8Array, h: Uint8Array = hdr(), q = 1, oneBuffer = false): Promise<Completion> {
  const c = await d.submit(q, { readable: oneBuffer ? [Buffer.concat([h, frame])] : [h, frame] });
  expect(c.len).toBe(0); // a transmit chain completes with nothing written
  return c;
}

/** A receive buffer whose use can be checked without awaiting it. */
interface Rx { p: Promise<Completion>; done: boolean; got: Completion | null }
function rx(d: DeviceDriver, size = 2048, q = 0): Rx {
  const r: Rx = { p: d.post(q, { writable: [size] }), done: false, got: null };
  r.p.then((c) => { r.done = true; r.got = c; }, () => {});
  return r;
}
async function got(d: DeviceDriver, r: Rx): Promise<Completion> {
  return d.wait(r.p, 2000);
}
/** Polls `d` for a while and checks that none of `rs` was used. */
async function stillUnused(d: DeviceDriver, ...rs: Rx[]): Promise<void> {
  await d.pollFor(40);
  expect(rs.map((r) => r.done)).toEqual(rs.map(() => false));
}
/** The frame in a single-buffer completion, its header checked as plain. */
function frameOf(c: Completion, h: Partial<Hdr> = {}): Uint8Array {
  expect(parseHdr(c.data)).toEqual({ ...PLAIN, ...h });
  expect(c.len).toBe(c.data.length);
  return c.data.subarray(12);
}
const same = (x: Uint8Array, y: Uint8Array) => Buffer.compare(Buffer.from(x), Buffer.from(y)) === 0;

/** Settles `p` within `ms`: "used", a FrontendError code, or "pending". */
async function outcome(p: Promise<unknown>, ms: number): Promise<string> {
  let r: string | null = null;
  p.then(() => { r = "used"; }, (e) => { r = e instanceof FrontendError ? e.code : String(e); });
  const deadline = performance.now() + ms;
  while (r === null && performance.now() < deadline) await Bun.sleep(5);
  return r ?? "pending";
}

// ---- IPv4 / TCP / UDP, with an independent checksum (RFC 1071) ----

function sum16(f: Uint8Array, from: number, to: number): number {
  let s = 0;
  for (let i = from; i < to; i += 2) s += f[i]! * 256 + (i + 1 < to ? f[i + 1]! : 0);
  return s;
}
const fold = (s: number) => { while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 65536); return s; };
const get16 = (f: Uint8Array, o: number) => f[o]! * 256 + f[o + 1]!;
const get32 = (f: Uint8Array, o: number) => get16(f, o) * 65536 + get16(f, o + 2);
const put16 = (f: Uint8Array, o: number, v: number) => { f[o] = (v >> 8) & 0xff; f[o + 1] = v & 0xff; };
const put32 = (f: Uint8Array, o: number, v: number) => { put16(f, o, Math.floor(v / 65536) & 0xffff); put16(f, o + 2, v & 0xffff); };
/** IPv4 pseudo-header sum (RFC 9293 §3.1) of the datagram at 14, for an L4 of `l4len` bytes. */
const pseudo = (f: Uint8Array, proto: number, l4len: number) => sum16(f, 26, 34) + proto + l4len;
const ipOk = (f: Uint8Array) => fold(sum16(f, 14, 34)) === 0xffff;
const l4Ok = (f: Uint8Array, proto: number) => fold(pseudo(f, proto, f.length - 34) + sum16(f, 34, f.length)) === 0xffff;

/** Ethernet + IPv4 (20 bytes, DF, id 0x1234) + `l4` bytes; the L4 checksum field holds the pseudo-header sum (CHECKSUM_PARTIAL). */
function ipv4(dst: Mac, src: Mac, proto: number, l4: Uint8Array, csumAt: number): Uint8Array {
  const f = new Uint8Array(34 + l4.length);
  f.set(dst, 0); f.set(src, 6); f[12] = 0x08; f[13] = 0x00;
  f[14] = 0x45; put16(f, 16, 20 + l4.length); put16(f, 18, 0x1234); put16(f, 20, 0x4000); f[22] = 64; f[23] = proto;
  f.set([10, 0, 0, 1], 26); f.set([10, 0, 0, 2], 30);
  put16(f, 24, ~fold(sum16(f, 14, 34)) & 0xffff);
  f.set(l4, 34);
  put16(f, 34 + csumAt, fold(pseudo(f, proto, l4.length)));
  return f;
}
function tcp4(dst: Mac, src: Mac, payload: Uint8Array, seqNo: number): Uint8Array {
  const t = new Uint8Array(20 + payload.length);
  put16(t, 0, 40000); put16(t, 2, 5201); put32(t, 4, seqNo); put32(t, 8, 1);
  t[12] = 0x50; t[13] = 0x18; // data offset 5, PSH|ACK
  put16(t, 14, 0xffff);
  t.set(payload, 20);
  return ipv4(dst, src, 6, t, 16);
}
function udp4(dst: Mac, src: Mac, payload: Uint8Array): Uint8Array {
  const u = new Uint8Array(8 + payload.length);
  put16(u, 0, 5353); put16(u, 2, 9999); put16(u, 4, u.length);
  u.set(payload, 8);
  return ipv4(dst, src, 17, u, 6);
}
const pattern = (n: number, seed: number) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed + (i >> 8)) & 0xff);

// ---- control queue ----

const CTRL_RX = 0, CTRL_MAC = 1, CTRL_MQ = 4;
const RX_PROMISC = 0, RX_ALLMULTI = 1, MAC_TABLE_SET = 0, MQ_VQ_PAIRS_SET = 0;

/** One control command; returns the ack byte (0 OK, 1 ERR). */
async function ctrl(d: DeviceDriver, q: number, cls: number, cmd: number, data: Uint8Array): Promise<number> {
  const readable = data.length > 0 ? [Uint8Array.of(cls, cmd), data] : [Uint8Array.of(cls, cmd)];
  const c = await d.submit(q, { readable, writable: [1] });
  expect(c.len).toBe(1);
  return c.data[0]!;
}
/** MAC_TABLE_SET data: le32 count + unicast MACs, le32 count + multicast MACs. */
function macTable(uc: Mac[], mc: Mac[], ucCount = uc.length, mcCount = mc.length): Uint8Array {
  const out: number[] = [];
  const le32 = (v: number) => out.push(v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >>> 24) & 0xff);
  le32(ucCount); for (const m of uc) out.push(...m);
  le32(mcCount); for (const m of mc) out.push(...m);
  return Uint8Array.from(out);
}
const le16 = (v: number) => Uint8Array.of(v & 0xff, v >> 8);

// ---- tests ----

for (const packed of [false, true]) {
  const ring = packed ? "packed" : "split";

  describe(`net switch forwarding (${ring} rings)`, () => {
    test(`unknown unicast floods, a learned MAC goes to its port only, broadcast reaches all others, own MAC is not sent back (${ring})`, async () => {
      const n = await startNet({ drivers: [{ packed }, { packed }, { packed }] });
      const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
      // A → macB before B said anything: flooded to B and C, never back to A.
      const a0 = rx(A), b0 = rx(B), c0 = rx(C);
      const f1 = eth(macB, macA, 100, 1);
      await send(A, f1);
      expect(same(frameOf(await got(B, b0)), f1)).toBe(true);
      expect(same(frameOf(await got(C, c0)), f1)).toBe(true);
      await stillUnused(A, a0);

      // B speaks (to A, learned already: only A gets it): macB is learned on B.
      const c1 = rx(C);
      const f2 = eth(macA, macB, 80, 2);
      await send(B, f2);
      expect(same(frameOf(await got(A, a0)), f2)).toBe(true);
      await stillUnused(C, c1);

      // A → macB again: B only.
      const b1 = rx(B), a1 = rx(A);
      const f3 = eth(macB, macA, 90, 3);
      await send(A, f3);
      expect(same(frameOf(await got(B, b1)), f3)).toBe(true);
      await stillUnused(C, c1);

      // Broadcast from C: A and B, not C.
      const b2 = rx(B), c2 = rx(C);
      const f4 = eth(BCAST, macC, 64, 4);
      await send(C, f4);
      expect(same(frameOf(await got(A, a1)), f4)).toBe(true);
      expect(same(frameOf(await got(B, b2)), f4)).toBe(true);
      await stillUnused(C, c1, c2);

      // A to its own learned MAC: nobody gets it.
      const a2 = rx(A), b3 = rx(B);
      await send(A, eth(macA, macA, 70, 5));
      await stillUnused(A, a2);
      await stillUnused(B, b3);
      await stillUnused(C, c1, c2);

      const k = await stopCounters(n);
      expect(k.map((c) => [c.from, c.to])).toEqual([[3, 2], [1, 3], [1, 1]]);
    });

    test(`receive data is the 12-byte header (num_buffers 1) and the exact frame: 60 and 1514 bytes, split or whole TX chains (${ring})`, async () => {
      const n = await startNet({ ports: 2, drivers: [{ packed }, { packed }] });
      const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
      for (const [len, oneBuffer] of [[60, false], [1514, false], [60, true], [1514, true]] as const) {
        const r = rx(B);
        const f = eth(macB, macA, len, len);
        await send(A, f, hdr(), 1, oneBuffer);
        const c = await got(B, r);
        expect(c.len).toBe(12 + len);
        expect(same(c.data, Buffer.concat([hdr({ numBuffers: 1 }), f]))).toBe(true);
      }
    });

    test(`MRG_RXBUF: a 1514-byte frame spans 6 buffers of 256 with num_buffers 6; too few buffers are given back and used by the next frame that fits (${ring})`, async () => {
      const n = await startNet({ ports: 2, drivers: [{ packed }, { packed }] });
      const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
      expect(B.features & b(F.MRG_RXBUF)).toBe(b(F.MRG_RXBUF));
      const bufs = Array.from({ length: 8 }, () => rx(B, 256));
      const f = eth(macB, macA, 1514, 9);
      await send(A, f);
      const cs = await Promise.all(bufs.slice(0, 6).map((r) => got(B, r)));
      expect(cs.map((c) => c.len)).toEqual([256, 256, 256, 256, 256, 1526 - 5 * 256]);
      expect(parseHdr(cs[0]!.data)).toEqual({ ...PLAIN, numBuffers: 6 });
      expect(same(Buffer.concat(cs.map((c) => c.data)).subarray(12), f)).toBe(true);
      await stillUnused(B, bufs[6]!, bufs[7]!);
      // The two left over and one more: 768 bytes < 1526: nothing is used, the frame is dropped.
      const third = rx(B, 256);
      await send(A, eth(macB, macA, 1514, 10));
      await stillUnused(B, bufs[6]!, bufs[7]!, third);
      // 500 bytes (+12) take the first two again, in ring order; then 60 bytes take the third.
      const f500 = eth(macB, macA, 500, 11);
      await send(A, f500);
      const two = [await got(B, bufs[6]!), await got(B, bufs[7]!)];
      expect(two.map((c) => c.len)).toEqual([256, 512 - 256]);
      expect(parseHdr(two[0]!.data).numBuffers).toBe(2);
      expect(same(Buffer.concat(two.map((c) => c.data)).subarray(12), f500)).toBe(true);
      await stillUnused(B, third);
      const f60 = eth(macB, macA, 60, 12);
      await send(A, f60);
      expect(same(frameOf(await got(B, third)), f60)).toBe(true);
      const k = await stopCounters(n);
      expect(k[1]).toEqual({ from: 0, to: 3, noBuffers: 1, tooBig: 0, filtered: 0, malformed: 0 });
    });

    test(`without MRG_RXBUF a buffer too small for the frame is not used, the frame is dropped; the buffer takes the next frame that fits (${ring})`, async () => {
      const n = await startNet({ ports: 2, drivers: [{ packed }, { packed, features: ALL & ~b(F.MRG_RXBUF) }] });
      const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
      expect(B.features & b(F.MRG_RXBUF)).toBe(0n);
      const small = rx(B, 256), small2 = rx(B, 256);
      await send(A, eth(macB, macA, 1514, 1));
      await stillUnused(B, small, small2);
      const f = eth(macB, macA, 200, 2);
      await send(A, f);
      expect(same(frameOf(await got(B, small)), f)).toBe(true);
      await stillUnused(B, small2);
      const k = await stopCounters(n);
      expect(k[1]!.to).toBe(1);
      expect(k[1]!.noBuffers + k[1]!.tooBig).toBe(1);
    });
  });
}

describe("net switch drops and counters", () => {
  test("a port without receive buffers drops (no buffers); a frame over mtu + 18 from a guest is dropped (too big), mtu + 18 passes", async () => {
    const n = await startNet();
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    // C posts nothing.
    const b0 = rx(B, 2048), b1 = rx(B, 2048);
    const f = eth(BCAST, macA, 100);
    await send(A, f);
    expect(same(frameOf(await got(B, b0)), f)).toBe(true);
    await send(A, eth(BCAST, macA, 1519));
    await stillUnused(B, b1);
    const big = eth(BCAST, macA, 1518);
    await send(A, big);
    expect(same(frameOf(await got(B, b1)), big)).toBe(true);
    const k = await stopCounters(n);
    expect(k[0]).toEqual({ from: 3, to: 0, noBuffers: 0, tooBig: 1, filtered: 0, malformed: 0 });
    expect(k[1]).toEqual({ from: 0, to: 2, noBuffers: 0, tooBig: 0, filtered: 0, malformed: 0 });
    expect(k[2]).toEqual({ from: 0, to: 0, noBuffers: 2, tooBig: 0, filtered: 0, malformed: 0 });
  });

  test("--mtu 9000 lets a 9000-byte frame through (config space says 9000); 9019 bytes are dropped", async () => {
    const n = await startNet({ ports: 2, options: { mtu: 9000 } });
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
    const cfg = await B.config(0, 12);
    expect(new DataView(cfg.buffer, cfg.byteOffset).getUint16(10, true)).toBe(9000);
    expect([...cfg.subarray(0, 6)]).toEqual([0x02, 0x62, 0x76, 0x68, 0x00, 0x02]);
    const r = rx(B, 9100), r2 = rx(B, 9100);
    const f = eth(macB, macA, 9000);
    await send(A, f);
    expect(same(frameOf(await got(B, r)), f)).toBe(true);
    await send(A, eth(macB, macA, 9019));
    await stillUnused(B, r2);
  });

  test("NET_SET_MTU 9000 on both ports lets a 9000-byte frame through that --mtu 1500 dropped; NET_SET_MTU 67 is refused", async () => {
    const pf = { protocolFeatures: bit(ProtocolFeature.NET_MTU) };
    const n = await startNet({ ports: 2, drivers: [pf, pf] });
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
    const r = rx(B, 9100);
    await send(A, eth(macB, macA, 9000, 1));
    await stillUnused(B, r);
    for (const d of [A, B]) await d.request({ request: Req.NET_SET_MTU, flags: 0, fds: [], u64: 9000n });
    const f = eth(macB, macA, 9000, 2);
    await send(A, f);
    expect(same(frameOf(await got(B, r)), f)).toBe(true);
    const e = await A.request({ request: Req.NET_SET_MTU, flags: 0, fds: [], u64: 67n }).catch((x) => x);
    expect((e as FrontendError).code).toBe("NACK");
  });

  test("aging 1 s: a learned MAC is forgotten after 1.2 s without traffic from it (unicast to it floods again)", async () => {
    const n = await startNet({ options: { aging: 1 } });
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    await send(B, eth(BCAST, macB, 60)); // learn macB (A and C have no buffers: dropped)
    const b0 = rx(B), c0 = rx(C);
    const f = eth(macB, macA, 60, 1);
    await send(A, f);
    expect(same(frameOf(await got(B, b0)), f)).toBe(true);
    await stillUnused(C, c0);
    await Bun.sleep(1200);
    const b1 = rx(B);
    const g = eth(macB, macA, 60, 2);
    await send(A, g);
    expect(same(frameOf(await got(B, b1)), g)).toBe(true);
    expect(await outcome(c0.p, 300)).toBe("used"); // flooded: macB was forgotten
    expect(same(frameOf(c0.got!), g)).toBe(true);
  });
});

describe("net switch offloads", () => {
  test("a TCPv4 GSO frame (10 KiB, gso_size 1448, NEEDS_CSUM) reaches a port without GUEST_TSO4 as 8 checksummed segments, one with it as the GSO frame unchanged", async () => {
    const n = await startNet({ drivers: [{}, { features: NO_GUEST_OFFLOADS }, {}] });
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    expect(B.features & (b(F.GUEST_TSO4) | b(F.GUEST_CSUM))).toBe(0n);
    expect(C.features & (b(F.GUEST_TSO4) | b(F.GUEST_CSUM))).toBe(b(F.GUEST_TSO4) | b(F.GUEST_CSUM));
    const payload = pattern(10240, 5);
    const seq0 = 0xfffff000; // wraps past 2^32 within the segments
    const f = tcp4(macX, macA, payload, seq0); // unknown destination: flooded to B and C
    const gso = { flags: 1, gsoType: 1, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16 };
    const bs = Array.from({ length: 9 }, () => rx(B, 2048));
    const c0 = rx(C, 16384);
    await send(A, f, hdr(gso));

    const segs = Math.ceil(10240 / 1448);
    expect(segs).toBe(8);
    const cs = await Promise.all(bs.slice(0, segs).map((r) => got(B, r)));
    await stillUnused(B, bs[segs]!);
    const joined = new Uint8Array(10240);
    let at = 0;
    cs.forEach((c, i) => {
      const s = frameOf(c); // flags 0, gso_type 0: B cannot take partial checksums
      const plen = Math.min(1448, 10240 - i * 1448);
      expect(s.length).toBe(54 + plen);
      expect(same(s.subarray(0, 14), f.subarray(0, 14))).toBe(true);
      expect(get16(s, 16)).toBe(40 + plen);
      expect(ipOk(s)).toBe(true);
      expect(l4Ok(s, 6)).toBe(true);
      expect(get32(s, 38)).toBe((seq0 + i * 1448) % 2 ** 32);
      expect(s[47]! & 0x10).toBe(0x10); // ACK on every segment
      expect(s[47]! & 0x08).toBe(i === segs - 1 ? 0x08 : 0); // PSH only on the last
      joined.set(s.subarray(54), at);
      at += plen;
    });
    expect(at).toBe(10240);
    expect(same(joined, payload)).toBe(true);

    const whole = await got(C, c0);
    expect(parseHdr(whole.data)).toEqual({ ...gso, numBuffers: 1 });
    expect(same(whole.data.subarray(12), f)).toBe(true);
  });

  test("a NEEDS_CSUM UDP frame reaches a port without GUEST_CSUM checksummed with flags 0, and one with it as sent", async () => {
    const n = await startNet({ drivers: [{}, { features: NO_GUEST_OFFLOADS }, {}] });
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    const f = udp4(macX, macA, pattern(333, 9)); // odd length: the last byte is padded in the sum
    expect(l4Ok(f, 17)).toBe(false);
    const h = { flags: 1, csumStart: 34, csumOffset: 6 };
    const b0 = rx(B), c0 = rx(C);
    await send(A, f, hdr(h));
    const s = frameOf(await got(B, b0));
    expect(l4Ok(s, 17)).toBe(true);
    expect(get16(s, 40)).not.toBe(0);
    expect(same(s.subarray(0, 40), f.subarray(0, 40))).toBe(true);
    expect(same(s.subarray(42), f.subarray(42))).toBe(true);
    const t = frameOf(await got(C, c0), h);
    expect(same(t, f)).toBe(true);
  });
});

describe("net control queue (CTRL_VQ, CTRL_RX, MQ, CTRL_MAC_ADDR)", () => {
  test("PROMISC off + MAC_TABLE_SET: other unicast is filtered, the table's MAC and broadcast pass; ALLMULTI off filters multicast not in the table", async () => {
    const n = await startNet();
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    for (const bitNo of [F.CTRL_VQ, F.CTRL_RX, F.MQ, F.CTRL_MAC_ADDR]) expect(B.features & b(bitNo)).toBe(b(bitNo));
    const CQ = 2; // 2 × 1 pair with MQ
    expect(B.queueCount).toBe(3);
    expect(await ctrl(B, CQ, CTRL_RX, RX_PROMISC, Uint8Array.of(0))).toBe(0);
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, macTable([macX], []))).toBe(0);

    const b0 = rx(B), c0 = rx(C);
    await send(A, eth(macC, macA, 60, 1)); // unknown: flooded; B filters it
    await got(C, c0);
    await stillUnused(B, b0);
    const toX = eth(macX, macA, 60, 2);
    await send(A, toX);
    expect(same(frameOf(await got(B, b0)), toX)).toBe(true);
    const b1 = rx(B);
    const bc = eth(BCAST, macA, 60, 3);
    await send(A, bc);
    expect(same(frameOf(await got(B, b1)), bc)).toBe(true);
    const b2 = rx(B);
    const mc = eth(MCAST, macA, 60, 4);
    await send(A, mc); // ALLMULTI still on
    expect(same(frameOf(await got(B, b2)), mc)).toBe(true);

    expect(await ctrl(B, CQ, CTRL_RX, RX_ALLMULTI, Uint8Array.of(0))).toBe(0);
    const b3 = rx(B);
    await send(A, mc);
    await stillUnused(B, b3);
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, macTable([macX], [MCAST]))).toBe(0);
    await send(A, mc);
    expect(same(frameOf(await got(B, b3)), mc)).toBe(true);
    // Back to promiscuous: anything passes.
    expect(await ctrl(B, CQ, CTRL_RX, RX_PROMISC, Uint8Array.of(1))).toBe(0);
    const b4 = rx(B);
    const other = eth([0x02, 9, 9, 9, 9, 9], macA, 60, 5);
    await send(A, other);
    expect(same(frameOf(await got(B, b4)), other)).toBe(true);

    const k = await stopCounters(n);
    expect(k[1]).toEqual({ from: 0, to: 5, noBuffers: 0, tooBig: 0, filtered: 2, malformed: 0 });
  });

  test("ERR acks: VQ_PAIRS_SET 0 or above the maximum, unknown class, wrong data sizes, a TABLE_SET whose count lies; a chain without an ack byte breaks nothing", async () => {
    const n = await startNet({ ports: 2 });
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
    const CQ = 2;
    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(0))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(2))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(1))).toBe(0);
    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, Uint8Array.of(1, 0, 0))).toBe(1);
    expect(await ctrl(B, CQ, 99, 0, Uint8Array.of(0))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_RX, 7, Uint8Array.of(0))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_RX, RX_PROMISC, new Uint8Array(0))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_RX, RX_PROMISC, Uint8Array.of(0, 0))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, macTable([macX], [], 2))).toBe(1); // says 2, holds 1
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, macTable([macX], [], 1, 0).subarray(0, 10))).toBe(1); // no multicast count
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, Buffer.concat([macTable([], []), Uint8Array.of(0)]))).toBe(1); // trailing byte
    expect(await ctrl(B, CQ, CTRL_MAC, MAC_TABLE_SET, macTable([], [], 0xffffffff))).toBe(1);
    // A class with no command byte.
    expect((await B.submit(CQ, { readable: Uint8Array.of(CTRL_RX), writable: [1] })).data[0]).toBe(1);
    // No writable byte: used with nothing written, and the queue goes on.
    expect((await B.submit(CQ, { readable: Uint8Array.of(CTRL_RX, RX_PROMISC, 0) })).len).toBe(0);
    expect(await ctrl(B, CQ, CTRL_RX, RX_PROMISC, Uint8Array.of(1))).toBe(0);
    // Failed commands left the filter alone: B is still promiscuous.
    const r = rx(B);
    const f = eth(macX, macA, 60);
    await send(A, f);
    expect(same(frameOf(await got(B, r)), f)).toBe(true);
  });
});

describe("net multi-queue (--queues 2)", () => {
  test("5 queues per port; until VQ_PAIRS_SET 2, tx1 of A lands on rx0 of B; after it, on rx1 (queue 2); tx0 stays on rx0", async () => {
    const n = await startNet({ ports: 2, options: { queues: 2 } });
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
    expect([A.queueCount, B.queueCount]).toEqual([5, 5]);
    const CQ = 4;
    expect(await ctrl(A, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(2))).toBe(0);
    const r0 = rx(B, 2048, 0), r1 = rx(B, 2048, 2);
    const f1 = eth(macB, macA, 100, 1);
    await send(A, f1, hdr(), 3);
    expect(same(frameOf(await got(B, r0)), f1)).toBe(true);
    await stillUnused(B, r1);

    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(3))).toBe(1);
    expect(await ctrl(B, CQ, CTRL_MQ, MQ_VQ_PAIRS_SET, le16(2))).toBe(0);
    const f2 = eth(macB, macA, 100, 2);
    await send(A, f2, hdr(), 3);
    expect(same(frameOf(await got(B, r1)), f2)).toBe(true);
    const r0b = rx(B, 2048, 0), r1b = rx(B, 2048, 2);
    const f3 = eth(macB, macA, 100, 3);
    await send(A, f3, hdr(), 1);
    expect(same(frameOf(await got(B, r0b)), f3)).toBe(true);
    await stillUnused(B, r1b);
  });
});

describe("net hostile chains", () => {
  test("a TX chain shorter than header + Ethernet header, and a GSO header with gso_size 0, are dropped as malformed; the queue keeps working", async () => {
    const n = await startNet({ ports: 2 });
    const [A, B] = n.drv as [DeviceDriver, DeviceDriver];
    const r = rx(B);
    await A.submit(1, { readable: new Uint8Array(25) });
    await A.submit(1, { readable: hdr() });
    await stillUnused(B, r);
    await send(A, tcp4(macB, macA, pattern(3000, 1), 1), hdr({ flags: 1, gsoType: 1, hdrLen: 54, gsoSize: 0, csumStart: 34, csumOffset: 16 }));
    await stillUnused(B, r);
    const f = eth(macB, macA, 60);
    await send(A, f);
    expect(same(frameOf(await got(B, r)), f)).toBe(true);
    const k = await stopCounters(n);
    expect(k[0]).toEqual({ from: 2, to: 0, noBuffers: 0, tooBig: 0, filtered: 0, malformed: 3 });
    expect(n.lines.some((l) => /warn: net port 0: transmit queue 1/.test(l))).toBe(true);
  });

  for (const [kind, code] of [["a zero-length descriptor", "ZERO_LEN"], ["a descriptor loop", "LOOP"]] as const) {
    test(`${kind} on a transmit queue ends that connection; the other ports keep forwarding and the socket takes a new front-end`, async () => {
      const n = await startNet();
      const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
      const watch = A.post(0, { writable: [2048] });
      const g = A.ram.alloc(256, 16);
      A.ram.write(g, Buffer.concat([hdr(), eth(BCAST, macA, 60)]));
      const vq = A.vqs[1] as SplitDriver;
      if (kind === "a zero-length descriptor") vq.pushRaw([{ addr: g, len: 12 }, { addr: g + 12, len: 0 }, { addr: g + 12, len: 60 }]);
      else vq.pushRaw([{ addr: g, len: 12 }, { addr: g + 12, len: 60, flags: VRING_DESC_F_NEXT, nextRel: 0 }]);
      vq.kick(true);
      expect(await outcome(watch, 3000)).toBe("DISCONNECTED");
      expect(n.lines.join("\n")).toContain(code);

      const c0 = rx(C);
      const f = eth(macC, macB, 60, 1);
      await send(B, f);
      expect(same(frameOf(await got(C, c0)), f)).toBe(true);

      const A2 = await DeviceDriver.connect(n.socks[0]!, { queueSize: 256, timeoutMs: 3000 });
      n.drv.push(A2);
      const b0 = rx(B), c1 = rx(C), a0 = rx(A2);
      const g2 = eth(macB, macA, 60, 2);
      await send(A2, g2);
      expect(same(frameOf(await got(B, b0)), g2)).toBe(true);
      await stillUnused(C, c1); // macB is still learned on B
      const h = eth(macA, macB, 60, 3);
      await send(B, h);
      expect(same(frameOf(await got(A2, a0)), h)).toBe(true);
    });
  }
});

describe("net SEND_RARP", () => {
  test("SEND_RARP on B: the others get a 60-byte RARP broadcast from the MAC; then frames to that MAC go to B only", async () => {
    const n = await startNet({ drivers: [{}, { protocolFeatures: bit(ProtocolFeature.RARP) }, {}] });
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    const M: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const a0 = rx(A), b0 = rx(B), c0 = rx(C);
    let u64 = 0n;
    M.forEach((v, i) => { u64 |= BigInt(v) << BigInt(8 * i); });
    await B.request({ request: Req.SEND_RARP, flags: 0, fds: [], u64 });
    for (const [d, r] of [[A, a0], [C, c0]] as const) {
      const c = await got(d, r);
      expect(c.len).toBe(72);
      const f = frameOf(c);
      expect([...f.subarray(0, 6)]).toEqual([...BCAST]);
      expect([...f.subarray(6, 12)]).toEqual([...M]);
      expect(get16(f, 12)).toBe(0x8035);
      expect(get16(f, 20)).toBe(3); // reverse request
      expect([...f.subarray(22, 28)]).toEqual([...M]);
    }
    await stillUnused(B, b0);
    const c1 = rx(C);
    const g = eth(M, macA, 60);
    await send(A, g);
    expect(same(frameOf(await got(B, b0)), g)).toBe(true);
    await stillUnused(C, c1);
  });
});

describe("net switch on an I/O thread (threads: 1)", () => {
  test("flooding, learning and broadcast with the rings on io0", async () => {
    const n = await startNet({ threads: 1 });
    const [A, B, C] = n.drv as [DeviceDriver, DeviceDriver, DeviceDriver];
    const b0 = rx(B), c0 = rx(C);
    const f = eth(macB, macA, 1514, 1);
    await send(A, f);
    expect(same(frameOf(await got(B, b0)), f)).toBe(true);
    expect(same(frameOf(await got(C, c0)), f)).toBe(true);
    const a0 = rx(A), c1 = rx(C);
    const g = eth(macA, macB, 60, 2);
    await send(B, g);
    expect(same(frameOf(await got(A, a0)), g)).toBe(true);
    await stillUnused(C, c1);
    const a1 = rx(A);
    const h = eth(BCAST, macC, 60, 3);
    await send(C, h);
    expect(same(frameOf(await got(A, a1)), h)).toBe(true);
    const b1 = rx(B);
    await send(A, eth(macB, macA, 100, 4));
    await got(B, b1);
    await stillUnused(C, c1);
  });
});

describe("net: taps that cannot be opened", () => {
  const canTap = process.getuid?.() === 0 && require("node:fs").existsSync("/dev/net/tun");
  test.skipIf(!canTap)("a tap another process holds: the second server exits 1 naming the tap and EBUSY, the first keeps it", async () => {
    const d = mkdtempSync("/tmp/bvh-nettap-");
    const tap = `bvbz${process.pid % 10000}`;
    const cli = (sock: string) => Bun.spawn([process.execPath, "run", join(import.meta.dir, "../../server.ts"), "net", "--socket", sock, "--tap", tap],
      { stdout: "pipe", stderr: "pipe" });
    const first = cli(join(d, "a.sock"));
    try {
      const reader = first.stdout.getReader();
      let out = "";
      while (!/listening on/.test(out)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`first server ended: ${await new Response(first.stderr).text()}`);
        out += new TextDecoder().decode(value);
      }
      const second = cli(join(d, "b.sock"));
      const code = await second.exited;
      const err = await new Response(second.stderr).text();
      expect(code).toBe(1);
      expect(err).toContain(`TUNSETIFF ${tap}: EBUSY`);
      expect(first.exitCode).toBeNull();
    } finally {
      first.kill("SIGTERM");
      await first.exited;
      rmSync(d, { recursive: true, force: true });
    }
  }, 30_000);

  test("a bad tap name or the same tap twice is a usage error (exit 2)", async () => {
    for (const args of [["--tap", "no/slash"], ["--tap", "x0", "--tap", "x0"]]) {
      const p = Bun.spawn([process.execPath, "run", join(import.meta.dir, "../../server.ts"), "net", "--socket", "/tmp/bvh-never.sock", ...args], { stdout: "pipe", stderr: "pipe" });
      expect(await p.exited).toBe(2);
      expect(await new Response(p.stderr).text()).toMatch(/--tap/);
    }
  });
});

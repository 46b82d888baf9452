/**
 * One vhost-user port of the switch: a virtio-net device (VIRTIO 1.2 §5.1)
 * whose transmit queues feed the switch and whose receive queues take what
 * the switch delivers. Built only on the public device API.
 *
 * Queues: receiveq1, transmitq1, …, receiveqN, transmitqN, controlq (index
 * 2N with MQ, else 2). Receive queues are the API's receive queues: a
 * buffer is taken only when a frame arrives for it, and given back when the
 * frame turns out not to fit (mergeable buffers), so nothing is held while a
 * ring stops, moves or the front-end goes.
 */
import type { ChainWriter, Device, DeviceLog, EventLoop, Queues, Request } from "../../index.ts";
import { VIRTIO_ID_NET } from "../../index.ts";
import {
  completeChecksum, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, macAt, segmentTcp, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
} from "./offload.ts";
import { Frame, PortCounters, type Switch, type SwitchPort } from "./switch.ts";

/** Feature bits (VIRTIO 1.2 §5.1.3). */
export const F = {
  CSUM: 0, GUEST_CSUM: 1, MTU: 3, MAC: 5, GUEST_TSO4: 7, GUEST_TSO6: 8, GUEST_ECN: 9, GUEST_UFO: 10,
  HOST_TSO4: 11, HOST_TSO6: 12, HOST_ECN: 13, HOST_UFO: 14, MRG_RXBUF: 15, STATUS: 16, CTRL_VQ: 17, CTRL_RX: 18,
  CTRL_VLAN: 19, GUEST_ANNOUNCE: 21, MQ: 22, CTRL_MAC_ADDR: 23,
} as const;
const VERSION_1 = 32;
const bit = (b: number) => 1n << BigInt(b);

/** Control queue classes and commands (§5.1.6.5). */
const CTRL_RX = 0, CTRL_MAC = 1, CTRL_ANNOUNCE = 3, CTRL_MQ = 4;
const RX_PROMISC = 0, RX_ALLMULTI = 1;
const MAC_TABLE_SET = 0, MAC_ADDR_SET = 1;
const ANNOUNCE_ACK = 0;
const MQ_VQ_PAIRS_SET = 0;
const ACK_OK = 0, ACK_ERR = 1;
/** Status bits (§5.1.4). */
const S_LINK_UP = 1, S_ANNOUNCE = 2;
/** A MAC table may list this many addresses (bounded: a guest cannot make us hold more). */
const MAX_TABLE = 256;
/** The most buffers one frame may take (mergeable): 64 KiB + header in 1 KiB buffers, with room. */
const MAX_BUFFERS = 128;
/** Largest frame a port ever handles: 64 KiB of GSO payload plus headers. */
export const MAX_FRAME = 65536 + 256;

export interface NetPortOptions {
  port: number;
  mac: Uint8Array;
  mtu: number;
  pairs: number;
  offloads: boolean;
  queueSize: number;
}

/** The device-specific features a port offers. */
export function portFeatures(o: { offloads: boolean; pairs: number }): bigint {
  let f = bit(F.MTU) | bit(F.MAC) | bit(F.MRG_RXBUF) | bit(F.STATUS) | bit(F.CTRL_VQ) | bit(F.CTRL_RX) |
    bit(F.GUEST_ANNOUNCE) | bit(F.CTRL_MAC_ADDR) | bit(F.MQ);
  if (o.offloads) {
    // Everything the switch can deliver to any port: passed through to a port that negotiated
    // it, checksummed or segmented in software for one that did not (UFO is not offered).
    f |= bit(F.CSUM) | bit(F.GUEST_CSUM) | bit(F.HOST_TSO4) | bit(F.HOST_TSO6) | bit(F.HOST_ECN) |
      bit(F.GUEST_TSO4) | bit(F.GUEST_TSO6) | bit(F.GUEST_ECN);
  }
  return f;
}

export class NetPort implements Device, SwitchPort {
  readonly name = "net";
  readonly type = VIRTIO_ID_NET;
  readonly queues: number;
  readonly queueSize: number;
  readonly features: bigint;
  /** One used-ring publish (and at most one interrupt) per TX burst: a TX completion only frees a buffer. */
  readonly publishEvery = 0;
  readonly label: string;
  readonly counters = new PortCounters();
  readonly mac: Uint8Array;
  mtu: number;
  private readonly maxPairs: number;
  private status = S_LINK_UP;
  // Negotiated.
  private hdrSize = 12;
  private mrg = false;
  private guestCsum = false;
  private guestTso4 = false;
  private guestTso6 = false;
  private guestEcn = false;
  private ctrlVq = false;
  private mq = false;
  private ctrlQueue = -1;
  private rxQueues: number[];
  /** Queue pairs the driver enabled with VQ_PAIRS_SET (all, when it has no control queue). */
  private activePairs: number;
  // RX filter (control queue): promiscuous until the driver says otherwise.
  private promisc = true;
  private allmulti = true;
  private readonly ucTable = new Set<number>();
  private readonly mcTable = new Set<number>();
  private myMac: number;
  private q: Queues | null = null;
  private joined = false;
  /** Buffers taken for the frame being delivered (reused). */
  private readonly bufs: Request[] = new Array(MAX_BUFFERS);
  /** Scratch for frames that need work before delivery (checksum, segmentation). */
  private scratch: Uint8Array | null = null;
  private segScratch: Uint8Array | null = null;
  private readonly segFrame = new Frame();
  private readonly txFrame = new Frame();
  private readonly emitSeg = (seg: Uint8Array, len: number) => {
    this.segFrame.fromBytes(seg, 0, len);
    this.put(this.segFrame, 0, GSO_NONE, 0, 0, 0, 0);
  };
  private warned = 0;

  constructor(private readonly o: NetPortOptions, private readonly sw: Switch | null, private readonly log: DeviceLog) {
    this.maxPairs = o.pairs;
    this.queues = 2 * o.pairs + 1;
    this.queueSize = o.queueSize;
    this.features = portFeatures(o);
    this.mac = o.mac.slice();
    this.myMac = macAt(this.mac, 0);
    this.mtu = o.mtu;
    this.label = `port ${o.port}`;
    this.activePairs = o.pairs;
    this.rxQueues = this.rxList();
  }

  /** Receive queues under the negotiated features (queue 2 is the control queue without MQ). */
  get receiveQueues(): readonly number[] {
    return this.rxQueues;
  }

  private rxList(): number[] {
    const pairs = this.mq ? this.maxPairs : this.ctrlVq ? 1 : this.maxPairs;
    return Array.from({ length: pairs }, (_, i) => 2 * i);
  }

  config(): Uint8Array {
    const c = new Uint8Array(12);
    c.set(this.mac, 0);
    const dv = new DataView(c.buffer);
    dv.setUint16(6, this.status, true);
    dv.setUint16(8, this.maxPairs, true);
    dv.setUint16(10, this.mtu, true);
    return c;
  }

  /** Legacy drivers without CTRL_MAC_ADDR write the MAC into the config space; nothing else is writable. */
  setConfig(offset: number, data: Uint8Array): void {
    if (offset + data.length > 6) throw new Error("only the mac field (bytes 0..5) is writable");
    this.mac.set(data, offset);
    this.myMac = macAt(this.mac, 0);
  }

  setFeatures(f: bigint): void {
    const has = (b: number) => (f & bit(b)) !== 0n;
    this.mrg = has(F.MRG_RXBUF);
    this.hdrSize = has(VERSION_1) || this.mrg ? 12 : 10;
    this.guestCsum = has(F.GUEST_CSUM);
    this.guestTso4 = has(F.GUEST_TSO4);
    this.guestTso6 = has(F.GUEST_TSO6);
    this.guestEcn = has(F.GUEST_ECN);
    this.ctrlVq = has(F.CTRL_VQ);
    this.mq = has(F.MQ);
    this.ctrlQueue = this.ctrlVq ? (this.mq ? 2 * this.maxPairs : 2) : -1;
    // §5.1.6.5.5: with a control queue only the first pair runs until VQ_PAIRS_SET; without one
    // the front-end says which pairs run by enabling their rings.
    this.activePairs = this.ctrlVq ? 1 : this.maxPairs;
    this.rxQueues = this.rxList();
  }

  setMtu(mtu: number): void {
    this.mtu = mtu;
  }

  attach(loop: EventLoop, queues?: Queues): void {
    this.q = queues ?? null;
    if (this.sw !== null && !this.joined) {
      this.joined = true;
      this.sw.add(this);
      this.sw.attach(loop);
    }
  }

  available(): void {
    // Frames from guests are not queued for a port without buffers (a switch drops them);
    // a tap holds its next frame until some port has buffers again.
    this.sw?.buffersAvailable();
  }

  reset(): void {
    // What this port carried so far, when its front-end goes (the totals follow at stop).
    const c = this.counters;
    if (this.sw !== null && c.fromPort + c.toPort > 0) this.log.info(`net ${this.label}: ${c.line()} (front-end gone)`);
    this.promisc = true;
    this.allmulti = true;
    this.ucTable.clear();
    this.mcTable.clear();
    this.status = S_LINK_UP;
    this.activePairs = this.ctrlVq ? 1 : this.maxPairs;
    // The guest behind this port is gone: what was learned here is stale.
    this.sw?.forget(this);
    this.sw?.buffersAvailable();
  }

  close(): void {
    this.sw?.remove(this);
  }

  /** SEND_RARP: a reverse-ARP broadcast from `mac`, as if this port's guest sent it (the switch learns it here). */
  announce(mac: Uint8Array): void {
    if (this.sw === null) return;
    const b = new Uint8Array(60);
    b.fill(0xff, 0, 6);
    b.set(mac, 6);
    b[12] = 0x80; b[13] = 0x35; // ETH_P_RARP
    b[15] = 1; // htype Ethernet
    b[16] = 0x08; b[17] = 0x00; // ptype IPv4
    b[18] = 6; b[19] = 4;
    b[21] = 3; // op: reverse request
    b.set(mac, 22);
    b.set(mac, 32);
    const f = new Frame();
    f.fromBytes(b, 0, 60);
    f.mayWait = false;
    f.dst = macAt(b, 0);
    f.src = macAt(b, 6);
    this.counters.fromPort++;
    this.sw.input(this, f);
  }

  handle(req: Request): void {
    const q = req.queue;
    if (q === this.ctrlQueue) return this.control(req);
    if ((q & 1) === 1) return this.transmit(req);
    // A receive queue the framework handed us (cannot happen: they are receive queues): nothing written.
  }

  /** A TX chain: header, then the frame; into the switch. The chain completes with nothing written. */
  private transmit(req: Request): void {
    const r = req.in;
    const hs = this.hdrSize;
    const total = r.remaining;
    if (total < hs + 14) {
      this.counters.dropBad++;
      this.warn(`transmit queue ${req.queue}: a chain of ${total} bytes, shorter than the header and an Ethernet header`);
      return;
    }
    const f = this.txFrame;
    const v = r.peekView(hs + 12);
    if (v !== null) {
      // The usual case: header and Ethernet addresses in the first buffer.
      const o = r.peekViewOffset;
      f.flags = v[o]!;
      f.gsoType = v[o + 1]!;
      f.hdrLen = v[o + 2]! | (v[o + 3]! << 8);
      f.gsoSize = v[o + 4]! | (v[o + 5]! << 8);
      f.csumStart = v[o + 6]! | (v[o + 7]! << 8);
      f.csumOffset = v[o + 8]! | (v[o + 9]! << 8);
      f.dst = macAt(v, o + hs);
      f.src = macAt(v, o + hs + 6);
    } else {
      f.flags = r.peekU8(0);
      f.gsoType = r.peekU8(1);
      f.hdrLen = r.peekU8(2) | (r.peekU8(3) << 8);
      f.gsoSize = r.peekU8(4) | (r.peekU8(5) << 8);
      f.csumStart = r.peekU8(6) | (r.peekU8(7) << 8);
      f.csumOffset = r.peekU8(8) | (r.peekU8(9) << 8);
      f.dst = peekMac(r, hs);
      f.src = peekMac(r, hs + 6);
    }
    f.pair = q2pair(req.queue);
    const len = total - hs;
    this.counters.fromPort++;
    if ((f.gsoType & ~GSO_ECN) === GSO_NONE) {
      f.gsoType = GSO_NONE;
      if (len > this.mtu + 18) {
        this.counters.dropTooBig++;
        return;
      }
    } else if (len > MAX_FRAME || f.gsoSize === 0) {
      this.counters.dropBad++;
      this.warn(`transmit queue ${req.queue}: GSO frame of ${len} bytes, gso_size ${f.gsoSize}`);
      return;
    }
    r.skip(hs);
    f.fromChain(r, hs, len);
    this.sw?.input(this, f);
  }

  /** Whether the RX filter lets `dst` in (§5.1.6.5.1, §5.1.6.5.2). */
  private accepts(dst: number): boolean {
    if (this.promisc) return true;
    if (dst === 0xffffffffffff) return true;
    if ((Math.floor(dst / 2 ** 40) & 1) === 1) return this.allmulti || this.mcTable.has(dst);
    return dst === this.myMac || this.ucTable.has(dst);
  }

  deliver(f: Frame): boolean {
    if (!this.accepts(f.dst)) {
      this.counters.dropFiltered++;
      return true;
    }
    const gso = f.gsoType & ~GSO_ECN;
    if (gso !== GSO_NONE) {
      const ok = (gso === GSO_TCPV4 ? this.guestTso4 : gso === GSO_TCPV6 ? this.guestTso6 : false) &&
        ((f.gsoType & GSO_ECN) === 0 || this.guestEcn);
      if (ok) return this.put(f, f.flags, f.gsoType, f.hdrLen, f.gsoSize, f.csumStart, f.csumOffset);
      const wait = f.mayWait;
      f.mayWait = false; // segments are delivered one by one: none waits
      // Segment in software for a port that cannot take the large frame.
      const s = this.gather(f);
      if (segmentTcp(s, f.len, f.gsoType, f.gsoSize, (this.segScratch ??= new Uint8Array(MAX_FRAME)), this.emitSeg) < 0) {
        this.counters.dropBad++;
        this.warn(`cannot segment a GSO frame (type ${f.gsoType}, ${f.len} bytes, gso_size ${f.gsoSize})`);
      }
      f.mayWait = wait;
      return true;
    }
    if (f.len > this.mtu + 18) {
      this.counters.dropTooBig++;
      return true;
    }
    if ((f.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) {
      if (this.guestCsum) return this.put(f, VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, f.csumStart, f.csumOffset);
      const s = this.gather(f);
      if (!completeChecksum(s, f.len, f.csumStart, f.csumOffset)) {
        this.counters.dropBad++;
        return true;
      }
      this.segFrame.fromBytes(s, 0, f.len);
      this.segFrame.mayWait = f.mayWait;
      return this.put(this.segFrame, 0, GSO_NONE, 0, 0, 0, 0);
    }
    return this.put(f, this.guestCsum ? f.flags & VIRTIO_NET_HDR_F_DATA_VALID : 0, GSO_NONE, 0, 0, 0, 0);
  }

  private gather(f: Frame): Uint8Array {
    const s = (this.scratch ??= new Uint8Array(MAX_FRAME));
    f.gather(s, 0);
    return s;
  }

  /** Takes receive buffers for the frame (several with MRG_RXBUF), writes the header and the frame, completes them. */
  /** Returns false (nothing counted) when `f.mayWait` and there are no buffers now. */
  private put(f: Frame, flags: number, gsoType: number, hdrLen: number, gsoSize: number, csumStart: number, csumOffset: number): boolean {
    const q = this.q;
    if (q === null) return this.noBuffers(f);
    const need = this.hdrSize + f.len;
    const bufs = this.bufs;
    // The sender's pair when it runs here, else the first that has a buffer.
    const pairs = this.activePairs;
    let rxq = -1;
    let first: Request | null = null;
    for (let k = 0; k < pairs && first === null; k++) {
      rxq = 2 * ((f.pair + k) % pairs);
      first = q.take(rxq);
    }
    if (first === null) return this.noBuffers(f);
    let n = 1;
    bufs[0] = first;
    let room = first.out.remaining;
    if (room < this.hdrSize) {
      // A buffer that cannot even hold the header: used empty (the driver counts an error).
      this.counters.dropBad++;
      first.complete();
      return true;
    }
    if (this.mrg) {
      while (room < need && n < MAX_BUFFERS) {
        const b = q.take(rxq);
        if (b === null) break;
        bufs[n++] = b;
        room += b.out.remaining;
      }
    }
    if (room < need) {
      // Not enough buffers now (or, without MRG_RXBUF, one too small): put them back, drop the frame.
      while (n > 0) {
        const b = bufs[--n]!;
        if (!q.giveBack(b)) b.complete();
      }
      if (!this.mrg) this.counters.dropTooBig++;
      else return this.noBuffers(f);
      return true;
    }
    const w: ChainWriter = first.out;
    const hs = this.hdrSize;
    // Taken until the frame fit: every buffer holds part of it. Without MRG_RXBUF n is 1 (§5.1.6.4).
    const v = w.peekView(hs);
    if (v !== null) {
      const o = w.peekViewOffset;
      v[o] = flags;
      v[o + 1] = gsoType;
      v[o + 2] = hdrLen & 0xff; v[o + 3] = hdrLen >>> 8;
      v[o + 4] = gsoSize & 0xff; v[o + 5] = gsoSize >>> 8;
      v[o + 6] = csumStart & 0xff; v[o + 7] = csumStart >>> 8;
      v[o + 8] = csumOffset & 0xff; v[o + 9] = csumOffset >>> 8;
      if (hs === 12) { v[o + 10] = n & 0xff; v[o + 11] = n >>> 8; }
      w.skip(hs);
    } else {
      w.writeU8(flags);
      w.writeU8(gsoType);
      w.writeU16(hdrLen);
      w.writeU16(gsoSize);
      w.writeU16(csumStart);
      w.writeU16(csumOffset);
      if (hs === 12) w.writeU16(n);
    }
    let left = f.len;
    for (let k = 0; k < n; k++) {
      const b = bufs[k]!;
      const c = Math.min(left, b.out.remaining);
      f.copyTo(b.out, c);
      left -= c;
      b.complete();
      bufs[k] = undefined as unknown as Request;
    }
    this.counters.toPort++;
    return true;
  }

  private noBuffers(f: Frame): boolean {
    if (f.mayWait) return false;
    this.counters.dropNoBuffers++;
    return true;
  }

  /** The control queue (§5.1.6.5): class, command, data; one ack byte back. */
  private control(req: Request): void {
    const r = req.in;
    if (req.out.remaining < 1) {
      this.warn("control queue: a command without room for the ack");
      return;
    }
    let ack = ACK_ERR;
    if (r.remaining >= 2) {
      const cls = r.readU8(), cmd = r.readU8();
      ack = this.command(cls, cmd, req) ? ACK_OK : ACK_ERR;
    }
    req.out.writeU8(ack);
  }

  private command(cls: number, cmd: number, req: Request): boolean {
    const r = req.in;
    switch (cls) {
      case CTRL_RX:
        if ((cmd !== RX_PROMISC && cmd !== RX_ALLMULTI) || r.remaining !== 1) return false;
        if (cmd === RX_PROMISC) this.promisc = r.readU8() !== 0;
        else this.allmulti = r.readU8() !== 0;
        return true;
      case CTRL_MAC:
        if (cmd === MAC_ADDR_SET) {
          if (r.remaining !== 6) return false;
          for (let i = 0; i < 6; i++) this.mac[i] = r.readU8();
          this.myMac = macAt(this.mac, 0);
          return true;
        }
        if (cmd === MAC_TABLE_SET) return this.macTables(req);
        return false;
      case CTRL_ANNOUNCE:
        if (cmd !== ANNOUNCE_ACK || r.remaining !== 0) return false;
        this.status &= ~S_ANNOUNCE;
        return true;
      case CTRL_MQ: {
        if (cmd !== MQ_VQ_PAIRS_SET || r.remaining !== 2 || !this.mq) return false;
        const pairs = r.readU16();
        if (pairs < 1 || pairs > this.maxPairs) return false;
        this.activePairs = pairs;
        return true;
      }
      default:
        return false;
    }
  }

  /** MAC_TABLE_SET: unicast table then multicast table, each a le32 count and that many addresses. */
  private macTables(req: Request): boolean {
    const r = req.in;
    const uc: number[] = [], mc: number[] = [];
    for (const table of [uc, mc]) {
      if (r.remaining < 4) return false;
      const n = r.readU32();
      if (n > MAX_TABLE || r.remaining < 6 * n) return false;
      for (let i = 0; i < n; i++) {
        let m = 0;
        for (let b = 0; b < 6; b++) m = m * 256 + r.readU8();
        table.push(m);
      }
    }
    if (r.remaining !== 0) return false;
    this.ucTable.clear();
    this.mcTable.clear();
    for (const m of uc) this.ucTable.add(m);
    for (const m of mc) this.mcTable.add(m);
    return true;
  }

  /** Logs a guest's mistake, at most 10 times per port (a hostile guest cannot flood the log). */
  private warn(msg: string): void {
    if (this.warned++ < 10) this.log.warn(`net ${this.label}: ${msg}${this.warned === 10 ? " (no more of these)" : ""}`);
  }
}

function q2pair(q: number): number {
  return q >> 1;
}

/** Six bytes at `at` of a chain as a 48-bit number. */
function peekMac(r: Request["in"], at: number): number {
  return (r.peekU8(at) * 2 ** 40) + (r.peekU8(at + 1) * 2 ** 32) +
    ((r.peekU8(at + 2) << 24) >>> 0) + (r.peekU8(at + 3) << 16) + (r.peekU8(at + 4) << 8) + r.peekU8(at + 5);
}

/**
 * The learning L2 switch between the ports of one `server.ts net` process
 * (vhost-user ports and taps). One switch per thread: every port whose rings
 * run on that thread joins it, so a frame goes from the sender's guest
 * memory into the receiver's buffers in one copy, synchronously, while the
 * sender's chain is still in flight.
 *
 * Forwarding: the source MAC is learned on the input port (a MAC seen on
 * another port moves there: a guest migrated); a unicast destination with a
 * fresh entry goes to its port only; broadcast, multicast and unknown or
 * aged-out destinations flood to every other port. A port that cannot take
 * a frame (no RX buffers, filtered, too big) drops it and counts it.
 */
import { every, type ChainReader, type ChainWriter, type EventLoop, type LoopTimer } from "../../index.ts";
import { isMulticast } from "./offload.ts";

/** Per-port counters, as the stats line prints them. */
export class PortCounters {
  /** Who is behind the port, for the stats line ("guest", "host"). */
  constructor(readonly peer = "guest") {}
  /** Frames the port's guest (or tap) sent into the switch. */
  fromPort = 0;
  /** Frames delivered to the port. */
  toPort = 0;
  dropNoBuffers = 0;
  dropTooBig = 0;
  dropFiltered = 0;
  /** Malformed frames from the port (shorter than a header, a bad offload request). */
  dropBad = 0;

  line(): string {
    return `from ${this.peer} ${this.fromPort}, to ${this.peer} ${this.toPort}, dropped: ${this.dropNoBuffers} no buffers, ` +
      `${this.dropTooBig} too big, ${this.dropFiltered} filtered, ${this.dropBad} malformed`;
  }
}

/** One frame crossing the switch: its virtio_net_hdr fields and its bytes (in a chain or in memory). */
export class Frame {
  flags = 0;
  gsoType = 0;
  hdrLen = 0;
  gsoSize = 0;
  csumStart = 0;
  csumOffset = 0;
  /** Ethernet frame length (without the virtio_net_hdr). */
  len = 0;
  dst = 0;
  src = 0;
  /** The sender's queue pair (a hint for the receiver's queue choice). */
  pair = 0;
  /**
   * The sender can hold the frame (a tap: the host kernel queues behind it):
   * a port without buffers returns false instead of dropping it.
   */
  mayWait = false;
  private reader: ChainReader | null = null;
  private skipHdr = 0;
  private bytes: Uint8Array | null = null;
  private off = 0;
  private pos = 0;

  /** The frame is in a TX chain after a `hdrSize`-byte header. */
  fromChain(r: ChainReader, hdrSize: number, len: number): void {
    this.reader = r;
    this.skipHdr = hdrSize;
    this.bytes = null;
    this.len = len;
  }

  /** The frame is `bytes[off..off+len)`. */
  fromBytes(bytes: Uint8Array, off: number, len: number): void {
    this.reader = null;
    this.bytes = bytes;
    this.off = off;
    this.pos = off;
    this.len = len;
  }

  /** Back to the frame's first byte (before each delivery of a flood). */
  rewind(): void {
    if (this.reader !== null) {
      this.reader.rewind();
      this.reader.skip(this.skipHdr);
    } else {
      this.pos = this.off;
    }
  }

  /** Copies the next `n` bytes of the frame into `w`. */
  copyTo(w: ChainWriter, n: number): void {
    if (this.reader !== null) w.copyFromChain(this.reader, n);
    else {
      w.copyFrom(this.bytes!, this.pos, this.pos + n);
      this.pos += n;
    }
  }

  /** Copies the whole frame into `dst` at `at` (for offload work and taps); rewinds first. */
  gather(dst: Uint8Array, at: number): void {
    if (this.reader !== null) {
      this.rewind();
      this.reader.copyTo(dst, at, at + this.len);
    } else {
      dst.set(this.bytes!.subarray(this.off, this.off + this.len), at);
    }
  }
}

/** What the switch needs of a port. */
export interface SwitchPort {
  readonly label: string;
  readonly counters: PortCounters;
  /**
   * Delivers one frame (rewound); the port counts what it drops. Returns
   * false only for a frame that `mayWait` when the port has no buffers now
   * (nothing counted: the sender retries after `Switch.buffersAvailable`).
   */
  deliver(f: Frame): boolean;
}

interface MacEntry {
  port: SwitchPort;
  seen: number;
}

export class Switch {
  readonly ports: SwitchPort[] = [];
  private readonly macs = new Map<number, MacEntry>();
  /** How long a learned MAC stays without being seen again (ms). */
  agingMs = 300_000;
  /**
   * The clock for learning and aging, set by a timer on the switch's loop
   * (a quarter of the aging time, at most 1 s) instead of read per frame
   * (performance.now() costs ~50 ns, a fifth of a frame's time).
   */
  private now = performance.now();
  private timer: LoopTimer | null = null;

  /** Starts the aging clock on the loop the ports run on (once). */
  attach(loop: EventLoop): void {
    if (this.timer !== null) return;
    this.timer = every(loop, Math.min(1000, Math.max(10, this.agingMs / 4)), () => {
      this.now = performance.now();
    });
  }

  /** Stops the clock (the last port closed). */
  close(): void {
    this.timer?.stop();
    this.timer = null;
  }

  add(p: SwitchPort): void {
    if (!this.ports.includes(p)) this.ports.push(p);
  }

  /** Removes a port and forgets what was learned on it. */
  remove(p: SwitchPort): void {
    const i = this.ports.indexOf(p);
    if (i >= 0) this.ports.splice(i, 1);
    this.forget(p);
  }

  /** Forgets the MACs learned on `p` (its front-end went away). */
  forget(p: SwitchPort): void {
    for (const [mac, e] of this.macs) if (e.port === p) this.macs.delete(mac);
  }

  /** Learned MACs (for stats and tests). */
  get learned(): number {
    return this.macs.size;
  }

  /** Where `mac` was last seen, if fresh. */
  lookup(mac: number): SwitchPort | null {
    const e = this.macs.get(mac);
    if (e === undefined) return null;
    if (this.now - e.seen > this.agingMs) {
      this.macs.delete(mac);
      return null;
    }
    return e.port;
  }

  private waiters: (() => void)[] = [];

  /** Calls `retry` once, the next time a port gets receive buffers (or goes away). */
  waitForBuffers(retry: () => void): void {
    this.waiters.push(retry);
  }

  /** A port got receive buffers (or was reset): senders holding a frame try again. */
  buffersAvailable(): void {
    if (this.waiters.length === 0) return;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /**
   * A frame from port `from`: learn, then forward or flood. Returns false
   * when a frame that `mayWait` could not be delivered to its one
   * destination for want of buffers (floods never wait).
   */
  input(from: SwitchPort, f: Frame): boolean {
    if (!isMulticast(f.src)) {
      const e = this.macs.get(f.src);
      if (e === undefined) this.macs.set(f.src, { port: from, seen: this.now });
      else {
        e.port = from;
        e.seen = this.now;
      }
    }
    if (!isMulticast(f.dst)) {
      const to = this.lookup(f.dst);
      if (to === from) return true; // the destination is behind the sender's own port
      if (to !== null) return to.deliver(f);
    }
    const wait = f.mayWait;
    f.mayWait = false;
    const ports = this.ports;
    let first = true;
    for (let i = 0; i < ports.length; i++) {
      const p = ports[i]!;
      if (p === from) continue;
      if (!first) f.rewind();
      first = false;
      p.deliver(f);
    }
    f.mayWait = wait;
    return true;
  }
}

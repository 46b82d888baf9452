/**
 * A host tap device as a port of the switch: frames the host sends on the
 * tap go into the switch, frames the switch delivers are written to it.
 * The tap carries a 12-byte virtio_net_hdr with each frame (IFF_VNET_HDR),
 * so offloads pass between guests and the host kernel unchanged: the kernel
 * takes partial checksums and GSO frames from us, and hands us only
 * finished frames (no TUNSETOFFLOAD bits: it segments and checksums for us).
 */
import { Tap, type DeviceLog, type EventLoop } from "../../index.ts";
import { macAt } from "./offload.ts";
import { MAX_FRAME } from "./port.ts";
import { Frame, PortCounters, type Switch, type SwitchPort } from "./switch.ts";

const HDR = 12;
/** Frames read per wake before yielding to the other fds of the loop. */
const READ_BUDGET = 64;

export class TapPort implements SwitchPort {
  readonly counters = new PortCounters("host");
  readonly label: string;
  private readonly tap: Tap;
  private readonly rbuf = new Uint8Array(HDR + MAX_FRAME);
  private readonly wbuf = new Uint8Array(HDR + MAX_FRAME);
  private readonly frame = new Frame();
  private watch = -1;

  constructor(name: string, private readonly sw: Switch, private readonly mtu: number, private readonly log: DeviceLog) {
    this.tap = Tap.open(name, { vnetHdr: true, vnetHdrSize: HDR, offloads: 0, up: true });
    this.label = `tap ${this.tap.name}`;
  }

  get name(): string {
    return this.tap.name;
  }

  private loop: EventLoop | null = null;

  /** Starts reading on `loop` (every port's attach calls this; the first one counts). */
  attach(loop: EventLoop): void {
    if (this.loop !== null) return;
    this.loop = loop;
    this.watch = loop.watch(this.tap.fd, () => this.readable());
    this.sw.add(this);
  }

  /** A frame read and not yet taken by its destination (no buffers there): reading waits for it. */
  private held = false;
  private readonly retry = () => {
    if (!this.held || this.tap.fd < 0) return;
    if (!this.sw.input(this, this.frame)) return this.sw.waitForBuffers(this.retry);
    this.held = false;
    if (this.loop !== null && this.watch < 0) this.watch = this.loop.watch(this.tap.fd, () => this.readable());
    this.readable();
  };

  private readable(): void {
    if (this.held) return;
    const b = this.rbuf, f = this.frame;
    for (let i = 0; i < READ_BUDGET; i++) {
      let n: number;
      try {
        n = this.tap.read(b);
      } catch (e) {
        this.log.error(`net ${this.label}: ${e instanceof Error ? e.message : e}; no longer read`);
        this.close();
        return;
      }
      if (n === 0) return;
      if (n < HDR + 14) {
        this.counters.dropBad++;
        continue;
      }
      this.counters.fromPort++;
      f.flags = b[0]!;
      f.gsoType = b[1]!;
      f.hdrLen = b[2]! | (b[3]! << 8);
      f.gsoSize = b[4]! | (b[5]! << 8);
      f.csumStart = b[6]! | (b[7]! << 8);
      f.csumOffset = b[8]! | (b[9]! << 8);
      f.fromBytes(b, HDR, n - HDR);
      f.dst = macAt(b, HDR);
      f.src = macAt(b, HDR + 6);
      f.pair = 0;
      f.mayWait = true;
      if (!this.sw.input(this, f)) {
        // Backpressure instead of a drop: stop reading (the kernel queues, then drops at the
        // tap's txqueuelen) until the guest gives buffers.
        this.held = true;
        if (this.watch >= 0) this.loop?.unwatch(this.watch);
        this.watch = -1;
        this.sw.waitForBuffers(this.retry);
        return;
      }
    }
  }

  deliver(f: Frame): boolean {
    if (f.gsoType === 0 && f.len > this.mtu + 18) {
      this.counters.dropTooBig++;
      return true;
    }
    const b = this.wbuf;
    b[0] = f.flags;
    b[1] = f.gsoType;
    b[2] = f.hdrLen & 0xff; b[3] = f.hdrLen >> 8;
    b[4] = f.gsoSize & 0xff; b[5] = f.gsoSize >> 8;
    b[6] = f.csumStart & 0xff; b[7] = f.csumStart >> 8;
    b[8] = f.csumOffset & 0xff; b[9] = f.csumOffset >> 8;
    b[10] = 0; b[11] = 0;
    f.gather(b, HDR);
    let ok: boolean;
    try {
      ok = this.tap.write(b, HDR + f.len);
    } catch (e) {
      // EINVAL: the kernel refused the header (a bad offload request from a guest): that frame only.
      this.counters.dropBad++;
      return true;
    }
    if (ok) this.counters.toPort++;
    else this.counters.dropNoBuffers++;
    return true;
  }

  close(): void {
    this.held = false;
    if (this.watch >= 0) this.loop?.unwatch(this.watch);
    this.watch = -1;
    this.sw.remove(this);
    this.tap.close();
  }
}

/**
 * DeviceDriver: a driver for any virtio device over the real vhost-user
 * protocol, for device authors' tests (no VM). It negotiates, maps guest RAM
 * (a memfd), sets up split or packed rings, submits chains of readable and
 * writable buffers and awaits their completions, reads and writes the config
 * space, and records what the back-end sends on its channel
 * (CONFIG_CHANGE_MSG, IOTLB messages).
 *
 * Every wait is asynchronous (poll without blocking, then a short sleep), so
 * the device under test may run in the same process, on Bun's main loop.
 */
import * as sys from "../../ffi/sys.ts";
import { POLLIN } from "../../ffi/constants.ts";
import { FrontendError, VhostUserFrontend } from "../frontend/client.ts";
import { GuestRam } from "../frontend/guest_ram.ts";
import { PackedDriver } from "../frontend/packed_driver.ts";
import { SplitDriver, type VirtqDriver } from "../frontend/split_driver.ts";
import {
  bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../protocol/features.ts";
import { BackendReq, Req, requestName, type Message } from "../protocol/messages.ts";

export { FrontendError } from "../frontend/client.ts";

export interface DriverOptions {
  /** Queues to set up (default: all the device has, GET_QUEUE_NUM; else 1). */
  queues?: number;
  /** Ring size (default 64). Split rings need a power of 2. */
  queueSize?: number;
  /** Packed rings (VIRTIO_F_RING_PACKED) instead of split ones. */
  packed?: boolean;
  /** Negotiate EVENT_IDX when offered (default true). */
  eventIdx?: boolean;
  /** Device feature bits to accept (default: every device bit offered: below 24 and above 41). */
  features?: bigint;
  /** Guest RAM in MiB (default 16). */
  memMiB?: number;
  /** More protocol feature bits to accept when offered (e.g. DEVICE_STATE, INFLIGHT_SHMFD), beyond MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, BACKEND_REQ. */
  protocolFeatures?: bigint;
  /** Hand the back-end a channel for its requests (default true when BACKEND_REQ is offered). */
  backendChannel?: boolean;
  /** Deadline of each reply and of each completion awaited (default 5000 ms). */
  timeoutMs?: number;
}

/** A chain to make available: device-readable bytes and device-writable buffer sizes. */
export interface Chain {
  readable?: Uint8Array | Uint8Array[];
  writable?: number | number[];
}

/** A used buffer: the length the device wrote and those bytes (across the writable buffers). */
export interface Completion {
  len: number;
  data: Uint8Array;
}

/** Bits 24..41: transport features; the rest are the device's. */
const TRANSPORT = ((1n << 42n) - 1n) ^ ((1n << 24n) - 1n);
const PACKED_BASE = 0x80008000;

interface Posted {
  buffers: { gpa: number; len: number }[];
  resolve(c: Completion): void;
  reject(e: Error): void;
}

/**
 * @example
 * const drv = await DeviceDriver.connect(dev.socket, { packed: true });
 * const c = await drv.submit(0, { readable: new TextEncoder().encode("ping"), writable: 64 });
 * console.log(c.len, c.data);
 * drv.close();
 */
export class DeviceDriver {
  /** Features the device offered, and what was negotiated. */
  offered = 0n;
  features = 0n;
  protocolFeatures = 0n;
  /** CONFIG_CHANGE_MSG received on the back-end channel. */
  configChanges = 0;
  /** Every message the back-end sent on its channel, in order. */
  readonly backendMessages: Message[] = [];
  readonly vqs: VirtqDriver[] = [];
  readonly ram: GuestRam;
  readonly timeoutMs: number;
  private readonly posted: Map<number, Posted>[] = [];
  private closed = false;
  /** Guest RAM after the rings: buffers are allocated above it and all given back whenever none is in flight. */
  private buffersMark: number[] = [];
  /** GET_VRING_BASE answers of the last stop(), for resume(). */
  private stoppedBases: number[] = [];
  private inFlight = 0;

  private constructor(readonly fe: VhostUserFrontend, ram: GuestRam, timeoutMs: number) {
    this.ram = ram;
    this.timeoutMs = timeoutMs;
  }

  get queueCount(): number {
    return this.vqs.length;
  }

  /** Connects to the device on `socket` and sets it up (see DriverOptions). */
  static async connect(socket: string, o: DriverOptions = {}): Promise<DeviceDriver> {
    const timeoutMs = o.timeoutMs ?? 5000;
    const fe = await connectAsync(socket, timeoutMs);
    const ram = new GuestRam({ size: (o.memMiB ?? 16) << 20, name: "bunvhost-testing" });
    const d = new DeviceDriver(fe, ram, timeoutMs);
    try {
      await d.setUp(o);
    } catch (e) {
      d.close();
      throw e;
    }
    return d;
  }

  private async setUp(o: DriverOptions): Promise<void> {
    const fe = this.fe;
    this.offered = (await this.request({ request: Req.GET_FEATURES, flags: 0, fds: [] }, true))!.u64!;
    let queues = o.queues;
    if (this.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      const pf = (await this.request({ request: Req.GET_PROTOCOL_FEATURES, flags: 0, fds: [] }, true))!.u64!;
      const want = [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ...(o.backendChannel !== false ? [ProtocolFeature.BACKEND_REQ] : [])].reduce((m, b) => m | bit(b), o.protocolFeatures ?? 0n);
      this.protocolFeatures = pf & want;
      fe.setProtocolFeatures(this.protocolFeatures);
      if (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) fe.replyAck = true;
      if (this.protocolFeatures & bit(ProtocolFeature.MQ)) {
        const n = Number((await this.request({ request: Req.GET_QUEUE_NUM, flags: 0, fds: [] }, true))!.u64!);
        if (queues !== undefined && queues > n) throw new FrontendError("NOT_OFFERED", "queues", `asked ${queues}, the device has ${n}`);
        queues ??= n;
      }
    }
    queues ??= 1;
    await this.request({ request: Req.SET_OWNER, flags: 0, fds: [] });
    if (this.protocolFeatures & bit(ProtocolFeature.BACKEND_REQ)) {
      // Our end stays here; the other goes to the back-end with SET_BACKEND_REQ_FD.
      const [ours, theirs] = sys.socketpair(true);
      fe.adoptBackendChannel(ours);
      try {
        await this.request({ request: Req.SET_BACKEND_REQ_FD, flags: 0, fds: [theirs] });
      } finally {
        sys.closeQuiet(theirs);
      }
    }
    let want = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_RING_F_INDIRECT_DESC);
    if (o.eventIdx !== false) want |= bit(VIRTIO_RING_F_EVENT_IDX);
    if (o.packed) {
      if (!(this.offered & bit(VIRTIO_F_RING_PACKED))) throw new FrontendError("NOT_OFFERED", "VIRTIO_F_RING_PACKED", `offered 0x${this.offered.toString(16)}`);
      want |= bit(VIRTIO_F_RING_PACKED);
    }
    want |= o.features ?? (this.offered & ~TRANSPORT);
    this.features = this.offered & want;
    await this.request({ request: Req.SET_FEATURES, flags: 0, fds: [], u64: this.features });
    await this.request({ request: Req.SET_MEM_TABLE, flags: 0, fds: this.ram.fileOrder.map(() => this.ram.fd), regions: this.ram.memRegions() });
    const size = o.queueSize ?? 64;
    const eventIdx = (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
    for (let q = 0; q < queues; q++) {
      const vq: VirtqDriver = o.packed
        ? new PackedDriver(this.ram, { size, index: q, eventIdx, base: PACKED_BASE & 0xffff })
        : new SplitDriver(this.ram, { size, index: q, eventIdx });
      this.vqs.push(vq);
      this.posted.push(new Map());
      await this.startRing(q);
    }
    if (this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (let q = 0; q < queues; q++) await this.request({ request: Req.SET_VRING_ENABLE, flags: 0, fds: [], state: { index: q, num: 1 } });
    }
    this.buffersMark = this.ram.mark();
  }

  /** SET_VRING_NUM/BASE/ADDR/CALL/KICK for queue q, where our driver stands: the ring starts. */
  private async startRing(q: number): Promise<void> {
    const vq = this.vqs[q]!;
    await this.request({ request: Req.SET_VRING_NUM, flags: 0, fds: [], state: { index: q, num: vq.size } });
    // After stop(): where the device stopped (chains still posted, e.g. on a receive queue, are taken again).
    await this.request({ request: Req.SET_VRING_BASE, flags: 0, fds: [], state: { index: q, num: this.stoppedBases[q] ?? vq.vringBase } });
    await this.request({
      request: Req.SET_VRING_ADDR, flags: 0, fds: [],
      addr: { index: q, flags: 0, desc: this.ram.uva(vq.descGpa), used: this.ram.uva(vq.usedGpa), avail: this.ram.uva(vq.availGpa), log: 0 },
    });
    await this.request({ request: Req.SET_VRING_CALL, flags: 0, fds: [vq.callFd], u64: BigInt(q) });
    await this.request({ request: Req.SET_VRING_KICK, flags: 0, fds: [vq.kickFd], u64: BigInt(q) });
  }

  /**
   * Starts every ring again after stop() (as QEMU does at `cont`): from
   * where the driver stands, which is where the device stopped once every
   * chain was used and reaped.
   */
  async resume(): Promise<void> {
    for (let q = 0; q < this.vqs.length; q++) await this.startRing(q);
    this.stoppedBases = [];
  }

  /**
   * Keeps reaping for `ms` (e.g. to show that posted buffers stay unused);
   * returns how many chains were used meanwhile.
   * @example drv.post(0, { writable: 8 }); expect(await drv.pollFor(200)).toBe(0);
   */
  async pollFor(ms: number): Promise<number> {
    const before = this.inFlight;
    const deadline = performance.now() + ms;
    while (performance.now() < deadline) {
      this.poll();
      await Bun.sleep(2);
    }
    this.poll();
    return before - this.inFlight;
  }

  /**
   * Sends a request; returns its reply (`hasReply`), or waits for the
   * REPLY_ACK status (a non-zero one throws NACK). Never blocks the thread.
   */
  async request(m: Message, hasReply = false): Promise<Message | null> {
    const ack = !hasReply && this.fe.replyAck;
    this.fe.send(m, ack);
    if (!hasReply && !ack) return null;
    await this.readable(this.fe.fd, requestName(m.request));
    const r = this.fe.recvReply(m.request);
    if (ack && r.u64 !== 0n) throw new FrontendError("NACK", requestName(m.request), `status ${r.u64}`);
    return r;
  }

  /** Waits until `fd` is readable (or hung up), serving the back-end channel meanwhile. */
  private async readable(fd: number, what: string): Promise<void> {
    const deadline = performance.now() + this.timeoutMs;
    for (;;) {
      this.serviceBackend();
      if (sys.poll1(fd, POLLIN, 0) !== 0) return;
      if (performance.now() > deadline) throw new FrontendError("TIMEOUT", what, `no reply within ${this.timeoutMs} ms`);
      await Bun.sleep(1);
    }
  }

  /** Takes what the back-end sent on its channel (none of our messages need a reply). */
  private serviceBackend(): void {
    if (this.fe.backendFd < 0) return;
    while (sys.poll1(this.fe.backendFd, POLLIN, 0) !== 0) {
      let m: Message | null;
      try {
        // Readable already: the whole message is there or on its way (the back-end sends it at once).
        m = this.fe.recvBackend(100);
      } catch {
        this.fe.closeBackendChannel();
        return;
      }
      if (m === null) return;
      for (const fd of m.fds) sys.closeQuiet(fd);
      this.backendMessages.push(m);
      if (m.request === BackendReq.CONFIG_CHANGE_MSG) this.configChanges++;
    }
  }

  /**
   * Makes a chain available on `queue` and kicks; the promise resolves when
   * the device has used it. Leave it pending to keep buffers on a receive
   * queue (input events, console input) and await it later.
   * @example const ev = drv.post(0, { writable: 8 }); inject(); const { data } = await ev;
   */
  post(queue: number, chain: Chain): Promise<Completion> {
    const vq = this.vqs[queue];
    if (!vq) throw new RangeError(`post: no queue ${queue} (${this.vqs.length} set up)`);
    const readable = chain.readable === undefined ? [] : Array.isArray(chain.readable) ? chain.readable : [chain.readable];
    const writable = chain.writable === undefined ? [] : Array.isArray(chain.writable) ? chain.writable : [chain.writable];
    const n = readable.length + writable.length;
    if (n === 0) throw new RangeError("post: a chain needs at least one buffer");
    if (!vq.canAdd(n)) throw new FrontendError("QUEUE_FULL", `queue ${queue}`, `no room for ${n} descriptors`);
    const buffers: { gpa: number; len: number }[] = [];
    vq.begin();
    for (const b of readable) {
      const gpa = this.ram.alloc(Math.max(b.length, 1));
      this.ram.write(gpa, b);
      vq.add(gpa, b.length, false);
    }
    for (const len of writable) {
      const gpa = this.ram.alloc(Math.max(len, 1));
      this.ram.fill(gpa, len, 0);
      vq.add(gpa, len, true);
      buffers.push({ gpa, len });
    }
    const head = vq.commit();
    this.inFlight++;
    vq.kick();
    const p = new Promise<Completion>((resolve, reject) => this.posted[queue]!.set(head, { buffers, resolve, reject }));
    // A chain left on a receive queue when the driver closes rejects: not an error nobody handled.
    p.catch(() => {});
    return p;
  }

  /** post() and await the completion, with the driver's deadline. */
  async submit(queue: number, chain: Chain): Promise<Completion> {
    const p = this.post(queue, chain);
    await this.until(() => this.reapAll(queue) && false, `queue ${queue}: completion`, () => p);
    return p;
  }

  /** Submits every chain first (one batch), then awaits them all. */
  async submitAll(queue: number, chains: Chain[]): Promise<Completion[]> {
    const ps = chains.map((c) => this.post(queue, c));
    await this.until(() => false, `queue ${queue}: ${chains.length} completions`, () => Promise.all(ps));
    return Promise.all(ps);
  }

  /** Reaps every used buffer of every queue (settling their promises). */
  poll(): void {
    this.serviceBackend();
    for (let q = 0; q < this.vqs.length; q++) this.reapAll(q);
  }

  private reapAll(q: number): boolean {
    const vq = this.vqs[q]!;
    let any = false;
    while (vq.reap()) {
      any = true;
      const p = this.posted[q]!.get(vq.usedId);
      if (!p) continue;
      this.posted[q]!.delete(vq.usedId);
      this.inFlight--;
      const data = new Uint8Array(Math.min(vq.usedLen, p.buffers.reduce((s, b) => s + b.len, 0)));
      let off = 0;
      for (const b of p.buffers) {
        if (off >= data.length) break;
        const n = Math.min(b.len, data.length - off);
        data.set(this.ram.view(b.gpa, n), off);
        off += n;
      }
      p.resolve({ len: vq.usedLen, data });
    }
    if (any && this.inFlight === 0) this.ram.release(this.buffersMark);
    return any;
  }

  /**
   * Polls until `settled()` resolves (or `done()` says so), rejecting with
   * TIMEOUT after the deadline. Used buffers of every queue are reaped meanwhile.
   */
  private async until(done: () => boolean, what: string, settled?: () => Promise<unknown>): Promise<void> {
    let finished = false;
    const s = settled?.().then(() => { finished = true; }, () => { finished = true; });
    const deadline = performance.now() + this.timeoutMs;
    while (!finished) {
      this.poll();
      if (done()) return;
      if (finished) break;
      if (!this.fe.isOpen || !this.fe.alive()) throw new FrontendError("DISCONNECTED", what, "the back-end closed the connection");
      if (performance.now() > deadline) throw new FrontendError("TIMEOUT", what, `nothing used within ${this.timeoutMs} ms`);
      await Bun.sleep(1);
    }
    await s;
  }

  /**
   * Awaits a posted chain (e.g. a receive buffer) with a deadline of its own.
   * @example const c = await drv.wait(drv.post(0, { writable: 8 }), 2000);
   */
  async wait<T>(p: Promise<T>, timeoutMs = this.timeoutMs): Promise<T> {
    let finished = false;
    const s = p.then((v) => { finished = true; return v; });
    s.catch(() => {}); // a chain rejected later (close) after a timeout here is not unhandled
    const deadline = performance.now() + timeoutMs;
    while (!finished) {
      this.poll();
      if (finished) break;
      if (performance.now() > deadline) throw new FrontendError("TIMEOUT", "wait", `not used within ${timeoutMs} ms`);
      await Bun.sleep(1);
    }
    return s;
  }

  /** GET_CONFIG: `size` bytes of the config space at `offset`. */
  async config(offset = 0, size = 256 - offset): Promise<Uint8Array> {
    const r = await this.request({ request: Req.GET_CONFIG, flags: 0, fds: [], config: { offset, size, flags: 0, data: new Uint8Array(size) } }, true);
    if (!r?.config) throw new FrontendError("CONFIG", "GET_CONFIG", `refused offset ${offset} size ${size}`);
    return r.config.data;
  }

  /** SET_CONFIG: writes `data` at `offset` of the config space. */
  async setConfig(offset: number, data: Uint8Array): Promise<void> {
    await this.request({ request: Req.SET_CONFIG, flags: 0, fds: [], config: { offset, size: data.length, flags: 0, data } });
  }

  /** Waits for the next CONFIG_CHANGE_MSG (counted in `configChanges`). */
  async waitConfigChange(timeoutMs = this.timeoutMs): Promise<void> {
    const before = this.configChanges;
    const deadline = performance.now() + timeoutMs;
    while (this.configChanges === before) {
      this.serviceBackend();
      if (this.configChanges !== before) break;
      if (performance.now() > deadline) throw new FrontendError("TIMEOUT", "CONFIG_CHANGE_MSG", `none within ${timeoutMs} ms`);
      await Bun.sleep(1);
    }
  }

  /** GET_VRING_BASE on every queue (the device stops them); returns the bases. */
  async stop(): Promise<number[]> {
    const bases: number[] = [];
    for (let q = 0; q < this.vqs.length; q++) {
      const r = await this.request({ request: Req.GET_VRING_BASE, flags: 0, fds: [], state: { index: q, num: 0 } }, true);
      bases.push(r!.state!.num);
    }
    this.poll();
    this.stoppedBases = bases;
    return bases;
  }

  /** Closes the connection, the rings' eventfds and guest RAM; pending chains reject with DISCONNECTED. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.fe.close();
    for (const vq of this.vqs) vq.close();
    this.ram.close();
    for (const m of this.posted) {
      for (const p of m.values()) p.reject(new FrontendError("DISCONNECTED", "close", "the driver was closed"));
      m.clear();
    }
  }
}

/** Connects without blocking the thread (a server in this process must get to accept). */
async function connectAsync(path: string, timeoutMs: number): Promise<VhostUserFrontend> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return VhostUserFrontend.connect(path, { connectTimeoutMs: 0, timeoutMs });
    } catch (e) {
      if (performance.now() > deadline) throw e;
      await Bun.sleep(5);
    }
  }
}

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
  VIRTIO_RING_F_INDIRECT_DESC, TRANSPORT_FEATURES,
} from "../protocol/features.ts";
import {
  BackendReq, DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, DEVICE_STATE_SAVE, Req, requestName, type Message,
} from "../protocol/messages.ts";
import type { RunningDevice } from "./start.ts";

export { FrontendError } from "../frontend/client.ts";

/**
 * How DeviceDriver.connect sets the device up; every field is optional.
 * @example
 * const drv = await DeviceDriver.connect(dev, { packed: true, queues: 1, queueSize: 16, eventIdx: false, timeoutMs: 1000 });
 */
export interface DriverOptions {
  /** Queues to set up (default: all the device has, GET_QUEUE_NUM; else 1). */
  queues?: number;
  /**
   * Ring size (default 64, or the device's largest when that is smaller and
   * known: a device served in this process). Split rings need a power of 2.
   */
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

/**
 * A chain to make available: device-readable bytes (one descriptor per
 * array) then device-writable buffers of these sizes (one descriptor each).
 * Zero-length buffers are sent as they are (a device must refuse them).
 * @example
 * const chain: Chain = { readable: [header, payload], writable: [512, 1] };
 */
export interface Chain {
  readable?: Uint8Array | Uint8Array[];
  writable?: number | number[];
}

/**
 * A used chain: the used length the device reported and that many bytes
 * from the start of its writable buffers, concatenated (never more than
 * they hold). Writable buffers start zeroed.
 * @example
 * const { len, data } = await drv.submit(0, { writable: [2, 6] }); // data.length === Math.min(len, 8)
 */
export interface Completion {
  len: number;
  data: Uint8Array;
}

const PACKED_BASE = 0x80008000;

interface Posted {
  /** Every buffer of the chain, given back when it is used; the writable ones are read first. */
  buffers: { gpa: number; len: number; writable: boolean }[];
  resolve(c: Completion): void;
  reject(e: Error): void;
}

const MIN_BUFFER = 64;

/**
 * Chain buffers in guest RAM: power-of-2 size classes, each with a free
 * list, so a buffer a receive queue keeps for a long time pins nothing else.
 */
class BufferPool {
  private readonly free = new Map<number, number[]>();

  constructor(private readonly ram: GuestRam, private readonly memMiB: number) {}

  private static sizeOf(len: number): number {
    return Math.max(MIN_BUFFER, 2 ** Math.ceil(Math.log2(Math.max(len, 1))));
  }

  alloc(len: number): number {
    const size = BufferPool.sizeOf(len);
    const gpa = this.free.get(size)?.pop();
    if (gpa !== undefined) return gpa;
    try {
      return this.ram.alloc(size, 16);
    } catch (e) {
      throw new RangeError(`post: no room for a ${len}-byte buffer in ${this.memMiB} MiB of guest RAM (memMiB option)`, { cause: e });
    }
  }

  release(gpa: number, len: number): void {
    const size = BufferPool.sizeOf(len);
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    list.push(gpa);
  }
}

/**
 * The driver side of any virtio device over vhost-user: set-up, chains,
 * config space, the back-end channel. Errors are FrontendError (TIMEOUT,
 * DISCONNECTED, NACK, NOT_OFFERED, QUEUE_FULL, BAD_USED, CONFIG).
 * @example
 * const dev = await startDevice(myDevice);
 * const drv = await DeviceDriver.connect(dev, { packed: true });
 * const c = await drv.submit(0, { readable: new TextEncoder().encode("ping"), writable: 64 });
 * expect(new TextDecoder().decode(c.data)).toBe("ping");
 * drv.close();
 * await dev.stop();
 */
export class DeviceDriver {
  /**
   * Features the device offered (GET_FEATURES), what was negotiated
   * (SET_FEATURES), and the protocol features in use.
   * @example expect(drv.features & (1n << 2n)).toBe(1n << 2n); // the device's bit 2 was accepted
   */
  offered = 0n;
  features = 0n;
  protocolFeatures = 0n;
  /**
   * CONFIG_CHANGE_MSG received on the back-end channel so far.
   * @example const before = drv.configChanges; await drv.waitConfigChange(); // now before + 1 or more
   */
  configChanges = 0;
  /**
   * Every message the back-end sent on its channel, in order (IOTLB misses,
   * config changes, ...); their fds are closed.
   * @example expect(drv.backendMessages.map((m) => m.request)).toEqual([BackendReq.CONFIG_CHANGE_MSG]);
   */
  readonly backendMessages: Message[] = [];
  /** The ring drivers, one per queue (SplitDriver or PackedDriver), for hand-made chains (pushRaw). */
  readonly vqs: VirtqDriver[] = [];
  /** Guest RAM (a memfd shared with the back-end). */
  readonly ram: GuestRam;
  readonly timeoutMs: number;
  private readonly posted: Map<number, Posted>[] = [];
  private closed = false;
  private readonly pool: BufferPool;
  /** The request queue (one exchange at a time) and how many wait for a reply now. */
  private requests: Promise<void> = Promise.resolve();
  private replying = 0;
  private pumpTimer: ReturnType<typeof setTimeout> | null = null;
  /** GET_VRING_BASE answers of the last stop(), for resume(). */
  private stoppedBases: number[] = [];
  private inFlight = 0;

  private constructor(readonly fe: VhostUserFrontend, ram: GuestRam, timeoutMs: number, memMiB: number) {
    this.ram = ram;
    this.timeoutMs = timeoutMs;
    this.pool = new BufferPool(ram, memMiB);
  }

  /** Queues set up (all the device has unless the `queues` option said fewer). */
  get queueCount(): number {
    return this.vqs.length;
  }

  /**
   * Connects to the device on `target` (a socket path, or what startDevice
   * returned) and sets it up (see DriverOptions).
   * @example
   * const drv = await DeviceDriver.connect(dev);                    // dev = await startDevice(...)
   * const raw = await DeviceDriver.connect("/dev/shm/x/vhost.sock", { queues: 1 });
   */
  static async connect(target: string | RunningDevice, o: DriverOptions = {}): Promise<DeviceDriver> {
    const timeoutMs = o.timeoutMs ?? 5000;
    const memMiB = o.memMiB ?? 16;
    // In-process, the device's largest ring is known: the default size never exceeds it.
    const max = typeof target === "string" ? undefined : target.served?.server.device.queueSize;
    const queueSize = o.queueSize ?? Math.min(64, max ?? 64);
    if (max !== undefined && queueSize > max) throw new RangeError(`queueSize ${queueSize}: the device takes at most ${max}`);
    const fe = await connectAsync(typeof target === "string" ? target : target.socket, timeoutMs);
    const ram = new GuestRam({ size: memMiB << 20, name: "bunvhost-testing" });
    const d = new DeviceDriver(fe, ram, timeoutMs, memMiB);
    try {
      await d.setUp({ ...o, queueSize });
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
    want |= o.features ?? (this.offered & ~TRANSPORT_FEATURES);
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
   * @example await drv.stop(); loadState(drv); await drv.resume(); await drv.submit(0, chain);
   */
  async resume(): Promise<void> {
    for (let q = 0; q < this.vqs.length; q++) await this.startRing(q);
    this.stoppedBases = [];
  }

  /**
   * DEVICE_STATE, save: the bytes the device's saveState() gave, read to
   * EOF from a pipe handed over with SET_DEVICE_STATE_FD. Needs the rings
   * stopped (stop()) and `protocolFeatures: bit(ProtocolFeature.DEVICE_STATE)`;
   * throws NOT_OFFERED without it, NACK when the back-end refuses or
   * CHECK_DEVICE_STATE reports a failure, TIMEOUT without EOF.
   * @example await drv.stop(); const state = await drv.saveState(); await drv.resume();
   */
  async saveState(): Promise<Uint8Array> {
    const [r, w] = sys.pipe();
    let from = r;
    try {
      const theirs = await this.startStateTransfer(DEVICE_STATE_SAVE, w);
      if (theirs >= 0) {
        sys.closeQuiet(r);
        from = theirs;
      }
      const chunks: Uint8Array[] = [];
      const buf = new Uint8Array(65536);
      const deadline = performance.now() + this.timeoutMs;
      for (;;) {
        const n = sys.read(from, buf);
        if (n === 0) break;
        if (n !== null) chunks.push(buf.slice(0, n));
        else if (performance.now() > deadline) throw new FrontendError("TIMEOUT", "DEVICE_STATE save", `no EOF within ${this.timeoutMs} ms`);
        else await Bun.sleep(1);
      }
      const check = await this.checkDeviceState();
      if (check !== 0) throw new FrontendError("NACK", "CHECK_DEVICE_STATE", `status ${check}: the device could not save its state`);
      return Buffer.concat(chunks);
    } finally {
      sys.closeQuiet(from);
    }
  }

  /**
   * DEVICE_STATE, load: writes `state` to a pipe handed over with
   * SET_DEVICE_STATE_FD (rings stopped) and returns CHECK_DEVICE_STATE: 0
   * when the device (every thread's instance) took it, non-zero when its
   * loadState() refused it.
   * @example await drv.stop(); expect(await drv.loadState(saved)).toBe(0); await drv.resume();
   */
  async loadState(state: Uint8Array): Promise<number> {
    const [r, w] = sys.pipe();
    let to = w;
    try {
      const theirs = await this.startStateTransfer(DEVICE_STATE_LOAD, r);
      if (theirs >= 0) {
        sys.closeQuiet(w);
        to = theirs;
      }
      const deadline = performance.now() + this.timeoutMs;
      for (let off = 0; off < state.length;) {
        const n = sys.write(to, state.subarray(off));
        if (n !== null) off += n;
        else if (performance.now() > deadline) throw new FrontendError("TIMEOUT", "DEVICE_STATE load", `the back-end read ${off} of ${state.length} bytes`);
        else await Bun.sleep(1);
      }
    } finally {
      // EOF tells the back-end the state is whole.
      sys.closeQuiet(to);
    }
    return this.checkDeviceState();
  }

  /** SET_DEVICE_STATE_FD with our end of the pipe (closed here); returns the fd the back-end gave instead, or -1. */
  private async startStateTransfer(direction: number, fd: number): Promise<number> {
    try {
      if ((this.protocolFeatures & bit(ProtocolFeature.DEVICE_STATE)) === 0n) {
        throw new FrontendError("NOT_OFFERED", "DEVICE_STATE", "connect with protocolFeatures: bit(ProtocolFeature.DEVICE_STATE)");
      }
      const r = (await this.request({ request: Req.SET_DEVICE_STATE_FD, flags: 0, fds: [fd], deviceState: { direction, phase: DEVICE_STATE_PHASE_STOPPED } }, true))!;
      const v = Number(r.u64! & 0x1ffn);
      // Bit 8: no fd in the reply; otherwise the back-end wants its own fd used.
      const theirs = (v & 0x100) === 0 && r.fds.length > 0 ? r.fds.shift()! : -1;
      for (const f of r.fds) sys.closeQuiet(f);
      if ((v & 0xff) !== 0) {
        sys.closeQuiet(theirs);
        throw new FrontendError("NACK", "SET_DEVICE_STATE_FD", `status ${v & 0xff}`);
      }
      return theirs;
    } finally {
      sys.closeQuiet(fd);
    }
  }

  private async checkDeviceState(): Promise<number> {
    return Number((await this.request({ request: Req.CHECK_DEVICE_STATE, flags: 0, fds: [] }, true))!.u64!);
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
   * REPLY_ACK status (a non-zero one throws NACK). Never blocks the thread;
   * requests made concurrently go out one after the other.
   * @example
   * const r = await drv.request({ request: Req.GET_STATUS, flags: 0, fds: [] }, true); // r.u64
   */
  async request(m: Message, hasReply = false): Promise<Message | null> {
    const turn = this.requests.then(() => this.exchange(m, hasReply));
    this.requests = turn.then(() => {}, () => {});
    return turn;
  }

  /** One request and its reply; while it waits, nobody else reads the socket (see hungUp). */
  private async exchange(m: Message, hasReply: boolean): Promise<Message | null> {
    const ack = !hasReply && this.fe.replyAck;
    this.replying++;
    try {
      this.fe.send(m, ack);
      if (!hasReply && !ack) return null;
      await this.readable(this.fe.fd, requestName(m.request));
      const r = this.fe.recvReply(m.request);
      if (ack && r.u64 !== 0n) throw new FrontendError("NACK", requestName(m.request), `status ${r.u64}`);
      return r;
    } finally {
      this.replying--;
    }
  }

  /**
   * True when the back-end has closed the connection. Not asked while a
   * request waits for its reply: the check reads (and drops) what arrives.
   */
  private hungUp(): boolean {
    if (!this.fe.isOpen) return true;
    return this.replying === 0 && !this.fe.alive();
  }

  /**
   * While chains are in flight, reaps every few milliseconds even when
   * nobody waits (so `await drv.post(...)` settles by itself), and fails
   * them all with DISCONNECTED when the back-end hangs up.
   */
  private schedulePump(): void {
    if (this.pumpTimer !== null || this.closed) return;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null;
      if (this.closed) return;
      this.poll();
      if (this.inFlight > 0 && this.hungUp()) this.failPosted("the back-end closed the connection");
      if (this.inFlight > 0) this.schedulePump();
    }, 2);
    // A test that awaits nothing else is not kept alive by the pump.
    this.pumpTimer.unref();
  }

  /** Rejects every chain in flight (they will never be used). */
  private failPosted(why: string): void {
    for (const m of this.posted) {
      for (const p of m.values()) p.reject(new FrontendError("DISCONNECTED", "posted chain", why));
      m.clear();
    }
    this.inFlight = 0;
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
   * the device has used it (with no deadline: `drv.wait(p, ms)` gives one),
   * and rejects with DISCONNECTED when the back-end hangs up or the driver
   * closes. Leave it pending to keep buffers on a receive queue (input
   * events, console input) and await it later.
   * @example const ev = drv.post(0, { writable: 8 }); inject(); const { data } = await drv.wait(ev, 1000);
   */
  post(queue: number, chain: Chain): Promise<Completion> {
    const vq = this.vqs[queue];
    if (!vq) throw new RangeError(`post: no queue ${queue} (${this.vqs.length} set up)`);
    const readable = chain.readable === undefined ? [] : Array.isArray(chain.readable) ? chain.readable : [chain.readable];
    const writable = chain.writable === undefined ? [] : Array.isArray(chain.writable) ? chain.writable : [chain.writable];
    const n = readable.length + writable.length;
    if (n === 0) throw new RangeError("post: a chain needs at least one buffer");
    if (!vq.canAdd(n)) throw new FrontendError("QUEUE_FULL", `queue ${queue}`, `no room for ${n} descriptors`);
    const buffers: Posted["buffers"] = [];
    let head: number;
    try {
      for (const len of writable) {
        const gpa = this.pool.alloc(len);
        buffers.push({ gpa, len, writable: true });
        this.ram.fill(gpa, len, 0);
      }
      for (const b of readable) {
        const gpa = this.pool.alloc(b.length);
        buffers.push({ gpa, len: b.length, writable: false });
        this.ram.write(gpa, b);
      }
      vq.begin();
      // Readable first (§2.7.4.2: no device-readable descriptor after a device-writable one).
      for (let i = writable.length; i < buffers.length; i++) vq.add(buffers[i]!.gpa, buffers[i]!.len, false);
      for (let i = 0; i < writable.length; i++) vq.add(buffers[i]!.gpa, buffers[i]!.len, true);
      head = vq.commit();
    } catch (e) {
      vq.abort();
      for (const b of buffers) this.pool.release(b.gpa, b.len);
      throw e;
    }
    this.inFlight++;
    vq.kick();
    const p = new Promise<Completion>((resolve, reject) => this.posted[queue]!.set(head, { buffers, resolve, reject }));
    // A chain left on a receive queue when the driver closes rejects: not an error nobody handled.
    p.catch(() => {});
    this.schedulePump();
    return p;
  }

  /**
   * post() and await the completion, with the driver's deadline (TIMEOUT;
   * the chain stays in flight and may still be used later).
   * @example const { len, data } = await drv.submit(0, { readable: request, writable: 2 });
   */
  async submit(queue: number, chain: Chain): Promise<Completion> {
    const p = this.post(queue, chain);
    await this.until(() => this.reapAll(queue) && false, `queue ${queue}: completion`, () => p);
    return p;
  }

  /**
   * Submits every chain first (one batch, one kick each), then awaits them all.
   * @example const cs = await drv.submitAll(0, lines.map((g) => ({ readable: msg(g), writable: 2 })));
   */
  async submitAll(queue: number, chains: Chain[]): Promise<Completion[]> {
    const ps = chains.map((c) => this.post(queue, c));
    await this.until(() => false, `queue ${queue}: ${chains.length} completions`, () => Promise.all(ps));
    return Promise.all(ps);
  }

  /**
   * Reaps every used chain of every queue (settling their promises) and
   * takes the back-end channel's messages; never waits.
   * @example drv.post(0, { writable: 4 }).then(onEvent); setInterval(() => drv.poll(), 5);
   */
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
      let room = 0;
      for (const b of p.buffers) if (b.writable) room += b.len;
      const data = new Uint8Array(Math.min(vq.usedLen, room));
      let off = 0;
      for (const b of p.buffers) {
        if (b.writable && off < data.length) {
          const n = Math.min(b.len, data.length - off);
          data.set(this.ram.view(b.gpa, n), off);
          off += n;
        }
        this.pool.release(b.gpa, b.len);
      }
      p.resolve({ len: vq.usedLen, data });
    }
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
      if (this.hungUp()) throw new FrontendError("DISCONNECTED", what, "the back-end closed the connection");
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
    const s = p.then((v) => { finished = true; return v; }, (e) => { finished = true; throw e; });
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

  /**
   * GET_CONFIG: `size` bytes of the config space at `offset` (default: from
   * `offset` to 256; bytes past the device's config space read 0).
   * @example const ngpio = new DataView((await drv.config(0, 2)).buffer).getUint16(0, true);
   */
  async config(offset = 0, size = 256 - offset): Promise<Uint8Array> {
    const r = await this.request({ request: Req.GET_CONFIG, flags: 0, fds: [], config: { offset, size, flags: 0, data: new Uint8Array(size) } }, true);
    if (!r?.config) throw new FrontendError("CONFIG", "GET_CONFIG", `refused offset ${offset} size ${size}`);
    return r.config.data;
  }

  /**
   * SET_CONFIG: writes `data` at `offset` of the config space (with
   * REPLY_ACK, a device without setConfig or a write past its space is NACK).
   * @example await drv.setConfig(8, new Uint8Array([0x41, 0, 0, 0]));
   */
  async setConfig(offset: number, data: Uint8Array): Promise<void> {
    await this.request({ request: Req.SET_CONFIG, flags: 0, fds: [], config: { offset, size: data.length, flags: 0, data } });
  }

  /**
   * Waits for the next CONFIG_CHANGE_MSG (counted in `configChanges`); TIMEOUT when none comes.
   * @example await dev.served!.server.refreshDevice(); await drv.waitConfigChange(1000);
   */
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

  /**
   * GET_VRING_BASE on every queue (the device stops them, finishing what it
   * took); returns the bases. `resume()` starts them again.
   * @example const [base0] = await drv.stop(); // split: the next avail index
   */
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

  /**
   * Closes the connection, the rings' eventfds and guest RAM; chains still
   * in flight reject with DISCONNECTED. Idempotent.
   * @example try { await drv.submit(0, chain); } finally { drv.close(); }
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.pumpTimer !== null) clearTimeout(this.pumpTimer);
    this.pumpTimer = null;
    this.fe.close();
    for (const vq of this.vqs) vq.close();
    this.ram.close();
    this.failPosted("the driver was closed");
  }

  /** `await using drv = await DeviceDriver.connect(...)` closes it at the end of the block. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
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

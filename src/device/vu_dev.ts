/**
 * The vhost-user device state machine (the VuDev of libvhost-user).
 *
 * Theory of operation: the connection decodes each front-end message and
 * hands it to `handle`, one at a time, awaiting the result. Handlers change
 * the negotiated state (features, memory table, vrings, config) and return a
 * reply payload for requests that have one. Two kinds of failure:
 *  - `Refused`: a well-formed request we cannot honour (an unsupported
 *    config write, a feature we did not offer...). The connection lives on;
 *    with REPLY_ACK the front-end sees a non-zero status.
 *  - ProtocolError / GuestMemoryError: the front-end broke the protocol; the
 *    connection ends (the caller tears everything down).
 * Anything touching guest memory first quiesces the rings (no request in
 * flight) and drops their views, because a view over unmapped memory would
 * crash the process.
 */
import * as sys from "../../ffi/sys.ts";
import { GuestMemoryError, ProtocolError, type VirtqError } from "../errors.ts";
import { GuestMemory } from "../memory/guest_memory.ts";
import { bit, ProtocolFeature, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
  VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_RESET,
  VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../protocol/features.ts";
import { BackendReq, HDR_SIZE, MAX_CONFIG_SIZE, Req, requestName, type Message } from "../protocol/messages.ts";
import { encodeBackendMessage } from "../protocol/encode.ts";
import { describeBackendMessage } from "../protocol/describe.ts";
import type { Device, Request } from "./api.ts";
import type { Logger } from "./log.ts";
import type { EventLoop } from "./loop.ts";
import { Vring, type VringHost } from "./vring.ts";
import { RemoteVring, type RingChannel } from "./remote_vring.ts";
import type { RingCtl } from "./ring_ctl.ts";
import { INFLIGHT_ALIGN, inflightQueueSize } from "../virtq/inflight.ts";
import { DirtyLog } from "../virtq/dirty_log.ts";
import { MAP_SHARED, POLLOUT, PROT_READ, PROT_WRITE } from "../../ffi/constants.ts";
import { Iotlb, IotlbEntryError, permName } from "../memory/iotlb.ts";
import { sendIotlbReport } from "./iotlb_report.ts";
import { VIRTIO_F_ACCESS_PLATFORM } from "../protocol/features.ts";
import { IOTLB_UPDATE, type IotlbMsg } from "../protocol/messages.ts";
import { pipeLikeError, StateTransfer } from "./device_state.ts";
import { backendRequestName, DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, DEVICE_STATE_SAVE } from "../protocol/messages.ts";

/** A device callback failed (the device's bug, not the front-end's): the connection ends, the server goes on. */
export class DeviceError extends Error {
  override name = "DeviceError";
}

/** A well-formed request that the device does not honour: REPLY_ACK status 1, connection kept. */
export class Refused extends Error {
  override name = "Refused";
}

/** Memory slots offered with CONFIGURE_MEM_SLOTS (the limit QEMU and rust-vmm use for vhost-user). */
export const MAX_MEM_SLOTS = 509;

/** Transport and ring features the framework provides for every device. */
export const FRAMEWORK_FEATURES =
  bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_RING_F_INDIRECT_DESC) |
  bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_F_RING_PACKED) | bit(VHOST_F_LOG_ALL) | bit(VIRTIO_F_ACCESS_PLATFORM) |
  // IN_ORDER: every ring holds completions back until their turn (InOrderHold), in any thread.
  // NOTIFICATION_DATA: the data of a driver notification is a hint (VIRTIO 1.2 §2.9: the device
  // may use it to find the buffers); over vhost-user it is lost anyway (eventfd: a counter;
  // VRING_KICK: `num` reserved), so rings are always read from memory and the bit costs nothing.
  // RING_RESET: GET_VRING_BASE stops one ring (its requests complete) while the others run,
  // and SET_VRING_NUM/ADDR/BASE/KICK restart it, with any size, from a clean state.
  bit(VIRTIO_F_IN_ORDER) | bit(VIRTIO_F_NOTIFICATION_DATA) | bit(VIRTIO_F_RING_RESET);

export const PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.STATUS) |
  bit(ProtocolFeature.INFLIGHT_SHMFD) | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.BACKEND_REQ) |
  bit(ProtocolFeature.INBAND_NOTIFICATIONS) | bit(ProtocolFeature.DEVICE_STATE);

/** What we offer this device: the common set, plus the net requests when it has their hooks. */
export function protocolFeaturesOf(d: Device): bigint {
  let f = PROTOCOL_FEATURES;
  if (d.setMtu) f |= bit(ProtocolFeature.NET_MTU);
  if (d.announce) f |= bit(ProtocolFeature.RARP);
  return f;
}

/** How long CHECK_DEVICE_STATE waits for a transfer still draining. */
const CHECK_WAIT_MS = 3000;

/** Largest inflight buffer we map for a front-end (256 queues of 32768 entries fit). */
const MAX_INFLIGHT_BYTES = 256 * inflightQueueSize(32768, true);

export interface VuDevOptions {
  log: Logger;
  loop: EventLoop;
  /** Called once when a guest breaks a ring: the server ends the connection. */
  onBroken?: (e: VirtqError) => void;
  /** I/O threads, and for each queue the index of the thread serving it (-1 or absent: the main loop). */
  threads?: RingChannel[];
  queueThread?: number[];
  /** --trace: log what we send on the back-end channel ("=>"), as the connection logs the main channel. */
  trace?: boolean;
}

export class VuDev {
  readonly mem = new GuestMemory();
  readonly vrings: RingCtl[];
  readonly log: Logger;
  features = 0n;
  protocolFeatures = 0n;
  status = 0;
  owner = false;
  broken: VirtqError | null = null;
  inflight = 0;
  private featuresSet = false;

  /** The device serving this front-end (replaced by a hot reload, see swapDevice). */
  device: Device;

  constructor(device: Device, private readonly opts: VuDevOptions) {
    this.device = device;
    this.log = opts.log;
    const self = this;
    this.host = {
      get device() { return self.device; },
      mem: this.mem, log: opts.log,
      broken: (e: VirtqError) => this.setBroken(e),
      inflightChanged: (d: number) => { this.inflight += d; },
      iotlbReport: (type: number, iova: number, perm: number) => this.iotlbReport(type, iova, perm),
    };
    this.vrings = Array.from({ length: device.queues }, (_, i) => this.makeRing(i, opts.queueThread?.[i] ?? -1));
  }

  private readonly host: VringHost;

  /** A ring on the main loop (thread -1) or on I/O thread `thread`. */
  private makeRing(i: number, thread: number): RingCtl {
    const ch = thread >= 0 ? this.opts.threads?.[thread] : undefined;
    if (thread >= 0 && !ch) throw new RangeError(`queue ${i}: no I/O thread ${thread}`);
    return ch ? new RemoteVring(i, ch, this.mem, (e) => this.setBroken(e)) : new Vring(i, this.host, this.opts.loop);
  }

  /**
   * Runs a device callback: a throw is the device's bug, reported as a
   * DeviceError naming the device and the callback (the connection ends),
   * or refused (REPLY_ACK status 1) when `refuse` says the request may fail.
   */
  private deviceCall<T>(what: string, f: () => T, refuse = false): T {
    try {
      return f();
    } catch (e) {
      const msg = `device ${this.device.name}: ${what}() threw: ${e instanceof Error ? e.message : e}`;
      if (refuse) throw new Refused(msg);
      this.log.error(`${msg}${e instanceof Error && e.stack ? `\n${e.stack}` : ""}`);
      throw new DeviceError(msg, { cause: e });
    }
  }

  /** Queues.take() of the main thread's device instance: rings served on the main loop only. */
  takeLocal(i: number): Request | null {
    const v = this.vrings[i];
    return v instanceof Vring ? v.take() : null;
  }

  giveBackLocal(r: Request): boolean {
    const v = this.vrings[r.queue];
    return v instanceof Vring ? v.giveBack(r) : false;
  }

  /** The I/O threads serving at least one ring. */
  private channels(): RingChannel[] {
    const set = new Set<RingChannel>();
    for (const t of this.opts.threads ?? []) set.add(t);
    return [...set];
  }

  /**
   * Moves queue `i` to I/O thread `thread` (-1: the main loop), safely under
   * load: the ring stops taking chains on its old loop, its in-flight
   * requests complete there, then it continues on the new loop from exactly
   * that index with the same fds.
   */
  moveQueue(i: number, thread: number): Promise<void> {
    return this.serial(() => this.move(i, thread));
  }

  /** Runs `f` after every message and move before it has finished (they all change ring state). */
  private serial<T>(f: () => Promise<T>): Promise<T> {
    const run = this.lock.then(f);
    this.lock = run.then(() => {}, () => {});
    return run;
  }

  private lock: Promise<void> = Promise.resolve();

  private async move(i: number, thread: number): Promise<void> {
    const old = this.vrings[i];
    if (!old) throw new RangeError(`moveQueue: no queue ${i}`);
    const st = await old.release();
    const v = this.makeRing(i, thread);
    this.vrings[i] = v;
    v.num = st.num;
    v.addr = st.addr;
    await v.setLayout(st.packed);
    await v.setInflight(st.inflight);
    await v.setLog(st.log);
    await v.setEventIdx(st.eventIdx);
    await v.setInOrder(st.inOrder);
    await v.setBase(st.base);
    await v.mapRings();
    if (st.callFd >= 0) await v.setCall(st.callFd);
    if (st.errFd >= 0) await v.setErr(st.errFd);
    await v.setEnabled(st.enabled);
    if (st.started) await v.setKick(st.kickFd);
    this.log.info(`queue ${i} moved from ${old.where} to ${v.where} at base ${st.base}`);
  }

  /** Virtio features offered to the front-end. */
  get offeredFeatures(): bigint {
    return FRAMEWORK_FEATURES | this.device.features;
  }

  get replyAck(): boolean {
    return (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
  }

  private setBroken(e: VirtqError): void {
    if (this.broken) return;
    this.broken = e;
    if (this.inbandErr.has(e.queue)) this.sendInband(BackendReq.VRING_ERR, e.queue);
    this.opts.onBroken?.(e);
  }

  private vring(m: Message, index: number): RingCtl {
    const v = this.vrings[index];
    if (!v) throw new ProtocolError(requestName(m.request), "index", `queue ${index} >= ${this.vrings.length} queues`);
    return v;
  }

  /**
   * Handles one decoded message. Returns the reply message for requests that
   * have one, or null. Fds in the message are owned by the device from here
   * on: kept (kick/call/err) or closed.
   */
  handle(m: Message): Promise<Message | null> {
    return this.serial(() => this.exec(m));
  }

  private async exec(m: Message): Promise<Message | null> {
    const R = Req;
    const reply = (fields: Partial<Message>): Message => ({ request: m.request, flags: 0, fds: [], ...fields });
    switch (m.request) {
      case R.GET_FEATURES:
        return reply({ u64: this.offeredFeatures });
      case R.SET_FEATURES: {
        const f = m.u64!;
        const extra = f & ~this.offeredFeatures;
        if (extra !== 0n) throw new ProtocolError("SET_FEATURES", "features", `0x${extra.toString(16)} not offered`);
        this.features = f;
        this.featuresSet = true;
        const eventIdx = (f & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
        const packed = (f & bit(VIRTIO_F_RING_PACKED)) !== 0n;
        for (const v of this.vrings) {
          if (v.packed !== packed) {
            if (v.started) throw new ProtocolError("SET_FEATURES", "features", `ring layout change while queue ${v.index} runs`);
            await v.setLayout(packed);
          }
          await v.setEventIdx(eventIdx);
          await v.setInOrder((f & bit(VIRTIO_F_IN_ORDER)) !== 0n);
          // Without PROTOCOL_FEATURES rings are enabled as soon as they start (spec: "Ring states").
          if ((f & bit(VHOST_USER_F_PROTOCOL_FEATURES)) === 0n) await v.setEnabled(true);
        }
        this.deviceCall("setFeatures", () => this.device.setFeatures?.(f));
        // Every thread's instance learns them too (blk's write-through mode, a device's options).
        if (this.device.setFeatures) for (const ch of this.channels()) await ch.request({ op: "features", features: f });
        await this.applyLog();
        await this.applyIotlb();
        return null;
      }
      case R.GET_PROTOCOL_FEATURES:
        return reply({ u64: protocolFeaturesOf(this.device) });
      case R.SET_PROTOCOL_FEATURES: {
        const extra = m.u64! & ~protocolFeaturesOf(this.device);
        if (extra !== 0n) throw new ProtocolError("SET_PROTOCOL_FEATURES", "features", `0x${extra.toString(16)} not offered`);
        this.checkInbandFeatures(m.u64!);
        this.protocolFeatures = m.u64!;
        return null;
      }
      case R.SET_OWNER:
        this.owner = true;
        return null;
      case R.RESET_OWNER:
      case R.RESET_DEVICE:
        await this.reset();
        return null;
      case R.GET_QUEUE_NUM:
        return reply({ u64: BigInt(this.vrings.length) });
      case R.GET_MAX_MEM_SLOTS:
        return reply({ u64: BigInt(MAX_MEM_SLOTS) });
      case R.SET_MEM_TABLE:
        await this.setMemTable(m);
        return null;
      case R.ADD_MEM_REG:
        await this.addMemReg(m);
        return null;
      case R.REM_MEM_REG:
        await this.remMemReg(m);
        return null;
      case R.SET_VRING_NUM: {
        const v = this.vring(m, m.state!.index);
        const n = m.state!.num;
        // Packed rings may have any size (VIRTIO 1.2 §2.8.10.1); split rings a power of 2.
        if (n === 0 || n > this.device.queueSize || (!v.packed && (n & (n - 1)) !== 0)) {
          throw new ProtocolError("SET_VRING_NUM", "num", `${n} is not ${v.packed ? "in" : "a power of 2 in"} 1..${this.device.queueSize}`);
        }
        if (v.started) throw new ProtocolError("SET_VRING_NUM", "index", `queue ${v.index} is running`);
        v.num = n;
        return null;
      }
      case R.SET_VRING_ADDR: {
        const a = m.addr!;
        const v = this.vring(m, a.index);
        if (a.desc % 16 || a.avail % (v.packed ? 4 : 2) || a.used % 4) {
          throw new ProtocolError("SET_VRING_ADDR", "addr", `misaligned ring (desc 0x${a.desc.toString(16)}, avail 0x${a.avail.toString(16)}, used 0x${a.used.toString(16)})`);
        }
        if (v.num === 0) throw new ProtocolError("SET_VRING_ADDR", "index", `queue ${a.index} has no size (SET_VRING_NUM first)`);
        await v.quiesce();
        v.addr = a;
        try {
          await v.mapRings();
        } catch (e) {
          if (e instanceof GuestMemoryError) throw new ProtocolError("SET_VRING_ADDR", "addr", e.message);
          throw e;
        }
        await v.resume();
        return null;
      }
      case R.SET_VRING_BASE: {
        const v = this.vring(m, m.state!.index);
        if (v.started) throw new ProtocolError("SET_VRING_BASE", "index", `queue ${v.index} is running`);
        try {
          await v.setBase(m.state!.num);
        } catch (e) {
          throw new ProtocolError("SET_VRING_BASE", "num", (e as Error).message);
        }
        return null;
      }
      case R.GET_VRING_BASE: {
        const v = this.vring(m, m.state!.index);
        const num = await v.stop();
        return reply({ state: { index: v.index, num } });
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR: {
        const vf = m.vring!;
        if (await this.inbandVringFd(m)) return null;
        const fd = vf.noFd ? -1 : m.fds[0]!;
        let v: RingCtl;
        try {
          v = this.vring(m, vf.index);
        } catch (e) {
          sys.closeQuiet(fd);
          throw e;
        }
        m.fds.length = 0;
        if (m.request === R.SET_VRING_KICK) {
          if (fd >= 0) sys.setNonBlocking(fd);
          else this.log.warn(`queue ${v.index}: kick without fd (polling) is not supported; the ring runs on enable only`);
          await v.setKick(fd);
        } else if (m.request === R.SET_VRING_CALL) {
          await v.setCall(fd);
        } else {
          await v.setErr(fd);
        }
        return null;
      }
      case R.SET_VRING_ENABLE: {
        const v = this.vring(m, m.state!.index);
        if (m.state!.num > 1) throw new ProtocolError("SET_VRING_ENABLE", "num", `${m.state!.num} is not 0 or 1`);
        await v.setEnabled(m.state!.num === 1);
        return null;
      }
      case R.GET_CONFIG: {
        const c = m.config!;
        if (c.offset + c.size > MAX_CONFIG_SIZE) throw new ProtocolError("GET_CONFIG", "size", `offset ${c.offset} + size ${c.size} > ${MAX_CONFIG_SIZE}`);
        const space = this.deviceCall("config", () => this.device.config());
        const data = new Uint8Array(c.size);
        if (c.offset < space.length) data.set(space.subarray(c.offset, Math.min(space.length, c.offset + c.size)));
        return reply({ config: { offset: c.offset, size: c.size, flags: c.flags, data } });
      }
      case R.SET_CONFIG: {
        const c = m.config!;
        const space = this.deviceCall("config", () => this.device.config());
        if (!this.device.setConfig) throw new Refused(`device ${this.device.name} has no writable config`);
        if (c.offset + c.size > space.length) throw new Refused(`SET_CONFIG past the config space (${c.offset}+${c.size} > ${space.length})`);
        // The driver wrote something the device will not take: refused, the connection lives on.
        this.deviceCall("setConfig", () => this.device.setConfig!(c.offset, c.data), true);
        return null;
      }
      case R.SET_LOG_BASE:
        await this.setLogBase(m);
        // With LOG_SHMFD the front-end waits for this reply (a u64 0) before it starts logging.
        return reply({ u64: 0n });
      case R.SET_LOG_FD:
        // The log eventfd only matters to back-ends without shared-memory logging; ours is shared.
        for (const fd of m.fds) sys.closeQuiet(fd);
        m.fds = [];
        return null;
      case R.SET_BACKEND_REQ_FD:
        // I/O threads that send IOTLB misses on the old fd hand it back before it is closed.
        if (this.mem.iotlb !== null) for (const ch of this.channels()) await ch.request({ op: "iotlb", on: true, fd: -1 });
        sys.closeQuiet(this.backendFd);
        this.backendFd = m.fds[0]!;
        m.fds = [];
        if (this.mem.iotlb !== null) for (const ch of this.channels()) await ch.request({ op: "iotlb", on: true, fd: this.backendFd });
        return null;
      case R.IOTLB_MSG:
        // Spec: "The back-end has to acknowledge the request with sending zero as u64
        // payload for success, non-zero otherwise": a reply always, REPLY_ACK or not.
        try {
          await this.iotlbMsg(m.iotlb!);
        } catch (e) {
          if (!(e instanceof Refused)) throw e;
          this.log.warn(`IOTLB_MSG refused: ${e.message}`);
          return reply({ u64: 1n });
        }
        return reply({ u64: 0n });
      case R.GET_INFLIGHT_FD:
        return this.getInflightFd(m);
      case R.SET_INFLIGHT_FD:
        await this.setInflightFd(m);
        return null;
      case R.SET_STATUS:
        // Recorded only: QEMU 7.2 writes status 0 on stop *before* GET_VRING_BASE,
        // so treating 0 as a reset here would lose the ring indexes.
        this.status = Number(m.u64! & 0xffn);
        return null;
      case R.GET_STATUS:
        return reply({ u64: BigInt(this.status) });
      case R.NET_SET_MTU: {
        const mtu = Number(m.u64!);
        if (!this.device.setMtu) throw new Refused("NET_SET_MTU: the device has no MTU");
        // VIRTIO 1.2 §5.1.4: 68..65535.
        if (mtu < 68 || mtu > 65535) throw new Refused(`NET_SET_MTU: mtu ${mtu} outside 68..65535`);
        this.deviceCall("setMtu", () => this.device.setMtu!(mtu), true);
        for (const ch of this.channels()) await ch.request({ op: "hook", name: "setMtu", arg: mtu });
        return null;
      }
      case R.SEND_RARP: {
        if (!this.device.announce) throw new Refused("SEND_RARP: the device does not announce");
        const mac = new Uint8Array(6);
        for (let i = 0; i < 6; i++) mac[i] = Number((m.u64! >> BigInt(8 * i)) & 0xffn);
        this.deviceCall("announce", () => this.device.announce!(mac), true);
        for (const ch of this.channels()) await ch.request({ op: "hook", name: "announce", arg: mac });
        return null;
      }
      case R.VRING_KICK:
        await this.vringKick(m);
        return null;
      case R.SET_DEVICE_STATE_FD:
        return reply({ u64: this.setDeviceStateFd(m) });
      case R.CHECK_DEVICE_STATE:
        return reply({ u64: await this.checkDeviceState() });
      default:
        for (const fd of m.fds) sys.closeQuiet(fd);
        m.fds.length = 0;
        throw new Refused(`${requestName(m.request)} is not supported`);
    }
  }

  /** Stops processing on every ring and waits for in-flight requests. */
  async quiesce(): Promise<void> {
    await Promise.all(this.vrings.map((v) => v.quiesce()));
  }

  /**
   * Runs `change` on the memory table with every ring quiesced and no view
   * of guest memory left in any thread (so unmapping is safe), then shares
   * the new table with the I/O threads and resumes the rings.
   */
  private async memoryChange(change: () => void): Promise<void> {
    await this.quiesce();
    for (const v of this.vrings) await v.detachRings();
    for (const ch of this.channels()) await ch.request({ op: "mem", regions: [] });
    try {
      change();
    } finally {
      const regions = this.mem.describe();
      for (const ch of this.channels()) await ch.request({ op: "mem", regions });
      await this.resume();
    }
  }

  private async resume(): Promise<void> {
    for (const v of this.vrings) {
      try {
        await v.mapRings();
      } catch (e) {
        if (!(e instanceof GuestMemoryError)) throw e;
        // The new table no longer holds this ring: keep it unmapped until SET_VRING_ADDR.
        await v.detachRings();
        this.log.warn(`queue ${v.index}: rings not in the new memory table: ${e.message}`);
      }
      await v.resume();
    }
  }

  private regionError(request: string, field: string, e: unknown): unknown {
    if (e instanceof GuestMemoryError || (e instanceof Error && e.name === "ErrnoError")) {
      return new ProtocolError(request, field, (e as Error).message);
    }
    return e;
  }

  private sealWarned = false;

  /**
   * A mapping whose file shrinks under it faults with SIGBUS on the next
   * access, which no JavaScript can catch: say so once when the front-end's
   * memory is not sealed against shrinking (QEMU seals its memfds by default).
   */
  private checkSeals(fds: readonly number[]): void {
    if (this.sealWarned) return;
    for (const fd of fds) {
      const seals = sys.getSeals(fd);
      if (seals >= 0 && (seals & sys.F_SEAL_SHRINK) === 0) {
        this.sealWarned = true;
        this.log.warn("guest memory is a memfd without F_SEAL_SHRINK: a front-end that shrinks it would crash this process (SIGBUS)");
        return;
      }
    }
  }

  private async setMemTable(m: Message): Promise<void> {
    const fds = m.fds;
    m.fds = [];
    this.checkSeals(fds);
    try {
      await this.memoryChange(() => {
        this.mem.clear();
        this.regionRefs.clear();
        try {
          m.regions!.forEach((r, i) => this.mem.add(r, fds[i]!));
        } catch (e) {
          this.mem.clear();
          throw this.regionError("SET_MEM_TABLE", "regions", e);
        }
      });
    } finally {
      // The mappings keep the memory; the fds are not needed any more.
      for (const fd of fds) sys.closeQuiet(fd);
    }
  }

  /**
   * Regions added again, identical (same gpa, size and address): QEMU 7.2
   * has one vhost_dev per queue pair of a vhost-user netdev on the same
   * socket, and each sends ADD_MEM_REG (and REM_MEM_REG) for every region
   * (QEMU 8.0 sends them once). Counted, not mapped twice: the mapping goes
   * with the last REM_MEM_REG.
   */
  private readonly regionRefs = new Map<string, number>();

  private async addMemReg(m: Message): Promise<void> {
    const fd = m.fds[0]!;
    m.fds = [];
    const r = m.region!;
    const key = `${r.guestPhysAddr}:${r.memorySize}:${r.userAddr}`;
    if (this.mem.regions.some((x) => x.gpa === r.guestPhysAddr && x.size === r.memorySize && x.uva === r.userAddr)) {
      sys.closeQuiet(fd);
      this.regionRefs.set(key, (this.regionRefs.get(key) ?? 0) + 1);
      this.log.debug(`ADD_MEM_REG: region at gpa 0x${r.guestPhysAddr.toString(16)} added again (one per vhost_dev of the front-end): counted`);
      return;
    }
    this.checkSeals([fd]);
    try {
      await this.memoryChange(() => {
        try {
          this.mem.add(r, fd, MAX_MEM_SLOTS);
        } catch (e) {
          throw this.regionError("ADD_MEM_REG", "region", e);
        }
      });
    } finally {
      sys.closeQuiet(fd);
    }
  }

  private async remMemReg(m: Message): Promise<void> {
    for (const fd of m.fds) sys.closeQuiet(fd);
    m.fds = [];
    const r = m.region!;
    const key = `${r.guestPhysAddr}:${r.memorySize}:${r.userAddr}`;
    const refs = this.regionRefs.get(key) ?? 0;
    if (refs > 0) {
      if (refs === 1) this.regionRefs.delete(key);
      else this.regionRefs.set(key, refs - 1);
      return;
    }
    let found = false;
    await this.memoryChange(() => {
      found = this.mem.remove(r.guestPhysAddr, r.memorySize, r.userAddr);
    });
    if (!found) throw new Refused(`REM_MEM_REG: no region at gpa 0x${r.guestPhysAddr.toString(16)} of ${r.memorySize} bytes`);
  }

  /** The back-end request channel (SET_BACKEND_REQ_FD): messages from us to the front-end. */
  private backendFd = -1;

  /**
   * Tells the front-end that the config space changed (CONFIG_CHANGE_MSG on
   * the back-end channel; it then re-reads it with GET_CONFIG and interrupts
   * the guest). Returns false when the front-end gave no channel.
   */
  configChanged(): boolean {
    if (this.backendFd < 0 || (this.protocolFeatures & bit(ProtocolFeature.BACKEND_REQ)) === 0n) return false;
    const buf = new sys.MsgBuf(HDR_SIZE + 16);
    try {
      // No NEED_REPLY: the front-end's acknowledgement would arrive on a socket nobody here reads.
      const cm: Message = { request: BackendReq.CONFIG_CHANGE_MSG, flags: 0, fds: [] };
      const n = encodeBackendMessage(cm, buf.dataView);
      this.traceBackend(cm);
      const deadline = Date.now() + 2000;
      for (let off = 0; off < n;) {
        const w = buf.send(this.backendFd, off, n - off);
        if (w === null) {
          if (Date.now() > deadline) throw new Error("CONFIG_CHANGE_MSG: the front-end does not read its back-end channel");
          sys.poll1(this.backendFd, POLLOUT, 100);
          continue;
        }
        off += w;
      }
    } finally {
      buf.free();
    }
    this.log.info("config changed: CONFIG_CHANGE_MSG sent");
    return true;
  }

  /** The dirty log bitmap (SET_LOG_BASE), mapped here and shared with the rings while LOG_ALL is on. */
  private logMap: { host: number; len: number } | null = null;
  private logOn = false;

  /** SET_LOG_BASE: map the log fd (size checked against the fd and against guest memory). */
  private async setLogBase(m: Message): Promise<void> {
    const fd = m.fds[0]!;
    m.fds = [];
    try {
      const { size, offset } = m.log!;
      const st = sys.fstat(fd);
      if (!st.isRegular || st.size < offset + size || size === 0) {
        throw new ProtocolError("SET_LOG_BASE", "log", `fd holds ${st.size} bytes, log needs ${offset} + ${size}`);
      }
      const pageOff = offset % 4096;
      const host = sys.mmap(size + pageOff, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset - pageOff);
      await this.dropLog();
      this.logMap = { host: host + pageOff, len: size };
      this.logUnmap = { host, len: size + pageOff };
      const end = Math.max(0, ...this.mem.regions.map((r) => r.gpaEnd));
      if (size < DirtyLog.bytesFor(end)) this.log.warn(`SET_LOG_BASE: log of ${size} bytes covers less than guest memory (${end} bytes)`);
      await this.applyLog();
    } finally {
      sys.closeQuiet(fd);
    }
  }

  private logUnmap: { host: number; len: number } | null = null;

  /** Gives every ring the log when LOG_ALL is negotiated and a log is mapped, and takes it back otherwise. */
  private async applyLog(): Promise<void> {
    const on = (this.features & bit(VHOST_F_LOG_ALL)) !== 0n && this.logMap !== null;
    if (on === this.logOn) return;
    this.logOn = on;
    await this.quiesce();
    for (const v of this.vrings) await v.setLog(on ? { host: this.logMap!.host, size: this.logMap!.len } : null);
    for (const v of this.vrings) await v.resume();
    this.log.info(`dirty logging ${on ? "on" : "off"}`);
  }

  private async dropLog(): Promise<void> {
    if (!this.logMap) return;
    if (this.logOn) {
      this.logMap = null;
      await this.applyLog();
    }
    this.logMap = null;
    if (this.logUnmap) sys.munmap(this.logUnmap.host, this.logUnmap.len);
    this.logUnmap = null;
  }

  /** The INFLIGHT_SHMFD buffer mapped here (host address and length), shared with the rings. */
  private inflightMap: { host: number; len: number } | null = null;

  /**
   * GET_INFLIGHT_FD: a zeroed buffer for `numQueues` areas of `queueSize`
   * entries, in a memfd the front-end keeps across our restarts.
   */
  private getInflightFd(m: Message): Message {
    const { numQueues, queueSize } = m.inflight!;
    if (numQueues > 256 || queueSize > 32768) throw new ProtocolError("GET_INFLIGHT_FD", "inflight", `${numQueues} queues of ${queueSize}`);
    // The layout follows the negotiated features (QEMU sends SET_FEATURES first: vhost_dev_prepare_inflight);
    // before them it is unknown, and the packed one, the larger, fits either.
    const packed = !this.featuresSet || (this.features & bit(VIRTIO_F_RING_PACKED)) !== 0n;
    const size = numQueues * inflightQueueSize(queueSize, packed);
    const fd = sys.memfdCreate("bunvhost-inflight");
    try {
      sys.ftruncate(fd, size);
    } catch (e) {
      sys.closeQuiet(fd);
      throw e;
    }
    return { request: m.request, flags: 0, fds: [fd], inflight: { mmapSize: size, mmapOffset: 0, numQueues, queueSize } };
  }

  /** SET_INFLIGHT_FD: map the buffer (checked against its fd's size) and give each ring its area. */
  private async setInflightFd(m: Message): Promise<void> {
    const fd = m.fds[0]!;
    m.fds = [];
    try {
      const { mmapSize, mmapOffset, numQueues, queueSize } = m.inflight!;
      // Queue areas are mmapSize / numQueues apart (as GET_INFLIGHT_FD made them, whichever layout was
      // known then); each must hold at least the negotiated layout's area (each ring checks its own at start).
      const packed = this.featuresSet && (this.features & bit(VIRTIO_F_RING_PACKED)) !== 0n;
      const stride = numQueues > 0 ? Math.floor(mmapSize / numQueues / INFLIGHT_ALIGN) * INFLIGHT_ALIGN : 0;
      if ((numQueues > 0 && stride < inflightQueueSize(queueSize, packed)) || mmapSize > MAX_INFLIGHT_BYTES || mmapOffset % 4096 !== 0) {
        throw new ProtocolError("SET_INFLIGHT_FD", "inflight", `${numQueues} queues of ${queueSize} in ${mmapSize} bytes at offset ${mmapOffset}`);
      }
      const st = sys.fstat(fd);
      if (!st.isRegular || st.size < mmapOffset + mmapSize) {
        throw new ProtocolError("SET_INFLIGHT_FD", "fd", `holds ${st.size} bytes, needs ${mmapOffset} + ${mmapSize}`);
      }
      await this.dropInflight();
      const host = sys.mmap(mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, mmapOffset);
      this.inflightMap = { host, len: mmapSize };
      for (const v of this.vrings) {
        await v.setInflight(v.index < numQueues ? { host: host + v.index * stride, size: stride, queueSize } : null);
      }
    } finally {
      sys.closeQuiet(fd);
    }
  }

  /** Detaches the inflight buffer from every ring (quiesced) and unmaps it. */
  private async dropInflight(): Promise<void> {
    const map = this.inflightMap;
    if (!map) return;
    await this.quiesce();
    for (const v of this.vrings) await v.setInflight(null);
    this.inflightMap = null;
    sys.munmap(map.host, map.len);
    for (const v of this.vrings) await v.resume();
  }

  /** RESET_DEVICE / status 0: rings stopped and forgotten, memory kept. */
  private async resetDevice(): Promise<void> {
    await this.quiesce();
    for (const v of this.vrings) await v.reset();
    this.dropInband();
    this.cancelTransfer("device reset");
    this.features = 0n;
    this.featuresSet = false;
    this.broken = null;
    await this.applyIotlb();
    this.deviceCall("reset", () => this.device.reset?.());
  }

  /** IOTLB counters since the connection started (traces, tests). */
  readonly iotlbStats = { updates: 0, invalidations: 0, misses: 0, accessFails: 0 };

  /**
   * The IOTLB is on exactly while VIRTIO_F_ACCESS_PLATFORM is negotiated
   * (vhost-user.rst "IOMMU support"; QEMU clears the bit towards the back-end
   * when the device sits behind no vIOMMU, so then addresses stay plain). Every
   * thread gets its own empty table and the back-end channel for misses; the
   * rings re-translate (their addresses change meaning).
   */
  private async applyIotlb(): Promise<void> {
    const on = (this.features & bit(VIRTIO_F_ACCESS_PLATFORM)) !== 0n;
    if (on === (this.mem.iotlb !== null)) return;
    await this.quiesce();
    for (const v of this.vrings) await v.detachRings();
    this.mem.iotlb = on ? new Iotlb(this.mem) : null;
    for (const ch of this.channels()) await ch.request({ op: "iotlb", on, fd: on ? this.backendFd : -1 });
    this.log.info(`IOTLB ${on ? "on (VIRTIO_F_ACCESS_PLATFORM): ring and buffer addresses are IOVAs" : "off"}`);
    await this.resume();
  }

  /**
   * IOTLB_MSG from the front-end. UPDATE: every thread's table gets the entry
   * (checked against the memory table here first), then rings waiting on a
   * miss retry. INVALIDATE of a range some entry overlaps: every ring
   * quiesces (no request in flight can still use the old translation), every
   * table drops the range, and the rings re-translate before their next access.
   * The reply (always sent, see exec) goes only after all that.
   */
  private async iotlbMsg(t: IotlbMsg): Promise<void> {
    const tbl = this.mem.iotlb;
    if (tbl === null) throw new Refused("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated");
    const cmd = { op: "iotlbMsg" as const, type: t.type, iova: t.iova, size: t.size, uaddr: t.uaddr, perm: t.perm };
    if (t.type === IOTLB_UPDATE) {
      this.iotlbStats.updates++;
      this.log.debug(`IOTLB update iova=0x${t.iova.toString(16)} size=0x${t.size.toString(16)} uaddr=0x${t.uaddr.toString(16)} ${permName(t.perm)}`);
      try {
        tbl.update(t.iova, t.size, t.uaddr, t.perm);
      } catch (e) {
        if (e instanceof IotlbEntryError) throw new Refused(e.message);
        throw e;
      }
      for (const ch of this.channels()) await ch.request(cmd);
      for (const v of this.vrings) if (v instanceof Vring) v.process();
      return;
    }
    this.iotlbStats.invalidations++;
    this.log.debug(`IOTLB invalidate iova=0x${t.iova.toString(16)} size=0x${t.size.toString(16)}`);
    if (!tbl.overlaps(t.iova, t.size)) return;
    await this.quiesce();
    tbl.invalidate(t.iova, t.size);
    for (const ch of this.channels()) await ch.request(cmd);
    await this.resume();
  }

  /** A ring on the main loop asks for a translation or reports a refused access (back-end IOTLB_MSG). */
  private iotlbReport(type: number, iova: number, perm: number): boolean {
    if (type === 1) this.iotlbStats.misses++;
    else this.iotlbStats.accessFails++;
    this.log.debug(`IOTLB ${type === 1 ? "miss" : "access failure"} iova=0x${iova.toString(16)} ${permName(perm)}`);
    if ((this.protocolFeatures & bit(ProtocolFeature.BACKEND_REQ)) === 0n) return false;
    return sendIotlbReport(this.backendFd, type, iova, perm, this.opts.trace ? this.traceLine : undefined);
  }

  private readonly traceLine = (line: string) => this.log.info(line);

  private traceBackend(m: Message): void {
    if (this.opts.trace) this.log.info(`=> ${describeBackendMessage(m)}`);
  }

  /**
   * RESET_OWNER and disconnect: everything back to the state of a new
   * connection; every mapping unmapped and every fd closed.
   */
  /** reset() after any message or move in progress: for disconnects and server stop. */
  teardown(): Promise<void> {
    return this.serial(() => this.reset());
  }

  async reset(): Promise<void> {
    await this.resetDevice();
    await this.memoryChange(() => this.mem.clear());
    this.regionRefs.clear();
    await this.dropInflight();
    await this.dropLog();
    sys.closeQuiet(this.backendFd);
    this.backendFd = -1;
    this.protocolFeatures = 0n;
    this.status = 0;
    this.owner = false;
  }

  // ---- in-band notifications (INBAND_NOTIFICATIONS) ------------------------------------

  /**
   * Rings whose kick or call travels as messages. Each has a relay eventfd
   * owned here, and the ring gets a dup of it as its kick or call fd, so it
   * runs unchanged on the main loop or in an I/O thread: VRING_KICK writes the
   * kick relay (the ring's loop wakes as for a guest kick); a completion writes
   * the call relay, which the main loop watches and turns into one
   * BACKEND_VRING_CALL (calls between two wake-ups coalesce, as interrupts do).
   * Nothing here runs per request for rings that use eventfds.
   */
  private readonly kickRelay = new Map<number, number>();
  private readonly callRelay = new Map<number, { fd: number; watch: number }>();
  /** Rings whose errors are reported with BACKEND_VRING_ERR. */
  private readonly inbandErr = new Set<number>();
  private inbandBuf: sys.MsgBuf | null = null;
  private readonly inbandMsg: Message = { request: 0, flags: 0, fds: [], state: { index: 0, num: 0 } };

  private get inbandOn(): boolean {
    return (this.protocolFeatures & bit(ProtocolFeature.INBAND_NOTIFICATIONS)) !== 0n;
  }

  /** Spec ("In-band notifications"): INBAND without BACKEND_REQ and REPLY_ACK is an error the back-end answers by closing. */
  private checkInbandFeatures(f: bigint): void {
    const need = bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.REPLY_ACK);
    if ((f & bit(ProtocolFeature.INBAND_NOTIFICATIONS)) !== 0n && (f & need) !== need) {
      throw new ProtocolError("SET_PROTOCOL_FEATURES", "features", "INBAND_NOTIFICATIONS without both BACKEND_REQ and REPLY_ACK");
    }
  }

  /**
   * SET_VRING_KICK/CALL/ERR: with INBAND negotiated and the no-fd flag, sets
   * the ring up for messages and returns true. Otherwise drops any in-band
   * set-up of that ring and returns false (the caller handles the fd).
   */
  private async inbandVringFd(m: Message): Promise<boolean> {
    const { index, noFd } = m.vring!;
    const inband = noFd && this.inbandOn;
    if (m.request === Req.SET_VRING_KICK) {
      this.dropKickRelay(index);
      if (inband) await this.startInbandKick(this.vring(m, index));
      return inband;
    }
    if (m.request === Req.SET_VRING_CALL) this.dropCallRelay(index);
    else this.inbandErr.delete(index);
    if (!inband) return false;
    const v = this.vring(m, index);
    const what = requestName(m.request);
    if (this.backendFd < 0) throw new Refused(`${what}: queue ${index}: in-band notifications need the back-end channel (SET_BACKEND_REQ_FD first)`);
    // Our end only: the front-end's end of the socketpair is another open file.
    sys.setNonBlocking(this.backendFd);
    if (m.request === Req.SET_VRING_ERR) {
      await v.setErr(-1);
      this.inbandErr.add(index);
      return true;
    }
    const [fd, ringFd] = relayPair();
    const watch = this.opts.loop.watch(fd, () => {
      if (sys.eventfdRead(fd) !== null) this.sendInband(BackendReq.VRING_CALL, index);
    });
    this.callRelay.set(index, { fd, watch });
    await v.setCall(ringFd);
    this.log.info(`queue ${index}: calls in band (BACKEND_VRING_CALL)`);
    return true;
  }

  private async startInbandKick(v: RingCtl): Promise<void> {
    this.dropKickRelay(v.index);
    const [fd, ringFd] = relayPair();
    this.kickRelay.set(v.index, fd);
    await v.setKick(ringFd);
    this.log.info(`queue ${v.index}: kicks in band (VRING_KICK)`);
  }

  /** VRING_KICK: wake the ring's loop; a stopped ring starts, as on the first kick of its fd ("Ring states"). */
  private async vringKick(m: Message): Promise<void> {
    const index = m.state!.index;
    if (!this.inbandOn) throw new Refused(`VRING_KICK: queue ${index}: INBAND_NOTIFICATIONS was not negotiated`);
    const v = this.vring(m, index);
    const relay = this.kickRelay.get(index);
    if (v.started && relay !== undefined) return sys.eventfdWrite(relay);
    if (v.started) throw new Refused(`VRING_KICK: queue ${index} runs on a kick eventfd (VRING_KICK is for rings set with the no-fd flag)`);
    if (v.num === 0 || v.addr === null) throw new Refused(`VRING_KICK: queue ${index} has no size or ring addresses yet`);
    await this.startInbandKick(v);
  }

  /** Sends BACKEND_VRING_CALL/ERR for ring `index` (no NEED_REPLY: nobody reads replies on that channel). */
  private sendInband(request: number, index: number): void {
    const fd = this.backendFd;
    const what = `queue ${index}: ${backendRequestName(request)}`;
    if (fd < 0) return this.log.error(`${what} dropped: no back-end channel`);
    const buf = (this.inbandBuf ??= new sys.MsgBuf(HDR_SIZE + 8));
    const m = this.inbandMsg;
    m.request = request;
    m.state!.index = index;
    const n = encodeBackendMessage(m, buf.dataView);
    this.traceBackend(m);
    let off = 0;
    try {
      const deadline = performance.now() + 1000;
      while (off < n) {
        const w = buf.send(fd, off, n - off);
        if (w !== null) {
          off += w;
          continue;
        }
        // The channel is full, the front-end is not reading it (the spec warns that in-band
        // notifications can block the sender): wait a little, then give up on this one.
        if (performance.now() > deadline) throw new Error("the front-end does not read its back-end channel");
        sys.poll1(fd, POLLOUT, 50);
      }
    } catch (e) {
      // (A half-sent message is not possible in practice: a unix stream socket queues a
      // message this small whole or not at all.)
      this.log.error(`${what} not sent: ${(e as Error).message}`);
    }
  }

  private dropKickRelay(index: number): void {
    const fd = this.kickRelay.get(index);
    if (fd === undefined) return;
    sys.closeQuiet(fd);
    this.kickRelay.delete(index);
  }

  private dropCallRelay(index: number): void {
    const r = this.callRelay.get(index);
    if (r === undefined) return;
    this.opts.loop.unwatch(r.watch);
    sys.closeQuiet(r.fd);
    this.callRelay.delete(index);
  }

  /** Every relay closed (the rings close their own dups on reset). */
  private dropInband(): void {
    for (const i of [...this.kickRelay.keys()]) this.dropKickRelay(i);
    for (const i of [...this.callRelay.keys()]) this.dropCallRelay(i);
    this.inbandErr.clear();
    this.inbandBuf?.free();
    this.inbandBuf = null;
  }

  // ---- back-end state transfer (DEVICE_STATE) -----------------------------------------

  private transfer: StateTransfer | null = null;
  private transferDir = "";
  /** Why the last SET_DEVICE_STATE_FD was refused; the next CHECK_DEVICE_STATE reports it. */
  private transferRefused: string | null = null;

  private runningRings(): string {
    return this.vrings.filter((v) => v.started).map((v) => v.index).join(",");
  }

  /**
   * SET_DEVICE_STATE_FD: start saving into or loading from the front-end's
   * pipe. Returns the reply u64: 0x100 (success, no fd of ours) or 0x101
   * (refused: bad direction or phase, rings running, not a pipe, no state).
   */
  private setDeviceStateFd(m: Message): bigint {
    const fd = m.fds[0]!;
    m.fds = [];
    const NO_FD = 0x100n;
    const { direction, phase } = m.deviceState!;
    const save = direction === DEVICE_STATE_SAVE;
    const refuse = (why: string): bigint => {
      sys.closeQuiet(fd);
      this.log.warn(`SET_DEVICE_STATE_FD refused: ${why}`);
      this.transferRefused = why;
      return NO_FD | 1n;
    };
    this.cancelTransfer("replaced by a new SET_DEVICE_STATE_FD");
    this.transferRefused = null;
    if ((this.protocolFeatures & bit(ProtocolFeature.DEVICE_STATE)) === 0n) return refuse("DEVICE_STATE was not negotiated");
    if (direction !== DEVICE_STATE_SAVE && direction !== DEVICE_STATE_LOAD) return refuse(`direction ${direction} is not 0 (save) or 1 (load)`);
    if (phase !== DEVICE_STATE_PHASE_STOPPED) return refuse(`phase ${phase} is not 0 (stopped)`);
    const running = this.runningRings();
    // Spec: the state moves while the device is suspended (every ring stopped by GET_VRING_BASE).
    if (running) return refuse(`queue(s) ${running} still running: stop every ring (GET_VRING_BASE) first`);
    const bad = pipeLikeError(fd);
    if (bad) return refuse(bad);
    const d = this.device;
    if (save ? !d.saveState : !d.loadState) return refuse(`device ${d.name} cannot ${save ? "save" : "load"} its state`);
    try {
      this.transfer = save
        ? StateTransfer.save(fd, d.saveState!(), this.opts.loop)
        : StateTransfer.load(fd, this.opts.loop, (b) => {
          const r = this.runningRings();
          if (r) throw new Error(`queue(s) ${r} started during the transfer`);
          d.loadState!(b);
          this.loadedState = b;
        });
    } catch (e) {
      return refuse((e as Error).message);
    }
    this.transferDir = save ? "save" : "load";
    this.log.info(`device state ${this.transferDir} started`);
    return NO_FD;
  }

  /** CHECK_DEVICE_STATE: 0 when the last transfer completed and the device took the state, 1 otherwise. */
  private async checkDeviceState(): Promise<bigint> {
    const t = this.transfer;
    if (t === null) {
      this.log.warn(`CHECK_DEVICE_STATE: ${this.transferRefused ?? "no state transfer (SET_DEVICE_STATE_FD first)"}`);
      return 1n;
    }
    // The front-end checks once it has seen EOF (save) or closed its end (load); the last
    // bytes of a load may still be in the pipe, so wait for them, briefly.
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<string>((r) => { timer = setTimeout(() => r("not finished: the front-end must close its end before CHECK_DEVICE_STATE"), CHECK_WAIT_MS); });
    let err = await Promise.race([t.done, late]);
    clearTimeout(timer);
    const loaded = this.loadedState;
    this.loadedState = null;
    if (err === null && loaded !== null) {
      // Every I/O thread's instance takes the same state as the main thread's.
      for (const ch of this.channels()) {
        try {
          await ch.request({ op: "loadState", data: loaded });
        } catch (e) {
          err = `an I/O thread's instance refused the state: ${(e as Error).message}`;
          break;
        }
      }
    }
    t.cancel(err ?? "");
    this.transfer = null;
    if (err !== null) {
      this.log.error(`device state ${this.transferDir} failed: ${err}`);
      return 1n;
    }
    this.log.info(`device state ${this.transferDir}: ${t.bytes} bytes, checked`);
    return 0n;
  }

  /** The bytes a load gave the main thread's instance, for the I/O threads' instances (at CHECK_DEVICE_STATE). */
  private loadedState: Uint8Array | null = null;

  /**
   * Hot reload: replaces the device with `next` (same VIRTIO id, queues and
   * negotiated features; the caller checked) with every ring quiesced: no
   * chain is taken, in-flight requests finish on the old instance, its state
   * moves to the new one (saveState/loadState), `swapThreads` does the same
   * in every I/O thread, and the rings resume from exactly where they were.
   * Returns how long the rings were paused, in ms.
   */
  swapDevice(next: Device, swapThreads: () => Promise<void>): Promise<number> {
    return this.serial(async () => {
      const t0 = performance.now();
      await this.quiesce();
      try {
        const state = this.device.saveState?.();
        if (state !== undefined && next.loadState) next.loadState(state);
        if (this.featuresSet) next.setFeatures?.(this.features);
        await swapThreads();
        this.device = next;
      } finally {
        await this.resume();
      }
      return performance.now() - t0;
    });
  }

  private cancelTransfer(reason: string): void {
    this.transfer?.cancel(reason);
    this.transfer = null;
  }

  /** True once SET_FEATURES has been received. */
  get negotiated(): boolean {
    return this.featuresSet;
  }
}

/** An eventfd and a duplicate of it: VuDev keeps one end, the ring (on any thread) owns the other. */
function relayPair(): [number, number] {
  const fd = sys.eventfd();
  try {
    return [fd, sys.dup(fd)];
  } catch (e) {
    sys.closeQuiet(fd);
    throw e;
  }
}

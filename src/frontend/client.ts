/**
 * The front-end side of vhost-user (what QEMU does), over a unix socket.
 *
 * Theory of operation. Everything is synchronous and blocking with a
 * deadline: a request is encoded into one reusable buffer and sent with its
 * fds; a request that has a reply (GET_*), or any request while REPLY_ACK is
 * in use, then waits with poll(2) for the reply header and payload and
 * decodes it with the protocol layer's checks. The back-end runs in another
 * process, so blocking here never starves it.
 *
 * The peer closing the connection surfaces as FrontendError("DISCONNECTED"),
 * a silent peer as FrontendError("TIMEOUT"), a malformed reply as
 * FrontendError("BAD_REPLY") wrapping the ProtocolError. For hostile tests,
 * `sendRaw` sends any bytes with any fds, `recvRaw` takes one message
 * without decoding it, and `waitClosed` tells whether the back-end hung up.
 *
 * Spec: QEMU docs/interop/vhost-user.rst ("Front-end message types",
 * "REPLY_ACK").
 */
import * as sys from "../../ffi/sys.ts";
import { ErrnoError } from "../../ffi/errno.ts";
import { POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT } from "../../ffi/constants.ts";
import { ProtocolError } from "../errors.ts";
import { decodeHeader, decodeReply, type Header } from "../protocol/decode.ts";
import { encodeMessage } from "../protocol/encode.ts";
import { decodeBackendRequest } from "../protocol/decode.ts";
import { IOTLB_ACCESS_FAIL, IOTLB_INVALIDATE, IOTLB_MISS, IOTLB_UPDATE, type IotlbMsg } from "../protocol/messages.ts";
import {
  FLAG_NEED_REPLY, HDR_SIZE, MAX_PAYLOAD, Req, requestName,
  type ConfigSpace, type InflightInfo, type MemRegion, type Message, type VringAddr,
} from "../protocol/messages.ts";

export type FrontendCode =
  | "DISCONNECTED" // the back-end closed the connection (EOF, EPIPE, ECONNRESET)
  | "TIMEOUT" // no reply / no completion before the deadline
  | "BAD_REPLY" // a reply that is malformed or answers another request
  | "NACK" // REPLY_ACK with a non-zero status
  | "NOT_OFFERED" // we need a feature or a queue count the back-end does not offer
  | "QUEUE_FULL" // no free descriptor or request slot
  | "BAD_USED" // the device put a used element that is not in flight, or moved used.idx too far
  | "CONFIG"; // GET_CONFIG answered with an empty payload (the back-end's error)

/**
 * Something the back-end did (or did not do) that the front-end cannot go on from.
 * @example new FrontendError("NACK", "SET_VRING_ADDR", "status 1") // "SET_VRING_ADDR: NACK: status 1"
 */
export class FrontendError extends Error {
  override name = "FrontendError";
  constructor(readonly code: FrontendCode, readonly what: string, detail = "", options?: { cause?: unknown }) {
    super(`${what}: ${code}${detail && `: ${detail}`}`, options);
  }
}

export interface FrontendOptions {
  /** Deadline for each reply (default 5000 ms). */
  timeoutMs?: number;
  /** How long `connect` retries while the socket is missing or refuses (default 5000 ms). */
  connectTimeoutMs?: number;
  /** Print every message to stderr (also: env BUNVHOST_FE_TRACE=1). */
  trace?: boolean;
}

/** One received message, undecoded (see `recvRaw`). */
export interface RawMessage {
  header: Header;
  payload: Uint8Array;
  fds: number[];
}

const now = () => performance.now();

export class VhostUserFrontend {
  timeoutMs: number;
  /**
   * When true (after REPLY_ACK was negotiated), requests without a reply of
   * their own carry NEED_REPLY and wait for the back-end's status.
   */
  replyAck = false;
  /** Bytes that arrived when no reply was expected (discarded by `alive`/`waitClosed`). */
  unexpectedBytes = 0;
  readonly trace: boolean;
  private readonly buf = new sys.MsgBuf(HDR_SIZE + MAX_PAYLOAD);
  private open = true;

  /** Takes ownership of a connected unix stream socket `fd`. */
  constructor(readonly fd: number, o: FrontendOptions = {}) {
    this.timeoutMs = o.timeoutMs ?? 5000;
    this.trace = o.trace ?? process.env.BUNVHOST_FE_TRACE === "1";
    sys.setNonBlocking(fd, true);
  }

  /**
   * Connects to a back-end listening on `path`, retrying while the socket
   * does not exist yet or refuses (the back-end is starting).
   * @example const fe = VhostUserFrontend.connect("/dev/shm/x/vhost.sock"); fe.getFeatures();
   */
  static connect(path: string, o: FrontendOptions = {}): VhostUserFrontend {
    const deadline = now() + (o.connectTimeoutMs ?? 5000);
    for (;;) {
      const fd = sys.socketUnix(true);
      try {
        sys.connectUnix(fd, path);
        return new VhostUserFrontend(fd, o);
      } catch (e) {
        sys.closeQuiet(fd);
        const retry = e instanceof ErrnoError && ["ENOENT", "ECONNREFUSED", "EAGAIN"].includes(e.code);
        if (!retry || now() >= deadline) throw e;
        Bun.sleepSync(2);
      }
    }
  }

  get isOpen(): boolean {
    return this.open;
  }

  // ---- raw I/O ---------------------------------------------------------------

  private disconnected(what: string, cause?: unknown): FrontendError {
    return new FrontendError("DISCONNECTED", what, "the back-end closed the connection", { cause });
  }

  /** Sends `data[0..len)` of the message buffer, all of it, with `fds` on the first byte. */
  private sendBuf(len: number, fds: readonly number[], what: string): void {
    if (!this.open) throw new FrontendError("DISCONNECTED", what, "connection already closed");
    let off = 0;
    const deadline = now() + this.timeoutMs;
    while (off < len) {
      let n: number | null;
      try {
        n = this.buf.send(this.fd, off, len - off, off === 0 ? fds : []);
      } catch (e) {
        if (e instanceof ErrnoError && (e.code === "EPIPE" || e.code === "ECONNRESET")) throw this.disconnected(what, e);
        throw e;
      }
      if (n === null) {
        const left = deadline - now();
        if (left <= 0) throw new FrontendError("TIMEOUT", what, "socket not writable");
        sys.poll1(this.fd, POLLOUT, Math.ceil(left));
        continue;
      }
      off += n;
    }
  }

  /** Receives exactly `len` bytes at `off` of the message buffer, collecting fds. */
  private recvExact(off: number, len: number, fds: number[], deadline: number, what: string): void {
    if (!this.open) throw new FrontendError("DISCONNECTED", what, "connection already closed");
    const end = off + len;
    while (off < end) {
      const left = deadline - now();
      if (left <= 0) throw new FrontendError("TIMEOUT", what, `no reply within ${this.timeoutMs} ms`);
      const ev = sys.poll1(this.fd, POLLIN, Math.ceil(left));
      if (ev === 0) continue;
      if (ev & POLLNVAL) throw new FrontendError("DISCONNECTED", what, "socket fd is not open");
      let n: number | null;
      try {
        n = this.buf.recv(this.fd, off, end - off, fds);
      } catch (e) {
        if (e instanceof ErrnoError && e.code === "ECONNRESET") throw this.disconnected(what, e);
        throw e;
      }
      if (n === null) continue;
      if (n === 0) throw this.disconnected(what);
      off += n;
    }
  }

  /**
   * Sends arbitrary bytes with arbitrary fds (malformed messages for hostile tests).
   * The fds stay ours: the kernel passes duplicates.
   */
  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (bytes.length > this.buf.capacity) throw new RangeError(`sendRaw: ${bytes.length} bytes > ${this.buf.capacity}`);
    this.buf.data.set(bytes, 0);
    if (this.trace) console.error(`fe → raw ${bytes.length} bytes, ${fds.length} fds`);
    this.sendBuf(bytes.length, fds, "sendRaw");
  }

  /** Receives one message without decoding its payload (the header is still checked). */
  recvRaw(timeoutMs = this.timeoutMs): RawMessage {
    const fds: number[] = [];
    const deadline = now() + timeoutMs;
    try {
      this.recvExact(0, HDR_SIZE, fds, deadline, "recvRaw");
      const header = decodeHeader(this.buf.dataView, 0);
      this.recvExact(HDR_SIZE, header.size, fds, deadline, "recvRaw");
      return { header, payload: this.buf.data.slice(HDR_SIZE, HDR_SIZE + header.size), fds };
    } catch (e) {
      for (const fd of fds) sys.closeQuiet(fd);
      if (e instanceof ProtocolError) throw new FrontendError("BAD_REPLY", "recvRaw", e.message, { cause: e });
      throw e;
    }
  }

  /** Sends `m` (fds from `m.fds`); sets NEED_REPLY when `needReply`. */
  send(m: Message, needReply = false): void {
    const flags = needReply ? m.flags | FLAG_NEED_REPLY : m.flags;
    const len = encodeMessage(flags === m.flags ? m : { ...m, flags }, this.buf.dataView);
    if (this.trace) console.error(`fe → ${requestName(m.request)} flags 0x${flags.toString(16)} size ${len - HDR_SIZE} fds ${m.fds.length}`);
    this.sendBuf(len, m.fds, requestName(m.request));
  }

  /** Waits for and decodes the reply to `request`. */
  recvReply(request: number): Message {
    const what = requestName(request);
    const fds: number[] = [];
    const deadline = now() + this.timeoutMs;
    try {
      this.recvExact(0, HDR_SIZE, fds, deadline, what);
      const h = decodeHeader(this.buf.dataView, 0);
      this.recvExact(HDR_SIZE, h.size, fds, deadline, what);
      const payload = new DataView(this.buf.data.buffer, this.buf.data.byteOffset + HDR_SIZE, h.size);
      const m = decodeReply(h, payload, fds, request);
      if (this.trace) console.error(`fe ← ${what} reply size ${h.size} fds ${fds.length}`);
      return m;
    } catch (e) {
      for (const fd of fds) sys.closeQuiet(fd);
      if (e instanceof ProtocolError) throw new FrontendError("BAD_REPLY", what, e.message, { cause: e });
      throw e;
    }
  }

  /**
   * Sends `m`; returns the reply when the request has one (`hasReply`), or
   * the ack when REPLY_ACK is on (a non-zero status throws "NACK"), else null.
   */
  request(m: Message, hasReply = false): Message | null {
    const ack = !hasReply && this.replyAck;
    this.send(m, ack);
    if (!hasReply && !ack) return null;
    const r = this.recvReply(m.request);
    if (ack && r.u64 !== 0n) throw new FrontendError("NACK", requestName(m.request), `status ${r.u64}`);
    return r;
  }

  private u64Reply(request: number): bigint {
    const r = this.request({ request, flags: 0, fds: [] }, true)!;
    if (r.u64 === undefined) throw new FrontendError("BAD_REPLY", requestName(request), "no u64 in the reply");
    return r.u64;
  }

  // ---- typed requests -------------------------------------------------------------

  getFeatures(): bigint {
    return this.u64Reply(Req.GET_FEATURES);
  }

  setFeatures(features: bigint): void {
    this.request({ request: Req.SET_FEATURES, flags: 0, fds: [], u64: features });
  }

  setOwner(): void {
    this.request({ request: Req.SET_OWNER, flags: 0, fds: [] });
  }

  resetOwner(): void {
    this.request({ request: Req.RESET_OWNER, flags: 0, fds: [] });
  }

  getProtocolFeatures(): bigint {
    return this.u64Reply(Req.GET_PROTOCOL_FEATURES);
  }

  /** Sends SET_PROTOCOL_FEATURES (never with NEED_REPLY: REPLY_ACK is not in force yet). */
  setProtocolFeatures(features: bigint): void {
    this.send({ request: Req.SET_PROTOCOL_FEATURES, flags: 0, fds: [], u64: features });
  }

  getQueueNum(): number {
    return Number(this.u64Reply(Req.GET_QUEUE_NUM));
  }

  getMaxMemSlots(): number {
    return Number(this.u64Reply(Req.GET_MAX_MEM_SLOTS));
  }

  /** SET_MEM_TABLE with one fd per region (the same fd may repeat). */
  setMemTable(regions: MemRegion[], fds: readonly number[]): void {
    this.request({ request: Req.SET_MEM_TABLE, flags: 0, fds: [...fds], regions });
  }

  addMemReg(region: MemRegion, fd: number): void {
    this.request({ request: Req.ADD_MEM_REG, flags: 0, fds: [fd], region });
  }

  remMemReg(region: MemRegion): void {
    this.request({ request: Req.REM_MEM_REG, flags: 0, fds: [], region });
  }

  setVringNum(index: number, num: number): void {
    this.request({ request: Req.SET_VRING_NUM, flags: 0, fds: [], state: { index, num } });
  }

  setVringBase(index: number, num: number): void {
    this.request({ request: Req.SET_VRING_BASE, flags: 0, fds: [], state: { index, num } });
  }

  /** GET_VRING_BASE: stops the ring and returns the back-end's next avail index. */
  getVringBase(index: number): number {
    const r = this.request({ request: Req.GET_VRING_BASE, flags: 0, fds: [], state: { index, num: 0 } }, true)!;
    if (r.state === undefined) throw new FrontendError("BAD_REPLY", "GET_VRING_BASE", "no vring state in the reply");
    if (r.state.index !== index) throw new FrontendError("BAD_REPLY", "GET_VRING_BASE", `reply for ring ${r.state.index}, asked ${index}`);
    return r.state.num;
  }

  /** Ring addresses are front-end (user) addresses. */
  setVringAddr(addr: VringAddr): void {
    this.request({ request: Req.SET_VRING_ADDR, flags: 0, fds: [], addr });
  }

  /** `fd` null sends the "no fd" flag (polling). */
  setVringKick(index: number, fd: number | null): void {
    this.request({ request: Req.SET_VRING_KICK, flags: 0, fds: fd === null ? [] : [fd], vring: { index, noFd: fd === null } });
  }

  setVringCall(index: number, fd: number | null): void {
    this.request({ request: Req.SET_VRING_CALL, flags: 0, fds: fd === null ? [] : [fd], vring: { index, noFd: fd === null } });
  }

  setVringErr(index: number, fd: number | null): void {
    this.request({ request: Req.SET_VRING_ERR, flags: 0, fds: fd === null ? [] : [fd], vring: { index, noFd: fd === null } });
  }

  setVringEnable(index: number, enable: boolean): void {
    this.request({ request: Req.SET_VRING_ENABLE, flags: 0, fds: [], state: { index, num: enable ? 1 : 0 } });
  }

  /** GET_CONFIG of `size` bytes at `offset`; an empty reply (the back-end's error) throws "CONFIG". */
  getConfig(offset: number, size: number, flags = 0): Uint8Array {
    const cfg: ConfigSpace = { offset, size, flags, data: new Uint8Array(size) };
    const r = this.request({ request: Req.GET_CONFIG, flags: 0, fds: [], config: cfg }, true)!;
    if (r.config === undefined) throw new FrontendError("CONFIG", "GET_CONFIG", `back-end refused offset ${offset} size ${size}`);
    if (r.config.offset !== offset || r.config.size !== size) {
      throw new FrontendError("BAD_REPLY", "GET_CONFIG", `reply for offset ${r.config.offset} size ${r.config.size}, asked ${offset}/${size}`);
    }
    return r.config.data;
  }

  setConfig(offset: number, data: Uint8Array, flags = 0): void {
    this.request({ request: Req.SET_CONFIG, flags: 0, fds: [], config: { offset, size: data.length, flags, data } });
  }

  resetDevice(): void {
    this.request({ request: Req.RESET_DEVICE, flags: 0, fds: [] });
  }

  setStatus(status: number): void {
    this.request({ request: Req.SET_STATUS, flags: 0, fds: [], u64: BigInt(status) });
  }

  getStatus(): number {
    return Number(this.u64Reply(Req.GET_STATUS));
  }

  /** GET_INFLIGHT_FD: the back-end's inflight area (fd is -1 when mmapSize is 0); the caller owns the fd. */
  getInflightFd(numQueues: number, queueSize: number): { info: InflightInfo; fd: number } {
    const r = this.request({
      request: Req.GET_INFLIGHT_FD, flags: 0, fds: [], inflight: { mmapSize: 0, mmapOffset: 0, numQueues, queueSize },
    }, true)!;
    return { info: r.inflight!, fd: r.fds[0] ?? -1 };
  }

  setInflightFd(info: InflightInfo, fd: number): void {
    this.request({ request: Req.SET_INFLIGHT_FD, flags: 0, fds: [fd], inflight: info });
  }

  // ---- liveness -----------------------------------------------------------------

  /**
   * Reads (and discards) whatever the back-end sent unasked; false when it
   * has closed the connection. Never blocks.
   */
  alive(): boolean {
    if (!this.open) return false;
    return !this.waitClosed(0);
  }

  /**
   * Waits up to `timeoutMs` for the back-end to close the connection;
   * returns true if it did. Data that arrives meanwhile is discarded.
   */
  waitClosed(timeoutMs: number): boolean {
    if (!this.open) return true;
    const deadline = now() + timeoutMs;
    const fds: number[] = [];
    for (;;) {
      const ev = sys.poll1(this.fd, POLLIN, Math.max(0, Math.ceil(deadline - now())));
      if (ev === 0) {
        if (now() >= deadline) return false;
        continue;
      }
      if (ev & POLLNVAL) return true;
      let n: number | null;
      try {
        n = this.buf.recv(this.fd, 0, this.buf.capacity, fds);
      } catch (e) {
        if (e instanceof ErrnoError && e.code === "ECONNRESET") return true;
        throw e;
      }
      for (const fd of fds) sys.closeQuiet(fd);
      fds.length = 0;
      if (n === 0) return true;
      if (n === null) {
        if (ev & (POLLHUP | POLLERR)) return true;
        continue;
      }
      this.unexpectedBytes += n;
    }
  }

  /** Closes the socket; the back-end sees the disconnect. Idempotent. */
  close(): void {
    if (!this.open) return;
    this.open = false;
    sys.closeQuiet(this.fd);
    this.buf.free();
    this.closeBackendChannel();
  }

  // ---- back-end channel, in-band notifications, device state -------------------------

  /** Our end of the back-end channel (see openBackendChannel), or -1. */
  backendFd = -1;
  private backendBuf: sys.MsgBuf | null = null;

  /**
   * Creates the back-end channel (a socketpair), hands one end to the
   * back-end with SET_BACKEND_REQ_FD and keeps the other for `recvBackend`.
   * @example fe.openBackendChannel(); fe.recvBackend(1000)?.request === BackendReq.VRING_CALL;
   */
  openBackendChannel(): void {
    this.closeBackendChannel();
    const [ours, theirs] = sys.socketpair(true);
    try {
      this.request({ request: Req.SET_BACKEND_REQ_FD, flags: 0, fds: [theirs] });
    } catch (e) {
      sys.closeQuiet(ours);
      throw e;
    } finally {
      sys.closeQuiet(theirs);
    }
    this.adoptBackendChannel(ours);
  }

  /** Takes `fd` as our end of a back-end channel whose other end the caller sent (asynchronous drivers). */
  adoptBackendChannel(fd: number): void {
    this.closeBackendChannel();
    this.backendFd = fd;
    this.backendBuf = new sys.MsgBuf(HDR_SIZE + MAX_PAYLOAD);
  }

  /**
   * Waits up to `timeoutMs` for one back-end request (VRING_CALL,
   * CONFIG_CHANGE_MSG, ...) and decodes it; null when none came. Fds that
   * come with it are the caller's. Throws DISCONNECTED, BAD_REPLY, or TIMEOUT
   * for a message cut short.
   */
  recvBackend(timeoutMs = this.timeoutMs): Message | null {
    const fd = this.backendFd;
    const buf = this.backendBuf;
    if (fd < 0 || buf === null) throw new FrontendError("DISCONNECTED", "back-end channel", "not open");
    const fds: number[] = [];
    const deadline = now() + timeoutMs;
    let got = 0;
    let want = HDR_SIZE;
    let h: Header | null = null;
    try {
      for (;;) {
        if (got === want) {
          if (h === null) {
            h = decodeHeader(buf.dataView, 0, true);
            want = HDR_SIZE + h.size;
            if (got < want) continue;
          }
          return decodeBackendRequest(h, new DataView(buf.data.buffer, buf.data.byteOffset + HDR_SIZE, h.size), fds);
        }
        const left = deadline - now();
        if (left <= 0) {
          if (got === 0) return null;
          throw new FrontendError("TIMEOUT", "back-end channel", `message cut short after ${got} bytes`);
        }
        if (sys.poll1(fd, POLLIN, Math.ceil(left)) === 0) continue;
        const n = buf.recv(fd, got, want - got, fds);
        if (n === null) continue;
        if (n === 0) throw new FrontendError("DISCONNECTED", "back-end channel", "the back-end closed it");
        got += n;
      }
    } catch (e) {
      for (const f of fds) sys.closeQuiet(f);
      if (e instanceof ProtocolError) throw new FrontendError("BAD_REPLY", "back-end channel", e.message, { cause: e });
      throw e;
    }
  }

  /** Closes our end of the back-end channel. Idempotent. */
  closeBackendChannel(): void {
    sys.closeQuiet(this.backendFd);
    this.backendFd = -1;
    this.backendBuf?.free();
    this.backendBuf = null;
  }

  /** VRING_KICK (INBAND_NOTIFICATIONS): ring `index` has new buffers. */
  vringKick(index: number): void {
    this.request({ request: Req.VRING_KICK, flags: 0, fds: [], state: { index, num: 0 } });
  }

  /**
   * SET_DEVICE_STATE_FD: hands over `fd`, the back-end's end of a pipe, to
   * save (direction 0) or load (1) its state in `phase` (0: stopped). Returns
   * the status (bits 0-7 of the reply; 0: accepted) and the fd the back-end
   * returned to use instead of ours (-1: none; the caller owns it).
   * @example
   * const { status } = fe.setDeviceStateFd(DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, pipeW);
   * // read our end to EOF, then: fe.checkDeviceState() === 0
   */
  setDeviceStateFd(direction: number, phase: number, fd: number): { status: number; fd: number } {
    const r = this.request({ request: Req.SET_DEVICE_STATE_FD, flags: 0, fds: [fd], deviceState: { direction, phase } }, true)!;
    const v = Number(r.u64! & 0x1ffn);
    return { status: v & 0xff, fd: (v & 0x100) === 0 ? r.fds[0]! : -1 };
  }

  /** CHECK_DEVICE_STATE: 0 when the back-end saved or loaded its state successfully. */
  checkDeviceState(): number {
    return Number(this.u64Reply(Req.CHECK_DEVICE_STATE));
  }

  // ---- IOTLB (VIRTIO_F_ACCESS_PLATFORM behind a vIOMMU) ------------------------------

  /**
   * IOTLB_MSG UPDATE: the device may access [iova, iova + size) as our
   * memory at `uaddr` (a front-end address inside the memory table) with
   * `perm` (1 read, 2 write, 3 both). Like QEMU, always asks for the status.
   * @example fe.iotlbUpdate(0xfff0_0000, 4096, ram.uva(gpa), 3);
   */
  iotlbUpdate(iova: number, size: number, uaddr: number, perm: number): void {
    this.iotlbMsg({ type: IOTLB_UPDATE, iova, size, uaddr, perm });
  }

  /** IOTLB_MSG INVALIDATE of [iova, iova + size): answered once the device no longer uses it. */
  iotlbInvalidate(iova: number, size: number): void {
    this.iotlbMsg({ type: IOTLB_INVALIDATE, iova, size, uaddr: 0, perm: 0 });
  }

  private iotlbMsg(t: IotlbMsg): void {
    const m: Message = { request: Req.IOTLB_MSG, flags: 0, fds: [], iotlb: t };
    this.send(m, true);
    const r = this.recvReply(Req.IOTLB_MSG);
    if (r.u64 !== 0n) throw new FrontendError("NACK", "IOTLB_MSG", `status ${r.u64}`);
  }

  /**
   * Answers the back-end's IOTLB misses waiting on the back-end channel (for
   * up to `timeoutMs` for the first one): `resolve(iova, perm)` gives the
   * entry to send as an UPDATE, or null to send nothing (an invalid address,
   * as the spec allows). Returns the misses and access failures seen.
   * @example fe.serveIotlb((iova) => ({ iova: iova & ~0xfff, size: 4096, uaddr: ram.uva(iova & ~0xfff), perm: 3 }));
   */
  serveIotlb(
    resolve: (iova: number, perm: number) => { iova: number; size: number; uaddr: number; perm: number } | null,
    timeoutMs = 0,
  ): { misses: IotlbMsg[]; accessFails: IotlbMsg[]; closed: boolean } {
    const out = { misses: [] as IotlbMsg[], accessFails: [] as IotlbMsg[], closed: false };
    for (let wait = timeoutMs; ; wait = 0) {
      if (this.backendFd < 0 || sys.poll1(this.backendFd, POLLIN, wait) === 0) return out;
      let m: Message | null;
      try {
        m = this.recvBackend();
      } catch (e) {
        // The back-end hung up (it ends the connection after a refused access, for one).
        if (e instanceof FrontendError && e.code === "DISCONNECTED") return { ...out, closed: true };
        throw e;
      }
      if (m === null) return out;
      if (m.iotlb?.type === IOTLB_MISS) {
        out.misses.push(m.iotlb);
        const e = resolve(m.iotlb.iova, m.iotlb.perm);
        if (e) this.iotlbUpdate(e.iova, e.size, e.uaddr, e.perm);
      } else if (m.iotlb?.type === IOTLB_ACCESS_FAIL) {
        out.accessFails.push(m.iotlb);
      }
      for (const fd of m.fds) sys.closeQuiet(fd);
    }
  }
}

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
  }
}

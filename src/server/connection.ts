/**
 * One front-end connection: reads vhost-user messages (header, payload, fds)
 * from a non-blocking unix socket with recvmsg, hands them to the VuDev one
 * at a time and writes replies.
 *
 * Fds arrive with the first byte of a message; all fds received while
 * assembling a message belong to it. A message that fails to decode has its
 * fds closed here. While a message is being handled (which may wait for
 * in-flight requests) the socket is not watched, so messages are processed
 * strictly in order.
 */
import * as sys from "../../ffi/sys.ts";
import { POLLOUT } from "../../ffi/constants.ts";
import { ProtocolError } from "../errors.ts";
import type { EventLoop } from "../device/loop.ts";
import type { Logger } from "../device/log.ts";
import { Refused, type VuDev } from "../device/vu_dev.ts";
import { decodeHeader, decodeRequest, type Header } from "../protocol/decode.ts";
import { encodeMessage } from "../protocol/encode.ts";
import { FLAG_NEED_REPLY, FLAG_REPLY, HDR_SIZE, requestName, type Message } from "../protocol/messages.ts";
import { describeMessage } from "../protocol/describe.ts";

export class Connection {
  private readonly rx = new sys.MsgBuf(HDR_SIZE + 4096);
  private readonly tx = new sys.MsgBuf(HDR_SIZE + 4096);
  private got = 0;
  private header: Header | null = null;
  private fds: number[] = [];
  private watchId = -1;
  private closed = false;
  /** Resolves when the connection has ended and everything is released. */
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  messages = 0;

  constructor(
    readonly fd: number, readonly dev: VuDev, private readonly loop: EventLoop, private readonly log: Logger,
    private readonly trace = false,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
    this.watchId = loop.watch(fd, () => this.onReadable());
  }

  private onReadable(): void {
    if (this.closed) return;
    try {
      for (;;) {
        const want = this.header === null ? HDR_SIZE - this.got : HDR_SIZE + this.header.size - this.got;
        if (want > 0) {
          const n = this.rx.recv(this.fd, this.got, want, this.fds);
          if (this.rx.ctrunc) throw new ProtocolError("message", "fds", "more fds than a message can carry (control data truncated)");
          if (n === null) return; // wait for more
          if (n === 0) {
            void this.end("front-end closed the connection");
            return;
          }
          this.got += n;
          continue;
        }
        if (this.header === null) {
          this.header = decodeHeader(this.rx.dataView, 0);
          continue;
        }
        // A whole message: decode it and stop reading until it is handled.
        const h = this.header;
        const fds = this.fds;
        this.header = null;
        this.got = 0;
        this.fds = [];
        let m: Message;
        try {
          m = decodeRequest(h, new DataView(this.rx.data.buffer, this.rx.data.byteOffset + HDR_SIZE, h.size), fds, { queues: this.dev.vrings.length });
        } catch (e) {
          for (const f of fds) sys.closeQuiet(f);
          throw e;
        }
        this.pause();
        void this.dispatch(m);
        return;
      }
    } catch (e) {
      this.fail(e);
    }
  }

  private pause(): void {
    if (this.watchId >= 0) this.loop.unwatch(this.watchId);
    this.watchId = -1;
  }

  private async dispatch(m: Message): Promise<void> {
    this.messages++;
    if (this.trace) this.log.info(`<- ${describeMessage(m)}`);
    const needReply = (m.flags & FLAG_NEED_REPLY) !== 0 && this.dev.replyAck;
    let reply: Message | null = null;
    let status = 0n;
    try {
      reply = await this.dev.handle(m);
    } catch (e) {
      for (const f of m.fds) sys.closeQuiet(f);
      if (e instanceof Refused) {
        this.log.warn(`${requestName(m.request)} refused: ${e.message}`);
        status = 1n;
      } else {
        this.fail(e);
        return;
      }
    }
    if (this.closed) return;
    try {
      if (reply) {
        try {
          this.send(reply);
        } finally {
          // fds sent with a reply were duplicated into the front-end; ours are not needed.
          for (const f of reply.fds) sys.closeQuiet(f);
        }
      }
      else if (needReply) this.send({ request: m.request, flags: 0, fds: [], u64: status });
    } catch (e) {
      this.fail(e);
      return;
    }
    if (this.dev.broken) {
      void this.end(`device broken: ${this.dev.broken.message}`);
      return;
    }
    this.watchId = this.loop.watch(this.fd, () => this.onReadable());
  }

  private send(m: Message): void {
    m.flags |= FLAG_REPLY;
    if (this.trace) this.log.info(`-> ${describeMessage(m)}`);
    const len = encodeMessage(m, this.tx.dataView);
    let off = 0;
    const deadline = Date.now() + 5000;
    while (off < len) {
      const n = this.tx.send(this.fd, off, len - off, off === 0 ? m.fds : []);
      if (n === null) {
        if (Date.now() > deadline) throw new Error(`sendmsg: front-end does not read its socket (${requestName(m.request)} reply)`);
        sys.poll1(this.fd, POLLOUT, 100);
        continue;
      }
      off += n;
    }
  }

  private fail(e: unknown): void {
    const what = e instanceof Error ? e.message : String(e);
    if (e instanceof Error && (e.name === "ProtocolError" || e.name === "GuestMemoryError" || e.name === "ErrnoError")) {
      this.log.error(`front-end error, ending the connection: ${what}`);
    } else if (e instanceof Error && e.name === "DeviceError") {
      this.log.error(`device error, ending the connection: ${what}`); // the stack was logged where it arose
    } else {
      this.log.error(`internal error, ending the connection: ${e instanceof Error ? e.stack : what}`);
    }
    void this.end(what);
  }

  /** Ends the connection: waits for in-flight requests, releases all state, closes the socket. */
  async end(reason: string): Promise<void> {
    // Ending already (the front-end hung up just before a stop): wait for that teardown to finish.
    if (this.closed) return this.done;
    this.closed = true;
    this.pause();
    this.log.info(`front-end disconnected: ${reason} (${this.messages} messages)`);
    try {
      await this.dev.teardown();
    } catch (e) {
      this.log.error(`teardown: ${e instanceof Error ? e.stack : e}`);
    }
    for (const f of this.fds) sys.closeQuiet(f);
    this.fds = [];
    sys.closeQuiet(this.fd);
    this.rx.free();
    this.tx.free();
    this.resolveDone();
  }
}

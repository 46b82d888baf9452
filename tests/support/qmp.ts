/**
 * A QMP client for QEMU's `-qmp unix:PATH,server=on,wait=off`.
 *
 * Theory of operation. QEMU greets a new connection with one `{"QMP": ...}`
 * line and accepts commands only after `qmp_capabilities`. Each reply is one
 * JSON line, `{"return": ...}` or `{"error": {class, desc}}`, carrying the
 * `id` we sent with the command; asynchronous `{"event": ...}` lines come in
 * between and are kept in `events`. Every command has a deadline, so a QEMU
 * that stops answering fails the test instead of hanging it.
 */
import { createConnection, type Socket } from "node:net";

const DEFAULT_TIMEOUT_MS = 10_000;

/** An `{"error": ...}` reply, a closed connection or a deadline, for one command. */
export class QmpError extends Error {
  override name = "QmpError";
  constructor(readonly command: string, readonly errorClass: string, detail: string) {
    super(`QMP ${command}: ${errorClass}: ${detail}`);
  }
}

export interface QmpEvent {
  event: string;
  data?: unknown;
  /** When the line arrived (performance.now()). */
  at: number;
}

interface Pending {
  command: string;
  resolve: (v: any) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

export class Qmp {
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buf = "";
  private greeted!: () => void;
  private readonly greeting = new Promise<void>((res) => (this.greeted = res));
  private closed = false;

  private constructor(private readonly sock: Socket, readonly path: string) {
    sock.on("data", (c: Buffer) => this.onData(c));
    sock.on("close", () => this.fail("connection closed"));
    sock.on("error", () => {}); // "close" follows and fails what is pending
  }

  /**
   * Connects (retrying until QEMU has created the socket), waits for the
   * greeting and leaves capabilities negotiation mode.
   * @example
   * const qmp = await Qmp.connect(join(dir, "qmp.sock"));
   * const { status } = await qmp.execute("query-status");
   */
  static async connect(path: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let q: Qmp | null = null;
      try {
        const sock = await new Promise<Socket>((res, rej) => {
          const s = createConnection(path, () => res(s));
          s.once("error", rej);
        });
        q = new Qmp(sock, path);
        const left = Math.max(deadline - Date.now(), 1);
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([q.greeting, new Promise((_, rej) => (timer = setTimeout(() => rej(new Error("no greeting")), left)))])
          .finally(() => clearTimeout(timer));
        await q.execute("qmp_capabilities", undefined, left);
        return q;
      } catch (e) {
        q?.close();
        if (Date.now() > deadline) throw new Error(`QMP: cannot connect to ${path}: ${(e as Error).message}`, { cause: e });
        await Bun.sleep(20);
      }
    }
  }

  private onData(chunk: Buffer): void {
    this.buf += chunk.toString("utf8");
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(JSON.parse(line));
    }
  }

  private onMessage(m: any): void {
    if (m.QMP) return this.greeted();
    if (m.event) {
      this.events.push({ event: m.event, data: m.data, at: performance.now() });
      return;
    }
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    clearTimeout(p.timer);
    if (m.error) p.reject(new QmpError(p.command, m.error.class, m.error.desc));
    else p.resolve(m.return);
  }

  private fail(why: string): void {
    this.closed = true;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new QmpError(p.command, "Transport", why));
    }
  }

  /** Runs `command`; resolves with its `return` value, rejects with a QmpError. */
  execute(command: string, args?: Record<string, unknown>, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<any> {
    if (this.closed) return Promise.reject(new QmpError(command, "Transport", "connection closed"));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError(command, "Timeout", `no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      this.sock.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + "\n");
    });
  }

  /** Waits until an event named `name` has arrived (or already had). */
  async waitEvent(name: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = this.events.find((x) => x.event === name);
      if (e) return e;
      if (Date.now() > deadline) throw new Error(`QMP: no ${name} event within ${timeoutMs} ms`);
      await Bun.sleep(10);
    }
  }

  close(): void {
    this.fail("closed by the test");
    this.sock.destroy();
  }
}

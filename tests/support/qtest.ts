/**
 * Driving QEMU without a guest: the qtest protocol and the firmware that
 * keeps the CPU out of the way (the QMP client is in qmp.ts).
 *
 * Theory of operation. `-qtest unix:PATH` makes QEMU connect to PATH as a
 * client, so the test listens first (`QtestListener.open`), starts QEMU and
 * then `accept`s. The protocol is one text line per command and one reply
 * line per command (`OK`, `OK <value>`, `FAIL <reason>`), strictly in order,
 * so pending commands are a FIFO of promises. QEMU may also send unsolicited
 * `IRQ raise|lower N` lines (only after `irq_intercept_*`, which we never
 * send); they are skipped. QEMU does not exit when the qtest socket closes:
 * whoever starts it must kill it.
 *
 * The firmware is 64 KiB of `hlt` with `hlt; jmp -3` at the reset vector, so
 * the vCPU parks at once and nothing but the test touches PCI devices. QMP
 * (`-qmp unix:PATH,server=on,wait=off`, client in qmp.ts) is for what qtest
 * cannot do, such as `system_reset` and `quit`.
 */
import { createServer, type Server, type Socket } from "node:net";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const DEFAULT_TIMEOUT_MS = 10_000;

/** An error reported by QEMU (`FAIL ...`) or by the transport (closed socket, timeout). */
export class QtestError extends Error {
  override name = "QtestError";
  constructor(readonly command: string, detail: string) {
    super(`qtest ${command.length > 80 ? command.slice(0, 80) + "…" : command}: ${detail}`);
  }
}

/**
 * Writes the hlt firmware as `dir/hlt.bin` (unless an identical file is there) and returns its path.
 * @example
 * const bios = hltFirmware(tmp); // then QemuProcess.start({ bios, qtest: ... })
 */
export function hltFirmware(dir: string): string {
  const fw = new Uint8Array(65536).fill(0xf4);
  fw.set([0xf4, 0xeb, 0xfd], 0xfff0);
  const path = join(dir, "hlt.bin");
  if (!existsSync(path) || !Buffer.from(fw).equals(readFileSync(path))) writeFileSync(path, fw);
  return path;
}

/** Splits a byte stream into lines and hands each to `onLine`. */
class LineReader {
  private buf = "";
  constructor(private readonly onLine: (line: string) => void) {}
  push(chunk: Buffer): void {
    this.buf += chunk.toString("latin1");
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      this.onLine(line);
    }
  }
}

interface Pending {
  command: string;
  resolve: (v: string) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** A unix-socket listener QEMU's `-qtest unix:PATH` connects to. */
export class QtestListener {
  private conn: Socket | null = null;
  private waiter: ((s: Socket) => void) | null = null;

  private constructor(private readonly server: Server, readonly path: string) {
    server.on("connection", (s) => {
      if (this.conn) {
        s.destroy();
        return;
      }
      this.conn = s;
      this.waiter?.(s);
    });
  }

  /** Listens on `path` (removing a stale socket first). */
  static async open(path: string): Promise<QtestListener> {
    rmSync(path, { force: true });
    const server = createServer();
    await new Promise<void>((res, rej) => {
      server.once("error", rej);
      server.listen(path, () => {
        server.off("error", rej);
        res();
      });
    });
    return new QtestListener(server, path);
  }

  /**
   * Waits for QEMU to connect. `alive` is polled so that a QEMU that died
   * (bad command line) fails fast instead of timing out.
   */
  async accept(o: { timeoutMs?: number; alive?: () => string | null } = {}): Promise<Qtest> {
    const deadline = Date.now() + (o.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    while (!this.conn) {
      const dead = o.alive?.();
      if (dead) throw new QtestError("accept", `QEMU is gone (${dead}) before connecting to ${this.path}`);
      if (Date.now() > deadline) throw new QtestError("accept", `no connection on ${this.path}`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, 20);
        this.waiter = () => {
          clearTimeout(t);
          res();
        };
      });
    }
    this.waiter = null;
    return new Qtest(this.conn);
  }

  close(): void {
    this.conn?.destroy();
    this.server.close();
    rmSync(this.path, { force: true });
  }
}

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

/** One qtest connection. Numbers are plain numbers (addresses < 2^53); `readq`/`writeq` use bigint. */
export class Qtest {
  private readonly pending: Pending[] = [];
  private closed: string | null = null;
  /** Commands sent so far; the tests report it with their timings. */
  commands = 0;
  timeoutMs = DEFAULT_TIMEOUT_MS;

  constructor(private readonly sock: Socket) {
    const reader = new LineReader((line) => this.onLine(line));
    sock.on("data", (c: Buffer) => reader.push(c));
    sock.on("close", () => this.fail("connection closed by QEMU"));
    sock.on("error", (e) => this.fail(`socket error: ${e.message}`));
  }

  private onLine(line: string): void {
    if (line.startsWith("IRQ ")) return;
    const p = this.pending.shift();
    if (!p) return;
    clearTimeout(p.timer);
    if (line === "OK") p.resolve("");
    else if (line.startsWith("OK ")) p.resolve(line.slice(3));
    else p.reject(new QtestError(p.command, line));
  }

  private fail(why: string): void {
    this.closed ??= why;
    for (const p of this.pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(new QtestError(p.command, why));
    }
  }

  /** Sends one command line; resolves with the text after `OK` (maybe empty), rejects on `FAIL`. */
  cmd(line: string): Promise<string> {
    if (this.closed) return Promise.reject(new QtestError(line, this.closed));
    this.commands++;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.pending.findIndex((p) => p.timer === timer);
        if (i >= 0) this.pending.splice(i, 1);
        // A lost reply desynchronises the FIFO for good: refuse everything after it.
        this.fail(`no reply within ${this.timeoutMs} ms`);
        reject(new QtestError(line, `no reply within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.push({ command: line, resolve, reject, timer });
      this.sock.write(line + "\n");
    });
  }

  private async num(line: string): Promise<number> {
    const v = await this.cmd(line);
    const n = Number(v);
    if (!v.startsWith("0x") || !Number.isSafeInteger(n)) throw new QtestError(line, `unexpected reply "${v}"`);
    return n;
  }

  outb(port: number, v: number) { return this.cmd(`outb ${hex(port)} ${hex(v)}`).then(() => {}); }
  outw(port: number, v: number) { return this.cmd(`outw ${hex(port)} ${hex(v)}`).then(() => {}); }
  outl(port: number, v: number) { return this.cmd(`outl ${hex(port)} ${hex(v >>> 0)}`).then(() => {}); }
  inb(port: number) { return this.num(`inb ${hex(port)}`); }
  inw(port: number) { return this.num(`inw ${hex(port)}`); }
  inl(port: number) { return this.num(`inl ${hex(port)}`); }

  writeb(addr: number, v: number) { return this.cmd(`writeb ${hex(addr)} ${hex(v)}`).then(() => {}); }
  writew(addr: number, v: number) { return this.cmd(`writew ${hex(addr)} ${hex(v)}`).then(() => {}); }
  writel(addr: number, v: number) { return this.cmd(`writel ${hex(addr)} ${hex(v >>> 0)}`).then(() => {}); }
  writeq(addr: number, v: bigint) { return this.cmd(`writeq ${hex(addr)} ${hex(BigInt.asUintN(64, v))}`).then(() => {}); }
  readb(addr: number) { return this.num(`readb ${hex(addr)}`); }
  readw(addr: number) { return this.num(`readw ${hex(addr)}`); }
  readl(addr: number) { return this.num(`readl ${hex(addr)}`); }
  async readq(addr: number): Promise<bigint> {
    const line = `readq ${hex(addr)}`;
    const v = await this.cmd(line);
    if (!/^0x[0-9a-f]+$/i.test(v)) throw new QtestError(line, `unexpected reply "${v}"`);
    return BigInt(v);
  }

  /** Guest memory (or MMIO) bytes at `addr`, through `b64read`. */
  async memread(addr: number, len: number): Promise<Uint8Array> {
    if (len === 0) return new Uint8Array(0);
    const line = `b64read ${hex(addr)} ${hex(len)}`;
    const b = Buffer.from(await this.cmd(line), "base64");
    if (b.length !== len) throw new QtestError(line, `got ${b.length} bytes`);
    return new Uint8Array(b.buffer, b.byteOffset, b.length);
  }

  /** Writes `data` to guest memory at `addr`, through `b64write`. */
  async memwrite(addr: number, data: Uint8Array): Promise<void> {
    if (data.length === 0) return;
    await this.cmd(`b64write ${hex(addr)} ${hex(data.length)} ${Buffer.from(data.buffer, data.byteOffset, data.length).toString("base64")}`);
  }

  async memset(addr: number, len: number, byte: number): Promise<void> {
    await this.cmd(`memset ${hex(addr)} ${hex(len)} ${hex(byte)}`);
  }

  close(): void {
    this.fail("closed by the test");
    this.sock.destroy();
  }
}

/** The QMP client lives in qmp.ts; re-exported for existing users. */
export { Qmp } from "./qmp.ts";

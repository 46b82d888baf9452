/**
 * The vhost-user server (the seed's VuServer).
 *
 * Theory of operation: listen on a unix socket; serve one front-end at a
 * time with a fresh VuDev over the same Device (so a disk keeps its data
 * across connections); a second front-end that connects meanwhile is
 * refused with a log line and never disturbs the first. When the front-end
 * goes away (or breaks the protocol, or its guest breaks a ring) the
 * connection waits for its in-flight requests, unmaps guest memory, closes
 * every fd, and the server takes the next front-end. While a front-end is
 * served the listening socket is not watched: a second front-end waits in
 * the listen backlog (as with qemu-storage-daemon) and is served once the
 * first has gone, so a front-end that reconnects at once is never turned
 * away because its old connection's EOF was not yet seen. stop() does the
 * same and removes the socket file.
 */
import { existsSync, lstatSync, unlinkSync } from "node:fs";
import * as sys from "../../ffi/sys.ts";
import type { Device, Queues } from "../device/api.ts";
import type { Logger } from "../device/log.ts";
import type { EventLoop } from "../device/loop.ts";
import { VuDev } from "../device/vu_dev.ts";
import { Connection } from "./connection.ts";
import { MainLoop } from "./event_loop.ts";
import { ErrnoError } from "../../ffi/errno.ts";
import type { RingChannel } from "../device/remote_vring.ts";

export interface ServerOptions {
  socketPath: string;
  device: Device;
  log: Logger;
  /** Print every message both ways. */
  trace?: boolean;
  /** Defaults to a new MainLoop (Bun's main thread). */
  loop?: EventLoop & { close?(): void; ref?(on: boolean): void };
  /** I/O threads (started, `ready` awaited by the caller) and the thread of each queue (-1: main loop). */
  threads?: (RingChannel & { close?(): Promise<void> })[];
  queueThread?: number[];
}

export class VuServer {
  private listenFd = -1;
  private listenWatch = -1;
  private conn: Connection | null = null;
  readonly loop: EventLoop & { close?(): void; ref?(on: boolean): void };
  private stopping: Promise<void> | null = null;
  /** Number of front-ends served so far. */
  connections = 0;

  /** The device served (the main thread's instance); a hot reload replaces it. */
  device: Device;
  /** Receive queues of the main thread's instance: rings of the current front-end served on the main loop. */
  readonly queues: Queues = {
    take: (q) => this.conn?.dev.takeLocal(q) ?? null,
    giveBack: (r) => this.conn?.dev.giveBackLocal(r) ?? false,
  };
  private attached = false;

  constructor(readonly opts: ServerOptions) {
    this.loop = opts.loop ?? new MainLoop();
    this.device = opts.device;
  }

  get log(): Logger {
    return this.opts.log;
  }

  /** The connected front-end's device state, if any. */
  get current(): VuDev | null {
    return this.conn?.dev ?? null;
  }

  /**
   * Binds and listens. Refuses when a live server answers on the path;
   * replaces a stale socket file left by a dead one.
   */
  start(): void {
    if (!this.attached) {
      // The main thread's instance serves rings on this loop (--threads 0, --queue-map N:main, moves).
      this.attached = true;
      this.device.attach?.(this.loop, this.queues);
    }
    const path = this.opts.socketPath;
    if (existsSync(path)) {
      if (!lstatSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
      const probe = sys.socketUnix(false);
      let live = false;
      try {
        sys.connectUnix(probe, path);
        live = true;
      } catch (e) {
        if (!(e instanceof ErrnoError && (e.code === "ECONNREFUSED" || e.code === "ENOENT"))) throw e;
      } finally {
        sys.closeQuiet(probe);
      }
      if (live) throw new Error(`${path}: another server is listening there`);
      unlinkSync(path);
      this.log.info(`removed stale socket ${path}`);
    }
    const fd = sys.socketUnix(true);
    try {
      sys.bindUnix(fd, path);
      sys.listen(fd, 4);
    } catch (e) {
      sys.closeQuiet(fd);
      throw e;
    }
    this.listenFd = fd;
    this.watchListener();
    this.loop.ref?.(true);
  }

  private watchListener(): void {
    if (this.listenWatch < 0 && this.listenFd >= 0 && !this.stopping) {
      this.listenWatch = this.loop.watch(this.listenFd, () => this.onAccept());
    }
  }

  private unwatchListener(): void {
    if (this.listenWatch >= 0) this.loop.unwatch(this.listenWatch);
    this.listenWatch = -1;
  }

  private onAccept(): void {
    if (this.conn !== null || this.stopping) return;
    let fd: number | null;
    try {
      fd = sys.accept(this.listenFd);
    } catch (e) {
      this.log.error(`accept: ${e instanceof Error ? e.message : e}`);
      return;
    }
    if (fd !== null) this.serve(fd);
  }

  private serve(fd: number): void {
    this.connections++;
    this.log.info(`front-end connected (connection ${this.connections})`);
    let conn: Connection;
    const dev = new VuDev(this.device, {
      log: this.log,
      loop: this.loop,
      onBroken: (e) => void conn.end(`device broken: ${e.message}`),
      threads: this.opts.threads,
      queueThread: this.opts.queueThread,
      trace: this.opts.trace,
    });
    conn = new Connection(fd, dev, this.loop, this.log, this.opts.trace);
    this.conn = conn;
    this.unwatchListener();
    void conn.done.then(() => {
      if (this.conn === conn) this.conn = null;
      // Back to listening: a front-end already waiting in the backlog is accepted at once.
      this.watchListener();
    });
  }

  /** Where each queue runs and how many front-ends were served. */
  stats(): { connections: number; connected: boolean; queues: { index: number; where: string; started: boolean }[] } {
    const dev = this.current;
    const names = (t: number) => (t < 0 ? "main" : this.opts.threads?.[t]?.name ?? `thread ${t}`);
    const queues = dev
      ? dev.vrings.map((v) => ({ index: v.index, where: v.where, started: v.started }))
      : Array.from({ length: this.device.queues }, (_, i) => ({ index: i, where: names(this.opts.queueThread?.[i] ?? -1), started: false }));
    return { connections: this.connections, connected: dev !== null, queues };
  }

  /**
   * Moves queue `q` to I/O thread `thread` (-1: the main loop), for this
   * front-end (safely, under load) and the following ones. Returns where it runs now.
   */
  async moveQueue(q: number, thread: number): Promise<string> {
    if (!Number.isInteger(q) || q < 0 || q >= this.device.queues) throw new RangeError(`no queue ${q}`);
    if (thread >= (this.opts.threads?.length ?? 0)) throw new RangeError(`no I/O thread ${thread}`);
    const map = (this.opts.queueThread ??= Array.from({ length: this.device.queues }, () => -1));
    map[q] = thread;
    const dev = this.current;
    if (dev) await dev.moveQueue(q, thread);
    return thread < 0 ? "main" : this.opts.threads![thread]!.name;
  }

  /**
   * Re-reads what may have changed outside the device (an image resized by
   * its owner) in every thread's instance, and tells the connected front-end
   * when the config space changed. Returns "changed", "unchanged", or
   * "changed, front-end not told" (no back-end channel).
   */
  async refreshDevice(): Promise<string> {
    const changed = this.device.refresh?.() ?? false;
    for (const t of this.opts.threads ?? []) await t.request({ op: "refresh" });
    if (!changed) return "unchanged";
    const dev = this.current;
    return dev && dev.configChanged() ? "changed" : "changed, front-end not told";
  }

  /** Resolves when the current front-end (if any) has gone. */
  async idle(): Promise<void> {
    while (this.conn) await this.conn.done;
  }

  /**
   * Stops listening, ends the current connection after its in-flight
   * requests completed, removes the socket file and closes the loop.
   */
  stop(): Promise<void> {
    return (this.stopping ??= (async () => {
      this.unwatchListener();
      sys.closeQuiet(this.listenFd);
      this.listenFd = -1;
      try {
        unlinkSync(this.opts.socketPath);
      } catch {
        // already gone
      }
      if (this.conn) await this.conn.end("server stopping");
      // A multi-port device's sockets share their threads: serve() closes those.
      for (const t of this.opts.threads ?? []) await t.close?.();
      this.loop.close?.();
    })());
  }
}

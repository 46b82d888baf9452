/**
 * Hot reload of a device module (`--watch`).
 *
 * Theory of operation. When the device file or one of its own imports
 * changes, the new code is loaded first, on the main thread and in every I/O
 * thread (each builds an instance but keeps serving with the old one). If any
 * of that fails (a syntax error, a throw in the factory, a device of another
 * shape, another VIRTIO id or queue count, or fewer features than the driver
 * negotiated) the new instances are dropped and the old device keeps
 * serving; the error is logged with file:line. Otherwise the rings are
 * quiesced (no chain taken, in-flight requests finished on the old
 * instance), each thread moves its old instance's state into the new one
 * (saveState/loadState) and swaps, and the rings resume from exactly the
 * positions they had: the guest sees no reset, no error and no reconnect. If
 * the config space differs, the driver is told (CONFIG_CHANGE_MSG).
 */
import { watch, type FSWatcher } from "node:fs";
import { basename, dirname } from "node:path";
import type { Device } from "../device/api.ts";
import type { Logger } from "../device/log.ts";
import { TRANSPORT_FEATURES } from "../protocol/features.ts";
import { DeviceModuleError, importDeviceModule, instantiate, moduleFiles } from "./device_module.ts";
import type { IoThread } from "./io_thread.ts";
import type { VuServer } from "./vu_server.ts";


export interface ReloadResult {
  /** How long the rings were paused, ms (0 with no front-end connected). */
  pausedMs: number;
  /** The config space differs from the old instance's. */
  configChanged: boolean;
  /** The driver was told of the config change (back-end channel). */
  told: boolean;
}

/** Why `next` cannot replace `old` under the connected driver, or null. */
export function reloadRefusal(old: Device, next: Device, negotiated: bigint | null): string | null {
  if (next.type !== old.type) return `VIRTIO id ${next.type} differs from the running device's ${old.type}`;
  if (next.queues !== old.queues) return `${next.queues} queues differ from the running device's ${old.queues}`;
  if (negotiated !== null) {
    const missing = negotiated & ~TRANSPORT_FEATURES & ~next.features;
    if (missing !== 0n) return `the driver negotiated feature bits 0x${missing.toString(16)} that the new code does not offer`;
  }
  return null;
}

const sameBytes = (a: Uint8Array, b: Uint8Array) => a.length === b.length && a.every((x, i) => x === b[i]);

export class DeviceReloader {
  private watchers: FSWatcher[] = [];
  private timer: ReturnType<typeof setTimeout> | null = null;
  private running: Promise<unknown> | null = null;
  private again = false;
  private closed = false;
  /** Reloads that took effect. */
  reloads = 0;

  constructor(
    private readonly server: VuServer,
    readonly file: string,
    /** The prepared options every instance is built from. */
    private readonly options: unknown,
    private readonly threads: readonly IoThread[],
    private readonly log: Logger,
  ) {}

  /**
   * Loads the device file afresh and swaps it in if it may; throws (and the
   * old device keeps serving) if not.
   */
  async reload(): Promise<ReloadResult> {
    const t0 = performance.now();
    const mod = await importDeviceModule(this.file, true);
    const next = await instantiate(this.file, mod, this.options, { thread: "main", log: this.log });
    const old = this.server.device;
    const dev = this.server.current;
    const why = reloadRefusal(old, next, dev?.negotiated ? dev.features : null);
    if (why !== null) {
      next.close?.();
      throw new DeviceModuleError(this.file, "reload", `${why}: keeping the running device`);
    }
    const prepared: IoThread[] = [];
    try {
      for (const t of this.threads) {
        const d = await t.request({ op: "reloadPrepare", module: this.file, options: this.options, fresh: true });
        prepared.push(t);
        if (d.type !== next.type || d.queues !== next.queues || d.features !== next.features) {
          throw new DeviceModuleError(this.file, "reload", `${t.name} built a different device (VIRTIO id ${d.type}, ${d.queues} queues)`);
        }
      }
    } catch (e) {
      for (const t of prepared) await t.request({ op: "reloadDrop" }).catch(() => {});
      next.close?.();
      throw e;
    }
    const before = old.config();
    const loadMs = performance.now() - t0;
    const swapThreads = async () => {
      for (const t of this.threads) await t.request({ op: "reloadSwap", features: dev?.negotiated ? dev.features : null });
    };
    next.attach?.(this.server.loop, this.server.queues);
    let pausedMs = 0;
    if (dev) {
      pausedMs = await dev.swapDevice(next, swapThreads);
    } else {
      const state = old.saveState?.();
      if (state !== undefined && next.loadState) next.loadState(state);
      await swapThreads();
    }
    this.server.device = next;
    old.close?.();
    this.reloads++;
    const configChanged = !sameBytes(before, next.config());
    const told = configChanged && dev !== null && dev.negotiated ? dev.configChanged() : false;
    this.log.info(
      `reloaded ${this.file} (loaded in ${loadMs.toFixed(1)} ms, rings paused ${pausedMs.toFixed(2)} ms` +
        `${configChanged ? `; config space changed${told ? ", driver told" : dev ? ", driver not told (no back-end channel)" : ""}` : ""})`,
    );
    return { pausedMs, configChanged, told };
  }

  /** Watches the device file and its own imports; a change reloads (debounced), an error is logged. */
  async watch(): Promise<void> {
    await this.rewatch();
  }

  private async rewatch(): Promise<void> {
    for (const w of this.watchers) w.close();
    this.watchers = [];
    if (this.closed) return;
    const files = new Set(await moduleFiles(this.file));
    // Directories, not files: editors replace a file by renaming a new one over it.
    const dirs = new Map<string, Set<string>>();
    for (const f of files) {
      const d = dirname(f);
      if (!dirs.has(d)) dirs.set(d, new Set());
      dirs.get(d)!.add(basename(f));
    }
    for (const [d, names] of dirs) {
      try {
        const w = watch(d, (_event, name) => {
          if (name !== null && names.has(String(name))) this.changed();
        });
        w.on("error", () => {});
        this.watchers.push(w);
      } catch (e) {
        this.log.warn(`--watch: cannot watch ${d}: ${(e as Error).message}`);
      }
    }
  }

  private changed(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    // Editors write in several steps: wait until the file has been quiet briefly.
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.run();
    }, 100);
  }

  private async run(): Promise<void> {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = (async () => {
      do {
        this.again = false;
        if (!(await Bun.file(this.file).exists())) {
          this.log.warn(`--watch: ${this.file} is gone: keeping the running device`);
          continue;
        }
        try {
          await this.reload();
        } catch (e) {
          this.log.error(`reload failed, the running device keeps serving: ${e instanceof Error ? e.message : e}`);
        }
        await this.rewatch();
      } while (this.again && !this.closed);
    })();
    try {
      await this.running;
    } finally {
      this.running = null;
    }
  }

  close(): void {
    this.closed = true;
    if (this.timer !== null) clearTimeout(this.timer);
    for (const w of this.watchers) w.close();
    this.watchers = [];
  }
}

/**
 * A line-based control socket for a running server (`--control PATH`): one
 * command per line, one reply line each ("ok ..." or "error ...").
 *
 *   stats            → ok {"connections":3,"queues":[{"index":0,"where":"io0","started":true}, ...]}
 *   move Q T         → ok queue Q on T      (T: an I/O thread index, or "main")
 *   resize           → ok changed | ok unchanged   (re-read the image size; the guest is told)
 *   reload           → ok paused MS ms[, config changed]   (load the device file afresh and swap it in, as --watch does)
 *
 * It carries no fds, so Bun's own unix-socket server is enough here.
 */
import { existsSync, unlinkSync } from "node:fs";
import type { Logger } from "../device/log.ts";
import type { VuServer } from "./vu_server.ts";
import type { DeviceReloader } from "./reload.ts";

export class ControlSocket {
  private listener: ReturnType<typeof Bun.listen> | null = null;

  constructor(private readonly path: string, private readonly server: VuServer, private readonly log: Logger,
    private readonly reloader: DeviceReloader | null = null) {}

  start(): void {
    if (existsSync(this.path)) unlinkSync(this.path);
    this.listener = Bun.listen<{ buf: string; chain: Promise<void> }>({
      unix: this.path,
      socket: {
        open: (s) => { s.data = { buf: "", chain: Promise.resolve() }; },
        data: (s, chunk) => {
          s.data.buf += chunk.toString();
          let nl: number;
          while ((nl = s.data.buf.indexOf("\n")) >= 0) {
            const line = s.data.buf.slice(0, nl).trim();
            s.data.buf = s.data.buf.slice(nl + 1);
            if (!line) continue;
            // Commands of one client run in order, each after the previous one finished.
            s.data.chain = s.data.chain.then(() => this.exec(line)).then((reply) => { s.write(reply + "\n"); });
          }
        },
      },
    });
  }

  private async exec(line: string): Promise<string> {
    const [cmd, ...args] = line.split(/\s+/);
    try {
      switch (cmd) {
        case "stats":
          return `ok ${JSON.stringify(this.server.stats())}`;
        case "move": {
          if (args.length !== 2 || !/^\d+$/.test(args[0]!) || !/^(\d+|main)$/.test(args[1]!)) return "error usage: move QUEUE THREAD|main";
          const q = Number(args[0]), t = args[1] === "main" ? -1 : Number(args[1]);
          const where = await this.server.moveQueue(q, t);
          return `ok queue ${q} on ${where}`;
        }
        case "resize":
          return `ok ${await this.server.refreshDevice()}`;
        case "reload": {
          if (!this.reloader) return "error the device is not a module file";
          const r = await this.reloader.reload();
          return `ok paused ${r.pausedMs.toFixed(2)} ms${r.configChanged ? `, config changed${r.told ? "" : " (driver not told)"}` : ""}`;
        }
        default:
          return `error unknown command "${cmd}" (stats, move, resize, reload)`;
      }
    } catch (e) {
      this.log.warn(`control: ${line}: ${(e as Error).message}`);
      return `error ${(e as Error).message}`;
    }
  }

  stop(): void {
    this.listener?.stop(true);
    this.listener = null;
    try {
      unlinkSync(this.path);
    } catch {
      // gone already
    }
  }
}

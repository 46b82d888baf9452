/**
 * virtio-net as a learning L2 switch: every `--socket` is a vhost-user-net
 * port (one front-end each: a QEMU guest, DPDK's virtio-user, …), every
 * `--tap` a host tap device; frames go between them as a switch forwards
 * them (src/devices/net/switch.ts).
 *
 *   bun run server.ts net --socket a.sock --socket b.sock [--tap tap0] [--queues 2] [--mtu 9000]
 *
 * Threads: the switch and every port's queues run on one thread (io0, or the
 * main loop with --threads 0), so a frame is copied once, from the sender's
 * guest memory into the receiver's buffers. Per-port counters are logged
 * when the server stops.
 */
import { OptionError, type DeviceContext, type DeviceOptions, type OptionValues, type PrepareContext } from "../index.ts";
import { formatMac, parseMac } from "./net/offload.ts";
import { NetPort } from "./net/port.ts";
import { Switch } from "./net/switch.ts";
import { TapPort } from "./net/tap_port.ts";

export const options = {
  mac: { type: "string", multiple: true, metavar: "MAC", help: "the MAC of each --socket's port, in order (default 02:62:76:68:00:NN, NN = port number + 1)" },
  tap: { type: "string", multiple: true, metavar: "NAME", help: "a host tap device as a port (created if it does not exist; needs CAP_NET_ADMIN or a tap owned by this user)" },
  mtu: { type: "number", default: 1500, min: 68, max: 65535, help: "MTU of every port: larger frames are dropped (and offered to guests: VIRTIO_NET_F_MTU)" },
  queues: { type: "number", default: 1, min: 1, max: 16, help: "queue pairs per port (multi-queue)" },
  aging: { type: "number", default: 300, min: 1, help: "seconds a learned MAC stays without traffic from it" },
  offloads: { type: "string", default: "on", choices: ["on", "off"], help: "offer checksum and TSO offloads (on: passed through or done in software for ports that lack them)" },
} satisfies DeviceOptions;

export const multiPort = true;
export const defaults = { threads: 1 };

export interface NetPrepared {
  macs: string[];
  taps: string[];
  mtu: number;
  pairs: number;
  agingMs: number;
  offloads: boolean;
  /** The thread whose instances form the switch (the others only answer config). */
  switchThread: string;
  ports: number;
}

export function prepare(v: OptionValues, ctx: PrepareContext): NetPrepared {
  if (ctx.threads > 1) throw new OptionError("net: the switch runs on one thread: --threads 0 or 1");
  const ports = ctx.ports ?? 1;
  const given = (v.mac as string[] | undefined) ?? [];
  if (given.length > ports) throw new OptionError(`--mac given ${given.length} times for ${ports} --socket(s)`);
  const macs: string[] = [];
  for (let i = 0; i < ports; i++) {
    let m: number;
    try {
      m = i < given.length ? parseMac(given[i]!) : 0x026276680000 + i + 1;
    } catch {
      throw new OptionError(`--mac ${given[i]}: not a MAC address (like 02:00:00:00:00:01)`);
    }
    if (Math.floor(m / 2 ** 40) & 1) throw new OptionError(`--mac ${given[i]}: a multicast address cannot be a port's MAC`);
    macs.push(formatMac(m));
  }
  const taps = (v.tap as string[] | undefined) ?? [];
  for (const t of taps) if (!/^[A-Za-z0-9_.%-]{1,15}$/.test(t)) throw new OptionError(`--tap ${t}: not an interface name (at most 15 letters, digits, _ . - %)`);
  if (new Set(taps).size !== taps.length) throw new OptionError("--tap: the same tap given twice");
  return {
    macs, taps, ports,
    mtu: v.mtu as number, pairs: v.queues as number, agingMs: (v.aging as number) * 1000,
    offloads: v.offloads === "on", switchThread: ctx.threads > 0 ? "io0" : "main",
  };
}

export function describe(p: NetPrepared): string {
  const taps = p.taps.length ? ` and tap ${p.taps.join(", ")}` : "";
  return `learning switch of ${p.ports} port${p.ports > 1 ? "s" : ""}${taps}, ${p.pairs} queue pair${p.pairs > 1 ? "s" : ""} each, MTU ${p.mtu}`;
}

/** The switch of this thread and its taps (one per thread: instances of one thread share it). */
let sw: Switch | null = null;
let taps: TapPort[] = [];
let openPorts = 0;

export default function net(p: NetPrepared, ctx: DeviceContext): NetPort {
  const here = ctx.thread === p.switchThread;
  if (here && sw === null) {
    sw = new Switch();
    sw.agingMs = p.agingMs;
    // Opened here, on the thread that forwards: a tap that cannot be opened stops the start.
    try {
      taps = p.taps.map((name) => new TapPort(name, sw!, p.mtu, ctx.log));
    } catch (e) {
      for (const t of taps) t.close();
      taps = [];
      sw = null;
      throw e;
    }
  }
  const index = ctx.port ?? 0;
  const port = new NetPort(
    { port: index, mac: macBytes(p.macs[index] ?? p.macs[0]!), mtu: p.mtu, pairs: p.pairs, offloads: p.offloads, queueSize: 1024 },
    here ? sw : null, ctx.log,
  );
  if (!here) return port;
  openPorts++;
  const attach = port.attach.bind(port);
  port.attach = (loop, queues) => {
    attach(loop, queues);
    for (const t of taps) t.attach(loop);
  };
  const close = port.close.bind(port);
  port.close = () => {
    ctx.log.info(`net ${port.label}: ${port.counters.line()}`);
    close();
    if (--openPorts === 0) {
      for (const t of taps) {
        ctx.log.info(`net ${t.label}: ${t.counters.line()}`);
        t.close();
      }
      taps = [];
      sw?.close();
      sw = null;
    }
  };
  return port;
}

function macBytes(s: string): Uint8Array {
  const m = parseMac(s);
  const b = new Uint8Array(6);
  for (let i = 5, v = m; i >= 0; i--, v = Math.floor(v / 256)) b[i] = v % 256;
  return b;
}

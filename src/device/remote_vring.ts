/**
 * A virtqueue served by an I/O thread, seen from the main thread: mirrors
 * the negotiated state and forwards every change to the thread, awaiting its
 * acknowledgement (so "stopped" means the thread stopped). Ring addresses are
 * validated here first, against the same guest memory the thread views.
 */
import { VirtqError } from "../errors.ts";
import type { GuestMemory } from "../memory/guest_memory.ts";
import { newSpan } from "../memory/guest_memory.ts";
import type { SharedRegion } from "../memory/region.ts";
import type { VringAddr } from "../protocol/messages.ts";
import { SPLIT_RING_SIZES } from "../virtq/split.ts";
import { PACKED_RING_SIZES } from "../virtq/packed.ts";
import type { InflightArea, LogArea, RingCtl, RingState } from "./ring_ctl.ts";

/** Commands a ring thread understands (see src/server/io_thread_worker.ts). */
export type RingCommand =
  | { op: "mem"; regions: SharedRegion[] }
  | { op: "map"; index: number; num: number; addr: VringAddr; eventIdx: boolean }
  | { op: "kick" | "call" | "err"; index: number; fd: number }
  | { op: "enable"; index: number; on: boolean }
  | { op: "base"; index: number; base: number }
  | { op: "eventIdx"; index: number; on: boolean }
  | { op: "inOrder"; index: number; on: boolean }
  | { op: "layout"; index: number; packed: boolean }
  | { op: "inflight"; index: number; area: InflightArea | null }
  | { op: "log"; index: number; area: LogArea | null }
  | { op: "refresh" }
  /** Device commands: state to every instance (DEVICE_STATE load); a reload's new instance built, swapped in, or dropped. */
  | { op: "loadState"; data: Uint8Array }
  | { op: "features"; features: bigint }
  /** A net request for every instance: NET_SET_MTU (setMtu) or SEND_RARP (announce). */
  | { op: "hook"; name: "setMtu" | "announce"; arg: number | Uint8Array }
  | { op: "reloadPrepare"; module: string; options: unknown; fresh: boolean }
  | { op: "reloadSwap"; features: bigint | null }
  | { op: "reloadDrop" }
  /** IOTLB on (with the back-end channel fd for misses; -1: none) or off; each thread keeps its own table. */
  | { op: "iotlb"; on: boolean; fd: number }
  /** One front-end IOTLB_MSG (UPDATE or INVALIDATE), applied to the thread's table (rings re-map with "map"). */
  | { op: "iotlbMsg"; type: number; iova: number; size: number; uaddr: number; perm: number }
  | { op: "stop" | "quiesce" | "resume" | "detach" | "reset" | "release"; index: number };

/** The main thread's line to one I/O thread. */
export interface RingChannel {
  readonly name: string;
  request(cmd: RingCommand): Promise<any>;
  /** Called when the thread reports that a guest broke ring `index`. */
  onBroken(index: number, cb: ((e: VirtqError) => void) | null): void;
}

export class RemoteVring implements RingCtl {
  num = 0;
  addr: VringAddr | null = null;
  private _started = false;
  private eventIdx = false;
  private base = 0;
  private _packed = false;

  get packed(): boolean {
    return this._packed;
  }

  async setLog(area: LogArea | null): Promise<void> {
    await this.ch.request({ op: "log", index: this.index, area });
  }

  async setInflight(area: InflightArea | null): Promise<void> {
    await this.ch.request({ op: "inflight", index: this.index, area });
  }

  async setLayout(packed: boolean): Promise<void> {
    this._packed = packed;
    await this.ch.request({ op: "layout", index: this.index, packed });
  }

  constructor(readonly index: number, private readonly ch: RingChannel, private readonly mem: GuestMemory,
    broken: (e: VirtqError) => void) {
    ch.onBroken(index, broken);
  }

  get where(): string {
    return this.ch.name;
  }

  get started(): boolean {
    return this._started;
  }

  async setEventIdx(on: boolean): Promise<void> {
    this.eventIdx = on;
    await this.ch.request({ op: "eventIdx", index: this.index, on });
  }

  async setInOrder(on: boolean): Promise<void> {
    // A thread that does not know the command answers undefined (its switch falls through), not
    // null: refuse loudly rather than let a driver rely on an order the thread does not keep.
    const r = await this.ch.request({ op: "inOrder", index: this.index, on });
    if (r === undefined && on) throw new Error(`queue ${this.index}: I/O thread ${this.ch.name} does not implement VIRTIO_F_IN_ORDER`);
  }

  async setBase(num: number): Promise<void> {
    const max = this._packed ? 0xffffffff : 0xffff;
    if (num < 0 || num > max) throw new VirtqError("RING_ADDR", this.index, num, `ring base above ${max}`);
    this.base = num;
    await this.ch.request({ op: "base", index: this.index, base: num });
  }

  async setKick(fd: number): Promise<void> {
    this._started = true;
    await this.ch.request({ op: "kick", index: this.index, fd });
  }

  async setCall(fd: number): Promise<void> {
    await this.ch.request({ op: "call", index: this.index, fd });
  }

  async setErr(fd: number): Promise<void> {
    await this.ch.request({ op: "err", index: this.index, fd });
  }

  async setEnabled(on: boolean): Promise<void> {
    await this.ch.request({ op: "enable", index: this.index, on });
  }

  async mapRings(): Promise<void> {
    const a = this.addr;
    if (a === null || this.num === 0) return;
    // Validate here (throws GuestMemoryError); the thread then translates the same addresses.
    // IOVAs (IOTLB on) may not be mapped yet: the thread asks for them (misses) itself.
    const s = this._packed ? PACKED_RING_SIZES : SPLIT_RING_SIZES;
    if (this.mem.iotlb === null) {
      this.mem.uvaSpan(a.desc, s.desc(this.num), newSpan());
      this.mem.uvaSpan(a.avail, s.driver(this.num), newSpan());
      this.mem.uvaSpan(a.used, s.device(this.num), newSpan());
    }
    // No base here: the thread's ring keeps its own position (set by setBase, moved by requests).
    await this.ch.request({ op: "map", index: this.index, num: this.num, addr: a, eventIdx: this.eventIdx });
  }

  async stop(): Promise<number> {
    this._started = false;
    this.base = await this.ch.request({ op: "stop", index: this.index });
    return this.base;
  }

  async quiesce(): Promise<void> {
    await this.ch.request({ op: "quiesce", index: this.index });
  }

  async resume(): Promise<void> {
    await this.ch.request({ op: "resume", index: this.index });
  }

  async detachRings(): Promise<void> {
    await this.ch.request({ op: "detach", index: this.index });
  }

  async reset(): Promise<void> {
    this._started = false;
    this.num = 0;
    this.addr = null;
    this.base = 0;
    this.eventIdx = false;
    this._packed = false;
    await this.ch.request({ op: "reset", index: this.index });
  }

  async release(): Promise<RingState> {
    const st: RingState = await this.ch.request({ op: "release", index: this.index });
    this.ch.onBroken(this.index, null);
    this._started = false;
    return st;
  }
}

/**
 * An io_uring engine for file I/O that must not block the thread's event loop.
 *
 * Theory of operation. One ring per thread (io_uring_setup through ffi/io_uring.ts),
 * its SQ/CQ rings and SQE array mmap'd once (IORING_FEAT_SINGLE_MMAP) and
 * viewed through typed arrays. A caller takes an op slot (`acquire`), fills
 * the slot's own iovec table (`iov`) and starts it (`readv`, `writev`,
 * `fsync`, `fallocate`); the SQE is written at once but the ring is entered
 * once per batch, at the end of the current microtask turn (or at once when
 * the SQ is full). The kernel signals an eventfd (IORING_REGISTER_EVENTFD)
 * watched on the thread's EventLoop; its callback (or a poller) reaps the CQ
 * and calls each op's `done(tag, res)`. Nothing is allocated per op: slots,
 * iovec tables and callbacks are preallocated or passed in.
 *
 * The engine finishes what the kernel may do partially: a short read/write
 * is resubmitted for the remainder (a read that returns 0 ends at EOF and
 * reports the bytes done), -EAGAIN/-EINTR are retried. At most `cqEntries`
 * ops are in flight, so the CQ cannot overflow; if it does anyway (the
 * kernel keeps the overflow with IORING_FEAT_NODROP) the overflow is flushed
 * by io_uring_enter(GETEVENTS).
 *
 * @example
 * const ring = Uring.create(loop, { entries: 64 });
 * const op = ring.acquire();          // -1: all slots busy, do it synchronously
 * ring.iov(op, 0, bufAddr, 4096);
 * ring.readv(op, fd, 1, 0, 4096, tag, (tag, res) => { ... res is 4096 or -errno });
 */
import * as sys from "../../ffi/sys.ts";
import { Pinned } from "../../ffi/structs.ts";
import { errnoName } from "../../ffi/errno.ts";
import { MAP_SHARED, PROT_READ, PROT_WRITE } from "../../ffi/constants.ts";
import * as U from "../../ffi/io_uring.ts";
import type { EventLoop } from "../device/loop.ts";

/** Called when an op ends: `res` is the byte count (reads may stop short at EOF) or -errno. */
export type UringDone = (tag: any, res: number) => void;

export interface UringOptions {
  /** SQ entries (a power of two, default 128); the CQ gets twice as many, and as many ops may be in flight. */
  entries?: number;
  /** iovec entries per op (default 64); a transfer with more pieces must go another way. */
  iovPerOp?: number;
}

const MAP_POPULATE = 0x8000;
const EAGAIN = 11, EINTR = 4;
const KIND_RW = 1, KIND_OTHER = 2;
/** opThenSync: an fdatasync follows the write; the fdatasync of such a write is running. */
const SYNC_AFTER = 1, SYNC_STAGE = 2;

/**
 * Why io_uring cannot be used here (io_uring_setup failed: EPERM with
 * kernel.io_uring_disabled=2, ENOSYS on old kernels), or null when it can.
 * Probed once per thread.
 */
let probed: string | null | undefined;
export function uringUnavailable(): string | null {
  if (probed !== undefined) return probed;
  try {
    const params = new Uint8Array(U.PARAMS_SIZE);
    const fd = U.ioUringSetup(2, sys.ptrOf(params));
    sys.closeQuiet(fd);
    probed = null;
  } catch (e) {
    probed = (e as Error).message;
  }
  return probed;
}

export class Uring {
  readonly fd: number;
  readonly eventFd: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  readonly iovPerOp: number;
  /** Whether IORING_OP_FALLOCATE is supported by this kernel. */
  readonly hasFallocate: boolean;
  /** Ops started and not yet done; its maximum since creation (for tests and stats). */
  inFlight = 0;
  maxInFlight = 0;
  /** Ops completed, resubmissions after short I/O or EAGAIN, and CQ overflows seen (stats). */
  completed = 0;
  resubmits = 0;
  overflows = 0;

  private readonly ringMem: Pinned;
  private readonly sqeMem: Pinned;
  private readonly sqe32: Uint32Array;
  private readonly sqe8: Uint8Array;
  private readonly ring32: Uint32Array;
  // Word indexes (u32) of the ring fields.
  private readonly sqHead: number;
  private readonly sqTail: number;
  private readonly sqMask: number;
  private readonly sqFlags: number;
  private readonly sqArray: number;
  private readonly cqHead: number;
  private readonly cqTail: number;
  private readonly cqMask: number;
  private readonly cqes: number;
  /** Our copy of the SQ tail (published at submit) and the SQEs written but not yet entered. */
  private tail = 0;
  private unsubmitted = 0;
  private submitQueued = false;
  private readonly submitFn = () => {
    this.submitQueued = false;
    // Closed meanwhile: the rings are unmapped, and a view over them would crash the process.
    if (this.closed) return;
    try {
      this.submit();
      // Page-cache hits complete inside io_uring_enter: finish them now, not one loop round later.
      this.reap();
    } catch (e) {
      // From a microtask nothing may escape (it would end the process): fail the ops instead.
      this.failUnsubmitted(e);
    }
  };

  // Per-op state, indexed by op slot.
  private readonly freeOps: Int32Array;
  private freeTop = 0;
  private readonly iovMem: Pinned;
  private readonly iov32: Uint32Array;
  private readonly opKind: Uint8Array;
  private readonly opCode: Uint8Array;
  private readonly opFd: Int32Array;
  private readonly opIovFirst: Int32Array;
  private readonly opIovCnt: Int32Array;
  private readonly opPos: Float64Array;
  private readonly opLeft: Float64Array;
  private readonly opDone: Float64Array;
  private readonly opArg: Float64Array;
  private readonly opThenSync: Uint8Array;
  private readonly opTag: unknown[];
  private readonly opCb: (UringDone | null)[];

  private watchId = -1;
  private closed = false;

  private constructor(fd: number, params: DataView, private readonly loop: EventLoop | null, iovPerOp: number) {
    this.fd = fd;
    const features = params.getUint32(U.PARAMS_FEATURES, true);
    if ((features & U.IORING_FEAT_SINGLE_MMAP) === 0) throw new Error("io_uring: kernel lacks IORING_FEAT_SINGLE_MMAP");
    this.sqEntries = params.getUint32(U.PARAMS_SQ_ENTRIES, true);
    this.cqEntries = params.getUint32(U.PARAMS_CQ_ENTRIES, true);
    const so = U.PARAMS_SQ_OFF, co = U.PARAMS_CQ_OFF;
    const sqArrayOff = params.getUint32(so + U.SQ_OFF_ARRAY, true);
    const cqesOff = params.getUint32(co + U.CQ_OFF_CQES, true);
    const ringLen = Math.max(sqArrayOff + this.sqEntries * 4, cqesOff + this.cqEntries * U.CQE_SIZE);
    const sqeLen = this.sqEntries * U.SQE_SIZE;
    let ringPtr = -1, sqePtr = -1;
    try {
      ringPtr = sys.mmap(ringLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, U.IORING_OFF_SQ_RING);
      sqePtr = sys.mmap(sqeLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, U.IORING_OFF_SQES);
    } catch (e) {
      if (ringPtr !== -1) sys.munmap(ringPtr, ringLen);
      throw e;
    }
    this.ringMem = new Pinned(ringPtr, ringLen);
    this.sqeMem = new Pinned(sqePtr, sqeLen);
    this.ring32 = new Uint32Array(this.ringMem.u8.buffer, 0, ringLen >>> 2);
    this.sqe32 = new Uint32Array(this.sqeMem.u8.buffer);
    this.sqe8 = this.sqeMem.u8;
    const w = (off: number) => off >>> 2; // every ring field is 4-byte aligned
    this.sqHead = w(params.getUint32(so + U.SQ_OFF_HEAD, true));
    this.sqTail = w(params.getUint32(so + U.SQ_OFF_TAIL, true));
    this.sqMask = this.ring32[w(params.getUint32(so + U.SQ_OFF_RING_MASK, true))]!;
    this.sqFlags = w(params.getUint32(so + U.SQ_OFF_FLAGS, true));
    this.sqArray = w(sqArrayOff);
    this.cqHead = w(params.getUint32(co + U.CQ_OFF_HEAD, true));
    this.cqTail = w(params.getUint32(co + U.CQ_OFF_TAIL, true));
    this.cqMask = this.ring32[w(params.getUint32(co + U.CQ_OFF_RING_MASK, true))]!;
    this.cqes = w(cqesOff);
    this.tail = Atomics.load(this.ring32, this.sqTail);

    const ops = this.cqEntries;
    this.iovPerOp = iovPerOp;
    this.iovMem = Pinned.alloc(ops * iovPerOp * 16);
    this.iov32 = new Uint32Array(this.iovMem.u8.buffer);
    this.freeOps = new Int32Array(ops);
    for (let i = 0; i < ops; i++) this.freeOps[i] = ops - 1 - i;
    this.freeTop = ops;
    this.opKind = new Uint8Array(ops);
    this.opCode = new Uint8Array(ops);
    this.opFd = new Int32Array(ops);
    this.opIovFirst = new Int32Array(ops);
    this.opIovCnt = new Int32Array(ops);
    this.opPos = new Float64Array(ops);
    this.opLeft = new Float64Array(ops);
    this.opDone = new Float64Array(ops);
    this.opArg = new Float64Array(ops);
    this.opThenSync = new Uint8Array(ops);
    this.opTag = new Array(ops).fill(null);
    this.opCb = new Array(ops).fill(null);

    this.eventFd = sys.eventfd();
    try {
      const efd = new Int32Array([this.eventFd]);
      U.ioUringRegister(fd, U.IORING_REGISTER_EVENTFD, sys.ptrOf(efd), 1);
      this.hasFallocate = this.probe(U.IORING_OP_FALLOCATE);
      if (loop) this.watchId = loop.watch(this.eventFd, () => this.onEvent());
    } catch (e) {
      sys.closeQuiet(this.eventFd);
      this.iovMem.free();
      this.ringMem.free();
      this.sqeMem.free();
      throw e;
    }
  }

  /**
   * A ring of `o.entries` SQ entries whose completions are reaped on `loop`
   * (null: only by `reap()`/`wait()`, for tests). Throws ErrnoError when
   * io_uring_setup fails (see uringUnavailable).
   */
  static create(loop: EventLoop | null, o: UringOptions = {}): Uring {
    const entries = o.entries ?? 128;
    const params = new Uint8Array(U.PARAMS_SIZE);
    const dv = new DataView(params.buffer);
    dv.setUint32(U.PARAMS_FLAGS, U.IORING_SETUP_CQSIZE | U.IORING_SETUP_CLAMP, true);
    dv.setUint32(U.PARAMS_CQ_ENTRIES, entries * 2, true);
    const fd = U.ioUringSetup(entries, sys.ptrOf(params));
    try {
      return new Uring(fd, dv, loop, o.iovPerOp ?? 64);
    } catch (e) {
      sys.closeQuiet(fd);
      throw e;
    }
  }

  private probe(op: number): boolean {
    const n = 256;
    const buf = new Uint8Array(U.PROBE_HDR + n * U.PROBE_OP_SIZE);
    try {
      U.ioUringRegister(this.fd, U.IORING_REGISTER_PROBE, sys.ptrOf(buf), n);
    } catch {
      return false;
    }
    if (op > buf[0]!) return false;
    return (buf[U.PROBE_HDR + op * U.PROBE_OP_SIZE + U.PROBE_OP_FLAGS]! & U.IO_URING_OP_SUPPORTED) !== 0;
  }

  /** Takes a free op slot, or returns -1 when `cqEntries` ops are in flight. */
  acquire(): number {
    if (this.freeTop === 0 || this.closed) return -1;
    return this.freeOps[--this.freeTop]!;
  }

  /** Gives back a slot taken by `acquire` and never started. */
  release(op: number): void {
    this.opTag[op] = null;
    this.opCb[op] = null;
    this.freeOps[this.freeTop++] = op;
  }

  /** Sets iovec `i` (< iovPerOp) of op `op`: `len` bytes at host address `addr` (memory the caller keeps mapped until done). */
  iov(op: number, i: number, addr: number, len: number): void {
    if (i < 0 || i >= this.iovPerOp || this.closed) throw new RangeError(`io_uring: iovec ${i} of op ${op}: not in 0..${this.iovPerOp - 1} (or ring closed)`);
    const k = (op * this.iovPerOp + i) * 4;
    const t = this.iov32;
    t[k] = addr >>> 0;
    t[k + 1] = Math.floor(addr / 4294967296);
    t[k + 2] = len >>> 0;
    t[k + 3] = 0;
  }

  /** Reads `len` bytes at file offset `pos` into the op's first `cnt` iovecs (their lengths sum to `len`). */
  readv(op: number, fd: number, cnt: number, pos: number, len: number, tag: unknown, done: UringDone): void {
    this.opThenSync[op] = 0;
    this.startRw(op, U.IORING_OP_READV, fd, cnt, pos, len, tag, done);
  }

  /**
   * Writes `len` bytes from the op's first `cnt` iovecs at file offset `pos`;
   * with `sync`, then fdatasync (`done` gets the bytes written once both are
   * done, or the first -errno).
   */
  writev(op: number, fd: number, cnt: number, pos: number, len: number, tag: unknown, done: UringDone, sync = false): void {
    this.opThenSync[op] = sync ? SYNC_AFTER : 0;
    this.startRw(op, U.IORING_OP_WRITEV, fd, cnt, pos, len, tag, done);
  }

  /** fsync (or fdatasync with `datasync`); `done` gets 0 or -errno. */
  fsync(op: number, fd: number, datasync: boolean, tag: unknown, done: UringDone): void {
    this.opArg[op] = datasync ? U.IORING_FSYNC_DATASYNC : 0;
    this.opThenSync[op] = 0;
    this.startOther(op, U.IORING_OP_FSYNC, fd, 0, 0, tag, done);
  }

  /** fallocate(fd, mode, pos, len) (only when `hasFallocate`); `done` gets 0 or -errno. */
  fallocate(op: number, fd: number, mode: number, pos: number, len: number, tag: unknown, done: UringDone): void {
    this.opArg[op] = mode;
    this.opThenSync[op] = 0;
    this.startOther(op, U.IORING_OP_FALLOCATE, fd, pos, len, tag, done);
  }

  private startRw(op: number, code: number, fd: number, cnt: number, pos: number, len: number, tag: unknown, done: UringDone): void {
    if (cnt < 1 || cnt > this.iovPerOp) throw new RangeError(`io_uring: ${cnt} iovecs, op holds 1..${this.iovPerOp}`);
    this.opKind[op] = KIND_RW;
    this.opCode[op] = code;
    this.opFd[op] = fd;
    this.opIovFirst[op] = 0;
    this.opIovCnt[op] = cnt;
    this.opPos[op] = pos;
    this.opLeft[op] = len;
    this.opDone[op] = 0;
    this.start(op, tag, done);
  }

  private startOther(op: number, code: number, fd: number, pos: number, len: number, tag: unknown, done: UringDone): void {
    this.opKind[op] = KIND_OTHER;
    this.opCode[op] = code;
    this.opFd[op] = fd;
    this.opPos[op] = pos;
    this.opLeft[op] = len;
    this.start(op, tag, done);
  }

  private start(op: number, tag: unknown, done: UringDone): void {
    if (this.closed) throw new Error("io_uring: ring closed");
    this.opTag[op] = tag;
    this.opCb[op] = done;
    if (++this.inFlight > this.maxInFlight) this.maxInFlight = this.inFlight;
    this.queueSqe(op);
  }

  /** Writes the SQE for op `op` in its current state (first submission or the remainder after a short one). */
  private queueSqe(op: number): void {
    if (this.unsubmitted === this.sqEntries) this.submit();
    const r = this.ring32;
    // Free SQ entries are those the kernel consumed (head); we submit what we queue, so at most unsubmitted are taken.
    const idx = this.tail & this.sqMask;
    const b = idx * 16; // u32 index of the SQE
    const s = this.sqe32;
    s.fill(0, b, b + 16);
    const code = this.opCode[op]!;
    this.sqe8[idx * U.SQE_SIZE + U.SQE_OPCODE] = code;
    s[b + (U.SQE_FD >> 2)] = this.opFd[op]!;
    const pos = this.opPos[op]!;
    s[b + (U.SQE_OFF >> 2)] = pos >>> 0;
    s[b + (U.SQE_OFF >> 2) + 1] = Math.floor(pos / 4294967296);
    if (this.opKind[op] === KIND_RW) {
      const addr = this.iovMem.ptr + (op * this.iovPerOp + this.opIovFirst[op]!) * 16;
      s[b + (U.SQE_ADDR >> 2)] = addr >>> 0;
      s[b + (U.SQE_ADDR >> 2) + 1] = Math.floor(addr / 4294967296);
      s[b + (U.SQE_LEN >> 2)] = this.opIovCnt[op]!;
    } else if (code === U.IORING_OP_FSYNC) {
      s[b + (U.SQE_RW_FLAGS >> 2)] = this.opArg[op]!;
    } else {
      // fallocate: mode in len, length in addr.
      const len = this.opLeft[op]!;
      s[b + (U.SQE_ADDR >> 2)] = len >>> 0;
      s[b + (U.SQE_ADDR >> 2) + 1] = Math.floor(len / 4294967296);
      s[b + (U.SQE_LEN >> 2)] = this.opArg[op]!;
    }
    s[b + (U.SQE_USER_DATA >> 2)] = op;
    r[this.sqArray + idx] = idx;
    this.tail = (this.tail + 1) >>> 0;
    this.unsubmitted++;
    if (!this.submitQueued) {
      this.submitQueued = true;
      queueMicrotask(this.submitFn);
    }
  }

  /** Enters the ring with every SQE written so far (normally called at the end of the microtask turn). */
  submit(): void {
    if (this.unsubmitted === 0 || this.closed) return;
    // Release: the SQE contents before the tail the kernel reads (pairs with its acquire of sq.tail).
    Atomics.store(this.ring32, this.sqTail, this.tail);
    for (let tries = 0; this.unsubmitted > 0; tries++) {
      const n = U.ioUringEnter(this.fd, this.unsubmitted, 0, 0);
      if (n > 0) {
        this.unsubmitted -= n;
        continue;
      }
      // EBUSY/EAGAIN (completions backlogged, or no memory for the request): reap, flush the overflow, retry.
      this.overflows += n === -16 ? 1 : 0;
      this.reap();
      if (this.unsubmitted === 0) break;
      U.ioUringEnter(this.fd, 0, tries > 100 ? 1 : 0, U.IORING_ENTER_GETEVENTS);
      this.reap();
    }
  }

  /** io_uring_enter failed for good (EBADF, EFAULT...): take back the SQEs not consumed and fail their ops. */
  private failUnsubmitted(e: unknown): void {
    const r = this.ring32;
    const head = Atomics.load(r, this.sqHead);
    const res = -((e as { errno?: number }).errno ?? 5);
    const ops: number[] = [];
    for (let t = head; t !== this.tail; t = (t + 1) >>> 0) {
      const idx = r[this.sqArray + (t & this.sqMask)]!;
      ops.push(this.sqe32[idx * 16 + (U.SQE_USER_DATA >> 2)]!);
    }
    this.tail = head;
    Atomics.store(r, this.sqTail, head);
    this.unsubmitted = 0;
    console.error(`bunvhost: error: io_uring_enter failed, ${ops.length} op(s) failed: ${(e as Error).message ?? e}`);
    for (const op of ops) {
      this.opThenSync[op] = 0;
      this.opKind[op] = KIND_OTHER;
      this.complete(op, res);
    }
  }

  private onEvent(): void {
    sys.eventfdRead(this.eventFd);
    this.reap();
  }

  /** Handles every CQE available; returns how many. Safe to call any time (pollers call it). */
  reap(): number {
    if (this.closed) return 0;
    const r = this.ring32;
    let n = 0;
    for (;;) {
      // Head re-read for every CQE: a callback may reap too (a resubmission that finds the SQ full).
      const head = r[this.cqHead]!;
      // Acquire: the CQE contents after the tail the kernel published.
      const tail = Atomics.load(r, this.cqTail);
      if (head === tail) {
        // The kernel parks completions it had no room for (IORING_FEAT_NODROP); entering flushes them.
        if ((Atomics.load(r, this.sqFlags) & U.IORING_SQ_CQ_OVERFLOW) !== 0 && !this.closed) {
          this.overflows++;
          U.ioUringEnter(this.fd, 0, 0, U.IORING_ENTER_GETEVENTS);
          if (Atomics.load(r, this.cqTail) !== head) continue;
        }
        return n;
      }
      const c = this.cqes + (head & this.cqMask) * 4;
      const op = r[c]!; // user_data low word (we only store op indexes)
      const res = r[c + 2]! | 0;
      // Release the CQE slot before running the callback, which may submit more.
      Atomics.store(r, this.cqHead, (head + 1) >>> 0);
      n++;
      this.complete(op, res);
    }
  }

  private complete(op: number, res: number): void {
    if (op >= this.opCb.length || this.opCb[op] === null) return; // not ours (cannot happen): ignore
    if (res === -EAGAIN || res === -EINTR) {
      this.resubmits++;
      return this.queueSqe(op);
    }
    if (res >= 0 && this.opKind[op] === KIND_RW) {
      const left = this.opLeft[op]! - res;
      this.opDone[op]! += res;
      if (left > 0 && res > 0) {
        // Short transfer: skip the bytes done in the iovecs and go on from there.
        this.opLeft[op] = left;
        if (this.opPos[op]! >= 0) this.opPos[op]! += res; // -1: a stream, no offset
        this.advanceIov(op, res);
        this.resubmits++;
        return this.queueSqe(op);
      }
      if (left === 0 && this.opThenSync[op] === SYNC_AFTER) {
        this.opThenSync[op] = SYNC_STAGE;
        this.opKind[op] = KIND_OTHER;
        this.opCode[op] = U.IORING_OP_FSYNC;
        this.opArg[op] = U.IORING_FSYNC_DATASYNC;
        this.opPos[op] = 0;
        return this.queueSqe(op);
      }
      res = this.opDone[op]!;
    } else if (res >= 0 && this.opThenSync[op] === SYNC_STAGE) {
      res = this.opDone[op]!;
    }
    const cb = this.opCb[op]!, tag = this.opTag[op];
    this.release(op);
    this.inFlight--;
    this.completed++;
    try {
      cb(tag, res);
    } catch (e) {
      // A callback's failure is its own (and our bug): keep reaping the others.
      console.error(`bunvhost: error: io_uring completion callback failed: ${e instanceof Error ? e.stack : e}`);
    }
  }

  private advanceIov(op: number, n: number): void {
    const t = this.iov32;
    let i = this.opIovFirst[op]!;
    const end = i + this.opIovCnt[op]!;
    for (; i < end; i++) {
      const k = (op * this.iovPerOp + i) * 4;
      const len = t[k + 2]!;
      if (n < len) {
        const addr = t[k]! + t[k + 1]! * 4294967296 + n;
        t[k] = addr >>> 0;
        t[k + 1] = Math.floor(addr / 4294967296);
        t[k + 2] = len - n;
        break;
      }
      n -= len;
    }
    this.opIovCnt[op] = end - i;
    this.opIovFirst[op] = i;
  }

  /** Blocks until at least `min` completions arrived, then reaps (for tests and teardown without a loop). */
  wait(min = 1): number {
    if (this.closed) return 0;
    this.submit();
    U.ioUringEnter(this.fd, 0, min, U.IORING_ENTER_GETEVENTS);
    return this.reap();
  }

  /** Waits for every op in flight, then unmaps and closes. Idempotent. */
  close(): void {
    if (this.closed) return;
    try {
      while (this.inFlight > 0) this.wait(1);
    } catch {
      // The ring is going away; the kernel cancels what is left when its fd closes.
    }
    this.closed = true;
    if (this.watchId >= 0) this.loop?.unwatch(this.watchId);
    this.watchId = -1;
    sys.closeQuiet(this.fd);
    sys.closeQuiet(this.eventFd);
    this.ringMem.free();
    this.sqeMem.free();
    this.iovMem.free();
  }
}

/** "-5" → "EIO (5)": for messages about a failed op. */
export function resName(res: number): string {
  return `${errnoName(-res)} (${-res})`;
}

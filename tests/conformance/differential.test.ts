/**
 * Differential: split rings against packed rings. One seeded random workload
 * (reads, writes, flushes, discards, write-zeroes and GET_ID of random sizes
 * and offsets, in random chain layouts, on two queues kept up to 8 deep) runs
 * against two fresh bunvhost servers with identical images, one driven over
 * split rings and one over packed rings. The layout is the only thing asked
 * differently (and the ring size: the packed ring has 120 entries, not a
 * power of 2, so its wrap lands at odd places), so everything observable must
 * be the same: every request's status and used length, every read's bytes,
 * and at the end both disks, byte for byte.
 *
 * Determinism under concurrency. Requests in flight together have no defined
 * order (§5.2.6), so a request is submitted only once every earlier request it
 * overlaps has completed (when either of the two changes the disk). Then the
 * sequence order is the effective order, and a shadow model applied in that
 * order predicts every status and every byte that was not discarded (discarded
 * bytes are undefined; both runs must still agree on them). How many requests
 * are in flight, how they are batched into kicks and which queue is reaped
 * first is timing and a second random stream: it changes nothing observable,
 * and completions are reaped in an order that differs from submission.
 *
 * Stop and resume. After request STOP_AT, with requests in flight on queue 1
 * and two more published but not kicked on queue 0 (idle until then), the
 * test sends GET_VRING_BASE on both queues,
 * reaps what the device used, checks that the base says exactly that, hangs
 * up, and connects again with those bases (SET_VRING_BASE; packed: the full
 * 32-bit encoding). The requests the device never took are submitted again on
 * the new rings. Every request must complete exactly once.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  BlkDriver, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, type ReqOpts,
} from "../../src/frontend/index.ts";
import { backendKinds, scratchDir, type Backend } from "../support/backends.ts";
import { fillRandom, rng } from "../support/random.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();

const KiB = 1024, MiB = 1 << 20;
const DISK = 8 * MiB;
const SECTORS = DISK / 512;
/** The last 64 KiB are only ever read: the requests left published at the stop read there, so they wait for nothing. */
const QUIET_AT = SECTORS - 128;
const QUEUES = 2, DEPTH = 8, MAX_IO = 64 * KiB;
const QUEUE_IDS = Array.from({ length: QUEUES }, (_, q) => q);
const SPLIT_RING = 128, PACKED_RING = 120;
const OPS = 600;
/** The stop comes after request STOP_AT + 2; requests STOP_AT + 1 and + 2 are the quiet reads left published. */
const STOP_AT = 300;
const SEED = 0xd1ff;



const isQuiet = (i: number) => i === STOP_AT + 1 || i === STOP_AT + 2;

/** One request of the workload, with what the model predicts for it. */
interface Op {
  type: number;
  queue: number;
  sector: number;
  /** Data bytes: written, read, or the discard / write-zeroes segment table. */
  len: number;
  writable: boolean;
  payload: Uint8Array | null;
  opts: ReqOpts;
  /** Sectors it touches, [lo, hi) (empty when none), and whether it changes them. */
  lo: number;
  hi: number;
  changes: boolean;
  /** Discard / write-zeroes segments as sector, count pairs. */
  segs: number[];
  status: number;
}

/** The workload: request types, sizes, offsets and chain layouts, all from `seed`. */
function workload(seed: number): Op[] {
  const next = rng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < OPS; i++) {
    const op: Op = {
      type: VIRTIO_BLK_T_IN, queue: next() % QUEUES, sector: 0, len: 0, writable: true, payload: null, opts: {},
      lo: 0, hi: 0, changes: false, segs: [], status: VIRTIO_BLK_S_OK,
    };
    const o = op.opts;
    if (next() % 3 === 0) o.segments = 2 + (next() % 7);
    if (next() % 3 === 0) o.indirect = true;
    if (next() % 6 === 0) o.splitHeader = true;
    if (next() % 8 === 0) o.compact = true;
    if (next() % 10 === 0) o.cross = true;
    const r = next() % 100;
    if (isQuiet(i)) {
      op.queue = 0;
      delete o.cross; // they wait for nothing, not even a crossing request in flight
      op.sector = QUIET_AT + 16 * (i - STOP_AT);
      op.len = 4096;
    } else if (r < 70) {
      // Read or write inside the disk, 512 B to 64 KiB.
      op.len = 512 * (1 + (next() % (MAX_IO / 512)));
      op.sector = next() % (QUIET_AT - op.len / 512 + 1);
      if (r >= 35) {
        op.type = VIRTIO_BLK_T_OUT;
        op.writable = false;
        op.payload = fillRandom(new Uint8Array(op.len), next);
        op.changes = true;
      }
    } else if (r < 73) {
      // Past the end: IOERR, nothing changes.
      op.len = 512 * (1 + (next() % 16));
      const count = op.len / 512;
      op.sector = SECTORS - count + 1 + (next() % count);
      op.status = VIRTIO_BLK_S_IOERR;
      if (r === 72) {
        op.type = VIRTIO_BLK_T_OUT;
        op.writable = false;
        op.payload = fillRandom(new Uint8Array(op.len), next);
      }
      op.lo = op.hi = 0;
      ops.push(op);
      continue;
    } else if (r < 78) {
      op.type = VIRTIO_BLK_T_FLUSH;
      op.writable = false;
      op.opts = { queue: op.queue };
    } else if (r < 80) {
      op.type = VIRTIO_BLK_T_GET_ID;
      op.len = VIRTIO_BLK_ID_BYTES;
    } else {
      // Discard or write-zeroes of 1-3 segments; now and then a flag the device must refuse (UNSUPP).
      const zeroes = r >= 88;
      op.type = zeroes ? VIRTIO_BLK_T_WRITE_ZEROES : VIRTIO_BLK_T_DISCARD;
      op.writable = false;
      const n = 1 + (next() % 3);
      op.len = 16 * n;
      op.payload = new Uint8Array(op.len);
      const dv = new DataView(op.payload.buffer);
      let lo = SECTORS, hi = 0;
      const bogus = next() % 20 === 0;
      for (let k = 0; k < n; k++) {
        const count = 1 + (next() % 256);
        const sector = next() % (QUIET_AT - count + 1);
        let flags = zeroes && next() % 2 === 0 ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
        if (bogus && k === n - 1) flags = zeroes ? 2 : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        dv.setUint32(16 * k, sector, true);
        dv.setUint32(16 * k + 8, count, true);
        dv.setUint32(16 * k + 12, flags, true);
        op.segs.push(sector, count);
        lo = Math.min(lo, sector);
        hi = Math.max(hi, sector + count);
      }
      if (bogus) op.status = VIRTIO_BLK_S_UNSUPP;
      else [op.lo, op.hi, op.changes] = [lo, hi, true];
      o.queue = op.queue;
      ops.push(op);
      continue;
    }
    o.queue = op.queue;
    if (op.type === VIRTIO_BLK_T_IN || op.type === VIRTIO_BLK_T_OUT) [op.lo, op.hi] = [op.sector, op.sector + op.len / 512];
    ops.push(op);
  }
  return ops;
}

interface RunResult {
  /** Completions per request (1 each, or something was lost or duplicated). */
  completions: Uint8Array;
  status: Uint8Array;
  usedLen: Uint32Array;
  /** crc32 of what each read and GET_ID returned. */
  digest: Float64Array;
  /** The model at the end (shared by both runs) and which sectors it knows (0: discarded). */
  shadow: Uint8Array;
  known: Uint8Array;
  /** What went wrong, first problem only ("" when nothing). */
  bad: string;
  /** Requests the device had not taken at the stop and that were submitted again. */
  resubmitted: number;
}

/** Runs `ops` over one connection layout, with the stop and resume after STOP_AT + 2. */
function run(socket: string, packed: boolean, ops: Op[], image: Uint8Array, inOrder = false): RunResult {
  const shadow = image.slice();
  const known = new Uint8Array(SECTORS).fill(1);
  const res: RunResult = {
    completions: new Uint8Array(ops.length), status: new Uint8Array(ops.length).fill(0xff), usedLen: new Uint32Array(ops.length),
    digest: new Float64Array(ops.length), shadow, known, bad: "", resubmitted: 0,
  };
  const fail = (msg: string) => (res.bad ||= msg);
  const timing = rng(SEED ^ 0x7177);
  const inflight: number[] = [];
  let crossOp = -1;
  const opOfSlot = new Int32Array(QUEUES * DEPTH).fill(-1);
  const buf = new Uint8Array(MAX_IO);

  const onComplete = (slot: number, status: number, usedLen: number) => {
    const i = opOfSlot[slot]!;
    opOfSlot[slot] = -1;
    const op = ops[i]!;
    res.completions[i]!++;
    res.status[i] = status;
    res.usedLen[i] = usedLen;
    inflight.splice(inflight.indexOf(i), 1);
    if (crossOp === i) crossOp = -1;
    if (status !== op.status) fail(`request ${i} (type ${op.type}, ${op.len} B at ${op.sector}): status ${status}, want ${op.status}`);
    // bunvhost writes the whole writable area: the data (zeroed where undefined) and the status.
    if (usedLen !== (op.writable ? op.len : 0) + 1) fail(`request ${i}: used length ${usedLen}, want ${(op.writable ? op.len : 0) + 1}`);
    if (!op.writable) return;
    const got = buf.subarray(0, op.len);
    d.slotRead(slot, got);
    res.digest[i] = Bun.hash.crc32(got);
    if (op.type !== VIRTIO_BLK_T_IN || status !== VIRTIO_BLK_S_OK) return;
    for (let s = op.lo; s < op.hi; s++) {
      const at = s * 512, from = (s - op.lo) * 512;
      if (known[s] && Buffer.compare(got.subarray(from, from + 512), shadow.subarray(at, at + 512)) !== 0) {
        fail(`request ${i}: read of ${op.len} B at ${op.sector}: sector ${s} differs from the model`);
        break;
      }
    }
  };
  const connect = (base?: number[]): BlkDriver => {
    const drv = BlkDriver.connect(socket, {
      packed, queues: QUEUES, depth: DEPTH, maxIo: MAX_IO, queueSize: packed ? PACKED_RING : SPLIT_RING, base, timeoutMs: 5000, inOrder,
    });
    drv.onComplete = onComplete;
    return drv;
  };

  /** Applies a request to the model; it is submitted now, after every earlier request it overlaps. */
  const apply = (op: Op) => {
    if (op.status !== VIRTIO_BLK_S_OK || !op.changes) return;
    if (op.type === VIRTIO_BLK_T_OUT) {
      shadow.set(op.payload!, op.sector * 512);
      known.fill(1, op.lo, op.hi);
      return;
    }
    for (let k = 0; k < op.segs.length; k += 2) {
      const s = op.segs[k]!, n = op.segs[k + 1]!;
      if (op.type === VIRTIO_BLK_T_WRITE_ZEROES) {
        shadow.fill(0, s * 512, (s + n) * 512);
        known.fill(1, s, s + n);
      } else {
        known.fill(0, s, s + n); // §5.2.6.2: discarded sectors read back as anything
      }
    }
  };
  const blocked = (op: Op) =>
    d.freeSlotCount(op.queue) === 0 || (op.opts.cross === true && crossOp >= 0) ||
    inflight.some((j) => {
      const p = ops[j]!;
      return (op.changes || p.changes) && op.lo < p.hi && p.lo < op.hi;
    });
  /** Kicks everything, then waits on a queue picked at random among those with requests in flight. */
  const reapSome = () => {
    for (let q = 0; q < QUEUES; q++) d.kick(q);
    const busy = QUEUE_IDS.filter((q) => d.inFlight(q) > 0);
    d.wait(busy[timing() % busy.length]);
  };
  const submit = (i: number, kick: boolean) => {
    const op = ops[i]!;
    const slot = d.enqueue(op.type, op.sector, op.len, op.opts, op.payload);
    opOfSlot[slot] = i;
    inflight.push(i);
    if (op.opts.cross) crossOp = i;
    if (kick) d.kick(op.queue);
  };

  let d = connect();
  try {
    for (let i = 0; i < ops.length; i++) {
      const op = ops[i]!;
      if (i === STOP_AT + 1) {
        // Queue 0 idle for the two quiet reads, which then go in without waiting for anything; queue 1
        // keeps what it has in flight, kicked or not. The device re-checks a ring before publishing
        // used elements, so after the last completion it looks at queue 0 again only for a kick that
        // arrived while it was busy: 20 ms lets it handle that one before the quiet reads appear.
        d.kick(0);
        d.drain(0);
        Bun.sleepSync(20);
      }
      if (!isQuiet(i)) while (blocked(op)) reapSome();
      apply(op);
      submit(i, !isQuiet(i) && timing() % 3 === 0);
      if (i !== STOP_AT + 2) continue;

      // Stop: publish without a kick, GET_VRING_BASE, reap what the device used before it answered.
      for (let q = 0; q < QUEUES; q++) d.publish(q);
      const bases = QUEUE_IDS.map((q) => d.getVringBase(q));
      for (let q = 0; q < QUEUES; q++) {
        d.poll(q);
        const vq = d.vqs[q]!;
        // The device finished all it took, so its base is where our reaping stopped, on both halves.
        const want = packed ? (vq.lastUsedIndex * 0x10001) >>> 0 : vq.lastUsedIndex;
        if (bases[q] !== want) fail(`queue ${q}: GET_VRING_BASE 0x${bases[q]!.toString(16)}, driver reaped up to 0x${want.toString(16)}`);
        if (d.inFlight(q) !== vq.inFlight) fail(`queue ${q}: ${d.inFlight(q)} requests but ${vq.inFlight} chains in flight`);
      }
      const left = inflight.slice().sort((a, b) => a - b);
      res.resubmitted = left.length;
      d.close();
      inflight.length = 0;
      crossOp = -1;
      opOfSlot.fill(-1);

      // Resume on a new connection, with new guest RAM, at the bases the device gave.
      d = connect(bases);
      for (let q = 0; q < QUEUES; q++) {
        if (d.vqs[q]!.vringBase !== bases[q]) fail(`queue ${q}: resumed at 0x${d.vqs[q]!.vringBase.toString(16)}, not 0x${bases[q]!.toString(16)}`);
      }
      // None of these overlaps another (each waited for its overlaps), so they go in together.
      for (const j of left) submit(j, false);
      for (let q = 0; q < QUEUES; q++) d.kick(q);
    }
    for (let q = 0; q < QUEUES; q++) d.kick(q);
    for (let q = 0; q < QUEUES; q++) d.drain(q);
    for (let q = 0; q < QUEUES; q++) {
      const b = d.getVringBase(q);
      if (b !== d.vqs[q]!.vringBase) fail(`queue ${q}: final GET_VRING_BASE 0x${b.toString(16)}, driver at 0x${d.vqs[q]!.vringBase.toString(16)}`);
    }
  } finally {
    d.close();
  }
  for (let i = 0; i < ops.length; i++) {
    if (res.completions[i] !== 1) fail(`request ${i} completed ${res.completions[i]} times`);
  }
  return res;
}

describe.skipIf(skip !== null)(`split and packed rings, one workload${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let dir = "";
  const image = fillRandom(new Uint8Array(DISK), rng(0x1a6e));
  const ops = workload(SEED);
  // The in-order runs (VIRTIO_F_IN_ORDER: completions held back and batched) must be observably the same too.
  type Run = "split" | "packed" | "split-inorder" | "packed-inorder";
  const RUNS: Run[] = ["split", "packed", "split-inorder", "packed-inorder"];
  const be: Record<Run, Backend | null> = { split: null, packed: null, "split-inorder": null, "packed-inorder": null };
  const paths: Record<Run, string> = { split: "", packed: "", "split-inorder": "", "packed-inorder": "" };
  const results: Partial<Record<Run, RunResult>> = {};

  beforeAll(async () => {
    dir = scratchDir("bunvhost-diff-");
    for (const layout of RUNS) {
      paths[layout] = join(dir, `${layout}.img`);
      writeFileSync(paths[layout], image);
      // In order on the main loop (--threads 0); in-order rings on I/O threads: ring_features.test.ts.
      const extraArgs = layout.endsWith("inorder") ? ["--threads", "0"] : undefined;
      be[layout] = await kind.start({ size: DISK, image: paths[layout], queues: QUEUES, extraArgs });
    }
  });

  afterAll(async () => {
    for (const layout of RUNS) await be[layout]?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("the workload has every request type, layout and outcome, and reads after writes", () => {
    const count = (f: (o: Op) => boolean) => ops.filter(f).length;
    for (const t of [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]) {
      expect(count((o) => o.type === t)).toBeGreaterThan(5);
    }
    for (const s of [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]) expect(count((o) => o.status === s)).toBeGreaterThan(3);
    for (const k of ["segments", "indirect", "splitHeader", "compact", "cross"] as const) expect(count((o) => o.opts[k] !== undefined)).toBeGreaterThan(20);
  });

  for (const layout of ["split", "packed"] as const) {
    test(`${layout} rings: every request completes once and as predicted, across GET_VRING_BASE with requests published but not kicked and a resume at that base`, () => {
      const r = run(be[layout]!.socket, layout === "packed", ops, image);
      results[layout] = r;
      expect(r.bad).toBe("");
      // The two quiet reads were published on an idle queue without a kick: bunvhost looks at a ring
      // only when kicked, enabled or started, so it never took them and they ran after the resume.
      // (A device that polls its rings could take them; then this bound is what changes.)
      expect(r.resubmitted).toBeGreaterThanOrEqual(2);
    });
  }

  for (const layout of ["split", "packed"] as const) {
    test(`${layout} rings with VIRTIO_F_IN_ORDER: every request once, as predicted; same statuses, used lengths, reads and disk as without`, () => {
      const r = run(be[`${layout}-inorder`]!.socket, layout === "packed", ops, image, true);
      results[`${layout}-inorder`] = r;
      expect(r.bad).toBe("");
      expect(r.resubmitted).toBeGreaterThanOrEqual(2);
      const base = results[layout];
      expect(base).toBeTruthy();
      expect(Buffer.compare(base!.status, r.status)).toBe(0);
      expect(Buffer.compare(Buffer.from(base!.usedLen.buffer), Buffer.from(r.usedLen.buffer))).toBe(0);
      expect(r.digest.findIndex((v, i) => v !== base!.digest[i])).toBe(-1);
      expect(Buffer.compare(readFileSync(paths[layout]), readFileSync(paths[`${layout}-inorder`]))).toBe(0);
    });
  }

  test("split and packed: same statuses, used lengths and read data; disks byte-identical and as the model says", () => {
    const s = results.split, p = results.packed;
    expect(s && p).toBeTruthy();
    expect(Buffer.compare(s!.status, p!.status)).toBe(0);
    expect(Buffer.compare(Buffer.from(s!.usedLen.buffer), Buffer.from(p!.usedLen.buffer))).toBe(0);
    const diff = s!.digest.findIndex((v, i) => v !== p!.digest[i]);
    expect(diff === -1 ? "all reads equal" : `request ${diff} read different data`).toBe("all reads equal");
    // Both runs applied the same model (the model depends on the sequence only).
    expect(Buffer.compare(s!.shadow, p!.shadow)).toBe(0);
    expect(Buffer.compare(s!.known, p!.known)).toBe(0);
    const a = readFileSync(paths.split), b = readFileSync(paths.packed);
    expect(a.length).toBe(DISK);
    expect(Buffer.compare(a, b)).toBe(0);
    let bad = -1;
    for (let sct = 0; sct < SECTORS && bad < 0; sct++) {
      if (s!.known[sct] && Buffer.compare(a.subarray(sct * 512, sct * 512 + 512), s!.shadow.subarray(sct * 512, sct * 512 + 512)) !== 0) bad = sct;
    }
    expect(bad === -1 ? "disk as modelled" : `sector ${bad} differs from the model`).toBe("disk as modelled");
  });
});

/**
 * Back-end state migration (DEVICE_STATE: SET_DEVICE_STATE_FD,
 * CHECK_DEVICE_STATE) through our front-end: server A does I/O on a shared
 * image, its rings are stopped (GET_VRING_BASE), its state is saved through a
 * pipe and checked; server B loads it through another pipe, the rings are
 * re-created at the saved bases and I/O continues with the data intact.
 * Bad states (garbage, truncated, another version, another capacity), a load
 * while rings run and a front-end that never closes its end give a non-zero
 * CHECK_DEVICE_STATE or a refused request, never a crash or a leaked fd.
 * QEMU 7.2 does not send these messages (and qemu-storage-daemon does not
 * offer the feature), so our front-end is the only peer that exercises them.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, readdirSync, truncateSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../../ffi/sys.ts";
import { O_NONBLOCK, O_RDONLY, O_WRONLY, POLLIN, POLLOUT } from "../../ffi/constants.ts";
import { DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, DEVICE_STATE_SAVE } from "../../src/protocol/messages.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";
import { BLK_DRIVER_PROTOCOL_FEATURES, BlkDriver, VIRTIO_BLK_S_OK, type BlkDriverOptions } from "../../src/frontend/index.ts";
import { backendKinds, scratchDir, type Backend } from "../support/backends.ts";
import { fillRandom, rng } from "../support/random.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();
const DS = bit(ProtocolFeature.DEVICE_STATE);
const opts = (o: BlkDriverOptions = {}): BlkDriverOptions => ({ protocolFeatures: BLK_DRIVER_PROTOCOL_FEATURES | DS, timeoutMs: 8000, ...o });
const SIZE = 16 << 20;

let dir: string;
let fifoCount = 0;

/** A real pipe (a FIFO opened at both ends, non-blocking): S_ISFIFO, EOF when the writer closes. */
function pipe(): { r: number; w: number } {
  const p = join(dir, `fifo${fifoCount++}`);
  const res = Bun.spawnSync(["mkfifo", p]);
  if (res.exitCode !== 0) throw new Error(`mkfifo ${p}: ${res.stderr.toString()}`);
  const r = sys.open(p, O_RDONLY | O_NONBLOCK);
  const w = sys.open(p, O_WRONLY | O_NONBLOCK);
  return { r, w };
}

function readAll(fd: number, timeoutMs = 5000): Uint8Array {
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(65536);
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const n = sys.read(fd, buf);
    if (n === 0) break;
    if (n === null) {
      if (performance.now() > deadline) throw new Error("readAll: no EOF before the deadline");
      sys.poll1(fd, POLLIN, 50);
      continue;
    }
    chunks.push(buf.slice(0, n));
  }
  return new Uint8Array(Buffer.concat(chunks)); // a copy: a Buffer's slice() would alias
}

/** Writes all of `data` (or until the reader hangs up: returns the bytes written). */
function writeAll(fd: number, data: Uint8Array, timeoutMs = 5000): number {
  let off = 0;
  const deadline = performance.now() + timeoutMs;
  while (off < data.length) {
    let n: number | null;
    try {
      n = sys.write(fd, data.subarray(off));
    } catch {
      return off; // EPIPE: the back-end closed its end
    }
    if (n === null) {
      if (performance.now() > deadline) throw new Error("writeAll: pipe full past the deadline");
      sys.poll1(fd, POLLOUT, 50);
      continue;
    }
    off += n;
  }
  return off;
}

/** Saves the state of a server whose rings are stopped; returns it after CHECK_DEVICE_STATE said 0. */
function save(d: BlkDriver): Uint8Array {
  const p = pipe();
  let st: { status: number; fd: number };
  try {
    st = d.fe.setDeviceStateFd(DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, p.w);
  } finally {
    sys.close(p.w); // ours: the back-end holds its own copy, and EOF needs both closed
  }
  try {
    expect(st).toEqual({ status: 0, fd: -1 });
    const state = readAll(p.r);
    expect(d.fe.checkDeviceState()).toBe(0);
    return state;
  } finally {
    sys.close(p.r);
  }
}

/** Loads `state` (rings stopped); returns SET_DEVICE_STATE_FD's status and CHECK_DEVICE_STATE's result. */
function load(d: BlkDriver, state: Uint8Array, close = true): { status: number; check: number } {
  const p = pipe();
  let status: number;
  try {
    status = d.fe.setDeviceStateFd(DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, p.r).status;
  } finally {
    sys.close(p.r);
  }
  try {
    if (status === 0) writeAll(p.w, state);
  } finally {
    if (close) sys.close(p.w);
  }
  const check = d.fe.checkDeviceState();
  if (!close) sys.close(p.w);
  return { status, check };
}

describe.skipIf(skip !== null)(`DEVICE_STATE: save on one server, load on another${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let a: Backend, b: Backend, c: Backend;
  let image: string;
  const fds = (be: Backend) => readdirSync(`/proc/${be.pid}/fd`).length;

  beforeAll(async () => {
    dir = scratchDir("bunvhost-ds-");
    image = join(dir, "disk.img");
    closeSync(openSync(image, "w"));
    truncateSync(image, SIZE);
    [a, b, c] = await Promise.all([
      kind.start({ size: SIZE, image }),
      kind.start({ size: SIZE, image }),
      kind.start({ size: 2 * SIZE }),
    ]);
    // A first connection to each: the server's lazily created state (poller, buffers) is in the fd baseline.
    for (const be of [a, b, c]) BlkDriver.connect(be.socket, opts()).close();
    await Bun.sleep(100);
  });
  afterAll(async () => {
    await Promise.all([a?.stop(), b?.stop(), c?.stop()]);
    if (dir) Bun.spawnSync(["rm", "-rf", dir]);
  });

  for (const packed of [false, true]) {
    test(`${packed ? "packed" : "split"}: I/O on A, rings stopped, state saved and checked; B loads it, rings re-created at the saved base, I/O continues`, () => {
      const next = rng(packed ? 0xd5 : 0xd4);
      const blocks = Array.from({ length: 16 }, (_, i) => ({ sector: 64 + i * 40 + (packed ? 4000 : 0), data: fillRandom(new Uint8Array(4096 * (1 + (i % 4))), next) }));
      let base: number;
      let state: Uint8Array;
      {
        using d = BlkDriver.connect(a.socket, opts({ packed }));
        expect(d.protocolFeatures & DS).toBe(DS);
        for (const { sector, data } of blocks) expect(d.write(sector, data)).toBe(VIRTIO_BLK_S_OK);
        expect(d.flush()).toBe(VIRTIO_BLK_S_OK);
        base = d.getVringBase(0);
        state = save(d);
      }
      expect(state.length).toBe(24);
      expect(new TextDecoder().decode(state.subarray(0, 4))).toBe("BVBK");
      expect(a.stderr()).toMatch(/device state save: 24 bytes, checked/);

      const fdsB = fds(b);
      {
        using d = BlkDriver.connect(b.socket, opts({ packed, negotiateOnly: true, base }));
        expect(load(d, state)).toEqual({ status: 0, check: 0 });
        d.start();
        for (const { sector, data } of blocks) {
          const got = new Uint8Array(data.length);
          expect(d.read(sector, got)).toBe(VIRTIO_BLK_S_OK);
          expect(Buffer.compare(got, data)).toBe(0);
        }
        const more = fillRandom(new Uint8Array(16384), next);
        expect(d.write(9000, more)).toBe(VIRTIO_BLK_S_OK);
        const got = new Uint8Array(more.length);
        expect(d.read(9000, got)).toBe(VIRTIO_BLK_S_OK);
        expect(Buffer.compare(got, more)).toBe(0);
        // The ring continued from the saved position (split: one avail entry per request;
        // packed positions count descriptors, so only "moved on" is checked there).
        const end = d.getVringBase(0);
        if (packed) expect(end).not.toBe(base);
        else expect((end - base) & 0xffff).toBe(blocks.length + 2);
      }
      expect(b.stderr()).toMatch(/device state load: 24 bytes, checked/);
      for (let i = 0; i < 100 && fds(b) !== fdsB; i++) Bun.sleepSync(20);
      expect(fds(b)).toBe(fdsB);
    }, 30_000);
  }

  test("bad states are refused by CHECK_DEVICE_STATE, a load while rings run by SET_DEVICE_STATE_FD; nothing crashes or leaks", () => {
    let good: Uint8Array;
    {
      using d = BlkDriver.connect(a.socket, opts({ negotiateOnly: true }));
      good = save(d);
    }
    const fdsB = fds(b);
    const before = b.stderr().length;
    const bad = (s: Uint8Array, why: RegExp) => {
      using d = BlkDriver.connect(b.socket, opts({ negotiateOnly: true }));
      expect(load(d, s)).toEqual({ status: 0, check: 1 });
      expect(b.stderr().slice(before)).toMatch(why);
      // The connection lives on, and the next transfer works.
      expect(load(d, good)).toEqual({ status: 0, check: 0 });
    };
    bad(fillRandom(new Uint8Array(24), rng(7)), /device state load failed: load: virtio-blk state: bad magic/);
    bad(good.subarray(0, 10), /virtio-blk state: 10 bytes, expected 24/);
    bad(new Uint8Array(0), /virtio-blk state: 0 bytes, expected 24/);
    const v2 = good.slice();
    new DataView(v2.buffer).setUint16(4, 2, true);
    bad(v2, /version 2, this server reads version 1/);
    const flipped = good.slice();
    flipped[17] = flipped[17]! ^ 0x40; // blk_size, under an unchanged checksum
    bad(flipped, /checksum mismatch/);
    // More than 16 MiB: the back-end stops reading and refuses it.
    {
      using d = BlkDriver.connect(b.socket, opts({ negotiateOnly: true }));
      const p = pipe();
      expect(d.fe.setDeviceStateFd(DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, p.r).status).toBe(0);
      sys.close(p.r);
      const sent = writeAll(p.w, new Uint8Array((16 << 20) + 65536), 10_000);
      sys.close(p.w);
      expect(sent).toBeGreaterThan(16 << 20);
      expect(d.fe.checkDeviceState()).toBe(1);
      expect(b.stderr()).toMatch(/more than 16777216 bytes of state/);
    }
    // A front-end that never closes its end: CHECK_DEVICE_STATE gives up after a few seconds.
    {
      using d = BlkDriver.connect(b.socket, opts({ negotiateOnly: true }));
      expect(load(d, good, false)).toEqual({ status: 0, check: 1 });
      expect(b.stderr()).toMatch(/front-end must close its end before CHECK_DEVICE_STATE/);
    }
    // Another capacity: server C has a 32 MiB disk.
    {
      using d = BlkDriver.connect(c.socket, opts({ negotiateOnly: true }));
      expect(load(d, good)).toEqual({ status: 0, check: 1 });
      expect(c.stderr()).toMatch(/capacity 32768 sectors, this disk has 65536/);
    }
    // Rings running: load and save are refused up front (the device must be suspended).
    {
      using d = BlkDriver.connect(b.socket, opts());
      expect(load(d, good)).toEqual({ status: 1, check: 1 });
      const p = pipe();
      expect(d.fe.setDeviceStateFd(DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, p.w).status).toBe(1);
      sys.close(p.w);
      sys.close(p.r);
      expect(b.stderr()).toMatch(/SET_DEVICE_STATE_FD refused: queue\(s\) 0 still running/);
      // Still served.
      const data = fillRandom(new Uint8Array(4096), rng(9));
      expect(d.write(100, data)).toBe(VIRTIO_BLK_S_OK);
      // Once stopped, saving works.
      d.getVringBase(0);
      expect(save(d).length).toBe(24);
    }
    // A save whose reader is gone before anything is written: EPIPE, CHECK says so.
    {
      using d = BlkDriver.connect(a.socket, opts({ negotiateOnly: true }));
      const p = pipe();
      sys.close(p.r);
      expect(d.fe.setDeviceStateFd(DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, p.w).status).toBe(0);
      sys.close(p.w);
      expect(d.fe.checkDeviceState()).toBe(1);
      expect(a.stderr()).toMatch(/device state save failed: save: write: EPIPE/);
    }
    for (let i = 0; i < 100 && fds(b) !== fdsB; i++) Bun.sleepSync(20);
    expect(fds(b)).toBe(fdsB);
    expect(b.stderr()).not.toMatch(/internal error/);
  }, 60_000);
});

/**
 * src/io/uring.ts against real files (ext4 under /tmp, tmpfs under /dev/shm),
 * pipes and the kernel's io_uring: no mocks.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as sys from "../../ffi/sys.ts";
import { Pinned } from "../../ffi/structs.ts";
import { O_DIRECT, O_RDWR, O_RDONLY } from "../../ffi/constants.ts";
import { Uring, uringUnavailable } from "../../src/io/uring.ts";
import { fillRandom, rng } from "../support/random.ts";

const why = uringUnavailable();

describe.skipIf(why !== null)(`Uring${why ? ` [skipped: ${why}]` : ""}`, () => {
  let dir = "";
  let shm = "";
  beforeAll(() => {
    dir = mkdtempSync("/tmp/bunvhost-uring-");
    shm = mkdtempSync("/dev/shm/bunvhost-uring-");
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
    rmSync(shm, { recursive: true, force: true });
  });

  const results: number[] = [];
  const done = (tag: number, res: number) => { results[tag] = res; };

  test("Uring.readv()/writev()/fsync() move the bytes of a real file, split over several iovecs", () => {
    for (const where of [dir, shm]) {
      const path = join(where, "a.img");
      const data = fillRandom(new Uint8Array(64 << 10), rng(1));
      writeFileSync(path, new Uint8Array(64 << 10));
      const fd = sys.open(path, O_RDWR);
      const ring = Uring.create(null, { entries: 8 });
      const buf = Pinned.alloc(64 << 10);
      try {
        buf.u8.set(data);
        let op = ring.acquire();
        // Three iovecs of odd sizes over the buffer.
        ring.iov(op, 0, buf.ptr, 1000);
        ring.iov(op, 1, buf.ptr + 1000, 30000);
        ring.iov(op, 2, buf.ptr + 31000, 65536 - 31000);
        ring.writev(op, fd, 3, 0, 65536, 0, done);
        op = ring.acquire();
        ring.fsync(op, fd, true, 1, done);
        while (ring.inFlight > 0) ring.wait();
        expect(results[0]).toBe(65536);
        expect(results[1]).toBe(0);
        expect(Buffer.compare(readFileSync(path), data)).toBe(0);
        buf.u8.fill(0);
        op = ring.acquire();
        ring.iov(op, 0, buf.ptr + 7, 4096);
        ring.readv(op, fd, 1, 4096, 4096, 2, done);
        while (ring.inFlight > 0) ring.wait();
        expect(results[2]).toBe(4096);
        expect(Buffer.compare(buf.u8.subarray(7, 7 + 4096), data.subarray(4096, 8192))).toBe(0);
        expect(ring.inFlight).toBe(0);
      } finally {
        ring.close();
        buf.free();
        sys.close(fd);
      }
    }
  });

  test("Uring.readv() resubmits a short read for the remainder (a pipe that fills in two steps)", async () => {
    const [r, w] = sys.socketpair(true); // a stream socket reads short like a pipe
    const ring = Uring.create(null, { entries: 4 });
    const buf = Pinned.alloc(4096);
    try {
      const op = ring.acquire();
      ring.iov(op, 0, buf.ptr, 100);
      ring.iov(op, 1, buf.ptr + 100, 200);
      ring.readv(op, r, 2, -1, 300, 3, done);
      ring.submit();
      sys.write(w, new Uint8Array(120).fill(1));
      // The first 120 bytes arrive alone: a short read, resubmitted.
      for (let i = 0; i < 100 && ring.resubmits === 0; i++) {
        ring.reap();
        await Bun.sleep(5);
      }
      expect(ring.resubmits).toBeGreaterThan(0);
      expect(ring.inFlight).toBe(1);
      sys.write(w, new Uint8Array(180).fill(2));
      while (ring.inFlight > 0) ring.wait();
      expect(results[3]).toBe(300);
      expect(buf.u8.subarray(0, 120).every((b) => b === 1)).toBe(true);
      expect(buf.u8.subarray(120, 300).every((b) => b === 2)).toBe(true);
    } finally {
      ring.close();
      buf.free();
      sys.close(r);
      sys.close(w);
    }
  });

  test("Uring.readv() stops at end of file and reports the bytes read", () => {
    const path = join(shm, "short.img");
    writeFileSync(path, new Uint8Array(1000).fill(9));
    const fd = sys.open(path, O_RDONLY);
    const ring = Uring.create(null, { entries: 4 });
    const buf = Pinned.alloc(4096);
    try {
      const op = ring.acquire();
      ring.iov(op, 0, buf.ptr, 4096);
      ring.readv(op, fd, 1, 512, 4096, 4, done);
      while (ring.inFlight > 0) ring.wait();
      expect(results[4]).toBe(488);
    } finally {
      ring.close();
      buf.free();
      sys.close(fd);
    }
  });

  test("Uring: a failing op reports -errno (EBADF)", () => {
    const ring = Uring.create(null, { entries: 4 });
    try {
      const op = ring.acquire();
      ring.fsync(op, 987654, false, 5, done);
      while (ring.inFlight > 0) ring.wait();
      expect(results[5]).toBe(-9);
    } finally {
      ring.close();
    }
  });

  test("Uring: many ops in flight on a small ring wrap the SQ and CQ many times; acquire() says when it is full", () => {
    const path = join(dir, "many.img");
    const SECTORS = 2048;
    const data = fillRandom(new Uint8Array(SECTORS * 512), rng(7));
    writeFileSync(path, data);
    const fd = sys.open(path, O_RDONLY);
    const ring = Uring.create(null, { entries: 4 }); // SQ 4, CQ 8: at most 8 ops in flight
    const buf = Pinned.alloc(SECTORS * 512);
    const got = new Int32Array(SECTORS).fill(-1);
    const cb = (s: number, res: number) => { got[s] = res; };
    try {
      let next = 0, full = 0;
      while (next < SECTORS) {
        const op = ring.acquire();
        if (op < 0) {
          full++;
          ring.wait();
          continue;
        }
        // Sectors in a scrambled order, each into its own place in the buffer.
        const s = (next * 769) % SECTORS;
        ring.iov(op, 0, buf.ptr + s * 512, 512);
        ring.readv(op, fd, 1, s * 512, 512, s, cb);
        next++;
      }
      while (ring.inFlight > 0) ring.wait();
      expect(full).toBeGreaterThan(0);
      expect(ring.maxInFlight).toBe(ring.cqEntries);
      expect(ring.completed).toBe(SECTORS + 0);
      expect(got.every((r) => r === 512)).toBe(true);
      expect(Buffer.compare(buf.u8.subarray(0, data.length), data)).toBe(0);
      expect(ring.overflows).toBe(0);
    } finally {
      ring.close();
      buf.free();
      sys.close(fd);
    }
  });

  test("Uring with O_DIRECT: aligned reads and writes reach the disk; an unaligned buffer gets EINVAL", () => {
    const path = join(dir, "direct.img");
    writeFileSync(path, new Uint8Array(1 << 20));
    const fd = sys.open(path, O_RDWR | O_DIRECT);
    const ring = Uring.create(null, { entries: 8 });
    const buf = Pinned.alloc(1 << 20);
    try {
      const data = fillRandom(new Uint8Array(256 << 10), rng(3));
      buf.u8.set(data);
      let op = ring.acquire();
      ring.iov(op, 0, buf.ptr, 256 << 10);
      ring.writev(op, fd, 1, 4096, 256 << 10, 6, done);
      while (ring.inFlight > 0) ring.wait();
      expect(results[6]).toBe(256 << 10);
      op = ring.acquire();
      ring.iov(op, 0, buf.ptr + (512 << 10), 256 << 10);
      ring.readv(op, fd, 1, 4096, 256 << 10, 7, done);
      op = ring.acquire();
      ring.iov(op, 0, buf.ptr + 3, 4096); // not aligned: O_DIRECT refuses
      ring.readv(op, fd, 1, 0, 4096, 8, done);
      while (ring.inFlight > 0) ring.wait();
      expect(results[7]).toBe(256 << 10);
      expect(Buffer.compare(buf.u8.subarray(512 << 10, 768 << 10), data)).toBe(0);
      expect(results[8]).toBe(-22);
    } finally {
      ring.close();
      buf.free();
      sys.close(fd);
    }
  });

  test("regression: a ring closed in the same turn it queued its submit is not touched again (was a segfault)", async () => {
    const ring = Uring.create(null, { entries: 4 });
    const op = ring.acquire();
    ring.fsync(op, 987654, false, 10, done); // queues the end-of-turn submit
    while (ring.inFlight > 0) ring.wait(); // submits and reaps by itself
    ring.close(); // unmaps the rings; the queued submit runs after this
    await null;
    await Bun.sleep(1);
    expect(results[10]).toBe(-9);
    expect(ring.reap()).toBe(0);
    expect(ring.acquire()).toBe(-1);
  });

  test("Uring.fallocate() punches a hole when the kernel has IORING_OP_FALLOCATE", () => {
    const ring = Uring.create(null, { entries: 4 });
    const path = join(dir, "falloc.img");
    writeFileSync(path, new Uint8Array(64 << 10).fill(0xaa));
    const fd = sys.open(path, O_RDWR);
    try {
      if (!ring.hasFallocate) return; // the engine reports it and the backing stays synchronous
      const op = ring.acquire();
      ring.fallocate(op, fd, 0x01 | 0x02, 4096, 8192, 9, done); // KEEP_SIZE | PUNCH_HOLE
      while (ring.inFlight > 0) ring.wait();
      expect(results[9]).toBe(0);
      const b = readFileSync(path);
      expect(b.length).toBe(64 << 10);
      expect(b.subarray(4096, 12288).every((x) => x === 0)).toBe(true);
      expect(b[4095]).toBe(0xaa);
      expect(b[12288]).toBe(0xaa);
    } finally {
      ring.close();
      sys.close(fd);
    }
  });
});

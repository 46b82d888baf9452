/**
 * Dirty logging for live migration (VHOST_F_LOG_ALL + LOG_SHMFD): with a log
 * set by SET_LOG_BASE, exactly the guest pages the device wrote (the
 * device-writable buffers up to the used length, and the used ring) are
 * marked, nothing it only read, and nothing while logging is off.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { MAP_SHARED, PROT_READ, PROT_WRITE } from "../../ffi/constants.ts";
import { Pinned } from "../../ffi/structs.ts";
import { Req } from "../../src/protocol/messages.ts";
import { bit, ProtocolFeature, VHOST_F_LOG_ALL } from "../../src/protocol/features.ts";
import { BlkDriver, BLK_DRIVER_FEATURES, BLK_DRIVER_PROTOCOL_FEATURES, VIRTIO_BLK_S_OK } from "../../src/frontend/index.ts";
import { VRING_DESC_F_WRITE } from "../../src/virtq/split.ts";
import { backendKinds, type Backend } from "../support/backends.ts";
import { DirtyLog } from "../../src/virtq/dirty_log.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();
const PAGE = 4096;

describe("DirtyLog", () => {
  test("mark() sets one bit per 4 KiB page touched, and nothing else", () => {
    const bits = new Uint8Array(16);
    const log = new DirtyLog(bits);
    log.mark(PAGE * 3 + 100, 1);
    log.mark(PAGE * 9 - 1, 2); // pages 8 and 9
    log.mark(PAGE * 20, PAGE * 3); // pages 20, 21, 22
    const set = [...Array(128).keys()].filter((p) => log.isDirty(p * PAGE));
    expect(set).toEqual([3, 8, 9, 20, 21, 22]);
  });

  test("mark() past the end of the bitmap counts missed pages instead of writing out of bounds", () => {
    const bits = new Uint8Array(1);
    const log = new DirtyLog(bits);
    log.mark(PAGE * 6, PAGE * 4); // pages 6..9; only 6 and 7 fit
    expect(bits[0]).toBe(0b11000000);
    expect(log.missed).toBe(2);
  });
});

describe.skipIf(skip !== null)(`dirty logging against bunvhost${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let be: Backend;
  beforeAll(async () => {
    be = await kind.start({ size: 16 << 20 });
  });
  afterAll(async () => {
    await be?.stop();
  });

  test("with LOG_ALL, an IN request marks its data and status pages and the used ring, not the header page", () => {
    using d = BlkDriver.connect(be.socket, {
      features: BLK_DRIVER_FEATURES | bit(VHOST_F_LOG_ALL),
      protocolFeatures: BLK_DRIVER_PROTOCOL_FEATURES | bit(ProtocolFeature.LOG_SHMFD),
      indirect: false, timeoutMs: 5000,
    });
    expect(d.features & bit(VHOST_F_LOG_ALL)).not.toBe(0n);
    // The log: one bit per page of guest RAM, in a memfd both sides map.
    const logBytes = Math.ceil(d.ram.size * 2 / PAGE / 8) + 64;
    const fd = sys.memfdCreate("test-dirty-log");
    sys.ftruncate(fd, logBytes);
    const host = sys.mmap(logBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const bits = new Pinned(host, logBytes).u8;
    d.fe.request({ request: Req.SET_LOG_BASE, flags: 0, fds: [fd], log: { size: logBytes, offset: 0 } }, true);
    sys.close(fd);
    const dirty = (gpa: number) => (bits[Math.floor(gpa / PAGE / 8)]! & (1 << (Math.floor(gpa / PAGE) % 8))) !== 0;

    // Header, data and status on pages of their own.
    const hdr = d.ram.alloc(PAGE, PAGE), data = d.ram.alloc(3 * PAGE, PAGE), st = d.ram.alloc(PAGE, PAGE), untouched = d.ram.alloc(PAGE, PAGE);
    const h = new Uint8Array(16); // type IN (0), sector 0
    d.ram.write(hdr, h);
    bits.fill(0);
    // An IN of 8 KiB into the first two pages of a three-page area.
    const r = d.submitRaw([{ addr: hdr, len: 16 }, { addr: data, len: 2 * PAGE, flags: VRING_DESC_F_WRITE }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }], { statusGpa: st });
    expect(r.outcome).toBe("used");
    expect(r.status).toBe(VIRTIO_BLK_S_OK);
    expect(dirty(data)).toBe(true);
    expect(dirty(data + PAGE)).toBe(true);
    expect(dirty(data + 2 * PAGE)).toBe(false); // not part of the request
    expect(dirty(st)).toBe(true);
    expect(dirty(d.vqs[0]!.usedGpa)).toBe(true);
    expect(dirty(hdr)).toBe(false); // only read
    expect(dirty(untouched)).toBe(false);
    expect(be.stderr()).toMatch(/dirty logging on/);

    // Logging off (features without LOG_ALL): nothing is marked any more.
    d.fe.setFeatures(d.features & ~bit(VHOST_F_LOG_ALL));
    bits.fill(0);
    const r2 = d.submitRaw([{ addr: hdr, len: 16 }, { addr: data, len: PAGE, flags: VRING_DESC_F_WRITE }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }], { statusGpa: st });
    expect(r2.status).toBe(VIRTIO_BLK_S_OK);
    expect(bits.every((b) => b === 0)).toBe(true);
    expect(be.stderr()).toMatch(/dirty logging off/);
  });
});

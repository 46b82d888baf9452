/**
 * QEMU as the vhost-user front-end with no guest OS: the test is the guest
 * driver. QEMU boots a firmware of `hlt` instructions, and the test drives
 * vhost-user-blk-pci over qtest with the TypeScript virtio-pci driver in
 * tests/support/virtio_pci.ts, so every vhost-user message the back-end gets
 * is one QEMU itself chose to send. Each test runs once per back-end
 * (bunvhost and qemu-storage-daemon); bunvhost runs with --trace, so its
 * stderr is the list of messages received, which the tests read for the
 * sequences QEMU sends on reset, system_reset and quit. A second block
 * runs a subset in packed-ring mode (packed=on): bunvhost serves packed
 * rings; for qsd, which does not offer RING_PACKED, QEMU masks the bit.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { QemuProcess, qemuSkipReason } from "../support/qemu.ts";
import { backendKinds, scratchDir, type Backend, type BackendKind } from "../support/backends.ts";
import { hltFirmware, Qmp, QtestListener, type Qtest } from "../support/qtest.ts";
import {
  blkSegments, BlkQueue, findVirtioPci, GuestAlloc, VirtioPciDevice, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
  VRING_AVAIL_F_NO_INTERRUPT, VIRTIO_F_RING_PACKED, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE, type PackedQueue, type Virtqueue,
} from "../support/virtio_pci.ts";

// Each test takes 0.05-0.8 s; the internal waits (qtest replies 10 s, used ring 5 s, teardown 5 s) stay
// below this so that a hang fails with QEMU's and the back-end's stderr instead of a bare timeout.
setDefaultTimeout(30_000);

const DISK_BYTES = 64 << 20;
const SECTOR = 512;
// Guest RAM is 256 MiB: rings from 1 MiB, each queue's request buffers in its own 32 MiB window from 32 MiB.
const RING_RAM = [0x100000, 0x2000000] as const;
const dataWindow = (q: number) => new GuestAlloc(0x2000000 + q * 0x2000000, 0x2000000 + (q + 1) * 0x2000000);

// Feature bits as QEMU's virtio-blk exposes them (VIRTIO 1.2 §5.2.3; ring bits §6).
const F = {
  SIZE_MAX: 1, SEG_MAX: 2, RO: 5, BLK_SIZE: 6, FLUSH: 9, TOPOLOGY: 10, CONFIG_WCE: 11, MQ: 12, DISCARD: 13, WRITE_ZEROES: 14,
  INDIRECT_DESC: VIRTIO_RING_F_INDIRECT_DESC, EVENT_IDX: VIRTIO_RING_F_EVENT_IDX, VERSION_1: VIRTIO_F_VERSION_1,
  /** vhost-user's own bit: QEMU must never show it to the guest. */
  PROTOCOL_FEATURES: 30,
  /** QEMU 7.2's vhost-user-blk passes it through when the back-end offers it (IN_ORDER and NOTIFICATION_DATA it masks). */
  RING_RESET: 40,
} as const;
const bits = (...ns: number[]) => ns.reduce((m, n) => m | (1n << BigInt(n)), 0n);
const names = (mask: bigint) =>
  Object.entries(F).filter(([, n]) => mask & (1n << BigInt(n))).map(([k]) => k).join(" ") + ` (0x${mask.toString(16)})`;

// virtio_blk_config offsets (§5.2.4).
const CFG = {
  capacity: 0, seg_max: 12, blk_size: 20, num_queues: 34, max_discard_sectors: 36, max_discard_seg: 40,
  max_write_zeroes_sectors: 48, max_write_zeroes_seg: 52, write_zeroes_may_unmap: 56,
} as const;

/** Deterministic bytes (xorshift32), so a failing comparison can be reproduced. */
function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  const w = new Uint32Array(b.buffer, 0, len >>> 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < w.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    w[i] = x >>> 0;
  }
  return b;
}
const sha256 = (b: Uint8Array) => new Bun.CryptoHasher("sha256").update(b).digest("hex");

let dir: string;
let bios: string;
beforeAll(() => {
  dir = scratchDir("bunvhost-qtest-");
  bios = hltFirmware(dir);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Rig {
  backend: Backend;
  qemu: QemuProcess;
  qt: Qtest;
  dev: VirtioPciDevice;
  /** Ring memory; bring-ups take from it without freeing, so each puts its rings at new addresses. */
  rings: GuestAlloc;
  qmp: Qmp | null;
  /** Names of the vhost-user requests bunvhost received so far, in order (empty for qsd). */
  received(): string[];
}

interface RigOptions {
  /** Queues of QEMU's device, and of the back-end unless `backendQueues` is given. */
  queues?: number;
  backendQueues?: number;
  readonly?: boolean;
  /** QEMU's queue-size property (default 128). */
  queueSize?: number;
  /** Open a QMP socket (for system_reset and quit). */
  qmp?: boolean;
  extraQemu?: string[];
  /** QEMU's packed=on (QEMU offers RING_PACKED only if the back-end does). */
  packed?: boolean;
}

let serial = 0;

/** Starts QEMU on the qtest socket against `backend` and opens the virtio device in slot 4. */
async function startQemu(backend: Backend, o: RigOptions): Promise<{ qemu: QemuProcess; qt: Qtest; listener: QtestListener; qmpPath: string }> {
  const n = ++serial;
  const listener = await QtestListener.open(join(dir, `qtest${n}.sock`));
  const qmpPath = join(dir, `qmp${n}.sock`);
  const qemu = QemuProcess.start({
    bios, qtest: listener.path,
    blk: [{ socket: backend.socket, numQueues: o.queues ?? 1, queueSize: o.queueSize, packed: o.packed, addr: "04.0" }],
    extra: [...(o.qmp ? ["-qmp", `unix:${qmpPath},server=on,wait=off`] : []), ...(o.extraQemu ?? [])],
  });
  try {
    const qt = await listener.accept({
      alive: () => (qemu.proc.exitCode !== null || qemu.proc.signalCode !== null ? String(qemu.proc.exitCode ?? qemu.proc.signalCode) : null),
    });
    return { qemu, qt, listener, qmpPath };
  } catch (e) {
    await qemu.stop();
    listener.close();
    throw new Error(`${(e as Error).message}\n${qemu.describe()}`, { cause: e });
  }
}

async function openDevice(qt: Qtest): Promise<VirtioPciDevice> {
  const found = await findVirtioPci(qt);
  if (found.length !== 1) throw new Error(`expected one virtio-blk function, found ${found.length}`);
  return VirtioPciDevice.open(qt, found[0]!);
}

/**
 * Runs `body` with a fresh back-end and QEMU; stops both whatever happens,
 * and on failure adds QEMU's command line and stderr and the back-end's
 * stderr to the error.
 */
async function withRig(kind: BackendKind, o: RigOptions, body: (r: Rig) => Promise<void>): Promise<void> {
  let backend: Backend | undefined, qemu: QemuProcess | undefined, qt: Qtest | undefined;
  let listener: QtestListener | undefined, qmp: Qmp | null = null;
  try {
    backend = await kind.start({
      size: DISK_BYTES, queues: o.backendQueues ?? o.queues, readonly: o.readonly,
      extraArgs: kind.name === "bunvhost" ? ["--trace"] : [],
    });
    const s = await startQemu(backend, o);
    ({ qemu, qt, listener } = s);
    if (o.qmp) qmp = await Qmp.connect(s.qmpPath);
    const dev = await openDevice(qt!);
    const b = backend;
    await body({
      backend, qemu: qemu!, qt: qt!, dev, rings: new GuestAlloc(...RING_RAM), qmp,
      received: () => [...b.stderr().matchAll(/^bunvhost: info: <- (\S+)/gm)].map((m) => m[1]!),
    });
  } catch (e) {
    const err = e as Error;
    throw new Error(
      `${err.stack ?? err.message}\n${qemu ? qemu.describe() : "(QEMU not started)"}\n--- ${kind.name} stderr:\n${backend?.stderr() ?? "(not started)"}`,
      { cause: e },
    );
  } finally {
    qmp?.close();
    qt?.close();
    await qemu?.stop();
    listener?.close();
    await backend?.stop();
  }
}

/** Negotiates `wanted` (default: everything offered), sets up `queues` and sets DRIVER_OK. */
async function bringUp(r: Rig, o: { wanted?: bigint; queues?: number[]; indirectMax?: number } = {}): Promise<BlkQueue[]> {
  await r.dev.negotiate(o.wanted ?? (await r.dev.deviceFeatures()));
  const vqs = [];
  for (const q of o.queues ?? [0]) vqs.push(await r.dev.setupQueue(q, r.rings, { indirectMax: o.indirectMax ?? 256 }));
  await r.dev.driverOk();
  return vqs.map((vq) => new BlkQueue(vq, dataWindow(vq.index)));
}

/** Writes `len` bytes of pattern `seed` at `sector`, reads them back, compares checksums. */
async function roundTrip(blk: BlkQueue<Virtqueue>, sector: number, len: number, seed: number,
  o: { pieces?: number; readPieces?: number; indirect?: boolean } = {}): Promise<void> {
  const data = pattern(len, seed);
  const w = await blk.write(sector, data, { pieces: o.pieces, indirect: o.indirect });
  expect({ status: w.status, usedLen: w.usedLen }).toEqual({ status: VIRTIO_BLK_S_OK, usedLen: 1 });
  const r = await blk.read(sector, len, { pieces: o.readPieces ?? o.pieces, indirect: o.indirect });
  expect({ status: r.status, usedLen: r.usedLen }).toEqual({ status: VIRTIO_BLK_S_OK, usedLen: len + 1 });
  expect(sha256(r.data)).toBe(sha256(data));
}

/** Messages after the last occurrence of `name` in `seq` (all of `seq` if absent). */
const after = (seq: string[], name: string) => seq.slice(seq.lastIndexOf(name) + 1);

async function waitFor(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(10);
  }
}

for (const kind of backendKinds) {
  const skip = qemuSkipReason() ?? kind.skipReason();
  const traced = kind.name === "bunvhost";

  describe.skipIf(skip !== null)(`qtest front-end: ${kind.name}${skip ? ` (skipped: ${skip})` : ""}`, () => {
    test("device features: VERSION_1 plus the back-end's blk and ring bits, MQ only with num-queues > 1", async () => {
      await withRig(kind, {}, async (r) => {
        const offered = await r.dev.deviceFeatures();
        const common = bits(F.VERSION_1, F.INDIRECT_DESC, F.EVENT_IDX, F.SEG_MAX, F.BLK_SIZE, F.FLUSH, F.DISCARD, F.WRITE_ZEROES);
        // QEMU 7.2's vhost-user-blk adds SIZE_MAX, SEG_MAX, GEOMETRY, TOPOLOGY, BLK_SIZE, FLUSH, RO (and its
        // discard/write-zeroes/config-wce properties, all on by default) and then clears each bit the
        // back-end's GET_FEATURES lacks. qsd also offers SIZE_MAX, TOPOLOGY and CONFIG_WCE; bunvhost does
        // not, so QEMU hides them. Neither offers GEOMETRY or RO (a writable disk). MQ is added only when
        // num-queues > 1 (next test), and PROTOCOL_FEATURES (bit 30) is vhost-user's, never the guest's.
        const expected = kind.name === "qsd" ? common | bits(F.SIZE_MAX, F.TOPOLOGY, F.CONFIG_WCE) : common | bits(F.RING_RESET);
        expect(names(offered)).toBe(names(expected));
        const accepted = await r.dev.negotiate(offered);
        expect(accepted).toBe(offered);
        if (traced) {
          // The handshake QEMU runs while it creates the device, before qtest is served.
          expect(r.received().slice(0, 4)).toEqual(["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM"]);
          expect(r.received()).toContain("GET_CONFIG");
          // FEATURES_OK is not forwarded: QEMU sends SET_FEATURES only when the device starts (DRIVER_OK).
          expect(r.received()).not.toContain("SET_FEATURES");
        }
        await r.dev.setupQueue(0, r.rings);
        await r.dev.driverOk();
        if (traced) {
          // What the back-end gets: the guest's features plus PROTOCOL_FEATURES, and (STATUS protocol
          // feature) FEATURES_OK then the full status. The last SET_STATUS asks for no reply, so QEMU
          // finishes the DRIVER_OK write before the back-end has read it.
          await waitFor(() => /<- SET_STATUS flags=\S+ u64=0xf\n/.test(r.backend.stderr()), "SET_STATUS 0xf");
          const set = [...r.backend.stderr().matchAll(/<- SET_FEATURES flags=\S+ u64=(0x[0-9a-f]+)/g)].map((m) => BigInt(m[1]!));
          expect(set.at(-1)).toBe(offered | bits(F.PROTOCOL_FEATURES));
        }
      });
    });

    test("device features: num-queues=2 adds MQ; VERSION_1 alone is enough for I/O", async () => {
      await withRig(kind, { queues: 2 }, async (r) => {
        expect((await r.dev.deviceFeatures()) & bits(F.MQ)).toBe(bits(F.MQ));
        // Without EVENT_IDX and INDIRECT_DESC the back-end must fall back to plain notification and direct chains.
        const [blk] = await bringUp(r, { wanted: bits(F.VERSION_1) });
        expect(r.dev.features).toBe(bits(F.VERSION_1));
        await roundTrip(blk!, 0, 8192, 1, { pieces: 2 });
        if (traced) expect(r.backend.stderr()).toMatch(/<- SET_FEATURES flags=\S+ u64=0x140000000\b/);
      });
    });

    test("config space: capacity, blk_size, seg_max, num_queues and discard limits", async () => {
      await withRig(kind, {}, async (r) => {
        await bringUp(r);
        expect(await r.dev.config64(CFG.capacity)).toBe(DISK_BYTES / SECTOR);
        expect(await r.dev.config32(CFG.blk_size)).toBe(512);
        // bunvhost: its largest queue size (256) minus 2 for header and status; qsd: 128 - 2.
        expect(await r.dev.config32(CFG.seg_max)).toBe(126); // both size it for QEMU's default 128-entry ring
        expect(await r.dev.config16(CFG.num_queues)).toBe(1);
        expect(await r.dev.numQueues()).toBe(1);
        expect(await r.dev.config32(CFG.max_discard_sectors)).toBeGreaterThan(0);
        expect(await r.dev.config32(CFG.max_discard_seg)).toBeGreaterThan(0);
        expect(await r.dev.config32(CFG.max_write_zeroes_sectors)).toBeGreaterThan(0);
        expect(await r.dev.config32(CFG.max_write_zeroes_seg)).toBeGreaterThan(0);
      });
    });

    test("GET_ID returns the serial, NUL-terminated", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        const res = await blk!.run({ type: VIRTIO_BLK_T_GET_ID, inLen: 20 });
        expect(res.status).toBe(VIRTIO_BLK_S_OK);
        const nul = res.data.indexOf(0);
        const id = new TextDecoder().decode(res.data.subarray(0, nul < 0 ? 20 : nul));
        // qsd 7.2 has no serial option: its id is the fixed string "vhost_user_blk". It writes the string and
        // its NUL only (the rest of the 20 bytes keeps our poison), which §5.2.6 allows.
        expect(id).toBe(kind.name === "qsd" ? "vhost_user_blk" : "bunvhost");
        if (kind.name === "bunvhost") expect([...res.data.subarray(8)]).toEqual(new Array(12).fill(0));
      });
    });

    test("OUT/IN round trips: 512 B, 4 KiB, 64 KiB, 1 MiB in 16 descriptors and in an indirect table, seg_max pieces", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 512, 1);
        await roundTrip(blk!, 1, 4096, 2);
        await roundTrip(blk!, 9, 65536, 3);
        await roundTrip(blk!, 2048, 1 << 20, 4, { pieces: 16, readPieces: 5 });
        await roundTrip(blk!, 8192, 1 << 20, 5, { pieces: 16, indirect: true });
        // As many data descriptors as seg_max allows (126 for both), in one indirect table.
        const segMax = await r.dev.config32(CFG.seg_max);
        await roundTrip(blk!, 16384, segMax * 4096, 21, { pieces: segMax, indirect: true });
        // The last sector of the disk, and nothing was overwritten by the neighbours.
        await roundTrip(blk!, DISK_BYTES / SECTOR - 1, 512, 6);
        const first = await blk!.read(0, 512);
        expect(sha256(first.data)).toBe(sha256(pattern(512, 1)));
      });
    });

    test("OUT/IN: queue-size=256, a full ring of indirect requests in flight with one kick", async () => {
      await withRig(kind, { queueSize: 256 }, async (r) => {
        const [blk] = await bringUp(r);
        expect(blk!.vq.size).toBe(256);
        const heads = [];
        for (let i = 0; i < 256; i++) {
          heads.push(await blk!.submit({ type: VIRTIO_BLK_T_OUT, sector: 8 * i, data: pattern(4096, 100 + i), indirect: true }));
        }
        expect(await blk!.vq.kick()).toBe(true);
        for (const h of heads) expect((await blk!.complete(h)).status).toBe(VIRTIO_BLK_S_OK);
        const all = await blk!.read(0, 256 * 4096, { pieces: 8 });
        for (let i = 0; i < 256; i++) expect(sha256(all.data.subarray(4096 * i, 4096 * (i + 1)))).toBe(sha256(pattern(4096, 100 + i)));
      });
    });

    test("queue-size=1024 (QEMU's largest): the ring is accepted and serves I/O", async () => {
      // vhost-user has no way to announce a maximum ring size: a back-end that refuses QEMU's
      // queue-size leaves a device that reports DRIVER_OK and never completes anything.
      await withRig(kind, { queueSize: 1024 }, async (r) => {
        const [blk] = await bringUp(r);
        expect(blk!.vq.size).toBe(1024);
        await roundTrip(blk!, 8, 4096, 11);
      });
    });

    test("OUT/IN: an 8-entry ring wraps five times with every descriptor in use", async () => {
      await withRig(kind, {}, async (r) => {
        await r.dev.negotiate(await r.dev.deviceFeatures());
        const vq = await r.dev.setupQueue(0, r.rings, { size: 8, indirectMax: 4 });
        await r.dev.driverOk();
        const blk = new BlkQueue(vq, dataWindow(0));
        // Per round: four indirect requests (one descriptor each) and a direct one of four: 8 descriptors, 5 avail entries.
        let k = 0;
        for (let round = 0; round < 8; round++) {
          const heads = [];
          for (let i = 0; i < 5; i++, k++) {
            heads.push(await blk.submit({ type: VIRTIO_BLK_T_OUT, sector: 8 * k, data: pattern(4096, 200 + k), pieces: 2, indirect: i < 4 }));
          }
          await vq.kick();
          for (const h of heads) expect((await blk.complete(h)).status).toBe(VIRTIO_BLK_S_OK);
        }
        for (let j = 0; j < k; j++) expect(sha256((await blk.read(8 * j, 4096, { indirect: j % 2 === 0 })).data)).toBe(sha256(pattern(4096, 200 + j)));
        expect(vq.availIndex).toBe(80);
      });
    });

    test("buffers and rings in low RAM (below 640 KiB, QEMU's first memory region)", async () => {
      await withRig(kind, {}, async (r) => {
        await r.dev.negotiate(await r.dev.deviceFeatures());
        const vq = await r.dev.setupQueue(0, new GuestAlloc(0x10000, 0x20000), { indirectMax: 16 });
        await r.dev.driverOk();
        const blk = new BlkQueue(vq, new GuestAlloc(0x20000, 0xa0000));
        await roundTrip(blk, 40, 65536, 18, { pieces: 4 });
        await roundTrip(blk, 200, 65536, 19, { pieces: 8, indirect: true });
      });
    });

    test("EVENT_IDX: the driver kicks only when avail_event asks, and the back-end keeps up", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        const vq = blk!.vq;
        expect(vq.eventIdx).toBe(true);
        for (let round = 0; round < 6; round++) {
          const heads = [];
          for (let i = 0; i <= round; i++) {
            heads.push(await blk!.submit({ type: VIRTIO_BLK_T_OUT, sector: 64 * round + 8 * i, data: pattern(4096, 300 + 10 * round + i) }));
            // Kick after every request: a back-end still draining the ring may ask for no kick in between.
            await vq.kick();
          }
          for (const h of heads) expect((await blk!.complete(h)).status).toBe(VIRTIO_BLK_S_OK);
          // Idle, the back-end must have asked to be told about the very next request (§2.7.10).
          expect(await vq.availEvent()).toBe(vq.availIndex);
        }
        expect(vq.kicks).toBeGreaterThanOrEqual(6);
      });
    });

    test("call notifications: ISR shows the back-end's signal; used_event and NO_INTERRUPT hold it back", async () => {
      // QEMU without MSI-X (the driver never enables it) turns the back-end's call eventfd into INTx and ISR bit 0.
      const isrAfter = async (r: Rig, blk: BlkQueue, seed: number, waitMs: number) => {
        expect((await blk.write(seed, pattern(512, seed))).status).toBe(VIRTIO_BLK_S_OK);
        const deadline = Date.now() + waitMs;
        let isr = 0;
        do isr |= await r.dev.isr();
        while (!(isr & 1) && Date.now() < deadline);
        return isr & 1;
      };
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        await r.dev.isr();
        // used_event is 0: the first used entry (used.idx 0 → 1) must be signalled.
        expect(await isrAfter(r, blk!, 1, 2000)).toBe(1);
        // Ask for a signal only when used.idx passes 4, i.e. with the fifth request.
        await blk!.vq.setUsedEvent(4);
        for (let k = 2; k <= 4; k++) expect(await isrAfter(r, blk!, k, 30)).toBe(0);
        expect(await isrAfter(r, blk!, 5, 2000)).toBe(1);

        // Without EVENT_IDX the avail.flags NO_INTERRUPT bit is the hint.
        const [plain] = await bringUp(r, { wanted: bits(F.VERSION_1) });
        await r.dev.isr();
        expect(await isrAfter(r, plain!, 6, 2000)).toBe(1);
        await plain!.vq.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
        expect(await isrAfter(r, plain!, 7, 30)).toBe(0);
        await plain!.vq.setAvailFlags(0);
        expect(await isrAfter(r, plain!, 8, 2000)).toBe(1);
      });
    });

    test("IN past the end of the disk is IOERR; an unknown request type is UNSUPP", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        const last = DISK_BYTES / SECTOR;
        expect((await blk!.read(last - 1, 1024)).status).toBe(VIRTIO_BLK_S_IOERR);
        expect((await blk!.write(last, pattern(512, 1))).status).toBe(VIRTIO_BLK_S_IOERR);
        expect((await blk!.run({ type: 0x7777, inLen: 512 })).status).toBe(VIRTIO_BLK_S_UNSUPP);
        // The queue still works afterwards.
        await roundTrip(blk!, last - 8, 4096, 20);
      });
    });

    test("ring indexes wrap past 65535: 70000 FLUSH requests with EVENT_IDX and indirect, then without either", async () => {
      const flushChain = async (r: Rig, q: number) => {
        const ram = dataWindow(q);
        const hdr = ram.alloc(16), status = ram.alloc(1);
        const h = new Uint8Array(16);
        h[0] = VIRTIO_BLK_T_FLUSH;
        await r.qt.memwrite(hdr, h);
        return [{ addr: hdr, len: 16, write: false }, { addr: status, len: 1, write: true }];
      };
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        const last = await blk!.vq.flood(await flushChain(r, 1), 70000, { indirect: true });
        expect(last.length).toBeGreaterThan(0);
        for (const u of last) expect(u.len).toBe(1);
        expect(blk!.vq.availIndex).toBe(70000 & 0xffff);
        await roundTrip(blk!, 0, 65536, 27, { pieces: 4 });
        // EVENT_IDX's avail_event wrapped along with avail.idx.
        expect(await blk!.vq.availEvent()).toBe(blk!.vq.availIndex);
        const kicks = blk!.vq.kicks;
        expect(kicks).toBeGreaterThanOrEqual(Math.ceil(70000 / 128));

        const [plain] = await bringUp(r, { wanted: bits(F.VERSION_1) });
        await plain!.vq.flood(await flushChain(r, 1), 70000);
        await roundTrip(plain!, 128, 65536, 28, { pieces: 4 });
        // The back-end really consumed them all: GET_VRING_BASE (at the reset) reported the wrapped index.
        if (traced) expect(r.backend.stderr()).toContain(`-> GET_VRING_BASE flags=0x4 index=0 num=${(70000 + 2) & 0xffff}\n`);
      });
    });

    test("FLUSH completes with OK", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        expect(r.dev.features & bits(F.FLUSH)).toBe(bits(F.FLUSH));
        await roundTrip(blk!, 100, 4096, 7);
        const res = await blk!.run({ type: VIRTIO_BLK_T_FLUSH });
        expect({ status: res.status, usedLen: res.usedLen }).toEqual({ status: VIRTIO_BLK_S_OK, usedLen: 1 });
      });
    });

    test("WRITE_ZEROES (with and without UNMAP) and DISCARD read back as zeroes", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        const region = 256, len = 64 * 1024;
        const zeroes = sha256(new Uint8Array(8 * 1024));
        const zeroesAt = async (sector: number) => sha256((await blk!.read(sector, 8 * 1024)).data);
        expect((await blk!.write(region, pattern(len, 8))).status).toBe(VIRTIO_BLK_S_OK);
        const segs = Math.min(2, await r.dev.config32(CFG.max_write_zeroes_seg));
        const wz = await blk!.run({
          type: VIRTIO_BLK_T_WRITE_ZEROES,
          data: blkSegments([{ sector: region, count: 16 }, { sector: region + 32, count: 16, unmap: true }].slice(0, segs)),
        });
        expect(wz.status).toBe(VIRTIO_BLK_S_OK);
        expect(await zeroesAt(region)).toBe(zeroes);
        if (segs === 2) expect(await zeroesAt(region + 32)).toBe(zeroes);
        // Sectors between the segments are untouched.
        expect(sha256((await blk!.read(region + 16, 8192)).data)).toBe(sha256(pattern(len, 8).subarray(8192, 16384)));

        const dc = await blk!.run({ type: VIRTIO_BLK_T_DISCARD, data: blkSegments([{ sector: region + 64, count: 16 }]) });
        expect(dc.status).toBe(VIRTIO_BLK_S_OK);
        // DISCARD only MAY deallocate (§5.2.6.2). bunvhost's RAM disk zeroes; qsd's file blockdev defaults to
        // discard=ignore, so there the data stays and only the status is checked.
        if (kind.name === "bunvhost") expect(await zeroesAt(region + 64)).toBe(zeroes);
      });
    });

    test("reset (status 0) and re-initialisation on new rings: I/O works again and data persists", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 4096, 9);
        const firstDesc = blk!.vq.desc;
        const before = r.received().length;
        await r.dev.reset();
        if (traced) {
          await waitFor(() => r.received().slice(before).includes("GET_VRING_BASE"), "GET_VRING_BASE after reset");
          // QEMU stops the rings: disable, then fetch the base (the back-end has to stop the queue to answer).
          expect(r.received().slice(before)).toEqual(["SET_STATUS", "SET_VRING_ENABLE", "GET_VRING_BASE"]);
          expect(r.backend.stderr()).toMatch(/-> GET_VRING_BASE flags=\S+ index=0 num=2\n/);
        }
        const mid = r.received().length;
        const [blk2] = await bringUp(r);
        expect(blk2!.vq.desc).not.toBe(firstDesc);
        const got = await blk2!.read(0, 4096);
        expect(sha256(got.data)).toBe(sha256(pattern(4096, 9)));
        await roundTrip(blk2!, 8, 4096, 10);
        if (traced) {
          const again = r.received().slice(mid);
          for (const m of ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_ENABLE"]) expect(again).toContain(m);
          // The new start begins at avail index 0 again.
          expect(r.backend.stderr().match(/<- SET_VRING_BASE flags=\S+ index=0 num=0\n/g)).toHaveLength(2);
        }
      });
    });

    // qemu-storage-daemon 7.2 fails this one (checked 5 of 5 runs, even with one request in flight): it answers
    // GET_VRING_BASE while its coroutines still hold requests, QEMU then replaces the call fd, and the late
    // completion ends in "vu_panic: Error writing eventfd: Bad file descriptor"; the device is dead from then on.
    // So this test exists for bunvhost only.
    if (kind.name !== "qsd") test(
      "reset with requests kicked or only published, 20 times: GET_VRING_BASE reports what was completed",
      async () => {
        await withRig(kind, {}, async (r) => {
          for (let iter = 0; iter < 20; iter++) {
            const [blk] = await bringUp(r, { indirectMax: 4 });
            const n = 1 + (iter % 4) * 8;
            for (let i = 0; i < n; i++) {
              await blk!.submit({ type: VIRTIO_BLK_T_OUT, sector: 128 * i, data: pattern(65536, 500 + iter), indirect: true });
            }
            // Every third round is never kicked: the back-end may leave those requests alone (base 0) or poll them.
            if (iter % 3) await blk!.vq.kick();
            if (iter % 2) await Bun.sleep(1);
            await r.dev.reset();
            if (traced) {
              // Everything the back-end took from the ring (the base it reports) has been completed in guest memory.
              const bases = [...r.backend.stderr().matchAll(/-> GET_VRING_BASE flags=\S+ index=0 num=(\d+)\n/g)];
              expect(bases).toHaveLength(iter + 1);
              const base = Number(bases.at(-1)![1]);
              expect(base).toBeLessThanOrEqual(n);
              expect(await blk!.vq.usedIdx()).toBe(base);
            }
            // The rings move on each time; reuse the space once it runs out.
            if (r.rings.mark() > RING_RAM[1] - 0x100000) r.rings = new GuestAlloc(...RING_RAM);
          }
          const [blk] = await bringUp(r);
          await roundTrip(blk!, 0, 4096, 29);
          expect(r.backend.stderr()).not.toMatch(/disconnected|error|warn/);
        });
      },
    );

    test("read-only back-end with 4 queues, num-queues=2: RO offered, OUT is IOERR, queue 1 alone serves IN", async () => {
      await withRig(kind, { queues: 2, backendQueues: 4, readonly: true }, async (r) => {
        expect((await r.dev.deviceFeatures()) & bits(F.RO)).toBe(bits(F.RO));
        // QEMU puts its own num-queues in the config space, whatever the back-end said.
        expect(await r.dev.config16(CFG.num_queues)).toBe(2);
        const [q1] = await bringUp(r, { queues: [1] });
        expect((await q1!.write(0, pattern(4096, 30))).status).toBe(VIRTIO_BLK_S_IOERR);
        const rd = await q1!.read(0, 4096);
        expect(rd.status).toBe(VIRTIO_BLK_S_OK);
        expect(sha256(rd.data)).toBe(sha256(new Uint8Array(4096)));
      });
    });

    test("num-queues=2: both queues in use at once; then queue 1 left unset after a reset", async () => {
      await withRig(kind, { queues: 2 }, async (r) => {
        expect(await r.dev.numQueues()).toBe(2);
        const [q0, q1] = await bringUp(r, { queues: [0, 1] });
        expect(r.dev.features & bits(F.MQ)).toBe(bits(F.MQ));
        expect(await r.dev.config16(CFG.num_queues)).toBe(2);
        const h0 = await q0!.submit({ type: VIRTIO_BLK_T_OUT, sector: 0, data: pattern(65536, 11) });
        const h1 = await q1!.submit({ type: VIRTIO_BLK_T_OUT, sector: 128, data: pattern(65536, 12) });
        await q1!.vq.kick();
        await q0!.vq.kick();
        expect((await q0!.complete(h0)).status).toBe(VIRTIO_BLK_S_OK);
        expect((await q1!.complete(h1)).status).toBe(VIRTIO_BLK_S_OK);
        // Each queue reads what the other wrote.
        expect(sha256((await q1!.read(0, 65536)).data)).toBe(sha256(pattern(65536, 11)));
        expect(sha256((await q0!.read(128, 65536)).data)).toBe(sha256(pattern(65536, 12)));
        if (traced) {
          const log = r.backend.stderr();
          expect(log).toMatch(/<- SET_VRING_ADDR flags=\S+ index=1 /);
          expect(log).toMatch(/<- SET_VRING_KICK flags=\S+ index=1 /);
        }
        // QEMU skips a queue whose ring address is 0, so the back-end sees only queue 0 started.
        await r.dev.reset();
        const [only] = await bringUp(r, { queues: [0] });
        await roundTrip(only!, 256, 4096, 13);
      });
    });

    test("memory hotplug: a pc-dimm at 4 GiB while running, then buffers and rings above 4 GiB", async () => {
      await withRig(kind, { qmp: true, extraQemu: ["-m", "256M,slots=2,maxmem=2G"] }, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 4096, 22);
        const before = r.received().length;
        await r.qmp!.execute("object-add", { "qom-type": "memory-backend-memfd", id: "dimm1", size: 64 << 20, share: true });
        await r.qmp!.execute("device_add", { driver: "pc-dimm", id: "d1", memdev: "dimm1" });
        const [dimm] = await r.qmp!.execute("query-memory-devices");
        const base: number = dimm.data.addr;
        expect(base).toBeGreaterThanOrEqual(2 ** 32);
        // QEMU adds the region to the running back-end (CONFIGURE_MEM_SLOTS: one ADD_MEM_REG, no full table).
        if (traced) expect(r.received().slice(before)).toContain("ADD_MEM_REG");
        // Buffers in the DIMM, rings still low: every descriptor address has a non-zero high half.
        const high = new BlkQueue(blk!.vq, new GuestAlloc(base, base + (32 << 20)));
        await roundTrip(high, 64, 65536, 23, { pieces: 4 });
        await roundTrip(high, 256, 65536, 24, { pieces: 4, indirect: true });
        // Re-initialised with the rings in the DIMM too.
        await r.dev.reset();
        r.rings = new GuestAlloc(base + (32 << 20), base + (64 << 20));
        const [blk2] = await bringUp(r);
        expect(blk2!.vq.desc).toBeGreaterThanOrEqual(2 ** 32);
        const ring2 = new BlkQueue(blk2!.vq, new GuestAlloc(base, base + (32 << 20)));
        expect(sha256((await ring2.read(64, 65536)).data)).toBe(sha256(pattern(65536, 23)));
        expect(sha256((await ring2.read(0, 4096)).data)).toBe(sha256(pattern(4096, 22)));
      });
    });

    test("QEMU killed (SIGKILL) right after a kick of 64 requests: the back-end serves the next QEMU", async () => {
      await withRig(kind, {}, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 4096, 25);
        for (let i = 0; i < 64; i++) await blk!.submit({ type: VIRTIO_BLK_T_OUT, sector: 1024 + 128 * i, data: pattern(65536, 400 + i), indirect: true });
        await blk!.vq.kick();
        r.qemu.proc.kill("SIGKILL");
        await r.qemu.exited;
        if (traced) await waitFor(() => /front-end disconnected/.test(r.backend.stderr()), "the back-end to see the disconnect");
        const next = await startQemu(r.backend, {});
        try {
          r.qt = next.qt;
          r.dev = await openDevice(next.qt);
          r.rings = new GuestAlloc(...RING_RAM);
          const [blk2] = await bringUp(r);
          expect(sha256((await blk2!.read(0, 4096)).data)).toBe(sha256(pattern(4096, 25)));
          await roundTrip(blk2!, 8, 4096, 26);
        } catch (e) {
          throw new Error(`second QEMU: ${(e as Error).message}\n${next.qemu.describe()}`, { cause: e });
        } finally {
          next.qt.close();
          await next.qemu.stop();
          next.listener.close();
        }
      });
    });

    test("QMP stop and cont: the rings resume at the base GET_VRING_BASE gave; a request kicked while stopped completes after cont", async () => {
      await withRig(kind, { qmp: true }, async (r) => {
        const [blk] = await bringUp(r);
        for (let i = 0; i < 3; i++) await roundTrip(blk!, 8 * i, 4096, 31 + i);
        const before = r.received().length;
        await r.qmp!.execute("stop");
        if (traced) {
          await waitFor(() => r.received().slice(before).includes("GET_VRING_BASE"), "GET_VRING_BASE on stop");
          expect(r.backend.stderr()).toContain("-> GET_VRING_BASE flags=0x4 index=0 num=6\n");
        }
        // Published and kicked while the VM is stopped: QEMU keeps the kick (the host notifier it re-arms on
        // start begins signalled) and the back-end finds the request when the ring restarts.
        const head = await blk!.submit({ type: VIRTIO_BLK_T_OUT, sector: 64, data: pattern(4096, 34) });
        await blk!.vq.kick({ force: true });
        await Bun.sleep(20);
        expect(await blk!.vq.usedIdx()).toBe(6);
        const mid = r.received().length;
        await r.qmp!.execute("cont");
        expect((await blk!.complete(head)).status).toBe(VIRTIO_BLK_S_OK);
        if (traced) {
          // The restart carries the ring's position, not 0; the guest never reset anything.
          expect(r.received().slice(mid)).toContain("SET_VRING_BASE");
          expect(r.backend.stderr()).toContain("<- SET_VRING_BASE flags=0x1 index=0 num=6\n");
        }
        expect(sha256((await blk!.read(64, 4096)).data)).toBe(sha256(pattern(4096, 34)));
        await roundTrip(blk!, 128, 65536, 35, { indirect: true });
      });
    });

    test("QMP system_reset stops the rings; the driver re-initialises from scratch (BARs are cleared)", async () => {
      // qemuArgs passes -no-reboot, under which QEMU turns even a QMP system_reset into a shutdown
      // (SHUTDOWN event, reason host-qmp-system-reset); -action reboot=reset given later undoes that.
      await withRig(kind, { qmp: true, extraQemu: ["-action", "reboot=reset"] }, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 4096, 14);
        const before = r.received().length;
        await r.qmp!.execute("system_reset");
        await r.qmp!.waitEvent("RESET");
        if (traced) {
          await waitFor(() => r.received().slice(before).includes("GET_VRING_BASE"), "GET_VRING_BASE after system_reset");
          expect(r.received().slice(before)).toEqual(["SET_STATUS", "SET_VRING_ENABLE", "GET_VRING_BASE"]);
          expect(r.backend.stderr()).toMatch(/<- SET_STATUS flags=\S+ u64=0x0\n/);
        }
        // The reset cleared BAR4 and the command register: find and map the device again.
        r.dev = await openDevice(r.qt);
        expect(await r.dev.status()).toBe(0);
        const [blk2] = await bringUp(r);
        expect(sha256((await blk2!.read(0, 4096)).data)).toBe(sha256(pattern(4096, 14)));
        await roundTrip(blk2!, 8, 512, 15);
      });
    });

    test("QMP system_reset under -no-reboot shuts QEMU down; the back-end sees the rings stopped, then EOF", async () => {
      await withRig(kind, { qmp: true }, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 512, 16);
        await r.qmp!.execute("system_reset");
        expect(await r.qemu.exited).toBe(0);
        expect(r.qmp!.events.map((e) => e.event)).toContain("SHUTDOWN");
        if (traced) {
          await waitFor(() => /front-end disconnected/.test(r.backend.stderr()), "the back-end to see the disconnect");
          expect(after(r.received(), "SET_STATUS")).toContain("GET_VRING_BASE");
        }
      });
    });

    test("QMP quit: the back-end sees the rings stopped, then EOF, and serves the next QEMU", async () => {
      await withRig(kind, { qmp: true }, async (r) => {
        const [blk] = await bringUp(r);
        await roundTrip(blk!, 0, 65536, 17);
        const before = r.received().length;
        await r.qmp!.execute("quit").catch(() => {}); // QEMU may close QMP before the reply
        expect(await r.qemu.exited).toBe(0);
        if (traced) {
          await waitFor(() => /front-end disconnected/.test(r.backend.stderr()), "the back-end to see the disconnect");
          const seq = r.received().slice(before);
          expect(seq).toContain("GET_VRING_BASE");
          expect(seq.indexOf("SET_VRING_ENABLE")).toBeLessThan(seq.indexOf("GET_VRING_BASE"));
        }
        // A second QEMU on the same back-end reads what the first wrote.
        const next = await startQemu(r.backend, {});
        try {
          r.qt = next.qt;
          r.dev = await openDevice(next.qt);
          const [blk2] = await bringUp(r);
          expect(sha256((await blk2!.read(0, 65536)).data)).toBe(sha256(pattern(65536, 17)));
        } catch (e) {
          throw new Error(`second QEMU: ${(e as Error).message}\n${next.qemu.describe()}`, { cause: e });
        } finally {
          next.qt.close();
          await next.qemu.stop();
          next.listener.close();
        }
      });
    });
  });
}

// ---- packed rings (VIRTIO 1.2 §2.8): QEMU's vhost-user-blk-pci with packed=on ----

const PACKED = 1n << BigInt(VIRTIO_F_RING_PACKED);
/** GET_VRING_BASE / SET_VRING_BASE for a packed ring (QEMU 7.2): avail index | avail wrap << 15, used likewise << 16. */
const packedBase = (avail: { index: number; wrap: number }, used = avail) =>
  ((avail.index | (avail.wrap << 15)) | ((used.index | (used.wrap << 15)) * 65536)) >>> 0;

/** Negotiates `wanted` (default: all offered, which must include RING_PACKED), one packed queue 0, DRIVER_OK. */
async function bringUpPacked(r: Rig, o: { wanted?: bigint; size?: number; indirectMax?: number } = {}): Promise<BlkQueue<PackedQueue>> {
  await r.dev.negotiate(o.wanted ?? (await r.dev.deviceFeatures()));
  const vq = await r.dev.setupPackedQueue(0, r.rings, { size: o.size, indirectMax: o.indirectMax ?? 256 });
  await r.dev.driverOk();
  return new BlkQueue(vq, dataWindow(0));
}

/** A FLUSH request's header and status in the data window of queue `q`, as a chain shape for `flood`. */
async function flushChain(r: Rig, q: number) {
  const ram = dataWindow(q);
  const hdr = ram.alloc(16), status = ram.alloc(1);
  const h = new Uint8Array(16);
  h[0] = VIRTIO_BLK_T_FLUSH;
  await r.qt.memwrite(hdr, h);
  return [{ addr: hdr, len: 16, write: false }, { addr: status, len: 1, write: true }];
}

for (const kind of backendKinds) {
  const skip = qemuSkipReason() ?? kind.skipReason();
  const traced = kind.name === "bunvhost";

  describe.skipIf(skip !== null)(`qtest front-end, packed ring: ${kind.name}${skip ? ` (skipped: ${skip})` : ""}`, () => {
    if (kind.name === "qsd") {
      test("packed=on: QEMU masks RING_PACKED (bit 34), which qsd 7.2 does not offer; the device runs split rings", async () => {
        await withRig(kind, { packed: true }, async (r) => {
          expect((await r.dev.deviceFeatures()) & PACKED).toBe(0n);
          const [blk] = await bringUp(r);
          await roundTrip(blk!, 0, 4096, 40);
        });
      });
      return;
    }

    test("packed=on: RING_PACKED (bit 34) offered and negotiated; the rings start at index 0 with both wrap counters 1", async () => {
      await withRig(kind, { packed: true }, async (r) => {
        const offered = await r.dev.deviceFeatures();
        expect(offered & PACKED).toBe(PACKED);
        const blk = await bringUpPacked(r);
        expect(r.dev.features & PACKED).toBe(PACKED);
        await roundTrip(blk, 0, 4096, 41);
        await waitFor(() => /<- SET_FEATURES flags=\S+ u64=0x/.test(r.backend.stderr()), "SET_FEATURES");
        const set = [...r.backend.stderr().matchAll(/<- SET_FEATURES flags=\S+ u64=(0x[0-9a-f]+)/g)].map((m) => BigInt(m[1]!));
        expect(set.at(-1)! & PACKED).toBe(PACKED);
        expect(r.backend.stderr()).toContain(`<- SET_VRING_BASE flags=0x1 index=0 num=${packedBase({ index: 0, wrap: 1 })}\n`);
      });
    });

    test("packed: OUT/IN round trips 512 B to 1 MiB, in 16 descriptors, in an indirect table, and seg_max pieces", async () => {
      await withRig(kind, { packed: true }, async (r) => {
        const blk = await bringUpPacked(r);
        await roundTrip(blk, 0, 512, 42);
        await roundTrip(blk, 1, 4096, 43);
        await roundTrip(blk, 9, 65536, 44, { pieces: 3 });
        await roundTrip(blk, 2048, 1 << 20, 45, { pieces: 16, readPieces: 5 });
        await roundTrip(blk, 8192, 1 << 20, 46, { pieces: 16, indirect: true });
        const segMax = await r.dev.config32(CFG.seg_max);
        await roundTrip(blk, 16384, segMax * 4096, 47, { pieces: segMax, indirect: true });
        expect(sha256((await blk.read(0, 512)).data)).toBe(sha256(pattern(512, 42)));
      });
    });

    for (const size of [8, 6]) {
      test(`packed: ${size === 8 ? "an" : "a"} ${size}-entry ring${size & (size - 1) ? " (not a power of 2, §2.8.10.1)" : ""} wraps 10 times with chains across its end and every slot in use`, async () => {
        await withRig(kind, { packed: true }, async (r) => {
          const blk = await bringUpPacked(r, { size, indirectMax: 4 });
          expect(blk.vq.size).toBe(size);
          // Per round: one direct request of 4 descriptors (header, 2 data, status), the rest indirect (1 each):
          // size - 3 requests fill the ring; as the start moves by `size` each round, the direct chain lands on
          // every offset, across the end of the ring too.
          let k = 0;
          for (let round = 0; round < 10; round++) {
            const ids = [];
            for (let i = 0; i < size - 3; i++, k++) {
              const direct = i === round % (size - 3);
              ids.push(await blk.submit({ type: VIRTIO_BLK_T_OUT, sector: 8 * k, data: pattern(4096, 600 + k), pieces: 2, indirect: !direct }));
            }
            await blk.vq.kick();
            for (const id of ids) expect((await blk.complete(id)).status).toBe(VIRTIO_BLK_S_OK);
          }
          expect(blk.vq.availPosition).toEqual({ index: 0, wrap: 1 }); // 10 rounds of `size` descriptors: 10 laps
          for (let j = 0; j < k; j += 7) expect(sha256((await blk.read(8 * j, 4096, { indirect: true })).data)).toBe(sha256(pattern(4096, 600 + j)));
        });
      });
    }

    test("packed: 6000 FLUSH requests across 46 wraps with EVENT_IDX and indirect, then 3000 direct without EVENT_IDX on an 8-entry ring", async () => {
      await withRig(kind, { packed: true }, async (r) => {
        const blk = await bringUpPacked(r);
        const last = await blk.vq.flood(await flushChain(r, 1), 6000, { indirect: true });
        expect(last.length).toBeGreaterThan(0);
        for (const u of last) expect(u.len).toBe(1);
        expect(blk.vq.availPosition).toEqual({ index: 6000 % 128, wrap: Math.floor(6000 / 128) % 2 ? 0 : 1 });
        await roundTrip(blk, 0, 65536, 48, { pieces: 4 });
        // EVENT_IDX: idle, the back-end asks (DESC) for a kick at the very next descriptor, in this lap.
        const ev = await blk.vq.deviceEvent();
        const pos = blk.vq.availPosition;
        expect(ev).toEqual({ flags: VRING_PACKED_EVENT_FLAG_DESC, offWrap: pos.index | (pos.wrap << 15) });
        expect(blk.vq.kicks).toBeGreaterThanOrEqual(Math.ceil(6000 / 128));

        await r.dev.reset();
        const plain = await bringUpPacked(r, { wanted: bits(F.VERSION_1) | PACKED, size: 8 });
        expect(plain.vq.eventIdx).toBe(false);
        await plain.vq.flood(await flushChain(r, 1), 3000);
        await roundTrip(plain, 128, 65536, 49, { pieces: 4 });
        // 3000 chains of 2 descriptors, then a write and a read of 6 each (header, 4 data pieces, status).
        const consumed = 3000 * 2 + 2 * 6;
        const at = { index: consumed % 8, wrap: Math.floor(consumed / 8) % 2 ? 0 : 1 };
        expect(plain.vq.availPosition).toEqual(at);
        // GET_VRING_BASE at the reset reports the packed position the back-end reached.
        await r.dev.reset();
        await waitFor(() => r.backend.stderr().includes(`-> GET_VRING_BASE flags=0x4 index=0 num=${packedBase(at)}\n`), `GET_VRING_BASE num=${packedBase(at)}`);
      });
    });

    test("packed: call notifications follow the driver's event suppression area (ENABLE, DISABLE, DESC)", async () => {
      const isrAfter = async (r: Rig, blk: BlkQueue<PackedQueue>, seed: number, waitMs: number) => {
        expect((await blk.write(seed, pattern(512, seed))).status).toBe(VIRTIO_BLK_S_OK);
        const deadline = Date.now() + waitMs;
        let isr = 0;
        do isr |= await r.dev.isr();
        while (!(isr & 1) && Date.now() < deadline);
        return isr & 1;
      };
      await withRig(kind, { packed: true }, async (r) => {
        const blk = await bringUpPacked(r, { size: 16 });
        await r.dev.isr();
        expect(await isrAfter(r, blk, 1, 2000)).toBe(1);
        await blk.vq.setDriverEvent(VRING_PACKED_EVENT_FLAG_DISABLE);
        for (let k = 2; k <= 3; k++) expect(await isrAfter(r, blk, k, 30)).toBe(0);
        // DESC: signal only once the device writes the used descriptor at the position two 3-descriptor
        // requests on, i.e. with the third request from here.
        const at = blk.vq.usedPosition;
        const target = at.index + 6;
        await blk.vq.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, (target % 16) | ((target >= 16 ? at.wrap ^ 1 : at.wrap) << 15));
        for (let k = 4; k <= 5; k++) expect(await isrAfter(r, blk, k, 30)).toBe(0);
        expect(await isrAfter(r, blk, 6, 2000)).toBe(1);
        await blk.vq.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
        expect(await isrAfter(r, blk, 7, 2000)).toBe(1);
      });
    });

    test("packed: QMP stop and cont carry the packed position (index | wrap << 15) in GET_VRING_BASE and SET_VRING_BASE", async () => {
      await withRig(kind, { packed: true, qmp: true }, async (r) => {
        const blk = await bringUpPacked(r, { size: 8, indirectMax: 4 });
        // Two round trips of 3 descriptors each way: 12 descriptors, so position 4 in the second lap (wrap 0).
        for (let i = 0; i < 2; i++) await roundTrip(blk, 8 * i, 4096, 50 + i);
        const at = blk.vq.availPosition;
        expect(at).toEqual({ index: 4, wrap: 0 });
        const before = r.received().length;
        await r.qmp!.execute("stop");
        await waitFor(() => r.received().slice(before).includes("GET_VRING_BASE"), "GET_VRING_BASE on stop");
        expect(r.backend.stderr()).toContain(`-> GET_VRING_BASE flags=0x4 index=0 num=${packedBase(at)}\n`);
        const id = await blk.submit({ type: VIRTIO_BLK_T_OUT, sector: 64, data: pattern(4096, 52) });
        await blk.vq.kick({ force: true });
        await Bun.sleep(20);
        expect(await blk.vq.reap()).toEqual([]);
        const mid = r.received().length;
        await r.qmp!.execute("cont");
        expect((await blk.complete(id)).status).toBe(VIRTIO_BLK_S_OK);
        expect(r.received().slice(mid)).toContain("SET_VRING_BASE");
        expect(r.backend.stderr()).toContain(`<- SET_VRING_BASE flags=0x1 index=0 num=${packedBase(at)}\n`);
        expect(sha256((await blk.read(64, 4096)).data)).toBe(sha256(pattern(4096, 52)));
        await roundTrip(blk, 128, 65536, 53, { indirect: true });
      });
    });

    test("packed: driver reset with requests in flight, 10 times; each re-init starts over at index 0, wrap 1", async () => {
      await withRig(kind, { packed: true }, async (r) => {
        for (let iter = 0; iter < 10; iter++) {
          const blk = await bringUpPacked(r, { size: 16, indirectMax: 4 });
          const n = 1 + (iter % 4) * 4;
          for (let i = 0; i < n; i++) await blk.submit({ type: VIRTIO_BLK_T_OUT, sector: 128 * i, data: pattern(65536, 700 + iter), indirect: true });
          if (iter % 3) await blk.vq.kick();
          if (iter % 2) await Bun.sleep(1);
          await r.dev.reset();
          const bases = [...r.backend.stderr().matchAll(/-> GET_VRING_BASE flags=\S+ index=0 num=(\d+)\n/g)];
          expect(bases).toHaveLength(iter + 1);
          // Everything the back-end took (k <= n one-descriptor requests, first lap) it completed before
          // answering: avail and used positions agree, and k used descriptors are in guest memory.
          const num = Number(bases.at(-1)![1]);
          const k = num & 0x7fff;
          expect(k).toBeLessThanOrEqual(n);
          expect(num).toBe(packedBase({ index: k, wrap: 1 }));
          expect((await blk.vq.reap()).length).toBe(k);
          if (r.rings.mark() > RING_RAM[1] - 0x100000) r.rings = new GuestAlloc(...RING_RAM);
        }
        const sets = [...r.backend.stderr().matchAll(/<- SET_VRING_BASE flags=\S+ index=0 num=(\d+)\n/g)].map((m) => Number(m[1]));
        expect(new Set(sets)).toEqual(new Set([packedBase({ index: 0, wrap: 1 })]));
        const blk = await bringUpPacked(r);
        await roundTrip(blk, 0, 4096, 54);
        const trouble = r.backend.stderr().split("\n").filter((l) => /disconnected|error|warn/.test(l));
        expect(trouble).toEqual([]);
      });
    });
  });
}

/**
 * vIOMMU support (VIRTIO_F_ACCESS_PLATFORM + the IOTLB): our front-end maps
 * guest RAM at I/O virtual addresses that differ from the guest-physical
 * addresses of the memory table, sets the rings by IOVA and answers the
 * back-end's misses (back-end channel) with UPDATEs, as QEMU does behind an
 * intel-iommu. Data is checked byte for byte; invalidations and remaps happen
 * with requests in flight; a device write into a read-only mapping must fail
 * without writing. On the main loop and on an I/O thread.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { BlkDriver, GuestRam, SplitDriver, VhostUserFrontend } from "../../src/frontend/index.ts";
import { bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1 } from "../../src/protocol/features.ts";
import { IOTLB_UPDATE, Req } from "../../src/protocol/messages.ts";
import { backendKinds, type Backend } from "../support/backends.ts";
import { fillRandom, rng } from "../support/random.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();

const PAGE = 4096;
/** The memory table puts guest RAM here (guest-physical); descriptors and rings use the IOVAs 0.. instead. */
const GPA_SHIFT = 0x40_0000_0000;
const IO = 64 << 10;
const T_IN = 0, T_OUT = 1;

/** One front-end session with the IOTLB on: rings and buffers addressed by IOVA (= the driver's own offsets). */
class Session {
  readonly fe: VhostUserFrontend;
  readonly ram = new GuestRam({ size: 16 << 20 });
  readonly vq: SplitDriver;
  /** IOVA page → page of guest RAM (driver offsets) it maps, when not the same page. */
  readonly remap = new Map<number, number>();
  /** IOVA pages the front-end maps read-only. */
  readonly readOnly = new Set<number>();
  misses = 0;
  /** The back-end's log, for failure messages. */
  stderr: (() => string) | null = null;
  accessFails: number[] = [];
  private readonly hdr: number;
  readonly status: number;

  /** `replyAck`: negotiate REPLY_ACK (QEMU does); IOTLB_MSG is answered either way. */
  constructor(socket: string, replyAck = true) {
    this.fe = VhostUserFrontend.connect(socket, { timeoutMs: 5000 });
    const fe = this.fe;
    const offered = fe.getFeatures();
    expect(offered & bit(VIRTIO_F_ACCESS_PLATFORM)).toBe(bit(VIRTIO_F_ACCESS_PLATFORM));
    const proto = (replyAck ? bit(ProtocolFeature.REPLY_ACK) : 0n) | bit(ProtocolFeature.BACKEND_REQ);
    expect(fe.getProtocolFeatures() & proto).toBe(proto);
    fe.setProtocolFeatures(proto);
    fe.replyAck = replyAck;
    fe.setOwner();
    fe.setFeatures(bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_F_ACCESS_PLATFORM));
    fe.openBackendChannel();
    const regions = this.ram.memRegions().map((r) => ({ ...r, guestPhysAddr: r.guestPhysAddr + GPA_SHIFT }));
    fe.setMemTable(regions, regions.map(() => this.ram.fd));
    this.vq = new SplitDriver(this.ram, { size: 64 });
    this.hdr = this.ram.alloc(16 * 64, 16);
    this.status = this.ram.alloc(64, 16);
    fe.setVringNum(0, 64);
    fe.setVringBase(0, 0);
    // IOVAs, nothing mapped yet: the back-end must take them and ask when it first needs them.
    fe.setVringAddr({ index: 0, flags: 0, desc: this.vq.descGpa, avail: this.vq.availGpa, used: this.vq.usedGpa, log: 0 });
    fe.setVringCall(0, this.vq.callFd);
    fe.setVringKick(0, this.vq.kickFd);
    fe.setVringEnable(0, true);
  }

  /** What QEMU's miss handler does: the 4 KiB page entry holding `iova`, or nothing for an address outside RAM. */
  private resolve = (iova: number, perm: number) => {
    this.misses++;
    const page = iova - (iova % PAGE);
    const target = this.remap.get(page) ?? page;
    if (target >= this.ram.size) return null;
    return { iova: page, size: PAGE, uaddr: this.ram.uva(target), perm: this.readOnly.has(page) ? 1 : 3 };
  };

  /** Queues one blk request (slot `i` of the header/status areas) for `len` bytes at IOVA `data`. */
  submit(i: number, type: number, sector: number, data: number, len: number): void {
    const h = new DataView(new ArrayBuffer(16));
    h.setUint32(0, type, true);
    h.setUint32(4, 0, true);
    h.setBigUint64(8, BigInt(sector), true);
    this.ram.write(this.hdr + 16 * i, new Uint8Array(h.buffer));
    this.ram.fill(this.status + i, 1, 0xee);
    this.vq.begin();
    this.vq.add(this.hdr + 16 * i, 16, false);
    this.vq.add(data, len, type === T_IN);
    this.vq.add(this.status + i, 1, true);
    this.vq.commit();
  }

  /** Kicks, then serves misses until `n` requests completed; returns their status bytes by slot. */
  complete(n: number, timeoutMs = 15_000): void {
    this.vq.kick(true);
    const deadline = Date.now() + timeoutMs;
    let done = 0;
    while (done < n) {
      if (Date.now() > deadline) throw new Error(`${done}/${n} requests completed; ${this.misses} misses served\n${this.stderr?.() ?? ""}`);
      this.vq.wait(20, this.fe.backendFd);
      const r = this.fe.serveIotlb(this.resolve, 0);
      this.accessFails.push(...r.accessFails.map((m) => m.iova));
      while (this.vq.reap()) done++;
    }
  }

  statusOf(i: number): number {
    return this.ram.view(this.status + i, 1)[0]!;
  }

  close(): void {
    this.fe.close();
    this.vq.close();
    this.ram.close();
  }
}

for (const threads of [0, 1]) {
  describe.skipIf(skip !== null)(`IOTLB, --threads ${threads}${skip ? ` [skipped: ${skip}]` : ""}`, () => {
    let be: Backend | undefined;
    let s: Session | undefined;
    afterEach(async () => {
      s?.close();
      s = undefined;
      await be?.stop();
      be = undefined;
    });

    test("I/O by IOVA: misses answered by UPDATEs, data intact, invalidation and remap with requests in flight", async () => {
      be = await kind.start({ size: 8 << 20, extraArgs: ["--threads", String(threads), "--log-level", "debug", "--trace"] });
      s = new Session(be.socket);
      s.stderr = be.stderr;
      const ram = s.ram;
      const next = rng(7 + threads);
      const src = [0, 1, 2, 3].map(() => fillRandom(new Uint8Array(IO), next));
      const wbuf = src.map(() => ram.alloc(IO, PAGE));
      wbuf.forEach((g, i) => ram.write(g, src[i]!));

      // Four 64 KiB writes in flight at once: rings and 16 data pages each come through misses.
      wbuf.forEach((g, i) => s!.submit(i, T_OUT, i * (IO / 512), g, IO));
      s.complete(4);
      for (let i = 0; i < 4; i++) expect(s.statusOf(i)).toBe(0);
      const firstMisses = s.misses;
      // At least every data page and the rings' page(s) (the three ring areas may share one).
      expect(firstMisses).toBeGreaterThanOrEqual(4 * 16 + 1);

      // Read back through other IOVAs.
      const rbuf = src.map(() => ram.alloc(IO, PAGE));
      const readAll = () => {
        rbuf.forEach((g) => ram.fill(g, IO, 0x5a));
        rbuf.forEach((g, i) => s!.submit(i, T_IN, i * (IO / 512), g, IO));
      };
      readAll();
      s.complete(4);
      rbuf.forEach((g, i) => expect(Buffer.compare(ram.view(g, IO), src[i]!)).toBe(0));

      // Invalidate every translation (rings included) while four reads run (a RAM disk may finish them first).
      readAll();
      s.vq.kick(true);
      s.fe.iotlbInvalidate(0, 2 ** 40);
      s.complete(4);
      for (let i = 0; i < 4; i++) expect(s.statusOf(i)).toBe(0);
      rbuf.forEach((g, i) => expect(Buffer.compare(ram.view(g, IO), src[i]!)).toBe(0));
      // Nothing is left: the next round asks for every data page and the rings again.
      const before = s.misses;
      readAll();
      s.complete(4);
      rbuf.forEach((g, i) => expect(Buffer.compare(ram.view(g, IO), src[i]!)).toBe(0));
      expect(s.misses - before).toBeGreaterThanOrEqual(4 * 16);

      // Remap: the IOVAs of read buffer 0 now point at another buffer (unmap, then map, as a guest IOMMU does).
      const other = ram.alloc(IO, PAGE);
      ram.fill(other, IO, 0x5a);
      ram.fill(rbuf[0]!, IO, 0x5a);
      s.fe.iotlbInvalidate(rbuf[0]!, IO);
      for (let off = 0; off < IO; off += PAGE) s.remap.set(rbuf[0]! + off, other + off);
      s.fe.iotlbUpdate(rbuf[0]!, PAGE, ram.uva(other), 3); // the first page ahead of time, the rest on miss
      s.submit(0, T_IN, 0, rbuf[0]!, IO);
      s.complete(1);
      expect(s.statusOf(0)).toBe(0);
      expect(Buffer.compare(ram.view(other, IO), src[0]!)).toBe(0);
      expect(ram.view(rbuf[0]!, IO).every((b) => b === 0x5a)).toBe(true);
      expect(s.accessFails).toEqual([]);

      const log = be.stderr();
      expect(log).toContain("IOTLB on");
      expect(log).toMatch(/IOTLB miss iova=0x/);
      // --trace shows what the back-end sends on its channel too, from whichever thread sends it.
      const sent = [...log.matchAll(/=> IOTLB_MSG flags=\S+ iotlb type=miss iova=(0x[0-9a-f]+) size=0x0 uaddr=0x0 perm=(ro|wo|rw)\n/g)];
      expect(sent.length).toBeGreaterThanOrEqual(s.misses);
      expect(log).not.toMatch(/error:/);
    }, 60_000);

    test("hostile IOTLB_MSG UPDATEs (outside guest memory, empty, no permission) are refused and the connection lives", async () => {
      be = await kind.start({ size: 8 << 20, extraArgs: ["--threads", String(threads)] });
      s = new Session(be.socket);
      const ram = s.ram;
      const nack = (f: () => void) => {
        try {
          f();
          return "acked";
        } catch (e) {
          return (e as { code?: string }).code;
        }
      };
      expect(nack(() => s!.fe.iotlbUpdate(0x1000, 0x1000, ram.host + ram.size * 4, 3))).toBe("NACK");
      expect(nack(() => s!.fe.iotlbUpdate(0x1000, ram.size * 2, ram.fileOrder[0]!.userAddr, 3))).toBe("NACK");
      expect(nack(() => s!.fe.iotlbUpdate(0x1000, 0, ram.uva(0), 3))).toBe("NACK");
      expect(nack(() => s!.fe.iotlbUpdate(0x1000, 0x1000, ram.uva(0), 0))).toBe("NACK");
      // Invalidating what was never mapped, or everything, is fine.
      expect(nack(() => s!.fe.iotlbInvalidate(0x7000_0000, 0x1000))).toBe("acked");
      expect(nack(() => s!.fe.iotlbInvalidate(0, 2 ** 52))).toBe("acked");
      // Nothing hostile got in: I/O still works through misses.
      const buf = ram.alloc(IO, PAGE);
      ram.fill(buf, IO, 0x42);
      s.submit(0, T_OUT, 8, buf, IO);
      s.complete(1);
      expect(s.statusOf(0)).toBe(0);
      expect(be.stderr()).toContain("IOTLB_MSG.uaddr");
    }, 60_000);

    test("IOTLB_MSG is always answered (u64 0, or non-zero when refused), without REPLY_ACK and without NEED_REPLY too", async () => {
      // Spec (VHOST_USER_IOTLB_MSG): "The back-end has to acknowledge the request with sending
      // zero as u64 payload for success, non-zero otherwise"; unlike SET_BACKEND_REQ_FD, not
      // only when REPLY_ACK is negotiated.
      be = await kind.start({ size: 8 << 20, extraArgs: ["--threads", String(threads), "--trace"] });
      s = new Session(be.socket, false);
      const ram = s.ram;
      const fe = s.fe;
      // The client's iotlbUpdate/iotlbInvalidate set NEED_REPLY (as QEMU does) and wait for the u64.
      fe.iotlbUpdate(0x10_0000, PAGE, ram.uva(0x10_0000), 3);
      expect(() => fe.iotlbUpdate(0x1000, PAGE, ram.host + ram.size * 4, 3)).toThrow(/NACK|status 1/);
      fe.iotlbInvalidate(0x10_0000, PAGE);
      // No NEED_REPLY flag at all: still exactly one reply, zero for success, non-zero for a refusal.
      const raw = (uaddr: number) => {
        fe.send({ request: Req.IOTLB_MSG, flags: 0, fds: [], iotlb: { type: IOTLB_UPDATE, iova: 0x20_0000, size: PAGE, uaddr, perm: 3 } });
        return fe.recvReply(Req.IOTLB_MSG).u64;
      };
      expect(raw(ram.uva(0x20_0000))).toBe(0n);
      expect(raw(ram.host + ram.size * 4)).not.toBe(0n);
      // No stray replies were left behind: a request with a reply still reads its own, and I/O runs.
      expect(fe.getFeatures() & bit(VIRTIO_F_ACCESS_PLATFORM)).toBe(bit(VIRTIO_F_ACCESS_PLATFORM));
      const buf = ram.alloc(IO, PAGE);
      ram.fill(buf, IO, 0x42);
      s.submit(0, T_OUT, 8, buf, IO);
      s.complete(1);
      expect(s.statusOf(0)).toBe(0);
      // --trace decodes the IOTLB fields of requests, and shows each reply.
      const log = be.stderr();
      const uva = (g: number) => `0x${ram.uva(g).toString(16)}`;
      expect(log).toContain(`<- IOTLB_MSG flags=0x9 iotlb type=update iova=0x100000 size=0x1000 uaddr=${uva(0x10_0000)} perm=rw\n`);
      expect(log).toContain(`<- IOTLB_MSG flags=0x9 iotlb type=invalidate iova=0x100000 size=0x1000 uaddr=0x0 perm=none\n`);
      expect(log).toContain(`<- IOTLB_MSG flags=0x1 iotlb type=update iova=0x200000 size=0x1000 uaddr=${uva(0x20_0000)} perm=rw\n`);
      expect(log).toContain("-> IOTLB_MSG flags=0x4 u64=0x0\n");
      expect(log).toContain("-> IOTLB_MSG flags=0x4 u64=0x1\n");
    }, 60_000);

    test("a device write into a read-only mapping is refused: ACCESS_FAIL, queue broken, nothing written", async () => {
      be = await kind.start({ size: 8 << 20, extraArgs: ["--threads", String(threads), "--log-level", "debug", "--trace"] });
      s = new Session(be.socket);
      const ram = s.ram;
      // A write request works through read-only pages (the device only reads them).
      const buf = ram.alloc(IO, PAGE);
      ram.fill(buf, IO, 0x11);
      for (let off = 0; off < IO; off += PAGE) s.readOnly.add(buf + off);
      s.submit(0, T_OUT, 0, buf, IO);
      s.complete(1);
      expect(s.statusOf(0)).toBe(0);
      // A read into them would be a device write: refused.
      ram.fill(buf, IO, 0x5a);
      s.submit(1, T_IN, 0, buf, IO);
      s.vq.kick(true);
      const deadline = Date.now() + 10_000;
      while (s.accessFails.length === 0 && Date.now() < deadline) {
        s.accessFails.push(...s.fe.serveIotlb((iova, perm) => {
          const page = iova - (iova % PAGE);
          return { iova: page, size: PAGE, uaddr: ram.uva(page), perm: s!.readOnly.has(page) ? 1 : 3 };
        }, 50).accessFails.map((m) => m.iova));
      }
      expect(s.accessFails.length).toBe(1);
      expect(s.accessFails[0]).toBe(buf);
      expect(s.fe.waitClosed(5000)).toBe(true);
      expect(ram.view(buf, IO).every((b) => b === 0x5a)).toBe(true);
      expect(ram.view(s.status + 1, 1)[0]).toBe(0xee);
      expect(be.stderr()).toMatch(/BAD_ADDR.*IOTLB_PERM: write-only access to iova 0x[0-9a-f]+\+0x[0-9a-f]+ refused: mapping is read-only/);
      // The server lives on and takes the next front-end.
      s.close();
      s = undefined;
      const d = BlkDriver.connect(be.socket, { timeoutMs: 5000 });
      try {
        expect(d.capacity).toBe((8 << 20) / 512);
      } finally {
        d.close();
      }
    }, 60_000);
  });
}

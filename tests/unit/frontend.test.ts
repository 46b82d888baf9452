/**
 * The front-end's guest RAM and split-ring driver, checked against memory:
 * the test plays the device by reading descriptors and rings with DataView
 * and writing used elements itself. No back-end, no socket.
 */
import { afterEach, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemoryError } from "../../src/errors.ts";
import {
  FrontendError, GuestRam, SplitDriver, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY, needEvent,
} from "../../src/frontend/index.ts";

const MiB = 1 << 20;
const open: { close(): void }[] = [];
const track = <T extends { close(): void }>(x: T): T => (open.push(x), x);
afterEach(() => {
  while (open.length) open.pop()!.close();
});

interface Desc { addr: number; len: number; flags: number; next: number }

/** The device's view: reads and writes ring memory by gpa. */
function device(ram: GuestRam, q: SplitDriver) {
  const dv = ram.dv;
  const at = (gpa: number) => ram.offset(gpa, 1);
  const desc = (tableGpa: number, i: number): Desc => {
    const o = at(tableGpa + 16 * i);
    return { addr: dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 2 ** 32, len: dv.getUint32(o + 8, true), flags: dv.getUint16(o + 12, true), next: dv.getUint16(o + 14, true) };
  };
  return {
    desc: (i: number) => desc(q.descGpa, i),
    tableDesc: desc,
    availIdx: () => dv.getUint16(at(q.availGpa + 2), true),
    availFlags: () => dv.getUint16(at(q.availGpa), true),
    availRing: (i: number) => dv.getUint16(at(q.availGpa + 4 + 2 * (i % q.size)), true),
    usedEvent: () => dv.getUint16(at(q.availGpa + 4 + 2 * q.size), true),
    /** Walks the chain at `head` (direct or one indirect table). */
    chain(head: number): Desc[] {
      const out: Desc[] = [];
      let d = this.desc(head);
      if (d.flags & VRING_DESC_F_INDIRECT) {
        const table = d.addr;
        for (let i = 0; ; i = d.next) {
          d = desc(table, i);
          out.push(d);
          if (!(d.flags & VRING_DESC_F_NEXT)) return out;
        }
      }
      for (;;) {
        out.push(d);
        if (!(d.flags & VRING_DESC_F_NEXT)) return out;
        d = this.desc(d.next);
      }
    },
    /** Puts a used element and publishes used.idx. */
    use(id: number, len: number): void {
      const idx = dv.getUint16(at(q.usedGpa + 2), true);
      const e = at(q.usedGpa + 4 + 8 * (idx % q.size));
      dv.setUint32(e, id, true);
      dv.setUint32(e + 4, len, true);
      dv.setUint16(at(q.usedGpa + 2), (idx + 1) & 0xffff, true);
    },
    setUsedFlags: (f: number) => dv.setUint16(at(q.usedGpa), f, true),
    setAvailEvent: (v: number) => dv.setUint16(at(q.usedGpa + 4 + 8 * q.size), v, true),
  };
}

describe("GuestRam", () => {
  test("GuestRam() swaps the two halves: gpa order differs from memfd order", () => {
    const ram = track(new GuestRam({ size: 8 * MiB }));
    expect(ram.regions.map((r) => [r.gpa, r.fileOffset])).toEqual([[0, 4 * MiB], [4 * MiB, 0]]);
    expect(ram.boundaries).toEqual([4 * MiB]);
    const mr = ram.memRegions();
    expect(mr.map((r) => r.guestPhysAddr)).toEqual([4 * MiB, 0]);
    for (const r of mr) expect(r.userAddr).toBe(ram.host + r.mmapOffset);
    expect(ram.uva(4 * MiB + 5)).toBe(ram.host + 5);
  });

  test("GuestRam.write()/read() split a range at the region boundary", () => {
    const ram = track(new GuestRam({ size: 8 * MiB }));
    const src = Uint8Array.from({ length: 100 }, (_, i) => i + 1);
    const gpa = ram.crossing(100, 37);
    expect(gpa).toBe(4 * MiB - 37);
    ram.write(gpa, src);
    // The first 37 bytes end region [0, 4M) (file offset 4M..8M), the rest start region [4M, 8M) (file offset 0).
    expect([...ram.u8.subarray(8 * MiB - 37, 8 * MiB)]).toEqual([...src.subarray(0, 37)]);
    expect([...ram.u8.subarray(0, 63)]).toEqual([...src.subarray(37)]);
    expect([...ram.read(gpa, new Uint8Array(100))]).toEqual([...src]);
  });

  test("GuestRam.offset() refuses ranges that leave a region or fall in a hole", () => {
    const ram = track(new GuestRam({ regions: [{ gpa: 0, size: MiB }, { gpa: 3 * MiB, size: MiB }] }));
    expect(ram.boundaries).toEqual([]);
    expect(() => ram.offset(MiB - 8, 16)).toThrow(GuestMemoryError);
    expect(() => ram.offset(2 * MiB, 1)).toThrow(GuestMemoryError);
    expect(() => ram.write(MiB - 4, new Uint8Array(8))).toThrow(GuestMemoryError);
    expect(ram.offset(3 * MiB + 10, 10)).toBe(MiB + 10);
  });

  test("GuestRam.alloc() stays in one region, out of the crossing zone, and release() rewinds", () => {
    const ram = track(new GuestRam({ size: 8 * MiB, crossZone: 64 << 10 }));
    const m = ram.mark();
    const a = ram.alloc(4 * MiB - (64 << 10) - 4096, 4096);
    expect(a).toBe(0);
    const b = ram.alloc(8192, 4096); // does not fit below the zone: next region, above its zone
    expect(b).toBe(4 * MiB + (64 << 10));
    ram.release(m);
    expect(ram.alloc(16)).toBe(0);
    expect(() => ram.alloc(16 * MiB)).toThrow(RangeError);
  });
});

describe("SplitDriver", () => {
  test("SplitDriver.commit() writes a direct chain and publish() makes it visible", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 8 }));
    const dev = device(ram, q);
    // §2.7: alignments 16 / 2 / 4.
    expect(q.descGpa % 16).toBe(0);
    expect(q.availGpa % 2).toBe(0);
    expect(q.usedGpa % 4).toBe(0);
    q.begin();
    q.add(0x1000, 16, false);
    q.add(0x2000, 512, true);
    q.add(0x3000, 1, true);
    const head = q.commit();
    expect(q.numFree).toBe(5);
    expect(dev.availIdx()).toBe(0);
    q.publish();
    expect(dev.availIdx()).toBe(1);
    expect(dev.availRing(0)).toBe(head);
    expect(dev.chain(head)).toEqual([
      { addr: 0x1000, len: 16, flags: VRING_DESC_F_NEXT, next: expect.any(Number) },
      { addr: 0x2000, len: 512, flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, next: expect.any(Number) },
      { addr: 0x3000, len: 1, flags: VRING_DESC_F_WRITE, next: expect.any(Number) },
    ]);
  });

  test("SplitDriver.reap() frees the chain the device used and reports id and length", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 4 }));
    const dev = device(ram, q);
    const heads: number[] = [];
    for (let i = 0; i < 2; i++) {
      q.begin();
      q.add(0x1000, 16, false);
      q.add(0x2000, 1, true);
      heads.push(q.commit());
    }
    expect(q.numFree).toBe(0);
    expect(() => q.begin()).toThrow(FrontendError);
    q.kick();
    expect(q.reap()).toBe(false);
    dev.use(heads[1]!, 1);
    expect(q.pending()).toBe(1);
    expect(q.reap()).toBe(true);
    expect([q.usedId, q.usedLen]).toEqual([heads[1]!, 1]);
    expect(q.numFree).toBe(2);
    // used_event now asks for an interrupt at the next used element (§2.7.10).
    expect(dev.usedEvent()).toBe(1);
    // The freed descriptors are reused.
    q.begin();
    q.add(0x5000, 8, false);
    q.add(0x6000, 8, false);
    expect([heads[1]!, dev.desc(heads[1]!).next]).toContain(q.commit());
  });

  test("SplitDriver.reap() throws BAD_USED for an id that is not in flight", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 4 }));
    const dev = device(ram, q);
    q.begin();
    q.add(0x1000, 16, false);
    const head = q.commit();
    q.kick();
    dev.use(head + 1, 0);
    expect(() => q.reap()).toThrow(FrontendError);
  });

  test("SplitDriver.commit() of an indirect chain uses one ring descriptor and a table", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 8, indirectMax: 4 }));
    const dev = device(ram, q);
    q.begin(true);
    q.add(0x1000, 16, false);
    q.add(0x2000, 4096, true);
    q.add(0x3000, 1, true);
    const head = q.commit();
    expect(q.numFree).toBe(7);
    const d = dev.desc(head);
    expect(d.flags).toBe(VRING_DESC_F_INDIRECT);
    expect(d.len).toBe(48);
    expect(d.addr).toBe(q.tableGpa(head));
    expect(dev.chain(head).map((x) => [x.addr, x.len, x.flags])).toEqual([
      [0x1000, 16, VRING_DESC_F_NEXT], [0x2000, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE], [0x3000, 1, VRING_DESC_F_WRITE],
    ]);
    q.begin(true);
    for (let i = 0; i < 4; i++) q.add(0x1000, 1, false);
    expect(() => q.add(0x1000, 1, false)).toThrow(RangeError);
  });

  test("SplitDriver.kick() follows avail_event under EVENT_IDX and NO_NOTIFY without it", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const submit = (q: SplitDriver) => {
      q.begin();
      q.add(0x1000, 16, false);
      q.commit();
    };
    const ev = track(new SplitDriver(ram, { size: 8, eventIdx: true }));
    const dev = device(ram, ev);
    submit(ev);
    expect(ev.kick()).toBe(true); // avail_event starts at the base: the first chain is wanted
    expect(sys.eventfdRead(ev.kickFd)).toBe(1);
    dev.setAvailEvent(5); // the device wants a kick once entry 5 is made available
    submit(ev);
    expect(ev.kick()).toBe(false);
    for (let i = 0; i < 3; i++) submit(ev);
    expect(ev.kick()).toBe(false); // idx 2 → 5: entry 5 is not yet there
    submit(ev);
    expect(ev.kick()).toBe(true); // 5 → 6
    expect(needEvent(5, 6, 5)).toBe(true);

    const plain = track(new SplitDriver(ram, { size: 8 }));
    const pdev = device(ram, plain);
    submit(plain);
    pdev.setUsedFlags(VRING_USED_F_NO_NOTIFY);
    expect(plain.kick()).toBe(false);
    pdev.setUsedFlags(0);
    submit(plain);
    expect(plain.kick()).toBe(true);
  });

  test("SplitDriver indexes wrap at 65536", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 4, base: 65534 }));
    const dev = device(ram, q);
    for (let i = 0; i < 6; i++) {
      q.begin();
      q.add(0x1000, 16, false);
      const head = q.commit();
      q.kick();
      expect(dev.availRing((65534 + i) & 0xffff)).toBe(head);
      dev.use(head, 0);
      expect(q.reap()).toBe(true);
    }
    expect(dev.availIdx()).toBe(4);
    expect(q.usedIndex()).toBe(4);
    expect(q.inFlight).toBe(0);
  });

  test("SplitDriver.pushRaw() writes loops, bad next indexes and arbitrary avail entries as asked", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 8, indirectMax: 4 }));
    const dev = device(ram, q);
    const head = q.pushRaw([{ addr: 0x1000, len: 16 }, { addr: 0x2000, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, nextRel: 0 }]);
    const second = dev.desc(head).next;
    expect(dev.desc(second)).toEqual({ addr: 0x2000, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next: head });
    const h2 = q.pushRaw([{ addr: 0x3000, len: 4, next: 999 }, { addr: 0, len: 0 }], 4242);
    expect(dev.desc(h2).next).toBe(999);
    expect(dev.availRing(1)).toBe(4242);
    const h3 = q.pushRaw([{ table: [{ addr: 0x4000, len: 16 }, { addr: 0x5000, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT }] }]);
    expect(dev.desc(h3)).toMatchObject({ flags: VRING_DESC_F_INDIRECT, len: 32, addr: q.tableGpa(h3) });
    expect(dev.tableDesc(q.tableGpa(h3), 1).flags).toBe(VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT);
  });

  test("SplitDriver.wait() wakes on the call eventfd and times out without one", () => {
    const ram = track(new GuestRam({ size: 4 * MiB }));
    const q = track(new SplitDriver(ram, { size: 4 }));
    const dev = device(ram, q);
    q.begin();
    q.add(0x1000, 16, false);
    const head = q.commit();
    q.kick();
    expect(q.wait(20)).toBe("timeout");
    dev.use(head, 0);
    sys.eventfdWrite(q.callFd, 1);
    expect(q.wait(1000)).toBe("used");
    expect(q.reap()).toBe(true);
    const polling = track(new SplitDriver(ram, { size: 4, polling: true }));
    expect(device(ram, polling).availFlags()).toBe(1); // VRING_AVAIL_F_NO_INTERRUPT
    expect(polling.wait(10)).toBe("timeout");
  });
});

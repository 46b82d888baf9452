import { describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { GuestMemory } from "../../src/memory/guest_memory.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { GuestMemoryError } from "../../src/errors.ts";

function memfd(size: number): number {
  const fd = sys.memfdCreate("test-guest");
  sys.ftruncate(fd, size);
  return fd;
}

describe("GuestMemory", () => {
  test("gpaPieces() maps a buffer inside one region to one piece", () => {
    const fd = memfd(1 << 20);
    const mem = new GuestMemory();
    mem.add({ guestPhysAddr: 0x10000, memorySize: 1 << 20, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    const p = new Pieces();
    expect(mem.gpaPieces(0x10000 + 100, 4000, p)).toBe(true);
    expect(p.count).toBe(1);
    expect(p.off[0]).toBe(100);
    expect(p.total).toBe(4000);
    mem.clear();
  });

  test("gpaPieces() refuses ranges past the end of a region and below its start", () => {
    const fd = memfd(1 << 16);
    const mem = new GuestMemory();
    mem.add({ guestPhysAddr: 0x10000, memorySize: 1 << 16, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    const p = new Pieces();
    expect(mem.gpaPieces(0x10000 + (1 << 16) - 10, 11, p)).toBe(false);
    p.reset();
    expect(mem.gpaPieces(0xffff, 2, p)).toBe(false);
    p.reset();
    expect(mem.gpaPieces(2 ** 52, 1, p)).toBe(false);
    p.reset();
    expect(mem.gpaPieces(0x10000 + (1 << 16) - 10, 10, p)).toBe(true);
    mem.clear();
  });

  test("gpaPieces() cuts a buffer at a region boundary into two pieces", () => {
    const fd = memfd(2 << 16);
    const mem = new GuestMemory();
    // Two regions adjacent in guest-physical space, from different offsets of one memfd.
    mem.add({ guestPhysAddr: 0, memorySize: 1 << 16, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    mem.add({ guestPhysAddr: 1 << 16, memorySize: 1 << 16, userAddr: 0x8000_0000, mmapOffset: 1 << 16 }, fd);
    sys.close(fd);
    const p = new Pieces();
    expect(mem.gpaPieces((1 << 16) - 100, 300, p)).toBe(true);
    expect(p.count).toBe(2);
    expect([p.len[0], p.len[1]]).toEqual([100, 200]);
    // The pieces are the same bytes as the file: write through one region, read through the span of the other.
    p.win[1]![p.off[1]!] = 0xab;
    expect(mem.gpaSpan(1 << 16, 1).win[0]).toBe(0xab);
    mem.clear();
  });

  test("gpaPieces() cuts at window starts when a region is larger than a window", () => {
    const fd = memfd(1 << 20);
    const mem = new GuestMemory(1 << 16); // 64 KiB windows
    mem.add({ guestPhysAddr: 0, memorySize: 1 << 20, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    const p = new Pieces();
    expect(mem.gpaPieces((1 << 16) - 8, (1 << 17) + 16, p)).toBe(true);
    expect(p.count).toBe(4);
    expect(Array.from(p.len.subarray(0, 4))).toEqual([8, 1 << 16, 1 << 16, 8]);
    expect(p.total).toBe((1 << 17) + 16);
    // A short range that crosses a window start is still one contiguous span (windows overlap).
    const s = mem.gpaSpan((1 << 16) - 8, 64);
    expect(s.win.length - s.off).toBeGreaterThanOrEqual(64);
    mem.clear();
  });

  test("a region larger than 4 GiB is viewed through windows", () => {
    const size = 5 * 2 ** 30; // sparse memfd: no memory is used until touched
    const fd = memfd(size);
    const mem = new GuestMemory();
    mem.add({ guestPhysAddr: 2 ** 32, memorySize: size, userAddr: 0x7000_0000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    const p = new Pieces();
    const at = 2 ** 32 + 4 * 2 ** 30 - 4096;
    expect(mem.gpaPieces(at, 8192, p)).toBe(true);
    expect(p.count).toBe(2);
    p.win[1]!.fill(7, p.off[1]!, p.off[1]! + 4096);
    expect(mem.gpaSpan(2 ** 32 + 4 * 2 ** 30, 4096).win[mem.gpaSpan(2 ** 32 + 4 * 2 ** 30, 1).off]).toBe(7);
    mem.clear();
  });

  test("add() refuses a region larger than its fd (would SIGBUS) and overlapping regions", () => {
    const fd = memfd(1 << 16);
    const mem = new GuestMemory();
    expect(() => mem.add({ guestPhysAddr: 0, memorySize: 1 << 20, userAddr: 0x7000_0000, mmapOffset: 0 }, fd)).toThrow(GuestMemoryError);
    expect(() => mem.add({ guestPhysAddr: 0, memorySize: 1 << 16, userAddr: 0x7000_0000, mmapOffset: 4096 }, fd)).toThrow(GuestMemoryError);
    mem.add({ guestPhysAddr: 0, memorySize: 1 << 15, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    expect(() => mem.add({ guestPhysAddr: 0x1000, memorySize: 1 << 12, userAddr: 0x9000_0000, mmapOffset: 0 }, fd)).toThrow(/overlaps/);
    expect(() => mem.add({ guestPhysAddr: 1 << 20, memorySize: 1 << 12, userAddr: 0x7000_1000, mmapOffset: 0 }, fd)).toThrow(/overlaps/);
    sys.close(fd);
    mem.clear();
  });

  test("uvaSpan() translates front-end addresses and refuses ranges that leave the region", () => {
    const fd = memfd(1 << 16);
    const mem = new GuestMemory();
    mem.add({ guestPhysAddr: 0x100000, memorySize: 1 << 16, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    expect(mem.uvaSpan(0x7000_0010, 16).off).toBe(16);
    expect(mem.uvaToGpa(0x7000_0010)).toBe(0x100010);
    expect(() => mem.uvaSpan(0x7000_0000 + (1 << 16) - 8, 16)).toThrow(GuestMemoryError);
    expect(() => mem.uvaSpan(0x6fff_fff0, 8)).toThrow(GuestMemoryError);
    mem.clear();
  });

  test("clear() unmaps: the region list is empty and remove() finds nothing", () => {
    const fd = memfd(1 << 16);
    const mem = new GuestMemory();
    mem.add({ guestPhysAddr: 0, memorySize: 1 << 16, userAddr: 0x7000_0000, mmapOffset: 0 }, fd);
    sys.close(fd);
    const r = mem.regions[0]!;
    mem.clear();
    expect(r.isMapped).toBe(false);
    expect(mem.size).toBe(0);
    expect(mem.remove(0, 1 << 16)).toBe(false);
  });
});

/**
 * MemoryFs, the in-memory backend of virtio-fs (`--memory`): the operations
 * a guest's file system calls need, their errnos, lookup counts keeping an
 * unlinked file alive, and the budgets that stop a guest from growing the
 * server without bound.
 */
import { describe, expect, test } from "bun:test";
import { ChainReader, ChainWriter } from "../../src/virtq/chain_io.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { E, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFCHR, type FsStat } from "../../src/devices/fs/backend.ts";
import { MemoryFs } from "../../src/devices/fs/memory_fs.ts";

const who = { uid: 1000, gid: 1000 };
function writer(len: number): { w: ChainWriter; buf: Uint8Array } {
  const buf = new Uint8Array(len);
  const p = new Pieces();
  // Two pieces, so copies cross a piece boundary.
  const half = len >> 1;
  p.add(buf, 0, half, 0);
  if (len - half > 0) p.add(buf.subarray(half), 0, len - half, 0);
  return { w: new ChainWriter(p), buf };
}
function reader(bytes: Uint8Array): ChainReader {
  const p = new Pieces();
  p.add(bytes, 0, bytes.length, 0);
  return new ChainReader(p);
}
const st = (x: FsStat | number): FsStat => {
  if (typeof x === "number") throw new Error(`errno ${-x}`);
  return x;
};
function names(fs: MemoryFs, dir: number, from = 0): string[] {
  const out: string[] = [];
  fs.readdir(dir, from, (n) => (out.push(n), true));
  return out;
}

describe("MemoryFs", () => {
  test("files: create, write across pieces, read back, truncate, sparse growth reads zeros", () => {
    const fs = new MemoryFs();
    const { stat, fh } = fs.create(1, "a.txt", 0o644, 0, who) as { stat: FsStat; fh: number };
    expect(stat.mode & S_IFMT).toBe(S_IFREG);
    expect([stat.uid, stat.gid]).toEqual([1000, 1000]);
    const data = Uint8Array.from({ length: 10000 }, (_, i) => i & 0xff);
    expect(fs.write(stat.ino, fh, 0, data.length, reader(data))).toBe(10000);
    const { w, buf } = writer(10000);
    expect(fs.read(stat.ino, fh, 0, 10000, w)).toBe(10000);
    expect(buf).toEqual(data);
    const r2 = writer(100);
    expect(fs.read(stat.ino, fh, 9950, 100, r2.w)).toBe(50); // short at end of file
    expect(fs.read(stat.ino, fh, 20000, 100, writer(100).w)).toBe(0);
    expect(st(fs.setattr(stat.ino, { size: 3 })).size).toBe(3);
    expect(st(fs.setattr(stat.ino, { size: 8 })).size).toBe(8);
    const r3 = writer(8);
    fs.read(stat.ino, fh, 0, 8, r3.w);
    expect([...r3.buf]).toEqual([0, 1, 2, 0, 0, 0, 0, 0]);
    expect(fs.write(stat.ino, fh, 1 << 20, 1, reader(new Uint8Array([7])))).toBe(1);
    expect(st(fs.getattr(stat.ino)).size).toBe((1 << 20) + 1);
  });

  test("directories: mkdir, readdir with resumable offsets, rmdir of a non-empty one fails", () => {
    const fs = new MemoryFs();
    const d = st(fs.mkdir(1, "d", 0o755, who));
    expect(d.mode & S_IFMT).toBe(S_IFDIR);
    expect(st(fs.getattr(1)).nlink).toBe(3);
    for (let i = 0; i < 300; i++) fs.create(d.ino, `f${i}`, 0o600, 0, who);
    const all = names(fs, d.ino);
    expect(all.length).toBe(302);
    expect(all.slice(0, 3)).toEqual([".", "..", "f0"]);
    // Stop after 10, resume from the last next offset.
    let next = 0;
    const first: string[] = [];
    fs.readdir(d.ino, 0, (n, _i, _t, nx) => (first.push(n), (next = nx), first.length < 10));
    expect([...first, ...names(fs, d.ino, next)]).toEqual(all);
    expect(fs.rmdir(1, "d")).toBe(-E.NOTEMPTY);
    expect(fs.unlink(1, "d")).toBe(-E.ISDIR);
    expect(fs.rmdir(d.ino, "f0")).toBe(-E.NOTDIR);
    expect(fs.mkdir(1, "d", 0o755, who)).toBe(-E.EXIST);
    expect(fs.lookup(1, "nope")).toBe(-E.NOENT);
    expect(fs.lookup(d.ino + 1, "x")).toBe(-E.NOTDIR);
  });

  test("readdir resumed after entries were removed neither skips nor repeats (rm -r deletes while it reads)", () => {
    const fs = new MemoryFs();
    for (let i = 0; i < 50; i++) fs.create(1, `f${i}`, 0o600, 0, who);
    const seen: string[] = [];
    let next = 0;
    for (;;) {
      const batch: string[] = [];
      fs.readdir(1, next, (n, _i, _t, nx) => (batch.push(n), (next = nx), batch.length < 7));
      if (batch.length === 0) break;
      for (const n of batch) if (n !== "." && n !== "..") { seen.push(n); expect(fs.unlink(1, n)).toBe(0); }
    }
    expect(seen.length).toBe(50);
    expect(new Set(seen).size).toBe(50);
    expect(names(fs, 1)).toEqual([".", ".."]);
  });

  test("rename: plain, over a file, NOREPLACE, EXCHANGE, into itself refused; link counts", () => {
    const fs = new MemoryFs();
    const a = st(fs.mkdir(1, "a", 0o755, who)), b = st(fs.mkdir(1, "b", 0o755, who));
    const x = fs.create(a.ino, "x", 0o644, 0, who) as { stat: FsStat };
    const y = fs.create(b.ino, "y", 0o644, 0, who) as { stat: FsStat };
    expect(fs.rename(a.ino, "x", b.ino, "y", 1)).toBe(-E.EXIST);
    expect(fs.rename(a.ino, "x", b.ino, "y", 2)).toBe(0);
    expect(st(fs.lookup(b.ino, "y")).ino).toBe(x.stat.ino);
    expect(st(fs.lookup(a.ino, "x")).ino).toBe(y.stat.ino);
    expect(fs.rename(a.ino, "x", b.ino, "y", 0)).toBe(0); // replaces
    expect(names(fs, a.ino)).toEqual([".", ".."]);
    expect(fs.rename(1, "a", a.ino, "sub", 0)).toBe(-E.INVAL); // into itself
    expect(fs.rename(1, "a", 1, "b", 0)).toBe(-E.NOTEMPTY); // b holds y
    expect(fs.rename(1, "a", 1, "a2", 4)).toBe(-E.INVAL); // unknown flag
    const l = st(fs.link(y.stat.ino, 1, "hard"));
    expect(l.nlink).toBe(2);
    expect(fs.link(a.ino, 1, "dirlink")).toBe(-E.PERM);
  });

  test("an unlinked file lives while the kernel holds it (lookups, open handles), then goes", () => {
    const fs = new MemoryFs();
    const c = fs.create(1, "tmp", 0o600, 0, who) as { stat: FsStat; fh: number }; // one lookup, one open
    const n0 = fs.inodes;
    expect(fs.unlink(1, "tmp")).toBe(0);
    expect(fs.getattr(c.stat.ino)).not.toBe(-E.NOENT);
    fs.release(c.stat.ino, c.fh);
    expect(fs.inodes).toBe(n0);
    fs.forget(c.stat.ino, 1);
    expect(fs.inodes).toBe(n0 - 1);
    expect(fs.getattr(c.stat.ino)).toBe(-E.NOENT);
  });

  test("symlinks, fifos; device nodes refused", () => {
    const fs = new MemoryFs();
    const s = st(fs.symlink(1, "l", "../outside/secret", who));
    expect(s.mode & S_IFMT).toBe(S_IFLNK);
    expect(fs.readlink(s.ino)).toBe("../outside/secret");
    expect(fs.readlink(1)).toBe(-E.INVAL);
    expect(st(fs.mknod(1, "p", S_IFIFO | 0o600, 0, who)).mode & S_IFMT).toBe(S_IFIFO);
    expect(fs.mknod(1, "dev", S_IFCHR | 0o600, 0x0103, who)).toBe(-E.PERM);
  });

  test("setattr: mode keeps the type, owner, times (now and explicit)", () => {
    const fs = new MemoryFs();
    const f = (fs.create(1, "f", 0o644, 0, who) as { stat: FsStat }).stat;
    const s = st(fs.setattr(f.ino, { mode: 0o4755, uid: 0, gid: 5, atime: { sec: 1000, nsec: 5 }, mtime: { sec: 2000, nsec: 7 } }));
    expect(s.mode).toBe(S_IFREG | 0o4755);
    expect([s.uid, s.gid, s.atimeSec, s.atimeNsec, s.mtimeSec, s.mtimeNsec]).toEqual([0, 5, 1000, 5, 2000, 7]);
    expect(st(fs.setattr(f.ino, { mtime: "now" })).mtimeSec).toBeGreaterThan(1_700_000_000);
    expect(fs.setattr(1, { size: 0 })).toBe(-E.ISDIR);
    expect(fs.setattr(f.ino, { size: -1 })).toBe(-E.INVAL);
  });

  test("budgets: bytes and inodes end in ENOSPC, and statfs says so", () => {
    const fs = new MemoryFs({ maxBytes: 1 << 20, maxInodes: 10 });
    const f = fs.create(1, "big", 0o644, 0, who) as { stat: FsStat; fh: number };
    expect(fs.write(f.stat.ino, f.fh, 0, 1000, reader(new Uint8Array(1000)))).toBe(1000);
    expect(fs.setattr(f.stat.ino, { size: 2 << 20 })).toBe(-E.NOSPC);
    expect(fs.write(f.stat.ino, f.fh, (1 << 20) - 1, 2, reader(new Uint8Array(2)))).toBe(-E.NOSPC);
    expect(fs.write(f.stat.ino, f.fh, (1 << 20) - 10, 10, reader(new Uint8Array(10)))).toBe(10);
    let made = 0;
    while (fs.create(1, `n${made}`, 0o600, 0, who) !== -E.NOSPC) made++;
    expect(fs.inodes).toBe(10);
    const s = fs.statfs();
    expect(s.ffree).toBe(0);
    expect(s.bfree).toBe(0);
  });
});

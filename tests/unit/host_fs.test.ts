import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HostDir } from "../../src/devices/fs/host_fs.ts";
import * as sys from "../../ffi/sys.ts";
import { Dirents, Statx } from "../../ffi/sys.ts";
import {
  DT_DIR, DT_LNK, DT_REG, ELOOP, ENAMETOOLONG, ENODATA, ENOTDIR, ENOTEMPTY, EISDIR, EROFS, O_CREAT, O_DIRECTORY,
  O_EXCL, O_PATH, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, RENAME_EXCHANGE, RENAME_NOREPLACE, S_IFCHR, S_IFDIR, S_IFIFO,
  S_IFLNK, S_IFSOCK, UTIME_NOW, UTIME_OMIT, XATTR_CREATE,
} from "../../ffi/constants.ts";
import { S_IFREG } from "../../ffi/structs.ts";
import { EACCES, EBADF, EEXIST, EINVAL, ENOENT, EOPNOTSUPP, EPERM, ErrnoError } from "../../ffi/errno.ts";

const isRoot = process.getuid?.() === 0;
const dec = new TextDecoder();
const enc = new TextEncoder();

let base = "";
let DIR = "";
let OUT = "";

/** Everything observable about the files outside DIR (and /etc/passwd): compared before and after. */
function snapshot(): string {
  const rows: string[] = [];
  const walk = (p: string) => {
    const st = lstatSync(p);
    rows.push(`${p} ${st.mode} ${st.uid} ${st.size} ${st.mtimeMs} ${st.ctimeMs} ${st.nlink}`);
    if (st.isDirectory()) for (const n of readdirSync(p).sort()) walk(join(p, n));
    else if (st.isFile()) rows.push(readFileSync(p, "utf8"));
  };
  walk(OUT);
  const pw = statSync("/etc/passwd");
  rows.push(`passwd ${pw.mode} ${pw.uid} ${pw.size} ${pw.mtimeMs} ${pw.ctimeMs}`);
  return rows.join("\n");
}

/** Open fds of this process, counted with our own getdents64 (one fd of its own excluded). */
function procFdCount(): number {
  const fd = sys.open("/proc/self/fd", O_RDONLY | O_DIRECTORY);
  const d = new Dirents(4096);
  let n = 0;
  while (sys.getdents64Raw(fd, d) > 0) while (d.next()) if (!d.isDot) n++;
  sys.close(fd);
  return n - 1;
}

function names(hd: HostDir, inodeFd: number): string[] {
  const dfd = hd.open(inodeFd, O_RDONLY | O_DIRECTORY);
  expect(dfd).toBeGreaterThanOrEqual(0);
  const out: string[] = [];
  let off: number | bigint = 0;
  for (;;) {
    const n = hd.readdir(dfd, off);
    expect(n).toBeGreaterThanOrEqual(0);
    if (n === 0) break;
    while (hd.dirents.next()) {
      if (!hd.dirents.isDot) out.push(hd.dirents.name());
      off = hd.dirents.off;
    }
  }
  hd.close(dfd);
  return out.sort();
}

beforeAll(() => {
  base = mkdtempSync(join(tmpdir(), "host_fs-"));
  DIR = join(base, "dir");
  OUT = join(base, "outside");
  mkdirSync(DIR);
  mkdirSync(OUT);
  writeFileSync(join(OUT, "secret"), "secret");
  writeFileSync(join(DIR, "f"), "hello");
  mkdirSync(join(DIR, "sub"));
  writeFileSync(join(DIR, "sub", "g"), "in sub");
  // The planted escapes: relative, absolute, dangling, and a file outside.
  symlinkSync("../outside", join(DIR, "out"));
  symlinkSync(OUT, join(DIR, "abs"));
  symlinkSync("../outside/created", join(DIR, "dangling"));
  symlinkSync("/etc/passwd", join(DIR, "passwd"));
});

afterAll(() => {
  rmSync(base, { recursive: true, force: true });
});

describe("HostDir", () => {
  let hd: HostDir;
  beforeAll(() => {
    hd = new HostDir(DIR);
  });
  afterAll(() => hd.dispose());

  test("new HostDir() refuses a DIR that is not a directory, or is missing", () => {
    expect(() => new HostDir(join(DIR, "f"))).toThrow(ErrnoError);
    try {
      new HostDir(join(DIR, "f"));
    } catch (e) {
      expect((e as ErrnoError).code).toBe("ENOTDIR");
    }
    try {
      new HostDir(join(DIR, "missing"));
    } catch (e) {
      expect((e as ErrnoError).code).toBe("ENOENT");
    }
  });

  test("lookup() returns an O_PATH fd and attributes matching stat(2)", () => {
    const fd = hd.lookup(hd.rootFd, "f");
    expect(fd).toBeGreaterThanOrEqual(0);
    expect(sys.getflRaw(fd) & O_PATH).toBe(O_PATH);
    const st = statSync(join(DIR, "f"), { bigint: true });
    const a = hd.attr;
    expect(a.type).toBe(S_IFREG);
    expect(a.mode).toBe(Number(st.mode));
    expect(a.ino).toBe(Number(st.ino));
    expect(a.dev).toBe(Number(st.dev));
    expect(a.size).toBe(5);
    expect(a.nlink).toBe(1);
    expect(a.uid).toBe(Number(st.uid));
    expect(a.gid).toBe(Number(st.gid));
    expect(a.blocks).toBe(Number(st.blocks));
    expect(a.blksize).toBe(Number(st.blksize));
    expect(a.mtimeSec * 1e9 + a.mtimeNsec).toBe(Number(st.mtimeNs));
    expect(a.ctimeSec).toBe(Number(st.ctimeNs / 1_000_000_000n));
    expect(a.atimeSec).toBe(Number(st.atimeNs / 1_000_000_000n));
    expect(a.mntId).toBeGreaterThan(0);
    expect(hd.close(fd)).toBe(0);
  });

  test("lookup() accepts names as bytes and reports a missing name as -ENOENT", () => {
    const fd = hd.lookup(hd.rootFd, enc.encode("sub"));
    expect(fd).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFDIR);
    const g = hd.lookup(fd, "g");
    expect(g).toBeGreaterThanOrEqual(0);
    expect(hd.attr.size).toBe(6);
    expect(hd.lookup(fd, "nope")).toBe(-ENOENT);
    hd.close(g);
    hd.close(fd);
  });

  test("lookup() refuses names that are not a single component", () => {
    for (const n of ["", ".", "../x", "a/b", "/etc", "sub/", "f\0x", "/"]) expect(hd.lookup(hd.rootFd, n)).toBe(-EINVAL);
    expect(hd.lookup(hd.rootFd, new Uint8Array([0x2e]))).toBe(-EINVAL);
    expect(hd.lookup(hd.rootFd, new Uint8Array([0x61, 0x2f, 0x62]))).toBe(-EINVAL);
    expect(hd.lookup(hd.rootFd, "x".repeat(256))).toBe(-ENAMETOOLONG);
    expect(hd.lookup(hd.rootFd, "é".repeat(128))).toBe(-ENAMETOOLONG);
    expect(hd.lookup(hd.rootFd, "x".repeat(255))).toBe(-ENOENT);
    // A name is never mistaken for AT_FDCWD-relative: negative parents are refused.
    expect(hd.lookup(-100, "etc")).toBe(-EBADF);
    // A name that failed leaves nothing behind for the next one.
    expect(hd.lookup(hd.rootFd, "x".repeat(300))).toBe(-ENAMETOOLONG);
    const fd = hd.lookup(hd.rootFd, "f");
    expect(fd).toBeGreaterThanOrEqual(0);
    hd.close(fd);
  });

  test("names are bytes: a non-UTF-8 name is created, listed and looked up as given", () => {
    const raw = new Uint8Array([0x62, 0xff, 0xfe, 0x63]);
    const fd = hd.create(hd.rootFd, raw, O_WRONLY, 0o600);
    expect(fd).toBeGreaterThanOrEqual(0);
    hd.close(fd);
    const dfd = hd.open(hd.rootFd, O_RDONLY | O_DIRECTORY);
    expect(hd.readdir(dfd, 0)).toBeGreaterThan(0);
    let found = 0;
    while (hd.dirents.next()) if (Buffer.from(hd.dirents.nameBytes()).equals(raw)) found++;
    expect(found).toBe(1);
    hd.close(dfd);
    const ino = hd.lookup(hd.rootFd, raw);
    expect(ino).toBeGreaterThanOrEqual(0);
    hd.close(ino);
    expect(hd.unlink(hd.rootFd, raw)).toBe(0);
  });

  test("lookup(parent, '..') gives the parent below DIR and -EACCES at DIR", () => {
    expect(hd.lookup(hd.rootFd, "..")).toBe(-EACCES);
    const sub = hd.lookup(hd.rootFd, "sub");
    const up = hd.lookup(sub, "..");
    expect(up).toBeGreaterThanOrEqual(0);
    expect(hd.attr.ino).toBe(statSync(DIR).ino);
    // A second fd of DIR is still DIR: its ".." is refused too.
    expect(hd.lookup(up, "..")).toBe(-EACCES);
    hd.close(up);
    hd.close(sub);
  });

  test("open() reopens a file for reading and writing; create() makes one", () => {
    const ino = hd.lookup(hd.rootFd, "f");
    const r = hd.open(ino, O_RDONLY);
    expect(r).toBeGreaterThanOrEqual(0);
    expect(sys.getflRaw(r) & O_PATH).toBe(0);
    const buf = new Uint8Array(16);
    expect(dec.decode(buf.subarray(0, sys.read(r, buf)!))).toBe("hello");
    hd.close(r);
    expect(hd.open(ino, O_RDONLY | O_DIRECTORY)).toBe(-ENOTDIR);
    hd.close(ino);

    const w = hd.create(hd.rootFd, "new", O_RDWR, 0o640);
    expect(w).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFREG);
    expect(hd.attr.mode & 0o777).toBe(0o640);
    expect(sys.write(w, enc.encode("data"))).toBe(4);
    hd.close(w);
    expect(readFileSync(join(DIR, "new"), "utf8")).toBe("data");
    expect(hd.create(hd.rootFd, "new", O_RDWR | O_EXCL, 0o640)).toBe(-EEXIST);
    // Without O_EXCL an existing file is opened; O_TRUNC empties it.
    const again = hd.create(hd.rootFd, "new", O_WRONLY | O_TRUNC, 0o600);
    expect(again).toBeGreaterThanOrEqual(0);
    expect(hd.attr.size).toBe(0);
    hd.close(again);
    expect(hd.unlink(hd.rootFd, "new")).toBe(0);
  });

  test("create() of an existing directory name is -EISDIR, as open(2) with O_CREAT", () => {
    expect(hd.create(hd.rootFd, "sub", O_WRONLY, 0o600)).toBe(-EISDIR);
    expect(hd.create(hd.rootFd, "sub", O_RDONLY, 0o600)).toBe(-EISDIR);
  });

  test("inodeOf() gives an O_PATH fd of the same inode, a symlink's own included", () => {
    const w = hd.create(hd.rootFd, "io", O_RDWR, 0o600);
    const ino = hd.attr.ino;
    const p = hd.inodeOf(w);
    expect(p).toBeGreaterThanOrEqual(0);
    expect(sys.getflRaw(p) & O_PATH).toBe(O_PATH);
    expect(hd.attr.ino).toBe(ino);
    hd.close(p);
    hd.close(w);
    const l = hd.lookup(hd.rootFd, "passwd");
    const l2 = hd.inodeOf(l);
    expect(hd.attr.type).toBe(S_IFLNK);
    hd.close(l2);
    hd.close(l);
    hd.unlink(hd.rootFd, "io");
  });

  test("mkdir() and rmdir(); rmdir of a non-empty directory is -ENOTEMPTY", () => {
    const d = hd.mkdir(hd.rootFd, "d", 0o750);
    expect(d).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFDIR);
    expect(hd.attr.mode & 0o777).toBe(0o750);
    expect(sys.getflRaw(d) & O_PATH).toBe(O_PATH);
    expect(hd.mkdir(hd.rootFd, "d", 0o750)).toBe(-EEXIST);
    const f = hd.create(d, "x", O_WRONLY, 0o600);
    hd.close(f);
    expect(hd.rmdir(hd.rootFd, "d")).toBe(-ENOTEMPTY);
    expect(hd.rmdir(d, "x")).toBe(-ENOTDIR);
    expect(hd.unlink(hd.rootFd, "d")).toBe(-EISDIR);
    expect(hd.unlink(d, "x")).toBe(0);
    expect(hd.rmdir(hd.rootFd, "d")).toBe(0);
    hd.close(d);
  });

  test("mknod() makes FIFOs, sockets and files, and refuses devices unless allowed", () => {
    for (const [name, t] of [["fifo", S_IFIFO], ["sock", S_IFSOCK], ["reg", S_IFREG]] as const) {
      const fd = hd.mknod(hd.rootFd, name, t | 0o640, 0);
      expect(fd).toBeGreaterThanOrEqual(0);
      expect(hd.attr.type).toBe(t);
      // Only regular files and directories are opened here; a FIFO would block the loop.
      if (t !== S_IFREG) expect(hd.open(fd, O_RDONLY)).toBe(-EACCES);
      hd.close(fd);
      expect(hd.unlink(hd.rootFd, name)).toBe(0);
    }
    expect(hd.mknod(hd.rootFd, "null", S_IFCHR | 0o600, 0x103)).toBe(-EPERM);
    expect(hd.mknod(hd.rootFd, "dir", S_IFDIR | 0o700, 0)).toBe(-EINVAL);
    expect(existsSync(join(DIR, "null"))).toBe(false);
  });

  test.skipIf(!isRoot)("mknod() of a device with allowDevices; open() still refuses it", () => {
    const dev = new HostDir(DIR, { allowDevices: true });
    const fd = dev.mknod(dev.rootFd, "null", S_IFCHR | 0o600, (1 << 8) | 3);
    expect(fd).toBeGreaterThanOrEqual(0);
    expect(dev.attr.type).toBe(S_IFCHR);
    expect([dev.attr.rdevMajor, dev.attr.rdevMinor]).toEqual([1, 3]);
    expect(dev.attr.rdev).toBe(Number(lstatSync(join(DIR, "null")).rdev));
    expect(dev.open(fd, O_RDWR)).toBe(-EACCES);
    dev.close(fd);
    expect(dev.unlink(dev.rootFd, "null")).toBe(0);
    dev.dispose();
  });

  test("symlink() stores the target as text and readlink() returns it", () => {
    const fd = hd.symlink(hd.rootFd, "ln", "../../anything/at/all");
    expect(fd).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFLNK);
    const buf = new Uint8Array(4096);
    expect(dec.decode(buf.subarray(0, hd.readlink(fd, buf)))).toBe("../../anything/at/all");
    hd.close(fd);
    expect(hd.symlink(hd.rootFd, "ln", "x")).toBe(-EEXIST);
    expect(hd.symlink(hd.rootFd, "ln2", "")).toBe(-EINVAL);
    expect(hd.symlink(hd.rootFd, "ln2", "x".repeat(4096))).toBe(-ENAMETOOLONG);
    expect(hd.unlink(hd.rootFd, "ln")).toBe(0);
    const f = hd.lookup(hd.rootFd, "f");
    expect(hd.readlink(f, buf)).toBe(-EINVAL);
    hd.close(f);
  });

  test("rename() moves, refuses to replace with RENAME_NOREPLACE and swaps with RENAME_EXCHANGE", () => {
    writeFileSync(join(DIR, "r1"), "one");
    writeFileSync(join(DIR, "r2"), "two");
    const sub = hd.lookup(hd.rootFd, "sub");
    expect(hd.rename(hd.rootFd, "r1", sub, "r1")).toBe(0);
    expect(readFileSync(join(DIR, "sub", "r1"), "utf8")).toBe("one");
    expect(hd.rename(sub, "r1", hd.rootFd, "r2", RENAME_NOREPLACE)).toBe(-EEXIST);
    expect(hd.rename(sub, "r1", hd.rootFd, "r2", RENAME_EXCHANGE)).toBe(0);
    expect(readFileSync(join(DIR, "r2"), "utf8")).toBe("one");
    expect(readFileSync(join(DIR, "sub", "r1"), "utf8")).toBe("two");
    expect(hd.rename(sub, "r1", hd.rootFd, "..")).toBe(-EINVAL);
    expect(hd.rename(sub, "missing", hd.rootFd, "x")).toBe(-ENOENT);
    hd.unlink(sub, "r1");
    hd.unlink(hd.rootFd, "r2");
    hd.close(sub);
  });

  test("link() adds a name to the inode, a symlink's own included", () => {
    const f = hd.lookup(hd.rootFd, "f");
    const l = hd.link(f, hd.rootFd, "f2");
    expect(l).toBeGreaterThanOrEqual(0);
    expect(hd.attr.nlink).toBe(2);
    expect(readFileSync(join(DIR, "f2"), "utf8")).toBe("hello");
    hd.close(l);
    expect(hd.link(f, hd.rootFd, "f2")).toBe(-EEXIST);
    expect(hd.unlink(hd.rootFd, "f2")).toBe(0);
    hd.close(f);
    const s = hd.lookup(hd.rootFd, "passwd");
    const s2 = hd.link(s, hd.rootFd, "passwd2");
    expect(s2).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFLNK);
    expect(lstatSync(join(DIR, "passwd2")).isSymbolicLink()).toBe(true);
    hd.close(s2);
    hd.unlink(hd.rootFd, "passwd2");
    const sub = hd.lookup(hd.rootFd, "sub");
    expect(hd.link(sub, hd.rootFd, "sub2")).toBe(-EPERM);
    hd.close(sub);
    hd.close(s);
  });

  test("chmod(), chown(), truncate() and utimes() change the inode itself", () => {
    writeFileSync(join(DIR, "attrs"), "0123456789");
    const fd = hd.lookup(hd.rootFd, "attrs");
    expect(hd.chmod(fd, 0o604)).toBe(0);
    expect(lstatSync(join(DIR, "attrs")).mode & 0o7777).toBe(0o604);
    const st = lstatSync(join(DIR, "attrs"));
    expect(hd.chown(fd, -1, -1)).toBe(0);
    expect(hd.chown(fd, st.uid, st.gid)).toBe(0);
    if (isRoot) {
      expect(hd.chown(fd, 1234, 4321)).toBe(0);
      expect(lstatSync(join(DIR, "attrs")).uid).toBe(1234);
      expect(lstatSync(join(DIR, "attrs")).gid).toBe(4321);
    }
    expect(hd.truncate(fd, 3)).toBe(0);
    expect(readFileSync(join(DIR, "attrs"), "utf8")).toBe("012");
    expect(hd.truncate(fd, 4096)).toBe(0);
    expect(hd.getattr(fd)).toBe(0);
    expect(hd.attr.size).toBe(4096);
    expect(hd.utimes(fd, 1_000_000_000, 5, 1_500_000_000, 7)).toBe(0);
    expect(hd.getattr(fd)).toBe(0);
    expect([hd.attr.atimeSec, hd.attr.atimeNsec, hd.attr.mtimeSec, hd.attr.mtimeNsec]).toEqual([1_000_000_000, 5, 1_500_000_000, 7]);
    expect(hd.utimes(fd, 0, UTIME_OMIT, 0, UTIME_NOW)).toBe(0);
    hd.getattr(fd);
    expect(hd.attr.atimeSec).toBe(1_000_000_000);
    expect(Math.abs(hd.attr.mtimeSec - Date.now() / 1000)).toBeLessThan(5);
    // Before 1970 too (a negative time_t).
    expect(hd.utimes(fd, -86400, 0, 0, UTIME_OMIT)).toBe(0);
    hd.getattr(fd);
    expect(hd.attr.atimeSec).toBe(-86400);
    const sub = hd.lookup(hd.rootFd, "sub");
    expect(hd.truncate(sub, 0)).toBe(-EISDIR);
    hd.close(sub);
    hd.close(fd);
    hd.unlink(hd.rootFd, "attrs");
  });

  test("statfs() describes the filesystem of DIR", () => {
    expect(hd.statfs(hd.rootFd)).toBe(0);
    const s = hd.statfsOut;
    expect(s.bsize).toBeGreaterThan(0);
    expect(s.blocks).toBeGreaterThan(0);
    expect(s.bfree).toBeLessThanOrEqual(s.blocks);
    expect(s.namelen).toBe(255);
    expect(s.type).toBe(sys.fsType(hd.rootFd));
  });

  test("readdir() lists every entry with its type and resumes at an entry's offset", () => {
    mkdirSync(join(DIR, "many"));
    for (let i = 0; i < 300; i++) writeFileSync(join(DIR, "many", `entry-${i}-${"z".repeat(i % 40)}`), "");
    const many = hd.lookup(hd.rootFd, "many");
    const want = readdirSync(join(DIR, "many")).sort();
    expect(names(hd, many)).toEqual(want);
    // A small buffer forces several calls; each resumes at the last entry's offset.
    const dfd = hd.open(many, O_RDONLY | O_DIRECTORY);
    const small = new Dirents(512);
    const got: string[] = [];
    let off: number | bigint = 0;
    let calls = 0;
    for (;;) {
      const n = hd.readdir(dfd, off, small);
      if (n <= 0) break;
      calls++;
      while (small.next()) {
        if (!small.isDot) got.push(small.name());
        expect(small.type).toBe(small.isDot ? DT_DIR : DT_REG);
        off = small.off;
      }
    }
    expect(calls).toBeGreaterThan(5);
    expect(got.sort()).toEqual(want);
    // Resuming in the middle gives exactly the rest.
    expect(hd.readdir(dfd, 0, small)).toBeGreaterThan(0);
    const first: string[] = [];
    for (let i = 0; i < 5 && small.next(); i++) {
      first.push(small.name());
      off = small.off;
    }
    const rest: string[] = [];
    for (let n = hd.readdir(dfd, off, small); n > 0; n = hd.readdir(dfd, off, small)) {
      while (small.next()) {
        rest.push(small.name());
        off = small.off;
      }
    }
    expect([...first, ...rest].filter((n) => n !== "." && n !== "..").sort()).toEqual(want);
    expect(first.length + rest.length).toBe(want.length + 2);
    hd.close(dfd);
    hd.close(many);
    // Types at the top: a symlink is DT_LNK.
    const top = hd.open(hd.rootFd, O_RDONLY | O_DIRECTORY);
    const types = new Map<string, number>();
    expect(hd.readdir(top, 0)).toBeGreaterThan(0);
    while (hd.dirents.next()) types.set(hd.dirents.name(), hd.dirents.type);
    expect(types.get("out")).toBe(DT_LNK);
    expect(types.get("f")).toBe(DT_REG);
    expect(types.get("sub")).toBe(DT_DIR);
    hd.close(top);
    // An O_PATH fd cannot be read as a directory.
    expect(hd.readdir(hd.rootFd, 0)).toBe(-EBADF);
    rmSync(join(DIR, "many"), { recursive: true });
  });

  test("xattrs: set, get, size, list and remove on the inode", () => {
    const fd = hd.lookup(hd.rootFd, "f");
    const v = enc.encode("value-1");
    expect(hd.setxattr(fd, "user.test", v)).toBe(0);
    expect(hd.getxattr(fd, "user.test", null)).toBe(v.length);
    const buf = new Uint8Array(64);
    expect(dec.decode(buf.subarray(0, hd.getxattr(fd, "user.test", buf)))).toBe("value-1");
    expect(hd.setxattr(fd, "user.test", v, XATTR_CREATE)).toBe(-EEXIST);
    const n = hd.listxattr(fd, buf);
    expect(dec.decode(buf.subarray(0, n)).split("\0")).toContain("user.test");
    expect(hd.listxattr(fd, null)).toBe(n);
    expect(hd.removexattr(fd, "user.test")).toBe(0);
    expect(hd.getxattr(fd, "user.test", buf)).toBe(-ENODATA);
    expect(hd.getxattr(fd, "", buf)).toBe(-EINVAL);
    hd.close(fd);
  });

  test("fsync(), fdatasync() and syncfs() succeed on opened fds", () => {
    const ino = hd.lookup(hd.rootFd, "f");
    const w = hd.open(ino, O_WRONLY);
    expect(hd.fsync(w)).toBe(0);
    expect(hd.fsync(w, true)).toBe(0);
    expect(hd.fsync(ino)).toBe(-EBADF); // an O_PATH fd
    hd.close(w);
    hd.close(ino);
    // syncfs flushes a whole filesystem: on tmpfs (when there is one) it costs nothing.
    const shm = existsSync("/dev/shm") ? mkdtempSync("/dev/shm/host_fs-") : null;
    const onShm = new HostDir(shm ?? DIR);
    expect(onShm.syncfs()).toBe(0);
    expect(onShm.openFds).toBe(2);
    onShm.dispose();
    if (shm) rmSync(shm, { recursive: true });
  });
});

describe.each([true, false])("HostDir escape attempts (openat2: %p)", (useOpenat2) => {
  let hd: HostDir;
  let before = "";
  beforeAll(() => {
    hd = new HostDir(DIR, { openat2: useOpenat2 });
    before = snapshot();
  });
  afterAll(() => {
    hd.dispose();
  });

  test("the chosen lookup path is in use", () => {
    expect(hd.usesOpenat2).toBe(useOpenat2);
  });

  test("lookup() returns a planted symlink as itself, never its target", () => {
    for (const n of ["out", "abs", "dangling", "passwd"]) {
      const fd = hd.lookup(hd.rootFd, n);
      expect(fd).toBeGreaterThanOrEqual(0);
      expect(hd.attr.type).toBe(S_IFLNK);
      expect(hd.attr.ino).toBe(lstatSync(join(DIR, n)).ino);
      hd.close(fd);
    }
  });

  test("a symlink fd is no directory: lookup, create, mkdir, mknod, symlink, unlink through it fail", () => {
    for (const n of ["out", "abs"]) {
      const out = hd.lookup(hd.rootFd, n);
      expect(hd.lookup(out, "secret")).toBe(-ENOTDIR);
      expect(hd.lookup(out, "..")).toBe(-ENOTDIR);
      expect(hd.create(out, "x", O_WRONLY, 0o600)).toBe(-ENOTDIR);
      expect(hd.mkdir(out, "x", 0o700)).toBe(-ENOTDIR);
      expect(hd.mknod(out, "x", S_IFIFO | 0o600, 0)).toBe(-ENOTDIR);
      expect(hd.symlink(out, "x", "y")).toBe(-ENOTDIR);
      expect(hd.unlink(out, "secret")).toBe(-ENOTDIR);
      expect(hd.rmdir(out, "secret")).toBe(-ENOTDIR);
      hd.close(out);
    }
  });

  test("open() and readdir() refuse to go through a symlink", () => {
    const out = hd.lookup(hd.rootFd, "out");
    expect(hd.open(out, O_RDONLY)).toBe(-ELOOP);
    expect(hd.open(out, O_RDONLY | O_DIRECTORY)).toBe(-ELOOP);
    // Even an O_PATH fd of a symlink cannot be read as a directory.
    expect(hd.readdir(out, 0)).toBe(-EBADF);
    hd.close(out);
  });

  test("a symlink to /etc/passwd cannot be opened, truncated, chmod-ed or given xattrs", () => {
    const p = hd.lookup(hd.rootFd, "passwd");
    for (const fl of [O_RDONLY, O_WRONLY, O_RDWR, O_WRONLY | O_TRUNC, O_RDONLY | O_CREAT]) expect(hd.open(p, fl)).toBe(-ELOOP);
    expect(hd.truncate(p, 0)).toBe(-ELOOP);
    expect(hd.chmod(p, 0o777)).toBe(-EOPNOTSUPP);
    expect(hd.setxattr(p, "user.x", enc.encode("v"))).toBe(-EPERM);
    expect(hd.getxattr(p, "user.x", new Uint8Array(8))).toBe(-ENODATA);
    // These act on the link itself, which lives in DIR.
    expect(hd.utimes(p, 1, 0, 1, 0)).toBe(0);
    expect(lstatSync(join(DIR, "passwd")).mtimeMs).toBe(1000);
    expect(hd.chown(p, -1, -1)).toBe(0);
    const buf = new Uint8Array(64);
    expect(dec.decode(buf.subarray(0, hd.readlink(p, buf)))).toBe("/etc/passwd");
    hd.close(p);
  });

  test("create() never follows a planted symlink, dangling or not", () => {
    for (const fl of [O_WRONLY, O_RDWR | O_TRUNC, O_RDONLY]) {
      expect(hd.create(hd.rootFd, "dangling", fl, 0o666)).toBe(-ELOOP);
      expect(hd.create(hd.rootFd, "passwd", fl, 0o666)).toBe(-ELOOP);
      expect(hd.create(hd.rootFd, "out", fl, 0o666)).toBe(-ELOOP);
    }
    expect(hd.create(hd.rootFd, "dangling", O_WRONLY | O_EXCL, 0o666)).toBe(-EEXIST);
    expect(existsSync(join(OUT, "created"))).toBe(false);
    expect(hd.mkdir(hd.rootFd, "dangling", 0o777)).toBe(-EEXIST);
    expect(hd.mknod(hd.rootFd, "dangling", S_IFIFO | 0o666, 0)).toBe(-EEXIST);
    expect(existsSync(join(OUT, "created"))).toBe(false);
  });

  test("names that are paths are refused by every operation with -EINVAL", () => {
    const f = hd.lookup(hd.rootFd, "f");
    for (const n of ["../outside", "../outside/secret", "out/secret", "a/b", "/etc/passwd", "..", ".", ""]) {
      if (n !== "..") expect(hd.lookup(hd.rootFd, n)).toBe(-EINVAL);
      expect(hd.create(hd.rootFd, n, O_WRONLY, 0o600)).toBe(-EINVAL);
      expect(hd.mkdir(hd.rootFd, n, 0o700)).toBe(-EINVAL);
      expect(hd.mknod(hd.rootFd, n, S_IFIFO | 0o600, 0)).toBe(-EINVAL);
      expect(hd.symlink(hd.rootFd, n, "t")).toBe(-EINVAL);
      expect(hd.unlink(hd.rootFd, n)).toBe(-EINVAL);
      expect(hd.rmdir(hd.rootFd, n)).toBe(-EINVAL);
      expect(hd.rename(hd.rootFd, n, hd.rootFd, "x")).toBe(-EINVAL);
      expect(hd.rename(hd.rootFd, "f", hd.rootFd, n)).toBe(-EINVAL);
      expect(hd.link(f, hd.rootFd, n)).toBe(-EINVAL);
    }
    expect(hd.lookup(hd.rootFd, "..")).toBe(-EACCES);
    hd.close(f);
  });

  test("rename() and link() into or out of a symlinked directory fail", () => {
    const out = hd.lookup(hd.rootFd, "out");
    const f = hd.lookup(hd.rootFd, "f");
    expect(hd.rename(out, "secret", hd.rootFd, "stolen")).toBe(-ENOTDIR);
    expect(hd.rename(hd.rootFd, "f", out, "f")).toBe(-ENOTDIR);
    expect(hd.rename(hd.rootFd, "f", out, "secret", RENAME_EXCHANGE)).toBe(-ENOTDIR);
    expect(hd.link(f, out, "f")).toBe(-ENOTDIR);
    const linked = hd.link(out, hd.rootFd, "secret"); // links the symlink itself
    expect(linked).toBeGreaterThanOrEqual(0);
    expect(hd.attr.type).toBe(S_IFLNK);
    expect(lstatSync(join(DIR, "secret")).isSymbolicLink()).toBe(true);
    hd.close(linked);
    expect(hd.unlink(hd.rootFd, "secret")).toBe(0);
    // Renaming the link itself inside DIR is fine and touches nothing outside.
    expect(hd.rename(hd.rootFd, "out", hd.rootFd, "out2")).toBe(0);
    expect(hd.rename(hd.rootFd, "out2", hd.rootFd, "out")).toBe(0);
    expect(existsSync(join(DIR, "stolen"))).toBe(false);
    hd.close(f);
    hd.close(out);
  });

  test("nothing outside DIR changed", () => {
    expect(snapshot()).toBe(before);
    expect(hd.openFds).toBe(2);
  });
});

describe("HostDir readOnly", () => {
  test("every change is -EROFS and nothing in DIR changes", () => {
    const ro = new HostDir(DIR, { readOnly: true });
    // Reading moves atime (relatime), which is not a change we refuse.
    const listing = () =>
      readdirSync(DIR).sort().map((n) => {
        const st = lstatSync(join(DIR, n));
        return `${n} ${st.ino} ${st.mode} ${st.uid} ${st.size} ${st.nlink} ${st.mtimeMs} ${st.ctimeMs}`;
      }).join("\n");
    const beforeDir = listing();
    const f = ro.lookup(ro.rootFd, "f");
    const sub = ro.lookup(ro.rootFd, "sub");
    expect(f).toBeGreaterThanOrEqual(0);
    expect(ro.create(ro.rootFd, "n", O_WRONLY, 0o600)).toBe(-EROFS);
    expect(ro.create(ro.rootFd, "f", O_RDONLY, 0o600)).toBe(-EROFS);
    expect(ro.mkdir(ro.rootFd, "n", 0o700)).toBe(-EROFS);
    expect(ro.mknod(ro.rootFd, "n", S_IFIFO | 0o600, 0)).toBe(-EROFS);
    expect(ro.symlink(ro.rootFd, "n", "t")).toBe(-EROFS);
    expect(ro.unlink(ro.rootFd, "f")).toBe(-EROFS);
    expect(ro.rmdir(ro.rootFd, "sub")).toBe(-EROFS);
    expect(ro.rename(ro.rootFd, "f", sub, "f")).toBe(-EROFS);
    expect(ro.link(f, sub, "f")).toBe(-EROFS);
    expect(ro.chmod(f, 0o777)).toBe(-EROFS);
    expect(ro.chown(f, 0, 0)).toBe(-EROFS);
    expect(ro.truncate(f, 0)).toBe(-EROFS);
    expect(ro.utimes(f, 0, UTIME_NOW, 0, UTIME_NOW)).toBe(-EROFS);
    expect(ro.setxattr(f, "user.x", enc.encode("v"))).toBe(-EROFS);
    expect(ro.removexattr(f, "user.x")).toBe(-EROFS);
    for (const fl of [O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC]) expect(ro.open(f, fl)).toBe(-EROFS);
    // Reading still works.
    const r = ro.open(f, O_RDONLY);
    expect(r).toBeGreaterThanOrEqual(0);
    expect(ro.getxattr(f, "user.none", null)).toBe(-ENODATA);
    expect(names(ro, sub)).toEqual(["g"]);
    for (const fd of [r, f, sub]) ro.close(fd);
    expect(listing()).toBe(beforeDir);
    ro.dispose();
  });
});

describe("HostDir and a directory moved out of DIR", () => {
  test("its fd keeps working where it went, but '..' from it is refused", () => {
    const hd = new HostDir(DIR);
    mkdirSync(join(DIR, "mv", "inner"), { recursive: true });
    const mv = hd.lookup(hd.rootFd, "mv");
    const inner = hd.lookup(mv, "inner");
    const up = hd.lookup(inner, "..");
    expect(up).toBeGreaterThanOrEqual(0);
    hd.close(up);
    // Someone on the host moves it out while we hold its fd.
    renameSync(join(DIR, "mv"), join(OUT, "moved"));
    expect(hd.lookup(inner, "..")).toBe(-EACCES);
    expect(hd.lookup(mv, "..")).toBe(-EACCES);
    // Inherent: the fd names the directory wherever it is; lookups in it still work.
    expect(hd.getattr(mv)).toBe(0);
    const again = hd.lookup(mv, "inner");
    expect(again).toBeGreaterThanOrEqual(0);
    for (const fd of [again, inner, mv]) hd.close(fd);
    expect(hd.openFds).toBe(2);
    rmSync(join(OUT, "moved"), { recursive: true });
    hd.dispose();
  });
});

describe("HostDir fd accounting", () => {
  test("after operations and closes openFds is back at 2 and /proc/self/fd agrees", () => {
    const start = procFdCount();
    const hd = new HostDir(DIR);
    expect(hd.openFds).toBe(2);
    expect(procFdCount()).toBe(start + 2);
    const held: number[] = [];
    const keep = (fd: number) => {
      expect(fd).toBeGreaterThanOrEqual(0);
      held.push(fd);
      return fd;
    };
    const sub = keep(hd.lookup(hd.rootFd, "sub"));
    keep(hd.lookup(sub, ".."));
    const g = keep(hd.lookup(sub, "g"));
    keep(hd.open(g, O_RDONLY));
    const c = keep(hd.create(sub, "acct", O_RDWR, 0o600));
    keep(hd.inodeOf(c));
    keep(hd.mkdir(sub, "acctdir", 0o700));
    keep(hd.symlink(sub, "acctlink", "x"));
    keep(hd.mknod(sub, "acctfifo", S_IFIFO | 0o600, 0));
    keep(hd.link(g, sub, "acctlink2"));
    keep(hd.open(sub, O_RDONLY | O_DIRECTORY));
    expect(hd.openFds).toBe(2 + held.length);
    expect(procFdCount()).toBe(start + 2 + held.length);
    // Failures open nothing.
    hd.lookup(sub, "missing");
    hd.lookup(hd.rootFd, "..");
    hd.create(hd.rootFd, "dangling", O_WRONLY, 0o600);
    hd.create(sub, "acct", O_WRONLY | O_EXCL, 0o600);
    expect(hd.open(g, O_RDONLY | O_DIRECTORY)).toBe(-ENOTDIR);
    hd.truncate(c, 1);
    hd.truncate(sub, 1);
    hd.syncfs();
    const lnk = hd.lookup(hd.rootFd, "passwd");
    hd.open(lnk, O_RDONLY);
    hd.close(lnk);
    expect(hd.openFds).toBe(2 + held.length);
    expect(procFdCount()).toBe(start + 2 + held.length);
    for (const n of ["acct", "acctlink", "acctlink2", "acctfifo"]) expect(hd.unlink(sub, n)).toBe(0);
    expect(hd.rmdir(sub, "acctdir")).toBe(0);
    for (const fd of held) expect(hd.close(fd)).toBe(0);
    expect(hd.close(hd.rootFd)).toBe(-EBADF);
    expect(hd.openFds).toBe(2);
    expect(procFdCount()).toBe(start + 2);
    hd.dispose();
    expect(hd.openFds).toBe(0);
    expect(procFdCount()).toBe(start);
  });
});

describe("ffi/sys statx and friends", () => {
  test("statx() throws ErrnoError and statxRaw() returns -errno", () => {
    expect(() => sys.statx(-100, join(DIR, "missing"))).toThrow("statx: ENOENT (2)");
    expect(sys.statxRaw(-100, sys.cstring(join(DIR, "missing")), 0, 0x7ff, new Statx())).toBe(-ENOENT);
    // A CStr must end with its NUL.
    expect(sys.statxRaw(-100, enc.encode(DIR), 0, 0x7ff, new Statx())).toBe(-EINVAL);
    const s = sys.statx(-100, DIR);
    expect(s.type).toBe(S_IFDIR);
  });

  test("lseekRaw() finds data and holes; copyFileRangeRaw() copies between fds", () => {
    const hd = new HostDir(DIR);
    const a = hd.create(hd.rootFd, "sparse", O_RDWR, 0o600);
    expect(sys.ftruncateRaw(a, 1 << 20)).toBe(0);
    expect(sys.pwritePtr(a, sys.ptrOf(enc.encode("tail")), 4, (1 << 20) - 4)).toBe(4);
    const data = sys.lseekRaw(a, 0, 3 /* SEEK_DATA */);
    expect(data).toBeGreaterThan(0);
    expect(sys.lseekRaw(a, 0, 4 /* SEEK_HOLE */)).toBe(0);
    expect(sys.lseekRaw(a, 2 << 20, 3)).toBe(-6 /* ENXIO */);
    const b = hd.create(hd.rootFd, "copy", O_RDWR, 0o600);
    expect(sys.copyFileRangeRaw(a, (1 << 20) - 4, b, 0, 4)).toBe(4);
    const buf = new Uint8Array(8);
    // Explicit offsets leave the fd positions alone: b still reads from 0.
    expect(dec.decode(buf.subarray(0, sys.read(b, buf)!))).toBe("tail");
    hd.close(a);
    hd.close(b);
    expect(readFileSync(join(DIR, "copy"), "utf8")).toBe("tail");
    hd.unlink(hd.rootFd, "sparse");
    hd.unlink(hd.rootFd, "copy");
    hd.dispose();
  });
});

/**
 * The FUSE wire layer (src/devices/fs/fuse.ts) over real chain cursors:
 * requests are built byte by byte from fuse.h's struct layouts, placed in
 * guest-like memory (split over pieces to exercise unaligned and crossing
 * fields) and decoded; replies are written into writable pieces and parsed
 * back by the independent offsets below. Hostile requests must give their
 * errno, never an exception.
 */
import { describe, expect, test } from "bun:test";
import { ChainReader, ChainWriter } from "../../src/virtq/chain_io.ts";
import { Pieces } from "../../src/memory/pieces.ts";
import { rng } from "../support/random.ts";
import {
  DirentPacker, E2BIG, EINVAL, EIO, ENAMETOOLONG, ENOENT, EPROTO, ERANGE, FATTR_MODE, FATTR_SIZE, FOPEN_KEEP_CACHE,
  FUSE_ACCESS, FUSE_ASYNC_READ, FUSE_BATCH_FORGET, FUSE_COPY_FILE_RANGE, FUSE_CREATE, FUSE_DESTROY,
  FUSE_DO_READDIRPLUS, FUSE_FALLOCATE, FUSE_FLUSH, FUSE_FORGET, FUSE_FSYNC, FUSE_FSYNCDIR, FUSE_GETATTR,
  FUSE_GETLK, FUSE_GETXATTR, FUSE_INIT, FUSE_INIT_EXT, FUSE_INTERRUPT, FUSE_IOCTL, FUSE_KERNEL_MINOR_VERSION,
  FUSE_LINK, FUSE_LISTXATTR, FUSE_LOOKUP, FUSE_LSEEK, FUSE_MAX_PAGES, FUSE_MKDIR, FUSE_MKNOD, FUSE_OPEN,
  FUSE_OPENDIR, FUSE_READ, FUSE_READDIR, FUSE_READDIRPLUS, FUSE_READLINK, FUSE_RELEASE, FUSE_RELEASEDIR,
  FUSE_REMOVEMAPPING, FUSE_REMOVEXATTR, FUSE_RENAME, FUSE_RENAME2, FUSE_RMDIR, FUSE_SECURITY_CTX,
  FUSE_SETATTR, FUSE_SETLKW, FUSE_SETUPMAPPING, FUSE_SETXATTR, FUSE_SETXATTR_EXT, FUSE_STATFS, FUSE_SYMLINK,
  FUSE_SYNCFS, FUSE_TMPFILE, FUSE_UNLINK, FUSE_WRITE, FuseAttr, FuseConn, FuseEntryOut, FuseRequest, FuseStatfs,
  RENAME_NOREPLACE, abortReply, beginReply, decodeName, direntPlusSize, direntSize, direntType, encodeName,
  endReply, fuseOpcodeName, replyAttr, replyBytes, replyCreate, replyEmpty, replyEntry, replyError, replyInit,
  replyInitVersion, replyLock, replyLseek, replyOpen, replyStatfs, replyString, replyWrite, replyXattrSize,
} from "../../src/devices/fs/fuse.ts";

// ---- guest-like memory and chains ----

const mem = new Uint8Array(4 << 20);
let top = 0;
/** Bump allocation with a gap after each buffer, so neighbouring pieces never merge. */
function alloc(n: number): number {
  if (top + n + 64 > mem.length) top = 0;
  const off = top;
  top += n + 64;
  return off;
}

/** The readable part: `bytes` cut into pieces of `split` bytes (0: one piece). */
function reader(bytes: Uint8Array, split = 0): ChainReader {
  const p = new Pieces(4);
  const step = split > 0 ? split : Math.max(1, bytes.length);
  for (let at = 0; at < bytes.length; at += step) {
    const n = Math.min(step, bytes.length - at), off = alloc(n);
    mem.set(bytes.subarray(at, at + n), off);
    p.add(mem, off, n, 0);
  }
  return new ChainReader(p);
}

interface Out { w: ChainWriter; bytes(): Uint8Array; all(): Uint8Array }
/** The writable part: buffers of the given sizes, pre-filled with 0xAA so untouched bytes show. */
function writer(...sizes: number[]): Out {
  const p = new Pieces(4), bufs: { off: number; len: number }[] = [];
  for (const len of sizes) {
    const off = alloc(len);
    mem.fill(0xaa, off, off + len);
    p.add(mem, off, len, 0);
    bufs.push({ off, len });
  }
  const w = new ChainWriter(p);
  const all = () => {
    const out = new Uint8Array(sizes.reduce((a, b) => a + b, 0));
    let at = 0;
    for (const b of bufs) {
      out.set(mem.subarray(b.off, b.off + b.len), at);
      at += b.len;
    }
    return out;
  };
  return { w, all, bytes: () => all().subarray(0, w.pos) };
}

// ---- request bytes, from fuse.h ----

const u16 = (v: number) => le(2, v), u32 = (v: number) => le(4, v), u64 = (v: number | bigint) => le(8, v);
function le(n: number, v: number | bigint): Uint8Array {
  const b = new Uint8Array(n);
  let x = BigInt.asUintN(n * 8, BigInt(v));
  for (let i = 0; i < n; i++, x >>= 8n) b[i] = Number(x & 0xffn);
  return b;
}
function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
const utf8 = (s: string) => new TextEncoder().encode(s);
const cstr = (s: string | Uint8Array) => cat(typeof s === "string" ? utf8(s) : s, new Uint8Array(1));
const zeros = (n: number) => new Uint8Array(n);
const fill = (n: number, b: number) => new Uint8Array(n).fill(b);

interface Hdr { unique?: number | bigint; nodeid?: number | bigint; uid?: number; gid?: number; pid?: number; extlen?: number; lenDelta?: number }
/** fuse_in_header + args; `len` is the true total unless `lenDelta` says otherwise. */
function request(opcode: number, args: Uint8Array, h: Hdr = {}): Uint8Array {
  const total = 40 + args.length;
  return cat(
    u32(total + (h.lenDelta ?? 0)), u32(opcode), u64(h.unique ?? 0x1234), u64(h.nodeid ?? 7),
    u32(h.uid ?? 1000), u32(h.gid ?? 100), u32(h.pid ?? 4242), u16(h.extlen ?? 0), u16(0), args,
  );
}

function decode(bytes: Uint8Array, conn = new FuseConn(), split = 0): { req: FuseRequest; err: number; r: ChainReader } {
  const req = new FuseRequest(conn), r = reader(bytes, split);
  const err = req.decode(r);
  return { req, err, r };
}

// struct builders, field by field as fuse.h lists them
const readIn = (fh: number, off: number, size: number, rflags: number, owner: number, flags: number) =>
  cat(u64(fh), u64(off), u32(size), u32(rflags), u64(owner), u32(flags), u32(0));
const releaseIn = (fh: number, flags: number, rflags: number, owner: number) => cat(u64(fh), u32(flags), u32(rflags), u64(owner));
const initIn = (major: number, minor: number, ra: number, flags: number, flags2 = 0) =>
  cat(u32(major), u32(minor), u32(ra), u32(flags), u32(flags2), zeros(44));
const setattrIn = cat(
  u32(FATTR_MODE | FATTR_SIZE), u32(0), u64(9), u64(2 ** 40), u64(77), u64(-1n), u64(1_700_000_000), u64(3),
  u32(5), u32(6), u32(7), u32(0o100600), u32(0), u32(501), u32(20), u32(0),
);

interface Case { label: string; opcode: number; args: Uint8Array; want: Record<string, unknown>; conn?: () => FuseConn; data?: Uint8Array }
const writeData = Uint8Array.from({ length: 100 }, (_, i) => i * 7);
const extConn = () => { const c = new FuseConn(); c.flags = FUSE_SETXATTR_EXT; return c; };

const CASES: Case[] = [
  { label: "INIT 7.38", opcode: FUSE_INIT, args: initIn(7, 38, 131072, FUSE_ASYNC_READ | FUSE_INIT_EXT, 3),
    want: { major: 7, minor: 38, maxReadahead: 131072, flags: FUSE_ASYNC_READ | FUSE_INIT_EXT, flags2: 3 } },
  { label: "INIT 7.31 (16-byte fuse_init_in)", opcode: FUSE_INIT, args: cat(u32(7), u32(31), u32(4096), u32(FUSE_ASYNC_READ)),
    want: { major: 7, minor: 31, maxReadahead: 4096, flags: FUSE_ASYNC_READ, flags2: 0 } },
  { label: "INIT flags2 ignored without INIT_EXT", opcode: FUSE_INIT, args: initIn(7, 37, 0, 0, 0xff),
    want: { major: 7, minor: 37, flags: 0, flags2: 0 } },
  { label: "DESTROY", opcode: FUSE_DESTROY, args: zeros(0), want: { known: true } },
  { label: "LOOKUP", opcode: FUSE_LOOKUP, args: cstr("hello.txt"), want: { nodeid: 7, name: "hello.txt", nameLen: 9, isDot: false } },
  { label: "FORGET", opcode: FUSE_FORGET, args: u64(12), want: { nlookup: 12, noReply: true } },
  { label: "BATCH_FORGET", opcode: FUSE_BATCH_FORGET, args: cat(u32(2), u32(0), u64(5), u64(1), u64(6), u64(2)),
    want: { count: 2, dataLen: 32, noReply: true } },
  { label: "GETATTR", opcode: FUSE_GETATTR, args: cat(u32(1), u32(0), u64(33)), want: { getattrFlags: 1, fh: 33 } },
  { label: "SETATTR", opcode: FUSE_SETATTR, args: setattrIn, want: {
    valid: FATTR_MODE | FATTR_SIZE, fh: 9, size: 2 ** 40, lockOwner: 77, atime: -1, mtime: 1_700_000_000, ctime: 3,
    atimensec: 5, mtimensec: 6, ctimensec: 7, mode: 0o100600, attrUid: 501, attrGid: 20, uid: 1000, gid: 100 } },
  { label: "READLINK", opcode: FUSE_READLINK, args: zeros(0), want: { known: true } },
  { label: "SYMLINK", opcode: FUSE_SYMLINK, args: cat(cstr("link"), cstr("../a/b/target")),
    want: { name: "link", name2: "../a/b/target", name2Len: 13 } },
  { label: "MKNOD", opcode: FUSE_MKNOD, args: cat(u32(0o010644), u32(0x0801), u32(0o022), u32(0), cstr("fifo")),
    want: { mode: 0o010644, rdev: 0x0801, umask: 0o022, name: "fifo" } },
  { label: "MKDIR", opcode: FUSE_MKDIR, args: cat(u32(0o755), u32(0o022), cstr("dir")), want: { mode: 0o755, umask: 0o022, name: "dir" } },
  { label: "UNLINK", opcode: FUSE_UNLINK, args: cstr("gone"), want: { name: "gone" } },
  { label: "RMDIR", opcode: FUSE_RMDIR, args: cstr("d"), want: { name: "d" } },
  { label: "RENAME", opcode: FUSE_RENAME, args: cat(u64(99), cstr("old"), cstr("new")),
    want: { newdir: 99, name: "old", name2: "new", flags: 0 } },
  { label: "RENAME2", opcode: FUSE_RENAME2, args: cat(u64(99), u32(RENAME_NOREPLACE), u32(0), cstr("a"), cstr("b")),
    want: { newdir: 99, flags: RENAME_NOREPLACE, name: "a", name2: "b" } },
  { label: "LINK", opcode: FUSE_LINK, args: cat(u64(55), cstr("hard")), want: { oldnodeid: 55, name: "hard", name2Len: 0 } },
  { label: "OPEN", opcode: FUSE_OPEN, args: cat(u32(0o100002), u32(1)), want: { flags: 0o100002, openFlags: 1 } },
  { label: "CREATE", opcode: FUSE_CREATE, args: cat(u32(0o101), u32(0o100644), u32(0o022), u32(0), cstr("new.txt")),
    want: { flags: 0o101, mode: 0o100644, umask: 0o022, openFlags: 0, name: "new.txt" } },
  { label: "TMPFILE (the VFS names it \"/\")", opcode: FUSE_TMPFILE, args: cat(u32(2), u32(0o100600), u32(0), u32(0), cstr("/")),
    want: { flags: 2, mode: 0o100600, name: "/" } },
  { label: "READ", opcode: FUSE_READ, args: readIn(3, 2 ** 33 + 5, 131072, 2, 0xabc, 0o2),
    want: { fh: 3, offset: 2 ** 33 + 5, size: 131072, readFlags: 2, lockOwner: 0xabc, flags: 0o2 } },
  { label: "READ size 0", opcode: FUSE_READ, args: readIn(3, 0, 0, 0, 0, 0), want: { size: 0 } },
  { label: "WRITE", opcode: FUSE_WRITE, args: cat(u64(4), u64(4096), u32(100), u32(1), u64(8), u32(0o1), u32(0), writeData),
    want: { fh: 4, offset: 4096, size: 100, writeFlags: 1, lockOwner: 8, flags: 0o1, dataLen: 100 }, data: writeData },
  { label: "STATFS", opcode: FUSE_STATFS, args: zeros(0), want: { known: true } },
  { label: "RELEASE", opcode: FUSE_RELEASE, args: releaseIn(6, 0o2, 1, 9), want: { fh: 6, flags: 0o2, releaseFlags: 1, lockOwner: 9 } },
  { label: "FSYNC", opcode: FUSE_FSYNC, args: cat(u64(6), u32(1), u32(0)), want: { fh: 6, fsyncFlags: 1 } },
  { label: "FLUSH", opcode: FUSE_FLUSH, args: cat(u64(6), u32(0), u32(0), u64(0x55)), want: { fh: 6, lockOwner: 0x55 } },
  { label: "OPENDIR", opcode: FUSE_OPENDIR, args: cat(u32(0o200000), u32(0)), want: { flags: 0o200000 } },
  { label: "READDIR", opcode: FUSE_READDIR, args: readIn(8, 3, 4096, 0, 0, 0), want: { fh: 8, offset: 3, size: 4096 } },
  { label: "READDIRPLUS", opcode: FUSE_READDIRPLUS, args: readIn(8, 0, 8192, 0, 0, 0), want: { fh: 8, size: 8192 } },
  { label: "RELEASEDIR", opcode: FUSE_RELEASEDIR, args: releaseIn(8, 0, 0, 0), want: { fh: 8 } },
  { label: "FSYNCDIR", opcode: FUSE_FSYNCDIR, args: cat(u64(8), u32(0), u32(0)), want: { fh: 8, fsyncFlags: 0 } },
  { label: "ACCESS", opcode: FUSE_ACCESS, args: cat(u32(4), u32(0)), want: { mask: 4 } },
  { label: "GETXATTR", opcode: FUSE_GETXATTR, args: cat(u32(0), u32(0), cstr("user.a")), want: { size: 0, name: "user.a" } },
  { label: "SETXATTR (8-byte fuse_setxattr_in)", opcode: FUSE_SETXATTR, args: cat(u32(3), u32(1), cstr("user.x"), utf8("abc")),
    want: { size: 3, flags: 1, setxattrFlags: 0, name: "user.x", dataLen: 3 }, data: utf8("abc") },
  { label: "SETXATTR with SETXATTR_EXT", opcode: FUSE_SETXATTR, conn: extConn,
    args: cat(u32(2), u32(2), u32(1), u32(0), cstr("system.posix_acl_access"), utf8("zz")),
    want: { size: 2, flags: 2, setxattrFlags: 1, name: "system.posix_acl_access", dataLen: 2 }, data: utf8("zz") },
  { label: "LISTXATTR", opcode: FUSE_LISTXATTR, args: cat(u32(4096), u32(0)), want: { size: 4096 } },
  { label: "REMOVEXATTR (xattr names may hold '/')", opcode: FUSE_REMOVEXATTR, args: cstr("user.a/b"), want: { name: "user.a/b" } },
  { label: "LSEEK", opcode: FUSE_LSEEK, args: cat(u64(2), u64(100), u32(3), u32(0)), want: { fh: 2, offset: 100, whence: 3 } },
  { label: "FALLOCATE", opcode: FUSE_FALLOCATE, args: cat(u64(2), u64(10), u64(20), u32(1), u32(0)),
    want: { fh: 2, offset: 10, length: 20, mode: 1 } },
  { label: "COPY_FILE_RANGE", opcode: FUSE_COPY_FILE_RANGE, args: cat(u64(1), u64(2), u64(3), u64(4), u64(5), u64(6), u64(0)),
    want: { fh: 1, offset: 2, nodeidOut: 3, fhOut: 4, offsetOut: 5, length: 6, flags: 0 } },
  { label: "SYNCFS", opcode: FUSE_SYNCFS, args: u64(0), want: { known: true } },
  { label: "INTERRUPT", opcode: FUSE_INTERRUPT, args: u64(0x1234), want: { interruptUnique: 0x1234, noReply: true } },
  { label: "GETLK", opcode: FUSE_GETLK, args: cat(u64(5), u64(6), u64(0), u64(99), u32(1), u32(321), u32(0), u32(0)),
    want: { fh: 5, lockOwner: 6, lkStart: 0, lkEnd: 99, lkType: 1, lkPid: 321, lkFlags: 0 } },
  { label: "SETLKW", opcode: FUSE_SETLKW, args: cat(u64(5), u64(6), u64(1), u64(2), u32(2), u32(3), u32(1), u32(0)),
    want: { lkStart: 1, lkEnd: 2, lkType: 2, lkFlags: 1 } },
  { label: "SETUPMAPPING", opcode: FUSE_SETUPMAPPING, args: cat(u64(1), u64(2 ** 21), u64(2 ** 21), u64(3), u64(2 ** 30)),
    want: { fh: 1, offset: 2 ** 21, length: 2 ** 21, flags: 3, moffset: 2 ** 30 } },
  { label: "REMOVEMAPPING", opcode: FUSE_REMOVEMAPPING, args: cat(u32(1), u64(2 ** 30), u64(2 ** 21)), want: { count: 1, dataLen: 16 } },
];

describe("FuseRequest.decode()", () => {
  for (const c of CASES) {
    for (const split of [0, 7]) {
      test(`decodes ${c.label}${split ? " split into 7-byte pieces" : ""}`, () => {
        const { req, err, r } = decode(request(c.opcode, c.args, { unique: 0x5566, uid: 1000, gid: 100, pid: 4242 }), c.conn?.(), split);
        expect(err).toBe(0);
        expect(req.known).toBe(true);
        expect(req.opcode).toBe(c.opcode);
        expect(req.unique).toBe(0x5566);
        expect(req.pid).toBe(4242);
        const got: Record<string, unknown> = {};
        for (const k of Object.keys(c.want)) got[k] = (req as unknown as Record<string, unknown>)[k];
        expect(got).toEqual(c.want);
        if (c.data) {
          // The reader stands at the payload, which is exactly the rest.
          expect(r.remaining).toBe(c.data.length);
          const d = new Uint8Array(req.dataLen);
          r.copyTo(d);
          expect(Array.from(d)).toEqual(Array.from(c.data));
        }
      });
    }
  }

  test("keeps nameBytes, a NUL-terminated nameBuf, and fields of the previous request cleared", () => {
    const conn = new FuseConn(), req = new FuseRequest(conn);
    expect(req.decode(reader(request(FUSE_RENAME2, cat(u64(1), u32(1), u32(0), cstr("x"), cstr("yy")))))).toBe(0);
    expect(req.decode(reader(request(FUSE_LOOKUP, cstr("abc"))))).toBe(0);
    expect(Array.from(req.nameBytes)).toEqual([0x61, 0x62, 0x63]);
    expect(req.nameBuf[3]).toBe(0);
    expect([req.newdir, req.flags, req.name2Len, req.name2]).toEqual([0, 0, 0, ""]);
  });

  test("reads u64 header fields and signed SETATTR times exactly below 2^53", () => {
    const { req } = decode(request(FUSE_GETATTR, cat(u32(0), u32(0), u64(0)), { unique: 2n ** 52n + 2n, nodeid: 2n ** 40n + 1n }));
    expect(req.unique).toBe(2 ** 52 + 2);
    expect(req.nodeid).toBe(2 ** 40 + 1);
  });

  test("reports . and .. through isDot and isDot2 and leaves the decision to the caller", () => {
    expect(decode(request(FUSE_LOOKUP, cstr("."))).req.isDot).toBe(true);
    expect(decode(request(FUSE_LOOKUP, cstr(".."))).req.isDot).toBe(true);
    expect(decode(request(FUSE_LOOKUP, cstr("..."))).req.isDot).toBe(false);
    const { req, err } = decode(request(FUSE_RENAME, cat(u64(1), cstr("a"), cstr(".."))));
    expect([err, req.isDot, req.isDot2]).toEqual([0, false, true]);
  });

  test("decodes names as UTF-8 and escapes other bytes (surrogateescape)", () => {
    const raw = new Uint8Array([0x63, 0x61, 0x66, 0xc3, 0xa9, 0xff, 0xe2, 0x82]);
    const { req, err } = decode(request(FUSE_LOOKUP, cstr(raw)));
    expect(err).toBe(0);
    expect(req.name).toBe("café\udcff\udce2\udc82");
    expect(req.nameBytes).toEqual(raw);
  });

  test("accepts a 255-byte name and a 4095-byte symlink target", () => {
    expect(decode(request(FUSE_LOOKUP, cstr(fill(255, 0x61)))).req.nameLen).toBe(255);
    const { req, err } = decode(request(FUSE_SYMLINK, cat(cstr("l"), cstr(fill(4095, 0x2f)))));
    expect([err, req.name2Len]).toEqual([0, 4095]);
  });

  test("uses the struct sizes of the negotiated minor (MKNOD and CREATE before 7.12, WRITE before 7.9)", () => {
    const old = new FuseConn();
    old.minor = 8;
    const mk = decode(request(FUSE_MKNOD, cat(u32(0o020600), u32(0x0103), cstr("tty"))), old);
    expect([mk.err, mk.req.mode, mk.req.rdev, mk.req.umask, mk.req.name]).toEqual([0, 0o020600, 0x0103, 0, "tty"]);
    const cr = decode(request(FUSE_CREATE, cat(u32(1), u32(0o100600), cstr("f"))), old);
    expect([cr.err, cr.req.flags, cr.req.mode, cr.req.name]).toEqual([0, 1, 0o100600, "f"]);
    const wr = decode(request(FUSE_WRITE, cat(u64(1), u64(2), u32(3), u32(0), utf8("abc"))), old);
    expect([wr.err, wr.req.size, wr.req.dataLen]).toEqual([0, 3, 3]);
    const ga = decode(request(FUSE_GETATTR, zeros(0)), old);
    expect(ga.err).toBe(0);
  });

  test("skips extensions (total_extlen) at the end of the arguments", () => {
    const { req, err } = decode(request(FUSE_MKDIR, cat(u32(0o755), u32(0), cstr("d"), fill(16, 0x5a)), { extlen: 2 }));
    expect([err, req.name, req.totalExtlen]).toEqual([0, "d", 2]);
  });

  test("leaves unknown opcodes to the caller with known = false", () => {
    for (const op of [FUSE_IOCTL, 7, 52, 4096, 0xffffffff]) {
      const { req, err } = decode(request(op, fill(9, 1)));
      expect([err, req.known, req.unique]).toEqual([0, false, 0x1234]);
      expect(fuseOpcodeName(op)).toBe(op === 4096 ? "CUSE_INIT" : op === FUSE_IOCTL ? "IOCTL" : "UNKNOWN");
    }
    expect(fuseOpcodeName(FUSE_COPY_FILE_RANGE)).toBe("COPY_FILE_RANGE");
  });
});

describe("FuseRequest.decode() on hostile requests", () => {
  const lookup = request(FUSE_LOOKUP, cstr("x"));

  test("refuses a header shorter than 40 bytes", () => {
    expect(decode(lookup.subarray(0, 39)).err).toBe(-EINVAL);
    expect(decode(new Uint8Array(0)).err).toBe(-EINVAL);
  });

  test("refuses a len that disagrees with the readable length, either way, but keeps unique for the reply", () => {
    for (const d of [1, -1, 2 ** 31, -40]) {
      const { req, err } = decode(request(FUSE_LOOKUP, cstr("x"), { lenDelta: d }));
      expect(err).toBe(-EINVAL);
      expect(req.unique).toBe(0x1234);
    }
  });

  test("refuses extensions longer than the arguments", () => {
    expect(decode(request(FUSE_LOOKUP, cstr("abcdefg"), { extlen: 2 })).err).toBe(-EINVAL);
    expect(decode(request(FUSE_LOOKUP, cstr("abcdefg"), { extlen: 0xffff })).err).toBe(-EINVAL);
  });

  // Every proper prefix of every well-formed argument block, with len telling the truth about it.
  for (const c of CASES) {
    if (c.args.length === 0) continue;
    test(`refuses every truncation of ${c.label}`, () => {
      for (let k = 0; k < c.args.length; k++) {
        const { err } = decode(request(c.opcode, c.args.subarray(0, k)), c.conn?.());
        if (err >= 0) throw new Error(`${c.label}: ${k} of ${c.args.length} argument bytes decoded`);
        expect([-EINVAL, -ENAMETOOLONG, -ERANGE]).toContain(err);
      }
    });
  }

  test("refuses a name without its NUL", () => {
    expect(decode(request(FUSE_LOOKUP, utf8("abc"))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_MKDIR, cat(u32(0), u32(0), utf8("abc")))).err).toBe(-EINVAL);
  });

  test("refuses a name holding '/', an empty name and a name of 256 bytes", () => {
    expect(decode(request(FUSE_LOOKUP, cstr("a/b"))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_LOOKUP, cstr("/"))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_CREATE, cat(zeros(16), cstr("../x")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_LOOKUP, cstr(""))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_LOOKUP, cstr(fill(256, 0x61)))).err).toBe(-ENAMETOOLONG);
    // No NUL at all within a long request: too long, found after 256 bytes, not by scanning it all.
    expect(decode(request(FUSE_LOOKUP, fill(100_000, 0x61))).err).toBe(-ENAMETOOLONG);
    expect(decode(request(FUSE_RENAME, cat(u64(1), cstr("a"), cstr("b/c")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_RENAME, cat(u64(1), cstr("a"), cstr(fill(256, 0x62))))).err).toBe(-ENAMETOOLONG);
  });

  test("refuses RENAME, RENAME2 and SYMLINK without their second name", () => {
    expect(decode(request(FUSE_RENAME, cat(u64(1), cstr("old")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_RENAME2, cat(u64(1), u32(0), u32(0), cstr("old")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_RENAME, cat(u64(1), cstr("old"), cstr("")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SYMLINK, cstr("l"))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SYMLINK, cat(cstr("l"), cstr("")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SYMLINK, cat(cstr("l"), cstr(fill(4096, 0x61))))).err).toBe(-ENAMETOOLONG);
  });

  test("refuses a BATCH_FORGET or REMOVEMAPPING count other than the entries that follow", () => {
    const one = cat(u64(5), u64(1));
    expect(decode(request(FUSE_BATCH_FORGET, cat(u32(2), u32(0), one))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_BATCH_FORGET, cat(u32(0xffffffff), u32(0), one))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_BATCH_FORGET, cat(u32(0), u32(0), one))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_BATCH_FORGET, cat(u32(1), u32(0), one))).err).toBe(0);
    expect(decode(request(FUSE_REMOVEMAPPING, cat(u32(2), one))).err).toBe(-EINVAL);
  });

  test("refuses a SETXATTR or WRITE size other than the bytes that follow, and xattr values over 64 KiB", () => {
    expect(decode(request(FUSE_SETXATTR, cat(u32(4), u32(0), cstr("user.a"), utf8("abc")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SETXATTR, cat(u32(0xffffffff), u32(0), cstr("user.a"), utf8("abc")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SETXATTR, cat(u32(2), u32(0), cstr("user.a"), utf8("abc")))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_SETXATTR, cat(u32(65537), u32(0), cstr("user.a"), zeros(65537)))).err).toBe(-E2BIG);
    expect(decode(request(FUSE_SETXATTR, cat(u32(65536), u32(0), cstr("user.a"), zeros(65536)))).err).toBe(0);
    const w = (size: number, data: number) => request(FUSE_WRITE, cat(u64(1), u64(0), u32(size), u32(0), u64(0), u32(0), u32(0), zeros(data)));
    expect(decode(w(10, 9)).err).toBe(-EINVAL);
    expect(decode(w(9, 10)).err).toBe(-EINVAL);
    expect(decode(w(0, 0)).err).toBe(0);
  });

  test("refuses SETXATTR's 16-byte struct read as 8 bytes when SETXATTR_EXT was not agreed", () => {
    // Without the flag, setxattr_flags + padding become the start of the name: "\x01" then NULs → EINVAL or ERANGE.
    const args = cat(u32(2), u32(0), u32(1), u32(0), cstr("user.a"), utf8("zz"));
    expect(decode(request(FUSE_SETXATTR, args)).err).toBeLessThan(0);
    expect(decode(request(FUSE_SETXATTR, args), extConn()).err).toBe(0);
  });

  test("refuses an empty or 256-byte xattr name with ERANGE", () => {
    expect(decode(request(FUSE_GETXATTR, cat(u32(0), u32(0), cstr("")))).err).toBe(-ERANGE);
    expect(decode(request(FUSE_REMOVEXATTR, cstr(fill(256, 0x61)))).err).toBe(-ERANGE);
    expect(decode(request(FUSE_REMOVEXATTR, cstr(fill(255, 0x61)))).err).toBe(0);
  });

  test("refuses an INIT shorter than the kernel's own minor says", () => {
    expect(decode(request(FUSE_INIT, cat(u32(7), u32(38), u32(0), u32(0)))).err).toBe(-EINVAL);
    expect(decode(request(FUSE_INIT, cat(u32(7), u32(31), u32(0)))).err).toBe(-EINVAL);
    // A newer major: only major and minor count.
    const { req, err } = decode(request(FUSE_INIT, cat(u32(8), u32(0))));
    expect([err, req.major]).toEqual([0, 8]);
  });

  test("never throws on seeded mutations of every request, and what it accepts is in bounds", () => {
    const next = rng(0xf05e);
    const conn = new FuseConn(), req = new FuseRequest(conn);
    for (let i = 0; i < 20_000; i++) {
      const c = CASES[next() % CASES.length]!;
      const b = request(c.opcode, c.args, { lenDelta: next() % 16 === 0 ? (next() % 9) - 4 : 0 });
      const flips = 1 + (next() % 4);
      for (let f = 0; f < flips; f++) b[next() % b.length] = next() & 0xff;
      const cut = next() % 8 === 0 ? next() % b.length : b.length;
      const r = reader(b.subarray(0, cut), 1 + (next() % 13));
      const err = req.decode(r);
      if (err !== 0) {
        expect(err).toBeLessThan(0);
        continue;
      }
      expect(req.len).toBe(cut);
      expect(req.nameLen).toBeLessThanOrEqual(255);
      expect(req.name2Len).toBeLessThanOrEqual(4095);
      if (req.dataLen > 0) expect(r.remaining).toBeGreaterThanOrEqual(req.dataLen);
    }
  });
});

describe("FuseConn.negotiate()", () => {
  const init = (major: number, minor: number, flags = 0, flags2 = 0) => {
    const d = decode(request(FUSE_INIT, minor >= 36 || major !== 7 ? initIn(major, minor, 65536, flags, flags2)
      : cat(u32(major), u32(minor), u32(65536), u32(flags))));
    expect(d.err).toBe(0);
    return d.req;
  };

  test("speaks the smaller minor and agrees on the flags both sides want", () => {
    const conn = new FuseConn();
    expect(conn.negotiate(init(7, 37, FUSE_ASYNC_READ | FUSE_DO_READDIRPLUS), FUSE_ASYNC_READ | FUSE_MAX_PAGES)).toBe(37);
    expect([conn.minor, conn.flags, conn.flags2, conn.initialized]).toEqual([37, FUSE_ASYNC_READ, 0, true]);
    expect(new FuseConn().negotiate(init(7, 41))).toBe(FUSE_KERNEL_MINOR_VERSION);
    expect(new FuseConn().negotiate(init(7, 31))).toBe(31);
  });

  test("agrees on flags2 only when the kernel sent FUSE_INIT_EXT, and then replies with it", () => {
    const conn = new FuseConn();
    const ctx = FUSE_SECURITY_CTX / 2 ** 32;
    conn.negotiate(init(7, 38, FUSE_INIT_EXT | FUSE_SETXATTR_EXT, ctx), FUSE_SETXATTR_EXT | FUSE_INIT_EXT, ctx);
    expect([conn.flags, conn.flags2, conn.setxattrExt]).toEqual([FUSE_INIT_EXT | FUSE_SETXATTR_EXT, ctx, true]);
    const c2 = new FuseConn();
    c2.negotiate(init(7, 38, FUSE_SETXATTR_EXT, ctx), FUSE_SETXATTR_EXT, ctx);
    expect([c2.flags, c2.flags2]).toEqual([FUSE_SETXATTR_EXT, 0]);
  });

  test("refuses kernels older than 7.31 with EPROTO and asks a newer major to retry", () => {
    expect(new FuseConn().negotiate(init(7, 30))).toBe(-EPROTO);
    expect(new FuseConn().negotiate(init(6, 40))).toBe(-EPROTO);
    const conn = new FuseConn();
    expect(conn.negotiate(init(8, 0))).toBe(0);
    expect(conn.initialized).toBe(false);
  });
});

// ---- replies, parsed back with fuse.h's offsets ----

function outHeader(b: Uint8Array): { len: number; error: number; unique: bigint } {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  return { len: dv.getUint32(0, true), error: dv.getInt32(4, true), unique: dv.getBigUint64(8, true) };
}
const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.length);

function sampleAttr(): FuseAttr {
  const a = new FuseAttr();
  Object.assign(a, {
    ino: 2 ** 40 + 3, size: 12345, blocks: 32, atime: -2, mtime: 1_700_000_000, ctime: 1_700_000_001,
    atimensec: 1, mtimensec: 2, ctimensec: 3, mode: 0o100644, nlink: 2, uid: 501, gid: 20, rdev: 0, blksize: 4096, flags: 1,
  });
  return a;
}
function checkAttr(dv: DataView, o: number): void {
  expect(dv.getBigUint64(o, true)).toBe(2n ** 40n + 3n);
  expect(dv.getBigUint64(o + 8, true)).toBe(12345n);
  expect(dv.getBigUint64(o + 16, true)).toBe(32n);
  expect(dv.getBigInt64(o + 24, true)).toBe(-2n);
  expect(dv.getBigInt64(o + 32, true)).toBe(1_700_000_000n);
  expect(dv.getBigInt64(o + 40, true)).toBe(1_700_000_001n);
  const u = [48, 52, 56, 60, 64, 68, 72, 76, 80, 84].map((k) => dv.getUint32(o + k, true));
  expect(u).toEqual([1, 2, 3, 0o100644, 2, 501, 20, 0, 4096, 1]);
}
function sampleEntry(): FuseEntryOut {
  const e = new FuseEntryOut();
  e.nodeid = 77;
  e.generation = 3;
  e.entryTimeout = 1.5;
  e.attrTimeout = 2;
  Object.assign(e.attr, sampleAttr());
  return e;
}
function checkEntry(dv: DataView, o: number): void {
  expect(dv.getBigUint64(o, true)).toBe(77n);
  expect(dv.getBigUint64(o + 8, true)).toBe(3n);
  expect(dv.getBigUint64(o + 16, true)).toBe(1n);
  expect(dv.getBigUint64(o + 24, true)).toBe(2n);
  expect(dv.getUint32(o + 32, true)).toBe(500_000_000);
  expect(dv.getUint32(o + 36, true)).toBe(0);
  checkAttr(dv, o + 40);
}

interface ReplyCase { label: string; size: number; write: (w: ChainWriter) => boolean; check: (body: DataView) => void }
const conn38 = () => {
  const c = new FuseConn();
  c.negotiate(decode(request(FUSE_INIT, initIn(7, 38, 65536, FUSE_ASYNC_READ | FUSE_MAX_PAGES | FUSE_INIT_EXT, 0))).req,
    FUSE_ASYNC_READ | FUSE_MAX_PAGES);
  return c;
};
const st = Object.assign(new FuseStatfs(), { blocks: 1000, bfree: 500, bavail: 400, files: 100, ffree: 50, bsize: 4096, namelen: 255, frsize: 4096 });

const REPLIES: ReplyCase[] = [
  { label: "replyEmpty()", size: 0, write: (w) => replyEmpty(w, 9), check: () => {} },
  { label: "replyAttr() (fuse_attr_out)", size: 104, write: (w) => replyAttr(w, 9, sampleAttr(), 0.25), check: (dv) => {
    expect(dv.getBigUint64(0, true)).toBe(0n);
    expect(dv.getUint32(8, true)).toBe(250_000_000);
    expect(dv.getUint32(12, true)).toBe(0);
    checkAttr(dv, 16);
  } },
  { label: "replyEntry() (fuse_entry_out)", size: 128, write: (w) => replyEntry(w, 9, sampleEntry()), check: (dv) => checkEntry(dv, 0) },
  { label: "replyOpen() (fuse_open_out)", size: 16, write: (w) => replyOpen(w, 9, 2 ** 35, FOPEN_KEEP_CACHE), check: (dv) => {
    expect(dv.getBigUint64(0, true)).toBe(2n ** 35n);
    expect([dv.getUint32(8, true), dv.getUint32(12, true)]).toEqual([FOPEN_KEEP_CACHE, 0]);
  } },
  { label: "replyCreate() (fuse_entry_out + fuse_open_out)", size: 144, write: (w) => replyCreate(w, 9, sampleEntry(), 5, 1), check: (dv) => {
    checkEntry(dv, 0);
    expect([Number(dv.getBigUint64(128, true)), dv.getUint32(136, true)]).toEqual([5, 1]);
  } },
  { label: "replyInit() (fuse_init_out)", size: 64,
    write: (w) => replyInit(w, 9, conn38(), { maxReadahead: 1 << 20, maxWrite: 1 << 20, maxPages: 256, maxBackground: 64,
      congestionThreshold: 48, timeGran: 1, mapAlignment: 12 }), check: (dv) => {
      const u = [0, 4, 8, 12, 20, 24, 32].map((o) => dv.getUint32(o, true));
      expect(u).toEqual([7, 38, 65536, FUSE_ASYNC_READ | FUSE_MAX_PAGES, 1 << 20, 1, 0]);
      expect([16, 18, 28, 30].map((o) => dv.getUint16(o, true))).toEqual([64, 48, 256, 12]);
      for (let o = 36; o < 64; o += 4) expect(dv.getUint32(o, true)).toBe(0);
    } },
  { label: "replyInitVersion() (major and minor only)", size: 8, write: (w) => replyInitVersion(w, 9), check: (dv) => {
    expect([dv.getUint32(0, true), dv.getUint32(4, true)]).toEqual([7, FUSE_KERNEL_MINOR_VERSION]);
  } },
  { label: "replyStatfs() (fuse_statfs_out)", size: 80, write: (w) => replyStatfs(w, 9, st), check: (dv) => {
    expect([0, 8, 16, 24, 32].map((o) => Number(dv.getBigUint64(o, true)))).toEqual([1000, 500, 400, 100, 50]);
    expect([40, 44, 48].map((o) => dv.getUint32(o, true))).toEqual([4096, 255, 4096]);
    for (let o = 52; o < 80; o += 4) expect(dv.getUint32(o, true)).toBe(0);
  } },
  { label: "replyWrite() (fuse_write_out)", size: 8, write: (w) => replyWrite(w, 9, 4096), check: (dv) => {
    expect([dv.getUint32(0, true), dv.getUint32(4, true)]).toEqual([4096, 0]);
  } },
  { label: "replyLseek() (fuse_lseek_out)", size: 8, write: (w) => replyLseek(w, 9, 2 ** 45), check: (dv) => {
    expect(dv.getBigUint64(0, true)).toBe(2n ** 45n);
  } },
  { label: "replyXattrSize() (fuse_getxattr_out)", size: 8, write: (w) => replyXattrSize(w, 9, 300), check: (dv) => {
    expect([dv.getUint32(0, true), dv.getUint32(4, true)]).toEqual([300, 0]);
  } },
  { label: "replyLock() (fuse_lk_out)", size: 24, write: (w) => replyLock(w, 9, { start: 1, end: 2 ** 40, type: 1, pid: 77 }), check: (dv) => {
    expect([dv.getBigUint64(0, true), dv.getBigUint64(8, true)]).toEqual([1n, 2n ** 40n]);
    expect([dv.getUint32(16, true), dv.getUint32(20, true)]).toEqual([1, 77]);
  } },
  { label: "replyBytes() (readlink target, no NUL)", size: 5, write: (w) => replyBytes(w, 9, utf8("xtargetx"), 1, 6), check: (dv) => {
    expect(new TextDecoder().decode(new Uint8Array(dv.buffer, dv.byteOffset, 5))).toBe("targe");
  } },
  { label: "replyString()", size: 7, write: (w) => replyString(w, 9, "../é/\udcff"), check: (dv) => {
    expect(Array.from(new Uint8Array(dv.buffer, dv.byteOffset, 7))).toEqual([0x2e, 0x2e, 0x2f, 0xc3, 0xa9, 0x2f, 0xff]);
  } },
];

describe("reply writers", () => {
  for (const c of REPLIES) {
    test(`${c.label} writes a ${16 + c.size}-byte reply whose header len is the total`, () => {
      const o = writer(16 + c.size + 32);
      expect(c.write(o.w)).toBe(true);
      expect(o.w.pos).toBe(16 + c.size);
      const b = o.bytes();
      expect(outHeader(b)).toEqual({ len: 16 + c.size, error: 0, unique: 9n });
      c.check(view(b.subarray(16)));
      expect(o.all()[16 + c.size]).toBe(0xaa);
    });

    test(`${c.label} writes nothing when one byte short, and fits exactly, across pieces`, () => {
      const short = writer(16 + c.size - 1);
      expect(c.write(short.w)).toBe(false);
      expect(short.w.pos).toBe(0);
      expect(short.all().every((x) => x === 0xaa)).toBe(true);
      const a = Math.min(5, 16 + c.size), split = writer(a, 16 + c.size - a || 1);
      expect(c.write(split.w)).toBe(true);
      expect(outHeader(split.bytes()).len).toBe(16 + c.size);
    });
  }

  test("replyString() sends UTF-8 with escaped bytes restored", () => {
    const o = writer(64);
    expect(replyString(o.w, 1, "../é/\udcff")).toBe(true);
    expect(Array.from(o.bytes().subarray(16))).toEqual([0x2e, 0x2e, 0x2f, 0xc3, 0xa9, 0x2f, 0xff]);
    expect(replyString(writer(64).w, 1, "\ud800")).toBe(false);
  });

  test("replyError() sends the negated errno in a 16-byte reply, whichever sign it gets", () => {
    for (const [e, want] of [[ENOENT, -ENOENT], [-ENOENT, -ENOENT], [0, -EIO], [4096, -EIO], [NaN, -EIO]] as const) {
      const o = writer(40);
      expect(replyError(o.w, 0x77, e)).toBe(true);
      expect(outHeader(o.bytes())).toEqual({ len: 16, error: want, unique: 0x77n });
    }
    expect(replyError(writer(15).w, 1, ENOENT)).toBe(false);
  });

  test("writes a u64 unique and negative times in two's complement", () => {
    const o = writer(16);
    replyEmpty(o.w, 2 ** 53 - 2);
    expect(outHeader(o.bytes()).unique).toBe(2n ** 53n - 2n);
  });

  test("beginReply() and endReply() frame a READ payload, with the header split over pieces", () => {
    const o = writer(5, 7, 4, 100);
    const at = beginReply(o.w, 0xabc);
    expect(at).toBe(0);
    o.w.copyFrom(fill(30, 0x11));
    expect(endReply(o.w, at)).toBe(true);
    expect(o.w.pos).toBe(46);
    expect(outHeader(o.bytes())).toEqual({ len: 46, error: 0, unique: 0xabcn });
    expect(o.bytes().subarray(16).every((x) => x === 0x11)).toBe(true);
  });

  test("beginReply() with nothing written after it is a header-only reply (READ at end of file)", () => {
    const o = writer(16);
    const at = beginReply(o.w, 3);
    expect(endReply(o.w, at)).toBe(true);
    expect(outHeader(o.bytes())).toEqual({ len: 16, error: 0, unique: 3n });
  });

  test("abortReply() turns a begun reply into an error and drops its payload from the used length", () => {
    const o = writer(8, 200);
    const at = beginReply(o.w, 4);
    o.w.copyFrom(fill(50, 1));
    expect(abortReply(o.w, at, -EIO)).toBe(true);
    expect(o.w.pos).toBe(16);
    expect(outHeader(o.bytes())).toEqual({ len: 16, error: -EIO, unique: 4n });
  });

  test("beginReply() refuses a writable part under 16 bytes and endReply() refuses a bad start", () => {
    const o = writer(15);
    expect(beginReply(o.w, 1)).toBe(-1);
    expect(o.w.pos).toBe(0);
    expect(endReply(o.w, -1)).toBe(false);
    expect(abortReply(o.w, -1, EIO)).toBe(false);
  });

  test("replyInit() never offers more readahead than the kernel asked for, and clamps u16 fields", () => {
    const o = writer(80);
    replyInit(o.w, 1, conn38(), { maxPages: 1 << 20, maxBackground: -5 });
    const dv = view(o.bytes().subarray(16));
    expect(dv.getUint32(8, true)).toBe(65536);
    expect([dv.getUint16(28, true), dv.getUint16(16, true)]).toEqual([0xffff, 0]);
    expect(dv.getUint32(20, true)).toBe(128 * 1024);
  });
});

// ---- directories ----

interface Dirent { ino: bigint; off: bigint; namelen: number; type: number; name: Uint8Array; rec: number; entry?: DataView }
function parseDirents(body: Uint8Array, plus: boolean): Dirent[] {
  const out: Dirent[] = [], dv = view(body);
  for (let o = 0; o < body.length;) {
    const d = plus ? o + 128 : o;
    const namelen = dv.getUint32(d + 16, true);
    const rec = ((plus ? 152 : 24) + namelen + 7) & ~7;
    out.push({
      ino: dv.getBigUint64(d, true), off: dv.getBigUint64(d + 8, true), namelen, type: dv.getUint32(d + 20, true),
      name: body.slice(d + 24, d + 24 + namelen), rec, entry: plus ? view(body.subarray(o, o + 128)) : undefined,
    });
    for (let p = d + 24 + namelen; p < o + rec; p++) expect(body[p]).toBe(0); // padding
    o += rec;
  }
  return out;
}

describe("DirentPacker", () => {
  const names = ["a", "bb", "file.txt", "exactly8", "sixteen-byte-nam", "é"];

  test("packs fuse_dirent records padded to 8 and stops at the first that does not fit", () => {
    const sizes = names.map((n) => direntSize(utf8(n).length));
    expect(sizes.slice(0, 4)).toEqual([32, 32, 32, 32]);
    expect(direntSize(9)).toBe(40);
    const fit = 4, size = sizes.slice(0, fit).reduce((a, b) => a + b, 0);
    const o = writer(16 + 4096);
    const dp = new DirentPacker();
    expect(dp.begin(o.w, 0x42, size)).toBe(true);
    let n = 0;
    for (const [i, name] of names.entries()) {
      if (!dp.add(name, 100 + i, i + 1, direntType(0o100644))) break;
      n++;
    }
    expect(n).toBe(fit);
    expect(dp.count).toBe(fit);
    expect(dp.end()).toBe(true);
    const b = o.bytes();
    expect(outHeader(b)).toEqual({ len: 16 + size, error: 0, unique: 0x42n });
    const ds = parseDirents(b.subarray(16), false);
    expect(ds.map((d) => new TextDecoder().decode(d.name))).toEqual(names.slice(0, fit));
    expect(ds.map((d) => [Number(d.ino), Number(d.off), d.type])).toEqual([[100, 1, 8], [101, 2, 8], [102, 3, 8], [103, 4, 8]]);
  });

  test("is bounded by the writable room as well as by the requested size", () => {
    const o = writer(16 + 70);
    const dp = new DirentPacker();
    dp.begin(o.w, 1, 4096);
    expect(dp.add("a", 1, 1, 4)).toBe(true);
    expect(dp.add("b", 2, 2, 4)).toBe(true);
    expect(dp.add("c", 3, 3, 4)).toBe(false);
    dp.end();
    expect(outHeader(o.bytes()).len).toBe(16 + 64);
  });

  test("an empty listing is a header-only reply (end of directory)", () => {
    const o = writer(64);
    const dp = new DirentPacker();
    dp.begin(o.w, 5, 0);
    expect(dp.add("x", 1, 1, 8)).toBe(false);
    dp.end();
    expect(outHeader(o.bytes()).len).toBe(16);
  });

  test("packs fuse_direntplus records: entry_out, then the dirent, ino and type from the attributes", () => {
    expect(direntPlusSize(1)).toBe(160);
    const e = sampleEntry();
    const size = direntPlusSize(1) + direntPlusSize(9);
    const o = writer(7, 16 + size - 7);
    const dp = new DirentPacker();
    dp.begin(o.w, 6, size);
    expect(dp.addPlus(".", e, 1)).toBe(true);
    expect(dp.addPlus("file.txt!", e, 2)).toBe(true);
    expect(dp.addPlus("z", e, 3)).toBe(false);
    dp.end();
    const b = o.bytes();
    expect(outHeader(b).len).toBe(16 + size);
    const ds = parseDirents(b.subarray(16), true);
    expect(ds.length).toBe(2);
    checkEntry(ds[1]!.entry!, 0);
    expect([ds[1]!.ino, ds[1]!.off, ds[1]!.type, ds[1]!.namelen]).toEqual([2n ** 40n + 3n, 2n, 8, 9]);
  });

  test("skips names the kernel would refuse and keeps going", () => {
    const o = writer(1024);
    const dp = new DirentPacker();
    dp.begin(o.w, 1, 1000);
    for (const bad of ["", "a/b", "x\0y", "n".repeat(256), "\ud800", new Uint8Array(0), new Uint8Array([0x2f])]) {
      expect(dp.add(bad, 1, 1, 8)).toBe(true);
    }
    expect(dp.add("n".repeat(255), 2, 2, 8)).toBe(true);
    expect(dp.add(new Uint8Array([0xff, 0x41]), 3, 3, 8)).toBe(true);
    dp.end();
    expect([dp.count, dp.skipped]).toEqual([2, 7]);
    const ds = parseDirents(o.bytes().subarray(16), false);
    expect(ds.map((d) => d.namelen)).toEqual([255, 2]);
    expect(Array.from(ds[1]!.name)).toEqual([0xff, 0x41]);
  });

  test("refuses to pack when begin() found no room for the header", () => {
    const dp = new DirentPacker();
    expect(dp.begin(writer(10).w, 1, 100)).toBe(false);
    expect(dp.add("a", 1, 1, 8)).toBe(false);
    expect(dp.end()).toBe(false);
  });
});

describe("decodeName() and encodeName()", () => {
  test("round-trip any bytes, and decode valid UTF-8 as TextDecoder does", () => {
    const next = rng(77), buf = new Uint8Array(1024);
    for (let i = 0; i < 2000; i++) {
      const n = next() % 40, b = new Uint8Array(n);
      for (let k = 0; k < n; k++) b[k] = next() % 3 === 0 ? next() & 0x7f : next() & 0xff;
      const s = decodeName(b);
      const m = encodeName(s, buf);
      expect(buf.subarray(0, m)).toEqual(b);
    }
    const s = "plain ascii, café, 日本語, 🦀";
    expect(decodeName(utf8(s))).toBe(s);
  });

  test("decodeName() maps overlongs, surrogates and truncated sequences to escapes", () => {
    expect(decodeName(new Uint8Array([0xc0, 0xaf]))).toBe("\udcc0\udcaf");
    expect(decodeName(new Uint8Array([0xed, 0xa0, 0x80]))).toBe("\udced\udca0\udc80");
    expect(decodeName(new Uint8Array([0xf4, 0x90, 0x80, 0x80]))).toBe("\udcf4\udc90\udc80\udc80");
    expect(decodeName(new Uint8Array([0xe6, 0x97]))).toBe("\udce6\udc97");
    expect(decodeName(new Uint8Array([0xf0, 0x9f, 0xa6, 0x80]))).toBe("🦀");
  });

  test("encodeName() refuses unencodable strings and short room", () => {
    const b = new Uint8Array(3);
    expect(encodeName("\udc41", b)).toBe(-1);
    expect(encodeName("\ud83d", b)).toBe(-1);
    expect(encodeName("日本", b)).toBe(-1);
    expect(encodeName("abcd", b, 0, 2)).toBe(-1);
    expect(encodeName("日", b)).toBe(3);
  });
});

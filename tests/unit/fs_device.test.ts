/**
 * virtio-fs (src/devices/fs.ts) served in this process by serve("fs", ...)
 * and spoken to in FUSE through the test kit's DeviceDriver, as a Linux guest
 * would: queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT:
 * no reply), queue 1 the request queue. Requests are built here from the
 * struct layouts of /usr/include/linux/fuse.h (7.38), independently of
 * src/devices/fs/fuse.ts, and replies parsed by the offsets below.
 *
 * Covered: INIT negotiation; a session on both back-ends (--memory and
 * --shared-dir); hostile requests (framing, truncated arguments, bad names,
 * small or missing writable parts, seeded garbage); --readonly; symlinks
 * that point out of the shared directory; and that FORGET gives back the
 * host fds a lookup took (counted in /proc/self/fd: the server runs here).
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { serve, type Logger, type OptionValues, type Served } from "../../src/index.ts";
import { DeviceDriver, type Chain, type Completion } from "../../src/testing/index.ts";
import { fillRandom, rng } from "../support/random.ts";

// ---- fuse.h (protocol 7.38) and errno numbers, written out here on purpose ----

const OP = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, READLINK: 5, SYMLINK: 6, MKNOD: 8, MKDIR: 9, UNLINK: 10, RMDIR: 11,
  RENAME: 12, LINK: 13, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17, RELEASE: 18, FSYNC: 20, SETXATTR: 21,
  REMOVEXATTR: 24, FLUSH: 25, INIT: 26, OPENDIR: 27, READDIR: 28, RELEASEDIR: 29, ACCESS: 34, CREATE: 35, INTERRUPT: 36,
  BATCH_FORGET: 42, FALLOCATE: 43, RENAME2: 45, COPY_FILE_RANGE: 47,
} as const;
const FUSE_ASYNC_READ = 1 << 0, FUSE_POSIX_LOCKS = 1 << 1, FUSE_ATOMIC_O_TRUNC = 1 << 3, FUSE_EXPORT_SUPPORT = 1 << 4,
  FUSE_BIG_WRITES = 1 << 5, FUSE_DONT_MASK = 1 << 6, FUSE_FLOCK_LOCKS = 1 << 10, FUSE_AUTO_INVAL_DATA = 1 << 12,
  FUSE_DO_READDIRPLUS = 1 << 13, FUSE_READDIRPLUS_AUTO = 1 << 14, FUSE_ASYNC_DIO = 1 << 15, FUSE_WRITEBACK_CACHE = 1 << 16,
  FUSE_PARALLEL_DIROPS = 1 << 18, FUSE_HANDLE_KILLPRIV = 1 << 19, FUSE_POSIX_ACL = 1 << 20, FUSE_ABORT_ERROR = 1 << 21,
  FUSE_MAX_PAGES = 1 << 22, FUSE_CACHE_SYMLINKS = 1 << 23, FUSE_MAP_ALIGNMENT = 1 << 26, FUSE_SUBMOUNTS = 1 << 27,
  FUSE_HANDLE_KILLPRIV_V2 = 1 << 28, FUSE_SETXATTR_EXT = 1 << 29, FUSE_INIT_EXT = 1 << 30;
/** What a 6.x kernel's virtiofs offers in INIT (fs/fuse/inode.c, process_init … fuse_send_init). */
const KERNEL_FLAGS = (FUSE_ASYNC_READ | FUSE_POSIX_LOCKS | FUSE_ATOMIC_O_TRUNC | FUSE_EXPORT_SUPPORT | FUSE_BIG_WRITES |
  FUSE_DONT_MASK | FUSE_FLOCK_LOCKS | FUSE_AUTO_INVAL_DATA | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO | FUSE_ASYNC_DIO |
  FUSE_WRITEBACK_CACHE | FUSE_PARALLEL_DIROPS | FUSE_HANDLE_KILLPRIV | FUSE_POSIX_ACL | FUSE_ABORT_ERROR | FUSE_MAX_PAGES |
  FUSE_CACHE_SYMLINKS | FUSE_MAP_ALIGNMENT | FUSE_SUBMOUNTS | FUSE_HANDLE_KILLPRIV_V2 | FUSE_SETXATTR_EXT | FUSE_INIT_EXT) >>> 0;
/** flags2: FUSE_SECURITY_CTX (bit 32) and FUSE_HAS_INODE_DAX (bit 33). */
const KERNEL_FLAGS2 = 0b11;
const FATTR_MODE = 1 << 0, FATTR_UID = 1 << 1, FATTR_GID = 1 << 2, FATTR_SIZE = 1 << 3, FATTR_ATIME = 1 << 4,
  FATTR_MTIME = 1 << 5;
const EPERM = 1, ENOENT = 2, EIO = 5, EBADF = 9, EACCES = 13, ENOTDIR = 20, EISDIR = 21, EINVAL = 22, EFBIG = 27,
  EROFS = 30, ENAMETOOLONG = 36, ENOSYS = 38, ENOTEMPTY = 39, ELOOP = 40, EPROTO = 71, EOPNOTSUPP = 95;
const S_IFMT = 0o170000, S_IFDIR = 0o040000, S_IFREG = 0o100000, S_IFLNK = 0o120000;
const O_RDONLY = 0, O_WRONLY = 1, O_RDWR = 2, O_CREAT = 0o100, O_TRUNC = 0o1000, O_DIRECTORY = 0o200000;
const ROOT = 1;
/** What an escape through a thrown handler leaves in the server log (vring.ts, chain_io.ts). */
const THROWN = /failed on request|buffers hold \d+/;

// ---- request bytes ----

const EMPTY = new Uint8Array(0);
const enc = new TextEncoder(), dec = new TextDecoder();

function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
function u32(v: number | bigint): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, Number(BigInt.asUintN(32, BigInt(v))), true);
  return b;
}
function u64(v: number | bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, BigInt(v)), true);
  return b;
}
/** A NUL-terminated name. */
const cstr = (s: string | Uint8Array) => cat(typeof s === "string" ? enc.encode(s) : s, Uint8Array.of(0));
const zeros = (n: number) => new Uint8Array(n);

/** fuse_in_header (40 bytes) + args; `len` defaults to the true length. */
function fuseIn(opcode: number, unique: number | bigint, nodeid: number | bigint, args: Uint8Array, len = 40 + args.length): Uint8Array {
  // len, opcode, unique, nodeid, uid, gid, pid, total_extlen (u16) + padding (u16)
  return cat(u32(len), u32(opcode), u64(unique), u64(nodeid), u32(0), u32(0), u32(4242), u32(0), args);
}

/** fuse_init_in: 64 bytes from 7.36 (flags2 and reserved words), 16 before. */
function initIn(major: number, minor: number, flags = KERNEL_FLAGS, flags2 = KERNEL_FLAGS2, maxReadahead = 131072): Uint8Array {
  const head = cat(u32(major), u32(minor), u32(maxReadahead), u32(flags));
  return minor >= 36 ? cat(head, u32(flags2), zeros(44)) : head;
}
const getattrIn = (fh = 0, flags = 0) => cat(u32(flags), u32(0), u64(fh));
interface SetattrFields {
  valid: number; fh?: number; size?: number | bigint; atime?: number; mtime?: number; atimensec?: number; mtimensec?: number;
  mode?: number; uid?: number; gid?: number;
}
/** fuse_setattr_in (88 bytes). */
function setattrIn(f: SetattrFields): Uint8Array {
  return cat(u32(f.valid), u32(0), u64(f.fh ?? 0), u64(f.size ?? 0), u64(0), u64(f.atime ?? 0), u64(f.mtime ?? 0), u64(0),
    u32(f.atimensec ?? 0), u32(f.mtimensec ?? 0), u32(0), u32(f.mode ?? 0), u32(0), u32(f.uid ?? 0), u32(f.gid ?? 0), u32(0));
}
const mkdirIn = (name: string, mode: number, umask = 0o022) => cat(u32(mode), u32(umask), cstr(name));
const mknodIn = (name: string, mode: number, rdev = 0, umask = 0) => cat(u32(mode), u32(rdev), u32(umask), u32(0), cstr(name));
const createIn = (name: string | Uint8Array, mode: number, flags = O_RDWR | O_CREAT, umask = 0o022) =>
  cat(u32(flags), u32(mode), u32(umask), u32(0), cstr(name));
const openIn = (flags: number) => cat(u32(flags), u32(0));
/** fuse_read_in (40 bytes), also READDIR's. */
const readIn = (fh: number, offset: number | bigint, size: number) => cat(u64(fh), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0));
/** fuse_write_in (40 bytes); `size` may lie about the data that follows. */
const writeIn = (fh: number, offset: number | bigint, size: number) => cat(u64(fh), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0));
const releaseIn = (fh: number) => cat(u64(fh), u32(0), u32(0), u64(0));
const renameIn = (newdir: number, from: string, to: string) => cat(u64(newdir), cstr(from), cstr(to));
const linkIn = (oldnodeid: number, name: string) => cat(u64(oldnodeid), cstr(name));
const forgetIn = (nlookup: number) => u64(nlookup);
function batchForgetIn(items: [nodeid: number, nlookup: number][]): Uint8Array {
  return cat(u32(items.length), u32(0), ...items.flatMap(([n, k]) => [u64(n), u64(k)]));
}

// ---- replies ----

interface Reply {
  /** The used length the device reported. */
  used: number;
  /** fuse_out_header (all 0 when fewer than 16 bytes were written). */
  len: number;
  error: number;
  unique: bigint;
  body: Uint8Array;
}
const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const num64 = (b: Uint8Array, o: number) => Number(view(b).getBigUint64(o, true));
const num32 = (b: Uint8Array, o: number) => view(b).getUint32(o, true);

function parseReply(c: Completion): Reply {
  if (c.len < 16 || c.data.length < 16) return { used: c.len, len: 0, error: 0, unique: 0n, body: EMPTY };
  const dv = view(c.data);
  const len = dv.getUint32(0, true);
  return { used: c.len, len, error: dv.getInt32(4, true), unique: dv.getBigUint64(8, true), body: c.data.subarray(16, len) };
}

/** The reply's errno (0: success), after checking that the header's len is the used length. */
function errnoOf(r: Reply): number {
  expect(r.used).toBe(r.len);
  return r.error === 0 ? 0 : -r.error;
}

interface Attr {
  ino: number; size: number; blocks: number; atime: number; mtime: number; atimensec: number; mtimensec: number;
  mode: number; nlink: number; uid: number; gid: number;
}
/** struct fuse_attr (88 bytes) at `o`. */
function attrAt(b: Uint8Array, o: number): Attr {
  return {
    ino: num64(b, o), size: num64(b, o + 8), blocks: num64(b, o + 16), atime: num64(b, o + 24), mtime: num64(b, o + 32),
    atimensec: num32(b, o + 48), mtimensec: num32(b, o + 52), mode: num32(b, o + 60), nlink: num32(b, o + 64),
    uid: num32(b, o + 68), gid: num32(b, o + 72),
  };
}
/** fuse_entry_out (128 bytes): nodeid, generation, entry/attr valid, then the attr at 40. */
function entryOf(r: Reply): { nodeid: number; attr: Attr } {
  expect(errnoOf(r)).toBe(0);
  expect(r.body.length).toBe(128);
  return { nodeid: num64(r.body, 0), attr: attrAt(r.body, 40) };
}
/** fuse_attr_out (104 bytes): attr_valid, attr_valid_nsec, dummy, then the attr at 16. */
function attrOf(r: Reply): Attr {
  expect(errnoOf(r)).toBe(0);
  expect(r.body.length).toBe(104);
  return attrAt(r.body, 16);
}
interface Dirent { ino: number; off: number; type: number; name: string }
/** A READDIR body: fuse_dirent records (ino, off, namelen, type, name) padded to 8. */
function direntsOf(body: Uint8Array): Dirent[] {
  const out: Dirent[] = [];
  for (let o = 0; o < body.length;) {
    const namelen = num32(body, o + 16);
    out.push({ ino: num64(body, o), off: num64(body, o + 8), type: num32(body, o + 20), name: dec.decode(body.subarray(o + 24, o + 24 + namelen)) });
    o += (24 + namelen + 7) & ~7;
  }
  return out;
}

// ---- one device per describe (or per test), torn down at the end ----

interface Dev {
  s: Served;
  drv: DeviceDriver;
  lines: string[];
  next: number;
}

let tmp = "";
let seq = 0;
beforeAll(() => { tmp = mkdtempSync("/tmp/bunvhost-fs-test-"); });
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function collector(lines: string[]): Logger {
  const keep = (level: string) => (m: string) => void lines.push(`${level}: ${m}`);
  return { level: "debug", debug: keep("debug"), info: keep("info"), warn: keep("warn"), error: keep("error") };
}

async function startFs(options: OptionValues, init = true): Promise<Dev> {
  const lines: string[] = [];
  const socket = join(tmp, `${seq++}.sock`);
  const s = await serve("fs", { socket, threads: 0, options, log: collector(lines) });
  let drv: DeviceDriver;
  try {
    drv = await DeviceDriver.connect(socket, { queueSize: 64, timeoutMs: 3000 });
  } catch (e) {
    await s.stop();
    throw e;
  }
  const d: Dev = { s, drv, lines, next: 1000 };
  if (init) expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 38)))).toBe(0);
  return d;
}

async function stopFs(d: Dev | undefined): Promise<void> {
  if (!d) return;
  d.drv.close();
  await d.s.stop();
}

interface CallOptions {
  queue?: number;
  /** Writable buffer sizes (default one of 8 KiB); null: no writable part. */
  writable?: number | number[] | null;
  /** The header's len field (default: the true length). */
  len?: number;
  /** Cut the readable bytes at these offsets (one descriptor per piece). */
  split?: number[];
  unique?: number | bigint;
}

async function call(d: Dev, opcode: number, nodeid: number | bigint, args: Uint8Array = EMPTY, o: CallOptions = {}): Promise<Reply> {
  const unique = o.unique ?? d.next++;
  const bytes = fuseIn(opcode, unique, nodeid, args, o.len);
  const chain: Chain = { readable: o.split ? cut(bytes, o.split) : bytes };
  if (o.writable !== null) chain.writable = o.writable ?? 8192;
  const r = parseReply(await d.drv.submit(o.queue ?? 1, chain));
  if (r.used >= 16) expect(r.unique).toBe(BigInt(unique));
  return r;
}

function cut(b: Uint8Array, at: number[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  let from = 0;
  for (const x of [...at, b.length]) {
    if (x > from) out.push(b.subarray(from, x));
    from = Math.max(from, x);
  }
  return out;
}

/** A request on the high-priority queue that takes no reply: the chain is used with length 0. */
async function noReply(d: Dev, opcode: number, nodeid: number, args: Uint8Array): Promise<number> {
  const c = await d.drv.submit(0, { readable: fuseIn(opcode, d.next++, nodeid, args) });
  return c.len;
}

const lookup = (d: Dev, parent: number, name: string) => call(d, OP.LOOKUP, parent, cstr(name));
const getattr = async (d: Dev, node: number) => attrOf(await call(d, OP.GETATTR, node, getattrIn()));

async function create(d: Dev, parent: number, name: string, mode = 0o644): Promise<{ nodeid: number; fh: number; attr: Attr }> {
  const r = await call(d, OP.CREATE, parent, createIn(name, mode));
  expect(errnoOf(r)).toBe(0);
  // fuse_entry_out (128) then fuse_open_out (fh, open_flags, padding).
  expect(r.body.length).toBe(144);
  return { nodeid: num64(r.body, 0), attr: attrAt(r.body, 40), fh: num64(r.body, 128) };
}

async function mkdir(d: Dev, parent: number, name: string, mode = 0o777): Promise<{ nodeid: number; attr: Attr }> {
  return entryOf(await call(d, OP.MKDIR, parent, mkdirIn(name, mode)));
}

async function open(d: Dev, node: number, flags: number): Promise<Reply> {
  return call(d, OP.OPEN, node, openIn(flags));
}

async function write(d: Dev, node: number, fh: number, offset: number, data: Uint8Array): Promise<Reply> {
  return call(d, OP.WRITE, node, cat(writeIn(fh, offset, data.length), data));
}

async function read(d: Dev, node: number, fh: number, offset: number, size: number): Promise<Reply> {
  return call(d, OP.READ, node, readIn(fh, offset, size), { writable: [16, size] });
}

async function statfs(d: Dev): Promise<{ blocks: number; files: number; ffree: number; bsize: number; namelen: number }> {
  const r = await call(d, OP.STATFS, ROOT);
  expect(errnoOf(r)).toBe(0);
  expect(r.body.length).toBe(80);
  return { blocks: num64(r.body, 0), files: num64(r.body, 24), ffree: num64(r.body, 32), bsize: num32(r.body, 40), namelen: num32(r.body, 44) };
}

/** Every name of a directory by OPENDIR + READDIR calls of `size` bytes, resumed at the last entry's off. */
async function listDir(d: Dev, node: number, size: number): Promise<{ names: string[]; calls: number }> {
  const o = await call(d, OP.OPENDIR, node, openIn(O_RDONLY | O_DIRECTORY));
  expect(errnoOf(o)).toBe(0);
  const fh = num64(o.body, 0);
  const names: string[] = [];
  let offset = 0, calls = 0;
  for (;;) {
    const r = await call(d, OP.READDIR, node, readIn(fh, offset, size));
    calls++;
    expect(errnoOf(r)).toBe(0);
    expect(r.body.length).toBeLessThanOrEqual(size);
    const ents = direntsOf(r.body);
    if (ents.length === 0) break;
    for (const e of ents) names.push(e.name);
    offset = ents[ents.length - 1]!.off;
    if (calls > 200) throw new Error("READDIR never ends");
  }
  expect(errnoOf(await call(d, OP.RELEASEDIR, node, releaseIn(fh)))).toBe(0);
  return { names, calls };
}

/**
 * The fds of this process (the server runs in it) that name something in
 * `dir`: the server's O_PATH and open fds of the shared tree, and nothing of
 * the test runner's, whose other fds come and go meanwhile.
 */
function fdCount(dir: string): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      const target = readlinkSync(`/proc/self/fd/${fd}`);
      if (target === dir || target.startsWith(`${dir}/`)) n++;
    } catch {
      // The fd readdirSync itself used is gone by now.
    }
  }
  return n;
}

/** A host directory tree as path → type, mode, size, mtime and file bytes, to show nothing changed. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (p: string, rel: string) => {
    const st = lstatSync(p);
    out[rel] = `${st.mode.toString(8)} ${st.size} ${st.mtimeMs} ${st.uid}:${st.gid}`;
    if (st.isFile()) out[rel] += ` ${readFileSync(p, "hex")}`;
    if (st.isDirectory()) for (const n of readdirSync(p).sort()) walk(join(p, n), `${rel}/${n}`);
  };
  walk(dir, ".");
  return out;
}

// ---- INIT ----

describe("fs device: INIT", () => {
  let d: Dev | undefined;
  afterEach(async () => {
    await stopFs(d);
    d = undefined;
  });

  test("INIT 7.38 with a kernel's flags: major 7, minor 38, max_write 1 MiB, flags a subset of the offered", async () => {
    d = await startFs({ memory: true }, false);
    const r = await call(d, OP.INIT, 0, initIn(7, 38));
    expect(errnoOf(r)).toBe(0);
    // fuse_init_out (64): major, minor, max_readahead, flags, max_background u16, congestion_threshold u16,
    // max_write, time_gran, max_pages u16, map_alignment u16, flags2, unused[7].
    expect(r.body.length).toBe(64);
    const b = r.body, flags = num32(b, 12), flags2 = num32(b, 32);
    expect([num32(b, 0), num32(b, 4)]).toEqual([7, 38]);
    expect(num32(b, 8)).toBeLessThanOrEqual(131072);
    expect((flags & ~KERNEL_FLAGS) >>> 0).toBe(0);
    expect((flags2 & ~KERNEL_FLAGS2) >>> 0).toBe(0);
    expect(flags & FUSE_ASYNC_READ).toBe(FUSE_ASYNC_READ);
    expect(num32(b, 20)).toBe(1 << 20);
    if (flags & FUSE_MAX_PAGES) expect(view(b).getUint16(28, true)).toBeGreaterThanOrEqual(256);
    expect(b.subarray(36)).toEqual(zeros(28));
    expect(attrOf(await call(d, OP.GETATTR, ROOT, getattrIn())).mode & S_IFMT).toBe(S_IFDIR);
  });

  test("a request before INIT gets EIO, and does not start the session", async () => {
    d = await startFs({ memory: true }, false);
    expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(EIO);
    expect(errnoOf(await lookup(d, ROOT, "x"))).toBe(EIO);
    expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 38)))).toBe(0);
    expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(0);
  });

  test("INIT 7.30 (older than virtio-fs's 7.31) gets EPROTO; the session stays unstarted", async () => {
    d = await startFs({ memory: true }, false);
    expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 30)))).toBe(EPROTO);
    expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(EIO);
  });

  test("INIT with major 8 gets the version-only reply (7.38, 8 bytes); an INIT 7.38 after it is accepted", async () => {
    d = await startFs({ memory: true }, false);
    const r = await call(d, OP.INIT, 0, cat(u32(8), u32(0), zeros(56)));
    expect(errnoOf(r)).toBe(0);
    expect(r.len).toBe(24);
    expect([num32(r.body, 0), num32(r.body, 4)]).toEqual([7, 38]);
    expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(EIO);
    expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 38)))).toBe(0);
    expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(0);
  });

  test("INIT 7.31 (16-byte fuse_init_in) agrees on minor 31; a 7.38 INIT cut to 16 bytes is EINVAL", async () => {
    d = await startFs({ memory: true }, false);
    expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 38).subarray(0, 16)))).toBe(EINVAL);
    const r = await call(d, OP.INIT, 0, initIn(7, 31));
    expect(errnoOf(r)).toBe(0);
    expect(num32(r.body, 4)).toBe(31);
  });
});

// ---- a session, on both back-ends ----

function sharedDir(): string {
  const dir = join(tmp, `shared-${seq++}`);
  mkdirSync(dir);
  return dir;
}

const BACKENDS: [string, () => OptionValues][] = [
  ["--memory", () => ({ memory: true })],
  ["--shared-dir", () => ({ "shared-dir": sharedDir() })],
];

for (const [label, options] of BACKENDS) {
  const memory = label === "--memory";

  describe(`fs device ${label}: a session`, () => {
    let d: Dev;
    beforeAll(async () => { d = await startFs(options()); });
    afterAll(async () => {
      expect(d?.lines.join("\n")).not.toMatch(THROWN);
      await stopFs(d);
    });

    test("LOOKUP of a missing name is ENOENT; GETATTR of the root is a directory", async () => {
      expect(errnoOf(await lookup(d, ROOT, "missing"))).toBe(ENOENT);
      const a = await getattr(d, ROOT);
      expect(a.mode & S_IFMT).toBe(S_IFDIR);
    });

    test("CREATE gives an entry (regular file, mode 0644 after umask 022) and an open handle; LOOKUP finds the same node", async () => {
      const c = await create(d, ROOT, "made.txt", 0o666);
      expect(c.nodeid).toBeGreaterThan(1);
      expect(c.attr.mode).toBe(S_IFREG | 0o644);
      expect(c.attr.size).toBe(0);
      expect(entryOf(await lookup(d, ROOT, "made.txt")).nodeid).toBe(c.nodeid);
      expect(errnoOf(await call(d, OP.RELEASE, c.nodeid, releaseIn(c.fh)))).toBe(0);
    });

    test("WRITE of 100 KiB in four chains reads back equal in 30000-byte READs; GETATTR has the size", async () => {
      const c = await create(d, ROOT, "big.bin");
      const data = fillRandom(new Uint8Array(100 * 1024), rng(7));
      const chunk = 25600;
      for (let at = 0; at < data.length; at += chunk) {
        const r = await write(d, c.nodeid, c.fh, at, data.subarray(at, at + chunk));
        expect(errnoOf(r)).toBe(0);
        expect(num32(r.body, 0)).toBe(chunk);
      }
      expect((await getattr(d, c.nodeid)).size).toBe(data.length);
      const back: Uint8Array[] = [];
      for (let at = 0; at < data.length; at += 30000) {
        const r = await read(d, c.nodeid, c.fh, at, 30000);
        expect(errnoOf(r)).toBe(0);
        back.push(r.body.slice());
      }
      expect(Buffer.compare(cat(...back), data)).toBe(0);
      expect(back[back.length - 1]!.length).toBe(data.length % 30000);
      const past = await read(d, c.nodeid, c.fh, data.length + 10, 100);
      expect([errnoOf(past), past.body.length]).toEqual([0, 0]);
      expect(errnoOf(await call(d, OP.RELEASE, c.nodeid, releaseIn(c.fh)))).toBe(0);
    });

    test("SETATTR size (shrink, then grow with zeros), mode and times show in the reply and in GETATTR", async () => {
      const c = await create(d, ROOT, "attrs.bin");
      expect(errnoOf(await write(d, c.nodeid, c.fh, 0, new Uint8Array(3000).fill(0x5a)))).toBe(0);
      expect(attrOf(await call(d, OP.SETATTR, c.nodeid, setattrIn({ valid: FATTR_SIZE, size: 1000 }))).size).toBe(1000);
      expect(attrOf(await call(d, OP.SETATTR, c.nodeid, setattrIn({ valid: FATTR_SIZE, size: 5000 }))).size).toBe(5000);
      const r = await read(d, c.nodeid, c.fh, 990, 20);
      expect([...r.body]).toEqual([...new Uint8Array(10).fill(0x5a), ...zeros(10)]);
      const m = attrOf(await call(d, OP.SETATTR, c.nodeid, setattrIn({ valid: FATTR_MODE, mode: S_IFREG | 0o600 })));
      expect(m.mode).toBe(S_IFREG | 0o600);
      const t = attrOf(await call(d, OP.SETATTR, c.nodeid, setattrIn({
        valid: FATTR_ATIME | FATTR_MTIME, atime: 1_000_000_000, atimensec: 123_456_789, mtime: 1_500_000_000, mtimensec: 42,
      })));
      expect([t.atime, t.atimensec, t.mtime, t.mtimensec]).toEqual([1_000_000_000, 123_456_789, 1_500_000_000, 42]);
      const g = await getattr(d, c.nodeid);
      expect([g.size, g.mode, g.atime, g.mtime]).toEqual([5000, S_IFREG | 0o600, 1_000_000_000, 1_500_000_000]);
      expect(errnoOf(await call(d, OP.RELEASE, c.nodeid, releaseIn(c.fh)))).toBe(0);
    });

    test("MKDIR (0777 & ~022 = 0755); READDIR of 128 bytes needs several calls and, resumed at off, gives every name once", async () => {
      const dir = await mkdir(d, ROOT, "list");
      expect(dir.attr.mode).toBe(S_IFDIR | 0o755);
      const want = Array.from({ length: 20 }, (_, i) => `entry-${String(i).padStart(2, "0")}`);
      for (const n of want) {
        const c = await create(d, dir.nodeid, n);
        expect(errnoOf(await call(d, OP.RELEASE, c.nodeid, releaseIn(c.fh)))).toBe(0);
      }
      const { names, calls } = await listDir(d, dir.nodeid, 128);
      expect(calls).toBeGreaterThan(5);
      expect(names.length).toBe(new Set(names).size);
      expect(names.sort()).toEqual([".", "..", ...want].sort());
    });

    test("RENAME moves a name to another directory; LINK adds a second name (nlink 2, same node)", async () => {
      const a = await mkdir(d, ROOT, "ra"), b = await mkdir(d, ROOT, "rb");
      const f = await create(d, a.nodeid, "f");
      expect(errnoOf(await call(d, OP.RENAME, a.nodeid, renameIn(b.nodeid, "f", "g")))).toBe(0);
      expect(errnoOf(await lookup(d, a.nodeid, "f"))).toBe(ENOENT);
      expect(entryOf(await lookup(d, b.nodeid, "g")).nodeid).toBe(f.nodeid);
      const l = entryOf(await call(d, OP.LINK, a.nodeid, linkIn(f.nodeid, "again")));
      expect(l.nodeid).toBe(f.nodeid);
      expect(l.attr.nlink).toBe(2);
      expect(errnoOf(await call(d, OP.RELEASE, f.nodeid, releaseIn(f.fh)))).toBe(0);
    });

    test("SYMLINK makes an S_IFLNK entry and READLINK gives its target back", async () => {
      const s = entryOf(await call(d, OP.SYMLINK, ROOT, cat(cstr("ln"), cstr("some/where/../else"))));
      expect(s.attr.mode & S_IFMT).toBe(S_IFLNK);
      const r = await call(d, OP.READLINK, s.nodeid);
      expect(errnoOf(r)).toBe(0);
      expect(dec.decode(r.body)).toBe("some/where/../else");
    });

    test("UNLINK removes a name; RMDIR of a non-empty directory is ENOTEMPTY, of an empty one succeeds", async () => {
      const dir = await mkdir(d, ROOT, "rm");
      const f = await create(d, dir.nodeid, "x");
      expect(errnoOf(await call(d, OP.RELEASE, f.nodeid, releaseIn(f.fh)))).toBe(0);
      expect(errnoOf(await call(d, OP.RMDIR, ROOT, cstr("rm")))).toBe(ENOTEMPTY);
      expect(errnoOf(await call(d, OP.UNLINK, dir.nodeid, cstr("x")))).toBe(0);
      expect(errnoOf(await lookup(d, dir.nodeid, "x"))).toBe(ENOENT);
      expect(errnoOf(await call(d, OP.RMDIR, ROOT, cstr("rm")))).toBe(0);
      expect(errnoOf(await lookup(d, ROOT, "rm"))).toBe(ENOENT);
    });

    test("STATFS: fuse_kstatfs with namelen 255 and a block size", async () => {
      const s = await statfs(d);
      expect(s.namelen).toBe(255);
      expect(s.bsize).toBeGreaterThan(0);
      expect(s.blocks).toBeGreaterThan(0);
    });

    test("FORGET, BATCH_FORGET and INTERRUPT on queue 0 take no reply (used length 0); the queue goes on", async () => {
      const f = await create(d, ROOT, "ghost");
      expect(errnoOf(await call(d, OP.RELEASE, f.nodeid, releaseIn(f.fh)))).toBe(0);
      expect(errnoOf(await call(d, OP.UNLINK, ROOT, cstr("ghost")))).toBe(0);
      const before = memory ? (await statfs(d)).ffree : 0;
      expect(await noReply(d, OP.FORGET, f.nodeid, forgetIn(1))).toBe(0);
      // MemoryFs: an unlinked, released inode lives until the kernel forgets it; then it is one more free inode.
      if (memory) expect((await statfs(d)).ffree).toBe(before + 1);
      const gs = [];
      for (const n of ["g1", "g2", "g3"]) {
        const g = await create(d, ROOT, n);
        expect(errnoOf(await call(d, OP.RELEASE, g.nodeid, releaseIn(g.fh)))).toBe(0);
        expect(errnoOf(await call(d, OP.UNLINK, ROOT, cstr(n)))).toBe(0);
        gs.push(g.nodeid);
      }
      const mid = memory ? (await statfs(d)).ffree : 0;
      expect(await noReply(d, OP.BATCH_FORGET, 0, batchForgetIn(gs.map((n) => [n, 1])))).toBe(0);
      if (memory) expect((await statfs(d)).ffree).toBe(mid + 3);
      expect(await noReply(d, OP.INTERRUPT, 0, u64(12345))).toBe(0);
      expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn()))).toBe(0);
    });

    test("a request whose header and name are cut over several readable descriptors is decoded like one piece", async () => {
      await create(d, ROOT, "pieces");
      const r = await call(d, OP.LOOKUP, ROOT, cstr("pieces"), { split: [7, 13, 41, 44] });
      expect(entryOf(r).attr.mode & S_IFMT).toBe(S_IFREG);
    });
  });

  describe(`fs device ${label}: hostile requests`, () => {
    let d: Dev;
    let file: { nodeid: number; fh: number };
    beforeAll(async () => {
      d = await startFs(options());
      file = await create(d, ROOT, "f");
    });
    afterAll(async () => {
      expect(d?.lines.join("\n")).not.toMatch(THROWN);
      await stopFs(d);
    });
    const works = async () => expect(attrOf(await call(d, OP.GETATTR, ROOT, getattrIn())).mode & S_IFMT).toBe(S_IFDIR);

    test("a header len larger or smaller than the chain: EINVAL with the request's unique; the next request works", async () => {
      const args = getattrIn();
      for (const len of [40 + args.length + 8, 40 + args.length - 8, 0, 0xffffffff]) {
        const r = await call(d, OP.GETATTR, ROOT, args, { len, unique: 0xabcdef0123n });
        expect(errnoOf(r)).toBe(EINVAL);
        await works();
      }
    });

    test("truncated arguments: LOOKUP with none, WRITE and SETATTR cut short, are EINVAL", async () => {
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.WRITE, file.nodeid, writeIn(file.fh, 0, 0).subarray(0, 20)))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.SETATTR, file.nodeid, setattrIn({ valid: FATTR_SIZE, size: 0 }).subarray(0, 50)))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.GETATTR, ROOT, getattrIn().subarray(0, 8)))).toBe(EINVAL);
      await works();
    });

    test("names: without NUL is EINVAL, with '/' is EINVAL, empty is EINVAL, 255 bytes is fine (ENOENT), 300 bytes is ENAMETOOLONG", async () => {
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, enc.encode("f")))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, cstr("a/b")))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, cstr("/")))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, cstr("")))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, cstr("n".repeat(255))))).toBe(ENOENT);
      expect(errnoOf(await call(d, OP.LOOKUP, ROOT, cstr("n".repeat(300))))).toBe(ENAMETOOLONG);
      expect(errnoOf(await call(d, OP.CREATE, ROOT, createIn("c".repeat(300), 0o644)))).toBe(ENAMETOOLONG);
      expect(errnoOf(await call(d, OP.MKDIR, ROOT, mkdirIn("a/b", 0o755)))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.RENAME, ROOT, cat(u64(ROOT), cstr("f"))))).toBe(EINVAL); // no second name
      expect(errnoOf(await call(d, OP.RENAME, ROOT, renameIn(ROOT, "f", "x/y")))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.SYMLINK, ROOT, cat(cstr("s"), enc.encode("no-nul"))))).toBe(EINVAL);
      expect(errnoOf(await lookup(d, ROOT, "x"))).toBe(ENOENT);
      expect(entryOf(await lookup(d, ROOT, "f")).nodeid).toBe(file.nodeid);
    });

    test("WRITE whose size field is more (or less) than the data that follows is EINVAL, and writes nothing", async () => {
      const data = new Uint8Array(100).fill(1);
      expect(errnoOf(await call(d, OP.WRITE, file.nodeid, cat(writeIn(file.fh, 0, 4096), data)))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.WRITE, file.nodeid, cat(writeIn(file.fh, 0, 50), data)))).toBe(EINVAL);
      expect(errnoOf(await call(d, OP.WRITE, file.nodeid, cat(writeIn(file.fh, 0, 0xffffffff), data)))).toBe(EINVAL);
      expect((await getattr(d, file.nodeid)).size).toBe(0);
    });

    test("READ and WRITE of a file handle never opened are EBADF", async () => {
      const c = await create(d, ROOT, "fh-test");
      expect(errnoOf(await write(d, c.nodeid, c.fh, 0, Uint8Array.of(7, 7)))).toBe(0);
      const r = await read(d, c.nodeid, 987654, 0, 100);
      const w = await write(d, c.nodeid, 987654, 0, Uint8Array.of(1, 2, 3));
      expect({ read: errnoOf(r), readBytes: r.body.length, write: errnoOf(w), size: (await getattr(d, c.nodeid)).size })
        .toEqual({ read: EBADF, readBytes: 0, write: EBADF, size: 2 });
    });

    test("an unknown nodeid is ENOENT (GETATTR, LOOKUP under it, OPEN, SETATTR, READDIR's OPENDIR)", async () => {
      for (const node of [987654, 2n ** 64n - 1n, 2n ** 53n + 1n]) {
        expect(errnoOf(await call(d, OP.GETATTR, node, getattrIn()))).toBe(ENOENT);
        expect(errnoOf(await call(d, OP.LOOKUP, node, cstr("f")))).toBe(ENOENT);
        expect(errnoOf(await call(d, OP.SETATTR, node, setattrIn({ valid: FATTR_MODE, mode: 0o600 })))).toBe(ENOENT);
        expect(errnoOf(await call(d, OP.OPENDIR, node, openIn(O_RDONLY | O_DIRECTORY)))).toBe(ENOENT);
      }
      expect(errnoOf(await open(d, 987654, O_RDONLY))).toBe(ENOENT);
    });

    test("an unknown opcode (9999, and the hole 7) is ENOSYS; the next request works", async () => {
      expect(errnoOf(await call(d, 9999, ROOT, zeros(16)))).toBe(ENOSYS);
      expect(errnoOf(await call(d, 7, ROOT))).toBe(ENOSYS);
      await works();
    });

    test("a writable part too small for the reply (8 bytes for GETATTR, LOOKUP, READ, READDIR): the chain is used, nothing crashes", async () => {
      for (const w of [8, 15, 16, 100]) {
        const r = await call(d, OP.GETATTR, ROOT, getattrIn(), { writable: w });
        // Either nothing (len 0) or a whole header: never a partial reply.
        expect(r.used === 0 || r.used === 16 || r.used === r.len).toBe(true);
        expect(r.used).toBeLessThanOrEqual(w);
      }
      expect((await call(d, OP.LOOKUP, ROOT, cstr("f"), { writable: 8 })).used).toBe(0);
      expect((await call(d, OP.READ, file.nodeid, readIn(file.fh, 0, 4096), { writable: 8 })).used).toBe(0);
      const o = await call(d, OP.OPENDIR, ROOT, openIn(O_RDONLY | O_DIRECTORY));
      const fh = num64(o.body, 0);
      expect((await call(d, OP.READDIR, ROOT, readIn(fh, 0, 4096), { writable: 8 })).used).toBe(0);
      const small = await call(d, OP.READDIR, ROOT, readIn(fh, 0, 4096), { writable: 20 });
      expect(small.used).toBe(16); // the header and no entry: an end-of-directory the guest asked for by giving no room
      await works();
    });

    test("a chain with no writable part for a request that needs a reply: used length 0, nothing crashes", async () => {
      for (const [op, node, args] of [
        [OP.GETATTR, ROOT, getattrIn()], [OP.LOOKUP, ROOT, cstr("f")], [OP.READ, file.nodeid, readIn(file.fh, 0, 10)],
        [OP.INIT, 0, initIn(7, 38)], [OP.STATFS, ROOT, EMPTY], [9999, ROOT, EMPTY], [OP.GETATTR, ROOT, EMPTY],
      ] as [number, number, Uint8Array][]) {
        expect((await call(d, op, node, args, { writable: null })).used).toBe(0);
      }
      expect((await d.drv.submit(1, { readable: Uint8Array.of(1, 2, 3) })).len).toBe(0);
      await works();
    });

    test("2000 seeded garbage requests: the device never throws, and a GETATTR of the root works afterwards", async () => {
      const next = rng(0x5eed + (memory ? 0 : 1));
      const r = (n: number) => next() % n;
      const names = ["f", "g", "d", "..", ".", "out", "x/y", "", "n".repeat(256)];
      const seen = new Map<string, number>();
      // 16 chains of at most 4 descriptors per round: never more than a 64-entry ring holds.
      for (let batch = 0; batch < 2000 / 16; batch++) {
        const q0: Chain[] = [], q1: Chain[] = [];
        for (let i = 0; i < 16; i++) {
          let bytes: Uint8Array;
          if (r(10) === 0) {
            bytes = fillRandom(new Uint8Array(1 + r(60)), next);
          } else {
            const op = r(10) === 0 ? next() : r(10) === 0 ? 4096 : 1 + r(52);
            const fixed = fillRandom(new Uint8Array([0, 8, 16, 24, 40, 64, 88][r(7)]!), next);
            // Small handles, offsets and sizes some of the time, so requests reach the back-end.
            if (fixed.length >= 24 && r(2) === 0) fixed.set(cat(u64(r(6)), u64(r(70000)), u32(r(9000))), 0);
            const parts = [fixed];
            for (let k = r(3); k > 0; k--) parts.push(r(6) === 0 ? enc.encode(names[r(names.length)]!) : cstr(names[r(names.length)]!));
            if (r(4) === 0) parts.push(fillRandom(new Uint8Array(r(200)), next));
            const nodeid = r(5) === 0 ? (BigInt(next()) << 32n) | BigInt(next()) : BigInt(1 + r(12));
            const args = cat(...parts);
            bytes = fuseIn(op, r(20) === 0 ? 0 : next(), nodeid, args, r(8) === 0 ? next() : undefined);
            if (r(8) === 0) bytes = bytes.subarray(0, 1 + r(bytes.length));
          }
          const w = [null, 1, 8, 15, 16, 24, 100, 4096][r(8)]!;
          const chain: Chain = { readable: r(3) === 0 ? cut(bytes, [r(bytes.length)]) : bytes };
          if (w !== null) chain.writable = r(4) === 0 ? [Math.min(w, 16), 4096] : w;
          (r(4) === 0 ? q0 : q1).push(chain);
        }
        const done = await Promise.all([d.drv.submitAll(0, q0), d.drv.submitAll(1, q1)]);
        for (const c of done.flat()) {
          const p = parseReply(c);
          if (p.used >= 16) expect(p.len).toBe(p.used);
          const k = p.used < 16 ? "none" : p.error === 0 ? "ok" : `e${-p.error}`;
          seen.set(k, (seen.get(k) ?? 0) + 1);
        }
      }
      // Enough of it got past the decoder to reach the back-end.
      expect(seen.get("ok") ?? 0).toBeGreaterThan(50);
      expect(d.lines.join("\n")).not.toMatch(THROWN);
      expect(errnoOf(await call(d, OP.INIT, 0, initIn(7, 38)))).toBe(0);
      await works();
    });
  });
}

// ---- read-only ----

describe("fs device --readonly", () => {
  const cases: [string, () => OptionValues][] = [
    ["--memory", () => ({ memory: true, readonly: true })],
    ["--shared-dir", () => {
      const dir = sharedDir();
      writeFileSync(join(dir, "file.txt"), "read me");
      mkdirSync(join(dir, "sub"));
      writeFileSync(join(dir, "sub", "inner"), "x");
      return { "shared-dir": dir, readonly: true };
    }],
  ];
  for (const [label, options] of cases) {
    test(`${label}: every change is EROFS; GETATTR, LOOKUP, READDIR, STATFS${label === "--shared-dir" ? ", OPEN read-only and READ" : ""} work`, async () => {
      const opts = options();
      const d = await startFs(opts);
      try {
        const host = opts["shared-dir"] as string | undefined;
        const before = host ? snapshot(host) : null;
        let file = ROOT, sub = ROOT;
        if (host) {
          file = entryOf(await lookup(d, ROOT, "file.txt")).nodeid;
          sub = entryOf(await lookup(d, ROOT, "sub")).nodeid;
          const o = await open(d, file, O_RDONLY);
          expect(errnoOf(o)).toBe(0);
          const fh = num64(o.body, 0);
          expect(dec.decode((await read(d, file, fh, 0, 100)).body)).toBe("read me");
          expect(errnoOf(await write(d, file, fh, 0, Uint8Array.of(1)))).toBe(EROFS);
          expect(errnoOf(await call(d, OP.RELEASE, file, releaseIn(fh)))).toBe(0);
          expect((await listDir(d, ROOT, 4096)).names.sort()).toEqual([".", "..", "file.txt", "sub"]);
        } else {
          expect((await listDir(d, ROOT, 4096)).names.sort()).toEqual([".", ".."]);
        }
        expect(await getattr(d, ROOT)).toBeDefined();
        expect(errnoOf(await lookup(d, ROOT, "nope"))).toBe(ENOENT);
        expect((await statfs(d)).namelen).toBe(255);
        const changes: [string, number, number, Uint8Array][] = [
          ["CREATE", OP.CREATE, ROOT, createIn("new", 0o644)],
          ["MKDIR", OP.MKDIR, ROOT, mkdirIn("newdir", 0o755)],
          ["MKNOD", OP.MKNOD, ROOT, mknodIn("fifo", 0o010644)],
          ["SYMLINK", OP.SYMLINK, ROOT, cat(cstr("ln"), cstr("file.txt"))],
          ["LINK", OP.LINK, ROOT, linkIn(file, "hard")],
          ["UNLINK", OP.UNLINK, ROOT, cstr("file.txt")],
          ["RMDIR", OP.RMDIR, ROOT, cstr("sub")],
          ["RENAME", OP.RENAME, ROOT, renameIn(ROOT, "file.txt", "moved")],
          ["RENAME2", OP.RENAME2, ROOT, cat(u64(ROOT), u32(0), u32(0), cstr("sub"), cstr("moved"))],
          ["SETATTR size", OP.SETATTR, file, setattrIn({ valid: FATTR_SIZE, size: 0 })],
          ["SETATTR mode", OP.SETATTR, sub, setattrIn({ valid: FATTR_MODE, mode: 0o700 })],
          ["SETATTR owner", OP.SETATTR, sub, setattrIn({ valid: FATTR_UID | FATTR_GID, uid: 1, gid: 1 })],
          ["SETATTR times", OP.SETATTR, sub, setattrIn({ valid: FATTR_ATIME | FATTR_MTIME, atime: 1, mtime: 1 })],
          ["WRITE", OP.WRITE, file, cat(writeIn(0, 0, 1), Uint8Array.of(9))],
          ["OPEN O_WRONLY", OP.OPEN, file, openIn(O_WRONLY)],
          ["OPEN O_RDWR", OP.OPEN, file, openIn(O_RDWR)],
          ["OPEN O_RDONLY|O_TRUNC", OP.OPEN, file, openIn(O_RDONLY | O_TRUNC)],
          ["SETXATTR", OP.SETXATTR, sub, cat(u32(1), u32(0), cstr("user.x"), Uint8Array.of(1))],
          ["REMOVEXATTR", OP.REMOVEXATTR, sub, cstr("user.x")],
          ["FALLOCATE", OP.FALLOCATE, file, cat(u64(0), u64(0), u64(4096), u32(0), u32(0))],
          ["COPY_FILE_RANGE", OP.COPY_FILE_RANGE, file, cat(u64(0), u64(0), u64(file), u64(0), u64(100), u64(10), u64(0))],
        ];
        const got = [];
        for (const [what, op, node, args] of changes) got.push(`${what}: ${errnoOf(await call(d, op, node, args))}`);
        expect(got).toEqual(changes.map(([what]) => `${what}: ${EROFS}`));
        if (host) expect(snapshot(host)).toEqual(before!);
        expect(d.lines.join("\n")).not.toMatch(THROWN);
      } finally {
        await stopFs(d);
      }
    });
  }
});

// ---- --shared-dir: symlinks out of DIR, "..", and fds ----

describe("fs device --shared-dir: nothing outside DIR is reached", () => {
  let base = "", shared = "", outside = "";
  let d: Dev;
  let before: Record<string, string>;
  beforeAll(async () => {
    base = join(tmp, `escape-${seq++}`);
    shared = join(base, "shared");
    outside = join(base, "outside");
    mkdirSync(shared, { recursive: true });
    mkdirSync(outside);
    writeFileSync(join(outside, "secret.txt"), "outside secret");
    mkdirSync(join(outside, "deeper"));
    writeFileSync(join(outside, "deeper", "more.txt"), "more");
    chmodSync(outside, 0o755);
    symlinkSync("../outside", join(shared, "out"));
    symlinkSync(outside, join(shared, "abs"));
    symlinkSync("out/secret.txt", join(shared, "chain"));
    writeFileSync(join(shared, "inside.txt"), "inside");
    mkdirSync(join(shared, "sub"));
    before = snapshot(outside);
    d = await startFs({ "shared-dir": shared });
  });
  afterAll(async () => { await stopFs(d); });

  test("LOOKUP of a symlink out of DIR gives the link itself (S_IFLNK, size of its text), READLINK its text", async () => {
    const out = entryOf(await lookup(d, ROOT, "out"));
    expect(out.attr.mode & S_IFMT).toBe(S_IFLNK);
    expect(out.attr.size).toBe("../outside".length);
    const r = await call(d, OP.READLINK, out.nodeid);
    expect(dec.decode(r.body)).toBe("../outside");
  });

  test("LOOKUP under the symlink's node is ENOTDIR/ENOENT, never the outside file; OPENDIR of it is refused", async () => {
    for (const link of ["out", "abs"]) {
      const l = entryOf(await lookup(d, ROOT, link)).nodeid;
      for (const name of ["secret.txt", "deeper", ".."]) {
        expect([ENOTDIR, ENOENT]).toContain(errnoOf(await call(d, OP.LOOKUP, l, cstr(name))));
      }
      expect(errnoOf(await call(d, OP.OPENDIR, l, openIn(O_RDONLY | O_DIRECTORY)))).not.toBe(0);
    }
  });

  test("OPEN of a symlink node is ELOOP (read, write or truncate), so its target is never opened", async () => {
    for (const link of ["out", "abs", "chain"]) {
      const l = entryOf(await lookup(d, ROOT, link)).nodeid;
      for (const flags of [O_RDONLY, O_RDWR, O_WRONLY | O_TRUNC]) expect(errnoOf(await open(d, l, flags))).toBe(ELOOP);
    }
  });

  test("changes through a symlink node are refused: CREATE, MKDIR, SYMLINK, UNLINK, RENAME and LINK into it, SETATTR size", async () => {
    const out = entryOf(await lookup(d, ROOT, "out")).nodeid;
    const inside = entryOf(await lookup(d, ROOT, "inside.txt")).nodeid;
    const refused = [ENOTDIR, ENOENT, ELOOP, EPERM, EACCES, EINVAL, EOPNOTSUPP];
    for (const [op, node, args] of [
      [OP.CREATE, out, createIn("evil", 0o644)], [OP.MKDIR, out, mkdirIn("evil", 0o755)],
      [OP.SYMLINK, out, cat(cstr("evil"), cstr("/"))], [OP.UNLINK, out, cstr("secret.txt")], [OP.RMDIR, out, cstr("deeper")],
      [OP.RENAME, ROOT, renameIn(out, "inside.txt", "stolen")], [OP.LINK, out, linkIn(inside, "linked")],
      [OP.MKNOD, out, mknodIn("fifo", 0o010644)], [OP.SETATTR, out, setattrIn({ valid: FATTR_SIZE, size: 0 })],
    ] as [number, number, Uint8Array][]) {
      expect(refused).toContain(errnoOf(await call(d, op, node, args)));
    }
    // On the link itself (lchmod/lchown/lutimes semantics): whatever the answer, the target must not change (afterAll).
    await call(d, OP.SETATTR, out, setattrIn({ valid: FATTR_MODE, mode: 0o777 }));
    await call(d, OP.SETATTR, out, setattrIn({ valid: FATTR_UID | FATTR_GID, uid: 4242, gid: 4242 }));
    await call(d, OP.SETATTR, out, setattrIn({ valid: FATTR_ATIME | FATTR_MTIME, atime: 1, mtime: 1 }));
    expect(readFileSync(join(shared, "inside.txt"), "utf8")).toBe("inside");
  });

  test("LOOKUP \"..\" at the root is refused (not DIR's parent); below the root it gives the root back", async () => {
    const r = await lookup(d, ROOT, "..");
    expect(errnoOf(r)).not.toBe(0);
    expect([EACCES, EPERM, ENOENT, EINVAL]).toContain(errnoOf(r));
    const sub = entryOf(await lookup(d, ROOT, "sub")).nodeid;
    expect(entryOf(await lookup(d, sub, "..")).nodeid).toBe(ROOT);
  });

  test("a SYMLINK the guest makes to an absolute path is stored as text and never followed by LOOKUP under it", async () => {
    const s = entryOf(await call(d, OP.SYMLINK, ROOT, cat(cstr("guest-link"), cstr(outside))));
    expect(lstatSync(join(shared, "guest-link")).isSymbolicLink()).toBe(true);
    expect([ENOTDIR, ENOENT]).toContain(errnoOf(await call(d, OP.LOOKUP, s.nodeid, cstr("secret.txt"))));
    expect(errnoOf(await open(d, s.nodeid, O_RDONLY))).toBe(ELOOP);
  });

  test("after every request above: the tree outside DIR and DIR's parent are unchanged, and nothing was thrown", () => {
    expect(snapshot(outside)).toEqual(before);
    expect(readdirSync(base).sort()).toEqual(["outside", "shared"]);
    expect(d.lines.join("\n")).not.toMatch(THROWN);
  });
});

describe("fs device --shared-dir: host errors on open handles are replies, not exceptions", () => {
  let d: Dev;
  let dir = "";
  beforeAll(async () => {
    dir = sharedDir();
    writeFileSync(join(dir, "data"), "0123456789");
    mkdirSync(join(dir, "sub"));
    d = await startFs({ "shared-dir": dir });
  });
  afterAll(async () => { await stopFs(d); });

  const logged = () => d.lines.filter((l) => THROWN.test(l)).map((l) => l.split("\n")[0]!.slice(0, 160));

  test("READ of a handle opened O_WRONLY is EBADF (preadv fails on the host), and no exception is logged", async () => {
    const f = entryOf(await lookup(d, ROOT, "data")).nodeid;
    const fh = num64((await open(d, f, O_WRONLY)).body, 0);
    const r = await read(d, f, fh, 0, 10);
    expect({ errno: errnoOf(r), logged: logged() }).toEqual({ errno: EBADF, logged: [] });
  });

  test("WRITE to a handle opened O_RDONLY is EBADF (pwritev fails on the host), and the file is unchanged", async () => {
    const f = entryOf(await lookup(d, ROOT, "data")).nodeid;
    const fh = num64((await open(d, f, O_RDONLY)).body, 0);
    const r = await write(d, f, fh, 0, Uint8Array.of(1, 2));
    expect({ errno: errnoOf(r), logged: logged() }).toEqual({ errno: EBADF, logged: [] });
    expect(readFileSync(join(dir, "data"), "utf8")).toBe("0123456789");
  });

  test("READ of a directory OPENed as a file is EISDIR", async () => {
    const s = entryOf(await lookup(d, ROOT, "sub")).nodeid;
    const o = await open(d, s, O_RDONLY);
    expect(errnoOf(o)).toBe(0);
    const r = await read(d, s, num64(o.body, 0), 0, 10);
    expect({ errno: errnoOf(r), logged: logged() }).toEqual({ errno: EISDIR, logged: [] });
  });

  test("regression: READ, WRITE and SETATTR size at 2^62, 2^63 and 2^64 - 1 are errno replies or empty reads, never I/O at offset 0", async () => {
    const f = entryOf(await lookup(d, ROOT, "data")).nodeid;
    const fh = num64((await open(d, f, O_RDWR)).body, 0);
    const got: string[] = [];
    for (const off of [2n ** 62n, 2n ** 63n, 2n ** 64n - 1n]) {
      const r = await call(d, OP.READ, f, readIn(fh, off, 10), { writable: [16, 10] });
      got.push(`READ @${off}: errno ${errnoOf(r)}, ${r.body.length} bytes`);
      const w = await call(d, OP.WRITE, f, cat(writeIn(fh, off, 2), Uint8Array.of(0x41, 0x42)));
      got.push(`WRITE @${off}: errno ${errnoOf(w)}${errnoOf(w) === 0 ? `, wrote ${num32(w.body, 0)}` : ""}`);
      const t = await call(d, OP.SETATTR, f, setattrIn({ valid: FATTR_SIZE, size: off }));
      got.push(`SETATTR size ${off}: errno ${errnoOf(t)}`);
    }
    // Past the end a READ is empty (or EINVAL); a WRITE or a size there is EINVAL or EFBIG.
    const fine = new RegExp(`^READ @\\d+: errno (0|${EINVAL}), 0 bytes$|^(WRITE @|SETATTR size )\\d+: errno (${EINVAL}|${EFBIG})$`);
    expect(got.filter((g) => !fine.test(g))).toEqual([]);
    expect(logged()).toEqual([]);
    expect(readFileSync(join(dir, "data"), "latin1")).toBe("0123456789");
  });
});

describe("fs device --shared-dir: FORGET gives back the host fds LOOKUP took", () => {
  let d: Dev;
  let dir = "";
  const fds = () => fdCount(dir);
  beforeAll(async () => {
    dir = sharedDir();
    for (let i = 0; i < 24; i++) writeFileSync(join(dir, `f${i}`), String(i));
    mkdirSync(join(dir, "sub"));
    d = await startFs({ "shared-dir": dir });
  });
  afterAll(async () => {
    expect(d?.lines.join("\n")).not.toMatch(THROWN);
    await stopFs(d);
  });

  test("24 LOOKUPs hold 24 fds; 12 FORGETs and one BATCH_FORGET of 12 bring the count back to where it was", async () => {
    const before = fds();
    const nodes: number[] = [];
    for (let i = 0; i < 24; i++) nodes.push(entryOf(await lookup(d, ROOT, `f${i}`)).nodeid);
    expect(new Set(nodes).size).toBe(24);
    expect(fds() - before).toBe(24);
    for (const n of nodes.slice(0, 12)) expect(await noReply(d, OP.FORGET, n, forgetIn(1))).toBe(0);
    expect(fds() - before).toBe(12);
    expect(await noReply(d, OP.BATCH_FORGET, 0, batchForgetIn(nodes.slice(12).map((n) => [n, 1])))).toBe(0);
    expect(fds()).toBe(before);
    expect(errnoOf(await call(d, OP.GETATTR, nodes[0]!, getattrIn()))).toBe(ENOENT);
  });

  test("two LOOKUPs of one name are one node and one fd, released only when both are forgotten", async () => {
    const before = fds();
    const a = entryOf(await lookup(d, ROOT, "f0")).nodeid;
    expect(entryOf(await lookup(d, ROOT, "f0")).nodeid).toBe(a);
    expect(fds() - before).toBe(1);
    expect(await noReply(d, OP.FORGET, a, forgetIn(1))).toBe(0);
    expect(errnoOf(await call(d, OP.GETATTR, a, getattrIn()))).toBe(0);
    expect(fds() - before).toBe(1);
    expect(await noReply(d, OP.FORGET, a, forgetIn(1))).toBe(0);
    expect(fds()).toBe(before);
  });

  test("OPEN/RELEASE, OPENDIR/RELEASEDIR and CREATE/RELEASE/UNLINK/FORGET leave no fd behind; FORGET of the root or an unknown node is ignored", async () => {
    const before = fds();
    const f = entryOf(await lookup(d, ROOT, "f1")).nodeid;
    const fh = num64((await open(d, f, O_RDONLY)).body, 0);
    expect(dec.decode((await read(d, f, fh, 0, 10)).body)).toBe("1");
    expect(errnoOf(await call(d, OP.RELEASE, f, releaseIn(fh)))).toBe(0);
    expect((await listDir(d, ROOT, 256)).names.length).toBe(24 + 3);
    const c = await create(d, ROOT, "tmp");
    expect(errnoOf(await call(d, OP.RELEASE, c.nodeid, releaseIn(c.fh)))).toBe(0);
    expect(errnoOf(await call(d, OP.UNLINK, ROOT, cstr("tmp")))).toBe(0);
    expect(await noReply(d, OP.FORGET, c.nodeid, forgetIn(1))).toBe(0);
    expect(await noReply(d, OP.FORGET, f, forgetIn(1))).toBe(0);
    expect(await noReply(d, OP.FORGET, ROOT, forgetIn(1000))).toBe(0);
    expect(await noReply(d, OP.FORGET, 987654, forgetIn(1))).toBe(0);
    expect(await noReply(d, OP.BATCH_FORGET, 0, cat(u32(5), u32(0), u64(1), u64(1)))).toBe(0); // count lies: ignored
    expect(fds()).toBe(before);
    expect(attrOf(await call(d, OP.GETATTR, ROOT, getattrIn())).mode & S_IFMT).toBe(S_IFDIR);
  });
});

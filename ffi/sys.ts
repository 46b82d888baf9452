/**
 * Checked wrappers over libc: every failure becomes an ErrnoError naming the
 * call, EINTR is retried, and EAGAIN on a non-blocking fd returns `null`.
 * Pointers (numbers) appear only here, in `src/memory/` and in `src/virtq/`.
 */
import { ptr as ptrOf } from "bun:ffi";
import { sym } from "./libc.ts";
import { EAGAIN, EINTR, errno, ErrnoError } from "./errno.ts";
import * as C from "./constants.ts";
import {
  cmsgSpace, CMSG_HDR, CMSG_LEN_OFF, CMSG_LEVEL, CMSG_TYPE, EPOLL_EVENT_DATA, EPOLL_EVENT_SIZE,
  IOVEC_SIZE, MSGHDR_CONTROL, MSGHDR_CONTROLLEN, MSGHDR_FLAGS, MSGHDR_IOV, MSGHDR_IOVLEN,
  MSGHDR_SIZE, Pinned, SCM_MAX_FD, SOCKADDR_UN_SIZE, STAT_MODE, STAT_SIZE, STAT_SIZE_OFF, SUN_PATH_MAX,
} from "./structs.ts";

const enc = new TextEncoder();
const cstr = (s: string) => enc.encode(s + "\0");

function check(name: string, r: number, detail = ""): number {
  if (r < 0) throw new ErrnoError(name, errno(), detail);
  return r;
}

/** Run `f` until it does not fail with EINTR; `null` on EAGAIN. */
function retry(name: string, f: () => number, detail = ""): number | null {
  for (;;) {
    const r = f();
    if (r >= 0) return r;
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return null;
    throw new ErrnoError(name, e, detail);
  }
}

// ---- files and fds ---------------------------------------------------------

export function close(fd: number): void {
  if (fd < 0) return;
  // Linux closes the fd even when close() reports EINTR: never retry.
  const r = sym.close(fd);
  if (r < 0) {
    const e = errno();
    if (e !== EINTR) throw new ErrnoError("close", e, `fd ${fd}`);
  }
}

/** close() that never throws: for teardown paths that must release everything. */
export function closeQuiet(fd: number): void {
  if (fd >= 0) sym.close(fd);
}

export function open(path: string, flags: number, mode = 0o644): number {
  return check("open", sym.open(cstr(path) as any, flags | C.O_CLOEXEC, mode), path);
}

export function dup(fd: number): number {
  return check("dup", sym.dup(fd));
}

/** Whether `fd` is an open descriptor of this process. */
export function isOpen(fd: number): boolean {
  return sym.fcntl(fd, C.F_GETFD, 0) >= 0;
}

/** F_GET_SEALS: the seals of a memfd (F_SEAL_SHRINK = 2, ...); -1 for fds that cannot carry seals. */
export function getSeals(fd: number): number {
  return sym.fcntl(fd, 1034, 0);
}
export const F_SEAL_SHRINK = 0x0002;

export function setNonBlocking(fd: number, on = true): void {
  const fl = check("fcntl", sym.fcntl(fd, C.F_GETFL, 0));
  check("fcntl", sym.fcntl(fd, C.F_SETFL, on ? fl | C.O_NONBLOCK : fl & ~C.O_NONBLOCK));
}

/** read(2) into `buf`; `null` when a non-blocking fd has nothing. */
export function read(fd: number, buf: Uint8Array, len = buf.byteLength): number | null {
  return retry("read", () => sym.read(fd, buf as any, len));
}

export function write(fd: number, buf: Uint8Array, len = buf.byteLength): number | null {
  return retry("write", () => sym.write(fd, buf as any, len));
}

/** pread(2) into a raw pointer (guest memory); callers have bounds-checked `p..p+len`. */
export function preadPtr(fd: number, p: number, len: number, off: number): number {
  return retry("pread", () => sym.pread(fd, p as any, len, off))!;
}

export function pwritePtr(fd: number, p: number, len: number, off: number): number {
  return retry("pwrite", () => sym.pwrite(fd, p as any, len, off))!;
}

/** preadv(2) with an iovec table at `iov` (pinned memory) of `cnt` entries. */
export function preadv(fd: number, iov: number, cnt: number, off: number): number {
  return retry("preadv", () => sym.preadv(fd, iov as any, cnt, off))!;
}

export function pwritev(fd: number, iov: number, cnt: number, off: number): number {
  return retry("pwritev", () => sym.pwritev(fd, iov as any, cnt, off))!;
}

export function fsync(fd: number): void {
  retry("fsync", () => sym.fsync(fd));
}

export function fdatasync(fd: number): void {
  retry("fdatasync", () => sym.fdatasync(fd));
}

export function fallocate(fd: number, mode: number, off: number, len: number): void {
  retry("fallocate", () => sym.fallocate(fd, mode, off, len));
}

export function ftruncate(fd: number, size: number): void {
  retry("ftruncate", () => sym.ftruncate(fd, size));
}

export interface Stat { mode: number; size: number; isRegular: boolean; isBlock: boolean }

const statBuf = new Uint8Array(STAT_SIZE);
const statDv = new DataView(statBuf.buffer);
const fstatSym = (() => {
  // glibc ≥ 2.33 exports fstat; older ones only __fxstat. Resolve lazily via dlopen.
  const { dlopen } = require("bun:ffi") as typeof import("bun:ffi");
  try {
    return dlopen("libc.so.6", { fstat: { args: ["i32", "ptr"], returns: "i32" } }).symbols.fstat;
  } catch {
    return null;
  }
})();

/** struct statfs is 120 bytes on x86-64; f_type is its first field (a long). */
const statfsBuf = new BigInt64Array(16);

/**
 * fstatfs(2): the filesystem's magic number (f_type), e.g. TMPFS_MAGIC.
 * @example fsType(fd) === TMPFS_MAGIC
 */
export function fsType(fd: number): number {
  check("fstatfs", sym.fstatfs(fd, statfsBuf as any));
  return Number(statfsBuf[0]! & 0xffffffffn);
}

/** fstat(2): mode and size; the size of a block device comes from BLKGETSIZE64. */
export function fstat(fd: number): Stat {
  if (!fstatSym) throw new Error("fstat: not available in this libc");
  check("fstat", fstatSym(fd, statBuf as any));
  const mode = statDv.getUint32(STAT_MODE, true);
  let size = Number(statDv.getBigInt64(STAT_SIZE_OFF, true));
  const fmt = mode & 0o170000;
  if (fmt === 0o060000) {
    const b = new BigUint64Array(1);
    check("ioctl", sym.ioctl(fd, C.BLKGETSIZE64, b as any), "BLKGETSIZE64");
    size = Number(b[0]);
  }
  return { mode, size, isRegular: fmt === 0o100000, isBlock: fmt === 0o060000 };
}

export function memfdCreate(name: string, flags = C.MFD_CLOEXEC): number {
  return check("memfd_create", sym.memfd_create(cstr(name) as any, flags));
}

// ---- memory ---------------------------------------------------------------

/** mmap(2); returns the address as a number. */
export function mmap(len: number, prot: number, flags: number, fd: number, off: number): number {
  const p = sym.mmap(null, len, prot, flags, fd, off);
  if (p === -1) throw new ErrnoError("mmap", errno(), `${len} bytes at offset ${off} of fd ${fd}`);
  return p;
}

export function munmap(p: number, len: number): void {
  check("munmap", sym.munmap(p as any, len));
}

// ---- eventfd --------------------------------------------------------------

export function eventfd(initval = 0, flags = C.EFD_CLOEXEC | C.EFD_NONBLOCK): number {
  return check("eventfd", sym.eventfd(initval, flags));
}

const efBuf = new Uint8Array(8);
const efDv = new DataView(efBuf.buffer);

/** Adds `v` to an eventfd's counter (signals it). */
export function eventfdWrite(fd: number, v = 1): void {
  efDv.setBigUint64(0, BigInt(v), true);
  const r = retry("write", () => sym.write(fd, efBuf as any, 8), `eventfd ${fd}`);
  // EAGAIN: the counter is at its maximum; the reader is already signalled.
  void r;
}

/** Reads and clears an eventfd; `null` when it was not signalled (non-blocking). */
export function eventfdRead(fd: number): number | null {
  const r = retry("read", () => sym.read(fd, efBuf as any, 8), `eventfd ${fd}`);
  if (r === null) return null;
  return Number(efDv.getBigUint64(0, true));
}

// ---- unix sockets ------------------------------------------------------------

function sockaddrUn(path: string): Uint8Array {
  const p = enc.encode(path);
  if (p.length === 0 || p.length > SUN_PATH_MAX) {
    throw new Error(`socket path must be 1..${SUN_PATH_MAX} bytes: ${path}`);
  }
  const sa = new Uint8Array(SOCKADDR_UN_SIZE);
  sa[0] = C.AF_UNIX;
  sa.set(p, 2);
  return sa;
}

export function socketUnix(nonblock = true): number {
  const type = C.SOCK_STREAM | C.SOCK_CLOEXEC | (nonblock ? C.SOCK_NONBLOCK : 0);
  return check("socket", sym.socket(C.AF_UNIX, type, 0));
}

export function socketpair(nonblock = true): [number, number] {
  const sv = new Int32Array(2);
  const type = C.SOCK_STREAM | C.SOCK_CLOEXEC | (nonblock ? C.SOCK_NONBLOCK : 0);
  check("socketpair", sym.socketpair(C.AF_UNIX, type, 0, sv as any));
  return [sv[0]!, sv[1]!];
}

/** pipe2(O_CLOEXEC | O_NONBLOCK): [read end, write end]. */
export function pipe(): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", sym.pipe2(fds as any, C.O_CLOEXEC | C.O_NONBLOCK));
  return [fds[0]!, fds[1]!];
}

/** True when something accepts a connection on the unix socket `path` (the probe is closed at once). */
export function unixAccepts(path: string): boolean {
  const fd = socketUnix(true);
  try {
    connectUnix(fd, path);
    return true;
  } catch {
    return false;
  } finally {
    closeQuiet(fd);
  }
}

export function bindUnix(fd: number, path: string): void {
  const sa = sockaddrUn(path);
  check("bind", sym.bind(fd, sa as any, SOCKADDR_UN_SIZE), path);
}

export function listen(fd: number, backlog = 16): void {
  check("listen", sym.listen(fd, backlog));
}

/** accept4(2) with CLOEXEC|NONBLOCK; `null` when no connection is pending. */
export function accept(fd: number): number | null {
  return retry("accept4", () => sym.accept4(fd, null, null, C.SOCK_CLOEXEC | C.SOCK_NONBLOCK));
}

/** Connects a blocking or non-blocking unix socket; throws ErrnoError("connect", ...). */
export function connectUnix(fd: number, path: string): void {
  const sa = sockaddrUn(path);
  for (;;) {
    if (sym.connect(fd, sa as any, SOCKADDR_UN_SIZE) === 0) return;
    const e = errno();
    if (e !== EINTR) throw new ErrnoError("connect", e, path);
  }
}

/** shutdown(2): both directions by default, or only writing (the peer then reads EOF). */
export function shutdown(fd: number, how: "rdwr" | "wr" = "rdwr"): void {
  sym.shutdown(fd, how === "wr" ? 1 : C.SHUT_RDWR);
}

/**
 * One reusable message buffer for sendmsg/recvmsg with SCM_RIGHTS: msghdr,
 * one iovec, a control buffer for up to SCM_MAX_FD fds, and `capacity` bytes
 * of data, all in pinned memory. One per connection; not reentrant.
 */
export class MsgBuf {
  private readonly mem: Pinned;
  /** The data area: `recv` fills it, `send` sends from it. */
  readonly data: Uint8Array;
  readonly dataView: DataView;
  private readonly ctlOff: number;
  private readonly ctlSize = cmsgSpace(SCM_MAX_FD * 4);
  /** Set by `recv` when the kernel truncated the control data (fds were lost). */
  ctrunc = false;

  constructor(readonly capacity = 4096 + 12) {
    const dataOff = 256;
    this.ctlOff = dataOff + Math.ceil(capacity / 8) * 8;
    this.mem = Pinned.alloc(this.ctlOff + this.ctlSize);
    this.data = this.mem.u8.subarray(dataOff, dataOff + capacity);
    this.dataView = new DataView(this.mem.u8.buffer, dataOff, capacity);
    const dv = this.mem.dv;
    dv.setBigUint64(MSGHDR_IOV, BigInt(this.mem.ptr + MSGHDR_SIZE), true);
    dv.setBigUint64(MSGHDR_IOVLEN, 1n, true);
    dv.setBigUint64(MSGHDR_SIZE, BigInt(this.mem.ptr + dataOff), true);
  }

  private setup(off: number, len: number, ctlLen: number): void {
    const dv = this.mem.dv;
    dv.setBigUint64(MSGHDR_SIZE, BigInt(this.mem.ptr + 256 + off), true);
    dv.setBigUint64(MSGHDR_SIZE + 8, BigInt(len), true);
    dv.setBigUint64(MSGHDR_CONTROL, ctlLen ? BigInt(this.mem.ptr + this.ctlOff) : 0n, true);
    dv.setBigUint64(MSGHDR_CONTROLLEN, BigInt(ctlLen), true);
    dv.setInt32(MSGHDR_FLAGS, 0, true);
  }

  /**
   * Receives up to `len` bytes into `data[off..]`, appending passed fds to `fds`
   * (with MSG_CMSG_CLOEXEC). Returns the byte count (0 at EOF) or `null` on EAGAIN.
   */
  recv(fd: number, off: number, len: number, fds: number[]): number | null {
    if (off < 0 || len < 0 || off + len > this.capacity) throw new RangeError(`recv: ${off}+${len} > ${this.capacity}`);
    this.setup(off, len, this.ctlSize);
    const n = retry("recvmsg", () => sym.recvmsg(fd, this.mem.ptr as any, C.MSG_CMSG_CLOEXEC));
    if (n === null) return null;
    this.collectFds(fds);
    return n;
  }

  private collectFds(fds: number[]): void {
    const dv = this.mem.dv;
    const flags = dv.getInt32(MSGHDR_FLAGS, true);
    this.ctrunc = (flags & C.MSG_CTRUNC) !== 0;
    const ctlLen = Number(dv.getBigUint64(MSGHDR_CONTROLLEN, true));
    let off = 0;
    while (off + CMSG_HDR <= ctlLen) {
      const base = this.ctlOff + off;
      const clen = Number(dv.getBigUint64(base + CMSG_LEN_OFF, true));
      if (clen < CMSG_HDR || off + clen > ctlLen) break;
      if (dv.getInt32(base + CMSG_LEVEL, true) === C.SOL_SOCKET && dv.getInt32(base + CMSG_TYPE, true) === C.SCM_RIGHTS) {
        const n = (clen - CMSG_HDR) >> 2;
        for (let i = 0; i < n; i++) fds.push(dv.getInt32(base + CMSG_HDR + i * 4, true));
      }
      off += (clen + 7) & ~7;
    }
  }

  /** Sends `data[off..off+len]` with `fds` attached; returns bytes sent or `null` on EAGAIN. */
  send(fd: number, off: number, len: number, fds: readonly number[] = []): number | null {
    if (fds.length > SCM_MAX_FD) throw new RangeError(`sendmsg: ${fds.length} fds > ${SCM_MAX_FD}`);
    const ctlLen = fds.length ? cmsgSpace(fds.length * 4) : 0;
    this.setup(off, len, ctlLen);
    if (fds.length) {
      const dv = this.mem.dv;
      const b = this.ctlOff;
      dv.setBigUint64(b + CMSG_LEN_OFF, BigInt(CMSG_HDR + fds.length * 4), true);
      dv.setInt32(b + CMSG_LEVEL, C.SOL_SOCKET, true);
      dv.setInt32(b + CMSG_TYPE, C.SCM_RIGHTS, true);
      for (let i = 0; i < fds.length; i++) dv.setInt32(b + CMSG_HDR + i * 4, fds[i]!, true);
    }
    return retry("sendmsg", () => sym.sendmsg(fd, this.mem.ptr as any, C.MSG_NOSIGNAL));
  }

  free(): void {
    this.mem.free();
  }
}

// ---- epoll and poll -------------------------------------------------------------

export function epollCreate(): number {
  return check("epoll_create1", sym.epoll_create1(C.EPOLL_CLOEXEC));
}

const evBuf = new Uint8Array(16);
const evDv = new DataView(evBuf.buffer);

export function epollCtl(ep: number, op: number, fd: number, events: number, data: number): void {
  evDv.setUint32(0, events, true);
  evDv.setBigUint64(EPOLL_EVENT_DATA, BigInt(data), true);
  check("epoll_ctl", sym.epoll_ctl(ep, op, fd, evBuf as any), `fd ${fd}`);
}

/** An epoll_wait result buffer of `max` events. */
export class EpollEvents {
  readonly mem: Pinned;
  constructor(readonly max = 64) {
    this.mem = Pinned.alloc(max * EPOLL_EVENT_SIZE);
  }
  /** Blocks up to `timeoutMs` (-1: forever); returns the number of ready events. */
  wait(ep: number, timeoutMs: number): number {
    for (;;) {
      const n = sym.epoll_wait(ep, this.mem.ptr, this.max, timeoutMs);
      if (n >= 0) return n;
      const e = errno();
      if (e !== EINTR) throw new ErrnoError("epoll_wait", e);
    }
  }
  events(i: number): number {
    return this.mem.dv.getUint32(i * EPOLL_EVENT_SIZE, true);
  }
  data(i: number): number {
    return Number(this.mem.dv.getBigUint64(i * EPOLL_EVENT_SIZE + EPOLL_EVENT_DATA, true));
  }
}

const pollBuf = new Uint8Array(8);
const pollDv = new DataView(pollBuf.buffer);

/** poll(2) on one fd; returns revents (0 on timeout). */
export function poll1(fd: number, events: number, timeoutMs: number): number {
  const b = pollBuf;
  const dv = pollDv;
  dv.setInt32(0, fd, true);
  dv.setInt16(4, events, true);
  const r = retry("poll", () => sym.poll(b as any, 1n as any, timeoutMs)) ?? 0;
  return r > 0 ? dv.getInt16(6, true) : 0;
}

export { ptrOf };

// ---- hot paths without closures or throws, and ioctl ----------------------------

/** read(2) into a raw address: the byte count, or -errno (EINTR retried). For hot paths that sort errors themselves. */
export function readRaw(fd: number, p: number, len: number): number {
  for (;;) {
    const r = sym.read(fd, p as any, len);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** write(2) from a raw address: the byte count, or -errno (EINTR retried). */
export function writeRaw(fd: number, p: number, len: number): number {
  for (;;) {
    const r = sym.write(fd, p as any, len);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** readv(2) with an iovec table at `iov` (pinned memory) of `cnt` entries: bytes, or -errno (EINTR retried). */
export function readvRaw(fd: number, iov: number, cnt: number): number {
  for (;;) {
    const r = sym.readv(fd, iov as any, cnt);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** writev(2) with an iovec table at `iov` of `cnt` entries: bytes, or -errno (EINTR retried). */
export function writevRaw(fd: number, iov: number, cnt: number): number {
  for (;;) {
    const r = sym.writev(fd, iov as any, cnt);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/**
 * ioctl(2) whose argument is a buffer (the kernel reads and/or fills it) or an
 * integer passed by value (e.g. TUNSETOFFLOAD); throws ErrnoError("ioctl", e, what).
 * @example ioctl(fd, TUNSETVNETHDRSZ, new Int32Array([12]), "TUNSETVNETHDRSZ")
 */
export function ioctl(fd: number, req: number, arg: NodeJS.TypedArray | number, what: string): number {
  for (;;) {
    const r = sym.ioctl(fd, req, arg as any);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) throw new ErrnoError("ioctl", e, what);
  }
}

/** socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0): a handle for SIOC* interface ioctls. */
export function socketDgram(family: number = C.AF_INET): number {
  return check("socket", sym.socket(family, C.SOCK_DGRAM | C.SOCK_CLOEXEC, 0));
}

/**
 * memcpy(3) between two host addresses the caller has checked (pieces of
 * guest memory mapped in this process); no return value.
 */
export function memcpy(dst: number, src: number, n: number): void {
  sym.memcpy(dst, src, n);
}

const CLOCK_MONOTONIC = 1;
const TFD_NONBLOCK = 0o4000, TFD_CLOEXEC = 0o2000000;

/**
 * A periodic timer fd (CLOCK_MONOTONIC, non-blocking): readable every
 * `intervalMs`; read it with eventfdRead (the same 8-byte counter).
 */
export function timerfd(intervalMs: number): number {
  const fd = check("timerfd_create", sym.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  const spec = new BigInt64Array(4); // it_interval {sec, nsec}, it_value {sec, nsec}
  const sec = Math.floor(intervalMs / 1000), nsec = Math.round((intervalMs % 1000) * 1e6);
  spec[0] = BigInt(sec); spec[1] = BigInt(nsec); spec[2] = BigInt(sec); spec[3] = BigInt(nsec);
  const r = sym.timerfd_settime(fd, 0, spec, null);
  if (r < 0) {
    closeQuiet(fd);
    check("timerfd_settime", r);
  }
  return fd;
}

// ---- filesystems: the *at calls on O_PATH fds (virtio-fs) ---------------------------
//
// Raw variants return the result or -errno (EINTR retried where a call can block) and
// allocate nothing: the virtio-fs device turns -errno into its FUSE reply. Paths are
// NUL-terminated byte strings (CStr) whose last byte must be 0, checked on every call: a
// missing terminator would let the kernel read past the buffer. The throwing variants
// take JS strings and allocate; use them for setup and tests.
//
// What an O_PATH fd accepts (measured on Linux 6.18; see tests/unit/host_fs.test.ts):
// statx/fchownat/utimensat/linkat/readlinkat with "" + AT_EMPTY_PATH, fchmodat2 with
// AT_EMPTY_PATH (Linux ≥ 6.6; glibc's fchmodat refuses the flag with EINVAL), fstatfs, and
// use as the dirfd of any *at call. EBADF: fchmod, ftruncate, fsync, syncfs, getdents64,
// f*xattr, and getxattrat(2) with AT_EMPTY_PATH. Those need a real fd, reopened through
// /proc/self/fd/N, or for xattrs the path "/proc/self/fd/N" with getxattr() (which acts on
// the fd's inode, a symlink's own inode included); lgetxattr() on that path would act on
// the proc link itself.

import { EINVAL } from "./errno.ts";

/** A NUL-terminated byte string; the first 0 ends it and the last byte must be 0. */
export type CStr = Uint8Array;

/** `s` as a CStr (allocates). */
export function cstring(s: string): CStr {
  return cstr(s);
}

/** "": with AT_EMPTY_PATH the *at calls act on the dirfd itself. */
export const EMPTY_PATH: CStr = new Uint8Array(1);

const unterminated = (p: CStr) => p.byteLength === 0 || p[p.byteLength - 1] !== 0;
/** `r`, or -errno when the call failed; errno is read right after the call returned `r`. */
const orErrno = (r: number) => (r >= 0 ? r : -errno());
const orThrow = (name: string, r: number, detail = "") => {
  if (r < 0) throw new ErrnoError(name, -r, detail);
  return r;
};
const dec = new TextDecoder();

// Scratch memory for structs handed to the kernel by address (open_how, statx, timespecs,
// copy_file_range offsets). Calls are synchronous and one thread owns this module's state.
const fsScratch = Pinned.alloc(4096);
const HOW_OFF = 0, TIMES_OFF = 32, CFR_OFF = 64, STATX_OFF = 256, STATX_SIZE = 256;

function putU64(dv: DataView, off: number, v: number): void {
  const hi = Math.floor(v / 2 ** 32);
  dv.setUint32(off, v - hi * 2 ** 32, true);
  dv.setInt32(off + 4, hi, true);
}

/** openat(2) with O_CLOEXEC added: the fd, or -errno. */
export function openatRaw(dirfd: number, path: CStr, flags: number, mode = 0): number {
  if (unterminated(path)) return -EINVAL;
  for (;;) {
    const r = sym.openat(dirfd, path, flags | C.O_CLOEXEC, mode);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

export function openat(dirfd: number, path: string, flags: number, mode = 0o644): number {
  return orThrow("openat", openatRaw(dirfd, cstr(path), flags, mode), path);
}

/**
 * openat2(2) (Linux ≥ 5.6) with O_CLOEXEC added: struct open_how { flags, mode, resolve }.
 * -ENOSYS on older kernels. RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
 * keeps the walk below `dirfd` and refuses every symlink on it (the last component too,
 * unless `flags` has O_PATH | O_NOFOLLOW, which opens a final symlink as itself).
 */
export function openat2Raw(dirfd: number, path: CStr, flags: number, mode: number, resolve: number): number {
  if (unterminated(path)) return -EINVAL;
  const dv = fsScratch.dv;
  putU64(dv, HOW_OFF, flags | C.O_CLOEXEC);
  putU64(dv, HOW_OFF + 8, mode);
  putU64(dv, HOW_OFF + 16, resolve);
  for (;;) {
    const r = sym.syscall(C.SYS_openat2, dirfd, ptrOf(path), fsScratch.ptr + HOW_OFF, C.OPEN_HOW_SIZE, 0, 0);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

export function openat2(dirfd: number, path: string, flags: number, mode: number, resolve: number): number {
  return orThrow("openat2", openat2Raw(dirfd, cstr(path), flags, mode, resolve), path);
}

/**
 * struct statx decoded into numbers; one object is reused call after call. u64 fields that
 * leave the process exactly (ino) also come as u32 halves; sizes, blocks and times are
 * numbers (exact below 2^53 bytes / seconds).
 */
export class Statx {
  /** STATX_* bits the kernel filled. */
  mask = 0;
  mode = 0;
  nlink = 0;
  uid = 0;
  gid = 0;
  blksize = 0;
  ino = 0;
  inoLo = 0;
  inoHi = 0;
  size = 0;
  blocks = 0;
  atimeSec = 0;
  atimeNsec = 0;
  mtimeSec = 0;
  mtimeNsec = 0;
  ctimeSec = 0;
  ctimeNsec = 0;
  rdevMajor = 0;
  rdevMinor = 0;
  devMajor = 0;
  devMinor = 0;
  mntId = 0;

  /** mode & S_IFMT */
  get type(): number {
    return this.mode & 0o170000;
  }
  /** st_dev as glibc's makedev() encodes it. */
  get dev(): number {
    return makedev(this.devMajor, this.devMinor);
  }
  get rdev(): number {
    return makedev(this.rdevMajor, this.rdevMinor);
  }
  /** Same device and inode number: the same file. */
  sameInode(o: Statx): boolean {
    return this.inoLo === o.inoLo && this.inoHi === o.inoHi && this.devMajor === o.devMajor && this.devMinor === o.devMinor;
  }
  copyFrom(o: Statx): this {
    Object.assign(this, o);
    return this;
  }
}

/** glibc makedev(): minor low 8 bits, major 12 bits, minor next 12, major the rest; as a number. */
function makedev(major: number, minor: number): number {
  return (minor & 0xff) + (major & 0xfff) * 2 ** 8 + (minor >>> 8) * 2 ** 20 + (major >>> 12) * 2 ** 44;
}

function decodeStatx(dv: DataView, b: number, o: Statx): void {
  const u64 = (off: number) => dv.getUint32(b + off, true) + dv.getUint32(b + off + 4, true) * 2 ** 32;
  const s64 = (off: number) => dv.getUint32(b + off, true) + dv.getInt32(b + off + 4, true) * 2 ** 32;
  o.mask = dv.getUint32(b, true);
  o.blksize = dv.getUint32(b + 4, true);
  o.nlink = dv.getUint32(b + 16, true);
  o.uid = dv.getUint32(b + 20, true);
  o.gid = dv.getUint32(b + 24, true);
  o.mode = dv.getUint16(b + 28, true);
  o.inoLo = dv.getUint32(b + 32, true);
  o.inoHi = dv.getUint32(b + 36, true);
  o.ino = o.inoLo + o.inoHi * 2 ** 32;
  o.size = u64(40);
  o.blocks = u64(48);
  o.atimeSec = s64(64);
  o.atimeNsec = dv.getUint32(b + 72, true);
  o.ctimeSec = s64(96);
  o.ctimeNsec = dv.getUint32(b + 104, true);
  o.mtimeSec = s64(112);
  o.mtimeNsec = dv.getUint32(b + 120, true);
  o.rdevMajor = dv.getUint32(b + 128, true);
  o.rdevMinor = dv.getUint32(b + 132, true);
  o.devMajor = dv.getUint32(b + 136, true);
  o.devMinor = dv.getUint32(b + 140, true);
  o.mntId = u64(144);
}

/** statx(2) into `out`: 0 or -errno. */
export function statxRaw(dirfd: number, path: CStr, flags: number, mask: number, out: Statx): number {
  if (unterminated(path)) return -EINVAL;
  const r = sym.syscall(C.SYS_statx, dirfd, ptrOf(path), flags, mask, fsScratch.ptr + STATX_OFF, 0);
  if (r < 0) return -errno();
  decodeStatx(fsScratch.dv, STATX_OFF, out);
  return 0;
}

/** statx of the fd itself (an O_PATH fd of a symlink describes the symlink): 0 or -errno. */
export function fstatxRaw(fd: number, out: Statx, mask = C.STATX_BASIC_STATS | C.STATX_MNT_ID): number {
  return statxRaw(fd, EMPTY_PATH, C.AT_EMPTY_PATH | C.AT_SYMLINK_NOFOLLOW, mask, out);
}

export function statx(dirfd: number, path: string, flags = C.AT_SYMLINK_NOFOLLOW, out = new Statx()): Statx {
  orThrow("statx", statxRaw(dirfd, cstr(path), flags, C.STATX_BASIC_STATS | C.STATX_MNT_ID, out), path);
  return out;
}

export function mkdiratRaw(dirfd: number, path: CStr, mode: number): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.mkdirat(dirfd, path, mode));
}

export function mkdirat(dirfd: number, path: string, mode = 0o755): void {
  orThrow("mkdirat", mkdiratRaw(dirfd, cstr(path), mode), path);
}

/** mknodat(2): `mode` carries the file type (S_IFIFO, S_IFSOCK, S_IFREG, S_IFCHR, S_IFBLK). */
export function mknodatRaw(dirfd: number, path: CStr, mode: number, dev = 0): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.mknodat(dirfd, path, mode, dev));
}

/** symlinkat(2): a link at dirfd/path holding `target` (stored as given, never resolved here). */
export function symlinkatRaw(target: CStr, dirfd: number, path: CStr): number {
  if (unterminated(target) || unterminated(path)) return -EINVAL;
  return orErrno(sym.symlinkat(target, dirfd, path));
}

export function symlinkat(target: string, dirfd: number, path: string): void {
  orThrow("symlinkat", symlinkatRaw(cstr(target), dirfd, cstr(path)), path);
}

/** readlinkat(2) into `buf` (no NUL added): the length, or -errno; a full buffer may mean truncation. */
export function readlinkatRaw(dirfd: number, path: CStr, buf: Uint8Array): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.readlinkat(dirfd, path, buf, buf.byteLength));
}

export function readlinkat(dirfd: number, path: string): string {
  const buf = new Uint8Array(C.PATH_MAX);
  const n = orThrow("readlinkat", readlinkatRaw(dirfd, cstr(path), buf), path);
  return dec.decode(buf.subarray(0, n));
}

/** unlinkat(2); AT_REMOVEDIR removes an empty directory. */
export function unlinkatRaw(dirfd: number, path: CStr, flags: number): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.unlinkat(dirfd, path, flags));
}

export function unlinkat(dirfd: number, path: string, flags = 0): void {
  orThrow("unlinkat", unlinkatRaw(dirfd, cstr(path), flags), path);
}

/** renameat2(2) (Linux ≥ 3.15): RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT. */
export function renameat2Raw(olddirfd: number, oldpath: CStr, newdirfd: number, newpath: CStr, flags: number): number {
  if (unterminated(oldpath) || unterminated(newpath)) return -EINVAL;
  return orErrno(sym.syscall(C.SYS_renameat2, olddirfd, ptrOf(oldpath), newdirfd, ptrOf(newpath), flags, 0));
}

export function renameat2(olddirfd: number, oldpath: string, newdirfd: number, newpath: string, flags = 0): void {
  orThrow("renameat2", renameat2Raw(olddirfd, cstr(oldpath), newdirfd, cstr(newpath), flags), `${oldpath} -> ${newpath}`);
}

/**
 * linkat(2). With "" and AT_EMPTY_PATH it links the inode of `olddirfd` (needs
 * CAP_DAC_READ_SEARCH; -ENOENT without it); AT_SYMLINK_FOLLOW on "/proc/self/fd/N" does the
 * same without the capability.
 */
export function linkatRaw(olddirfd: number, oldpath: CStr, newdirfd: number, newpath: CStr, flags: number): number {
  if (unterminated(oldpath) || unterminated(newpath)) return -EINVAL;
  return orErrno(sym.linkat(olddirfd, oldpath, newdirfd, newpath, flags));
}

/**
 * fchmodat(2). With flags (AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW) it is fchmodat2 (Linux ≥ 6.6;
 * -ENOSYS before); a symlink's mode cannot change (-EOPNOTSUPP).
 */
export function fchmodatRaw(dirfd: number, path: CStr, mode: number, flags: number): number {
  if (unterminated(path)) return -EINVAL;
  if (flags === 0) return orErrno(sym.fchmodat(dirfd, path, mode, 0));
  return orErrno(sym.syscall(C.SYS_fchmodat2, dirfd, ptrOf(path), mode, flags, 0, 0));
}

/** fchmod(2) of an fd opened for I/O (-EBADF on O_PATH). */
export function fchmodRaw(fd: number, mode: number): number {
  return orErrno(sym.fchmod(fd, mode));
}

/** fchownat(2); -1 leaves the uid or gid as it is. */
export function fchownatRaw(dirfd: number, path: CStr, uid: number, gid: number, flags: number): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.fchownat(dirfd, path, uid >>> 0, gid >>> 0, flags));
}

/** utimensat(2): a nanosecond field may be UTIME_NOW (its seconds ignored) or UTIME_OMIT. */
export function utimensatRaw(
  dirfd: number, path: CStr, atimeSec: number, atimeNsec: number, mtimeSec: number, mtimeNsec: number, flags: number,
): number {
  if (unterminated(path)) return -EINVAL;
  const dv = fsScratch.dv;
  putU64(dv, TIMES_OFF, atimeSec);
  putU64(dv, TIMES_OFF + 8, atimeNsec);
  putU64(dv, TIMES_OFF + 16, mtimeSec);
  putU64(dv, TIMES_OFF + 24, mtimeNsec);
  return orErrno(sym.utimensat(dirfd, path, fsScratch.ptr + TIMES_OFF, flags));
}

export function ftruncateRaw(fd: number, size: number): number {
  for (;;) {
    const r = sym.ftruncate(fd, size);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/**
 * lseek(2): the new offset, or -errno (SEEK_DATA/SEEK_HOLE past the data: -ENXIO). A
 * directory offset is an opaque cookie of up to 63 bits (ext4 hashes): pass it as a bigint
 * when it is 2^53 or more.
 */
export function lseekRaw(fd: number, off: number | bigint, whence: number): number {
  return orErrno(sym.lseek(fd, off, whence));
}

/**
 * copy_file_range(2): bytes copied, or -errno. An offset of -1 means "the fd's file
 * position" (NULL); explicit offsets are not written back.
 */
export function copyFileRangeRaw(fdIn: number, offIn: number, fdOut: number, offOut: number, len: number, flags = 0): number {
  const dv = fsScratch.dv;
  putU64(dv, CFR_OFF, offIn);
  putU64(dv, CFR_OFF + 8, offOut);
  const pIn = offIn < 0 ? 0 : fsScratch.ptr + CFR_OFF;
  const pOut = offOut < 0 ? 0 : fsScratch.ptr + CFR_OFF + 8;
  for (;;) {
    const r = sym.syscall(C.SYS_copy_file_range, fdIn, pIn, fdOut, pOut, len, flags);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** struct statfs (LP64), decoded; one object is reused. */
export class Statfs {
  type = 0;
  bsize = 0;
  blocks = 0;
  bfree = 0;
  bavail = 0;
  files = 0;
  ffree = 0;
  namelen = 0;
  frsize = 0;
  flags = 0;
}

const statfsOut = new Uint8Array(120);
const statfsOutDv = new DataView(statfsOut.buffer);

/** fstatfs(2) into `out` (an O_PATH fd will do): 0 or -errno. */
export function fstatfsRaw(fd: number, out: Statfs): number {
  const r = sym.fstatfs(fd, statfsOut);
  if (r < 0) return -errno();
  const dv = statfsOutDv;
  const u64 = (off: number) => dv.getUint32(off, true) + dv.getUint32(off + 4, true) * 2 ** 32;
  out.type = u64(0);
  out.bsize = u64(8);
  out.blocks = u64(16);
  out.bfree = u64(24);
  out.bavail = u64(32);
  out.files = u64(40);
  out.ffree = u64(48);
  out.namelen = u64(64);
  out.frsize = u64(72);
  out.flags = u64(80);
  return 0;
}

export function statfs(fd: number, out = new Statfs()): Statfs {
  orThrow("fstatfs", fstatfsRaw(fd, out), `fd ${fd}`);
  return out;
}

// struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, char d_name[] (NUL-terminated).
const DIRENT_OFF = 8, DIRENT_RECLEN = 16, DIRENT_TYPE = 18, DIRENT_NAME = 19;

/**
 * A reusable getdents64 buffer and a cursor over the entries it holds. `off` of an entry is
 * the position just after it: seek there (lseekRaw) to resume with the next entry. Offsets
 * are cookies of up to 63 bits, so they come as u32 halves too.
 * @example
 * const d = new Dirents();
 * while (getdents64Raw(dirFd, d) > 0) while (d.next()) console.log(d.name(), d.type);
 */
export class Dirents {
  readonly buf: Uint8Array;
  private readonly dv: DataView;
  private end = 0;
  private pos = 0;
  inoLo = 0;
  inoHi = 0;
  offLo = 0;
  offHi = 0;
  /** DT_* */
  type = 0;
  /** The current name is buf[nameOff, nameOff + nameLen). */
  nameOff = 0;
  nameLen = 0;

  /** `size` ≥ 280 holds the longest entry (19 + NAME_MAX + NUL, 8-aligned); getdents64 says EINVAL below that. */
  constructor(size = 32768) {
    this.buf = new Uint8Array(size);
    this.dv = new DataView(this.buf.buffer);
  }
  /** Makes the first `n` bytes of `buf` the entries to walk (getdents64Raw calls it). */
  reset(n: number): void {
    this.end = n > 0 ? n : 0;
    this.pos = 0;
  }
  /** Steps to the next entry; false when the buffer is used up. */
  next(): boolean {
    const p = this.pos;
    if (p + DIRENT_NAME >= this.end) return false;
    const dv = this.dv;
    const reclen = dv.getUint16(p + DIRENT_RECLEN, true);
    if (reclen <= DIRENT_NAME || p + reclen > this.end) return false; // never from the kernel
    this.inoLo = dv.getUint32(p, true);
    this.inoHi = dv.getUint32(p + 4, true);
    this.offLo = dv.getUint32(p + DIRENT_OFF, true);
    this.offHi = dv.getUint32(p + DIRENT_OFF + 4, true);
    this.type = this.buf[p + DIRENT_TYPE]!;
    this.nameOff = p + DIRENT_NAME;
    const nul = this.buf.indexOf(0, this.nameOff);
    this.nameLen = (nul < 0 || nul > p + reclen ? p + reclen : nul) - this.nameOff;
    this.pos = p + reclen;
    return true;
  }
  get ino(): number {
    return this.inoLo + this.inoHi * 2 ** 32;
  }
  /** The resume offset as a number when below 2^53, else as a bigint (for lseekRaw). */
  get off(): number | bigint {
    return this.offHi < 2 ** 21 ? this.offLo + this.offHi * 2 ** 32 : (BigInt(this.offHi) << 32n) | BigInt(this.offLo);
  }
  /** "." or "..". */
  get isDot(): boolean {
    const b = this.buf, o = this.nameOff, n = this.nameLen;
    return b[o] === 0x2e && (n === 1 || (n === 2 && b[o + 1] === 0x2e));
  }
  /** The name's bytes, a view valid until the next fill. */
  nameBytes(): Uint8Array {
    return this.buf.subarray(this.nameOff, this.nameOff + this.nameLen);
  }
  /** The name decoded as UTF-8 (allocates). */
  name(): string {
    return dec.decode(this.nameBytes());
  }
}

/** getdents64(2) from the fd's position into `d`: bytes read (0 at the end), or -errno. */
export function getdents64Raw(fd: number, d: Dirents): number {
  const r = sym.syscall(C.SYS_getdents64, fd, ptrOf(d.buf), d.buf.byteLength, 0, 0, 0);
  if (r < 0) {
    d.reset(0);
    return -errno();
  }
  d.reset(r);
  return r;
}

/** fgetxattr(2) of an fd opened for I/O; `buf` null asks for the size. Bytes, or -errno. */
export function fgetxattrRaw(fd: number, name: CStr, buf: Uint8Array | null): number {
  if (unterminated(name)) return -EINVAL;
  return orErrno(sym.fgetxattr(fd, name, buf, buf ? buf.byteLength : 0));
}

/** getxattr(2) by path, following a final symlink; on "/proc/self/fd/N" the fd's own inode. */
export function getxattrRaw(path: CStr, name: CStr, buf: Uint8Array | null): number {
  if (unterminated(path) || unterminated(name)) return -EINVAL;
  return orErrno(sym.getxattr(path, name, buf, buf ? buf.byteLength : 0));
}

/** fsetxattr(2); flags XATTR_CREATE / XATTR_REPLACE. 0 or -errno. */
export function fsetxattrRaw(fd: number, name: CStr, value: Uint8Array, flags: number): number {
  if (unterminated(name)) return -EINVAL;
  return orErrno(sym.fsetxattr(fd, name, value, value.byteLength, flags));
}

export function setxattrRaw(path: CStr, name: CStr, value: Uint8Array, flags: number): number {
  if (unterminated(path) || unterminated(name)) return -EINVAL;
  return orErrno(sym.setxattr(path, name, value, value.byteLength, flags));
}

/** flistxattr(2): NUL-separated names into `buf` (null: the size needed). Bytes, or -errno. */
export function flistxattrRaw(fd: number, buf: Uint8Array | null): number {
  return orErrno(sym.flistxattr(fd, buf, buf ? buf.byteLength : 0));
}

export function listxattrRaw(path: CStr, buf: Uint8Array | null): number {
  if (unterminated(path)) return -EINVAL;
  return orErrno(sym.listxattr(path, buf, buf ? buf.byteLength : 0));
}

export function fremovexattrRaw(fd: number, name: CStr): number {
  if (unterminated(name)) return -EINVAL;
  return orErrno(sym.fremovexattr(fd, name));
}

export function removexattrRaw(path: CStr, name: CStr): number {
  if (unterminated(path) || unterminated(name)) return -EINVAL;
  return orErrno(sym.removexattr(path, name));
}

export function fsyncRaw(fd: number): number {
  for (;;) {
    const r = sym.fsync(fd);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

export function fdatasyncRaw(fd: number): number {
  for (;;) {
    const r = sym.fdatasync(fd);
    if (r >= 0) return r;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** syncfs(2): flushes the filesystem holding the fd (an fd opened for I/O; -EBADF on O_PATH). */
export function syncfsRaw(fd: number): number {
  return orErrno(sym.syncfs(fd));
}

/** dup with FD_CLOEXEC (fcntl F_DUPFD_CLOEXEC): the new fd, or -errno. Works on O_PATH fds. */
export function dupRaw(fd: number): number {
  return orErrno(sym.fcntl(fd, C.F_DUPFD_CLOEXEC, 0));
}

/** fcntl(F_GETFL): the open flags (O_PATH among them for an O_PATH fd), or -errno. */
export function getflRaw(fd: number): number {
  return orErrno(sym.fcntl(fd, C.F_GETFL, 0));
}

/** close(2): 0, or -errno; EINTR counts as closed (Linux always releases the fd). */
export function closeRaw(fd: number): number {
  const r = sym.close(fd);
  if (r >= 0) return 0;
  const e = errno();
  return e === EINTR ? 0 : -e;
}

/** fallocate(2): 0 or -errno (EINTR retried). */
export function fallocateRaw(fd: number, mode: number, off: number, len: number): number {
  for (;;) {
    const r = sym.fallocate(fd, mode, off, len);
    if (r >= 0) return 0;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

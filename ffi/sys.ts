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

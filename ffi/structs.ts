/**
 * C structs as offset constants over memory that never moves. Buffers handed
 * to the kernel are allocated with mmap (not from the JS heap) so that a
 * pointer taken once stays valid for the buffer's whole life.
 */
import { toArrayBuffer } from "bun:ffi";
import { sym } from "./libc.ts";
import { errno, ErrnoError } from "./errno.ts";
import { MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE } from "./constants.ts";

/** Memory outside the JS heap with a stable address; `free()` unmaps it. */
export class Pinned {
  readonly u8: Uint8Array;
  readonly dv: DataView;
  private live = true;
  constructor(readonly ptr: number, readonly size: number) {
    this.u8 = new Uint8Array(toArrayBuffer(ptr as any, 0, size));
    this.dv = new DataView(this.u8.buffer);
  }
  static alloc(size: number): Pinned {
    const len = Math.max(4096, Math.ceil(size / 4096) * 4096);
    const p = sym.mmap(null, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p === -1) throw new ErrnoError("mmap", errno(), `pinned buffer of ${len} bytes`);
    return new Pinned(p, len);
  }
  /** Only call once nothing (JS view or kernel) uses the buffer any more. */
  free(): void {
    if (!this.live) return;
    this.live = false;
    sym.munmap(this.ptr as any, this.size);
  }
}

// struct msghdr (x86-64 / aarch64 LP64)
export const MSGHDR_NAME = 0, MSGHDR_NAMELEN = 8, MSGHDR_IOV = 16, MSGHDR_IOVLEN = 24,
  MSGHDR_CONTROL = 32, MSGHDR_CONTROLLEN = 40, MSGHDR_FLAGS = 48, MSGHDR_SIZE = 56;
// struct iovec
export const IOVEC_BASE = 0, IOVEC_LEN = 8, IOVEC_SIZE = 16;
// struct cmsghdr
export const CMSG_LEN_OFF = 0, CMSG_LEVEL = 8, CMSG_TYPE = 12, CMSG_HDR = 16;
/** CMSG_SPACE(n) for LP64. */
export const cmsgSpace = (n: number) => CMSG_HDR + ((n + 7) & ~7);
/** The kernel's per-message limit on passed fds (SCM_MAX_FD). */
export const SCM_MAX_FD = 253;

// struct sockaddr_un
export const SOCKADDR_UN_SIZE = 110;
export const SUN_PATH_MAX = 107;

// struct epoll_event is packed on x86-64: u32 events, u64 data.
export const EPOLL_EVENT_SIZE = process.arch === "x64" ? 12 : 16;
export const EPOLL_EVENT_DATA = process.arch === "x64" ? 4 : 8;

// struct stat (x86-64)
export const STAT_SIZE = 144, STAT_MODE = 24, STAT_SIZE_OFF = 48;
export const S_IFMT = 0o170000, S_IFREG = 0o100000, S_IFBLK = 0o060000;

/** errno numbers and names, and the error that carries them. */
import { read } from "bun:ffi";
import { sym } from "./libc.ts";

export const EPERM = 1, ENOENT = 2, EINTR = 4, EIO = 5, EBADF = 9, EAGAIN = 11, ENOMEM = 12,
  EACCES = 13, EFAULT = 14, EBUSY = 16, EEXIST = 17, ENODEV = 19, EINVAL = 22, EMFILE = 24,
  ENOSPC = 28, ESPIPE = 29, EPIPE = 32, ERANGE = 34, ENOSYS = 38, EOPNOTSUPP = 95,
  EADDRINUSE = 98, ECONNRESET = 104, ENOTCONN = 107, ECONNREFUSED = 111, ETIMEDOUT = 110;

const NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 9: "EBADF",
  11: "EAGAIN", 12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV",
  20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 24: "EMFILE", 25: "ENOTTY", 27: "EFBIG",
  28: "ENOSPC", 29: "ESPIPE", 30: "EROFS", 32: "EPIPE", 34: "ERANGE", 38: "ENOSYS",
  88: "ENOTSOCK", 90: "EMSGSIZE", 95: "EOPNOTSUPP", 98: "EADDRINUSE", 99: "EADDRNOTAVAIL",
  104: "ECONNRESET", 107: "ENOTCONN", 110: "ETIMEDOUT", 111: "ECONNREFUSED", 75: "EOVERFLOW",
};

/** The name of an errno value, e.g. `errnoName(11) === "EAGAIN"`. */
export function errnoName(e: number): string {
  return NAMES[e] ?? `E${e}`;
}

const errnoPtr = sym.__errno_location()!;

/** errno of the calling thread; read it first thing after the failing call. */
export function errno(): number {
  return read.i32(errnoPtr, 0);
}

/**
 * A failed system call: `message` is `"accept4: EAGAIN (11)"`, `code` the errno name.
 * @example
 * try { sys.close(-1) } catch (e) { (e as ErrnoError).code === "EBADF" }
 */
export class ErrnoError extends Error {
  override name = "ErrnoError";
  readonly code: string;
  constructor(readonly syscall: string, readonly errno: number, detail = "") {
    super(`${syscall}: ${errnoName(errno)} (${errno})${detail ? `: ${detail}` : ""}`);
    this.code = errnoName(errno);
  }
}

/**
 * The one dlopen of libc. Symbols are declared as C declares them; sizes and
 * returns that may carry a -1 sentinel use `i64_fast`/`i32` so that the value
 * arrives as a plain number (never a BigInt, never a "pointer" to MAP_FAILED).
 * Nothing but `ffi/` may import this module.
 */
import { dlopen } from "bun:ffi";

const path = process.platform === "linux" ? "libc.so.6" : "libc.dylib";

export const libc = dlopen(path, {
  __errno_location: { args: [], returns: "ptr" },
  strerror: { args: ["i32"], returns: "cstring" },

  socket: { args: ["i32", "i32", "i32"], returns: "i32" },
  socketpair: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  bind: { args: ["i32", "ptr", "u32"], returns: "i32" },
  listen: { args: ["i32", "i32"], returns: "i32" },
  accept4: { args: ["i32", "ptr", "ptr", "i32"], returns: "i32" },
  connect: { args: ["i32", "ptr", "u32"], returns: "i32" },
  shutdown: { args: ["i32", "i32"], returns: "i32" },
  recvmsg: { args: ["i32", "ptr", "i32"], returns: "i64_fast" },
  sendmsg: { args: ["i32", "ptr", "i32"], returns: "i64_fast" },
  getsockopt: { args: ["i32", "i32", "i32", "ptr", "ptr"], returns: "i32" },

  open: { args: ["cstring", "i32", "u32"], returns: "i32" },
  close: { args: ["i32"], returns: "i32" },
  read: { args: ["i32", "ptr", "usize"], returns: "i64_fast" },
  write: { args: ["i32", "ptr", "usize"], returns: "i64_fast" },
  pread: { args: ["i32", "ptr", "usize", "i64_fast"], returns: "i64_fast" },
  pwrite: { args: ["i32", "ptr", "usize", "i64_fast"], returns: "i64_fast" },
  preadv: { args: ["i32", "ptr", "i32", "i64_fast"], returns: "i64_fast" },
  pwritev: { args: ["i32", "ptr", "i32", "i64_fast"], returns: "i64_fast" },
  fsync: { args: ["i32"], returns: "i32" },
  fdatasync: { args: ["i32"], returns: "i32" },
  fallocate: { args: ["i32", "i32", "i64_fast", "i64_fast"], returns: "i32" },
  ftruncate: { args: ["i32", "i64_fast"], returns: "i32" },
  lseek: { args: ["i32", "i64_fast", "i32"], returns: "i64_fast" },
  fcntl: { args: ["i32", "i32", "i64_fast"], returns: "i32" },
  ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
  dup: { args: ["i32"], returns: "i32" },

  mmap: { args: ["ptr", "usize", "i32", "i32", "i32", "i64_fast"], returns: "i64_fast" },
  munmap: { args: ["ptr", "usize"], returns: "i32" },
  memfd_create: { args: ["cstring", "u32"], returns: "i32" },
  eventfd: { args: ["u32", "i32"], returns: "i32" },

  epoll_create1: { args: ["i32"], returns: "i32" },
  epoll_ctl: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  epoll_wait: { args: ["i32", "ptr", "i32", "i32"], returns: "i32" },
  poll: { args: ["ptr", "u64", "i32"], returns: "i32" },
});

export const sym = libc.symbols;

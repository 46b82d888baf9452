/**
 * The one dlopen of libc. Symbols are declared as C declares them; sizes and
 * returns that may carry a -1 sentinel use `i64_fast`/`i32` so that the value
 * arrives as a plain number (never a BigInt, never a "pointer" to MAP_FAILED).
 * Nothing but `ffi/` may import this module.
 */
import { dlopen, FFIType, type Pointer } from "bun:ffi";

const i64f = FFIType.i64_fast;

const path = process.platform === "linux" ? "libc.so.6" : "libc.dylib";

export const libc = dlopen(path, {
  __errno_location: { args: [], returns: "ptr" },
  strerror: { args: ["i32"], returns: "cstring" },

  socket: { args: ["i32", "i32", "i32"], returns: "i32" },
  socketpair: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  pipe2: { args: ["ptr", "i32"], returns: "i32" },
  bind: { args: ["i32", "ptr", "u32"], returns: "i32" },
  listen: { args: ["i32", "i32"], returns: "i32" },
  accept4: { args: ["i32", "ptr", "ptr", "i32"], returns: "i32" },
  connect: { args: ["i32", "ptr", "u32"], returns: "i32" },
  shutdown: { args: ["i32", "i32"], returns: "i32" },
  recvmsg: { args: ["i32", "ptr", "i32"], returns: i64f },
  sendmsg: { args: ["i32", "ptr", "i32"], returns: i64f },
  getsockopt: { args: ["i32", "i32", "i32", "ptr", "ptr"], returns: "i32" },

  open: { args: ["cstring", "i32", "u32"], returns: "i32" },
  fstatfs: { args: ["i32", "ptr"], returns: "i32" },
  close: { args: ["i32"], returns: "i32" },
  read: { args: ["i32", "ptr", "usize"], returns: i64f },
  write: { args: ["i32", "ptr", "usize"], returns: i64f },
  pread: { args: ["i32", "ptr", "usize", i64f], returns: i64f },
  pwrite: { args: ["i32", "ptr", "usize", i64f], returns: i64f },
  preadv: { args: ["i32", "ptr", "i32", i64f], returns: i64f },
  pwritev: { args: ["i32", "ptr", "i32", i64f], returns: i64f },
  fsync: { args: ["i32"], returns: "i32" },
  fdatasync: { args: ["i32"], returns: "i32" },
  fallocate: { args: ["i32", "i32", i64f, i64f], returns: "i32" },
  ftruncate: { args: ["i32", i64f], returns: "i32" },
  lseek: { args: ["i32", i64f, "i32"], returns: i64f },
  fcntl: { args: ["i32", "i32", i64f], returns: "i32" },
  ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
  dup: { args: ["i32"], returns: "i32" },

  mmap: { args: ["ptr", "usize", "i32", "i32", "i32", i64f], returns: i64f },
  munmap: { args: ["ptr", "usize"], returns: "i32" },
  memfd_create: { args: ["cstring", "u32"], returns: "i32" },
  eventfd: { args: ["u32", "i32"], returns: "i32" },
  timerfd_create: { args: ["i32", "i32"], returns: "i32" },
  timerfd_settime: { args: ["i32", "i32", "ptr", "ptr"], returns: "i32" },

  epoll_create1: { args: ["i32"], returns: "i32" },
  epoll_ctl: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  epoll_wait: { args: ["i32", "ptr", "i32", "i32"], returns: "i32" },
  poll: { args: ["ptr", "u64", "i32"], returns: "i32" },

  readv: { args: ["i32", "ptr", "i32"], returns: i64f },
  writev: { args: ["i32", "ptr", "i32"], returns: i64f },
  // Guest memory to guest memory (both mapped here): one call beats a JS byte loop from ~16 bytes.
  memcpy: { args: ["ptr", "ptr", FFIType.u64_fast], returns: "ptr" },

  // Filesystems (virtio-fs): the *at family, relative to O_PATH directory fds.
  openat: { args: ["i32", "ptr", "i32", "u32"], returns: "i32" },
  mkdirat: { args: ["i32", "ptr", "u32"], returns: "i32" },
  mknodat: { args: ["i32", "ptr", "u32", i64f], returns: "i32" },
  symlinkat: { args: ["ptr", "i32", "ptr"], returns: "i32" },
  readlinkat: { args: ["i32", "ptr", "ptr", "usize"], returns: i64f },
  unlinkat: { args: ["i32", "ptr", "i32"], returns: "i32" },
  linkat: { args: ["i32", "ptr", "i32", "ptr", "i32"], returns: "i32" },
  fchmodat: { args: ["i32", "ptr", "u32", "i32"], returns: "i32" },
  fchmod: { args: ["i32", "u32"], returns: "i32" },
  fchownat: { args: ["i32", "ptr", "u32", "u32", "i32"], returns: "i32" },
  utimensat: { args: ["i32", "ptr", "ptr", "i32"], returns: "i32" },
  syncfs: { args: ["i32"], returns: "i32" },
  // f*xattr need an fd opened for I/O (EBADF on O_PATH); the path forms serve /proc/self/fd/N.
  fgetxattr: { args: ["i32", "ptr", "ptr", "usize"], returns: i64f },
  fsetxattr: { args: ["i32", "ptr", "ptr", "usize", "i32"], returns: "i32" },
  flistxattr: { args: ["i32", "ptr", "usize"], returns: i64f },
  fremovexattr: { args: ["i32", "ptr"], returns: "i32" },
  getxattr: { args: ["ptr", "ptr", "ptr", "usize"], returns: i64f },
  setxattr: { args: ["ptr", "ptr", "ptr", "usize", "i32"], returns: "i32" },
  listxattr: { args: ["ptr", "ptr", "usize"], returns: i64f },
  removexattr: { args: ["ptr", "ptr"], returns: "i32" },
  // syscall(2) for calls glibc lacks or added late (SYS_* in constants.ts): every argument is
  // a number; pointers are addresses (ptr() of a buffer), so one declaration serves them all.
  syscall: { args: [i64f, i64f, i64f, i64f, i64f, i64f, i64f], returns: i64f },
});

/**
 * The symbols with plain signatures: every argument a number or a typed array
 * (Bun passes its address), every result a number. bun-types models `usize`
 * and `i64_fast` as possibly-BigInt; with our declarations they are numbers.
 */
type Arg = number | bigint | null | Pointer | NodeJS.TypedArray | DataView;
export const sym = libc.symbols as unknown as {
  [K in Exclude<keyof typeof libc.symbols, "__errno_location" | "strerror">]: (...args: Arg[]) => number;
} & { __errno_location(): Pointer; strerror(e: number): string };

/**
 * io_uring through raw system calls (x86-64 numbers; aarch64 uses the same
 * generic numbers 425..427): struct layouts as offset constants, opcode and
 * flag names as the kernel's <linux/io_uring.h> spells them, and checked
 * wrappers that turn a failure into an ErrnoError. liburing is not used: the
 * rings are mapped and driven by src/io/uring.ts.
 *
 * `syscall` is variadic in C; passing every argument as a 64-bit integer
 * matches the x86-64 and aarch64 calling conventions for integer arguments.
 * (A second dlopen of libc, like fstat's in sys.ts: the lead may move the
 * symbol into ffi/libc.ts.)
 */
import { dlopen, FFIType } from "bun:ffi";
import { errno, ErrnoError, EINTR } from "./errno.ts";

const i64f = FFIType.i64_fast;
const lib = dlopen(process.platform === "linux" ? "libc.so.6" : "libc.dylib", {
  syscall: { args: [i64f, i64f, i64f, i64f, i64f, i64f, i64f], returns: i64f },
});
const syscall = lib.symbols.syscall as unknown as (...a: number[]) => number;

export const SYS_io_uring_setup = 425, SYS_io_uring_enter = 426, SYS_io_uring_register = 427;

// struct io_uring_params (120 bytes)
export const PARAMS_SIZE = 120, PARAMS_SQ_ENTRIES = 0, PARAMS_CQ_ENTRIES = 4, PARAMS_FLAGS = 8, PARAMS_FEATURES = 20,
  PARAMS_SQ_OFF = 40, PARAMS_CQ_OFF = 80;
// struct io_sqring_offsets (relative to PARAMS_SQ_OFF)
export const SQ_OFF_HEAD = 0, SQ_OFF_TAIL = 4, SQ_OFF_RING_MASK = 8, SQ_OFF_RING_ENTRIES = 12, SQ_OFF_FLAGS = 16,
  SQ_OFF_DROPPED = 20, SQ_OFF_ARRAY = 24;
// struct io_cqring_offsets (relative to PARAMS_CQ_OFF)
export const CQ_OFF_HEAD = 0, CQ_OFF_TAIL = 4, CQ_OFF_RING_MASK = 8, CQ_OFF_RING_ENTRIES = 12, CQ_OFF_OVERFLOW = 16,
  CQ_OFF_CQES = 20, CQ_OFF_FLAGS = 24;

// struct io_uring_sqe (64 bytes)
export const SQE_SIZE = 64, SQE_OPCODE = 0, SQE_FLAGS = 1, SQE_IOPRIO = 2, SQE_FD = 4, SQE_OFF = 8, SQE_ADDR = 16,
  SQE_LEN = 24, SQE_RW_FLAGS = 28, SQE_USER_DATA = 32;
// struct io_uring_cqe (16 bytes)
export const CQE_SIZE = 16, CQE_USER_DATA = 0, CQE_RES = 8, CQE_FLAGS = 12;

export const IORING_OP_NOP = 0, IORING_OP_READV = 1, IORING_OP_WRITEV = 2, IORING_OP_FSYNC = 3,
  IORING_OP_FALLOCATE = 17;
export const IORING_FSYNC_DATASYNC = 1;

export const IORING_SETUP_CQSIZE = 1 << 3, IORING_SETUP_CLAMP = 1 << 4;
export const IORING_FEAT_SINGLE_MMAP = 1 << 0, IORING_FEAT_NODROP = 1 << 1, IORING_FEAT_SUBMIT_STABLE = 1 << 2;
export const IORING_OFF_SQ_RING = 0, IORING_OFF_CQ_RING = 0x8000000, IORING_OFF_SQES = 0x10000000;
export const IORING_SQ_NEED_WAKEUP = 1 << 0, IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_ENTER_GETEVENTS = 1 << 0;

export const IORING_REGISTER_EVENTFD = 4, IORING_UNREGISTER_EVENTFD = 5, IORING_REGISTER_PROBE = 8;
// struct io_uring_probe: u8 last_op, u8 ops_len, u16, u32[3], then ops_len × struct io_uring_probe_op (8 bytes)
export const PROBE_HDR = 16, PROBE_OP_SIZE = 8, PROBE_OP_FLAGS = 2, IO_URING_OP_SUPPORTED = 1;

function check(name: string, r: number, detail = ""): number {
  if (r < 0) throw new ErrnoError(name, errno(), detail);
  return r;
}

/** io_uring_setup(2): `params` is a PARAMS_SIZE buffer the kernel fills in. Returns the ring fd. */
export function ioUringSetup(entries: number, params: number): number {
  return check("io_uring_setup", syscall(SYS_io_uring_setup, entries, params, 0, 0, 0, 0), `${entries} entries`);
}

/**
 * io_uring_enter(2) without a signal mask; EINTR is retried. Returns the
 * number of SQEs consumed, or -errno for EAGAIN/EBUSY (the caller reaps
 * completions and tries again); other failures throw.
 */
export function ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number {
  for (;;) {
    const r = syscall(SYS_io_uring_enter, fd, toSubmit, minComplete, flags, 0, 0);
    if (r >= 0) return r;
    const e = errno();
    if (e === EINTR) continue;
    if (e === 11 || e === 16) return -e; // EAGAIN, EBUSY
    throw new ErrnoError("io_uring_enter", e);
  }
}

/** io_uring_register(2). */
export function ioUringRegister(fd: number, opcode: number, arg: number, nrArgs: number): number {
  return check("io_uring_register", syscall(SYS_io_uring_register, fd, opcode, arg, nrArgs, 0, 0), `opcode ${opcode}`);
}

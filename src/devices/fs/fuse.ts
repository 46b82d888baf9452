/**
 * FUSE as virtio-fs carries it (VIRTIO 1.2 §5.11; include/uapi/linux/fuse.h,
 * protocol 7.31 … 7.38): the wire format only, with no file system behind it.
 *
 * Theory of operation. Each request is one descriptor chain. Its readable part
 * is a 40-byte fuse_in_header, the opcode's argument struct, then names
 * (NUL-terminated) or data (WRITE, SETXATTR). Its writable part receives a
 * 16-byte fuse_out_header and the reply struct or data. A `FuseRequest`
 * (one per request slot, reused) checks the framing and every argument once,
 * in `decode()`, against the sizes of the minor agreed at INIT (`FuseConn`),
 * and leaves plain number fields; handlers then trust them. The reply writers
 * check room first and either write the whole reply or nothing, returning
 * false; nothing here throws on guest input.
 *
 * Numbers: u64 fields are read as `lo + hi * 2 ** 32`, exact below 2^53 (the
 * kernel's request ids, node ids and file offsets stay far below); larger
 * guest values come out rounded but still larger than any real bound, so a
 * handler that checks `offset + size <= MAX_FILE` is safe. Times are signed.
 *
 * Names are bytes. `name`/`name2` are strings decoded as UTF-8, with each byte
 * that is not part of valid UTF-8 mapped to the lone surrogate U+DC00 + byte
 * (Python's "surrogateescape", PEP 383): valid UTF-8 reads naturally, and two
 * different byte names never give the same string, so a string is a safe map
 * key. `encodeName` turns such a string back into the same bytes. The strings
 * are built on first access; nothing else is allocated per request.
 *
 * No imports but types: the module runs in any thread.
 */
import type { ChainReader, ChainWriter } from "../../virtq/chain_io.ts";

// ---------------------------------------------------------------- versions

/**
 * The protocol major, the newest minor we speak (fuse.h on the build host says
 * 38), and the oldest we accept: virtio-fs needs 7.31 (SETUPMAPPING, map_alignment).
 * @example conn.minor === Math.min(kernelMinor, FUSE_KERNEL_MINOR_VERSION)
 */
export const FUSE_KERNEL_VERSION = 7, FUSE_KERNEL_MINOR_VERSION = 38, FUSE_MIN_KERNEL_MINOR_VERSION = 31;

/**
 * The root's node id, and the smallest buffer the kernel reads with.
 * @example if (req.nodeid === FUSE_ROOT_ID) ino = backend.root;
 */
export const FUSE_ROOT_ID = 1, FUSE_MIN_READ_BUFFER = 8192;

/**
 * Limits from Linux: a file name (FUSE_NAME_MAX, NAME_MAX), a path with its
 * NUL (PATH_MAX, for symlink targets), an xattr name and value (XATTR_*_MAX).
 * @example req.nameLen <= FUSE_NAME_MAX
 */
export const FUSE_NAME_MAX = 255, PATH_MAX = 4096, XATTR_NAME_MAX = 255, XATTR_SIZE_MAX = 65536;

/**
 * Struct sizes in bytes (x86-64 and every other Linux ABI: the structs are
 * padded to 8). The COMPAT sizes are what older minors used.
 * @example replyEntry() writes FUSE_OUT_HEADER_SIZE + FUSE_ENTRY_OUT_SIZE bytes
 */
export const FUSE_IN_HEADER_SIZE = 40, FUSE_OUT_HEADER_SIZE = 16, FUSE_ATTR_SIZE = 88, FUSE_ENTRY_OUT_SIZE = 128,
  FUSE_ATTR_OUT_SIZE = 104, FUSE_OPEN_OUT_SIZE = 16, FUSE_INIT_OUT_SIZE = 64, FUSE_STATFS_OUT_SIZE = 80,
  FUSE_WRITE_OUT_SIZE = 8, FUSE_LSEEK_OUT_SIZE = 8, FUSE_GETXATTR_OUT_SIZE = 8, FUSE_LK_OUT_SIZE = 24,
  FUSE_DIRENT_SIZE = 24, FUSE_INIT_IN_SIZE = 64, FUSE_SETATTR_IN_SIZE = 88, FUSE_READ_IN_SIZE = 40,
  FUSE_WRITE_IN_SIZE = 40, FUSE_SETXATTR_IN_SIZE = 16, FUSE_FORGET_ONE_SIZE = 16, FUSE_REMOVEMAPPING_ONE_SIZE = 16,
  FUSE_COMPAT_ENTRY_OUT_SIZE = 120, FUSE_COMPAT_ATTR_OUT_SIZE = 96, FUSE_COMPAT_MKNOD_IN_SIZE = 8,
  FUSE_COMPAT_WRITE_IN_SIZE = 24, FUSE_COMPAT_STATFS_SIZE = 48, FUSE_COMPAT_SETXATTR_IN_SIZE = 8,
  FUSE_COMPAT_INIT_OUT_SIZE = 8, FUSE_COMPAT_22_INIT_OUT_SIZE = 24;

// ---------------------------------------------------------------- opcodes

/**
 * enum fuse_opcode. 7, 19 and 52+ are unassigned up to 7.38 (FUSE_STATX, 52,
 * came in 7.39, which we never negotiate).
 * @example if (req.opcode === FUSE_LOOKUP) lookup(req.nodeid, req.name);
 */
export const FUSE_LOOKUP = 1, FUSE_FORGET = 2, FUSE_GETATTR = 3, FUSE_SETATTR = 4, FUSE_READLINK = 5,
  FUSE_SYMLINK = 6, FUSE_MKNOD = 8, FUSE_MKDIR = 9, FUSE_UNLINK = 10, FUSE_RMDIR = 11, FUSE_RENAME = 12,
  FUSE_LINK = 13, FUSE_OPEN = 14, FUSE_READ = 15, FUSE_WRITE = 16, FUSE_STATFS = 17, FUSE_RELEASE = 18,
  FUSE_FSYNC = 20, FUSE_SETXATTR = 21, FUSE_GETXATTR = 22, FUSE_LISTXATTR = 23, FUSE_REMOVEXATTR = 24,
  FUSE_FLUSH = 25, FUSE_INIT = 26, FUSE_OPENDIR = 27, FUSE_READDIR = 28, FUSE_RELEASEDIR = 29, FUSE_FSYNCDIR = 30,
  FUSE_GETLK = 31, FUSE_SETLK = 32, FUSE_SETLKW = 33, FUSE_ACCESS = 34, FUSE_CREATE = 35, FUSE_INTERRUPT = 36,
  FUSE_BMAP = 37, FUSE_DESTROY = 38, FUSE_IOCTL = 39, FUSE_POLL = 40, FUSE_NOTIFY_REPLY = 41,
  FUSE_BATCH_FORGET = 42, FUSE_FALLOCATE = 43, FUSE_READDIRPLUS = 44, FUSE_RENAME2 = 45, FUSE_LSEEK = 46,
  FUSE_COPY_FILE_RANGE = 47, FUSE_SETUPMAPPING = 48, FUSE_REMOVEMAPPING = 49, FUSE_SYNCFS = 50, FUSE_TMPFILE = 51,
  CUSE_INIT = 4096;

/**
 * Opcode names for traces, indexed by opcode (holes are undefined).
 * @example FUSE_OPCODE_NAMES[FUSE_LOOKUP] === "LOOKUP"
 */
export const FUSE_OPCODE_NAMES: readonly (string | undefined)[] = (() => {
  const t: (string | undefined)[] = [];
  const names: [number, string][] = [
    [FUSE_LOOKUP, "LOOKUP"], [FUSE_FORGET, "FORGET"], [FUSE_GETATTR, "GETATTR"], [FUSE_SETATTR, "SETATTR"],
    [FUSE_READLINK, "READLINK"], [FUSE_SYMLINK, "SYMLINK"], [FUSE_MKNOD, "MKNOD"], [FUSE_MKDIR, "MKDIR"],
    [FUSE_UNLINK, "UNLINK"], [FUSE_RMDIR, "RMDIR"], [FUSE_RENAME, "RENAME"], [FUSE_LINK, "LINK"],
    [FUSE_OPEN, "OPEN"], [FUSE_READ, "READ"], [FUSE_WRITE, "WRITE"], [FUSE_STATFS, "STATFS"],
    [FUSE_RELEASE, "RELEASE"], [FUSE_FSYNC, "FSYNC"], [FUSE_SETXATTR, "SETXATTR"], [FUSE_GETXATTR, "GETXATTR"],
    [FUSE_LISTXATTR, "LISTXATTR"], [FUSE_REMOVEXATTR, "REMOVEXATTR"], [FUSE_FLUSH, "FLUSH"], [FUSE_INIT, "INIT"],
    [FUSE_OPENDIR, "OPENDIR"], [FUSE_READDIR, "READDIR"], [FUSE_RELEASEDIR, "RELEASEDIR"],
    [FUSE_FSYNCDIR, "FSYNCDIR"], [FUSE_GETLK, "GETLK"], [FUSE_SETLK, "SETLK"], [FUSE_SETLKW, "SETLKW"],
    [FUSE_ACCESS, "ACCESS"], [FUSE_CREATE, "CREATE"], [FUSE_INTERRUPT, "INTERRUPT"], [FUSE_BMAP, "BMAP"],
    [FUSE_DESTROY, "DESTROY"], [FUSE_IOCTL, "IOCTL"], [FUSE_POLL, "POLL"], [FUSE_NOTIFY_REPLY, "NOTIFY_REPLY"],
    [FUSE_BATCH_FORGET, "BATCH_FORGET"], [FUSE_FALLOCATE, "FALLOCATE"], [FUSE_READDIRPLUS, "READDIRPLUS"],
    [FUSE_RENAME2, "RENAME2"], [FUSE_LSEEK, "LSEEK"], [FUSE_COPY_FILE_RANGE, "COPY_FILE_RANGE"],
    [FUSE_SETUPMAPPING, "SETUPMAPPING"], [FUSE_REMOVEMAPPING, "REMOVEMAPPING"], [FUSE_SYNCFS, "SYNCFS"],
    [FUSE_TMPFILE, "TMPFILE"],
  ];
  for (const [op, name] of names) t[op] = name;
  return t;
})();

/**
 * The name of an opcode for a log line, "UNKNOWN" for anything else.
 * @example fuseOpcodeName(FUSE_RENAME2) === "RENAME2"
 */
export function fuseOpcodeName(opcode: number): string {
  return (opcode === CUSE_INIT ? "CUSE_INIT" : FUSE_OPCODE_NAMES[opcode]) ?? "UNKNOWN";
}

// ---------------------------------------------------------------- flags

/**
 * INIT flags (fuse_init_in/out.flags). Bits 32 and up travel in `flags2`
 * when FUSE_INIT_EXT is set; the constants past bit 31 keep fuse.h's values,
 * so test them as `flags2 & (FUSE_SECURITY_CTX / 2 ** 32)`.
 * @example conn.negotiate(req, FUSE_ASYNC_READ | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES)
 */
export const FUSE_ASYNC_READ = 1 << 0, FUSE_POSIX_LOCKS = 1 << 1, FUSE_FILE_OPS = 1 << 2,
  FUSE_ATOMIC_O_TRUNC = 1 << 3, FUSE_EXPORT_SUPPORT = 1 << 4, FUSE_BIG_WRITES = 1 << 5, FUSE_DONT_MASK = 1 << 6,
  FUSE_SPLICE_WRITE = 1 << 7, FUSE_SPLICE_MOVE = 1 << 8, FUSE_SPLICE_READ = 1 << 9, FUSE_FLOCK_LOCKS = 1 << 10,
  FUSE_HAS_IOCTL_DIR = 1 << 11, FUSE_AUTO_INVAL_DATA = 1 << 12, FUSE_DO_READDIRPLUS = 1 << 13,
  FUSE_READDIRPLUS_AUTO = 1 << 14, FUSE_ASYNC_DIO = 1 << 15, FUSE_WRITEBACK_CACHE = 1 << 16,
  FUSE_NO_OPEN_SUPPORT = 1 << 17, FUSE_PARALLEL_DIROPS = 1 << 18, FUSE_HANDLE_KILLPRIV = 1 << 19,
  FUSE_POSIX_ACL = 1 << 20, FUSE_ABORT_ERROR = 1 << 21, FUSE_MAX_PAGES = 1 << 22, FUSE_CACHE_SYMLINKS = 1 << 23,
  FUSE_NO_OPENDIR_SUPPORT = 1 << 24, FUSE_EXPLICIT_INVAL_DATA = 1 << 25, FUSE_MAP_ALIGNMENT = 1 << 26,
  FUSE_SUBMOUNTS = 1 << 27, FUSE_HANDLE_KILLPRIV_V2 = 1 << 28, FUSE_SETXATTR_EXT = 1 << 29,
  FUSE_INIT_EXT = 1 << 30, FUSE_INIT_RESERVED = 0x80000000,
  FUSE_SECURITY_CTX = 2 ** 32, FUSE_HAS_INODE_DAX = 2 ** 33, FUSE_HAS_EXPIRE_ONLY = 2 ** 35;

/**
 * fuse_open_out.open_flags.
 * @example replyOpen(w, req.unique, fh, FOPEN_KEEP_CACHE)
 */
export const FOPEN_DIRECT_IO = 1 << 0, FOPEN_KEEP_CACHE = 1 << 1, FOPEN_NONSEEKABLE = 1 << 2,
  FOPEN_CACHE_DIR = 1 << 3, FOPEN_STREAM = 1 << 4, FOPEN_NOFLUSH = 1 << 5, FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

/**
 * fuse_setattr_in.valid: which SETATTR fields are meant.
 * @example if (req.valid & FATTR_SIZE) truncate(req.size);
 */
export const FATTR_MODE = 1 << 0, FATTR_UID = 1 << 1, FATTR_GID = 1 << 2, FATTR_SIZE = 1 << 3,
  FATTR_ATIME = 1 << 4, FATTR_MTIME = 1 << 5, FATTR_FH = 1 << 6, FATTR_ATIME_NOW = 1 << 7,
  FATTR_MTIME_NOW = 1 << 8, FATTR_LOCKOWNER = 1 << 9, FATTR_CTIME = 1 << 10, FATTR_KILL_SUIDGID = 1 << 11;

/**
 * Per-request flag words: RELEASE release_flags, GETATTR getattr_flags,
 * lk_flags, WRITE write_flags, READ read_flags, FSYNC fsync_flags,
 * OPEN/CREATE open_flags, SETXATTR setxattr_flags, SETUPMAPPING flags.
 * @example const datasync = (req.fsyncFlags & FUSE_FSYNC_FDATASYNC) !== 0;
 */
export const FUSE_RELEASE_FLUSH = 1 << 0, FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1, FUSE_GETATTR_FH = 1 << 0,
  FUSE_LK_FLOCK = 1 << 0, FUSE_WRITE_CACHE = 1 << 0, FUSE_WRITE_LOCKOWNER = 1 << 1,
  FUSE_WRITE_KILL_SUIDGID = 1 << 2, FUSE_WRITE_KILL_PRIV = FUSE_WRITE_KILL_SUIDGID, FUSE_READ_LOCKOWNER = 1 << 1,
  FUSE_FSYNC_FDATASYNC = 1 << 0, FUSE_OPEN_KILL_SUIDGID = 1 << 0, FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0,
  FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0, FUSE_SETUPMAPPING_FLAG_READ = 1 << 1;

/**
 * fuse_attr.flags.
 * @example attr.flags = FUSE_ATTR_SUBMOUNT;
 */
export const FUSE_ATTR_SUBMOUNT = 1 << 0, FUSE_ATTR_DAX = 1 << 1;

/**
 * renameat2(2) flags (RENAME2 `flags`) and setxattr(2) flags (SETXATTR `flags`).
 * @example if (req.flags & RENAME_EXCHANGE) exchange();
 */
export const RENAME_NOREPLACE = 1 << 0, RENAME_EXCHANGE = 1 << 1, RENAME_WHITEOUT = 1 << 2,
  XATTR_CREATE = 1, XATTR_REPLACE = 2;

/**
 * Linux errno values (asm-generic/errno*.h) that FUSE replies use; replies
 * carry them negated.
 * @example replyError(w, req.unique, ENOENT)
 */
export const EPERM = 1, ENOENT = 2, EIO = 5, E2BIG = 7, EBADF = 9, EAGAIN = 11, EACCES = 13, EEXIST = 17,
  EXDEV = 18, ENOTDIR = 20, EISDIR = 21, EINVAL = 22, ENFILE = 23, EMFILE = 24, EFBIG = 27, ENOSPC = 28,
  EROFS = 30, ERANGE = 34, ENAMETOOLONG = 36, ENOSYS = 38, ENOTEMPTY = 39, ELOOP = 40, ENODATA = 61,
  EPROTO = 71, EOVERFLOW = 75, EOPNOTSUPP = 95;

// ---------------------------------------------------------------- names

/** Code units for decodeName: a byte gives at most one unit (a 4-byte sequence gives two). */
const UNITS = new Uint16Array(PATH_MAX);

/**
 * Bytes → string: UTF-8, with every byte outside a valid sequence mapped to
 * U+DC00 + byte (surrogateescape), so distinct byte strings give distinct
 * strings and `encodeName` restores the bytes.
 * @param bytes the name, without its NUL
 * @example decodeName(new Uint8Array([0x68, 0xc3, 0xa9, 0xff])) === "hé\udcff"
 */
export function decodeName(bytes: Uint8Array, start = 0, end = bytes.length): string {
  const u = end - start <= UNITS.length ? UNITS : new Uint16Array(end - start);
  let n = 0;
  for (let i = start; i < end;) {
    const c = bytes[i]!;
    if (c < 0x80) {
      u[n++] = c;
      i++;
      continue;
    }
    // RFC 3629 §4: the lead byte fixes the length; C0, C1 and F5..FF never lead.
    let need = 0, cp = 0, min = 0;
    if (c >= 0xc2 && c <= 0xdf) { need = 1; cp = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { need = 2; cp = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { need = 3; cp = c & 0x07; min = 0x10000; }
    let k = 1;
    if (need > 0 && i + need < end) {
      for (; k <= need; k++) {
        const d = bytes[i + k]!;
        if ((d & 0xc0) !== 0x80) break;
        cp = (cp << 6) | (d & 0x3f);
      }
    }
    // Overlong forms, surrogates and code points past U+10FFFF are not UTF-8 either.
    if (need > 0 && k > need && cp >= min && cp <= 0x10ffff && (cp < 0xd800 || cp > 0xdfff)) {
      if (cp >= 0x10000) {
        cp -= 0x10000;
        u[n++] = 0xd800 + (cp >> 10);
        u[n++] = 0xdc00 + (cp & 0x3ff);
      } else u[n++] = cp;
      i += need + 1;
    } else {
      u[n++] = 0xdc00 + c;
      i++;
    }
  }
  return n === 0 ? "" : String.fromCharCode.apply(null, u.subarray(0, n) as unknown as number[]);
}

/**
 * String → bytes, the inverse of `decodeName`: UTF-8, with U+DC80..U+DCFF
 * written back as the single byte they stand for, into `out[at, end)`.
 * Returns the byte count, or -1 when that room is too small or the string
 * holds another lone surrogate. Writes no NUL.
 * @example const n = encodeName("hé\udcff", buf); // n === 4, buf[3] === 0xff
 */
export function encodeName(s: string, out: Uint8Array, at = 0, end = out.length): number {
  if (end > out.length) end = out.length;
  let o = at;
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c < 0x80) {
      if (o >= end) return -1;
      out[o++] = c;
    } else if (c < 0x800) {
      if (o + 2 > end) return -1;
      out[o++] = 0xc0 | (c >> 6);
      out[o++] = 0x80 | (c & 0x3f);
    } else if (c >= 0xdc00 && c <= 0xdfff) {
      if (c < 0xdc80 || c > 0xdcff || o >= end) return -1;
      out[o++] = c - 0xdc00;
    } else if (c >= 0xd800 && c <= 0xdbff) {
      const d = i + 1 < s.length ? s.charCodeAt(i + 1) : 0;
      if (d < 0xdc00 || d > 0xdfff || o + 4 > end) return -1;
      c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
      i++;
      out[o++] = 0xf0 | (c >> 18);
      out[o++] = 0x80 | ((c >> 12) & 0x3f);
      out[o++] = 0x80 | ((c >> 6) & 0x3f);
      out[o++] = 0x80 | (c & 0x3f);
    } else {
      if (o + 3 > end) return -1;
      out[o++] = 0xe0 | (c >> 12);
      out[o++] = 0x80 | ((c >> 6) & 0x3f);
      out[o++] = 0x80 | (c & 0x3f);
    }
  }
  return o - at;
}

// ---------------------------------------------------------------- connection

/** The limits an INIT reply carries; fields left out keep the kernel's defaults. */
export interface FuseInitLimits {
  /** Bytes of readahead; the reply never exceeds the kernel's own value. */
  maxReadahead?: number;
  /** Largest WRITE payload (default 128 KiB; the kernel uses at least 4096). */
  maxWrite?: number;
  /** Pages per request, sent with FUSE_MAX_PAGES (default 32). */
  maxPages?: number;
  maxBackground?: number;
  congestionThreshold?: number;
  /** Timestamp granularity in ns, 1..1e9 (0: the kernel keeps 1 s). */
  timeGran?: number;
  /** log2 of the DAX mapping alignment, sent with FUSE_MAP_ALIGNMENT. */
  mapAlignment?: number;
}

/**
 * What INIT settled, shared by every FuseRequest of one session (all
 * queues): the minor, which fixes struct sizes, and the agreed flags.
 * @example
 * const conn = new FuseConn(), req = new FuseRequest(conn);
 * if (req.decode(r) === 0 && req.opcode === FUSE_INIT) {
 *   const m = conn.negotiate(req, FUSE_ASYNC_READ | FUSE_MAX_PAGES);
 *   if (m > 0) replyInit(w, req.unique, conn, { maxWrite: 1 << 20, maxPages: 256 });
 *   else if (m === 0) replyInitVersion(w, req.unique);
 *   else replyError(w, req.unique, m);
 * }
 */
export class FuseConn {
  /** The minor in use: ours until INIT, then min(kernel's, ours). */
  minor = FUSE_KERNEL_MINOR_VERSION;
  /** Flags agreed at INIT: the low 32 bits, and bits 32..63 (flags2). */
  flags = 0;
  flags2 = 0;
  /** The kernel's max_readahead. */
  maxReadahead = 0;
  /** True once an INIT was accepted. */
  initialized = false;

  /** FUSE_SETXATTR_EXT agreed: SETXATTR carries the 16-byte fuse_setxattr_in. */
  get setxattrExt(): boolean {
    return (this.flags & FUSE_SETXATTR_EXT) !== 0;
  }

  /**
   * Answers the version question of a decoded INIT (fuse.h, "Version
   * negotiation"). Returns the minor to speak (≥ 31) after recording it and
   * the flags both sides want (offered ∩ `want`, `want2` for bits 32..63);
   * 0 when the kernel's major is newer (reply with `replyInitVersion` and
   * expect another INIT); -EPROTO when the kernel is older than 7.31 (reply
   * with `replyError`: the kernel then fails the mount).
   * @example conn.negotiate(req, FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS) // 38
   */
  negotiate(req: FuseRequest, want = 0, want2 = 0): number {
    if (req.major > FUSE_KERNEL_VERSION) return 0;
    if (req.major < FUSE_KERNEL_VERSION || req.minor < FUSE_MIN_KERNEL_MINOR_VERSION) return -EPROTO;
    this.minor = Math.min(req.minor, FUSE_KERNEL_MINOR_VERSION);
    let flags = req.flags & want & ~FUSE_INIT_EXT, flags2 = 0;
    if (req.flags & FUSE_INIT_EXT) {
      flags2 = (req.flags2 & want2) >>> 0;
      if (flags2 !== 0) flags |= FUSE_INIT_EXT;
    }
    this.flags = flags >>> 0;
    this.flags2 = flags2;
    this.maxReadahead = req.maxReadahead;
    this.initialized = true;
    return this.minor;
  }
}

// ---------------------------------------------------------------- requests

const DOT = 0x2e, SLASH = 0x2f;

/**
 * One decoded request; reuse it for every chain of a slot. After `decode`
 * returns 0 the fields of the opcode's struct are set and every other field
 * is 0 (names empty). Fields by opcode:
 *
 * - header: `opcode unique nodeid uid gid pid totalExtlen` (nodeid is the
 *   parent for name operations)
 * - INIT: `major minor maxReadahead flags flags2`
 * - LOOKUP, UNLINK, RMDIR: `name`; FORGET: `nlookup`;
 *   BATCH_FORGET, REMOVEMAPPING: `count`, reader at the first entry (16 bytes each), `dataLen`
 * - GETATTR: `getattrFlags fh`; SETATTR: `valid fh size lockOwner atime mtime
 *   ctime atimensec mtimensec ctimensec mode attrUid attrGid` (the new owner;
 *   `uid`/`gid` stay the caller's)
 * - SYMLINK: `name` (the new entry), `name2` (the target: a path, '/' allowed,
 *   up to PATH_MAX - 1 bytes); MKNOD: `mode rdev umask name`; MKDIR: `mode umask name`
 * - RENAME, RENAME2: `newdir name name2` (+ `flags`); LINK: `oldnodeid name`
 *   (the link's new name in `nodeid`: LINK carries one name)
 * - OPEN, OPENDIR: `flags openFlags`; CREATE, TMPFILE: `flags mode umask openFlags name`
 *   (TMPFILE's name is "/" from the VFS, so it is only checked for its NUL)
 * - READ, READDIR, READDIRPLUS: `fh offset size readFlags lockOwner flags`
 * - WRITE: `fh offset size writeFlags lockOwner flags`, reader at the data, `dataLen` = size
 * - RELEASE, RELEASEDIR: `fh flags releaseFlags lockOwner`; FLUSH: `fh lockOwner`
 * - FSYNC, FSYNCDIR: `fh fsyncFlags`; ACCESS: `mask`
 * - SETXATTR: `size flags setxattrFlags name`, reader at the value, `dataLen` = size;
 *   GETXATTR: `size name`; LISTXATTR: `size`; REMOVEXATTR: `name`
 * - GETLK, SETLK, SETLKW: `fh lockOwner lkStart lkEnd lkType lkPid lkFlags`
 * - FALLOCATE: `fh offset length mode`; LSEEK: `fh offset whence`
 * - COPY_FILE_RANGE: `fh offset nodeidOut fhOut offsetOut length flags`
 * - SETUPMAPPING: `fh offset length flags moffset`; INTERRUPT: `interruptUnique`
 * - READLINK, STATFS, DESTROY, SYNCFS: nothing
 *
 * Refused with -EINVAL: a header shorter than 40 bytes, `len` other than the
 * readable length, extensions longer than the arguments, arguments shorter
 * than the struct for `conn.minor`, a name without its NUL before the end of
 * the arguments, an empty file name or one holding '/', a missing second name,
 * a WRITE/SETXATTR size or BATCH_FORGET/REMOVEMAPPING count other than the
 * bytes that follow. -ENAMETOOLONG: a file name over 255 bytes or a symlink
 * target over 4095; -ERANGE: an xattr name empty or over 255 bytes (as
 * setxattr(2)); -E2BIG: an xattr value over 64 KiB. Bytes past a fixed
 * struct (with no name or data after it) are ignored. "." and ".." pass,
 * flagged by `isDot`/`isDot2`: the caller decides (LOOKUP of them is legal
 * with FUSE_EXPORT_SUPPORT). An opcode not listed decodes its header only and
 * sets `known` false: answer ENOSYS.
 * @example
 * const e = req.decode(slot.in);
 * if (e < 0) replyError(slot.out, req.unique, e);
 * else if (!req.known) replyError(slot.out, req.unique, ENOSYS);
 * else if (req.opcode === FUSE_WRITE) backend.write(req.nodeid, req.fh, req.offset, req.dataLen, slot.in);
 */
export class FuseRequest {
  len = 0;
  opcode = 0;
  unique = 0;
  nodeid = 0;
  uid = 0;
  gid = 0;
  pid = 0;
  /** Extension bytes / 8 at the end of the request (7.38; only with FUSE_SECURITY_CTX, never parsed here). */
  totalExtlen = 0;
  /** The opcode is one this decoder knows. */
  known = false;
  /** FORGET, BATCH_FORGET and INTERRUPT take no reply (virtio-fs gives FORGET no writable buffer). */
  noReply = false;

  major = 0;
  minor = 0;
  maxReadahead = 0;
  flags = 0;
  flags2 = 0;

  fh = 0;
  offset = 0;
  size = 0;
  length = 0;
  lockOwner = 0;
  mode = 0;
  umask = 0;
  rdev = 0;
  mask = 0;
  whence = 0;
  openFlags = 0;
  readFlags = 0;
  writeFlags = 0;
  releaseFlags = 0;
  fsyncFlags = 0;
  getattrFlags = 0;
  setxattrFlags = 0;
  valid = 0;
  atime = 0;
  mtime = 0;
  ctime = 0;
  atimensec = 0;
  mtimensec = 0;
  ctimensec = 0;
  attrUid = 0;
  attrGid = 0;
  nlookup = 0;
  count = 0;
  newdir = 0;
  oldnodeid = 0;
  nodeidOut = 0;
  fhOut = 0;
  offsetOut = 0;
  moffset = 0;
  interruptUnique = 0;
  lkStart = 0;
  lkEnd = 0;
  lkType = 0;
  lkPid = 0;
  lkFlags = 0;
  /** Bytes of payload the reader is positioned at (WRITE, SETXATTR, BATCH_FORGET, REMOVEMAPPING). */
  dataLen = 0;

  /** The first name's bytes, NUL-terminated at `nameLen` (usable as a C string). */
  readonly nameBuf = new Uint8Array(FUSE_NAME_MAX + 1);
  nameLen = 0;
  /** The second name (RENAME's new name, SYMLINK's target), NUL-terminated at `name2Len`. */
  readonly name2Buf = new Uint8Array(PATH_MAX);
  name2Len = 0;
  /** The name is "." or "..". */
  isDot = false;
  isDot2 = false;

  private nameStr: string | null = null;
  private name2Str: string | null = null;
  /** Absolute reader position where the arguments end (extensions follow). */
  private argsEnd = 0;
  private readonly a = new Uint8Array(96);
  private readonly dv = new DataView(this.a.buffer);

  constructor(readonly conn: FuseConn = new FuseConn()) {}

  /** The first name as a string (see the module header); built on first access. */
  get name(): string {
    return (this.nameStr ??= decodeName(this.nameBuf, 0, this.nameLen));
  }

  get name2(): string {
    return (this.name2Str ??= decodeName(this.name2Buf, 0, this.name2Len));
  }

  /** A view of the first name's bytes (no NUL); allocates the view. */
  get nameBytes(): Uint8Array {
    return this.nameBuf.subarray(0, this.nameLen);
  }

  get name2Bytes(): Uint8Array {
    return this.name2Buf.subarray(0, this.name2Len);
  }

  /**
   * Decodes the request at the reader's position (the start of the chain's
   * readable part). Returns 0, or a negative errno for a malformed request
   * (the header fields are set whenever 40 bytes were there, so the reply
   * can carry `unique`). Never throws.
   * @example if (req.decode(r) === 0 && req.opcode === FUSE_LOOKUP) console.log(req.nodeid, req.name);
   */
  decode(r: ChainReader): number {
    this.clear();
    const total = r.remaining;
    if (total < FUSE_IN_HEADER_SIZE) return -EINVAL;
    const dv = this.dv;
    this.take(r, 0, FUSE_IN_HEADER_SIZE);
    this.len = dv.getUint32(0, true);
    this.opcode = dv.getUint32(4, true);
    this.unique = this.u64(8);
    this.nodeid = this.u64(16);
    this.uid = dv.getUint32(24, true);
    this.gid = dv.getUint32(28, true);
    this.pid = dv.getUint32(32, true);
    this.totalExtlen = dv.getUint16(36, true);
    if (this.len !== total) return -EINVAL;
    const args = total - FUSE_IN_HEADER_SIZE - this.totalExtlen * 8;
    if (args < 0) return -EINVAL;
    this.argsEnd = r.pos + args;
    this.known = true;
    const minor = this.conn.minor;
    switch (this.opcode) {
      case FUSE_INIT:
        return this.init(r);
      case FUSE_LOOKUP: case FUSE_UNLINK: case FUSE_RMDIR:
        return this.fileName(r);
      case FUSE_FORGET:
        this.noReply = true;
        if (!this.fixed(r, 8)) return -EINVAL;
        this.nlookup = this.u64(0);
        return 0;
      case FUSE_BATCH_FORGET:
        this.noReply = true;
        if (!this.fixed(r, 8)) return -EINVAL;
        return this.entries(r, dv.getUint32(0, true), FUSE_FORGET_ONE_SIZE);
      case FUSE_GETATTR:
        if (minor < 9) return 0;
        if (!this.fixed(r, 16)) return -EINVAL;
        this.getattrFlags = dv.getUint32(0, true);
        this.fh = this.u64(8);
        return 0;
      case FUSE_SETATTR:
        return this.setattr(r);
      case FUSE_READLINK: case FUSE_STATFS: case FUSE_DESTROY:
        return 0;
      case FUSE_SYNCFS:
        return this.fixed(r, 8) ? 0 : -EINVAL;
      case FUSE_SYMLINK: {
        const e = this.fileName(r);
        if (e < 0) return e;
        const n = this.readName(r, this.name2Buf, PATH_MAX - 1);
        if (n < 0) return n;
        if (n === 0) return -EINVAL;
        this.name2Len = n;
        return 0;
      }
      case FUSE_MKNOD:
        if (!this.fixed(r, minor < 12 ? FUSE_COMPAT_MKNOD_IN_SIZE : 16)) return -EINVAL;
        this.mode = dv.getUint32(0, true);
        this.rdev = dv.getUint32(4, true);
        if (minor >= 12) this.umask = dv.getUint32(8, true);
        return this.fileName(r);
      case FUSE_MKDIR:
        if (!this.fixed(r, 8)) return -EINVAL;
        this.mode = dv.getUint32(0, true);
        this.umask = dv.getUint32(4, true);
        return this.fileName(r);
      case FUSE_RENAME: case FUSE_RENAME2: {
        const two = this.opcode === FUSE_RENAME2;
        if (!this.fixed(r, two ? 16 : 8)) return -EINVAL;
        this.newdir = this.u64(0);
        if (two) this.flags = dv.getUint32(8, true);
        const e = this.fileName(r);
        return e < 0 ? e : this.fileName2(r);
      }
      case FUSE_LINK:
        if (!this.fixed(r, 8)) return -EINVAL;
        this.oldnodeid = this.u64(0);
        return this.fileName(r);
      case FUSE_OPEN: case FUSE_OPENDIR:
        if (!this.fixed(r, 8)) return -EINVAL;
        this.flags = dv.getUint32(0, true);
        this.openFlags = dv.getUint32(4, true);
        return 0;
      case FUSE_CREATE: case FUSE_TMPFILE: {
        // Before 7.12 CREATE sent a bare fuse_open_in (flags, mode).
        if (!this.fixed(r, minor < 12 ? 8 : 16)) return -EINVAL;
        this.flags = dv.getUint32(0, true);
        this.mode = dv.getUint32(4, true);
        if (minor >= 12) {
          this.umask = dv.getUint32(8, true);
          this.openFlags = dv.getUint32(12, true);
        }
        if (this.opcode === FUSE_CREATE) return this.fileName(r);
        const n = this.readName(r, this.nameBuf, FUSE_NAME_MAX);
        if (n < 0) return n;
        this.nameLen = n;
        return 0;
      }
      case FUSE_READ: case FUSE_READDIR: case FUSE_READDIRPLUS:
        if (!this.fixed(r, FUSE_READ_IN_SIZE)) return -EINVAL;
        this.io();
        this.readFlags = dv.getUint32(20, true);
        return 0;
      case FUSE_WRITE: {
        const compat = minor < 9;
        if (!this.fixed(r, compat ? FUSE_COMPAT_WRITE_IN_SIZE : FUSE_WRITE_IN_SIZE)) return -EINVAL;
        this.fh = this.u64(0);
        this.offset = this.u64(8);
        this.size = dv.getUint32(16, true);
        this.writeFlags = dv.getUint32(20, true);
        if (!compat) {
          this.lockOwner = this.u64(24);
          this.flags = dv.getUint32(32, true);
        }
        return this.payload(r, this.size);
      }
      case FUSE_RELEASE: case FUSE_RELEASEDIR:
        if (!this.fixed(r, 24)) return -EINVAL;
        this.fh = this.u64(0);
        this.flags = dv.getUint32(8, true);
        this.releaseFlags = dv.getUint32(12, true);
        this.lockOwner = this.u64(16);
        return 0;
      case FUSE_FSYNC: case FUSE_FSYNCDIR:
        if (!this.fixed(r, 16)) return -EINVAL;
        this.fh = this.u64(0);
        this.fsyncFlags = dv.getUint32(8, true);
        return 0;
      case FUSE_FLUSH:
        if (!this.fixed(r, 24)) return -EINVAL;
        this.fh = this.u64(0);
        this.lockOwner = this.u64(16);
        return 0;
      case FUSE_SETXATTR: {
        const ext = this.conn.setxattrExt;
        if (!this.fixed(r, ext ? FUSE_SETXATTR_IN_SIZE : FUSE_COMPAT_SETXATTR_IN_SIZE)) return -EINVAL;
        this.size = dv.getUint32(0, true);
        this.flags = dv.getUint32(4, true);
        if (ext) this.setxattrFlags = dv.getUint32(8, true);
        const e = this.xattrName(r);
        if (e < 0) return e;
        const p = this.payload(r, this.size);
        return p < 0 ? p : this.size > XATTR_SIZE_MAX ? -E2BIG : 0;
      }
      case FUSE_GETXATTR: case FUSE_LISTXATTR:
        if (!this.fixed(r, 8)) return -EINVAL;
        this.size = dv.getUint32(0, true);
        return this.opcode === FUSE_GETXATTR ? this.xattrName(r) : 0;
      case FUSE_REMOVEXATTR:
        return this.xattrName(r);
      case FUSE_GETLK: case FUSE_SETLK: case FUSE_SETLKW:
        if (!this.fixed(r, 48)) return -EINVAL;
        this.fh = this.u64(0);
        this.lockOwner = this.u64(8);
        this.lkStart = this.u64(16);
        this.lkEnd = this.u64(24);
        this.lkType = dv.getUint32(32, true);
        this.lkPid = dv.getUint32(36, true);
        this.lkFlags = dv.getUint32(40, true);
        return 0;
      case FUSE_ACCESS:
        if (!this.fixed(r, 8)) return -EINVAL;
        this.mask = dv.getUint32(0, true);
        return 0;
      case FUSE_INTERRUPT:
        this.noReply = true;
        if (!this.fixed(r, 8)) return -EINVAL;
        this.interruptUnique = this.u64(0);
        return 0;
      case FUSE_FALLOCATE:
        if (!this.fixed(r, 32)) return -EINVAL;
        this.fh = this.u64(0);
        this.offset = this.u64(8);
        this.length = this.u64(16);
        this.mode = dv.getUint32(24, true);
        return 0;
      case FUSE_LSEEK:
        if (!this.fixed(r, 24)) return -EINVAL;
        this.fh = this.u64(0);
        this.offset = this.u64(8);
        this.whence = dv.getUint32(16, true);
        return 0;
      case FUSE_COPY_FILE_RANGE:
        if (!this.fixed(r, 56)) return -EINVAL;
        this.fh = this.u64(0);
        this.offset = this.u64(8);
        this.nodeidOut = this.u64(16);
        this.fhOut = this.u64(24);
        this.offsetOut = this.u64(32);
        this.length = this.u64(40);
        this.flags = this.u64(48);
        return 0;
      case FUSE_SETUPMAPPING:
        if (!this.fixed(r, 40)) return -EINVAL;
        this.fh = this.u64(0);
        this.offset = this.u64(8);
        this.length = this.u64(16);
        this.flags = this.u64(24);
        this.moffset = this.u64(32);
        return 0;
      case FUSE_REMOVEMAPPING:
        // fuse_removemapping_in is a lone u32, so the entries start 4 bytes in.
        if (!this.fixed(r, 4)) return -EINVAL;
        return this.entries(r, dv.getUint32(0, true), FUSE_REMOVEMAPPING_ONE_SIZE);
      default:
        this.known = false;
        return 0;
    }
  }

  /** Zeroes every field (a few dozen stores: cheaper than a stale field read by mistake). */
  private clear(): void {
    this.len = this.opcode = this.unique = this.nodeid = this.uid = this.gid = this.pid = this.totalExtlen = 0;
    this.known = this.noReply = this.isDot = this.isDot2 = false;
    this.major = this.minor = this.maxReadahead = this.flags = this.flags2 = 0;
    this.fh = this.offset = this.size = this.length = this.lockOwner = this.mode = this.umask = this.rdev = 0;
    this.mask = this.whence = this.openFlags = this.readFlags = this.writeFlags = this.releaseFlags = 0;
    this.fsyncFlags = this.getattrFlags = this.setxattrFlags = this.valid = 0;
    this.atime = this.mtime = this.ctime = this.atimensec = this.mtimensec = this.ctimensec = 0;
    this.attrUid = this.attrGid = this.nlookup = this.count = this.newdir = this.oldnodeid = 0;
    this.nodeidOut = this.fhOut = this.offsetOut = this.moffset = this.interruptUnique = 0;
    this.lkStart = this.lkEnd = this.lkType = this.lkPid = this.lkFlags = this.dataLen = 0;
    this.nameLen = this.name2Len = 0;
    this.nameBuf[0] = this.name2Buf[0] = 0;
    this.nameStr = this.name2Str = null;
  }

  private u64(o: number): number {
    return this.dv.getUint32(o, true) + this.dv.getUint32(o + 4, true) * 4294967296;
  }

  private i64(o: number): number {
    return this.dv.getUint32(o, true) + this.dv.getInt32(o + 4, true) * 4294967296;
  }

  /** Copies the next `n` argument bytes into the scratch struct; false when the arguments are shorter. */
  private fixed(r: ChainReader, n: number): boolean {
    if (this.argsEnd - r.pos < n) return false;
    this.take(r, 0, n);
    return true;
  }

  /**
   * Copies the next `n` bytes into the scratch struct at `at`. A contiguous
   * run (the usual case) is copied by a plain loop, about twice as fast as
   * ChainReader.copyTo for these sizes; a run over pieces goes through copyTo.
   */
  private take(r: ChainReader, at: number, n: number): void {
    const v = r.peekView(n);
    if (v === null) {
      r.copyTo(this.a, at, at + n);
      return;
    }
    const a = this.a, o = r.peekViewOffset - at;
    for (let i = at; i < at + n; i++) a[i] = v[o + i]!;
    r.skip(n);
  }

  private init(r: ChainReader): number {
    const dv = this.dv;
    // major and minor first: they decide how much of fuse_init_in follows.
    if (!this.fixed(r, 8)) return -EINVAL;
    this.major = dv.getUint32(0, true);
    this.minor = dv.getUint32(4, true);
    if (this.major !== FUSE_KERNEL_VERSION || this.minor < 6) return 0;
    // 7.36 grew fuse_init_in from 16 to 64 bytes (flags2 and reserved words).
    const rest = (this.minor >= 36 ? FUSE_INIT_IN_SIZE : 16) - 8;
    if (this.argsEnd - r.pos < rest) return -EINVAL;
    this.take(r, 8, rest);
    this.maxReadahead = dv.getUint32(8, true);
    this.flags = dv.getUint32(12, true);
    if (this.minor >= 36 && this.flags & FUSE_INIT_EXT) this.flags2 = dv.getUint32(16, true);
    return 0;
  }

  private setattr(r: ChainReader): number {
    if (!this.fixed(r, FUSE_SETATTR_IN_SIZE)) return -EINVAL;
    const dv = this.dv;
    this.valid = dv.getUint32(0, true);
    this.fh = this.u64(8);
    this.size = this.u64(16);
    this.lockOwner = this.u64(24);
    this.atime = this.i64(32);
    this.mtime = this.i64(40);
    this.ctime = this.i64(48);
    this.atimensec = dv.getUint32(56, true);
    this.mtimensec = dv.getUint32(60, true);
    this.ctimensec = dv.getUint32(64, true);
    this.mode = dv.getUint32(68, true);
    this.attrUid = dv.getUint32(76, true);
    this.attrGid = dv.getUint32(80, true);
    return 0;
  }

  /** fuse_read_in's common head (READ, READDIR, READDIRPLUS). */
  private io(): void {
    this.fh = this.u64(0);
    this.offset = this.u64(8);
    this.size = this.dv.getUint32(16, true);
    this.lockOwner = this.u64(24);
    this.flags = this.dv.getUint32(32, true);
  }

  /** The rest of the arguments must be exactly `n` bytes of payload; the reader stays at its start. */
  private payload(r: ChainReader, n: number): number {
    if (this.argsEnd - r.pos !== n) return -EINVAL;
    this.dataLen = n;
    return 0;
  }

  private entries(r: ChainReader, count: number, each: number): number {
    this.count = count;
    // count < 2^32, so count * each is exact.
    return this.payload(r, count * each);
  }

  /**
   * Copies a NUL-terminated string of at most `max` bytes into `buf` (with
   * its NUL) and returns its length; -EINVAL when the arguments end first,
   * -ENAMETOOLONG when `max` bytes pass with no NUL. At most max + 1 bytes
   * are read, whatever the request's size.
   */
  private readName(r: ChainReader, buf: Uint8Array, max: number): number {
    const left = this.argsEnd - r.pos;
    const lim = Math.min(left, max + 1);
    for (let n = 0; n < lim; n++) {
      const b = r.readU8();
      buf[n] = b;
      if (b === 0) return n;
    }
    return left > max ? -ENAMETOOLONG : -EINVAL;
  }

  private fileName(r: ChainReader): number {
    const n = this.readName(r, this.nameBuf, FUSE_NAME_MAX);
    if (n < 0) return n;
    const e = checkFileName(this.nameBuf, n);
    if (e < 0) return e;
    this.nameLen = n;
    this.isDot = isDotName(this.nameBuf, n);
    return 0;
  }

  private fileName2(r: ChainReader): number {
    const n = this.readName(r, this.name2Buf, FUSE_NAME_MAX);
    if (n < 0) return n;
    const e = checkFileName(this.name2Buf, n);
    if (e < 0) return e;
    this.name2Len = n;
    this.isDot2 = isDotName(this.name2Buf, n);
    return 0;
  }

  private xattrName(r: ChainReader): number {
    const n = this.readName(r, this.nameBuf, XATTR_NAME_MAX);
    if (n === -ENAMETOOLONG || n === 0) return -ERANGE;
    if (n < 0) return n;
    this.nameLen = n;
    return 0;
  }
}

function checkFileName(b: Uint8Array, n: number): number {
  if (n === 0) return -EINVAL;
  for (let i = 0; i < n; i++) if (b[i] === SLASH) return -EINVAL;
  return 0;
}

function isDotName(b: Uint8Array, n: number): boolean {
  return (n === 1 && b[0] === DOT) || (n === 2 && b[0] === DOT && b[1] === DOT);
}

// ---------------------------------------------------------------- reply data

/**
 * struct fuse_attr, reused: fill it from stat and hand it to a writer.
 * Times are seconds (signed) plus nanoseconds.
 * @example
 * const attr = new FuseAttr();
 * attr.ino = 2; attr.mode = 0o100644; attr.nlink = 1; attr.size = 5;
 * replyAttr(w, req.unique, attr, 1);
 */
export class FuseAttr {
  ino = 0;
  size = 0;
  blocks = 0;
  atime = 0;
  mtime = 0;
  ctime = 0;
  atimensec = 0;
  mtimensec = 0;
  ctimensec = 0;
  mode = 0;
  nlink = 0;
  uid = 0;
  gid = 0;
  rdev = 0;
  blksize = 0;
  flags = 0;

  reset(): void {
    this.ino = this.size = this.blocks = this.atime = this.mtime = this.ctime = 0;
    this.atimensec = this.mtimensec = this.ctimensec = this.mode = this.nlink = 0;
    this.uid = this.gid = this.rdev = this.blksize = this.flags = 0;
  }
}

/**
 * struct fuse_entry_out, reused: the node id and generation the kernel will
 * use for the name, how long it may cache the name and the attributes (in
 * seconds, fractions kept to the ns), and the attributes. A `nodeid` of 0
 * answers LOOKUP with a cacheable "no such entry".
 * @example
 * const e = new FuseEntryOut(); e.nodeid = 5; e.entryTimeout = e.attrTimeout = 1; e.attr.ino = 5;
 * replyEntry(w, req.unique, e);
 */
export class FuseEntryOut {
  nodeid = 0;
  generation = 0;
  entryTimeout = 0;
  attrTimeout = 0;
  readonly attr = new FuseAttr();
}

/**
 * struct fuse_kstatfs, reused.
 * @example const st = new FuseStatfs(); st.bsize = st.frsize = 4096; st.namelen = 255; replyStatfs(w, u, st);
 */
export class FuseStatfs {
  blocks = 0;
  bfree = 0;
  bavail = 0;
  files = 0;
  ffree = 0;
  bsize = 0;
  namelen = 0;
  frsize = 0;
}

// ---------------------------------------------------------------- replies

/**
 * Scratch for whole replies (the largest fixed one, CREATE, is 160 bytes; a
 * READDIRPLUS record at most 152 + 255 + padding) and for encoded strings.
 * Filled and copied out within one synchronous call, so one per thread is enough.
 */
const OUT = new Uint8Array(PATH_MAX + FUSE_OUT_HEADER_SIZE);
const OV = new DataView(OUT.buffer);

function putU32(o: number, v: number): void {
  OV.setUint32(o, v, true);
}

/** A u64 or i64 from a number; a negative value is written in two's complement. */
function putU64(o: number, v: number): void {
  const hi = Math.floor(v / 4294967296);
  OV.setUint32(o, v - hi * 4294967296, true);
  OV.setUint32(o + 4, hi, true);
}

/** Seconds (fractional) as sec + nsec; negative or NaN is 0, and past 2^53 is clamped. */
function putTimeout(oSec: number, oNsec: number, t: number): void {
  let s = 0, ns = 0;
  if (t > 0) {
    s = Math.floor(Math.min(t, Number.MAX_SAFE_INTEGER));
    ns = Math.min(999_999_999, Math.round((t - s) * 1e9));
    if (ns < 0) ns = 0;
  }
  putU64(oSec, s);
  putU32(oNsec, ns);
}

function putHeader(len: number, error: number, unique: number): void {
  putU32(0, len);
  OV.setInt32(4, error, true);
  putU64(8, unique);
}

function putAttr(o: number, a: FuseAttr): void {
  putU64(o, a.ino);
  putU64(o + 8, a.size);
  putU64(o + 16, a.blocks);
  putU64(o + 24, a.atime);
  putU64(o + 32, a.mtime);
  putU64(o + 40, a.ctime);
  putU32(o + 48, a.atimensec);
  putU32(o + 52, a.mtimensec);
  putU32(o + 56, a.ctimensec);
  putU32(o + 60, a.mode);
  putU32(o + 64, a.nlink);
  putU32(o + 68, a.uid);
  putU32(o + 72, a.gid);
  putU32(o + 76, a.rdev);
  putU32(o + 80, a.blksize);
  putU32(o + 84, a.flags);
}

function putEntry(o: number, e: FuseEntryOut): void {
  putU64(o, e.nodeid);
  putU64(o + 8, e.generation);
  putTimeout(o + 16, o + 32, e.entryTimeout);
  putTimeout(o + 24, o + 36, e.attrTimeout);
  putAttr(o + 40, e.attr);
}

/** Sends OUT[0, FUSE_OUT_HEADER_SIZE + body) after filling its header, if it fits. */
function send(w: ChainWriter, unique: number, body: number): boolean {
  const n = FUSE_OUT_HEADER_SIZE + body;
  if (w.remaining < n) return false;
  putHeader(n, 0, unique);
  w.copyFrom(OUT, 0, n);
  return true;
}

/** Zeroes OUT[from, from + n), so that padding and reserved words go out as 0. */
function zero(from: number, n: number): void {
  OUT.fill(0, from, from + n);
}

/**
 * Replies with an error and nothing else (16 bytes). `errno` may be given
 * either sign; 0 or anything outside 1..511 is sent as EIO (the kernel takes
 * only -511..-1). False when fewer than 16 bytes are writable.
 * @example replyError(w, req.unique, ENOENT)
 */
export function replyError(w: ChainWriter, unique: number, errno: number): boolean {
  let e = errno < 0 ? -errno : errno;
  if (!(e >= 1 && e <= 511)) e = EIO;
  if (w.remaining < FUSE_OUT_HEADER_SIZE) return false;
  putHeader(FUSE_OUT_HEADER_SIZE, -(e | 0), unique);
  w.copyFrom(OUT, 0, FUSE_OUT_HEADER_SIZE);
  return true;
}

/**
 * Replies success with no body (UNLINK, RMDIR, RENAME, RELEASE, FSYNC, FLUSH, SETXATTR …).
 * @example replyEmpty(w, req.unique)
 */
export function replyEmpty(w: ChainWriter, unique: number): boolean {
  return send(w, unique, 0);
}

/**
 * fuse_attr_out (104 bytes) for GETATTR and SETATTR; `timeout` in seconds.
 * @example replyAttr(w, req.unique, attr, 1.5)
 */
export function replyAttr(w: ChainWriter, unique: number, attr: FuseAttr, timeout = 0): boolean {
  const o = FUSE_OUT_HEADER_SIZE;
  putTimeout(o, o + 8, timeout);
  putU32(o + 12, 0);
  putAttr(o + 16, attr);
  return send(w, unique, FUSE_ATTR_OUT_SIZE);
}

/**
 * fuse_entry_out (128 bytes) for LOOKUP, MKNOD, MKDIR, SYMLINK, LINK.
 * @example replyEntry(w, req.unique, entry)
 */
export function replyEntry(w: ChainWriter, unique: number, e: FuseEntryOut): boolean {
  putEntry(FUSE_OUT_HEADER_SIZE, e);
  return send(w, unique, FUSE_ENTRY_OUT_SIZE);
}

/**
 * fuse_open_out (16 bytes) for OPEN and OPENDIR.
 * @example replyOpen(w, req.unique, fh, FOPEN_KEEP_CACHE)
 */
export function replyOpen(w: ChainWriter, unique: number, fh: number, openFlags = 0): boolean {
  const o = FUSE_OUT_HEADER_SIZE;
  putU64(o, fh);
  putU32(o + 8, openFlags);
  putU32(o + 12, 0);
  return send(w, unique, FUSE_OPEN_OUT_SIZE);
}

/**
 * fuse_entry_out then fuse_open_out (144 bytes) for CREATE and TMPFILE.
 * @example replyCreate(w, req.unique, entry, fh, 0)
 */
export function replyCreate(w: ChainWriter, unique: number, e: FuseEntryOut, fh: number, openFlags = 0): boolean {
  const o = FUSE_OUT_HEADER_SIZE + FUSE_ENTRY_OUT_SIZE;
  putEntry(FUSE_OUT_HEADER_SIZE, e);
  putU64(o, fh);
  putU32(o + 8, openFlags);
  putU32(o + 12, 0);
  return send(w, unique, FUSE_ENTRY_OUT_SIZE + FUSE_OPEN_OUT_SIZE);
}

/**
 * fuse_init_out for an accepted INIT (after `conn.negotiate` returned > 0):
 * our major, the agreed minor and flags from `conn`, and `limits`. 64 bytes
 * from 7.23 on (24 before, 8 before 7.5: the kernel takes a short INIT reply).
 * @example replyInit(w, req.unique, conn, { maxWrite: 1 << 20, maxPages: 256, timeGran: 1 })
 */
export function replyInit(w: ChainWriter, unique: number, conn: FuseConn, limits: FuseInitLimits = {}): boolean {
  const size = conn.minor < 5 ? FUSE_COMPAT_INIT_OUT_SIZE : conn.minor < 23 ? FUSE_COMPAT_22_INIT_OUT_SIZE
    : FUSE_INIT_OUT_SIZE;
  const o = FUSE_OUT_HEADER_SIZE;
  const u16 = (v: number) => Math.max(0, Math.min(0xffff, v | 0));
  zero(o, FUSE_INIT_OUT_SIZE);
  putU32(o, FUSE_KERNEL_VERSION);
  putU32(o + 4, conn.minor);
  putU32(o + 8, Math.min(limits.maxReadahead ?? conn.maxReadahead, conn.maxReadahead));
  putU32(o + 12, conn.flags);
  OV.setUint16(o + 16, u16(limits.maxBackground ?? 0), true);
  OV.setUint16(o + 18, u16(limits.congestionThreshold ?? 0), true);
  putU32(o + 20, limits.maxWrite ?? 128 * 1024);
  putU32(o + 24, limits.timeGran ?? 0);
  OV.setUint16(o + 28, u16(limits.maxPages ?? 32), true);
  OV.setUint16(o + 30, u16(limits.mapAlignment ?? 0), true);
  putU32(o + 32, conn.flags2);
  return send(w, unique, size);
}

/**
 * The INIT reply for a kernel with a newer major: only our major and minor
 * (fuse_init_out's first 8 bytes), after which the kernel may retry INIT.
 * @example if (conn.negotiate(req) === 0) replyInitVersion(w, req.unique)
 */
export function replyInitVersion(w: ChainWriter, unique: number): boolean {
  putU32(FUSE_OUT_HEADER_SIZE, FUSE_KERNEL_VERSION);
  putU32(FUSE_OUT_HEADER_SIZE + 4, FUSE_KERNEL_MINOR_VERSION);
  return send(w, unique, FUSE_COMPAT_INIT_OUT_SIZE);
}

/**
 * fuse_statfs_out (80 bytes).
 * @example replyStatfs(w, req.unique, st)
 */
export function replyStatfs(w: ChainWriter, unique: number, st: FuseStatfs): boolean {
  const o = FUSE_OUT_HEADER_SIZE;
  zero(o, FUSE_STATFS_OUT_SIZE);
  putU64(o, st.blocks);
  putU64(o + 8, st.bfree);
  putU64(o + 16, st.bavail);
  putU64(o + 24, st.files);
  putU64(o + 32, st.ffree);
  putU32(o + 40, st.bsize);
  putU32(o + 44, st.namelen);
  putU32(o + 48, st.frsize);
  return send(w, unique, FUSE_STATFS_OUT_SIZE);
}

/** A reply whose body is one u32 and 4 bytes of padding. */
function replyU32(w: ChainWriter, unique: number, v: number): boolean {
  putU32(FUSE_OUT_HEADER_SIZE, v);
  putU32(FUSE_OUT_HEADER_SIZE + 4, 0);
  return send(w, unique, 8);
}

/**
 * fuse_write_out (8 bytes): how many bytes WRITE took.
 * @example replyWrite(w, req.unique, req.dataLen)
 */
export function replyWrite(w: ChainWriter, unique: number, size: number): boolean {
  return replyU32(w, unique, size);
}

/**
 * fuse_getxattr_out (8 bytes): the size a GETXATTR or LISTXATTR with `size` 0 asked for.
 * @example if (req.size === 0) replyXattrSize(w, req.unique, value.length)
 */
export function replyXattrSize(w: ChainWriter, unique: number, size: number): boolean {
  return replyU32(w, unique, size);
}

/**
 * fuse_lseek_out (8 bytes).
 * @example replyLseek(w, req.unique, dataStart)
 */
export function replyLseek(w: ChainWriter, unique: number, offset: number): boolean {
  putU64(FUSE_OUT_HEADER_SIZE, offset);
  return send(w, unique, FUSE_LSEEK_OUT_SIZE);
}

/**
 * fuse_lk_out (24 bytes) for GETLK: the conflicting lock, or type F_UNLCK.
 * @example replyLock(w, req.unique, { start: 0, end: 99, type: F_WRLCK, pid: 42 })
 */
export function replyLock(w: ChainWriter, unique: number, lk: { start: number; end: number; type: number; pid: number }): boolean {
  const o = FUSE_OUT_HEADER_SIZE;
  putU64(o, lk.start);
  putU64(o + 8, lk.end);
  putU32(o + 16, lk.type);
  putU32(o + 20, lk.pid);
  return send(w, unique, FUSE_LK_OUT_SIZE);
}

/**
 * A reply whose body is `data[start, end)`: READLINK's target (no NUL),
 * GETXATTR's value, LISTXATTR's NUL-separated names.
 * @example replyBytes(w, req.unique, value)
 */
export function replyBytes(w: ChainWriter, unique: number, data: Uint8Array, start = 0, end = data.length): boolean {
  const n = FUSE_OUT_HEADER_SIZE + end - start;
  if (end < start || w.remaining < n) return false;
  putHeader(n, 0, unique);
  w.copyFrom(OUT, 0, FUSE_OUT_HEADER_SIZE);
  w.copyFrom(data, start, end);
  return true;
}

/**
 * A reply whose body is a string encoded by `encodeName` (READLINK from a
 * string target). False when it does not fit or does not encode.
 * @example replyString(w, req.unique, "../lib/libc.so.6")
 */
export function replyString(w: ChainWriter, unique: number, s: string): boolean {
  const n = encodeName(s, OUT, FUSE_OUT_HEADER_SIZE);
  return n >= 0 && send(w, unique, n);
}

/**
 * Starts a reply whose body the caller writes (READ data, anything of
 * variable length): writes a provisional header (len 16) and returns the
 * position to pass to `endReply`, or -1 when fewer than 16 bytes are
 * writable. Nothing is remembered here, so interleaved requests are fine.
 * @example
 * const at = beginReply(w, req.unique);
 * if (at >= 0) { w.preadFrom(fd, req.offset, Math.min(req.size, w.remaining)); endReply(w, at); }
 */
export function beginReply(w: ChainWriter, unique: number): number {
  const at = w.pos;
  return send(w, unique, 0) ? at : -1;
}

/**
 * Finishes a reply begun at `at`: sets its len to the bytes written since.
 * The writer moves back to patch the header and returns to where it was.
 * @example endReply(w, at)
 */
export function endReply(w: ChainWriter, at: number): boolean {
  if (at < 0 || w.pos < at + FUSE_OUT_HEADER_SIZE) return false;
  return patchHeader(w, at, w.pos - at, 0);
}

/**
 * Turns a reply begun at `at` into an error: discards what was written after
 * the header (the used length ends at the header) and sets `errno`.
 * @example if (n < 0) return abortReply(w, at, -n);
 */
export function abortReply(w: ChainWriter, at: number, errno: number): boolean {
  if (at < 0 || w.pos < at + FUSE_OUT_HEADER_SIZE) return false;
  let e = errno < 0 ? -errno : errno;
  if (!(e >= 1 && e <= 511)) e = EIO;
  return patchHeader(w, at, FUSE_OUT_HEADER_SIZE, -(e | 0));
}

/**
 * Rewrites len and error of the header at `at` and leaves the writer at
 * `at + len`. ChainWriter only moves forward, so this rewinds to the chain's
 * start and skips: O(pieces), once per variable-length reply. A header split
 * over pieces is handled like any other bytes.
 */
function patchHeader(w: ChainWriter, at: number, len: number, error: number): boolean {
  const end = at + len;
  w.rewind();
  w.skip(at);
  putU32(0, len);
  OV.setInt32(4, error, true);
  w.copyFrom(OUT, 0, 8);
  w.skip(end - at - 8);
  return true;
}

// ---------------------------------------------------------------- directories

/**
 * Bytes of one fuse_dirent record with an `n`-byte name, padded to 8 as
 * fuse.h's FUSE_DIRENT_SIZE computes it.
 * @example direntSize(1) === 32 && direntSize(9) === 40
 */
export function direntSize(n: number): number {
  return (FUSE_DIRENT_SIZE + n + 7) & ~7;
}

/**
 * Bytes of one fuse_direntplus record with an `n`-byte name (entry_out + dirent + name, padded to 8).
 * @example direntPlusSize(8) === 160
 */
export function direntPlusSize(n: number): number {
  return (FUSE_ENTRY_OUT_SIZE + FUSE_DIRENT_SIZE + n + 7) & ~7;
}

/**
 * The dirent `type` of a mode: its S_IFMT bits >> 12 (DT_REG 8, DT_DIR 4, DT_LNK 10 …).
 * @example direntType(0o040755) === 4
 */
export function direntType(mode: number): number {
  return (mode >>> 12) & 15;
}

/**
 * Packs a READDIR or READDIRPLUS reply: `begin`, then `add`/`addPlus` per
 * entry until one returns false (the entry did not fit: nothing of it was
 * written; start there next time), then `end`. The body never exceeds the
 * request's `size` nor the writable room. `off` of an entry is the offset
 * the next READDIR passes to continue after it. A name the kernel would
 * refuse (empty, over 255 bytes, holding '/' or NUL, or a string that does not
 * encode) is skipped: add returns true, writes nothing, and counts `skipped`.
 * For READDIRPLUS, the kernel takes a lookup reference for every entry with
 * a non-zero `nodeid` except "." and ".." (it ignores their entry_out):
 * count lookups the same way.
 * @example
 * if (dp.begin(w, req.unique, req.size)) {
 *   for (const e of entries.slice(req.offset)) if (!dp.add(e.name, e.ino, e.next, direntType(e.mode))) break;
 *   dp.end();
 * }
 */
export class DirentPacker {
  /** Entries written and entries skipped since `begin`. */
  count = 0;
  skipped = 0;
  private w: ChainWriter | null = null;
  private at = -1;
  private limit = 0;

  /** Reserves the header; false when even that does not fit. */
  begin(w: ChainWriter, unique: number, size: number): boolean {
    this.w = w;
    this.count = this.skipped = 0;
    this.at = beginReply(w, unique);
    if (this.at < 0) return false;
    this.limit = w.pos + Math.max(0, Math.min(size, w.remaining));
    return true;
  }

  /** Appends a fuse_dirent. */
  add(name: string | Uint8Array, ino: number, off: number, type: number): boolean {
    return this.put(name, null, ino, off, type);
  }

  /** Appends a fuse_direntplus; its ino and type come from `entry.attr`. */
  addPlus(name: string | Uint8Array, entry: FuseEntryOut, off: number): boolean {
    return this.put(name, entry, entry.attr.ino, off, direntType(entry.attr.mode));
  }

  /** Sets the header's len; false if `begin` failed. */
  end(): boolean {
    const w = this.w;
    if (w === null || this.at < 0) return false;
    const ok = endReply(w, this.at);
    this.w = null;
    this.at = -1;
    return ok;
  }

  private put(name: string | Uint8Array, entry: FuseEntryOut | null, ino: number, off: number, type: number): boolean {
    const w = this.w;
    if (w === null || this.at < 0) return false;
    const head = entry === null ? FUSE_DIRENT_SIZE : FUSE_ENTRY_OUT_SIZE + FUSE_DIRENT_SIZE;
    let n: number;
    if (typeof name === "string") {
      n = encodeName(name, OUT, head, head + FUSE_NAME_MAX);
    } else {
      n = name.length <= FUSE_NAME_MAX ? name.length : -1;
      if (n > 0) OUT.set(name, head);
    }
    if (n < 1 || n > FUSE_NAME_MAX || !plainName(head, n)) {
      this.skipped++;
      return true;
    }
    const rec = (head + n + 7) & ~7;
    if (w.pos + rec > this.limit) return false;
    if (entry !== null) putEntry(0, entry);
    const d = head - FUSE_DIRENT_SIZE;
    putU64(d, ino);
    putU64(d + 8, off);
    putU32(d + 16, n);
    putU32(d + 20, type);
    zero(head + n, rec - head - n);
    w.copyFrom(OUT, 0, rec);
    this.count++;
    return true;
  }
}

/** OUT[from, from + n) holds neither '/' nor NUL. */
function plainName(from: number, n: number): boolean {
  for (let i = from; i < from + n; i++) if (OUT[i] === SLASH || OUT[i] === 0) return false;
  return true;
}

/**
 * What virtio-fs serves: a file system as inode numbers and errnos, with no
 * FUSE in sight. The FUSE layer (requests over the virtqueues) calls these;
 * a backend is the passthrough of a host directory, an in-memory tree
 * (`MemoryFs`, `--memory`), or yours (a synthetic tree in thirty lines).
 *
 * Conventions: inode numbers are positive integers (the backend's own; the
 * FUSE layer maps FUSE_ROOT_ID to `root`); failures are negative errnos
 * (-2 for ENOENT), never exceptions; `lookup` (and every call that creates
 * an entry) counts one reference the kernel holds until `forget` gives it
 * back. File data moves through chain cursors, so a read or write goes
 * straight between the guest's buffers and the backend's storage.
 */
import type { ChainReader, ChainWriter } from "../../index.ts";

/** errno values the backends return (negated). */
export const E = {
  PERM: 1, NOENT: 2, IO: 5, BADF: 9, ACCES: 13, EXIST: 17, XDEV: 18, NOTDIR: 20, ISDIR: 21, INVAL: 22,
  FBIG: 27, NOSPC: 28, ROFS: 30, MLINK: 31, RANGE: 34, NAMETOOLONG: 36, NOSYS: 38, NOTEMPTY: 39, LOOP: 40,
  NODATA: 61, OVERFLOW: 75, OPNOTSUPP: 95,
} as const;

/** File types (st_mode & S_IFMT). */
export const S_IFMT = 0o170000, S_IFDIR = 0o040000, S_IFREG = 0o100000, S_IFLNK = 0o120000,
  S_IFIFO = 0o010000, S_IFSOCK = 0o140000, S_IFCHR = 0o020000, S_IFBLK = 0o060000;

/** An inode's attributes, as stat(2) gives them. */
export interface FsStat {
  /** The node number the guest uses to name this inode (lookup's result, FORGET's argument). */
  ino: number;
  /** The inode number the guest's stat() shows, when it differs from `ino` (a host's st_ino). */
  attrIno?: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  size: number;
  blocks: number;
  blksize: number;
  atimeSec: number;
  atimeNsec: number;
  mtimeSec: number;
  mtimeNsec: number;
  ctimeSec: number;
  ctimeNsec: number;
}

/** SETATTR: only the fields present change; times may be "now". */
export interface SetAttr {
  mode?: number;
  uid?: number;
  gid?: number;
  size?: number;
  atime?: { sec: number; nsec: number } | "now";
  mtime?: { sec: number; nsec: number } | "now";
}

/** Who asks (the FUSE request's credentials), for ownership of what is created. */
export interface Caller {
  uid: number;
  gid: number;
}

/** One directory entry for readdir: its name, inode, type (S_IF* >> 12) and the offset of the entry after it. */
export type DirEmit = (name: string, ino: number, type: number, next: number) => boolean;

export interface FsStatfs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

/**
 * A file system for virtio-fs. Optional operations missing mean ENOSYS
 * (or EROFS for changes when `readonly`).
 * @example
 * // A read-only tree of one file: see docs/DEVICES.md for the whole 30 lines.
 * const fs: FsBackend = { root: 1, lookup: (p, n) => (p === 1 && n === "hello" ? file : -E.NOENT), ... };
 */
export interface FsBackend {
  readonly root: number;
  readonly readonly?: boolean;
  lookup(parent: number, name: string): FsStat | number;
  forget?(ino: number, count: number): void;
  getattr(ino: number): FsStat | number;
  setattr?(ino: number, set: SetAttr): FsStat | number;
  readlink?(ino: number): string | number;
  /** Opens a file; returns a handle (≥ 0) that read/write/release get, or -errno. */
  open?(ino: number, flags: number): number;
  read(ino: number, fh: number, offset: number, size: number, out: ChainWriter): number;
  write?(ino: number, fh: number, offset: number, size: number, data: ChainReader): number;
  release?(ino: number, fh: number): void;
  create?(parent: number, name: string, mode: number, flags: number, who: Caller): { stat: FsStat; fh: number } | number;
  mkdir?(parent: number, name: string, mode: number, who: Caller): FsStat | number;
  mknod?(parent: number, name: string, mode: number, rdev: number, who: Caller): FsStat | number;
  symlink?(parent: number, name: string, target: string, who: Caller): FsStat | number;
  link?(ino: number, parent: number, name: string): FsStat | number;
  unlink?(parent: number, name: string): number;
  rmdir?(parent: number, name: string): number;
  rename?(parent: number, name: string, newParent: number, newName: string, flags: number): number;
  /** Opens a directory for reading (a handle readdir gets), or -errno; absent: handle 0. */
  opendir?(ino: number): number;
  releasedir?(ino: number, fh: number): void;
  /** Entries from `offset` (0: the start; else a `next` value given before) until emit returns false. */
  readdir(ino: number, offset: number, emit: DirEmit, fh?: number): number;
  statfs?(): FsStatfs;
  /** Extended attributes (`--xattr`): the value, or -errno (-ENODATA when absent). */
  getxattr?(ino: number, name: string): Uint8Array | number;
  setxattr?(ino: number, name: string, value: Uint8Array, flags: number): number;
  /** The names, each NUL-terminated, or -errno. */
  listxattr?(ino: number): Uint8Array | number;
  removexattr?(ino: number, name: string): number;
  /** SEEK_DATA / SEEK_HOLE (and SET/CUR/END) on an open file: the new offset, or -errno. */
  lseek?(ino: number, fh: number, offset: number, whence: number): number;
  fallocate?(ino: number, fh: number, mode: number, offset: number, length: number): number;
  /** Copies within the file system without the guest's buffers: bytes copied, or -errno. */
  copyFileRange?(ino: number, fh: number, offIn: number, inoOut: number, fhOut: number, offOut: number, length: number, flags: number): number;
  /** The guest went away (or reset the device): every lookup and handle it held is void. */
  reset?(): void;
  fsync?(ino: number, fh: number, datasync: boolean): number;
}

/**
 * The host side of virtio-fs: one exported directory DIR and the operations a FUSE server
 * needs on it, none of which may open, create, read or write anything outside DIR.
 *
 * Theory of operation. An inode is an O_PATH fd (O_NOFOLLOW, O_CLOEXEC). Every operation
 * takes such an fd and at most one name component: the kernel walks one step from a
 * directory we already hold, so no path from the guest is ever resolved on the host. Names
 * are checked first (non-empty, at most NAME_MAX bytes, no '/', no NUL, not "." or "..")
 * and refused with -EINVAL. Lookups open with O_PATH | O_NOFOLLOW (through openat2 with
 * RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS when the kernel has it), so
 * a symlink comes back as itself (S_IFLNK) and is never followed; a symlink fd used as a
 * directory gives -ENOTDIR. Creation never follows either: O_CREAT | O_EXCL | O_NOFOLLOW,
 * mkdirat, mknodat, symlinkat, renameat2 and linkat act on the final name itself.
 *
 * Acting on an inode fd: statx, fchownat, utimensat and linkat with "" + AT_EMPTY_PATH,
 * fchmodat2 with AT_EMPTY_PATH (Linux ≥ 6.6; else chmod through /proc/self/fd/N). Opening
 * for I/O reopens /proc/self/fd/N, which lands on the fd's own inode and walks no path;
 * symlinks are refused (-ELOOP; the kernel refuses too) and so are FIFOs, sockets and
 * devices (-EACCES: a FUSE guest opens those itself, and opening a FIFO would block).
 * Extended attributes go through the path "/proc/self/fd/N" (f*xattr refuse O_PATH fds).
 *
 * "..": the FUSE kernel only looks it up for NFS export. lookup(parent, "..") is refused
 * at DIR itself (-EACCES), and otherwise only answered after walking up from the result
 * to DIR; a directory that someone moved out of DIR reaches "/" first and gets -EACCES.
 * What cannot be prevented: an fd we hold keeps naming its directory wherever the host
 * moves it, so operations relative to it follow it out of DIR. That is the host's doing.
 *
 * Results are fds or 0 (and attributes in a reusable Statx), or -errno for the FUSE
 * reply; nothing allocates on these paths when names come as bytes. With `readOnly` every
 * change is -EROFS. Fds handed out are counted until they come back through close().
 */
import * as sys from "../../../ffi/sys.ts";
import { Dirents, Statfs, Statx, type CStr } from "../../../ffi/sys.ts";
import {
  AT_EMPTY_PATH, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_SYMLINK_NOFOLLOW, EISDIR, ELOOP, ENAMETOOLONG, EROFS, NAME_MAX,
  O_ACCMODE, O_APPEND, O_CREAT, O_DIRECT, O_DIRECTORY, O_DSYNC, O_EXCL, O_LARGEFILE, O_NOATIME, O_NOCTTY,
  O_NOFOLLOW, O_NONBLOCK, O_PATH, O_RDONLY, O_SYNC, O_TRUNC, O_WRONLY, PATH_MAX, PROC_SUPER_MAGIC,
  RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFSOCK,
  SEEK_SET, STATX_TYPE,
} from "../../../ffi/constants.ts";
import { S_IFBLK, S_IFMT, S_IFREG } from "../../../ffi/structs.ts";
import { EACCES, EBADF, EEXIST, EINVAL, ENOENT, ENOSYS, EPERM, ErrnoError } from "../../../ffi/errno.ts";

/** A single name component: a string (UTF-8 encoded) or the raw bytes from a FUSE request. */
export type Name = string | Uint8Array;

export interface HostDirOptions {
  /** Refuse every change (create, write-open, setattr, rename, xattr set...) with -EROFS. */
  readOnly?: boolean;
  /** Let mknod create character and block devices; otherwise -EPERM. */
  allowDevices?: boolean;
  /** Look up and create through openat2 RESOLVE_BENEATH (default: when the kernel has it); false: openat + O_NOFOLLOW. */
  openat2?: boolean;
}

/** Flags a guest may pass to open/create; O_CREAT, O_EXCL, O_PATH, O_TMPFILE, O_NOFOLLOW are ours to set. */
const OPEN_FLAGS = O_ACCMODE | O_APPEND | O_TRUNC | O_NONBLOCK | O_DIRECT | O_SYNC | O_DSYNC | O_NOATIME |
  O_DIRECTORY | O_LARGEFILE;
const RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
const INODE = O_PATH | O_NOFOLLOW;
const DOTDOT = sys.cstring("..");
const DOT = sys.cstring(".");
const PROC_FD = "/proc/self/fd/";
/** Walking up from a ".." result to DIR: deeper than this is treated as outside. */
const MAX_DEPTH = PATH_MAX / 2;

const enc = new TextEncoder();

function isDotDot(name: Name): boolean {
  return typeof name === "string" ? name === ".." : name.byteLength === 2 && name[0] === 0x2e && name[1] === 0x2e;
}

/** A NUL-terminated buffer for up to `max` bytes whose last byte is never written (so it stays a CStr). */
class NameBuf {
  readonly c: CStr;
  private readonly body: Uint8Array;
  constructor(readonly max: number) {
    this.c = new Uint8Array(max + 2);
    this.body = this.c.subarray(0, max + 1);
  }
  /** Copies `s` in: its length, or -EINVAL (empty, '/' when `component`, NUL) / -ENAMETOOLONG. */
  put(s: Name, component: boolean): number {
    let n: number;
    if (typeof s === "string") {
      const r = enc.encodeInto(s, this.body);
      if (r.read < s.length || r.written > this.max) return -ENAMETOOLONG;
      n = r.written;
    } else {
      n = s.byteLength;
      if (n > this.max) return -ENAMETOOLONG;
      this.c.set(s);
    }
    if (n === 0) return -EINVAL;
    const c = this.c;
    for (let i = 0; i < n; i++) if (c[i] === 0 || (component && c[i] === 0x2f)) return -EINVAL;
    if (component && c[0] === 0x2e && (n === 1 || (n === 2 && c[1] === 0x2e))) return -EINVAL;
    c[n] = 0;
    return n;
  }
}

export class HostDir {
  /** O_PATH fd of DIR: the parent for names at the top. */
  readonly rootFd: number;
  readonly readOnly: boolean;
  readonly allowDevices: boolean;
  /** Whether lookups and creates go through openat2 (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS). */
  readonly usesOpenat2: boolean;
  /** Where lookup/getattr/create/mkdir... put attributes unless given another Statx; overwritten by the next call. */
  readonly attr = new Statx();
  /** The default buffer of readdir(). */
  readonly dirents = new Dirents();
  /** The default result of statfs(). */
  readonly statfsOut = new Statfs();

  private procFd: number;
  private readonly rootAttr = new Statx();
  private readonly tmpA = new Statx();
  private readonly tmpB = new Statx();
  private readonly nameA = new NameBuf(NAME_MAX);
  private readonly nameB = new NameBuf(NAME_MAX);
  private readonly target = new NameBuf(PATH_MAX - 1);
  /** XATTR_NAME_MAX is 255 too. */
  private readonly xname = new NameBuf(NAME_MAX);
  /** "N\0" for openat(procFd, ...) and "/proc/self/fd/N\0" for the xattr calls. */
  private readonly fdName = new Uint8Array(16);
  private readonly fdPath = new Uint8Array(32);
  private hasFchmodat2 = true;
  private live = 0;

  /** Opens DIR (following symlinks in the path given by the host's admin); throws ErrnoError ENOTDIR for a non-directory. */
  constructor(dir: string, opts: HostDirOptions = {}) {
    this.readOnly = opts.readOnly ?? false;
    this.allowDevices = opts.allowDevices ?? false;
    this.rootFd = sys.open(dir, O_PATH | O_DIRECTORY);
    let procFd = -1;
    try {
      procFd = sys.open(PROC_FD, O_PATH | O_DIRECTORY);
      if (sys.statfs(procFd).type !== PROC_SUPER_MAGIC) throw new Error(`${PROC_FD} is not procfs: cannot reopen inodes`);
      const r = sys.fstatxRaw(this.rootFd, this.rootAttr);
      if (r < 0) throw new ErrnoError("statx", -r, dir);
      let use = opts.openat2 ?? true;
      if (use) {
        const fd = sys.openat2Raw(this.rootFd, DOT, O_PATH | O_DIRECTORY, 0, RESOLVE);
        if (fd >= 0) sys.closeRaw(fd);
        else if (opts.openat2) throw new ErrnoError("openat2", -fd, dir);
        else use = false;
      }
      this.usesOpenat2 = use;
    } catch (e) {
      sys.closeQuiet(procFd);
      sys.closeQuiet(this.rootFd);
      throw e;
    }
    this.procFd = procFd;
    enc.encodeInto(PROC_FD, this.fdPath);
    this.live = 2;
  }

  /** Fds this object opened and has not closed, DIR and /proc/self/fd included (2 when idle, 0 after dispose). */
  get openFds(): number {
    return this.live;
  }

  /** Closes an fd this object handed out: 0 or -errno. DIR's fd is refused (-EBADF). */
  close(fd: number): number {
    if (fd < 0 || fd === this.rootFd || fd === this.procFd) return -EBADF;
    const r = sys.closeRaw(fd);
    if (r === 0) this.live--;
    return r;
  }

  /** Closes DIR and /proc/self/fd; fds handed out stay open (see openFds). */
  dispose(): void {
    if (this.procFd < 0) return;
    sys.closeQuiet(this.procFd);
    sys.closeQuiet(this.rootFd);
    this.procFd = -1;
    this.live -= 2;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** The attributes of an inode (a symlink's own): 0 or -errno. */
  getattr(inodeFd: number, out = this.attr): number {
    if (inodeFd < 0) return -EBADF;
    return sys.fstatxRaw(inodeFd, out);
  }

  /**
   * An O_PATH fd for `name` in `parentFd`, attributes in `out`: the fd, or -errno. A symlink
   * is returned as itself. ".." is answered only below DIR (see the file header).
   */
  lookup(parentFd: number, name: Name, out = this.attr): number {
    if (parentFd < 0) return -EBADF;
    if (isDotDot(name)) return this.lookupParent(parentFd, out);
    const n = this.nameA.put(name, true);
    if (n < 0) return n;
    return this.openInode(parentFd, this.nameA.c, out);
  }

  /** Reopens an inode for I/O with open(2) flags (O_CREAT and friends dropped): the fd, or -errno. */
  open(inodeFd: number, flags: number): number {
    if (inodeFd < 0) return -EBADF;
    if (this.readOnly && ((flags & O_ACCMODE) !== O_RDONLY || (flags & O_TRUNC) !== 0)) return -EROFS;
    const r = sys.fstatxRaw(inodeFd, this.tmpA, STATX_TYPE);
    if (r < 0) return r;
    const t = this.tmpA.mode & S_IFMT;
    if (t === S_IFLNK) return -ELOOP;
    if (t !== S_IFREG && t !== S_IFDIR) return -EACCES;
    const fd = sys.openatRaw(this.procFd, this.putFd(this.fdName, 0, inodeFd), (flags & OPEN_FLAGS) | O_NOCTTY);
    if (fd >= 0) this.live++;
    return fd;
  }

  /** A new O_PATH fd of the inode behind any fd (e.g. the one create() returned): the fd, or -errno. */
  inodeOf(fd: number, out = this.attr): number {
    if (fd < 0) return -EBADF;
    const fl = sys.getflRaw(fd);
    if (fl < 0) return fl;
    // An O_PATH fd (a symlink's among them) is copied; an fd opened for I/O is a file or a
    // directory, reopened as O_PATH through its magic link (O_NOFOLLOW would open the link).
    const p = (fl & O_PATH) !== 0 ? sys.dupRaw(fd) : sys.openatRaw(this.procFd, this.putFd(this.fdName, 0, fd), O_PATH);
    return p < 0 ? p : this.adopt(p, out);
  }

  /**
   * Creates and opens a regular file: the open fd, attributes in `out`, or -errno. If the
   * name exists and `flags` lacks O_EXCL, it is opened as open() would (never through a symlink).
   */
  create(parentFd: number, name: Name, flags: number, mode: number, out = this.attr): number {
    if (this.readOnly) return -EROFS;
    if (parentFd < 0) return -EBADF;
    const n = this.nameA.put(name, true);
    if (n < 0) return n;
    const fl = (flags & OPEN_FLAGS & ~O_DIRECTORY) | O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY;
    const fd = this.usesOpenat2
      ? sys.openat2Raw(parentFd, this.nameA.c, fl, mode & 0o7777, RESOLVE)
      : sys.openatRaw(parentFd, this.nameA.c, fl, mode & 0o7777);
    if (fd >= 0) return this.adopt(fd, out);
    if (fd !== -EEXIST || (flags & O_EXCL) !== 0) return fd;
    const ino = this.openInode(parentFd, this.nameA.c, out);
    if (ino < 0) return ino;
    // open(2) with O_CREAT of an existing directory is EISDIR, whatever the access mode.
    const f = (out.mode & S_IFMT) === S_IFDIR ? -EISDIR : this.open(ino, flags & ~O_DIRECTORY);
    this.close(ino);
    if (f < 0) return f;
    const r = sys.fstatxRaw(f, out);
    if (r < 0) {
      this.close(f);
      return r;
    }
    return f;
  }

  /** mkdir: an O_PATH fd of the new directory (attributes in `out`), or -errno. */
  mkdir(parentFd: number, name: Name, mode: number, out = this.attr): number {
    const n = this.checkChange(parentFd, name);
    if (n < 0) return n;
    const r = sys.mkdiratRaw(parentFd, this.nameA.c, mode & 0o7777);
    return r < 0 ? r : this.openInode(parentFd, this.nameA.c, out);
  }

  /**
   * mknod of a FIFO, socket or regular file (S_IFMT bits of `mode`; 0 means regular), or of
   * a device when allowDevices (else -EPERM): an O_PATH fd of it, or -errno.
   */
  mknod(parentFd: number, name: Name, mode: number, rdev: number, out = this.attr): number {
    const n = this.checkChange(parentFd, name);
    if (n < 0) return n;
    const t = mode & S_IFMT;
    const device = t === S_IFCHR || t === S_IFBLK;
    if (device && !this.allowDevices) return -EPERM;
    if (!device && t !== 0 && t !== S_IFREG && t !== S_IFIFO && t !== S_IFSOCK) return -EINVAL;
    const r = sys.mknodatRaw(parentFd, this.nameA.c, mode & (S_IFMT | 0o7777), device ? rdev : 0);
    return r < 0 ? r : this.openInode(parentFd, this.nameA.c, out);
  }

  /** A symlink `name` -> `target` (any text below PATH_MAX; it is never followed here): an O_PATH fd of it, or -errno. */
  symlink(parentFd: number, name: Name, target: Name, out = this.attr): number {
    const n = this.checkChange(parentFd, name);
    if (n < 0) return n;
    const t = this.target.put(target, false);
    if (t < 0) return t;
    const r = sys.symlinkatRaw(this.target.c, parentFd, this.nameA.c);
    return r < 0 ? r : this.openInode(parentFd, this.nameA.c, out);
  }

  /** The target of a symlink inode into `buf`: its length, or -errno (-EINVAL for a non-symlink, as readlink(2)). */
  readlink(inodeFd: number, buf: Uint8Array): number {
    if (inodeFd < 0) return -EBADF;
    const r = sys.readlinkatRaw(inodeFd, sys.EMPTY_PATH, buf);
    // readlinkat(fd, "") of a non-symlink says ENOENT.
    if (r === -ENOENT && sys.fstatxRaw(inodeFd, this.tmpA, STATX_TYPE) === 0 && (this.tmpA.mode & S_IFMT) !== S_IFLNK) {
      return -EINVAL;
    }
    return r;
  }

  /** unlink of a non-directory (a symlink itself, never its target): 0 or -errno. */
  unlink(parentFd: number, name: Name): number {
    const n = this.checkChange(parentFd, name);
    return n < 0 ? n : sys.unlinkatRaw(parentFd, this.nameA.c, 0);
  }

  rmdir(parentFd: number, name: Name): number {
    const n = this.checkChange(parentFd, name);
    return n < 0 ? n : sys.unlinkatRaw(parentFd, this.nameA.c, AT_REMOVEDIR);
  }

  /** renameat2 with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT: 0 or -errno. */
  rename(oldParentFd: number, oldName: Name, newParentFd: number, newName: Name, flags = 0): number {
    const n = this.checkChange(oldParentFd, oldName);
    if (n < 0) return n;
    if (newParentFd < 0) return -EBADF;
    const m = this.nameB.put(newName, true);
    if (m < 0) return m;
    return sys.renameat2Raw(oldParentFd, this.nameA.c, newParentFd, this.nameB.c, flags);
  }

  /** A hard link to the inode as `newName` in `newParentFd`: an O_PATH fd of it, or -errno. */
  link(inodeFd: number, newParentFd: number, newName: Name, out = this.attr): number {
    const n = this.checkChange(newParentFd, newName);
    if (n < 0) return n;
    if (inodeFd < 0) return -EBADF;
    let r = sys.linkatRaw(inodeFd, sys.EMPTY_PATH, newParentFd, this.nameA.c, AT_EMPTY_PATH);
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH (-ENOENT without); the /proc link does not.
    if (r === -ENOENT || r === -EPERM) {
      r = sys.linkatRaw(this.procFd, this.putFd(this.fdName, 0, inodeFd), newParentFd, this.nameA.c, AT_SYMLINK_FOLLOW);
    }
    return r < 0 ? r : this.openInode(newParentFd, this.nameA.c, out);
  }

  /** chmod of the inode (permission bits of `mode`); a symlink gives -EOPNOTSUPP. 0 or -errno. */
  chmod(inodeFd: number, mode: number): number {
    if (this.readOnly) return -EROFS;
    if (inodeFd < 0) return -EBADF;
    if (this.hasFchmodat2) {
      const r = sys.fchmodatRaw(inodeFd, sys.EMPTY_PATH, mode & 0o7777, AT_EMPTY_PATH);
      if (r !== -ENOSYS) return r;
      this.hasFchmodat2 = false;
    }
    return sys.fchmodatRaw(this.procFd, this.putFd(this.fdName, 0, inodeFd), mode & 0o7777, 0);
  }

  /** chown of the inode itself (-1 keeps a value): 0 or -errno. */
  chown(inodeFd: number, uid: number, gid: number): number {
    if (this.readOnly) return -EROFS;
    if (inodeFd < 0) return -EBADF;
    return sys.fchownatRaw(inodeFd, sys.EMPTY_PATH, uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
  }

  /** Sets the size of a regular file through a short-lived write fd: 0 or -errno. */
  truncate(inodeFd: number, size: number): number {
    if (this.readOnly) return -EROFS;
    const fd = this.open(inodeFd, O_WRONLY);
    if (fd < 0) return fd;
    const r = sys.ftruncateRaw(fd, size);
    this.close(fd);
    return r;
  }

  /** Sets atime and mtime of the inode itself; a nanosecond value may be UTIME_NOW or UTIME_OMIT. 0 or -errno. */
  utimes(inodeFd: number, atimeSec: number, atimeNsec: number, mtimeSec: number, mtimeNsec: number): number {
    if (this.readOnly) return -EROFS;
    if (inodeFd < 0) return -EBADF;
    return sys.utimensatRaw(inodeFd, sys.EMPTY_PATH, atimeSec, atimeNsec, mtimeSec, mtimeNsec,
      AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
  }

  /** statfs of the filesystem holding the inode, into `out`: 0 or -errno. */
  statfs(inodeFd: number, out = this.statfsOut): number {
    if (inodeFd < 0) return -EBADF;
    return sys.fstatfsRaw(inodeFd, out);
  }

  /**
   * Reads entries of a directory opened with open(inodeFd, O_RDONLY | O_DIRECTORY) from
   * `offset` (0, or an entry's `off` to resume after it) into `d`: bytes read (0 at the
   * end), or -errno. Walk them with `d.next()`; "." and ".." are included (`d.isDot`).
   */
  readdir(dirFd: number, offset: number | bigint, d = this.dirents): number {
    if (dirFd < 0) return -EBADF;
    const r = sys.lseekRaw(dirFd, offset, SEEK_SET);
    if (r < 0) return r;
    return sys.getdents64Raw(dirFd, d);
  }

  /** An xattr of the inode into `buf` (null: its size): the length, or -errno (-ENODATA when absent). */
  getxattr(inodeFd: number, name: Name, buf: Uint8Array | null): number {
    if (inodeFd < 0) return -EBADF;
    const n = this.xname.put(name, false);
    return n < 0 ? n : sys.getxattrRaw(this.putFd(this.fdPath, PROC_FD.length, inodeFd), this.xname.c, buf);
  }

  /** Sets an xattr (flags XATTR_CREATE / XATTR_REPLACE): 0 or -errno. */
  setxattr(inodeFd: number, name: Name, value: Uint8Array, flags = 0): number {
    if (this.readOnly) return -EROFS;
    if (inodeFd < 0) return -EBADF;
    const n = this.xname.put(name, false);
    return n < 0 ? n : sys.setxattrRaw(this.putFd(this.fdPath, PROC_FD.length, inodeFd), this.xname.c, value, flags);
  }

  /** NUL-separated xattr names into `buf` (null: the size needed): the length, or -errno. */
  listxattr(inodeFd: number, buf: Uint8Array | null): number {
    if (inodeFd < 0) return -EBADF;
    return sys.listxattrRaw(this.putFd(this.fdPath, PROC_FD.length, inodeFd), buf);
  }

  removexattr(inodeFd: number, name: Name): number {
    if (this.readOnly) return -EROFS;
    if (inodeFd < 0) return -EBADF;
    const n = this.xname.put(name, false);
    return n < 0 ? n : sys.removexattrRaw(this.putFd(this.fdPath, PROC_FD.length, inodeFd), this.xname.c);
  }

  /** fsync / fdatasync of an fd from open() or create(): 0 or -errno. */
  fsync(openFd: number, datasync = false): number {
    if (openFd < 0) return -EBADF;
    return datasync ? sys.fdatasyncRaw(openFd) : sys.fsyncRaw(openFd);
  }

  /** syncfs of the filesystem holding DIR: 0 or -errno. */
  syncfs(): number {
    const fd = sys.openatRaw(this.procFd, this.putFd(this.fdName, 0, this.rootFd), O_RDONLY | O_DIRECTORY);
    if (fd < 0) return fd;
    const r = sys.syncfsRaw(fd);
    sys.closeRaw(fd);
    return r;
  }

  // ---- inside ----------------------------------------------------------------

  /** Read-only mode, the parent fd and the name (into nameA) of a change: n ≥ 0, or -errno. */
  private checkChange(parentFd: number, name: Name): number {
    if (this.readOnly) return -EROFS;
    if (parentFd < 0) return -EBADF;
    return this.nameA.put(name, true);
  }

  /** The O_PATH fd of a checked name, counted, attributes in `out`. */
  private openInode(parentFd: number, name: CStr, out: Statx): number {
    const fd = this.usesOpenat2
      ? sys.openat2Raw(parentFd, name, INODE, 0, RESOLVE)
      : sys.openatRaw(parentFd, name, INODE);
    return fd < 0 ? fd : this.adopt(fd, out);
  }

  /** Counts `fd` as handed out once its attributes are in `out`; closes it if statx fails. */
  private adopt(fd: number, out: Statx): number {
    const r = sys.fstatxRaw(fd, out);
    if (r < 0) {
      sys.closeRaw(fd);
      return r;
    }
    this.live++;
    return fd;
  }

  private lookupParent(fd: number, out: Statx): number {
    const r = sys.fstatxRaw(fd, this.tmpA);
    if (r < 0) return r;
    if (this.tmpA.sameInode(this.rootAttr)) return -EACCES;
    // RESOLVE_BENEATH refuses ".." outright, so plain openat; the walk below is the check.
    const up = sys.openatRaw(fd, DOTDOT, O_PATH | O_DIRECTORY | O_NOFOLLOW);
    if (up < 0) return up;
    const inside = this.belowRoot(up);
    if (inside < 0) {
      sys.closeRaw(up);
      return inside;
    }
    return this.adopt(up, out);
  }

  /** 0 when DIR is `fd` or one of its ancestors, -EACCES when "/" comes first, or -errno. */
  private belowRoot(fd: number): number {
    let cur = fd;
    let here = this.tmpA, above = this.tmpB;
    let r = sys.fstatxRaw(cur, here);
    for (let depth = 0; r === 0; depth++) {
      if (here.sameInode(this.rootAttr)) break;
      if (depth === MAX_DEPTH) {
        r = -EACCES;
        break;
      }
      const up = sys.openatRaw(cur, DOTDOT, O_PATH | O_DIRECTORY | O_NOFOLLOW);
      if (up < 0) {
        r = up;
        break;
      }
      if (cur !== fd) sys.closeRaw(cur);
      cur = up;
      r = sys.fstatxRaw(cur, above);
      // At the top of the namespace ".." is the directory itself.
      if (r === 0 && above.sameInode(here)) r = -EACCES;
      const t = here;
      here = above;
      above = t;
    }
    if (cur !== fd) sys.closeRaw(cur);
    return r;
  }

  /** Writes `fd` in decimal and a NUL at buf[at..]; the rest of buf is NUL, so it stays a CStr. */
  private putFd(buf: Uint8Array, at: number, fd: number): CStr {
    let len = 1;
    for (let v = fd; v >= 10; v = Math.floor(v / 10)) len++;
    for (let i = at + len - 1, v = fd; i >= at; i--, v = Math.floor(v / 10)) buf[i] = 0x30 + (v % 10);
    buf.fill(0, at + len);
    return buf;
  }
}

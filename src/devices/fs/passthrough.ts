/**
 * The passthrough of a host directory (`server.ts fs --shared-dir DIR`) as
 * an FsBackend, on HostDir (host_fs.ts: every operation one name at a time
 * under an O_PATH fd, no symlink followed on the host, nothing outside DIR).
 *
 * Inodes: the guest knows a file by our node number; each holds one O_PATH
 * fd of the host inode, found again by (device, inode) so that a file
 * reached by two names is one node, and released when the kernel forgets
 * its last lookup. Their number is bounded (an fd each): past the limit a
 * lookup fails with ENFILE, so a guest cannot exhaust the server's fds.
 * File data moves with preadv/pwritev straight between the file and the
 * guest's buffers. A directory is read whole at OPENDIR (its entries with
 * offsets 1, 2, …): host offsets (ext4's 63-bit hashes) never reach the guest.
 */
import type { ChainReader, ChainWriter } from "../../index.ts";
import { E, type Caller, type DirEmit, type FsBackend, type FsStat, type FsStatfs, type SetAttr } from "./backend.ts";
import { decodeName } from "./fuse.ts";
import { HostDir } from "./host_fs.ts";
import { isMainThread } from "node:worker_threads";
import * as sys from "../../../ffi/sys.ts";
import { ErrnoError } from "../../../ffi/errno.ts";
import type { Statx } from "../../../ffi/sys.ts";

const O_RDONLY = 0, O_DIRECTORY = 0o200000, O_DIRECT = 0o40000, S_ISGID = 0o2000;
const UTIME_NOW = (1 << 30) - 1, UTIME_OMIT = (1 << 30) - 2;

/** A host call's ErrnoError (ENOSPC, EIO, EFBIG …) as -errno for the guest's reply. */
function errnoOf(f: () => number): number {
  try {
    return f();
  } catch (e) {
    if (e instanceof ErrnoError) return -e.errno;
    throw e;
  }
}

interface Inode {
  fd: number;
  key: string;
  lookups: number;
}
interface DirEntry { name: string; ino: number; type: number }

export interface PassthroughOptions {
  readonly?: boolean;
  /** Most inodes (O_PATH fds) held at once (default 65536, and below the fd limit). */
  maxInodes?: number;
  /** Most files and directories open at once (default 4096). */
  maxHandles?: number;
}

export class PassthroughFs implements FsBackend {
  readonly root = 1;
  readonly readonly: boolean;
  private readonly host: HostDir;
  private readonly inodes = new Map<number, Inode>();
  private readonly byKey = new Map<string, number>();
  private nextNode = 2;
  private readonly files = new Map<number, number>();
  private readonly dirs = new Map<number, DirEntry[]>();
  private nextFh = 1;
  private readonly maxInodes: number;
  private readonly maxHandles: number;
  private readonly stat: FsStat = {
    ino: 0, attrIno: 0, mode: 0, nlink: 0, uid: 0, gid: 0, rdev: 0, size: 0, blocks: 0, blksize: 0,
    atimeSec: 0, atimeNsec: 0, mtimeSec: 0, mtimeNsec: 0, ctimeSec: 0, ctimeNsec: 0,
  };
  private readonly linkBuf = new Uint8Array(4096);

  /** The server runs as root: what it creates is given to the guest's caller. */
  private readonly asRoot = process.getuid?.() === 0;

  constructor(dir: string, o: PassthroughOptions = {}) {
    // The guest applied its own umask to the modes it sends; ours must not narrow them again.
    // The umask is the process's: set on the main thread (prepare() builds one first); a Worker
    // may not set it (Bun refuses) and needs not.
    if (isMainThread) process.umask(0);
    this.host = new HostDir(dir, { readOnly: o.readonly });
    this.readonly = o.readonly === true;
    this.maxInodes = o.maxInodes ?? 65536;
    this.maxHandles = o.maxHandles ?? 4096;
    const r = this.host.getattr(this.host.rootFd);
    if (r < 0) throw new Error(`${dir}: statx: errno ${-r}`);
    this.inodes.set(1, { fd: this.host.rootFd, key: this.keyOf(this.host.attr), lookups: 1 });
    this.byKey.set(this.keyOf(this.host.attr), 1);
  }

  /** Inodes and handles held (for tests and stats). */
  get held(): { inodes: number; files: number; dirs: number; fds: number } {
    return { inodes: this.inodes.size, files: this.files.size, dirs: this.dirs.size, fds: this.host.openFds };
  }

  private keyOf(a: Statx): string {
    return `${a.devMajor}:${a.devMinor}:${a.inoHi}:${a.inoLo}`;
  }

  private fill(node: number, a: Statx): FsStat {
    const s = this.stat;
    // The guest sees the host's inode number (hard links alike, stable across lookups) and
    // names the inode by our node number.
    s.ino = node; s.attrIno = a.ino; s.mode = a.mode; s.nlink = a.nlink; s.uid = a.uid; s.gid = a.gid; s.rdev = a.rdev;
    s.size = a.size; s.blocks = a.blocks; s.blksize = a.blksize;
    s.atimeSec = a.atimeSec; s.atimeNsec = a.atimeNsec; s.mtimeSec = a.mtimeSec; s.mtimeNsec = a.mtimeNsec;
    s.ctimeSec = a.ctimeSec; s.ctimeNsec = a.ctimeNsec;
    return s;
  }

  private fdOf(node: number): number {
    return this.inodes.get(node)?.fd ?? -E.NOENT;
  }

  /** A new O_PATH fd (attributes in host.attr) becomes a node, or joins the one it already is. */
  private adopt(fd: number): FsStat | number {
    if (fd < 0) return fd;
    const a = this.host.attr;
    const key = this.keyOf(a);
    const known = this.byKey.get(key);
    if (known !== undefined) {
      this.host.close(fd);
      this.inodes.get(known)!.lookups++;
      return this.fill(known, a);
    }
    if (this.inodes.size >= this.maxInodes) {
      this.host.close(fd);
      return -23; // ENFILE: the guest holds too many inodes
    }
    const node = this.nextNode++;
    this.inodes.set(node, { fd, key, lookups: 1 });
    this.byKey.set(key, node);
    return this.fill(node, a);
  }

  lookup(parent: number, name: string): FsStat | number {
    const p = this.fdOf(parent);
    if (p < 0) return p;
    return this.adopt(this.host.lookup(p, name));
  }

  forget(node: number, count: number): void {
    const i = this.inodes.get(node);
    if (i === undefined || node === this.root) return;
    i.lookups -= count;
    if (i.lookups > 0) return;
    this.inodes.delete(node);
    this.byKey.delete(i.key);
    this.host.close(i.fd);
  }

  getattr(node: number): FsStat | number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    const r = this.host.getattr(fd);
    return r < 0 ? r : this.fill(node, this.host.attr);
  }

  setattr(node: number, set: SetAttr): FsStat | number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    let r = 0;
    if (set.mode !== undefined) r = this.host.chmod(fd, set.mode & 0o7777);
    if (r >= 0 && (set.uid !== undefined || set.gid !== undefined)) r = this.host.chown(fd, set.uid ?? -1, set.gid ?? -1);
    if (r >= 0 && set.size !== undefined) r = this.host.truncate(fd, set.size);
    if (r >= 0 && (set.atime !== undefined || set.mtime !== undefined)) {
      const t = (v: SetAttr["atime"]): [number, number] => (v === undefined ? [0, UTIME_OMIT] : v === "now" ? [0, UTIME_NOW] : [v.sec, v.nsec]);
      const [as, an] = t(set.atime), [ms, mn] = t(set.mtime);
      r = this.host.utimes(fd, as, an, ms, mn);
    }
    if (r < 0) return r;
    return this.getattr(node);
  }

  readlink(node: number): string | number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    const n = this.host.readlink(fd, this.linkBuf);
    return n < 0 ? n : new TextDecoder().decode(this.linkBuf.subarray(0, n));
  }

  private handle(fd: number): number {
    if (fd < 0) return fd;
    if (this.files.size + this.dirs.size >= this.maxHandles) {
      this.host.close(fd);
      return -23;
    }
    const fh = this.nextFh++;
    this.files.set(fh, fd);
    return fh;
  }

  open(node: number, flags: number): number {
    const fd = this.fdOf(node);
    // The guest's O_DIRECT is its own cache's business; the host file is read through the host's
    // cache (as virtiofsd does by default): unaligned direct I/O in the guest then works.
    return fd < 0 ? fd : this.handle(this.host.open(fd, flags & ~O_DIRECT));
  }

  read(_node: number, fh: number, offset: number, size: number, out: ChainWriter): number {
    const fd = this.files.get(fh);
    if (fd === undefined) return -E.BADF;
    const n = Math.min(size, out.remaining);
    return n === 0 ? 0 : errnoOf(() => out.preadFrom(fd, offset, n));
  }

  write(_node: number, fh: number, offset: number, size: number, data: ChainReader): number {
    const fd = this.files.get(fh);
    if (fd === undefined) return -E.BADF;
    if (size > data.remaining) return -E.INVAL;
    return size === 0 ? 0 : errnoOf(() => data.pwriteTo(fd, offset, size));
  }

  release(_node: number, fh: number): void {
    const fd = this.files.get(fh);
    if (fd === undefined) return;
    this.files.delete(fh);
    this.host.close(fd);
  }

  fsync(_node: number, fh: number, datasync: boolean): number {
    const fd = this.files.get(fh);
    return fd === undefined ? -E.BADF : this.host.fsync(fd, datasync);
  }

  create(parent: number, name: string, mode: number, flags: number, _who: Caller): { stat: FsStat; fh: number } | number {
    const p = this.fdOf(parent);
    if (p < 0) return p;
    const f = this.host.create(p, name, flags & ~O_DIRECT, mode);
    if (f < 0) return f;
    const ino = this.host.inodeOf(f);
    if (ino < 0) {
      this.host.close(f);
      return ino;
    }
    const st = this.owned(p, ino, _who);
    if (typeof st === "number") {
      this.host.close(f);
      return st;
    }
    const fh = this.handle(f);
    if (fh < 0) {
      this.forget(st.ino, 1);
      return fh;
    }
    return { stat: st, fh };
  }

  mkdir(parent: number, name: string, mode: number, who: Caller): FsStat | number {
    const p = this.fdOf(parent);
    return p < 0 ? p : this.owned(p, this.host.mkdir(p, name, mode), who);
  }

  mknod(parent: number, name: string, mode: number, rdev: number, who: Caller): FsStat | number {
    const p = this.fdOf(parent);
    return p < 0 ? p : this.owned(p, this.host.mknod(p, name, mode, rdev), who);
  }

  symlink(parent: number, name: string, target: string, who: Caller): FsStat | number {
    const p = this.fdOf(parent);
    return p < 0 ? p : this.owned(p, this.host.symlink(p, name, target), who);
  }

  /**
   * What the guest creates belongs to the guest's caller, as if it had made it (a server
   * running as root creates as root): uid the caller's, gid the caller's unless the parent
   * directory is setgid (then the kernel already gave the parent's). Then adopted as a node.
   */
  private owned(parentFd: number, fd: number, who: Caller): FsStat | number {
    if (fd < 0) return fd;
    if (this.asRoot && (who.uid !== 0 || who.gid !== 0)) {
      const setgid = this.host.getattr(parentFd) >= 0 && (this.host.attr.mode & S_ISGID) !== 0;
      const r = this.host.chown(fd, who.uid, setgid ? -1 : who.gid);
      if (r < 0) {
        this.host.close(fd);
        return r;
      }
      if (this.host.getattr(fd) < 0) {
        this.host.close(fd);
        return -E.IO;
      }
    }
    return this.adopt(fd);
  }

  link(node: number, parent: number, name: string): FsStat | number {
    const fd = this.fdOf(node), p = this.fdOf(parent);
    if (fd < 0) return fd;
    if (p < 0) return p;
    return this.adopt(this.host.link(fd, p, name));
  }

  unlink(parent: number, name: string): number {
    const p = this.fdOf(parent);
    return p < 0 ? p : this.host.unlink(p, name);
  }

  rmdir(parent: number, name: string): number {
    const p = this.fdOf(parent);
    return p < 0 ? p : this.host.rmdir(p, name);
  }

  rename(parent: number, name: string, newParent: number, newName: string, flags: number): number {
    const p = this.fdOf(parent), q = this.fdOf(newParent);
    if (p < 0) return p;
    if (q < 0) return q;
    return this.host.rename(p, name, q, newName, flags);
  }

  opendir(node: number): number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    if (this.files.size + this.dirs.size >= this.maxHandles) return -23;
    const dfd = this.host.open(fd, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) return dfd;
    const entries: DirEntry[] = [];
    const d = this.host.dirents;
    let off: number | bigint = 0;
    try {
      for (;;) {
        const n = this.host.readdir(dfd, off, d);
        if (n < 0) return n;
        if (n === 0) break;
        while (d.next()) {
          entries.push({ name: decodeName(d.nameBytes()), ino: d.ino, type: d.type });
          off = d.off;
        }
      }
    } finally {
      this.host.close(dfd);
    }
    const fh = this.nextFh++;
    this.dirs.set(fh, entries);
    return fh;
  }

  releasedir(_node: number, fh: number): void {
    this.dirs.delete(fh);
  }

  readdir(_node: number, offset: number, emit: DirEmit, fh?: number): number {
    const entries = this.dirs.get(fh ?? -1);
    if (entries === undefined) return -E.BADF;
    for (let i = offset; i < entries.length; i++) {
      const e = entries[i]!;
      if (!emit(e.name, e.ino, e.type, i + 1)) break;
    }
    return 0;
  }

  statfs(): FsStatfs {
    const s = this.host.statfsOut;
    if (this.host.statfs(this.host.rootFd) < 0) return { blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 };
    return { blocks: s.blocks, bfree: s.bfree, bavail: s.bavail, files: s.files, ffree: s.ffree, bsize: s.bsize, namelen: s.namelen, frsize: s.frsize };
  }

  private readonly xbuf = new Uint8Array(65536);

  getxattr(node: number, name: string): Uint8Array | number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    const n = this.host.getxattr(fd, name, this.xbuf);
    return n < 0 ? n : this.xbuf.slice(0, n);
  }

  setxattr(node: number, name: string, value: Uint8Array, flags: number): number {
    const fd = this.fdOf(node);
    return fd < 0 ? fd : this.host.setxattr(fd, name, value, flags);
  }

  listxattr(node: number): Uint8Array | number {
    const fd = this.fdOf(node);
    if (fd < 0) return fd;
    const n = this.host.listxattr(fd, this.xbuf);
    return n < 0 ? n : this.xbuf.slice(0, n);
  }

  removexattr(node: number, name: string): number {
    const fd = this.fdOf(node);
    return fd < 0 ? fd : this.host.removexattr(fd, name);
  }

  lseek(_node: number, fh: number, offset: number, whence: number): number {
    const fd = this.files.get(fh);
    return fd === undefined ? -E.BADF : sys.lseekRaw(fd, offset, whence);
  }

  fallocate(_node: number, fh: number, mode: number, offset: number, length: number): number {
    if (this.readonly) return -E.ROFS;
    const fd = this.files.get(fh);
    return fd === undefined ? -E.BADF : sys.fallocateRaw(fd, mode, offset, length);
  }

  copyFileRange(_node: number, fh: number, offIn: number, _nodeOut: number, fhOut: number, offOut: number, length: number, flags: number): number {
    if (this.readonly) return -E.ROFS;
    const a = this.files.get(fh), b = this.files.get(fhOut);
    if (a === undefined || b === undefined) return -E.BADF;
    return sys.copyFileRangeRaw(a, offIn, b, offOut, length, flags);
  }

  reset(): void {
    for (const fd of this.files.values()) this.host.close(fd);
    this.files.clear();
    this.dirs.clear();
    for (const [node, i] of this.inodes) {
      if (node === this.root) continue;
      this.host.close(i.fd);
      this.inodes.delete(node);
      this.byKey.delete(i.key);
    }
  }

  close(): void {
    for (const fd of this.files.values()) this.host.close(fd);
    this.files.clear();
    this.dirs.clear();
    for (const [node, i] of this.inodes) if (node !== this.root) this.host.close(i.fd);
    this.inodes.clear();
    this.host.dispose();
  }
}

/**
 * FUSE over a virtqueue, for one file system: each chain is one FUSE
 * request (decoded by fuse.ts), answered by calling the FsBackend and
 * writing the reply into the chain's writable buffers. Synchronous: a
 * request is complete when handle() returns. Every guest-supplied value is
 * checked by the decoder or the backend; a bad request gets an errno reply
 * and the queue goes on.
 */
import type { Request } from "../../index.ts";
import { E, type Caller, type FsBackend, type FsStat, type SetAttr } from "./backend.ts";
import {
  abortReply, beginReply, DirentPacker, endReply, FATTR_ATIME, FATTR_ATIME_NOW, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_MTIME_NOW,
  FATTR_SIZE, FATTR_UID, FOPEN_DIRECT_IO, FUSE_ACCESS, FUSE_ASYNC_READ, FUSE_BATCH_FORGET, FUSE_BIG_WRITES, FUSE_CREATE, FUSE_DESTROY,
  FUSE_FLUSH, FUSE_FORGET, FUSE_FSYNC, FUSE_FSYNCDIR, FUSE_GETATTR, FUSE_INIT, FUSE_INTERRUPT, FUSE_LINK, FUSE_LOOKUP, FUSE_MAX_PAGES,
  FUSE_MKDIR, FUSE_MKNOD, FUSE_OPEN, FUSE_OPENDIR, FUSE_PARALLEL_DIROPS, FUSE_READ, FUSE_READDIR, FUSE_READLINK, FUSE_RELEASE,
  FUSE_RELEASEDIR, FUSE_RENAME, FUSE_RENAME2, FUSE_RMDIR, FUSE_ROOT_ID, FUSE_SETATTR, FUSE_STATFS, FUSE_SYMLINK, FUSE_SYNCFS,
  FUSE_UNLINK, FUSE_WRITE, FuseAttr, FuseEntryOut, FuseRequest, FuseStatfs, replyAttr, replyCreate, replyEmpty, replyEntry,
  replyError, replyInit, replyInitVersion, replyOpen, replyStatfs, replyString, replyWrite, ENOSYS, EROFS, EIO, fuseOpcodeName,
  FUSE_GETXATTR, FUSE_LISTXATTR, FUSE_SETXATTR, FUSE_REMOVEXATTR, FUSE_LSEEK, FUSE_FALLOCATE, FUSE_COPY_FILE_RANGE, ERANGE,
  replyXattrSize, replyBytes, replyLseek,
} from "./fuse.ts";

/** How long the guest may cache names and attributes (`--cache`). */
export type CacheMode = "never" | "auto" | "always";
const TIMEOUT: Record<CacheMode, number> = { never: 0, auto: 1, always: 86400 };

export interface FuseSessionOptions {
  cache?: CacheMode;
  /** Refuse every change with EROFS (also when the backend says `readonly`). */
  readonly?: boolean;
  /** Serve extended attributes (`--xattr`); without, the xattr opcodes answer ENOSYS. */
  xattr?: boolean;
  /** Largest WRITE the guest may send (default 1 MiB). */
  maxWrite?: number;
  log?: { warn(m: string): void; debug(m: string): void };
}

/** Opcodes that change the file system (refused with EROFS when read-only). */
const CHANGES = new Set([FUSE_SETATTR, FUSE_SYMLINK, FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_RENAME2, FUSE_LINK, FUSE_CREATE, FUSE_WRITE,
  FUSE_SETXATTR, FUSE_REMOVEXATTR, FUSE_FALLOCATE, FUSE_COPY_FILE_RANGE]);
const O_ACCMODE = 3, O_TRUNC = 0o1000;
/**
 * A file offset or length the host can take: u64 fields decode to numbers,
 * and 2^64 - 1 rounds to 2^64, which an FFI call would wrap to 0. Past
 * 2^53 nothing real exists (the host's own limit is 2^63 - 1).
 */
const fits = (...v: number[]) => v.every((x) => Number.isSafeInteger(x) && x >= 0) && Number.isSafeInteger(v.reduce((a, b) => a + b, 0));
const EFBIG = 27, EINVAL = 22;

export class FuseSession {
  private readonly req = new FuseRequest();
  private readonly attr = new FuseAttr();
  private readonly entry = new FuseEntryOut();
  private readonly statfs = new FuseStatfs();
  private readonly packer = new DirentPacker();
  private readonly timeout: number;
  private readonly readonly: boolean;
  private readonly who: Caller = { uid: 0, gid: 0 };

  constructor(private readonly fs: FsBackend, private readonly o: FuseSessionOptions = {}) {
    this.timeout = TIMEOUT[o.cache ?? "never"];
    this.readonly = o.readonly === true || fs.readonly === true;
  }

  /** FUSE node ids ↔ backend inode numbers: FUSE_ROOT_ID is the backend's root (and its root's number is 1's). */
  private ino(nodeid: number): number {
    return nodeid === FUSE_ROOT_ID ? this.fs.root : nodeid === this.fs.root ? FUSE_ROOT_ID : nodeid;
  }
  private node(ino: number): number {
    return ino === this.fs.root ? FUSE_ROOT_ID : ino === FUSE_ROOT_ID ? this.fs.root : ino;
  }

  private fillAttr(s: FsStat, a: FuseAttr = this.attr): FuseAttr {
    a.ino = s.attrIno ?? s.ino; a.size = s.size; a.blocks = s.blocks;
    a.atime = s.atimeSec; a.atimensec = s.atimeNsec; a.mtime = s.mtimeSec; a.mtimensec = s.mtimeNsec;
    a.ctime = s.ctimeSec; a.ctimensec = s.ctimeNsec;
    a.mode = s.mode; a.nlink = s.nlink; a.uid = s.uid; a.gid = s.gid; a.rdev = s.rdev; a.blksize = s.blksize; a.flags = 0;
    return a;
  }

  private fillEntry(s: FsStat): FuseEntryOut {
    const e = this.entry;
    e.nodeid = this.node(s.ino);
    e.generation = 0;
    e.entryTimeout = this.timeout;
    e.attrTimeout = this.timeout;
    this.fillAttr(s, e.attr);
    return e;
  }

  /** Answers one request chain. */
  handle(r: Request): void {
    const q = this.req, w = r.out;
    const err = q.decode(r.in);
    if (err < 0) {
      if (q.unique !== 0 && !q.noReply) replyError(w, q.unique, err);
      this.o.log?.debug(`fuse: ${fuseOpcodeName(q.opcode)}: malformed (errno ${-err})`);
      return;
    }
    if (q.noReply) return this.noReply(q, r);
    if (!q.known) return void replyError(w, q.unique, ENOSYS);
    if (this.readonly && CHANGES.has(q.opcode)) return void replyError(w, q.unique, EROFS);
    if (q.opcode !== FUSE_INIT && !q.conn.initialized) return void replyError(w, q.unique, EIO);
    this.who.uid = q.uid;
    this.who.gid = q.gid;
    const fs = this.fs, ino = this.ino(q.nodeid);
    let res: FsStat | number;
    switch (q.opcode) {
      case FUSE_INIT: {
        const m = q.conn.negotiate(q, FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS);
        if (m > 0) replyInit(w, q.unique, q.conn, { maxWrite: this.o.maxWrite ?? 1 << 20, maxPages: 256, timeGran: 1 });
        else if (m === 0) replyInitVersion(w, q.unique);
        else replyError(w, q.unique, m);
        return;
      }
      case FUSE_RELEASEDIR:
        fs.releasedir?.(ino, q.fh);
        return void replyEmpty(w, q.unique);
      case FUSE_DESTROY:
      case FUSE_FLUSH:
      case FUSE_FSYNCDIR:
      case FUSE_SYNCFS:
        return void replyEmpty(w, q.unique);
      case FUSE_LOOKUP:
        res = fs.lookup(ino, q.name);
        return this.replyEntryOr(r, res);
      case FUSE_GETATTR:
        res = fs.getattr(ino);
        if (typeof res === "number") return void replyError(w, q.unique, res);
        return void replyAttr(w, q.unique, this.fillAttr(res), this.timeout);
      case FUSE_SETATTR: {
        if (!fs.setattr) return void replyError(w, q.unique, ENOSYS);
        const set: SetAttr = {};
        const v = q.valid;
        if (v & FATTR_MODE) set.mode = q.mode;
        if (v & FATTR_UID) set.uid = q.attrUid;
        if (v & FATTR_GID) set.gid = q.attrGid;
        if (v & FATTR_SIZE) {
          if (!fits(q.size)) return void replyError(w, q.unique, EFBIG);
          set.size = q.size;
        }
        if (v & FATTR_ATIME) set.atime = v & FATTR_ATIME_NOW ? "now" : { sec: q.atime, nsec: q.atimensec };
        if (v & FATTR_MTIME) set.mtime = v & FATTR_MTIME_NOW ? "now" : { sec: q.mtime, nsec: q.mtimensec };
        res = fs.setattr(ino, set);
        if (typeof res === "number") return void replyError(w, q.unique, res);
        return void replyAttr(w, q.unique, this.fillAttr(res), this.timeout);
      }
      case FUSE_READLINK: {
        const t = fs.readlink ? fs.readlink(ino) : -E.NOSYS;
        if (typeof t === "number") return void replyError(w, q.unique, t);
        return void replyString(w, q.unique, t);
      }
      case FUSE_SYMLINK:
        return this.replyEntryOr(r, fs.symlink ? fs.symlink(ino, q.name, q.name2, this.who) : -E.NOSYS);
      case FUSE_MKNOD:
        return this.replyEntryOr(r, fs.mknod ? fs.mknod(ino, q.name, q.mode & ~q.umask, q.rdev, this.who) : -E.NOSYS);
      case FUSE_MKDIR:
        return this.replyEntryOr(r, fs.mkdir ? fs.mkdir(ino, q.name, q.mode & ~q.umask, this.who) : -E.NOSYS);
      case FUSE_LINK:
        return this.replyEntryOr(r, fs.link ? fs.link(this.ino(q.oldnodeid), ino, q.name) : -E.NOSYS);
      case FUSE_UNLINK:
        return this.replyStatus(r, fs.unlink ? fs.unlink(ino, q.name) : -E.NOSYS);
      case FUSE_RMDIR:
        return this.replyStatus(r, fs.rmdir ? fs.rmdir(ino, q.name) : -E.NOSYS);
      case FUSE_RENAME:
      case FUSE_RENAME2:
        return this.replyStatus(r, fs.rename ? fs.rename(ino, q.name, this.ino(q.newdir), q.name2, q.opcode === FUSE_RENAME2 ? q.flags : 0) : -E.NOSYS);
      case FUSE_OPEN: {
        if (this.readonly && ((q.flags & O_ACCMODE) !== 0 || (q.flags & O_TRUNC) !== 0)) return void replyError(w, q.unique, EROFS);
        const fh = fs.open ? fs.open(ino, q.flags) : 0;
        if (fh < 0) return void replyError(w, q.unique, fh);
        return void replyOpen(w, q.unique, fh, this.timeout === 0 ? FOPEN_DIRECT_IO : 0);
      }
      case FUSE_CREATE: {
        if (!fs.create) return void replyError(w, q.unique, ENOSYS);
        const c = fs.create(ino, q.name, q.mode & ~q.umask, q.flags, this.who);
        if (typeof c === "number") return void replyError(w, q.unique, c);
        return void replyCreate(w, q.unique, this.fillEntry(c.stat), c.fh, this.timeout === 0 ? FOPEN_DIRECT_IO : 0);
      }
      case FUSE_READ: {
        const at = beginReply(w, q.unique);
        if (at < 0) return;
        // Past anything a file can hold: end of file.
        if (!fits(q.offset, q.size)) return void endReply(w, at);
        const n = fs.read(ino, q.fh, q.offset, q.size, w);
        if (n < 0) abortReply(w, at, n);
        else endReply(w, at);
        return;
      }
      case FUSE_WRITE: {
        if (!fs.write) return void replyError(w, q.unique, ENOSYS);
        if (!fits(q.offset, q.dataLen)) return void replyError(w, q.unique, EFBIG);
        const n = fs.write(ino, q.fh, q.offset, q.dataLen, r.in);
        if (n < 0) return void replyError(w, q.unique, n);
        return void replyWrite(w, q.unique, n);
      }
      case FUSE_RELEASE:
        fs.release?.(ino, q.fh);
        return void replyEmpty(w, q.unique);
      case FUSE_FSYNC:
        return this.replyStatus(r, fs.fsync ? fs.fsync(ino, q.fh, (q.fsyncFlags & 1) !== 0) : 0);
      case FUSE_STATFS: {
        const s = fs.statfs?.();
        const o = this.statfs;
        o.blocks = s?.blocks ?? 0; o.bfree = s?.bfree ?? 0; o.bavail = s?.bavail ?? 0; o.files = s?.files ?? 0;
        o.ffree = s?.ffree ?? 0; o.bsize = s?.bsize ?? 4096; o.namelen = s?.namelen ?? 255; o.frsize = s?.frsize ?? 4096;
        return void replyStatfs(w, q.unique, o);
      }
      case FUSE_OPENDIR: {
        res = fs.getattr(ino);
        if (typeof res === "number") return void replyError(w, q.unique, res);
        const fh = fs.opendir ? fs.opendir(ino) : 0;
        if (fh < 0) return void replyError(w, q.unique, fh);
        return void replyOpen(w, q.unique, fh, 0);
      }
      case FUSE_READDIR: {
        const p = this.packer;
        if (!p.begin(w, q.unique, q.size)) return;
        const e = fs.readdir(ino, q.offset, (name, child, type, next) => p.add(name, this.node(child), next, type), q.fh);
        if (e < 0 && p.count === 0) return void abortReply(w, 0, e);
        p.end();
        return;
      }
      case FUSE_GETXATTR:
      case FUSE_LISTXATTR: {
        if (!this.o.xattr || !fs.getxattr || !fs.listxattr) return void replyError(w, q.unique, ENOSYS);
        const v = q.opcode === FUSE_GETXATTR ? fs.getxattr(ino, q.name) : fs.listxattr(ino);
        if (typeof v === "number") return void replyError(w, q.unique, v);
        if (q.size === 0) return void replyXattrSize(w, q.unique, v.length);
        if (v.length > q.size) return void replyError(w, q.unique, ERANGE);
        return void replyBytes(w, q.unique, v);
      }
      case FUSE_SETXATTR: {
        if (!this.o.xattr || !fs.setxattr) return void replyError(w, q.unique, ENOSYS);
        const value = new Uint8Array(q.dataLen);
        r.in.copyTo(value);
        return this.replyStatus(r, fs.setxattr(ino, q.name, value, q.flags));
      }
      case FUSE_REMOVEXATTR:
        if (!this.o.xattr || !fs.removexattr) return void replyError(w, q.unique, ENOSYS);
        return this.replyStatus(r, fs.removexattr(ino, q.name));
      case FUSE_LSEEK: {
        if (!fs.lseek) return void replyError(w, q.unique, ENOSYS);
        if (!fits(q.offset)) return void replyError(w, q.unique, EINVAL);
        const off = fs.lseek(ino, q.fh, q.offset, q.whence);
        if (off < 0) return void replyError(w, q.unique, off);
        return void replyLseek(w, q.unique, off);
      }
      case FUSE_FALLOCATE:
        if (!fits(q.offset, q.length)) return void replyError(w, q.unique, EFBIG);
        return this.replyStatus(r, fs.fallocate ? fs.fallocate(ino, q.fh, q.mode, q.offset, q.length) : -E.NOSYS);
      case FUSE_COPY_FILE_RANGE: {
        if (!fs.copyFileRange) return void replyError(w, q.unique, ENOSYS);
        if (!fits(q.offset, q.length) || !fits(q.offsetOut, q.length)) return void replyError(w, q.unique, EINVAL);
        const n = fs.copyFileRange(ino, q.fh, q.offset, this.ino(q.nodeidOut), q.fhOut, q.offsetOut, q.length, q.flags);
        if (n < 0) return void replyError(w, q.unique, n);
        return void replyWrite(w, q.unique, n);
      }
      case FUSE_ACCESS:
        // The kernel checks permissions itself (default_permissions is how virtiofs mounts).
        return void replyEmpty(w, q.unique);
      default:
        return void replyError(w, q.unique, ENOSYS);
    }
  }

  private replyEntryOr(r: Request, res: FsStat | number): void {
    if (typeof res === "number") return void replyError(r.out, this.req.unique, res);
    replyEntry(r.out, this.req.unique, this.fillEntry(res));
  }

  private replyStatus(r: Request, e: number): void {
    if (e < 0) replyError(r.out, this.req.unique, e);
    else replyEmpty(r.out, this.req.unique);
  }

  /** FORGET, BATCH_FORGET and INTERRUPT take no reply. */
  private noReply(q: FuseRequest, r: Request): void {
    if (q.opcode === FUSE_FORGET) this.fs.forget?.(this.ino(q.nodeid), q.nlookup);
    else if (q.opcode === FUSE_BATCH_FORGET) {
      for (let i = 0; i < q.count; i++) {
        const nodeid = r.in.readU64(), n = r.in.readU64();
        this.fs.forget?.(this.ino(nodeid), n);
      }
    }
    // INTERRUPT: every request is answered before the next is read, so there is nothing to interrupt.
    void FUSE_INTERRUPT;
  }
}

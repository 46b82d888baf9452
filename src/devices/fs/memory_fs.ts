/**
 * An in-memory file system (`server.ts fs --memory`): directories, regular
 * files, symlinks, fifos and sockets, hard links, rename with NOREPLACE and
 * EXCHANGE, lookup counts (an unlinked inode lives until the kernel forgets
 * it and closes it), bounded by a byte budget and an inode budget so that a
 * guest cannot make the server grow without limit (ENOSPC).
 */
import type { ChainReader, ChainWriter } from "../../index.ts";
import {
  E, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, S_IFIFO, S_IFSOCK, type Caller, type DirEmit, type FsBackend, type FsStat, type FsStatfs, type SetAttr,
} from "./backend.ts";

const RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2;
const BLOCK = 4096;

interface Node {
  stat: FsStat;
  /** Directories: name → inode, in creation order. */
  children: Map<string, number> | null;
  /**
   * Directories: each name's readdir cookie, given once at insertion and
   * never reused, so that a listing resumed after entries were removed (rm -r
   * deletes while it reads) neither skips nor repeats a name.
   */
  cookies: Map<string, number> | null;
  nextCookie: number;
  /** Regular files: the bytes (capacity may exceed stat.size). */
  data: Uint8Array | null;
  target: string | null;
  /** References the kernel holds (lookups not yet forgotten) and open handles. */
  lookups: number;
  opens: number;
}

export interface MemoryFsOptions {
  /** Most bytes of file data (default 256 MiB). */
  maxBytes?: number;
  /** Most inodes (default 65536). */
  maxInodes?: number;
}

function now(): { sec: number; nsec: number } {
  const ms = Date.now();
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 };
}

export class MemoryFs implements FsBackend {
  readonly root = 1;
  private readonly nodes = new Map<number, Node>();
  private nextIno = 2;
  /** Open handles: fh → inode (a READ or WRITE must name one it opened). */
  private readonly handles = new Map<number, number>();
  private nextFh = 1;
  private bytes = 0;
  private readonly maxBytes: number;
  private readonly maxInodes: number;

  constructor(o: MemoryFsOptions = {}) {
    this.maxBytes = o.maxBytes ?? 256 << 20;
    this.maxInodes = o.maxInodes ?? 65536;
    const root = this.node(1, S_IFDIR | 0o755, { uid: 0, gid: 0 });
    root.stat.nlink = 2;
    this.nodes.set(1, root);
  }

  /** Inodes alive (for tests and stats). */
  get inodes(): number {
    return this.nodes.size;
  }

  private node(ino: number, mode: number, who: Caller): Node {
    const t = now();
    const isDir = (mode & S_IFMT) === S_IFDIR;
    return {
      stat: {
        ino, mode, nlink: isDir ? 2 : 1, uid: who.uid, gid: who.gid, rdev: 0, size: 0, blocks: 0, blksize: BLOCK,
        atimeSec: t.sec, atimeNsec: t.nsec, mtimeSec: t.sec, mtimeNsec: t.nsec, ctimeSec: t.sec, ctimeNsec: t.nsec,
      },
      children: isDir ? new Map() : null, cookies: isDir ? new Map() : null, nextCookie: 3, data: null, target: null, lookups: 0, opens: 0,
    };
  }

  private get(ino: number): Node | null {
    return this.nodes.get(ino) ?? null;
  }

  private dir(ino: number): Node | number {
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if (n.children === null) return -E.NOTDIR;
    return n;
  }

  private touch(n: Node, m = true, c = true): void {
    const t = now();
    if (m) { n.stat.mtimeSec = t.sec; n.stat.mtimeNsec = t.nsec; }
    if (c) { n.stat.ctimeSec = t.sec; n.stat.ctimeNsec = t.nsec; }
  }

  /** An inode with no name, no kernel reference and no open handle is gone. */
  private maybeFree(n: Node): void {
    if (n.stat.nlink > 0 || n.lookups > 0 || n.opens > 0) return;
    if (n.data) this.bytes -= n.data.length;
    this.nodes.delete(n.stat.ino);
  }

  private ref(n: Node): FsStat {
    n.lookups++;
    return n.stat;
  }

  lookup(parent: number, name: string): FsStat | number {
    const d = this.dir(parent);
    if (typeof d === "number") return d;
    const ino = d.children!.get(name);
    if (ino === undefined) return -E.NOENT;
    return this.ref(this.get(ino)!);
  }

  forget(ino: number, count: number): void {
    const n = this.get(ino);
    if (n === null) return;
    n.lookups = Math.max(0, n.lookups - count);
    this.maybeFree(n);
  }

  getattr(ino: number): FsStat | number {
    return this.get(ino)?.stat ?? -E.NOENT;
  }

  setattr(ino: number, set: SetAttr): FsStat | number {
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if (set.size !== undefined) {
      if (n.children !== null) return -E.ISDIR;
      if ((n.stat.mode & S_IFMT) !== S_IFREG) return -E.INVAL;
      const r = this.resize(n, set.size);
      if (r < 0) return r;
      this.touch(n);
    }
    if (set.mode !== undefined) n.stat.mode = (n.stat.mode & S_IFMT) | (set.mode & 0o7777);
    if (set.uid !== undefined) n.stat.uid = set.uid;
    if (set.gid !== undefined) n.stat.gid = set.gid;
    for (const k of ["atime", "mtime"] as const) {
      const v = set[k];
      if (v === undefined) continue;
      const t = v === "now" ? now() : v;
      if (k === "atime") { n.stat.atimeSec = t.sec; n.stat.atimeNsec = t.nsec; } else { n.stat.mtimeSec = t.sec; n.stat.mtimeNsec = t.nsec; }
    }
    this.touch(n, false, true);
    return n.stat;
  }

  /** Sets a file's size, growing its buffer within the byte budget. */
  private resize(n: Node, size: number): number {
    if (!Number.isSafeInteger(size) || size < 0) return -E.INVAL;
    const cap = n.data?.length ?? 0;
    if (size > cap) {
      // Room to grow (doubling, at most 1 MiB ahead) when the budget allows, else exactly.
      let want = Math.max(size, Math.min(cap * 2, size + (1 << 20)));
      if (this.bytes - cap + want > this.maxBytes) want = size;
      if (this.bytes - cap + want > this.maxBytes) return -E.NOSPC;
      const next = new Uint8Array(want);
      if (n.data) next.set(n.data.subarray(0, n.stat.size));
      this.bytes += want - cap;
      n.data = next;
    } else if (n.data && size < n.stat.size) {
      n.data.fill(0, size, n.stat.size);
    }
    n.stat.size = size;
    n.stat.blocks = Math.ceil(size / 512);
    return 0;
  }

  readlink(ino: number): string | number {
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    return n.target ?? -E.INVAL;
  }

  open(ino: number, _flags: number): number {
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if (this.handles.size >= this.maxInodes) return -23; // ENFILE
    n.opens++;
    const fh = this.nextFh++;
    this.handles.set(fh, ino);
    return fh;
  }

  release(ino: number, fh: number): void {
    if (this.handles.get(fh) !== ino) return;
    this.handles.delete(fh);
    const n = this.get(ino);
    if (n === null) return;
    n.opens = Math.max(0, n.opens - 1);
    this.maybeFree(n);
  }

  read(ino: number, fh: number, offset: number, size: number, out: ChainWriter): number {
    if (this.handles.get(fh) !== ino) return -E.BADF;
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if (n.children !== null) return -E.ISDIR;
    const end = Math.min(n.stat.size, offset + size, offset + out.remaining);
    if (offset >= end) return 0;
    out.copyFrom(n.data!, offset, end);
    return end - offset;
  }

  write(ino: number, fh: number, offset: number, size: number, data: ChainReader): number {
    if (this.handles.get(fh) !== ino) return -E.BADF;
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if ((n.stat.mode & S_IFMT) !== S_IFREG) return -E.INVAL;
    if (!Number.isSafeInteger(offset + size) || offset < 0 || size > data.remaining) return -E.INVAL;
    if (offset + size > n.stat.size) {
      const r = this.resize(n, offset + size);
      if (r < 0) return r;
    }
    data.copyTo(n.data!, offset, offset + size);
    this.touch(n);
    return size;
  }

  private enter(d: Node, name: string, ino: number): void {
    d.children!.set(name, ino);
    d.cookies!.set(name, d.nextCookie++);
  }

  private leave(d: Node, name: string): void {
    d.children!.delete(name);
    d.cookies!.delete(name);
  }

  private add(parent: number, name: string, mode: number, who: Caller): Node | number {
    const d = this.dir(parent);
    if (typeof d === "number") return d;
    if (d.children!.has(name)) return -E.EXIST;
    if (this.nodes.size >= this.maxInodes) return -E.NOSPC;
    const n = this.node(this.nextIno++, mode, who);
    this.nodes.set(n.stat.ino, n);
    this.enter(d, name, n.stat.ino);
    if (n.children !== null) d.stat.nlink++;
    this.touch(d);
    return n;
  }

  create(parent: number, name: string, mode: number, _flags: number, who: Caller): { stat: FsStat; fh: number } | number {
    const n = this.add(parent, name, S_IFREG | (mode & 0o7777), who);
    if (typeof n === "number") return n;
    const fh = this.open(n.stat.ino, 0);
    if (fh < 0) return fh;
    return { stat: this.ref(n), fh };
  }

  mkdir(parent: number, name: string, mode: number, who: Caller): FsStat | number {
    const n = this.add(parent, name, S_IFDIR | (mode & 0o7777), who);
    return typeof n === "number" ? n : this.ref(n);
  }

  mknod(parent: number, name: string, mode: number, _rdev: number, who: Caller): FsStat | number {
    const t = mode & S_IFMT;
    // No device nodes in a shared tree (a guest must not reach host devices through it).
    if (t !== S_IFREG && t !== S_IFIFO && t !== S_IFSOCK) return -E.PERM;
    const n = this.add(parent, name, mode, who);
    return typeof n === "number" ? n : this.ref(n);
  }

  symlink(parent: number, name: string, target: string, who: Caller): FsStat | number {
    if (target.length === 0 || target.length > 4095) return -E.NAMETOOLONG;
    const n = this.add(parent, name, S_IFLNK | 0o777, who);
    if (typeof n === "number") return n;
    n.target = target;
    n.stat.size = Buffer.byteLength(target);
    return this.ref(n);
  }

  link(ino: number, parent: number, name: string): FsStat | number {
    const n = this.get(ino);
    if (n === null) return -E.NOENT;
    if (n.children !== null) return -E.PERM;
    const d = this.dir(parent);
    if (typeof d === "number") return d;
    if (d.children!.has(name)) return -E.EXIST;
    this.enter(d, name, ino);
    n.stat.nlink++;
    this.touch(n, false, true);
    this.touch(d);
    return this.ref(n);
  }

  private removeName(parent: number, name: string, wantDir: boolean): number {
    const d = this.dir(parent);
    if (typeof d === "number") return d;
    const ino = d.children!.get(name);
    if (ino === undefined) return -E.NOENT;
    const n = this.get(ino)!;
    const isDir = n.children !== null;
    if (wantDir && !isDir) return -E.NOTDIR;
    if (!wantDir && isDir) return -E.ISDIR;
    if (isDir && n.children!.size > 0) return -E.NOTEMPTY;
    this.leave(d, name);
    if (isDir) {
      d.stat.nlink--;
      n.stat.nlink = 0;
    } else n.stat.nlink--;
    this.touch(d);
    this.touch(n, false, true);
    this.maybeFree(n);
    return 0;
  }

  unlink(parent: number, name: string): number {
    return this.removeName(parent, name, false);
  }

  rmdir(parent: number, name: string): number {
    return this.removeName(parent, name, true);
  }

  /** Whether `ino` is `dir` or below it (a directory may not move into itself). */
  private within(ino: number, dir: number): boolean {
    if (ino === dir) return true;
    const n = this.get(ino);
    if (n?.children == null) return false;
    for (const c of n.children.values()) if (this.within(c, dir)) return true;
    return false;
  }

  rename(parent: number, name: string, newParent: number, newName: string, flags: number): number {
    if ((flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) !== 0 || flags === (RENAME_NOREPLACE | RENAME_EXCHANGE)) return -E.INVAL;
    const from = this.dir(parent), to = this.dir(newParent);
    if (typeof from === "number") return from;
    if (typeof to === "number") return to;
    const ino = from.children!.get(name);
    if (ino === undefined) return -E.NOENT;
    const n = this.get(ino)!;
    if (n.children !== null && this.within(ino, newParent)) return -E.INVAL;
    const other = to.children!.get(newName);
    if (flags & RENAME_EXCHANGE) {
      if (other === undefined) return -E.NOENT;
      const o = this.get(other)!;
      if (o.children !== null && this.within(other, parent)) return -E.INVAL;
      from.children!.set(name, other);
      to.children!.set(newName, ino);
      // Each name keeps its place (and cookie): only what it points to changed.
      if ((n.children !== null) !== (o.children !== null) && from !== to) {
        const dn = n.children !== null ? 1 : -1;
        from.stat.nlink -= dn;
        to.stat.nlink += dn;
      }
      this.touch(from);
      this.touch(to);
      return 0;
    }
    if (other !== undefined) {
      if (other === ino) return 0;
      if (flags & RENAME_NOREPLACE) return -E.EXIST;
      const o = this.get(other)!;
      if (o.children !== null && n.children === null) return -E.ISDIR;
      if (o.children === null && n.children !== null) return -E.NOTDIR;
      const r = this.removeName(newParent, newName, o.children !== null);
      if (r < 0) return r;
    }
    this.leave(from, name);
    this.enter(to, newName, ino);
    if (n.children !== null && from !== to) {
      from.stat.nlink--;
      to.stat.nlink++;
    }
    this.touch(from);
    this.touch(to);
    this.touch(n, false, true);
    return 0;
  }

  readdir(ino: number, offset: number, emit: DirEmit): number {
    const d = this.dir(ino);
    if (typeof d === "number") return d;
    // Offsets: "." is 1, ".." is 2, an entry its cookie (≥ 3); resume after `offset`.
    // ".." carries this directory's own number: the kernel does not use it (it knows the parent).
    if (offset < 1 && !emit(".", ino, S_IFDIR >> 12, 1)) return 0;
    if (offset < 2 && !emit("..", ino, S_IFDIR >> 12, 2)) return 0;
    for (const [name, cookie] of d.cookies!) {
      if (cookie <= offset) continue;
      const child = d.children!.get(name)!;
      if (!emit(name, child, (this.get(child)!.stat.mode & S_IFMT) >> 12, cookie)) break;
    }
    return 0;
  }

  reset(): void {
    this.handles.clear();
    for (const n of [...this.nodes.values()]) {
      n.lookups = 0;
      n.opens = 0;
      this.maybeFree(n);
    }
  }

  statfs(): FsStatfs {
    const blocks = Math.floor(this.maxBytes / BLOCK), used = Math.ceil(this.bytes / BLOCK);
    return {
      blocks, bfree: blocks - used, bavail: blocks - used, files: this.maxInodes, ffree: this.maxInodes - this.nodes.size,
      bsize: BLOCK, namelen: 255, frsize: BLOCK,
    };
  }
}

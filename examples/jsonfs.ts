/**
 * A synthetic file system in thirty lines: a directory whose files are JSON
 * views of a JavaScript object, read live (each read renders the value now).
 *
 *   bun run server.ts examples/jsonfs.ts --socket /tmp/jsonfs.sock
 *   # guest: mount -t virtiofs bunvhost /mnt; cat /mnt/uptime.json
 */
import { E, fsDevice, S_IFDIR, S_IFREG, type FsBackend, type FsStat } from "../src/devices/fs/index.ts";

const state: Record<string, () => unknown> = {
  "uptime.json": () => ({ seconds: Math.round(performance.now() / 1000) }),
  "process.json": () => ({ pid: process.pid, bun: Bun.version, memory: process.memoryUsage().rss }),
};
const names = Object.keys(state);
const bytes = (ino: number) => new TextEncoder().encode(JSON.stringify(state[names[ino - 2]!]!(), null, 2) + "\n");
const stat = (ino: number): FsStat => ({
  ino, mode: ino === 1 ? S_IFDIR | 0o555 : S_IFREG | 0o444, nlink: 1, uid: 0, gid: 0, rdev: 0,
  size: ino === 1 ? 0 : bytes(ino).length, blocks: 0, blksize: 4096,
  atimeSec: 0, atimeNsec: 0, mtimeSec: 0, mtimeNsec: 0, ctimeSec: 0, ctimeNsec: 0,
});

const jsonfs: FsBackend = {
  root: 1,
  readonly: true,
  lookup: (parent, name) => (parent === 1 && names.includes(name) ? stat(names.indexOf(name) + 2) : -E.NOENT),
  getattr: (ino) => (ino >= 1 && ino < names.length + 2 ? stat(ino) : -E.NOENT),
  readdir(ino, offset, emit) {
    for (let i = offset; i < names.length; i++) if (!emit(names[i]!, i + 2, S_IFREG >> 12, i + 1)) break;
    return 0;
  },
  read(ino, _fh, offset, size, out) {
    const b = bytes(ino).subarray(offset, offset + Math.min(size, out.remaining));
    out.copyFrom(b);
    return b.length;
  },
};

export default () => fsDevice(jsonfs, { tag: "bunvhost", cache: "never" });

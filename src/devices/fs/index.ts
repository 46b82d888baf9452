/**
 * `bunvhost/fs`: virtio-fs for your own file systems. Implement FsBackend
 * (inode numbers and errnos; file data through chain cursors) and serve it
 * with fsDevice(); MemoryFs is a complete in-memory one to start from.
 * @example
 * import { fsDevice, MemoryFs } from "bunvhost/fs";
 * export default () => fsDevice(new MemoryFs(), { tag: "scratch" });
 */
export { fsDevice, type FsDeviceOptions } from "./device.ts";
export { MemoryFs, type MemoryFsOptions } from "./memory_fs.ts";
export {
  E, S_IFMT, S_IFDIR, S_IFREG, S_IFLNK, S_IFIFO, S_IFSOCK,
  type FsBackend, type FsStat, type SetAttr, type Caller, type DirEmit, type FsStatfs,
} from "./backend.ts";
export type { CacheMode } from "./fuse_session.ts";

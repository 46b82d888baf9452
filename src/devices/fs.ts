/**
 * virtio-fs (VIRTIO 1.2 §5.11): a file system a Linux guest mounts with
 * `mount -t virtiofs TAG /mnt`, FUSE requests over virtqueues (queue 0 the
 * high-priority queue for FORGET and INTERRUPT, then the request queues).
 * What is served is an FsBackend (src/devices/fs/backend.ts): `--shared-dir
 * DIR`, the passthrough of a host directory (nothing outside DIR is ever
 * reached), or `--memory`, an in-memory tree.
 *
 *   bun run server.ts fs --socket /tmp/fs.sock --memory
 *   # QEMU: -chardev socket,id=fs0,path=/tmp/fs.sock -device vhost-user-fs-pci,chardev=fs0,tag=bunvhost
 *
 * Threads: every queue of one file system runs on one thread (its inode
 * table is that thread's): --threads 0 or 1.
 */
import { OptionError, type Device, type DeviceContext, type DeviceOptions, type OptionValues, type PrepareContext } from "../index.ts";
import type { FsBackend } from "./fs/backend.ts";
import type { CacheMode } from "./fs/fuse_session.ts";
import { fsDevice } from "./fs/device.ts";
import { MemoryFs } from "./fs/memory_fs.ts";
import { PassthroughFs } from "./fs/passthrough.ts";
import { resolve } from "node:path";

export const options = {
  "shared-dir": { type: "string", metavar: "DIR", help: "the host directory to share (the guest never reaches outside it)" },
  memory: { type: "boolean", help: "serve an in-memory file system (starts empty)" },
  "memory-size": { type: "size", default: "256M", help: "most bytes of file data in the in-memory file system" },
  readonly: { type: "boolean", help: "refuse every change (EROFS)" },
  xattr: { type: "boolean", help: "serve extended attributes (--shared-dir)" },
  cache: { type: "string", default: "never", choices: ["never", "auto", "always"], help: "how long the guest may cache names and attributes: 0, 1 s, a day" },
  tag: { type: "string", default: "bunvhost", help: "the mount tag in the config space (QEMU's vhost-user-fs-pci sets its own with tag=)" },
  queues: { type: "number", default: 1, min: 1, max: 16, help: "request queues (besides the high-priority queue)" },
} satisfies DeviceOptions;

export const defaults = { threads: 1 };

export interface FsPrepared {
  dir: string | null;
  memory: boolean;
  memorySize: number;
  readonly: boolean;
  xattr: boolean;
  cache: CacheMode;
  tag: string;
  queues: number;
}

export function prepare(v: OptionValues, ctx: PrepareContext): FsPrepared {
  if (ctx.threads > 1) throw new OptionError("fs: every queue of the file system runs on one thread: --threads 0 or 1");
  const dir = (v["shared-dir"] as string | undefined) ?? null;
  if ((dir === null) === !v.memory) throw new OptionError("fs: give one of --shared-dir DIR or --memory");
  if (dir !== null) {
    // Opened here first, so that a directory that cannot be served stops the start (exit 1).
    new PassthroughFs(dir, { readonly: v.readonly === true }).close();
  }
  const tag = v.tag as string;
  if (Buffer.byteLength(tag) > 36 || tag.length === 0) throw new OptionError("--tag: 1 to 36 bytes");
  return {
    dir: dir === null ? null : resolve(dir), memory: dir === null, memorySize: v["memory-size"] as number, readonly: v.readonly === true, xattr: v.xattr === true,
    cache: v.cache as CacheMode, tag, queues: v.queues as number,
  };
}

export function describe(p: FsPrepared): string {
  return `${p.memory ? `in-memory file system of at most ${p.memorySize >> 20} MiB` : `shared directory ${p.dir}`}${p.readonly ? ", read-only" : ""}, cache ${p.cache}`;
}

export default function fs(p: FsPrepared, ctx: DeviceContext): Device {
  const backend: FsBackend & { close?(): void } = p.dir !== null
    ? new PassthroughFs(p.dir, { readonly: p.readonly })
    : new MemoryFs({ maxBytes: p.memorySize });
  return fsDevice(backend, { cache: p.cache, readonly: p.readonly, xattr: p.xattr, tag: p.tag, queues: p.queues, log: ctx.log });
}

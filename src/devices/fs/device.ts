/**
 * A virtio-fs Device around any FsBackend: what `server.ts fs` serves, and
 * what your own file system's device file exports (see docs/DEVICES.md,
 * "A file system in thirty lines").
 */
import { VIRTIO_ID_FS, type Device, type DeviceLog } from "../../index.ts";
import type { FsBackend } from "./backend.ts";
import { FuseSession, type CacheMode } from "./fuse_session.ts";

export interface FsDeviceOptions {
  /** The mount tag in the config space (QEMU's vhost-user-fs-pci sets its own with tag=). */
  tag?: string;
  /** Request queues besides the high-priority queue (default 1). */
  queues?: number;
  cache?: CacheMode;
  readonly?: boolean;
  xattr?: boolean;
  log?: DeviceLog;
}

/**
 * The virtio-fs device serving `backend`: FUSE requests on every queue,
 * answered synchronously; a new guest (reset) starts from INIT with nothing held.
 * @example
 * export default () => fsDevice(new MemoryFs(), { tag: "scratch" });
 */
export function fsDevice(backend: FsBackend & { close?(): void }, o: FsDeviceOptions = {}): Device {
  const queues = o.queues ?? 1;
  const sessionOf = () => new FuseSession(backend, { cache: o.cache, readonly: o.readonly, xattr: o.xattr, log: o.log });
  let session = sessionOf();
  const config = new Uint8Array(40);
  config.set(new TextEncoder().encode(o.tag ?? "bunvhost").subarray(0, 36), 0);
  new DataView(config.buffer).setUint32(36, queues, true);
  return {
    name: "fs",
    type: VIRTIO_ID_FS,
    queues: 1 + queues,
    queueSize: 1024,
    features: 0n,
    config: () => config,
    handle(req) {
      session.handle(req);
    },
    reset() {
      // A new guest (or a reset driver) starts with INIT and holds nothing.
      backend.reset?.();
      session = sessionOf();
    },
    close() {
      backend.close?.();
    },
  };
}

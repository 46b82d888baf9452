/**
 * bunvhost: vhost-user back-ends (virtio devices) in TypeScript, run by Bun.
 *
 * Everything a device file imports: the Device API (requests, cursors over
 * guest buffers, PENDING, receive queues, options, state), VIRTIO ids, and
 * serve() to run a device from a program. The test kit is
 * `bunvhost/testing`, the vhost-user front-end `bunvhost/frontend`.
 *
 * @example
 * import { serve, VIRTIO_ID_RNG, type Device } from "bunvhost";
 * const rng: Device = {
 *   name: "rng", type: VIRTIO_ID_RNG, queues: 1, queueSize: 256, features: 0n,
 *   config: () => new Uint8Array(0),
 *   handle(req) { req.out.forEach(req.out.remaining, (v) => crypto.getRandomValues(v)); },
 * };
 * const s = await serve(rng, { socket: "/tmp/rng.sock" });
 * console.log(s.qemuLine());
 */
export * from "./device/api.ts";
export { serve, type ServeOptions, type Served } from "./server/serve.ts";
export { DeviceModuleError } from "./server/device_module.ts";
export { qemuDeviceArgs, qemuAttachLine, type AttachInfo } from "./server/qemu_line.ts";
export { stderrLogger, type Logger, type Level } from "./device/log.ts";
export { Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, type TapOptions } from "./io/tap.ts";
export { every, type LoopTimer } from "./io/timer.ts";

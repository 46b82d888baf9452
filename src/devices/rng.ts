/**
 * virtio-rng, the entropy device (VIRTIO 1.2 §5.4): one request queue; the
 * driver posts device-writable buffers and the device fills them with random
 * bytes. No feature bits, no config space. Linux: drivers/char/hw_random/
 * virtio-rng.c (/dev/hwrng).
 *
 *   bun run server.ts rng --socket /tmp/rng.sock
 */
import { VIRTIO_ID_RNG, type Device } from "../device/api.ts";

/** The most one request gets (§5.4.6.1: the device MAY use less than the whole buffer; the driver asks again). */
const MAX_PER_REQUEST = 65536;

export default {
  name: "rng",
  type: VIRTIO_ID_RNG,
  queues: 1,
  queueSize: 256,
  features: 0n,
  config: () => new Uint8Array(0),
  handle(req) {
    // Device-readable buffers have no meaning here and are ignored; the used length is what was written.
    req.out.forEach(Math.min(req.out.remaining, MAX_PER_REQUEST), (view) => crypto.getRandomValues(view));
  },
} satisfies Device;

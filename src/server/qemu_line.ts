/**
 * The QEMU options that attach a device served on a socket: QEMU's own
 * vhost-user front-end for the device's VIRTIO id where it has one (7.2 has
 * blk, fs, scsi, gpio, i2c, input, rng, gpu, vsock; net through
 * `-netdev vhost-user`), otherwise the generic `vhost-user-device-pci` of
 * QEMU 8.2 and later, which takes any id, queue count and config size.
 */

/** What the line depends on: the device's VIRTIO id, queue count and config size. */
export interface AttachInfo {
  type: number;
  queues: number;
  configSize: number;
  /** virtio-net: the port's MAC (config bytes 0..5), given to QEMU (which keeps its own otherwise: the same in every QEMU). */
  mac?: string;
}

/** QEMU's dedicated vhost-user front-ends by VIRTIO id: device name and the properties it needs. */
const DEDICATED: Record<number, (q: number) => string> = {
  2: (q) => `vhost-user-blk-pci,num-queues=${q}`,
  4: () => "vhost-user-rng-pci",
  8: (q) => `vhost-user-scsi-pci,num_queues=${Math.max(1, q - 2)}`,
  16: () => "vhost-user-gpu-pci",
  18: () => "vhost-user-input-pci",
  19: () => "vhost-user-vsock-pci,guest-cid=3",
  26: (q) => `vhost-user-fs-pci,tag=bunvhost${q > 2 ? `,num-request-queues=${q - 1}` : ""}`,
  34: () => "vhost-user-i2c-pci",
  41: () => "vhost-user-gpio-pci",
};

/**
 * QEMU 7.2's vhost-user-input-pci and vhost-user-gpu-pci go through
 * backends/vhost-user.c, which refuses to start without KVM's ioeventfds.
 */
const NEEDS_KVM = new Set([16, 18]);

/** True when QEMU 7.2 has a front-end of its own for this VIRTIO id. */
export function hasDedicatedFrontend(type: number): boolean {
  return type === 1 || type in DEDICATED;
}

/**
 * The `-chardev`/`-device` (or `-netdev`) options for a device on `socket`,
 * chardev id `id`.
 * @example qemuDeviceArgs({ type: 4, queues: 1, configSize: 0 }, "/tmp/rng.sock")
 * // ["-chardev", "socket,id=vu0,path=/tmp/rng.sock", "-device", "vhost-user-rng-pci,chardev=vu0"]
 */
export function qemuDeviceArgs(d: AttachInfo, socket: string, id = "vu0"): string[] {
  const chardev = ["-chardev", `socket,id=${id},path=${socket}`];
  if (d.type === 1) {
    const pairs = Math.max(1, Math.floor(d.queues / 2));
    return [...chardev, "-netdev", `vhost-user,id=${id}n,chardev=${id}${pairs > 1 ? `,queues=${pairs}` : ""}`,
      "-device", `virtio-net-pci,netdev=${id}n,vectors=0${pairs > 1 ? ",mq=on" : ""}${d.mac ? `,mac=${d.mac}` : ""}`];
  }
  const dedicated = DEDICATED[d.type];
  const dev = dedicated
    ? dedicated(d.queues).replace(/^([^,]+)/, `$1,chardev=${id}`)
    : `vhost-user-device-pci,chardev=${id},virtio-id=${d.type},num_vqs=${d.queues},config_size=${d.configSize}`;
  return [...chardev, "-device", dev];
}

/** The whole hint printed at start: shared guest memory plus the device's options, one shell line. */
export function qemuAttachLine(d: AttachInfo, socket: string): string {
  const mem = "-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem";
  const args = qemuDeviceArgs(d, socket).join(" ");
  const note = !hasDedicatedFrontend(d.type) ? ` (QEMU 8.2 or later: QEMU 7.2 has no front-end for VIRTIO id ${d.type})`
    : NEEDS_KVM.has(d.type) ? " (with -accel kvm: QEMU 7.2 refuses this device under TCG)" : "";
  return `qemu-system-x86_64 ${mem} ${args}${note}`;
}

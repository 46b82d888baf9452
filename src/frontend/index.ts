/** The front-end (driver) side: vhost-user client, guest RAM, split virtqueue driver, virtio-blk driver. */
export * from "./client.ts";
export * from "./guest_ram.ts";
export * from "./split_driver.ts";
export * from "./blk_driver.ts";
export * from "./packed_driver.ts";

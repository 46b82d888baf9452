#!/usr/bin/env bun
/**
 * Builds (if stale) the Linux guest image the QEMU tests and the test kit
 * boot, and prints where it is: the host kernel plus a busybox initramfs
 * with virtio modules (src/testing/guest_image.ts does the work; the cache
 * is build/guest in a checkout, else $BUNVHOST_CACHE or ~/.cache/bunvhost).
 *
 *   bun scripts/guest_image.ts          # build if stale, print the paths
 *   bun scripts/guest_image.ts --force  # rebuild
 */
import { guestCacheDir, guestImage } from "../src/testing/guest_image.ts";

const img = await guestImage({ force: process.argv.includes("--force") });
console.log(`cache:   ${guestCacheDir()}\nkernel:  ${img.kernel}\ninitrd:  ${img.initrd}`);
console.log(`modules: ${Object.entries(img.modules).map(([m, l]) => `${m} (${l.join(" ")})`).join(", ")}`);

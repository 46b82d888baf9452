#!/usr/bin/env bun
/**
 * Installs what the test suite needs beyond npm packages: QEMU (for
 * qemu-storage-daemon, the reference back-end, and qemu-system-x86_64), for
 * the Linux guest tests Debian's kernel, busybox-static, cpio and xz, DPDK's
 * testpmd with its vhost and virtio-user drivers (the net tests), and ip
 * (iproute2: network namespaces for the tap tests).
 * Uses apt-get when running as root on Debian; otherwise says what is
 * missing (the tests that need it then skip with a one-line reason).
 *
 *   bun scripts/setup_tests.ts
 */
import { $, which } from "zx";
import { existsSync, readdirSync } from "node:fs";

$.verbose = true;

const needed: Record<string, string> = {
  "qemu-storage-daemon": "qemu-system-x86",
  "qemu-system-x86_64": "qemu-system-x86",
  "qemu-img": "qemu-utils",
  cpio: "cpio",
  xz: "xz-utils",
  "dpdk-testpmd": "dpdk-dev",
  ip: "iproute2",
};

const missing = new Set<string>();
for (const [tool, pkg] of Object.entries(needed)) {
  if (!(await which(tool, { nothrow: true }))) missing.add(pkg);
}
if (!existsSync("/bin/busybox")) missing.add("busybox-static");
// testpmd loads its PMDs from the library directory: the vhost and virtio-user ones come apart.
const pmds = "/usr/lib/x86_64-linux-gnu/dpdk";
const hasPmd = (name: string) => existsSync(pmds) && readdirSync(pmds, { recursive: true }).some((f) => String(f).includes(name));
if (!hasPmd("librte_net_vhost")) missing.add("librte-net-vhost23");
if (!hasPmd("librte_net_virtio")) missing.add("librte-net-virtio23");
if (!(readdirSync("/boot", { withFileTypes: true }) as { name: string }[]).some((e) => e.name.startsWith("vmlinuz-"))) {
  missing.add("linux-image-amd64");
}

if (missing.size === 0) {
  console.log("setup_tests: everything the tests need is installed");
} else if (process.getuid?.() === 0 && (await which("apt-get", { nothrow: true }))) {
  const pkgs = [...missing];
  console.log(`setup_tests: installing ${pkgs.join(" ")}`);
  await $({ env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } })`apt-get update -q`;
  await $({ env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } })`apt-get install -y -q --no-install-recommends ${pkgs}`;
} else {
  console.log(`setup_tests: missing ${[...missing].join(" ")} (not root or no apt-get): tests that need them will skip`);
}

#!/usr/bin/env bun
/**
 * Builds the Linux guest used by tests/qemu/: the installed Debian kernel
 * plus an initramfs (build/guest/initrd.gz) holding busybox-static, the
 * virtio-blk and ext2 (ext4) modules and an /init that
 *   1. mounts /proc, /sys, /dev (devtmpfs) and /tmp (tmpfs),
 *   2. loads the modules listed in /lib/modules/load, in order,
 *   3. runs /test.sh if present (tests append it as a second cpio archive,
 *      see `withTestScript`), else reads shell lines from the console,
 *   4. prints "RESULT: END <status>" and powers off.
 * Everything the guest reports is a "RESULT: <key> <value>" line on ttyS0.
 *
 * When the kernel supports PVH entry (CONFIG_PVH=y, as Debian's does), the
 * ELF vmlinux is extracted from the bzImage into build/guest/vmlinux and
 * QEMU boots that: under TCG this saves the 3-4 s the bzImage spends
 * decompressing itself (boot to /init: ~3 s instead of ~7 s).
 *
 * The build is cached: build/guest/stamp records the kernel, busybox and
 * this script's init; any change rebuilds (about 1.5 s).
 *
 *   bun scripts/guest_image.ts          # build if stale, print the paths
 *   bun scripts/guest_image.ts --force  # rebuild
 */
import { $ } from "zx";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, chmodSync } from "node:fs";
import { join, resolve } from "node:path";
import { gzipSync } from "node:zlib";

const ROOT = resolve(import.meta.dir, "..");
export const GUEST_DIR = join(ROOT, "build", "guest");
const BUSYBOX = "/bin/busybox";

/** Modules the guest loads (dependencies are added from modules.dep). */
const WANTED = [
  "kernel/drivers/virtio/virtio_pci",
  "kernel/drivers/block/virtio_blk",
  // ext2 through ext4 (CONFIG_EXT4_USE_FOR_EXT2=y; there is no ext2.ko)
  "kernel/fs/ext4/ext4",
  "kernel/crypto/crc32c_generic", // ext4 asks for crc32c at mount, even for ext2
];

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
stty -echo -F /dev/console 2>/dev/null
for m in $(cat /lib/modules/load); do
  insmod /lib/modules/$m.ko || echo "RESULT: FAIL insmod $m"
done
# wait (at most 5 s) for /dev/vda if there is a virtio-blk device (virtio id 2)
i=0
while [ ! -b /dev/vda ] && grep -qs 0x0002 /sys/bus/virtio/devices/*/device && [ $i -lt 50 ]; do
  usleep 100000; i=$((i + 1))
done
echo "RESULT: BOOTED $(cut -d' ' -f1 /proc/uptime)"
if [ -f /test.sh ]; then
  sh /test.sh
  rc=$?
else
  rc=0
  while read -r line; do
    [ "$line" = "exit" ] && break
    eval "$line"
  done
fi
sync
echo "RESULT: END $rc"
poweroff -f
`;

export interface GuestImage {
  /** build/guest/vmlinux (PVH entry) or the /boot bzImage. */
  kernel: string;
  initrd: string;
}

/** The newest kernel that has both /boot/vmlinuz-KVER and /lib/modules/KVER. */
function pickKernel(): { kver: string; kernel: string } {
  const versions = existsSync("/lib/modules") ? readdirSync("/lib/modules") : [];
  const usable = versions.filter((v) => existsSync(`/boot/vmlinuz-${v}`) && existsSync(`/lib/modules/${v}/modules.dep`));
  usable.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const kver = usable.at(-1);
  if (!kver) throw new Error("no kernel with /boot/vmlinuz-KVER and /lib/modules/KVER (apt-get install linux-image-amd64)");
  return { kver, kernel: `/boot/vmlinuz-${kver}` };
}

/** Why the guest image cannot be built here, or null. */
export function guestSkipReason(): string | null {
  try {
    pickKernel();
  } catch (e) {
    return (e as Error).message;
  }
  if (!existsSync(BUSYBOX)) return "no static busybox at /bin/busybox (apt-get install busybox-static)";
  if (!Bun.which("cpio")) return "cpio not installed (apt-get install cpio)";
  return null;
}

/** modules.dep entries without extension → their dependencies, in load order (dependencies first). */
function loadOrder(kver: string): { name: string; file: string }[] {
  const dir = `/lib/modules/${kver}`;
  const deps = new Map<string, string[]>();
  for (const line of readFileSync(`${dir}/modules.dep`, "utf8").split("\n")) {
    const [mod, rest] = line.split(":");
    if (!mod || rest === undefined) continue;
    deps.set(mod, rest.trim() ? rest.trim().split(/\s+/) : []);
  }
  const byStem = new Map<string, string>();
  for (const m of deps.keys()) byStem.set(m.replace(/\.ko(\.xz|\.zst|\.gz)?$/, ""), m);
  const order: string[] = [];
  const visit = (file: string, path: string[]) => {
    if (order.includes(file)) return;
    if (path.includes(file)) throw new Error(`module dependency loop: ${[...path, file].join(" -> ")}`);
    for (const d of deps.get(file) ?? []) visit(d, [...path, file]);
    order.push(file);
  };
  for (const w of WANTED) {
    const file = byStem.get(w);
    if (!file) throw new Error(`${w} not in ${dir}/modules.dep`);
    visit(file, []);
  }
  return order.map((file) => ({ name: file.split("/").at(-1)!.replace(/\.ko(\.xz|\.zst|\.gz)?$/, ""), file: `${dir}/${file}` }));
}

/** Decompressors for the bzImage payload, by magic (arch/x86/boot/compressed). */
const PAYLOADS: { magic: number[]; cmd: string[] }[] = [
  { magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], cmd: ["xz", "-dc", "--single-stream"] },
  { magic: [0x1f, 0x8b], cmd: ["gzip", "-dc"] },
  { magic: [0x28, 0xb5, 0x2f, 0xfd], cmd: ["zstd", "-dc"] },
  { magic: [0x02, 0x21, 0x4c, 0x18], cmd: ["lz4", "-dc"] },
];

/**
 * Writes the ELF vmlinux inside a bzImage to `out` when the kernel can be
 * entered through PVH; returns false (and the caller boots the bzImage) when
 * it cannot. The payload's place is in the setup header (boot protocol 2.08+:
 * payload_offset at 0x248, payload_length at 0x24c, from the protected-mode
 * code, which starts after (setup_sects + 1) * 512 bytes).
 */
async function extractVmlinux(kernel: string, kver: string, out: string): Promise<boolean> {
  const config = `/boot/config-${kver}`;
  if (!existsSync(config) || !/^CONFIG_PVH=y$/m.test(readFileSync(config, "utf8"))) return false;
  const img = readFileSync(kernel);
  if (img.length < 0x250 || img.readUInt32LE(0x202) !== 0x53726448 /* "HdrS" */ || img.readUInt16LE(0x206) < 0x208) return false;
  const setupSects = img[0x1f1] || 4;
  const start = (setupSects + 1) * 512 + img.readUInt32LE(0x248);
  const payload = img.subarray(start, start + img.readUInt32LE(0x24c));
  const kind = PAYLOADS.find((p) => p.magic.every((b, i) => payload[i] === b));
  if (!kind || !Bun.which(kind.cmd[0]!)) return false;
  const tmp = `${out}.${process.pid}`;
  const compressed = `${tmp}.payload`;
  writeFileSync(compressed, payload);
  try {
    // The kernel appends the decompressed size after the stream: xz stops at the stream's end,
    // gzip warns about "trailing garbage" and exits 2, which is fine as long as the ELF is whole.
    await $({ verbose: true, nothrow: true })`${kind.cmd} < ${compressed} > ${tmp}`;
    const elf = readFileSync(tmp);
    if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46) {
      rmSync(tmp, { force: true });
      return false;
    }
    renameSync(tmp, out);
    return true;
  } finally {
    rmSync(compressed, { force: true });
  }
}

function stampFor(kver: string, kernel: string): string {
  const st = (p: string) => { const s = statSync(p); return `${p}:${s.size}:${s.mtimeMs}`; };
  return createHash("sha256")
    .update([kver, st(kernel), st(`/lib/modules/${kver}/modules.dep`), st(BUSYBOX), INIT, WANTED.join(",")].join("\n"))
    .digest("hex");
}

/**
 * Returns the kernel and the cached initramfs, building the initramfs first
 * when it is missing or stale. Safe to call from several processes: the new
 * image is renamed into place.
 */
export async function guestImage(opts: { force?: boolean } = {}): Promise<GuestImage> {
  const skip = guestSkipReason();
  if (skip) throw new Error(skip);
  const { kver, kernel } = pickKernel();
  const initrd = join(GUEST_DIR, "initrd.gz");
  const vmlinux = join(GUEST_DIR, "vmlinux");
  const stampFile = join(GUEST_DIR, "stamp");
  const stamp = stampFor(kver, kernel);
  if (!opts.force && existsSync(initrd) && existsSync(stampFile)) {
    const [built, boot] = readFileSync(stampFile, "utf8").split("\n");
    if (built === stamp && boot && existsSync(boot)) return { kernel: boot, initrd };
  }

  const $$ = $({ verbose: true, quiet: false });
  mkdirSync(GUEST_DIR, { recursive: true });
  const tree = join(GUEST_DIR, `tree.${process.pid}`);
  rmSync(tree, { recursive: true, force: true });
  try {
    mkdirSync(join(tree, "bin"), { recursive: true });
    mkdirSync(join(tree, "lib", "modules"), { recursive: true });
    await $$`cp ${BUSYBOX} ${join(tree, "bin", "busybox")}`;
    const mods = loadOrder(kver);
    for (const m of mods) {
      const out = join(tree, "lib", "modules", `${m.name}.ko`);
      if (m.file.endsWith(".ko")) await $$`cp ${m.file} ${out}`;
      else if (m.file.endsWith(".ko.xz")) await $$`xz -dc ${m.file} > ${out}`;
      else if (m.file.endsWith(".ko.zst")) await $$`zstd -dc ${m.file} > ${out}`;
      else if (m.file.endsWith(".ko.gz")) await $$`gzip -dc ${m.file} > ${out}`;
    }
    writeFileSync(join(tree, "lib", "modules", "load"), mods.map((m) => m.name).join("\n") + "\n");
    writeFileSync(join(tree, "init"), INIT);
    chmodSync(join(tree, "init"), 0o755);
    const tmp = `${initrd}.${process.pid}`;
    await $$({ cwd: tree })`find . | sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 > ${tmp}`;
    // The kernel looks for a following archive only at 4-byte aligned offsets.
    const size = statSync(tmp).size;
    if (size % 4) writeFileSync(tmp, new Uint8Array(4 - (size % 4)), { flag: "a" });
    renameSync(tmp, initrd);
    const boot = (await extractVmlinux(kernel, kver, vmlinux)) ? vmlinux : kernel;
    writeFileSync(stampFile, `${stamp}\n${boot}`);
    console.log(`guest_image: ${initrd} (${statSync(initrd).size} bytes; kernel ${kver}, booting ${boot}; modules ${mods.map((m) => m.name).join(" ")})`);
    return { kernel: boot, initrd };
  } finally {
    rmSync(tree, { recursive: true, force: true });
  }
}

/** A newc cpio archive of regular files (mode 0755), with its trailer. */
export function cpioNewc(files: Record<string, string | Uint8Array>): Uint8Array {
  const parts: Uint8Array[] = [];
  let ino = 1;
  const pad = (n: number) => new Uint8Array((4 - (n % 4)) % 4);
  const entry = (name: string, mode: number, data: Uint8Array) => {
    const hex = (v: number) => v.toString(16).padStart(8, "0");
    const nameBytes = new TextEncoder().encode(name + "\0");
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = new TextEncoder().encode("070701" + fields.map(hex).join(""));
    parts.push(header, nameBytes, pad(header.length + nameBytes.length), data, pad(data.length));
  };
  for (const [name, content] of Object.entries(files)) {
    entry(name, 0o100755, typeof content === "string" ? new TextEncoder().encode(content) : content);
  }
  entry("TRAILER!!!", 0, new Uint8Array(0));
  return Buffer.concat(parts);
}

/**
 * Writes `out`: the cached initramfs followed by a gzipped cpio holding
 * /test.sh, which /init runs instead of reading the console.
 */
export function withTestScript(base: string, script: string, out: string): string {
  const extra = gzipSync(cpioNewc({ "test.sh": script }), { level: 1 });
  writeFileSync(out, Buffer.concat([readFileSync(base), extra]));
  return out;
}

if (import.meta.main) {
  const img = await guestImage({ force: process.argv.includes("--force") });
  console.log(`kernel: ${img.kernel}\ninitrd: ${img.initrd}`);
}

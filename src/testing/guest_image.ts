/**
 * The Linux guest image of the test kit: the host's installed kernel plus an
 * initramfs holding busybox-static, a set of virtio driver modules (with
 * their dependencies from modules.dep) and an /init that
 *   1. mounts /proc, /sys, /dev (devtmpfs) and /tmp (tmpfs),
 *   2. loads the modules listed in /load (written per run, see
 *      `withTestScript`), else those in /lib/modules/load (the block set),
 *   3. runs /test.sh if present, else reads shell lines from the console,
 *   4. prints "RESULT: END <status>" and powers off.
 * Everything the guest reports is a "RESULT: <key> <value>" line on ttyS0.
 *
 * When the kernel supports PVH entry (CONFIG_PVH=y, as Debian's does), the
 * ELF vmlinux is extracted from the bzImage and QEMU boots that: under TCG
 * this saves the 3-4 s the bzImage spends decompressing itself.
 *
 * The archive is written here (no cpio binary needed) and cached in
 * `guestCacheDir()`; image.json there records what it was built from (kernel,
 * modules.dep, busybox, this file's recipe) and any change rebuilds it
 * (about 1.5 s). Several processes may build at once: each renames its
 * finished files into place.
 */
import { createHash } from "node:crypto";
import { accessSync, constants, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve, sep } from "node:path";
import { gunzipSync, gzipSync } from "node:zlib";

/** The bunvhost package root (this file is src/testing/guest_image.ts). */
const PACKAGE_ROOT = resolve(import.meta.dir, "../..");
const BUSYBOX = "/bin/busybox";

/**
 * Modules in the image, as modules.dep names them without ".ko"; their
 * dependencies come along. A run loads the ones it asks for (by module
 * name: "virtio_rng" or "virtio-rng") after "virtio_pci".
 */
export const GUEST_MODULES: readonly string[] = [
  "kernel/drivers/virtio/virtio_pci",
  "kernel/drivers/block/virtio_blk",
  // ext2 through ext4 (CONFIG_EXT4_USE_FOR_EXT2=y; there is no ext2.ko)
  "kernel/fs/ext4/ext4",
  "kernel/crypto/crc32c_generic", // ext4 asks for crc32c at mount, even for ext2
  "kernel/drivers/char/hw_random/virtio-rng",
  "kernel/drivers/virtio/virtio_input",
  "kernel/drivers/input/evdev",
  "kernel/drivers/net/virtio_net", // with net/core/failover and drivers/net/net_failover
  "kernel/fs/fuse/virtiofs", // with fs/fuse/fuse
];

/** What /init loads when a run names no modules: the virtio-blk disk and ext2/ext4. */
export const DEFAULT_MODULES: readonly string[] = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"];

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
stty -echo -F /dev/console 2>/dev/null
load=/lib/modules/load
[ -f /load ] && load=/load
for m in $(cat $load); do
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
  /** The kernel QEMU boots: the extracted vmlinux (PVH entry) or the /boot bzImage. */
  kernel: string;
  /** The cached initramfs (gzipped newc cpio, padded to 4 bytes so another archive can follow). */
  initrd: string;
  /** Module name (dashes as underscores) → the files to insmod, dependencies first (names without ".ko"). */
  modules: Record<string, string[]>;
}

/**
 * Where the image is cached: $BUNVHOST_CACHE/guest when set; build/guest in
 * a bunvhost checkout (not inside node_modules, writable); otherwise
 * $XDG_CACHE_HOME/bunvhost/guest (default ~/.cache/bunvhost/guest).
 */
export function guestCacheDir(): string {
  const env = process.env.BUNVHOST_CACHE;
  if (env) return join(resolve(env), "guest");
  if (!PACKAGE_ROOT.includes(`${sep}node_modules${sep}`)) {
    try {
      accessSync(PACKAGE_ROOT, constants.W_OK);
      return join(PACKAGE_ROOT, "build", "guest");
    } catch {
      // a read-only install: fall through to the user's cache
    }
  }
  return join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "bunvhost", "guest");
}

/** The newest kernel that has both /boot/vmlinuz-KVER and /lib/modules/KVER/modules.dep. */
function pickKernel(): { kver: string; kernel: string } {
  const versions = existsSync("/lib/modules") ? readdirSync("/lib/modules") : [];
  const usable = versions.filter((v) => existsSync(`/boot/vmlinuz-${v}`) && existsSync(`/lib/modules/${v}/modules.dep`));
  usable.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const kver = usable.at(-1);
  if (!kver) throw new Error("no kernel with /boot/vmlinuz-KVER and /lib/modules/KVER (apt-get install linux-image-amd64)");
  return { kver, kernel: `/boot/vmlinuz-${kver}` };
}

/** Why the guest image cannot be built here (no kernel, no static busybox), or null. */
export function guestImageSkipReason(): string | null {
  try {
    pickKernel();
  } catch (e) {
    return (e as Error).message;
  }
  if (!existsSync(BUSYBOX)) return "no static busybox at /bin/busybox (apt-get install busybox-static)";
  return null;
}

const stem = (file: string) => file.split("/").at(-1)!.replace(/\.ko(\.xz|\.zst|\.gz)?$/, "");
/** Kernel module names treat "-" and "_" alike (virtio-rng.ko is module virtio_rng). */
export const moduleKey = (name: string) => name.replace(/-/g, "_");

/** GUEST_MODULES and their dependencies, in load order, plus each wanted module's own load list. */
function resolveModules(kver: string): { files: string[]; lists: Record<string, string[]> } {
  const dir = `/lib/modules/${kver}`;
  const deps = new Map<string, string[]>();
  for (const line of readFileSync(`${dir}/modules.dep`, "utf8").split("\n")) {
    const [mod, rest] = line.split(":");
    if (!mod || rest === undefined) continue;
    deps.set(mod, rest.trim() ? rest.trim().split(/\s+/) : []);
  }
  const byPath = new Map<string, string>();
  for (const m of deps.keys()) byPath.set(m.replace(/\.ko(\.xz|\.zst|\.gz)?$/, ""), m);
  const order = (file: string, out: string[], path: string[] = []) => {
    if (out.includes(file)) return;
    if (path.includes(file)) throw new Error(`module dependency loop: ${[...path, file].join(" -> ")}`);
    for (const d of deps.get(file) ?? []) order(d, out, [...path, file]);
    out.push(file);
  };
  const files: string[] = [];
  const lists: Record<string, string[]> = {};
  for (const w of GUEST_MODULES) {
    const file = byPath.get(w);
    if (!file) throw new Error(`${w} not in ${dir}/modules.dep`);
    order(file, files);
    const own: string[] = [];
    order(file, own);
    lists[moduleKey(stem(file))] = own.map(stem);
  }
  return { files: files.map((f) => `${dir}/${f}`), lists };
}

/** The bytes of a module file, decompressed (Debian ships plain .ko; others use xz or zstd). */
function moduleBytes(file: string): Uint8Array {
  if (file.endsWith(".ko")) return readFileSync(file);
  if (file.endsWith(".ko.gz")) return gunzipSync(readFileSync(file));
  const cmd = file.endsWith(".ko.xz") ? ["xz", "-dc", file] : ["zstd", "-dc", file];
  const r = Bun.spawnSync(cmd, { stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")}: exit ${r.exitCode}: ${r.stderr.toString().trim()}`);
  return r.stdout;
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
 * entered through PVH; returns false (the caller boots the bzImage) when it
 * cannot. The payload's place is in the setup header (boot protocol 2.08+:
 * payload_offset at 0x248, payload_length at 0x24c, from the protected-mode
 * code, which starts after (setup_sects + 1) * 512 bytes).
 */
function extractVmlinux(kernel: string, kver: string, out: string): boolean {
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
  // The kernel appends the decompressed size after the stream: xz stops at the stream's end,
  // gzip warns about "trailing garbage" and exits 2; either is fine as long as the ELF is whole.
  Bun.spawnSync(kind.cmd, { stdin: payload, stdout: Bun.file(tmp), stderr: "ignore" });
  const head = existsSync(tmp) ? readFileSync(tmp).subarray(0, 64) : new Uint8Array(0);
  if (head.length < 64 || Buffer.from(head).readUInt32BE(0) !== 0x7f454c46) {
    rmSync(tmp, { force: true });
    return false;
  }
  renameSync(tmp, out);
  return true;
}

function stampFor(kver: string, kernel: string): string {
  const st = (p: string) => {
    const s = statSync(p);
    return `${p}:${s.size}:${s.mtimeMs}`;
  };
  return createHash("sha256")
    .update(["v2", kver, st(kernel), st(`/lib/modules/${kver}/modules.dep`), st(BUSYBOX), INIT, GUEST_MODULES.join(",")].join("\n"))
    .digest("hex");
}

/**
 * Returns the kernel, the cached initramfs and its modules, building the
 * initramfs first when it is missing or stale.
 * @param opts.force rebuild even when the cache is fresh
 * @param opts.cacheDir where to keep the image (default `guestCacheDir()`)
 * @example
 * const img = await guestImage();
 * img.modules.virtio_rng; // ["virtio_ring", "virtio", "virtio-rng"]
 */
export async function guestImage(opts: { force?: boolean; cacheDir?: string } = {}): Promise<GuestImage> {
  const skip = guestImageSkipReason();
  if (skip) throw new Error(skip);
  const dir = opts.cacheDir ?? guestCacheDir();
  const { kver, kernel } = pickKernel();
  const initrd = join(dir, "initrd.gz");
  const meta = join(dir, "image.json");
  const stamp = stampFor(kver, kernel);
  if (!opts.force && existsSync(initrd) && existsSync(meta)) {
    try {
      const m = JSON.parse(readFileSync(meta, "utf8")) as { stamp: string; kernel: string; modules: Record<string, string[]> };
      if (m.stamp === stamp && existsSync(m.kernel)) return { kernel: m.kernel, initrd, modules: m.modules };
    } catch {
      // unreadable: rebuild
    }
  }

  mkdirSync(dir, { recursive: true });
  const { files, lists } = resolveModules(kver);
  const entries: CpioEntry[] = [
    { name: "bin", dir: true },
    { name: "bin/busybox", data: readFileSync(BUSYBOX) },
    { name: "lib", dir: true },
    { name: "lib/modules", dir: true },
    ...files.map((f) => ({ name: `lib/modules/${stem(f)}.ko`, data: moduleBytes(f), mode: 0o644 })),
    { name: "lib/modules/load", data: loadList(DEFAULT_MODULES, lists).join("\n") + "\n", mode: 0o644 },
    { name: "init", data: INIT },
  ];
  const tmp = `${initrd}.${process.pid}`;
  writeFileSync(tmp, padTo4(gzipSync(cpioNewc(entries), { level: 1 })));
  renameSync(tmp, initrd);
  const vmlinux = join(dir, "vmlinux");
  const boot = extractVmlinux(kernel, kver, vmlinux) ? vmlinux : kernel;
  const metaTmp = `${meta}.${process.pid}`;
  writeFileSync(metaTmp, JSON.stringify({ stamp, kernel: boot, modules: lists }, null, 1));
  renameSync(metaTmp, meta);
  process.stderr.write(`guest image: ${initrd} (${statSync(initrd).size} bytes; kernel ${kver}, booting ${boot}; modules ${files.map(stem).join(" ")})\n`);
  return { kernel: boot, initrd, modules: lists };
}

/**
 * The files to insmod for `names` (module names; "-" and "_" alike), each
 * module's dependencies first, every file once. Throws naming the modules
 * the image has when one is missing.
 * @example loadList(["virtio_pci", "virtio_rng"], img.modules) // [..., "virtio_pci", "virtio-rng"]
 */
export function loadList(names: readonly string[], modules: Record<string, string[]>): string[] {
  const out: string[] = [];
  for (const n of names) {
    const list = modules[moduleKey(n)];
    if (!list) throw new Error(`module ${n} is not in the guest image (it has ${Object.keys(modules).join(", ")})`);
    for (const f of list) if (!out.includes(f)) out.push(f);
  }
  return out;
}

/** One member of a newc archive: a directory, or a file (mode 0755 unless given). */
export interface CpioEntry {
  name: string;
  dir?: boolean;
  data?: string | Uint8Array;
  mode?: number;
}

/** A newc cpio archive (the initramfs format: Documentation/driver-api/early-userspace/buffer-format.rst), with its trailer. */
export function cpioNewc(entries: readonly CpioEntry[]): Uint8Array {
  const parts: Uint8Array[] = [];
  const enc = new TextEncoder();
  const pad = (n: number) => new Uint8Array((4 - (n % 4)) % 4);
  let ino = 1;
  const put = (name: string, mode: number, data: Uint8Array) => {
    const hex = (v: number) => v.toString(16).padStart(8, "0");
    const nameBytes = enc.encode(name + "\0");
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = enc.encode("070701" + fields.map(hex).join(""));
    parts.push(header, nameBytes, pad(header.length + nameBytes.length), data, pad(data.length));
  };
  for (const e of entries) {
    if (e.dir) put(e.name, 0o040000 | (e.mode ?? 0o755), new Uint8Array(0));
    else put(e.name, 0o100000 | (e.mode ?? 0o755), typeof e.data === "string" ? enc.encode(e.data) : e.data ?? new Uint8Array(0));
  }
  put("TRAILER!!!", 0, new Uint8Array(0));
  return Buffer.concat(parts);
}

/** The kernel looks for a following archive only at 4-byte aligned offsets. */
function padTo4(b: Uint8Array): Uint8Array {
  return b.length % 4 ? Buffer.concat([b, new Uint8Array(4 - (b.length % 4))]) : b;
}

/**
 * Writes `out`: the cached initramfs followed by a gzipped archive holding
 * /test.sh (which /init runs instead of reading the console) and, when
 * `load` is given, /load (the module files /init loads, in order).
 */
export function withTestScript(base: string, script: string, out: string, load?: readonly string[]): string {
  const entries: CpioEntry[] = [{ name: "test.sh", data: script }];
  if (load) entries.push({ name: "load", data: load.join("\n") + "\n", mode: 0o644 });
  writeFileSync(out, Buffer.concat([readFileSync(base), gzipSync(cpioNewc(entries), { level: 1 })]));
  return out;
}

/**
 * virtio-fs against virtiofsd: one Linux guest workload run twice, once on
 * QEMU's C virtiofsd (`-o cache=none`) and once on `server.ts fs
 * --shared-dir --cache never`, each on a fresh host directory with the same
 * initial content; then every RESULT line the guest printed is compared one
 * by one (bar the IGNORED keys) and so are the two host trees afterwards.
 * virtiofsd is the reference: a difference is reported with both values.
 *
 * The workload: files written and read back with md5, 300 files in a
 * directory, rename (plain, replacing, into itself), hard link, symlink
 * (relative, dangling, to a directory, planted to outside), chmod, chown,
 * setuid bits across chown, a setgid directory, umask, truncate, append, a
 * sparse file, fallocate, a write in the middle, rmdir of a non-empty
 * directory, rm -r, mkfifo, mknod, an open file unlinked and read, names of
 * 255 and 256 bytes, error messages of failing calls, touch -d, inode
 * numbers (hard links, stability), writes over 1 MiB, O_DIRECT reads and
 * writes (aligned and not), an unprivileged guest user (uid 1000 through
 * `su`) creating and changing files in a sticky directory, statfs, umount;
 * `stat -c '%s %h %a %F %u %g %o'` of every file it touches.
 *
 * Both back-ends run as root (virtiofsd needs it for its sandbox, chown and
 * mknod). FS_DIFF=1 prints both runs' RESULT lines and host trees.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import {
  chmodSync, closeSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync,
  symlinkSync, writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { runGuest, type GuestOutput } from "../../src/testing/guest.ts";
import { guestTestSkipReason, serveDevice, type ServedDevice } from "../support/guest.ts";

const VIRTIOFSD = "/usr/lib/qemu/virtiofsd";
const skip = existsSync(VIRTIOFSD) ? guestTestSkipReason() : `no ${VIRTIOFSD}`;
const FS_DEVICE = { type: 26, queues: 2, configSize: 40 } as const;

/**
 * RESULT keys left out of the comparison, with why:
 * - BOOTED: seconds since the guest's boot;
 * - t_*: timings of workload phases;
 * - ino_*: inode numbers (two host directories, two sets of numbers; what is compared is
 *   whether they agree: hard_same_inode, stable_inode);
 * - statfs_size: block and inode counts of the host file system, which the first run changed.
 */
const IGNORED = [/^BOOTED$/, /^t_/, /^ino_/, /^statfs_size$/];
/**
 * Intended differences, checked for what they are: bunvhost refuses device nodes in a shared
 * directory (MKNOD of a character or block device: EPERM), so a guest cannot plant a device
 * node on the host; virtiofsd creates them. The workload's `mknod /mnt/null c 1 3` and what
 * follows from it (stat, the write that then makes a plain file) differ by design.
 */
const INTENDED = [/^mknod$/, /^st_null$/, /^null_dev$/];

/** `r KEY CMD...` reports CMD's exit status and its output (stderr too) on one line; `st NAME` stats /mnt/NAME. */
const SCRIPT = String.raw`
r() { k=$1; shift; o=$("$@" 2>&1); s=$?; result "$k" $s $(echo "$o" | tr '\n' ' '); }
st() { result "st_$1" $(stat -c '%s %h %a %F %u %g %o' "/mnt/$1" 2>&1); }
long() { head -c $1 /dev/zero | tr '\0' n; }
mkdir -p /mnt
mount -t virtiofs bunvhost /mnt || fail "mount: $?"
result mounted $(grep -c ' /mnt virtiofs ' /proc/mounts)
result initial $(cd /mnt && find . | sort | tr '\n' ' ')
for f in host.bin sub sub/x.txt sub/deep link ro.txt exec.sh out; do st $f; done
result hostmd5 $(md5sum < /mnt/host.bin | cut -d' ' -f1)
result link $(readlink /mnt/link) $(cat /mnt/link)
result outlink $(readlink /mnt/out)
r cat_out cat /mnt/out/secret.txt
r ls_sub ls -a /mnt/sub

seq 1 100000 > /tmp/a
cp /tmp/a /mnt/a || fail cp
sync; echo 3 > /proc/sys/vm/drop_caches
result md5 $(md5sum < /tmp/a | cut -d' ' -f1) $(md5sum < /mnt/a | cut -d' ' -f1)
st a
mkdir /mnt/d || fail mkdir
t0=$(now); i=0; while [ $i -lt 300 ]; do echo $i > /mnt/d/f$i; i=$((i+1)); done; result t_300 $t0 $(now)
result count $(ls /mnt/d | wc -l)
result f299 $(cat /mnt/d/f299)
st d; st d/f7
mv /mnt/a /mnt/b || fail mv
result renamed $(ls /mnt | tr '\n' ' ')
ln /mnt/b /mnt/hard || fail ln
st b; st hard
result ino_b $(stat -c %i /mnt/b) $(stat -c %i /mnt/hard)
result hard_same_inode $([ $(stat -c %i /mnt/b) = $(stat -c %i /mnt/hard) ] && echo yes || echo no)
ln -s b /mnt/sym || fail "ln -s"
result symlink $(readlink /mnt/sym) $(md5sum < /mnt/sym | cut -d' ' -f1)
st sym
chmod 600 /mnt/b; st b
truncate -s 10 /mnt/b; st hard
echo tail >> /mnt/b; result appended $(stat -c %s /mnt/b) $(tail -c 5 /mnt/b)
dd if=/dev/zero of=/mnt/sparse bs=1 count=1 seek=10485759 2>/dev/null; st sparse
result sparse_blocks $(stat -c %b /mnt/sparse)
r rmdir_nonempty rmdir /mnt/d
st d
r rm_r rm -r /mnt/d
result gone $(ls /mnt | tr '\n' ' ')
mkfifo /mnt/fifo; st fifo
touch -d '2001-02-03 04:05:06' /mnt/b; result mtime $(stat -c %Y /mnt/b)
touch -d '2002-03-04 05:06:07' /mnt/sub; result mtime_dir $(stat -c %Y /mnt/sub)

r mkdir_exists mkdir /mnt/sub
r cat_missing cat /mnt/nope
r rm_missing rm /mnt/nope
r unlink_dir unlink /mnt/sub
r rmdir_file rmdir /mnt/b
r mkdir_under_file mkdir /mnt/b/x
r link_exists link /mnt/b /mnt/hard
r link_dir link /mnt/sub /mnt/subl
r readlink_file readlink /mnt/b
r rename_into_self mv /mnt/sub /mnt/sub/deep/
mkdir /mnt/e /mnt/e2; : > /mnt/e2/x
r rename_over_nonempty mv -T /mnt/e /mnt/e2
r rename_dir_over_file mv -T /mnt/e /mnt/b
r rename_file_over_dir mv -T /mnt/b /mnt/e
echo one > /mnt/r1; echo two > /mnt/r2; mv /mnt/r1 /mnt/r2
result rename_replace $(cat /mnt/r2) $(ls /mnt | grep -c '^r1$')
st r2
mv /mnt/sub/y.txt /mnt/y2.txt; result moved $(cat /mnt/y2.txt) $(ls /mnt/sub | tr '\n' ' ')
ln -s sub /mnt/sl; result sl $(ls /mnt/sl | tr '\n' ' ')
ln -s nowhere /mnt/dang; st dang
r cat_dang cat /mnt/dang

r chown chown 1000:1000 /mnt/exec.sh; st exec.sh
chmod 6755 /mnt/exec.sh; st exec.sh
r chown_suid chown 1001:1001 /mnt/exec.sh; st exec.sh
chmod 4755 /mnt/exec.sh; echo 'echo more' >> /mnt/exec.sh; st exec.sh
r chgrp chgrp 1002 /mnt/ro.txt; st ro.txt
r write_ro sh -c 'echo w >> /mnt/ro.txt'; st ro.txt
mkdir /mnt/g; chown 0:1000 /mnt/g; chmod 2775 /mnt/g; mkdir /mnt/g/sub; : > /mnt/g/file
st g; st g/sub; st g/file
(umask 027; mkdir /mnt/m027; : > /mnt/f027; mkfifo /mnt/p027); st m027; st f027; st p027
(umask 0; mkdir /mnt/m000; : > /mnt/f000); st m000; st f000
r mknod mknod /mnt/null c 1 3; st null
result null_dev $(stat -c '%t %T' /mnt/null) $(echo hi > /mnt/null; cat /mnt/null | wc -c)
exec 3< /mnt/sub/x.txt; rm /mnt/sub/x.txt; result unlinked_read $(cat <&3) $(ls /mnt/sub | tr '\n' ' '); exec 3<&-
printf XY | dd of=/mnt/host.bin bs=1 seek=100 conv=notrunc 2>/dev/null
result hostmd5_after $(md5sum < /mnt/host.bin | cut -d' ' -f1); st host.bin
r fallocate fallocate -l 1048576 /mnt/fa; st fa
r fallocate_off fallocate -o 2097152 -l 4096 /mnt/fa; st fa
r name255 touch /mnt/$(long 255)
r name255_rm rm /mnt/$(long 255)
r name256 touch /mnt/$(long 256)
r touch_new touch /mnt/new; st new
truncate -s 5000 /mnt/new; st new; result new_zeros $(tr -d '\0' < /mnt/new | wc -c)
r truncate_dir truncate -s 0 /mnt/sub
r write_dir sh -c 'echo x > /mnt/sub'
r open_dir_trailing cat /mnt/b/
result stable_inode $([ $(stat -c %i /mnt/host.bin) = $(stat -c %i /mnt/host.bin) ] && echo yes || echo no)
dd if=/tmp/a of=/mnt/big bs=4M conv=fsync 2>/dev/null; cat /tmp/a >> /mnt/big
result big $(stat -c %s /mnt/big) $(md5sum < /mnt/big | cut -d' ' -f1)
r direct_read dd if=/mnt/host.bin of=/tmp/dr bs=4096 count=2 skip=1 iflag=direct
result direct_read_md5 $(md5sum < /tmp/dr | cut -d' ' -f1)
r direct_read_unaligned dd if=/mnt/host.bin of=/tmp/du bs=1000 count=3 skip=1 iflag=direct
result direct_read_unaligned_md5 $(md5sum < /tmp/du | cut -d' ' -f1)
r direct_write_unaligned dd if=/tmp/a of=/mnt/dio bs=1000 count=3 oflag=direct
st dio

mkdir -p /etc; printf 'root:x:0:0::/:/bin/sh\nu:x:1000:1000::/tmp:/bin/sh\n' > /etc/passwd; printf 'root:x:0:\nu:x:1000:\n' > /etc/group
mkdir /mnt/u; chmod 1777 /mnt/u; : > /mnt/u/rootfile
r as_user su u -c 'echo hi > /mnt/u/f; mkdir /mnt/u/dd; ln -s f /mnt/u/sl; mkfifo /mnt/u/p; ln /mnt/u/f /mnt/u/hl'
st u/f; st u/dd; st u/sl; st u/p
r user_chmod su u -c 'chmod 640 /mnt/u/f'; st u/f
r user_touch_d su u -c "touch -d '2003-01-01 00:00:00' /mnt/u/f"; result user_mtime $(stat -c %Y /mnt/u/f)
r user_truncate su u -c 'truncate -s 1 /mnt/u/f'; st u/f
r user_denied su u -c 'echo x > /mnt/denied'
r user_write_ro su u -c 'echo x >> /mnt/ro.txt'
r user_rm_sticky su u -c 'rm -f /mnt/u/rootfile'
r user_rename_own su u -c 'mv /mnt/u/f /mnt/u/f2'
r ls_u ls -a /mnt/u
r ls_root ls -a /mnt
result final $(cd /mnt && find . | sort | tr '\n' ' ')
result statfs $(stat -f -c '%t %S %l' /mnt)
result statfs_size $(stat -f -c '%b %f %a %c %d' /mnt)
umount /mnt || fail umount
result unmounted $(grep -c ' /mnt ' /proc/mounts)
`;

const hostFile = new Uint8Array(300 * 1024).map((_, i) => (i * 7) & 0xff);

/** A fresh directory with `shared/` (what is served) and `outside/` (what must stay out of reach). */
function populate(): string {
  const root = mkdtempSync("/tmp/bvh-fsvd-");
  const s = join(root, "shared");
  mkdirSync(s);
  mkdirSync(join(root, "outside"));
  writeFileSync(join(root, "outside/secret.txt"), "secret\n");
  writeFileSync(join(s, "host.bin"), hostFile);
  mkdirSync(join(s, "sub/deep"), { recursive: true });
  writeFileSync(join(s, "sub/x.txt"), "x\n");
  writeFileSync(join(s, "sub/y.txt"), "y\n");
  writeFileSync(join(s, "ro.txt"), "read only\n");
  chmodSync(join(s, "ro.txt"), 0o444);
  writeFileSync(join(s, "exec.sh"), "#!/bin/sh\necho hi\n");
  chmodSync(join(s, "exec.sh"), 0o755);
  symlinkSync("sub/x.txt", join(s, "link"));
  symlinkSync("../outside", join(s, "out"));
  return root;
}

const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex");

/**
 * One line per entry under `dir`, sorted by path: type, mode, owner, link
 * count, and by type the size and md5 (files), target (symlinks) or device
 * number (devices). Directory sizes are left out: they depend on how the
 * host file system grew the directory, not on the back-end.
 */
function hostTree(dir: string): string[] {
  const out: string[] = [];
  const walk = (rel: string) => {
    for (const name of readdirSync(join(dir, rel)).sort()) {
      const p = rel ? `${rel}/${name}` : name;
      const full = join(dir, p);
      const s = lstatSync(full);
      const type = s.isFile() ? "file" : s.isDirectory() ? "dir" : s.isSymbolicLink() ? "symlink" : s.isFIFO() ? "fifo"
        : s.isCharacterDevice() ? "char" : s.isBlockDevice() ? "block" : s.isSocket() ? "socket" : "unknown";
      let line = `${p.length > 60 ? `${p.slice(0, 20)}…(${p.length} bytes)` : p} ${type} mode=${(s.mode & 0o7777).toString(8)} uid=${s.uid} gid=${s.gid} nlink=${s.nlink}`;
      if (type === "file") line += ` size=${s.size} blocks=${s.blocks} md5=${md5(readFileSync(full))}`;
      else if (type === "symlink") line += ` -> ${readlinkSync(full)}`;
      else if (type === "char" || type === "block") line += ` rdev=${s.rdev}`;
      out.push(line);
      if (type === "dir") walk(p);
    }
  };
  walk("");
  return out;
}

/**
 * Differences between two lists of "key value" lines, matched by key (the
 * n-th line with a key against the other's n-th), as
 * "key: virtiofsd VALUE | bunvhost VALUE"; "(none)" where one side lacks it.
 */
function diffKeyed(ref: string[], ours: string[]): string[] {
  const index = (lines: string[]) => {
    const m = new Map<string, string>();
    const seen = new Map<string, number>();
    for (const l of lines) {
      const sp = l.indexOf(" ");
      const k = sp < 0 ? l : l.slice(0, sp);
      const n = (seen.get(k) ?? 0) + 1;
      seen.set(k, n);
      m.set(n > 1 ? `${k} (#${n})` : k, sp < 0 ? "" : l.slice(sp + 1));
    }
    return m;
  };
  const a = index(ref), b = index(ours);
  const show = (v: string | undefined) => (v === undefined ? "(none)" : JSON.stringify(v));
  const d: string[] = [];
  for (const [k, v] of a) if (b.get(k) !== v) d.push(`${k}: virtiofsd ${show(v)} | bunvhost ${show(b.get(k))}`);
  for (const [k, v] of b) if (!a.has(k)) d.push(`${k}: virtiofsd (none) | bunvhost ${show(v)}`);
  return d;
}

interface Run {
  root: string;
  out: GuestOutput;
  log: () => string;
}

/**
 * Starts virtiofsd serving `root/shared` on a socket in a scratch directory
 * of its own (removed by stop()); it exits when QEMU disconnects.
 */
async function startVirtiofsd(root: string): Promise<{ socket: string; log: () => string; stop(): Promise<void> }> {
  const dir = mkdtempSync("/tmp/bvh-virtiofsd-");
  const socket = join(dir, "virtiofsd.sock");
  const logPath = join(dir, "virtiofsd.log");
  const fd = openSync(logPath, "w");
  const argv = [VIRTIOFSD, `--socket-path=${socket}`, "-o", `source=${join(root, "shared")}`, "-o", "cache=none"];
  let proc: ReturnType<typeof Bun.spawn>;
  try {
    proc = Bun.spawn(argv, { stdin: "ignore", stdout: fd, stderr: fd });
  } finally {
    closeSync(fd);
  }
  let last = "";
  const log = () => (existsSync(logPath) ? (last = readFileSync(logPath, "utf8")) : last);
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      proc.kill("SIGKILL");
      await proc.exited;
      const text = log();
      rmSync(dir, { recursive: true, force: true });
      throw new Error(`${argv.join(" ")}: did not create its socket\n${text}`);
    }
    await Bun.sleep(20);
  }
  return {
    socket, log,
    async stop() {
      // It exits by itself once QEMU has gone; give it a moment, then TERM and KILL.
      const t1 = setTimeout(() => proc.kill("SIGTERM"), 2000);
      const t2 = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await proc.exited;
      clearTimeout(t1);
      clearTimeout(t2);
      log();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function runVirtiofsd(): Promise<Run> {
  const root = populate();
  const d = await startVirtiofsd(root);
  try {
    const out = await runGuest({ socket: d.socket, device: FS_DEVICE, script: SCRIPT, timeoutMs: 60_000 });
    return { root, out, log: d.log };
  } catch (e) {
    throw new Error(`virtiofsd run: ${(e as Error).message}\n--- virtiofsd:\n${d.log()}`);
  } finally {
    await d.stop();
  }
}

async function runOurs(): Promise<Run> {
  const root = populate();
  let server: ServedDevice | undefined;
  try {
    server = await serveDevice("fs", ["--shared-dir", join(root, "shared"), "--cache", "never"]);
    const out = await runGuest({ socket: server.socket, device: FS_DEVICE, script: SCRIPT, timeoutMs: 60_000 });
    const text = server.output();
    return { root, out, log: () => text };
  } catch (e) {
    throw new Error(`bunvhost run: ${(e as Error).message}\n--- server:\n${server?.output() ?? ""}`);
  } finally {
    await server?.stop();
  }
}

const compared = (out: GuestOutput) =>
  out.lines.filter((r) => !IGNORED.some((re) => re.test(r.key)) && !INTENDED.some((re) => re.test(r.key))).map((r) => `${r.key} ${r.value}`);

describe.skipIf(skip !== null)(`virtio-fs: bunvhost --shared-dir against virtiofsd${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let ref: Run | undefined;
  let ours: Run | undefined;

  beforeAll(async () => {
    ref = await runVirtiofsd();
    ours = await runOurs();
    if (process.env.FS_DIFF === "1") {
      for (const [n, r] of [["virtiofsd", ref], ["bunvhost", ours]] as const) {
        console.log(`--- ${n} (${r.out.seconds.toFixed(1)} s)\n${r.out.lines.map((l) => `${l.key} ${l.value}`).join("\n")}\n--- ${n} host tree\n${hostTree(r.root).join("\n")}`);
      }
    }
  }, 180_000);
  afterAll(() => {
    for (const r of [ref, ours]) if (r) rmSync(r.root, { recursive: true, force: true });
  });

  test("virtiofsd runs the workload: data round-trips, the non-empty rmdir is refused, umount", () => {
    const res = ref!.out.results;
    const [a, b] = res.get("md5")!.split(" ");
    expect(b).toBe(a!);
    expect(res.get("hostmd5")).toBe(md5(hostFile));
    expect(res.get("count")).toBe("300");
    expect(res.get("rmdir_nonempty")).toMatch(/^1 .*Directory not empty/);
    expect(res.get("unmounted")).toBe("0");
  });

  test("every RESULT line is the same as virtiofsd's (bar IGNORED)", () => {
    expect(diffKeyed(compared(ref!.out), compared(ours!.out))).toEqual([]);
  });

  test("the two host directories end up the same (names, types, sizes, modes, owners, link targets, contents)", () => {
    const noDevice = (t: ReturnType<typeof hostTree>) => t.filter((l) => !l.startsWith("shared/null "));
    expect(diffKeyed(noDevice(hostTree(ref!.root)), noDevice(hostTree(ours!.root)))).toEqual([]);
  });

  test("intended: a device node is refused (EPERM) where virtiofsd makes one", () => {
    expect(ref!.out.lines.find((r) => r.key === "mknod")?.value).toBe("0");
    expect(ours!.out.lines.find((r) => r.key === "mknod")?.value).toMatch(/^1 .*Operation not permitted/);
  });

  test("the server logged no error", () => {
    expect(ours!.log()).not.toMatch(/bunvhost(\[\w+\])?: error|broken/);
  });
});

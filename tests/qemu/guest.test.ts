/**
 * A real Linux guest (Debian kernel, busybox initramfs from
 * scripts/guest_image.ts) under QEMU TCG, with its disk served over
 * vhost-user by each back-end: bunvhost and qemu-storage-daemon.
 *
 * Two boots per back-end keep the file short (a boot costs ~5 s):
 * - "disk I/O": 2 vCPUs and 2 queues; size, queue count, a sequential
 *   O_DIRECT round trip, parallel writers on both CPUs, the last block, and
 *   an ext2 filesystem, each a test reading that boot's RESULT lines. The
 *   image is a file on /dev/shm, so the host checks the guest's writes too.
 * - "restart": the back-end is SIGKILLed while the guest writes and reads,
 *   and started again on the same image; QEMU (chardev reconnect=1) rewinds
 *   the split ring and resubmits, and every write and read must verify.
 *
 * Image layout of the disk I/O boot (64 MiB):
 *   0–16 MiB ext2 · 16–24 MiB sequential · 32–48 MiB four parallel regions ·
 *   last 4 KiB block. /tmp/pat in the guest is 16 MiB of /dev/urandom; each
 *   region holds a different slice of it.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { closeSync, openSync, readSync, renameSync, rmSync, symlinkSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { backendKinds, scratchDir, type Backend, type BackendKind } from "../support/backends.ts";
import { Guest, guestTestSkipReason, md5Range } from "../support/guest.ts";

const MiB = 1024 * 1024;
const DISK = 64 * MiB;
/** A guest's own deadline (boot to END is ~6 s here); shorter than the test's, so our finally blocks clean up. */
const GUEST_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 180_000;


function makeImage(path: string, size: number): string {
  closeSync(openSync(path, "w"));
  truncateSync(path, size);
  return path;
}

/** Memoizes an async function: every caller shares the first call's promise. */
function once<T>(fn: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | null = null;
  return () => (p ??= fn());
}

const DISK_IO_SCRIPT = String.raw`
MiB=1048576
md5() { md5sum | cut -d' ' -f1; }
slice() { dd if=/tmp/pat bs=1M skip=$1 count=$2 2>/dev/null | md5; }
readv() { dd if=/dev/vda bs=$1 skip=$2 count=$3 iflag=direct 2>/dev/null | md5; }

result size $(cat /sys/block/vda/size)
result mq $(ls /sys/block/vda/mq | wc -l)
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = 0x0002 ] && result features $(cat $d/features)
done
dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null

# sequential: pattern 0-8 MiB to disk 16-24 MiB, read back direct and buffered
t=$(now)
dd if=/tmp/pat of=/dev/vda bs=1M count=8 seek=16 oflag=direct 2>/tmp/err || fail "seq write: $(cat /tmp/err)"
result seq_want $(slice 0 8)
result seq_direct $(readv 1M 16 8)
sync; echo 3 > /proc/sys/vm/drop_caches
result seq_buffered $(dd if=/dev/vda bs=64k skip=256 count=128 2>/dev/null | md5)
result seq_seconds $t $(now)

# parallel: four writers, alternating CPUs, block sizes 4k..1M; pattern 8+2i MiB to disk 32+4i MiB
t=$(now)
i=0
for bs in 4096 16384 131072 1048576; do
  taskset $((1 << (i % 2))) dd if=/tmp/pat of=/dev/vda bs=$bs skip=$(((8 + 2 * i) * MiB / bs)) \
    seek=$(((32 + 4 * i) * MiB / bs)) count=$((2 * MiB / bs)) oflag=direct 2>/tmp/err$i || fail "writer $i: $(cat /tmp/err$i)" &
  i=$((i + 1))
done
wait
for i in 0 1 2 3; do
  taskset $((1 << (i % 2))) sh -c "dd if=/dev/vda bs=65536 skip=$(((32 + 4 * i) * 16)) count=32 iflag=direct 2>/dev/null | md5sum > /tmp/par$i" &
done
wait
for i in 0 1 2 3; do
  result par$i $(slice $((8 + 2 * i)) 2) $(cut -d' ' -f1 /tmp/par$i)
done
result par_seconds $t $(now)

# the last 4 KiB block of the disk
last=$(($(cat /sys/block/vda/size) / 8 - 1))
dd if=/tmp/pat of=/dev/vda bs=4096 skip=5 seek=$last count=1 oflag=direct 2>/tmp/err || fail "last block: $(cat /tmp/err)"
result last $(dd if=/tmp/pat bs=4096 skip=5 count=1 2>/dev/null | md5) $(readv 4096 $last 1)

# ext2 in the first 16 MiB: a 4 MiB file and a directory survive umount, drop_caches and mount
t=$(now)
mke2fs -q -b 1024 /dev/vda 16384 > /tmp/err 2>&1 || fail "mke2fs: $(cat /tmp/err)"
mount -t ext2 /dev/vda /mnt 2>/tmp/err || fail "mount: $(cat /tmp/err)"
dd if=/tmp/pat of=/mnt/file bs=1M skip=4 count=4 2>/dev/null
mkdir -p /mnt/d/e && echo hello > /mnt/d/e/h
umount /mnt || fail "umount"
sync; echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/vda /mnt 2>/tmp/err || fail "remount: $(cat /tmp/err)"
result fs $(slice 4 4) $(md5 < /mnt/file) $(cat /mnt/d/e/h) $(df -k /mnt | tail -1 | awk '{print $2}')
umount /mnt
result fs_seconds $t $(now)
`;

/**
 * The restart boot. Region W (0–24 MiB, 24 slots of 1 MiB) is written one
 * slot per writer pass, each slot once, so a write lost across the restart
 * cannot be hidden by a later one; region R (48–52 MiB) is written first and
 * then read back 1 MiB at a time, over and over, each read checked. The test
 * kills the back-end during the third writer pass, restarts it, waits for
 * three more passes of each loop and then sends a line to stop them.
 */
const RESTART_SCRIPT = String.raw`
md5() { md5sum | cut -d' ' -f1; }
dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M skip=12 count=4 seek=48 oflag=direct 2>/dev/null || fail "region R write"
for i in 0 1 2 3; do dd if=/tmp/pat bs=1M skip=$((12 + i)) count=1 2>/dev/null | md5 > /tmp/r$i; done
writer() {
  n=0
  while [ ! -f /tmp/stop ] && [ $n -lt 24 ]; do
    dd if=/tmp/pat of=/dev/vda bs=64k skip=$((n % 12 * 16)) seek=$((n * 16)) count=16 oflag=direct 2>/tmp/werr \
      || { fail "writer pass $n: $(cat /tmp/werr)"; break; }
    n=$((n + 1))
    result wpass $n $(now)
  done
  echo $n > /tmp/wn
}
reader() {
  n=0
  while [ ! -f /tmp/stop ]; do
    m=$(dd if=/dev/vda bs=64k skip=$((768 + n % 4 * 16)) count=16 iflag=direct 2>/tmp/rerr | md5)
    [ "$m" = "$(cat /tmp/r$((n % 4)))" ] || { fail "reader pass $n: $m: $(cat /tmp/rerr)"; break; }
    n=$((n + 1))
    result rpass $n $(now)
  done
  echo $n > /tmp/rn
}
writer &
reader &
result LOADED $(now)
read -r line
touch /tmp/stop
wait
n=$(cat /tmp/wn)
bad=0
i=0
while [ $i -lt $n ]; do
  w=$(dd if=/tmp/pat bs=64k skip=$((i % 12 * 16)) count=16 2>/dev/null | md5)
  g=$(dd if=/dev/vda bs=64k skip=$((i * 16)) count=16 iflag=direct 2>/dev/null | md5)
  [ "$w" = "$g" ] || { fail "slot $i: read $g, wrote $w"; bad=$((bad + 1)); }
  i=$((i + 1))
done
result verified $n $bad $(cat /tmp/rn)
`;

const skip = guestTestSkipReason();
const timings: string[] = [];

describe.skipIf(skip !== null)(`Linux guest over vhost-user-blk${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  afterAll(() => {
    if (timings.length) console.log(`guest.test.ts timings:\n  ${timings.join("\n  ")}`);
  });

  for (const kind of backendKinds) {
    const kindSkip = kind.skipReason();
    describe.skipIf(kindSkip !== null)(`${kind.name}${kindSkip ? ` [skipped: ${kindSkip}]` : ""}`, () => {
      diskIoTests(kind);
      restartTest(kind);
    });
  }
});

function diskIoTests(kind: BackendKind): void {
  let image = "";
  let dir = "";
  const boot = once(async () => {
    dir = scratchDir("bunvhost-guest-");
    image = makeImage(join(dir, "disk.img"), DISK);
    const t0 = performance.now();
    // bunvhost: each of the two queues on its own I/O thread.
    const backend = await kind.start({ size: DISK, image, queues: 2, extraArgs: kind.name === "bunvhost" ? ["--threads", "2", "--aio", "uring"] : [] });
    let guest: Guest | null = null;
    try {
      // packed=on: bunvhost serves this boot on packed rings; qsd 7.2 does not offer
      // RING_PACKED, so QEMU masks it and qsd runs split rings (asserted below). The
      // restart boot stays on split rings, which QEMU 7.2 can rewind after a back-end dies.
      guest = await Guest.boot({ dir, smp: 2, blk: [{ socket: backend.socket, numQueues: 2, packed: true }], script: DISK_IO_SCRIPT });
      const r = await guest.finish(GUEST_TIMEOUT_MS).catch((e: Error) => {
        throw new Error(`${e.message}\n--- ${kind.name} stderr:\n${backend.stderr()}`);
      });
      timings.push(`${kind.name} disk I/O boot: ${((performance.now() - t0) / 1000).toFixed(1)} s ` +
        `(booted ${r.get("BOOTED")} s guest time; seq ${span(r.get("seq_seconds"))}, parallel ${span(r.get("par_seconds"))}, ext2 ${span(r.get("fs_seconds"))})`);
      return { r };
    } finally {
      await guest?.stop();
      await backend.stop();
    }
  });
  afterAll(async () => {
    if (!dir) return; // no test of this group ran
    await boot().catch(() => null);
    rmSync(dir, { recursive: true, force: true });
  });

  const name = (s: string) => `${kind.name}: ${s}`;

  test(name("the guest sees a 64 MiB disk in /sys/block/vda/size"), async () => {
    const { r } = await boot();
    expect(r.get("size")).toBe(String(DISK / 512));
  }, TEST_TIMEOUT_MS);

  test(name("with -smp 2 and num-queues=2 the guest has 2 hardware queues"), async () => {
    const { r } = await boot();
    expect(r.get("mq")).toBe("2");
    expect(r.get("features")?.charAt(12)).toBe("1"); // VIRTIO_BLK_F_MQ (bit 12)
  }, TEST_TIMEOUT_MS);

  test(name(kind.name === "qsd" ? "packed=on falls back to split rings (qsd 7.2 does not offer RING_PACKED)" : "packed=on: the guest drives packed rings (feature bit 34)"), async () => {
    const { r } = await boot();
    expect(r.get("features")?.charAt(34)).toBe(kind.name === "qsd" ? "0" : "1");
  }, TEST_TIMEOUT_MS);

  test(name("8 MiB of random data written with O_DIRECT reads back the same (direct, buffered, and in the image)"), async () => {
    const { r } = await boot();
    const want = r.get("seq_want");
    expect(want).toMatch(/^[0-9a-f]{32}$/);
    expect(r.get("seq_direct")).toBe(want);
    expect(r.get("seq_buffered")).toBe(want);
    expect(md5Range(image, 16 * MiB, 8 * MiB)).toBe(want!);
  }, TEST_TIMEOUT_MS);

  test(name("four parallel writers on two CPUs (4 KiB to 1 MiB blocks) at different offsets all verify"), async () => {
    const { r } = await boot();
    for (let i = 0; i < 4; i++) {
      const [want, got] = (r.get(`par${i}`) ?? "").split(" ");
      expect(want).toMatch(/^[0-9a-f]{32}$/);
      expect(got).toBe(want);
      expect(md5Range(image, (32 + 4 * i) * MiB, 2 * MiB)).toBe(want!);
    }
  }, TEST_TIMEOUT_MS);

  test(name("the last 4 KiB block of the disk is written and read back"), async () => {
    const { r } = await boot();
    const [want, got] = (r.get("last") ?? "").split(" ");
    expect(want).toMatch(/^[0-9a-f]{32}$/);
    expect(got).toBe(want);
    expect(md5Range(image, DISK - 4096, 4096)).toBe(want!);
  }, TEST_TIMEOUT_MS);

  test(name("an ext2 filesystem (busybox mke2fs) keeps a 4 MiB file and a directory across umount and mount"), async () => {
    const { r } = await boot();
    const [want, got, hello, blocks] = (r.get("fs") ?? "").split(" ");
    expect(want).toMatch(/^[0-9a-f]{32}$/);
    expect(got).toBe(want);
    expect(hello).toBe("hello");
    expect(Number(blocks)).toBeGreaterThan(14000); // df: 1 KiB blocks of a 16384-block fs
  }, TEST_TIMEOUT_MS);
}

function restartTest(kind: BackendKind): void {
  test(`${kind.name}: the guest's writes and reads verify after the back-end is SIGKILLed mid-I/O and restarted (reconnect=1)`, async () => {
    const dir = scratchDir("bunvhost-guest-");
    const image = makeImage(join(dir, "disk.img"), DISK);
    // QEMU connects through a symlink we own, so a back-end on a new socket can take over.
    const link = join(dir, "vu.sock");
    const backends: Backend[] = [];
    let guest: Guest | null = null;
    const t0 = performance.now();
    const log = () => backends.map((b, i) => `--- ${kind.name} #${i + 1} stderr:\n${b.stderr()}`).join("\n");
    const passes = (g: Guest, key: string) => g.results().filter((x) => x.key === key);
    try {
      const first = await kind.start({ size: DISK, image, extraArgs: kind.name === "bunvhost" ? ["--aio", "uring"] : [] });
      backends.push(first);
      symlinkSync(first.socket, link);
      guest = await Guest.boot({ dir, blk: [{ socket: link, reconnect: 1 }], script: RESTART_SCRIPT });
      const g = guest;
      await g.waitResult("LOADED", GUEST_TIMEOUT_MS);
      await g.qemu.waitFor(/^RESULT: wpass 2 /m, 20_000);
      process.kill(first.pid, "SIGKILL");
      const wAtKill = passes(g, "wpass").length;
      const rAtKill = passes(g, "rpass").length;
      await Bun.sleep(500);
      // bunvhost: the same socket path (it replaces the stale socket file); qsd: a new socket, and the symlink moves.
      const second = await kind.start({
        size: DISK, image,
        extraArgs: kind.name === "bunvhost" ? ["--socket", first.socket, "--aio", "uring"] : [],
      });
      backends.push(second);
      if (kind.name !== "bunvhost") {
        symlinkSync(second.socket, `${link}.new`);
        renameSync(`${link}.new`, link);
      }
      // Both loops must make three more passes after the restart (the writer stops by itself at 24).
      const deadline = performance.now() + 30_000;
      while (!(passes(g, "wpass").length >= Math.min(wAtKill + 3, 24) && passes(g, "rpass").length >= rAtKill + 3)) {
        if (performance.now() > deadline) throw new Error(`guest I/O did not resume after the restart\n${g.describe()}\n${log()}`);
        g.check();
        await Bun.sleep(50);
      }
      g.send("go");
      const r = await g.finish(30_000).catch((e: Error) => {
        throw new Error(`${e.message}\n${log()}`);
      });
      const [written, bad, reads] = (r.get("verified") ?? "").split(" ").map(Number);
      expect(bad).toBe(0);
      expect(written).toBeGreaterThanOrEqual(Math.min(wAtKill + 3, 24));
      expect(reads).toBeGreaterThanOrEqual(rAtKill + 3);
      const times = passes(g, "wpass").map((x) => Number(x.value.split(" ")[1]));
      const stall = Math.max(...times.slice(1).map((t, i) => t - times[i]!));
      timings.push(`${kind.name} restart boot: ${((performance.now() - t0) / 1000).toFixed(1)} s ` +
        `(killed during writer pass ${wAtKill + 1}, longest writer pass ${stall.toFixed(2)} s; ${written} slots written, ${reads} reads verified)`);
    } finally {
      await guest?.stop();
      for (const b of [...backends].reverse()) await b.stop();
      if (process.env.GUEST_CONSOLE === "1") console.log(log());
      rmSync(dir, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);
}

function span(s: string | undefined): string {
  const [a, b] = (s ?? "").split(" ").map(Number);
  return a !== undefined && b !== undefined && !Number.isNaN(a + b) ? `${(b - a).toFixed(1)} s` : "?";
}

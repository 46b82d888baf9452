/**
 * Live migration of a Linux guest whose disk is a vhost-user-blk device,
 * between two QEMUs (TCG) on this machine, each with its own back-end
 * instance serving the same image file; once with bunvhost, once with
 * qemu-storage-daemon (the reference).
 *
 * What can go wrong is the back-end's dirty log (VHOST_F_LOG_ALL +
 * LOG_SHMFD): guest pages the device writes while RAM is being copied
 * must be copied again. Only data that stays in guest RAM and is looked at
 * after the switchover shows a missed page, so the guest keeps /dev/vda
 * open and reads region C through its page cache: each slice is read once,
 * by DMA into fresh page-cache pages during the migration, and re-read from
 * the cache on the destination at the end. (With bunvhost's DirtyLog.mark
 * made a no-op, about ten slices read during the migration come out
 * different there; the rest of the run passes.)
 *
 * Image layout (160 MiB, on /dev/shm):
 *   0–8 MiB    W: 128 slots of 64 KiB, starting as zeroes; the writer puts a
 *              pseudo-random 64 KiB chunk of the pattern into a
 *              pseudo-random slot with O_DIRECT, reads it back with O_DIRECT
 *              and checks it, over and over; /tmp/expect mirrors W.
 *   16–144 MiB C: 128 slices of 1 MiB, slice i = MiB (i mod 4) of a random
 *              4 MiB pattern, written by the host before the boot; the
 *              guest reads the pattern from the first 4 slices (O_DIRECT).
 *
 * The host starts the migration once both loops run and holds QEMU in
 * dirty-sync rounds (1 ms downtime-limit) for ROUNDS_MS after the first
 * pass over RAM. The bandwidth of the rounds is set low enough that each
 * lasts a good fraction of a second: with short rounds (at 32 MiB/s, a few
 * ms) a sync now and then finds no page dirtied since the last (the vCPU
 * thread did not run in between, on 2 busy host cores), and QEMU
 * converges by itself. After the switchover the loops go on on the destination; the host
 * then asks the guest, on the destination's console, to stop and check W
 * (O_DIRECT) and every slice of C it read (from the page cache, then
 * O_DIRECT), and compares W in the image with the guest's /tmp/expect.
 *
 * Guest RAM is 384 MiB + 8 KiB: QEMU 7.2 TCG loses guest-CPU writes after
 * a dirty sync when RAM is a multiple of 64 pages (see QemuOptions.memKiB),
 * which would be blamed on the back-end.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, openSync, readSync, rmSync, truncateSync, writeSync } from "node:fs";
import { join } from "node:path";
import { backendKinds, scratchDir, type Backend, type BackendKind } from "../support/backends.ts";
import { Guest, guestTestSkipReason, md5Range } from "../support/guest.ts";
import { Qmp } from "../support/qmp.ts";

const MiB = 1024 * 1024;
const DISK = 160 * MiB;
const W_BYTES = 8 * MiB;
const C_OFFSET = 16 * MiB;
const C_SLICES = 128;
const PATTERN = 4 * MiB;
const MEM_KIB = 384 * 1024 + 8;
/**
 * The migration is held (1 ms downtime-limit) until the first pass over RAM
 * is done (the second dirty sync), then for ROUNDS_MS more and SYNC_ROUNDS
 * syncs in all (or ROUNDS_MAX_MS, if the rounds stop ending); then it may
 * converge. The first pass sends 70–100 MiB of non-zero pages, about 3 s at
 * 32 MiB/s; the guest dirties 5–10 MiB/s, so a round at 16 MiB/s takes
 * 0.2–1 s.
 */
const SYNC_ROUNDS = 5;
const ROUNDS_MS = 2500;
const ROUNDS_MAX_MS = 10_000;
const FIRST_PASS = { "max-bandwidth": 32 * MiB, "downtime-limit": 1 };
const ROUNDS = { "max-bandwidth": 16 * MiB };
const CONVERGE = { "max-bandwidth": 1024 * MiB, "downtime-limit": 500 };
const MIGRATION_TIMEOUT_MS = 40_000;
/** Above the sum of the waits below, so that our finally block always runs. */
const TEST_TIMEOUT_MS = 180_000;

const SCRIPT = String.raw`
MiB=1048576
up() { read u r < /proc/uptime; echo $u; }
exec 3</dev/vda   # the page cache of /dev/vda lives while it is open
dd if=/dev/vda of=/tmp/pat bs=1M skip=16 count=4 iflag=direct 2>/tmp/err || fail "pattern: $(cat /tmp/err)"
truncate -s $((8 * MiB)) /tmp/expect
for k in 0 1 2 3; do
  dd if=/tmp/pat of=/tmp/s bs=1M skip=$k count=1 2>/dev/null
  set -- $(md5sum /tmp/s); echo $1 > /tmp/m$k
done
# Slice $1 of C, read with dd flags $2 (none: buffered), is MiB ($1 mod 4) of the pattern? (Files, not
# pipes: a pipe costs more than the checksum under TCG.)
slice_ok() {
  dd if=/dev/vda of=/tmp/slice bs=1M skip=$((16 + $1)) count=1 $2 2>/dev/null || return 1
  read want < /tmp/m$(($1 % 4))
  set -- $(md5sum /tmp/slice)
  [ "$1" = "$want" ]
}

writer() {
  n=0; bad=0; s=12345
  while [ ! -f /tmp/stop ]; do
    s=$(((s * 1103515245 + 12345) % 2147483648))
    slot=$((s / 256 % 128)); c=$((s / 65536 % 64))
    dd if=/tmp/pat of=/dev/vda bs=64k skip=$c seek=$slot count=1 oflag=direct 2>/tmp/werr \
      || { fail "write $n slot $slot: $(cat /tmp/werr)"; bad=$((bad + 1)); }
    dd if=/tmp/pat of=/tmp/expect bs=64k skip=$c seek=$slot count=1 conv=notrunc 2>/dev/null
    dd if=/dev/vda bs=64k skip=$slot count=1 iflag=direct 2>/dev/null | cmp -s -n 65536 - /tmp/pat 0 $((c * 65536)) \
      || { fail "read-back $n slot $slot chunk $c"; bad=$((bad + 1)); }
    n=$((n + 1))
    result wpass $n $(up)
  done
  echo $n $bad > /tmp/wdone
}

# Each slice of C once, buffered: readahead DMAs it into new page-cache pages, which stay. Paced, so
# that C lasts well past the migration (about 4 slices a second).
reader() {
  i=0; bad=0
  while [ ! -f /tmp/stop ]; do
    if [ $i -ge ${C_SLICES} ]; then usleep 100000; continue; fi
    slice_ok $i || { fail "reader slice $i"; bad=$((bad + 1)); }
    i=$((i + 1))
    result rpass $i $(up)
    usleep 150000
  done
  echo $i $bad > /tmp/rdone
}

writer &
reader &
result LOADED $(up)
read -r line
touch /tmp/stop
wait
read wn wbad < /tmp/wdone
read rn rbad < /tmp/rdone
result stopped $wn $wbad $rn $rbad $(up)

# W, O_DIRECT, against /tmp/expect; slot by slot only when they differ.
wdiff=0
dd if=/dev/vda of=/tmp/w bs=1M count=8 iflag=direct 2>/dev/null
if ! cmp -s /tmp/w /tmp/expect; then
  k=0
  while [ $k -lt 128 ]; do
    cmp -s -n 65536 /tmp/w /tmp/expect $((k * 65536)) $((k * 65536)) || { fail "W slot $k differs"; wdiff=$((wdiff + 1)); }
    k=$((k + 1))
  done
  [ $wdiff -gt 0 ] || { fail "W differs as a whole but in no slot"; wdiff=1; }
fi
result wsum $(md5sum < /tmp/expect | cut -d' ' -f1)

# The slices the reader read: from the page cache first (what the migration carried), then O_DIRECT.
cached=0; direct=0; i=0
while [ $i -lt $rn ]; do
  slice_ok $i || { fail "C slice $i: page cache differs"; cached=$((cached + 1)); }
  i=$((i + 1))
done
i=0
while [ $i -lt $rn ]; do
  slice_ok $i iflag=direct || { fail "C slice $i: disk differs"; direct=$((direct + 1)); }
  i=$((i + 1))
done
result verified $wn $((wbad + wdiff)) $rn $((rbad + cached + direct)) $(up)
exec 3<&-
`;

/** The image: zeroes, then C as slices of a random 4 MiB pattern. */
function makeImage(path: string): void {
  const pattern = randomBytes(PATTERN);
  const fd = openSync(path, "w");
  try {
    for (let i = 0; i < C_SLICES; i++) {
      const part = pattern.subarray((i % 4) * MiB, (i % 4 + 1) * MiB);
      writeSync(fd, part, 0, MiB, C_OFFSET + i * MiB);
    }
  } finally {
    closeSync(fd);
  }
  truncateSync(path, DISK);
}


interface MigrationStats {
  status: string;
  syncs: number;
  /** From `migrate` to the end of the first pass (the second sync), and to the release. */
  firstPassMs: number;
  heldMs: number;
  totalMs: number;
  downtimeMs: number;
  transferredMiB: number;
  /** query-migrate polls, for the failure message. */
  trail: string[];
}

/**
 * Migrates src to dst over a unix socket: holds QEMU in dirty-sync rounds
 * (calling `onRounds` once they begin, when the second sync is seen), then
 * lets it converge; returns when query-migrate says completed, failed or
 * cancelled.
 */
async function migrate(src: Qmp, dst: Qmp, uri: string, onRounds: () => void): Promise<MigrationStats> {
  await dst.execute("migrate-incoming", { uri });
  await src.execute("migrate-set-parameters", FIRST_PASS);
  const t0 = performance.now();
  await src.execute("migrate", { uri });
  const trail: string[] = [];
  let firstPassMs = 0, heldMs = 0;
  const deadline = t0 + MIGRATION_TIMEOUT_MS;
  for (;;) {
    const q = await src.execute("query-migrate");
    const syncs: number = q.ram?.["dirty-sync-count"] ?? 0;
    trail.push(`${((performance.now() - t0) / 1000).toFixed(1)} s ${q.status} syncs=${syncs} ` +
      `sent=${((q.ram?.transferred ?? 0) / MiB).toFixed(1)}M remaining=${((q.ram?.remaining ?? 0) / MiB).toFixed(1)}M` +
      (q.ram?.["dirty-pages-rate"] !== undefined ? ` dirty=${q.ram["dirty-pages-rate"]}p/s` : ""));
    if (["completed", "failed", "cancelled"].includes(q.status)) {
      // QEMU 7.2 reports "completed" a moment before it fills in total-time and downtime.
      let last = q;
      for (let i = 0; i < 20 && q.status === "completed" && !last["total-time"]; i++) {
        await Bun.sleep(50);
        last = await src.execute("query-migrate");
      }
      return {
        status: q.status, syncs: last.ram?.["dirty-sync-count"] ?? syncs, firstPassMs, heldMs,
        totalMs: last["total-time"] ?? -1, downtimeMs: last.downtime ?? -1, transferredMiB: (last.ram?.transferred ?? 0) / MiB,
        trail: q["error-desc"] ? [...trail, `error: ${q["error-desc"]}`] : trail,
      };
    }
    const now = performance.now() - t0;
    if (firstPassMs === 0 && syncs >= 2) {
      firstPassMs = now;
      await src.execute("migrate-set-parameters", ROUNDS);
      onRounds();
    }
    if (heldMs === 0 && firstPassMs > 0 &&
      ((syncs >= SYNC_ROUNDS && now - firstPassMs >= ROUNDS_MS) || now - firstPassMs >= ROUNDS_MAX_MS)) {
      heldMs = now;
      await src.execute("migrate-set-parameters", CONVERGE);
    }
    if (performance.now() > deadline) {
      await src.execute("migrate_cancel").catch(() => {});
      throw new Error(`migration not finished after ${MIGRATION_TIMEOUT_MS} ms:\n  ${trail.slice(-10).join("\n  ")}`);
    }
    await Bun.sleep(100);
  }
}

/** Polls `cond` every 50 ms; throws (with the guest's check) on timeout. */
async function until(cond: () => boolean, what: string, timeoutMs: number, g: Guest): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!cond()) {
    g.check();
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(50);
  }
}

/** The last `n` lines of `s`. */
const tail = (s: string, n: number) => s.split("\n").slice(-n).join("\n");

const skip = guestTestSkipReason();
const timings: string[] = [];

describe.skipIf(skip !== null)(`live migration of a Linux guest over vhost-user-blk${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  afterAll(() => {
    if (timings.length) console.log(`migration.test.ts timings:\n  ${timings.join("\n  ")}`);
  });

  for (const kind of backendKinds) {
    const kindSkip = kind.skipReason();
    test.skipIf(kindSkip !== null)(
      `${kind.name}: a guest writing and reading /dev/vda migrates to a second QEMU and back-end on the same image; ` +
        `all data verifies${kindSkip ? ` [skipped: ${kindSkip}]` : ""}`,
      () => migrationTest(kind),
      TEST_TIMEOUT_MS,
    );
  }
});

async function migrationTest(kind: BackendKind): Promise<void> {
  const dir = scratchDir("bunvhost-mig-");
  const image = join(dir, "disk.img");
  makeImage(image);
  const extraArgs = kind.name === "bunvhost" ? ["--trace"] : [];
  const t0 = performance.now();
  let srcB: Backend | null = null, dstB: Backend | null = null;
  let src: Guest | null = null, dst: Guest | null = null;
  let srcQmp: Qmp | null = null, dstQmp: Qmp | null = null;
  let stats: MigrationStats | null = null;
  try {
    srcB = await kind.start({ size: DISK, image, extraArgs });
    dstB = await kind.start({ size: DISK, image, extraArgs });
    src = await Guest.boot({
      dir, memKiB: MEM_KIB, blk: [{ socket: srcB.socket }], script: SCRIPT,
      console: join(dir, "src-console.sock"), qmp: join(dir, "src-qmp.sock"),
    });
    dst = src.incoming({ blk: [{ socket: dstB.socket }], console: join(dir, "dst-console.sock"), qmp: join(dir, "dst-qmp.sock") });
    [srcQmp, dstQmp] = await Promise.all([Qmp.connect(join(dir, "src-qmp.sock")), Qmp.connect(join(dir, "dst-qmp.sock"))]);
    await src.waitResult("LOADED", 30_000);
    const g = src;
    await g.qemu.waitFor(/^RESULT: rpass 2 /m, 20_000);
    const count = (x: Guest, key: string) => x.results().filter((r) => r.key === key).length;
    const before = { w: count(g, "wpass"), r: count(g, "rpass") };
    const booted = performance.now();

    let atRounds = before;
    stats = await migrate(srcQmp, dstQmp, `unix:${join(dir, "mig.sock")}`, () => (atRounds = { w: count(g, "wpass"), r: count(g, "rpass") }));
    const during = { w: count(g, "wpass") - before.w, r: count(g, "rpass") - before.r };
    const inRounds = { w: count(g, "wpass") - atRounds.w, r: count(g, "rpass") - atRounds.r };
    g.check();
    expect(stats.status).toBe("completed");

    // The loops go on on the destination; three more writer passes there, then stop.
    const d = dst;
    await until(() => count(d, "wpass") >= 3, "three writer passes on the destination", 30_000, d);
    const after = { w: count(d, "wpass"), r: count(d, "rpass") };
    d.send("stop");
    const r = await d.finish(30_000);
    const [wn, wbad, rn, rbad] = (r.get("verified") ?? "").split(" ").map(Number);
    expect({ wbad, rbad }).toEqual({ wbad: 0, rbad: 0 });
    expect(wn).toBeGreaterThan(0);
    expect(rn).toBeGreaterThan(0);
    expect(md5Range(image, 0, W_BYTES)).toBe(r.get("wsum")!);
    // The premise: the guest wrote and read while RAM was copied, over several dirty syncs.
    expect(stats.syncs).toBeGreaterThanOrEqual(SYNC_ROUNDS);
    expect({ writesInRounds: inRounds.w >= 2, slicesInRounds: inRounds.r >= 2 }).toEqual({ writesInRounds: true, slicesInRounds: true });
    for (const q of [src, dst]) expect(q.qemu.errors).not.toContain("Migration disabled");
    if (kind.name === "bunvhost") expect(srcB.stderr()).toContain("dirty logging on");

    timings.push(`${kind.name}: ${((performance.now() - t0) / 1000).toFixed(1)} s in all ` +
      `(boot and loops ${((booted - t0) / 1000).toFixed(1)} s; migration ${(stats.totalMs / 1000).toFixed(1)} s, ` +
      `first pass ${(stats.firstPassMs / 1000).toFixed(1)} s, ` +
      `${stats.heldMs ? `released at ${(stats.heldMs / 1000).toFixed(1)} s` : "converged by itself"}, ${stats.syncs} syncs, ` +
      `${stats.transferredMiB.toFixed(0)} MiB, downtime ${stats.downtimeMs} ms; guest I/O during it: ${during.w} writes, ` +
      `${during.r} slices, of which in the sync rounds ${inRounds.w} and ${inRounds.r}; on dst before stop: ${after.w} writes; ` +
      `verified ${wn} writes, ${rn} slices)`);
  } catch (e) {
    const err = e as Error;
    throw new Error([
      err.stack ?? err.message,
      `--- migration: ${stats ? stats.trail.join("\n  ") : "(not finished)"}`,
      `--- source QEMU\n${src?.describe() ?? "(not started)"}`,
      `--- destination QEMU\n${dst?.describe() ?? "(not started)"}`,
      `--- source ${kind.name} stderr (tail):\n${srcB ? tail(srcB.stderr(), 60) : "(not started)"}`,
      `--- destination ${kind.name} stderr (tail):\n${dstB ? tail(dstB.stderr(), 60) : "(not started)"}`,
    ].join("\n"));
  } finally {
    srcQmp?.close();
    dstQmp?.close();
    await Promise.all([src?.stop(), dst?.stop()]);
    await Promise.all([srcB?.stop(), dstB?.stop()]);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Memory hotplug under a Linux guest doing disk I/O. QEMU starts with
 * `-m 256M,slots=4,maxmem=1G`; while the guest writes and verifies its
 * vhost-user-blk disk without pause, the test adds two 128 MiB
 * memory-backend-memfd + pc-dimm pairs over QMP and removes one again.
 * Each change reaches the back-end as ADD_MEM_REG / REM_MEM_REG (QEMU uses
 * them once CONFIGURE_MEM_SLOTS is negotiated), between requests of a queue
 * that keeps running. Once with bunvhost (--trace, so the test can see the
 * messages and where they fell), once with qemu-storage-daemon.
 *
 * The guest onlines hot-added memory as ZONE_MOVABLE by itself
 * (memhp_default_state=online_movable; the Debian kernel has
 * CONFIG_MEMORY_HOTPLUG and CONFIG_ACPI_HOTPLUG_MEMORY built in, no module
 * needed). Movable is the highest zone, so user pages such as dd's buffers,
 * which O_DIRECT hands to the device, come from the new memory first: the
 * guest reports how much of the Movable zone is in use. Removing a DIMM
 * needs the guest's help (ACPI eject: Linux migrates the pages away, offlines
 * the blocks, then ejects); with movable blocks it completes on its own and
 * QEMU reports DEVICE_DELETED.
 *
 * Workload: 16 slots of 1 MiB at the start of a 32 MiB disk. Pass n writes
 * MiB ((n + n / 16) mod 4) of a random 4 MiB pattern into slot n mod 16 with
 * O_DIRECT, reads it back with O_DIRECT and compares, and mirrors it into
 * /tmp/expect; at the end the whole region is read back and compared with the
 * mirror, in the guest and in the image on the host. Beside it a reader
 * loop reads 16-20 MiB (written once at the start) 256 KiB at a time and
 * compares, so that two requests are sometimes in flight when a memory
 * message arrives.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, rmSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { backendKinds, scratchDir, type BackendKind } from "../support/backends.ts";
import { Guest, guestTestSkipReason, md5Range } from "../support/guest.ts";
import { Qmp } from "../support/qmp.ts";

const MiB = 1024 * 1024;
const DISK = 32 * MiB;
const DIMM_MIB = 128;
const GUEST_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 150_000;

const SCRIPT = String.raw`
MiB=1048576
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
truncate -s $((16 * MiB)) /tmp/expect
# Movable zone: managed and free pages (0 0 before any memory is hot-added).
movable() { awk '/^Node/ { m = ($4 == "Movable") } m && $1 == "pages" && $2 == "free" { f = $3 } m && $1 == "managed" { g = $2 } END { print g + 0, f + 0 }' /proc/zoneinfo; }
memtotal() { awk '/^MemTotal/ { print $2 }' /proc/meminfo; }
online() { n=0; for b in /sys/devices/system/memory/memory*; do [ "$(cat $b/state)" = online ] && n=$((n + 1)); done; echo $n; }

writer() {
  n=0; bad=0
  while [ ! -f /tmp/stop ]; do
    slot=$((n % 16)); c=$(((n + n / 16) % 4))
    dd if=/tmp/pat of=/dev/vda bs=1M skip=$c seek=$slot count=1 oflag=direct 2>/tmp/werr \
      || { fail "write $n slot $slot: $(cat /tmp/werr)"; bad=$((bad + 1)); }
    dd if=/tmp/pat of=/tmp/expect bs=1M skip=$c seek=$slot count=1 conv=notrunc 2>/dev/null
    dd if=/dev/vda bs=1M skip=$slot count=1 iflag=direct 2>/dev/null | cmp -s -n $MiB - /tmp/pat 0 $((c * MiB)) \
      || { fail "read-back $n slot $slot chunk $c"; bad=$((bad + 1)); }
    n=$((n + 1))
    result wpass $n $(cut -d' ' -f1 /proc/uptime)
  done
  echo $n $bad > /tmp/wdone
}

# Region R (16-20 MiB): written once, then read back 256 KiB at a time by a second loop, so that
# two requests are in flight now and then when a memory message arrives.
dd if=/tmp/pat of=/dev/vda bs=1M seek=16 count=4 oflag=direct 2>/dev/null || fail "region R write"
reader() {
  n=0; bad=0
  while [ ! -f /tmp/stop ]; do
    k=$((n % 16))
    dd if=/dev/vda bs=256k skip=$((64 + k)) count=1 iflag=direct 2>/dev/null | cmp -s -n 262144 - /tmp/pat 0 $((k * 262144)) \
      || { fail "reader pass $n piece $k"; bad=$((bad + 1)); }
    n=$((n + 1))
    result rpass $n
  done
  echo $n $bad > /tmp/rdone
}

writer &
reader &
result LOADED $(memtotal) $(online) $(movable)
while read -r cmd; do
  case "$cmd" in
    stat*) result $cmd $(memtotal) $(online) $(movable) ;;
    stop) break ;;
  esac
done
touch /tmp/stop
wait
read wn wbad < /tmp/wdone
read rn rbad < /tmp/rdone
result reads $rn $rbad
diff=0
dd if=/dev/vda of=/tmp/w bs=1M count=16 iflag=direct 2>/dev/null
cmp -s /tmp/w /tmp/expect || { fail "the 16 slots differ from what was written"; diff=1; }
result verified $wn $((wbad + diff)) $(md5sum < /tmp/expect | cut -d' ' -f1)
`;

interface Stat {
  memKiB: number;
  onlineBlocks: number;
  movableManaged: number;
  movableFree: number;
}

const skip = guestTestSkipReason();
const timings: string[] = [];

describe.skipIf(skip !== null)(`memory hotplug under a Linux guest doing I/O${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  afterAll(() => {
    if (timings.length) console.log(`hotplug.test.ts timings:\n  ${timings.join("\n  ")}`);
  });
  for (const kind of backendKinds) {
    const kindSkip = kind.skipReason();
    describe.skipIf(kindSkip !== null)(`${kind.name}${kindSkip ? ` [skipped: ${kindSkip}]` : ""}`, () => {
      hotplugTest(kind);
    });
  }
});

function hotplugTest(kind: BackendKind): void {
  const traced = kind.name === "bunvhost";
  test(`${kind.name}: two 128 MiB pc-dimms hot-added and one removed while the guest writes and verifies its disk`, async () => {
    const dir = scratchDir("bunvhost-hotplug-");
    const image = join(dir, "disk.img");
    closeSync(openSync(image, "w"));
    truncateSync(image, DISK);
    const qmpPath = join(dir, "qmp.sock");
    const t0 = performance.now();
    const backend = await kind.start({ size: DISK, image, extraArgs: traced ? ["--trace"] : [] });
    let guest: Guest | null = null;
    let qmp: Qmp | null = null;
    const passes = () => guest!.results().filter((r) => r.key === "wpass").length;
    /** Waits until the writer has made `more` passes after now. */
    const morePasses = async (more: number, what: string) => {
      const want = passes() + more;
      const deadline = Date.now() + 30_000;
      while (passes() < want) {
        guest!.check();
        if (Date.now() > deadline) throw new Error(`the writer stalled ${what} (${passes()} passes, wanted ${want})`);
        await Bun.sleep(50);
      }
    };
    let statSeq = 0;
    const stat = async (): Promise<Stat> => {
      const key = `stat${++statSeq}`;
      guest!.send(key);
      const [memKiB, onlineBlocks, movableManaged, movableFree] = (await guest!.waitResult(key, 20_000)).split(" ").map(Number);
      return { memKiB: memKiB!, onlineBlocks: onlineBlocks!, movableManaged: movableManaged!, movableFree: movableFree! };
    };
    /** Polls the guest until `ok` holds for its memory (the kernel onlines or removes blocks asynchronously). */
    const statUntil = async (ok: (s: Stat) => boolean, what: string): Promise<Stat> => {
      const deadline = Date.now() + 30_000;
      for (;;) {
        const s = await stat();
        if (ok(s)) return s;
        if (Date.now() > deadline) throw new Error(`guest memory never ${what}: ${JSON.stringify(s)}`);
        await Bun.sleep(200);
      }
    };
    const trace = (re: RegExp) => backend.stderr().split("\n").filter((l) => re.test(l));
    const notes: string[] = [];
    try {
      guest = await Guest.boot({
        dir, blk: [{ socket: backend.socket }], script: SCRIPT, qmp: qmpPath,
        memMiB: 256, memSlots: 4, maxMemMiB: 1024, append: "memhp_default_state=online_movable",
      });
      const g = guest;
      const loaded = (await g.waitResult("LOADED", GUEST_TIMEOUT_MS)).split(" ").map(Number);
      qmp = await Qmp.connect(qmpPath);
      await morePasses(3, "before the first hotplug");
      const base: Stat = { memKiB: loaded[0]!, onlineBlocks: loaded[1]!, movableManaged: loaded[2]!, movableFree: loaded[3]! };
      expect(base.movableManaged).toBe(0);
      // QEMU sends even the boot-time table as ADD_MEM_REG once CONFIGURE_MEM_SLOTS is on: count from here.
      const addsBefore = traced ? trace(/<- ADD_MEM_REG/).length : 0;
      const tablesBefore = traced ? trace(/<- SET_MEM_TABLE/).length : 0;
      const stopsBefore = traced ? trace(/<- GET_VRING_BASE/).length : 0;

      // Two DIMMs, one after the other, each while the writer runs.
      let last = base;
      for (const i of [1, 2]) {
        const before = passes();
        await qmp.execute("object-add", { "qom-type": "memory-backend-memfd", id: `hm${i}`, size: DIMM_MIB * MiB, share: true });
        await qmp.execute("device_add", { driver: "pc-dimm", id: `dimm${i}`, memdev: `hm${i}` });
        const s = await statUntil((x) => x.memKiB >= last.memKiB + DIMM_MIB * 1024 - 1024 && x.movableManaged > last.movableManaged, `grew by DIMM ${i}`);
        await morePasses(4, `after DIMM ${i}`);
        notes.push(`dimm${i}: +${s.memKiB - last.memKiB} KiB, ${s.onlineBlocks} blocks online, writer passes ${before}->${passes()}`);
        last = s;
      }
      const dimms = await qmp.execute("query-memory-devices");
      expect(dimms.map((d: any) => d.data.id)).toEqual(["dimm1", "dimm2"]);
      // The writer's buffers and the page cache live in the new memory now: the Movable zone is in use.
      const used = await stat();
      expect(used.movableManaged).toBeGreaterThan(0);
      expect(used.movableManaged - used.movableFree).toBeGreaterThan(256); // pages (1 MiB) in use in hot-added memory
      notes.push(`Movable zone: ${used.movableManaged} pages, ${used.movableManaged - used.movableFree} in use`);
      if (traced) {
        const adds = trace(/<- ADD_MEM_REG/);
        expect(adds.length - addsBefore).toBe(2);
        for (const l of adds.slice(addsBefore)) expect(l).toContain(`size=0x${(DIMM_MIB * MiB).toString(16)}`);
        // The regions came one by one, with no new table and no queue stopped for them (the writer ran on).
        expect(trace(/<- SET_MEM_TABLE/).length).toBe(tablesBefore);
        expect(trace(/<- GET_VRING_BASE/).length).toBe(stopsBefore);
      }

      // Unplug DIMM 1: ACPI eject, which the guest kernel completes after offlining the blocks.
      const remsBefore = traced ? trace(/<- REM_MEM_REG/).length : 0;
      const beforeDel = passes();
      await qmp.execute("device_del", { id: "dimm1" });
      const ev = await qmp.waitEvent("DEVICE_DELETED", 30_000);
      expect((ev.data as { device?: string }).device).toBe("dimm1");
      const after = await statUntil((x) => x.memKiB <= last.memKiB - DIMM_MIB * 1024 + 1024, "shrank after device_del");
      await morePasses(4, "after the unplug");
      notes.push(`unplug: -${last.memKiB - after.memKiB} KiB, writer passes ${beforeDel}->${passes()}`);
      await qmp.execute("object-del", { id: "hm1" });
      const left = await qmp.execute("query-memory-devices");
      expect(left.map((d: any) => d.data.id)).toEqual(["dimm2"]);
      if (traced) {
        const rems = trace(/<- REM_MEM_REG/);
        expect(rems.length - remsBefore).toBe(1);
        expect(rems.at(-1)).toContain(`size=0x${(DIMM_MIB * MiB).toString(16)}`);
      }

      g.send("stop");
      const r = await g.finish(GUEST_TIMEOUT_MS);
      const [wn, bad, sum] = (r.get("verified") ?? "").split(" ");
      expect(bad).toBe("0");
      expect(Number(wn)).toBeGreaterThanOrEqual(passes());
      expect(md5Range(image, 0, 16 * MiB)).toBe(sum!);
      const [rn, rbad] = (r.get("reads") ?? "").split(" ").map(Number);
      expect(rbad).toBe(0);
      expect(rn).toBeGreaterThan(10);
      timings.push(`${kind.name}: ${((performance.now() - t0) / 1000).toFixed(1)} s, ${wn} writer passes, ${rn} reads; ${notes.join("; ")}`);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n${guest?.describe() ?? ""}\n--- ${kind.name} stderr (tail):\n${backend.stderr().split("\n").slice(-60).join("\n")}`);
    } finally {
      qmp?.close();
      await guest?.stop();
      await backend.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  }, TEST_TIMEOUT_MS);
}


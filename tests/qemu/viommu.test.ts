/**
 * VIRTIO_F_ACCESS_PLATFORM under QEMU with a Linux guest.
 *
 * - "behind a vIOMMU": q35 with intel-iommu, the disk
 *   `vhost-user-blk-pci,iommu_platform=on`, the guest booted with
 *   intel_iommu=on, so every DMA address the guest's virtio driver hands out is
 *   an IOVA of its IOMMU domain. QEMU then negotiates bit 33 with the back-end,
 *   sets the rings by IOVA, pre-sends the used rings' translations and answers
 *   our misses with IOTLB_MSG UPDATEs; the guest's unmaps come as INVALIDATEs.
 *   bunvhost serves the queue on an I/O thread (misses sent from there).
 *   Two configurations (see STRICT_ATS and CACHING_MODE for why these).
 * - "without a vIOMMU": iommu_platform=on alone. The guest negotiates bit 33,
 *   QEMU clears it towards the back-end (vhost_dev_has_iommu() is false), and
 *   addresses are plain guest-physical ones. bunvhost serves it on the main
 *   loop. qemu-storage-daemon 7.2 does not offer bit 33, so QEMU refuses the
 *   device outright ("iommu_platform=true is not supported by the device"),
 *   with or without a vIOMMU: that is asserted instead.
 *
 * Both run a checksummed workload: 8 MiB of random data written with O_DIRECT,
 * read back direct and buffered in the guest, and checked on the host image.
 */
import { describe, expect, test } from "bun:test";
import { closeSync, openSync, rmSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { backendKinds, scratchDir, type Backend, type BackendKind } from "../support/backends.ts";
import { Guest, guestTestSkipReason, md5Range } from "../support/guest.ts";

const MiB = 1024 * 1024;
const DISK = 32 * MiB;
const GUEST_TIMEOUT_MS = 150_000;
const TEST_TIMEOUT_MS = 240_000;

const SCRIPT = String.raw`
md5() { md5sum | cut -d' ' -f1; }
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = 0x0002 ] && result features $(cat $d/features)
done
pci=$(readlink -f /sys/block/vda/device/..)
result domain $(cat $pci/iommu_group/type 2>/dev/null || echo none)
result nobatching $(dmesg | grep -c "IOMMU batching disallowed")
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
result want $(md5 < /tmp/pat)
dd if=/tmp/pat of=/dev/vda bs=64k count=128 seek=16 oflag=direct 2>/tmp/err || fail "write: $(cat /tmp/err)"
result direct $(dd if=/dev/vda bs=64k count=128 skip=16 iflag=direct 2>/dev/null | md5)
sync; echo 3 > /proc/sys/vm/drop_caches
result buffered $(dd if=/dev/vda bs=1M count=8 skip=1 2>/dev/null | md5)
`;

/**
 * The guest must invalidate each unmap at once (strict mode, iommu_group type
 * "DMA"): QEMU 7.2 forwards those page invalidations to the back-end as
 * IOTLB_MSG INVALIDATE. In Linux's lazy mode ("DMA-FQ") unmaps are batched
 * into domain-wide IOTLB flushes, which QEMU 7.2 does not forward to vhost,
 * with or without device-iotlb/ats: IOVAs were then reused while the
 * back-end still held their old translations (measured here without
 * caching-mode: no INVALIDATE at all, garbage descriptors, queue broken with
 * ZERO_LEN, QEMU's ring restore failing). No back-end can detect the omission.
 * Two ways to get strict mode, both tested:
 *
 * STRICT_ATS: the guest asks for it (iommu.strict=1); device IOTLB with ATS.
 */
const STRICT_ATS: Viommu = {
  iommu: "intel-iommu,intremap=on,device-iotlb=on", blk: ",ats=on", append: "intel_iommu=on iommu.strict=1", strictBy: "cmdline",
};
/**
 * CACHING_MODE: intel-iommu caching-mode=on and the guest's default command
 * line. Linux (6.1 here) refuses lazy batching on an IOMMU in caching mode
 * ("IOMMU batching disallowed due to virtualization") and goes strict by
 * itself, even with iommu.strict=0 (measured); no device-iotlb/ats needed.
 */
const CACHING_MODE: Viommu = {
  iommu: "intel-iommu,intremap=on,caching-mode=on", blk: "", append: "intel_iommu=on", strictBy: "caching-mode",
};

interface Viommu { iommu: string; blk: string; append: string; strictBy: "cmdline" | "caching-mode" }

const skip = guestTestSkipReason();

function makeImage(path: string): string {
  closeSync(openSync(path, "w"));
  truncateSync(path, DISK);
  return path;
}

/** The SET_FEATURES values in a --trace log. */
function setFeatures(log: string): bigint[] {
  return [...log.matchAll(/<- SET_FEATURES flags=\S+ u64=(0x[0-9a-f]+)/g)].map((m) => BigInt(m[1]!));
}

const BIT33 = 1n << 33n;

interface Run { r: Map<string, string>; log: string; image: string }

async function run(kind: BackendKind, viommu: Viommu | null, extraArgs: string[]): Promise<Run> {
  const dir = scratchDir("bunvhost-viommu-");
  const image = makeImage(join(dir, "disk.img"));
  let backend: Backend | null = null;
  let guest: Guest | null = null;
  try {
    backend = await kind.start({ size: DISK, image, extraArgs });
    const sock = backend.socket;
    // The vIOMMU must exist before the device (the device's DMA address space comes from it).
    const extra = [
      ...(viommu ? ["-machine", "kernel-irqchip=split", "-device", viommu.iommu] : []),
      "-chardev", `socket,id=vu0,path=${sock}`,
      // Modern only: QEMU refuses ACCESS_PLATFORM on a transitional (legacy-capable) device.
      "-device", `vhost-user-blk-pci,chardev=vu0,id=vu0dev,num-queues=1,disable-legacy=on,iommu_platform=on${viommu?.blk ?? ""}`,
    ];
    guest = await Guest.boot({ dir, blk: [], extra, script: SCRIPT, append: viommu?.append ?? "" });
    const r = await guest.finish(GUEST_TIMEOUT_MS).catch((e: Error) => {
      throw new Error(`${e.message}\n--- ${kind.name} stderr (tail):\n${backend!.stderr().slice(-6000)}`);
    });
    await guest.stop();
    guest = null;
    const img = md5Range(image, 1 * MiB, 8 * MiB); // seek=16 of 64 KiB blocks
    await backend.stop();
    const log = backend.stderr();
    backend = null;
    return { r, log, image: img };
  } finally {
    await guest?.stop();
    await backend?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

function expectData(x: Run): void {
  const want = x.r.get("want")!;
  expect(want).toMatch(/^[0-9a-f]{32}$/);
  expect(x.r.get("direct")).toBe(want);
  expect(x.r.get("buffered")).toBe(want);
  expect(x.image).toBe(want);
}

describe.skipIf(skip !== null)(`VIRTIO_F_ACCESS_PLATFORM with a Linux guest${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  const bunvhost = backendKinds.find((k) => k.name === "bunvhost")!;

  for (const v of [STRICT_ATS, CACHING_MODE]) {
    const name = v === STRICT_ATS ? "device-iotlb + ats, guest booted iommu.strict=1" : "caching-mode=on, guest's default IOMMU mode";
    test(`bunvhost behind intel-iommu (${name}): IOVAs through the IOTLB (updates, misses, invalidations), data verified`, async () => {
      const x = await run(bunvhost, v, ["--threads", "1", "--trace", "--log-level", "debug"]);
      // The guest negotiated bit 33 and its disk sits in a translated IOMMU domain, in strict mode
      // ("DMA", not the lazy "DMA-FQ": see above), chosen by the command line or by the kernel itself.
      expect(x.r.get("features")![33]).toBe("1");
      expect(x.r.get("domain")).toBe("DMA");
      expect(Number(x.r.get("nobatching"))).toBe(v.strictBy === "caching-mode" ? 1 : 0);
      // ... and so did QEMU with us.
      const sf = setFeatures(x.log);
      expect(sf.length).toBeGreaterThan(0);
      expect(sf.at(-1)! & BIT33).toBe(BIT33);
      expect(x.log).toContain("IOTLB on");
      const updates = (x.log.match(/IOTLB update iova=/g) ?? []).length;
      const misses = (x.log.match(/IOTLB miss iova=/g) ?? []).length;
      const invalidations = (x.log.match(/IOTLB invalidate iova=/g) ?? []).length;
      console.log(`viommu (${name}): ${updates} updates, ${misses} misses, ${invalidations} invalidations`);
      expect(updates).toBeGreaterThan(0);
      expect(misses).toBeGreaterThan(0);
      expect(invalidations).toBeGreaterThan(0);
      // --trace decodes the IOTLB messages QEMU sends (it leaves uaddr unset in an INVALIDATE).
      const traced = (type: string) => x.log.match(new RegExp(`<- IOTLB_MSG .*type=${type} .*`))?.[0];
      expect(traced("update")).toMatch(/^<- IOTLB_MSG flags=0x9 iotlb type=update iova=0x[0-9a-f]+ size=0x1000 uaddr=0x[0-9a-f]+ perm=(rw|ro|wo)$/);
      expect(traced("invalidate")).toMatch(/^<- IOTLB_MSG flags=0x9 iotlb type=invalidate iova=0x[0-9a-f]+ size=0x[0-9a-f]+ uaddr=0x[0-9a-f]+ perm=none$/);
      expect(x.log).not.toMatch(/IOTLB_PERM|virtqueue broken|error:/);
      expectData(x);
    }, TEST_TIMEOUT_MS);
  }

  test("bunvhost: iommu_platform=on without a vIOMMU: bit 33 with the guest, plain addresses, data verified", async () => {
    const x = await run(bunvhost, null, ["--threads", "0", "--trace"]);
    expect(x.r.get("features")![33]).toBe("1");
    expect(x.r.get("domain")).toBe("none");
    // QEMU 7.2 clears bit 33 towards a back-end that sits behind no vIOMMU: no IOTLB at all.
    const sf = setFeatures(x.log);
    expect(sf.length).toBeGreaterThan(0);
    for (const f of sf) expect(f & BIT33).toBe(0n);
    expect(x.log).not.toContain("IOTLB_MSG");
    expect(x.log).not.toContain("IOTLB on");
    expectData(x);
  }, TEST_TIMEOUT_MS);

  const qsd = backendKinds.find((k) => k.name === "qsd")!;
  test.skipIf(qsd.skipReason() !== null)("qsd: QEMU refuses iommu_platform=on (qemu-storage-daemon 7.2 does not offer bit 33)", async () => {
    for (const viommu of [null, STRICT_ATS]) {
      const err = await run(qsd, viommu, []).then(() => null, (e: Error) => e);
      expect(err?.message).toContain("iommu_platform=true is not supported by the device");
    }
  }, TEST_TIMEOUT_MS);
});

/**
 * virtio-fs (src/devices/fs.ts) seen by a Linux guest: `server.ts fs
 * --memory` served by the CLI, QEMU's vhost-user-fs-pci, the guest's
 * virtiofs driver mounting it: files written and read back with checksums,
 * 300 files in a directory, rename, hard link, symlink, chmod, truncate,
 * append, a sparse file, rmdir of a non-empty directory refused, mkfifo,
 * touch -d, statfs, umount.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { runGuest, type GuestOutput } from "../../src/testing/guest.ts";
import { guestTestSkipReason, serveDevice, type ServedDevice } from "../support/guest.ts";

const skip = guestTestSkipReason();

const SCRIPT = String.raw`
mkdir -p /mnt
mount -t virtiofs bunvhost /mnt || fail "mount: $?"
result mounted $(grep -c ' /mnt virtiofs ' /proc/mounts)
dd if=/dev/urandom of=/tmp/a bs=1024 count=700 2>/dev/null
cp /tmp/a /mnt/a || fail cp
sync; echo 3 > /proc/sys/vm/drop_caches
result md5 $(md5sum < /tmp/a | cut -d' ' -f1) $(md5sum < /mnt/a | cut -d' ' -f1)
result size $(stat -c %s /mnt/a)
mkdir /mnt/d || fail mkdir
i=0; while [ $i -lt 300 ]; do echo $i > /mnt/d/f$i; i=$((i+1)); done
result count $(ls /mnt/d | wc -l)
result f299 $(cat /mnt/d/f299)
mv /mnt/a /mnt/b || fail mv
result renamed $(ls /mnt | tr '\n' ' ')
ln /mnt/b /mnt/hard || fail ln
result links $(stat -c %h /mnt/b)
ln -s b /mnt/sym || fail "ln -s"
result symlink $(readlink /mnt/sym) $(md5sum < /mnt/sym | cut -d' ' -f1)
chmod 600 /mnt/b; result mode $(stat -c %a /mnt/b)
truncate -s 10 /mnt/b; result truncated $(stat -c %s /mnt/hard)
echo tail >> /mnt/b; result appended $(stat -c %s /mnt/b) $(tail -c 5 /mnt/b)
dd if=/dev/zero of=/mnt/sparse bs=1 count=1 seek=10485759 2>/dev/null; result sparse $(stat -c %s /mnt/sparse)
rmdir /mnt/d 2>/dev/null && fail "rmdir of a non-empty directory worked"
result rmdir_refused yes
rm -r /mnt/d || fail "rm -r"
result gone $(ls /mnt | tr '\n' ' ')
mkfifo /mnt/fifo && result fifo $(stat -c %F /mnt/fifo)
touch -d '2001-02-03 04:05:06' /mnt/b; result mtime $(stat -c %Y /mnt/b)
result statfs $(stat -f -c %t /mnt) $(stat -f -c %S /mnt)
umount /mnt || fail umount
result unmounted $(grep -c ' /mnt ' /proc/mounts)
`;

describe.skipIf(skip !== null)(`virtio-fs in a Linux guest (--memory)${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let server: ServedDevice;
  let out: GuestOutput;

  beforeAll(async () => {
    server = await serveDevice("fs", ["--memory"]);
    try {
      out = await runGuest({ socket: server.socket, device: { type: 26, queues: 2, configSize: 40 }, script: SCRIPT, timeoutMs: 60_000 });
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- server:\n${server.output()}`);
    }
  }, 90_000);
  afterAll(() => server?.stop());

  test("mounts, and a 700 KiB file written by the guest reads back with the same md5", () => {
    expect(out.results.get("mounted")).toBe("1");
    const [a, b] = out.results.get("md5")!.split(" ");
    expect(b).toBe(a!);
    expect(out.results.get("size")).toBe(String(700 * 1024));
  });

  test("300 files in a directory", () => {
    expect(out.results.get("count")).toBe("300");
    expect(out.results.get("f299")).toBe("299");
  });

  test("rename, hard link, symlink, chmod, truncate, append, sparse file", () => {
    expect(out.results.get("renamed")).toBe("b d");
    expect(out.results.get("links")).toBe("2");
    const [target, md5] = out.results.get("symlink")!.split(" ");
    expect(target).toBe("b");
    expect(md5).toBe(out.results.get("md5")!.split(" ")[0]!);
    expect(out.results.get("mode")).toBe("600");
    expect(out.results.get("truncated")).toBe("10");
    expect(out.results.get("appended")).toBe("15 tail");
    expect(out.results.get("sparse")).toBe("10485760");
  });

  test("rmdir of a non-empty directory fails, rm -r works; mkfifo, touch -d, statfs, umount", () => {
    expect(out.results.get("rmdir_refused")).toBe("yes");
    expect(out.results.get("gone")).toBe("b hard sparse sym");
    expect(out.results.get("fifo")).toBe("fifo");
    expect(out.results.get("mtime")).toBe(String(Date.UTC(2001, 1, 3, 4, 5, 6) / 1000));
    expect(out.results.get("statfs")).toBe("65735546 4096"); // FUSE_SUPER_MAGIC, block size
    expect(out.results.get("unmounted")).toBe("0");
  });

  test("the server logged no error", () => {
    expect(server.output()).not.toMatch(/bunvhost(\[\w+\])?: error|broken/);
  });
});

describe.skipIf(skip !== null)(`virtio-fs in a Linux guest (--shared-dir)${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let server: ServedDevice;
  let out: GuestOutput;
  let root: string;
  const hostFile = new Uint8Array(300 * 1024).map((_, i) => (i * 7) & 0xff);

  beforeAll(async () => {
    const { mkdtempSync, mkdirSync, writeFileSync, symlinkSync } = await import("node:fs");
    root = mkdtempSync("/tmp/bvh-fs-");
    mkdirSync(`${root}/shared`);
    mkdirSync(`${root}/outside`);
    writeFileSync(`${root}/outside/secret.txt`, "secret\n");
    writeFileSync(`${root}/shared/host.bin`, hostFile);
    symlinkSync("../outside", `${root}/shared/out`);
    symlinkSync(`${root}/outside`, `${root}/shared/abs`);
    server = await serveDevice("fs", ["--shared-dir", `${root}/shared`]);
    const script = SCRIPT.replace("umount /mnt", String.raw`result hostmd5 $(md5sum < /mnt/host.bin | cut -d' ' -f1)
result outlink $(readlink /mnt/out)
cat /mnt/out/secret.txt >/dev/null 2>&1 && fail "read through a planted symlink"
cat /mnt/abs/secret.txt >/dev/null 2>&1 && fail "read through a planted absolute symlink"
result planted_not_followed yes
echo guest > /mnt/fromguest.txt
umount /mnt`);
    try {
      out = await runGuest({ socket: server.socket, device: { type: 26, queues: 2, configSize: 40 }, script, timeoutMs: 60_000 });
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- server:\n${server.output()}`);
    }
  }, 90_000);
  afterAll(async () => {
    await server?.stop();
    const { rmSync } = await import("node:fs");
    if (root) rmSync(root, { recursive: true, force: true });
  });

  test("the same workload as --memory passes on a host directory", () => {
    const [a, b] = out.results.get("md5")!.split(" ");
    expect(b).toBe(a!);
    expect(out.results.get("count")).toBe("300");
    expect(out.results.get("links")).toBe("2");
    expect(out.results.get("appended")).toBe("15 tail");
    expect(out.results.get("sparse")).toBe("10485760");
    expect(out.results.get("rmdir_refused")).toBe("yes");
    expect(out.results.get("mtime")).toBe(String(Date.UTC(2001, 1, 3, 4, 5, 6) / 1000));
    expect(out.results.get("unmounted")).toBe("0");
  });

  test("a host file reads in the guest with the host's md5; what the guest wrote is on the host", async () => {
    const { createHash } = await import("node:crypto");
    const { readFileSync, statSync } = await import("node:fs");
    expect(out.results.get("hostmd5")).toBe(createHash("md5").update(hostFile).digest("hex"));
    expect(readFileSync(`${root}/shared/fromguest.txt`, "utf8")).toBe("guest\n");
    expect(statSync(`${root}/shared/b`).size).toBe(15);
    expect(statSync(`${root}/shared/sparse`).size).toBe(10485760);
  });

  test("planted symlinks to a directory outside are shown as links and never lead out", async () => {
    const { readdirSync } = await import("node:fs");
    expect(out.results.get("outlink")).toBe("../outside");
    expect(out.results.get("planted_not_followed")).toBe("yes");
    expect(readdirSync(`${root}/outside`)).toEqual(["secret.txt"]);
  });

  test("the server logged no error", () => {
    expect(server.output()).not.toMatch(/bunvhost(\[\w+\])?: error|broken/);
  });
});

describe.skipIf(skip !== null)(`examples/jsonfs.ts, a synthetic file system, in a Linux guest${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  test("the guest lists its files and reads live JSON; writes are refused", async () => {
    const server = await serveDevice(new URL("../../examples/jsonfs.ts", import.meta.url).pathname);
    try {
      const out = await runGuest({
        socket: server.socket, device: { type: 26, queues: 2, configSize: 40 }, timeoutMs: 60_000,
        script: String.raw`mkdir -p /mnt; mount -t virtiofs bunvhost /mnt || fail mount
result ls $(ls /mnt | tr '\n' ' ')
result pid $(grep -o '"pid": [0-9]*' /mnt/process.json | cut -d' ' -f2)
result seconds $(grep -c seconds /mnt/uptime.json)
echo x > /mnt/new 2>/dev/null && fail "a write worked"
result refused yes
umount /mnt`,
      });
      expect(out.results.get("ls")).toBe("process.json uptime.json");
      expect(Number(out.results.get("pid"))).toBeGreaterThan(1);
      expect(out.results.get("seconds")).toBe("1");
      expect(out.results.get("refused")).toBe("yes");
    } finally {
      await server.stop();
    }
  }, 90_000);
});

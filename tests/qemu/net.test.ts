/**
 * virtio-net (src/devices/net.ts, `server.ts net`) seen by Linux guests: the
 * learning switch of one server process between two QEMU guests, each on its
 * own --socket (-netdev vhost-user + virtio-net-pci), and between a guest and
 * a host tap device moved into a network namespace the test creates.
 *
 * Per ring layout one pair of guests boots once (split, packed=on, and 2
 * queue pairs with -smp 2): ping both ways, then a 4 MiB random file fetched
 * over TCP (busybox httpd + wget) both ways, md5 compared with what the
 * serving side computed. Addresses are link-local only: 169.254.77.0/16
 * between guests, 169.254.78.0/16 between the guest and the namespace; IPv6
 * is off everywhere, so nothing else is sent.
 *
 * The guests wait in the kit's `commands` loop; each step is one
 * Guest.exec() line with its own RESULT key. Timings go to the log.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { startDevice, type RunningDevice } from "../../src/testing/start.ts";
import type { VhostUserNetOptions } from "../../src/testing/qemu.ts";
import { scratchDir } from "../support/backends.ts";
import { Guest, guestTestSkipReason } from "../support/guest.ts";

const NET_DEVICE = resolve(import.meta.dir, "../../src/devices/net.ts");
const skip = guestTestSkipReason() ?? (existsSync(NET_DEVICE) ? null : "net device not built yet");
const rootSkip = skip ?? (process.getuid?.() !== 0 ? "needs root (network namespace, tap device)"
  : !Bun.which("ip") ? "no ip(8) on the host (apt-get install iproute2)" : null);

const MiB = 1024 * 1024;
const BOOT_MS = 40_000;
const STEP_MS = 30_000;
/** The server's default port MACs (02:62:76:68:00:NN for port NN - 1); QEMU shows the guest the MAC given here. */
const mac = (port: number) => `02:62:76:68:00:${(port + 1).toString(16).padStart(2, "0")}`;
const secs = (t0: number) => ((Date.now() - t0) / 1000).toFixed(1);

/**
 * The guest's side: eth0 at ME/16, IPv6 off, a 4 MiB random file served by
 * httpd on port 80, the virtio-net features and queue directories reported;
 * then the test's commands.
 */
const guestScript = (me: string) => String.raw`
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
ip link set lo up
[ -d /sys/class/net/eth0 ] || fail "no eth0: $(ls /sys/class/net | tr '\n' ' ')"
ip addr add ${me}/16 dev eth0 && ip link set eth0 up || fail "eth0 set-up"
for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0001 ] && result features $(cat $d/features); done
result queues $(ls /sys/class/net/eth0/queues | tr '\n' ' ')
[ -d /sys/class/net/eth0/queues/tx-1 ] && result xps $(cat /sys/class/net/eth0/queues/tx-0/xps_cpus /sys/class/net/eth0/queues/tx-1/xps_cpus)
mkdir -p /www
dd if=/dev/urandom of=/www/f bs=1M count=4 2>/dev/null
result md5 $(md5sum < /www/f | cut -c1-32)
httpd -p 80 -h /www || fail httpd
result ready $(now)
commands
`;

/** Ping `to` 3 times from the guest; RESULT key gets "exit-status summary". */
const pingCmd = (to: string, key: string) => `ping -c 3 -i 0.2 -w 15 ${to} > /tmp/${key} 2>&1; result ${key} $? $(tail -1 /tmp/${key})`;
/** Fetch http://FROM:PORT/f into /tmp/KEY; RESULT key gets "exit-status md5 bytes". */
const fetchCmd = (from: string, key: string, port = 80) =>
  `wget -q -O /tmp/${key} http://${from}:${port}/f; result ${key} $? $(md5sum < /tmp/${key} | cut -c1-32) $(wc -c < /tmp/${key})`;
/** Two fetches at once from CPUs 0 and 1 (with XPS each CPU sends on its own TX queue). */
const fetchBothCpusCmd = (from: string, key: string) =>
  `(taskset 1 wget -q -O /tmp/${key}0 http://${from}/f; echo $? > /tmp/${key}0.rc) & ` +
  `(taskset 2 wget -q -O /tmp/${key}1 http://${from}/f; echo $? > /tmp/${key}1.rc) & wait; ` +
  `result ${key} $(cat /tmp/${key}0.rc) $(cat /tmp/${key}1.rc) $(md5sum < /tmp/${key}0 | cut -c1-32) $(md5sum < /tmp/${key}1 | cut -c1-32)`;

/** Bit `n` of a guest's features string (64 characters of 0/1, bit n at index n). */
const featureBit = (features: string | undefined, n: number) => features?.[n];
const VIRTIO_NET_F_MQ = 22;
const VIRTIO_F_RING_PACKED = 34;

/** The server's log with a header, for failure messages. */
const serverLog = (s: RunningDevice | undefined) => `\n--- server log:\n${s?.log().split("\n").slice(-40).join("\n") ?? "(not started)"}`;

interface PairMode {
  name: string;
  packed?: boolean;
  /** Queue pairs: server --queues, netdev queues=, mq=on, and as many vCPUs. */
  queues?: number;
}

/** Two guests (A 169.254.77.1, B .2) on the two sockets of one `server.ts net`, booted once for a describe block. */
function describePair(mode: PairMode): void {
  const queues = mode.queues ?? 1;
  describe.skipIf(skip !== null)(`net, ${mode.name}: two guests on one server.ts net${skip ? ` [skipped: ${skip}]` : ""}`, () => {
    let dir = "";
    let server: RunningDevice | undefined;
    let a: Guest | undefined;
    let b: Guest | undefined;
    const ip = { a: "169.254.77.1", b: "169.254.77.2" };
    /** Runs a step on a guest; failures carry both consoles and the server log. */
    const exec = async (g: Guest, cmd: string, key: string): Promise<string> => {
      try {
        return await g.exec(cmd, key, STEP_MS);
      } catch (e) {
        const other = g === a ? b : a;
        throw new Error(`${(e as Error).message}\n--- other guest:\n${other?.describe()}${serverLog(server)}`);
      }
    };

    beforeAll(async () => {
      const t0 = Date.now();
      dir = scratchDir("bunvhost-net-");
      const sock = { a: join(dir, "a.sock"), b: join(dir, "b.sock") };
      server = await startDevice("net", { socket: sock.a, args: ["--socket", sock.b, "--queues", String(queues)] });
      const nic = (socket: string, port: number): VhostUserNetOptions[] => [{ socket, mac: mac(port), packed: mode.packed, queues }];
      a = await Guest.boot({ script: guestScript(ip.a), net: nic(sock.a, 0), smp: queues, dir });
      b = await Guest.boot({ script: guestScript(ip.b), net: nic(sock.b, 1), smp: queues, dir });
      for (const g of [a, b]) {
        try {
          await g.waitResult("ready", BOOT_MS);
        } catch (e) {
          throw new Error(`${(e as Error).message}${serverLog(server)}`);
        }
      }
      console.log(`net.test.ts ${mode.name}: server + both guests booted and serving in ${secs(t0)} s`);
    }, BOOT_MS + 20_000);

    afterAll(async () => {
      await Promise.all([a?.stop(), b?.stop()]);
      await server?.stop();
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    test("both guests have eth0 with the negotiated ring layout and queue count", () => {
      for (const g of [a!, b!]) {
        const f = g.result("features");
        expect(f).toMatch(/^[01]{64}$/);
        expect(featureBit(f, VIRTIO_F_RING_PACKED)).toBe(mode.packed ? "1" : "0");
        if (queues > 1) {
          expect(featureBit(f, VIRTIO_NET_F_MQ)).toBe("1");
          // XPS: a sender on CPU n uses TX queue n, so the pinned fetches below use both pairs.
          expect(g.result("xps")).toBe("1 2");
        }
        const want = Array.from({ length: queues }, (_, i) => [`rx-${i}`, `tx-${i}`]).flat().sort();
        expect(g.result("queues")!.split(" ").filter(Boolean).sort()).toEqual(want);
      }
    });

    test("ping A → B and B → A (3 each)", async () => {
      const t0 = Date.now();
      const ab = await exec(a!, pingCmd(ip.b, "ping_ab"), "ping_ab");
      const ba = await exec(b!, pingCmd(ip.a, "ping_ba"), "ping_ba");
      console.log(`net.test.ts ${mode.name}: pings in ${secs(t0)} s: A→B ${ab}; B→A ${ba}`);
      expect(ab, `A→B: ${ab}${serverLog(server)}`).toMatch(/^0 .*round-trip/);
      expect(ba, `B→A: ${ba}${serverLog(server)}`).toMatch(/^0 .*round-trip/);
    }, 2 * STEP_MS);

    const transfer = (from: "a" | "b") => async () => {
      const [src, dst] = from === "a" ? [a!, b!] : [b!, a!];
      const key = `fetch_${from}`;
      const want = src.result("md5")!;
      const t0 = Date.now();
      if (queues > 1) {
        const [rc0, rc1, m0, m1] = (await exec(dst, fetchBothCpusCmd(ip[from], key), key)).split(" ");
        console.log(`net.test.ts ${mode.name}: 2 × 4 MiB ${from === "a" ? "A→B" : "B→A"} (CPU 0 and CPU 1 at once) in ${secs(t0)} s`);
        expect([rc0, rc1, m0, m1], `wget status, md5 (want ${want}): ${[rc0, rc1, m0, m1].join(" ")}${serverLog(server)}`)
          .toEqual(["0", "0", want, want]);
      } else {
        const [rc, md5, bytes] = (await exec(dst, fetchCmd(ip[from], key), key)).split(" ");
        console.log(`net.test.ts ${mode.name}: 4 MiB ${from === "a" ? "A→B" : "B→A"} in ${secs(t0)} s`);
        expect({ rc, md5, bytes }, `wget status ${rc}, md5 ${md5} (want ${want}), ${bytes} bytes${serverLog(server)}`)
          .toEqual({ rc: "0", md5: want, bytes: String(4 * MiB) });
      }
    };
    test("4 MiB from A's httpd to B's wget arrive with A's md5", transfer("a"), STEP_MS + 5000);
    test("4 MiB from B's httpd to A's wget arrive with B's md5", transfer("b"), STEP_MS + 5000);

    test("both guests power off cleanly; the server logged no error and counted frames on both ports", async () => {
      const t0 = Date.now();
      for (const g of [a!, b!]) g.send("exit");
      await Promise.all([a!.finish(STEP_MS), b!.finish(STEP_MS)]);
      await server!.stop();
      const log = server!.log();
      console.log(`net.test.ts ${mode.name}: power-off and server stop in ${secs(t0)} s\n${log.split("\n").filter((l) => /net port|tap/.test(l)).join("\n")}`);
      expect(log).not.toMatch(/bunvhost(\[\w+\])?: error|broken/);
      for (const port of [0, 1]) expect(log).toMatch(new RegExp(`net port ${port}: from guest [1-9]\\d*, to guest [1-9]`));
    }, 2 * STEP_MS);
  });
}

describePair({ name: "split ring" });
describePair({ name: "packed ring", packed: true });
describePair({ name: "2 queue pairs", queues: 2 });

/** Runs `ip ARGS`; throws with its stderr unless `okToFail`. */
function ipCmd(args: string[], okToFail = false): { ok: boolean; out: string } {
  const r = Bun.spawnSync(["ip", ...args], { stdout: "pipe", stderr: "pipe" });
  const out = r.stdout.toString() + r.stderr.toString();
  if (r.exitCode !== 0 && !okToFail) throw new Error(`ip ${args.join(" ")}: exit ${r.exitCode}: ${out.trim()}`);
  return { ok: r.exitCode === 0, out };
}

/** Runs ARGS inside namespace `ns` and waits; returns exit status and output. */
async function inNs(ns: string, args: string[], timeoutMs = STEP_MS): Promise<{ code: number; out: string }> {
  const p = Bun.spawn(["ip", "netns", "exec", ns, ...args], { stdout: "pipe", stderr: "pipe" });
  const t = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  clearTimeout(t);
  return { code, out: out + err };
}

describe.skipIf(rootSkip !== null)(`net: a guest and a tap device in a network namespace${rootSkip ? ` [skipped: ${rootSkip}]` : ""}`, () => {
  const ns = `bvn-${process.pid}`;
  const tap = `bvtap${process.pid % 1000}`;
  const ip = { ns: "169.254.78.1", guest: "169.254.78.2" };
  let nsCreated = false;
  let tapMine = false;
  let dir = "";
  let server: RunningDevice | undefined;
  let guest: Guest | undefined;
  let httpd: ReturnType<typeof Bun.spawn> | undefined;
  let nsMd5 = "";
  const exec = async (cmd: string, key: string): Promise<string> => {
    try {
      return await guest!.exec(cmd, key, STEP_MS);
    } catch (e) {
      throw new Error(`${(e as Error).message}${serverLog(server)}`);
    }
  };

  beforeAll(async () => {
    const t0 = Date.now();
    dir = scratchDir("bunvhost-nettap-");
    if (ipCmd(["link", "show", "dev", tap], true).ok) throw new Error(`a device ${tap} exists already: not ours, not touching it`);
    ipCmd(["netns", "add", ns]);
    nsCreated = true;
    // No IPv6 in the namespace: the tap says nothing but IPv4 ARP and what the test sends.
    for (const k of ["all", "default"]) {
      const r = await inNs(ns, ["sysctl", "-qw", `net.ipv6.conf.${k}.disable_ipv6=1`]);
      if (r.code !== 0) throw new Error(`sysctl in ${ns}: ${r.out}`);
    }
    ipCmd(["-n", ns, "link", "set", "lo", "up"]);

    const sock = join(dir, "g.sock");
    tapMine = true; // from here on, a tap of this name is the server's
    server = await startDevice("net", { socket: sock, args: ["--tap", tap] });
    for (let i = 0; !ipCmd(["link", "show", "dev", tap], true).ok; i++) {
      if (i > 100) throw new Error(`the server did not create ${tap}${serverLog(server)}`);
      await Bun.sleep(50);
    }
    ipCmd(["link", "set", "dev", tap, "netns", ns]);
    ipCmd(["-n", ns, "addr", "add", `${ip.ns}/16`, "dev", tap]);
    ipCmd(["-n", ns, "link", "set", "dev", tap, "up"]);

    const www = join(dir, "www");
    mkdirSync(www);
    const data = randomBytes(4 * MiB);
    writeFileSync(join(www, "f"), data);
    nsMd5 = createHash("md5").update(data).digest("hex");
    httpd = Bun.spawn(["ip", "netns", "exec", ns, "/bin/busybox", "httpd", "-f", "-p", `${ip.ns}:8080`, "-h", www], { stdout: "ignore", stderr: "pipe" });

    guest = await Guest.boot({ script: guestScript(ip.guest), net: [{ socket: sock, mac: mac(0) }], dir });
    try {
      await guest.waitResult("ready", BOOT_MS);
    } catch (e) {
      throw new Error(`${(e as Error).message}${serverLog(server)}`);
    }
    console.log(`net.test.ts tap: namespace ${ns}, ${tap} moved there, guest booted and serving in ${secs(t0)} s`);
  }, BOOT_MS + 20_000);

  afterAll(async () => {
    await guest?.stop();
    if (httpd) {
      httpd.kill("SIGTERM");
      await httpd.exited;
    }
    await server?.stop();
    if (nsCreated) ipCmd(["netns", "del", ns], true);
    // A non-persistent tap goes with the server's fd; remove it only if it is still here and ours.
    if (tapMine && ipCmd(["link", "show", "dev", tap], true).ok) ipCmd(["link", "del", "dev", tap], true);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("ping guest → namespace and namespace → guest (3 each)", async () => {
    const t0 = Date.now();
    const out = await exec(pingCmd(ip.ns, "ping_gn"), "ping_gn");
    const back = await inNs(ns, ["/bin/busybox", "ping", "-c", "3", "-i", "0.2", "-w", "15", ip.guest]);
    console.log(`net.test.ts tap: pings in ${secs(t0)} s: guest→ns ${out}; ns→guest ${back.out.trim().split("\n").at(-1)}`);
    expect(out, `guest→ns: ${out}${serverLog(server)}`).toMatch(/^0 .*round-trip/);
    expect(back.code, back.out + serverLog(server)).toBe(0);
  }, 2 * STEP_MS);

  test("4 MiB from the namespace's httpd (over the tap) arrive in the guest with the host's md5", async () => {
    const t0 = Date.now();
    const [rc, md5, bytes] = (await exec(fetchCmd(ip.ns, "fetch_ns", 8080), "fetch_ns")).split(" ");
    console.log(`net.test.ts tap: 4 MiB ns→guest in ${secs(t0)} s`);
    expect({ rc, md5, bytes }, `wget status ${rc}, md5 ${md5} (want ${nsMd5}), ${bytes} bytes${serverLog(server)}`)
      .toEqual({ rc: "0", md5: nsMd5, bytes: String(4 * MiB) });
  }, STEP_MS + 5000);

  test("4 MiB from the guest's httpd arrive in the namespace with the guest's md5", async () => {
    const t0 = Date.now();
    const file = join(dir, "from-guest");
    const r = await inNs(ns, ["/bin/busybox", "wget", "-q", "-O", file, `http://${ip.guest}/f`]);
    console.log(`net.test.ts tap: 4 MiB guest→ns in ${secs(t0)} s`);
    expect(r.code, r.out + serverLog(server)).toBe(0);
    const got = existsSync(file) ? readFileSync(file) : Buffer.alloc(0);
    expect({ md5: createHash("md5").update(got).digest("hex"), bytes: got.length }).toEqual({ md5: guest!.result("md5")!, bytes: 4 * MiB });
  }, STEP_MS + 5000);

  test("the guest powers off cleanly; the server logged no error and counted frames on the tap", async () => {
    guest!.send("exit");
    await guest!.finish(STEP_MS);
    await server!.stop();
    const log = server!.log();
    console.log(`net.test.ts tap:\n${log.split("\n").filter((l) => /net port|tap/.test(l)).join("\n")}`);
    expect(log).not.toMatch(/bunvhost(\[\w+\])?: error|broken/);
    expect(log).toMatch(/net port 0: from guest [1-9]\d*, to guest [1-9]/);
    expect(log).toMatch(new RegExp(`net tap ${tap}: from host [1-9]\\d*, to host [1-9]`));
  }, 2 * STEP_MS);
});

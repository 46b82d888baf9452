/**
 * examples/console.ts (virtio-console, VIRTIO 1.2 §5.3, one port) through
 * the test kit only: startDevice() serves it in this process (the module's
 * prepare() and factory) or through the CLI (`server.ts examples/console.ts`),
 * and DeviceDriver drives it over real vhost-user on split and packed
 * rings: --input and socket clients into receive buffers (receiveq 0, a
 * receive queue), the guest's output from the transmitq to a file, stdout
 * and the clients, the config space and emergency write, a backlog that
 * overruns, hostile chains, and the waiting input saved on one server and
 * loaded on another through DEVICE_STATE. No guest: QEMU 7.2 has no
 * vhost-user front-end for a console.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import create, { prepare } from "../../examples/console.ts";
import type { DeviceLog, OptionValues } from "../../src/index.ts";
import { DeviceDriver, startDevice, type Completion } from "../../src/testing/index.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";

const RECEIVEQ = 0, TRANSMITQ = 1;
const F_SIZE = 1n << 0n, F_MULTIPORT = 1n << 1n, F_EMERG_WRITE = 1n << 2n;
const DS = bit(ProtocolFeature.DEVICE_STATE);
const enc = new TextEncoder(), dec = new TextDecoder();
const text = (c: Completion) => dec.decode(c.data);

let dir = "";
let n = 0;
const fresh = (name: string) => join(dir, `${n++}-${name}`);
beforeAll(() => { dir = mkdtempSync("/tmp/bunvhost-console-test-"); });
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The device built as the CLI would (prepare, then the factory), with its log lines kept. */
function consoleDevice(values: OptionValues) {
  const lines: string[] = [];
  const keep = (level: string) => (m: string) => void lines.push(`${level}: ${m}`);
  const log: DeviceLog = { debug: keep("debug"), info: keep("info"), warn: keep("warn"), error: keep("error") };
  return { device: create(prepare(values, { threads: 0, log }), { thread: "main", log }), lines };
}

async function until(what: string, cond: () => boolean, ms = 3000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(2);
  }
}

/** A client of --listen, collecting what the device sends it. */
async function client(path: string) {
  let got = "";
  const s = await Bun.connect({ unix: path, socket: { data(_s, d) { got += d.toString(); } } });
  return { send: (t: string) => expect(s.write(t)).toBe(Buffer.byteLength(t)), got: () => got, end: () => s.end() };
}

describe("console served in-process (prepare + factory)", () => {
  for (const packed of [false, true]) {
    test(`--input fills the first receive buffers, the transmitq goes to --output, config and emergency write (${packed ? "packed" : "split"})`, async () => {
      const out = fresh("out.txt");
      const { device } = consoleDevice({ input: "hello\\n\\x41\\\\", output: out, cols: 80, rows: 24 });
      const dev = await startDevice(device);
      const drv = await DeviceDriver.connect(dev.socket, { packed, queueSize: packed ? 16 : 32 });
      try {
        expect(drv.queueCount).toBe(2);
        expect(drv.offered & (F_SIZE | F_MULTIPORT | F_EMERG_WRITE)).toBe(F_SIZE | F_EMERG_WRITE);
        // struct virtio_console_config (VIRTIO 1.2 order): rows 24, cols 80, max_nr_ports 1, emerg_wr.
        expect([...(await drv.config(0, 12))]).toEqual([24, 0, 80, 0, 1, 0, 0, 0, 0, 0, 0, 0]);

        // "hello\nA\\" is 8 bytes: two 4-byte buffers; a third waits, held by nobody, until there is input.
        const rx = [drv.post(RECEIVEQ, { writable: 4 }), drv.post(RECEIVEQ, { writable: 4 })];
        expect((await drv.wait(Promise.all(rx))).map(text)).toEqual(["hell", "o\nA\\"]);
        let third = false;
        void drv.post(RECEIVEQ, { writable: 64 }).then(() => (third = true), () => {});
        for (let i = 0; i < 10; i++) { drv.poll(); await Bun.sleep(2); }
        expect(third).toBe(false);

        // Output: one buffer, then one split across three; nothing written back.
        expect((await drv.submit(TRANSMITQ, { readable: enc.encode("guest says hi\n") })).len).toBe(0);
        const parts = ["split ", "across ", "buffers\n"].map((s) => enc.encode(s));
        expect((await drv.submit(TRANSMITQ, { readable: parts })).len).toBe(0);
        // Emergency write: the low byte of a whole emerg_wr write; a partial write or a NUL outputs nothing.
        await drv.setConfig(8, new Uint8Array([0x21, 0, 0, 0]));
        await drv.setConfig(9, new Uint8Array([0x3f]));
        await drv.setConfig(0, new Uint8Array(12));
        expect(readFileSync(out, "utf8")).toBe("guest says hi\nsplit across buffers\n!");
        // The device's part of the config space is not the driver's to change.
        expect([...(await drv.config(0, 4))]).toEqual([24, 0, 80, 0]);
      } finally {
        drv.close();
        await dev.stop();
      }
      expect(dev.log()).not.toMatch(/error|broken/);
    });
  }

  test("without --cols/--rows no VIRTIO_CONSOLE_F_SIZE and a zero size; no --input: receive buffers wait, and GET_VRING_BASE does not", async () => {
    const dev = await startDevice(consoleDevice({ output: fresh("out.txt") }).device);
    const drv = await DeviceDriver.connect(dev.socket);
    try {
      expect(drv.offered & (F_SIZE | F_MULTIPORT | F_EMERG_WRITE)).toBe(F_EMERG_WRITE);
      expect([...(await drv.config(0, 12))]).toEqual([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
      for (let i = 0; i < 8; i++) drv.post(RECEIVEQ, { writable: 16 });
      const t0 = performance.now();
      expect(await drv.stop()).toHaveLength(2);
      expect(performance.now() - t0).toBeLessThan(1000);
    } finally {
      drv.close();
      await dev.stop();
    }
  });

  test("--listen: clients type to the guest (before and after it gives buffers) and see its output", async () => {
    const sock = fresh("console.in");
    const { device, lines } = consoleDevice({ listen: sock, output: fresh("out.txt") });
    const dev = await startDevice(device);
    const drv = await DeviceDriver.connect(dev.socket, { packed: true });
    const a = await client(sock), b = await client(sock);
    try {
      // Typed while the driver has no buffers: waits in the backlog.
      a.send("typed early\n");
      await until("the input to arrive", () => lines.some((l) => l.includes("12 bytes of input")));
      expect(text(await drv.wait(drv.post(RECEIVEQ, { writable: 64 })))).toBe("typed early\n");
      // A buffer already waiting takes the next input at once, from either client.
      const next = drv.post(RECEIVEQ, { writable: 64 });
      b.send("ls\n");
      expect(text(await drv.wait(next))).toBe("ls\n");
      // The guest's output reaches every client.
      await drv.submit(TRANSMITQ, { readable: enc.encode("bin etc\n") });
      await until("both clients to see the output", () => a.got() === "bin etc\n" && b.got() === "bin etc\n");
    } finally {
      a.end();
      b.end();
      drv.close();
      await dev.stop();
    }
  });

  test("input past the 64 KiB backlog is dropped (one warning) and what was kept arrives whole and in order", async () => {
    const sock = fresh("console.in");
    const { device, lines } = consoleDevice({ listen: sock, output: fresh("out.txt") });
    const dev = await startDevice(device);
    const drv = await DeviceDriver.connect(dev.socket, { queueSize: 32 });
    const c = await client(sock);
    try {
      // 80 000 bytes, counting upward: which ones survive is visible in the data.
      const sent = Array.from({ length: 80_000 }, (_, i) => String.fromCharCode(65 + (i % 26))).join("");
      for (let i = 0; i < sent.length; i += 8000) {
        c.send(sent.slice(i, i + 8000));
        await Bun.sleep(1);
      }
      const arrived = () => lines.reduce((sum, l) => sum + Number(/(\d+) bytes of input/.exec(l)?.[1] ?? 0), 0);
      await until("every byte to reach the device", () => arrived() === sent.length);
      const got = await drv.wait(Promise.all(Array.from({ length: 16 }, () => drv.post(RECEIVEQ, { writable: 4096 }))));
      expect(got.map(text).join("")).toBe(sent.slice(0, 65536));
      // Nothing else was kept: one more buffer waits.
      let more = false;
      void drv.post(RECEIVEQ, { writable: 4096 }).then(() => (more = true), () => {});
      for (let i = 0; i < 10; i++) { drv.poll(); await Bun.sleep(2); }
      expect(more).toBe(false);
      expect(lines.filter((l) => l.startsWith("warn")).map((l) => l.replace(/\d+ bytes/, "N bytes"))).toEqual(["warn: console: the guest reads no input: N bytes wait, new input dropped until it does"]);
    } finally {
      c.end();
      drv.close();
      await dev.stop();
    }
  });

  test("hostile chains: receive buffers with no room, transmit chains with writable buffers; the device keeps serving", async () => {
    const out = fresh("out.txt");
    const { device } = consoleDevice({ input: "abcdef", output: out });
    const dev = await startDevice(device);
    const drv = await DeviceDriver.connect(dev.socket);
    try {
      // A readable-only chain on the receiveq (the driver MUST NOT): used with nothing written, the input waits.
      const noRoom = await drv.wait(drv.post(RECEIVEQ, { readable: enc.encode("junk") }));
      expect(noRoom.len).toBe(0);
      // Readable buffers before the writable ones are skipped; the writable ones are filled.
      const mixed = await drv.wait(drv.post(RECEIVEQ, { readable: enc.encode("junk"), writable: [2, 1] }));
      expect([mixed.len, text(mixed)]).toEqual([3, "abc"]);
      // On the transmitq, writable buffers are ignored (used length 0), readable ones are output.
      expect((await drv.submit(TRANSMITQ, { writable: 16 })).len).toBe(0);
      expect((await drv.submit(TRANSMITQ, { readable: enc.encode("out"), writable: 16 })).len).toBe(0);
      // Large output: 1 MiB in 16 buffers arrives whole.
      const big = new Uint8Array(1 << 20).map((_, i) => 97 + (i % 26));
      const chunks = Array.from({ length: 16 }, (_, i) => big.subarray(i << 16, (i + 1) << 16));
      expect((await drv.submit(TRANSMITQ, { readable: chunks })).len).toBe(0);
      const written = readFileSync(out);
      expect(written.length).toBe(3 + (1 << 20));
      expect(written.subarray(0, 3).toString()).toBe("out");
      expect(Buffer.compare(written.subarray(3), big)).toBe(0);
      // Still serving: the rest of the input.
      expect(text(await drv.wait(drv.post(RECEIVEQ, { writable: 64 })))).toBe("def");
    } finally {
      drv.close();
      await dev.stop();
    }
    expect(dev.log()).not.toMatch(/error|broken/);
  });
});

describe("console through the CLI (server.ts examples/console.ts)", () => {
  test("--input and --listen from the command line, output on stdout, waiting input moved in from another server by DEVICE_STATE", async () => {
    const sock = fresh("cli.in");
    const cli = await startDevice("examples/console.ts", { options: { input: "boot\\n", listen: sock } });
    try {
      expect(cli.log()).toMatch(/console \(output to stdout, clients on .*cli\.in, VIRTIO id 3, 2 queues on main loop\)/);
      const drv = await DeviceDriver.connect(cli.socket, { protocolFeatures: DS });
      const c = await client(sock);
      try {
        expect(text(await drv.wait(drv.post(RECEIVEQ, { writable: 64 })))).toBe("boot\n");
        await drv.submit(TRANSMITQ, { readable: enc.encode("hello from the guest\n") });
        await until("stdout and the client", () => cli.log().includes("hello from the guest\n") && c.got() === "hello from the guest\n");
        const typed = drv.post(RECEIVEQ, { writable: 64 });
        c.send("whoami\n");
        expect(text(await drv.wait(typed))).toBe("whoami\n");

        // Input waiting on another server (in-process) is saved there...
        const other = consoleDevice({ listen: fresh("a.in"), input: "from a\\n" });
        const a = await startDevice(other.device);
        const da = await DeviceDriver.connect(a.socket, { protocolFeatures: DS });
        let state: Uint8Array;
        try {
          await da.stop();
          state = await da.saveState();
        } finally {
          da.close();
          await a.stop();
        }
        expect(dec.decode(state)).toBe("\x01from a\n");
        // ...and loaded here, where it replaces what was waiting; a state of another version is refused.
        await drv.stop();
        expect(await drv.loadState(Uint8Array.of(2, 65))).toBe(1);
        expect(await drv.loadState(state)).toBe(0);
        await drv.resume();
        expect(text(await drv.wait(drv.post(RECEIVEQ, { writable: 64 })))).toBe("from a\n");
      } finally {
        c.end();
        drv.close();
      }
    } finally {
      await cli.stop();
    }
    expect(cli.log()).toMatch(/device state load failed: load: console state: version 2/);
    expect(cli.log()).not.toMatch(/broken|uncaught|internal error/);
  });

  test("a reload (control socket) keeps the --listen clients connected and carries the waiting input over, --input not repeated", async () => {
    const sock = fresh("r.in"), ctl = fresh("r.ctl");
    const cli = await startDevice("examples/console.ts", { options: { input: "x", listen: sock }, args: ["--control", ctl], logLevel: "debug" });
    const drv = await DeviceDriver.connect(cli.socket, { packed: true });
    const c = await client(sock);
    const control = async (cmd: string) => {
      let r = "";
      const s = await Bun.connect({ unix: ctl, socket: { data(_s, d) { r += d.toString(); } } });
      s.write(cmd + "\n");
      await until("the control reply", () => r.includes("\n"));
      s.end();
      return r.trim();
    };
    try {
      c.send("before ");
      await until("the input to arrive", () => cli.log().includes("console: 7 bytes of input"));
      expect(await control("reload")).toMatch(/^ok paused [\d.]+ ms$/);
      c.send("after");
      await until("the input to arrive after the reload", () => cli.log().includes("console: 5 bytes of input"));
      expect(text(await drv.wait(drv.post(RECEIVEQ, { writable: 64 })))).toBe("xbefore after");
      await drv.submit(TRANSMITQ, { readable: enc.encode("still here\n") });
      await until("the client to see the output", () => c.got() === "still here\n");
    } finally {
      c.end();
      drv.close();
      await cli.stop();
    }
    expect(cli.log()).toMatch(/reloaded .*examples\/console\.ts/);
  });

  test("bad options exit 2 with the option named", async () => {
    const fail = (options: OptionValues, threads?: number) => startDevice("examples/console.ts", { options, threads }).then(() => null, (e: Error) => e.message);
    expect(await fail({ listen: fresh("x.in") }, 1)).toMatch(/exited with status 2[\s\S]*use --threads 0/);
    expect(await fail({ cols: 80 })).toMatch(/exited with status 2[\s\S]*give both --cols and --rows/);
  });
});

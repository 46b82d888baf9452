/**
 * server.ts as a user runs it: device names and module paths, declared
 * options, usage errors (exit 2), refused modules (exit 1, naming the module
 * and the field), and the start line with the QEMU options for the device.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const ROOT = resolve(import.meta.dir, "../..");
const API = JSON.stringify(join(ROOT, "src/device/api.ts"));
let dir = "";

beforeAll(() => {
  dir = mkdtempSync("/tmp/bunvhost-cli-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs server.ts to completion (for commands that exit by themselves). */
function run(args: string[]): { code: number; out: string; err: string } {
  const p = Bun.spawnSync([process.execPath, "run", join(ROOT, "server.ts"), ...args], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
}

/** Starts server.ts, waits for its start line, stops it with SIGTERM; returns the line and the exit code. */
async function startLine(args: string[]): Promise<{ line: string; code: number; err: string }> {
  const p = Bun.spawn([process.execPath, "run", join(ROOT, "server.ts"), ...args], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  const reader = p.stdout.getReader();
  let out = "";
  const deadline = Date.now() + 10_000;
  while (!out.includes("\n") && Date.now() < deadline) {
    const { value, done } = await reader.read();
    if (done) break;
    out += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  p.kill("SIGTERM");
  const code = await p.exited;
  return { line: out.split("\n")[0]!, code, err: await new Response(p.stderr).text() };
}

function module(name: string, body: string): string {
  const p = join(dir, name);
  writeFileSync(p, `import type { Device } from ${API};\n${body}\n`);
  return p;
}

const GOOD = `{ name: "echo", type: 42, queues: 2, queueSize: 64, features: 0n, config: () => new Uint8Array(4), handle() {} }`;

describe("server.ts CLI", () => {
  test("an unknown option exits 2 with the usage", () => {
    const r = run(["--bogus"]);
    expect(r.code).toBe(2);
    expect(r.err).toContain("Unknown option '--bogus'");
    expect(r.err).toContain("usage: bun run server.ts [DEVICE] [options]");
  });

  test("blk --help lists the common options and blk's own, exit 0", () => {
    const r = run(["blk", "--help"]);
    expect(r.code).toBe(0);
    for (const o of ["--socket PATH", "--threads N", "--watch", "--image FILE", "--aio auto|uring|sync", "--serial ID"]) expect(r.out).toContain(o);
  });

  test("a bad value of a device option exits 2 naming it", () => {
    expect(run(["--queues", "0"]).err).toContain("--queues must be at least 1");
    expect(run(["--queues", "0"]).code).toBe(2);
    const r = run(["--aio", "fast", "--image", "x"]);
    expect(r.code).toBe(2);
    expect(r.err).toContain("--aio must be auto, uring or sync");
    expect(run(["--size", "64M", "--null", "1G"]).err).toContain("give at most one of --image, --size, --null");
  });

  test("the default device is blk and today's command lines still work (start line with vhost-user-blk-pci)", async () => {
    const r = await startLine(["--size", "64M", "--socket", join(dir, "blk.sock"), "--queues", "2", "--threads", "0"]);
    expect(r.line).toContain("bunvhost: vhost-user-blk (RAM disk of 67108864 bytes, VIRTIO id 2, 2 queues on main loop)");
    expect(r.line).toContain(`-chardev socket,id=vu0,path=${join(dir, "blk.sock")} -device vhost-user-blk-pci,chardev=vu0,num-queues=2`);
    expect(r.code).toBe(0);
  });

  test("a device file is served with its declared option, on 2 I/O threads, and the generic QEMU 8.2 line is printed", async () => {
    const p = module("echo.ts", `export const options = { greeting: { type: "string", default: "hi", help: "what to say" } };
export default (o: { greeting: string }, ctx: { thread: string }): Device => ({ ...${GOOD}, name: "echo-" + o.greeting });`);
    expect(run([p, "--help"]).out).toContain("--greeting VALUE     what to say (default hi)");
    const r = await startLine([p, "--greeting", "yo", "--socket", join(dir, "echo.sock"), "--threads", "2"]);
    expect(r.line).toContain("bunvhost: echo-yo (VIRTIO id 42, 2 queues on 2 I/O threads)");
    expect(r.line).toContain("vhost-user-device-pci,chardev=vu0,virtio-id=42,num_vqs=2,config_size=4 (QEMU 8.2 or later");
    expect(r.code).toBe(0);
  });

  const refused: [string, string, string][] = [
    ["no default export", "export const x = 1;", "default: the module must `export default` a Device"],
    ["VIRTIO id out of range", `export default { ...${GOOD}, type: 70 };`, "type: VIRTIO device id 70: must be an integer in 1..63"],
    ["no queues", `export default { ...${GOOD}, queues: 0 };`, "queues: 0: must be an integer in 1..256"],
    ["queue size not a power of 2", `export default { ...${GOOD}, queueSize: 100 };`, "queueSize: 100: must be a power of 2"],
    ["config() not bytes", `export default { ...${GOOD}, config: () => "abc" };`, "config(): must return a Uint8Array"],
    ["handle missing", `export default { ...${GOOD}, handle: undefined };`, "handle: must be a function"],
    ["transport feature bits", `export default { ...${GOOD}, features: 1n << 32n };`, "features: bits 24..41 are transport and ring features"],
    ["a factory that throws", `export default () => { throw new Error("no backing here"); };`, "default(): the factory threw: no backing here"],
    ["receive queue without available()", `export default { ...${GOOD}, receiveQueues: [0] };`, "available: a device with receiveQueues must have available(queue)"],
    ["an option named like a common one", `export const options = { socket: { type: "string", help: "x" } };\nexport default ${GOOD};`, "options.socket: is a common option of the server"],
  ];
  for (const [what, body, msg] of refused) {
    test(`a device module with ${what} is refused at start: exit 1, the module and the field named`, () => {
      const p = module(`bad-${what.replace(/\W+/g, "-")}.ts`, body);
      const r = run([p, "--socket", join(dir, "bad.sock")]);
      expect(r.code).toBe(1);
      expect(r.err).toContain(`${p}: ${msg}`);
    });
  }

  test("a syntax error is reported with file:line, exit 1", () => {
    const p = join(dir, "syntax.ts");
    writeFileSync(p, "export default {\n  name: 'x',,\n};\n");
    const r = run([p]);
    expect(r.code).toBe(1);
    expect(r.err).toContain(`${p}: import:`);
    expect(r.err).toMatch(new RegExp(`${p.replace(/[.]/g, "\\.")}:2:\\d+`));
  });

  test("a missing device file or unknown built-in exits 1 listing the built-ins", () => {
    const r = run(["nosuchdevice"]);
    expect(r.code).toBe(1);
    expect(r.err).toContain("nosuchdevice: path: no such file (built-in devices: blk, rng, input, net, fs)");
  });
});

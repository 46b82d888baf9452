/**
 * `server.ts new NAME` (src/cli/new.ts) as a user runs it: each template is
 * written into a fresh directory; existing files are refused (exit 1, none
 * written); bad arguments print the usage (exit 2). The proof that the
 * written files work: the CLI serves each device file (start line with the
 * QEMU options for its VIRTIO id; SIGTERM ends it with status 0), and the
 * generated tests pass under `bun test`. The files import "bunvhost" by its
 * package name, so the directory gets node_modules/bunvhost → this clone, as
 * `npm install <dir>` would link it.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { scratchDir } from "../support/backends.ts";

const ROOT = resolve(import.meta.dir, "../..");
const dir = scratchDir("bunvhost-scaffold-");
mkdirSync(join(dir, "node_modules"));
symlinkSync(ROOT, join(dir, "node_modules", "bunvhost"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs server.ts (in `cwd`) to completion. */
function run(args: string[], cwd = dir): { code: number; out: string; err: string } {
  const p = Bun.spawnSync([process.execPath, "run", join(ROOT, "server.ts"), ...args], { cwd, stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
}

/** Serves a device file until its start line, then SIGTERM; returns the line and the exit status. */
async function serveOnce(file: string, socket: string): Promise<{ line: string; code: number | null; err: string }> {
  const p = Bun.spawn([process.execPath, "run", join(ROOT, "server.ts"), file, "--socket", socket], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  const reader = p.stdout.getReader();
  const dec = new TextDecoder();
  let out = "";
  const timer = setTimeout(() => p.kill("SIGKILL"), 15_000);
  while (!out.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    out += dec.decode(value);
  }
  reader.releaseLock();
  p.kill("SIGTERM");
  const code = await p.exited;
  clearTimeout(timer);
  return { line: out.split("\n")[0]!, code, err: await new Response(p.stderr).text() };
}

const TYPES = [
  { type: "rng", qemu: "-device vhost-user-rng-pci,chardev=vu0", what: "VIRTIO id 4, 1 queue on 1 I/O thread" },
  { type: "input", qemu: "-device vhost-user-input-pci,chardev=vu0", what: "VIRTIO id 18, 2 queues on main loop" },
  {
    type: "blank",
    qemu: "-device vhost-user-device-pci,chardev=vu0,virtio-id=50,num_vqs=1,config_size=4 (QEMU 8.2 or later",
    what: "echo, VIRTIO id 50, 1 queue on 1 I/O thread",
  },
] as const;

describe("server.ts new", () => {
  for (const { type, qemu, what } of TYPES) {
    const name = `my_${type}-dev`;
    const sub = join(dir, type);

    test(`--type ${type} writes ${name}.ts and ${name}.test.ts into --dir, importing bunvhost by package name`, () => {
      const r = run(["new", name, "--type", type, "--dir", sub]);
      expect(r.err).toBe("");
      expect(r.code).toBe(0);
      expect(r.out).toContain(`wrote ./${type}/${name}.ts, `);
      expect(r.out).toContain(`npx bunvhost ./${type}/${name}.ts --socket /tmp/${name}.sock`);
      const device = readFileSync(join(sub, `${name}.ts`), "utf8");
      const tests = readFileSync(join(sub, `${name}.test.ts`), "utf8");
      expect(device).toMatch(/^} from "bunvhost";$|^import .* from "bunvhost";$/m);
      expect(tests).toContain(`from "bunvhost/testing";`);
      expect(device).toContain(`name: "${name}"`);
      for (const text of [device, tests]) {
        expect(text).not.toContain("__NAME__");
        expect(text).not.toMatch(/from "\.\.?\/(src|\.\.)/); // nothing reaches into the package's files
      }
    });

    test(`the ${type} device file is served by the CLI: start line with the QEMU options, SIGTERM exits 0`, async () => {
      const socket = join(dir, `${type}.sock`);
      const r = await serveOnce(join(sub, `${name}.ts`), socket);
      expect(r.line).toContain(`bunvhost: ${name} (`);
      expect(r.line).toContain(`${what}) listening on ${socket}`);
      expect(r.line).toContain(`attach with: qemu-system-x86_64 `);
      expect(r.line).toContain(`-chardev socket,id=vu0,path=${socket} ${qemu}`);
      expect(r.err).not.toMatch(/error|warn/);
      expect(r.code).toBe(0);
      expect(existsSync(socket)).toBe(false);
    });

    test(`the generated ${type} test passes under bun test`, () => {
      const p = Bun.spawnSync([process.execPath, "test", `./${name}.test.ts`], { cwd: sub, stdout: "pipe", stderr: "pipe" });
      const out = p.stdout.toString() + p.stderr.toString();
      expect(out).toMatch(/^ 0 fail$/m);
      expect(out).toMatch(/^ [1-9]\d* pass$/m);
      expect(p.exitCode).toBe(0);
    });
  }

  test("the default type is blank, in the current directory", () => {
    const cwd = join(dir, "default");
    mkdirSync(cwd);
    const r = run(["new", "plain"], cwd);
    expect(r.code).toBe(0);
    expect(r.out).toContain("wrote ./plain.ts, an echo device, experimental VIRTIO id 50");
    expect(readFileSync(join(cwd, "plain.ts"), "utf8")).toContain("export const VIRTIO_ID = 50;");
    expect(existsSync(join(cwd, "plain.test.ts"))).toBe(true);
  });

  test("existing files are never overwritten: exit 1, the files named, neither written", () => {
    const cwd = join(dir, "taken");
    mkdirSync(cwd);
    writeFileSync(join(cwd, "dev.test.ts"), "// mine\n");
    const r = run(["new", "dev", "--type", "rng"], cwd);
    expect(r.code).toBe(1);
    expect(r.err).toContain(`${cwd}/dev.test.ts already exists: nothing written`);
    expect(readFileSync(join(cwd, "dev.test.ts"), "utf8")).toBe("// mine\n");
    expect(existsSync(join(cwd, "dev.ts"))).toBe(false);
    // Once both exist, both are named.
    writeFileSync(join(cwd, "dev.ts"), "// mine too\n");
    expect(run(["new", "dev"], cwd).err).toContain(`${cwd}/dev.ts and ${cwd}/dev.test.ts already exist`);
    expect(readFileSync(join(cwd, "dev.ts"), "utf8")).toBe("// mine too\n");
  });

  const bad: [string, string[], string][] = [
    ["no NAME", ["new"], "NAME is missing"],
    ["two NAMEs", ["new", "a", "b"], "one NAME only, got a b"],
    ["a NAME with .ts", ["new", "dev.ts"], 'bad NAME "dev.ts": a letter, then letters, digits, _ or -, at most 64 (give it without .ts: dev)'],
    ["a NAME with a slash", ["new", "../dev"], 'bad NAME "../dev"'],
    ["a NAME starting with a digit", ["new", "1dev"], 'bad NAME "1dev"'],
    ["a NAME of 65 characters", ["new", "d".repeat(65)], "bad NAME"],
    ["an unknown --type", ["new", "dev", "--type", "net"], '--type must be rng, input or blank, not "net"'],
    ["an unknown option", ["new", "dev", "--force"], "Unknown option '--force'"],
    ["--dir without a value", ["new", "dev", "--dir"], "Option '--dir <value>' argument missing"],
  ];
  for (const [what, args, msg] of bad) {
    test(`${what}: usage, exit 2, nothing written`, () => {
      const cwd = join(dir, `bad-${what.replace(/\W+/g, "-")}`);
      mkdirSync(cwd);
      const r = run(args, cwd);
      expect(r.code).toBe(2);
      expect(r.err).toContain(`bunvhost new: ${msg}`);
      expect(r.err).toContain("usage: bunvhost new NAME [--type rng|input|blank] [--dir DIR]");
      expect(readdirSync(cwd)).toEqual([]);
    });
  }

  test("--help prints the usage, exit 0", () => {
    const r = run(["new", "--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("usage: bunvhost new NAME [--type rng|input|blank] [--dir DIR]");
    expect(r.out).toContain("blank: an echo device, experimental VIRTIO id 50");
  });
});

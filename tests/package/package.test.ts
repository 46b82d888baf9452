/**
 * The package as a user gets it, in a clean directory under /tmp: `npm pack`
 * of this clone (checked: only what a user needs), `npm init -y`, `npm
 * install` of the tarball (which brings Bun itself from npm: bunvhost's one
 * runtime dependency), `npx bunvhost new mydev`, `npx bun test` (the
 * generated test passes), `npx bunvhost ./mydev.ts --socket S` (starts,
 * stops cleanly on SIGTERM), and TypeScript: `tsc --noEmit` accepts the
 * generated files and a file using the public API of "bunvhost" and
 * "bunvhost/testing", and rejects a wrong use of it (the types are real).
 *
 * Needs npm and the npm registry; skips with the reason when either is
 * missing. About 20 s with a warm npm cache.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const ROOT = resolve(import.meta.dir, "../..");
const ENV: Record<string, string | undefined> = {
  ...process.env,
  npm_config_audit: "false",
  npm_config_fund: "false",
  npm_config_update_notifier: "false",
  npm_config_yes: "true",
  NO_COLOR: "1",
};

interface Ran {
  code: number | null;
  out: string;
  err: string;
}

/** Runs a command to completion in `cwd`, killed after `timeoutMs`. */
function sh(cmd: string[], cwd: string, timeoutMs: number): Ran {
  const p = Bun.spawnSync(cmd, { cwd, env: ENV, stdout: "pipe", stderr: "pipe", timeout: timeoutMs });
  return { code: p.exitCode, out: p.stdout.toString(), err: p.stderr.toString() };
}

/** Why this test cannot run here, or null: npm on PATH and the registry answering within 6 s. */
function unavailable(): string | null {
  if (Bun.which("npm") === null) return "npm not found on PATH";
  const r = sh(["npm", "view", "bun", "version", "--fetch-retries=0", "--fetch-timeout=5000"], ROOT, 6_000);
  if (r.code !== 0) return `the npm registry does not answer (npm view bun version: ${r.err.trim().split("\n")[0] || "no reply within 6 s"})`;
  return null;
}
const skip = unavailable();

describe.skipIf(skip !== null)(`the npm package, installed in a clean project${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  let t0 = 0;
  let dir = "";
  beforeAll(() => {
    t0 = performance.now();
    dir = mkdtempSync("/tmp/bunvhost-package-");
  });
  const timings: string[] = [];
  /** Runs f (sync or async) and notes how long it took. */
  const timed = <T>(what: string, f: () => T): T => {
    const t = performance.now();
    const done = () => void timings.push(`${what}: ${((performance.now() - t) / 1000).toFixed(1)} s`);
    const r = f();
    if (r instanceof Promise) return r.finally(done) as T;
    done();
    return r;
  };
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
    console.log(`package.test.ts: ${timings.join(", ")}; ${((performance.now() - t0) / 1000).toFixed(1)} s in all`);
  });
  let tarball = "";

  test("npm pack: the tarball holds what a user needs and none of tests/, build/, node_modules/", () => {
    const r = timed("pack", () => sh(["npm", "pack", ROOT, "--pack-destination", dir, "--json"], dir, 30_000));
    expect(r.code).toBe(0);
    const [info] = JSON.parse(r.out) as { filename: string; size: number; unpackedSize: number; files: { path: string }[] }[];
    tarball = join(dir, info!.filename);
    expect(existsSync(tarball)).toBe(true);
    const paths = info!.files.map((f) => f.path);
    for (const p of ["package.json", "README.md", "bin/bunvhost.js", "server.ts", "src/index.ts", "src/testing/index.ts", "src/frontend/index.ts",
      "src/device/api.ts", "ffi/libc.ts", "src/cli/new.ts", "src/cli/templates/blank.ts.tmpl", "src/cli/templates/blank.test.ts.tmpl"]) {
      expect(paths).toContain(p);
    }
    const stray = paths.filter((p) => /^(tests|build|node_modules|\.ci|\.git)\//.test(p) || p.endsWith(".test.ts") || p === "package-lock.json");
    expect(stray).toEqual([]);
    console.log(`package.test.ts: ${info!.filename}: ${paths.length} files, ${(info!.size / 1024).toFixed(0)} KiB packed, ${(info!.unpackedSize / 1024).toFixed(0)} KiB unpacked`);
  }, 40_000);

  test("npm init -y && npm install <tarball>: bunvhost and Bun itself (its one dependency) are installed", () => {
    expect(sh(["npm", "init", "-y"], dir, 20_000).code).toBe(0);
    const r = timed("install", () => sh(["npm", "install", tarball], dir, 90_000));
    expect(r.err).not.toMatch(/npm (error|ERR!)/);
    expect(r.code).toBe(0);
    expect(existsSync(join(dir, "node_modules/.bin/bunvhost"))).toBe(true);
    expect(existsSync(join(dir, "node_modules/.bin/bun"))).toBe(true);
    const v = sh(["npx", "bun", "--version"], dir, 20_000);
    expect(v.out.trim()).toBe(JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")).dependencies.bun);
  }, 120_000);

  test("npx bunvhost new mydev writes the device and its test", () => {
    const r = timed("new", () => sh(["npx", "bunvhost", "new", "mydev"], dir, 20_000));
    expect(r.err).toBe("");
    expect(r.code).toBe(0);
    expect(r.out).toContain("wrote ./mydev.ts, an echo device");
    expect(r.out).not.toContain("not installed");
    expect(readFileSync(join(dir, "mydev.ts"), "utf8")).toContain('} from "bunvhost";');
  }, 30_000);

  test("npx bun test: the generated test passes against the installed package", () => {
    const r = timed("bun test", () => sh(["npx", "bun", "test"], dir, 60_000));
    const out = r.out + r.err;
    expect(out).toMatch(/^ 0 fail$/m);
    expect(out).toMatch(/^ 4 pass$/m);
    expect(r.code).toBe(0);
  }, 70_000);

  test("npx bunvhost ./mydev.ts --socket S starts; SIGTERM stops it (socket removed, no process left); the bin itself exits 0", async () => {
    const socket = join(dir, "mydev.sock");
    /** Starts `cmd` as its own process group; resolves with its start line. */
    const start = async (cmd: string[]) => {
      const p = Bun.spawn(cmd, { cwd: dir, env: ENV, stdout: "pipe", stderr: "pipe", detached: true });
      const reader = p.stdout.getReader();
      const dec = new TextDecoder();
      let out = "";
      const deadline = setTimeout(() => process.kill(-p.pid, "SIGKILL"), 20_000);
      while (!out.includes("\n")) {
        const { value, done } = await reader.read();
        if (done) break;
        out += dec.decode(value);
      }
      reader.releaseLock();
      clearTimeout(deadline);
      return { p, line: out.split("\n")[0]! };
    };
    const groupAlive = (pid: number) => {
      try {
        process.kill(-pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    await timed("serve", async () => {
      // npx runs npm, a shell, node (bin/bunvhost.js) and Bun: the signal goes to all of them, as a terminal's
      // Ctrl-C or a service manager's stop does (npm's shell does not pass a signal sent to npm alone on).
      const npx = await start(["npx", "bunvhost", "./mydev.ts", "--socket", socket]);
      try {
        expect(npx.line).toContain(`bunvhost: mydev (echo, VIRTIO id 50, 1 queue on 1 I/O thread) listening on ${socket}`);
        expect(npx.line).toContain("attach with: qemu-system-x86_64 ");
        expect(existsSync(socket)).toBe(true);
        process.kill(-npx.p.pid, "SIGTERM");
        await npx.p.exited;
        const err = await new Response(npx.p.stderr).text();
        expect(err).toContain("bunvhost: info: SIGTERM: stopping");
        for (let i = 0; i < 100 && groupAlive(npx.p.pid); i++) await Bun.sleep(20);
        expect(groupAlive(npx.p.pid)).toBe(false);
        expect(existsSync(socket)).toBe(false);
      } finally {
        if (groupAlive(npx.p.pid)) process.kill(-npx.p.pid, "SIGKILL");
      }
      // What npx runs, signalled alone: it passes SIGTERM on to Bun and exits as the server did.
      const bin = await start([join(dir, "node_modules/.bin/bunvhost"), "./mydev.ts", "--socket", socket]);
      try {
        expect(bin.line).toContain(`listening on ${socket}`);
        bin.p.kill("SIGTERM");
        expect(await bin.p.exited).toBe(0);
        for (let i = 0; i < 100 && groupAlive(bin.p.pid); i++) await Bun.sleep(20);
        expect(groupAlive(bin.p.pid)).toBe(false);
        expect(existsSync(socket)).toBe(false);
      } finally {
        if (groupAlive(bin.p.pid)) process.kill(-bin.p.pid, "SIGKILL");
      }
    });
  }, 60_000);

  test('TypeScript (strict, noUncheckedIndexedAccess): import ... from "bunvhost" and "bunvhost/testing" type-checks (and a wrong use does not); the file runs', () => {
    const i = timed("install typescript", () => sh(["npm", "install", "--save-dev", "typescript@7", "bun-types@1.4.5"], dir, 90_000));
    expect(i.code).toBe(0);
    writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({
      compilerOptions: {
        target: "ESNext", module: "ESNext", moduleResolution: "bundler", lib: ["ESNext"], types: ["bun-types"],
        // The strictest common settings: the package ships its .ts sources, checked under the user's options.
        strict: true, noUncheckedIndexedAccess: true, allowImportingTsExtensions: true, noEmit: true, skipLibCheck: true,
      },
      include: ["*.ts"],
    }, null, 2));
    writeFileSync(join(dir, "uses.ts"), `import { OptionError, PENDING, serve, VIRTIO_ID_RNG, type Device, type DeviceOptions, type Request } from "bunvhost";
import { DeviceDriver, startDevice, type Completion, type RunningDevice } from "bunvhost/testing";

export const options = { fill: { type: "number", default: 7, min: 0, max: 255, help: "the byte to write" } } satisfies DeviceOptions;

/** Completes each request a millisecond later, filled with 7s. */
export const later: Device = {
  name: "later", type: VIRTIO_ID_RNG, queues: 1, queueSize: 64, features: 0n,
  config: () => new Uint8Array(0),
  handle(req: Request) {
    setTimeout(() => {
      req.out.fill(req.out.remaining, 7);
      req.complete();
    }, 1);
    return PENDING;
  },
};

export function check(v: number): number {
  if (v > 255) throw new OptionError("--fill: at most 255");
  return v;
}

export async function roundTrip(socket: string): Promise<Completion> {
  const served = await serve(later, { socket });
  await served.stop();
  const dev: RunningDevice = await startDevice(later);
  const drv = await DeviceDriver.connect(dev);
  try {
    return await drv.submit(0, { writable: 16 });
  } finally {
    drv.close();
    await dev.stop();
  }
}

if (import.meta.main) {
  const c = await roundTrip(process.argv[2]!);
  console.log(\`used \${c.len} bytes of \${c.data[0]}\`);
}
`);
    const good = timed("tsc", () => sh(["npx", "tsc", "--noEmit", "-p", "."], dir, 60_000));
    expect(good.out + good.err).toBe("");
    expect(good.code).toBe(0);
    writeFileSync(join(dir, "wrong.ts"), `import { PENDING } from "bunvhost";\nexport const n: number = PENDING;\n`);
    const bad = sh(["npx", "tsc", "--noEmit", "-p", "."], dir, 60_000);
    const errors = (bad.out + bad.err).trim().split("\n");
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/^wrong\.ts\(2,14\): error TS2322: Type 'typeof .*PENDING' is not assignable to type 'number'\.$/);
    expect(bad.code).not.toBe(0);
    const ran = sh(["npx", "bun", "run", "uses.ts", join(dir, "uses.sock")], dir, 30_000);
    expect(ran.err).toBe("");
    expect(ran.out).toBe("used 16 bytes of 7\n");
  }, 120_000);
});

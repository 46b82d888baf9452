/**
 * Device modules: finding them (a built-in name or a file), importing them
 * (fresh, for a reload), checking what they export, parsing the options they
 * declare, and building an instance in any thread.
 *
 * A module's default export is a Device or a factory `(options, ctx) =>
 * Device | Promise<Device>`; `options`, `prepare`, `defaults` and `describe`
 * are optional (src/device/api.ts, DeviceModule). Every thread that serves
 * queues imports the same file and builds its own instance from the same
 * prepared options, so a device file works with `--threads N`.
 */
import { existsSync, realpathSync } from "node:fs";
import { dirname, isAbsolute, resolve, sep } from "node:path";
import { pathToFileURL } from "node:url";
import { MAX_CONFIG_SIZE } from "../protocol/messages.ts";
import { TRANSPORT_FEATURES } from "../protocol/features.ts";
import type { Device, DeviceContext, DeviceModule, DeviceOption, DeviceOptions, OptionValues } from "../device/api.ts";

/** The bunvhost package root (this file is src/server/device_module.ts). */
export const PACKAGE_ROOT = resolve(import.meta.dir, "../..");

/** Devices that ship with bunvhost, by name. */
export const BUILTIN_DEVICES: Readonly<Record<string, string>> = {
  blk: resolve(PACKAGE_ROOT, "src/devices/blk.ts"),
  rng: resolve(PACKAGE_ROOT, "src/devices/rng.ts"),
  input: resolve(PACKAGE_ROOT, "src/devices/input.ts"),
  net: resolve(PACKAGE_ROOT, "src/devices/net.ts"),
  fs: resolve(PACKAGE_ROOT, "src/devices/fs.ts"),
};

/** A device module or device that cannot be used, naming the module and the field. */
export class DeviceModuleError extends Error {
  override name = "DeviceModuleError";
  constructor(readonly module: string, readonly field: string, detail: string) {
    super(`${module}: ${field}: ${detail}`);
  }
}

/** A built-in name or a path (relative to `cwd`) → the module's absolute file path. */
export function resolveDevicePath(spec: string, cwd = process.cwd()): string {
  const builtin = BUILTIN_DEVICES[spec];
  if (builtin !== undefined) return builtin;
  const p = isAbsolute(spec) ? spec : resolve(cwd, spec);
  if (!existsSync(p)) throw new DeviceModuleError(spec, "path", `no such file (built-in devices: ${Object.keys(BUILTIN_DEVICES).join(", ")})`);
  return realpathSync(p);
}

/** True for files that belong to the framework itself (never re-imported: PENDING and the classes must stay one). */
function frameworkFile(p: string): boolean {
  if (p.includes(`${sep}node_modules${sep}`)) return true;
  if (!p.startsWith(PACKAGE_ROOT + sep)) return false;
  const rel = p.slice(PACKAGE_ROOT.length + 1);
  return !(rel.startsWith(`src${sep}devices${sep}`) || rel.startsWith(`examples${sep}`) || rel.startsWith(`tests${sep}`));
}

const transpilers = new Map<string, Bun.Transpiler>();
function scanner(file: string): Bun.Transpiler {
  const loader = file.endsWith(".tsx") ? "tsx" : file.endsWith(".jsx") ? "jsx" : file.endsWith(".js") || file.endsWith(".mjs") ? "js" : "ts";
  let t = transpilers.get(loader);
  if (!t) transpilers.set(loader, (t = new Bun.Transpiler({ loader })));
  return t;
}

/**
 * The device file and the files it imports, transitively, that are the
 * device's own (relative or absolute imports; not packages, not the
 * framework): what --watch watches and what a reload imports afresh.
 */
export async function moduleFiles(file: string): Promise<string[]> {
  const seen = new Set<string>();
  const todo = [file];
  while (todo.length > 0) {
    const f = todo.pop()!;
    if (seen.has(f)) continue;
    seen.add(f);
    let text: string;
    try {
      text = await Bun.file(f).text();
    } catch {
      continue; // gone: the watcher reports it
    }
    let imports: { path: string }[];
    try {
      imports = scanner(f).scanImports(text);
    } catch {
      continue; // a syntax error: the import reports it with file:line
    }
    for (const imp of imports) {
      if (!imp.path.startsWith(".") && !imp.path.startsWith("/")) continue;
      let dep: string;
      try {
        dep = Bun.resolveSync(imp.path, dirname(f));
      } catch {
        continue;
      }
      if (!frameworkFile(dep)) todo.push(dep);
    }
  }
  return [...seen];
}

/** Drops the files from the module cache so that the next import evaluates them again. */
export function forgetModules(files: readonly string[]): void {
  for (const f of files) delete require.cache[f];
}

let generation = 0;

/**
 * Imports a device module and checks its exports. `fresh` re-evaluates the
 * device's own files (a reload); the framework's modules stay as they are.
 */
export async function importDeviceModule(file: string, fresh = false): Promise<DeviceModule> {
  if (fresh) forgetModules(await moduleFiles(file));
  let mod: Record<string, unknown>;
  try {
    // The query makes the entry itself a new module even where the cache entry was not found.
    mod = (await import(fresh ? `${pathToFileURL(file).href}?reload=${++generation}` : file)) as Record<string, unknown>;
  } catch (e) {
    throw new DeviceModuleError(file, "import", describeLoadError(e));
  }
  return checkModule(file, mod);
}

/** An import failure as one line with file:line where Bun gives it. */
export function describeLoadError(e: unknown): string {
  if (!(e instanceof Error)) return String(e);
  type Pos = { file?: string; line?: number; column?: number };
  const anyE = e as Error & { position?: Pos; errors?: { message?: string; position?: Pos }[] };
  // Bun's build errors come as an AggregateError of BuildMessages: the first one says what and where.
  const first = anyE.errors?.[0];
  const pos = anyE.position ?? first?.position;
  const what = first?.message ?? e.message;
  if (pos?.file) return `${what} (${pos.file}:${pos.line ?? "?"}:${pos.column ?? "?"})`;
  // Otherwise the first stack frame that is not ours says where.
  const frame = e.stack?.split("\n").find((l) => /\(?\/.+:\d+:\d+\)?$/.test(l.trim()) && !l.includes(`${PACKAGE_ROOT}${sep}src${sep}server`));
  return frame ? `${e.message} (${frame.trim().replace(/^at\s+/, "")})` : e.message;
}

const OPTION_TYPES = new Set(["string", "number", "boolean", "size"]);

/** Checks a module's exports (not yet the device: a factory may need options). */
export function checkModule(file: string, mod: Record<string, unknown>): DeviceModule {
  const d = mod.default;
  if (d === undefined || d === null || (typeof d !== "object" && typeof d !== "function")) {
    throw new DeviceModuleError(file, "default", "the module must `export default` a Device or a function (options) => Device");
  }
  const options = mod.options;
  if (options !== undefined) {
    if (typeof options !== "object" || options === null) throw new DeviceModuleError(file, "options", "must be an object of option declarations");
    for (const [name, o] of Object.entries(options as Record<string, DeviceOption>)) {
      if (!/^[a-z][a-z0-9-]*$/.test(name)) throw new DeviceModuleError(file, `options.${name}`, "names are lower case letters, digits and dashes");
      if (COMMON_OPTION_NAMES.has(name)) throw new DeviceModuleError(file, `options.${name}`, "is a common option of the server");
      if (!o || !OPTION_TYPES.has(o.type)) throw new DeviceModuleError(file, `options.${name}.type`, `must be one of ${[...OPTION_TYPES].join(", ")}`);
      if (typeof o.help !== "string") throw new DeviceModuleError(file, `options.${name}.help`, "must be a string");
    }
  }
  if (mod.multiPort !== undefined && typeof mod.multiPort !== "boolean") throw new DeviceModuleError(file, "multiPort", "must be a boolean");
  for (const f of ["prepare", "describe"] as const) {
    if (mod[f] !== undefined && typeof mod[f] !== "function") throw new DeviceModuleError(file, f, "must be a function");
  }
  if (mod.defaults !== undefined && (typeof mod.defaults !== "object" || mod.defaults === null)) {
    throw new DeviceModuleError(file, "defaults", "must be an object such as { threads: 0 }");
  }
  return mod as unknown as DeviceModule;
}

/** Options every device gets from the server; a device may not declare these names. */
export const COMMON_OPTION_NAMES = new Set([
  "socket", "threads", "queue-map", "poll-us", "control", "trace", "log-level", "watch", "help",
]);

/**
 * Builds the device: the default export itself, or the factory's result for
 * these (prepared) options; then checks its shape.
 */
export async function instantiate(file: string, mod: DeviceModule, options: unknown, ctx: DeviceContext): Promise<Device> {
  let dev: unknown = mod.default;
  if (typeof dev === "function") {
    try {
      dev = await (dev as (o: unknown, c: DeviceContext) => unknown)(options, ctx);
    } catch (e) {
      throw new DeviceModuleError(file, "default()", `the factory threw: ${describeLoadError(e)}`);
    }
  }
  checkDevice(file, dev);
  return dev;
}

const pow2 = (n: number) => (n & (n - 1)) === 0;

/** Refuses a device of the wrong shape, naming the field. */
export function checkDevice(file: string, d: unknown): asserts d is Device {
  const bad = (field: string, detail: string) => new DeviceModuleError(file, field, detail);
  if (typeof d !== "object" || d === null) throw bad("default", "not a Device object");
  const dev = d as Record<string, unknown>;
  if (typeof dev.name !== "string" || dev.name === "") throw bad("name", "must be a non-empty string");
  const int = (v: unknown, lo: number, hi: number) => typeof v === "number" && Number.isInteger(v) && v >= lo && v <= hi;
  // Modern virtio-pci device ids are 0x1040 + id and end at 0x107f.
  if (!int(dev.type, 1, 63)) throw bad("type", `VIRTIO device id ${String(dev.type)}: must be an integer in 1..63`);
  if (!int(dev.queues, 1, 256)) throw bad("queues", `${String(dev.queues)}: must be an integer in 1..256`);
  if (!int(dev.queueSize, 1, 32768) || !pow2(dev.queueSize as number)) throw bad("queueSize", `${String(dev.queueSize)}: must be a power of 2 in 1..32768`);
  if (typeof dev.features !== "bigint" || dev.features < 0n || dev.features >= 1n << 64n) throw bad("features", "must be a bigint of 64 bits (e.g. 0n)");
  if ((dev.features & TRANSPORT_FEATURES) !== 0n) {
    throw bad("features", "bits 24..41 are transport and ring features: the framework offers them");
  }
  if (dev.publishEvery !== undefined && !int(dev.publishEvery, 0, 32768)) throw bad("publishEvery", `${String(dev.publishEvery)}: must be an integer in 0..32768 (0: once per drain)`);
  if (typeof dev.config !== "function") throw bad("config", "must be a function returning the config space as a Uint8Array");
  let space: unknown;
  try {
    space = (dev.config as () => unknown).call(dev);
  } catch (e) {
    throw bad("config()", `threw: ${e instanceof Error ? e.message : e}`);
  }
  if (!(space instanceof Uint8Array)) throw bad("config()", "must return a Uint8Array (new Uint8Array(0) for none)");
  if (space.length > MAX_CONFIG_SIZE) throw bad("config()", `${space.length} bytes: vhost-user carries at most ${MAX_CONFIG_SIZE}`);
  if (typeof dev.handle !== "function") throw bad("handle", "must be a function (req) => void | Promise<void> | PENDING");
  for (const f of ["setConfig", "setFeatures", "attach", "poll", "refresh", "reset", "close", "saveState", "loadState", "available", "setMtu", "announce"]) {
    if (dev[f] !== undefined && typeof dev[f] !== "function") throw bad(f, "must be a function when present");
  }
  const rq = dev.receiveQueues;
  if (rq !== undefined) {
    if (!Array.isArray(rq) || !rq.every((q) => int(q, 0, (dev.queues as number) - 1))) throw bad("receiveQueues", `must list queue indexes below ${dev.queues}`);
    if (typeof dev.available !== "function") throw bad("available", "a device with receiveQueues must have available(queue)");
  }
}

/** Parsed command-line values of a device's declared options (defaults applied), or a message for the usage. */
export function parseOptionValue(name: string, o: DeviceOption, raw: string | boolean | string[]): string | number | boolean | string[] {
  if (Array.isArray(raw)) {
    if (!o.multiple) throw new Error(`--${name} given more than once`);
    return raw.map((r) => parseOptionValue(name, { ...o, multiple: false }, r) as string);
  }
  if (o.multiple && o.type === "string") return [parseOptionValue(name, { ...o, multiple: false }, raw) as string];
  if (o.type === "boolean") {
    if (typeof raw === "boolean") return raw;
    throw new Error(`--${name} takes no value`);
  }
  if (typeof raw !== "string") throw new Error(`--${name} needs a value`);
  let v: string | number;
  if (o.type === "string") {
    v = raw;
    if (o.choices && !o.choices.includes(raw)) throw new Error(`--${name} must be ${o.choices.join(", ").replace(/, ([^,]*)$/, " or $1")}`);
    return v;
  }
  v = o.type === "size" ? parseSizeValue(raw, name) : Number(raw);
  if (o.type === "number" && (raw.trim() === "" || !Number.isFinite(v))) throw new Error(`--${name} must be a number`);
  if (o.min !== undefined && v < o.min) throw new Error(`--${name} must be at least ${o.min}`);
  if (o.max !== undefined && v > o.max) throw new Error(`--${name} must be at most ${o.max}`);
  return v;
}

/** "64M" → 67108864; throws on anything else. */
export function parseSizeValue(s: string, name = "size"): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(s.trim());
  if (!m) throw new Error(`--${name}: bad size "${s}"`);
  const mult = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase() as "" | "K" | "M" | "G" | "T"];
  const v = Number(m[1]) * mult;
  if (!Number.isSafeInteger(v)) throw new Error(`--${name}: size "${s}" is too large`);
  return v;
}

/** The declared defaults, parsed as if given on the command line. */
export function defaultValues(decl: DeviceOptions | undefined): OptionValues {
  const out: OptionValues = {};
  for (const [name, o] of Object.entries(decl ?? {})) {
    if (o.default === undefined) out[name] = o.type === "boolean" ? false : o.multiple ? [] : undefined;
    else out[name] = typeof o.default === "string" && o.type !== "string" ? parseOptionValue(name, o, o.default) : o.default;
  }
  return out;
}

/** Usage lines for declared options, aligned like the common ones. */
export function optionUsage(decl: DeviceOptions | undefined): string {
  const lines: string[] = [];
  for (const [name, o] of Object.entries(decl ?? {})) {
    const meta = o.type === "boolean" ? "" : ` ${o.metavar ?? (o.choices ? o.choices.join("|") : o.type === "size" ? "SIZE" : o.type === "number" ? "N" : "VALUE")}`;
    const head = `  --${name}${meta}${o.multiple ? " …" : ""}`;
    const def = o.default !== undefined && o.type !== "boolean" ? ` (default ${o.default})` : "";
    const help = wrap(`${o.help}${def}`, 100 - 23).join(`\n${" ".repeat(23)}`);
    lines.push(head.length < 23 ? `${head.padEnd(23)}${help}` : `${head}\n${" ".repeat(23)}${help}`);
  }
  return lines.join("\n");
}

/** Words into lines of at most `width` characters. */
function wrap(text: string, width: number): string[] {
  const out: string[] = [];
  let line = "";
  for (const w of text.split(/\s+/)) {
    if (line && line.length + 1 + w.length > width) {
      out.push(line);
      line = w;
    } else line = line ? `${line} ${w}` : w;
  }
  if (line) out.push(line);
  return out;
}

/**
 * `bunvhost new NAME [--type rng|input|blank] [--dir DIR]`: writes NAME.ts, a
 * working device to start from, and NAME.test.ts, its test through the test
 * kit (`bunvhost/testing`), from the templates in ./templates. The files
 * import "bunvhost" by its package name: what a project has after
 * `npm install bunvhost`.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { parseArgs } from "node:util";

/** The device types a template exists for, with the line printed when one is written. */
export const TEMPLATE_TYPES = {
  rng: "an entropy device, VIRTIO id 4, for QEMU's vhost-user-rng-pci",
  input: "a keyboard with a receive queue, VIRTIO id 18, for QEMU's vhost-user-input-pci",
  blank: "an echo device, experimental VIRTIO id 50, for vhost-user-device-pci (QEMU 8.2+)",
} as const;
export type TemplateType = keyof typeof TEMPLATE_TYPES;

/** A letter, then letters, digits, `_` or `-`: a file name that is also a fine device name. */
const NAME_RE = /^[A-Za-z][A-Za-z0-9_-]{0,63}$/;

/** The text substituted for this in a template is the device's NAME. */
const PLACEHOLDER = /__NAME__/g;

const TEMPLATES = join(import.meta.dir, "templates");

export const NEW_USAGE = `usage: bunvhost new NAME [--type rng|input|blank] [--dir DIR]
       (in a clone of bunvhost: bun run server.ts new NAME ...)
Writes NAME.ts, a device to start from (its comments explain the device API), and
NAME.test.ts, its test through bunvhost/testing (no VM needed: \`bun test\`).
  NAME          file and device name: a letter, then letters, digits, _ or - (at most 64)
  --type TYPE   rng:   ${TEMPLATE_TYPES.rng}
                input: ${TEMPLATE_TYPES.input}
                blank: ${TEMPLATE_TYPES.blank} (default)
  --dir DIR     where to write them (default: the current directory; created if missing)
Existing files are never overwritten.`;

/** The two files of a template for `name`: [file name, text] pairs. */
export function renderTemplate(type: TemplateType, name: string): [string, string][] {
  const read = (f: string) => readFileSync(join(TEMPLATES, f), "utf8").replace(PLACEHOLDER, name);
  return [
    [`${name}.ts`, read(`${type}.ts.tmpl`)],
    [`${name}.test.ts`, read(`${type}.test.ts.tmpl`)],
  ];
}

/**
 * Runs `new` with the arguments after it; returns the exit code: 0 written,
 * 1 refused (a file exists, cannot write), 2 bad arguments (usage printed).
 * @example process.exit(await scaffold(["mydev", "--type", "rng"]));
 */
export async function scaffold(argv: string[]): Promise<number> {
  const usage = (msg: string): number => {
    process.stderr.write(`bunvhost new: ${msg}\n${NEW_USAGE}\n`);
    return 2;
  };
  let values: { type?: string; dir?: string; help?: boolean };
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      options: { type: { type: "string", default: "blank" }, dir: { type: "string" }, help: { type: "boolean", short: "h" } },
      strict: true,
      allowPositionals: true,
    }));
  } catch (e) {
    return usage((e as Error).message);
  }
  if (values.help) {
    process.stdout.write(`${NEW_USAGE}\n`);
    return 0;
  }
  if (positionals.length !== 1) return usage(positionals.length === 0 ? "NAME is missing" : `one NAME only, got ${positionals.join(" ")}`);
  const name = positionals[0]!;
  if (!NAME_RE.test(name)) {
    const hint = name.endsWith(".ts") ? ` (give it without .ts: ${name.slice(0, -3)})` : "";
    return usage(`bad NAME "${name}": a letter, then letters, digits, _ or -, at most 64${hint}`);
  }
  const type = values.type!;
  if (!Object.hasOwn(TEMPLATE_TYPES, type)) return usage(`--type must be rng, input or blank, not "${type}"`);
  const dir = resolve(values.dir ?? ".");
  const files = renderTemplate(type as TemplateType, name);
  // Both files or neither: look before writing anything.
  const taken = files.map(([f]) => join(dir, f)).filter((p) => existsSync(p));
  if (taken.length > 0) {
    process.stderr.write(`bunvhost new: ${taken.join(" and ")} already exist${taken.length === 1 ? "s" : ""}: nothing written (pick another NAME or remove ${taken.length === 1 ? "it" : "them"})\n`);
    return 1;
  }
  try {
    mkdirSync(dir, { recursive: true });
    // "wx": fails rather than overwrite a file created since the check above.
    for (const [f, text] of files) writeFileSync(join(dir, f), text, { flag: "wx" });
  } catch (e) {
    process.stderr.write(`bunvhost new: cannot write in ${dir}: ${(e as Error).message}\n`);
    return 1;
  }
  const rel = relative(process.cwd(), dir);
  const at = (f: string) => (rel === "" ? `./${f}` : rel.startsWith("..") || rel.startsWith("/") ? join(dir, f) : `./${join(rel, f)}`);
  let installed = true;
  try {
    Bun.resolveSync("bunvhost", dir);
  } catch {
    installed = false;
  }
  const next: [string, string][] = [
    [`npx bun test ${at(`${name}.test.ts`)}`, "run its test: a driver talks vhost-user to it, no VM"],
    [`npx bunvhost ${at(`${name}.ts`)} --help`, "its options"],
    [`npx bunvhost ${at(`${name}.ts`)} --socket /tmp/${name}.sock`, "serve it; prints the QEMU options that attach it"],
  ];
  const width = Math.max(...next.map(([c]) => c.length)) + 3;
  process.stdout.write(
    `wrote ${at(`${name}.ts`)}, ${TEMPLATE_TYPES[type as TemplateType]}, and its test ${at(`${name}.test.ts`)}\n` +
      (installed ? "" : `note: they import "bunvhost", which is not installed there: run \`npm install bunvhost\` first\n`) +
      `next:\n${next.map(([c, what]) => `  ${c.padEnd(width)}${what}\n`).join("")}`,
  );
  return 0;
}

#!/usr/bin/env node
// The `bunvhost` command: runs server.ts under Bun (bunvhost needs bun:ffi).
// Under Bun already (bunx), it runs in this process; under Node (npx), it
// starts the bun installed from npm beside bunvhost, else the one on PATH.
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const server = fileURLToPath(new URL("../server.ts", import.meta.url));
if (process.versions.bun) {
  await (await import(server)).main();
} else {
  let bun = "bun";
  try {
    bun = createRequire(import.meta.url).resolve("bun/bin/bun.exe");
  } catch {
    // not installed from npm: the PATH decides
  }
  const r = spawnSync(bun, ["run", server, ...process.argv.slice(2)], { stdio: "inherit" });
  if (r.error) {
    process.stderr.write(`bunvhost: cannot run Bun (${r.error.message}); install it with \`npm install bun\`\n`);
    process.exit(127);
  }
  process.exit(r.status ?? 1);
}

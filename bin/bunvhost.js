#!/usr/bin/env node
// The `bunvhost` command: runs server.ts under Bun (bunvhost needs bun:ffi).
// Under Bun already (bunx), it runs in this process; under Node (npx), it
// starts the bun installed from npm beside bunvhost, else the one on PATH,
// passes on the signals that stop a server (SIGINT, SIGTERM, SIGHUP) and
// ends as the server did: its exit status, or the signal that killed it.
import { spawn } from "node:child_process";
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
  const child = spawn(bun, ["run", server, ...process.argv.slice(2)], { stdio: "inherit" });
  const signals = ["SIGINT", "SIGTERM", "SIGHUP"];
  const forward = (sig) => child.kill(sig);
  // A terminal's Ctrl-C reaches both processes; the server stops once either way.
  for (const sig of signals) process.on(sig, forward);
  child.on("error", (e) => {
    process.stderr.write(`bunvhost: cannot run Bun (${e.message}); install it with \`npm install bun\`\n`);
    process.exit(127);
  });
  child.on("exit", (code, sig) => {
    for (const s of signals) process.off(s, forward);
    if (code !== null) process.exit(code);
    process.kill(process.pid, sig); // die of the same signal, as if there were no node in between
  });
}

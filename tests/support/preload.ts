// Loaded before every test file (bunfig.toml [test] preload): tests that start
// QEMU or back-end processes need more than bun's 5 s default.
import { setDefaultTimeout } from "bun:test";
setDefaultTimeout(60_000);

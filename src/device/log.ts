/** A leveled logger; the server prints to stderr, tests may collect lines. */
import { writeSync } from "node:fs";
export type Level = "debug" | "info" | "warn" | "error";
const RANK: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  readonly level: Level;
}

/** Logger writing `level: message` lines to stderr, dropping those below `level`. */
export function stderrLogger(level: Level = "info", prefix = "bunvhost"): Logger {
  const min = RANK[level];
  const out = (l: Level) => (msg: string) => {
    // Synchronous: a Worker's process.stderr is relayed through the main thread, and lines
    // logged just before the thread ends (its devices' last words) would be lost.
    if (RANK[l] >= min) writeSync(2, `${prefix}: ${l}: ${msg}\n`);
  };
  return { level, debug: out("debug"), info: out("info"), warn: out("warn"), error: out("error") };
}

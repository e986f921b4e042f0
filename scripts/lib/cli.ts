/**
 * What the command-line scripts share: the streams they write to (injectable for tests) and argument parsing
 * with the conventions of every script here — a usage error prints the message and the usage on stderr and
 * exits 2, `--help`/`-h` prints the usage on stdout and exits 0.
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import type { CliIO } from "../../gpu-backend/src/eval/report.ts";

export type { CliIO };

/** The process's own streams. */
export const processIO: CliIO = {
  stdout: (s) => void process.stdout.write(s),
  stderr: (s) => void process.stderr.write(s),
  isTTY: process.stderr.isTTY === true,
  columns: process.stderr.columns,
};

type Options = NonNullable<ParseArgsConfig["options"]>;
const HELP = { help: { type: "boolean", short: "h", default: false } } as const;
/** Parsed values of `options` (plus `help`). */
export type CliValues<O extends Options> = ReturnType<typeof parseArgs<{ args: string[]; options: O & typeof HELP }>>["values"];

/** A script's usage text and where it writes; `prefix` starts its error lines (e.g. "eval: "). */
export interface Usage {
  text: string;
  io: CliIO;
  prefix?: string;
}

/** Prints `msg` and the usage on stderr; returns the exit status of a usage error (2). */
export function usageError(u: Usage, msg: string): number {
  u.io.stderr(`${u.prefix ?? ""}${msg}\n${u.text}\n`);
  return 2;
}

/**
 * Parses `argv` strictly against `options` (a `help` flag is added). Returns the values, or the exit status
 * to return at once: 2 after a usage error, 0 after printing the usage for `--help`.
 */
export function parseCli<const O extends Options>(argv: string[], options: O, u: Usage): CliValues<O> | number {
  let values: CliValues<O>;
  try {
    ({ values } = parseArgs({ args: argv, options: { ...options, ...HELP } }));
  } catch (e) {
    return usageError(u, (e as Error).message);
  }
  if ((values as { help?: boolean }).help) {
    u.io.stdout(`${u.text}\n`);
    return 0;
  }
  return values;
}

/**
 * Redraws a one-line progress bar on a terminal's stderr (`\r`, cut to the width, rest of line cleared),
 * at most every 100 ms unless `done`; returns whether it drew (a caller ends the line with "\n" if it did).
 */
export function progressBar(io: CliIO, frac: number, label: string, done: boolean, state: { lastDraw: number }): boolean {
  const now = performance.now();
  if (now - state.lastDraw < 100 && !done) return false;
  state.lastDraw = now;
  const width = 30;
  const fill = Math.round(Math.min(1, Math.max(0, frac)) * width);
  const line = `[${"#".repeat(fill)}${"-".repeat(width - fill)}] ${(frac * 100).toFixed(1).padStart(5)}% ${label}`;
  io.stderr(`\r${line.slice(0, (io.columns || 120) - 1)}\x1b[K`);
  return true;
}

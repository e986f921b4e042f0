/**
 * Structured JSON logs without PHI: request ids, sizes, token counts, timings and codes only. Images,
 * prompts, token ids, outputs and IP addresses never reach a log line: fields outside the allow-list below
 * are dropped, and string values are truncated.
 */

const ALLOWED = new Set([
  "request_id",
  "route",
  "method",
  "status",
  "code",
  "reason",
  "bytes_in",
  "image_bytes",
  "images",
  "prompt_tokens",
  "image_tokens",
  "completion_tokens",
  "draft_accepted",
  "draft_rejected",
  "max_new_tokens",
  "finish_reason",
  "stream",
  "queue_ms",
  "ttft_ms",
  "total_ms",
  "active",
  "queued",
  "capacity",
  "in_flight",
  "cancelled",
  "grace_ms",
  "port",
  "host",
  "execution_provider",
  "fingerprint",
  "load_ms",
  "signal",
  "error",
  "stall_limit_s",
  "restarts",
  "restarts_total",
]);

const MAX_STRING = 200;

export type LogLevel = "info" | "warn" | "error";
export type LogFields = Record<string, string | number | boolean | null | undefined>;

/** A structured logger; `write` receives one JSON line per entry. */
export interface Logger {
  log(level: LogLevel, msg: string, fields?: LogFields): void;
}

/** Builds the JSON line for an entry: allow-listed fields only, strings truncated. */
export function formatLogLine(level: LogLevel, msg: string, fields: LogFields = {}, now: Date = new Date()): string {
  const entry: Record<string, unknown> = { level, msg, ts: now.toISOString() };
  for (const [k, v] of Object.entries(fields)) {
    if (!ALLOWED.has(k) || v === undefined) continue;
    entry[k] = typeof v === "string" && v.length > MAX_STRING ? `${v.slice(0, MAX_STRING)}…` : v;
  }
  return JSON.stringify(entry);
}

/** A logger writing JSON lines through `write` (default: stdout for info, stderr for warn/error). */
export function createLogger(write?: (line: string, level: LogLevel) => void): Logger {
  const out =
    write ??
    ((line: string, level: LogLevel) => {
      if (level === "info") process.stdout.write(`${line}\n`);
      else process.stderr.write(`${line}\n`);
    });
  return { log: (level, msg, fields) => out(formatLogLine(level, msg, fields), level) };
}

/** A logger that drops everything (tests that do not look at logs). */
export const silentLogger: Logger = { log: () => {} };

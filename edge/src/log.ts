/**
 * Structured JSON logs without PHI: ids, sizes, counts, status codes and timings only. Never pass images,
 * questions, options, prompts, outputs, tokens, raw subjects or IP addresses here; the field allow-list
 * below enforces it (anything else is dropped).
 */
const ALLOWED = new Set([
  "request_id",
  "subject_hash",
  "route",
  "method",
  "status",
  "code",
  "bytes_in",
  "image_bytes",
  "image_width",
  "image_height",
  "images",
  "prompt_tokens",
  "image_tokens",
  "completion_tokens",
  "finish_reason",
  "stream",
  "backend",
  "attempt",
  "edge_ms",
  "ttft_ms",
  "total_ms",
  "tokenizer_init_ms",
]);

export type LogFields = Record<string, string | number | boolean | null | undefined>;

export function log(level: "info" | "warn" | "error", msg: string, fields: LogFields = {}): void {
  const entry: Record<string, unknown> = { level, msg, ts: new Date().toISOString() };
  for (const [k, v] of Object.entries(fields)) if (ALLOWED.has(k) && v !== undefined) entry[k] = v;
  const line = JSON.stringify(entry);
  if (level === "error") console.error(line);
  else if (level === "warn") console.warn(line);
  else console.log(line);
}

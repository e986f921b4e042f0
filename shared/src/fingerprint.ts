/**
 * Model fingerprint: identifies the tokenizer + model configuration a request was tokenized for.
 * Edge and backend compute it from the same files; a mismatch means the edge's token ids would be
 * meaningless to the loaded model (the backend answers 409 `model_mismatch`).
 */

/** JSON with object keys sorted recursively, so formatting and key order do not matter. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}

export async function sha256Hex(data: string | Uint8Array): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * `sha256(canonical(tokenizer.json) \n canonical(config.json) \n canonical(preprocessor_config.json))`,
 * first 32 hex digits, prefixed with the scheme version.
 */
export async function modelFingerprint(files: {
  tokenizer: unknown;
  config: unknown;
  preprocessor: unknown;
}): Promise<string> {
  const text = [files.tokenizer, files.config, files.preprocessor].map(canonicalJson).join("\n");
  return `fp1-${(await sha256Hex(text)).slice(0, 32)}`;
}

/**
 * Model fingerprint: identifies the tokenizer + model configuration a request was tokenized for.
 * Edge and backend compute it from the same files; a mismatch means the edge's token ids would be
 * meaningless to the loaded model (the backend answers 409 `model_mismatch`).
 */
import { QWEN2VL_IMAGE_PROCESSOR_DEFAULTS } from "./model-meta.ts";

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
 * preprocessor_config.json without the image-processor keys that merely spell out Python's defaults (the
 * converter adds them for transformers.js): a checkpoint's file and its converted copy describe the same
 * preprocessing and must fingerprint alike (an edge bundled from either then matches a backend serving the
 * conversion). A non-default value still counts.
 */
function withoutImplicitDefaults(preprocessor: unknown): unknown {
  if (preprocessor === null || typeof preprocessor !== "object" || Array.isArray(preprocessor)) return preprocessor;
  const out: Record<string, unknown> = { ...(preprocessor as Record<string, unknown>) };
  for (const [k, v] of Object.entries(QWEN2VL_IMAGE_PROCESSOR_DEFAULTS)) if (out[k] === v) delete out[k];
  return out;
}

/**
 * `sha256(canonical(tokenizer.json) \n canonical(config.json) \n canonical(preprocessor_config.json))`,
 * first 32 hex digits, prefixed with the scheme version. Image-processor keys equal to Python's defaults
 * (`QWEN2VL_IMAGE_PROCESSOR_DEFAULTS`) are left out of the preprocessor config, as if absent.
 */
export async function modelFingerprint(files: {
  tokenizer: unknown;
  config: unknown;
  preprocessor: unknown;
}): Promise<string> {
  const text = [files.tokenizer, files.config, withoutImplicitDefaults(files.preprocessor)].map(canonicalJson).join("\n");
  return `fp1-${(await sha256Hex(text)).slice(0, 32)}`;
}

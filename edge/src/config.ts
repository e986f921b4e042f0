/**
 * The edge's configuration, parsed from wrangler vars once per isolate. Invalid values fail every request
 * with 500 `internal_error` (and a log line naming the variable), never a silent default.
 */
import { ApiError, NamedError } from "../../shared/src/errors.ts";
import type { EdgeEnv } from "./env.ts";

export interface EdgeConfig {
  modelId: string;
  backendUrls: string[];
  backendTimeoutMs: number;
  /** How long a backend may take to answer at all (its headers come on admission, before queueing). */
  backendHeadersTimeoutMs: number;
  backendSecret: string;
  /** Headers that pass a Cloudflare Access application in front of the backends (a service token), or none. */
  backendAccessHeaders: Record<string, string>;
  maxUploadBytes: number;
  maxImagePixels: number;
  minPixels: number;
  maxPixels: number;
  maxImageTokens: number;
  maxQuestionChars: number;
  /** The chat route's bound on all its messages' text, checked before tokenizing (whose cost grows faster than the text). */
  maxPromptChars: number;
  maxNewTokensDefault: number;
  maxNewTokensCap: number;
}

/** A configuration problem; its message names the variable and is logged, not shown to clients. */
export class ConfigError extends NamedError {}

function int(env: EdgeEnv, key: keyof EdgeEnv, fallback: number): number {
  const raw = env[key];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (typeof raw !== "string" || !Number.isSafeInteger(n) || n <= 0) {
    throw new ConfigError(`${key} must be a positive integer`);
  }
  return n;
}

const cache = new WeakMap<object, EdgeConfig>();

export function loadConfig(env: EdgeEnv): EdgeConfig {
  const hit = cache.get(env);
  if (hit) return hit;
  const backendUrls = (env.BACKEND_URLS ?? "")
    .split(",")
    .map((s) => s.trim().replace(/\/+$/, ""))
    .filter(Boolean);
  if (backendUrls.length === 0) throw new ConfigError("BACKEND_URLS is empty");
  for (const u of backendUrls) checkBackendUrl(u);
  if (!env.BACKEND_HMAC_SECRET || env.BACKEND_HMAC_SECRET.length < 16) {
    throw new ConfigError("BACKEND_HMAC_SECRET must be set (at least 16 characters)");
  }
  const accessId = env.BACKEND_ACCESS_CLIENT_ID ?? "";
  const accessSecret = env.BACKEND_ACCESS_CLIENT_SECRET ?? "";
  if (!accessId !== !accessSecret) throw new ConfigError("BACKEND_ACCESS_CLIENT_ID and BACKEND_ACCESS_CLIENT_SECRET go together");
  const config: EdgeConfig = {
    modelId: env.MODEL_ID || "medvlm-r1",
    backendUrls,
    backendTimeoutMs: int(env, "BACKEND_TIMEOUT_MS", 120_000),
    backendHeadersTimeoutMs: int(env, "BACKEND_HEADERS_TIMEOUT_MS", 15_000),
    backendSecret: env.BACKEND_HMAC_SECRET,
    backendAccessHeaders: accessId ? { "CF-Access-Client-Id": accessId, "CF-Access-Client-Secret": accessSecret } : {},
    maxUploadBytes: int(env, "MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
    maxImagePixels: int(env, "MAX_IMAGE_PIXELS", 50_000_000),
    minPixels: int(env, "MIN_PIXELS", 3136),
    maxPixels: int(env, "MAX_PIXELS", 12_845_056),
    maxImageTokens: int(env, "MAX_IMAGE_TOKENS", 16_384),
    maxQuestionChars: int(env, "MAX_QUESTION_CHARS", 4000),
    // 6 characters per token of the 32768-token context: English prose runs at 4.7–5.3 (code and Markdown
    // lower), so text that fits is never refused; the worst text for BPE (one run of a letter, of spaces or of
    // newlines) tokenizes at this size in ≤ 0.9 s and ~50 MB (2 MB of it: 6 s, 220 MB).
    maxPromptChars: int(env, "MAX_PROMPT_CHARS", 196_608),
    maxNewTokensDefault: int(env, "MAX_NEW_TOKENS_DEFAULT", 1024),
    maxNewTokensCap: int(env, "MAX_NEW_TOKENS_CAP", 2048),
  };
  if (config.minPixels > config.maxPixels) throw new ConfigError("MIN_PIXELS exceeds MAX_PIXELS");
  if (config.maxNewTokensDefault > config.maxNewTokensCap) throw new ConfigError("MAX_NEW_TOKENS_DEFAULT exceeds MAX_NEW_TOKENS_CAP");
  cache.set(env, config);
  return config;
}

/** Medical images must not cross a network in cleartext: `http://` only to this machine (local development). */
function checkBackendUrl(u: string): void {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    throw new ConfigError("BACKEND_URLS holds an invalid URL");
  }
  const loopback = url.hostname === "localhost" || url.hostname === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(url.hostname);
  if (url.protocol === "https:" || (url.protocol === "http:" && loopback)) return;
  throw new ConfigError("BACKEND_URLS must use https:// (http:// only for localhost)");
}

/** What a client sees for a configuration error: a stable code, no internals. */
export function configErrorToApi(): ApiError {
  return new ApiError("internal_error", "the service is misconfigured");
}

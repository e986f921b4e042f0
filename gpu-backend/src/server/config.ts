/**
 * The backend's configuration, read from environment variables once at start-up. Every problem is
 * collected and reported together (`BackendConfigError.problems`), so an operator fixes them in one go;
 * nothing falls back silently to a default when a value is present but invalid.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { modelFingerprint } from "../../../shared/src/fingerprint.ts";
import { modelMetaFromFiles, type ModelMeta } from "../../../shared/src/model-meta.ts";
import { parseDevVars } from "../../../scripts/dev-secrets.ts";
import { NamedError } from "../../../shared/src/errors.ts";

/** Typed backend configuration (also handed to the engine factory, so it stays structured-cloneable). */
export interface BackendConfig {
  modelDir: string;
  port: number;
  host: string;
  hmacSecret: string;
  executionProvider: "cpu" | "cuda";
  /** Intra-op threads per ONNX Runtime session; null = ORT's choice. */
  ortThreads: number | null;
  /** Admission bound: requests waiting for a batch slot beyond this are refused with 503. */
  queueSize: number;
  /** Sequences generated at once by the engine. */
  maxBatch: number;
  /** Most prompt tokens per prefill run while other sequences decode (the engine's `prefillChunk`); 0 = whole prompt. */
  prefillChunk: number;
  /** Speculative decoding of a sequence decoding alone: most draft tokens per pass (the engine's `draftTokens`); 0 = off. */
  draftTokens: number;
  /**
   * The vision encoder in a process of its own, so that running streams keep decoding while an image is encoded
   * and a cancelled request's encoding stops at once (the engine's `visionProcess`). Default: on for the CPU
   * provider (measured), off for CUDA (not measured yet).
   */
  visionProcess: boolean;
  maxNewTokensCap: number;
  /** Prompt + image + new tokens of one request (also bounded by the model's context). */
  maxTotalTokens: number;
  /** Image tokens (after merging) of one request. */
  maxImageTokens: number;
  /** Largest accepted wire body. */
  maxBodyBytes: number;
  /** How long in-flight requests may run after SIGTERM before they are cancelled. */
  shutdownGraceMs: number;
  /** Silence of the engine's thread after which it counts as stalled (not ready, /healthz 503); 0 = never. */
  engineStallMs: number;
}

/** Start-up configuration failure; `problems` lists every invalid or missing variable. */
export class BackendConfigError extends NamedError {
  constructor(readonly problems: string[]) {
    super(`invalid backend configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
  }
}

/** Environment variables (`process.env` or a test's object). */
export type Env = Record<string, string | undefined>;

export const CONFIG_DEFAULTS = {
  port: 8788,
  host: "127.0.0.1",
  queueSize: 16,
  maxBatch: 8,
  prefillChunk: 128,
  draftTokens: 0,
  maxNewTokensCap: 2048,
  maxTotalTokens: 32_768,
  maxImageTokens: 16_384,
  maxBodyBytes: 32 * 1024 * 1024,
  shutdownGraceMs: 30_000,
  engineStallS: 120,
} as const;

/**
 * Parses and validates `env` (normally `process.env`). `DEV_VARS` names a `.dev.vars` file (KEY=VALUE lines,
 * as wrangler and `npm run token` write it) from which `BACKEND_HMAC_SECRET` is read when the environment
 * does not set it. Throws `BackendConfigError` listing every problem.
 */
export function loadBackendConfig(env: Env): BackendConfig {
  const problems: string[] = [];
  const str = (key: string): string | undefined => {
    const v = env[key];
    return v === undefined || v.trim() === "" ? undefined : v.trim();
  };
  const int = (key: string, fallback: number | null, min: number, max: number = Number.MAX_SAFE_INTEGER): number | null => {
    const raw = str(key);
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!/^\d+$/.test(raw) || !Number.isSafeInteger(n) || n < min || n > max) {
      problems.push(`${key} must be an integer in [${min}, ${max}] (got ${JSON.stringify(raw.slice(0, 32))})`);
      return fallback;
    }
    return n;
  };

  const modelDir = str("MODEL_DIR");
  if (!modelDir) problems.push("MODEL_DIR is required: the folder of a converted model (the converter's --out)");

  let secret = env.BACKEND_HMAC_SECRET;
  const devVars = str("DEV_VARS");
  if (!secret && devVars) {
    try {
      secret = parseDevVars(readFileSync(devVars, "utf8")).BACKEND_HMAC_SECRET;
      if (!secret) problems.push(`DEV_VARS file ${devVars} has no BACKEND_HMAC_SECRET`);
    } catch (e) {
      problems.push(`DEV_VARS file ${devVars} cannot be read (${(e as NodeJS.ErrnoException).code ?? "error"})`);
    }
  }
  if (!secret) {
    if (!devVars) problems.push("BACKEND_HMAC_SECRET is required (the edge's secret; or set DEV_VARS to a .dev.vars file holding it)");
  } else if (secret.length < 16) {
    problems.push("BACKEND_HMAC_SECRET must be at least 16 characters");
  }

  const ep = str("EXECUTION_PROVIDER") ?? "cpu";
  if (ep !== "cpu" && ep !== "cuda") problems.push(`EXECUTION_PROVIDER must be "cpu" or "cuda" (got ${JSON.stringify(ep.slice(0, 32))})`);

  // Renamed when the encoder moved from a thread to a process: a setting left under the old name must not be ignored.
  if (env.VISION_THREAD !== undefined) problems.push("VISION_THREAD was renamed VISION_PROCESS (the vision encoder now runs in a process of its own): set that instead");

  const host = str("BACKEND_HOST") ?? CONFIG_DEFAULTS.host;
  if (!/^[A-Za-z0-9.:[\]-]+$/.test(host)) problems.push("BACKEND_HOST must be a host name or an IP address");

  const config: BackendConfig = {
    modelDir: modelDir ?? "",
    port: int("BACKEND_PORT", CONFIG_DEFAULTS.port, 0, 65535)!,
    host,
    hmacSecret: secret ?? "",
    executionProvider: ep === "cuda" ? "cuda" : "cpu",
    ortThreads: int("ORT_THREADS", null, 1, 1024),
    queueSize: int("QUEUE_SIZE", CONFIG_DEFAULTS.queueSize, 1, 100_000)!,
    maxBatch: int("MAX_BATCH", CONFIG_DEFAULTS.maxBatch, 1, 1024)!,
    prefillChunk: int("PREFILL_CHUNK", CONFIG_DEFAULTS.prefillChunk, 0, 1_000_000)!,
    draftTokens: int("DRAFT_TOKENS", CONFIG_DEFAULTS.draftTokens, 0, 64)!,
    visionProcess: int("VISION_PROCESS", ep === "cuda" ? 0 : 1, 0, 1) === 1,
    maxNewTokensCap: int("MAX_NEW_TOKENS_CAP", CONFIG_DEFAULTS.maxNewTokensCap, 1, 1_000_000)!,
    maxTotalTokens: int("MAX_TOTAL_TOKENS", CONFIG_DEFAULTS.maxTotalTokens, 1, 10_000_000)!,
    maxImageTokens: int("MAX_IMAGE_TOKENS", CONFIG_DEFAULTS.maxImageTokens, 1, 10_000_000)!,
    maxBodyBytes: int("MAX_BODY_BYTES", CONFIG_DEFAULTS.maxBodyBytes, 1024, 2 ** 31 - 1)!,
    shutdownGraceMs: int("SHUTDOWN_GRACE_MS", CONFIG_DEFAULTS.shutdownGraceMs, 0, 3_600_000)!,
    engineStallMs: int("ENGINE_STALL_S", CONFIG_DEFAULTS.engineStallS, 0, 86_400)! * 1000,
  };
  if (problems.length > 0) throw new BackendConfigError(problems);
  return config;
}

async function readJsonFile(path: string, required: boolean): Promise<unknown> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === "ENOENT") return {};
    throw new Error(`${path} cannot be read (${(e as NodeJS.ErrnoException).code ?? "error"}): is MODEL_DIR a converted model folder?`);
  }
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw new Error(`${path} is not valid JSON`);
  }
}

/**
 * The served model's meta (fingerprint, vocabulary, special ids, geometry) from the model folder, computed
 * exactly as the engine's loader and the edge's build script compute it (shared/src/model-meta.ts).
 */
export async function readModelMeta(modelDir: string): Promise<ModelMeta> {
  const config = await readJsonFile(join(modelDir, "config.json"), true);
  const preprocessor = await readJsonFile(join(modelDir, "preprocessor_config.json"), true);
  const generation = await readJsonFile(join(modelDir, "generation_config.json"), false);
  const tokenizer = await readJsonFile(join(modelDir, "tokenizer.json"), true);
  const fingerprint = await modelFingerprint({ tokenizer, config, preprocessor });
  return modelMetaFromFiles({ config, preprocessor, generation, fingerprint });
}

/**
 * Backend configuration: defaults, validation messages listing every problem, the DEV_VARS secret file,
 * and reading the model meta from a model folder.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { modelFingerprint } from "../../shared/src/fingerprint.ts";
import { BackendConfigError, CONFIG_DEFAULTS, loadBackendConfig, readModelMeta } from "../../gpu-backend/src/server/config.ts";

const dir = mkdtempSync(join(tmpdir(), "backend-config-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BASE = { MODEL_DIR: "/models/medvlm", BACKEND_HMAC_SECRET: "0123456789abcdef-secret" };

function problems(env: Record<string, string | undefined>): string[] {
  try {
    loadBackendConfig(env);
  } catch (e) {
    expect(e).toBeInstanceOf(BackendConfigError);
    return (e as BackendConfigError).problems;
  }
  throw new Error("expected a BackendConfigError");
}

describe("loadBackendConfig", () => {
  it("applies the documented defaults", () => {
    expect(loadBackendConfig(BASE)).toEqual({
      modelDir: "/models/medvlm",
      port: 8788,
      host: "127.0.0.1",
      hmacSecret: BASE.BACKEND_HMAC_SECRET,
      executionProvider: "cpu",
      ortThreads: null,
      queueSize: 16,
      maxBatch: 8,
      prefillChunk: 128,
      draftTokens: 0,
      visionProcess: true,
      maxNewTokensCap: 2048,
      maxTotalTokens: CONFIG_DEFAULTS.maxTotalTokens,
      maxImageTokens: CONFIG_DEFAULTS.maxImageTokens,
      maxBodyBytes: CONFIG_DEFAULTS.maxBodyBytes,
      shutdownGraceMs: CONFIG_DEFAULTS.shutdownGraceMs,
      engineStallMs: 120_000,
    });
  });

  it("VISION_PROCESS defaults to on for the CPU provider and off for CUDA; either can be set", () => {
    expect(loadBackendConfig({ ...BASE, EXECUTION_PROVIDER: "cuda" }).visionProcess).toBe(false);
    expect(loadBackendConfig({ ...BASE, EXECUTION_PROVIDER: "cpu" }).visionProcess).toBe(true);
    expect(loadBackendConfig({ ...BASE, VISION_PROCESS: "0" }).visionProcess).toBe(false);
    expect(loadBackendConfig({ ...BASE, EXECUTION_PROVIDER: "cuda", VISION_PROCESS: "1" }).visionProcess).toBe(true);
  });

  it("reads every variable", () => {
    const c = loadBackendConfig({
      ...BASE,
      BACKEND_PORT: "9000",
      BACKEND_HOST: "0.0.0.0",
      EXECUTION_PROVIDER: "cuda",
      ORT_THREADS: "4",
      QUEUE_SIZE: "32",
      MAX_BATCH: "16",
      PREFILL_CHUNK: "0",
      DRAFT_TOKENS: "4",
      VISION_PROCESS: "1",
      MAX_NEW_TOKENS_CAP: "1024",
      MAX_TOTAL_TOKENS: "8192",
      MAX_IMAGE_TOKENS: "4096",
      MAX_BODY_BYTES: "1048576",
      SHUTDOWN_GRACE_MS: "5000",
      ENGINE_STALL_S: "0",
    });
    expect(c).toMatchObject({
      port: 9000,
      host: "0.0.0.0",
      executionProvider: "cuda",
      ortThreads: 4,
      queueSize: 32,
      maxBatch: 16,
      prefillChunk: 0,
      draftTokens: 4,
      visionProcess: true,
      maxNewTokensCap: 1024,
      maxTotalTokens: 8192,
      maxImageTokens: 4096,
      maxBodyBytes: 1048576,
      shutdownGraceMs: 5000,
      engineStallMs: 0,
    });
    // structured-cloneable: it is handed to the engine's worker
    expect(structuredClone(c)).toEqual(c);
  });

  it("lists every problem at once, naming each variable", () => {
    const p = problems({ BACKEND_HMAC_SECRET: "short", EXECUTION_PROVIDER: "tpu", QUEUE_SIZE: "-1", MAX_BATCH: "eight", BACKEND_PORT: "70000", PREFILL_CHUNK: "-5", DRAFT_TOKENS: "65", VISION_PROCESS: "yes", ENGINE_STALL_S: "1.5" });
    expect(p).toHaveLength(10);
    expect(p.join("\n")).toMatch(/ENGINE_STALL_S must be an integer in \[0, 86400\]/);
    expect(p.join("\n")).toMatch(/MODEL_DIR is required/);
    expect(p.join("\n")).toMatch(/BACKEND_HMAC_SECRET must be at least 16 characters/);
    expect(p.join("\n")).toMatch(/EXECUTION_PROVIDER must be "cpu" or "cuda"/);
    expect(p.join("\n")).toMatch(/QUEUE_SIZE must be an integer/);
    expect(p.join("\n")).toMatch(/MAX_BATCH must be an integer/);
    expect(p.join("\n")).toMatch(/PREFILL_CHUNK must be an integer in \[0, 1000000\]/);
    expect(p.join("\n")).toMatch(/DRAFT_TOKENS must be an integer in \[0, 64\]/);
    expect(p.join("\n")).toMatch(/VISION_PROCESS must be an integer in \[0, 1\]/);
    expect(problems({ VISION_THREAD: "0" }).join("\n")).toMatch(/VISION_THREAD was renamed VISION_PROCESS/);
    expect(p.join("\n")).toMatch(/BACKEND_PORT must be an integer in \[0, 65535\]/);
    try {
      loadBackendConfig({});
    } catch (e) {
      expect((e as Error).message).toMatch(/^invalid backend configuration:\n {2}- MODEL_DIR/);
    }
  });

  it("requires the HMAC secret and never echoes it", () => {
    expect(problems({ MODEL_DIR: "/m" })).toEqual([expect.stringMatching(/BACKEND_HMAC_SECRET is required/)]);
    const p = problems({ MODEL_DIR: "/m", BACKEND_HMAC_SECRET: "tooshortsecret" });
    expect(p.join("")).not.toContain("tooshortsecret");
  });

  it("reads the secret from a DEV_VARS file when the environment lacks it", () => {
    const path = join(dir, ".dev.vars");
    writeFileSync(path, '# local secrets\nJWT_HS256_SECRET=abc\nBACKEND_HMAC_SECRET="dev-backend-secret-0123456789"\n');
    expect(loadBackendConfig({ MODEL_DIR: "/m", DEV_VARS: path }).hmacSecret).toBe("dev-backend-secret-0123456789");
    // the environment wins over the file
    expect(loadBackendConfig({ ...BASE, DEV_VARS: path }).hmacSecret).toBe(BASE.BACKEND_HMAC_SECRET);
    const empty = join(dir, "empty.vars");
    writeFileSync(empty, "JWT_HS256_SECRET=abc\n");
    expect(problems({ MODEL_DIR: "/m", DEV_VARS: empty })).toEqual([expect.stringMatching(/has no BACKEND_HMAC_SECRET/)]);
    expect(problems({ MODEL_DIR: "/m", DEV_VARS: join(dir, "missing.vars") })).toEqual([expect.stringMatching(/cannot be read \(ENOENT\)/)]);
  });
});

describe("readModelMeta", () => {
  it("computes the fingerprint and meta from the model folder", async () => {
    const m = mkdtempSync(join(dir, "model-"));
    const config = { model_type: "qwen2_vl", vocab_size: 1234, max_position_embeddings: 4096, image_token_id: 1200, vision_config: { spatial_merge_size: 2 } };
    const preprocessor = { patch_size: 14, merge_size: 2, min_pixels: 3136, max_pixels: 1000000 };
    const tokenizer = { model: { type: "BPE" }, added_tokens: [] };
    writeFileSync(join(m, "config.json"), JSON.stringify(config));
    writeFileSync(join(m, "preprocessor_config.json"), JSON.stringify(preprocessor));
    writeFileSync(join(m, "tokenizer.json"), JSON.stringify(tokenizer));
    writeFileSync(join(m, "generation_config.json"), JSON.stringify({ eos_token_id: [7, 8] }));
    const meta = await readModelMeta(m);
    expect(meta.fingerprint).toBe(await modelFingerprint({ tokenizer, config, preprocessor }));
    expect(meta).toMatchObject({ vocab_size: 1234, max_position_embeddings: 4096, image_token_id: 1200, merge_size: 2, eos_token_ids: [7, 8] });
  });

  it("names the missing file", async () => {
    await expect(readModelMeta(join(dir, "nope"))).rejects.toThrow(/config\.json cannot be read \(ENOENT\)/);
  });
});

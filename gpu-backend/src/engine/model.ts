/**
 * A converted model folder (the converter's output: the onnx-community graphs, our append-contract decoder
 * when present, and the checkpoint's tokenizer and config files) loaded into onnxruntime sessions: vision,
 * one decoder (see {@link EngineOptions.kvCache}), and embed when needed. The execution provider is
 * configuration: `cpu` (default) or `cuda`; a missing CUDA provider is a start-up error that says how to
 * install it, never a silent fallback to CPU.
 */
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { parseQwen2VLConfig, type Qwen2VLConfig } from "../checkpoint/config.ts";
import { modelFingerprint } from "../../../shared/src/fingerprint.ts";
import { modelMetaFromFiles, type ModelMeta } from "../../../shared/src/model-meta.ts";
import { type Embeddings, FileEmbeddings, SessionEmbeddings, locateEmbeddingTable } from "./embedding.ts";
import type { KvContract } from "./kv-cache.ts";
import { type VisionSession, VisionProcess, inThreadVision } from "./vision-process.ts";
import { CodedError } from "../../../shared/src/errors.ts";

export type ExecutionProvider = "cpu" | "cuda";

export interface EngineOptions {
  executionProvider?: ExecutionProvider;
  /** Intra-op threads per session (default: ORT's choice = physical cores). */
  intraOpThreads?: number;
  /** Extra ONNX Runtime session options, merged over the engine's defaults (tuning and experiments). */
  sessionOptions?: Partial<ort.InferenceSession.SessionOptions>;
  /**
   * Token embeddings: `"file"` (default) reads rows straight from embed_tokens.onnx's bytes on disk, so the
   * table (which a tied LM head already holds in the decoder) is not kept in memory twice; `"session"` runs
   * the graph in ONNX Runtime. `"file"` falls back to the session for graphs that are not a plain Gather.
   */
  embeddings?: "file" | "session";
  /**
   * The decoder graph, by its KV-cache contract: `"append"` runs `decoder_model_append.onnx` (the cache is read
   * in place; a `bad_model` error when the folder lacks it), `"present"` the onnx-community
   * `decoder_model_merged.onnx` (each step copies the cache through the graph's Concat). Default: `"append"`
   * when the folder has that graph (our converter writes it), else `"present"` (e.g. another exporter's files).
   */
  kvCache?: KvContract;
  /**
   * Run the vision encoder in a child process of its own ({@link VisionProcess}): while an image is encoded, the
   * engine's thread keeps stepping the sequences already decoding instead of stopping them for the whole
   * encoding (the two then share the cores), and a cancelled request's encoding is stopped at once. Default
   * false (the encoder runs in the calling thread, and an encoding always runs to its end).
   */
  visionProcess?: boolean;
}

/** Start-up failure of the engine; `code` is stable, the message says what to do. */
export class EngineLoadError extends CodedError<"model_not_found" | "bad_model" | "provider_unavailable"> {}

export interface PreprocessorConfig {
  min_pixels: number;
  max_pixels: number;
  patch_size: number;
  merge_size: number;
  temporal_patch_size: number;
  image_mean: number[];
  image_std: number[];
}

export interface LoadedModel {
  dir: string;
  config: Qwen2VLConfig;
  preprocessor: PreprocessorConfig;
  meta: ModelMeta;
  tokenizerJson: Record<string, unknown>;
  /** From manifest.json: "fp32" | "fp16" | "int8" | "int4". */
  dtype: string;
  /** Float type of the graphs' inputs and outputs (fp16 graphs take and return float16). */
  ioFloatType: "float32" | "float16";
  /** The loaded decoder's KV-cache contract (see {@link EngineOptions.kvCache}). */
  kvCache: KvContract;
  /**
   * The decoder takes `logits_to_keep` (append graphs since converter revision 6): one pass can return the
   * logits of several last positions, which checking a speculative draft needs.
   */
  logitsToKeep: boolean;
  /** `embed` is absent when the embeddings are read from the graph file (see {@link EngineOptions.embeddings}). */
  sessions: { vision: VisionSession; embed?: ort.InferenceSession; decoder: ort.InferenceSession };
  /** The vision session runs in its own process ({@link EngineOptions.visionProcess}): awaiting it leaves this thread free. */
  visionProcess: boolean;
  /** `input_ids` → `inputs_embeds`. */
  embeddings: Embeddings;
}

async function readJson(path: string): Promise<Record<string, unknown>> {
  try {
    return JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
  } catch (e) {
    throw new EngineLoadError("bad_model", `cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/** The ONNX Runtime session options the engine opens every graph with. */
export function sessionOptions(opts: EngineOptions): ort.InferenceSession.SessionOptions {
  const ep = opts.executionProvider ?? "cpu";
  return {
    executionProviders: ep === "cuda" ? ["cuda"] : ["cpu"],
    graphOptimizationLevel: "all",
    ...(opts.intraOpThreads ? { intraOpNumThreads: opts.intraOpThreads, interOpNumThreads: 1 } : {}),
    ...opts.sessionOptions,
  };
}

async function createSession(path: string, opts: EngineOptions): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(path, sessionOptions(opts));
  } catch (e) {
    throw loadError(path, e, opts);
  }
}

async function openVisionProcess(path: string, opts: EngineOptions): Promise<VisionProcess> {
  try {
    return await VisionProcess.open(path, sessionOptions(opts));
  } catch (e) {
    throw loadError(path, e, opts);
  }
}

/** A session that failed to load: with CUDA, the provider is the usual cause; otherwise the file. */
function loadError(path: string, e: unknown, opts: EngineOptions): EngineLoadError {
  const msg = (e as Error).message ?? String(e);
  if (opts.executionProvider === "cuda") {
    return new EngineLoadError(
      "provider_unavailable",
      "the CUDA execution provider could not be loaded. Install onnxruntime-node with its CUDA 12 libraries " +
        "(`ONNXRUNTIME_NODE_INSTALL=cuda12 npm ci`, or approve its install script) on a machine with an NVIDIA driver, " +
        "CUDA 12 and cuDNN 9 (gpu-backend/Dockerfile does this), or set EXECUTION_PROVIDER=cpu. Cause: " + msg,
      { cause: e },
    );
  }
  return new EngineLoadError("bad_model", `cannot load ${path}: ${msg}`, { cause: e });
}

/** Loads `dir` (a converter output folder) and creates its sessions (vision, decoder, and embed when needed). */
export async function loadModel(dir: string, opts: EngineOptions = {}): Promise<LoadedModel> {
  for (const f of ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx", "config.json", "tokenizer.json"]) {
    if (!existsSync(join(dir, f))) {
      throw new EngineLoadError("model_not_found", `${join(dir, f)} is missing: convert a checkpoint first (npm run convert -- --model <folder> --out ${dir})`);
    }
  }
  const hasAppend = existsSync(join(dir, "decoder_model_append.onnx"));
  const kvCache = opts.kvCache ?? (hasAppend ? "append" : "present");
  if (kvCache === "append" && !hasAppend) {
    throw new EngineLoadError("bad_model", `${join(dir, "decoder_model_append.onnx")} is missing: convert the checkpoint again without --no-append-decoder, or load the onnx-community decoder (kvCache "present")`);
  }
  if (opts.executionProvider === "cuda" && !ort.listSupportedBackends().some((b) => b.name === "cuda")) {
    throw new EngineLoadError(
      "provider_unavailable",
      "onnxruntime-node was installed without the CUDA execution provider. Reinstall it with " +
        "`ONNXRUNTIME_NODE_INSTALL=cuda12 npm ci` on a CUDA 12 + cuDNN 9 machine (see gpu-backend/Dockerfile), or set EXECUTION_PROVIDER=cpu.",
    );
  }
  const configJson = await readJson(join(dir, "config.json"));
  const preprocessorJson = await readJson(join(dir, "preprocessor_config.json"));
  const generationJson = existsSync(join(dir, "generation_config.json")) ? await readJson(join(dir, "generation_config.json")) : {};
  const tokenizerJson = await readJson(join(dir, "tokenizer.json"));
  const manifest = existsSync(join(dir, "manifest.json")) ? await readJson(join(dir, "manifest.json")) : {};
  const config = parseQwen2VLConfig(configJson);
  const fingerprint = await modelFingerprint({ tokenizer: tokenizerJson, config: configJson, preprocessor: preprocessorJson });
  const meta = modelMetaFromFiles({ config: configJson, preprocessor: preprocessorJson, generation: generationJson, fingerprint });
  const preprocessor: PreprocessorConfig = {
    min_pixels: meta.min_pixels,
    max_pixels: meta.max_pixels,
    patch_size: meta.patch_size,
    merge_size: meta.merge_size,
    temporal_patch_size: meta.temporal_patch_size,
    image_mean: (preprocessorJson.image_mean as number[] | undefined) ?? [0.48145466, 0.4578275, 0.40821073],
    image_std: (preprocessorJson.image_std as number[] | undefined) ?? [0.26862954, 0.26130258, 0.27577711],
  };
  const ioFloatType = manifest.io_float_type === "float16" ? "float16" : "float32";
  const embedPath = join(dir, "embed_tokens.onnx");
  let table = null;
  if ((opts.embeddings ?? "file") === "file") {
    try {
      table = locateEmbeddingTable(embedPath);
    } catch (e) {
      throw new EngineLoadError("bad_model", `cannot read ${embedPath}: ${(e as Error).message}`, { cause: e });
    }
    if (table && (table.type !== ioFloatType || table.hidden !== config.text.hidden_size)) table = null;
  }
  const embed = table ? undefined : await createSession(embedPath, opts);
  const decoder = await createSession(join(dir, kvCache === "append" ? "decoder_model_append.onnx" : "decoder_model_merged.onnx"), opts);
  // Last: a child process that started would outlive a later session's failure to load.
  const visionPath = join(dir, "vision_encoder.onnx");
  const vision = opts.visionProcess ? await openVisionProcess(visionPath, opts) : inThreadVision(await createSession(visionPath, opts));
  const embeddings: Embeddings = table ? new FileEmbeddings(table) : new SessionEmbeddings(embed!, ioFloatType, config.text.hidden_size);
  return {
    dir,
    config,
    preprocessor,
    meta,
    tokenizerJson,
    dtype: typeof manifest.dtype === "string" ? manifest.dtype : "fp32",
    ioFloatType,
    kvCache,
    logitsToKeep: decoder.inputNames.includes("logits_to_keep"),
    sessions: { vision, ...(embed ? { embed } : {}), decoder },
    visionProcess: opts.visionProcess ?? false,
    embeddings,
  };
}

export async function releaseModel(model: LoadedModel): Promise<void> {
  await model.embeddings.release();
  await Promise.all([model.sessions.vision, model.sessions.decoder].map((s) => s.release()));
}

/**
 * The benchmark's model cache: a deterministic test checkpoint (make-test-model) and its conversions, one
 * folder per dtype, reused across runs. Layout under `--cache` (default /tmp/medvlm-bench-cache):
 *
 *   <size>/config.json           the config the checkpoint is made for (2b: Qwen2-VL-2B-Instruct's values)
 *   <size>/ckpt/                 make-test-model output (2b: bf16, ~4.4 GB; tiny: f32)
 *   <size>/onnx-<dtype>/         convertModel output, one per variant (fp32, fp16, int8, int4, int8-w8a8); reused
 *                                while its manifest.json shows the same dtype, shape, source checkpoint, converter
 *                                revision and graph options (`conversionMismatch`), else converted again
 *   <size>/bench-models.json     how long each step took and its peak RSS (kept from the run that did it)
 *
 * `size` is "2b" (the full-size shape) or "tiny" (golden config A, for --quick and the smoke test).
 * Every step runs in a child process (bench/children/convert.ts) so its peak RSS is its own.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, openSync, readFileSync, readSync, closeSync, readdirSync, statSync, statfsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CONVERTER_REVISION, graphOptionsOf } from "../../gpu-backend/src/convert/index.ts";
import { canonicalJson } from "../../shared/src/fingerprint.ts";
import { CONVERT_VARIANTS, GOLDEN_DIR, ROOT, type BenchOptions, type Dtype, type MachineInfo, fmt, fmtBytes, log, machineInfo, machineLine, runChild } from "./common.ts";

export type ModelSize = "2b" | "tiny";

export const sizeOf = (opts: BenchOptions): ModelSize => (opts.quick ? "tiny" : "2b");

/** Qwen2-VL-2B-Instruct's config.json values (token ids as in golden config A). */
export function fullSizeConfig(): Record<string, unknown> {
  const base = JSON.parse(readFileSync(join(ROOT, "gpu-backend", "demo-model", "config.json"), "utf8")) as Record<string, unknown>;
  return {
    ...base,
    hidden_size: 1536,
    intermediate_size: 8960,
    num_hidden_layers: 28,
    num_attention_heads: 12,
    num_key_value_heads: 2,
    max_window_layers: 28,
    vocab_size: 151936,
    tie_word_embeddings: true,
    max_position_embeddings: 32768,
    sliding_window: 32768,
    rope_theta: 1000000.0,
    rms_norm_eps: 1e-6,
    rope_scaling: { type: "mrope", mrope_section: [16, 24, 24] },
    torch_dtype: "bfloat16",
    vision_config: {
      depth: 32,
      embed_dim: 1280,
      mlp_ratio: 4,
      num_heads: 16,
      in_chans: 3,
      hidden_size: 1536,
      patch_size: 14,
      spatial_merge_size: 2,
      temporal_patch_size: 2,
    },
  };
}

export interface SizePaths {
  root: string;
  config: string;
  ckpt: string;
  record: string;
  onnx: (dtype: Dtype) => string;
}

export function sizePaths(cache: string, size: ModelSize): SizePaths {
  const root = join(cache, size);
  return {
    root,
    config: join(root, "config.json"),
    ckpt: join(root, "ckpt"),
    record: join(root, "bench-models.json"),
    onnx: (dtype) => join(root, `onnx-${dtype}`),
  };
}

function expectedConfig(size: ModelSize): Record<string, unknown> {
  return size === "2b" ? fullSizeConfig() : (JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "config.json"), "utf8")) as Record<string, unknown>);
}

function readJson(path: string): Record<string, unknown> | null {
  try {
    return JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  } catch {
    return null;
  }
}

const sameJson = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

/** Weight files of a make-test-model checkpoint, or null when it is missing/incomplete. */
function checkpointFiles(ckpt: string): string[] | null {
  if (!existsSync(join(ckpt, "config.json")) || !existsSync(join(ckpt, "tokenizer.json"))) return null;
  const idx = readJson(join(ckpt, "model.safetensors.index.json"));
  if (idx) {
    const files = [...new Set(Object.values((idx.weight_map ?? {}) as Record<string, string>))].sort();
    return files.every((f) => existsSync(join(ckpt, f))) ? files.map((f) => join(ckpt, f)) : null;
  }
  return existsSync(join(ckpt, "model.safetensors")) ? [join(ckpt, "model.safetensors")] : null;
}

/** sha256 of a safetensors file's length + header, as the converter's manifest records it. */
function headerSha256(file: string): string {
  const fd = openSync(file, "r");
  try {
    const len = Buffer.alloc(8);
    readSync(fd, len, 0, 8, 0);
    const header = Buffer.alloc(Number(len.readBigUInt64LE(0)));
    readSync(fd, header, 0, header.length, 8);
    return createHash("sha256").update(len).update(header).digest("hex");
  } finally {
    closeSync(fd);
  }
}

/** Total bytes of the files in a folder (not recursive; symlinks followed). */
export function folderBytes(dir: string): number {
  return readdirSync(dir).reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

export interface GraphBytes {
  vision: number;
  embed: number;
  decoder: number;
  total: number;
}

/** Bytes of each graph (its .onnx plus external data), from the files on disk. */
export function graphBytes(onnxDir: string): GraphBytes {
  const size = (stem: string) =>
    readdirSync(onnxDir)
      .filter((f) => f === `${stem}.onnx` || f.startsWith(`${stem}.onnx_data`) || f.startsWith(`${stem}.onnx.data`))
      .reduce((n, f) => n + statSync(join(onnxDir, f)).size, 0);
  const vision = size("vision_encoder");
  const embed = size("embed_tokens");
  const decoder = size("decoder_model_merged");
  return { vision, embed, decoder, total: folderBytes(onnxDir) };
}

/**
 * Why a converted folder is not reusable, or null when it is: the manifest must show the variant's dtype, the
 * benchmark shape, the current converter revision (`CONVERTER_REVISION`: the graphs the converter emits now),
 * the variant's graph options (`converter.options`, e.g. w8a8, W8A8 vision, external data) and the source
 * checkpoint's header hashes. Folders written before the converter recorded its revision never qualify.
 */
export function conversionMismatch(onnxDir: string, dtype: Dtype, size: ModelSize, ckptFiles: string[] | null): string | null {
  const m = readJson(join(onnxDir, "manifest.json"));
  if (!m) return "no manifest.json";
  const variant = CONVERT_VARIANTS[dtype];
  if (m.dtype !== variant.dtype) return `manifest dtype ${String(m.dtype)}`;
  const cfg = expectedConfig(size);
  const dec = (m.decoder ?? {}) as Record<string, unknown>;
  if (dec.num_hidden_layers !== cfg.num_hidden_layers || dec.hidden_size !== cfg.hidden_size) return "manifest decoder shape differs";
  const conv = (m.converter ?? {}) as { revision?: unknown; options?: Record<string, unknown> };
  if (conv.revision !== CONVERTER_REVISION) return `converter revision ${conv.revision === undefined ? "(none)" : String(conv.revision)}, now ${CONVERTER_REVISION}`;
  const want = graphOptionsOf(variant) as unknown as Record<string, unknown>;
  const have = conv.options ?? {};
  const differ = [...new Set([...Object.keys(want), ...Object.keys(have)])].filter((k) => canonicalJson(want[k]) !== canonicalJson(have[k]));
  if (differ.length) return `converter options differ (${differ.map((k) => `${k}: ${canonicalJson(have[k])} → ${canonicalJson(want[k])}`).join(", ")})`;
  const graphs = (m.graphs ?? {}) as Record<string, { file: string; data_file?: string }>;
  for (const g of Object.values(graphs)) {
    if (!existsSync(join(onnxDir, g.file)) || (g.data_file && !existsSync(join(onnxDir, g.data_file)))) return `${g.file} missing`;
  }
  if (ckptFiles) {
    const src = ((m.source as Record<string, unknown>)?.files ?? []) as Array<{ name: string; sha256: string; hashed: string }>;
    const now = ckptFiles.map((f) => headerSha256(f));
    const then = src.filter((f) => f.hashed === "header").map((f) => f.sha256);
    if (!sameJson(now, then)) return "source checkpoint changed";
  }
  return null;
}

export interface StepRecord {
  step: string;
  status: "built" | "skipped" | "failed" | "no-space";
  seconds?: number;
  peak_rss_bytes?: number;
  output_bytes?: number;
  graph_bytes?: GraphBytes;
  error?: string;
  at?: string;
}

function loadRecord(path: string): Record<string, StepRecord> {
  return (readJson(path) as Record<string, StepRecord> | null) ?? {};
}

function saveRecord(path: string, rec: Record<string, StepRecord>): void {
  writeFileSync(path, JSON.stringify(rec, null, 2) + "\n");
}

function freeBytes(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}

/** Rough output size of each step for the 2B shape (disk check before starting). */
const NEED_2B: Record<string, number> = { ckpt: 4.5e9, fp32: 9.6e9, fp16: 4.9e9, int8: 5.3e9, int4: 4.7e9, "int8-w8a8": 3.5e9 };

export interface EnsureResult {
  size: ModelSize;
  paths: SizePaths;
  steps: StepRecord[];
  /** dtype → folder, for the dtypes that are available. */
  available: Partial<Record<Dtype, string>>;
}

/** What a model suite starts from: see {@link prepareVariants}. */
export interface PreparedVariants {
  machine: MachineInfo;
  models: EnsureResult;
  /** The variants that have a converted folder, in the order asked, with the folder. */
  variants: Array<[Dtype, string]>;
  /** Why each other variant is missing (its conversion's or the checkpoint's error). */
  failures: Record<string, string>;
}

/** A model suite's start: the machine (logged), then the checkpoint and a conversion per variant ({@link ensureModels}). */
export async function prepareVariants(opts: BenchOptions, dtypes: Dtype[]): Promise<PreparedVariants> {
  const machine = machineInfo();
  log(machineLine(machine));
  const models = await ensureModels(opts, dtypes);
  const variants: Array<[Dtype, string]> = [];
  const failures: Record<string, string> = {};
  for (const dtype of dtypes) {
    const dir = models.available[dtype];
    if (dir) variants.push([dtype, dir]);
    else failures[dtype] = models.steps.find((s) => s.step === dtype || s.step === "checkpoint")?.error ?? "not converted";
  }
  return { machine, models, variants, failures };
}

/**
 * Makes sure the checkpoint and a conversion per dtype exist (skipping what a manifest shows is done);
 * returns what happened per step. Conversion failures are recorded, not thrown.
 */
export async function ensureModels(opts: BenchOptions, dtypes: Dtype[]): Promise<EnsureResult> {
  const size = sizeOf(opts);
  const paths = sizePaths(opts.cache, size);
  mkdirSync(paths.root, { recursive: true });
  const cfg = expectedConfig(size);
  const rec = loadRecord(paths.record);
  const steps: StepRecord[] = [];
  const available: Partial<Record<Dtype, string>> = {};

  const pending = dtypes.filter((d) => conversionMismatch(paths.onnx(d), d, size, checkpointFiles(paths.ckpt)) !== null);
  // The checkpoint is needed only when something has to be converted.
  let ckptFiles = checkpointFiles(paths.ckpt);
  const ckptCurrent = ckptFiles !== null && sameJson(readJson(join(paths.ckpt, "config.json")), cfg);
  if (pending.length > 0 && !ckptCurrent) {
    if (size === "2b" && freeBytes(paths.root) < NEED_2B.ckpt! + 1e9) {
      steps.push({ step: "checkpoint", status: "no-space", error: `${fmtBytes(freeBytes(paths.root))} free` });
    } else {
      writeFileSync(paths.config, JSON.stringify(cfg, null, 2) + "\n");
      log(`making the ${size} test checkpoint (${size === "2b" ? "bf16, ~4.4 GB, ~1-2 min" : "f32"}) in ${paths.ckpt}`);
      try {
        const { result } = await runChild<{ seconds: number; peak_rss_bytes: number }>(
          "convert.ts",
          { kind: "checkpoint", configPath: paths.config, outDir: paths.ckpt, dtype: size === "2b" ? "bf16" : "f32" },
          { timeoutS: opts.childTimeoutS },
        );
        const r: StepRecord = { step: "checkpoint", status: "built", seconds: result.seconds, peak_rss_bytes: result.peak_rss_bytes, output_bytes: folderBytes(paths.ckpt), at: new Date().toISOString() };
        rec.checkpoint = r;
        steps.push(r);
      } catch (e) {
        steps.push({ step: "checkpoint", status: "failed", error: (e as Error).message });
      }
      ckptFiles = checkpointFiles(paths.ckpt);
    }
  } else {
    steps.push({ ...(rec.checkpoint ?? { step: "checkpoint" }), step: "checkpoint", status: "skipped" });
  }
  saveRecord(paths.record, rec);

  for (const dtype of dtypes) {
    const dir = paths.onnx(dtype);
    const why = conversionMismatch(dir, dtype, size, ckptFiles);
    if (why === null) {
      steps.push({ ...(rec[dtype] ?? { step: dtype }), step: dtype, status: "skipped", graph_bytes: graphBytes(dir), output_bytes: folderBytes(dir) });
      available[dtype] = dir;
      continue;
    }
    if (!ckptFiles) {
      steps.push({ step: dtype, status: "failed", error: "no checkpoint to convert" });
      continue;
    }
    if (size === "2b" && freeBytes(paths.root) < (NEED_2B[dtype] ?? 1e10) + 1e9) {
      steps.push({ step: dtype, status: "no-space", error: `${fmtBytes(freeBytes(paths.root))} free, ~${fmtBytes(NEED_2B[dtype])} needed` });
      continue;
    }
    log(`converting ${size} → ${dtype} (${why}) into ${dir}`);
    try {
      const { result } = await runChild<{ seconds: number; peak_rss_bytes: number }>(
        "convert.ts",
        { kind: "convert", model: paths.ckpt, outDir: dir, ...CONVERT_VARIANTS[dtype], label: dtype },
        { timeoutS: opts.childTimeoutS },
      );
      const r: StepRecord = {
        step: dtype,
        status: "built",
        seconds: result.seconds,
        peak_rss_bytes: result.peak_rss_bytes,
        output_bytes: folderBytes(dir),
        graph_bytes: graphBytes(dir),
        at: new Date().toISOString(),
      };
      rec[dtype] = r;
      steps.push(r);
      available[dtype] = dir;
    } catch (e) {
      const tail = (e as { stderrTail?: string }).stderrTail ?? "";
      steps.push({ step: dtype, status: "failed", error: `${(e as Error).message}${tail ? `: ${tail.trim().split("\n").slice(-3).join(" | ")}` : ""}` });
    }
    saveRecord(paths.record, rec);
  }
  return { size, paths, steps, available };
}

export function stepsTable(steps: StepRecord[]): string[][] {
  return [
    ["step", "status", "time s", "peak RSS", "output", "decoder bytes", "note"],
    ...steps.map((s) => [
      s.step,
      s.status,
      fmt(s.seconds, 1),
      fmtBytes(s.peak_rss_bytes),
      fmtBytes(s.output_bytes),
      fmtBytes(s.graph_bytes?.decoder),
      s.status === "skipped" && s.seconds !== undefined ? `(times from ${s.at?.slice(0, 16) ?? "an earlier run"})` : (s.error ?? ""),
    ]),
  ];
}

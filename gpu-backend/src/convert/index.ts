/**
 * Qwen2-VL checkpoint → ONNX folder in the onnx-community / transformers.js layout:
 *
 *   vision_encoder.onnx        pixel_values, grid_thw → image_features
 *   embed_tokens.onnx          input_ids → inputs_embeds
 *   decoder_model_merged.onnx  inputs_embeds, attention_mask, position_ids, past_key_values.* → logits, present.*
 *   decoder_model_append.onnx  the same decoder with the engine's KV contract (past = a masked cache buffer,
 *                              outputs logits, new_key_values.*: no per-step copy of the cache), sharing
 *                              decoder_model_merged.onnx_data when that graph has external data
 *   <graph>.onnx_data          external tensor data, when a graph exceeds protobuf's 2 GiB (or when asked)
 *   config.json, generation_config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
 *   chat_template.json         copied from the checkpoint when present (preprocessor_config.json with
 *                              Python's image-processor defaults added where it omits them)
 *   manifest.json              source files + hashes, dtype, quantization per part, converter revision and
 *                              options, graph versions, opsets, I/O, creation time
 *
 * Writing is atomic: everything goes into `<out>.tmp-<pid>` and is renamed into place at the end; on any
 * error the temporary folder is removed. Graphs are fully built (and the config/weights validated) before
 * the first byte is written; tensors are then streamed one at a time.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { copyFile, mkdir, open, readFile, readdir, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve, sep } from "node:path";
import { withImageProcessorDefaults } from "../../../shared/src/model-meta.ts";
import { CheckpointError, REQUIRED_FILES, type Qwen2VLConfig, type ResolveOptions, loadQwen2VLCheckpoint, missingCheckpointFiles } from "../checkpoint/index.ts";
import { DEFAULT_OPSET, GraphBuilder, IR_VERSION, type ModelSpec, type ValueInfoSpec, type WriteModelResult, writeModel } from "../onnx/index.ts";
import { type BuildOptions, CONVERT_DTYPES, type ConvertDtype, ConvertError, ModuleEmitter, type TensorSource, floatTypeOf, quantConfigFor } from "./common.ts";
import { LM_HEAD_SLICE_BYTES, type LmHeadMethod, buildDecoder } from "./decoder.ts";
import { buildEmbedTokens } from "./embed.ts";
import type { QuantConfig } from "./quantize.ts";
import { VISION_ATTENTION_CHUNK_ELEMENTS, buildVisionEncoder } from "./vision.ts";
import { exists, isEmptyDir } from "../fs-util.ts";

export { CONVERT_DTYPES, type ConvertDtype, ConvertError, type TensorSource } from "./common.ts";
export type { QuantConfig } from "./quantize.ts";
export { LM_HEAD_SLICE_BYTES, type LmHeadMethod } from "./decoder.ts";

/** Graph files and the version of each graph's contract (bump when inputs/outputs or semantics change). */
export const GRAPHS = {
  vision_encoder: { file: "vision_encoder.onnx", version: 1 },
  embed_tokens: { file: "embed_tokens.onnx", version: 1 },
  decoder_model_merged: { file: "decoder_model_merged.onnx", version: 1 },
  decoder_model_append: { file: "decoder_model_append.onnx", version: 1 },
} as const;

/** Graph names. */
export type GraphName = keyof typeof GRAPHS;

/** Graphs every converted folder has (the onnx-community layout); `decoder_model_append` is optional. */
export type LayoutGraphName = Exclude<GraphName, "decoder_model_append">;

/** Non-weight files copied beside the graphs when the checkpoint has them. */
export const SIDE_FILES = [
  "config.json",
  "generation_config.json",
  "preprocessor_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "chat_template.json",
] as const;

/** Version of manifest.json's layout. */
export const MANIFEST_FORMAT_VERSION = 1;

/**
 * Revision of the emitted graphs, written to manifest.json as `converter.revision`. Bump it with every change
 * that makes the converter write different graphs or files for the same checkpoint and options (ops, fused
 * kernels, initializer layout, external data, defaults), so that caches of converted folders (the benchmark's,
 * bench/lib/models.ts) can tell a stale conversion from a current one. Folders without it predate revision 1.
 *
 * 1: fused RMSNorm/residual (`SimplifiedLayerNormalization`/`SkipSimplifiedLayerNormalization`), GQA without
 *    K/V copies, external data for quantized graphs, W8A8 vision (int4 default; int8 with `w8a8`), float LM
 *    head in vocabulary slices, the W8A8 decoder option, `converter.options` in the manifest.
 * 2: weight-only int8/int4 decoders compute q/k/v and gate/up as one MatMulNBits each
 *    (`…self_attn.q_proj+k_proj+v_proj.weight_Q4`, `…mlp.gate_proj+up_proj.weight_Q4`).
 * 3: `decoder_model_append.onnx` (the decoder with the append KV contract) beside the onnx-community graphs.
 * 4: W8A8 linears quantize their input rows with one `QuantizeLinear` (per row, axis 0) instead of
 *    Div → Round → Add → Cast: the same bytes.
 * 5: the LM head option (`lmHead`, manifest `converter.options.lm_head` instead of `quantize_lm_head`); int4 and
 *    int8 with `w8a8` default to a W8A8 LM head (`lm_head.weight_I8`, MatMulInteger) instead of MatMulNBits.
 * 6: `decoder_model_append.onnx` takes `logits_to_keep` (int64 [1]): the logits of that many last positions,
 *    so that the engine can check a speculative draft in one pass.
 * 7: the vision encoder's attention runs in chunks of query rows (a `Loop`; `visionAttentionChunkElements`,
 *    manifest `converter.options.vision_attention_chunk_elements`): memory bounded for large images, the same
 *    features.
 */
export const CONVERTER_REVISION = 7;

/** Conversion progress, reported after every tensor. */
export interface ConvertProgress {
  graph: GraphName;
  /** Initializer bytes written so far, over all graphs. */
  doneBytes: number;
  totalBytes: number;
}

/** Options of {@link convertModel}. */
export interface ConvertOptions {
  /** Checkpoint folder or Hugging Face Hub id. */
  model: string;
  /** Output folder (must not exist or be empty, unless `overwrite`). */
  outDir: string;
  /** Default fp32. */
  dtype?: ConvertDtype;
  /** int8/int4 settings (block size 32 or 128, symmetric, accuracy level). */
  quant?: Partial<Omit<QuantConfig, "bits">>;
  /** Decoder outputs logits of the last position only (default true). */
  lastLogitsOnly?: boolean;
  /**
   * How the LM head is computed (see `LmHeadMethod`). int4 and int8 with `w8a8` default to `"w8a8"` (int8
   * weights per vocabulary row, int8 activations per token): for int4 its error is that of int8, not of 4-bit
   * blocks, and for both a batch of rows costs little more than one (2B shape, 2 cores: the 8-row decode step
   * ×0.87 for int4, ×0.7–0.9 for `w8a8`, one row unchanged; int4 +84 MB). Weight-only int8 defaults to
   * `"nbits"` (MatMulNBits int8, like its layers). fp32/fp16 allow only `"float"` (the default); anything else
   * is a `bad_options` error.
   */
  lmHead?: LmHeadMethod;
  /**
   * int8 only: the decoder layers' Linear weights as W8A8 integer GEMMs (`MatMulInteger`: int8 weights per
   * output feature, int8 activations quantized per token at run time) instead of weight-only `MatMulNBits`.
   * Prefill (time to first token) is much faster on CPUs with VNNI/AMX (2B shape: 1.6 s vs 2.9 s), decode
   * about the same, logits ~2.5% relative RMS from float32 (int4 block 32: ~25%). The LM head follows
   * `lmHead`, and the vision encoder defaults to W8A8 too.
   * Any other dtype is a `bad_options` error. Default false.
   */
  w8a8?: boolean;
  /**
   * Vision encoder blocks as W8A8 integer GEMMs (int8 weights per output feature, int8 activations per token):
   * a quarter of the float32 encoder's memory and several times its speed on CPUs with VNNI/AMX, at int8
   * precision. Default: true for int4 (whose memory budget the float32 encoder alone would exceed) and for
   * int8 with `w8a8` (whose point is time to first token), false otherwise. Ignored for fp16.
   */
  visionInt8?: boolean;
  /**
   * The vision encoder's attention runs in chunks of query rows whose scores ([heads, rows, patches]) hold at
   * most this many elements (default `VISION_ATTENTION_CHUNK_ELEMENTS`, 2²⁴): memory stays bounded for large
   * images instead of growing with the square of the patches. Larger values mean fewer, larger chunks.
   */
  visionAttentionChunkElements?: number;
  /**
   * A float LM head (fp32/fp16, or int8/int4 with `lmHead: "float"`) above this many bytes becomes MatMuls
   * on vocabulary slices of at most about this size, concatenated: identical logits, and ONNX Runtime's
   * load-time prepacking holds one slice twice instead of the whole head. Default 256 MiB
   * (`LM_HEAD_SLICE_BYTES`); 0 = one MatMul. Mainly for tests (a smaller value splits a small model's head).
   */
  lmHeadSliceBytes?: number;
  /**
   * Also write `decoder_model_append.onnx`, the decoder with the engine's append KV contract (see
   * decoder.ts), which the engine prefers: decode steps read the cache in place instead of copying it.
   * It shares the weights' external data file with `decoder_model_merged.onnx` (an inline decoder, i.e. a
   * small model, is written twice). Default true; false writes only the onnx-community layout.
   */
  appendDecoder?: boolean;
  /**
   * External data: `"auto"` (default: graphs above 2 GiB, and every graph with quantized weights — ONNX
   * Runtime repacks those at load, and from an external file the original bytes are memory-mapped and
   * dropped instead of staying resident), `true` (every graph) or `false`.
   */
  externalData?: boolean | "auto";
  /** Replace an existing output folder. */
  overwrite?: boolean;
  /** Hash whole safetensors files for the manifest (slow for large models); default: headers only. */
  hashWholeFiles?: boolean;
  /** Hub download options (cache dir, revision, token). */
  resolve?: ResolveOptions;
  onProgress?: (p: ConvertProgress) => void;
}

/** One written graph, as listed in the manifest. */
export interface ManifestGraph {
  file: string;
  version: number;
  bytes: number;
  data_file?: string;
  data_bytes?: number;
  inputs: Array<{ name: string; type: string; shape: Array<number | string> | null }>;
  outputs: Array<{ name: string; type: string; shape: Array<number | string> | null }>;
}

/**
 * The resolved options that shape the written graphs and files (defaults filled in, irrelevant ones
 * normalized), as manifest.json records them in `converter.options`: two conversions of the same checkpoint
 * with equal options and the same {@link CONVERTER_REVISION} write the same graphs.
 */
export interface GraphOptions {
  dtype: ConvertDtype;
  /** MatMulNBits settings (int8/int4: of the parts that are MatMulNBits, see `lm_head` and `w8a8`), else null. */
  quant: QuantConfig | null;
  /** Decoder layers as W8A8 MatMulInteger (int8 only). */
  w8a8: boolean;
  /** The LM head's method (`"float"` for fp32/fp16). */
  lm_head: LmHeadMethod;
  /** Vision blocks as W8A8 MatMulInteger. */
  vision_int8: boolean;
  /** Most attention scores per chunk of query rows in the vision encoder. */
  vision_attention_chunk_elements: number;
  last_logits_only: boolean;
  /** Largest float LM-head slice, bytes (0 = one MatMul). */
  lm_head_slice_bytes: number;
  /** `decoder_model_append.onnx` written too. */
  append_decoder: boolean;
  external_data: "auto" | "always" | "never";
}

/**
 * Validates the graph-shaping options of {@link ConvertOptions} and fills in their defaults (throws
 * {@link ConvertError} `bad_options`). What {@link convertModel} records as `converter.options`.
 */
export function graphOptionsOf(
  options: Pick<
    ConvertOptions,
    "dtype" | "quant" | "w8a8" | "lmHead" | "visionInt8" | "visionAttentionChunkElements" | "lastLogitsOnly" | "lmHeadSliceBytes" | "appendDecoder" | "externalData"
  >,
): GraphOptions {
  const dtype = options.dtype ?? "fp32";
  if (!CONVERT_DTYPES.includes(dtype)) throw new ConvertError("bad_options", `dtype must be one of ${CONVERT_DTYPES.join(", ")}, got ${JSON.stringify(dtype)}`);
  const quant = quantConfigFor({ dtype, ...(options.quant ? { quant: options.quant } : {}) }) ?? null;
  const w8a8 = options.w8a8 ?? false;
  if (w8a8 && dtype !== "int8") {
    throw new ConvertError("bad_options", `w8a8 (W8A8 MatMulInteger decoder layers) needs dtype int8, got ${dtype}`);
  }
  const slice = options.lmHeadSliceBytes ?? LM_HEAD_SLICE_BYTES;
  if (!(Number.isFinite(slice) && slice >= 0)) throw new ConvertError("bad_options", `lmHeadSliceBytes must be a number of bytes ≥ 0, got ${slice}`);
  const chunk = options.visionAttentionChunkElements ?? VISION_ATTENTION_CHUNK_ELEMENTS;
  if (!(Number.isSafeInteger(chunk) && chunk >= 1)) {
    throw new ConvertError("bad_options", `visionAttentionChunkElements must be an integer ≥ 1, got ${chunk}`);
  }
  const ext = options.externalData ?? "auto";
  return {
    dtype,
    quant,
    w8a8,
    lm_head: lmHeadOf(dtype, options.lmHead, w8a8),
    vision_int8: visionInt8Of(dtype, options.visionInt8, w8a8),
    vision_attention_chunk_elements: chunk,
    last_logits_only: options.lastLogitsOnly ?? true,
    lm_head_slice_bytes: slice,
    append_decoder: options.appendDecoder ?? true,
    external_data: ext === "auto" ? "auto" : ext ? "always" : "never",
  };
}

/** Methods of the W8A8 and MatMulNBits parts, as the manifest spells them. */
export const W8A8_METHOD = "MatMulInteger W8A8 (int8 weights per output feature, int8 activations per token)";

function nbitsMethod(q: QuantConfig): string {
  return `MatMulNBits int${q.bits} (block ${q.blockSize}, ${q.symmetric ? "symmetric" : "asymmetric"}, accuracy_level ${q.accuracyLevel})`;
}

/** manifest.json's `quantization` for resolved options (null when the decoder is float). */
export function quantizationOf(o: GraphOptions): ConvertManifest["quantization"] {
  if (!o.quant) return null;
  const layers = o.w8a8 ? W8A8_METHOD : nbitsMethod(o.quant);
  const lmHead = { nbits: nbitsMethod(o.quant), w8a8: W8A8_METHOD, float: "float32" }[o.lm_head];
  const headShort = { nbits: `MatMulNBits int${o.quant.bits}`, w8a8: "W8A8 MatMulInteger", float: "float32" }[o.lm_head];
  return {
    method: o.w8a8 ? "MatMulInteger" : "MatMulNBits",
    applies_to: `decoder linear layers (${o.w8a8 ? "W8A8 MatMulInteger" : `MatMulNBits int${o.quant.bits}`}); lm_head ${headShort}`,
    ...o.quant,
    w8a8: o.w8a8,
    parts: { decoder_layers: layers, lm_head: lmHead },
  };
}

/** manifest.json. */
export interface ConvertManifest {
  format: "qwen2-vl-onnx";
  format_version: number;
  created: string;
  /** `revision`: {@link CONVERTER_REVISION} (absent in folders written before it existed); `options`: what shaped the graphs. */
  converter: { name: string; revision: number; options: GraphOptions; opset: Record<string, number>; ir_version: number };
  source: {
    model: string;
    dir: string;
    architecture: string;
    torch_dtype: string;
    files: Array<{ name: string; bytes: number; sha256: string; hashed: "header" | "file" }>;
  };
  dtype: ConvertDtype;
  /** Element type of the graphs' float inputs/outputs (float16 for fp16, else float32). */
  io_float_type: "float32" | "float16";
  /**
   * The decoder's quantization (null for fp32/fp16). `method` is the decoder layers' op; `bits`, `blockSize`,
   * `symmetric`, `accuracyLevel` are the MatMulNBits settings of the parts that use it (none when layers and LM
   * head are both W8A8); `parts` spells out the method of each part, e.g. `decoder_layers`: "MatMulNBits int4
   * (block 32, asymmetric, accuracy_level 4)", `lm_head`: "MatMulInteger W8A8 (int8 weights per output feature,
   * int8 activations per token)".
   */
  quantization:
    | (QuantConfig & {
        method: "MatMulNBits" | "MatMulInteger";
        applies_to: string;
        w8a8: boolean;
        parts: { decoder_layers: string; lm_head: string };
      })
    | null;
  /** Present when the vision encoder's blocks are W8A8 (see ConvertOptions.visionInt8). */
  vision_quantization?: { method: "MatMulInteger"; weights: "int8 per output feature"; activations: "int8 per token"; applies_to: string };
  decoder: {
    last_logits_only: boolean;
    num_hidden_layers: number;
    num_key_value_heads: number;
    head_dim: number;
    hidden_size: number;
    vocab_size: number;
  };
  /** `decoder_model_append` only when written (`converter.options.append_decoder`). */
  graphs: Record<LayoutGraphName, ManifestGraph> & Partial<Record<"decoder_model_append", ManifestGraph>>;
  copied_files: string[];
}

/** What {@link convertModel} did. */
export interface ConvertResult {
  outDir: string;
  manifest: ConvertManifest;
  seconds: number;
}

/** sha256 of a safetensors file's 8-byte length + JSON header (names, dtypes, shapes, offsets). */
async function headerSha256(file: string): Promise<string> {
  const fh = await open(file, "r");
  try {
    const len = Buffer.alloc(8);
    await fh.read(len, 0, 8, 0);
    const n = Number(len.readBigUInt64LE(0));
    const header = Buffer.alloc(n);
    await fh.read(header, 0, n, 8);
    return createHash("sha256").update(len).update(header).digest("hex");
  } finally {
    await fh.close();
  }
}

async function fileSha256(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 22 })) h.update(chunk as Buffer);
  return h.digest("hex");
}

/**
 * preprocessor_config.json with Python's Qwen2VLImageProcessor defaults spelled out where the checkpoint
 * omits them (transformers.js applies none: without `do_normalize` it would not normalize pixels). Keys the
 * file has keep their values; a file that already has them all (or is not a JSON object) is copied as is.
 */
async function writePreprocessorConfig(src: string, dest: string): Promise<void> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(src, "utf8"));
  } catch {
    parsed = undefined;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return copyFile(src, dest);
  const { config, added } = withImageProcessorDefaults(parsed as Record<string, unknown>);
  if (added.length === 0) return copyFile(src, dest);
  await writeFile(dest, JSON.stringify(config, null, 2) + "\n");
}

/** Rejects configs the graph builders cannot express (activations are checked by the builders themselves). */
function checkSupported(config: Qwen2VLConfig): void {
  if (config.vision.head_dim % 4 !== 0) {
    throw new ConvertError("unsupported", `vision head_dim ${config.vision.head_dim} must be a multiple of 4 (2-D rotary: half for rows, half for columns)`);
  }
}

function graphModel(name: GraphName, build: (e: ModuleEmitter) => void, weights: TensorSource, opts: BuildOptions): ModelSpec {
  const g = new GraphBuilder(name);
  build(new ModuleEmitter(g, weights, opts));
  return g.model({
    metadata: { graph: name, graph_version: String(GRAPHS[name].version), dtype: opts.dtype },
    docString: `Qwen2-VL ${name} (${opts.dtype})`,
  });
}

/**
 * Builds the graphs of a checkpoint without writing anything (the config and all tensor shapes are
 * validated on the way): the onnx-community three, plus `decoder_model_append` unless `appendDecoder` is
 * false. Tensor data is read only when the returned specs are written.
 */
export function buildGraphs(
  config: Qwen2VLConfig,
  weights: TensorSource,
  opts: BuildOptions & {
    lastLogitsOnly?: boolean;
    lmHead?: LmHeadMethod;
    visionInt8?: boolean;
    visionAttentionChunkElements?: number;
    w8a8?: boolean;
    lmHeadSliceBytes?: number;
    appendDecoder?: boolean;
  },
): Record<LayoutGraphName, ModelSpec> & Partial<Record<"decoder_model_append", ModelSpec>> {
  checkSupported(config);
  if (opts.w8a8 && opts.dtype !== "int8") throw new ConvertError("bad_options", `w8a8 (W8A8 MatMulInteger decoder layers) needs dtype int8, got ${opts.dtype}`);
  const build: BuildOptions = { dtype: opts.dtype, ...(opts.quant ? { quant: opts.quant } : {}) };
  const visionInt8 = visionInt8Of(opts.dtype, opts.visionInt8, opts.w8a8 ?? false);
  const lmHead = lmHeadOf(opts.dtype, opts.lmHead, opts.w8a8 ?? false);
  const decoder = (name: "decoder_model_merged" | "decoder_model_append") =>
    graphModel(
      name,
      (e) =>
        buildDecoder(e, config.text, {
          lastLogitsOnly: opts.lastLogitsOnly ?? true,
          lmHead,
          ...(opts.w8a8 ? { w8a8: true } : {}),
          ...(opts.lmHeadSliceBytes !== undefined ? { lmHeadSliceBytes: opts.lmHeadSliceBytes } : {}),
          kvCache: name === "decoder_model_append" ? "append" : "present",
        }),
      weights,
      build,
    );
  return {
    vision_encoder: graphModel("vision_encoder", (e) =>
        buildVisionEncoder(e, config.vision, {
          int8: visionInt8,
          ...(opts.visionAttentionChunkElements !== undefined ? { attentionChunkElements: opts.visionAttentionChunkElements } : {}),
        }), weights, build),
    embed_tokens: graphModel("embed_tokens", (e) => buildEmbedTokens(e), weights, build),
    decoder_model_merged: decoder("decoder_model_merged"),
    ...((opts.appendDecoder ?? true) ? { decoder_model_append: decoder("decoder_model_append") } : {}),
  };
}

/**
 * Whether the vision blocks are W8A8 for this dtype and option (float32 graphs only; default: int4, and int8
 * with the W8A8 decoder).
 */
export function visionInt8Of(dtype: ConvertDtype, option: boolean | undefined, w8a8 = false): boolean {
  if (dtype === "fp16") return false;
  return option ?? (dtype === "int4" || (dtype === "int8" && w8a8));
}

/** The LM head methods, as the converter's option spells them. */
export const LM_HEAD_METHODS: readonly LmHeadMethod[] = ["nbits", "w8a8", "float"];

/**
 * The LM head's method for a dtype and option (throws `bad_options` for one the dtype cannot have): float for
 * fp32/fp16; int4 and int8 with `w8a8` default to W8A8, weight-only int8 to MatMulNBits (see
 * {@link ConvertOptions.lmHead}).
 */
export function lmHeadOf(dtype: ConvertDtype, option: LmHeadMethod | undefined, w8a8 = false): LmHeadMethod {
  if (option !== undefined && !LM_HEAD_METHODS.includes(option)) {
    throw new ConvertError("bad_options", `lmHead must be one of ${LM_HEAD_METHODS.join(", ")}, got ${JSON.stringify(option)}`);
  }
  if (dtype === "fp32" || dtype === "fp16") {
    if (option !== undefined && option !== "float") throw new ConvertError("bad_options", `lmHead ${option} needs dtype int8 or int4, got ${dtype}`);
    return "float";
  }
  return option ?? (dtype === "int4" || w8a8 ? "w8a8" : "nbits");
}

/** Whether a graph holds quantized weights (MatMulNBits / MatMulInteger), which ORT repacks at load. */
function hasQuantizedWeights(spec: ModelSpec): boolean {
  return spec.graph.nodes.some((n) => n.opType === "MatMulNBits" || n.opType === "MatMulInteger");
}

function ioOf(v: ValueInfoSpec[]): ManifestGraph["inputs"] {
  return v.map((x) => ({ name: x.name, type: x.type, shape: x.shape }));
}

/** Whether `dir` holds a conversion of this converter (its manifest.json). */
async function isConversion(dir: string): Promise<boolean> {
  try {
    return (JSON.parse(await readFile(join(dir, "manifest.json"), "utf8")) as { format?: unknown }).format === "qwen2-vl-onnx";
  } catch {
    return false;
  }
}

/** Removes `<out>.tmp-<pid>` / `<out>.old-<pid>` folders that an interrupted conversion left (their process is gone). */
async function removeStaleTemporaries(outDir: string): Promise<void> {
  const prefix = basename(outDir);
  let names: string[];
  try {
    names = await readdir(dirname(outDir));
  } catch {
    return;
  }
  for (const name of names) {
    const m = name.startsWith(prefix) ? /^\.(?:tmp|old)-(\d+)$/.exec(name.slice(prefix.length)) : null;
    if (m && !processAlive(Number(m[1]))) await rm(join(dirname(outDir), name), { recursive: true, force: true });
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Converts a Qwen2-VL checkpoint into an ONNX folder (see the module comment for the layout). */
export async function convertModel(options: ConvertOptions): Promise<ConvertResult> {
  const t0 = performance.now();
  // Validates every graph-shaping option before anything is read or written.
  const go = graphOptionsOf(options);
  const dtype = go.dtype;
  const outDir = resolve(options.outDir);
  let outExists = false;
  if (await exists(outDir)) {
    if (!(await isEmptyDir(outDir))) {
      if (!options.overwrite) throw new ConvertError("output_exists", `${outDir}: already exists and is not empty (pass overwrite to replace a previous conversion)`);
      // Overwrite replaces a previous conversion, never a folder of other files (the checkpoint itself, `.`).
      if (!(await isConversion(outDir))) {
        throw new ConvertError("output_exists", `${outDir}: not a folder this converter wrote (no manifest.json of it); overwrite replaces only a previous conversion`);
      }
    }
    outExists = true;
  }
  await removeStaleTemporaries(outDir);

  const ckpt = await loadQwen2VLCheckpoint(options.model, options.resolve ?? {});
  const tmp = `${outDir}.tmp-${process.pid}`;
  try {
    const src = await realpath(ckpt.dir);
    const out = outExists ? await realpath(outDir) : outDir;
    if (src === out || src.startsWith(out + sep)) {
      throw new ConvertError("bad_options", `${outDir}: is (or holds) the checkpoint being converted; write the conversion to another folder`);
    }
    const missing = (await missingCheckpointFiles(ckpt.dir)).filter((f) => (REQUIRED_FILES as readonly string[]).includes(f));
    if (missing.length > 0) {
      throw new CheckpointError("not_found", `${ckpt.dir}: ${missing.join(", ")} missing; the served model needs them (copy or download the whole model repository)`);
    }
    const buildOpts = {
      dtype,
      lastLogitsOnly: go.last_logits_only,
      lmHead: go.lm_head,
      visionInt8: go.vision_int8,
      visionAttentionChunkElements: go.vision_attention_chunk_elements,
      w8a8: go.w8a8,
      lmHeadSliceBytes: go.lm_head_slice_bytes,
      appendDecoder: go.append_decoder,
      ...(options.quant ? { quant: options.quant } : {}),
    };
    // Everything is validated while building; nothing has been written yet.
    const models = buildGraphs(ckpt.config, ckpt.weights, buildOpts);

    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    // Progress counts the onnx-community graphs' bytes; the append decoder mostly points into the merged one's.
    const initBytes = (m: ModelSpec) => m.graph.initializers.reduce((a, t) => a + t.data.byteLength, 0);
    const layout = Object.keys(GRAPHS).filter((n) => n !== "decoder_model_append") as LayoutGraphName[];
    const totalBytes = layout.reduce((s, n) => s + initBytes(models[n]), 0);
    let before = 0;
    const graphs = {} as ConvertManifest["graphs"];
    const written = {} as Partial<Record<GraphName, WriteModelResult>>;
    for (const name of Object.keys(GRAPHS) as GraphName[]) {
      const spec = models[name];
      if (!spec) continue;
      const mode = go.external_data;
      const shareDataOf = name === "decoder_model_append" ? written.decoder_model_merged : undefined;
      const res = await writeModel(join(tmp, GRAPHS[name].file), spec, {
        externalData: mode === "auto" ? (hasQuantizedWeights(spec) ? true : "auto") : mode === "always",
        ...(shareDataOf?.dataPath
          ? { shareDataOf }
          : { onProgress: (done: number) => options.onProgress?.({ graph: name, doneBytes: Math.min(before + done, totalBytes), totalBytes }) }),
      });
      written[name] = res;
      if (name !== "decoder_model_append") before += initBytes(spec);
      graphs[name] = {
        file: GRAPHS[name].file,
        version: GRAPHS[name].version,
        bytes: res.modelBytes,
        ...(res.dataPath ? { data_file: basename(res.dataPath), ...(res.dataBytes > 0 ? { data_bytes: res.dataBytes } : {}) } : {}),
        inputs: ioOf(spec.graph.inputs),
        outputs: ioOf(spec.graph.outputs),
      };
    }

    const copied: string[] = [];
    for (const f of SIDE_FILES) {
      const src = join(ckpt.dir, f);
      if (await exists(src)) {
        if (f === "preprocessor_config.json") await writePreprocessorConfig(src, join(tmp, f));
        else await copyFile(src, join(tmp, f));
        copied.push(f);
      }
    }

    const files: ConvertManifest["source"]["files"] = [];
    for (const f of ckpt.weights.files) {
      const whole = options.hashWholeFiles ?? false;
      files.push({ name: basename(f), bytes: (await stat(f)).size, sha256: whole ? await fileSha256(f) : await headerSha256(f), hashed: whole ? "file" : "header" });
    }
    const t = ckpt.config.text;
    const manifest: ConvertManifest = {
      format: "qwen2-vl-onnx",
      format_version: MANIFEST_FORMAT_VERSION,
      created: new Date().toISOString(),
      converter: {
        name: "medvlm-r1-serving gpu-backend/src/convert",
        revision: CONVERTER_REVISION,
        options: go,
        opset: { "": DEFAULT_OPSET, ...(go.quant ? { "com.microsoft": 1 } : {}) },
        ir_version: IR_VERSION,
      },
      source: { model: options.model, dir: ckpt.dir, architecture: ckpt.config.architecture, torch_dtype: ckpt.config.torch_dtype, files },
      dtype,
      io_float_type: floatTypeOf(dtype),
      quantization: quantizationOf(go),
      ...(go.vision_int8
        ? {
            vision_quantization: {
              method: "MatMulInteger" as const,
              weights: "int8 per output feature" as const,
              activations: "int8 per token" as const,
              applies_to: "vision blocks (qkv, proj, fc1, fc2); patch embedding and merger float32",
            },
          }
        : {}),
      decoder: {
        last_logits_only: go.last_logits_only,
        num_hidden_layers: t.num_hidden_layers,
        num_key_value_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        hidden_size: t.hidden_size,
        vocab_size: t.vocab_size,
      },
      graphs,
      copied_files: copied,
    };
    await writeFile(join(tmp, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");

    // Swap in only now: a crash before this point leaves at most the temporary folder.
    let old: string | undefined;
    if (outExists) {
      old = `${outDir}.old-${process.pid}`;
      await rename(outDir, old);
    }
    await rename(tmp, outDir);
    if (old) await rm(old, { recursive: true, force: true });
    return { outDir, manifest, seconds: (performance.now() - t0) / 1000 };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  } finally {
    await ckpt.weights.close();
  }
}

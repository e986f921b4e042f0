/**
 * Qwen2-VL `config.json` → a normalized {@link Qwen2VLConfig} with every field the converter needs.
 *
 * Omitted fields get the defaults of transformers v4.46.1 (`configuration_qwen2_vl.py`), the version the golden
 * data was produced with; things the 4.46.1 model hard-codes (vision LayerNorm eps 1e-6, head_dim = hidden/heads)
 * are filled the same way. Newer layouts are accepted too: text parameters nested under `text_config`, and
 * `rope_scaling` in either the original `{"type": "mrope", ...}` form or the `{"type": "default", "rope_type":
 * "default", ...}` form that transformers ≥ 4.45 writes when it re-saves a config.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { CheckpointError } from "./safetensors.ts";

/** Normalized Qwen2-VL configuration (all defaults filled, consistency checked). */
export interface Qwen2VLConfig {
  architecture: "Qwen2VLForConditionalGeneration";
  text: {
    hidden_size: number;
    num_hidden_layers: number;
    num_attention_heads: number;
    num_key_value_heads: number;
    head_dim: number;
    intermediate_size: number;
    hidden_act: string;
    rms_norm_eps: number;
    rope_theta: number;
    mrope_section: [number, number, number];
    vocab_size: number;
    tie_word_embeddings: boolean;
    max_position_embeddings: number;
  };
  vision: {
    embed_dim: number;
    depth: number;
    num_heads: number;
    head_dim: number;
    mlp_ratio: number;
    hidden_size: number;
    patch_size: number;
    temporal_patch_size: number;
    spatial_merge_size: number;
    in_channels: number;
    hidden_act: string;
    layer_norm_eps: number;
  };
  image_token_id: number;
  video_token_id: number;
  vision_start_token_id: number;
  vision_end_token_id: number;
  bos_token_id: number | null;
  eos_token_id: number | number[] | null;
  torch_dtype: string;
}

/** The one architecture this converter handles. */
export const QWEN2VL_ARCHITECTURE = "Qwen2VLForConditionalGeneration";

/** transformers v4.46.1 `Qwen2VLConfig.__init__` defaults (text side). */
export const TEXT_DEFAULTS = {
  vocab_size: 152064,
  hidden_size: 8192,
  intermediate_size: 29568,
  num_hidden_layers: 80,
  num_attention_heads: 64,
  num_key_value_heads: 8,
  hidden_act: "silu",
  max_position_embeddings: 32768,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: false,
  rope_theta: 1000000.0,
} as const;

/** transformers v4.46.1 `Qwen2VLVisionConfig.__init__` defaults; LayerNorm eps is hard-coded to 1e-6 in the model. */
export const VISION_DEFAULTS = {
  depth: 32,
  embed_dim: 1280,
  hidden_size: 3584,
  hidden_act: "quick_gelu",
  mlp_ratio: 4,
  num_heads: 16,
  in_channels: 3,
  patch_size: 14,
  spatial_merge_size: 2,
  temporal_patch_size: 2,
  layer_norm_eps: 1e-6,
} as const;

/** Special token ids of the Qwen2-VL tokenizer (used when a config omits them). */
export const TOKEN_ID_DEFAULTS = {
  image_token_id: 151655,
  video_token_id: 151656,
  vision_start_token_id: 151652,
  vision_end_token_id: 151653,
} as const;

type Obj = Record<string, unknown>;

function isObj(x: unknown): x is Obj {
  return x !== null && typeof x === "object" && !Array.isArray(x);
}

function bad(msg: string): never {
  throw new CheckpointError("bad_config", `config.json: ${msg}`);
}

/** First defined (not undefined) value among the sources, for a key. */
function pick(key: string, ...sources: (Obj | undefined)[]): unknown {
  for (const s of sources) if (s && s[key] !== undefined) return s[key];
  return undefined;
}

function posInt(v: unknown, field: string, dflt?: number): number {
  const x = v === undefined ? dflt : v;
  if (typeof x !== "number" || !Number.isSafeInteger(x) || x <= 0) bad(`${field} must be a positive integer, got ${JSON.stringify(v)}`);
  return x;
}

function posNum(v: unknown, field: string, dflt?: number): number {
  const x = v === undefined ? dflt : v;
  if (typeof x !== "number" || !Number.isFinite(x) || x <= 0) bad(`${field} must be a positive number, got ${JSON.stringify(v)}`);
  return x;
}

function str(v: unknown, field: string, dflt: string): string {
  const x = v === undefined ? dflt : v;
  if (typeof x !== "string" || x === "") bad(`${field} must be a non-empty string, got ${JSON.stringify(v)}`);
  return x;
}

function tokenId(v: unknown, field: string, dflt: number): number {
  const x = v === undefined || v === null ? dflt : v;
  if (typeof x !== "number" || !Number.isSafeInteger(x) || x < 0) bad(`${field} must be a token id, got ${JSON.stringify(v)}`);
  return x;
}

function optTokenId(v: unknown, field: string): number | null {
  if (v === undefined || v === null) return null;
  return tokenId(v, field, 0);
}

/** Checks that the config names Qwen2-VL; anything else is `unsupported_architecture` naming what it is. */
function checkArchitecture(json: Obj): void {
  const archs = json["architectures"];
  const modelType = json["model_type"];
  if (modelType !== undefined && modelType !== "qwen2_vl") {
    throw new CheckpointError(
      "unsupported_architecture",
      `config.json: model_type ${JSON.stringify(modelType)} is not supported (only qwen2_vl / ${QWEN2VL_ARCHITECTURE})`,
    );
  }
  if (archs !== undefined && archs !== null) {
    if (!Array.isArray(archs) || !archs.every((a) => typeof a === "string")) bad(`architectures must be a list of strings`);
    if (!archs.includes(QWEN2VL_ARCHITECTURE)) {
      throw new CheckpointError(
        "unsupported_architecture",
        `config.json: architecture ${archs.map((a) => JSON.stringify(a)).join(", ") || "[]"} is not supported (only ${QWEN2VL_ARCHITECTURE})`,
      );
    }
  } else if (modelType === undefined) {
    bad(`neither "architectures" nor "model_type" is given; cannot tell that this is ${QWEN2VL_ARCHITECTURE}`);
  }
}

/** Reads `mrope_section` from either rope_scaling form (or transformers 5's `rope_parameters`). */
function parseRope(text: Obj, top: Obj, headDim: number): { mrope: [number, number, number]; theta: unknown } {
  const rs = pick("rope_scaling", text, top);
  const rp = pick("rope_parameters", text, top);
  const rope = isObj(rs) ? rs : isObj(rp) ? rp : undefined;
  if (rope === undefined) {
    bad(`rope_scaling.mrope_section is required (Qwen2-VL uses multimodal RoPE), got rope_scaling ${JSON.stringify(rs ?? null)}`);
  }
  const type = rope["rope_type"] ?? rope["type"];
  if (type !== undefined && type !== "mrope" && type !== "default") {
    bad(`rope_scaling type ${JSON.stringify(type)} is not supported (expected "mrope" or "default" with mrope_section)`);
  }
  const ms = rope["mrope_section"];
  if (!Array.isArray(ms) || ms.length !== 3 || !ms.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= 0)) {
    bad(`rope_scaling.mrope_section must be 3 non-negative integers [t, h, w], got ${JSON.stringify(ms)}`);
  }
  const sum = (ms as number[]).reduce((a, b) => a + b, 0);
  if (sum * 2 !== headDim) bad(`rope_scaling.mrope_section ${JSON.stringify(ms)} sums to ${sum}, but must be head_dim/2 = ${headDim / 2}`);
  return { mrope: [ms[0], ms[1], ms[2]] as [number, number, number], theta: rope === rp ? rope["rope_theta"] : undefined };
}

/**
 * Normalizes a parsed `config.json`. Throws CheckpointError `unsupported_architecture` for anything that is not
 * Qwen2-VL (naming it), `bad_config` for missing `vision_config`, wrong types or inconsistent dimensions.
 */
export function parseQwen2VLConfig(json: unknown): Qwen2VLConfig {
  if (!isObj(json)) bad("not a JSON object");
  checkArchitecture(json);
  const visionJson = json["vision_config"];
  if (!isObj(visionJson)) bad(`vision_config is missing (a ${QWEN2VL_ARCHITECTURE} config must describe its vision encoder)`);
  const tc = json["text_config"];
  if (tc !== undefined && tc !== null && !isObj(tc)) bad("text_config must be an object");
  const text: Obj = isObj(tc) ? tc : {};
  const t = (k: string): unknown => pick(k, text, json);
  const T = TEXT_DEFAULTS;

  const hidden = posInt(t("hidden_size"), "hidden_size", T.hidden_size);
  const heads = posInt(t("num_attention_heads"), "num_attention_heads", T.num_attention_heads);
  // transformers: an explicit null means "same as num_attention_heads" (MHA); omitted means the class default.
  const kvRaw = t("num_key_value_heads");
  const kvHeads = kvRaw === null ? heads : posInt(kvRaw, "num_key_value_heads", T.num_key_value_heads);
  if (hidden % heads !== 0) bad(`hidden_size ${hidden} is not divisible by num_attention_heads ${heads}`);
  const headDim = hidden / heads;
  if (heads % kvHeads !== 0) bad(`num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  const rope = parseRope(text, json, headDim);
  const tie = t("tie_word_embeddings") ?? T.tie_word_embeddings;
  if (typeof tie !== "boolean") bad(`tie_word_embeddings must be a boolean, got ${JSON.stringify(tie)}`);

  const v = (k: string): unknown => visionJson[k];
  const V = VISION_DEFAULTS;
  const embed = posInt(v("embed_dim"), "vision_config.embed_dim", V.embed_dim);
  const vHeads = posInt(v("num_heads"), "vision_config.num_heads", V.num_heads);
  if (embed % vHeads !== 0) bad(`vision_config.embed_dim ${embed} is not divisible by vision_config.num_heads ${vHeads}`);
  const vHidden = posInt(v("hidden_size"), "vision_config.hidden_size", V.hidden_size);
  if (vHidden !== hidden) {
    bad(`vision_config.hidden_size ${vHidden} (merger output) must equal the text hidden_size ${hidden}`);
  }
  const mlpRatio = posNum(v("mlp_ratio"), "vision_config.mlp_ratio", V.mlp_ratio);
  if (!Number.isInteger(embed * mlpRatio)) bad(`vision_config.embed_dim × mlp_ratio (${embed} × ${mlpRatio}) is not an integer`);
  // Qwen's own files say in_chans; transformers' parameter is in_channels (4.46.1 reads only in_channels, default 3).
  const inCh = posInt(v("in_channels") ?? v("in_chans"), "vision_config.in_channels", V.in_channels);

  const eos = json["eos_token_id"];
  let eosOut: number | number[] | null;
  if (Array.isArray(eos)) eosOut = eos.map((x, i) => tokenId(x, `eos_token_id[${i}]`, 0));
  else eosOut = optTokenId(eos, "eos_token_id");

  return {
    architecture: QWEN2VL_ARCHITECTURE,
    text: {
      hidden_size: hidden,
      num_hidden_layers: posInt(t("num_hidden_layers"), "num_hidden_layers", T.num_hidden_layers),
      num_attention_heads: heads,
      num_key_value_heads: kvHeads,
      head_dim: headDim,
      intermediate_size: posInt(t("intermediate_size"), "intermediate_size", T.intermediate_size),
      hidden_act: str(t("hidden_act"), "hidden_act", T.hidden_act),
      rms_norm_eps: posNum(t("rms_norm_eps"), "rms_norm_eps", T.rms_norm_eps),
      rope_theta: posNum(t("rope_theta") ?? rope.theta, "rope_theta", T.rope_theta),
      mrope_section: rope.mrope,
      vocab_size: posInt(t("vocab_size"), "vocab_size", T.vocab_size),
      tie_word_embeddings: tie,
      max_position_embeddings: posInt(t("max_position_embeddings"), "max_position_embeddings", T.max_position_embeddings),
    },
    vision: {
      embed_dim: embed,
      depth: posInt(v("depth"), "vision_config.depth", V.depth),
      num_heads: vHeads,
      head_dim: embed / vHeads,
      mlp_ratio: mlpRatio,
      hidden_size: vHidden,
      patch_size: posInt(v("patch_size"), "vision_config.patch_size", V.patch_size),
      temporal_patch_size: posInt(v("temporal_patch_size"), "vision_config.temporal_patch_size", V.temporal_patch_size),
      spatial_merge_size: posInt(v("spatial_merge_size"), "vision_config.spatial_merge_size", V.spatial_merge_size),
      in_channels: inCh,
      hidden_act: str(v("hidden_act"), "vision_config.hidden_act", V.hidden_act),
      layer_norm_eps: posNum(v("layer_norm_eps"), "vision_config.layer_norm_eps", V.layer_norm_eps),
    },
    image_token_id: tokenId(json["image_token_id"], "image_token_id", TOKEN_ID_DEFAULTS.image_token_id),
    video_token_id: tokenId(json["video_token_id"], "video_token_id", TOKEN_ID_DEFAULTS.video_token_id),
    vision_start_token_id: tokenId(json["vision_start_token_id"], "vision_start_token_id", TOKEN_ID_DEFAULTS.vision_start_token_id),
    vision_end_token_id: tokenId(json["vision_end_token_id"], "vision_end_token_id", TOKEN_ID_DEFAULTS.vision_end_token_id),
    bos_token_id: optTokenId(json["bos_token_id"], "bos_token_id"),
    eos_token_id: eosOut,
    torch_dtype: str(json["torch_dtype"] ?? json["dtype"] ?? text["torch_dtype"], "torch_dtype", "float32"),
  };
}

/** Reads and normalizes `<dir>/config.json` (`not_found` if absent, `bad_config` if not JSON). */
export async function readQwen2VLConfig(dir: string): Promise<Qwen2VLConfig> {
  const path = join(dir, "config.json");
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new CheckpointError("not_found", `${path}: no such file`);
    throw e;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new CheckpointError("bad_config", `${path}: not valid JSON (${(e as Error).message})`);
  }
  try {
    return parseQwen2VLConfig(json);
  } catch (e) {
    if (e instanceof CheckpointError) throw new CheckpointError(e.code, e.message.replace(/^config\.json/, path), { cause: e });
    throw e;
  }
}

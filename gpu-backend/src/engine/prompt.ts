/**
 * Messages in the Hugging Face / qwen_vl_utils chat format → the model's input, as the model card's Python
 * does it: `apply_chat_template(add_generation_prompt=True)`, `process_vision_info` (images fetched and
 * resized with their per-image `min_pixels`/`max_pixels`, or to their `resized_height`/`resized_width`), then
 * the processor (pixel values, grids, `<|image_pad|>` expansion).
 */
import { readFile } from "node:fs/promises";
import { isAbsolute, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { BpeTokenizer } from "../../../shared/src/tokenizer/index.ts";
import { renderChatTemplate, contentKind, type ChatMessage, type ContentItem } from "../../../shared/src/chat-template.ts";
import { expandImagePads } from "../../../shared/src/image-tokens.ts";
import { preprocessImages, type PreprocessImageInput, type PreprocessOptions } from "../preprocess/index.ts";
import type { LoadedModel } from "./model.ts";
import type { PromptInput } from "./generate.ts";

/** The model's tokenizer (the same encoder the edge bundles, compiled from the folder's tokenizer.json). */
export function createTokenizer(model: LoadedModel): BpeTokenizer {
  return BpeTokenizer.fromTokenizerJson(model.tokenizerJson);
}

/** Reads an image reference of a message item: a path (relative to `baseDir`), a `file://` URL or a data URI. */
async function readImageRef(ref: unknown, baseDir: string): Promise<Uint8Array> {
  if (typeof ref !== "string" || ref.length === 0) throw new Error("an image item needs an `image` path");
  if (ref.startsWith("data:")) {
    const comma = ref.indexOf(",");
    if (comma < 0 || !/;base64$/i.test(ref.slice(0, comma))) throw new Error("image data URIs must be base64");
    return new Uint8Array(Buffer.from(ref.slice(comma + 1), "base64"));
  }
  if (/^https?:\/\//i.test(ref)) throw new Error("remote image URLs are not fetched: download the image and give its path");
  const path = ref.startsWith("file://") ? fileURLToPath(ref) : isAbsolute(ref) ? ref : resolve(baseDir, ref);
  return new Uint8Array(await readFile(path));
}

/** The model's preprocessor_config as preprocessing options (the server's bounds), with an optional token cap. */
export function preprocessOptionsOf(model: LoadedModel, maxImageTokens?: number): PreprocessOptions {
  const p = model.preprocessor;
  return {
    minPixels: p.min_pixels,
    maxPixels: p.max_pixels,
    patchSize: p.patch_size,
    mergeSize: p.merge_size,
    temporalPatchSize: p.temporal_patch_size,
    imageMean: p.image_mean,
    imageStd: p.image_std,
    ...(maxImageTokens ? { maxImageTokens } : {}),
  };
}

export interface BuiltPrompt extends PromptInput {
  promptText: string;
  inputIdsUnexpanded: number[];
  gridThw: [number, number, number][];
  imageTokens: number[];
}

/** Builds the full model input from chat messages (image paths resolved against `baseDir`). */
export async function buildPrompt(
  model: LoadedModel,
  tokenizer: BpeTokenizer,
  messages: ChatMessage[],
  baseDir: string,
  limits: { maxImageTokens?: number } = {},
): Promise<BuiltPrompt> {
  const images: PreprocessImageInput[] = [];
  for (const m of messages) {
    if (typeof m.content === "string") continue;
    for (const item of m.content as ContentItem[]) {
      if (contentKind(item) !== "image") continue;
      const input: PreprocessImageInput = { bytes: await readImageRef(item.image ?? (item.image_url as { url?: string } | undefined)?.url, baseDir) };
      if (typeof item.min_pixels === "number") input.minPixels = item.min_pixels;
      if (typeof item.max_pixels === "number") input.maxPixels = item.max_pixels;
      // Both or neither, as qwen_vl_utils reads them (one alone is ignored there; refused here).
      if (typeof item.resized_height === "number") input.resizedHeight = item.resized_height;
      if (typeof item.resized_width === "number") input.resizedWidth = item.resized_width;
      images.push(input);
    }
  }
  const pre = images.length
    ? await preprocessImages(images, preprocessOptionsOf(model, limits.maxImageTokens))
    : { pixelValues: new Float32Array(0), gridThw: [] as [number, number, number][], imageTokens: [] as number[] };
  const promptText = renderChatTemplate(messages, { addGenerationPrompt: true });
  const inputIdsUnexpanded = tokenizer.encode(promptText);
  const inputIds = expandImagePads(inputIdsUnexpanded, pre.imageTokens, model.meta.image_token_id);
  return {
    promptText,
    inputIdsUnexpanded,
    inputIds,
    pixelValues: images.length ? pre.pixelValues : null,
    gridThw: pre.gridThw,
    imageTokens: pre.imageTokens,
  };
}

/**
 * From a validated request to a tensorized wire request: each image's grid from its header dimensions
 * (smart_resize with the server's caps, narrowed by the request) or from the size the request asked for, the chat
 * template rendered, tokenized, and every `<|image_pad|>` expanded to the image's token count — exactly what
 * Qwen2VLProcessor produces.
 */
import { ApiError } from "../../shared/src/errors.ts";
import { renderChatTemplate, type ChatMessage } from "../../shared/src/chat-template.ts";
import { effectivePixelBounds, imageGrid } from "../../shared/src/smart-resize.ts";
import { expandImagePads } from "../../shared/src/image-tokens.ts";
import type { GenerationParams, WireImage, WireRequest } from "../../shared/src/wire.ts";
import type { EdgeConfig } from "./config.ts";
import type { ImageSizing } from "./upload/parse-vqa.ts";
import { MODEL_META, encode, getTokenizer } from "./tokenizer/index.ts";

export interface InputImage {
  bytes: Uint8Array;
  mime: WireImage["mime"];
  width: number;
  height: number;
  /** How the request asks for it to be sized (checked by `checkImageSizing`): bounds that narrow the server's, or a fixed size. */
  sizing?: ImageSizing;
}

export interface Prepared {
  wire: WireRequest;
  promptTokens: number;
  imageTokens: number;
}

let reservedTexts: string[] | null = null;

/** The tokenizer's special token strings (`<|im_start|>`, `<|image_pad|>`, …): user text must not contain them. */
function reservedTokenTexts(): string[] {
  reservedTexts ??= getTokenizer().addedTokens.map((t) => t.content);
  return reservedTexts;
}

/**
 * Refuses user-supplied text holding a special token's literal text: the tokenizer would turn it into the
 * control token itself (a prompt-injection path, e.g. a fake `<|im_end|>` or an extra `<|image_pad|>`).
 */
export function assertNoSpecialTokens(texts: Iterable<string>): void {
  const reserved = reservedTokenTexts();
  for (const text of texts) {
    const hit = reserved.find((r) => text.includes(r));
    if (hit) throw new ApiError("invalid_request", `text may not contain the reserved token ${hit}`);
  }
}

export function prepareGeneration(args: {
  requestId: string;
  messages: ChatMessage[];
  images: InputImage[];
  params: GenerationParams;
  stream: boolean;
  config: EdgeConfig;
  nowMs?: number;
}): Prepared {
  const { config, images } = args;
  const wireImages: WireImage[] = [];
  const tokensPerImage: number[] = [];
  for (const img of images) {
    const s = img.sizing ?? {};
    const server = { minPixels: config.minPixels, maxPixels: config.maxPixels };
    const asked = s.resized_height !== undefined && s.resized_width !== undefined ? { height: s.resized_height, width: s.resized_width } : null;
    const bounds = asked ? server : effectivePixelBounds(server, { minPixels: s.min_pixels, maxPixels: s.max_pixels });
    const grid = imageGrid(
      { height: img.height, width: img.width },
      {
        patchSize: MODEL_META.patch_size,
        mergeSize: MODEL_META.merge_size,
        temporalPatchSize: MODEL_META.temporal_patch_size,
        minPixels: bounds.minPixels,
        maxPixels: bounds.maxPixels,
        ...(asked ? { requestedSize: asked } : {}),
        processorMinPixels: MODEL_META.min_pixels,
        processorMaxPixels: MODEL_META.max_pixels,
      },
    );
    tokensPerImage.push(grid.tokens);
    wireImages.push({
      mime: img.mime,
      byte_length: img.bytes.length,
      width: img.width,
      height: img.height,
      grid_thw: grid.gridThw,
      min_pixels: bounds.minPixels,
      max_pixels: bounds.maxPixels,
      ...(asked ? { resized_height: asked.height, resized_width: asked.width } : {}),
    });
  }
  const imageTokens = tokensPerImage.reduce((a, b) => a + b, 0);
  if (imageTokens > config.maxImageTokens) {
    throw new ApiError(
      "too_many_image_tokens",
      `the images would use ${imageTokens} tokens; the limit is ${config.maxImageTokens} (lower max_pixels)`,
    );
  }
  const prompt = renderChatTemplate(args.messages, { addGenerationPrompt: true });
  const inputIds = expandImagePads(encode(prompt), tokensPerImage, MODEL_META.image_token_id);
  const room = MODEL_META.max_position_embeddings - inputIds.length;
  if (room < 1) {
    throw new ApiError(
      "context_length_exceeded",
      `the prompt is ${inputIds.length} tokens; the model's context is ${MODEL_META.max_position_embeddings}`,
    );
  }
  const params = { ...args.params, max_new_tokens: Math.min(args.params.max_new_tokens, room) };
  return {
    wire: {
      header: {
        request_id: args.requestId,
        model_fingerprint: MODEL_META.fingerprint,
        input_ids_count: inputIds.length,
        images: wireImages,
        params,
        stream: args.stream,
        deadline_ms: (args.nowMs ?? Date.now()) + config.backendTimeoutMs,
      },
      inputIds,
      images: images.map((i) => i.bytes),
    },
    promptTokens: inputIds.length,
    imageTokens,
  };
}

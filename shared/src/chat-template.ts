/**
 * The Qwen2-VL chat template (tokenizer_config.json `chat_template`) as a TypeScript function, producing
 * the same string as transformers' `apply_chat_template(messages, tokenize=False, ...)`:
 *
 * ```
 * [<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n]   (only if the first message is not system)
 * <|im_start|>{role}\n{content}<|im_end|>\n                          (per message)
 * [<|im_start|>assistant\n]                                          (add_generation_prompt)
 * ```
 * A list content renders item by item: an image item as `<|vision_start|><|image_pad|><|vision_end|>`,
 * a video item as `<|vision_start|><|video_pad|><|vision_end|>`, a text item as its text; with
 * `add_vision_id` an image/video is prefixed by `Picture N: ` / `Video N: ` (counters run across messages).
 * No block tag of this template is followed by a newline, so Jinja's trim_blocks/lstrip_blocks change nothing.
 */
import { ApiError } from "./errors.ts";

/** System message the template inserts when the conversation does not start with one. */
export const DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant.";

/** Placeholder rendered for each image; the tokenizer side expands its `<|image_pad|>`. */
export const IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>";
/** Placeholder rendered for each video. */
export const VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>";

/**
 * One item of a list content, HF format: `{type:"text", text}`, `{type:"image", image?}`,
 * `{type:"image_url", image_url}`, `{type:"video", video?}`. Classified exactly like the Jinja template
 * (key presence, not value: `{"image": null}` is an image).
 */
export interface ContentItem {
  type?: string;
  text?: string;
  image?: unknown;
  image_url?: unknown;
  video?: unknown;
  [key: string]: unknown;
}

/** One chat message, HF format. */
export interface ChatMessage {
  role: string;
  content: string | ContentItem[];
}

/** Options of {@link renderChatTemplate}. */
export interface ChatTemplateOptions {
  /** Append `<|im_start|>assistant\n` (what generation needs). Default false, as in transformers. */
  addGenerationPrompt?: boolean;
  /** Prefix images/videos with `Picture N: ` / `Video N: `. Default false. */
  addVisionId?: boolean;
}

/** Kind of a content item under the template's rules. */
export type ContentKind = "image" | "video" | "text" | "other";

const has = (o: object, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k);

/**
 * Classifies a content item exactly as the template's if/elif chain:
 * `type == 'image' or 'image' in item or 'image_url' in item` → image; else
 * `type == 'video' or 'video' in item` → video; else `'text' in item` → text; else rendered as nothing.
 */
export function contentKind(item: ContentItem): ContentKind {
  if (item.type === "image" || has(item, "image") || has(item, "image_url")) return "image";
  if (item.type === "video" || has(item, "video")) return "video";
  if (has(item, "text")) return "text";
  return "other";
}

function checkMessage(m: unknown, i: number): asserts m is ChatMessage {
  if (m === null || typeof m !== "object") {
    throw new ApiError("invalid_request", `messages[${i}] must be an object`);
  }
  const msg = m as { role?: unknown; content?: unknown };
  if (typeof msg.role !== "string") {
    throw new ApiError("invalid_request", `messages[${i}].role must be a string`);
  }
  if (typeof msg.content === "string") return;
  if (!Array.isArray(msg.content)) {
    throw new ApiError("invalid_request", `messages[${i}].content must be a string or a list of content items`);
  }
  msg.content.forEach((item: unknown, j) => {
    // Jinja would apply substring tests to a string item; we accept only objects, as HF's format does.
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      throw new ApiError("invalid_request", `messages[${i}].content[${j}] must be an object`);
    }
    const it = item as ContentItem;
    if (contentKind(it) === "text" && typeof it.text !== "string") {
      throw new ApiError("invalid_request", `messages[${i}].content[${j}].text must be a string`);
    }
  });
}

/**
 * Renders `messages` with the Qwen2-VL chat template. Throws `invalid_request` for structurally invalid
 * messages (non-string role or text, content neither string nor list of objects).
 */
export function renderChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
  if (!Array.isArray(messages)) throw new ApiError("invalid_request", "messages must be a list");
  const parts: string[] = [];
  let imageCount = 0;
  let videoCount = 0;
  messages.forEach((message, i) => {
    checkMessage(message, i);
    if (i === 0 && message.role !== "system") {
      parts.push(`<|im_start|>system\n${DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n`);
    }
    parts.push(`<|im_start|>${message.role}\n`);
    if (typeof message.content === "string") {
      parts.push(message.content);
    } else {
      for (const item of message.content) {
        switch (contentKind(item)) {
          case "image":
            imageCount += 1;
            if (options.addVisionId) parts.push(`Picture ${imageCount}: `);
            parts.push(IMAGE_PLACEHOLDER);
            break;
          case "video":
            videoCount += 1;
            if (options.addVisionId) parts.push(`Video ${videoCount}: `);
            parts.push(VIDEO_PLACEHOLDER);
            break;
          case "text":
            parts.push(item.text as string);
            break;
          case "other":
            break;
        }
      }
    }
    parts.push("<|im_end|>\n");
  });
  if (options.addGenerationPrompt) parts.push("<|im_start|>assistant\n");
  return parts.join("");
}

function countKind(messages: readonly ChatMessage[], kind: ContentKind): number {
  let n = 0;
  for (const m of messages) {
    if (m === null || typeof m !== "object" || !Array.isArray(m.content)) continue;
    for (const item of m.content) {
      if (item !== null && typeof item === "object" && contentKind(item) === kind) n += 1;
    }
  }
  return n;
}

/** Number of image items (by the template's rule) over all messages = number of `<|image_pad|>` rendered. */
export function countImages(messages: readonly ChatMessage[]): number {
  return countKind(messages, "image");
}

/** Number of video items over all messages. */
export function countVideos(messages: readonly ChatMessage[]): number {
  return countKind(messages, "video");
}

/**
 * `POST /v1/chat/completions`, OpenAI-compatible so the official `openai` client works unchanged. Images come
 * as `image_url` parts holding `data:` URIs only: the service never fetches remote URLs (no SSRF, no third
 * party sees medical images). An `image_url` object may size its image as `/v1/vqa` does (`min_pixels`,
 * `max_pixels`, or `resized_height` and `resized_width`). The messages go through the model's own chat template.
 */
import type { Context } from "hono";
import { ApiError } from "../../../shared/src/errors.ts";
import type { ChatMessage, ContentItem } from "../../../shared/src/chat-template.ts";
import { DEFAULT_PARAMS, type GenerationParams } from "../../../shared/src/wire.ts";
import { readBodyLimited } from "../../../shared/src/read-body.ts";
import {
  IMAGE_SIZING_FIELDS,
  acceptedMediaType,
  checkImageSizing,
  decodeDataUri,
  refuseUnknownFields,
  validateImageBytes,
  type ImageSizing,
} from "../upload/parse-vqa.ts";
import { callBackend } from "../backend/client.ts";
import { loadConfig } from "../config.ts";
import { assertNoSpecialTokens, prepareGeneration, type InputImage } from "../prepare.ts";
import { consume, sseEvent, sseStream, type Completion } from "../relay.ts";
import { log } from "../log.ts";
import { vqaLimits } from "./vqa.ts";
import type { AppEnv } from "../app-env.ts";

const MAX_MESSAGES = 64;
const MAX_IMAGES = 4;
/** What an `image_url` object may hold: OpenAI's fields, and the per-image sizing of `/v1/vqa`. */
const IMAGE_URL_FIELDS: readonly string[] = ["url", "detail", ...IMAGE_SIZING_FIELDS];

function param(msg: string): ApiError {
  return new ApiError("invalid_parameter", msg);
}

function optionalNumber(body: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < min || v > max) throw param(`${key} must be a number in [${min}, ${max}]`);
  return v;
}

/**
 * OpenAI features this service does not have. Asked for in earnest, each is refused (422), not ignored: a client that
 * asks for log probabilities, tool calls, a JSON schema or penalties would otherwise get a reply that silently lacks
 * them. Their neutral values (false, [], "none", "text", 0, {}) pass, as generic clients send them.
 */
function refuseUnsupported(b: Record<string, unknown>): void {
  const set = (k: string) => b[k] !== undefined && b[k] !== null;
  const emptyList = (k: string) => Array.isArray(b[k]) && (b[k] as unknown[]).length === 0;
  if ((set("logprobs") && b.logprobs !== false) || (set("top_logprobs") && b.top_logprobs !== 0)) throw param("logprobs are not supported");
  if ((set("tools") && !emptyList("tools")) || (set("functions") && !emptyList("functions"))) throw param("tools are not supported");
  if (set("tool_choice") && b.tool_choice !== "none") throw param("tools are not supported");
  const format = b.response_format as { type?: unknown } | undefined | null;
  if (set("response_format") && (typeof format !== "object" || (format!.type !== undefined && format!.type !== "text"))) {
    throw param("only response_format {type: \"text\"} is supported");
  }
  for (const k of ["frequency_penalty", "presence_penalty"]) if (set(k) && b[k] !== 0) throw param(`${k} is not supported (only 0)`);
  if (set("logit_bias") && !(typeof b.logit_bias === "object" && Object.keys(b.logit_bias as object).length === 0)) throw param("logit_bias is not supported");
}

/** OpenAI request → chat-template messages, the images in order, and generation parameters. */
export function parseChatRequest(
  body: unknown,
  limits: { maxNewTokensDefault: number; maxNewTokensCap: number },
): { messages: ChatMessage[]; images: { uri: string; sizing: ImageSizing }[]; params: GenerationParams; stream: boolean; includeUsage: boolean } {
  if (body === null || typeof body !== "object" || Array.isArray(body)) throw new ApiError("invalid_request", "the body must be a JSON object");
  const b = body as Record<string, unknown>;
  if (!Array.isArray(b.messages) || b.messages.length === 0) throw new ApiError("invalid_request", "messages must be a non-empty array");
  if (b.messages.length > MAX_MESSAGES) throw new ApiError("invalid_request", `at most ${MAX_MESSAGES} messages`);
  if (b.n !== undefined && b.n !== 1) throw param("only n = 1 is supported");
  refuseUnsupported(b);
  const images: { uri: string; sizing: ImageSizing }[] = [];
  const messages: ChatMessage[] = b.messages.map((m: unknown, i: number) => {
    const msg = (m ?? {}) as Record<string, unknown>;
    if (!["system", "user", "assistant"].includes(msg.role as string)) {
      throw new ApiError("invalid_request", `messages[${i}].role must be system, user or assistant`);
    }
    const role = msg.role as string;
    if (typeof msg.content === "string") return { role, content: msg.content };
    if (!Array.isArray(msg.content)) throw new ApiError("invalid_request", `messages[${i}].content must be a string or an array of parts`);
    const content: ContentItem[] = msg.content.map((p: unknown, j: number) => {
      const part = (p ?? {}) as Record<string, unknown>;
      if (part.type === "text" && typeof part.text === "string") return { type: "text", text: part.text };
      if (part.type === "image_url") {
        const where = `messages[${i}].content[${j}].image_url`;
        const iu = (typeof part.image_url === "object" && part.image_url !== null ? part.image_url : {}) as Record<string, unknown>;
        const url = typeof part.image_url === "string" ? part.image_url : iu.url;
        if (typeof url !== "string") throw new ApiError("invalid_request", `${where}.url is required`);
        refuseUnknownFields(Object.keys(iu), IMAGE_URL_FIELDS, where);
        // OpenAI's "low"/"high" resolutions have no equivalent here: the sizing fields say what is wanted instead.
        if (iu.detail !== undefined && iu.detail !== null && iu.detail !== "auto") {
          throw param(`${where}.detail may only be "auto"; size the image with min_pixels/max_pixels or resized_height/resized_width`);
        }
        images.push({ uri: url, sizing: checkImageSizing((k) => (iu[k] === null ? undefined : iu[k]), `${where}.`) });
        return { type: "image" };
      }
      throw new ApiError("invalid_request", `messages[${i}].content[${j}] must be a text or image_url part`);
    });
    return { role, content };
  });
  if (images.length > MAX_IMAGES) throw new ApiError("invalid_request", `at most ${MAX_IMAGES} images per request`);

  const maxTokens = b.max_completion_tokens ?? b.max_tokens;
  if (maxTokens !== undefined && maxTokens !== null && (typeof maxTokens !== "number" || !Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > limits.maxNewTokensCap)) {
    throw param(`max_tokens must be an integer in [1, ${limits.maxNewTokensCap}]`);
  }
  const seed = b.seed;
  if (seed !== undefined && seed !== null && (typeof seed !== "number" || !Number.isSafeInteger(seed))) throw param("seed must be an integer");
  const stop = b.stop === undefined || b.stop === null ? [] : typeof b.stop === "string" ? [b.stop] : b.stop;
  if (!Array.isArray(stop) || stop.length > 4 || !stop.every((s) => typeof s === "string" && s.length > 0 && s.length <= 256)) {
    throw param("stop must be a string or up to 4 non-empty strings");
  }
  const topP = optionalNumber(b, "top_p", 0, 1);
  if (topP === 0) throw param("top_p must be in (0, 1]");
  const params: GenerationParams = {
    ...DEFAULT_PARAMS,
    max_new_tokens: (maxTokens as number | undefined) ?? limits.maxNewTokensDefault,
    // OpenAI's default temperature is 1; this model is evaluated greedily, so 0 is ours.
    temperature: optionalNumber(b, "temperature", 0, 2) ?? 0,
    top_p: topP ?? 1,
    seed: (seed as number | undefined) ?? null,
    stop: stop as string[],
  };
  const opts = (b.stream_options ?? {}) as Record<string, unknown>;
  return { messages, images, params, stream: b.stream === true, includeUsage: opts.include_usage === true };
}

export async function chatHandler(c: Context<AppEnv>): Promise<Response> {
  const started = Date.now();
  const config = loadConfig(c.env);
  const requestId = c.get("requestId");
  const limits = vqaLimits(config);
  await acceptedMediaType(c.req.raw, ["application/json"]);
  // Images travel base64 inside the JSON (4/3 larger): allow for that plus the text.
  const raw = await readBodyLimited(c.req.raw, Math.ceil(config.maxUploadBytes * 1.4) + 256 * 1024);
  let body: unknown;
  try {
    body = JSON.parse(new TextDecoder().decode(raw));
  } catch {
    throw new ApiError("invalid_json", "the body is not valid JSON");
  }
  const req = parseChatRequest(body, config);
  const texts = req.messages.flatMap((m) =>
    typeof m.content === "string" ? [m.content] : m.content.flatMap((p) => (typeof p.text === "string" ? [p.text] : [])),
  );
  const chars = texts.reduce((n, t) => n + t.length, 0);
  if (chars > config.maxPromptChars) {
    throw new ApiError("context_length_exceeded", `the messages' text is ${chars} characters; the limit is ${config.maxPromptChars}`);
  }
  assertNoSpecialTokens(texts);
  const images: InputImage[] = req.images.map(({ uri, sizing }) => {
    const { bytes, declaredMime } = decodeDataUri(uri, limits.maxUploadBytes);
    return { ...validateImageBytes(bytes, declaredMime, limits), sizing };
  });
  const prepared = prepareGeneration({ requestId, messages: req.messages, images, params: req.params, stream: true, config });
  const edgeMs = Date.now() - started;
  c.set("logFields", { images: images.length, prompt_tokens: prepared.promptTokens, image_tokens: prepared.imageTokens, stream: req.stream });

  const abort = new AbortController();
  c.req.raw.signal?.addEventListener?.("abort", () => abort.abort());
  const call = await callBackend(config, prepared.wire, abort.signal);
  const id = `chatcmpl-${requestId}`;
  const created = Math.floor(started / 1000);
  const usageOf = (d: Completion) => ({
    prompt_tokens: d.usage.prompt_tokens,
    completion_tokens: d.usage.completion_tokens,
    total_tokens: d.usage.prompt_tokens + d.usage.completion_tokens,
    // OpenAI's field for predicted-output tokens, which is what a speculative draft is.
    ...(d.usage.completion_tokens_details ? { completion_tokens_details: d.usage.completion_tokens_details } : {}),
  });

  if (!req.stream) {
    const done = await consume(call);
    return c.json({
      id,
      object: "chat.completion",
      created,
      model: config.modelId,
      choices: [{ index: 0, message: { role: "assistant", content: done.text }, finish_reason: done.finish_reason, logprobs: null }],
      usage: usageOf(done),
      timings: { ...done.timings, edge_ms: edgeMs, total_ms: Date.now() - started },
    });
  }
  const chunk = (delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}) =>
    sseEvent({ id, object: "chat.completion.chunk", created, model: config.modelId, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...extra });
  const stream = sseStream(
    call,
    abort,
    {
      token: (t) => (t.index === 0 ? chunk({ role: "assistant", content: t.text }, null) : chunk({ content: t.text }, null)),
      done: (d) =>
        chunk({}, d.finish_reason) +
        (req.includeUsage ? sseEvent({ id, object: "chat.completion.chunk", created, model: config.modelId, choices: [], usage: usageOf(d) }) : "") +
        sseEvent("[DONE]"),
      error: (e) => sseEvent(e.toBody(requestId)),
    },
    (o) => log(o.error ? "warn" : "info", o.cancelled ? "chat stream cancelled" : "chat stream ended", { request_id: requestId, code: o.error?.code }),
  );
  return new Response(stream, {
    headers: { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store", "x-request-id": requestId },
  });
}

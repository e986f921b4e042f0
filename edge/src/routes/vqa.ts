/**
 * `POST /v1/vqa`: one image, a question and its options → MedVLM-R1's reasoning and answer, parsed.
 * The prompt is the model's evaluation prompt byte for byte (shared/src/prompt.ts).
 */
import type { Context } from "hono";
import type { VqaResponse, VqaTokenEvent } from "../../../shared/src/api.ts";
import { parseAnswer } from "../../../shared/src/answer.ts";
import { buildVqaMessages } from "../../../shared/src/prompt.ts";
import { DEFAULT_PARAMS } from "../../../shared/src/wire.ts";
import { parseVqaRequest } from "../upload/parse-vqa.ts";
import { callBackend } from "../backend/client.ts";
import { loadConfig, type EdgeConfig } from "../config.ts";
import { assertNoSpecialTokens, prepareGeneration } from "../prepare.ts";
import { consume, sseEvent, sseStream, type Completion } from "../relay.ts";
import { log } from "../log.ts";
import type { AppEnv } from "../app-env.ts";

export function vqaLimits(config: EdgeConfig) {
  return {
    maxUploadBytes: config.maxUploadBytes,
    maxImagePixels: config.maxImagePixels,
    maxQuestionChars: config.maxQuestionChars,
    minOptions: 2,
    maxOptions: 10,
    maxOptionChars: 1000,
    maxNewTokensCap: config.maxNewTokensCap,
  };
}

export async function vqaHandler(c: Context<AppEnv>): Promise<Response> {
  const started = Date.now();
  const config = loadConfig(c.env);
  const requestId = c.get("requestId");
  const input = await parseVqaRequest(c.req.raw, vqaLimits(config));
  assertNoSpecialTokens([input.question, ...input.options]);
  const messages = buildVqaMessages({ question: input.question, options: input.options, imageCount: 1 });
  const prepared = prepareGeneration({
    requestId,
    messages,
    images: [{ ...input.image, sizing: input /* its min/max_pixels, resized_height/width */ }],
    params: { ...DEFAULT_PARAMS, max_new_tokens: input.max_new_tokens ?? config.maxNewTokensDefault },
    stream: true,
    config,
  });
  const edgeMs = Date.now() - started;
  c.set("logFields", {
    image_bytes: input.image.bytes.length,
    image_width: input.image.width,
    image_height: input.image.height,
    prompt_tokens: prepared.promptTokens,
    image_tokens: prepared.imageTokens,
    stream: input.stream,
  });

  const abort = new AbortController();
  c.req.raw.signal?.addEventListener?.("abort", () => abort.abort());
  const call = await callBackend(config, prepared.wire, abort.signal);

  const toResponse = (done: Completion): VqaResponse => {
    const parsed = parseAnswer(done.text, input.options);
    return {
      id: requestId,
      object: "vqa.answer",
      model: config.modelId,
      answer: parsed.answer,
      answer_text: parsed.answer_text,
      reference_answer: parsed.reference_answer,
      reasoning: parsed.reasoning,
      raw: done.text,
      format_ok: parsed.format_ok,
      letter_valid: parsed.letter_valid,
      fallback: parsed.fallback,
      finish_reason: done.finish_reason,
      usage: done.usage,
      timings: { ...done.timings, edge_ms: edgeMs, total_ms: Date.now() - started },
    };
  };

  if (!input.stream) {
    const done = await consume(call);
    log("info", "vqa answered", { request_id: requestId, completion_tokens: done.usage.completion_tokens, finish_reason: done.finish_reason });
    return c.json(toResponse(done));
  }
  const body = sseStream(
    call,
    abort,
    {
      token: (t) => sseEvent({ delta: t.text, index: t.index, token_id: t.id } satisfies VqaTokenEvent, "token"),
      done: (d) => sseEvent(toResponse(d), "done"),
      error: (e) => sseEvent(e.toBody(requestId), "error"),
    },
    (o) =>
      log(o.error ? "warn" : "info", o.cancelled ? "vqa stream cancelled" : "vqa stream ended", {
        request_id: requestId,
        code: o.error?.code,
        completion_tokens: o.completion?.usage.completion_tokens,
      }),
  );
  return new Response(body, {
    headers: { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store", "x-request-id": requestId },
  });
}


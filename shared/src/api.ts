/**
 * Public API types of the edge (`/v1/vqa`, `/v1/chat/completions`, `/v1/models`). The OpenAPI document
 * (edge/src/openapi.ts) describes the same shapes for non-TypeScript clients.
 */

/** `POST /v1/vqa` with `application/json` (mobile clients). Multipart carries the same fields. */
export interface VqaRequest {
  /** The image: base64, or a `data:image/png|jpeg|webp;base64,…` URI. Remote URLs are refused. */
  image: string;
  question: string;
  /** 2 to 10 answer options; they become `A) …`, `B) …` in the prompt. */
  options: string[];
  /** Default 1024 (the model card's setting), capped by the server. */
  max_new_tokens?: number;
  /** May lower the server's per-image pixel cap, never raise it. */
  max_pixels?: number;
  min_pixels?: number;
  /**
   * Both or neither: the image is resized to this size, rounded as qwen_vl_utils does (multiples of 28), instead
   * of from its own; not with `max_pixels`/`min_pixels`. The result must lie within the server's pixel window.
   */
  resized_height?: number;
  resized_width?: number;
  /** Server-Sent Events: `token` events with deltas, then one `done` event carrying `VqaResponse`. */
  stream?: boolean;
}

export interface Usage {
  prompt_tokens: number;
  image_tokens: number;
  completion_tokens: number;
  /**
   * Present when the backend decoded speculatively (its `DRAFT_TOKENS`) and drafted anything: draft tokens
   * checked and kept (`accepted_prediction_tokens`, part of `completion_tokens`) or not. The completion is the
   * same either way; these say how much the drafts saved.
   */
  completion_tokens_details?: { accepted_prediction_tokens: number; rejected_prediction_tokens: number };
}

/** Milliseconds spent in each phase, as measured where the phase ran. */
export interface Timings {
  /** Edge: parse, validate, tokenize (before the backend is called). */
  edge_ms?: number;
  queue_ms?: number;
  vision_ms?: number;
  prefill_ms?: number;
  decode_ms?: number;
  /** Backend total, from admission to the last token. */
  backend_ms?: number;
  /** Edge total, from the request's arrival to the final answer. */
  total_ms?: number;
}

export type FinishReason = "stop" | "length";

/** The `/v1/vqa` answer (also the payload of the final `done` SSE event). */
export interface VqaResponse {
  id: string;
  object: "vqa.answer";
  model: string;
  /**
   * The answer letter: the reference evaluation's letter (`<answer>\s*([A-Z])\s*</answer>`, first match)
   * when it names an offered option; when that rule finds nothing, a tolerantly recovered letter, with
   * `fallback` saying how; null otherwise.
   */
  answer: string | null;
  /** The text of the chosen option. */
  answer_text: string | null;
  /** Exactly what the reference evaluation extracts, unchecked (accuracy on this field matches the paper's). */
  reference_answer: string | null;
  /** The content of `<think>…</think>`, when present. */
  reasoning: string | null;
  /** The decoded completion, special tokens skipped. */
  raw: string;
  /** The whole output is `<think>…</think>\s*<answer>…</answer>` (MedVLM-R1's format reward). */
  format_ok: boolean;
  /** Whether the letter found names an offered option (null when no letter was found). */
  letter_valid: boolean | null;
  /** How `answer` was recovered when the reference rule found nothing (e.g. "answer_phrase"); null otherwise. */
  fallback: string | null;
  finish_reason: FinishReason;
  usage: Usage;
  timings: Timings;
}

/** SSE events of a streamed `/v1/vqa`: `event: token` (TokenEvent), `event: done` (VqaResponse), `event: error` (ErrorBody). */
export interface VqaTokenEvent {
  /** Decoded text added by this token (may be empty while a multi-byte character is incomplete). */
  delta: string;
  /** 0-based index of the generated token. */
  index: number;
  /** The token's id in the model's vocabulary. */
  token_id: number;
}

export interface ModelCard {
  id: string;
  object: "model";
  created: number;
  owned_by: string;
  /** Fingerprint of the tokenizer + config the edge tokenizes for (must equal the backend's). */
  fingerprint: string;
}

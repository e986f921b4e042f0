/**
 * The backend's HTTP service (Hono): the signed, tensorized generate endpoint the edge calls, plus health,
 * readiness and metrics. Every refusal happens before the engine sees the request and carries a stable
 * code; every accepted request ends in exactly one final answer or error (see engine-client.ts).
 *
 * Order of checks on `POST /internal/v1/generate`: shutting down (503) → media type (415) → body size
 * (413) → signature (401) → wire format (400) → replay (401) → model fingerprint (409) → deadline (504) →
 * engine ready (503) → request semantics (422) → admission (503 + Retry-After) → engine.
 */
import { Hono, type Context } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { ApiError } from "../../../shared/src/errors.ts";
import type { ModelMeta } from "../../../shared/src/model-meta.ts";
import {
  GENERATE_PATH,
  LOAD_HEADER,
  ReplayGuard,
  WIRE_CONTENT_TYPE,
  WIRE_EVENTS_CONTENT_TYPE,
  decodeWireRequest,
  encodeEvent,
  verifyWireSignature,
  type BackendEvent,
  type WireRequest,
} from "../../../shared/src/wire.ts";
import type { Engine, EngineEvent, EngineRequest } from "../engine/engine-types.ts";
import type { BackendConfig } from "./config.ts";
import { EngineClient, toWireEvent, type Generation } from "./engine-client.ts";
import { silentLogger, type Logger } from "./log.ts";
import { BackendMetrics } from "./metrics.ts";
import { readBodyLimited } from "../../../shared/src/read-body.ts";

/** Seconds a client should wait before retrying an overloaded backend. */
const OVERLOADED_RETRY_AFTER_S = 1;
/** Seconds before retrying a backend that is starting or shutting down. */
const UNAVAILABLE_RETRY_AFTER_S = 5;

export interface BackendAppDeps {
  engine: Engine;
  /** The fields the HTTP layer uses; the full `BackendConfig` fits. */
  config: Pick<BackendConfig, "hmacSecret" | "queueSize" | "maxNewTokensCap" | "maxTotalTokens" | "maxImageTokens" | "maxBodyBytes">;
  /** The loaded model's meta (fingerprint, vocabulary, special ids, merge size, context). */
  meta: ModelMeta;
  logger?: Logger;
  metrics?: BackendMetrics;
  /** Clock (Unix ms) for signatures, replay and deadlines. */
  now?: () => number;
}

/** Start/stop control of a running backend app. */
export interface BackendLifecycle {
  /** True once shutdown began: new requests get 503 and /readyz answers 503. */
  readonly draining: boolean;
  /** Generate requests admitted and not finished. */
  inFlight(): number;
  /**
   * Stops admitting, lets in-flight requests finish for up to `graceMs`, then cancels the rest (each gets
   * its final `error` event, `backend_unavailable`). Resolves with the counts. Closing the engine and the
   * HTTP server is the caller's (main.ts).
   */
  shutdown(graceMs: number): Promise<{ finished: number; cancelled: number }>;
}

/** The Hono app plus its lifecycle and metrics. */
export type BackendApp = Hono & { readonly lifecycle: BackendLifecycle; readonly metrics: BackendMetrics };

/** `x-medvlm-load` value: what the edge balances on. */
export function loadHeaderValue(engine: Engine): string {
  const s = engine.stats();
  return `active=${s.active};queued=${s.queued};capacity=${s.capacity}`;
}

function invalid(message: string): ApiError {
  return new ApiError("invalid_parameter", message);
}

/**
 * Semantic checks of a decoded wire request against the loaded model and the server's limits (the wire
 * decoder has checked structure and types). Throws ApiError 422 (`invalid_parameter`,
 * `context_length_exceeded`, `too_many_image_tokens`). Messages name positions and counts, never token values.
 */
export function validateWireRequest(wire: WireRequest, meta: ModelMeta, config: BackendAppDeps["config"]): { imageTokens: number } {
  const { header, inputIds } = wire;
  const p = header.params;
  if (p.max_new_tokens > config.maxNewTokensCap) throw invalid(`max_new_tokens must be at most ${config.maxNewTokensCap}`);
  if (!(p.temperature >= 0 && p.temperature <= 2)) throw invalid("temperature must be in [0, 2]");
  if (!(p.top_p > 0 && p.top_p <= 1)) throw invalid("top_p must be in (0, 1]");
  if (!(p.top_k >= 0)) throw invalid("top_k must be at least 0");
  if (!(p.repetition_penalty > 0 && p.repetition_penalty <= 2)) throw invalid("repetition_penalty must be in (0, 2]");

  const merge2 = meta.merge_size * meta.merge_size;
  const perImage = header.images.map((im, i) => {
    const [t, h, w] = im.grid_thw;
    if (h % meta.merge_size !== 0 || w % meta.merge_size !== 0) {
      throw invalid(`image ${i}: grid_thw h and w must be multiples of the merge size ${meta.merge_size}`);
    }
    if (im.min_pixels > im.max_pixels) throw invalid(`image ${i}: min_pixels exceeds max_pixels`);
    return (t * h * w) / merge2;
  });
  const imageTokens = perImage.reduce((a, b) => a + b, 0);
  if (imageTokens > config.maxImageTokens) {
    throw new ApiError("too_many_image_tokens", `the images need ${imageTokens} tokens; at most ${config.maxImageTokens} are allowed`);
  }

  // Vocabulary, and the `<|image_pad|>` runs: one contiguous run per image, right after `<|vision_start|>`,
  // as long as that image's grid needs (this is what M-RoPE and the feature scatter assume).
  const runs: { start: number; length: number }[] = [];
  let pads = 0;
  for (let i = 0; i < inputIds.length; i++) {
    const id = inputIds[i]!;
    if (id < 0 || id >= meta.vocab_size) throw invalid(`input id at position ${i} is outside the vocabulary [0, ${meta.vocab_size})`);
    if (id === meta.video_token_id) throw invalid("video inputs are not supported");
    if (id === meta.image_token_id) {
      pads++;
      const last = runs[runs.length - 1];
      if (last && last.start + last.length === i) last.length++;
      else runs.push({ start: i, length: 1 });
    }
  }
  if (pads !== imageTokens) {
    throw invalid(`the prompt holds ${pads} <|image_pad|> tokens but the images' grids need ${imageTokens}`);
  }
  if (runs.length !== perImage.length) throw invalid(`the prompt holds ${runs.length} image blocks for ${perImage.length} images`);
  runs.forEach((r, i) => {
    if (r.length !== perImage[i]) throw invalid(`image ${i}: ${r.length} <|image_pad|> tokens but its grid needs ${perImage[i]}`);
    if (inputIds[r.start - 1] !== meta.vision_start_token_id) throw invalid(`image ${i}: its <|image_pad|> block does not follow <|vision_start|>`);
  });

  const total = inputIds.length + p.max_new_tokens;
  const limit = Math.min(meta.max_position_embeddings, config.maxTotalTokens);
  if (total > limit) {
    throw new ApiError(
      "context_length_exceeded",
      `prompt (${inputIds.length} tokens) + max_new_tokens (${p.max_new_tokens}) exceeds the limit of ${limit} tokens`,
    );
  }
  return { imageTokens };
}

function errorResponse(c: Context, err: ApiError, requestId?: string): Response {
  for (const [k, v] of Object.entries(err.headers)) c.header(k, v);
  c.header("cache-control", "no-store");
  return c.json(err.toBody(requestId), err.status as ContentfulStatusCode);
}

function apiErrorOf(ev: EngineEvent & { type: "error" }): ApiError {
  const headers: Record<string, string> =
    ev.code === "backend_overloaded" ? { "Retry-After": String(OVERLOADED_RETRY_AFTER_S) }
    : ev.code === "backend_unavailable" ? { "Retry-After": String(UNAVAILABLE_RETRY_AFTER_S) }
    : {};
  return new ApiError(ev.code, ev.message, headers);
}

/** Builds the backend's Hono app around `engine`. */
export function createBackendApp(deps: BackendAppDeps): BackendApp {
  const { engine, config, meta } = deps;
  const logger = deps.logger ?? silentLogger;
  const now = deps.now ?? Date.now;
  const metrics = deps.metrics ?? new BackendMetrics(() => engine.stats(), now);
  const client = new EngineClient(engine, metrics, logger, now);
  const replay = new ReplayGuard();
  const enc = new TextEncoder();
  let draining = false;

  const app = new Hono();

  // Every response says how loaded this backend is (after the handler, so it counts the request itself).
  app.use("*", async (c, next) => {
    await next();
    try {
      c.res.headers.set(LOAD_HEADER, loadHeaderValue(engine));
      // While draining, no connection is kept for reuse: the server is about to stop listening.
      if (draining) c.res.headers.set("connection", "close");
    } catch {
      // immutable headers (never for our own responses): the header is a hint only
    }
  });

  app.onError((e, c) => {
    if (e instanceof ApiError) return errorResponse(c, e);
    logger.log("error", "unhandled error", { route: c.req.path, error: e?.name ?? "error" });
    return errorResponse(c, new ApiError("internal_error", "internal error"));
  });
  app.notFound((c) => errorResponse(c, new ApiError("not_found", "no such route")));

  // Liveness: a part of the engine failed for good, or its thread is stuck in a run; a restart is what helps.
  app.get("/healthz", (c) => {
    const s = engine.stats();
    return s.failed ? c.json({ status: "failed" }, 503) : s.stalled ? c.json({ status: "stalled" }, 503) : c.json({ status: "ok" });
  });

  app.get("/readyz", (c) => {
    const s = engine.stats();
    const ready = s.ready && !draining;
    if (!ready) c.header("Retry-After", String(UNAVAILABLE_RETRY_AFTER_S));
    const status = ready ? "ready" : draining ? "draining" : s.stalled ? "stalled" : "starting";
    return c.json({ status, fingerprint: meta.fingerprint }, ready ? 200 : 503);
  });

  app.get("/metrics", (c) => {
    c.header("content-type", "text/plain; version=0.0.4; charset=utf-8");
    return c.body(metrics.render());
  });

  app.on(["GET", "PUT", "DELETE", "PATCH"], GENERATE_PATH, (c) => errorResponse(c, new ApiError("method_not_allowed", "use POST")));

  app.post(GENERATE_PATH, async (c) => {
    let requestId: string | undefined;
    let bytesIn = 0;
    let wire: WireRequest;
    let imageTokens: number;
    try {
      if (draining) {
        throw new ApiError("backend_unavailable", "the backend is shutting down", { "Retry-After": String(UNAVAILABLE_RETRY_AFTER_S) });
      }
      const ct = (c.req.header("content-type") ?? "").split(";")[0]!.trim().toLowerCase();
      if (ct !== WIRE_CONTENT_TYPE) throw new ApiError("unsupported_media_type", `content-type must be ${WIRE_CONTENT_TYPE}`);
      const body = await readBodyLimited(c.req.raw, config.maxBodyBytes);
      bytesIn = body.byteLength;
      await verifyWireSignature(body, c.req.raw.headers, config.hmacSecret, now());
      wire = decodeWireRequest(body);
      requestId = wire.header.request_id;
      replay.check(requestId, now());
      if (wire.header.model_fingerprint !== meta.fingerprint) {
        throw new ApiError("model_mismatch", "the request was tokenized for a different model than the one loaded");
      }
      if (wire.header.deadline_ms !== null && wire.header.deadline_ms <= now()) {
        throw new ApiError("backend_timeout", "the request's deadline has already passed");
      }
      if (engine.stats().stalled) {
        // Refused at once, so that the edge tries another backend instead of waiting on a stuck one.
        throw new ApiError("backend_unavailable", "the engine is not responding", { "Retry-After": String(UNAVAILABLE_RETRY_AFTER_S) });
      }
      if (!engine.stats().ready) {
        throw new ApiError("backend_unavailable", "the model is not loaded yet", { "Retry-After": String(UNAVAILABLE_RETRY_AFTER_S) });
      }
      ({ imageTokens } = validateWireRequest(wire, meta, config));
      // Admission: refuse at once rather than wait, so the edge can try another backend.
      if (engine.stats().queued >= config.queueSize) {
        throw new ApiError("backend_overloaded", "the request queue is full", { "Retry-After": String(OVERLOADED_RETRY_AFTER_S) });
      }
      if (draining) {
        throw new ApiError("backend_unavailable", "the backend is shutting down", { "Retry-After": String(UNAVAILABLE_RETRY_AFTER_S) });
      }
    } catch (e) {
      if (c.req.raw.signal.aborted) {
        // The client went away (while sending the body: the reader reports that as a 400): nobody to answer,
        // nothing was admitted.
        metrics.outcome("cancelled");
        logger.log("info", "generate abandoned by the client", { request_id: requestId, bytes_in: bytesIn });
        return errorResponse(c, new ApiError("invalid_request", "request aborted"), requestId);
      }
      const err = e instanceof ApiError ? e : new ApiError("internal_error", "internal error");
      if (!(e instanceof ApiError)) logger.log("error", "generate failed before admission", { error: (e as Error)?.name ?? "error" });
      metrics.outcome(err.code);
      logger.log("warn", "generate refused", { request_id: requestId, status: err.status, code: err.code, bytes_in: bytesIn });
      return errorResponse(c, err, requestId);
    }

    const { header } = wire;
    const imageBytes = wire.images.reduce((n, b) => n + b.byteLength, 0);
    const req: EngineRequest = {
      id: header.request_id,
      inputIds: wire.inputIds,
      images: header.images.map((im, i) => ({
        bytes: wire.images[i]!,
        mime: im.mime,
        minPixels: im.min_pixels,
        maxPixels: im.max_pixels,
        ...(im.resized_height !== undefined && im.resized_width !== undefined ? { resizedHeight: im.resized_height, resizedWidth: im.resized_width } : {}),
        expectedGrid: im.grid_thw,
      })),
      params: header.params,
      deadlineMs: header.deadline_ms,
    };
    const gen = client.submit(req, { stream: header.stream, bytesIn, imageBytes });
    logger.log("info", "generate admitted", {
      request_id: header.request_id,
      bytes_in: bytesIn,
      image_bytes: imageBytes,
      images: req.images.length,
      prompt_tokens: header.input_ids_count, // (req.inputIds' buffer now belongs to the engine's thread)
      image_tokens: imageTokens,
      max_new_tokens: header.params.max_new_tokens,
      stream: header.stream,
    });

    // The client going away (request aborted or response stream cancelled) cancels the generation.
    const signal = c.req.raw.signal;
    const onAbort = () => gen.cancel("client_disconnect");
    if (signal.aborted) onAbort();
    else {
      signal.addEventListener("abort", onAbort, { once: true });
      void gen.finished.then(() => signal.removeEventListener("abort", onAbort));
    }

    return header.stream ? streamResponse(gen) : collectResponse(c, gen);
  });

  /**
   * NDJSON. The headers go out on admission, before the request has waited in the queue, so that the edge can
   * tell a backend that does not answer at all (its `BACKEND_HEADERS_TIMEOUT_MS`) from one with a long queue. A
   * refusal after admission (an image that does not decode, the deadline passing in the queue, a drain) is then
   * the stream's first event, before `start`, which the edge treats as it would the same HTTP status.
   */
  function streamResponse(gen: Generation): Response {
    let closed = false;
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (closed) return;
        let ev: BackendEvent | null = null;
        const next = await gen.next();
        if (closed) return;
        if (next) ev = toWireEvent(next);
        else if (sent === 0) ev = { type: "error", code: "internal_error", message: "the engine produced no events" };
        if (ev) {
          controller.enqueue(enc.encode(encodeEvent(ev)));
          sent++;
        }
        if (!ev || ev.type === "done" || ev.type === "error") {
          closed = true;
          controller.close();
        }
      },
      cancel() {
        closed = true;
        gen.cancel("client_disconnect");
      },
    });
    return new Response(body, {
      status: 200,
      headers: { "content-type": WIRE_EVENTS_CONTENT_TYPE, "cache-control": "no-store", "x-request-id": gen.id },
    });
  }

  /** stream:false — one JSON object once the generation ends; errors keep their HTTP status. */
  async function collectResponse(c: Context, gen: Generation): Promise<Response> {
    for (;;) {
      const ev = await gen.next();
      if (!ev) return errorResponse(c, new ApiError("internal_error", "the engine produced no result"), gen.id);
      if (ev.type === "error") return errorResponse(c, apiErrorOf(ev), gen.id);
      if (ev.type === "done") {
        c.header("cache-control", "no-store");
        c.header("x-request-id", gen.id);
        return c.json({ text: ev.text, finish_reason: ev.finish_reason, usage: ev.usage, timings: ev.timings });
      }
    }
  }

  const lifecycle: BackendLifecycle = {
    get draining() {
      return draining;
    },
    inFlight: () => client.inFlight,
    async shutdown(graceMs: number) {
      draining = true;
      logger.log("info", "shutdown: draining", { in_flight: client.inFlight, grace_ms: graceMs });
      const r = await client.drain(graceMs);
      logger.log("info", "shutdown: drained", { in_flight: r.finished, cancelled: r.cancelled });
      return r;
    },
  };
  return Object.assign(app, { lifecycle, metrics });
}


/**
 * The serving engine: continuous batching in the thread that owns the ONNX Runtime sessions. Each loop
 * turn advances the one request being admitted (its image preprocessing, which the running sequences do not wait
 * for, then the grid check; then its prefill: whole when nothing else is decoding (in runs of at most
 * `prefillRunMax` tokens, one a turn), else one unit of at most `prefillChunk` prompt tokens, the
 * vision encoder being a unit of its own; the first token when the prompt is in), then runs ONE decode step
 * for every active sequence together (`decodeBatch`; a sequence alone may check a speculative draft in that
 * pass, {@link BatchingEngineOptions.draftTokens}); finished sequences leave and admitted ones join between
 * steps. Implements the delivery rules of engine-types.ts.
 */
import { ApiError, type ErrorCode } from "../../../shared/src/errors.ts";
import { ImageDecodeError, type PreprocessResult, preprocessImages } from "../preprocess/index.ts";
import type { Engine, EngineEvent, EngineRequest, EngineStats } from "./engine-types.ts";
import { CancelledError, GenerationError, decodeBatch } from "./generate.ts";
import type { LoadedModel } from "./model.ts";
import { preprocessOptionsOf } from "./prompt.ts";
import { Generation } from "./run.ts";
import { RopeIndexError } from "./rope-index.ts";
import { SamplingError } from "./sampling.ts";
import { StopConfigError } from "./stopping.ts";

export interface BatchingEngineOptions {
  /** Sequences decoded together per step. */
  maxBatch: number;
  /** Cap on a request's image tokens (the server checks it too, from the edge's grid). */
  maxImageTokens?: number;
  /**
   * While other sequences are decoding, a new request's prompt is fed in chunks of at most this many tokens
   * (the fewest such chunks, of equal sizes: {@link nextPrefillChunk}), one chunk (or its vision encoder) per
   * decode step of the others, so an arrival stalls their streams for
   * one chunk instead of its whole prefill, at the cost of its own time to first token. 0 (default): the
   * whole prompt as when nothing else decodes (runs of at most {@link prefillRunMax} tokens).
   */
  prefillChunk?: number;
  /**
   * A prompt fed whole (nothing else decodes, or `prefillChunk` 0) goes in one run up to this many tokens (default
   * {@link DEFAULT_PREFILL_RUN_MAX}); a longer one in the fewest equal chunks of at most this size, one per turn. No
   * single run then holds the thread for long, so the server's stall watchdog (ENGINE_STALL_S) can tell a long
   * prompt from a stuck runtime. Typical prompts (a few hundred tokens) are one run.
   */
  prefillRunMax?: number;
  /**
   * Speculative decoding while one sequence decodes alone: up to this many tokens drafted by prompt lookup
   * (draft.ts) and checked in the same decoder pass ({@link Generation.advance}; the tokens are those of plain
   * decoding, int4's near-ties aside). A pass over 1 + k tokens costs more than a step, so it pays where the
   * drafts are often right and the pass is cheap (W8A8, float, GPU more than int4); batches of several
   * sequences already share their passes and are not drafted for. 0 (default): off.
   */
  draftTokens?: number;
}

/** Work the engine's thread does not wait on while other sequences decode: each loop turn looks whether it is done. */
interface Pending<T> {
  promise: Promise<void>;
  done: boolean;
  failed: boolean;
  value?: T;
  error?: unknown;
}

function pending<T>(work: Promise<T>): Pending<T> {
  const p: Pending<T> = { promise: Promise.resolve(), done: false, failed: false };
  p.promise = work.then(
    (value) => void Object.assign(p, { done: true, value }),
    (error: unknown) => void Object.assign(p, { done: true, failed: true, error }),
  );
  return p;
}

interface Live {
  req: EngineRequest;
  sink: (ev: EngineEvent) => void;
  enqueuedAt: number;
  abort: AbortController;
  gen?: Generation;
  startedAt?: number;
  imageTokens?: number;
  /** Its images being decoded and resized (libvips' threads) while the others decode (see {@link BatchingEngine.prefillTurn}). */
  preprocessing?: Pending<PreprocessResult | null>;
  /** Its vision encoder running in the model's vision process while the others decode. */
  encoding?: Pending<void>;
}

/**
 * {@link BatchingEngineOptions.prefillRunMax}'s default. On the 2-core dev CPU a run of 1024 tokens is ~15–20 s of int4
 * or fp32 weights plus its attention to what is already cached (~3 TFLOP, about 12 s more, at 16k tokens of context);
 * on a GPU far less. Both stay well under the 120 s stall limit. Splitting costs nothing measurable (bench/PERF.md 17).
 */
export const DEFAULT_PREFILL_RUN_MAX = 1024;

/** Maps any failure inside the engine to a public error code and a message without request content. */
function toError(e: unknown): { code: ErrorCode; message: string } {
  if (e instanceof ImageDecodeError || e instanceof ApiError) return { code: e.code as ErrorCode, message: e.message };
  if (e instanceof GenerationError) return { code: e.code, message: e.message };
  if (e instanceof StopConfigError) return { code: e.code, message: e.message };
  // Invalid logits (NaN, +Inf) fall through: the model's or the runtime's fault, never the request's.
  if (e instanceof SamplingError && e.code === "invalid_parameter") return { code: e.code, message: e.message };
  if (e instanceof RopeIndexError) return { code: "invalid_request", message: e.message };
  return { code: "internal_error", message: "the engine failed" };
}

/**
 * The size of the next chunk of a prompt with `remaining` tokens left, fed at most `maxChunk` at a time: the
 * fewest chunks, of sizes that differ by one at most (264 tokens at 128: 88, 88, 88 rather than 128, 128, 8), so
 * that no turn stalls the running streams longer than the prompt requires.
 */
export function nextPrefillChunk(remaining: number, maxChunk: number): number {
  return Math.ceil(remaining / Math.ceil(remaining / maxChunk));
}

export class BatchingEngine implements Engine {
  private readonly waiting: Live[] = [];
  private readonly active: Live[] = [];
  /** The request being admitted: its images being preprocessed, or started with its prompt not yet all in the cache. */
  private prefilling: Live | null = null;
  private readonly byId = new Map<string, Live>();
  private wake: (() => void) | null = null;
  private closed = false;
  private readonly loop: Promise<void>;

  constructor(
    readonly model: LoadedModel,
    private readonly opts: BatchingEngineOptions,
  ) {
    this.loop = this.run();
  }

  get meta() {
    return this.model.meta;
  }

  submit(req: EngineRequest, sink: (ev: EngineEvent) => void): void {
    if (this.closed) {
      sink({ type: "error", request_id: req.id, code: "backend_unavailable", message: "the engine is shutting down" });
      return;
    }
    const live: Live = { req, sink, enqueuedAt: Date.now(), abort: new AbortController() };
    this.byId.set(req.id, live);
    this.waiting.push(live);
    this.wake?.();
  }

  cancel(id: string): void {
    const live = this.byId.get(id);
    if (!live) return;
    this.forget(live);
    live.abort.abort();
    live.gen?.abandon();
  }

  stats(): EngineStats {
    const { failed, restarts } = this.model.sessions.vision;
    return {
      active: this.active.length + (this.prefilling ? 1 : 0),
      queued: this.waiting.length,
      capacity: this.opts.maxBatch,
      ready: !this.closed && !failed,
      failed: !!failed,
      ...(restarts !== undefined ? { visionRestarts: restarts } : {}),
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const live of [...this.byId.values()]) this.cancel(live.req.id);
    this.wake?.();
    await this.loop;
    await this.prefilling?.preprocessing?.promise; // a cancelled request's, still running
  }

  private forget(live: Live): void {
    this.byId.delete(live.req.id);
    const w = this.waiting.indexOf(live);
    if (w >= 0) this.waiting.splice(w, 1);
    const a = this.active.indexOf(live);
    if (a >= 0) this.active.splice(a, 1);
    // A request cancelled while its images are preprocessed keeps the admission slot until that work ends (it
    // cannot be stopped): the next one's preprocessing then never runs beside it, so they do not pile up.
    if (this.prefilling === live && !(live.preprocessing && !live.preprocessing.done)) this.prefilling = null;
  }

  /** Sends an event unless the request was cancelled (cancel silences a request at once). */
  private emit(live: Live, ev: EngineEvent): void {
    if (this.byId.get(live.req.id) === live) live.sink(ev);
  }

  private fail(live: Live, e: unknown): void {
    if (e instanceof CancelledError) return;
    const { code, message } = toError(e);
    this.emit(live, { type: "error", request_id: live.req.id, code, message });
    this.forget(live);
    live.gen?.abandon();
  }

  private finish(live: Live): void {
    const gen = live.gen!;
    const t = gen.seq.timings;
    this.emit(live, {
      type: "done",
      request_id: live.req.id,
      finish_reason: gen.finishReason!,
      text: gen.text,
      usage: {
        prompt_tokens: live.req.inputIds.length,
        image_tokens: live.imageTokens ?? 0,
        completion_tokens: gen.generatedIds.length,
        ...(gen.drafts.proposed > 0
          ? { completion_tokens_details: { accepted_prediction_tokens: gen.drafts.accepted, rejected_prediction_tokens: gen.drafts.proposed - gen.drafts.accepted } }
          : {}),
      },
      timings: {
        queue_ms: (live.startedAt ?? live.enqueuedAt) - live.enqueuedAt,
        vision_ms: Math.round(t.vision_ms),
        prefill_ms: Math.round(t.prefill_ms),
        decode_ms: Math.round(t.decode_ms.reduce((a, b) => a + b, 0)),
        backend_ms: Date.now() - live.enqueuedAt,
      },
    });
    this.forget(live);
  }

  /**
   * Sends the tokens of one decoder pass (several when a draft was kept), then `done` if the generation ended: all
   * of them first, since the generation is already done when a pass's last token ends it.
   */
  private tokens(live: Live, outs: ReadonlyArray<{ id: number; text: string }>): void {
    for (const out of outs) this.emit(live, { type: "token", request_id: live.req.id, id: out.id, text: out.text });
    if (live.gen!.done) this.finish(live);
  }

  /** Admits `live`: its images' preprocessing starts ({@link prefillTurn} goes on from there), or it begins at once without images. */
  private start(live: Live): void {
    const { req } = live;
    this.prefilling = live;
    if (req.images.length === 0) return this.begin(live, null);
    live.preprocessing = pending(
      preprocessImages(
        req.images.map(({ bytes, minPixels, maxPixels, resizedHeight, resizedWidth }) => ({ bytes, minPixels, maxPixels, resizedHeight, resizedWidth })),
        preprocessOptionsOf(this.model, this.opts.maxImageTokens),
      ),
    );
  }

  /** With the images preprocessed: checks them against the edge's grid, sends `start`; the prefill follows. */
  private begin(live: Live, pre: PreprocessResult | null): void {
    const { req } = live;
    req.images.forEach((im, i) => {
      const got = pre!.gridThw[i]!;
      if (got.some((v, k) => v !== im.expectedGrid[k])) {
        throw new ApiError("invalid_request", `image ${i}: its grid is ${got.join("x")}, the request declared ${im.expectedGrid.join("x")}`);
      }
    });
    live.imageTokens = pre ? pre.imageTokens.reduce((a, b) => a + b, 0) : 0;
    live.gen = new Generation(
      this.model,
      { inputIds: req.inputIds, pixelValues: pre?.pixelValues ?? null, gridThw: pre?.gridThw ?? [] },
      req.params,
      { signal: live.abort.signal },
    );
    live.startedAt = Date.now();
    this.emit(live, {
      type: "start",
      request_id: req.id,
      prompt_tokens: req.inputIds.length,
      image_tokens: live.imageTokens,
      queue_ms: live.startedAt - live.enqueuedAt,
    });
  }

  /**
   * One turn of the admitted request's admission; with the prompt in, it emits the first token and joins the batch.
   * While other sequences decode, this thread goes on stepping them during work done elsewhere: its images'
   * preprocessing (libvips' threads), and, with the vision encoder in its own process, their encoding there. Each
   * turn until such work is done only looks whether it is. A cancel stops the encoding (the request's signal
   * reaches the vision session).
   */
  private async prefillTurn(live: Live): Promise<void> {
    if (!live.gen) {
      const pre = live.preprocessing!;
      if (!pre.done) {
        if (this.active.length > 0) return;
        await pre.promise; // nothing else to step: wait here (the thread stays free for messages)
      }
      if (this.byId.get(live.req.id) !== live) {
        this.prefilling = null; // cancelled meanwhile: its preprocessing is over, the slot is free
        return;
      }
      if (pre.failed) throw pre.error;
      this.begin(live, pre.value!);
    }
    const seq = live.gen!.seq;
    if (!live.encoding && !seq.prepared && this.model.visionProcess && live.req.images.length > 0 && this.active.length > 0) {
      live.encoding = pending(seq.prepare());
    }
    if (live.encoding && !live.encoding.done) {
      if (this.active.length > 0) return;
      await live.encoding.promise; // nothing else to step: wait here (the thread stays free for messages)
    }
    if (live.encoding?.failed) throw live.encoding.error;
    if (this.byId.get(live.req.id) !== live) return;
    const chunk = this.opts.prefillChunk ?? 0;
    let logits: Float32Array | null = null;
    if (chunk <= 0 || this.active.length === 0) {
      logits = await seq.prefillNext(nextPrefillChunk(seq.prefillRemaining, this.opts.prefillRunMax ?? DEFAULT_PREFILL_RUN_MAX));
    }
    else if (!seq.prepared) await seq.prepare();
    else logits = await seq.prefillNext(nextPrefillChunk(seq.prefillRemaining, chunk));
    if (!logits || this.byId.get(live.req.id) !== live) return;
    this.prefilling = null;
    const first = live.gen!.accept(logits);
    this.active.push(live);
    this.tokens(live, [first]);
  }

  private async run(): Promise<void> {
    while (!this.closed) {
      const next = !this.prefilling && this.active.length < this.opts.maxBatch ? this.waiting.shift() : undefined;
      if (next) {
        try {
          this.start(next);
        } catch (e) {
          this.fail(next, e);
        }
      }
      const admitting = this.prefilling;
      if (admitting) {
        try {
          await this.prefillTurn(admitting);
        } catch (e) {
          this.fail(admitting, e);
        }
      }
      const batch = [...this.active];
      if (batch.length === 1) {
        // Alone: one pass, which may check a draft and yield several tokens.
        const [live] = batch as [Live];
        try {
          this.tokens(live, await live.gen!.advance(live.gen!.draft(this.opts.draftTokens ?? 0)));
        } catch (e) {
          if (live.abort.signal.aborted) this.forget(live);
          else this.fail(live, e);
        }
      } else if (batch.length > 0) {
        try {
          const logits = await decodeBatch(this.model, batch.map((l) => l.gen!.seq), batch.map((l) => l.gen!.lastId));
          batch.forEach((live, i) => {
            if (this.byId.get(live.req.id) !== live) return;
            try {
              this.tokens(live, [live.gen!.accept(logits[i]!)]);
            } catch (e) {
              this.fail(live, e);
            }
          });
        } catch (e) {
          // A batch-level failure (e.g. a sequence cancelled mid-step, or the runtime failing): retry the
          // survivors next turn; sequences that caused it get their error.
          for (const live of batch) if (live.abort.signal.aborted) this.forget(live);
          if (!(e instanceof CancelledError)) for (const live of batch) this.fail(live, e);
        }
      }
      if (!next && !admitting && batch.length === 0) {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          if (this.waiting.length > 0 || this.closed) resolve();
        });
        this.wake = null;
      } else {
        // Let submit/cancel messages in between steps (session.run blocks this thread while it runs).
        await new Promise((r) => setImmediate(r));
      }
    }
  }
}

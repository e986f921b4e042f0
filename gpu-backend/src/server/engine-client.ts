/**
 * The server's side of the engine: turns the engine's per-request callback (`sink`) into an ordered event
 * queue the HTTP handler reads at its own pace, and owns everything that ends a request from the outside
 * (client gone, deadline, shutdown). Its invariant: every submitted request yields exactly one terminal
 * event (`done` or `error`) to its reader, whoever ends it, and nothing after that.
 *
 * Because `Engine.cancel` silences a request (no event follows it), the cancelling side writes the final
 * `error` here: `backend_timeout` for a deadline, `backend_unavailable` for shutdown, and an unread
 * `backend_unavailable` for a client that went away.
 */
import { isErrorCode, type ErrorCode } from "../../../shared/src/errors.ts";
import type { BackendEvent } from "../../../shared/src/wire.ts";
import type { Engine, EngineEvent, EngineRequest } from "../engine/engine-types.ts";
import type { BackendMetrics, CancelReason } from "./metrics.ts";
import type { Logger } from "./log.ts";

/** The event as sent on the wire (no engine-side `request_id` except on `start`, where it belongs). */
export function toWireEvent(ev: EngineEvent): BackendEvent {
  switch (ev.type) {
    case "start":
      return { type: "start", request_id: ev.request_id, prompt_tokens: ev.prompt_tokens, image_tokens: ev.image_tokens, queue_ms: ev.queue_ms };
    case "token":
      return { type: "token", id: ev.id, text: ev.text };
    case "done":
      return { type: "done", finish_reason: ev.finish_reason, text: ev.text, usage: ev.usage, timings: ev.timings };
    case "error":
      return { type: "error", code: ev.code, message: ev.message };
  }
}

const CANCEL_ERRORS: Record<CancelReason, { code: ErrorCode; message: string }> = {
  deadline: { code: "backend_timeout", message: "the request's deadline passed" },
  shutdown: { code: "backend_unavailable", message: "the backend is shutting down" },
  client_disconnect: { code: "backend_unavailable", message: "the client went away" },
};

/** Per-request facts the client logs with the outcome (sizes only). */
export interface GenerationInfo {
  stream: boolean;
  bytesIn: number;
  imageBytes: number;
}

/** One submitted request: an ordered queue of its events, ending with exactly one terminal event. */
export class Generation {
  readonly id: string;
  readonly admittedAt: number;
  // Counted at admission: the request's buffers may be transferred to the engine's worker (detached here).
  private readonly promptTokens: number;
  private readonly imageCount: number;
  private readonly queue: EngineEvent[] = [];
  private waiter: ((ev: EngineEvent | null) => void) | null = null;
  private terminalQueued = false;
  private terminalRead = false;
  private started = false;
  private tokens = 0;
  private firstTokenAt: number | null = null;
  private lastTokenAt: number | null = null;
  private deadlineTimer: NodeJS.Timeout | null = null;
  private resolveFinished!: () => void;
  /** Resolves once the terminal event is queued (the request no longer runs in the engine). */
  readonly finished: Promise<void>;
  /** Set when the server cancelled the request (why). */
  cancelReason: CancelReason | null = null;

  constructor(
    private readonly client: EngineClient,
    private readonly req: EngineRequest,
    private readonly info: GenerationInfo,
  ) {
    this.id = req.id;
    this.admittedAt = client.now();
    this.promptTokens = req.inputIds.length;
    this.imageCount = req.images.length;
    this.finished = new Promise((r) => (this.resolveFinished = r));
  }

  /** Whether the terminal event has been produced. */
  get isFinished(): boolean {
    return this.terminalQueued;
  }

  /** Wires the deadline and hands the request to the engine. */
  run(): void {
    const { deadlineMs } = this.req;
    if (deadlineMs !== null) {
      // Timers cap at 2^31-1 ms; a later deadline never fires before the request ends anyway.
      const ms = Math.min(Math.max(0, deadlineMs - this.client.now()), 2 ** 31 - 1);
      this.deadlineTimer = setTimeout(() => this.cancel("deadline"), ms);
      this.deadlineTimer.unref();
    }
    try {
      this.client.engine.submit(this.req, (ev) => this.onEngineEvent(ev));
    } catch (e) {
      // The contract says submit never throws; if it does, the request still gets its one final answer.
      this.client.logger.log("error", "engine submit threw", { request_id: this.id, error: (e as Error)?.name ?? "error" });
      this.finish({ type: "error", request_id: this.id, code: "internal_error", message: "the engine failed" });
    }
  }

  private onEngineEvent(ev: EngineEvent): void {
    if (this.terminalQueued) return; // after terminal or cancel: nothing more (defends the contract)
    const now = this.client.now();
    const m = this.client.metrics;
    switch (ev?.type) {
      case "start":
        if (this.started) return;
        this.started = true;
        this.push({ ...ev, request_id: this.id });
        return;
      case "token":
        this.tokens++;
        m.token();
        if (this.firstTokenAt === null) {
          this.firstTokenAt = now;
          m.ttft.observe((now - this.admittedAt) / 1000);
        } else if (this.lastTokenAt !== null) {
          m.tokenLatency.observe((now - this.lastTokenAt) / 1000);
        }
        this.lastTokenAt = now;
        this.push(ev);
        return;
      case "done": {
        m.drafts(ev.usage?.completion_tokens_details);
        const timings = { ...ev.timings, backend_ms: ev.timings?.backend_ms ?? now - this.admittedAt };
        this.finish({ ...ev, timings });
        return;
      }
      case "error":
        this.finish({
          type: "error",
          request_id: this.id,
          code: isErrorCode(ev.code) ? ev.code : "internal_error",
          message: typeof ev.message === "string" ? ev.message : "engine error",
        });
        return;
      default:
        this.client.logger.log("warn", "engine sent an unknown event", { request_id: this.id });
    }
  }

  /**
   * Ends the request from the server's side: the engine frees it at once and the reader gets a final
   * `error` (see CANCEL_ERRORS). No effect once the request has finished.
   */
  cancel(reason: CancelReason): void {
    if (this.terminalQueued) return;
    this.cancelReason = reason;
    this.client.metrics.cancellations.inc({ reason });
    try {
      this.client.engine.cancel(this.id);
    } catch (e) {
      this.client.logger.log("error", "engine cancel threw", { request_id: this.id, error: (e as Error)?.name ?? "error" });
    }
    const { code, message } = CANCEL_ERRORS[reason];
    this.finish({ type: "error", request_id: this.id, code, message });
  }

  private push(ev: EngineEvent): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w(ev);
    } else {
      this.queue.push(ev);
    }
  }

  private finish(ev: EngineEvent & { type: "done" | "error" }): void {
    if (this.terminalQueued) return;
    this.terminalQueued = true;
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    const now = this.client.now();
    const m = this.client.metrics;
    m.requestDuration.observe((now - this.admittedAt) / 1000);
    const outcome = ev.type === "done" ? "ok" : this.cancelReason === "client_disconnect" ? "cancelled" : ev.code;
    m.outcome(outcome);
    this.client.logger.log(ev.type === "done" ? "info" : "warn", "generate finished", {
      request_id: this.id,
      status: ev.type === "done" ? 200 : undefined,
      code: ev.type === "error" ? ev.code : undefined,
      reason: this.cancelReason ?? undefined,
      stream: this.info.stream,
      bytes_in: this.info.bytesIn,
      image_bytes: this.info.imageBytes,
      images: this.imageCount,
      prompt_tokens: this.promptTokens,
      completion_tokens: ev.type === "done" ? ev.usage?.completion_tokens ?? this.tokens : this.tokens,
      draft_accepted: ev.type === "done" ? ev.usage?.completion_tokens_details?.accepted_prediction_tokens : undefined,
      draft_rejected: ev.type === "done" ? ev.usage?.completion_tokens_details?.rejected_prediction_tokens : undefined,
      finish_reason: ev.type === "done" ? ev.finish_reason : undefined,
      ttft_ms: this.firstTokenAt === null ? undefined : this.firstTokenAt - this.admittedAt,
      total_ms: now - this.admittedAt,
    });
    this.push(ev);
    this.client.forget(this);
    this.resolveFinished();
  }

  /** The next event in order; null once the terminal event has been read. */
  next(): Promise<EngineEvent | null> {
    const ev = this.queue.shift();
    if (ev) {
      if (ev.type === "done" || ev.type === "error") this.terminalRead = true;
      return Promise.resolve(ev);
    }
    if (this.terminalRead) return Promise.resolve(null);
    if (this.waiter) return Promise.reject(new Error("Generation.next: one reader at a time"));
    return new Promise((resolve) => {
      this.waiter = (e) => {
        if (e && (e.type === "done" || e.type === "error")) this.terminalRead = true;
        resolve(e);
      };
    });
  }
}

/** Submits requests to the engine and keeps track of the ones in flight (for shutdown). */
export class EngineClient {
  private readonly live = new Set<Generation>();

  constructor(
    readonly engine: Engine,
    readonly metrics: BackendMetrics,
    readonly logger: Logger,
    readonly now: () => number = Date.now,
  ) {}

  /** Hands `req` to the engine; its events (ending in exactly one terminal event) come from the result. */
  submit(req: EngineRequest, info: GenerationInfo): Generation {
    const gen = new Generation(this, req, info);
    this.live.add(gen);
    gen.run();
    return gen;
  }

  /** Requests submitted and not finished. */
  get inFlight(): number {
    return this.live.size;
  }

  /** @internal Called by a generation when it finishes. */
  forget(gen: Generation): void {
    this.live.delete(gen);
  }

  /**
   * Lets in-flight requests finish for up to `graceMs`, then cancels the rest (each gets its final
   * `backend_unavailable` error). Resolves with how many finished on their own and how many were cancelled.
   */
  async drain(graceMs: number): Promise<{ finished: number; cancelled: number }> {
    const pending = [...this.live];
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all(pending.map((g) => g.finished)),
      new Promise<void>((r) => (timer = setTimeout(r, graceMs))),
    ]);
    clearTimeout(timer);
    let cancelled = 0;
    for (const g of [...this.live]) {
      g.cancel("shutdown");
      cancelled++;
    }
    return { finished: pending.length - cancelled, cancelled };
  }
}

/**
 * Runs an `Engine` factory in a `worker_threads` Worker and exposes the same `Engine` interface on the main
 * thread, so the HTTP server's event loop never blocks on ONNX Runtime. Request buffers (ids, image bytes)
 * are transferred to the worker, not copied: after `submit` the caller must not touch them.
 *
 * Guarantees on top of the worker's: `stats()` is synchronous (the worker's last snapshot, plus submits it
 * has not acknowledged yet, so admission control never over-admits in a burst); after `cancel(id)` no event
 * for `id` reaches the sink, even one already in flight; if the worker dies, every live request gets a final
 * `internal_error` event and `stats().ready` turns false; if it stops answering (no message, not even its periodic
 * stats, for `stallMs`), `stats()` says `stalled` and not ready until it answers again.
 */
import { Worker } from "node:worker_threads";
import type { ModelMeta } from "../../../shared/src/model-meta.ts";
import type { Engine, EngineEvent, EngineRequest, EngineStats } from "../engine/engine-types.ts";
import type { EngineWorkerData, FromWorker, ToWorker } from "./worker-protocol.ts";
import { NamedError } from "../../../shared/src/errors.ts";

/** The engine could not be built in its worker (bad model folder, missing module, provider…). */
export class EngineStartError extends NamedError {}

export interface WorkerEngineOptions {
  /** The module exporting the factory (e.g. `new URL("../engine/index.ts", import.meta.url)`). */
  module: URL | string;
  /** Export name of the factory; default `createEngine`. */
  exportName?: string;
  /** Passed to the factory in the worker (structured-cloneable). */
  options?: unknown;
  /** How often the worker reports stats when idle; default 250 ms. */
  statsIntervalMs?: number;
  /**
   * Silence after which the worker counts as stalled (its thread held by one run, or hung); 0 or absent: never. The
   * worker reports between the engine's turns, so this must exceed the longest single run the engine makes.
   */
  stallMs?: number;
  /** Called once if the worker stops unexpectedly (after live requests got their final error). */
  onExit?: (info: { code: number | null; error: Error | null }) => void;
  /** `execArgv` of the worker; default: the process's. */
  execArgv?: string[];
}

/**
 * Worker bootstrap, evaluated as a script or a module (the worker inherits flags like `--input-type`), so it
 * uses dynamic imports only: optional tsx loader, then the ESM entry. A failure kills the worker.
 */
const BOOTSTRAP = `import("node:worker_threads").then(async ({ workerData }) => {
  if (workerData.bootstrap.tsx) (await import(workerData.bootstrap.tsx)).register();
  await import(workerData.bootstrap.entry);
}).catch((e) => { setImmediate(() => { throw e; }); });`;

/** The transferable buffers behind a request (each once; Node `Buffer`s may share a pool, so they are copied). */
function transferList(req: EngineRequest): ArrayBuffer[] {
  const out = new Set<ArrayBuffer>();
  for (const view of [req.inputIds, ...req.images.map((i) => i.bytes)]) {
    if (view.buffer instanceof ArrayBuffer && !Buffer.isBuffer(view)) out.add(view.buffer);
  }
  return [...out];
}

/** An `Engine` whose implementation runs in a worker thread. */
export class WorkerEngine implements Engine {
  /** Resolves when the engine is built in the worker; rejects with `EngineStartError` (the worker is stopped). */
  readonly loaded: Promise<void>;
  private readonly worker: Worker;
  private readonly sinks = new Map<string, (ev: EngineEvent) => void>();
  private last: EngineStats = { active: 0, queued: 0, capacity: 0, ready: false };
  private unacked = 0;
  /** When the worker last sent anything (its stats come every `statsIntervalMs` while its thread is free). */
  private lastHeard = performance.now();
  private alive = true;
  private closing: Promise<void> | null = null;
  private resolveClosed: (() => void) | null = null;
  private _meta: ModelMeta | undefined;

  constructor(private readonly opts: WorkerEngineOptions) {
    const isTs = import.meta.url.endsWith(".ts");
    const entry = new URL(`./worker-entry.${isTs ? "ts" : "js"}`, import.meta.url);
    const data: EngineWorkerData = {
      module: String(opts.module instanceof URL ? opts.module.href : opts.module),
      exportName: opts.exportName ?? "createEngine",
      options: opts.options ?? null,
      statsIntervalMs: opts.statsIntervalMs ?? 250,
    };
    // Node cannot load .ts on its own. A worker's `--import tsx` is not applied to its entry on Node 20, so
    // from source a tiny CommonJS bootstrap registers tsx's loader in the worker, then imports the entry.
    const tsx = isTs ? import.meta.resolve("tsx/esm/api") : null;
    this.worker = new Worker(BOOTSTRAP, {
      eval: true,
      workerData: { ...data, bootstrap: { tsx, entry: entry.href } },
      ...(opts.execArgv ? { execArgv: opts.execArgv } : {}),
    });
    let settle!: { resolve: () => void; reject: (e: Error) => void };
    this.loaded = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    // A start failure is reported through `loaded`; keep an unobserved rejection from crashing the process.
    this.loaded.catch(() => {});
    this.worker.on("message", (m: FromWorker) => this.onMessage(m, settle));
    this.worker.on("error", (e) => this.onDeath(null, e, settle));
    this.worker.on("exit", (code) => this.onDeath(code, null, settle));
  }

  get meta(): ModelMeta | undefined {
    return this._meta;
  }

  private onMessage(m: FromWorker, settle: { resolve: () => void; reject: (e: Error) => void }): void {
    this.lastHeard = performance.now();
    switch (m.t) {
      case "loaded":
        this.last = m.stats;
        this._meta = m.meta ?? undefined;
        settle.resolve();
        return;
      case "load_error":
        this.alive = false;
        settle.reject(new EngineStartError(`the engine failed to start: ${m.message}`));
        void this.worker.terminate();
        return;
      case "ack":
        this.unacked = Math.max(0, this.unacked - 1);
        this.last = m.stats;
        return;
      case "stats":
        this.last = m.stats;
        return;
      case "event": {
        this.last = m.stats;
        const sink = this.sinks.get(m.ev.request_id);
        if (!sink) return; // cancelled (or unknown): dropped, as `cancel` promises
        if (m.ev.type === "done" || m.ev.type === "error") this.sinks.delete(m.ev.request_id);
        sink(m.ev);
        return;
      }
      case "closed":
        this.resolveClosed?.();
        return;
    }
  }

  private onDeath(code: number | null, error: Error | null, settle: { reject: (e: Error) => void }): void {
    if (!this.alive && this.sinks.size === 0) return;
    const wasAlive = this.alive;
    this.alive = false;
    this.last = { ...this.last, active: 0, queued: 0, ready: false };
    this.unacked = 0;
    settle.reject(new EngineStartError(`the engine worker stopped before it was ready${error ? `: ${error.message}` : ""}`));
    const live = [...this.sinks];
    this.sinks.clear();
    for (const [id, sink] of live) sink({ type: "error", request_id: id, code: "internal_error", message: "the engine stopped" });
    this.resolveClosed?.();
    if (wasAlive && !this.closing) this.opts.onExit?.({ code, error });
  }

  submit(req: EngineRequest, sink: (ev: EngineEvent) => void): void {
    const fail = (code: "internal_error" | "backend_unavailable" | "invalid_request", message: string) =>
      queueMicrotask(() => sink({ type: "error", request_id: req.id, code, message }));
    if (!this.alive || this.closing) return fail("backend_unavailable", "the engine is not running");
    if (this.sinks.has(req.id)) return fail("invalid_request", "a request with this id is already running");
    this.sinks.set(req.id, sink);
    this.unacked++;
    try {
      this.worker.postMessage({ t: "submit", req } satisfies ToWorker, transferList(req));
    } catch {
      // e.g. a buffer that was already transferred (detached): the request cannot be sent
      this.sinks.delete(req.id);
      this.unacked--;
      fail("internal_error", "the request could not be handed to the engine");
    }
  }

  cancel(id: string): void {
    if (!this.sinks.delete(id)) return;
    if (this.alive) this.worker.postMessage({ t: "cancel", id } satisfies ToWorker);
  }

  stats(): EngineStats {
    const stallMs = this.opts.stallMs ?? 0;
    const stalled = stallMs > 0 && this.alive && !this.closing && this.last.ready && performance.now() - this.lastHeard > stallMs;
    return {
      ...this.last,
      queued: this.last.queued + this.unacked,
      ready: this.alive && !this.closing && this.last.ready && !stalled,
      ...(stalled ? { stalled } : {}),
    };
  }

  /** Asks the worker to close the engine (bounded by `timeoutMs`), then stops the worker. */
  close(timeoutMs = 10_000): Promise<void> {
    this.closing ??= (async () => {
      if (this.alive) {
        const closed = new Promise<void>((r) => (this.resolveClosed = r));
        this.worker.postMessage({ t: "close" } satisfies ToWorker);
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([closed, new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
        clearTimeout(timer);
      }
      this.alive = false;
      this.sinks.clear();
      await this.worker.terminate();
    })();
    return this.closing;
  }
}

/** Starts `opts.module`'s engine factory in a worker thread; await `.loaded` before serving. */
export function createWorkerEngine(opts: WorkerEngineOptions): WorkerEngine {
  return new WorkerEngine(opts);
}

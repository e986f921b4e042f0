/**
 * The engine's worker thread: imports the engine module named in `workerData`, builds the engine with its
 * factory, and serves the main thread's `submit`/`cancel`/`close` messages (worker-protocol.ts). ONNX Runtime
 * blocks this thread while it runs; messages wait for the engine to yield, the main thread never does.
 */
import { parentPort, workerData } from "node:worker_threads";
import type { Engine, EngineEvent, EngineFactory, EngineStats } from "../engine/engine-types.ts";
import type { EngineWorkerData, FromWorker, ToWorker } from "./worker-protocol.ts";

if (!parentPort) throw new Error("worker-entry.ts must run in a worker thread");
const port = parentPort;
const data = workerData as EngineWorkerData;

let engine: Engine | null = null;
let loadFailed = false;
const early: ToWorker[] = [];
const NOT_READY: EngineStats = { active: 0, queued: 0, capacity: 0, ready: false };

const post = (m: FromWorker) => port.postMessage(m);
const stats = (): EngineStats => {
  try {
    return engine ? engine.stats() : NOT_READY;
  } catch {
    return NOT_READY;
  }
};

function refuse(id: string, message: string): void {
  post({ t: "event", ev: { type: "error", request_id: id, code: "backend_unavailable", message }, stats: stats() });
}

async function handle(m: ToWorker): Promise<void> {
  if (!engine) {
    if (loadFailed) {
      if (m.t === "submit") refuse(m.req.id, "the engine failed to load");
      if (m.t === "close") post({ t: "closed" });
    } else {
      early.push(m);
    }
    return;
  }
  switch (m.t) {
    case "submit": {
      const id = m.req.id;
      try {
        engine.submit(m.req, (ev: EngineEvent) => post({ t: "event", ev, stats: stats() }));
      } catch {
        // The contract says submit never throws; if it does, the request still gets its final event.
        post({ t: "event", ev: { type: "error", request_id: id, code: "internal_error", message: "the engine failed" }, stats: stats() });
      }
      post({ t: "ack", id, stats: stats() });
      return;
    }
    case "cancel":
      engine.cancel(m.id);
      post({ t: "stats", stats: stats() });
      return;
    case "close": {
      clearInterval(timer);
      try {
        await engine.close();
      } finally {
        post({ t: "closed" });
        port.close();
      }
      return;
    }
  }
}

port.on("message", (m: ToWorker) => {
  void handle(m);
});

const timer = setInterval(() => post({ t: "stats", stats: stats() }), data.statsIntervalMs);

try {
  const mod = (await import(data.module)) as Record<string, unknown>;
  const factory = mod[data.exportName];
  if (typeof factory !== "function") throw new Error(`the engine module does not export a function ${data.exportName}()`);
  engine = await (factory as EngineFactory)(data.options);
  post({ t: "loaded", stats: stats(), meta: engine.meta ?? null });
} catch (e) {
  loadFailed = true;
  clearInterval(timer);
  const err = e as Error;
  post({ t: "load_error", name: err?.name ?? "Error", message: err?.message ?? String(e) });
}
for (const m of early.splice(0)) await handle(m);

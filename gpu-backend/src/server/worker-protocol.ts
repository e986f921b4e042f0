/**
 * Messages between the engine's worker thread (worker-entry.ts) and the main thread (worker-bridge.ts).
 * Every worker→main message carries a stats snapshot, so the main thread's `stats()` stays synchronous.
 */
import type { ModelMeta } from "../../../shared/src/model-meta.ts";
import type { EngineEvent, EngineRequest, EngineStats } from "../engine/engine-types.ts";

/** `workerData` of the engine worker. */
export interface EngineWorkerData {
  /** URL (href) of the module exporting the factory. */
  module: string;
  /** The factory's export name (`createEngine`). */
  exportName: string;
  /** Passed to the factory (structured-cloneable: the backend config). */
  options: unknown;
  /** How often the worker reports stats when nothing else happens. */
  statsIntervalMs: number;
}

export type ToWorker = { t: "submit"; req: EngineRequest } | { t: "cancel"; id: string } | { t: "close" };

export type FromWorker =
  | { t: "loaded"; stats: EngineStats; meta: ModelMeta | null }
  | { t: "load_error"; name: string; message: string }
  | { t: "ack"; id: string; stats: EngineStats }
  | { t: "event"; ev: EngineEvent; stats: EngineStats }
  | { t: "stats"; stats: EngineStats }
  | { t: "closed" };

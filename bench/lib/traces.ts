/**
 * The eval request through a `BatchingEngine` with the time of every event recorded: what the concurrency and
 * arrivals children measure. The request is golden case_01 as the edge sends it (token ids + image bytes).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { DEFAULT_PARAMS } from "../../shared/src/wire.ts";
import { BatchingEngine } from "../../gpu-backend/src/engine/engine.ts";
import type { EngineEvent, EngineRequest } from "../../gpu-backend/src/engine/engine-types.ts";
import { type LoadedModel, loadModel } from "../../gpu-backend/src/engine/model.ts";
import { GOLDEN_DIR } from "./common.ts";

const c01 = JSON.parse(readFileSync(join(GOLDEN_DIR, "cases-a", "case_01.json"), "utf8")) as {
  input_ids: number[];
  images: Array<{ image: string; grid_thw: [number, number, number]; qwen_vl_utils_kwargs: { min_pixels?: number; max_pixels?: number } }>;
};
const imageBytes = c01.images.map((im) => new Uint8Array(readFileSync(join(GOLDEN_DIR, im.image))));

/** The eval request (greedy, the wire defaults) with `maxNew` new tokens at most. */
export function evalRequest(id: string, maxNew: number): EngineRequest {
  return {
    id,
    inputIds: Int32Array.from(c01.input_ids),
    images: c01.images.map((im, i) => ({
      bytes: imageBytes[i]!,
      mime: "image/png",
      minPixels: im.qwen_vl_utils_kwargs.min_pixels ?? 3136,
      maxPixels: im.qwen_vl_utils_kwargs.max_pixels ?? 12845056,
      expectedGrid: im.grid_thw,
    })),
    params: { ...DEFAULT_PARAMS, max_new_tokens: maxNew },
    deadlineMs: null,
  };
}

/** `performance.now()` times of one request's life. */
export interface Trace {
  submitted: number;
  /** One entry per token event. */
  tokens: number[];
  /** The final event (done or error). */
  done: number;
  error?: string;
}

/** Submits `req` and records its events; `onDone` runs at its final event. */
export function submitTraced(engine: BatchingEngine, req: EngineRequest, onDone?: () => void): { trace: Trace; finished: Promise<void> } {
  const trace: Trace = { submitted: performance.now(), tokens: [], done: NaN };
  const finished = new Promise<void>((resolve) => {
    engine.submit(req, (ev: EngineEvent) => {
      if (ev.type === "token") trace.tokens.push(performance.now());
      else if (ev.type === "done" || ev.type === "error") {
        trace.done = performance.now();
        if (ev.type === "error") trace.error = `${ev.code}: ${ev.message}`;
        onDone?.();
        resolve();
      }
    });
  });
  return { trace, finished };
}

/** Every gap between consecutive tokens of each trace. */
export function tokenGaps(traces: Trace[]): number[] {
  return traces.flatMap((t) => t.tokens.slice(1).map((y, i) => y - t.tokens[i]!));
}

/**
 * Loads a folder for the engine benchmarks and warms it up with one batch of two (so that batched kernels are
 * compiled too). `model` ignores EOS: random test weights would stop at it at random, so every request runs to
 * max_new_tokens. `loaded` is what to release; `loadMs` excludes the warm-up.
 */
export async function loadForEngineBench(dir: string, threads: number, maxBatch: number): Promise<{ loaded: LoadedModel; model: LoadedModel; loadMs: number }> {
  const t0 = performance.now();
  const loaded = await loadModel(dir, { intraOpThreads: threads });
  const loadMs = performance.now() - t0;
  const model = { ...loaded, meta: { ...loaded.meta, eos_token_ids: [] } };
  const engine = new BatchingEngine(model, { maxBatch });
  await Promise.all([submitTraced(engine, evalRequest("warm-0", 3)).finished, submitTraced(engine, evalRequest("warm-1", 3)).finished]);
  await engine.close();
  return { loaded, model, loadMs };
}

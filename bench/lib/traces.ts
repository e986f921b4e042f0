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
import { preprocessImages } from "../../gpu-backend/src/preprocess/index.ts";
import { preprocessOptionsOf } from "../../gpu-backend/src/engine/prompt.ts";
import { GOLDEN_DIR } from "./common.ts";

/** `<|image_pad|>` in the Qwen2-VL vocabulary. */
const IMAGE_PAD_ID = 151655;

const c01 = JSON.parse(readFileSync(join(GOLDEN_DIR, "cases-a", "case_01.json"), "utf8")) as {
  input_ids: number[];
  images: Array<{ image: string; grid_thw: [number, number, number]; qwen_vl_utils_kwargs: { min_pixels?: number; max_pixels?: number } }>;
};
const imageBytes = c01.images.map((im) => new Uint8Array(readFileSync(join(GOLDEN_DIR, im.image))));

/** Another image for the eval question, with its `max_pixels` and the grid that gives (see {@link imageGrid}). */
export interface OtherImage {
  bytes: Uint8Array;
  mime: string;
  maxPixels: number;
  grid: [number, number, number];
}

/**
 * The eval request (greedy, the wire defaults) with `maxNew` new tokens at most; with `image`, the same question
 * about that image (its `<|image_pad|>` run resized to the image's tokens).
 */
export function evalRequest(id: string, maxNew: number, image?: OtherImage): EngineRequest {
  const params = { ...DEFAULT_PARAMS, max_new_tokens: maxNew };
  if (image) {
    const first = c01.input_ids.indexOf(IMAGE_PAD_ID);
    const last = c01.input_ids.lastIndexOf(IMAGE_PAD_ID);
    const [t, h, w] = image.grid;
    const pads = new Array<number>((t * h * w) / 4).fill(IMAGE_PAD_ID);
    return {
      id,
      inputIds: Int32Array.from([...c01.input_ids.slice(0, first), ...pads, ...c01.input_ids.slice(last + 1)]),
      images: [{ bytes: image.bytes, mime: image.mime, minPixels: 3136, maxPixels: image.maxPixels, expectedGrid: image.grid }],
      params,
      deadlineMs: null,
    };
  }
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
    params,
    deadlineMs: null,
  };
}

/** Reads an image file and computes its grid at `maxPixels` (the model's preprocessing defaults otherwise). */
export async function imageGrid(model: LoadedModel, path: string, maxPixels: number): Promise<OtherImage> {
  const bytes = new Uint8Array(readFileSync(path));
  const pre = await preprocessImages([{ bytes, maxPixels }], preprocessOptionsOf(model));
  return { bytes, mime: /\.jpe?g$/i.test(path) ? "image/jpeg" : "image/png", maxPixels, grid: pre.gridThw[0]! };
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

/** Engine requests for the golden cases, and collecting a request's events (the engine tests' helpers). */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { DEFAULT_PARAMS, type GenerationParams } from "../../shared/src/wire.ts";
import type { BatchingEngine } from "../../gpu-backend/src/engine/engine.ts";
import type { EngineEvent, EngineRequest } from "../../gpu-backend/src/engine/engine-types.ts";
import { GOLDEN_DIR, type GoldenCase } from "./golden.ts";

/** Case `c` as an engine request (its images still encoded), greedy for as many tokens as the golden ids. */
export function requestFor(c: GoldenCase, id: string, params: Partial<GenerationParams> = {}): EngineRequest {
  return {
    id,
    inputIds: Int32Array.from(c.input_ids),
    images: c.images.map((im) => ({
      bytes: new Uint8Array(readFileSync(join(GOLDEN_DIR, im.image))),
      mime: im.original_format === "JPEG" ? "image/jpeg" : "image/png",
      minPixels: im.qwen_vl_utils_kwargs.min_pixels ?? 3136,
      maxPixels: im.qwen_vl_utils_kwargs.max_pixels ?? 12845056,
      expectedGrid: im.grid_thw,
    })),
    params: { ...DEFAULT_PARAMS, max_new_tokens: c.generated_ids.length, ...params },
    deadlineMs: null,
  };
}

/** Submits and collects a request's events until its terminal event. */
export function collect(engine: BatchingEngine, req: EngineRequest, onEvent?: (ev: EngineEvent) => void): Promise<EngineEvent[]> {
  return new Promise((resolve) => {
    const events: EngineEvent[] = [];
    engine.submit(req, (ev) => {
      events.push(ev);
      onEvent?.(ev);
      if (ev.type === "done" || ev.type === "error") resolve(events);
    });
  });
}

export const tokenIds = (events: EngineEvent[]) => events.flatMap((e) => (e.type === "token" ? [e.id] : []));

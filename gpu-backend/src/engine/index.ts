/**
 * The engine's entry point for the backend service: `createEngine(config)` runs inside the engine's worker
 * thread (server/worker-entry.ts), loads the converted model, warms it up and starts batching.
 */
import { DEFAULT_PARAMS } from "../../../shared/src/wire.ts";
import type { BackendConfig } from "../server/config.ts";
import { BatchingEngine } from "./engine.ts";
import { loadModel } from "./model.ts";
import { runGeneration } from "./run.ts";

export { BatchingEngine } from "./engine.ts";
export { loadModel, releaseModel, EngineLoadError, type LoadedModel } from "./model.ts";
export { runGeneration } from "./run.ts";

export async function createEngine(config: BackendConfig): Promise<BatchingEngine> {
  const model = await loadModel(config.modelDir, {
    executionProvider: config.executionProvider,
    ...(config.ortThreads ? { intraOpThreads: config.ortThreads } : {}),
    visionProcess: config.visionProcess,
  });
  // Warm-up: the first runs allocate and pick kernels; do it before reporting ready.
  await runGeneration(model, { inputIds: Int32Array.from([model.meta.vision_start_token_id - 8]) }, { ...DEFAULT_PARAMS, max_new_tokens: 2 });
  return new BatchingEngine(model, {
    maxBatch: config.maxBatch,
    maxImageTokens: config.maxImageTokens,
    prefillChunk: config.prefillChunk,
    draftTokens: config.draftTokens,
  });
}

/** Builds the config-A test model the way a user would: make-test-model from the spec, then convert. */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll } from "vitest";
import { makeTestModel } from "../../gpu-backend/src/checkpoint/make-test-model.ts";
import { convertModel } from "../../gpu-backend/src/convert/index.ts";
import type { ConvertDtype, ConvertOptions } from "../../gpu-backend/src/convert/index.ts";
import { loadModel, releaseModel, type LoadedModel } from "../../gpu-backend/src/engine/model.ts";
import { GOLDEN_DIR } from "./golden.ts";

/**
 * Writes `<work>/ckpt` (safetensors) and `<work>/onnx` (converted graphs, with `extra` converter options);
 * returns the ONNX folder.
 */
export async function buildTinyModel(work: string, dtype: ConvertDtype = "fp32", extra: Partial<ConvertOptions> = {}): Promise<string> {
  await makeTestModel({ configPath: join(GOLDEN_DIR, "tiny-a", "config.json"), outDir: join(work, "ckpt") });
  await convertModel({ model: join(work, "ckpt"), outDir: join(work, "onnx"), dtype, ...extra });
  return join(work, "onnx");
}

/** A built and loaded test model: `model` (2 intra-op threads) and its work folder `dir` (`dir/onnx`, `dir/ckpt`). */
export interface TinyModel {
  readonly model: LoadedModel;
  readonly dir: string;
}

/**
 * The config-A model (converter options `extra`, fp32 unless `extra.dtype` says otherwise) for the enclosing
 * describe block or file: built and loaded in `beforeAll`, released and its folder (a fresh `<tmp>/<prefix>…`)
 * removed in `afterAll`.
 */
export function useTinyModel(prefix: string, extra: Partial<ConvertOptions> = {}): TinyModel {
  let model: LoadedModel | undefined;
  let dir: string | undefined;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), prefix));
    model = await loadModel(await buildTinyModel(dir, extra.dtype ?? "fp32", extra), { intraOpThreads: 2 });
  }, 120_000);
  afterAll(async () => {
    if (model) await releaseModel(model);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });
  return {
    get model() {
      return model!;
    },
    get dir() {
      return dir!;
    },
  };
}

/** Builds the config-A test model the way a user would: make-test-model from the spec, then convert. */
import { join } from "node:path";
import { makeTestModel } from "../../gpu-backend/src/checkpoint/make-test-model.ts";
import { convertModel } from "../../gpu-backend/src/convert/index.ts";
import type { ConvertDtype, ConvertOptions } from "../../gpu-backend/src/convert/index.ts";
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

/**
 * Child: one make-test-model, one conversion, or one vision encoder graph with other options (a peer for
 * the `vision` suite), so that its time and peak RSS are measured alone.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { loadQwen2VLCheckpoint } from "../../gpu-backend/src/checkpoint/index.ts";
import { makeTestModel } from "../../gpu-backend/src/checkpoint/make-test-model.ts";
import { buildGraphs, convertModel, type ConvertDtype } from "../../gpu-backend/src/convert/index.ts";
import { writeModel } from "../../gpu-backend/src/onnx/index.ts";
import { childArgs, childDone, childMain } from "../lib/common.ts";

type Args =
  | { kind: "checkpoint"; configPath: string; outDir: string; dtype: "f32" | "bf16" }
  | { kind: "convert"; model: string; outDir: string; dtype: ConvertDtype; w8a8?: boolean; label?: string }
  | { kind: "vision"; model: string; outDir: string; dtype: ConvertDtype; visionInt8: boolean; visionAttentionChunkElements: number };

childMain(async () => {
  const a = childArgs<Args>();
  const t0 = performance.now();
  if (a.kind === "checkpoint") {
    const r = await makeTestModel({ configPath: a.configPath, outDir: a.outDir, dtype: a.dtype, overwrite: true });
    childDone({ seconds: (performance.now() - t0) / 1000, bytes: r.totalSize });
  } else if (a.kind === "vision") {
    const ckpt = await loadQwen2VLCheckpoint(a.model);
    const { vision_encoder } = buildGraphs(ckpt.config, ckpt.weights, { dtype: a.dtype, visionInt8: a.visionInt8, visionAttentionChunkElements: a.visionAttentionChunkElements, appendDecoder: false });
    await mkdir(a.outDir, { recursive: true });
    await writeModel(join(a.outDir, "vision_encoder.onnx"), vision_encoder, { externalData: true });
    childDone({ seconds: (performance.now() - t0) / 1000 });
  } else {
    let last = 0;
    const r = await convertModel({
      model: a.model,
      outDir: a.outDir,
      dtype: a.dtype,
      ...(a.w8a8 ? { w8a8: true } : {}),
      overwrite: true,
      onProgress: (p) => {
        const pct = Math.floor((100 * p.doneBytes) / Math.max(1, p.totalBytes));
        if (pct >= last + 10) {
          last = pct;
          process.stderr.write(`  ${a.label ?? a.dtype}: ${pct}% (${p.graph})\n`);
        }
      },
    });
    childDone({ seconds: (performance.now() - t0) / 1000, converter_seconds: r.seconds });
  }
});

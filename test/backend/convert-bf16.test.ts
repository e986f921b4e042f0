/**
 * A BF16 checkpoint (make-test-model --dtype bf16): every weight the converter reads is the bf16 rounding of
 * the spec value, and its graphs agree with an f32 conversion of the same rounded weights.
 */
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_PARAMS } from "../../shared/src/wire.ts";
import type { ChatMessage } from "../../shared/src/chat-template.ts";
import { CheckpointWeights, bf16ToF32, f32ToBf16, makeTestModel, specTensor, writeSafetensors } from "../../gpu-backend/src/checkpoint/index.ts";
import { convertModel } from "../../gpu-backend/src/convert/index.ts";
import { loadModel, releaseModel, type LoadedModel } from "../../gpu-backend/src/engine/model.ts";
import { buildPrompt, createTokenizer } from "../../gpu-backend/src/engine/prompt.ts";
import { runGeneration } from "../../gpu-backend/src/engine/run.ts";
import { GOLDEN_DIR, loadGoldenCase } from "../support/golden.ts";

const work = mkdtempSync(join(tmpdir(), "convert-bf16-"));
let fromBf16: LoadedModel;
let fromF32: LoadedModel;
afterAll(async () => {
  await Promise.all([fromBf16, fromF32].filter(Boolean).map((m) => releaseModel(m)));
  rmSync(work, { recursive: true, force: true });
});

beforeAll(async () => {
  const bf = join(work, "bf16");
  await makeTestModel({ configPath: join(GOLDEN_DIR, "tiny-a", "config.json"), outDir: bf, dtype: "bf16" });
  // The same rounded values stored as F32, in an otherwise identical checkpoint.
  const f32 = join(work, "f32-rounded");
  mkdirSync(f32);
  const ck = await CheckpointWeights.open(bf);
  const tensors = [];
  for (const name of ck.names()) tensors.push({ name, dtype: "F32" as const, shape: ck.info(name).shape, data: await ck.readF32(name) });
  await ck.close();
  await writeSafetensors(join(f32, "model.safetensors"), tensors);
  for (const f of ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"]) {
    copyFileSync(join(bf, f), join(f32, f));
  }
  await convertModel({ model: bf, outDir: join(work, "onnx-bf16"), dtype: "fp32" });
  await convertModel({ model: f32, outDir: join(work, "onnx-f32"), dtype: "fp32" });
  fromBf16 = await loadModel(join(work, "onnx-bf16"), { intraOpThreads: 2 });
  fromF32 = await loadModel(join(work, "onnx-f32"), { intraOpThreads: 2 });
}, 120_000);

describe("BF16 checkpoint", () => {
  it("every weight read is the bf16 rounding of the spec value", async () => {
    const ck = await CheckpointWeights.open(join(work, "bf16"));
    for (const name of ck.names()) {
      const info = ck.info(name);
      expect(info.dtype).toBe("BF16");
      const want = bf16ToF32(f32ToBf16(specTensor(name, info.shape)));
      expect(Buffer.from((await ck.readF32(name)).buffer).equals(Buffer.from(want.buffer)), name).toBe(true);
    }
    await ck.close();
  });

  it("its conversion agrees with an f32 conversion of the same rounded weights (forced decode, case_05)", async () => {
    const c = loadGoldenCase("case_05");
    const run = async (m: LoadedModel) => {
      const prompt = await buildPrompt(m, createTokenizer(m), c.messages as ChatMessage[], GOLDEN_DIR);
      return runGeneration(m, prompt, DEFAULT_PARAMS, { forcedIds: c.forced_decode.forced_ids, topK: 5 });
    };
    const [a, b] = [await run(fromBf16), await run(fromF32)];
    expect(a.steps).toHaveLength(c.forced_decode.forced_ids.length + 1);
    let maxDiff = 0;
    a.steps.forEach((s, k) => {
      expect(s.top5.map((p) => p[0])).toEqual(b.steps[k]!.top5.map((p) => p[0]));
      s.top5.forEach((p, i) => (maxDiff = Math.max(maxDiff, Math.abs(p[1] - b.steps[k]!.top5[i]![1]))));
    });
    expect(maxDiff).toBeLessThanOrEqual(1e-6);
    // And the rounding is real: bf16 weights change the logits relative to the f32 golden ones.
    const golden = c.forced_decode.steps[0]!.top5[0]![1];
    expect(Math.abs(a.steps[0]!.top5[0]![1] - golden)).toBeGreaterThan(1e-6);
  });
});

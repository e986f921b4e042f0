/**
 * Proof that the converter reproduces transformers: /work/shared/golden/tiny-a converted to fp32 ONNX and
 * run with onnxruntime against the golden vision features, prefill logits and teacher-forced decodes.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { convertModel, type ConvertManifest } from "../../gpu-backend/src/convert/index.ts";
import { GOLDEN_DIR, type GoldenCase, loadGoldenCases, loadGoldenF32 } from "../support/golden.ts";
import { IMAGE_PAD_ID, QwenOnnx, maxAbsDiff, topK } from "./convert-support.ts";

const TINY = join(GOLDEN_DIR, "tiny-a");
const TOL = 1e-4;
const cases = loadGoldenCases();
const tmp = mkdtempSync(join(tmpdir(), "convert-golden-"));
let manifest: ConvertManifest;
let model: QwenOnnx;

beforeAll(async () => {
  const res = await convertModel({ model: TINY, outDir: join(tmp, "fp32"), dtype: "fp32" });
  manifest = res.manifest;
  model = await QwenOnnx.load(join(tmp, "fp32"), manifest.decoder);
});
afterAll(async () => {
  await model?.release();
  rmSync(tmp, { recursive: true, force: true });
});

describe("fp32 conversion of tiny-a", () => {
  it("writes the onnx-community layout, side files and a manifest", () => {
    const dir = join(tmp, "fp32");
    expect(readdirSync(dir).sort()).toEqual(
      [
        "chat_template.json",
        "config.json",
        "decoder_model_append.onnx",
        "decoder_model_merged.onnx",
        "embed_tokens.onnx",
        "generation_config.json",
        "manifest.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vision_encoder.onnx",
      ].sort(),
    );
    expect(readdirSync(tmp)).toEqual(["fp32"]); // no temporary folder left behind
    for (const f of manifest.copied_files) {
      if (f === "preprocessor_config.json") continue; // completed with Python's defaults (below)
      expect(readFileSync(join(dir, f)).equals(readFileSync(join(TINY, f))), f).toBe(true);
    }
    // Python's Qwen2VLImageProcessor defaults spelled out after the checkpoint's own keys (transformers.js needs them).
    const srcPre = JSON.parse(readFileSync(join(TINY, "preprocessor_config.json"), "utf8"));
    const pre = JSON.parse(readFileSync(join(dir, "preprocessor_config.json"), "utf8"));
    expect(srcPre.do_normalize).toBeUndefined();
    expect(pre).toEqual({
      ...srcPre,
      do_convert_rgb: true,
      do_resize: true,
      resample: 3,
      do_rescale: true,
      rescale_factor: 0.00392156862745098,
      do_normalize: true,
    });
    expect(Object.keys(pre).slice(0, Object.keys(srcPre).length)).toEqual(Object.keys(srcPre));
    expect(JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"))).toEqual(manifest);
    expect(manifest.dtype).toBe("fp32");
    expect(manifest.quantization).toBeNull();
    const st = readFileSync(join(TINY, "model.safetensors"));
    const headerLen = Number(st.readBigUInt64LE(0));
    expect(manifest.source.files).toEqual([
      { name: "model.safetensors", bytes: st.length, sha256: createHash("sha256").update(st.subarray(0, 8 + headerLen)).digest("hex"), hashed: "header" },
    ]);
    const dec = manifest.graphs.decoder_model_merged;
    expect(dec.inputs.map((i) => i.name)).toEqual([
      "inputs_embeds",
      "attention_mask",
      "position_ids",
      "past_key_values.0.key",
      "past_key_values.0.value",
      "past_key_values.1.key",
      "past_key_values.1.value",
    ]);
    expect(dec.outputs.map((o) => o.name)).toEqual(["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]);
    expect(dec.outputs[0]!.shape).toEqual(["batch_size", 1, 151936]);
    // The engine's decoder: the same inputs and how many positions' logits to return, only the new tokens' K/V out.
    const app = manifest.graphs.decoder_model_append!;
    expect(app.inputs).toEqual([...dec.inputs, { name: "logits_to_keep", type: "int64", shape: [1] }]);
    expect(app.outputs.map((o) => o.name)).toEqual(["logits", "new_key_values.0.key", "new_key_values.0.value", "new_key_values.1.key", "new_key_values.1.value"]);
    expect(app.outputs[0]!.shape).toEqual(["batch_size", "logits_to_keep", 151936]);
    expect(app.outputs[1]!.shape).toEqual(["batch_size", 2, "sequence_length", 16]);
    expect(manifest.converter.options.append_decoder).toBe(true);
    expect(manifest.graphs.vision_encoder.inputs).toEqual([
      { name: "pixel_values", type: "float32", shape: ["num_patches", 1176] },
      { name: "grid_thw", type: "int64", shape: ["num_images", 3] },
    ]);
    expect(manifest.graphs.embed_tokens.outputs[0]).toEqual({ name: "inputs_embeds", type: "float32", shape: ["batch_size", "sequence_length", 64] });
    expect(dec.data_file).toBeUndefined();
  });

  const withImages = cases.filter((c) => c.image_embeds);
  it.each(withImages.map((c) => [c.case, c] as const))("vision features of %s match transformers", async (_, c) => {
    const { data, dims } = await model.imageFeatures(c);
    expect(dims).toEqual(c.image_embeds!.shape);
    const diff = maxAbsDiff(data, loadGoldenF32(c.image_embeds!.file));
    expect(diff).toBeLessThanOrEqual(TOL);
  });

  it("vision attention in chunks of query rows (a padded last chunk; one spanning case_05's two images): the same features", async () => {
    const dir = join(tmp, "chunked");
    // 2 heads: 2·37·288 scores per chunk = 37 rows at case_05's 288 patches (rows 222–258 hold both images' rows),
    // 41 at 256 (7 chunks, 31 padded rows), 22 at 484, 63 at 168, 49 at 216.
    const res = await convertModel({ model: TINY, outDir: dir, dtype: "fp32", appendDecoder: false, visionAttentionChunkElements: 2 * 37 * 288 });
    expect(res.manifest.converter.options.vision_attention_chunk_elements).toBe(2 * 37 * 288);
    expect(manifest.converter.options.vision_attention_chunk_elements).toBe(1 << 24);
    const vision = await ort.InferenceSession.create(join(dir, "vision_encoder.onnx"), { intraOpNumThreads: 1 });
    try {
      for (const c of withImages) {
        const grid = c.image_grid_thw!;
        const feeds = {
          pixel_values: new ort.Tensor("float32", loadGoldenF32(c.pixel_values!.file), c.pixel_values!.shape),
          grid_thw: new ort.Tensor("int64", BigInt64Array.from(grid.flat().map(BigInt)), [grid.length, 3]),
        };
        const chunked = (await vision.run(feeds))["image_features"]!;
        expect(chunked.dims, c.case).toEqual(c.image_embeds!.shape);
        expect(maxAbsDiff(chunked.data as Float32Array, loadGoldenF32(c.image_embeds!.file)), c.case).toBeLessThanOrEqual(TOL);
        expect(maxAbsDiff(chunked.data as Float32Array, (await model.imageFeatures(c)).data), `${c.case} vs one chunk`).toBeLessThanOrEqual(1e-6);
      }
    } finally {
      await vision.release();
    }
    await expect(convertModel({ model: TINY, outDir: join(tmp, "bad-chunk"), visionAttentionChunkElements: 0 })).rejects.toMatchObject({ code: "bad_options" });
  });

  it.each(cases.map((c) => [c.case, c] as const))("prefill and teacher-forced KV decode of %s match transformers", async (_, c) => {
    const fd = c.forced_decode;
    let worst = 0;
    let steps = 0;
    await model.forcedDecode(c, (k, logits) => {
      const golden = fd.steps[k]!;
      if (k === 0) {
        worst = Math.max(worst, maxAbsDiff(logits, loadGoldenF32(c.prefill_logits.file)));
        expect(topK(logits, 5)).toEqual(c.prefill_top5.map(([id]) => id));
      } else {
        expect(golden.input_token).toBe(fd.forced_ids[k - 1]);
        expect(golden.input_position).toBe(c.seq_len + (k - 1) + c.rope_deltas);
      }
      expect(topK(logits, 5), `step ${k}`).toEqual(golden.top5.map(([id]) => id));
      for (const [id, value] of golden.top5) worst = Math.max(worst, Math.abs(logits[id]! - value));
      steps++;
    });
    expect(steps).toBe(fd.steps.length);
    expect(worst).toBeLessThanOrEqual(TOL);
    console.log(`[fp32] ${c.case}: ${steps} steps, max |Δlogit| ${worst.toExponential(2)}`);
  });

  it("batch 2 with left padding: each row matches its own golden prefill and forced decode", async () => {
    const a = cases.find((c) => c.case === "case_04")!; // 154 tokens, text only
    const b = cases.find((c) => c.case === "case_01")!; // 200 tokens, one image
    const S = Math.max(a.seq_len, b.seq_len);
    const H = model.hidden;
    const rows: GoldenCase[] = [a, b];
    const embeds = new Float32Array(2 * S * H);
    const mask: number[] = [];
    const positions: number[][] = [[], [], []];
    for (const [r, c] of rows.entries()) {
      const pad = S - c.seq_len;
      embeds.set(await model.promptEmbeds(c), (r * S + pad) * H); // pad rows stay zero
      mask.push(...new Array(pad).fill(0), ...new Array(c.seq_len).fill(1));
      for (let axis = 0; axis < 3; axis++) positions[axis]!.push(...new Array(pad).fill(1), ...c.position_ids[axis]!);
    }
    let { logits, present } = await model.decode(embeds, 2, S, mask, positions.flat(), model.emptyPast(2));
    const V = logits.length / 2;
    for (const [r, c] of rows.entries()) {
      const row = logits.subarray(r * V, (r + 1) * V);
      expect(maxAbsDiff(row, loadGoldenF32(c.prefill_logits.file))).toBeLessThanOrEqual(TOL);
      expect(topK(row, 5)).toEqual(c.prefill_top5.map(([id]) => id));
    }
    let total = S;
    for (let k = 1; k <= 6; k++) {
      const tokens = rows.map((c) => c.forced_decode.forced_ids[k - 1]!);
      const pos = rows.map((c) => c.seq_len + (k - 1) + c.rope_deltas);
      mask.splice(0, mask.length, ...rows.flatMap((c, r) => [...mask.slice(r * total, (r + 1) * total), 1]));
      total++;
      ({ logits, present } = await model.decode(await model.embedTokens(tokens, 2), 2, 1, mask, [...pos, ...pos, ...pos], present));
      for (const [r, c] of rows.entries()) {
        const row = logits.subarray(r * V, (r + 1) * V);
        const golden = c.forced_decode.steps[k]!.top5;
        expect(topK(row, 5), `${c.case} step ${k}`).toEqual(golden.map(([id]) => id));
        for (const [id, value] of golden) expect(Math.abs(row[id]! - value)).toBeLessThanOrEqual(TOL);
      }
    }
  });

  it("the append decoder: the merged one's logits over a cache buffer with masked padding and spare slots; its K/V out are the present's new rows", async () => {
    const c = cases.find((x) => x.case === "case_06")!; // with an image
    const S = c.seq_len;
    const { layers, kvHeads: kv, headDim: hd, hidden: H } = model;
    const app = await ort.InferenceSession.create(join(tmp, "fp32", "decoder_model_append.onnx"), { intraOpNumThreads: 1 });
    try {
      const i64 = (v: number[], dims: number[]) => new ort.Tensor("int64", BigInt64Array.from(v.map(BigInt)), dims);
      const run = (embeds: Float32Array, seq: number, mask: number[], pos: number[], past: Record<string, ort.Tensor>, keep = 1) =>
        app.run({
          inputs_embeds: new ort.Tensor("float32", embeds, [1, seq, H]),
          attention_mask: i64(mask, [1, mask.length]),
          position_ids: i64(pos, [3, 1, seq]),
          logits_to_keep: i64([keep], [1]),
          ...past,
        });
      const names = Array.from({ length: layers }, (_, i) => ["key", "value"].map((kind) => `${i}.${kind}`)).flat();
      // Prefill from an empty cache: the same logits, and new_key_values = present.
      const embeds = await model.promptEmbeds(c);
      const ref = await model.decode(embeds, 1, S, new Array(S).fill(1), c.position_ids.flat(), model.emptyPast(1));
      const pre = await run(embeds, S, new Array(S).fill(1), c.position_ids.flat(), model.emptyPast(1));
      expect(maxAbsDiff(pre.logits!.data as Float32Array, ref.logits)).toBeLessThanOrEqual(1e-5);
      // logits_to_keep = 3: the last three positions' rows, the last of them the same.
      const three = await run(embeds, S, new Array(S).fill(1), c.position_ids.flat(), model.emptyPast(1), 3);
      expect(three.logits!.dims).toEqual([1, 3, ref.logits.length]);
      expect(maxAbsDiff((three.logits!.data as Float32Array).subarray(2 * ref.logits.length), ref.logits)).toBeLessThanOrEqual(1e-5);
      for (const n of names) {
        expect(pre[`new_key_values.${n}`]!.dims).toEqual([1, kv, S, hd]);
        // Layer 0's K/V are the same ops on the same inputs; later layers see attention summed in another order.
        expect(maxAbsDiff(pre[`new_key_values.${n}`]!.data as Float32Array, ref.present[`past_key_values.${n}`]!.data as Float32Array), n).toBeLessThanOrEqual(n.startsWith("0.") ? 0 : 1e-5);
      }
      // One decode step over a buffer of C slots: 2 of left padding, the prompt, 3 spare — the masked slots hold
      // large finite junk that must get exactly zero weight.
      const C = 2 + S + 3;
      const past: Record<string, ort.Tensor> = {};
      for (const n of names) {
        const buf = new Float32Array(kv * C * hd).fill(-3.25);
        const src = ref.present[`past_key_values.${n}`]!.data as Float32Array;
        for (let h = 0; h < kv; h++) {
          buf.fill(7.5e3, h * C * hd, (h * C + 2) * hd);
          buf.set(src.subarray(h * S * hd, (h + 1) * S * hd), (h * C + 2) * hd);
        }
        past[`past_key_values.${n}`] = new ort.Tensor("float32", buf, [1, kv, C, hd]);
      }
      const tok = await model.embedTokens([c.forced_decode.forced_ids[0]!], 1);
      const pos = S + c.rope_deltas;
      const mask = [0, 0, ...new Array(S).fill(1), 0, 0, 0, 1];
      const step = await run(tok, 1, mask, [pos, pos, pos], past);
      const refStep = await model.decode(tok, 1, 1, new Array(S + 1).fill(1), [pos, pos, pos], ref.present);
      const logits = step.logits!.data as Float32Array;
      expect(maxAbsDiff(logits, refStep.logits)).toBeLessThanOrEqual(1e-5);
      expect(topK(logits, 5)).toEqual(c.forced_decode.steps[1]!.top5.map(([id]) => id));
      for (const [id, value] of c.forced_decode.steps[1]!.top5) expect(Math.abs(logits[id]! - value)).toBeLessThanOrEqual(TOL);
      for (const n of names) {
        const present = refStep.present[`past_key_values.${n}`]!.data as Float32Array;
        const fresh = step[`new_key_values.${n}`]!.data as Float32Array;
        for (let h = 0; h < kv; h++) expect(maxAbsDiff(fresh.subarray(h * hd, (h + 1) * hd), present.subarray((h * (S + 1) + S) * hd, (h + 1) * (S + 1) * hd)), n).toBeLessThanOrEqual(1e-5);
      }
    } finally {
      await app.release();
    }
  });

  it("the image rows really come from the vision encoder (sanity of the scatter)", async () => {
    const c = cases.find((x) => x.case === "case_05")!;
    const embeds = await model.promptEmbeds(c);
    const first = c.input_ids.indexOf(IMAGE_PAD_ID);
    const golden = loadGoldenF32(c.image_embeds!.file);
    expect(maxAbsDiff(embeds.subarray(first * 64, first * 64 + 64), golden.subarray(0, 64))).toBeLessThanOrEqual(TOL);
    expect(maxAbsDiff(embeds.subarray(first * 64, first * 64 + 64), (await model.embedTokens([IMAGE_PAD_ID], 1)))).toBeGreaterThan(0.01);
  });
});

describe("variants", () => {
  it("preprocessor_config.json: only missing defaults are added; the checkpoint's keys keep their values", async () => {
    const src = join(tmp, "pre-src");
    mkdirSync(src);
    for (const f of readdirSync(TINY)) if (f !== "preprocessor_config.json") symlinkSync(join(TINY, f), join(src, f));
    const own = { ...JSON.parse(readFileSync(join(TINY, "preprocessor_config.json"), "utf8")), do_normalize: false, resample: 2, rescale_factor: 0.5 };
    writeFileSync(join(src, "preprocessor_config.json"), JSON.stringify(own));
    const dir = join(tmp, "pre-out");
    await convertModel({ model: src, outDir: dir, dtype: "int4" });
    const pre = JSON.parse(readFileSync(join(dir, "preprocessor_config.json"), "utf8"));
    expect(pre).toEqual({ ...own, do_convert_rgb: true, do_resize: true, do_rescale: true });
    // Nothing missing: the file is copied byte for byte.
    writeFileSync(join(src, "preprocessor_config.json"), JSON.stringify({ ...own, do_convert_rgb: false, do_resize: true, do_rescale: true }));
    await convertModel({ model: src, outDir: dir, dtype: "int4", overwrite: true });
    expect(readFileSync(join(dir, "preprocessor_config.json")).equals(readFileSync(join(src, "preprocessor_config.json")))).toBe(true);
  });

  it("a float LM head above lmHeadSliceBytes: MatMuls on vocabulary slices + Concat, the same logits", async () => {
    const dir = join(tmp, "sliced");
    // tiny-a's head is [64, 151936] float32 = 38.9 MB: 10 MB slices → 4 MatMuls of 37984 columns.
    const res = await convertModel({ model: TINY, outDir: dir, dtype: "fp32", lmHeadSliceBytes: 10e6 });
    expect(res.manifest.graphs.decoder_model_merged.outputs[0]).toEqual({ name: "logits", type: "float32", shape: ["batch_size", 1, 151936] });
    const graph = readFileSync(join(dir, "decoder_model_merged.onnx"));
    for (let i = 0; i < 4; i++) expect(graph.includes(`lm_head.weight_T.${i}`), `slice ${i}`).toBe(true);
    expect(graph.includes("lm_head.weight_T.4")).toBe(false);
    expect(readFileSync(join(tmp, "fp32", "decoder_model_merged.onnx")).includes("lm_head.weight_T.0")).toBe(false); // default: one MatMul
    const sliced = await QwenOnnx.load(dir, res.manifest.decoder);
    try {
      for (const name of ["case_04", "case_01"]) {
        const c = cases.find((x) => x.case === name)!;
        const S = c.seq_len;
        const embeds = await model.promptEmbeds(c);
        const mask = new Array(S).fill(1);
        const a = await sliced.decode(embeds, 1, S, mask, c.position_ids.flat(), sliced.emptyPast(1));
        const b = await model.decode(embeds, 1, S, mask, c.position_ids.flat(), model.emptyPast(1));
        expect(maxAbsDiff(a.logits, b.logits), name).toBe(0);
        expect(maxAbsDiff(a.logits, loadGoldenF32(c.prefill_logits.file))).toBeLessThanOrEqual(TOL);
        // One KV decode step on top (M = 1, the serving shape).
        const tok = c.forced_decode.forced_ids[0]!;
        const pos = S + c.rope_deltas;
        const step = async (m: QwenOnnx, past: typeof a.present) =>
          (await m.decode(await model.embedTokens([tok], 1), 1, 1, [...mask, 1], [pos, pos, pos], past)).logits;
        const sa = await step(sliced, a.present);
        expect(maxAbsDiff(sa, await step(model, b.present)), `${name} step 1`).toBe(0);
        for (const [id, value] of c.forced_decode.steps[1]!.top5) expect(Math.abs(sa[id]! - value)).toBeLessThanOrEqual(TOL);
      }
    } finally {
      await sliced.release();
    }
    // A quantized head (W8A8, int4's default, or MatMulNBits) stays one node whatever the limit; a bad limit is refused.
    for (const [lmHead, weight] of [["w8a8", "lm_head.weight_I8"], ["nbits", "lm_head.weight_Q4"]] as const) {
      const q = join(tmp, `sliced-int4-${lmHead}`);
      await convertModel({ model: TINY, outDir: q, dtype: "int4", lmHead, lmHeadSliceBytes: 10e6 });
      const qGraph = readFileSync(join(q, "decoder_model_merged.onnx"));
      expect(qGraph.includes(weight)).toBe(true);
      expect(qGraph.includes("lm_head.weight_T")).toBe(false);
    }
    await expect(convertModel({ model: TINY, outDir: join(tmp, "bad"), lmHeadSliceBytes: -1 })).rejects.toMatchObject({ code: "bad_options" });
  });

  it("full-logits decoder: [1, S, V]; last row = golden, row S−2 = last-only prefill of the prompt minus its last token", async () => {
    const dir = join(tmp, "full");
    const res = await convertModel({ model: TINY, outDir: dir, dtype: "fp32", lastLogitsOnly: false });
    expect(res.manifest.decoder.last_logits_only).toBe(false);
    expect(res.manifest.graphs.decoder_model_merged.outputs[0]!.shape).toEqual(["batch_size", "sequence_length", 151936]);
    const full = await QwenOnnx.load(dir, res.manifest.decoder);
    try {
      const c = cases.find((x) => x.case === "case_04")!;
      const S = c.seq_len;
      const embeds = await full.promptEmbeds(c);
      const out = await full.decode(embeds, 1, S, new Array(S).fill(1), c.position_ids.flat(), full.emptyPast(1));
      expect(out.logitsDims).toEqual([1, S, 151936]);
      const V = 151936;
      expect(maxAbsDiff(out.logits.subarray((S - 1) * V), loadGoldenF32(c.prefill_logits.file))).toBeLessThanOrEqual(TOL);
      const shorter = await model.decode(embeds.subarray(0, (S - 1) * 64), 1, S - 1, new Array(S - 1).fill(1), c.position_ids.flatMap((p) => p.slice(0, S - 1)), model.emptyPast(1));
      expect(maxAbsDiff(out.logits.subarray((S - 2) * V, (S - 1) * V), shorter.logits)).toBeLessThanOrEqual(1e-5);
    } finally {
      await full.release();
    }
  });

  it("external data: every graph's tensors in <graph>.onnx_data, same numbers", async () => {
    const dir = join(tmp, "ext");
    const res = await convertModel({ model: TINY, outDir: dir, dtype: "fp32", externalData: true });
    const { decoder_model_append: app, ...layout } = res.manifest.graphs;
    for (const g of Object.values(layout)) {
      expect(g.data_file).toBe(`${g.file}_data`);
      expect(existsSync(join(dir, g.data_file!))).toBe(true);
      expect(g.bytes).toBeLessThan(200_000); // only structure stays in the .onnx
    }
    // The append decoder points into the merged decoder's data file: the weights are on disk once.
    expect(app).toMatchObject({ file: "decoder_model_append.onnx", data_file: "decoder_model_merged.onnx_data" });
    expect(app!.data_bytes).toBeUndefined();
    expect(app!.bytes).toBeLessThan(200_000);
    expect(existsSync(join(dir, "decoder_model_append.onnx_data"))).toBe(false);
    const ext = await QwenOnnx.load(dir, res.manifest.decoder);
    try {
      const c = cases.find((x) => x.case === "case_06")!;
      const fromExt = await ext.imageFeatures(c);
      expect(maxAbsDiff(fromExt.data, loadGoldenF32(c.image_embeds!.file))).toBeLessThanOrEqual(TOL);
      const S = c.seq_len;
      const out = await ext.decode(await ext.promptEmbeds(c), 1, S, new Array(S).fill(1), c.position_ids.flat(), ext.emptyPast(1));
      expect(maxAbsDiff(out.logits, loadGoldenF32(c.prefill_logits.file))).toBeLessThanOrEqual(TOL);
    } finally {
      await ext.release();
    }
  });
});

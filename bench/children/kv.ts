/**
 * Child: the decode step of one converted folder's two decoder graphs, interleaved in one process — the
 * append KV contract (`decoder_model_append.onnx`: the cache read in place) and the onnx-community one
 * (`decoder_model_merged.onnx`: `Concat(past, new)` copies it every step) — at several context lengths and
 * batch sizes. A step is what `decodeBatch` runs: the token embeddings, the decoder over a cache of L
 * positions per row (KvCache, filled with small values: the cost does not depend on them), and the commit.
 * Both graphs use the same weights, so the ratio isolates the cache handling.
 */
import * as ort from "onnxruntime-node";
import { logitsToKeepFeed, kvSpec } from "../../gpu-backend/src/engine/generate.ts";
import { KvCache, type KvContract } from "../../gpu-backend/src/engine/kv-cache.ts";
import { type LoadedModel, loadModel, releaseModel } from "../../gpu-backend/src/engine/model.ts";
import { childArgs, childDone, childMain, peakRss } from "../lib/common.ts";

export interface KvArgs {
  modelDir: string;
  threads: number;
  /** Past lengths L to measure. */
  contexts: number[];
  /** Batch sizes (rows decoded together). */
  rows: number[];
  /** Steps per contract and point, after three warm-up steps each. */
  steps: number;
  /** Points with rows × context above this are skipped (the present contract's double buffer is 2× the cache). */
  maxRowTokens: number;
  label?: string;
}

export interface KvPoint {
  rows: number;
  context: number;
  /** Median and all step times, ms, per contract. */
  append_ms: number;
  present_ms: number;
  append_steps_ms: number[];
  present_steps_ms: number[];
  /** present / append: how many times faster the append contract's step is. */
  speedup: number;
  /** The cache's bytes (all layers, K and V) at this point. */
  cache_bytes: number;
}

export interface KvResult {
  dtype: string;
  variant: string;
  points: KvPoint[];
  skipped: Array<{ rows: number; context: number }>;
  peak_rss_bytes: number;
}

function filledCache(model: LoadedModel, B: number, L: number): KvCache {
  const cache = KvCache.filled(kvSpec(model), B, L);
  // Small finite values everywhere (as a real cache has), through the decoder's own view of the past.
  for (const t of Object.values(cache.inputs(1, new Array(B).fill(0)))) {
    if (t.type === "float32") (t.data as Float32Array).fill(0.01);
    else if (t.type === "float16") (t.data as Uint16Array).fill(0x211f); // ≈ 0.01
  }
  return cache;
}

/** One decode step of `B` rows over `cache` (positions past the context). */
async function step(model: LoadedModel, cache: KvCache, B: number): Promise<number> {
  const t0 = performance.now();
  const embeds = await model.embeddings.lookup(Array.from({ length: B }, (_, i) => 1000 + i), [B, 1]);
  const pos = new BigInt64Array(3 * B).fill(BigInt(cache.L));
  await model.sessions.decoder.run(
    { inputs_embeds: embeds, position_ids: new ort.Tensor("int64", pos, [3, B, 1]), ...cache.inputs(1, new Array(B).fill(0)), ...logitsToKeepFeed(model, 1) },
    { logits: null, ...cache.outputs(1) },
  );
  cache.commit(1);
  return performance.now() - t0;
}

const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]!;

childMain(async () => {
  const a = childArgs<KvArgs>();
  const contracts: KvContract[] = ["append", "present"];
  const models = {} as Record<KvContract, LoadedModel>;
  for (const kv of contracts) models[kv] = await loadModel(a.modelDir, { intraOpThreads: a.threads, kvCache: kv });
  const label = a.label ?? models.append.dtype;
  const { num_hidden_layers: layers, num_key_value_heads: kvH, head_dim: hd } = models.append.config.text;
  const elemBytes = models.append.ioFloatType === "float16" ? 2 : 4;
  const points: KvPoint[] = [];
  const skipped: KvResult["skipped"] = [];
  for (const B of a.rows) {
    for (const L of a.contexts) {
      if (B * L > a.maxRowTokens) {
        skipped.push({ rows: B, context: L });
        continue;
      }
      const caches = { append: filledCache(models.append, B, L), present: filledCache(models.present, B, L) };
      const times: Record<KvContract, number[]> = { append: [], present: [] };
      // Warm-up: the first steps of a shape page in weights and size ORT's buffers.
      for (let w = 0; w < 3; w++) for (const kv of contracts) await step(models[kv], caches[kv], B);
      // Contracts alternate so that a drift of the machine hits both alike. Each timed step follows an untimed
      // one of the same session: right after the other session's run, that session's idle ORT threads still
      // spin and take the cores (measured: +40–50 ms on whichever graph ran second).
      for (let s = 0; s < a.steps; s++) {
        for (const kv of contracts) {
          await step(models[kv], caches[kv], B);
          times[kv].push(await step(models[kv], caches[kv], B));
        }
      }
      const p: KvPoint = {
        rows: B,
        context: L,
        append_ms: median(times.append),
        present_ms: median(times.present),
        append_steps_ms: times.append,
        present_steps_ms: times.present,
        speedup: median(times.present) / median(times.append),
        cache_bytes: 2 * layers * B * kvH * L * hd * elemBytes,
      };
      points.push(p);
      process.stderr.write(`  ${label}: ${B} row(s) × ${L} context: append ${p.append_ms.toFixed(1)} ms, present ${p.present_ms.toFixed(1)} ms (×${p.speedup.toFixed(2)})\n`);
    }
  }
  for (const kv of contracts) await releaseModel(models[kv]);
  childDone({ dtype: models.append.dtype, variant: label, points, skipped, peak_rss_bytes: peakRss() });
});

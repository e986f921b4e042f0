/**
 * Child: one stream through our engine on one converted folder — load, a warm-up run (its numbers are kept as
 * "cold"), then `runs` timed runs of the eval prompt with a forced continuation. Everything from reading the
 * image file to the first token counts as TTFT; decode speed is measured between token callbacks, so it
 * includes sampling and detokenization, not only the decoder.
 */
import type { ChatMessage } from "../../shared/src/chat-template.ts";
import { DEFAULT_PARAMS } from "../../shared/src/wire.ts";
import { loadModel, releaseModel } from "../../gpu-backend/src/engine/model.ts";
import { buildPrompt, createTokenizer } from "../../gpu-backend/src/engine/prompt.ts";
import { runGeneration } from "../../gpu-backend/src/engine/run.ts";
import { childArgs, childDone, childMain } from "../lib/common.ts";

export interface SingleArgs {
  modelDir: string;
  threads: number;
  runs: number;
  forcedIds: number[];
  /** Forced tokens of the warm-up run, whose per-step argmax is recorded for the parity check. */
  warmupTokens: number;
  messages: unknown[];
  baseDir: string;
  /** The benchmark variant (e.g. int8-w8a8) for progress lines and the result; default the manifest dtype. */
  label?: string;
}

export interface RunSample {
  preprocess_ms: number;
  vision_ms: number;
  prefill_ms: number;
  ttft_ms: number;
  decode_tokens: number;
  decode_tok_s: number;
  /** Median of the decoder steps alone (embedding + decoder run), ms. */
  decode_step_ms_median: number;
  total_ms: number;
}

export interface SingleResult {
  /** The folder's manifest dtype. */
  dtype: string;
  /** The benchmark variant measured (`label`, else the dtype). */
  variant: string;
  io_float_type: string;
  load_ms: number;
  rss_after_load_bytes: number;
  prompt_tokens: number;
  image_tokens: number;
  cold: RunSample;
  runs: RunSample[];
  /** Greedy choice at each step of the warm-up run (after the prompt, then after each forced token). */
  argmax_ids: number[];
  peak_rss_bytes: number;
}

const median = (v: number[]) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2) : NaN;
};

childMain(async () => {
  const a = childArgs<SingleArgs>();
  const t0 = performance.now();
  const model = await loadModel(a.modelDir, { intraOpThreads: a.threads });
  const tokenizer = createTokenizer(model);
  const loadMs = performance.now() - t0;
  const rssAfterLoad = process.memoryUsage().rss;
  const label = a.label ?? model.dtype;
  process.stderr.write(`  ${label}: loaded in ${(loadMs / 1000).toFixed(1)} s\n`);
  let promptTokens = 0;
  let imageTokens = 0;

  const once = async (forced: number[], topK?: number) => {
    const start = performance.now();
    const prompt = await buildPrompt(model, tokenizer, a.messages as ChatMessage[], a.baseDir);
    const preprocessMs = performance.now() - start;
    promptTokens = prompt.inputIds.length;
    imageTokens = prompt.imageTokens.reduce((x, y) => x + y, 0);
    const times: number[] = [];
    const r = await runGeneration(
      model,
      prompt,
      { ...DEFAULT_PARAMS, max_new_tokens: forced.length },
      { forcedIds: forced, ...(topK ? { topK } : {}), onToken: () => times.push(performance.now()) },
    );
    if (r.generatedIds.length !== forced.length) throw new Error(`generated ${r.generatedIds.length} tokens, expected ${forced.length}`);
    const n = times.length - 1;
    const sample: RunSample = {
      preprocess_ms: preprocessMs,
      vision_ms: r.timings.vision_ms,
      prefill_ms: r.timings.prefill_ms,
      ttft_ms: times[0]! - start,
      decode_tokens: n,
      decode_tok_s: n > 0 ? n / ((times[n]! - times[0]!) / 1000) : NaN,
      decode_step_ms_median: median(r.timings.decode_ms_per_pass),
      total_ms: times[n]! - start,
    };
    return { sample, argmax: r.steps.map((s) => s.top5[0]![0]) };
  };

  const warm = await once(a.forcedIds.slice(0, a.warmupTokens), 1);
  process.stderr.write(`  ${label}: warm-up TTFT ${(warm.sample.ttft_ms / 1000).toFixed(2)} s\n`);
  const runs: RunSample[] = [];
  for (let i = 0; i < a.runs; i++) {
    const { sample } = await once(a.forcedIds);
    runs.push(sample);
    process.stderr.write(
      `  ${label}: run ${i + 1}/${a.runs}: TTFT ${(sample.ttft_ms / 1000).toFixed(2)} s, decode ${sample.decode_tok_s.toFixed(2)} tok/s\n`,
    );
  }
  const out: Omit<SingleResult, "peak_rss_bytes"> = {
    dtype: model.dtype,
    variant: label,
    io_float_type: model.ioFloatType,
    load_ms: loadMs,
    rss_after_load_bytes: rssAfterLoad,
    prompt_tokens: promptTokens,
    image_tokens: imageTokens,
    cold: warm.sample,
    runs,
    argmax_ids: warm.argmax,
  };
  await releaseModel(model);
  childDone(out as unknown as Record<string, unknown>);
});

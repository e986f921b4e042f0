/**
 * Child: continuous batching under load. For each level L, L copies of the eval request are submitted to a
 * fresh BatchingEngine at once (max_new_tokens = tokens + L, EOS ignored so every request runs to length):
 *   - aggregate decode tok/s: token events (after each request's first) in the window where all L requests
 *     decode together — from the last request's first token to the first request's last token
 *   - TTFT of each of the L simultaneous arrivals (submit → first token; the last one waits for L-1 prefills)
 *   - probe TTFT: one more request submitted when the first of the L finishes (L-1 still decoding) — what a
 *     new arrival sees under load
 *   - probe stall: the longest gap between two tokens of a stream still decoding while the probe is admitted
 *     (from its submit to its first token) — what an arrival costs the streams already running — next to the
 *     median gap between tokens of all streams. `probeImage`: the probe asks the eval question about another
 *     image (e.g. a large one, whose vision encoder is the longest part of its admission)
 *   - end-to-end tok/s: all generated tokens / (first submit → last done)
 * Each level runs once per engine `prefillChunk` setting (whole-prompt admission vs chunked) and per place of
 * the vision encoder (`visionProcesses`: the engine's thread, or a process of its own that lets the running
 * streams decode while the probe's image is encoded); the sweep over levels and settings is repeated `rounds` times.
 */
import { join } from "node:path";
import { BatchingEngine } from "../../gpu-backend/src/engine/engine.ts";
import { type LoadedModel, releaseModel, sessionOptions } from "../../gpu-backend/src/engine/model.ts";
import { VisionProcess } from "../../gpu-backend/src/engine/vision-process.ts";
import { childArgs, childDone, childMain, spread } from "../lib/common.ts";
import { type Trace, evalRequest, imageGrid, loadForEngineBench, submitTraced, tokenGaps } from "../lib/traces.ts";

export interface ConcurrencyArgs {
  modelDir: string;
  threads: number;
  maxBatch: number;
  levels: number[];
  tokens: number;
  /** Sweeps over all levels (1,2,4,8,1,2,4,8,…): slow drifts of a shared machine hit every level alike. */
  rounds: number;
  /** The engine's `prefillChunk` per run of a level (0 = the whole prompt in one turn). */
  prefillChunks: number[];
  /** Per run of a level: the vision encoder in its own process (true) or in the engine's thread (false). */
  visionProcesses: boolean[];
  /** The benchmark variant (e.g. int8-w8a8) for progress lines and the result; default the manifest dtype. */
  label?: string;
  /** The probe's image file and max_pixels, instead of the eval image. */
  probeImage?: { path: string; maxPixels: number };
}

export interface LevelResult {
  level: number;
  round: number;
  prefill_chunk: number;
  vision_process: boolean;
  aggregate_decode_tok_s: number;
  window_tokens: number;
  window_ms: number;
  end_to_end_tok_s: number;
  ttft_ms: number[];
  probe_ttft_ms: number;
  /** Longest gap between consecutive tokens of a running stream overlapping the probe's admission; NaN if none ran. */
  probe_stall_ms: number;
  /** Median gap between consecutive tokens over all streams of the level. */
  itl_median_ms: number;
  completion_tokens: number[];
  errors: string[];
}

export interface ConcurrencyResult {
  /** The folder's manifest dtype. */
  dtype: string;
  /** The benchmark variant measured (`label`, else the dtype). */
  variant: string;
  load_ms: number;
  /** The probe's image grid [t, h, w] when `probeImage` was given. */
  probe_grid?: [number, number, number];
  levels: LevelResult[];
  peak_rss_bytes: number;
}

childMain(async () => {
  const a = childArgs<ConcurrencyArgs>();
  const { loaded, model, loadMs } = await loadForEngineBench(a.modelDir, a.threads, a.maxBatch);
  const label = a.label ?? model.dtype;
  process.stderr.write(`  ${label}: loaded in ${(loadMs / 1000).toFixed(1)} s\n`);
  const probeImage = a.probeImage ? await imageGrid(model, a.probeImage.path, a.probeImage.maxPixels) : undefined;
  if (probeImage) process.stderr.write(`  ${label}: probe image grid ${probeImage.grid.join("x")} (${(probeImage.grid[0] * probeImage.grid[1] * probeImage.grid[2]) / 4} image tokens)\n`);

  // The same sessions, with the vision encoder also opened in a process of its own for the settings that ask.
  const apart = a.visionProcesses.includes(true) ? await VisionProcess.open(join(a.modelDir, "vision_encoder.onnx"), sessionOptions({ intraOpThreads: a.threads })) : null;
  const models = new Map<boolean, LoadedModel>([[false, model]]);
  if (apart) models.set(true, { ...model, sessions: { ...model.sessions, vision: apart }, visionProcess: true });
  const levels: LevelResult[] = [];
  for (let round = 0; round < a.rounds; round++) for (const level of a.levels) for (const chunk of a.prefillChunks) for (const visionProcess of a.visionProcesses) {
    const engine = new BatchingEngine(models.get(visionProcess)!, { maxBatch: a.maxBatch, prefillChunk: chunk });
    let probe: { trace: Trace; finished: Promise<void> } | null = null;
    const runs: Array<{ trace: Trace; finished: Promise<void> }> = [];
    const start = performance.now();
    for (let i = 0; i < level; i++) {
      runs.push(
        submitTraced(engine, evalRequest(`L${level}-${i}`, a.tokens + level), () => {
          probe ??= submitTraced(engine, evalRequest(`L${level}-probe`, 1, probeImage));
        }),
      );
    }
    await Promise.all(runs.map((r) => r.finished));
    while (!probe) await new Promise((r) => setTimeout(r, 10));
    await (probe as { finished: Promise<void> }).finished;
    await engine.close();
    const traces = runs.map((r) => r.trace);
    const errors = traces.filter((t) => t.error).map((t) => t.error!);
    const allIn = Math.max(...traces.map((t) => t.tokens[0] ?? Infinity));
    const firstOut = Math.min(...traces.map((t) => t.tokens.at(-1) ?? -Infinity));
    const inWindow = traces.reduce((n, t) => n + t.tokens.slice(1).filter((x) => x > allIn && x <= firstOut).length, 0);
    const windowMs = firstOut - allIn;
    const end = Math.max(...traces.map((t) => t.done));
    const totalTokens = traces.reduce((n, t) => n + t.tokens.length, 0);
    const p = (probe as unknown as { trace: Trace }).trace;
    const admitted = p.tokens[0] ?? p.done;
    let stall = NaN;
    for (const t of traces) {
      for (let i = 1; i < t.tokens.length; i++) {
        const [x, y] = [t.tokens[i - 1]!, t.tokens[i]!];
        if (y > p.submitted && x < admitted) stall = Number.isNaN(stall) ? y - x : Math.max(stall, y - x);
      }
    }
    const r: LevelResult = {
      level,
      round,
      prefill_chunk: chunk,
      vision_process: visionProcess,
      aggregate_decode_tok_s: windowMs > 0 ? inWindow / (windowMs / 1000) : NaN,
      window_tokens: inWindow,
      window_ms: windowMs,
      end_to_end_tok_s: totalTokens / ((end - start) / 1000),
      ttft_ms: traces.map((t) => (t.tokens[0] ?? NaN) - t.submitted),
      probe_ttft_ms: (p.tokens[0] ?? NaN) - p.submitted,
      probe_stall_ms: stall,
      itl_median_ms: spread(tokenGaps(traces)).median,
      completion_tokens: traces.map((t) => t.tokens.length),
      errors,
    };
    levels.push(r);
    process.stderr.write(
      `  ${label}: round ${round + 1}/${a.rounds}, ${level} stream(s), prefill chunk ${chunk || "whole"}${visionProcess ? ", vision process" : ""}: aggregate decode ${r.aggregate_decode_tok_s.toFixed(2)} tok/s, ` +
        `TTFT max ${(Math.max(...r.ttft_ms) / 1000).toFixed(2)} s, probe TTFT ${(r.probe_ttft_ms / 1000).toFixed(2)} s, probe stall ${(stall / 1000).toFixed(2)} s\n`,
    );
  }
  await apart?.release();
  await releaseModel(loaded);
  childDone({ dtype: model.dtype, variant: label, load_ms: loadMs, ...(probeImage ? { probe_grid: probeImage.grid } : {}), levels });
});

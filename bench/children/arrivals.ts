/**
 * Child: open-loop traffic. Requests arrive on a seeded Poisson schedule whatever the server is doing (as
 * clients do), through one `BatchingEngine` per `prefillChunk` setting; every setting gets the same schedule.
 *
 * The rate is set by the offered load: `load` / the time one request takes on an idle engine (measured here
 * after the warm-up), so the same `--load` means the same pressure on a fast and a slow machine.
 *
 * Times are taken from each request's scheduled arrival, not from when this thread got to submit it: the model
 * runs on this thread (as on the backend's engine thread), so an arrival during a forward pass is submitted
 * when the pass ends — where a real request would have waited in the engine's queue all the same.
 */
import { BatchingEngine } from "../../gpu-backend/src/engine/engine.ts";
import { releaseModel } from "../../gpu-backend/src/engine/model.ts";
import { childArgs, childDone, childMain } from "../lib/common.ts";
import { type Trace, evalRequest, loadForEngineBench, submitTraced, tokenGaps } from "../lib/traces.ts";
import { poissonArrivals } from "../lib/workload.ts";

export interface ArrivalsArgs {
  modelDir: string;
  threads: number;
  maxBatch: number;
  /** new tokens per request (EOS ignored) */
  tokens: number;
  /** requests per run */
  arrivals: number;
  /** offered load: arrival rate × one request's idle end-to-end time */
  load: number;
  seed: number;
  /** runs of all settings, interleaved */
  rounds: number;
  /** the engine's `prefillChunk` per run (0 = the whole prompt in one turn) */
  prefillChunks: number[];
  label?: string;
}

export interface ArrivalsRun {
  round: number;
  prefill_chunk: number;
  /** per request, in arrival order: scheduled arrival → first token, and → final event */
  ttft_ms: number[];
  e2e_ms: number[];
  /** every gap between consecutive tokens of every request */
  gaps_ms: number[];
  completion_tokens: number[];
  /** generated tokens / (first arrival → last final event) */
  output_tok_s: number;
  /** mean number of requests in the system (Little: Σ e2e / span) */
  mean_in_system: number;
  /** longest delay between a scheduled arrival and its submission (this thread busy in a forward pass) */
  max_submit_lag_ms: number;
  errors: string[];
}

export interface ArrivalsResult {
  dtype: string;
  variant: string;
  load_ms: number;
  /** one request alone on a warm engine */
  idle_ttft_ms: number;
  idle_e2e_ms: number;
  rate_per_s: number;
  /** the schedule every run used (ms after the first arrival) */
  offsets_ms: number[];
  runs: ArrivalsRun[];
  peak_rss_bytes: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

childMain(async () => {
  const a = childArgs<ArrivalsArgs>();
  const { loaded, model, loadMs } = await loadForEngineBench(a.modelDir, a.threads, a.maxBatch);
  const label = a.label ?? model.dtype;

  // One request alone on the warm model: the idle latency that sets the rate.
  let idle: Trace;
  {
    const engine = new BatchingEngine(model, { maxBatch: a.maxBatch });
    const alone = submitTraced(engine, evalRequest("idle", a.tokens));
    await alone.finished;
    idle = alone.trace;
    await engine.close();
  }
  if (idle.error) throw new Error(`idle request failed: ${idle.error}`);
  const idleE2e = idle.done - idle.submitted;
  const rate = a.load / (idleE2e / 1000);
  const offsets = poissonArrivals(a.arrivals, rate, a.seed);
  process.stderr.write(
    `  ${label}: loaded in ${(loadMs / 1000).toFixed(1)} s; idle request ${(idleE2e / 1000).toFixed(2)} s → ${rate.toFixed(3)} req/s at load ${a.load}, ` +
      `${a.arrivals} arrivals over ${(offsets.at(-1)! / 1000).toFixed(1)} s\n`,
  );

  const runs: ArrivalsRun[] = [];
  for (let round = 0; round < a.rounds; round++) for (const chunk of a.prefillChunks) {
    const engine = new BatchingEngine(model, { maxBatch: a.maxBatch, prefillChunk: chunk });
    const start = performance.now();
    const reqs: Array<{ scheduled: number; trace: Trace; finished: Promise<void> }> = [];
    for (let i = 0; i < offsets.length; i++) {
      const scheduled = start + offsets[i]!;
      const wait = scheduled - performance.now();
      if (wait > 0) await sleep(wait);
      reqs.push({ scheduled, ...submitTraced(engine, evalRequest(`r${round}-${chunk}-${i}`, a.tokens)) });
    }
    await Promise.all(reqs.map((r) => r.finished));
    await engine.close();
    const e2e = reqs.map((r) => r.trace.done - r.scheduled);
    const span = Math.max(...reqs.map((r) => r.trace.done)) - start;
    const completion = reqs.map((r) => r.trace.tokens.length);
    const run: ArrivalsRun = {
      round,
      prefill_chunk: chunk,
      ttft_ms: reqs.map((r) => (r.trace.tokens[0] ?? NaN) - r.scheduled),
      e2e_ms: e2e,
      gaps_ms: tokenGaps(reqs.map((r) => r.trace)),
      completion_tokens: completion,
      output_tok_s: completion.reduce((s, n) => s + n, 0) / (span / 1000),
      mean_in_system: e2e.reduce((s, x) => s + x, 0) / span,
      max_submit_lag_ms: Math.max(...reqs.map((r) => r.trace.submitted - r.scheduled)),
      errors: reqs.filter((r) => r.trace.error).map((r) => r.trace.error!),
    };
    runs.push(run);
    const sorted = [...run.ttft_ms].sort((x, y) => x - y);
    process.stderr.write(
      `  ${label}: round ${round + 1}/${a.rounds}, prefill chunk ${chunk || "whole"}: TTFT median ${(sorted[sorted.length >> 1]! / 1000).toFixed(2)} s, ` +
        `max ${(sorted.at(-1)! / 1000).toFixed(2)} s, longest gap ${(Math.max(0, ...run.gaps_ms) / 1000).toFixed(2)} s, ${run.output_tok_s.toFixed(2)} tok/s\n`,
    );
  }
  await releaseModel(loaded);
  childDone({ dtype: model.dtype, variant: label, load_ms: loadMs, idle_ttft_ms: idle.tokens[0]! - idle.submitted, idle_e2e_ms: idleE2e, rate_per_s: rate, offsets_ms: offsets, runs });
});

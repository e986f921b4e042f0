/**
 * `arrivals`: the serving engine under open-loop traffic — requests arriving on a seeded Poisson schedule at
 * an offered load relative to one idle request's latency — once per prefill-chunk setting, all settings on the
 * same schedule in one child. Reports percentiles of time to first token and end-to-end latency, gaps between
 * tokens, and output tok/s, each as a ratio to the first setting (whole-prompt admission by default).
 */
import type { ArrivalsArgs, ArrivalsResult, ArrivalsRun } from "../children/arrivals.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, log, percentile, runChild, spread, table, finishSuite } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

/** Per prefill-chunk setting: latency percentiles pooled over rounds, rates as medians over rounds. */
export interface ArrivalsSummary {
  prefill_chunk: number;
  ttft_p50_ms: number;
  ttft_p90_ms: number;
  ttft_max_ms: number;
  e2e_p50_ms: number;
  e2e_p90_ms: number;
  gap_p50_ms: number;
  gap_p99_ms: number;
  gap_max_ms: number;
  output_tok_s: number;
  mean_in_system: number;
}

export function summarizeArrivals(runs: ArrivalsRun[], chunks: number[]): ArrivalsSummary[] {
  return chunks.map((chunk) => {
    const rs = runs.filter((r) => r.prefill_chunk === chunk);
    const ttft = rs.flatMap((r) => r.ttft_ms);
    const e2e = rs.flatMap((r) => r.e2e_ms);
    const gaps = rs.flatMap((r) => r.gaps_ms);
    return {
      prefill_chunk: chunk,
      ttft_p50_ms: percentile(ttft, 50),
      ttft_p90_ms: percentile(ttft, 90),
      ttft_max_ms: percentile(ttft, 100),
      e2e_p50_ms: percentile(e2e, 50),
      e2e_p90_ms: percentile(e2e, 90),
      gap_p50_ms: percentile(gaps, 50),
      gap_p99_ms: percentile(gaps, 99),
      gap_max_ms: percentile(gaps, 100),
      output_tok_s: spread(rs.map((r) => r.output_tok_s)).median,
      mean_in_system: spread(rs.map((r) => r.mean_in_system)).median,
    };
  });
}

export async function arrivalsSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.arrivalsDtypes);
  const results: ArrivalsResult[] = [];
  const summaries: Record<string, ArrivalsSummary[]> = {};
  let text = "";
  for (const [dtype, dir] of variants) {
    const args: ArrivalsArgs = {
      modelDir: dir,
      threads: opts.threads,
      maxBatch: opts.maxBatch,
      tokens: opts.tokens,
      arrivals: opts.arrivals,
      load: opts.load,
      seed: opts.seed,
      rounds: opts.rounds,
      prefillChunks: opts.prefillChunks,
      label: dtype,
    };
    log(`arrivals: ${dtype}, ${opts.arrivals} Poisson arrivals at load ${opts.load} (seed ${opts.seed}) × prefill chunks ${opts.prefillChunks.join(",")} × ${opts.rounds} round(s), ${opts.tokens} tokens each`);
    try {
      const { result } = await runChild<ArrivalsResult>("arrivals.ts", args, { timeoutS: opts.childTimeoutS });
      results.push(result);
      const per = summarizeArrivals(result.runs, opts.prefillChunks);
      summaries[dtype] = per;
      const base = per[0]!;
      const ratio = (x: number, b: number) => `×${fmt(x / b, 2)}`;
      const rows = [["prefill chunk", "TTFT p50 ms", "p90", "max", "× first", "e2e p50 ms", "p90", "gap p50 ms", "p99", "max", "× first", "tok/s", "in system"]];
      for (const s of per) {
        rows.push([
          s.prefill_chunk === 0 ? "whole" : String(s.prefill_chunk),
          fmt(s.ttft_p50_ms, 0),
          fmt(s.ttft_p90_ms, 0),
          fmt(s.ttft_max_ms, 0),
          ratio(s.ttft_p90_ms, base.ttft_p90_ms),
          fmt(s.e2e_p50_ms, 0),
          fmt(s.e2e_p90_ms, 0),
          fmt(s.gap_p50_ms, 0),
          fmt(s.gap_p99_ms, 0),
          fmt(s.gap_max_ms, 0),
          ratio(s.gap_p99_ms, base.gap_p99_ms),
          fmt(s.output_tok_s, 2),
          fmt(s.mean_in_system, 2),
        ]);
      }
      text +=
        `\narrivals ${dtype} (${models.size}, maxBatch ${opts.maxBatch}, ${opts.threads} threads; idle request ${fmt(result.idle_e2e_ms / 1000, 2)} s → ` +
        `${fmt(result.rate_per_s, 3)} req/s at load ${opts.load}, ${opts.arrivals} arrivals × ${opts.rounds} round(s); peak RSS ${fmtBytes(result.peak_rss_bytes)})\n${table(rows)}\n`;
      const errs = result.runs.flatMap((r) => r.errors);
      if (errs.length) text += `errors: ${errs.join("; ")}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  text +=
    "TTFT and e2e from each request's scheduled arrival; gap = between consecutive tokens of a request (p99/max: the stalls arrivals cause); " +
    "× first = ratio to the first prefill-chunk setting; tok/s = all generated tokens / (first arrival → last answer); in system = mean requests in flight\n";
  return finishSuite(opts, "arrivals", text, { machine, size: models.size, failures }, { results, summaries });
}

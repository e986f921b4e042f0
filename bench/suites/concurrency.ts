/**
 * `concurrency`: aggregate decode tok/s and TTFT with 1, 2, 4, 8 simultaneous requests through the
 * BatchingEngine (maxBatch 8), each dtype in its own child, each level once per prefill-chunk setting; every
 * level is printed as a ratio to 1 stream, and an arrival's stall of the running streams next to their usual
 * gap between tokens.
 */
import type { ConcurrencyArgs, ConcurrencyResult } from "../children/concurrency.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, fmtSpread, log, runChild, spread, table, finishSuite } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

export async function concurrencySuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.dtypes);
  const results: ConcurrencyResult[] = [];
  const summaries: Record<string, unknown> = {};
  let text = "";
  for (const [dtype, dir] of variants) {
    log(
      `concurrency: ${dtype}, levels ${opts.levels.join(",")} × prefill chunks ${opts.prefillChunks.join(",")} × vision process ${opts.visionProcesses.map(Number).join(",")} × ${opts.rounds} round(s), ` +
        `maxBatch ${opts.maxBatch}, ${opts.tokens}+L tokens each`,
    );
    const args: ConcurrencyArgs = {
      modelDir: dir,
      threads: opts.threads,
      maxBatch: opts.maxBatch,
      levels: opts.levels,
      tokens: opts.tokens,
      rounds: opts.rounds,
      prefillChunks: opts.prefillChunks,
      visionProcesses: opts.visionProcesses,
      label: dtype,
      ...(opts.probeImage ? { probeImage: { path: opts.probeImage, maxPixels: opts.probeMaxPixels } } : {}),
    };
    try {
      const { result } = await runChild<ConcurrencyResult>("concurrency.ts", args, { timeoutS: opts.childTimeoutS });
      results.push(result);
      // Per level and setting: medians over rounds (TTFTs pooled over rounds).
      const per = opts.levels.flatMap((level) =>
        opts.prefillChunks.flatMap((chunk) => opts.visionProcesses.map((vt) => {
          const ls = result.levels.filter((l) => l.level === level && l.prefill_chunk === chunk && l.vision_process === vt);
          return {
            level,
            chunk,
            vt,
            agg: spread(ls.map((l) => l.aggregate_decode_tok_s)),
            ttft: spread(ls.flatMap((l) => l.ttft_ms)),
            probe: spread(ls.map((l) => l.probe_ttft_ms)),
            stall: spread(ls.map((l) => l.probe_stall_ms)),
            itl: spread(ls.map((l) => l.itl_median_ms)),
            e2e: spread(ls.map((l) => l.end_to_end_tok_s)),
          };
        })),
      );
      summaries[dtype] = per;
      const rows = [["streams", "prefill chunk", "vision", "agg decode tok/s", "× 1 stream", "per-stream tok/s", "TTFT median ms", "TTFT max ms", "probe TTFT ms", "× idle", "probe stall ms", "ITL median ms", "e2e tok/s"]];
      for (const l of per) {
        const base = per.find((x) => x.level === 1 && x.chunk === l.chunk && x.vt === l.vt) ?? per[0]!;
        rows.push([
          String(l.level),
          l.chunk === 0 ? "whole" : String(l.chunk),
          l.vt ? "own process" : "engine's",
          opts.rounds > 1 ? fmtSpread(l.agg, 2) : fmt(l.agg.median, 2),
          `×${fmt(l.agg.median / base.agg.median, 2)}`,
          fmt(l.agg.median / l.level, 2),
          fmt(l.ttft.median, 0),
          fmt(l.ttft.max, 0),
          fmt(l.probe.median, 0),
          `×${fmt(l.probe.median / base.probe.median, 2)}`,
          fmt(l.stall.median, 0),
          fmt(l.itl.median, 0),
          fmt(l.e2e.median, 2),
        ]);
      }
      const baseTtft = (per.find((l) => l.level === 1) ?? per[0]!).ttft.median;
      text += `\nconcurrency ${dtype} (${models.size}, maxBatch ${opts.maxBatch}, ${opts.threads} threads, ${opts.rounds} round(s)${opts.rounds > 1 ? ", median (min–max)" : ""}; peak RSS ${fmtBytes(result.peak_rss_bytes)}; idle TTFT ${fmt(baseTtft, 0)} ms)\n${table(rows)}\n`;
      const errs = result.levels.flatMap((l) => l.errors);
      if (errs.length) text += `errors: ${errs.join("; ")}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  text +=
    "agg decode = tokens in the window where all streams decode together; probe = a request arriving when the first stream finishes; " +
    "probe stall = the longest gap between two tokens of a running stream during the probe's admission; ITL = gap between tokens; " +
    "prefill chunk = the engine's prefillChunk (whole: the prompt in one turn); vision = where the encoder runs (the engine's visionProcess); e2e = all tokens / wall time incl. prefills\n";
  return finishSuite(opts, "concurrency", text, { machine, size: models.size, failures }, { results, summaries });
}

/**
 * `concurrency`: aggregate decode tok/s and TTFT with 1, 2, 4, 8 simultaneous requests through the
 * BatchingEngine (maxBatch 8), each dtype in its own child; every level is printed as a ratio to 1 stream.
 */
import type { ConcurrencyArgs, ConcurrencyResult } from "../children/concurrency.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, fmtSpread, log, runChild, spread, table, writeResult } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

export async function concurrencySuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.dtypes);
  const results: ConcurrencyResult[] = [];
  const summaries: Record<string, unknown> = {};
  let text = "";
  for (const [dtype, dir] of variants) {
    log(`concurrency: ${dtype}, levels ${opts.levels.join(",")} × ${opts.rounds} round(s), maxBatch ${opts.maxBatch}, ${opts.tokens}+L tokens each`);
    const args: ConcurrencyArgs = { modelDir: dir, threads: opts.threads, maxBatch: opts.maxBatch, levels: opts.levels, tokens: opts.tokens, rounds: opts.rounds, label: dtype };
    try {
      const { result } = await runChild<ConcurrencyResult>("concurrency.ts", args, { timeoutS: opts.childTimeoutS });
      results.push(result);
      // Per level: medians over rounds (TTFTs pooled over rounds).
      const per = opts.levels.map((level) => {
        const ls = result.levels.filter((l) => l.level === level);
        return {
          level,
          agg: spread(ls.map((l) => l.aggregate_decode_tok_s)),
          ttft: spread(ls.flatMap((l) => l.ttft_ms)),
          probe: spread(ls.map((l) => l.probe_ttft_ms)),
          e2e: spread(ls.map((l) => l.end_to_end_tok_s)),
        };
      });
      summaries[dtype] = per;
      const base = per.find((l) => l.level === 1) ?? per[0]!;
      const baseTtft = base.ttft.median;
      const rows = [["streams", "agg decode tok/s", "× 1 stream", "per-stream tok/s", "TTFT median ms", "TTFT max ms", "probe TTFT ms", "× idle", "e2e tok/s"]];
      for (const l of per) {
        rows.push([
          String(l.level),
          opts.rounds > 1 ? fmtSpread(l.agg, 2) : fmt(l.agg.median, 2),
          `×${fmt(l.agg.median / base.agg.median, 2)}`,
          fmt(l.agg.median / l.level, 2),
          fmt(l.ttft.median, 0),
          fmt(l.ttft.max, 0),
          fmt(l.probe.median, 0),
          `×${fmt(l.probe.median / base.probe.median, 2)}`,
          fmt(l.e2e.median, 2),
        ]);
      }
      text += `\nconcurrency ${dtype} (${models.size}, maxBatch ${opts.maxBatch}, ${opts.threads} threads, ${opts.rounds} round(s)${opts.rounds > 1 ? ", median (min–max)" : ""}; peak RSS ${fmtBytes(result.peak_rss_bytes)}; idle TTFT ${fmt(baseTtft, 0)} ms)\n${table(rows)}\n`;
      const errs = result.levels.flatMap((l) => l.errors);
      if (errs.length) text += `errors: ${errs.join("; ")}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  text += "agg decode = tokens in the window where all streams decode together; probe = a request arriving when the first stream finishes; e2e = all tokens / wall time incl. prefills\n";
  for (const [d, why] of Object.entries(failures)) text += `${d}: not measured — ${why}\n`;
  process.stdout.write(text);
  const body = { suite: "concurrency", created: new Date().toISOString(), machine, options: opts, size: models.size, results, summaries, failures };
  return { file: writeResult(opts, "concurrency", body), body };
}

/**
 * `bandwidth`: the machine's memory read bandwidth (measured in this run, before and after the decode runs),
 * and each dtype's single-stream decode speed as a fraction of the bandwidth bound
 * `bandwidth / bytes of decoder weights read per token` (the decoder graph's file bytes: every weight is read
 * once per generated token; the KV cache of ~200 tokens adds < 1 % and is left out).
 */
import { type BenchOptions, type Dtype, childErrorText, fmt, fmtBytes, fmtSpread, log, spread, table, finishSuite } from "../lib/common.ts";
import { type BandwidthResult, measureBandwidth } from "../lib/bandwidth.ts";
import { graphBytes, prepareVariants } from "../lib/models.ts";
import { runOurs } from "./single.ts";

export async function bandwidthSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.dtypes);
  const reps = opts.quick ? 2 : 5;
  const measure = async (label: string) => {
    const r: BandwidthResult[] = [];
    for (const threads of [...new Set([1, opts.threads])]) {
      log(`bandwidth (${label}): ${threads} thread(s), ${opts.bandwidthMiB} MiB, best of ${reps}`);
      r.push(await measureBandwidth({ mib: opts.bandwidthMiB, threads, reps }));
    }
    return r;
  };
  const before = await measure("before");
  const rows: Record<string, unknown>[] = [];
  for (const [dtype, dir] of variants) {
    log(`bandwidth: decode ${dtype} (${opts.runs} runs × ${opts.tokens} tokens)`);
    try {
      const r = await runOurs(opts, dir, opts.tokens, opts.runs, dtype);
      rows.push({ dtype, decoder_bytes: graphBytes(dir).decoder, decode_tok_s: spread(r.runs.map((x) => x.decode_tok_s)), decode_step_ms: spread(r.runs.map((x) => x.decode_step_ms_median)), peak_rss_bytes: r.peak_rss_bytes });
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  const after = await measure("after");
  const bw = Math.max(...[...before, ...after].map((b) => b.best_bytes_per_s));
  const out: string[][] = [["dtype", "decoder bytes", "bound tok/s", "decode tok/s", "fraction", "decoder-step fraction"]];
  for (const r of rows as Array<{ dtype: Dtype; decoder_bytes: number; decode_tok_s: ReturnType<typeof spread>; decode_step_ms: ReturnType<typeof spread> }>) {
    const bound = bw / r.decoder_bytes;
    const stepTokS = 1000 / r.decode_step_ms.median;
    Object.assign(r, { bound_tok_s: bound, fraction: r.decode_tok_s.median / bound, decoder_step_tok_s: stepTokS, decoder_step_fraction: stepTokS / bound });
    out.push([r.dtype, fmtBytes(r.decoder_bytes), fmt(bound, 2), fmtSpread(r.decode_tok_s, 2), `${fmt((100 * r.decode_tok_s.median) / bound, 0)} %`, `${fmt((100 * stepTokS) / bound, 0)} %`]);
  }
  const bwRows = [["when", "threads", "memchr GB/s", "JS f64 sum GB/s"], ...[...before.map((b) => ["before", b] as const), ...after.map((b) => ["after", b] as const)].map(([w, b]) => [w, String(b.threads), fmt(b.memchr_bytes_per_s / 1e9, 2), fmt(b.f64sum_bytes_per_s / 1e9, 2)])];
  let text = `\nmemory read bandwidth (${fmtBytes(before[0]!.buffer_bytes)} buffer, best of ${reps})\n${table(bwRows)}\nbound uses the best: ${fmt(bw / 1e9, 2)} GB/s\n`;
  text += `\ndecode vs the bandwidth bound (${models.size}, ${opts.threads} threads; decode tok/s between token callbacks, decoder-step = the decoder run alone)\n${table(out)}\n`;
  return finishSuite(opts, "bandwidth", text, { machine, size: models.size, failures }, { bandwidth: { before, after, bound_bytes_per_s: bw }, decode: rows });
}

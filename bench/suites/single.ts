/**
 * `single`: one stream, the MedVLM-R1 eval prompt, per dtype in its own child process (load time, vision,
 * TTFT, decode tok/s, peak RSS), and transformers.js on our fp32 files in the same run as the peer:
 * ours/theirs for TTFT and decode tok/s, and what they make of an answer of MedVLM-R1's length.
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { RunSample, SingleArgs, SingleResult } from "../children/single.ts";
import type { TjsArgs, TjsResult } from "../children/tjs.ts";
import { type BenchOptions, type Dtype, type Spread, childErrorText, fmt, fmtBytes, fmtSpread, log, runChild, spread, table, finishSuite } from "../lib/common.ts";
import { graphBytes, prepareVariants } from "../lib/models.ts";
import { RECORDED_OUTPUT_TOKENS, evalPrompt, forcedIds } from "../lib/workload.ts";

export interface SingleSummary {
  load_s: number;
  vision_ms: Spread;
  preprocess_ms: Spread;
  prefill_ms: Spread;
  ttft_ms: Spread;
  decode_tok_s: Spread;
  /** The decoder step alone (ORT call; ours includes the 1-token embedding call). */
  decode_step_ms: Spread;
  cold_ttft_ms: number;
  peak_rss_bytes: number;
}

export function summarize(r: SingleResult | TjsResult): SingleSummary {
  const runs = r.runs ?? [];
  return {
    load_s: (r.load_ms ?? NaN) / 1000,
    vision_ms: spread(runs.map((x) => x.vision_ms)),
    preprocess_ms: spread(runs.map((x) => x.preprocess_ms)),
    prefill_ms: spread(runs.map((x) => x.prefill_ms)),
    ttft_ms: spread(runs.map((x) => x.ttft_ms)),
    decode_tok_s: spread(runs.map((x) => x.decode_tok_s)),
    decode_step_ms: spread(runs.map((x) => x.decode_step_ms_median)),
    cold_ttft_ms: r.cold?.ttft_ms ?? NaN,
    peak_rss_bytes: r.peak_rss_bytes ?? NaN,
  };
}

/**
 * Seconds to a whole answer of `tokens` tokens, from the medians: the first token at TTFT, the rest at the decode rate.
 * MedVLM-R1's answers are short (its published one: {@link RECORDED_OUTPUT_TOKENS} tokens), so the first token weighs
 * about as much as all the others.
 */
export function answerSeconds(s: Pick<SingleSummary, "ttft_ms" | "decode_tok_s">, tokens: number): number {
  return s.ttft_ms.median / 1000 + (tokens - 1) / s.decode_tok_s.median;
}

/** Several children's results as one: all timed runs, median load time, highest peak RSS, the first's warm-up. */
export function mergeRuns<T extends { runs?: RunSample[]; load_ms?: number; peak_rss_bytes?: number }>(list: T[]): T {
  return {
    ...list[0]!,
    runs: list.flatMap((r) => r.runs ?? []),
    load_ms: spread(list.map((r) => r.load_ms ?? NaN)).median,
    peak_rss_bytes: Math.max(...list.map((r) => r.peak_rss_bytes ?? NaN)),
  };
}

/** Leading positions where two id lists agree. */
export function agreeingPrefix(a: number[] | undefined, b: number[] | undefined): number {
  if (!a || !b) return 0;
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

/** Runs one variant (`label`, e.g. int8-w8a8) through our engine in a child. */
export async function runOurs(opts: BenchOptions, modelDir: string, tokens: number, runs: number, label?: string): Promise<SingleResult> {
  const p = evalPrompt();
  const args: SingleArgs = {
    modelDir,
    threads: opts.threads,
    runs,
    forcedIds: forcedIds(tokens),
    warmupTokens: Math.min(8, tokens),
    messages: p.messages,
    baseDir: p.baseDir,
    ...(label ? { label } : {}),
  };
  return (await runChild<SingleResult>("single.ts", args, { timeoutS: opts.childTimeoutS })).result;
}

export async function singleSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  // transformers.js runs on our fp32 files, next to our fp32 (the ratio needs both).
  const want: Dtype[] = opts.noTjs || opts.dtypes.includes("fp32") ? opts.dtypes : ["fp32", ...opts.dtypes];
  const { machine, models, variants, failures } = await prepareVariants(opts, want);
  const p = evalPrompt();
  const ours: Partial<Record<Dtype, SingleResult>> = {};
  let tjs: TjsResult | null = null;
  const pairRatios: Array<{ ttft: number; decode_tok_s: number }> = [];
  for (const [dtype, dir] of variants) {
    if (dtype !== "fp32" || opts.noTjs) {
      log(`single: ours ${dtype} (${opts.runs} runs × ${opts.tokens} forced tokens, ${opts.threads} threads)`);
      try {
        ours[dtype] = await runOurs(opts, dir, opts.tokens, opts.runs, dtype);
      } catch (e) {
        failures[dtype] = childErrorText(e);
      }
      continue;
    }
    // fp32 against transformers.js: interleaved pairs (ours, theirs, ours, theirs, …), one timed run per child
    // after its warm-up, so that the machine's slow drifts hit both sides alike; ratios are taken per pair.
    log(`single: fp32, ours vs transformers.js ${machine.transformers_js_version ?? "?"} on the same files, ${opts.runs} interleaved pairs`);
    const workDir = join(opts.cache, `tjs-work-${process.pid}`);
    mkdirSync(workDir, { recursive: true });
    const oursRuns: SingleResult[] = [];
    const theirRuns: TjsResult[] = [];
    try {
      for (let i = 0; i < opts.runs; i++) {
        const o = await runOurs(opts, dir, opts.tokens, 1, "fp32");
        oursRuns.push(o);
        let t: TjsResult;
        try {
          const args: TjsArgs = {
            modelDir: dir,
            workDir,
            threads: opts.threads,
            runs: 1,
            forcedIds: forcedIds(opts.tokens),
            warmupTokens: Math.min(8, opts.tokens),
            promptText: p.promptText,
            imagePath: p.imagePath,
          };
          t = (await runChild<TjsResult>("tjs.ts", args, { timeoutS: opts.childTimeoutS })).result;
        } catch (e) {
          t = { ok: false, layout: [], adaptations: [], error: { stage: "child", message: childErrorText(e) } };
        }
        theirRuns.push(t);
        if (!t.ok) break;
        pairRatios.push({ ttft: o.runs[0]!.ttft_ms / t.runs![0]!.ttft_ms, decode_tok_s: o.runs[0]!.decode_tok_s / t.runs![0]!.decode_tok_s });
      }
    } catch (e) {
      failures.fp32 = childErrorText(e);
    } finally {
      rmSync(workDir, { recursive: true, force: true });
    }
    if (oursRuns.length) ours.fp32 = mergeRuns(oursRuns);
    const failed = theirRuns.find((t) => !t.ok);
    tjs = failed ?? (theirRuns.length ? mergeRuns(theirRuns as Array<TjsResult & { runs: RunSample[]; cold: RunSample; load_ms: number }>) : null);
  }

  const summaries = Object.fromEntries(Object.entries(ours).map(([d, r]) => [d, summarize(r)])) as Partial<Record<Dtype, SingleSummary>>;
  const tjsSummary = tjs?.ok ? summarize(tjs) : null;
  const fp32 = summaries.fp32;
  const rows: string[][] = [["stack", "load s", "vision ms", "TTFT ms", "decode tok/s", "step ms", "cold TTFT ms", "peak RSS", "decoder bytes", "vs fp32 tok/s"]];
  const row = (stack: string, s: SingleSummary, decoder: string, vsFp32: string) => [
    stack,
    fmt(s.load_s, 1),
    fmtSpread(s.vision_ms, 0),
    fmtSpread(s.ttft_ms, 0),
    fmtSpread(s.decode_tok_s, 2),
    fmt(s.decode_step_ms.median, 0),
    fmt(s.cold_ttft_ms, 0),
    fmtBytes(s.peak_rss_bytes),
    decoder,
    vsFp32,
  ];
  for (const [d, s] of Object.entries(summaries) as [Dtype, SingleSummary][]) {
    const decoder = fmtBytes(models.available[d] ? graphBytes(models.available[d]!).decoder : NaN);
    rows.push(row(`ours ${d}`, s, decoder, fp32 ? `×${fmt(s.decode_tok_s.median / fp32.decode_tok_s.median, 2)}` : "—"));
  }
  if (tjsSummary) rows.push(row("transformers.js fp32", tjsSummary, "", ""));
  const ratios =
    fp32 && tjsSummary
      ? {
          /** median over interleaved pairs of ours/theirs */
          ttft_ours_over_theirs: spread(pairRatios.map((r) => r.ttft)).median,
          decode_tok_s_ours_over_theirs: spread(pairRatios.map((r) => r.decode_tok_s)).median,
          pairs: pairRatios,
          /** the same from medians of each side */
          ttft_medians_ratio: fp32.ttft_ms.median / tjsSummary.ttft_ms.median,
          decode_tok_s_medians_ratio: fp32.decode_tok_s.median / tjsSummary.decode_tok_s.median,
          decode_tok_s_best_ratio: fp32.decode_tok_s.max / tjsSummary.decode_tok_s.max,
          load_ours_over_theirs: fp32.load_s / tjsSummary.load_s,
          peak_rss_ours_over_theirs: fp32.peak_rss_bytes / tjsSummary.peak_rss_bytes,
        }
      : null;
  const parity = {
    transformers_js_vs_ours_fp32:
      tjs?.ok && ours.fp32
        ? { agreeing_prefix: agreeingPrefix(ours.fp32.argmax_ids, tjs.argmax_ids), of: Math.min(ours.fp32.argmax_ids.length, tjs.argmax_ids?.length ?? 0), ours: ours.fp32.argmax_ids, theirs: tjs.argmax_ids }
        : null,
    dtypes_vs_fp32: Object.fromEntries(
      (Object.entries(ours) as [Dtype, SingleResult][]).filter(([d]) => d !== "fp32" && ours.fp32).map(([d, r]) => [d, { agreeing_prefix: agreeingPrefix(ours.fp32!.argmax_ids, r.argmax_ids), of: r.argmax_ids.length }]),
    ),
  };
  let out = `\nsingle stream (${models.size}; step ms = median decoder step alone; eval prompt: ${p.promptTokens} prompt tokens, ${p.imageTokens} image tokens; ${opts.tokens} forced tokens; ${opts.threads} threads; median (min–max) of ${opts.runs} runs)\n${table(rows)}\n`;
  if (ratios) {
    const pr = (k: "ttft" | "decode_tok_s") => ratios.pairs.map((x) => fmt(x[k], 2)).join(", ");
    out +=
      `ours/transformers.js (fp32, same files, same run, median of ${ratios.pairs.length} interleaved pairs): ` +
      `TTFT ×${fmt(ratios.ttft_ours_over_theirs, 2)} [${pr("ttft")}] (lower is better), decode tok/s ×${fmt(ratios.decode_tok_s_ours_over_theirs, 2)} [${pr("decode_tok_s")}] (higher is better); ` +
      `best-run decode ×${fmt(ratios.decode_tok_s_best_ratio, 2)}; load ×${fmt(ratios.load_ours_over_theirs, 2)}, peak RSS ×${fmt(ratios.peak_rss_ours_over_theirs, 2)}\n`;
  }
  const answer = {
    tokens: RECORDED_OUTPUT_TOKENS,
    seconds: Object.fromEntries([
      ...Object.entries(summaries).map(([d, s]) => [`ours ${d}`, answerSeconds(s, RECORDED_OUTPUT_TOKENS)]),
      ...(tjsSummary ? [["transformers.js fp32", answerSeconds(tjsSummary, RECORDED_OUTPUT_TOKENS)]] : []),
    ]) as Record<string, number>,
  };
  const tjsAnswer = answer.seconds["transformers.js fp32"];
  out +=
    `a whole answer of MedVLM-R1's length (${answer.tokens} tokens, its published answer; TTFT + ${answer.tokens - 1} tokens at the median decode rate): ` +
    Object.entries(answer.seconds)
      .map(([k, v]) => `${k} ${fmt(v, 2)} s${tjsAnswer && !k.startsWith("transformers") ? ` (×${fmt(v / tjsAnswer, 2)})` : ""}`)
      .join(", ") +
    "\n";
  if (parity.transformers_js_vs_ours_fp32) out += `greedy argmax agreement ours fp32 vs transformers.js: ${parity.transformers_js_vs_ours_fp32.agreeing_prefix}/${parity.transformers_js_vs_ours_fp32.of} steps\n`;
  for (const [d, v] of Object.entries(parity.dtypes_vs_fp32)) out += `greedy argmax agreement ${d} vs fp32: ${v.agreeing_prefix}/${v.of} steps\n`;
  if (tjs && !tjs.ok) out += `transformers.js could not run on our files (${tjs.error?.stage}): ${tjs.error?.message}\n`;
  if (tjs?.adaptations.length) out += `transformers.js layout adaptations: ${tjs.adaptations.join("; ")}\n`;
  return finishSuite(opts, "single", out, { machine, size: models.size, failures }, {
    workload: { prompt_tokens: p.promptTokens, image_tokens: p.imageTokens, forced_tokens: opts.tokens, image: p.imagePath },
    models: models.steps,
    ours,
    summaries,
    transformers_js: tjs,
    transformers_js_summary: tjsSummary,
    ratios,
    answer,
    parity,
  });
}

/**
 * `draft`: speculative decoding (the engine's `DRAFT_TOKENS`) per variant, one sequence: what a decoder pass
 * over 1 + k tokens costs against a one-token step, decode tokens/s with prompt-lookup drafts of k tokens
 * (at most; the engine adapts the size) against none on a best-case text, a mixed one and MedVLM-R1's one published
 * answer replayed (same run, interleaved), and — since random test weights cannot say how often MedVLM-R1's own text
 * is drafted right in general — the speedup drafts of exactly k tokens give at a range of acceptance rates, from the
 * measured pass costs. Default variants: int4 and int8-w8a8.
 */
import type { DraftArgs, DraftResult } from "../children/draft.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, log, runChild, table, finishSuite } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

/** Per-token acceptance rates of the derived table. */
export const ACCEPTANCE_RATES = [0.3, 0.5, 0.7, 0.9] as const;

/**
 * Tokens one pass yields with a draft of `k` tokens when each draft token is right with probability `p`,
 * independently of the others: the accepted prefix plus the model's own next token, 1 + p + … + p^k.
 */
export function expectedTokensPerPass(k: number, p: number): number {
  let sum = 0;
  for (let i = 0; i <= k; i++) sum += p ** i;
  return sum;
}

export async function draftSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.draftDtypes);
  const results: DraftResult[] = [];
  let text = "";
  for (const [dtype, dir] of variants) {
    const args: DraftArgs = { modelDir: dir, threads: opts.threads, draftTokens: opts.draftTokens, tokens: opts.tokens, runs: opts.runs, label: dtype };
    log(`draft: ${dtype}, drafts of ${args.draftTokens.join(",")} tokens, ${args.tokens} tokens × ${args.runs} run(s)`);
    try {
      const { result } = await runChild<DraftResult>("draft.ts", args, { timeoutS: opts.childTimeoutS });
      results.push(result);
      const passRows = [["tokens per pass", "ms (median, min–max)", "× one-token step"]];
      for (const p of result.passes) passRows.push([String(p.tokens), `${fmt(p.ms.median, 1)} (${fmt(p.ms.min, 1)}–${fmt(p.ms.max, 1)})`, `×${fmt(p.ratio, 2)}`]);
      const runRows = [["text", "draft tokens", "decode tok/s (median, min–max)", "× no drafts", "tokens per pass", "draft tokens kept", "same tokens"]];
      for (const r of result.runs) {
        const none = result.runs.find((x) => x.text === r.text && x.draft_tokens === 0)!;
        runRows.push([
          r.text,
          String(r.draft_tokens),
          `${fmt(r.tok_s.median, 2)} (${fmt(r.tok_s.min, 2)}–${fmt(r.tok_s.max, 2)})`,
          `×${fmt(r.tok_s.median / none.tok_s.median, 2)}`,
          fmt(r.tokens_per_pass, 2),
          r.acceptance === null ? "—" : `${fmt(100 * r.acceptance, 0)} %`,
          r.same_tokens ? "yes" : "NO",
        ]);
      }
      const derivedRows = [["draft tokens", "all wrong", ...ACCEPTANCE_RATES.map((p) => `p = ${p}`)]];
      for (const k of opts.draftTokens) {
        const cost = result.passes.find((p) => p.tokens === k + 1)!.ratio;
        derivedRows.push([String(k), `×${fmt(1 / cost, 2)}`, ...ACCEPTANCE_RATES.map((p) => `×${fmt(expectedTokensPerPass(k, p) / cost, 2)}`)]);
      }
      text +=
        `\nSpeculative decoding, ${dtype} (${models.size}, ${opts.threads} threads, eval prompt; peak RSS ${fmtBytes(result.peak_rss_bytes)})\n` +
        `decoder pass by tokens fed (median of ${2 * opts.runs}, interleaved)\n${table(passRows)}\n` +
        `end to end (runGeneration, ${opts.tokens} tokens, median of ${opts.runs} interleaved runs)\n${table(runRows)}\n` +
        `derived: decode speed with drafts of exactly k tokens against none when each draft token is right with probability p (1 + p + … + p^k tokens per pass over the measured pass cost; the engine adapts the size, see Generation.draft)\n${table(derivedRows)}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  text +=
    "greedy: random test weights repeat one token, which prompt lookup drafts right (the best case); sampled: temperature 1 among the 3 likeliest tokens (seed 1), short runs, drafts often wrong;\n" +
    "recorded: MedVLM-R1's published greedy answer to the model card's knee example (its own prompt), replayed: the recorded tokens, drafts by prompt lookup as in serving.\n" +
    "MedVLM-R1's acceptance rate over a whole dataset: npm run eval -- --batch 1 --draft-tokens K (real weights) reports it.\n";
  return finishSuite(opts, "draft", text, { machine, size: models.size, failures }, { results });
}

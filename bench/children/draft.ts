/**
 * Child: speculative decoding on one converted folder (the eval prompt, one sequence, one process):
 *
 * - the decoder pass feeding n tokens (the last token and n − 1 draft tokens, logits for all n) against the
 *   one-token step, interleaved; each pass is rewound to one token, so the context grows by one per pass;
 * - decode tokens/s end to end (`runGeneration`) without drafts and with prompt-lookup drafts of each size,
 *   interleaved, on two texts: greedy (random test weights repeat one token, which the lookup drafts right —
 *   the best case) and sampled (temperature 1 among the 3 likeliest tokens, seeded — short runs, so drafts
 *   are often wrong). Each run checks that the tokens equal the draft-free run's;
 * - the same on MedVLM-R1's own published output (`RECORDED_OUTPUT`, the knee example's prompt), replayed: each
 *   token is the recorded one, the drafts come from prompt lookup as in serving, so the passes and the draft tokens
 *   kept are those the real weights would give if they chose these tokens (greedy decoding does).
 */
import type { ChatMessage } from "../../shared/src/chat-template.ts";
import { DEFAULT_PARAMS, type GenerationParams } from "../../shared/src/wire.ts";
import { Sequence } from "../../gpu-backend/src/engine/generate.ts";
import { loadModel, releaseModel } from "../../gpu-backend/src/engine/model.ts";
import { buildPrompt, createTokenizer } from "../../gpu-backend/src/engine/prompt.ts";
import { runGeneration, type GenerationOptions } from "../../gpu-backend/src/engine/run.ts";
import { childArgs, childDone, childMain, peakRss, spread, type Spread } from "../lib/common.ts";
import { evalPrompt, forcedIds, recordedWorkload } from "../lib/workload.ts";

export interface DraftArgs {
  modelDir: string;
  threads: number;
  /** Draft sizes k to measure (passes of k + 1 tokens). */
  draftTokens: number[];
  /** Tokens generated per end-to-end run. */
  tokens: number;
  /** End-to-end runs per setting, and rounds of pass timings (× 2). */
  runs: number;
  label?: string;
}

export interface PassCost {
  /** Tokens fed in the pass (1: a plain decode step). */
  tokens: number;
  ms: Spread;
  /** Median ms over the one-token step's median. */
  ratio: number;
}

export interface DraftRun {
  text: "greedy" | "sampled" | "recorded";
  /** 0: no drafts. */
  draft_tokens: number;
  /** Decode tokens/s (tokens after the first / decode time), per run. */
  tok_s: Spread;
  /** Tokens per decoder pass, and accepted / proposed draft tokens, over all runs. */
  tokens_per_pass: number;
  acceptance: number | null;
  /** Every run's tokens equal the draft-free run's. */
  same_tokens: boolean;
}

export interface DraftResult {
  dtype: string;
  variant: string;
  passes: PassCost[];
  runs: DraftRun[];
  peak_rss_bytes: number;
}

childMain(async () => {
  const a = childArgs<DraftArgs>();
  const model = await loadModel(a.modelDir, { intraOpThreads: a.threads });
  const label = a.label ?? model.dtype;
  const ep = evalPrompt();
  const prompt = await buildPrompt(model, createTokenizer(model), ep.messages as ChatMessage[], ep.baseDir);
  const ids = forcedIds(64);

  // Pass cost by tokens fed.
  const sizes = [1, ...a.draftTokens.map((k) => k + 1)].filter((n, i, all) => all.indexOf(n) === i).sort((x, y) => x - y);
  const seq = new Sequence(model, prompt);
  await seq.prefill();
  const times = new Map<number, number[]>(sizes.map((n) => [n, []]));
  let next = 0;
  const pass = async (n: number): Promise<number> => {
    const t0 = performance.now();
    await seq.verify(Array.from({ length: n }, (_, j) => ids[(next + j) % ids.length]!));
    const ms = performance.now() - t0;
    seq.rewind(n - 1);
    next++;
    return ms;
  };
  for (const n of sizes) await pass(n); // warm-up: each shape once
  for (let r = 0; r < 2 * a.runs; r++) for (const n of r % 2 ? [...sizes].reverse() : sizes) times.get(n)!.push(await pass(n));
  seq.release();
  const base = spread(times.get(1)!).median;
  const passes: PassCost[] = sizes.map((n) => {
    const ms = spread(times.get(n)!);
    return { tokens: n, ms, ratio: ms.median / base };
  });
  for (const p of passes) process.stderr.write(`  ${label}: pass of ${p.tokens} token(s) ${p.ms.median.toFixed(1)} ms (×${p.ratio.toFixed(2)})\n`);

  // End to end.
  const rec = await recordedWorkload();
  const recPrompt = await buildPrompt(model, createTokenizer(model), rec.messages, rec.baseDir);
  const recIds = [...createTokenizer(model).encode(rec.output), model.meta.eos_token_ids[0]!];
  const texts: Record<DraftRun["text"], { prompt: typeof prompt; params: GenerationParams; opts?: GenerationOptions }> = {
    greedy: { prompt, params: { ...DEFAULT_PARAMS, max_new_tokens: a.tokens } },
    sampled: { prompt, params: { ...DEFAULT_PARAMS, temperature: 1, top_k: 3, top_p: 1, max_new_tokens: a.tokens, seed: 1 } },
    recorded: { prompt: recPrompt, params: { ...DEFAULT_PARAMS, max_new_tokens: recIds.length }, opts: { forcedIds: recIds, forcedDrafts: "lookup" } },
  };
  const settings = [0, ...a.draftTokens];
  const runs: DraftRun[] = [];
  for (const [text, { prompt: input, params, opts }] of Object.entries(texts) as [DraftRun["text"], (typeof texts)[DraftRun["text"]]][]) {
    const acc = settings.map(() => ({ tok_s: [] as number[], passes: 0, tokens: 0, proposed: 0, accepted: 0, same: true }));
    for (let r = 0; r < a.runs; r++) {
      let reference: number[] | null = null;
      for (const [i, k] of settings.entries()) {
        const out = await runGeneration(model, input, params, { ...opts, draftTokens: k });
        const passMs = out.timings.decode_ms_per_pass;
        const n = out.generatedIds.length - 1;
        const s = acc[i]!;
        s.tok_s.push(n / (passMs.reduce((x, y) => x + y, 0) / 1000));
        s.passes += passMs.length;
        s.tokens += n;
        s.proposed += out.drafts.proposed;
        s.accepted += out.drafts.accepted;
        reference ??= out.generatedIds;
        if (out.generatedIds.join() !== reference.join()) s.same = false;
      }
    }
    settings.forEach((k, i) => {
      const s = acc[i]!;
      const run: DraftRun = {
        text,
        draft_tokens: k,
        tok_s: spread(s.tok_s),
        tokens_per_pass: s.tokens / s.passes,
        acceptance: s.proposed > 0 ? s.accepted / s.proposed : null,
        same_tokens: s.same,
      };
      runs.push(run);
      process.stderr.write(`  ${label}: ${text}, drafts of ${k}: ${run.tok_s.median.toFixed(2)} tok/s, ${run.tokens_per_pass.toFixed(2)} tokens per pass\n`);
    });
  }
  await releaseModel(model);
  childDone({ dtype: model.dtype, variant: label, passes, runs, peak_rss_bytes: peakRss() } satisfies DraftResult);
});

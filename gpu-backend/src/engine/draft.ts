/**
 * Drafts for speculative decoding by prompt lookup: the tokens that followed the latest earlier occurrence of
 * the text's last few tokens. Free, and right where a text repeats or quotes its prompt; MedVLM-R1's published
 * answer mostly paraphrases (bench/PERF.md item 16). A draft only proposes: the decoder checks it in one pass and
 * keeps the tokens it would have chosen anyway (`Generation.advance`), so the output is the same with or without it
 * (int4's near-ties aside: see `Sequence.verify`).
 */

/** Options of {@link promptLookupDraft}. */
export interface PromptLookupOptions {
  /** Most tokens drafted. */
  maxTokens: number;
  /** Longest suffix looked up (default 3): longer matches are tried first, as they predict better. */
  maxNgram?: number;
  /**
   * Shortest suffix looked up (default 2). A single-token match (a space, a comma) predicts little, and a wrong
   * draft costs a wider decoder pass.
   */
  minNgram?: number;
}

/**
 * The draft for `context` (prompt ids then generated ids): for n from `maxNgram` down to `minNgram`, the
 * latest earlier position where the last n tokens also occur, and up to `maxTokens` tokens that followed it;
 * empty when none occurs. Where the match is close to the end, the continuation runs into the draft itself, so
 * a repeating text is drafted as repeating on.
 */
export function promptLookupDraft(context: ArrayLike<number>, opts: PromptLookupOptions): number[] {
  const L = context.length;
  const maxTokens = Math.floor(opts.maxTokens);
  if (!(maxTokens > 0)) return [];
  const minN = Math.max(1, opts.minNgram ?? 2);
  for (let n = Math.min(opts.maxNgram ?? 3, L - 1); n >= minN; n--) {
    for (let start = L - n - 1; start >= 0; start--) {
      let k = 0;
      while (k < n && context[start + k] === context[L - n + k]) k++;
      if (k < n) continue;
      // Token i of the draft is what followed the match at the same distance; past the context's end that is
      // the draft's own earlier token (a match close to the end predicts that the text repeats its period).
      const out: number[] = [];
      for (let i = 0; i < maxTokens; i++) {
        const j = start + n + i;
        out.push(j < L ? context[j]! : out[j - L]!);
      }
      return out;
    }
  }
  return [];
}

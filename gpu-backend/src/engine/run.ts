/**
 * One request's generation state on top of a {@link Sequence}: token choice (sampling, or a forced
 * continuation for scoring), incremental detokenization, stop conditions and the request's accounting.
 * The same state is driven one sequence at a time (`runGeneration`, the CLI) or in the engine's batches.
 */
import type { FinishReason } from "../../../shared/src/api.ts";
import type { GenerationParams } from "../../../shared/src/wire.ts";
import { DetokenizerVocab, IncrementalDetokenizer } from "./detokenizer.ts";
import { Sequence, topK, type PromptInput } from "./generate.ts";
import type { LoadedModel } from "./model.ts";
import { promptLookupDraft } from "./draft.ts";
import { createSampler, type Sampler } from "./sampling.ts";
import { StoppingCriteria } from "./stopping.ts";

const vocabs = new WeakMap<LoadedModel, DetokenizerVocab>();

/** The model's detokenizer vocabulary, built once per loaded model. */
export function vocabOf(model: LoadedModel): DetokenizerVocab {
  let v = vocabs.get(model);
  if (!v) {
    v = DetokenizerVocab.fromTokenizerJson(model.tokenizerJson);
    vocabs.set(model, v);
  }
  return v;
}

export interface TokenOut {
  id: number;
  /** Text this token adds to the visible output (may be "" while a character or a possible stop string is pending). */
  text: string;
  index: number;
}

export interface GenerationOptions {
  /** Score this continuation instead of sampling (teacher forcing); generation stops after it. */
  forcedIds?: number[];
  /** Record the top-k `[id, logit]` of every step (for `--forced-ids` and parity checks). */
  topK?: number;
  signal?: AbortSignal;
  /**
   * Speculative decoding: the most draft tokens (prompt lookup, draft.ts) checked per decoder pass; 0 or absent:
   * one token per pass. The tokens are the same either way, int4's near-ties aside (see {@link Generation.advance}).
   */
  draftTokens?: number;
  /**
   * Where a forced continuation's drafts come from: "forced" (default) drafts the continuation itself, which scores
   * it in passes of several tokens; "lookup" drafts by prompt lookup as serving does, so that replaying a recorded
   * output measures what speculative decoding gains on that text.
   */
  forcedDrafts?: "forced" | "lookup";
}

export class Generation {
  readonly seq: Sequence;
  readonly generatedIds: number[] = [];
  readonly steps: { top5: [number, number][] }[] = [];
  text = "";
  finishReason: FinishReason | null = null;
  /** Speculative decoding so far: draft tokens checked, and those accepted. */
  readonly drafts = { proposed: 0, accepted: 0 };
  /**
   * The next draft's size (null before the first): it starts at the caller's maximum, grows by 2 after a pass
   * that kept its whole draft, and after one that did not becomes one more than the draft tokens it kept: the
   * rejection says how far the lookup was right. A text the lookup guesses badly then costs passes of two
   * tokens, not of k + 1 (transformers' schedule, −1 per rejection, took too many wide passes to get there).
   */
  private draftSize: number | null = null;
  private readonly maxNew: number;
  private readonly sampler: Sampler;
  private readonly stop: StoppingCriteria;

  constructor(
    readonly model: LoadedModel,
    readonly prompt: PromptInput,
    readonly params: GenerationParams,
    private readonly opts: GenerationOptions = {},
  ) {
    this.seq = new Sequence(model, prompt, opts.signal);
    this.sampler = createSampler(
      {
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
        repetition_penalty: params.repetition_penalty,
        seed: params.seed,
      },
      { vocabSize: model.config.text.vocab_size },
    );
    if (params.repetition_penalty !== 1) this.sampler.observe(prompt.inputIds);
    const maxNew = opts.forcedIds ? Math.min(params.max_new_tokens, opts.forcedIds.length) : params.max_new_tokens;
    this.maxNew = maxNew;
    this.stop = new StoppingCriteria(
      {
        // A forced continuation is scored to its end, eos included.
        eosTokenIds: opts.forcedIds ? [] : model.meta.eos_token_ids,
        stopStrings: params.stop,
        maxNewTokens: maxNew,
        contextLength: model.config.text.max_position_embeddings,
        promptLength: prompt.inputIds.length,
      },
      new IncrementalDetokenizer(vocabOf(model), { skipSpecialTokens: true }),
    );
  }

  get done(): boolean {
    return this.finishReason !== null;
  }

  /** The last chosen token (what the next decode step feeds). */
  get lastId(): number {
    return this.generatedIds[this.generatedIds.length - 1]!;
  }

  /** Ends the generation from outside (cancel, deadline): the text still held back. */
  abandon(): string {
    this.seq.release();
    return this.stop.finish();
  }

  /**
   * A draft of up to `maxTokens` tokens (fewer after rejected drafts, see {@link draftSize}) to follow
   * {@link lastId}, for {@link advance}: a forced continuation's next tokens (unless `forcedDrafts` is "lookup"),
   * else a prompt lookup over the prompt and the tokens so far. Empty when `maxTokens` is 0, the decoder cannot
   * check drafts, or nothing matches; never longer than the tokens the request may still generate or the context
   * still holds, less the one the pass yields anyway.
   */
  draft(maxTokens: number): number[] {
    if (!(maxTokens > 0) || !this.seq.canVerify) return [];
    this.draftSize = Math.min(this.draftSize ?? maxTokens, maxTokens);
    const room = Math.min(this.draftSize, this.maxNew - this.generatedIds.length - 1, this.seq.contextLeft - 1);
    if (!(room > 0)) return [];
    const forced = this.opts.forcedIds;
    if (forced && this.opts.forcedDrafts !== "lookup") return forced.slice(this.generatedIds.length, this.generatedIds.length + room);
    const context = [...Array.from(this.prompt.inputIds), ...this.generatedIds];
    return promptLookupDraft(context, { maxTokens: room });
  }

  /**
   * One decoder pass, which may yield several tokens (speculative decoding): feeds {@link lastId} and `draft`,
   * then chooses tokens from the pass's logits in order, exactly as {@link accept} does one step at a time,
   * while each choice equals the draft token fed after it; the first that differs, or the one after the whole
   * draft, ends the pass. So the tokens are those step-by-step decoding chooses, sampling included: the sampler
   * sees the same logits in the same order (up to float summation order; int4 differs more, see
   * {@link Sequence.verify}). The rejected draft tokens leave the cache. With an empty draft it is one ordinary
   * step.
   */
  async advance(draft: readonly number[] = []): Promise<TokenOut[]> {
    const rows = await this.seq.verify([this.lastId, ...draft]);
    const out: TokenOut[] = [];
    for (const row of rows) {
      const t = this.accept(row);
      out.push(t);
      if (this.done || out.length > draft.length || t.id !== draft[out.length - 1]) break;
    }
    if (!this.done) this.seq.rewind(rows.length - out.length);
    const accepted = out.length - 1;
    this.drafts.proposed += draft.length;
    this.drafts.accepted += accepted;
    if (draft.length > 0 && this.draftSize !== null) this.draftSize = accepted === draft.length ? this.draftSize + 2 : accepted + 1;
    return out;
  }

  /** Chooses the next token from `logits` and updates text and stop state. */
  accept(logits: Float32Array): TokenOut {
    if (this.opts.topK) this.steps.push({ top5: topK(logits, this.opts.topK) });
    const index = this.generatedIds.length;
    const forced = this.opts.forcedIds;
    const id = forced ? forced[index]! : this.sampler.sample(logits);
    if (forced) this.sampler.observe([id]);
    this.generatedIds.push(id);
    const r = this.stop.step(id);
    if (r.done) {
      this.finishReason = r.finishReason;
      // A scored continuation still needs the distribution after its last token (see runGeneration).
      if (!forced) this.seq.release();
    }
    this.text += r.text;
    return { id, text: r.text, index };
  }
}

export interface RunResult {
  generatedIds: number[];
  text: string;
  finishReason: FinishReason;
  steps: { top5: [number, number][] }[];
  /** `decode_ms_per_pass`: each decoder pass after the prefill (one token each without speculative decoding). */
  timings: { vision_ms: number; prefill_ms: number; decode_ms_per_pass: number[]; total_ms: number };
  /** Speculative decoding: draft tokens checked and accepted ({@link GenerationOptions.draftTokens}). */
  drafts: { proposed: number; accepted: number };
}

/** Generates one sequence start to finish (no batching): the CLI's and the tests' path. */
export async function runGeneration(
  model: LoadedModel,
  prompt: PromptInput,
  params: GenerationParams,
  opts: GenerationOptions & { onToken?: ((t: TokenOut) => void) | undefined } = {},
): Promise<RunResult> {
  const t0 = performance.now();
  const gen = new Generation(model, prompt, params, opts);
  try {
    const first = gen.accept(await gen.seq.prefill());
    opts.onToken?.(first);
    while (!gen.done) for (const out of await gen.advance(gen.draft(opts.draftTokens ?? 0))) opts.onToken?.(out);
    // Scoring a forced continuation: also the distribution after its last token (golden `forced_decode`
    // has forced_ids.length + 1 steps).
    if (opts.forcedIds && opts.topK) gen.steps.push({ top5: topK(await gen.seq.step(gen.lastId), opts.topK) });
  } finally {
    gen.seq.release();
  }
  const t = gen.seq.timings;
  return {
    generatedIds: gen.generatedIds,
    text: gen.text,
    finishReason: gen.finishReason!,
    steps: gen.steps,
    timings: { vision_ms: t.vision_ms, prefill_ms: t.prefill_ms, decode_ms_per_pass: t.decode_ms, total_ms: performance.now() - t0 },
    drafts: { ...gen.drafts },
  };
}

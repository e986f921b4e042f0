/**
 * Speculative decoding (Generation.advance with prompt-lookup drafts, the engine's `draftTokens`) on the
 * config-A test model: the tokens are the golden ones, the teacher-forced logits the golden ones, and seeded
 * sampling gives the same tokens with and without drafts — while the drafts really are checked, accepted and
 * rejected (the test weights generate runs of one token, which prompt lookup drafts right; sampling at
 * temperature 1 makes it wrong).
 */
import { describe, expect, it } from "vitest";
import { DEFAULT_PARAMS, type GenerationParams } from "../../shared/src/wire.ts";
import { BatchingEngine } from "../../gpu-backend/src/engine/engine.ts";
import type { EngineEvent } from "../../gpu-backend/src/engine/engine-types.ts";
import type { LoadedModel } from "../../gpu-backend/src/engine/model.ts";
import { buildPrompt, createTokenizer, type BuiltPrompt } from "../../gpu-backend/src/engine/prompt.ts";
import { Generation, runGeneration } from "../../gpu-backend/src/engine/run.ts";
import type { ChatMessage } from "../../shared/src/chat-template.ts";
import { GOLDEN_DIR, loadGoldenCases, type GoldenCase } from "../support/golden.ts";
import { useTinyModel } from "../support/tiny-model.ts";
import { collect, requestFor, tokenIds } from "../support/engine-requests.ts";

const cases = loadGoldenCases();
const tiny = useTinyModel("engine-spec-");

const promptOf = (m: LoadedModel, c: GoldenCase): Promise<BuiltPrompt> => buildPrompt(m, createTokenizer(m), c.messages as ChatMessage[], GOLDEN_DIR);
const greedy = (c: GoldenCase): GenerationParams => ({ ...DEFAULT_PARAMS, max_new_tokens: c.generated_ids.length });

describe("speculative decoding", () => {
  it("the append decoder returns several positions' logits (logits_to_keep)", () => {
    expect(tiny.model.logitsToKeep).toBe(true);
    expect(tiny.model.sessions.decoder.inputNames).toContain("logits_to_keep");
  });

  it.each([1, 4, 7])("greedy with drafts of up to %i tokens reproduces the golden ids, in fewer decoder passes", async (k) => {
    for (const c of cases) {
      const r = await runGeneration(tiny.model, await promptOf(tiny.model, c), greedy(c), { draftTokens: k });
      expect(r.generatedIds, c.case).toEqual(c.generated_ids);
      expect(r.text).toBe(c.generated_text);
      const passes = r.timings.decode_ms_per_pass.length;
      // Each pass yields one token plus its accepted draft tokens; the first token comes from the prefill.
      expect(passes + r.drafts.accepted).toBe(c.generated_ids.length - 1);
      expect(r.drafts.accepted, c.case).toBeGreaterThan(0);
      expect(passes).toBeGreaterThanOrEqual(Math.ceil((c.generated_ids.length - 1) / (k + 1)));
      expect(passes).toBeLessThan(c.generated_ids.length - 1);
    }
  }, 120_000);

  it("the teacher-forced decode checked in passes of 5 tokens matches the golden top-5 within 1e-4", async () => {
    let worst = 0;
    for (const c of cases) {
      const forced = c.forced_decode;
      const r = await runGeneration(tiny.model, await promptOf(tiny.model, c), DEFAULT_PARAMS, { forcedIds: forced.forced_ids, topK: 5, draftTokens: 4 });
      expect(r.steps).toHaveLength(forced.steps.length);
      r.steps.forEach((s, k) => {
        const want = forced.steps[k]!.top5;
        expect(s.top5.map((p) => p[0]), `${c.case} step ${k}`).toEqual(want.map((p) => p[0]));
        for (let i = 0; i < 5; i++) worst = Math.max(worst, Math.abs(s.top5[i]![1] - want[i]![1]));
      });
      // A forced continuation is its own draft: every draft token is kept.
      expect(r.drafts.accepted).toBe(r.drafts.proposed);
      expect(r.drafts.accepted).toBeGreaterThan(0);
    }
    expect(worst).toBeLessThanOrEqual(1e-4);
  }, 120_000);

  it("a forced continuation drafted by lookup (a recorded output replayed): the same tokens and logits, its drafts checked like serving's", async () => {
    const c = cases[0]!;
    const prompt = await promptOf(tiny.model, c);
    // A stretch of the prompt (which the lookup finds once its first tokens are out), then the model's own text.
    const forced = [...Array.from(prompt.inputIds).slice(-40, -20), ...c.generated_ids.slice(0, 8)];
    const params = { ...DEFAULT_PARAMS, max_new_tokens: 64 };
    const scored = await runGeneration(tiny.model, prompt, params, { forcedIds: forced, topK: 5, draftTokens: 4 });
    const replay = await runGeneration(tiny.model, prompt, params, { forcedIds: forced, topK: 5, draftTokens: 4, forcedDrafts: "lookup" });
    expect(replay.generatedIds).toEqual(forced);
    expect(scored.drafts.accepted).toBe(scored.drafts.proposed);
    expect(replay.drafts.accepted).toBeGreaterThan(0);
    expect(replay.drafts.proposed).toBeGreaterThan(replay.drafts.accepted);
    // Passes after the prefill: one per token but the first, less the draft tokens kept, plus the step scored after the last.
    expect(replay.timings.decode_ms_per_pass.length + replay.drafts.accepted).toBe(forced.length);
    expect(replay.timings.decode_ms_per_pass.length).toBeGreaterThan(scored.timings.decode_ms_per_pass.length);
    replay.steps.forEach((s, k) => {
      const want = scored.steps[k]!.top5;
      expect(s.top5.map((p) => p[0]), `step ${k}`).toEqual(want.map((p) => p[0]));
      for (let i = 0; i < 5; i++) expect(Math.abs(s.top5[i]![1] - want[i]![1])).toBeLessThanOrEqual(1e-4);
    });
  }, 120_000);

  it("a wrong draft yields the model's own token, and its rejected tokens leave the cache", async () => {
    const c = cases[0]!;
    const gen = new Generation(tiny.model, await promptOf(tiny.model, c), greedy(c));
    gen.accept(await gen.seq.prefill());
    const fed = gen.seq.fed;
    const wrong = (c.generated_ids[1]! + 1) % tiny.model.config.text.vocab_size;
    const out = await gen.advance([wrong, wrong, wrong]);
    expect(out.map((t) => t.id)).toEqual([c.generated_ids[1]]);
    expect(gen.seq.fed).toBe(fed + 1);
    expect(gen.drafts).toEqual({ proposed: 3, accepted: 0 });
    // A right first token and a wrong second one: two tokens, one draft token kept.
    const two = await gen.advance([c.generated_ids[2]!, wrong]);
    expect(two.map((t) => t.id)).toEqual([c.generated_ids[2], c.generated_ids[3]]);
    expect(gen.seq.fed).toBe(fed + 3);
    while (!gen.done) await gen.advance();
    expect(gen.generatedIds).toEqual(c.generated_ids);
    gen.seq.release();
  });

  it("the draft size: one more than the tokens kept after a rejection, +2 after a draft kept whole, up to the maximum", async () => {
    const c = cases[0]!; // the golden text repeats one token: the lookup drafts it right
    const gen = new Generation(tiny.model, await promptOf(tiny.model, c), { ...DEFAULT_PARAMS, max_new_tokens: 200 });
    gen.accept(await gen.seq.prefill());
    await gen.advance();
    await gen.advance();
    const x = c.generated_ids[3]!;
    expect(gen.draft(6)).toEqual(new Array(6).fill(x));
    const wrong = (x + 1) % tiny.model.config.text.vocab_size;
    // Right for the first 3 tokens, then wrong: 3 kept, the next draft has 4.
    await gen.advance([x, x, x, wrong, wrong, wrong]);
    expect(gen.draft(6)).toHaveLength(4);
    await gen.advance(new Array(4).fill(wrong));
    expect(gen.draft(6)).toHaveLength(1);
    for (const size of [3, 5, 6, 6]) {
      await gen.advance(gen.draft(6));
      expect(gen.draft(6)).toHaveLength(size);
    }
    expect(gen.generatedIds.every((id, i) => i === 0 || id === x)).toBe(true);
    gen.seq.release();
  });

  it("seeded sampling and a repetition penalty give the same tokens with and without drafts (drafts rejected and accepted on the way)", async () => {
    let rejected = 0;
    let accepted = 0;
    for (const c of cases) {
      const prompt = await promptOf(tiny.model, c);
      // Among the 2–3 likeliest tokens the test weights' text repeats in short runs: drafts are right and wrong.
      // A repetition penalty (greedy) makes each choice depend on the tokens chosen before it in the same pass.
      const settings: Partial<GenerationParams>[] = [
        { temperature: 1, top_k: 2, top_p: 1, seed: 11 },
        { temperature: 1, top_k: 3, top_p: 1, seed: 11 },
        { repetition_penalty: 1.3 },
      ];
      for (const setting of settings) {
        const params = { ...DEFAULT_PARAMS, max_new_tokens: 24, ...setting };
        const plain = await runGeneration(tiny.model, prompt, params);
        const spec = await runGeneration(tiny.model, prompt, params, { draftTokens: 4 });
        expect(spec.generatedIds, `${c.case}, ${JSON.stringify(setting)}`).toEqual(plain.generatedIds);
        rejected += spec.drafts.proposed - spec.drafts.accepted;
        accepted += spec.drafts.accepted;
      }
    }
    expect(rejected).toBeGreaterThan(0);
    expect(accepted).toBeGreaterThan(0);
  }, 120_000);

  it("drafts stop at max_new_tokens and at the end of the context", async () => {
    const c = cases[0]!;
    const prompt = await promptOf(tiny.model, c);
    // The golden text is one token repeated, so every draft is right: a draft running past the 6th token would
    // leave draft tokens unaccepted.
    const r = await runGeneration(tiny.model, prompt, { ...DEFAULT_PARAMS, max_new_tokens: 6 }, { draftTokens: 8 });
    expect(r.generatedIds).toEqual(c.generated_ids.slice(0, 6));
    expect(r.drafts.accepted).toBeGreaterThan(0);
    expect(r.drafts.proposed).toBe(r.drafts.accepted);
    const gen = new Generation(tiny.model, prompt, greedy(c));
    gen.accept(await gen.seq.prefill());
    await gen.advance();
    await gen.advance();
    expect(gen.draft(8)).toEqual(new Array(8).fill(c.generated_ids[3]));
    expect(gen.draft(0)).toEqual([]);
    gen.seq.fed = tiny.model.config.text.max_position_embeddings - 3; // pretend the context is almost full
    expect(gen.draft(8).length).toBe(2);
    gen.seq.release();
  });

  describe("in the BatchingEngine (draftTokens)", () => {
    it("a request decoding alone is drafted for; its usage says how many draft tokens were kept", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 4, draftTokens: 4 });
      for (const c of cases.slice(0, 2)) {
        const events = await collect(engine, requestFor(c, `s-${c.case}`));
        expect(tokenIds(events), c.case).toEqual(c.generated_ids);
        expect(events.filter((e) => e.type === "token").map((e) => (e as Extract<EngineEvent, { type: "token" }>).text).join("")).toBe(c.generated_text);
        const done = events.at(-1)!;
        expect(done.type).toBe("done");
        const usage = (done as Extract<EngineEvent, { type: "done" }>).usage;
        expect(usage.completion_tokens).toBe(c.generated_ids.length);
        expect(usage.completion_tokens_details!.accepted_prediction_tokens).toBeGreaterThan(0);
        expect(usage.completion_tokens_details!.rejected_prediction_tokens).toBeGreaterThanOrEqual(0);
      }
      await engine.close();
    });

    it("a pass whose kept draft ends the generation sends all of its tokens, then done", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 4, draftTokens: 8 });
      const c = cases[0]!; // one token repeated: every draft is kept, so passes of several tokens end the generation
      let multi = 0;
      for (let max = 2; max <= 12; max++) {
        const events = await collect(engine, requestFor(c, `end-${max}`, { max_new_tokens: max }));
        expect(tokenIds(events), `max_new_tokens ${max}`).toEqual(c.generated_ids.slice(0, max));
        expect(events.at(-1), `max_new_tokens ${max}`).toMatchObject({ type: "done", usage: { completion_tokens: max } });
        if ((events.at(-1) as Extract<EngineEvent, { type: "done" }>).usage.completion_tokens_details?.accepted_prediction_tokens) multi++;
      }
      expect(multi).toBeGreaterThan(0);
      await engine.close();
    });

    it("concurrent requests still reproduce the golden ids (drafted for only while one decodes alone)", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 4, draftTokens: 4 });
      const results = await Promise.all(cases.map((c, i) => collect(engine, requestFor(c, `c${i}`))));
      results.forEach((events, i) => expect(tokenIds(events), cases[i]!.case).toEqual(cases[i]!.generated_ids));
      await engine.close();
    });

    it("without draftTokens nothing is drafted and usage has no draft details", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 4 });
      const events = await collect(engine, requestFor(cases[0]!, "plain"));
      expect(tokenIds(events)).toEqual(cases[0]!.generated_ids);
      expect((events.at(-1) as Extract<EngineEvent, { type: "done" }>).usage.completion_tokens_details).toBeUndefined();
      await engine.close();
    });
  });

  describe("a decoder without logits_to_keep (the onnx-community graph)", () => {
    const present = useTinyModel("engine-spec-present-", { appendDecoder: false });

    it("decodes one token per pass: nothing is drafted, the tokens are the golden ones", async () => {
      expect(present.model.logitsToKeep).toBe(false);
      const c = cases[0]!;
      const prompt = await promptOf(present.model, c);
      const r = await runGeneration(present.model, prompt, greedy(c), { draftTokens: 4 });
      expect(r.generatedIds).toEqual(c.generated_ids);
      expect(r.drafts).toEqual({ proposed: 0, accepted: 0 });
      expect(r.timings.decode_ms_per_pass).toHaveLength(c.generated_ids.length - 1);
      const gen = new Generation(present.model, prompt, greedy(c));
      gen.accept(await gen.seq.prefill());
      await expect(gen.advance([1, 2])).rejects.toMatchObject({ code: "internal_error" });
      gen.seq.release();
    });
  });
});

import { readFileSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { DetokenizerVocab, IncrementalDetokenizer } from "../../gpu-backend/src/engine/detokenizer.ts";
import {
  QWEN2_VL_EOS_TOKEN_IDS,
  StopConfigError,
  StopStringMatcher,
  StoppingCriteria,
  StoppingStateError,
  type StoppingConfig,
  type TextDeltaSource,
} from "../../gpu-backend/src/engine/stopping.ts";
import { GOLDEN_DIR, loadGoldenCase } from "../support/golden.ts";
import { thrownBy } from "../support/errors.ts";

/** A fake detokenizer: token id i yields pieces[i]; flush yields `tail`. */
function source(pieces: string[], tail = ""): TextDeltaSource {
  return { push: (id) => pieces[id] ?? "", flush: () => tail };
}

const base: StoppingConfig = { maxNewTokens: 100, contextLength: 1000, promptLength: 10 };

function expectConfigError(fn: () => unknown, code: string): void {
  expect(thrownBy(fn, StopConfigError).code).toBe(code);
}

/** Reference: the text before the stop string that is complete first (tie: the longer one), or all. */
function referenceCut(text: string, stops: string[]): { text: string; stop: string | null } {
  let best: { start: number; end: number; s: string } | null = null;
  for (const s of stops) {
    const i = text.indexOf(s);
    if (i < 0) continue;
    const end = i + s.length;
    if (!best || end < best.end || (end === best.end && i < best.start)) best = { start: i, end, s };
  }
  return best ? { text: text.slice(0, best.start), stop: best.s } : { text, stop: null };
}

describe("eos, max_new_tokens, context length", () => {
  it("defaults to Qwen2-VL's eos ids; eos adds no text and releases held-back text", () => {
    expect([...QWEN2_VL_EOS_TOKEN_IDS]).toEqual([151645, 151643]);
    for (const eos of [151645, 151643]) {
      const pieces = ["Hello", " <", "x"];
      const s = new StoppingCriteria({ ...base, stopStrings: ["<stop>"] }, { push: (id) => pieces[id] ?? "<|im_end|>", flush: () => "" });
      expect(s.step(0)).toEqual({ text: "Hello", done: false, finishReason: null, cause: null });
      expect(s.step(1).text).toBe(" "); // "<" might begin "<stop>"
      const r = s.step(eos);
      expect(r).toEqual({ text: "<", done: true, finishReason: "stop", cause: { kind: "eos", tokenId: eos } });
      expect(s.done).toBe(true);
      expect(s.finishReason).toBe("stop");
      expect(s.generatedTokens).toBe(3);
    }
  });

  it("custom eos ids (an empty list disables eos)", () => {
    const s = new StoppingCriteria({ ...base, eosTokenIds: [7] }, source(["a"]));
    expect(s.step(151645).done).toBe(false);
    expect(s.step(7).cause).toEqual({ kind: "eos", tokenId: 7 });
    const none = new StoppingCriteria({ ...base, eosTokenIds: [] }, source(["a"]));
    expect(none.step(151645).done).toBe(false);
  });

  it("max_new_tokens → length, with the final text flushed", () => {
    const s = new StoppingCriteria({ ...base, maxNewTokens: 3 }, source(["a", "b", "c"], "\uFFFD"));
    expect(s.step(0).done).toBe(false);
    expect(s.step(1).done).toBe(false);
    expect(s.step(2)).toEqual({ text: "c\uFFFD", done: true, finishReason: "length", cause: { kind: "max_new_tokens" } });
    expect(() => s.step(0)).toThrow(StoppingStateError);
  });

  it("context length: prompt + generated may not exceed it", () => {
    const s = new StoppingCriteria({ ...base, promptLength: 10, contextLength: 12 }, source(["a", "b"]));
    expect(s.step(0).done).toBe(false);
    const r = s.step(1);
    expect(r.finishReason).toBe("length");
    expect(r.cause).toEqual({ kind: "context_length" });
    // Both limits at once: reported as max_new_tokens.
    const both = new StoppingCriteria({ ...base, promptLength: 10, contextLength: 11, maxNewTokens: 1 }, source(["a"]));
    expect(both.step(0).cause).toEqual({ kind: "max_new_tokens" });
    expectConfigError(() => new StoppingCriteria({ ...base, promptLength: 12, contextLength: 12 }, source([])), "context_length_exceeded");
  });

  it("eos on the last allowed token is still 'stop'", () => {
    const s = new StoppingCriteria({ ...base, maxNewTokens: 1 }, source([]));
    expect(s.step(151645).finishReason).toBe("stop");
  });
});

describe("stop strings", () => {
  it("match across token boundaries; the stop string and what follows are not emitted", () => {
    const pieces = ["<answer>", "A", "</", "ans", "wer>", "tail"];
    const s = new StoppingCriteria({ ...base, stopStrings: ["</answer>"] }, source(pieces));
    const out = [0, 1, 2, 3].map((id) => s.step(id).text);
    expect(out).toEqual(["<answer>", "A", "", ""]);
    const r = s.step(4);
    expect(r).toEqual({
      text: "",
      done: true,
      finishReason: "stop",
      cause: { kind: "stop_string", stop: "</answer>", stopIndex: 0, offset: 9 },
    });
  });

  it("held-back text is released as soon as it can no longer start a stop string", () => {
    const s = new StoppingCriteria({ ...base, stopStrings: ["<z>", "END"] }, source(["x<", "y", "E", "N", "D!"]));
    expect(s.step(0).text).toBe("x");
    expect(s.step(1).text).toBe("<y");
    expect(s.step(2).text).toBe("");
    expect(s.step(3).text).toBe("");
    const r = s.step(4);
    expect(r.text).toBe("");
    expect(r.cause).toMatchObject({ kind: "stop_string", stop: "END", stopIndex: 1, offset: 3 });
  });

  it("on the golden forced continuation, with the real detokenizer", () => {
    const vocab = DetokenizerVocab.fromTokenizerJson(JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "tokenizer.json"), "utf8")));
    const forced = loadGoldenCase("case_01").forced_decode;
    const run = (stopStrings: string[], skipSpecialTokens: boolean) => {
      const s = new StoppingCriteria({ ...base, stopStrings }, new IncrementalDetokenizer(vocab, { skipSpecialTokens }));
      let text = "";
      for (const id of forced.forced_ids) {
        const r = s.step(id);
        text += r.text;
        if (r.done) break;
      }
      return { text, s };
    };
    // "</think>" arrives as "</", "think", ">\n": the match spans three tokens and the trailing "\n" is dropped.
    const a = run(["</think>"], true);
    expect(a.text).toBe("<think>\nThe image shows a brain MRI with a bright lesion.");
    expect(a.s.cause).toMatchObject({ kind: "stop_string", stop: "</think>" });
    // No stop string: everything up to the eos (which adds no text even with specials kept).
    const b = run([], false);
    expect(b.text).toBe("<think>\nThe image shows a brain MRI with a bright lesion.</think>\n<answer>A</answer>");
    expect(b.s.cause).toEqual({ kind: "eos", tokenId: 151645 });
    expect(b.s.generatedTokens).toBe(forced.forced_ids.length);
  });

  it("a stop string completed by the final flush still wins", () => {
    const s = new StoppingCriteria({ ...base, maxNewTokens: 1, stopStrings: ["YZ"] }, source(["xY"], "Z"));
    const r = s.step(0);
    expect(r.text).toBe("x");
    expect(r.finishReason).toBe("stop");
    expect(r.cause).toMatchObject({ kind: "stop_string", stop: "YZ" });
  });

  it("finish() releases held-back and pending text, with no finish reason", () => {
    const s = new StoppingCriteria({ ...base, stopStrings: ["abc"] }, source(["xab"], "\uFFFD"));
    expect(s.step(0).text).toBe("x");
    expect(s.finish()).toBe("ab\uFFFD");
    expect(s.done).toBe(true);
    expect(s.finishReason).toBeNull();
    expect(s.finish()).toBe("");
  });

  it("the stop string completing first wins; on a tie the longer one", () => {
    // "bc" completes at offset 3, before "abcd" (4).
    expect(matchAll(["abcd", "bc"], ["abcd"])).toEqual({ text: "a", stop: "bc" });
    expect(matchAll(["c", "bc"], ["abc"])).toEqual({ text: "a", stop: "bc" });
    expect(matchAll(["x"], ["abc"])).toEqual({ text: "abc", stop: null });
  });

  it("property: output is independent of how the text is split, and equals the reference cut", () => {
    const alphabet = fc.constantFrom("a", "b", "c", "<", "/", "é", "🩻");
    const str = (max: number) => fc.array(alphabet, { minLength: 1, maxLength: max }).map((a) => a.join(""));
    fc.assert(
      fc.property(fc.array(str(6), { maxLength: 12 }), fc.array(str(4), { maxLength: 3 }), (deltas, stops) => {
        const full = deltas.join("");
        const got = matchAll(stops, deltas);
        expect(got).toEqual(referenceCut(full, stops));
        // Chunking must not matter: feed it as one delta.
        expect(matchAll(stops, [full])).toEqual(got);
        // Never emit (part of) a stop string's match: every emitted prefix is a prefix of the cut text.
        const m = new StopStringMatcher(stops);
        let emitted = "";
        for (const d of deltas) {
          emitted += m.push(d).text;
          expect(got.text.startsWith(emitted)).toBe(true);
        }
      }),
      { numRuns: 500 },
    );
  });
});

function matchAll(stops: string[], deltas: string[]): { text: string; stop: string | null } {
  const m = new StopStringMatcher(stops);
  let text = "";
  for (const d of deltas) {
    const r = m.push(d);
    text += r.text;
    if (r.matched !== null) return { text, stop: r.matched };
  }
  return { text: text + m.end(), stop: null };
}

describe("validation", () => {
  it("typed errors", () => {
    const src = source([]);
    expectConfigError(() => new StoppingCriteria({ ...base, maxNewTokens: 0 }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, maxNewTokens: 1.5 }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, contextLength: NaN }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, promptLength: -1 }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, eosTokenIds: [-5] }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, stopStrings: [""] }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, stopStrings: ["a\uD800"] }, src), "invalid_parameter");
    expectConfigError(() => new StoppingCriteria({ ...base, stopStrings: [3 as unknown as string] }, src), "invalid_parameter");
    expectConfigError(() => new StopStringMatcher("abc" as unknown as string[]), "invalid_parameter");
  });

  it("duplicate stop strings report the first position", () => {
    const m = new StopStringMatcher(["q", "b", "b"]);
    expect(m.push("abc")).toMatchObject({ text: "a", matched: "b", stopIndex: 1, offset: 1 });
    expect(m.done).toBe(true);
  });
});

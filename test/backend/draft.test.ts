/** Prompt-lookup drafts (engine/draft.ts): which earlier occurrence is used, and what is proposed. */
import { describe, expect, it } from "vitest";
import { promptLookupDraft } from "../../gpu-backend/src/engine/draft.ts";

describe("promptLookupDraft", () => {
  it("proposes what followed the latest earlier occurrence of the last tokens", () => {
    // "… 1 2 3 4 5 … 1 2 3 9 8 … 1 2 3": the latest "1 2 3" before the end is followed by 9 8.
    const ctx = [7, 1, 2, 3, 4, 5, 6, 1, 2, 3, 9, 8, 6, 1, 2, 3];
    expect(promptLookupDraft(ctx, { maxTokens: 2 })).toEqual([9, 8]);
    expect(promptLookupDraft(ctx, { maxTokens: 4 })).toEqual([9, 8, 6, 1]);
  });

  it("tries the longest suffix first", () => {
    // The 2-gram "5 6" last occurred before 0, but the 3-gram "4 5 6" only before 1.
    const ctx = [4, 5, 6, 1, 9, 5, 6, 0, 3, 4, 5, 6];
    expect(promptLookupDraft(ctx, { maxTokens: 1 })).toEqual([1]);
    expect(promptLookupDraft(ctx, { maxTokens: 1, maxNgram: 2 })).toEqual([0]);
  });

  it("does not draft from a one-token match unless asked to", () => {
    const ctx = [3, 8, 5, 3];
    expect(promptLookupDraft(ctx, { maxTokens: 2 })).toEqual([]);
    expect(promptLookupDraft(ctx, { maxTokens: 2, minNgram: 1 })).toEqual([8, 5]);
  });

  it("continues a repeating text past the context's end with its own period", () => {
    // "a b a b": the match of "a b" two tokens back runs into the suffix; the draft keeps the period.
    expect(promptLookupDraft([1, 2, 1, 2], { maxTokens: 5 })).toEqual([1, 2, 1, 2, 1]);
    // A run of one token (what random test weights generate) drafts more of it.
    expect(promptLookupDraft([4, 7, 7, 7], { maxTokens: 3 })).toEqual([7, 7, 7]);
  });

  it("proposes nothing without a match, for short contexts, or when no tokens are wanted", () => {
    expect(promptLookupDraft([1, 2, 3, 4, 5], { maxTokens: 4 })).toEqual([]);
    expect(promptLookupDraft([1], { maxTokens: 4 })).toEqual([]);
    expect(promptLookupDraft([], { maxTokens: 4 })).toEqual([]);
    expect(promptLookupDraft([1, 2, 1, 2], { maxTokens: 0 })).toEqual([]);
    expect(promptLookupDraft(Int32Array.from([1, 2, 9, 1, 2]), { maxTokens: 1 })).toEqual([9]);
  });
});

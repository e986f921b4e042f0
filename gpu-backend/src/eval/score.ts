/**
 * Scoring of an evaluation run, pure (no I/O): the reference rule of MedVLM-R1's evaluation
 * (`src/eval/test_qwen2vl_med.py`): the predicted letter is
 * `re.search(r'<answer>\s*([A-Z])\s*</answer>', output).group(1)` (the first match; Python whitespace; capital
 * letters only), an item is correct when that letter equals `solution`, and no match counts as wrong.
 * Accuracy per subset = correct / items, as in the paper's table.
 *
 * Besides accuracy: the GRPO format reward's compliance rate, how many replies had no reference letter but a
 * letter the serving API's tolerant fallback would have found (and how many of those were right), completion
 * token statistics and throughput.
 *
 * An item whose request failed (an `error`) counts as wrong and as not format-compliant; an item skipped
 * before the run (missing image with `--skip-missing`) is not an item of the denominator at all.
 */
import { parseAnswer, type AnswerFallbackKind } from "../../../shared/src/answer.ts";
import { MODALITIES } from "./dataset.ts";

/** What one item produced. */
export interface ItemOutput {
  /** Position in the evaluation file. */
  index: number;
  /** The table row ("MRI", "CT", "X-ray" or another subset name). */
  subset: string;
  /** The gold letter. */
  gold: string;
  /** The options shown to the model (for the fallback parse only; the reference rule ignores them). */
  options: readonly string[];
  /** The decoded completion (special tokens skipped); null when the request failed. */
  output: string | null;
  /** Why the request failed (stable error code and message); null on success. */
  error: { code: string; message: string } | null;
  completion_tokens: number;
  /** Speculative decoding's draft tokens kept and not (the reply's `usage.completion_tokens_details`), when it drafted. */
  drafts?: DraftTokens;
  finish_reason: "stop" | "length" | null;
  /** Latency of the item: from its submission to its final answer, in ms. */
  ms: number;
}

/** Draft tokens of speculative decoding: kept (part of the completion) and rejected. */
export interface DraftTokens {
  accepted: number;
  rejected: number;
}

/** One scored item. */
export interface GradedItem {
  index: number;
  subset: string;
  gold: string;
  /** The reference rule's letter (any A–Z), null when it finds none. */
  predicted: string | null;
  /** Whether `predicted` names an offered option (A–D for four options); null without a letter. */
  letter_in_options: boolean | null;
  correct: boolean;
  /** The GRPO format reward's rule: `<think>…</think>\s*<answer>…</answer>` is the whole reply. */
  format_ok: boolean;
  /** The tolerant parser's letter when the reference rule found none (not counted as correct); else null. */
  fallback_answer: string | null;
  /** How that letter was found. */
  fallback: AnswerFallbackKind | null;
  completion_tokens: number;
  drafts?: DraftTokens;
  finish_reason: "stop" | "length" | null;
  ms: number;
  error: { code: string; message: string } | null;
}

/** Scores one item with the reference rule. */
export function gradeItem(o: ItemOutput): GradedItem {
  const base = {
    index: o.index,
    subset: o.subset,
    gold: o.gold,
    completion_tokens: o.completion_tokens,
    ...(o.drafts ? { drafts: o.drafts } : {}),
    finish_reason: o.finish_reason,
    ms: o.ms,
    error: o.error,
  };
  if (o.output === null || o.error) {
    return { ...base, predicted: null, letter_in_options: null, correct: false, format_ok: false, fallback_answer: null, fallback: null };
  }
  const p = parseAnswer(o.output, o.options);
  return {
    ...base,
    predicted: p.reference_answer,
    letter_in_options: p.reference_answer === null ? null : p.reference_answer.charCodeAt(0) - 0x41 < o.options.length,
    correct: p.reference_answer !== null && p.reference_answer === o.gold,
    format_ok: p.format_ok,
    fallback_answer: p.reference_answer === null ? p.answer : null,
    fallback: p.reference_answer === null ? p.fallback : null,
  };
}

/** Accuracy of one table row. */
export interface SubsetScore {
  subset: string;
  items: number;
  correct: number;
  /** correct / items (0–1); null for no items. */
  accuracy: number | null;
  format_ok: number;
}

/** Mean / median / max of a list; nulls when it is empty. */
export interface Stats {
  mean: number | null;
  median: number | null;
  max: number | null;
}

/** The whole run's numbers. */
export interface Summary {
  /** Items scored (skipped ones excluded). */
  items: number;
  correct: number;
  /** correct / items (0–1), the paper's number; null for no items. */
  accuracy: number | null;
  /** Rows in the paper's order (MRI, CT, X-ray), then other subsets by name. */
  by_subset: SubsetScore[];
  /** Items whose reply satisfies the format reward. */
  format_ok: number;
  /** format_ok / items; null for no items. */
  format_rate: number | null;
  /** Replies in which the reference rule found no letter (failed requests excluded). */
  no_reference_letter: number;
  /** Of those, replies in which the tolerant fallback found a letter (the API's `answer` with `fallback`). */
  fallback_only: number;
  /** Of those, fallback letters equal to the gold letter (NOT counted in `correct`). */
  fallback_correct: number;
  /** Reference letters outside the offered options (e.g. "E" for four options): wrong, as in the reference. */
  letter_out_of_range: number;
  /** Failed requests (counted as wrong) and their codes. */
  errors: number;
  errors_by_code: Record<string, number>;
  /** Items not run (missing image with --skip-missing). */
  skipped: number;
  /** Completion tokens over the items that produced a reply. */
  completion_tokens: Stats & { total: number };
  /** Replies cut by max_new_tokens (finish_reason "length"). */
  truncated: number;
  /** Speculative decoding's draft tokens over all replies; null when nothing was drafted. */
  draft_tokens: (DraftTokens & { acceptance: number }) | null;
  /** Per-item latency in ms (submission to answer). */
  latency_ms: Stats;
  wall_ms: number;
  /** Total completion tokens / wall time. */
  tokens_per_s: number | null;
  items_per_s: number | null;
}

function stats(values: readonly number[]): Stats {
  if (values.length === 0) return { mean: null, median: null, max: null };
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { mean: s.reduce((a, b) => a + b, 0) / s.length, median, max: s[s.length - 1]! };
}

/** Order of table rows: the paper's modalities first, then other subsets alphabetically. */
export function compareSubsets(a: string, b: string): number {
  const ia = (MODALITIES as readonly string[]).indexOf(a);
  const ib = (MODALITIES as readonly string[]).indexOf(b);
  if (ia >= 0 || ib >= 0) return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib);
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Summarizes graded items; `wallMs` is the run's wall time, `skipped` the items left out before it. */
export function summarize(graded: readonly GradedItem[], run: { wallMs: number; skipped?: number }): Summary {
  const rows = new Map<string, SubsetScore>();
  const errorsByCode: Record<string, number> = {};
  let correct = 0;
  let formatOk = 0;
  let noRef = 0;
  let fallbackOnly = 0;
  let fallbackCorrect = 0;
  let outOfRange = 0;
  let errors = 0;
  let truncated = 0;
  const tokens: number[] = [];
  const latency: number[] = [];
  const drafts: DraftTokens = { accepted: 0, rejected: 0 };
  for (const g of graded) {
    let row = rows.get(g.subset);
    if (!row) rows.set(g.subset, (row = { subset: g.subset, items: 0, correct: 0, accuracy: null, format_ok: 0 }));
    row.items++;
    latency.push(g.ms);
    if (g.correct) {
      correct++;
      row.correct++;
    }
    if (g.format_ok) {
      formatOk++;
      row.format_ok++;
    }
    if (g.error) {
      errors++;
      errorsByCode[g.error.code] = (errorsByCode[g.error.code] ?? 0) + 1;
      continue;
    }
    tokens.push(g.completion_tokens);
    if (g.drafts) {
      drafts.accepted += g.drafts.accepted;
      drafts.rejected += g.drafts.rejected;
    }
    if (g.finish_reason === "length") truncated++;
    if (g.predicted === null) {
      noRef++;
      if (g.fallback_answer !== null) {
        fallbackOnly++;
        if (g.fallback_answer === g.gold) fallbackCorrect++;
      }
    }
    if (g.letter_in_options === false) outOfRange++;
  }
  for (const row of rows.values()) row.accuracy = row.items ? row.correct / row.items : null;
  const n = graded.length;
  const totalTokens = tokens.reduce((a, b) => a + b, 0);
  const secs = run.wallMs / 1000;
  return {
    items: n,
    correct,
    accuracy: n ? correct / n : null,
    by_subset: [...rows.values()].sort((a, b) => compareSubsets(a.subset, b.subset)),
    format_ok: formatOk,
    format_rate: n ? formatOk / n : null,
    no_reference_letter: noRef,
    fallback_only: fallbackOnly,
    fallback_correct: fallbackCorrect,
    letter_out_of_range: outOfRange,
    errors,
    errors_by_code: errorsByCode,
    skipped: run.skipped ?? 0,
    completion_tokens: { ...stats(tokens), total: totalTokens },
    truncated,
    draft_tokens: drafts.accepted + drafts.rejected > 0 ? { ...drafts, acceptance: drafts.accepted / (drafts.accepted + drafts.rejected) } : null,
    latency_ms: stats(latency),
    wall_ms: run.wallMs,
    tokens_per_s: secs > 0 ? totalTokens / secs : null,
    items_per_s: secs > 0 ? n / secs : null,
  };
}

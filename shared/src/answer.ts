/**
 * Parsing of a MedVLM-R1 reply (`<think>…</think><answer>X</answer>`).
 *
 * Two reference rules are reproduced exactly (JZPeterPan/MedVLM-R1):
 * - the evaluation's letter (`src/eval/test_qwen2vl_med.py` `extract_letter_answer`):
 *   `re.search(r'<answer>\s*([A-Z])\s*</answer>', output).group(1)` — the first match;
 * - the GRPO format reward (`src/open-r1-multimodal/src/open_r1/grpo.py` `format_reward`):
 *   `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", output, re.DOTALL)` — fullmatch, so the
 *   whole reply must start with `<think>` and end with `</answer>` (no trailing newline); the lazy `.*?`
 *   still lets either part contain further tags.
 * Python 3's `\s` on str patterns is Unicode whitespace per `str.isspace()`, which differs from JS `\s`
 * (Python adds U+001C–U+001F and U+0085; JS adds U+FEFF), so both rules are hand-written scanners over
 * Python's set. The scanners are linear in the input: no regular expression with nested or adjacent
 * unbounded quantifiers is ever run on the reply.
 *
 * When the evaluation rule finds no letter, a tolerant fallback may still recover one; it is reported in
 * `fallback` and never in `reference_answer`.
 */
import { OPTION_LETTERS } from "./prompt.ts";

/** How a fallback answer was recovered (only when the reference rule found no letter). */
export type AnswerFallbackKind =
  /** `<answer>` content is a lone letter in another form: `b`, `(B)`, `B.`, `Option B`, `<ANSWER>B</ANSWER>`. */
  | "answer_tag_letter"
  /** `<answer>` content is a letter followed by text: `B) Breast tissue`, `B. Breast tissue`. */
  | "answer_tag_letter_text"
  /** `<answer>` content is exactly one option's text (case- and whitespace-insensitive). */
  | "answer_tag_option_text"
  /** The same three forms inside an `<answer>` that is never closed (e.g. cut off by the token limit). */
  | "unclosed_answer_tag_letter"
  | "unclosed_answer_tag_letter_text"
  | "unclosed_answer_tag_option_text"
  /** `Answer: B`, `the answer is (B).`, `Final answer: **B**` — the last such phrase in the reply. */
  | "answer_phrase"
  /** The reply (after the last `</think>`, if any) is just a letter: `B`, `(b)`, `B.`, `Answer B`. */
  | "bare_letter"
  /** The reply (after the last `</think>`, if any) is a letter with its own option text: `B) Breast tissue`. */
  | "bare_letter_text"
  /** The reply (after the last `</think>`, if any) is exactly one option's text. */
  | "option_text";

/** Result of {@link parseAnswer}. */
export interface ParsedAnswer {
  /**
   * The letter to present: the reference letter when it names an offered option (or any letter when no
   * options were given), else a fallback letter (see `fallback`), else null. Null when the reference
   * letter lies outside the options.
   */
  answer: string | null;
  /** 0-based index of `answer` (A → 0); null when `answer` is null. */
  answer_index: number | null;
  /** Text of the chosen option; null without `options` or without `answer`. */
  answer_text: string | null;
  /**
   * Exactly what the reference evaluation extracts (any A–Z letter, unchecked against the options); null
   * when it finds nothing. Accuracy computed on this field matches the paper's evaluation.
   */
  reference_answer: string | null;
  /** Trimmed content of the first `<think>…</think>`; for an unclosed `<think>`, the text after it up to
   * the first `<answer>` (or the end). Null without `<think>`. */
  reasoning: string | null;
  /** Whether that `<think>` was closed; null without `<think>`. */
  reasoning_closed: boolean | null;
  /** The GRPO format reward's rule (fullmatch of `<think>.*?</think>\s*<answer>.*?</answer>`, DOTALL). */
  format_ok: boolean;
  /**
   * With `options`: whether the letter found (reference or fallback) names an offered option; null when
   * no letter was found at all. Without `options`: null.
   */
  letter_valid: boolean | null;
  /** How `answer` was recovered when the reference rule found nothing; null otherwise. */
  fallback: AnswerFallbackKind | null;
}

/** Python 3 `str.isspace()` = what `\s` matches in a str regex. */
export function isPythonWhitespace(code: number): boolean {
  return (
    (code >= 0x09 && code <= 0x0d) ||
    (code >= 0x1c && code <= 0x20) ||
    code === 0x85 ||
    code === 0xa0 ||
    code === 0x1680 ||
    (code >= 0x2000 && code <= 0x200a) ||
    code === 0x2028 ||
    code === 0x2029 ||
    code === 0x202f ||
    code === 0x205f ||
    code === 0x3000
  );
}

function skipPyWs(s: string, i: number): number {
  while (i < s.length && isPythonWhitespace(s.charCodeAt(i))) i++;
  return i;
}

const OPEN = "<answer>";
const CLOSE = "</answer>";
const THINK_OPEN = "<think>";
const THINK_CLOSE = "</think>";

/**
 * The evaluation's `re.search(r'<answer>\s*([A-Z])\s*</answer>', output)` group 1, or null.
 * Linear: the whitespace runs skipped after distinct `<answer>` occurrences are disjoint.
 */
export function referenceLetter(output: string): string | null {
  let at = output.indexOf(OPEN);
  while (at !== -1) {
    const i = skipPyWs(output, at + OPEN.length);
    const c = output.charCodeAt(i);
    if (c >= 0x41 && c <= 0x5a) {
      const j = skipPyWs(output, i + 1);
      if (output.startsWith(CLOSE, j)) return output[i] as string;
    }
    at = output.indexOf(OPEN, at + OPEN.length);
  }
  return null;
}

/**
 * The format reward's `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", output, re.DOTALL)`:
 * the reply is `<think>` X `</think>` W `<answer>` Y `</answer>` for some X, Y and all-whitespace W.
 */
export function formatOk(output: string): boolean {
  if (!output.startsWith(THINK_OPEN) || !output.endsWith(CLOSE)) return false;
  const end = output.length - CLOSE.length; // Y must end here
  let at = output.indexOf(THINK_CLOSE, THINK_OPEN.length);
  while (at !== -1) {
    const j = skipPyWs(output, at + THINK_CLOSE.length);
    if (j + OPEN.length <= end && output.startsWith(OPEN, j)) return true;
    at = output.indexOf(THINK_CLOSE, at + THINK_CLOSE.length);
  }
  return false;
}

/** First `<think>…</think>` (trimmed), or the unclosed remainder. */
function extractReasoning(output: string): { reasoning: string | null; closed: boolean | null } {
  const start = output.indexOf(THINK_OPEN);
  if (start === -1) return { reasoning: null, closed: null };
  const from = start + THINK_OPEN.length;
  const close = output.indexOf(THINK_CLOSE, from);
  if (close !== -1) return { reasoning: output.slice(from, close).trim(), closed: true };
  const ans = output.indexOf(OPEN, from);
  return { reasoning: output.slice(from, ans === -1 ? output.length : ans).trim(), closed: false };
}

// ---------------------------------------------------------------------------------------------------
// Tolerant fallback. Candidates are whitespace-normalized first, so the few regexes below only ever see
// single spaces and are anchored with bounded quantifiers (linear time).

/** Collapses whitespace runs to one space and trims. */
function collapse(s: string): string {
  // Single spaces are left alone (replacing each of them is slow on long texts).
  return s.replace(/\s{2,}|[^\S ]/g, " ").trim();
}

const WRAP = new Set(["*", '"', "'", "`", "“", "”", "‘", "’", "_"]);

/** Strips wrapping markup/quote characters from both ends (manual loop: no end-anchored regex). */
function unwrap(s: string): string {
  let a = 0;
  let b = s.length;
  while (a < b && WRAP.has(s[a] as string)) a++;
  while (b > a && WRAP.has(s[b - 1] as string)) b--;
  return s.slice(a, b).trim();
}

/** Comparable form of an option text / candidate: collapsed, unwrapped, lowercased, no trailing period. */
function optionKey(s: string): string {
  const t = unwrap(collapse(s)).toLowerCase();
  // Drop trailing periods (and spaces between them) by index, not by repeated slicing (linear).
  let end = t.length;
  while (end > 0 && (t[end - 1] === "." || t[end - 1] === " ")) end--;
  return unwrap(t.slice(0, end));
}

interface Ctx {
  /** Allowed letter count (options.length, or 10 without options). */
  n: number;
  keys: string[] | undefined;
}

function letterIndex(ch: string, ctx: Ctx): number | null {
  const i = ch.toUpperCase().charCodeAt(0) - 0x41;
  return ch.length === 1 && i >= 0 && i < ctx.n ? i : null;
}

/** Index of the single option whose key equals `key`, or null (none, or several distinct ones). */
function optionByText(key: string, ctx: Ctx): number | null {
  if (!ctx.keys || key === "") return null;
  let found: number | null = null;
  for (let i = 0; i < ctx.keys.length; i++) {
    if (ctx.keys[i] === key) {
      if (found !== null) return null;
      found = i;
    }
  }
  return found;
}

const PREFIX = /^(?:the )?(?:correct )?(?:final )?(?:answer|option|choice)(?: is)? ?:? ?/i;
const LETTER_ONLY = /^[([]?([A-Za-z])[)\]]?[.:]?$/;
const LETTER_TEXT = /^[([]?([A-Z])[)\].:]+ ?(.+)$/;

interface Found {
  index: number;
  form: "letter" | "letter_text" | "option_text";
  /** For "letter_text": the text is the letter's own option text. */
  textMatches?: boolean;
}

/** Recognizes a letter, letter+text, or option text in a candidate (e.g. an `<answer>` content). */
function parseCandidate(raw: string, ctx: Ctx): Found | null {
  const c = unwrap(collapse(raw));
  if (c === "") return null;
  const rest = unwrap(c.replace(PREFIX, ""));
  const only = LETTER_ONLY.exec(rest);
  if (only) {
    const i = letterIndex(only[1] as string, ctx);
    return i === null ? null : { index: i, form: "letter" };
  }
  const lt = LETTER_TEXT.exec(rest);
  if (lt) {
    const i = letterIndex(lt[1] as string, ctx);
    if (i !== null) {
      // A text that names a different option contradicts the letter: recover nothing.
      const byText = optionByText(optionKey(lt[2] as string), ctx);
      if (byText === null || byText === i) return { index: i, form: "letter_text", textMatches: byText === i };
      return null;
    }
  }
  const i = optionByText(optionKey(c), ctx);
  return i === null ? null : { index: i, form: "option_text" };
}

/** Whitespace for the fallback: Python's set plus U+FEFF (the union with JS `\s`). */
function isSpace(code: number): boolean {
  return isPythonWhitespace(code) || code === 0xfeff;
}

function skipSpace(s: string, p: number): number {
  while (p < s.length && isSpace(s.charCodeAt(p))) p++;
  return p;
}

function isAsciiLetter(code: number): boolean {
  return (code >= 0x41 && code <= 0x5a) || (code >= 0x61 && code <= 0x7a);
}

/**
 * Letter index of an `answer` phrase whose word ends at `p`: `[ is][:] [option |choice ][**][(]X[)][**]`
 * with X an allowed upper-case letter that ends the phrase (punctuation, a tag, a line end, an opening
 * parenthesis or the end of the reply follows). Null when the text there is not such a phrase.
 */
function phraseAt(text: string, p: number, ctx: Ctx): number | null {
  let linked = false;
  p = skipSpace(text, p);
  if (text.slice(p, p + 2).toLowerCase() === "is" && !isAsciiLetter(text.charCodeAt(p + 2))) {
    p = skipSpace(text, p + 2);
    linked = true;
  }
  if (text[p] === ":" || text[p] === "\uff1a") {
    p = skipSpace(text, p + 1);
    linked = true;
  }
  if (!linked) return null;
  const word = text.slice(p, p + 7).toLowerCase();
  if (word === "option " || word === "choice ") p = skipSpace(text, p + 6);
  let stars = 0;
  while (text[p] === "*" && stars < 2) {
    p++;
    stars++;
  }
  const paren = text[p] === "(" || text[p] === "[";
  if (paren) p++;
  const code = text.charCodeAt(p);
  if (!(code >= 0x41 && code <= 0x5a)) return null; // upper case only: "a" is usually an article
  const idx = letterIndex(text[p] as string, ctx);
  if (idx === null) return null;
  p++;
  if (paren) {
    if (text[p] !== ")" && text[p] !== "]") return null;
    p++;
  } else if (text[p] === ")") p++;
  while (text[p] === "*" && stars > 0) {
    p++;
    stars--;
  }
  const next = text[p];
  if (next === undefined || ".,;:!?<\n\r".includes(next)) return idx;
  if (next === " " || next === "\t") {
    // "Answer: B because…" continues a sentence; "Answer: B (Breast tissue)" or "Answer: B\n" does not.
    let q = p;
    while (text[q] === " " || text[q] === "\t") q++;
    const after = text[q];
    if (after === undefined || "\n\r<(".includes(after)) return idx;
  }
  return null;
}

/** The last answer phrase of the reply (see {@link phraseAt}). Linear: each phrase scan stops within the next "answer". */
function answerPhrase(text: string, ctx: Ctx): number | null {
  const re = /answer/gi;
  let last: number | null = null;
  for (let m = re.exec(text); m !== null; m = re.exec(text)) {
    const idx = phraseAt(text, m.index + m[0].length, ctx);
    if (idx !== null) last = idx;
  }
  return last;
}

/** First `<answer>` (any case) and its content up to the next `</answer>` (any case), if any. */
function looseAnswerTag(output: string): { content: string; closed: boolean } | null {
  const open = /<answer>/gi;
  const m = open.exec(output);
  if (!m) return null;
  const from = m.index + m[0].length;
  const close = /<\/answer>/gi;
  close.lastIndex = from;
  const c = close.exec(output);
  return c ? { content: output.slice(from, c.index), closed: true } : { content: output.slice(from), closed: false };
}

function fallbackAnswer(output: string, ctx: Ctx): { index: number; kind: AnswerFallbackKind } | null {
  const tag = looseAnswerTag(output);
  if (tag) {
    const f = parseCandidate(tag.content, ctx);
    if (f) {
      const kind = `${tag.closed ? "" : "unclosed_"}answer_tag_${f.form}` as AnswerFallbackKind;
      return { index: f.index, kind };
    }
  }
  const phrase = answerPhrase(output, ctx);
  if (phrase !== null) return { index: phrase, kind: "answer_phrase" };
  if (!tag) {
    const endThink = output.lastIndexOf(THINK_CLOSE);
    const tail = endThink === -1 ? output : output.slice(endThink + THINK_CLOSE.length);
    if (!tail.includes(THINK_OPEN)) {
      const f = parseCandidate(tail, ctx);
      if (f?.form === "letter") return { index: f.index, kind: "bare_letter" };
      // Untagged "A. <prose>" is too often a sentence: only "B) <B's own text>" counts.
      if (f?.form === "letter_text" && f.textMatches) return { index: f.index, kind: "bare_letter_text" };
      if (f?.form === "option_text") return { index: f.index, kind: "option_text" };
    }
  }
  return null;
}

/**
 * Parses a reply. Never throws; linear time in `raw`. `options` are the option texts offered (A, B, … in
 * order); with them, letters are checked against the options and `answer_text` is filled.
 */
export function parseAnswer(raw: string, options?: readonly string[]): ParsedAnswer {
  const output = typeof raw === "string" ? raw : "";
  const opts =
    Array.isArray(options) && options.every((o) => typeof o === "string") ? (options as readonly string[]) : undefined;
  const { reasoning, closed } = extractReasoning(output);
  const reference = referenceLetter(output);
  const formatOkFlag = formatOk(output);
  const result = (
    index: number | null,
    letterValid: boolean | null,
    fallback: AnswerFallbackKind | null,
  ): ParsedAnswer => ({
    answer: index === null ? null : String.fromCharCode(0x41 + index),
    answer_index: index,
    answer_text: index !== null && opts ? (opts[index] as string) : null,
    reference_answer: reference,
    reasoning,
    reasoning_closed: closed,
    format_ok: formatOkFlag,
    letter_valid: letterValid,
    fallback,
  });
  const pick = (index: number, fallback: AnswerFallbackKind | null): ParsedAnswer =>
    result(index, opts ? true : null, fallback);

  if (reference !== null) {
    const index = reference.charCodeAt(0) - 0x41;
    if (!opts) return pick(index, null);
    return index < opts.length ? pick(index, null) : result(null, false, null);
  }
  const ctx: Ctx = {
    n: opts ? Math.min(opts.length, 26) : OPTION_LETTERS.length,
    keys: opts?.map(optionKey),
  };
  const fb = fallbackAnswer(output, ctx);
  return fb ? pick(fb.index, fb.kind) : result(null, null, null);
}

import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  formatOk,
  isPythonWhitespace,
  parseAnswer,
  referenceLetter,
  type ParsedAnswer,
} from "../../shared/src/answer.ts";

const OPTS = ["Cardiac tissue", "Breast tissue", "Liver tissue", "Skin tissue"];

/** Python 3 `\s` (str patterns) as a JS character class: the oracle for the hand-written scanners. */
const PYWS = "[\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const REF_RE = new RegExp(`<answer>${PYWS}*([A-Z])${PYWS}*</answer>`);
const FORMAT_RE = new RegExp(`^<think>[^]*?</think>${PYWS}*<answer>[^]*?</answer>$`);

// [output, Python's re.search(...).group(1), bool(re.fullmatch(...))], computed with CPython 3.11.
const PYTHON_TABLE: [string, string | null, boolean][] = [
  ["<think>x</think><answer>B</answer>", "B", true],
  ["<think>x</think>\n<answer> C \n</answer>", "C", true],
  ["<think>x</think>\n<answer>B</answer>\n", "B", false],
  [" <think>x</think><answer>B</answer>", "B", false],
  ["<think>x</think> text <answer>B</answer>", "B", false],
  ["<think>a</think><answer>x</answer></think> <answer>y</answer>", null, true],
  ["<think></think><answer></answer>", null, true],
  ["<think>x</think><answer>b</answer>", null, true],
  ["<answer>AB</answer><answer>D</answer>", "D", false],
  ["<answer>\u001cA\u0085</answer>", "A", false],
  ["<answer>\ufeffA</answer>", null, false],
  ["<answer>\u3000A\u2028</answer>", "A", false],
  ["<think>x</think>\u001f<answer>A</answer>", "A", true],
  ["<think>x</think>\ufeff<answer>A</answer>", "A", false],
  ["<answer><answer>E</answer>", "E", false],
  ["<answer>\u00c9</answer>", null, false],
  ["<think><answer>A</think></answer>", null, false],
  ["<think>x<think>y</think></think>\n<answer>Z</answer>", "Z", true],
];

describe("reference rules (exact parity with the Python regexes)", () => {
  it.each(PYTHON_TABLE)("%j → letter %s, format %s", (s, letter, fmt) => {
    expect(referenceLetter(s)).toBe(letter);
    expect(formatOk(s)).toBe(fmt);
    const p = parseAnswer(s);
    expect(p.reference_answer).toBe(letter);
    expect(p.format_ok).toBe(fmt);
  });

  it("Python's \\s differs from JS's: U+001C–U+001F and U+0085 are in, U+FEFF is out", () => {
    for (const c of [0x1c, 0x1d, 0x1e, 0x1f, 0x85, 0x20, 0x09, 0x3000]) expect(isPythonWhitespace(c)).toBe(true);
    for (const c of [0xfeff, 0x180e, 0x200b, 0x41, 0x00]) expect(isPythonWhitespace(c)).toBe(false);
    // Consistency with the oracle class over the whole BMP.
    const re = new RegExp(`^${PYWS}$`);
    const mismatches: number[] = [];
    for (let c = 0; c < 0x10000; c++) if (isPythonWhitespace(c) !== re.test(String.fromCharCode(c))) mismatches.push(c);
    expect(mismatches).toEqual([]);
  });

  const atom = fc.constantFrom(
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "A",
    "Q",
    "b",
    " ",
    "\n",
    "\u001c",
    "\u0085",
    "\ufeff",
    "\u3000",
    "<",
    "x",
    "😀",
  );
  const soup = fc.array(atom, { maxLength: 16 }).map((a) => a.join(""));

  it("agree with the regex oracles on random tag soup", () => {
    fc.assert(
      fc.property(soup, (s) => {
        expect(referenceLetter(s)).toBe(REF_RE.exec(s)?.[1] ?? null);
        expect(formatOk(s)).toBe(FORMAT_RE.test(s));
      }),
      { numRuns: 2000 },
    );
  });

  it("agree with the regex oracles on well-formed-ish replies", () => {
    const ws = fc.array(fc.constantFrom(" ", "\n", "\t", "\u001c", "\ufeff", "\u2028"), { maxLength: 3 }).map((a) => a.join(""));
    const reply = fc
      .tuple(fc.constantFrom("<think>", "", " <think>"), soup, fc.constantFrom("</think>", ""), ws, fc.constantFrom("<answer>", "<ANSWER>"), ws, fc.constantFrom("A", "J", "z", "", "AB"), ws, fc.constantFrom("</answer>", ""), fc.constantFrom("", "\n", "x"))
      .map((parts) => parts.join(""));
    fc.assert(
      fc.property(reply, (s) => {
        expect(referenceLetter(s)).toBe(REF_RE.exec(s)?.[1] ?? null);
        expect(formatOk(s)).toBe(FORMAT_RE.test(s));
      }),
      { numRuns: 2000 },
    );
  });
});

describe("parseAnswer: letter against the options", () => {
  it("fills answer, index and text for a valid reference letter", () => {
    expect(parseAnswer("<think>\nThe image shows breast tissue.\n</think>\n<answer>B</answer>", OPTS)).toEqual({
      answer: "B",
      answer_index: 1,
      answer_text: "Breast tissue",
      reference_answer: "B",
      reasoning: "The image shows breast tissue.",
      reasoning_closed: true,
      format_ok: true,
      letter_valid: true,
      fallback: null,
    } satisfies ParsedAnswer);
  });

  it("keeps an out-of-range letter only as reference_answer (eval parity) and marks it invalid", () => {
    const p = parseAnswer("<think>x</think><answer>E</answer>", OPTS);
    expect(p.reference_answer).toBe("E");
    expect(p.answer).toBeNull();
    expect(p.answer_text).toBeNull();
    expect(p.letter_valid).toBe(false);
    expect(p.fallback).toBeNull();
  });

  it("without options accepts any reference letter and leaves validity unknown", () => {
    const p = parseAnswer("<answer>Q</answer>");
    expect([p.answer, p.answer_index, p.answer_text, p.letter_valid]).toEqual(["Q", 16, null, null]);
  });

  it("reports no letter as null validity", () => {
    const p = parseAnswer("I cannot tell.", OPTS);
    expect([p.answer, p.reference_answer, p.letter_valid, p.fallback]).toEqual([null, null, null, null]);
  });

  it("uses the first strict match, as re.search does", () => {
    expect(parseAnswer("<answer>A</answer><answer>B</answer>", OPTS).answer).toBe("A");
    expect(parseAnswer("<answer>maybe</answer><answer>C</answer>", OPTS).answer).toBe("C");
  });
});

describe("parseAnswer: reasoning", () => {
  it("takes the first closed <think> block, trimmed", () => {
    const p = parseAnswer("<think> one </think><think>two</think><answer>A</answer>");
    expect([p.reasoning, p.reasoning_closed]).toEqual(["one", true]);
  });

  it("returns the unclosed remainder up to <answer> and flags it", () => {
    expect(parseAnswer("<think>cut off mid-sen").reasoning).toBe("cut off mid-sen");
    const p = parseAnswer("<think>no close <answer>A</answer>");
    expect([p.reasoning, p.reasoning_closed, p.answer]).toEqual(["no close", false, "A"]);
  });

  it("is null without <think>", () => {
    expect(parseAnswer("<answer>A</answer>")).toMatchObject({ reasoning: null, reasoning_closed: null });
  });
});

describe("parseAnswer: tolerant fallback", () => {
  it.each([
    ["<think>x</think><answer>b</answer>", "B", "answer_tag_letter"],
    ["<think>x</think><answer>(C)</answer>", "C", "answer_tag_letter"],
    ["<think>x</think><answer>C.</answer>", "C", "answer_tag_letter"],
    ["<think>x</think><answer>Option D</answer>", "D", "answer_tag_letter"],
    ["<think>x</think><answer>The answer is: a</answer>", "A", "answer_tag_letter"],
    ["<think>x</think><ANSWER>C</ANSWER>", "C", "answer_tag_letter"],
    ["<think>x</think><answer>\ufeffA</answer>", "A", "answer_tag_letter"],
    ["<think>x</think><answer>B) Breast tissue</answer>", "B", "answer_tag_letter_text"],
    ["<think>x</think><answer>B. breast</answer>", "B", "answer_tag_letter_text"],
    ["<think>x</think><answer>Breast tissue</answer>", "B", "answer_tag_option_text"],
    ['<think>x</think><answer> "skin   TISSUE." </answer>', "D", "answer_tag_option_text"],
    ["<think>x</think><answer>c", "C", "unclosed_answer_tag_letter"],
    ["<think>x</think><answer>A) Cardiac", "A", "unclosed_answer_tag_letter_text"],
    ["<think>x</think><answer>Liver tissue", "C", "unclosed_answer_tag_option_text"],
    ["After review, the answer is B.", "B", "answer_phrase"],
    ["Answer: (C)", "C", "answer_phrase"],
    ["Final answer: **D**\n", "D", "answer_phrase"],
    ["answer is A. On reflection the correct answer is option C (Liver tissue)", "C", "answer_phrase"],
    ["B", "B", "bare_letter"],
    ["Answer B", "B", "bare_letter"],
    ["<think>hmm</think>\n(d)", "D", "bare_letter"],
    ["<think>hmm</think>\nB) Breast tissue", "B", "bare_letter_text"],
    ["<think>hmm</think>\nLiver tissue.", "C", "option_text"],
  ] as const)("%j → %s via %s", (s, letter, kind) => {
    const p = parseAnswer(s, OPTS);
    expect(p.answer).toBe(letter);
    expect(p.fallback).toBe(kind);
    expect(p.reference_answer).toBeNull();
    expect(p.letter_valid).toBe(true);
    expect(p.answer_text).toBe(OPTS[letter.charCodeAt(0) - 65]);
  });

  it.each([
    // Letter text contradicting the letter.
    "<think>x</think><answer>B) Liver tissue</answer>",
    // Letters outside the offered options.
    "<think>x</think><answer>f</answer>",
    "Answer: E",
    // A sentence, not an answer: letter followed by more words, or an article.
    "Answer: B because the tissue is dense",
    "The answer is a fracture",
    // No "is"/":" linking inside a sentence.
    "I would answer B if forced",
    // Text shared by two options is ambiguous.
    "<answer>same</answer>",
    // Words that merely contain an option are not that option.
    "<think>x</think>\nThis looks like breast tissue to me",
    // Untagged letter + text that is not that letter's option reads as prose.
    "A. The image shows a lesion.",
    "<think>x</think>\nB) Liver tissue",
  ])("recovers nothing from %j", (s) => {
    const opts = s.includes("same") ? ["same", "same", "other"] : OPTS;
    const p = parseAnswer(s, opts);
    expect(p.answer).toBeNull();
    expect(p.fallback).toBeNull();
  });

  it("without options accepts only A–J in fallbacks", () => {
    expect(parseAnswer("<answer>j</answer>").answer).toBe("J");
    expect(parseAnswer("<answer>k</answer>").answer).toBeNull();
    expect(parseAnswer("Answer: I think so").answer).toBeNull();
  });

  it("never applies a fallback when the strict rule found a letter, even an invalid one", () => {
    const p = parseAnswer("<answer>F</answer> Answer: B", OPTS);
    expect([p.answer, p.reference_answer, p.letter_valid, p.fallback]).toEqual([null, "F", false, null]);
  });
});

describe("parseAnswer: robustness", () => {
  it("never throws on non-string input or odd options", () => {
    const bad = [null, undefined, 5, {}, ["<answer>A</answer>"]] as unknown[];
    for (const raw of bad) expect(parseAnswer(raw as string).answer).toBeNull();
    expect(parseAnswer("<answer>A</answer>", "AB" as unknown as string[]).answer_text).toBeNull();
    expect(parseAnswer("<answer>A</answer>", [1, 2] as unknown as string[]).letter_valid).toBeNull();
    expect(parseAnswer("<answer>A</answer>", []).letter_valid).toBe(false);
  });

  const anyText = fc.oneof(
    fc.string({ unit: "binary", maxLength: 200 }),
    fc.string({ unit: "grapheme", maxLength: 100 }),
    fc
      .array(
        fc.constantFrom(
          "<answer>",
          "</answer>",
          "<ANSWER>",
          "<think>",
          "</think>",
          "Answer:",
          " answer is ",
          "option ",
          "A",
          "b",
          "J",
          "(",
          ")",
          ".",
          "*",
          '"',
          " ",
          "\n",
          "\u2028",
          "\u001c",
          "Breast tissue",
          "breast",
          "\ud800",
          "😀",
        ),
        { maxLength: 30 },
      )
      .map((a) => a.join("")),
  );
  const options = fc.option(
    fc.array(fc.constantFrom("Breast tissue", "MRI", "CT", "a", "", "Skin tissue", "😀", "B"), { minLength: 0, maxLength: 10 }),
    { nil: undefined },
  );

  it("satisfies its invariants on arbitrary input", () => {
    fc.assert(
      fc.property(anyText, options, (s, opts) => {
        const p = parseAnswer(s, opts);
        expect(p.reference_answer).toBe(REF_RE.exec(s)?.[1] ?? null);
        expect(p.format_ok).toBe(FORMAT_RE.test(s));
        expect(p.answer === null).toBe(p.answer_index === null);
        if (p.answer !== null) expect(p.answer.charCodeAt(0) - 65).toBe(p.answer_index);
        if (p.fallback !== null) {
          expect(p.reference_answer).toBeNull();
          expect(p.answer).not.toBeNull();
        }
        if (p.reference_answer !== null) {
          expect(p.fallback).toBeNull();
          const inRange = !opts || p.reference_answer.charCodeAt(0) - 65 < opts.length;
          expect(p.answer).toBe(inRange ? p.reference_answer : null);
        }
        if (opts) {
          expect(p.letter_valid).toBe(p.answer !== null ? true : p.reference_answer !== null ? false : null);
          expect(p.answer_text).toBe(p.answer_index === null ? null : opts[p.answer_index]);
          if (p.fallback !== null) expect(p.answer_index!).toBeLessThan(opts.length);
        } else {
          expect(p.letter_valid).toBeNull();
          expect(p.answer_text).toBeNull();
          if (p.fallback !== null) expect(p.answer_index!).toBeLessThan(10);
        }
        if (p.reasoning !== null) expect(s).toContain("<think>");
      }),
      { numRuns: 1500 },
    );
  });

  const MB = 1 << 20;
  const adversarial: Record<string, string> = {
    spaces: " ".repeat(MB),
    pythonSpaces: "\u001c".repeat(MB),
    openThenSpaces: "<answer>" + " ".repeat(MB),
    openSpacesLetterSpaces: "<answer> " + "\u3000".repeat(MB / 2) + "B" + " ".repeat(MB / 2),
    manyOpens: "<answer>".repeat(MB / 8),
    manyOpensWithLetters: "<answer> B ".repeat(MB / 11),
    manyThinkCloses: "<think>" + "</think> ".repeat(MB / 9) + "</answer>",
    thinkClosesNewlines: "<think>" + "</think>\n\n\n\n\n\n\n\n".repeat(MB / 16) + "<answer",
    nestedUnclosed: "<think>".repeat(MB / 7),
    answerPhrases: "answer is ".repeat(MB / 10),
    answerColonSpaces: "answer:" + " ".repeat(MB) + "x",
    answerPhraseLetters: "Answer: B ".repeat(MB / 10) + " x",
    closingParens: "<answer>B" + ")".repeat(MB),
    openingParens: "<answer>" + "(".repeat(MB),
    stars: "<answer>" + "*".repeat(MB) + "</answer>",
    periods: "<answer>" + ". ".repeat(MB / 2) + "</answer>",
    prefixes: "<answer>the answer is " + " the answer is".repeat(MB / 14),
    quotes: '"'.repeat(MB) + "x",
    lessThan: "<".repeat(MB),
    unicode: "😀é\u2028\u3000\ufeff".repeat(MB / 6),
    loneSurrogates: "\ud800<answer>\udc00".repeat(MB / 10),
    tail: "</think>" + " a".repeat(MB / 2),
    soup: "<think><think><answer><answer></think></answer>".repeat(MB / 48),
  };

  it.each(Object.entries(adversarial))("1 MB adversarial input %s parses in linear time", (_name, s) => {
    const t0 = performance.now();
    parseAnswer(s, OPTS);
    parseAnswer(s);
    // A quadratic scan of 1 MB takes minutes; linear takes well under a second even on a busy machine.
    expect(performance.now() - t0).toBeLessThan(3000);
  });
});

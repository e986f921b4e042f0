/**
 * The MedVLM-R1 multiple-choice prompt, byte for byte as the model was trained and evaluated
 * (JZPeterPan/MedVLM-R1 `src/eval/test_qwen2vl_med.py`, prompt type "complex", and `demo.ipynb`):
 * the problem is `question + "\n" + "A) opt\nB) opt…"` (as the training data's `create_problem_solution`
 * builds it) and goes into the indented `QUESTION_TEMPLATE`, sent as one user turn after the images.
 */
import { ApiError } from "./errors.ts";
import type { ChatMessage, ContentItem } from "./chat-template.ts";

/**
 * The repository's indented template. Every line after the first `\n` is indented by 4 spaces (it was a
 * triple-quoted string inside indented Python code), there is a space before each line break on the
 * first three lines, and it ends with `"\n    "`. An un-indented variant circulates in model-card copies;
 * it is NOT what the model was evaluated with.
 */
export const QUESTION_TEMPLATE =
  "\n    {Question} \n    Your task: \n" +
  "    1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags. \n" +
  "    2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.\n" +
  "    3. No extra information or text outside of these tags.\n    ";

/** Option letters, in order; the training code supports up to 10 options (A–J). */
export const OPTION_LETTERS = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"] as const;

/** One option letter. */
export type OptionLetter = (typeof OPTION_LETTERS)[number];

/** Fewest options a question may have. */
export const MIN_OPTIONS = 2;
/** Most options a question may have (= `OPTION_LETTERS.length`). */
export const MAX_OPTIONS = OPTION_LETTERS.length;

/**
 * `question + "\n" + "A) opt\nB) opt…"`, exactly as the training/eval data was built. The texts are used
 * verbatim (no trimming), so a request reproduces the reference prompt byte for byte.
 * Throws `invalid_question` for a non-string or blank question, `invalid_options` for fewer than 2 or
 * more than 10 options, or a non-string or blank option.
 */
export function formatProblem(question: string, options: readonly string[]): string {
  if (typeof question !== "string" || question.trim() === "") {
    throw new ApiError("invalid_question", "question must be a non-empty string");
  }
  if (!Array.isArray(options)) {
    throw new ApiError("invalid_options", "options must be a list of strings");
  }
  if (options.length < MIN_OPTIONS || options.length > MAX_OPTIONS) {
    throw new ApiError(
      "invalid_options",
      `between ${MIN_OPTIONS} and ${MAX_OPTIONS} options are required, got ${options.length}`,
    );
  }
  const lines = options.map((opt: unknown, i) => {
    if (typeof opt !== "string" || opt.trim() === "") {
      throw new ApiError("invalid_options", `option ${OPTION_LETTERS[i]} must be a non-empty string`);
    }
    return `${OPTION_LETTERS[i]}) ${opt}`;
  });
  return `${question}\n${lines.join("\n")}`;
}

/**
 * `QUESTION_TEMPLATE.format(Question=problem)`: the problem is inserted verbatim (like Python's
 * str.format, no `$` patterns or braces in the problem are interpreted).
 */
export function renderQuestion(problem: string): string {
  const at = QUESTION_TEMPLATE.indexOf("{Question}");
  return QUESTION_TEMPLATE.slice(0, at) + problem + QUESTION_TEMPLATE.slice(at + "{Question}".length);
}

/** Input of {@link buildVqaMessages}. */
export interface VqaInput {
  question: string;
  options: readonly string[];
  /** Number of images, all placed before the text (as in the reference). 0 for a text-only question. */
  imageCount: number;
}

/**
 * HF-format messages for one MedVLM-R1 question: ONE user turn whose content is `imageCount`
 * `{type:"image"}` items followed by `{type:"text", text: renderQuestion(formatProblem(...))}`. No system
 * message (the chat template inserts its default one, as in the reference evaluation).
 * Throws `invalid_parameter` when `imageCount` is not a non-negative integer.
 */
export function buildVqaMessages(input: VqaInput): ChatMessage[] {
  const { imageCount } = input;
  if (typeof imageCount !== "number" || !Number.isSafeInteger(imageCount) || imageCount < 0) {
    throw new ApiError("invalid_parameter", `imageCount must be a non-negative integer, got ${String(imageCount)}`);
  }
  const text = renderQuestion(formatProblem(input.question, input.options));
  const content: ContentItem[] = [];
  for (let i = 0; i < imageCount; i++) content.push({ type: "image" });
  content.push({ type: "text", text });
  return [{ role: "user", content }];
}

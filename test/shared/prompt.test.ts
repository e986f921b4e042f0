import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { renderChatTemplate, type ChatMessage } from "../../shared/src/chat-template.ts";
import {
  buildVqaMessages,
  formatProblem,
  MAX_OPTIONS,
  MIN_OPTIONS,
  OPTION_LETTERS,
  QUESTION_TEMPLATE,
  renderQuestion,
} from "../../shared/src/prompt.ts";
import { GOLDEN_DIR, loadGoldenCases, type GoldenCase } from "../support/golden.ts";
import { codeOf } from "../support/errors.ts";

const runInfo = JSON.parse(readFileSync(join(GOLDEN_DIR, "cases-a", "run_info.json"), "utf8")) as {
  environment: { question_template_repo: string; question_template_brief: string };
};
const cases = loadGoldenCases();


/** The golden user text of a case (string content, or its single text item). */
function goldenText(c: GoldenCase): string {
  const content = c.messages[0]!.content;
  if (typeof content === "string") return content;
  const texts = content.filter((i) => i.type === "text");
  expect(texts).toHaveLength(1);
  return texts[0]!.text as string;
}

/** Recovers question and options from a golden text, independently of formatProblem. */
function deriveQuestion(text: string): { question: string; options: string[] } {
  const [head, tail] = runInfo.environment.question_template_repo.split("{Question}") as [string, string];
  expect(text.startsWith(head)).toBe(true);
  expect(text.endsWith(tail)).toBe(true);
  const lines = text.slice(head.length, text.length - tail.length).split("\n");
  const options = lines.slice(1).map((line, i) => {
    expect(line.startsWith(`${"ABCDEFGHIJ"[i]}) `)).toBe(true);
    return line.slice(3);
  });
  return { question: lines[0]!, options };
}

describe("QUESTION_TEMPLATE", () => {
  it("is byte-identical to the repository's indented template used for the golden run", () => {
    expect(QUESTION_TEMPLATE).toBe(runInfo.environment.question_template_repo);
    for (const c of cases) expect(QUESTION_TEMPLATE).toBe(c.question_template);
    expect(QUESTION_TEMPLATE).not.toBe(runInfo.environment.question_template_brief);
  });

  it("has every line after the first indented by 4 spaces and ends with a newline and 4 spaces", () => {
    const lines = QUESTION_TEMPLATE.split("\n");
    expect(lines[0]).toBe("");
    for (const line of lines.slice(1)) expect(line.startsWith("    ")).toBe(true);
    expect(QUESTION_TEMPLATE.endsWith("\n    ")).toBe(true);
    expect(QUESTION_TEMPLATE.split("{Question}")).toHaveLength(2);
  });
});

describe("golden cases rebuilt from question + options", () => {
  it.each(cases.map((c) => [c.case, c] as const))("%s: text and chat prompt match byte for byte", (_name, c) => {
    const text = goldenText(c);
    const { question, options } = deriveQuestion(text);
    expect(options.length).toBeGreaterThanOrEqual(2);
    expect(renderQuestion(formatProblem(question, options))).toBe(text);

    const imageCount = c.images.length;
    const messages = buildVqaMessages({ question, options, imageCount });
    expect(messages).toHaveLength(1);
    expect(messages[0]!.role).toBe("user");
    const content = messages[0]!.content as Exclude<ChatMessage["content"], string>;
    expect(content.map((i) => i.type)).toEqual([...Array<string>(imageCount).fill("image"), "text"]);
    expect(content[imageCount]!.text).toBe(text);
    // Same prompt as the reference run (images first, no system message → template default).
    expect(renderChatTemplate(messages, { addGenerationPrompt: true })).toBe(c.prompt_text);
  });

  it("covers all six golden cases, including the text-only one", () => {
    expect(cases.map((c) => c.case)).toEqual(["case_01", "case_02", "case_03", "case_04", "case_05", "case_06"]);
    expect(cases.filter((c) => c.images.length === 0)).toHaveLength(1);
  });
});

describe("formatProblem", () => {
  it("joins question and lettered options with single newlines", () => {
    expect(formatProblem("Q?", ["x", "y"])).toBe("Q?\nA) x\nB) y");
  });

  it("supports 2 to 10 options, lettered A–J", () => {
    expect(OPTION_LETTERS.join("")).toBe("ABCDEFGHIJ");
    expect([MIN_OPTIONS, MAX_OPTIONS]).toEqual([2, 10]);
    const ten = Array.from({ length: 10 }, (_, i) => `o${i}`);
    expect(formatProblem("q", ten).split("\n").slice(1)).toEqual(ten.map((o, i) => `${"ABCDEFGHIJ"[i]}) ${o}`));
  });

  it("keeps texts verbatim (no trimming or escaping)", () => {
    expect(formatProblem(" q {x} $& ", [" a ", "b\tc"])).toBe(" q {x} $& \nA)  a \nB) b\tc");
  });

  it("rejects bad option lists with invalid_options", () => {
    expect(codeOf(() => formatProblem("q", ["only"]))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", []))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", Array.from({ length: 11 }, () => "x")))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", ["a", ""]))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", ["a", "  \n"]))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", ["a", 3 as unknown as string]))).toBe("invalid_options");
    expect(codeOf(() => formatProblem("q", "ab" as unknown as string[]))).toBe("invalid_options");
  });

  it("rejects a missing or blank question with invalid_question", () => {
    expect(codeOf(() => formatProblem("", ["a", "b"]))).toBe("invalid_question");
    expect(codeOf(() => formatProblem(" \n\t", ["a", "b"]))).toBe("invalid_question");
    expect(codeOf(() => formatProblem(undefined as unknown as string, ["a", "b"]))).toBe("invalid_question");
  });
});

describe("renderQuestion", () => {
  it("inserts the problem verbatim, like str.format (no $-patterns, no nested placeholders)", () => {
    const problem = "a $& $1 $$ {Question} b";
    const out = renderQuestion(problem);
    expect(out).toBe(QUESTION_TEMPLATE.replace("{Question}", () => problem));
    expect(out.startsWith(`\n    ${problem} \n    Your task: \n`)).toBe(true);
  });
});

describe("buildVqaMessages", () => {
  it("with no images renders the same prompt as the text-only golden case's string content", () => {
    const c = cases.find((x) => x.images.length === 0)!;
    const { question, options } = deriveQuestion(goldenText(c));
    const messages = buildVqaMessages({ question, options, imageCount: 0 });
    expect(messages[0]!.content).toEqual([{ type: "text", text: goldenText(c) }]);
    expect(renderChatTemplate(messages, { addGenerationPrompt: true })).toBe(c.prompt_text);
  });

  it("rejects a bad imageCount with invalid_parameter and propagates option/question errors", () => {
    for (const n of [-1, 1.5, Number.NaN, "2" as unknown as number]) {
      expect(codeOf(() => buildVqaMessages({ question: "q", options: ["a", "b"], imageCount: n }))).toBe(
        "invalid_parameter",
      );
    }
    expect(codeOf(() => buildVqaMessages({ question: "q", options: ["a"], imageCount: 1 }))).toBe("invalid_options");
    expect(codeOf(() => buildVqaMessages({ question: "", options: ["a", "b"], imageCount: 1 }))).toBe(
      "invalid_question",
    );
  });
});

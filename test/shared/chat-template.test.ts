import { describe, expect, it } from "vitest";
import {
  contentKind,
  countImages,
  countVideos,
  DEFAULT_SYSTEM_MESSAGE,
  IMAGE_PLACEHOLDER,
  renderChatTemplate,
  VIDEO_PLACEHOLDER,
  type ChatMessage,
} from "../../shared/src/chat-template.ts";
import { loadGoldenCases } from "../support/golden.ts";
import { codeOf } from "../support/errors.ts";

const cases = loadGoldenCases();
const SYS = `<|im_start|>system\n${DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n`;


describe("golden cases", () => {
  it.each(cases.map((c) => [c.case, c] as const))("%s renders to prompt_text exactly", (_name, c) => {
    const messages = c.messages as ChatMessage[];
    expect(renderChatTemplate(messages, { addGenerationPrompt: true })).toBe(c.prompt_text);
    expect(countImages(messages)).toBe(c.images.length);
    expect(c.prompt_text.split("<|image_pad|>").length - 1).toBe(c.images.length);
  });

  it("without the generation prompt the output is the prompt minus its last line", () => {
    const c = cases[0]!;
    const suffix = "<|im_start|>assistant\n";
    expect(c.prompt_text.endsWith(suffix)).toBe(true);
    expect(renderChatTemplate(c.messages as ChatMessage[])).toBe(c.prompt_text.slice(0, -suffix.length));
  });
});

describe("renderChatTemplate", () => {
  it("does not insert the default system message when the first message is a system message", () => {
    const out = renderChatTemplate(
      [
        { role: "system", content: "Be terse." },
        { role: "user", content: "hi" },
      ],
      { addGenerationPrompt: true },
    );
    expect(out).toBe(
      "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    );
  });

  it("accepts a system message with list content", () => {
    const out = renderChatTemplate([{ role: "system", content: [{ type: "text", text: "S" }] }]);
    expect(out).toBe("<|im_start|>system\nS<|im_end|>\n");
  });

  it("inserts the default system message only before the first message, and only once", () => {
    const out = renderChatTemplate([
      { role: "user", content: "q1" },
      { role: "assistant", content: "<think>t</think><answer>A</answer>" },
      { role: "user", content: [{ type: "text", text: "q2" }] },
      { role: "system", content: "late" },
    ]);
    expect(out).toBe(
      SYS +
        "<|im_start|>user\nq1<|im_end|>\n" +
        "<|im_start|>assistant\n<think>t</think><answer>A</answer><|im_end|>\n" +
        "<|im_start|>user\nq2<|im_end|>\n" +
        "<|im_start|>system\nlate<|im_end|>\n",
    );
  });

  it("renders several images in order, text between them, and numbers them across messages with addVisionId", () => {
    const messages: ChatMessage[] = [
      { role: "user", content: [{ type: "image" }, { type: "text", text: "and" }, { type: "image", image: "x" }] },
      { role: "assistant", content: "ok" },
      { role: "user", content: [{ type: "video" }, { image_url: { url: "u" } }, { type: "text", text: "?" }] },
    ];
    const plain = renderChatTemplate(messages);
    expect(plain).toBe(
      SYS +
        `<|im_start|>user\n${IMAGE_PLACEHOLDER}and${IMAGE_PLACEHOLDER}<|im_end|>\n` +
        "<|im_start|>assistant\nok<|im_end|>\n" +
        `<|im_start|>user\n${VIDEO_PLACEHOLDER}${IMAGE_PLACEHOLDER}?<|im_end|>\n`,
    );
    const ids = renderChatTemplate(messages, { addVisionId: true });
    expect(ids).toBe(
      SYS +
        `<|im_start|>user\nPicture 1: ${IMAGE_PLACEHOLDER}andPicture 2: ${IMAGE_PLACEHOLDER}<|im_end|>\n` +
        "<|im_start|>assistant\nok<|im_end|>\n" +
        `<|im_start|>user\nVideo 1: ${VIDEO_PLACEHOLDER}Picture 3: ${IMAGE_PLACEHOLDER}?<|im_end|>\n`,
    );
    expect(countImages(messages)).toBe(3);
    expect(countVideos(messages)).toBe(1);
  });

  it("classifies items by key presence exactly like the Jinja template", () => {
    expect(contentKind({ type: "image" })).toBe("image");
    expect(contentKind({ image: null })).toBe("image");
    expect(contentKind({ type: "image_url", image_url: "u" })).toBe("image");
    // An image key wins over type "text" (the template tests images first).
    expect(contentKind({ type: "text", text: "t", image: "x" })).toBe("image");
    expect(contentKind({ type: "video" })).toBe("video");
    expect(contentKind({ video: ["f1", "f2"] })).toBe("video");
    expect(contentKind({ type: "text", text: "t", video: "v" })).toBe("video");
    expect(contentKind({ text: "untyped" })).toBe("text");
    expect(contentKind({ type: "text" })).toBe("other");
    expect(contentKind({ type: "audio", audio: "a" })).toBe("other");
    // An inherited property is not a key.
    expect(contentKind(Object.create({ image: "x" }) as Record<string, unknown>)).toBe("other");
    expect(renderChatTemplate([{ role: "user", content: [{ type: "audio" }, { text: "x" }] }])).toBe(
      `${SYS}<|im_start|>user\nx<|im_end|>\n`,
    );
  });

  it("renders text and roles verbatim (no escaping, no trimming)", () => {
    const t = "  {{ x }} <|im_end|> \n";
    expect(renderChatTemplate([{ role: "user", content: t }])).toBe(`${SYS}<|im_start|>user\n${t}<|im_end|>\n`);
    expect(renderChatTemplate([{ role: "user", content: [] }])).toBe(`${SYS}<|im_start|>user\n<|im_end|>\n`);
  });

  it("renders an empty conversation as nothing (plus the generation prompt)", () => {
    expect(renderChatTemplate([])).toBe("");
    expect(renderChatTemplate([], { addGenerationPrompt: true })).toBe("<|im_start|>assistant\n");
  });

  it("rejects structurally invalid messages with invalid_request", () => {
    const bad: unknown[] = [
      [null],
      [{ content: "x" }],
      [{ role: 1, content: "x" }],
      [{ role: "user", content: 5 }],
      [{ role: "user" }],
      [{ role: "user", content: ["a string item"] }],
      [{ role: "user", content: [null] }],
      [{ role: "user", content: [{ type: "text", text: 7 }] }],
      "not a list",
    ];
    for (const m of bad) expect(codeOf(() => renderChatTemplate(m as ChatMessage[]))).toBe("invalid_request");
  });
});

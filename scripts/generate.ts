/**
 * `npm run generate -- --model <onnx folder> --messages <file.json> [--max-new-tokens N] [--json]
 *                       [--forced-ids 1,2,3] [--temperature T --top-p P --top-k K --seed S] [--stop STR]
 *                       [--draft-tokens K]`
 *
 * Runs MedVLM-R1 on a messages file in the Hugging Face / qwen_vl_utils chat format (`{"messages": [...]}`;
 * image items `{"type":"image","image":"<path relative to the file, or absolute>","min_pixels":…,"max_pixels":…}`, or with
 * `"resized_height":…,"resized_width":…`).
 * Streams the generated text, or with `--json` prints one JSON object on one line (ids, grids, positions,
 * generated ids, text, parsed answer, timings). `--forced-ids` scores a given continuation instead of
 * sampling and adds the top-5 `[id, logit]` of each step (the golden `forced_decode` shape). `--draft-tokens K`
 * decodes speculatively (prompt-lookup drafts of up to K tokens checked per decoder pass; the same tokens) and
 * reports the drafts kept.
 */
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { parseArgs } from "node:util";
import { parseAnswer } from "../shared/src/answer.ts";
import { DEFAULT_PARAMS } from "../shared/src/wire.ts";
import { loadModel, releaseModel } from "../gpu-backend/src/engine/model.ts";
import { buildPrompt, createTokenizer } from "../gpu-backend/src/engine/prompt.ts";
import { runGeneration } from "../gpu-backend/src/engine/run.ts";
import { getRopeIndex } from "../gpu-backend/src/engine/rope-index.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    messages: { type: "string" },
    "max-new-tokens": { type: "string" },
    json: { type: "boolean", default: false },
    "forced-ids": { type: "string" },
    temperature: { type: "string" },
    "top-p": { type: "string" },
    "top-k": { type: "string" },
    "repetition-penalty": { type: "string" },
    seed: { type: "string" },
    stop: { type: "string", multiple: true },
    "draft-tokens": { type: "string" },
    threads: { type: "string" },
    provider: { type: "string" },
  },
});

function fail(msg: string): never {
  process.stderr.write(`generate: ${msg}\n`);
  process.exit(2);
}

function num(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) fail(`--${name} must be a number`);
  return n;
}

if (!values.model || !values.messages) fail("usage: npm run generate -- --model <onnx folder> --messages <file.json> [--json]");
const messagesPath = resolve(values.messages);
let file: { messages?: unknown };
try {
  file = JSON.parse(await readFile(messagesPath, "utf8"));
} catch (e) {
  fail(`cannot read ${messagesPath}: ${(e as Error).message}`);
}
if (!Array.isArray(file.messages)) fail(`${messagesPath} must hold {"messages": [...]}`);

const model = await loadModel(resolve(values.model), {
  executionProvider: values.provider === "cuda" ? "cuda" : "cpu",
  ...(values.threads ? { intraOpThreads: Number(values.threads) } : {}),
});
const tokenizer = createTokenizer(model);
const prompt = await buildPrompt(model, tokenizer, file.messages, dirname(messagesPath));
const forcedIds = values["forced-ids"]?.split(",").map((s) => {
  const n = Number(s.trim());
  if (!Number.isSafeInteger(n) || n < 0) fail("--forced-ids must be comma-separated token ids");
  return n;
});
const params = {
  ...DEFAULT_PARAMS,
  max_new_tokens: num("max-new-tokens", values["max-new-tokens"]) ?? (forcedIds ? forcedIds.length : DEFAULT_PARAMS.max_new_tokens),
  temperature: num("temperature", values.temperature) ?? 0,
  top_p: num("top-p", values["top-p"]) ?? 1,
  top_k: num("top-k", values["top-k"]) ?? 0,
  repetition_penalty: num("repetition-penalty", values["repetition-penalty"]) ?? 1,
  seed: num("seed", values.seed) ?? null,
  stop: values.stop ?? [],
};

const draftTokens = num("draft-tokens", values["draft-tokens"]) ?? 0;
if (!Number.isInteger(draftTokens) || draftTokens < 0) fail("--draft-tokens must be an integer ≥ 0");
const result = await runGeneration(model, prompt, params, {
  draftTokens,
  ...(forcedIds ? { forcedIds } : {}),
  topK: forcedIds ? 5 : 0,
  onToken: values.json ? undefined : (t) => process.stdout.write(t.text),
});
if (values.json) {
  const rope = getRopeIndex(prompt.inputIds, {
    imageGridThw: prompt.gridThw,
    spatialMergeSize: model.config.vision.spatial_merge_size,
  });
  process.stdout.write(
    JSON.stringify({
      input_ids: [...prompt.inputIds],
      image_grid_thw: prompt.gridThw.length ? prompt.gridThw : null,
      position_ids: rope.positionIds.map((a) => [...a]),
      rope_deltas: rope.ropeDeltas,
      generated_ids: result.generatedIds,
      text: result.text,
      finish_reason: result.finishReason,
      answer: parseAnswer(result.text),
      timings: result.timings,
      drafts: result.drafts,
      ...(forcedIds ? { steps: result.steps } : {}),
    }) + "\n",
  );
} else {
  process.stdout.write("\n");
}
await releaseModel(model);

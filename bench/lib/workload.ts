/**
 * The benchmark workload: MedVLM-R1's evaluation prompt on the golden brain MRI (case_01: a 224×224 PNG →
 * 64 image tokens, 200 prompt tokens), and a fixed continuation forced token by token so that every run
 * decodes exactly the same number of tokens (random test weights would otherwise stop at EOS at random).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { ChatMessage } from "../../shared/src/chat-template.ts";
import { loadDataset, promptFor } from "../../gpu-backend/src/eval/dataset.ts";
import { Xoshiro128StarStar } from "../../gpu-backend/src/engine/sampling.ts";
import { GOLDEN_DIR, MEDVLM_DIR } from "./common.ts";

/**
 * `<think>The image is an axial brain MRI. There is a bright area in the white matter on the FLAIR sequence,
 * which suggests a focal lesion. No fracture, vessel or ligament is visible.</think>\n<answer>A</answer>` in
 * the Qwen2 tokenizer: ordinary BPE ids only (no special or added tokens), 49 of them.
 */
export const CONTINUATION_IDS: readonly number[] = [
  13708, 766, 16357, 2168, 374, 458, 97180, 8109, 51360, 13, 2619, 374, 264, 9906, 3082, 304, 279, 4158, 4925, 389, 279, 12772, 57161, 8500, 11, 892,
  13230, 264, 41099, 92117, 13, 2308, 58804, 11, 26182, 476, 28313, 2838, 374, 9434, 3918, 26865, 397, 27, 9217, 23465, 522, 9217, 29,
];

/** `n` forced ids: the continuation, repeated as needed. */
export function forcedIds(n: number): number[] {
  return Array.from({ length: n }, (_, i) => CONTINUATION_IDS[i % CONTINUATION_IDS.length]!);
}

export interface EvalPrompt {
  /** case_01's chat messages (image path relative to `baseDir`). */
  messages: unknown[];
  baseDir: string;
  /** The rendered prompt text (what transformers.js's processor gets). */
  promptText: string;
  imagePath: string;
  /** Expected sizes, to check both stacks saw the same input. */
  promptTokens: number;
  imageTokens: number;
}

export function evalPrompt(): EvalPrompt {
  const c = JSON.parse(readFileSync(join(GOLDEN_DIR, "cases-a", "case_01.json"), "utf8")) as {
    messages: unknown[];
    prompt_text: string;
    input_ids: number[];
    images: Array<{ image: string }>;
    image_grid_thw: number[][];
  };
  const grid = c.image_grid_thw[0]!;
  return {
    messages: c.messages,
    baseDir: GOLDEN_DIR,
    promptText: c.prompt_text,
    imagePath: join(GOLDEN_DIR, c.images[0]!.image),
    promptTokens: c.input_ids.length,
    imageTokens: (grid[0]! * grid[1]! * grid[2]!) / 4,
  };
}

/**
 * Arrival times (ms after the first, which is at 0) of `n` requests from a Poisson process at `ratePerS`
 * requests per second: exponential gaps drawn from the engine's own seeded generator, so every setting compared
 * in a run (and every run with the same seed and rate) sees the same traffic.
 */
export function poissonArrivals(n: number, ratePerS: number, seed: number): number[] {
  if (!(ratePerS > 0) || !Number.isFinite(ratePerS)) throw new RangeError(`rate must be a positive number, got ${ratePerS}`);
  const rng = new Xoshiro128StarStar(seed);
  const out: number[] = [];
  for (let i = 0, t = 0; i < n; i++) {
    out.push(t);
    t += (-Math.log(1 - rng.nextDouble()) / ratePerS) * 1000;
  }
  return out;
}

/**
 * MedVLM-R1's own answer to the model card's knee MRI example ("What can be observed in this image?", samples.json's
 * `images/knee031316.png`), as its authors published it (github.com/JZPeterPan/MedVLM-R1, README and demo.ipynb,
 * Apache-2.0): greedy decoding of the real bf16 weights. The one output of the real model at hand; replayed through
 * prompt lookup (`forcedDrafts: "lookup"`) it shows how often drafts guess MedVLM-R1's own text.
 */
export const RECORDED_OUTPUT =
  "<think>\n    The image is a magnetic resonance imaging (MRI) scan of a knee joint. The scan shows a chondral abnormality, which is a type " +
  "of cartilage damage. This is evident from the irregular shape and the presence of a defect in the cartilage.\n</think>\n\n<answer>A</answer>";

/** {@link RECORDED_OUTPUT}'s length in the Qwen2 tokenizer, the closing `<|im_end|>` included (test/backend/bench.test.ts checks it). */
export const RECORDED_OUTPUT_TOKENS = 67;

export interface RecordedWorkload {
  /** The item's chat messages, built as the eval harness builds them, the image path relative to `baseDir`. */
  messages: ChatMessage[];
  baseDir: string;
  output: string;
}

/** The prompt {@link RECORDED_OUTPUT} answers: the knee item of ../shared/medvlm-r1/samples.json. */
export async function recordedWorkload(): Promise<RecordedWorkload> {
  const image = "images/knee031316.png";
  const { items } = await loadDataset(join(MEDVLM_DIR, "samples.json"));
  const item = items.find((it) => it.image === image);
  if (!item) throw new Error(`samples.json has no item for ${image}`);
  const messages = promptFor(item).messages.map((m) =>
    typeof m.content === "string" ? m : { ...m, content: m.content.map((c) => (c.type === "image" ? { ...c, image } : c)) },
  );
  return { messages, baseDir: MEDVLM_DIR, output: RECORDED_OUTPUT };
}

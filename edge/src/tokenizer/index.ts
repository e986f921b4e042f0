/**
 * The served model's tokenizer, bundled at build time (scripts/build-edge-model.ts writes
 * edge/generated/tokenizer.json.txt and model-meta.json). Constructed lazily on first use and kept for the
 * isolate's life: parsing the tokenizer.json is the edge's main cold-start cost, so it is paid by the first
 * request that needs it rather than by every isolate start (health checks, rejected requests).
 * (Workers freeze the clock during synchronous work, so its cost is measured from outside: see bench/.)
 */
import { Tokenizer } from "@huggingface/tokenizers";
import tokenizerJson from "../../generated/tokenizer.json.txt";
import modelMetaJson from "../../generated/model-meta.json";
import type { ModelMeta } from "../../../shared/src/model-meta.ts";

export const MODEL_META: ModelMeta = modelMetaJson as ModelMeta;

let tokenizer: Tokenizer | null = null;

export function getTokenizer(): Tokenizer {
  // Qwen2's tokenizer config only affects decoding; Qwen2-VL has clean_up_tokenization_spaces off.
  tokenizer ??= new Tokenizer(JSON.parse(tokenizerJson), { clean_up_tokenization_spaces: false });
  return tokenizer;
}

/** Token ids of `text` exactly as the reference (no BOS or other added specials: the chat template has them). */
export function encode(text: string): number[] {
  return getTokenizer().encode(text, { add_special_tokens: false }).ids;
}

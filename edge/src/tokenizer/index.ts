/**
 * The served model's tokenizer, bundled at build time: scripts/build-edge-model.ts compiles the model's
 * tokenizer.json into edge/generated/tokenizer.bin (merge tables, see shared/src/tokenizer/binary.ts; a Data
 * module, wrangler's default `**\/*.bin` rule) and writes model-meta.json. Loading the tables is a few
 * typed-array views (under a millisecond), so the tokenizer costs an isolate's cold start almost nothing;
 * it is still built on first use, so requests that never tokenize (health checks, rejections) skip it.
 */
import tokenizerTables from "../../generated/tokenizer.bin";
import modelMetaJson from "../../generated/model-meta.json";
import type { ModelMeta } from "../../../shared/src/model-meta.ts";
import { BpeTokenizer, deserializeBpe } from "../../../shared/src/tokenizer/index.ts";

export const MODEL_META: ModelMeta = modelMetaJson as ModelMeta;

let tokenizer: BpeTokenizer | null = null;

export function getTokenizer(): BpeTokenizer {
  tokenizer ??= new BpeTokenizer(deserializeBpe(new Uint8Array(tokenizerTables)));
  return tokenizer;
}

/** Token ids of `text` exactly as the reference (no BOS or other added specials: the chat template has them). */
export function encode(text: string): number[] {
  return getTokenizer().encode(text);
}

/**
 * `embed_tokens.onnx`: `input_ids` int64 [batch, seq] → `inputs_embeds` [batch, seq, H], a Gather over
 * `model.embed_tokens.weight` (kept in the graph's float type for every dtype; the runtime scatters image
 * features into the `<|image_pad|>` rows before calling the decoder).
 */
import type { ModuleEmitter } from "./common.ts";
import { DIMS } from "./decoder.ts";

/** Builds the embedding graph into `e.g`. */
export function buildEmbedTokens(e: ModuleEmitter): void {
  const g = e.g;
  const name = "model.embed_tokens.weight";
  const [, H] = e.shape(name) as [number, number];
  const ids = g.input("input_ids", "int64", [DIMS.batch, DIMS.seq]);
  const out = g.within("model/embed_tokens", () => g.op("Gather", [e.param(name), ids], { axis: 0 }));
  g.output(out, "inputs_embeds", e.float, [DIMS.batch, DIMS.seq, H]);
}

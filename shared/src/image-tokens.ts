/**
 * `<|image_pad|>` expansion, as Qwen2VLProcessor does it: the rendered prompt holds one image pad per image;
 * each becomes `t·h·w / merge²` pads, one per merged vision token.
 */
import { ApiError } from "./errors.ts";

/**
 * Replaces the k-th `imageTokenId` in `ids` by `tokensPerImage[k]` copies. The number of pads must equal the
 * number of images (ApiError `invalid_request` otherwise, e.g. a user text containing "<|image_pad|>").
 */
export function expandImagePads(ids: ArrayLike<number>, tokensPerImage: readonly number[], imageTokenId: number): Int32Array {
  let pads = 0;
  for (let i = 0; i < ids.length; i++) if (ids[i] === imageTokenId) pads++;
  if (pads !== tokensPerImage.length) {
    throw new ApiError("invalid_request", `the prompt has ${pads} image placeholders for ${tokensPerImage.length} images`);
  }
  const total = ids.length - pads + tokensPerImage.reduce((a, b) => a + b, 0);
  const out = new Int32Array(total);
  let o = 0;
  let k = 0;
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i]!;
    if (id === imageTokenId) {
      out.fill(imageTokenId, o, o + tokensPerImage[k]!);
      o += tokensPerImage[k++]!;
    } else {
      out[o++] = id;
    }
  }
  return out;
}

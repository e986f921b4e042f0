/**
 * transformers 4.46.1 `Qwen2VLImageProcessor` from a (already resized) RGB image to `pixel_values` rows,
 * bit-exact:
 *
 * - rescale: `float32(u8 · (1/255))` — numpy multiplies in float64, then casts;
 * - normalize: `(x − mean) / std` in float32 with mean/std cast to float32 (each step rounded);
 * - channels first; a single image is tiled to `temporal_patch_size` identical frames;
 * - patchify: `reshape(gt, tps, C, gh/m, m, p, gw/m, m, p).transpose(0,3,6,4,7,2,1,5,8)` → rows ordered
 *   (t, block row, block col, in-block row, in-block col), each row `[C][tps][p][p]`.
 */
import type { RgbImage } from "./decode.ts";

/** Image-processor parameters (preprocessor_config.json). */
export interface PixelParams {
  patchSize: number;
  mergeSize: number;
  temporalPatchSize: number;
  imageMean: readonly [number, number, number] | readonly number[];
  imageStd: readonly [number, number, number] | readonly number[];
}

/**
 * The 256 possible normalized float32 values per channel. Every pixel goes through the same per-sample
 * arithmetic, so a table lookup is exactly the reference computation.
 */
export function normalizationTable(imageMean: readonly number[], imageStd: readonly number[]): Float32Array[] {
  if (imageMean.length !== 3 || imageStd.length !== 3) throw new RangeError("image_mean and image_std need 3 values");
  const inv255 = 1 / 255; // Python float: 1 / 255
  return [0, 1, 2].map((c) => {
    const mean = Math.fround(imageMean[c]!);
    const std = Math.fround(imageStd[c]!);
    if (!(std !== 0 && Number.isFinite(std) && Number.isFinite(mean))) throw new RangeError("image_std must be finite and non-zero");
    const t = new Float32Array(256);
    for (let v = 0; v < 256; v++) {
      const x = Math.fround(v * inv255);
      // float32 − float32 and float32 / float32, each rounded to float32 (computing in double and
      // rounding once gives the correctly rounded float32 result for +, −, ×, ÷).
      t[v] = Math.fround(Math.fround(x - mean) / std);
    }
    return t;
  });
}

/**
 * Rows of `pixel_values` for one image: `[t·h·w, C·tps·p·p]` as a flat Float32Array, plus `grid_thw`.
 * The image sides must be multiples of `patchSize · mergeSize` (smart_resize guarantees it).
 */
export function patchify(
  img: RgbImage,
  params: PixelParams,
  table: Float32Array[] = normalizationTable(params.imageMean, params.imageStd),
): { rows: Float32Array; gridThw: [number, number, number] } {
  const { patchSize: p, mergeSize: m, temporalPatchSize: tps } = params;
  const { width: W, height: H, data } = img;
  if (H % (p * m) !== 0 || W % (p * m) !== 0) {
    throw new RangeError(`image ${W}x${H} is not a multiple of patch·merge = ${p * m}`);
  }
  const gh = H / p;
  const gw = W / p;
  const rowLen = 3 * tps * p * p;
  const out = new Float32Array(gh * gw * rowLen);
  const tables = [table[0]!, table[1]!, table[2]!];
  let row = 0;
  for (let bh = 0; bh < gh / m; bh++) {
    for (let bw = 0; bw < gw / m; bw++) {
      for (let mh = 0; mh < m; mh++) {
        for (let mw = 0; mw < m; mw++) {
          const y0 = (bh * m + mh) * p;
          const x0 = (bw * m + mw) * p;
          const base = row * rowLen;
          for (let c = 0; c < 3; c++) {
            const t = tables[c]!;
            const cBase = base + c * tps * p * p;
            // Frame 0 of this channel, then copies for the repeated frames.
            for (let py = 0; py < p; py++) {
              let s = ((y0 + py) * W + x0) * 3 + c;
              const o = cBase + py * p;
              for (let px = 0; px < p; px++, s += 3) out[o + px] = t[data[s]!]!;
            }
            for (let f = 1; f < tps; f++) out.copyWithin(cBase + f * p * p, cBase, cBase + p * p);
          }
          row++;
        }
      }
    }
  }
  return { rows: out, gridThw: [1, gh, gw] };
}

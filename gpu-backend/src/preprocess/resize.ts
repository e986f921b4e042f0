/**
 * Pillow 9.4 `Image.resize((w, h), Image.BICUBIC)` for 8-bit RGB, bit-exact (libImaging/Resample.c):
 *
 * - separable convolution: a horizontal pass (only over the source rows the vertical pass will read),
 *   then a vertical pass; a pass is skipped when its axis keeps its size (box = whole image), and when
 *   both are skipped the image is copied;
 * - per output sample, the kernel is centred at `(i + 0.5)·scale` with support `2·max(scale, 1)`
 *   (antialiasing when shrinking), taps `[trunc(center − support + 0.5), trunc(center + support + 0.5))`
 *   clipped to the image; weights are `bicubic((j − center + 0.5) / max(scale, 1))` with a = −0.5,
 *   normalized by their sum in double, then rounded (half away from zero) to fixed point with
 *   PRECISION_BITS = 32 − 8 − 2 = 22;
 * - accumulation starts at 2^21 (rounding), the result is `acc >> 22` clipped to 0..255, and the
 *   intermediate image between the passes is uint8.
 */
import type { RgbImage } from "./decode.ts";

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 1 << PRECISION_BITS;
const HALF = 1 << (PRECISION_BITS - 1);

/** Resample.c `bicubic_filter` with a = −0.5 (Keys' cubic convolution). */
function bicubic(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** Fixed-point filter taps of one axis: for output i, `size[i]` weights from input index `start[i]`. */
export interface AxisCoefficients {
  ksize: number;
  start: Int32Array;
  size: Int32Array;
  /** `outSize × ksize` weights in Q22 (unused tail entries are 0). */
  weights: Int32Array;
}

/**
 * Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[in0, in1)` of an axis of
 * `inSize` samples resampled to `outSize` (Pillow's box coordinates are C floats: `Math.fround`).
 */
export function bicubicCoefficients(inSize: number, outSize: number, in0 = 0, in1 = inSize): AxisCoefficients {
  const support0 = 2.0;
  // (double)(in1 - in0) / outSize with in0, in1 as C floats: the difference is taken in float.
  const scale = Math.fround(Math.fround(in1) - Math.fround(in0)) / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = support0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const size = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  const ss = 1 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = Math.fround(in0) + (xx + 0.5) * scale;
    // C's (int) cast truncates toward zero.
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x]! / ww : k[x]!;
      // normalize_coeffs_8bpc: round half away from zero via (int)(±0.5 + w·2^22).
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * ONE) : Math.trunc(0.5 + w * ONE);
    }
    start[xx] = xmin;
    size[xx] = xmax;
  }
  return { ksize, start, size, weights };
}

/** `acc >> 22` clipped to 0..255 (Resample.c `clip8`). The accumulator stays within int32 (2 guard bits). */
function clip8(acc: number): number {
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** Horizontal pass over rows `[y0, y0 + rows)` of `src` (`ch` interleaved channels, width `srcW`) → `outW × rows`. */
function horizontal(src: Uint8Array, srcW: number, ch: number, y0: number, rows: number, outW: number, c: AxisCoefficients): Uint8Array {
  const out = new Uint8Array(outW * rows * ch);
  const { ksize, start, size, weights } = c;
  const srcStride = srcW * ch;
  for (let yy = 0; yy < rows; yy++) {
    const rowBase = (yy + y0) * srcStride;
    let o = yy * outW * ch;
    for (let xx = 0; xx < outW; xx++) {
      const kBase = xx * ksize;
      const n = size[xx]!;
      const p0 = rowBase + start[xx]! * ch;
      if (ch === 3) {
        let s0 = HALF;
        let s1 = HALF;
        let s2 = HALF;
        for (let x = 0, p = p0; x < n; x++, p += 3) {
          const w = weights[kBase + x]!;
          s0 += src[p]! * w;
          s1 += src[p + 1]! * w;
          s2 += src[p + 2]! * w;
        }
        out[o++] = clip8(s0);
        out[o++] = clip8(s1);
        out[o++] = clip8(s2);
      } else {
        for (let cc = 0; cc < ch; cc++) {
          let s = HALF;
          for (let x = 0, p = p0 + cc; x < n; x++, p += ch) s += src[p]! * weights[kBase + x]!;
          out[o++] = clip8(s);
        }
      }
    }
  }
  return out;
}

/** Vertical pass: `src` (`stride` bytes per row) → `outH` rows; `start` indices are rows of `src` + `rowOffset`. */
function vertical(src: Uint8Array, stride: number, outH: number, c: AxisCoefficients, rowOffset: number): Uint8Array {
  const out = new Uint8Array(stride * outH);
  const { ksize, start, size, weights } = c;
  // Row-wise accumulation (same sums in the same order as Pillow's per-pixel loop: integer adds are exact).
  const acc = new Float64Array(stride);
  for (let yy = 0; yy < outH; yy++) {
    const kBase = yy * ksize;
    const n = size[yy]!;
    const ymin = start[yy]! - rowOffset;
    acc.fill(HALF);
    for (let y = 0; y < n; y++) {
      const w = weights[kBase + y]!;
      const r = (ymin + y) * stride;
      for (let i = 0; i < stride; i++) acc[i] = acc[i]! + src[r + i]! * w;
    }
    const o = yy * stride;
    for (let i = 0; i < stride; i++) out[o + i] = clip8(acc[i]!);
  }
  return out;
}

/**
 * The resize on `channels` interleaved uint8 channels (each channel is resampled independently, exactly
 * as Pillow does per band). Same size returns a copy.
 */
export function resizeBicubicInterleaved(
  data: Uint8Array,
  inW: number,
  inH: number,
  channels: number,
  outW: number,
  outH: number,
): Uint8Array {
  if (!(Number.isInteger(outW) && Number.isInteger(outH) && outW > 0 && outH > 0)) {
    throw new RangeError(`resize target must be positive integers, got ${outW}x${outH}`);
  }
  if (data.length !== inW * inH * channels) throw new RangeError("pixel buffer size does not match its dimensions");
  const needH = outW !== inW;
  const needV = outH !== inH;
  if (!needH && !needV) return data.slice();

  const vc = bicubicCoefficients(inH, outH);
  // Only the source rows the vertical pass reads get a horizontal pass (ImagingResampleInner's ybox).
  const yFirst = vc.start[0]!;
  const yLast = vc.start[outH - 1]! + vc.size[outH - 1]!;

  if (!needH) return vertical(data, inW * channels, outH, vc, 0);
  const tmp = horizontal(data, inW, channels, yFirst, yLast - yFirst, outW, bicubicCoefficients(inW, outW));
  // Without a vertical pass the row window is the whole image (support ≥ 2 reaches both edges).
  if (!needV) return tmp;
  return vertical(tmp, outW * channels, outH, vc, yFirst);
}

/**
 * Pillow 9.4 `img.resize((outW, outH), Image.BICUBIC)` of a packed RGB image, bit-exact. Same size returns
 * a copy (Pillow's `resize` returns `self.copy()` then). `greyscale: true` promises R = G = B everywhere
 * (an L / I source after convert("RGB")): one channel is resampled and replicated — same bytes, 3× faster.
 * Throws RangeError for non-positive sizes (callers validate geometry first).
 */
export function resizeBicubicRgb(img: RgbImage, outW: number, outH: number, greyscale = false): RgbImage {
  const { width: inW, height: inH, data } = img;
  if (data.length !== inW * inH * 3) throw new RangeError("RGB buffer size does not match its dimensions");
  if (!greyscale) return { width: outW, height: outH, data: resizeBicubicInterleaved(data, inW, inH, 3, outW, outH) };
  const grey = new Uint8Array(inW * inH);
  for (let i = 0; i < grey.length; i++) grey[i] = data[i * 3]!;
  const g = resizeBicubicInterleaved(grey, inW, inH, 1, outW, outH);
  const out = new Uint8Array(g.length * 3);
  for (let i = 0; i < g.length; i++) out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = g[i]!;
  return { width: outW, height: outH, data: out };
}

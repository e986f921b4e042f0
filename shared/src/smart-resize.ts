/**
 * Image geometry of the Qwen2-VL reference pipeline, reproduced exactly:
 *
 * 1. qwen_vl_utils 0.0.10 `fetch_image` resizes the decoded image to `smart_resize(h, w, factor=28,
 *    min_pixels, max_pixels)` (per-image `min_pixels`/`max_pixels`, defaults 3136 / 12845056), or, when the
 *    image asks for a size (`resized_height` and `resized_width`), to `smart_resize(resized_height,
 *    resized_width, factor=28)` with the default bounds, whatever the image's own size;
 * 2. transformers 4.46.1 `Qwen2VLImageProcessor` runs its own `smart_resize` on that result with
 *    `factor = patch_size * merge_size` and the processor's bounds (preprocessor_config.json) — usually a
 *    no-op, but not always (e.g. when the per-image bounds lie outside the processor's);
 * 3. the grid is `[1, h / patch, w / patch]` (one image is tiled to `temporal_patch_size` frames, which
 *    make one temporal patch) and the image takes `t·h·w / merge²` `<|image_pad|>` tokens.
 *
 * All arithmetic follows Python's float semantics: `round()` is round-half-to-even, `/` is IEEE double
 * division (ints below 2^53 convert exactly), `math.sqrt/floor/ceil` equal `Math.*`.
 */
import { ApiError } from "./errors.ts";

/** qwen_vl_utils 0.0.10 constants (`IMAGE_FACTOR`, `MIN_PIXELS`, `MAX_PIXELS`, `MAX_RATIO`). */
export const QWEN_VL_UTILS_DEFAULTS = {
  factor: 28,
  minPixels: 4 * 28 * 28,
  maxPixels: 16384 * 28 * 28,
  maxRatio: 200,
} as const;

/** Largest aspect ratio (long side / short side) both smart_resize variants accept. */
export const MAX_ASPECT_RATIO = 200;

/**
 * Python 3 `round(x)` for a float: nearest integer, ties to even (126/28 = 4.5 → 4, 70/28 = 2.5 → 2).
 * `Math.round` rounds ties up and would give 5 and 3.
 */
export function roundHalfEven(x: number): number {
  if (!Number.isFinite(x)) return x;
  const f = Math.floor(x);
  // x - floor(x) is exact in binary floating point, so the tie test is exact too.
  const diff = x - f;
  if (diff < 0.5) return f;
  if (diff > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

function checkSide(name: string, v: number): void {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
    throw new ApiError("invalid_image", `image ${name} must be a positive integer, got ${String(v)}`);
  }
}

function checkPixels(name: string, v: number): void {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
    throw new ApiError("invalid_parameter", `${name} must be a positive integer, got ${String(v)}`);
  }
}

function checkFactor(v: number): void {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
    throw new ApiError("invalid_parameter", `resize factor must be a positive integer, got ${String(v)}`);
  }
}

/** Python multiplies exact integers; doubles are exact only up to 2^53, far beyond any decodable image. */
function checkArea(height: number, width: number): void {
  if (height * width > Number.MAX_SAFE_INTEGER) {
    throw new ApiError("image_too_large", `image of ${width}x${height} pixels is too large`);
  }
}

function checkAspect(height: number, width: number): void {
  // Same float expression as the Python source: max / min > 200.
  const ratio = Math.max(height, width) / Math.min(height, width);
  if (ratio > MAX_ASPECT_RATIO) {
    throw new ApiError(
      "aspect_ratio_too_large",
      `absolute aspect ratio must be at most ${MAX_ASPECT_RATIO}, got ${ratio} (${width}x${height})`,
    );
  }
}

/**
 * The shared arithmetic of both variants after their guards. `floorMin` is qwen_vl_utils' `max(factor, ·)`
 * on the rounded sides (transformers 4.46.1 has no such clamp).
 */
function resizeCore(
  height: number,
  width: number,
  factor: number,
  minPixels: number,
  maxPixels: number,
  clampRounded: boolean,
): [number, number] {
  let hBar = roundHalfEven(height / factor) * factor;
  let wBar = roundHalfEven(width / factor) * factor;
  if (clampRounded) {
    hBar = Math.max(factor, hBar);
    wBar = Math.max(factor, wBar);
  }
  if (hBar * wBar > maxPixels) {
    const beta = Math.sqrt((height * width) / maxPixels);
    hBar = Math.floor(height / beta / factor) * factor;
    wBar = Math.floor(width / beta / factor) * factor;
  } else if (hBar * wBar < minPixels) {
    const beta = Math.sqrt(minPixels / (height * width));
    hBar = Math.ceil((height * beta) / factor) * factor;
    wBar = Math.ceil((width * beta) / factor) * factor;
  }
  return [hBar, wBar];
}

/**
 * Both variants: their guards, the arithmetic, and the refusal of a side that rounds to 0 (Pillow could not
 * resize to it). `clampRounded`: qwen_vl_utils' `max(factor, ·)`; `minSide`: transformers' refusal of sides
 * below `factor`; `zeroCode`: what each variant reports for a zero side.
 */
function checkedResize(
  height: number,
  width: number,
  factor: number,
  minPixels: number,
  maxPixels: number,
  variant: { clampRounded: boolean; minSide: boolean; zeroCode: "aspect_ratio_too_large" | "image_too_small" },
): [number, number] {
  checkSide("height", height);
  checkSide("width", width);
  checkFactor(factor);
  checkPixels("min_pixels", minPixels);
  checkPixels("max_pixels", maxPixels);
  if (variant.minSide && (height < factor || width < factor)) {
    throw new ApiError("image_too_small", `image sides must be at least ${factor} pixels, got ${width}x${height}`);
  }
  checkArea(height, width);
  checkAspect(height, width);
  const [h, w] = resizeCore(height, width, factor, minPixels, maxPixels, variant.clampRounded);
  if (h <= 0 || w <= 0) {
    throw new ApiError(variant.zeroCode, `a ${width}x${height} image cannot be resized under max_pixels=${maxPixels}: one side would become 0`);
  }
  return [h, w];
}

/**
 * qwen_vl_utils 0.0.10 `smart_resize(height, width, factor, min_pixels, max_pixels)` → `[height, width]`.
 *
 * Faithful to the Python, including its quirk: the max_pixels (floor) branch has no lower clamp, so an
 * extreme aspect ratio with a small `maxPixels` can yield a side of 0; Pillow would then fail to resize,
 * so this throws `aspect_ratio_too_large` instead of returning 0. Throws `aspect_ratio_too_large` for a
 * ratio above 200, `invalid_image` for non-positive/non-integer sides, `invalid_parameter` for bad bounds.
 */
export function smartResize(
  height: number,
  width: number,
  factor: number = QWEN_VL_UTILS_DEFAULTS.factor,
  minPixels: number = QWEN_VL_UTILS_DEFAULTS.minPixels,
  maxPixels: number = QWEN_VL_UTILS_DEFAULTS.maxPixels,
): [number, number] {
  return checkedResize(height, width, factor, minPixels, maxPixels, { clampRounded: true, minSide: false, zeroCode: "aspect_ratio_too_large" });
}

/**
 * transformers 4.46.1 `Qwen2VLImageProcessor`'s `smart_resize` → `[height, width]`. Differs from
 * qwen_vl_utils' by rejecting sides below `factor` (→ `image_too_small`) and by not clamping the
 * rounded sides to at least `factor`; a floor-branch side of 0 is also rejected (`image_too_small`).
 */
export function processorSmartResize(
  height: number,
  width: number,
  factor = 28,
  minPixels = 56 * 56,
  maxPixels = 14 * 14 * 4 * 1280,
): [number, number] {
  return checkedResize(height, width, factor, minPixels, maxPixels, { clampRounded: false, minSide: true, zeroCode: "image_too_small" });
}

/** Geometry parameters of {@link imageGrid}. */
export interface ImageGridParams {
  /** Vision patch size (14 for Qwen2-VL). */
  patchSize: number;
  /** Spatial merge size (2): `merge²` patches become one LLM token. */
  mergeSize: number;
  /** Temporal patch size (2): a still image is tiled to this many frames = one temporal patch. */
  temporalPatchSize: number;
  /** Per-image bounds passed to qwen_vl_utils' fetch_image (the effective request bounds). */
  minPixels: number;
  maxPixels: number;
  /**
   * qwen_vl_utils' `resized_height`/`resized_width`: the size asked for, which replaces the image's own in its
   * smart_resize (with qwen_vl_utils' default bounds, as there). Unlike the reference, the result must still lie
   * within `minPixels`..`maxPixels` (the server's window): a fixed size does not get around the server's caps.
   */
  requestedSize?: { height: number; width: number };
  /** The image processor's own bounds (preprocessor_config.json); default: `minPixels` / `maxPixels`. */
  processorMinPixels?: number;
  processorMaxPixels?: number;
  /** qwen_vl_utils' `IMAGE_FACTOR` (a constant 28 there, independent of the model); default 28. */
  fetchFactor?: number;
}

/** Result of {@link imageGrid}. */
export interface ImageGrid {
  /** Size after qwen_vl_utils' resize (what the reference `fetch_image` returns). */
  fetchedHeight: number;
  fetchedWidth: number;
  /** Size after the image processor's resize (what is cut into patches). */
  resizedHeight: number;
  resizedWidth: number;
  /** `[t, h, w]` in patches. */
  gridThw: [number, number, number];
  /** Number of `<|image_pad|>` tokens: `t·h·w / merge²`. */
  tokens: number;
}

/**
 * Grid and token count of one image of `height × width` (the decoded original), as the reference
 * pipeline computes them: qwen_vl_utils' resize with the per-image bounds, then the processor's resize
 * with the processor's bounds and factor `patchSize·mergeSize`.
 */
export function imageGrid(size: { height: number; width: number }, p: ImageGridParams): ImageGrid {
  for (const [k, v] of [
    ["patchSize", p.patchSize],
    ["mergeSize", p.mergeSize],
    ["temporalPatchSize", p.temporalPatchSize],
  ] as const) {
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
      throw new ApiError("invalid_parameter", `${k} must be a positive integer, got ${String(v)}`);
    }
  }
  const fetchFactor = p.fetchFactor ?? QWEN_VL_UTILS_DEFAULTS.factor;
  const asked = p.requestedSize;
  const [fetchedHeight, fetchedWidth] = asked
    ? smartResize(asked.height, asked.width, fetchFactor, QWEN_VL_UTILS_DEFAULTS.minPixels, QWEN_VL_UTILS_DEFAULTS.maxPixels)
    : smartResize(size.height, size.width, fetchFactor, p.minPixels, p.maxPixels);
  if (asked && (fetchedHeight * fetchedWidth > p.maxPixels || fetchedHeight * fetchedWidth < p.minPixels)) {
    throw new ApiError(
      "invalid_parameter",
      `resized_height ${asked.height} x resized_width ${asked.width} becomes ${fetchedHeight}x${fetchedWidth} = ` +
        `${fetchedHeight * fetchedWidth} pixels, outside the server's range of ${p.minPixels} to ${p.maxPixels}`,
    );
  }
  const factor = p.patchSize * p.mergeSize;
  // Rounding can push a ratio just under 200 over it (29x5615 → 28x5628 = 201): the reference processor
  // then raises, so this rejects too, naming both sizes.
  const fetchedRatio = Math.max(fetchedHeight, fetchedWidth) / Math.min(fetchedHeight, fetchedWidth);
  if (fetchedRatio > MAX_ASPECT_RATIO) {
    throw new ApiError(
      "aspect_ratio_too_large",
      `a ${size.width}x${size.height} image is resized to ${fetchedWidth}x${fetchedHeight}, whose aspect ratio ` +
        `${fetchedRatio} exceeds ${MAX_ASPECT_RATIO}`,
    );
  }
  const [resizedHeight, resizedWidth] = processorSmartResize(
    fetchedHeight,
    fetchedWidth,
    factor,
    p.processorMinPixels ?? p.minPixels,
    p.processorMaxPixels ?? p.maxPixels,
  );
  // A single image is repeated to temporalPatchSize frames → exactly one temporal patch.
  const gridThw: [number, number, number] = [1, resizedHeight / p.patchSize, resizedWidth / p.patchSize];
  const tokens = (gridThw[0] * gridThw[1] * gridThw[2]) / (p.mergeSize * p.mergeSize);
  return { fetchedHeight, fetchedWidth, resizedHeight, resizedWidth, gridThw, tokens };
}

/** Pixel bounds as `{ minPixels, maxPixels }`. */
export interface PixelBounds {
  minPixels: number;
  maxPixels: number;
}

/**
 * Per-request pixel bounds within the server's window. A request may only NARROW the window:
 * - `maxPixels` may lower the server's max, never raise it, and may not go below the server's min;
 * - `minPixels` may raise the server's min up to the effective max, never lower it.
 * Anything else is rejected (not clamped) with `invalid_parameter` and a message naming the limit, so
 * a client never silently gets a different resolution than it asked for. Missing fields inherit the
 * server's. An inconsistent server window is a configuration bug (`internal_error`).
 */
export function effectivePixelBounds(server: PixelBounds, request: Partial<PixelBounds> = {}): PixelBounds {
  const sMin = server.minPixels;
  const sMax = server.maxPixels;
  if (!Number.isSafeInteger(sMin) || !Number.isSafeInteger(sMax) || sMin <= 0 || sMin > sMax) {
    throw new ApiError("internal_error", `server pixel bounds are inconsistent: min ${sMin}, max ${sMax}`);
  }
  const rMax = request.maxPixels;
  const rMin = request.minPixels;
  if (rMax !== undefined) {
    if (typeof rMax !== "number" || !Number.isSafeInteger(rMax) || rMax <= 0) {
      throw new ApiError("invalid_parameter", `max_pixels must be a positive integer, got ${String(rMax)}`);
    }
    if (rMax > sMax) {
      throw new ApiError("invalid_parameter", `max_pixels ${rMax} exceeds the server's maximum of ${sMax}`);
    }
    if (rMax < sMin) {
      throw new ApiError("invalid_parameter", `max_pixels ${rMax} is below the server's min_pixels of ${sMin}`);
    }
  }
  const maxPixels = rMax ?? sMax;
  if (rMin !== undefined) {
    if (typeof rMin !== "number" || !Number.isSafeInteger(rMin) || rMin <= 0) {
      throw new ApiError("invalid_parameter", `min_pixels must be a positive integer, got ${String(rMin)}`);
    }
    if (rMin < sMin) {
      throw new ApiError("invalid_parameter", `min_pixels ${rMin} is below the server's minimum of ${sMin}`);
    }
    if (rMin > maxPixels) {
      throw new ApiError(
        "invalid_parameter",
        `min_pixels ${rMin} exceeds the effective max_pixels of ${maxPixels}`,
      );
    }
  }
  return { minPixels: rMin ?? sMin, maxPixels };
}

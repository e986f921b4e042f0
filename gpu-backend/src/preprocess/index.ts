/**
 * Backend image preprocessing: request images → `pixel_values` + `image_grid_thw`, bit-exact with the
 * reference (qwen_vl_utils 0.0.10 `fetch_image` on Pillow 9.4, then transformers 4.46.1
 * `Qwen2VLImageProcessor`).
 *
 * Per image: decode (decode.ts) → qwen_vl_utils `smart_resize` with the request's bounds and Pillow
 * bicubic resize (resize.ts) → the processor's own `smart_resize` with the server's bounds (a second
 * resize only if it disagrees) → normalize + patchify (pixels.ts). Geometry comes from
 * shared/src/smart-resize.ts, so the edge and the backend agree on token counts.
 */
import { ApiError } from "../../../shared/src/errors.ts";
import { sniffImage, ImageHeaderError } from "../../../shared/src/image-header.ts";
import { effectivePixelBounds, imageGrid, QWEN_VL_UTILS_DEFAULTS, smartResize, type ImageGrid } from "../../../shared/src/smart-resize.ts";
import { decodeImage, ImageDecodeError, type DecodeOptions, type DecodedImage, type ImageErrorCode, type RgbImage } from "./decode.ts";
import { normalizationTable, patchify } from "./pixels.ts";
import { resizeBicubicRgb } from "./resize.ts";

export { ImageDecodeError, decodeImage, compositeOnWhite, cmykToRgb, readPngInfo, padPngPalette, DEFAULT_MAX_INPUT_PIXELS } from "./decode.ts";
export type { PngInfo } from "./decode.ts";
export type { RgbImage, DecodedImage, DecodeOptions, ImageErrorCode, SourceMode } from "./decode.ts";
export { resizeBicubicRgb, resizeBicubicInterleaved, bicubicCoefficients } from "./resize.ts";
export { patchify, normalizationTable } from "./pixels.ts";

/** One request image: its bytes and optional per-image bounds (which may only narrow the server's). */
export interface PreprocessImageInput {
  bytes: Uint8Array;
  minPixels?: number;
  maxPixels?: number;
  /** qwen_vl_utils' `resized_height`/`resized_width` (both or neither): when given, the bounds above are ignored, as there. */
  resizedHeight?: number;
  resizedWidth?: number;
}

/** Server-side preprocessing configuration (preprocessor_config.json plus serving limits). */
export interface PreprocessOptions {
  minPixels: number;
  maxPixels: number;
  patchSize: number;
  mergeSize: number;
  temporalPatchSize: number;
  imageMean: readonly number[];
  imageStd: readonly number[];
  /** Cap on the total `<|image_pad|>` tokens of all images of a request (`too_many_image_tokens`). */
  maxImageTokens?: number;
  /** Cap on the stored width·height of each image (`image_too_large`). */
  maxInputPixels?: number;
  /** Per-image decode time limit in seconds. */
  decodeTimeoutSeconds?: number;
}

/** What the vision encoder needs. */
export interface PreprocessResult {
  /** `[Σ t·h·w, C·tps·p·p]` rows, images in request order. */
  pixelValues: Float32Array;
  gridThw: [number, number, number][];
  /** `<|image_pad|>` count per image: `t·h·w / merge²`. */
  imageTokens: number[];
}

/** One image through the whole pipeline, with the intermediate images kept (for tests and debugging). */
export interface PreprocessedImage {
  decoded: DecodedImage;
  /** What qwen_vl_utils' `fetch_image` returns: the RGB after its smart_resize + Pillow resize. */
  fetched: RgbImage;
  /** What the image processor patchifies (equals `fetched` unless its own smart_resize disagreed). */
  resized: RgbImage;
  grid: ImageGrid;
  rows: Float32Array;
}

const IMAGE_CODES = new Set<string>([
  "invalid_image",
  "unsupported_media_type",
  "image_too_large",
  "image_too_small",
  "aspect_ratio_too_large",
  "too_many_image_tokens",
  "invalid_parameter",
] satisfies ImageErrorCode[]);

/** Sources whose RGB is L replicated (Pillow L / LA / I → convert("RGB")): one channel suffices to resize. */
function isGreySource(d: DecodedImage): boolean {
  return d.sourceMode === "L" || d.sourceMode === "LA" || d.sourceMode === "I";
}

/** Tags geometry errors from the shared module with the image index; other errors pass through. */
function withIndex(e: unknown, index: number): unknown {
  if (e instanceof ImageDecodeError) {
    return e.imageIndex === undefined ? new ImageDecodeError(e.code, e.message, index) : e;
  }
  if (e instanceof ApiError && IMAGE_CODES.has(e.code)) return new ImageDecodeError(e.code as ImageErrorCode, e.message, index);
  return e;
}

function checkOptions(o: PreprocessOptions): void {
  for (const k of ["minPixels", "maxPixels", "patchSize", "mergeSize", "temporalPatchSize"] as const) {
    if (!Number.isSafeInteger(o[k]) || o[k] <= 0) throw new ApiError("internal_error", `preprocess option ${k} is invalid`);
  }
  if (o.imageMean.length !== 3 || o.imageStd.length !== 3 || o.imageStd.some((s) => !(Number.isFinite(s) && s !== 0))) {
    throw new ApiError("internal_error", "preprocess image_mean / image_std are invalid");
  }
}

function gridFor(size: { width: number; height: number }, input: PreprocessImageInput, o: PreprocessOptions): ImageGrid {
  const server = { minPixels: o.minPixels, maxPixels: o.maxPixels };
  const fixed = input.resizedHeight !== undefined || input.resizedWidth !== undefined;
  if (fixed && (input.resizedHeight === undefined || input.resizedWidth === undefined)) {
    throw new ApiError("invalid_parameter", "resized_height and resized_width go together");
  }
  const request: { minPixels?: number; maxPixels?: number } = {};
  if (input.minPixels !== undefined) request.minPixels = input.minPixels;
  if (input.maxPixels !== undefined) request.maxPixels = input.maxPixels;
  const bounds = fixed ? server : effectivePixelBounds(server, request);
  return imageGrid(size, {
    patchSize: o.patchSize,
    mergeSize: o.mergeSize,
    temporalPatchSize: o.temporalPatchSize,
    minPixels: bounds.minPixels,
    maxPixels: bounds.maxPixels,
    ...(fixed ? { requestedSize: { height: input.resizedHeight!, width: input.resizedWidth! } } : {}),
    processorMinPixels: o.minPixels,
    processorMaxPixels: o.maxPixels,
  });
}

/**
 * Decode + resize one image exactly as qwen_vl_utils' `fetch_image` does: its `smart_resize` (factor 28,
 * the given bounds, no processor step) and Pillow's bicubic resize. The lower-level building block the
 * golden tests check bit for bit against `fetched_rgb_u8_sha256`.
 */
export async function fetchImageRgb(
  bytes: Uint8Array,
  bounds: { minPixels: number; maxPixels: number },
  decodeOpts: DecodeOptions = {},
): Promise<{ decoded: DecodedImage; fetched: RgbImage }> {
  const decoded = await decodeImage(bytes, decodeOpts);
  const [h, w] = smartResize(decoded.height, decoded.width, QWEN_VL_UTILS_DEFAULTS.factor, bounds.minPixels, bounds.maxPixels);
  return { decoded, fetched: resizeBicubicRgb(decoded, w, h, isGreySource(decoded)) };
}

/** The full pipeline for one image (see {@link PreprocessedImage}). `index` only labels errors. */
export async function preprocessImage(input: PreprocessImageInput, opts: PreprocessOptions, index = 0): Promise<PreprocessedImage> {
  checkOptions(opts);
  try {
    const decodeOpts: DecodeOptions = {};
    if (opts.maxInputPixels !== undefined) decodeOpts.maxInputPixels = opts.maxInputPixels;
    if (opts.decodeTimeoutSeconds !== undefined) decodeOpts.timeoutSeconds = opts.decodeTimeoutSeconds;
    const decoded = await decodeImage(input.bytes, decodeOpts);
    const grid = gridFor(decoded, input, opts);
    const grey = isGreySource(decoded);
    const fetched = resizeBicubicRgb(decoded, grid.fetchedWidth, grid.fetchedHeight, grey);
    // The processor resizes its (uint8) input again only when its own smart_resize asks for another size.
    const resized =
      grid.resizedWidth === fetched.width && grid.resizedHeight === fetched.height
        ? fetched
        : resizeBicubicRgb(fetched, grid.resizedWidth, grid.resizedHeight, grey);
    const { rows } = patchify(resized, opts, normalizationTable(opts.imageMean, opts.imageStd));
    return { decoded, fetched, resized, grid, rows };
  } catch (e) {
    throw withIndex(e, index);
  }
}

/**
 * Request images → `pixel_values`, `grid_thw` and token counts. Header-only checks (format, size,
 * per-image bounds, the token cap) run for all images before any pixel is decoded, so an oversized request
 * costs nothing. Throws {@link ImageDecodeError} (with `imageIndex`) for bad images or bounds, and
 * `too_many_image_tokens` when the images together exceed `maxImageTokens`.
 */
export async function preprocessImages(images: readonly PreprocessImageInput[], opts: PreprocessOptions): Promise<PreprocessResult> {
  checkOptions(opts);
  const planned: ImageGrid[] = [];
  let total = 0;
  for (let i = 0; i < images.length; i++) {
    try {
      const h = sniffImage(images[i]!.bytes);
      const max = opts.maxInputPixels;
      if (max !== undefined && h.width * h.height > max) {
        throw new ImageDecodeError("image_too_large", `image is ${h.width}x${h.height}, the limit is ${max} pixels`);
      }
      const g = gridFor(h, images[i]!, opts);
      planned.push(g);
      total += g.tokens;
    } catch (e) {
      if (e instanceof ImageHeaderError) throw new ImageDecodeError(e.code, e.message, i);
      throw withIndex(e, i);
    }
  }
  if (opts.maxImageTokens !== undefined && total > opts.maxImageTokens) {
    throw new ImageDecodeError(
      "too_many_image_tokens",
      `the images need ${total} image tokens (${planned.map((g) => g.tokens).join(" + ")}), the limit is ${opts.maxImageTokens}`,
    );
  }

  const parts: Float32Array[] = [];
  const gridThw: [number, number, number][] = [];
  const imageTokens: number[] = [];
  for (let i = 0; i < images.length; i++) {
    const r = await preprocessImage(images[i]!, opts, i);
    // The decoder's size must be the header's; otherwise the token budget above was computed on a lie.
    if (r.grid.tokens !== planned[i]!.tokens) {
      throw new ImageDecodeError("invalid_image", "decoded image size differs from its header", i);
    }
    parts.push(r.rows);
    gridThw.push(r.grid.gridThw);
    imageTokens.push(r.grid.tokens);
  }
  const pixelValues = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    pixelValues.set(p, off);
    off += p.length;
  }
  return { pixelValues, gridThw, imageTokens };
}

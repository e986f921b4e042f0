/**
 * Image decoding with sharp (libvips) to H×W×3 uint8 RGB, reproducing what the reference pipeline
 * (qwen_vl_utils 0.0.10 `fetch_image` → `to_rgb`, on Pillow 9.4) gets from `Image.open(...)` + `to_rgb`:
 *
 * - RGBA (PNG colour type 6, 16-bit grey+alpha, WebP with alpha) is composited onto white exactly as
 *   Pillow's `paste(white, mask=alpha)` does it (see {@link compositeOnWhite});
 * - every other mode goes through `convert("RGB")`, which drops alpha instead of compositing:
 *   L / LA → L replicated (LA's alpha is dropped, not composited); P → palette lookup with tRNS ignored;
 *   a tRNS chunk on grey / RGB PNGs is ignored as well (Pillow keeps it in `info`, `convert` drops it).
 *   libvips turns every tRNS into an alpha channel, so we read the PNG header ourselves to know where an
 *   alpha channel came from;
 * - 16-bit PNGs follow Pillow 9.4's PNG modes: grey (mode `I`, rawmode `I;16B`) keeps the full value and
 *   `convert("RGB")` CLIPS it to 0..255 (no rescaling: 1000 → 255, 200 → 200); RGB / RGBA (`RGB;16B`,
 *   `RGBA;16B`) and grey+alpha (opened as RGBA via `LA;16B`) keep the most significant byte (v >> 8);
 * - EXIF orientation is NOT applied: Pillow's `Image.open` does not rotate and qwen_vl_utils never calls
 *   `exif_transpose`, so the stored pixel grid is what the model saw in training/evaluation;
 * - embedded ICC profiles are ignored (Pillow does not colour-manage on open; sharp would by default);
 * - CMYK JPEGs: Pillow opens them as mode CMYK with rawmode `CMYK;I` (every 4-component JPEG inverted,
 *   Adobe convention; libvips inverts them all too) and `convert("RGB")` computes `nk − MULDIV255(c, nk)`
 *   with `nk = 255 − k`; we do the same on the raw CMYK samples (sharp would apply an ICC transform);
 * - palette indices past the end of PLTE (invalid, but tolerated by both) get Pillow's grey-ramp entries
 *   (see {@link padPngPalette}).
 *
 * JPEG pixels come from sharp's mozjpeg where Pillow 9.4 used libjpeg-turbo 2.1.5; both run libjpeg-turbo's
 * default (islow IDCT, fancy upsampling) code and agreed bit for bit on every file compared (golden case_06,
 * and 4:2:0 / 4:4:4 / progressive / grey / CMYK files at several qualities checked against libjpeg-turbo
 * 2.1.5 during development).
 *
 * Errors are {@link ImageDecodeError}s with stable codes; image bytes are never logged or put in messages.
 */
import { crc32 as zlibCrc32 } from "node:zlib";
import sharp from "sharp";
import { ApiError } from "../../../shared/src/errors.ts";
import { ImageHeaderError, sniffImage, type ImageMime } from "../../../shared/src/image-header.ts";

/** Codes an image can fail with during preprocessing. */
export type ImageErrorCode =
  | "invalid_image"
  | "unsupported_media_type"
  | "image_too_large"
  | "image_too_small"
  | "aspect_ratio_too_large"
  | "too_many_image_tokens"
  | "invalid_parameter";

/** A typed preprocessing failure: `code` is stable (clients branch on it), `imageIndex` says which image. */
export class ImageDecodeError extends ApiError {
  declare readonly code: ImageErrorCode;
  /** Index of the offending image in the request, when known. */
  readonly imageIndex: number | undefined;
  constructor(code: ImageErrorCode, message: string, imageIndex?: number) {
    super(code, imageIndex === undefined ? message : `image ${imageIndex}: ${message}`);
    this.imageIndex = imageIndex;
  }
}

/** A packed H×W×3 uint8 RGB image (row-major, no padding). */
export interface RgbImage {
  width: number;
  height: number;
  data: Uint8Array;
}

/** Which Pillow mode the reference would open the file as (decides how it becomes RGB). */
export type SourceMode = "L" | "LA" | "I" | "P" | "RGB" | "RGBA" | "CMYK";

/** A decoded image plus what it was. */
export interface DecodedImage extends RgbImage {
  mime: ImageMime;
  /** The Pillow mode of the source (before `to_rgb`). */
  sourceMode: SourceMode;
}

/** Limits for {@link decodeImage}. */
export interface DecodeOptions {
  /** Largest accepted width·height of the stored image (default {@link DEFAULT_MAX_INPUT_PIXELS}). */
  maxInputPixels?: number;
  /** libvips processing time limit in seconds (default 20); a decode that runs longer fails. */
  timeoutSeconds?: number;
}

/** Default cap on decoded pixels: 8192² (≈ 200 MB of RGB in flight at most per image). */
export const DEFAULT_MAX_INPUT_PIXELS = 8192 * 8192;

/** PNG header facts libvips does not expose: bit depth, colour type, tRNS presence, PLTE location. */
export interface PngInfo {
  bitDepth: number;
  colorType: number;
  hasTrns: boolean;
  /** Byte offset of the PLTE chunk (its length field) and its data length, when present. */
  plte?: { offset: number; length: number };
}

/**
 * Reads IHDR and walks the chunks before the first IDAT to find tRNS. Assumes `sniffImage` already
 * validated the signature and IHDR; a chunk list that runs off the end is `invalid_image`.
 */
export function readPngInfo(b: Uint8Array): PngInfo {
  if (b.length < 33) throw new ImageDecodeError("invalid_image", "PNG header is truncated");
  const bitDepth = b[24]!;
  const colorType = b[25]!;
  let hasTrns = false;
  let plte: PngInfo["plte"];
  let off = 8;
  while (off + 8 <= b.length) {
    const len = ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
    const type = String.fromCharCode(b[off + 4]!, b[off + 5]!, b[off + 6]!, b[off + 7]!);
    // tRNS and PLTE must precede IDAT (PNG spec); Pillow also only reads them there.
    if (type === "IDAT" || type === "IEND") return plte ? { bitDepth, colorType, hasTrns, plte } : { bitDepth, colorType, hasTrns };
    if (type === "tRNS") hasTrns = true;
    if (type === "PLTE" && off + 12 + len <= b.length) plte = { offset: off, length: len };
    off += 12 + len;
  }
  throw new ImageDecodeError("invalid_image", "PNG is truncated before its image data");
}

/**
 * A palette PNG whose PLTE has fewer than 2^bitDepth entries can use indices past its end (invalid, but
 * seen in the wild). Pillow 9.4 looks those up in its palette's initial grey ramp (entry i = (i, i, i));
 * libspng would give black. Padding PLTE with the ramp entries makes libspng see what Pillow sees.
 * Returns the input unchanged when the palette is already full.
 */
export function padPngPalette(b: Uint8Array, info: PngInfo): Uint8Array {
  const full = 1 << info.bitDepth;
  if (info.colorType !== 3 || !info.plte || info.plte.length % 3 !== 0 || info.plte.length / 3 >= full) return b;
  const { offset, length } = info.plte;
  const data = new Uint8Array(full * 3);
  data.set(b.subarray(offset + 8, offset + 8 + length));
  for (let i = length / 3; i < full; i++) data.fill(i, i * 3, i * 3 + 3);
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  chunk.set([0x50, 0x4c, 0x54, 0x45], 4); // "PLTE"
  chunk.set(data, 8);
  view.setUint32(8 + data.length, zlibCrc32(chunk.subarray(4, 8 + data.length)));
  const out = new Uint8Array(b.length - (12 + length) + chunk.length);
  out.set(b.subarray(0, offset));
  out.set(chunk, offset);
  out.set(b.subarray(offset + 12 + length), offset + chunk.length);
  return out;
}

/**
 * Alpha-composites straight (non-premultiplied) RGBA onto white exactly like Pillow 9.4's
 * `Image.new("RGB", size, white).paste(rgba, mask=alpha)` (Paste.c `paste_mask_RGBA`, "L" mask path):
 * per channel `x = src·a + 255·(255 − a)`, `y = x + 128`, `out = (y + (y >> 8)) >> 8` (= round(x / 255)).
 * `rgba` holds 4 values per pixel; the result is packed RGB.
 */
export function compositeOnWhite(rgba: ArrayLike<number>, pixels: number): Uint8Array {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0, s = 0, o = 0; i < pixels; i++, s += 4, o += 3) {
    const a = rgba[s + 3]!;
    const bg = 255 * (255 - a);
    for (let c = 0; c < 3; c++) {
      const y = rgba[s + c]! * a + bg + 128;
      out[o + c] = (y + (y >> 8)) >> 8;
    }
  }
  return out;
}

/** Pillow's `MULDIV255(a, b)`: round(a·b / 255) with its shift trick. */
function mulDiv255(a: number, b: number): number {
  const t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

/** Pillow 9.4 `cmyk2rgb` (Convert.c): `CLIP8(nk − MULDIV255(c, nk))` with `nk = 255 − k`. */
export function cmykToRgb(cmyk: ArrayLike<number>, pixels: number): Uint8Array {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0, s = 0, o = 0; i < pixels; i++, s += 4, o += 3) {
    const nk = 255 - cmyk[s + 3]!;
    for (let c = 0; c < 3; c++) {
      const v = nk - mulDiv255(cmyk[s + c]!, nk);
      out[o + c] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
  }
  return out;
}

/** How to pull samples out of libvips for one source kind. */
type Plan =
  | { kind: "grey8"; mode: SourceMode } // L / LA / low-bit grey: first channel, replicated
  | { kind: "grey16" } // PNG 16-bit grey, Pillow mode I: clip to 0..255
  | { kind: "la16" } // PNG 16-bit grey+alpha, Pillow opens as RGBA: high bytes, composite
  | { kind: "rgb8"; mode: SourceMode } // RGB / P: first three channels (tRNS alpha dropped)
  | { kind: "rgb16" } // PNG 16-bit RGB: high bytes
  | { kind: "rgba8" } // RGBA / WebP with alpha: composite
  | { kind: "rgba16" } // PNG 16-bit RGBA: high bytes, composite
  | { kind: "cmyk" };

function planPng(info: PngInfo): Plan {
  const { bitDepth: d, colorType: ct } = info;
  switch (ct) {
    case 0:
      return d === 16 ? { kind: "grey16" } : { kind: "grey8", mode: "L" };
    case 2:
      return d === 16 ? { kind: "rgb16" } : { kind: "rgb8", mode: "RGB" };
    case 3:
      return { kind: "rgb8", mode: "P" };
    case 4:
      // Pillow 9.4 maps (16, 4) to RGBA via rawmode LA;16B ("LA;16B->LA not yet available").
      return d === 16 ? { kind: "la16" } : { kind: "grey8", mode: "LA" };
    case 6:
      return d === 16 ? { kind: "rgba16" } : { kind: "rgba8" };
    default:
      throw new ImageDecodeError("invalid_image", `PNG colour type ${ct} is invalid`);
  }
}

function isSharpPixelLimit(e: unknown): boolean {
  return e instanceof Error && /pixel limit/i.test(e.message);
}

/**
 * Decodes PNG / JPEG / WebP bytes to packed RGB with the reference's `Image.open` + `to_rgb` semantics
 * (see the module comment). Never throws anything but {@link ImageDecodeError}: `unsupported_media_type`
 * (not PNG/JPEG/WebP, e.g. GIF), `invalid_image` (empty, truncated, corrupt), `image_too_large`
 * (width·height above `maxInputPixels`, checked from the header before any pixel is decoded).
 */
export async function decodeImage(bytes: Uint8Array, opts: DecodeOptions = {}): Promise<DecodedImage> {
  const maxInputPixels = opts.maxInputPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  let header;
  try {
    header = sniffImage(bytes);
  } catch (e) {
    if (e instanceof ImageHeaderError) throw new ImageDecodeError(e.code, e.message);
    throw new ImageDecodeError("invalid_image", "image header could not be read");
  }
  const { mime, width, height } = header;
  if (width * height > maxInputPixels) {
    throw new ImageDecodeError(
      "image_too_large",
      `image is ${width}x${height} = ${width * height} pixels, the limit is ${maxInputPixels}`,
    );
  }

  let pngInfo: PngInfo | undefined;
  let src = bytes;
  if (mime === "image/png") {
    pngInfo = readPngInfo(bytes);
    src = padPngPalette(bytes, pngInfo);
  }
  // A Buffer view (no copy): sharp treats plain TypedArrays like Buffers for encoded input, but a Buffer
  // leaves no doubt that these are file bytes, not raw pixels.
  const buf = Buffer.from(src.buffer, src.byteOffset, src.byteLength);
  const input = () =>
    sharp(buf, {
      // Pillow does not colour-manage on open.
      ignoreIcc: true,
      // Pillow refuses truncated files (LOAD_TRUNCATED_IMAGES is False) but tolerates libjpeg warnings
      // such as extraneous bytes before a marker; 'truncated' is the matching strictness.
      failOn: "truncated",
      limitInputPixels: maxInputPixels,
      // First frame of an animated WebP / APNG, as Image.open shows it.
      pages: 1,
      // No autoOrient: EXIF orientation must not be applied (see module comment).
    }).timeout({ seconds: opts.timeoutSeconds ?? 20 });

  try {
    let plan: Plan;
    if (pngInfo) {
      plan = planPng(pngInfo);
    } else {
      const meta = await input().metadata();
      if (mime === "image/jpeg") {
        plan =
          meta.channels === 1
            ? { kind: "grey8", mode: "L" }
            : meta.channels === 4 || meta.space === "cmyk"
              ? { kind: "cmyk" }
              : { kind: "rgb8", mode: "RGB" };
      } else {
        // Pillow opens WebP as RGBA when the file declares alpha, else RGB.
        plan = meta.hasAlpha ? { kind: "rgba8" } : { kind: "rgb8", mode: "RGB" };
      }
    }

    const px = width * height;
    let rgb: Uint8Array;
    let sourceMode: SourceMode;
    switch (plan.kind) {
      case "grey8": {
        // 'b-w' keeps the 8-bit grey samples as stored (low bit depths scaled ×255/(2^d−1), as Pillow's
        // "1"/L;2/L;4 unpackers do) and drops any alpha.
        const { data, info } = await input().toColourspace("b-w").raw().toBuffer({ resolveWithObject: true });
        checkSize(info, width, height);
        rgb = replicate(data, info.channels, px, (v) => v);
        sourceMode = plan.mode;
        break;
      }
      case "grey16": {
        const s = await raw16(input().toColourspace("grey16"), width, height);
        // Pillow I → RGB (Convert.c i2rgb) clips, it does not rescale.
        rgb = replicate(s.data, s.channels, px, (v) => (v > 255 ? 255 : v));
        sourceMode = "I";
        break;
      }
      case "la16": {
        const s = await raw16(input().toColourspace("grey16"), width, height);
        if (s.channels < 2) throw new ImageDecodeError("invalid_image", "16-bit grey+alpha PNG decoded without alpha");
        const rgba = new Uint8Array(px * 4);
        for (let i = 0; i < px; i++) {
          const g = s.data[i * s.channels]! >> 8;
          rgba[i * 4] = g;
          rgba[i * 4 + 1] = g;
          rgba[i * 4 + 2] = g;
          rgba[i * 4 + 3] = s.data[i * s.channels + 1]! >> 8;
        }
        rgb = compositeOnWhite(rgba, px);
        sourceMode = "RGBA";
        break;
      }
      case "rgb16":
      case "rgba16": {
        const s = await raw16(input().toColourspace("rgb16"), width, height);
        if (s.channels < 3) throw new ImageDecodeError("invalid_image", "16-bit colour PNG decoded with too few channels");
        if (plan.kind === "rgb16") {
          rgb = new Uint8Array(px * 3);
          for (let i = 0; i < px; i++) {
            for (let c = 0; c < 3; c++) rgb[i * 3 + c] = s.data[i * s.channels + c]! >> 8;
          }
        } else {
          if (s.channels < 4) throw new ImageDecodeError("invalid_image", "16-bit RGBA PNG decoded without alpha");
          const hi = new Uint8Array(px * 4);
          for (let i = 0; i < px * 4; i++) hi[i] = s.data[i]! >> 8;
          rgb = compositeOnWhite(hi, px);
        }
        sourceMode = plan.kind === "rgb16" ? "RGB" : "RGBA";
        break;
      }
      case "rgb8":
      case "rgba8": {
        const { data, info } = await input().toColourspace("srgb").raw().toBuffer({ resolveWithObject: true });
        checkSize(info, width, height);
        if (info.channels < 3) throw new ImageDecodeError("invalid_image", "colour image decoded with too few channels");
        if (plan.kind === "rgba8" && info.channels === 4) {
          rgb = compositeOnWhite(data, px);
          sourceMode = "RGBA";
        } else {
          // 3 channels, or RGB/P with a tRNS-derived alpha channel that Pillow's convert("RGB") ignores.
          rgb = info.channels === 3 ? new Uint8Array(data.buffer, data.byteOffset, px * 3) : dropAlpha(data, info.channels, px);
          sourceMode = plan.kind === "rgb8" ? plan.mode : "RGB";
        }
        break;
      }
      case "cmyk": {
        // Keep the pipeline in CMYK so libvips applies no ICC transform; samples come out as stored
        // (Adobe-inverted files inverted back, like Pillow's CMYK;I rawmode).
        const { data, info } = await input()
          .pipelineColourspace("cmyk")
          .toColourspace("cmyk")
          .raw()
          .toBuffer({ resolveWithObject: true });
        checkSize(info, width, height);
        if (info.channels !== 4) throw new ImageDecodeError("invalid_image", "CMYK JPEG decoded without 4 channels");
        rgb = cmykToRgb(data, px);
        sourceMode = "CMYK";
        break;
      }
    }
    return { width, height, data: rgb, mime, sourceMode };
  } catch (e) {
    if (e instanceof ImageDecodeError) throw e;
    if (isSharpPixelLimit(e)) {
      throw new ImageDecodeError("image_too_large", `image exceeds the limit of ${maxInputPixels} pixels`);
    }
    // The decoder library's own words name its internals (libspng, VipsJpeg): the client gets a fixed message.
    throw new ImageDecodeError("invalid_image", "the image could not be decoded (corrupt or truncated)");
  }
}

function checkSize(info: { width: number; height: number }, width: number, height: number): void {
  // The header said one size, the decoder another: treat as corrupt rather than guess.
  if (info.width !== width || info.height !== height) {
    throw new ImageDecodeError("invalid_image", `decoded size ${info.width}x${info.height} differs from header ${width}x${height}`);
  }
}

async function raw16(
  s: sharp.Sharp,
  width: number,
  height: number,
): Promise<{ data: Uint16Array; channels: number }> {
  const { data, info } = await s.raw({ depth: "ushort" }).toBuffer({ resolveWithObject: true });
  checkSize(info, width, height);
  // Copy: the Buffer may not be 2-byte aligned inside Node's pool.
  const copy = new Uint8Array(data.byteLength);
  copy.set(data);
  return { data: new Uint16Array(copy.buffer, 0, copy.byteLength >> 1), channels: info.channels };
}

function replicate(src: ArrayLike<number>, channels: number, px: number, f: (v: number) => number): Uint8Array {
  const out = new Uint8Array(px * 3);
  for (let i = 0; i < px; i++) {
    const v = f(src[i * channels]!);
    out[i * 3] = v;
    out[i * 3 + 1] = v;
    out[i * 3 + 2] = v;
  }
  return out;
}

function dropAlpha(src: Uint8Array, channels: number, px: number): Uint8Array {
  const out = new Uint8Array(px * 3);
  for (let i = 0; i < px; i++) {
    out[i * 3] = src[i * channels]!;
    out[i * 3 + 1] = src[i * channels + 1]!;
    out[i * 3 + 2] = src[i * channels + 2]!;
  }
  return out;
}

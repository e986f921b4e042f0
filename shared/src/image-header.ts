/**
 * Image type and dimensions from the first bytes of a PNG, JPEG or WebP file: magic bytes and header
 * fields only, nothing is decoded. Used by the edge to validate uploads (pixel caps, aspect ratio,
 * smart_resize grid) before any bytes travel on, and by the backend to cross-check what it decodes.
 *
 * Every read is bounds-checked: truncated or corrupt input raises `ImageHeaderError` (`invalid_image`),
 * an unknown format raises it with `unsupported_media_type`; nothing else is ever thrown.
 */
import { ApiError } from "./errors.ts";

/** The image formats the model server accepts. */
export type ImageMime = "image/png" | "image/jpeg" | "image/webp";

/** All accepted image MIME types, in a fixed order (for messages and checks). */
export const IMAGE_MIMES: readonly ImageMime[] = ["image/png", "image/jpeg", "image/webp"];

/** What the header says: the real format (from magic bytes) and the pixel dimensions. */
export interface ImageHeader {
  mime: ImageMime;
  width: number;
  height: number;
}

export type ImageHeaderErrorCode = "unsupported_media_type" | "invalid_image";

/** A header that is not PNG/JPEG/WebP (`unsupported_media_type`) or is truncated/corrupt (`invalid_image`). */
export class ImageHeaderError extends ApiError {
  // `declare` narrows the inherited field's type without re-initialising it.
  declare readonly code: ImageHeaderErrorCode;
  constructor(code: ImageHeaderErrorCode, message: string) {
    super(code, message);
    this.name = "ImageHeaderError";
  }
}

const invalid = (msg: string) => new ImageHeaderError("invalid_image", msg);

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a] as const;

/**
 * Reads the image type and size from the header bytes of `bytes` (the whole file or at least its header;
 * for JPEG, the header runs up to the first frame marker, which may follow large metadata segments).
 * Throws `ImageHeaderError` for unknown formats and truncated or implausible headers.
 */
export function sniffImage(bytes: Uint8Array): ImageHeader {
  if (bytes.length === 0) throw invalid("image is empty");
  if (startsWith(bytes, PNG_SIGNATURE)) return sniffPng(bytes);
  if (bytes.length >= 2 && bytes[0] === 0xff && bytes[1] === 0xd8) return sniffJpeg(bytes);
  if (isRiffWebp(bytes)) return sniffWebp(bytes);
  // A few bytes that could still grow into a known signature: the header is cut off, not foreign.
  if (isSignaturePrefix(bytes)) throw invalid("image header is truncated");
  throw new ImageHeaderError("unsupported_media_type", "image is not a PNG, JPEG or WebP file");
}

function startsWith(b: Uint8Array, sig: readonly number[]): boolean {
  if (b.length < sig.length) return false;
  for (let i = 0; i < sig.length; i++) if (b[i] !== sig[i]) return false;
  return true;
}

function isRiffWebp(b: Uint8Array): boolean {
  return b.length >= 12 && ascii(b, 0, 4) === "RIFF" && ascii(b, 8, 4) === "WEBP";
}

/** True when `b` is shorter than some signature and matches it as far as it goes. */
function isSignaturePrefix(b: Uint8Array): boolean {
  const n = b.length;
  const matches = (sig: readonly (number | null)[]) => {
    if (n >= sig.length) return false;
    for (let i = 0; i < n; i++) if (sig[i] !== null && sig[i] !== b[i]) return false;
    return true;
  };
  const R = 0x52, I = 0x49, F = 0x46, W = 0x57, E = 0x45, B = 0x42, P = 0x50;
  return (
    matches(PNG_SIGNATURE) ||
    matches([0xff, 0xd8]) ||
    matches([R, I, F, F, null, null, null, null, W, E, B, P])
  );
}

/** `len` bytes at `off` as Latin-1 (callers check bounds first). */
function ascii(b: Uint8Array, off: number, len: number): string {
  let s = "";
  for (let i = off; i < off + len; i++) s += String.fromCharCode(b[i]!);
  return s;
}

const u16be = (b: Uint8Array, o: number) => (b[o]! << 8) | b[o + 1]!;
const u32be = (b: Uint8Array, o: number) => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
const u16le = (b: Uint8Array, o: number) => b[o]! | (b[o + 1]! << 8);
const u24le = (b: Uint8Array, o: number) => b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16);
const u32le = (b: Uint8Array, o: number) => (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;

// ---------------------------------------------------------------------------------------------- PNG

/** Allowed bit depths per PNG colour type (PNG spec, table 11.1). */
const PNG_DEPTHS: Record<number, readonly number[]> = {
  0: [1, 2, 4, 8, 16], // greyscale
  2: [8, 16], // truecolour
  3: [1, 2, 4, 8], // indexed
  4: [8, 16], // greyscale + alpha
  6: [8, 16], // truecolour + alpha
};

const PNG_MAX_DIM = 0x7fffffff;

function sniffPng(b: Uint8Array): ImageHeader {
  // signature (8) + IHDR length (4) + type (4) + data (13) + CRC (4)
  if (b.length < 33) throw invalid("PNG header is truncated (IHDR chunk incomplete)");
  if (u32be(b, 8) !== 13 || ascii(b, 12, 4) !== "IHDR") throw invalid("PNG does not start with a 13-byte IHDR chunk");
  const width = u32be(b, 16);
  const height = u32be(b, 20);
  const depth = b[24]!, colorType = b[25]!, compression = b[26]!, filter = b[27]!, interlace = b[28]!;
  if (width === 0 || height === 0 || width > PNG_MAX_DIM || height > PNG_MAX_DIM) {
    throw invalid(`PNG dimensions ${width}x${height} are invalid`);
  }
  const depths = PNG_DEPTHS[colorType];
  if (!depths || !depths.includes(depth)) throw invalid(`PNG bit depth ${depth} / colour type ${colorType} is invalid`);
  if (compression !== 0 || filter !== 0 || interlace > 1) throw invalid("PNG IHDR has unknown compression, filter or interlace method");
  // The CRC covers chunk type + data; a mismatch means the header bytes were damaged.
  if (crc32(b, 12, 29) !== u32be(b, 29)) throw invalid("PNG IHDR checksum does not match");
  return { mime: "image/png", width, height };
}

let CRC_TABLE: Uint32Array | undefined;

/** CRC-32 (ISO 3309 / PNG) of `b[start, end)`. */
function crc32(b: Uint8Array, start: number, end: number): number {
  if (!CRC_TABLE) {
    CRC_TABLE = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      CRC_TABLE[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ b[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// --------------------------------------------------------------------------------------------- JPEG

/** Start-of-frame markers that carry the image size (not C4 DHT, C8 JPG, CC DAC). */
function isSof(m: number): boolean {
  return m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc;
}

function sniffJpeg(b: Uint8Array): ImageHeader {
  let p = 2; // after SOI
  for (;;) {
    // Each segment starts with 0xFF; any number of extra 0xFF fill bytes may precede the marker code.
    if (p >= b.length) throw invalid("JPEG header is truncated before the frame header");
    if (b[p] !== 0xff) throw invalid("JPEG marker expected but not found");
    while (p < b.length && b[p] === 0xff) p++;
    if (p >= b.length) throw invalid("JPEG header is truncated before the frame header");
    const m = b[p++]!;
    // Markers without a length field.
    if (m === 0x01 || (m >= 0xd0 && m <= 0xd7)) continue;
    if (m === 0x00 || m === 0xd8 || m === 0xd9 || m === 0xda) {
      throw invalid("JPEG has no frame header before its image data");
    }
    if (p + 2 > b.length) throw invalid("JPEG header is truncated (segment length)");
    const len = u16be(b, p); // includes its own two bytes
    if (len < 2) throw invalid("JPEG segment length is invalid");
    if (isSof(m)) {
      if (p + len > b.length || len < 8) throw invalid("JPEG frame header is truncated");
      const precision = b[p + 2]!;
      const height = u16be(b, p + 3);
      const width = u16be(b, p + 5);
      const components = b[p + 7]!;
      if (precision < 2 || precision > 16) throw invalid(`JPEG sample precision ${precision} is invalid`);
      if (components === 0 || len !== 8 + 3 * components) throw invalid("JPEG frame header component count is invalid");
      // Height 0 (size deferred to a DNL marker) is legal JPEG but unusable for validation.
      if (width === 0 || height === 0) throw invalid(`JPEG dimensions ${width}x${height} are invalid`);
      return { mime: "image/jpeg", width, height };
    }
    p += len;
  }
}

// --------------------------------------------------------------------------------------------- WebP

function sniffWebp(b: Uint8Array): ImageHeader {
  // RIFF header (12) + first chunk's FourCC and size (8); the chunk data starts at 20.
  if (b.length < 20) throw invalid("WebP header is truncated");
  const fourcc = ascii(b, 12, 4);
  const chunkSize = u32le(b, 16);
  const d = 20;
  const need = (n: number, what: string) => {
    if (chunkSize < n) throw invalid(`WebP ${what} chunk is too short`);
    if (b.length < d + n) throw invalid(`WebP ${what} header is truncated`);
  };
  if (u32le(b, 4) < 12) throw invalid("WebP RIFF size is too small");
  let width: number, height: number;
  if (fourcc === "VP8 ") {
    // Lossy: 3-byte frame tag (bit 0 = 0 for a key frame), start code 9d 01 2a, then 14-bit sizes
    // (the top 2 bits of each are a scaling hint).
    need(10, "VP8");
    if ((b[d]! & 1) !== 0) throw invalid("WebP VP8 frame is not a key frame");
    if (b[d + 3] !== 0x9d || b[d + 4] !== 0x01 || b[d + 5] !== 0x2a) throw invalid("WebP VP8 start code is missing");
    width = u16le(b, d + 6) & 0x3fff;
    height = u16le(b, d + 8) & 0x3fff;
  } else if (fourcc === "VP8L") {
    // Lossless: signature 0x2f, then 14 bits width-1, 14 bits height-1, 1 alpha bit, 3 version bits (0).
    need(5, "VP8L");
    if (b[d] !== 0x2f) throw invalid("WebP VP8L signature is missing");
    const bits = u32le(b, d + 1);
    width = (bits & 0x3fff) + 1;
    height = ((bits >>> 14) & 0x3fff) + 1;
    if (bits >>> 29 !== 0) throw invalid("WebP VP8L version is unknown");
  } else if (fourcc === "VP8X") {
    // Extended: flags (1), reserved (3), canvas width-1 and height-1 as 24-bit little-endian.
    need(10, "VP8X");
    width = u24le(b, d + 4) + 1;
    height = u24le(b, d + 7) + 1;
  } else {
    throw invalid("WebP does not start with a VP8, VP8L or VP8X chunk");
  }
  if (width === 0 || height === 0) throw invalid(`WebP dimensions ${width}x${height} are invalid`);
  return { mime: "image/webp", width, height };
}

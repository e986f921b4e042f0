/**
 * Backend image preprocessing (gpu-backend/src/preprocess) against the golden reference
 * (qwen_vl_utils 0.0.10 fetch_image on Pillow 9.4 + transformers 4.46.1 Qwen2VLImageProcessor), plus
 * the decode rules of Pillow 9.4 that the golden images do not exercise, and every failure mode.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import fc from "fast-check";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { QWEN_VL_UTILS_DEFAULTS } from "../../shared/src/smart-resize.ts";
import {
  bicubicCoefficients,
  cmykToRgb,
  compositeOnWhite,
  decodeImage,
  fetchImageRgb,
  ImageDecodeError,
  normalizationTable,
  patchify,
  preprocessImage,
  preprocessImages,
  readPngInfo,
  resizeBicubicInterleaved,
  resizeBicubicRgb,
  type PreprocessOptions,
  type RgbImage,
} from "../../gpu-backend/src/preprocess/index.ts";
import { GOLDEN_DIR, goldenImagePath, loadGoldenCases, loadGoldenF32, type GoldenImage } from "../support/golden.ts";
import { crc32 } from "../support/crc32.ts";
import type { PreprocessorConfig } from "../../gpu-backend/src/engine/model.ts";

const preConfig = JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "preprocessor_config.json"), "utf8")) as PreprocessorConfig;

const OPTS: PreprocessOptions = {
  minPixels: preConfig.min_pixels,
  maxPixels: preConfig.max_pixels,
  patchSize: preConfig.patch_size,
  mergeSize: preConfig.merge_size,
  temporalPatchSize: preConfig.temporal_patch_size,
  imageMean: preConfig.image_mean,
  imageStd: preConfig.image_std,
};
const ROW = 3 * OPTS.temporalPatchSize * OPTS.patchSize * OPTS.patchSize; // 1176

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

const cases = loadGoldenCases();

/** A golden image's qwen_vl_utils kwargs in the camelCase the API takes. */
function bounds(img: GoldenImage): { minPixels?: number; maxPixels?: number } {
  const k = img.qwen_vl_utils_kwargs;
  return {
    ...(k.min_pixels !== undefined ? { minPixels: k.min_pixels } : {}),
    ...(k.max_pixels !== undefined ? { maxPixels: k.max_pixels } : {}),
  };
}
const goldenImages = cases.flatMap((c) => c.images.map((img, i) => ({ c, img, i, name: `${c.case} #${i} ${img.image}` })));

/** Requires `promise` to reject with an ImageDecodeError of `code`; returns it. */
async function rejectsWith(promise: Promise<unknown>, code: string): Promise<ImageDecodeError> {
  try {
    await promise;
  } catch (e) {
    expect(e).toBeInstanceOf(ImageDecodeError);
    expect((e as ImageDecodeError).code).toBe(code);
    return e as ImageDecodeError;
  }
  throw new Error(`expected a rejection with ${code}`);
}

// ---------------------------------------------------------------------------------------------------
// A minimal PNG writer, so tests control bit depth, colour type, PLTE and tRNS exactly.

function chunk(type: string, data: Uint8Array): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])));
  return Buffer.concat([head, data, crc]);
}
/** `rows`: packed scanlines (no filter byte); 16-bit samples big-endian as PNG stores them. */
function makePng(o: {
  width: number;
  height: number;
  bitDepth: number;
  colorType: number;
  rows: number[][];
  plte?: number[];
  trns?: number[];
  /** Complete chunks (length, type, data, CRC) to put right after IHDR. */
  extra?: Buffer[];
}): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(o.width, 0);
  ihdr.writeUInt32BE(o.height, 4);
  ihdr[8] = o.bitDepth;
  ihdr[9] = o.colorType;
  const raw = Buffer.concat(o.rows.map((r) => Buffer.from([0, ...r])));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    ...(o.extra ?? []),
    ...(o.plte ? [chunk("PLTE", Buffer.from(o.plte))] : []),
    ...(o.trns ? [chunk("tRNS", Buffer.from(o.trns))] : []),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", new Uint8Array(0)),
  ]);
}
const be16 = (...vs: number[]) => vs.flatMap((v) => [v >> 8, v & 0xff]);

// ---------------------------------------------------------------------------------------------------

describe("golden: fetch_image RGB, pixel_values and grid_thw are bit-exact", () => {
  it("covers every golden image (5 cases with images, 6 images)", () => {
    expect(goldenImages.length).toBe(6);
  });

  it.each(goldenImages)("$name: resized RGB sha256 = fetched_rgb_u8_sha256", async ({ img }) => {
    const bytes = readFileSync(goldenImagePath(img.image));
    const { decoded, fetched } = await fetchImageRgb(bytes, {
      minPixels: img.qwen_vl_utils_kwargs.min_pixels ?? QWEN_VL_UTILS_DEFAULTS.minPixels,
      maxPixels: img.qwen_vl_utils_kwargs.max_pixels ?? QWEN_VL_UTILS_DEFAULTS.maxPixels,
    });
    expect([decoded.width, decoded.height]).toEqual(img.original_size_wh);
    expect(decoded.sourceMode).toBe(img.original_mode);
    expect([fetched.width, fetched.height]).toEqual(img.fetched_size_wh);
    expect(sha256(fetched.data)).toBe(img.fetched_rgb_u8_sha256);
  });

  it.each(goldenImages)("$name: pixel_values rows and grid_thw", async ({ c, img }) => {
    const bytes = readFileSync(goldenImagePath(img.image));
    const r = await preprocessImage({ bytes, ...bounds(img) }, OPTS);
    expect(r.grid.gridThw).toEqual(img.grid_thw);
    expect(r.grid.tokens).toBe(img.merged_tokens[1] - img.merged_tokens[0]);
    const [a, b] = img.pixel_value_rows;
    const ref = loadGoldenF32(c.pixel_values!.file).subarray(a * ROW, b * ROW);
    expect(r.rows.length).toBe(ref.length);
    // Compare bit patterns (also distinguishes -0 / NaN payloads): exact, not approximate.
    expect(Buffer.compare(Buffer.from(r.rows.buffer, r.rows.byteOffset, r.rows.byteLength), Buffer.from(ref.buffer, ref.byteOffset, ref.byteLength))).toBe(0);
  });

  // qwen_vl_utils resizes to smart_resize(resized_height, resized_width) instead of the image's own size: asking for
  // the size each golden image was fetched at must reach the same resize, hence the same rows, bit for bit.
  it.each(goldenImages)("$name: resized_height/resized_width = the fetched size gives the same rows and grid", async ({ c, img }) => {
    const [width, height] = img.fetched_size_wh;
    const r = await preprocessImage({ bytes: readFileSync(goldenImagePath(img.image)), resizedHeight: height, resizedWidth: width }, OPTS);
    expect([r.fetched.width, r.fetched.height]).toEqual(img.fetched_size_wh);
    expect(r.grid.gridThw).toEqual(img.grid_thw);
    const [a, b] = img.pixel_value_rows;
    const ref = loadGoldenF32(c.pixel_values!.file).subarray(a * ROW, b * ROW);
    expect(Buffer.compare(Buffer.from(r.rows.buffer, r.rows.byteOffset, r.rows.byteLength), Buffer.from(ref.buffer, ref.byteOffset, ref.byteLength))).toBe(0);
  });

  it("resized_height/resized_width: the size asked for, rounded to 28, whatever the image's own; bounds ignored as in qwen_vl_utils", async () => {
    const img = goldenImages.find((g) => g.img.image.includes("mdb146"))!.img; // 1024x1024
    const bytes = readFileSync(goldenImagePath(img.image));
    // smart_resize(300, 500, 28): round(10.71)·28 = 308, round(17.86)·28 = 504 — not square like the image.
    const r = await preprocessImage({ bytes, resizedHeight: 300, resizedWidth: 500, maxPixels: 3136 }, OPTS);
    expect([r.fetched.height, r.fetched.width]).toEqual([308, 504]);
    expect(r.grid).toMatchObject({ gridThw: [1, 22, 36], tokens: 198 });
    await expect(preprocessImage({ bytes, resizedHeight: 300 }, OPTS)).rejects.toMatchObject({ code: "invalid_parameter" });
    // Outside the server's window (here the processor's 12845056 pixels): refused before decoding.
    await expect(preprocessImages([{ bytes, resizedHeight: 4000, resizedWidth: 4000 }], { ...OPTS, maxPixels: 1003520 })).rejects.toMatchObject({
      code: "invalid_parameter",
      imageIndex: 0,
      message: expect.stringMatching(/outside the server's range of 3136 to 1003520/),
    });
  });

  it.each(cases.filter((c) => c.pixel_values))("$case: preprocessImages reproduces the whole pixel_values file", async (c) => {
    const images = c.images.map((img) => ({ bytes: readFileSync(goldenImagePath(img.image)), ...bounds(img) }));
    const r = await preprocessImages(images, OPTS);
    const ref = loadGoldenF32(c.pixel_values!.file);
    expect(sha256(new Uint8Array(r.pixelValues.buffer))).toBe(c.pixel_values!.sha256);
    expect(r.pixelValues.length).toBe(ref.length);
    expect(r.gridThw).toEqual(c.image_grid_thw);
    expect(r.imageTokens).toEqual(c.images.map((img) => img.merged_tokens[1] - img.merged_tokens[0]));
  });

  it("case_06 (JPEG): per-pixel difference to the reference RGB (recovered from pixel_values) is measured as 0", async () => {
    const c = cases.find((x) => x.case === "case_06")!;
    const img = c.images[0]!;
    const { fetched } = await fetchImageRgb(readFileSync(goldenImagePath(img.image)), { minPixels: 3136, maxPixels: 50176 });
    // The normalization table is injective per channel, so the golden rows give back the reference
    // uint8 RGB exactly; un-patchify frame 0 of each row.
    const table = normalizationTable(OPTS.imageMean, OPTS.imageStd);
    const inverse = table.map((t) => new Map(Array.from(t, (f, v) => [f, v] as const)));
    expect(inverse.every((m) => m.size === 256)).toBe(true);
    const rows = loadGoldenF32(c.pixel_values!.file);
    const [W, H] = img.fetched_size_wh;
    const ref = new Uint8Array(W * H * 3);
    const gw = W / 14;
    for (let r = 0; r < rows.length / ROW; r++) {
      const blk = Math.floor(r / 4);
      const ph = Math.floor(blk / (gw / 2)) * 2 + (Math.floor(r / 2) % 2);
      const pw = (blk % (gw / 2)) * 2 + (r % 2);
      for (let ch = 0; ch < 3; ch++) {
        for (let py = 0; py < 14; py++) {
          for (let px = 0; px < 14; px++) {
            const v = inverse[ch]!.get(rows[r * ROW + ch * 392 + py * 14 + px]!);
            if (v === undefined) throw new Error("golden value outside the normalization table");
            ref[((ph * 14 + py) * W + pw * 14 + px) * 3 + ch] = v;
          }
        }
      }
    }
    expect(sha256(ref)).toBe(img.fetched_rgb_u8_sha256); // the recovery itself is exact
    let max = 0;
    let sum = 0;
    for (let i = 0; i < ref.length; i++) {
      const d = Math.abs(ref[i]! - fetched.data[i]!);
      max = Math.max(max, d);
      sum += d;
    }
    console.log(`case_06 JPEG vs reference: max |diff| ${max}, mean |diff| ${(sum / ref.length).toFixed(4)}`);
    // Measured: sharp 0.34 (mozjpeg) decodes this file exactly like Pillow's libjpeg-turbo 2.1.5.
    expect(max).toBe(0);
  });

  it("greyscale sources: the one-channel resize path gives the same bytes as the 3-channel path", async () => {
    for (const { img } of goldenImages.filter((g) => g.img.original_mode === "L")) {
      const decoded = await decodeImage(readFileSync(goldenImagePath(img.image)));
      const [w, h] = img.fetched_size_wh;
      const grey = resizeBicubicRgb(decoded, w, h, true);
      const full = resizeBicubicRgb(decoded, w, h, false);
      expect(Buffer.compare(Buffer.from(grey.data), Buffer.from(full.data))).toBe(0);
      expect(sha256(full.data)).toBe(img.fetched_rgb_u8_sha256);
    }
  });

  it("times decode + resize + patchify of the 1024² mdb146.png (→ 308², max_pixels 100352)", async () => {
    const bytes = readFileSync(goldenImagePath("images/mdb146.png"));
    const input = { bytes, maxPixels: 100352 };
    await preprocessImage(input, OPTS); // warm-up (JIT)
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      const r = await preprocessImage(input, OPTS);
      times.push(performance.now() - t0);
      expect(r.grid.gridThw).toEqual([1, 22, 22]);
    }
    times.sort((a, b) => a - b);
    console.log(`mdb146.png 1024x1024 L → 308x308 → 484x1176 pixel_values: median ${times[1]!.toFixed(1)} ms (min ${times[0]!.toFixed(1)})`);
    // Generous bound for a shared 2-core CI box; typical is tens of ms.
    expect(times[1]!).toBeLessThan(3000);
  });
});

// ---------------------------------------------------------------------------------------------------

describe("decode: Pillow 9.4 Image.open + qwen_vl_utils to_rgb semantics", () => {
  it("RGBA is composited on white with paste(mask=alpha) arithmetic", async () => {
    // (src, a): (200,100,0 | 128), (10,20,30 | 0), (255,255,255 | 255), (0,0,0 | 1)
    const png = makePng({ width: 4, height: 1, bitDepth: 8, colorType: 6, rows: [[200, 100, 0, 128, 10, 20, 30, 0, 255, 255, 255, 255, 0, 0, 0, 1]] });
    const d = await decodeImage(png);
    expect(d.sourceMode).toBe("RGBA");
    // 200·128 + 255·127 = 57985 → 227; 100·128 + 32385 = 45185 → 177; 32385 / 255 = 127; a = 0 → white; 255·254 / 255 = 254.
    expect(Array.from(d.data)).toEqual([227, 177, 127, 255, 255, 255, 255, 255, 255, 254, 254, 254]);
  });

  it("compositeOnWhite equals round((src·a + 255·(255 − a)) / 255) for all 65536 (src, a)", () => {
    const rgba = new Uint8Array(65536 * 4);
    for (let v = 0; v < 256; v++) {
      for (let a = 0; a < 256; a++) {
        const i = (v * 256 + a) * 4;
        rgba.set([v, v, v, a], i);
      }
    }
    const out = compositeOnWhite(rgba, 65536);
    for (let v = 0; v < 256; v++) {
      for (let a = 0; a < 256; a++) {
        const expected = Math.round((v * a + 255 * (255 - a)) / 255);
        if (out[(v * 256 + a) * 3] !== expected) throw new Error(`v=${v} a=${a}: ${out[(v * 256 + a) * 3]} != ${expected}`);
      }
    }
  });

  it("LA (8-bit grey+alpha) drops alpha: convert('RGB'), not a composite", async () => {
    const png = makePng({ width: 3, height: 1, bitDepth: 8, colorType: 4, rows: [[10, 0, 20, 128, 30, 255]] });
    const d = await decodeImage(png);
    expect(d.sourceMode).toBe("LA");
    expect(Array.from(d.data)).toEqual([10, 10, 10, 20, 20, 20, 30, 30, 30]);
  });

  it("palette PNG with tRNS: palette lookup, transparency ignored (libvips would add alpha)", async () => {
    const plte = [10, 20, 30, 40, 50, 60, 70, 80, 90];
    const png = makePng({ width: 4, height: 1, bitDepth: 8, colorType: 3, rows: [[0, 1, 2, 0]], plte, trns: [0, 128] });
    expect(readPngInfo(png)).toMatchObject({ bitDepth: 8, colorType: 3, hasTrns: true });
    const d = await decodeImage(png);
    expect(d.sourceMode).toBe("P");
    expect(Array.from(d.data)).toEqual([10, 20, 30, 40, 50, 60, 70, 80, 90, 10, 20, 30]);
    // What a naive sharp decode would give instead (alpha → flattened): the first pixel is not palette[0].
    const flat = await sharp(png).flatten({ background: "#ffffff" }).raw().toBuffer();
    expect(Array.from(flat.subarray(0, 3))).not.toEqual([10, 20, 30]);
  });

  it("palette indices past the end of PLTE get Pillow's grey-ramp entries (libspng alone gives black)", async () => {
    const png = makePng({ width: 4, height: 1, bitDepth: 8, colorType: 3, rows: [[0, 1, 5, 200]], plte: [10, 20, 30, 40, 50, 60], trns: [0] });
    expect(Array.from((await decodeImage(png)).data)).toEqual([10, 20, 30, 40, 50, 60, 5, 5, 5, 200, 200, 200]);
    const p4 = makePng({ width: 2, height: 1, bitDepth: 4, colorType: 3, rows: [[0x0f]], plte: [1, 2, 3] });
    expect(Array.from((await decodeImage(p4)).data)).toEqual([1, 2, 3, 15, 15, 15]);
    expect(Array.from(await sharp(p4).raw().toBuffer())).toEqual([1, 2, 3, 0, 0, 0]);
  });

  it("low bit depths: 2-bit palette, 1/2/4-bit grey scaled like Pillow's unpackers", async () => {
    const plte = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    const p2 = makePng({ width: 4, height: 1, bitDepth: 2, colorType: 3, rows: [[0b00011011]], plte });
    expect(Array.from((await decodeImage(p2)).data)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    const g1 = makePng({ width: 8, height: 1, bitDepth: 1, colorType: 0, rows: [[0b10110001]] });
    expect(Array.from((await decodeImage(g1)).data).filter((_, i) => i % 3 === 0)).toEqual([255, 0, 255, 255, 0, 0, 0, 255]);
    const g2 = makePng({ width: 4, height: 1, bitDepth: 2, colorType: 0, rows: [[0b00011011]] });
    expect(Array.from((await decodeImage(g2)).data).filter((_, i) => i % 3 === 0)).toEqual([0, 85, 170, 255]);
    const g4 = makePng({ width: 2, height: 1, bitDepth: 4, colorType: 0, rows: [[0x1f]] });
    expect(Array.from((await decodeImage(g4)).data).filter((_, i) => i % 3 === 0)).toEqual([17, 255]);
  });

  it("grey and RGB tRNS (colour-key transparency) are ignored", async () => {
    const g = makePng({ width: 3, height: 1, bitDepth: 8, colorType: 0, rows: [[10, 20, 30]], trns: [0, 20] });
    expect(Array.from((await decodeImage(g)).data)).toEqual([10, 10, 10, 20, 20, 20, 30, 30, 30]);
    const rgb = makePng({ width: 2, height: 1, bitDepth: 8, colorType: 2, rows: [[1, 2, 3, 4, 5, 6]], trns: [0, 1, 0, 2, 0, 3] });
    expect(Array.from((await decodeImage(rgb)).data)).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it("16-bit grey PNG (made with sharp) opens as mode I and is CLIPPED to 0..255, not rescaled", async () => {
    const u16 = new Uint16Array([0, 100, 255, 256, 1000, 65535]);
    const png = await sharp(u16, { raw: { width: 6, height: 1, channels: 1 } }).toColourspace("grey16").png().toBuffer();
    expect(readPngInfo(png)).toMatchObject({ bitDepth: 16, colorType: 0, hasTrns: false });
    const d = await decodeImage(png);
    expect(d.sourceMode).toBe("I");
    expect(Array.from(d.data).filter((_, i) => i % 3 === 0)).toEqual([0, 100, 255, 255, 255, 255]);
    // A rescaling decode (what sharp does by default) would turn 100 into 0 and 1000 into 3.
    const scaled = await sharp(png).toColourspace("b-w").raw().toBuffer();
    expect(Array.from(scaled)).not.toEqual([0, 100, 255, 255, 255, 255]);
  });

  it("16-bit grey with tRNS: still clipped, transparency ignored", async () => {
    const png = makePng({ width: 2, height: 1, bitDepth: 16, colorType: 0, rows: [be16(100, 300)], trns: be16(100) });
    expect(Array.from((await decodeImage(png)).data)).toEqual([100, 100, 100, 255, 255, 255]);
  });

  it("16-bit RGB PNG keeps the most significant byte (Pillow rawmode RGB;16B)", async () => {
    const png = makePng({ width: 2, height: 1, bitDepth: 16, colorType: 2, rows: [be16(0x1234, 0xff01, 0x00ff, 0x8000, 0x0101, 0xfffe)] });
    const d = await decodeImage(png);
    expect(d.sourceMode).toBe("RGB");
    expect(Array.from(d.data)).toEqual([0x12, 0xff, 0x00, 0x80, 0x01, 0xff]);
  });

  it("16-bit RGBA and 16-bit grey+alpha open as RGBA (high bytes) and are composited", async () => {
    const rgba = makePng({ width: 2, height: 1, bitDepth: 16, colorType: 6, rows: [be16(0x1234, 0x8000, 0xff00, 0x80ff, 0, 0, 0, 0)] });
    const d = await decodeImage(rgba);
    expect(d.sourceMode).toBe("RGBA");
    // a = 0x80 = 128: 18 → 136, 128 → 191, 255 → 255; second pixel a = 0 → white.
    expect(Array.from(d.data)).toEqual([136, 191, 255, 255, 255, 255]);
    const la = makePng({ width: 2, height: 1, bitDepth: 16, colorType: 4, rows: [be16(0x1234, 0x80ff, 0xff00, 0x00ff)] });
    const d2 = await decodeImage(la);
    expect(d2.sourceMode).toBe("RGBA");
    expect(Array.from(d2.data)).toEqual([136, 136, 136, 255, 255, 255]);
  });

  it("EXIF orientation is NOT applied (Pillow's Image.open does not rotate)", async () => {
    const W = 40;
    const H = 20;
    const rgb = new Uint8Array(W * H * 3).map((_, i) => (i * 7) % 251);
    const plain = await sharp(rgb, { raw: { width: W, height: H, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
    const rotated = await sharp(rgb, { raw: { width: W, height: H, channels: 3 } }).jpeg({ quality: 90 }).withMetadata({ orientation: 6 }).toBuffer();
    expect((await sharp(rotated).metadata()).orientation).toBe(6);
    const a = await decodeImage(rotated);
    const b = await decodeImage(plain);
    expect([a.width, a.height]).toEqual([W, H]); // orientation 6 applied would give 20x40
    expect(Buffer.compare(Buffer.from(a.data), Buffer.from(b.data))).toBe(0);
  });

  it("WebP: lossless RGB decodes exactly; lossless RGBA is composited on white", async () => {
    const rgb = new Uint8Array(8 * 4 * 3).map((_, i) => (i * 29) % 256);
    const webp = await sharp(rgb, { raw: { width: 8, height: 4, channels: 3 } }).webp({ lossless: true }).toBuffer();
    const d = await decodeImage(webp);
    expect([d.mime, d.sourceMode]).toEqual(["image/webp", "RGB"]);
    expect(Array.from(d.data)).toEqual(Array.from(rgb));
    const rgba = new Uint8Array(8 * 4 * 4).map((_, i) => (i % 4 === 3 ? (i * 13) % 256 : (i * 29) % 256));
    const webpA = await sharp(rgba, { raw: { width: 8, height: 4, channels: 4 } }).webp({ lossless: true }).toBuffer();
    const dA = await decodeImage(webpA);
    expect(dA.sourceMode).toBe("RGBA");
    expect(Array.from(dA.data)).toEqual(Array.from(compositeOnWhite(rgba, 32)));
  });

  it("CMYK: Pillow's cmyk2rgb arithmetic, and CMYK JPEGs decode through it", async () => {
    // nk = 255 − k; out = nk − MULDIV255(c, nk)
    expect(Array.from(cmykToRgb([0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 128, 0, 128, 0, 0, 64], 4))).toEqual([
      255, 255, 255, 0, 0, 0, 0, 255, 127, 95, 191, 191,
    ]);
    const red = new Uint8Array(16 * 16 * 3).map((_, i) => (i % 3 === 0 ? 220 : 20));
    const jpeg = await sharp(red, { raw: { width: 16, height: 16, channels: 3 } }).toColourspace("cmyk").jpeg({ quality: 95 }).toBuffer();
    const d = await decodeImage(jpeg);
    expect(d.sourceMode).toBe("CMYK");
    // Pillow's naive conversion is not colour-managed: only the hue survives, so check it loosely.
    const [r, g, b] = Array.from(d.data.subarray(0, 3));
    expect(r!).toBeGreaterThan(g! + 80);
    expect(r!).toBeGreaterThan(b! + 80);
  });

  it("an embedded ICC profile is ignored (Pillow does not colour-manage; sharp would by default)", async () => {
    // Borrow a real Display-P3 iCCP chunk from a sharp-written PNG, put it in a PNG with known samples.
    const p3 = await sharp(new Uint8Array([200, 30, 60]), { raw: { width: 1, height: 1, channels: 3 } }).withIccProfile("p3").png().toBuffer();
    let off = 8;
    let iccp: Buffer | undefined;
    while (off + 8 <= p3.length) {
      const len = p3.readUInt32BE(off);
      if (p3.toString("latin1", off + 4, off + 8) === "iCCP") iccp = p3.subarray(off, off + 12 + len);
      off += 12 + len;
    }
    expect(iccp).toBeDefined();
    const png = makePng({ width: 1, height: 1, bitDepth: 8, colorType: 2, rows: [[184, 50, 64]], extra: [iccp!] });
    expect(Array.from((await decodeImage(png)).data)).toEqual([184, 50, 64]);
    // sharp's default decode converts P3 → sRGB and changes the samples.
    expect(Array.from(await sharp(png).raw().toBuffer())).not.toEqual([184, 50, 64]);
  });

  it("accepts a plain Uint8Array (not a Buffer)", async () => {
    const png = makePng({ width: 1, height: 1, bitDepth: 8, colorType: 2, rows: [[1, 2, 3]] });
    const d = await decodeImage(new Uint8Array(png));
    expect(Array.from(d.data)).toEqual([1, 2, 3]);
  });
});

describe("decode: failures are typed errors with stable codes", () => {
  const goodPng = readFileSync(goldenImagePath("images/brain003631.png"));
  const goodJpg = readFileSync(goldenImagePath("images/synth_rgb_1000x700.jpg"));

  it("zero-byte input → invalid_image", async () => {
    await rejectsWith(decodeImage(new Uint8Array(0)), "invalid_image");
  });
  it("garbage bytes → unsupported_media_type", async () => {
    await rejectsWith(decodeImage(new Uint8Array(4096).map((_, i) => (i * 131 + 7) & 255)), "unsupported_media_type");
  });
  it("a GIF → unsupported_media_type", async () => {
    const gif = await sharp(goodPng).gif().toBuffer();
    await rejectsWith(decodeImage(gif), "unsupported_media_type");
  });
  it("truncated PNG (half the file, or cut inside the chunk list) → invalid_image", async () => {
    await rejectsWith(decodeImage(goodPng.subarray(0, goodPng.length >> 1)), "invalid_image");
    await rejectsWith(decodeImage(goodPng.subarray(0, 40)), "invalid_image");
    await rejectsWith(decodeImage(goodPng.subarray(0, 20)), "invalid_image");
  });
  it("truncated JPEG and WebP → invalid_image", async () => {
    await rejectsWith(decodeImage(goodJpg.subarray(0, goodJpg.length >> 1)), "invalid_image");
    await rejectsWith(decodeImage(goodJpg.subarray(0, 300)), "invalid_image");
    const webp = await sharp(goodPng).webp({ quality: 80 }).toBuffer();
    await rejectsWith(decodeImage(webp.subarray(0, webp.length >> 1)), "invalid_image");
  });
  it("corrupt PNG data stream → invalid_image", async () => {
    const png = makePng({ width: 4, height: 4, bitDepth: 8, colorType: 0, rows: [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]] });
    const idat = png.indexOf("IDAT") + 4;
    const bad = Buffer.from(png);
    bad.fill(0xff, idat, idat + 6); // not a zlib stream any more
    const err = await rejectsWith(decodeImage(bad), "invalid_image");
    // The decoder library's message (libspng's, vips') stays out of what the client reads.
    expect(err.message).toBe("the image could not be decoded (corrupt or truncated)");
  });
  it("zero width in the header → invalid_image", async () => {
    const png = makePng({ width: 0, height: 1, bitDepth: 8, colorType: 0, rows: [[]] });
    await rejectsWith(decodeImage(png), "invalid_image");
  });
  it("more pixels than maxInputPixels → image_too_large (checked from the header, before decoding)", async () => {
    await rejectsWith(decodeImage(goodPng, { maxInputPixels: 224 * 224 - 1 }), "image_too_large");
    await expect(decodeImage(goodPng, { maxInputPixels: 224 * 224 })).resolves.toBeTruthy();
    // A header claiming 100000² with a few bytes of data fails fast instead of allocating.
    const bomb = makePng({ width: 100000, height: 100000, bitDepth: 8, colorType: 0, rows: [[0]] });
    const t0 = performance.now();
    await rejectsWith(decodeImage(bomb), "image_too_large");
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});

// ---------------------------------------------------------------------------------------------------

describe("resize: Pillow bicubic", () => {
  it("same size returns an equal copy, not the same buffer", () => {
    const img: RgbImage = { width: 3, height: 2, data: new Uint8Array(18).map((_, i) => i * 9) };
    const r = resizeBicubicRgb(img, 3, 2);
    expect(r.data).not.toBe(img.data);
    expect(Array.from(r.data)).toEqual(Array.from(img.data));
  });

  it("coefficients: support 2·max(scale,1), Q22 weights summing to 2^22 (± rounding)", () => {
    const down = bicubicCoefficients(1024, 308);
    expect(down.ksize).toBe(Math.ceil(2 * (1024 / 308)) * 2 + 1);
    const up = bicubicCoefficients(57, 84);
    expect(up.ksize).toBe(5);
    for (const c of [down, up]) {
      for (let i = 0; i < c.start.length; i++) {
        let s = 0;
        for (let k = 0; k < c.size[i]!; k++) s += c.weights[i * c.ksize + k]!;
        expect(Math.abs(s - (1 << 22))).toBeLessThanOrEqual(c.ksize);
      }
    }
  });

  it("a constant image stays constant under any resize (property)", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 0, max: 255 }),
        (w, h, ow, oh, v) => {
          const out = resizeBicubicInterleaved(new Uint8Array(w * h).fill(v), w, h, 1, ow, oh);
          return out.length === ow * oh && out.every((x) => x === v);
        },
      ),
      { numRuns: 60 },
    );
  });

  it("rejects non-positive targets with RangeError", () => {
    expect(() => resizeBicubicRgb({ width: 2, height: 2, data: new Uint8Array(12) }, 0, 2)).toThrow(RangeError);
  });
});

describe("pixels: normalize + patchify", () => {
  it("normalization is float32((float32(v/255) − mean32) / std32)", () => {
    const t = normalizationTable(OPTS.imageMean, OPTS.imageStd);
    const m = Math.fround(OPTS.imageMean[0]!);
    const s = Math.fround(OPTS.imageStd[0]!);
    expect(t[0]![0]).toBe(Math.fround(Math.fround(0 - m) / s));
    expect(t[0]![255]).toBe(Math.fround(Math.fround(1 - m) / s));
  });

  it("row order is (block row, block col, in-block row, in-block col); each row [C][T][14][14]", () => {
    // 28x56 image (grid 2x4): every pixel's R = patch column, G = patch row, B = in-patch x.
    const W = 56;
    const H = 28;
    const data = new Uint8Array(W * H * 3);
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) data.set([Math.floor(x / 14), Math.floor(y / 14), x % 14], (y * W + x) * 3);
    }
    const identity = [0, 1, 2].map(() => Float32Array.from({ length: 256 }, (_, i) => i));
    const { rows, gridThw } = patchify({ width: W, height: H, data }, OPTS, identity);
    expect(gridThw).toEqual([1, 2, 4]);
    const expectedPatches = [
      [0, 0], [1, 0], [0, 1], [1, 1], // block (0,0): (col,row) in-block order
      [2, 0], [3, 0], [2, 1], [3, 1], // block (0,1)
    ];
    expectedPatches.forEach(([col, row], r) => {
      const base = r * ROW;
      // channel R (both frames), G, B at in-patch (py=5, px=9)
      for (const t of [0, 1]) {
        expect(rows[base + 0 * 392 + t * 196 + 5 * 14 + 9]).toBe(col);
        expect(rows[base + 1 * 392 + t * 196 + 5 * 14 + 9]).toBe(row);
        expect(rows[base + 2 * 392 + t * 196 + 5 * 14 + 9]).toBe(9);
      }
    });
  });
});

// ---------------------------------------------------------------------------------------------------

describe("preprocessImages: bounds, caps, errors", () => {
  const brain = readFileSync(goldenImagePath("images/brain003631.png"));
  const knee = readFileSync(goldenImagePath("images/knee031316.png"));
  const rgba = readFileSync(goldenImagePath("images/synth_rgba_126x70.png"));

  it("no images → empty result", async () => {
    expect(await preprocessImages([], OPTS)).toEqual({ pixelValues: new Float32Array(0), gridThw: [], imageTokens: [] });
  });

  it("per-image max_pixels may lower the server's cap but never raise it", async () => {
    const lowered = await preprocessImages([{ bytes: brain, maxPixels: 28 * 28 * 16 }], OPTS);
    expect(lowered.gridThw).toEqual([[1, 8, 8]]);
    const e = await rejectsWith(preprocessImages([{ bytes: knee }, { bytes: brain, maxPixels: OPTS.maxPixels + 1 }], OPTS), "invalid_parameter");
    expect(e.imageIndex).toBe(1);
  });

  it("server-wide cap on image tokens → too_many_image_tokens (before decoding)", async () => {
    // case_05: 64 + 8 = 72 tokens.
    await rejectsWith(preprocessImages([{ bytes: knee }, { bytes: rgba }], { ...OPTS, maxImageTokens: 71 }), "too_many_image_tokens");
    const ok = await preprocessImages([{ bytes: knee }, { bytes: rgba }], { ...OPTS, maxImageTokens: 72 });
    expect(ok.imageTokens).toEqual([64, 8]);
  });

  it("a bad image is reported with its index", async () => {
    const e = await rejectsWith(preprocessImages([{ bytes: brain }, { bytes: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]) }], OPTS), "unsupported_media_type");
    expect(e.imageIndex).toBe(1);
    const e2 = await rejectsWith(preprocessImages([{ bytes: brain.subarray(0, 20000) }], OPTS), "invalid_image");
    expect(e2.imageIndex).toBe(0);
    const e3 = await rejectsWith(preprocessImages([{ bytes: brain }], { ...OPTS, maxInputPixels: 1000 }), "image_too_large");
    expect(e3.imageIndex).toBe(0);
  });

  it("processor resizes again when its smart_resize disagrees with fetch_image's (small max_pixels)", async () => {
    // 246x123 with max_pixels 6272: fetch_image → 84x28 (2352 px, below the processor's min 3136) → 112x56.
    const src = new Uint8Array(246 * 123 * 3).map((_, i) => (i * 17) % 256);
    const png = await sharp(src, { raw: { width: 246, height: 123, channels: 3 } }).png().toBuffer();
    const r = await preprocessImage({ bytes: png, maxPixels: 6272 }, OPTS);
    expect([r.fetched.width, r.fetched.height]).toEqual([84, 28]);
    expect([r.resized.width, r.resized.height]).toEqual([112, 56]);
    expect(Array.from(r.resized.data)).toEqual(Array.from(resizeBicubicRgb(r.fetched, 112, 56).data));
    expect(r.grid.gridThw).toEqual([1, 4, 8]);
  });
});

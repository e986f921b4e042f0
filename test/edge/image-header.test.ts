/**
 * sniffImage: golden image dimensions, hand-built PNG/JPEG/WebP headers, every rejection path, and
 * property tests (random, truncated and mutated bytes) run over a bounds-checking view so that an
 * out-of-range read fails the test instead of silently yielding `undefined`.
 */
import fc from "fast-check";
import { describe, expect, inject, it } from "vitest";
import { ImageHeaderError, sniffImage } from "../../shared/src/image-header.ts";
import { crc32 } from "../support/crc32.ts";

const g = inject("golden");

function b64bytes(b64: string): Uint8Array {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
const golden = (name: string) => b64bytes(g.images[name]!);
const bytes = (...parts: (number[] | string | Uint8Array)[]) => {
  const flat: number[] = [];
  for (const p of parts) {
    if (typeof p === "string") for (const ch of p) flat.push(ch.charCodeAt(0));
    else flat.push(...p);
  }
  return new Uint8Array(flat);
};
const u32be = (n: number) => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
const u32le = (n: number) => [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, (n >>> 24) & 255];
const u24le = (n: number) => [n & 255, (n >>> 8) & 255, (n >>> 16) & 255];
const u16le = (n: number) => [n & 255, (n >>> 8) & 255];
const u16be = (n: number) => [(n >>> 8) & 255, n & 255];


/** Signature + IHDR (with a correct CRC unless `crc` is given). */
function pngHeader(w: number, h: number, depth = 8, colorType = 2, crc?: number): Uint8Array {
  const typeAndData = bytes("IHDR", u32be(w), u32be(h), [depth, colorType, 0, 0, 0]);
  return bytes([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], u32be(13), typeAndData, u32be(crc ?? crc32(typeAndData)));
}

/** RIFF/WEBP wrapper around one chunk. */
function webp(fourcc: string, data: number[]): Uint8Array {
  const chunk = bytes(fourcc, u32le(data.length), data, data.length % 2 ? [0] : []);
  return bytes("RIFF", u32le(4 + chunk.length), "WEBP", chunk);
}
/** VP8 key frame: frame tag, start code, 14-bit sizes with 2 scale bits each, then filler. */
function vp8(w: number, h: number, opts: { keyFrame?: boolean; scale?: number; startCode?: number[] } = {}) {
  const tag = ((1234 << 5) | (1 << 4) | (opts.keyFrame === false ? 1 : 0)) >>> 0;
  const scale = (opts.scale ?? 0) << 14;
  return webp("VP8 ", [...u24le(tag), ...(opts.startCode ?? [0x9d, 0x01, 0x2a]), ...u16le(w | scale), ...u16le(h | scale), 0, 0]);
}
function vp8l(w: number, h: number, version = 0, signature = 0x2f) {
  const bits = ((w - 1) | ((h - 1) << 14) | (1 << 28) | (version << 29)) >>> 0;
  return webp("VP8L", [signature, ...u32le(bits), 0, 0, 0]);
}
function vp8x(w: number, h: number) {
  return webp("VP8X", [0x10, 0, 0, 0, ...u24le(w - 1), ...u24le(h - 1)]);
}
/** Minimal JPEG: SOI, the given segments, then an SOS marker. */
function jpeg(...segments: number[][]): Uint8Array {
  return bytes([0xff, 0xd8], ...segments, [0xff, 0xda, 0, 8, 1, 1, 0, 0, 63, 0]);
}
function segment(marker: number, payload: number[]): number[] {
  return [0xff, marker, ...u16be(payload.length + 2), ...payload];
}
const sof = (marker: number, w: number, h: number, comps = 3) =>
  segment(marker, [8, ...u16be(h), ...u16be(w), comps, ...Array.from({ length: comps }, (_, i) => [i + 1, 0x11, 0]).flat()]);

function expectCode(b: Uint8Array, code: ImageHeaderError["code"]) {
  let err: unknown;
  try {
    sniffImage(b);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ImageHeaderError);
  expect((err as ImageHeaderError).code).toBe(code);
  expect((err as ImageHeaderError).status).toBe(code === "invalid_image" ? 422 : 415);
}

/** A view of `b` whose index reads throw when out of range (typed arrays would return undefined). */
function strict(b: Uint8Array): Uint8Array {
  return new Proxy(b, {
    get(target, prop) {
      if (typeof prop === "string" && /^-?\d+$/.test(prop)) {
        const i = Number(prop);
        if (i < 0 || i >= target.length) throw new RangeError(`out-of-bounds read at ${i} (length ${target.length})`);
      }
      const v = Reflect.get(target, prop);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}

/** sniffImage returns sane dimensions or throws ImageHeaderError; anything else (incl. OOB reads) fails. */
function sniffIsTotal(b: Uint8Array): boolean {
  try {
    const h = sniffImage(strict(b));
    return Number.isSafeInteger(h.width) && Number.isSafeInteger(h.height) && h.width > 0 && h.height > 0;
  } catch (e) {
    if (e instanceof ImageHeaderError) return true;
    throw e;
  }
}

describe("golden images", () => {
  it("dimensions equal original_size_wh of every golden case image", () => {
    let checked = 0;
    for (const c of g.cases) {
      for (const im of c.images) {
        const h = sniffImage(golden(im.image));
        expect([h.width, h.height], im.image).toEqual(im.original_size_wh);
        expect(h.mime).toBe(im.original_format === "JPEG" ? "image/jpeg" : "image/png");
        checked++;
      }
    }
    expect(checked).toBe(6);
  });

  it("every golden image file sniffs as the type of its extension", () => {
    const names = Object.keys(g.images);
    expect(names.length).toBe(9);
    for (const name of names) {
      const h = sniffImage(golden(name));
      expect(h.mime, name).toBe(name.endsWith(".jpg") ? "image/jpeg" : "image/png");
      expect(h.width * h.height).toBeGreaterThan(0);
    }
  });

  it("reads through the strict view (no out-of-bounds access on real files)", () => {
    for (const name of Object.keys(g.images)) expect(sniffIsTotal(golden(name))).toBe(true);
  });
});

describe("PNG", () => {
  it("reads IHDR dimensions, including large ones", () => {
    expect(sniffImage(pngHeader(640, 480))).toEqual({ mime: "image/png", width: 640, height: 480 });
    expect(sniffImage(pngHeader(50000, 50000, 16, 6))).toEqual({ mime: "image/png", width: 50000, height: 50000 });
    expect(sniffImage(pngHeader(1, 1, 1, 0))).toEqual({ mime: "image/png", width: 1, height: 1 });
  });
  it("rejects corrupt IHDR fields", () => {
    expectCode(pngHeader(0, 10), "invalid_image");
    expectCode(pngHeader(10, 0), "invalid_image");
    expectCode(pngHeader(0x80000000, 10), "invalid_image");
    expectCode(pngHeader(10, 10, 8, 5), "invalid_image"); // no colour type 5
    expectCode(pngHeader(10, 10, 4, 2), "invalid_image"); // truecolour needs 8/16 bits
    expectCode(pngHeader(10, 10, 16, 3), "invalid_image"); // palette is at most 8 bits
    expectCode(pngHeader(10, 10, 8, 2, 0x12345678), "invalid_image"); // CRC mismatch
    const wrongLen = pngHeader(10, 10);
    wrongLen[11] = 14;
    expectCode(wrongLen, "invalid_image");
    const wrongType = pngHeader(10, 10);
    wrongType[12] = "i".charCodeAt(0);
    expectCode(wrongType, "invalid_image");
  });
  it("every truncation of a real PNG header is invalid_image", () => {
    const b = golden("images/brain003631.png");
    for (let n = 1; n < 33; n++) expectCode(b.subarray(0, n), "invalid_image");
    expect(sniffImage(b.subarray(0, 33))).toMatchObject({ width: 224, height: 224 });
  });
});

describe("JPEG", () => {
  it("finds the SOF after other segments, skipping fill bytes", () => {
    const app0 = segment(0xe0, [...bytes("JFIF"), 0, 1, 1, 0, 0, 1, 0, 1, 0, 0]);
    const dqt = segment(0xdb, new Array(65).fill(1));
    const dht = segment(0xc4, new Array(20).fill(0)); // C4 is DHT, not a frame header
    expect(sniffImage(jpeg(app0, dqt, dht, sof(0xc0, 1000, 700)))).toEqual({ mime: "image/jpeg", width: 1000, height: 700 });
    expect(sniffImage(jpeg(app0, [0xff, 0xff, 0xff], sof(0xc2, 3, 65535, 1)))).toEqual({ mime: "image/jpeg", width: 3, height: 65535 });
    for (const m of [0xc1, 0xc3, 0xc5, 0xc6, 0xc7, 0xc9, 0xca, 0xcb, 0xcd, 0xce, 0xcf]) {
      expect(sniffImage(jpeg(sof(m, 17, 19))), m.toString(16)).toMatchObject({ width: 17, height: 19 });
    }
  });
  it("rejects missing or corrupt frame headers", () => {
    expectCode(jpeg(), "invalid_image"); // SOS before any SOF
    expectCode(jpeg(sof(0xc0, 0, 10)), "invalid_image");
    expectCode(jpeg(sof(0xc0, 10, 0)), "invalid_image");
    expectCode(bytes([0xff, 0xd8, 0xff, 0xd9]), "invalid_image"); // EOI
    expectCode(bytes([0xff, 0xd8, 0x12, 0x34]), "invalid_image"); // no marker
    expectCode(bytes([0xff, 0xd8, 0xff, 0xe0, 0x00, 0x01]), "invalid_image"); // length < 2
    const badComps = sof(0xc0, 10, 10);
    badComps[9] = 5; // component count disagrees with the segment length
    expectCode(jpeg(badComps), "invalid_image");
  });
  it("every truncation of a real JPEG up to the end of its SOF is invalid_image", () => {
    const b = golden("images/synth_rgb_1000x700.jpg");
    let sofEnd = 0;
    for (let n = 1; n <= 400; n++) {
      try {
        sniffImage(b.subarray(0, n));
        sofEnd = n;
        break;
      } catch (e) {
        expect(e).toBeInstanceOf(ImageHeaderError);
        expect((e as ImageHeaderError).code).toBe("invalid_image");
      }
    }
    // The SOF0 segment of this file starts at 0x9e (length 17): it ends at byte 0xa0 + 17.
    expect(sofEnd).toBe(0xa0 + 17);
  });
});

describe("WebP", () => {
  it("VP8 (lossy): 14-bit sizes, scale bits ignored", () => {
    expect(sniffImage(vp8(640, 480))).toEqual({ mime: "image/webp", width: 640, height: 480 });
    expect(sniffImage(vp8(16383, 1, { scale: 3 }))).toEqual({ mime: "image/webp", width: 16383, height: 1 });
  });
  it("VP8L (lossless): 14-bit sizes minus one", () => {
    expect(sniffImage(vp8l(400, 301))).toEqual({ mime: "image/webp", width: 400, height: 301 });
    expect(sniffImage(vp8l(16384, 1))).toEqual({ mime: "image/webp", width: 16384, height: 1 });
    expect(sniffImage(vp8l(1, 16384))).toEqual({ mime: "image/webp", width: 1, height: 16384 });
  });
  it("VP8X (extended): 24-bit canvas sizes minus one", () => {
    expect(sniffImage(vp8x(1024, 768))).toEqual({ mime: "image/webp", width: 1024, height: 768 });
    expect(sniffImage(vp8x(2 ** 24, 3))).toEqual({ mime: "image/webp", width: 2 ** 24, height: 3 });
  });
  it("rejects corrupt or truncated WebP headers", () => {
    expectCode(vp8(0, 10), "invalid_image");
    expectCode(vp8(10, 10, { keyFrame: false }), "invalid_image");
    expectCode(vp8(10, 10, { startCode: [0x9d, 0x01, 0x2b] }), "invalid_image");
    expectCode(vp8l(10, 10, 1), "invalid_image"); // unknown version
    expectCode(vp8l(10, 10, 0, 0x2e), "invalid_image"); // bad signature
    expectCode(webp("ALPH", [0, 0, 0, 0]), "invalid_image"); // first chunk must be VP8/VP8L/VP8X
    expectCode(webp("VP8X", [0, 0, 0, 0]), "invalid_image"); // chunk too short
    for (const b of [vp8(10, 10), vp8l(10, 10), vp8x(10, 10)]) {
      for (let n = 1; n < 30 && n < b.length; n++) {
        const cut = b.subarray(0, n);
        // VP8L needs 25 bytes, VP8/VP8X 30
        if (n >= 25 && b[15] === 0x4c) continue;
        expectCode(cut, "invalid_image");
      }
    }
  });
  it("RIFF files that are not WebP are unsupported", () => {
    expectCode(bytes("RIFF", u32le(100), "AVI LIST", new Array(20).fill(0)), "unsupported_media_type");
    expectCode(bytes("RIFF", u32le(100), "WAVEfmt ", new Array(20).fill(0)), "unsupported_media_type");
  });
});

describe("unsupported formats", () => {
  it("GIF, PDF, BMP, TIFF, SVG, text are unsupported_media_type; empty is invalid_image", () => {
    expectCode(bytes("GIF89a", [10, 0, 10, 0, 0, 0, 0]), "unsupported_media_type");
    expectCode(bytes("%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"), "unsupported_media_type");
    expectCode(bytes("BM", new Array(60).fill(0)), "unsupported_media_type");
    expectCode(bytes("II*\0", new Array(20).fill(0)), "unsupported_media_type");
    expectCode(bytes('<svg xmlns="http://www.w3.org/2000/svg"/>'), "unsupported_media_type");
    expectCode(bytes("hello"), "unsupported_media_type");
    expectCode(new Uint8Array(0), "invalid_image");
  });
  it("a prefix of a known signature is a truncated image, not a foreign one", () => {
    expectCode(bytes([0x89, 0x50, 0x4e]), "invalid_image");
    expectCode(bytes([0xff]), "invalid_image");
    expectCode(bytes("RIFF", [0, 0, 0, 0], "WE"), "invalid_image");
  });
});

describe("never throws anything but ImageHeaderError, never reads out of bounds", () => {
  const seeds = [
    ...Object.keys(g.images).map((n) => golden(n).subarray(0, 600)),
    pngHeader(100, 50),
    jpeg(sof(0xc0, 10, 20)),
    vp8(64, 64),
    vp8l(64, 64),
    vp8x(64, 64),
  ];

  it("the strict view does catch out-of-bounds reads", () => {
    expect(() => strict(new Uint8Array(2))[2]).toThrow(RangeError);
  });

  it("random bytes", () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 80 }), sniffIsTotal), { numRuns: 3000 });
  });

  it("known signatures followed by random bytes", () => {
    const prefixes = [
      bytes([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], u32be(13), "IHDR"),
      bytes([0xff, 0xd8]),
      bytes("RIFF", [0, 0, 0, 0], "WEBPVP8 "),
      bytes("RIFF", [0, 0, 0, 0], "WEBPVP8L"),
      bytes("RIFF", [0, 0, 0, 0], "WEBPVP8X"),
    ];
    fc.assert(
      fc.property(fc.constantFrom(...prefixes), fc.uint8Array({ maxLength: 60 }), (p, tail) => sniffIsTotal(bytes(p, tail))),
      { numRuns: 3000 },
    );
  });

  it("truncated and mutated real headers", () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...seeds),
        fc.nat(),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
        (seed, cut, edits) => {
          const b = seed.slice(0, cut % (seed.length + 1));
          for (const [pos, v] of edits) if (b.length > 0) b[pos % b.length] = v;
          return sniffIsTotal(b);
        },
      ),
      { numRuns: 3000 },
    );
  });
});

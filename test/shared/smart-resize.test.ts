import { readFileSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ApiError } from "../../shared/src/errors.ts";
import {
  effectivePixelBounds,
  imageGrid,
  processorSmartResize,
  QWEN_VL_UTILS_DEFAULTS,
  roundHalfEven,
  smartResize,
} from "../../shared/src/smart-resize.ts";
import { GOLDEN_DIR, loadGoldenCases } from "../support/golden.ts";
import { codeOf } from "../support/errors.ts";

const pre = JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "preprocessor_config.json"), "utf8")) as {
  min_pixels: number;
  max_pixels: number;
  patch_size: number;
  merge_size: number;
  temporal_patch_size: number;
};
const images = loadGoldenCases().flatMap((c) => c.images.map((img) => ({ case: c.case, ...img })));


describe("golden images", () => {
  it("there are six images over the six cases (one text-only, one with two images)", () => {
    expect(images).toHaveLength(6);
  });

  it.each(images.map((img) => [`${img.case} ${img.image}`, img] as const))(
    "%s: fetched size, grid and token count",
    (_name, img) => {
      const [w, h] = img.original_size_wh;
      const minPixels = img.qwen_vl_utils_kwargs.min_pixels ?? QWEN_VL_UTILS_DEFAULTS.minPixels;
      const maxPixels = img.qwen_vl_utils_kwargs.max_pixels ?? QWEN_VL_UTILS_DEFAULTS.maxPixels;
      const [fh, fw] = smartResize(h, w, 28, minPixels, maxPixels);
      expect([fw, fh]).toEqual(img.fetched_size_wh);

      const grid = imageGrid(
        { height: h, width: w },
        {
          patchSize: pre.patch_size,
          mergeSize: pre.merge_size,
          temporalPatchSize: pre.temporal_patch_size,
          minPixels,
          maxPixels,
          processorMinPixels: pre.min_pixels,
          processorMaxPixels: pre.max_pixels,
        },
      );
      expect([grid.fetchedWidth, grid.fetchedHeight]).toEqual(img.fetched_size_wh);
      // The processor's own resize is a no-op on these fetched sizes (README).
      expect([grid.resizedWidth, grid.resizedHeight]).toEqual(img.fetched_size_wh);
      expect(grid.gridThw).toEqual(img.grid_thw);
      expect(grid.tokens).toBe(img.merged_tokens[1] - img.merged_tokens[0]);
    },
  );
});

describe("roundHalfEven", () => {
  it("is Python's round(): ties go to the even neighbour", () => {
    expect([0.5, 1.5, 2.5, 3.5, 4.5, -0.5, -1.5, -2.5].map(roundHalfEven)).toEqual([0, 2, 2, 4, 4, 0, -2, -2]);
    expect([2.4999999, 2.5000001, 7, -7.2, -7.8, 1e17].map(roundHalfEven)).toEqual([2, 3, 7, -7, -8, 1e17]);
    expect(roundHalfEven(126 / 28)).toBe(4);
    expect(roundHalfEven(70 / 28)).toBe(2);
  });

  it("agrees with Math.round off the ties and picks an even integer on them", () => {
    fc.assert(
      fc.property(fc.double({ min: -1e9, max: 1e9, noNaN: true }), (x) => {
        // === rather than Object.is: Python's round() returns an int, which has no -0.
        if (x - Math.floor(x) !== 0.5) expect(roundHalfEven(x) === Math.round(x)).toBe(true);
      }),
    );
    fc.assert(
      fc.property(fc.integer({ min: -1e6, max: 1e6 }), (k) => {
        const r = roundHalfEven(k + 0.5);
        expect(Math.abs(r % 2)).toBe(0);
        expect([k, k + 1]).toContain(r);
      }),
    );
  });
});

describe("smartResize (qwen_vl_utils 0.0.10)", () => {
  it("rounds half to even: 126x70 becomes 112x56, not Math.round's 140x84", () => {
    expect(smartResize(70, 126)).toEqual([56, 112]);
  });

  // Expected values computed with the Python function.
  it.each([
    [1, 1, [56, 56]],
    [13, 13, [56, 56]],
    [28, 1, [308, 28]],
    [1, 200, [28, 196]],
    [57, 311, [56, 308]],
    [1000, 1000, [1008, 1008]],
    [5000, 3000, [4620, 2772]],
  ] as const)("%i x %i (h x w) → %j with the default bounds", (h, w, expected) => {
    expect(smartResize(h, w)).toEqual(expected);
  });

  it("applies the floor branch under max_pixels and the ceil branch over min_pixels", () => {
    expect(smartResize(1024, 1024, 28, 3136, 100352)).toEqual([308, 308]);
    expect(smartResize(700, 1000, 28, 3136, 50176)).toEqual([168, 252]);
    expect(smartResize(311, 57, 28, 25088, 12845056)).toEqual([392, 84]);
  });

  it("accepts an aspect ratio of exactly 200 and rejects anything above", () => {
    expect(smartResize(1, 200)).toEqual([28, 196]);
    expect(codeOf(() => smartResize(1, 201))).toBe("aspect_ratio_too_large");
    expect(codeOf(() => smartResize(40001, 200))).toBe("aspect_ratio_too_large");
  });

  it("rejects (instead of returning) a zero side from the unclamped floor branch", () => {
    // Python returns (0, 784) here, which Pillow cannot resize to.
    expect(codeOf(() => smartResize(28, 5600, 28, 784, 3136))).toBe("aspect_ratio_too_large");
  });

  it("rejects invalid sizes and bounds with typed errors", () => {
    for (const bad of [0, -5, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(codeOf(() => smartResize(bad, 100))).toBe("invalid_image");
      expect(codeOf(() => smartResize(100, bad))).toBe("invalid_image");
      expect(codeOf(() => smartResize(100, 100, 28, bad === 0 ? 0 : bad))).toBe("invalid_parameter");
      expect(codeOf(() => smartResize(100, 100, 28, 3136, bad))).toBe("invalid_parameter");
      expect(codeOf(() => smartResize(100, 100, bad))).toBe("invalid_parameter");
    }
  });

  it("rejects areas beyond exact double arithmetic with image_too_large", () => {
    expect(codeOf(() => smartResize(100_000_000, 100_000_000))).toBe("image_too_large");
    expect(codeOf(() => processorSmartResize(100_000_000, 100_000_000))).toBe("image_too_large");
  });

  it("with the default bounds always yields multiples of 28 inside [3136, 12845056]", () => {
    const side = fc.integer({ min: 1, max: 30000 });
    fc.assert(
      fc.property(side, side, (h, w) => {
        fc.pre(Math.max(h, w) / Math.min(h, w) <= 200);
        const [rh, rw] = smartResize(h, w);
        expect(rh % 28).toBe(0);
        expect(rw % 28).toBe(0);
        expect(rh * rw).toBeGreaterThanOrEqual(QWEN_VL_UTILS_DEFAULTS.minPixels);
        expect(rh * rw).toBeLessThanOrEqual(QWEN_VL_UTILS_DEFAULTS.maxPixels);
      }),
      { numRuns: 2000 },
    );
  });

  it("with any bounds: multiples of the factor, floor branch ≤ max, ceil branch ≥ min, idempotent when in bounds", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 20000 }),
        fc.integer({ min: 1, max: 20000 }),
        fc.constantFrom(14, 28, 32, 56),
        fc.integer({ min: 1, max: 2_000_000 }),
        fc.integer({ min: 160_000, max: 20_000_000 }),
        (h, w, factor, minPixels, maxPixels) => {
          fc.pre(Math.max(h, w) / Math.min(h, w) <= 200);
          fc.pre(minPixels <= maxPixels && maxPixels >= 200 * factor * factor);
          const [rh, rw] = smartResize(h, w, factor, minPixels, maxPixels);
          expect(rh % factor).toBe(0);
          expect(rw % factor).toBe(0);
          expect(Math.min(rh, rw)).toBeGreaterThanOrEqual(factor);
          const rounded = Math.max(factor, roundHalfEven(h / factor) * factor) * Math.max(factor, roundHalfEven(w / factor) * factor);
          if (rounded > maxPixels) expect(rh * rw).toBeLessThanOrEqual(maxPixels);
          else if (rounded < minPixels) expect(rh * rw).toBeGreaterThanOrEqual(minPixels);
          else expect(rh * rw).toBe(rounded);
          if (rh * rw >= minPixels && rh * rw <= maxPixels) {
            if (Math.max(rh, rw) / Math.min(rh, rw) <= 200) {
              expect(smartResize(rh, rw, factor, minPixels, maxPixels)).toEqual([rh, rw]);
            } else {
              // Rounding pushed the ratio over 200 (e.g. 15x2808 → 14x2814): a second pass rejects it.
              expect(codeOf(() => smartResize(rh, rw, factor, minPixels, maxPixels))).toBe("aspect_ratio_too_large");
            }
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});

describe("processorSmartResize (transformers 4.46.1 Qwen2VLImageProcessor)", () => {
  it("rejects sides below the factor, where qwen_vl_utils' variant clamps instead", () => {
    expect(codeOf(() => processorSmartResize(27, 100, 28))).toBe("image_too_small");
    expect(codeOf(() => processorSmartResize(13, 13, 28))).toBe("image_too_small");
    expect(smartResize(13, 13)).toEqual([56, 56]);
  });

  it("otherwise agrees with qwen_vl_utils' variant", () => {
    fc.assert(
      fc.property(fc.integer({ min: 28, max: 10000 }), fc.integer({ min: 28, max: 10000 }), (h, w) => {
        fc.pre(Math.max(h, w) / Math.min(h, w) <= 200);
        expect(processorSmartResize(h, w, 28, 3136, 1003520)).toEqual(smartResize(h, w, 28, 3136, 1003520));
      }),
      { numRuns: 1000 },
    );
  });

  it("rejects aspect ratios above 200", () => {
    expect(codeOf(() => processorSmartResize(28, 5601))).toBe("aspect_ratio_too_large");
  });
});

describe("imageGrid", () => {
  const base = {
    patchSize: 14,
    mergeSize: 2,
    temporalPatchSize: 2,
    minPixels: 3136,
    maxPixels: 12845056,
  };

  it("applies the processor's bounds after qwen_vl_utils' resize when they are tighter", () => {
    const g = imageGrid({ height: 1000, width: 1000 }, { ...base, processorMaxPixels: 100352 });
    expect([g.fetchedHeight, g.fetchedWidth]).toEqual([1008, 1008]);
    expect([g.resizedHeight, g.resizedWidth]).toEqual([308, 308]);
    expect(g.gridThw).toEqual([1, 22, 22]);
    expect(g.tokens).toBe(121);
  });

  it("defaults the processor's bounds to the per-image bounds", () => {
    const g = imageGrid({ height: 70, width: 126 }, base);
    expect(g).toEqual({
      fetchedHeight: 56,
      fetchedWidth: 112,
      resizedHeight: 56,
      resizedWidth: 112,
      gridThw: [1, 4, 8],
      tokens: 8,
    });
  });

  it("handles tiny images (1x1 → 56x56, 4 tokens)", () => {
    const g = imageGrid({ height: 1, width: 1 }, base);
    expect(g.gridThw).toEqual([1, 4, 4]);
    expect(g.tokens).toBe(4);
  });

  it("token count is t·h·w/merge² and the grid is consistent with the resized size", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 8000 }), fc.integer({ min: 1, max: 8000 }), (h, w) => {
        fc.pre(Math.max(h, w) / Math.min(h, w) <= 200);
        const [fh, fw] = smartResize(h, w, 28, base.minPixels, 1003520);
        if (Math.max(fh, fw) / Math.min(fh, fw) > 200) {
          expect(codeOf(() => imageGrid({ height: h, width: w }, { ...base, maxPixels: 1003520 }))).toBe(
            "aspect_ratio_too_large",
          );
          return;
        }
        const g = imageGrid({ height: h, width: w }, { ...base, maxPixels: 1003520 });
        expect(g.gridThw[1] * 14).toBe(g.resizedHeight);
        expect(g.gridThw[2] * 14).toBe(g.resizedWidth);
        expect(g.gridThw[1] % 2).toBe(0);
        expect(g.gridThw[2] % 2).toBe(0);
        expect(g.tokens).toBe((g.gridThw[1] * g.gridThw[2]) / 4);
        expect(Number.isInteger(g.tokens)).toBe(true);
        expect(g.tokens).toBeLessThanOrEqual(1003520 / 784);
      }),
      { numRuns: 1000 },
    );
  });

  it("rejects an image whose first resize pushes the aspect ratio over 200, as the reference processor does", () => {
    // 5615/29 = 193.6, but qwen_vl_utils makes it 5628x28 = 201, which Qwen2VLImageProcessor refuses.
    expect(smartResize(29, 5615)).toEqual([28, 5628]);
    try {
      imageGrid({ height: 29, width: 5615 }, base);
      throw new Error("accepted");
    } catch (e) {
      expect((e as ApiError).code).toBe("aspect_ratio_too_large");
      expect((e as ApiError).message).toContain("5615x29 image is resized to 5628x28");
    }
  });

  it("a requested size (resized_height/width) replaces the image's own, with qwen_vl_utils' default bounds, within the server's window", () => {
    // Whatever the image: smart_resize(300, 500) = 308x504, not a size computed from the image within the bounds.
    for (const size of [{ height: 1, width: 1 }, { height: 4000, width: 50 }, { height: 1024, width: 1024 }]) {
      const g = imageGrid(size, { ...base, minPixels: 3136, maxPixels: 200704, requestedSize: { height: 300, width: 500 } });
      expect(g).toEqual({ fetchedHeight: 308, fetchedWidth: 504, resizedHeight: 308, resizedWidth: 504, gridThw: [1, 22, 36], tokens: 198 });
    }
    // qwen_vl_utils' defaults do: 10x10 rounds up to the 56x56 of its min_pixels (3136), 5000x5000 floors to its max.
    expect(imageGrid({ height: 9, width: 9 }, { ...base, minPixels: 1, requestedSize: { height: 10, width: 10 } })).toMatchObject({ fetchedHeight: 56, fetchedWidth: 56 });
    expect(imageGrid({ height: 9, width: 9 }, { ...base, requestedSize: { height: 5000, width: 5000 } })).toMatchObject({ fetchedHeight: 3556, fetchedWidth: 3556 });
    // The server's window still bounds the result: 308x504 = 155232 pixels.
    expect(codeOf(() => imageGrid({ height: 9, width: 9 }, { ...base, maxPixels: 155231, requestedSize: { height: 300, width: 500 } }))).toBe("invalid_parameter");
    expect(codeOf(() => imageGrid({ height: 9, width: 9 }, { ...base, minPixels: 155233, requestedSize: { height: 300, width: 500 } }))).toBe("invalid_parameter");
    expect(imageGrid({ height: 9, width: 9 }, { ...base, minPixels: 155232, maxPixels: 155232, requestedSize: { height: 300, width: 500 } }).tokens).toBe(198);
    expect(codeOf(() => imageGrid({ height: 9, width: 9 }, { ...base, requestedSize: { height: 1, width: 201 } }))).toBe("aspect_ratio_too_large");
  });

  it("rejects bad geometry parameters", () => {
    expect(codeOf(() => imageGrid({ height: 10, width: 10 }, { ...base, patchSize: 0 }))).toBe("invalid_parameter");
    expect(codeOf(() => imageGrid({ height: 10, width: 10 }, { ...base, mergeSize: 1.5 }))).toBe("invalid_parameter");
    expect(codeOf(() => imageGrid({ height: 0, width: 10 }, base))).toBe("invalid_image");
    expect(codeOf(() => imageGrid({ height: 1, width: 500 }, base))).toBe("aspect_ratio_too_large");
  });
});

describe("effectivePixelBounds", () => {
  const server = { minPixels: 3136, maxPixels: 1003520 };

  it("inherits the server's bounds", () => {
    expect(effectivePixelBounds(server)).toEqual(server);
    expect(effectivePixelBounds(server, {})).toEqual(server);
  });

  it("lets a request lower the max and raise the min up to the effective max", () => {
    expect(effectivePixelBounds(server, { maxPixels: 100352 })).toEqual({ minPixels: 3136, maxPixels: 100352 });
    expect(effectivePixelBounds(server, { minPixels: 25088 })).toEqual({ minPixels: 25088, maxPixels: 1003520 });
    expect(effectivePixelBounds(server, { minPixels: 50176, maxPixels: 50176 })).toEqual({
      minPixels: 50176,
      maxPixels: 50176,
    });
    expect(effectivePixelBounds(server, { minPixels: 1003520 })).toEqual({ minPixels: 1003520, maxPixels: 1003520 });
  });

  function rejects(request: object, fragment: string): void {
    try {
      effectivePixelBounds(server, request);
    } catch (e) {
      expect(e).toBeInstanceOf(ApiError);
      expect((e as ApiError).code).toBe("invalid_parameter");
      expect((e as ApiError).message).toContain(fragment);
      return;
    }
    throw new Error(`accepted ${JSON.stringify(request)}`);
  }

  it("rejects widening the window, with a message naming the limit", () => {
    rejects({ maxPixels: 1003521 }, "max_pixels 1003521 exceeds the server's maximum of 1003520");
    rejects({ maxPixels: 3135 }, "below the server's min_pixels of 3136");
    rejects({ minPixels: 784 }, "min_pixels 784 is below the server's minimum of 3136");
    rejects({ minPixels: 200704, maxPixels: 100352 }, "min_pixels 200704 exceeds the effective max_pixels of 100352");
    rejects({ minPixels: 2_000_000 }, "exceeds the effective max_pixels of 1003520");
  });

  it("rejects non-integer values", () => {
    rejects({ maxPixels: 1.5 }, "max_pixels must be a positive integer");
    rejects({ maxPixels: "100" }, "max_pixels must be a positive integer");
    rejects({ minPixels: -1 }, "min_pixels must be a positive integer");
    rejects({ minPixels: Number.NaN }, "min_pixels must be a positive integer");
  });

  it("flags an inconsistent server configuration as internal_error", () => {
    expect(codeOf(() => effectivePixelBounds({ minPixels: 10, maxPixels: 5 }))).toBe("internal_error");
    expect(codeOf(() => effectivePixelBounds({ minPixels: 0, maxPixels: 5 }))).toBe("internal_error");
  });

  it("always returns a window inside the server's, or throws invalid_parameter", () => {
    const opt = fc.option(fc.integer({ min: -10, max: 2_000_000 }), { nil: undefined });
    fc.assert(
      fc.property(opt, opt, (minPixels, maxPixels) => {
        const req = { ...(minPixels === undefined ? {} : { minPixels }), ...(maxPixels === undefined ? {} : { maxPixels }) };
        let r;
        try {
          r = effectivePixelBounds(server, req);
        } catch (e) {
          expect((e as ApiError).code).toBe("invalid_parameter");
          return;
        }
        expect(r.minPixels).toBeGreaterThanOrEqual(server.minPixels);
        expect(r.maxPixels).toBeLessThanOrEqual(server.maxPixels);
        expect(r.minPixels).toBeLessThanOrEqual(r.maxPixels);
        if (minPixels !== undefined) expect(r.minPixels).toBe(minPixels);
        if (maxPixels !== undefined) expect(r.maxPixels).toBe(maxPixels);
      }),
    );
  });
});

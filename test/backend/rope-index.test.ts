import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  QWEN2_VL_VISION_TOKEN_IDS,
  RopeIndexError,
  decodePosition,
  getRopeIndex,
  visionTokenCount,
  type GridThw,
} from "../../gpu-backend/src/engine/rope-index.ts";
import { ApiError } from "../../shared/src/errors.ts";
import { expandImagePads as expandByCounts } from "../../shared/src/image-tokens.ts";
import { loadGoldenCases } from "../support/golden.ts";
import { thrownBy } from "../support/errors.ts";

/** The processor's pad expansion for grids (shared code takes token counts). */
const expandImagePads = (ids: ArrayLike<number>, grids: readonly GridThw[] | null, merge: number, pad: number) =>
  expandByCounts(ids, (grids ?? []).map((g) => visionTokenCount(g, merge)), pad);

const IMG = QWEN2_VL_VISION_TOKEN_IDS.imageTokenId;
const VID = QWEN2_VL_VISION_TOKEN_IDS.videoTokenId;
const VS = QWEN2_VL_VISION_TOKEN_IDS.visionStartTokenId;
const VE = 151653;
const cases = loadGoldenCases();

const arr = (pos: [Int32Array, Int32Array, Int32Array]) => pos.map((a) => Array.from(a));

function expectCode(fn: () => unknown, code: string): void {
  expect(thrownBy(fn, RopeIndexError).code).toBe(code);
}

describe("golden cases (transformers 4.46.1 get_rope_index)", () => {
  it("covers text-only, one image and two images", () => {
    expect(cases.map((c) => c.image_grid_thw?.length ?? 0).sort()).toEqual([0, 1, 1, 1, 1, 2]);
  });

  for (const c of cases) {
    it(`${c.case}: expandImagePads reproduces input_ids`, () => {
      const ids = expandImagePads(c.input_ids_unexpanded, c.image_grid_thw, 2, IMG);
      expect(Array.from(ids)).toEqual(c.input_ids);
      expect(ids.length).toBe(c.seq_len);
    });

    it(`${c.case}: position_ids and rope_deltas`, () => {
      const r = getRopeIndex(c.input_ids, { imageGridThw: c.image_grid_thw, spatialMergeSize: 2 });
      expect(arr(r.positionIds)).toEqual(c.position_ids);
      expect(r.ropeDeltas).toBe(c.rope_deltas);
      // An all-ones mask changes nothing.
      const m = getRopeIndex(c.input_ids, {
        imageGridThw: c.image_grid_thw,
        spatialMergeSize: 2,
        attentionMask: new Array(c.seq_len).fill(1),
      });
      expect(arr(m.positionIds)).toEqual(c.position_ids);
      expect(m.ropeDeltas).toBe(c.rope_deltas);
    });

    it(`${c.case}: decode positions of generated and forced steps`, () => {
      let checked = 0;
      for (const s of c.steps) {
        if (s.input_position === null) continue;
        expect(decodePosition(c.seq_len, s.step - 1, c.rope_deltas)).toBe(s.input_position);
        checked++;
      }
      for (const s of c.forced_decode.steps) {
        if (s.input_position === null) continue;
        expect(decodePosition(c.seq_len, s.step - 1, c.rope_deltas)).toBe(s.input_position);
        checked++;
      }
      expect(checked).toBeGreaterThan(20);
    });
  }
});

describe("hand-computed layouts", () => {
  it("non-square image: grid [1,2,6] → 1×3 merged tokens", () => {
    // a b <vs> P P P <ve> c
    const ids = [10, 11, VS, IMG, IMG, IMG, VE, 12];
    const r = getRopeIndex(ids, { imageGridThw: [[1, 2, 6]], spatialMergeSize: 2 });
    // Text after the block resumes at max(3, 3, 5) + 1 = 6 on all three axes.
    expect(arr(r.positionIds)).toEqual([
      [0, 1, 2, 3, 3, 3, 6, 7],
      [0, 1, 2, 3, 3, 3, 6, 7],
      [0, 1, 2, 3, 4, 5, 6, 7],
    ]);
    expect(r.ropeDeltas).toBe(7 + 1 - 8);
  });

  it("video with t > 1: grid [2,4,4] → 2×2×2 tokens in (t, h, w) order", () => {
    const ids = [10, 11, VS, ...new Array(8).fill(VID), VE, 12];
    const r = getRopeIndex(ids, { videoGridThw: [[2, 4, 4]], spatialMergeSize: 2 });
    expect(arr(r.positionIds)).toEqual([
      [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 6],
      [0, 1, 2, 3, 3, 4, 4, 3, 3, 4, 4, 5, 6],
      [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 5, 6],
    ]);
    expect(r.ropeDeltas).toBe(6 + 1 - 13);
  });

  it("image, video and image take grids in order of appearance; adjacent blocks and a trailing block", () => {
    // <vs> I <vs> V V <vs> I I   (no text between blocks, ids end with a block)
    const ids = [VS, IMG, VS, VID, VID, VS, IMG, IMG];
    const r = getRopeIndex(ids, {
      imageGridThw: [
        [1, 2, 2],
        [1, 2, 4],
      ],
      videoGridThw: [[2, 2, 2]],
      spatialMergeSize: 2,
    });
    expect(arr(r.positionIds)).toEqual([
      [0, 1, 2, 3, 4, 5, 6, 6],
      [0, 1, 2, 3, 3, 5, 6, 6],
      [0, 1, 2, 3, 3, 5, 6, 7],
    ]);
    // Ends with a block: max = 7.
    expect(r.ropeDeltas).toBe(7 + 1 - 8);
  });

  it("text only: arange and zero delta; with left padding: cumsum − 1, padded slots 1", () => {
    const plain = getRopeIndex([5, 6, 7], { spatialMergeSize: 2 });
    expect(arr(plain.positionIds)).toEqual([
      [0, 1, 2],
      [0, 1, 2],
      [0, 1, 2],
    ]);
    expect(plain.ropeDeltas).toBe(0);
    const padded = getRopeIndex([0, 0, 5, 6, 7], { spatialMergeSize: 2, attentionMask: [0, 0, 1, 1, 1] });
    expect(Array.from(padded.positionIds[0])).toEqual([1, 1, 0, 1, 2]);
    expect(padded.ropeDeltas).toBe(2 + 1 - 5);
    const single = getRopeIndex([5], { spatialMergeSize: 2, attentionMask: [1] });
    expect(single.ropeDeltas).toBe(0);
    expect(getRopeIndex([], { spatialMergeSize: 2 }).ropeDeltas).toBe(0);
  });

  it("left padding of a multimodal row: real tokens keep their positions, pads get 1, delta shifts by −pad", () => {
    const c = cases.find((x) => x.image_grid_thw?.length === 2)!;
    const pad = 3;
    const ids = [...new Array(pad).fill(151643), ...c.input_ids];
    const mask = [...new Array(pad).fill(0), ...new Array(c.seq_len).fill(1)];
    const r = getRopeIndex(ids, { imageGridThw: c.image_grid_thw, spatialMergeSize: 2, attentionMask: mask });
    for (let a = 0; a < 3; a++) {
      expect(Array.from(r.positionIds[a]!.subarray(0, pad))).toEqual([1, 1, 1]);
      expect(Array.from(r.positionIds[a]!.subarray(pad))).toEqual(c.position_ids[a]);
    }
    expect(r.ropeDeltas).toBe(c.rope_deltas - pad);
    // The first generated token then still lands right after the prompt's largest position.
    expect(decodePosition(ids.length, 0, r.ropeDeltas)).toBe(decodePosition(c.seq_len, 0, c.rope_deltas));
  });

  it("property: any left padding shifts only ropeDeltas", () => {
    const layout = fc.array(
      fc.oneof(
        fc.integer({ min: 0, max: 5 }).map((n) => ({ text: n })),
        fc.tuple(fc.integer({ min: 1, max: 2 }), fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 3 })).map(
          ([t, h, w]) => ({ grid: [t, 2 * h, 2 * w] as GridThw }),
        ),
      ),
      { maxLength: 6 },
    );
    fc.assert(
      fc.property(layout, fc.integer({ min: 0, max: 4 }), (parts, pad) => {
        const unexpanded: number[] = [];
        const grids: GridThw[] = [];
        for (const p of parts) {
          if ("text" in p) for (let i = 0; i < p.text; i++) unexpanded.push(100 + i);
          else {
            unexpanded.push(VS, IMG, VE);
            grids.push(p.grid);
          }
        }
        const ids = Array.from(expandImagePads(unexpanded, grids, 2, IMG));
        const base = getRopeIndex(ids, { imageGridThw: grids, spatialMergeSize: 2 });
        const r = getRopeIndex([...new Array(pad).fill(0), ...ids], {
          imageGridThw: grids,
          spatialMergeSize: 2,
          attentionMask: [...new Array(pad).fill(0), ...new Array(ids.length).fill(1)],
        });
        for (let a = 0; a < 3; a++) expect(Array.from(r.positionIds[a]!.subarray(pad))).toEqual(Array.from(base.positionIds[a]!));
        let max = -1;
        for (const p of base.positionIds) for (const v of p) max = Math.max(max, v);
        expect(base.ropeDeltas).toBe(ids.length === 0 ? 0 : max + 1 - ids.length);
        // (Text-only rows take HF's text path, whose max also covers the padded slots' 1s.)
        if (grids.length > 0) expect(r.ropeDeltas).toBe(base.ropeDeltas - pad);
      }),
      { numRuns: 200 },
    );
  });
});

describe("errors", () => {
  const c = cases.find((x) => x.image_grid_thw?.length === 2)!;
  const grids = c.image_grid_thw!;

  it("expandImagePads: pad count ≠ grid count", () => {
    for (const g of [grids.slice(0, 1), [...grids, [1, 2, 2] as GridThw]]) {
      expect(() => expandImagePads(c.input_ids_unexpanded, g, 2, IMG)).toThrow(ApiError);
      expect(() => expandImagePads(c.input_ids_unexpanded, g, 2, IMG)).toThrow(/image placeholders/);
    }
  });

  it("getRopeIndex: image count ≠ grid count", () => {
    expectCode(() => getRopeIndex(c.input_ids, { imageGridThw: grids.slice(0, 1), spatialMergeSize: 2 }), "vision_count_mismatch");
    // Pads without a preceding vision_start are not an image block.
    expectCode(() => getRopeIndex([1, IMG, 2], { imageGridThw: [[1, 2, 2]], spatialMergeSize: 2 }), "vision_count_mismatch");
    // Video grids given but none in the ids.
    expectCode(
      () => getRopeIndex(c.input_ids, { imageGridThw: grids, videoGridThw: [[2, 2, 2]], spatialMergeSize: 2 }),
      "vision_count_mismatch",
    );
  });

  it("getRopeIndex: pad tokens not matching the grid sizes", () => {
    // Grids in the wrong order: the counts agree in total but the first run is too long for the second grid.
    expectCode(() => getRopeIndex(c.input_ids, { imageGridThw: [grids[1]!, grids[0]!], spatialMergeSize: 2 }), "vision_token_mismatch");
    // One pad removed.
    const i = c.input_ids.indexOf(IMG);
    const fewer = [...c.input_ids.slice(0, i), ...c.input_ids.slice(i + 1)];
    expectCode(() => getRopeIndex(fewer, { imageGridThw: grids, spatialMergeSize: 2 }), "vision_token_mismatch");
    // A stray pad outside any block.
    expectCode(() => getRopeIndex([...c.input_ids, IMG], { imageGridThw: grids, spatialMergeSize: 2 }), "vision_token_mismatch");
    // Right count, but the run is interrupted.
    expectCode(
      () => getRopeIndex([VS, IMG, 7, IMG, IMG, IMG], { imageGridThw: [[1, 4, 4]], spatialMergeSize: 2 }),
      "vision_token_mismatch",
    );
  });

  it("bad grids, masks and arguments", () => {
    expectCode(() => getRopeIndex([VS, IMG], { imageGridThw: [[1, 3, 2]], spatialMergeSize: 2 }), "invalid_grid");
    expectCode(() => getRopeIndex([VS, IMG], { imageGridThw: [[0, 2, 2]], spatialMergeSize: 2 }), "invalid_grid");
    expectCode(() => getRopeIndex([VS, IMG], { imageGridThw: [[1, 2, 2.5]], spatialMergeSize: 2 }), "invalid_grid");
    expectCode(() => getRopeIndex([VS, IMG], { imageGridThw: [[1, 2] as unknown as GridThw], spatialMergeSize: 2 }), "invalid_grid");
    expectCode(() => getRopeIndex([1, 2], { spatialMergeSize: 2, attentionMask: [1] }), "invalid_attention_mask");
    expectCode(() => getRopeIndex([1, 2], { spatialMergeSize: 2, attentionMask: [1, 2] }), "invalid_attention_mask");
    expectCode(() => getRopeIndex([1, 2], { spatialMergeSize: 1.5 }), "invalid_input");
    expectCode(() => getRopeIndex([1, 2], { spatialMergeSize: 2, imageTokenId: VID }), "invalid_input");
    expectCode(() => decodePosition(10, -1, 0), "invalid_input");
    expectCode(() => decodePosition(10.5, 0, 0), "invalid_input");
    expect(visionTokenCount([1, 22, 22], 2)).toBe(121);
    expectCode(() => visionTokenCount([1, 22, 21], 2), "invalid_grid");
  });
});

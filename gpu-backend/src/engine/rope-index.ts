/**
 * Qwen2-VL multimodal rotary position ids (M-RoPE), following transformers 4.46.1
 * `Qwen2VLForConditionalGeneration.get_rope_index` for one sequence, plus the processor's
 * `<|image_pad|>` expansion and the decode-step position rule.
 *
 * Every token gets three positions (temporal, height, width). Text tokens use the same value on all
 * three axes; the tokens of an image/video get their coordinates on the merged patch grid
 * (h / merge, w / merge), offset by the position that follows the preceding text. Text after a vision
 * block resumes at (largest position so far) + 1, so positions run "behind" token indices and
 * `ropeDeltas = max(position) + 1 − seqLen` (≤ 0) carries that shift into decoding.
 */
import { CodedError } from "../../../shared/src/errors.ts";

/** Stable codes of {@link RopeIndexError}. */
export type RopeIndexErrorCode =
  /** Number of images/videos in the ids does not match the number of grids given. */
  | "vision_count_mismatch"
  /** An image/video's pad tokens are not exactly t·h·w / merge² contiguous copies, or stray pads exist. */
  | "vision_token_mismatch"
  /** A grid is not three positive integers with h and w divisible by the merge size. */
  | "invalid_grid"
  /** The attention mask has the wrong length or values other than 0/1. */
  | "invalid_attention_mask"
  /** Bad arguments (merge size, token ids, decode step). */
  | "invalid_input";

/** Inconsistent ids / grids / mask; the message never contains token ids of the prompt. */
export class RopeIndexError extends CodedError<RopeIndexErrorCode> {}

/** `[t, h, w]` of one image or video in patches (before the spatial merge), as in `image_grid_thw`. */
export type GridThw = readonly [number, number, number];

/** Token ids `get_rope_index` needs (Qwen2-VL config: `image_token_id`, `video_token_id`, `vision_start_token_id`). */
export interface VisionTokenIds {
  imageTokenId: number;
  videoTokenId: number;
  visionStartTokenId: number;
}

/** The values of Qwen2-VL's config.json (also MedVLM-R1's). */
export const QWEN2_VL_VISION_TOKEN_IDS: Readonly<VisionTokenIds> = Object.freeze({
  imageTokenId: 151655,
  videoTokenId: 151656,
  visionStartTokenId: 151652,
});

/** Options of {@link getRopeIndex}. */
export interface RopeIndexOptions extends Partial<VisionTokenIds> {
  /** One grid per image, in order of appearance (`image_grid_thw`); null/empty for none. */
  imageGridThw?: readonly GridThw[] | null;
  /** One grid per video, in order of appearance (`video_grid_thw`); null/empty for none. */
  videoGridThw?: readonly GridThw[] | null;
  /** `vision_config.spatial_merge_size` (2 for Qwen2-VL). */
  spatialMergeSize: number;
  /** 1 = real token, 0 = padding (left padding); default all ones. Padded slots get position 1, as in HF. */
  attentionMask?: ArrayLike<number> | null;
}

/** Result of {@link getRopeIndex}. */
export interface RopeIndex {
  /** `[t, h, w]` positions, each of the sequence's length (what HF calls `position_ids[:, 0, :]`). */
  positionIds: [Int32Array, Int32Array, Int32Array];
  /** `max(position) + 1 − seqLen` (HF `rope_deltas`); 0 for text without padding. */
  ropeDeltas: number;
}

function checkTokenId(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new RopeIndexError("invalid_input", `${name} must be a non-negative integer`);
}

function checkMergeSize(mergeSize: number): void {
  if (!Number.isSafeInteger(mergeSize) || mergeSize < 1) {
    throw new RopeIndexError("invalid_input", "spatialMergeSize must be a positive integer");
  }
}

/** Validates a grid and returns its merged sizes `[t, h/merge, w/merge]`. */
function mergedGrid(grid: GridThw, mergeSize: number, what: string): [number, number, number] {
  if (!Array.isArray(grid) || grid.length !== 3) throw new RopeIndexError("invalid_grid", `${what}: grid must be [t, h, w]`);
  const [t, h, w] = grid;
  for (const v of grid) {
    if (!Number.isSafeInteger(v) || v < 1) throw new RopeIndexError("invalid_grid", `${what}: grid values must be positive integers`);
  }
  if (h % mergeSize !== 0 || w % mergeSize !== 0) {
    throw new RopeIndexError("invalid_grid", `${what}: grid h and w must be divisible by the merge size ${mergeSize}`);
  }
  return [t, h / mergeSize, w / mergeSize];
}

/** Number of LLM tokens one image/video occupies: t·h·w / merge². */
export function visionTokenCount(grid: GridThw, mergeSize: number): number {
  checkMergeSize(mergeSize);
  const [t, h, w] = mergedGrid(grid, mergeSize, "grid");
  return t * h * w;
}

/**
 * `get_rope_index` for one sequence (batch row). With no image and no video grid it is the text path
 * (`arange`, or `cumsum(mask) − 1` with padded slots set to 1 when a mask is given).
 *
 * Vision blocks are found like HF: a block is a `vision_start` immediately followed by an image (or
 * video) pad; blocks are consumed in order of their first pad token, taking grids in order. Unlike HF
 * (which would silently misplace positions or fail later in `masked_scatter`), inconsistent input throws.
 * @throws RopeIndexError
 */
export function getRopeIndex(inputIds: ArrayLike<number>, options: RopeIndexOptions): RopeIndex {
  const mergeSize = options.spatialMergeSize;
  checkMergeSize(mergeSize);
  const imageTokenId = options.imageTokenId ?? QWEN2_VL_VISION_TOKEN_IDS.imageTokenId;
  const videoTokenId = options.videoTokenId ?? QWEN2_VL_VISION_TOKEN_IDS.videoTokenId;
  const visionStartTokenId = options.visionStartTokenId ?? QWEN2_VL_VISION_TOKEN_IDS.visionStartTokenId;
  checkTokenId("imageTokenId", imageTokenId);
  checkTokenId("videoTokenId", videoTokenId);
  checkTokenId("visionStartTokenId", visionStartTokenId);
  if (imageTokenId === videoTokenId || imageTokenId === visionStartTokenId || videoTokenId === visionStartTokenId) {
    throw new RopeIndexError("invalid_input", "image, video and vision-start token ids must differ");
  }

  const L = inputIds.length;
  const mask = options.attentionMask ?? null;
  if (mask) {
    if (mask.length !== L) throw new RopeIndexError("invalid_attention_mask", `attention mask length ${mask.length} ≠ ${L} ids`);
    for (let i = 0; i < L; i++) {
      if (mask[i] !== 0 && mask[i] !== 1) throw new RopeIndexError("invalid_attention_mask", "attention mask values must be 0 or 1");
    }
  }
  const images = options.imageGridThw ?? [];
  const videos = options.videoGridThw ?? [];
  const imageGrids = images.map((g, i) => mergedGrid(g, mergeSize, `image ${i}`));
  const videoGrids = videos.map((g, i) => mergedGrid(g, mergeSize, `video ${i}`));

  const t = new Int32Array(L);
  const h = new Int32Array(L);
  const w = new Int32Array(L);

  // HF takes the text path only when both grid lists are None (an empty list counts as None here).
  if (imageGrids.length === 0 && videoGrids.length === 0) {
    if (!mask) {
      for (let i = 0; i < L; i++) t[i] = h[i] = w[i] = i;
      return { positionIds: [t, h, w], ropeDeltas: 0 };
    }
    let next = 0;
    let max = -1;
    for (let i = 0; i < L; i++) {
      // Padded slots hold 1, and HF's max runs over them too.
      const p = mask[i] === 1 ? next++ : 1;
      t[i] = h[i] = w[i] = p;
      if (p > max) max = p;
    }
    // HF takes the max over the whole row; an empty row (where HF would fail) gets 0.
    return { positionIds: [t, h, w], ropeDeltas: L === 0 ? 0 : max + 1 - L };
  }

  // Unpadded view of the row: `idx[j]` is the slot of the j-th real token.
  let idx: Int32Array;
  if (mask) {
    let n = 0;
    for (let i = 0; i < L; i++) if (mask[i] === 1) n++;
    idx = new Int32Array(n);
    n = 0;
    for (let i = 0; i < L; i++) if (mask[i] === 1) idx[n++] = i;
    for (let i = 0; i < L; i++) {
      if (mask[i] !== 1) t[i] = h[i] = w[i] = 1;
    }
  } else {
    idx = new Int32Array(L);
    for (let i = 0; i < L; i++) idx[i] = i;
  }
  const n = idx.length;
  const tok = (j: number): number => inputIds[idx[j]!]!;

  // Count blocks the way HF does: vision_start followed by an image/video pad.
  let imageBlocks = 0;
  let videoBlocks = 0;
  let imagePads = 0;
  let videoPads = 0;
  for (let j = 0; j < n; j++) {
    const id = tok(j);
    if (id === imageTokenId) imagePads++;
    else if (id === videoTokenId) videoPads++;
    else if (id === visionStartTokenId && j + 1 < n) {
      const nextId = tok(j + 1);
      if (nextId === imageTokenId) imageBlocks++;
      else if (nextId === videoTokenId) videoBlocks++;
    }
  }
  if (imageBlocks !== imageGrids.length || videoBlocks !== videoGrids.length) {
    throw new RopeIndexError(
      "vision_count_mismatch",
      `${imageBlocks} images / ${videoBlocks} videos in the ids but ${imageGrids.length} / ${videoGrids.length} grids`,
    );
  }
  const expectedImagePads = imageGrids.reduce((s, [a, b, c]) => s + a * b * c, 0);
  const expectedVideoPads = videoGrids.reduce((s, [a, b, c]) => s + a * b * c, 0);
  if (imagePads !== expectedImagePads || videoPads !== expectedVideoPads) {
    throw new RopeIndexError(
      "vision_token_mismatch",
      `${imagePads} image / ${videoPads} video pad tokens but the grids need ${expectedImagePads} / ${expectedVideoPads}`,
    );
  }

  const indexOf = (id: number, from: number): number => {
    for (let j = from; j < n; j++) if (tok(j) === id) return j;
    return -1;
  };
  const put = (j: number, pt: number, ph: number, pw: number): void => {
    const s = idx[j]!;
    t[s] = pt;
    h[s] = ph;
    w[s] = pw;
  };

  let st = 0; // next unprocessed token (unpadded index)
  let next = 0; // position after the last block = (max of the last block) + 1
  let imageIndex = 0;
  let videoIndex = 0;
  for (let b = 0; b < imageBlocks + videoBlocks; b++) {
    const edImage = imageIndex < imageBlocks ? indexOf(imageTokenId, st) : -1;
    const edVideo = videoIndex < videoBlocks ? indexOf(videoTokenId, st) : -1;
    if (edImage < 0 && edVideo < 0) {
      throw new RopeIndexError("vision_token_mismatch", `no pad tokens left for vision block ${b}`);
    }
    let grid: [number, number, number];
    let ed: number;
    let padId: number;
    if (edImage >= 0 && (edVideo < 0 || edImage < edVideo)) {
      grid = imageGrids[imageIndex++]!;
      ed = edImage;
      padId = imageTokenId;
    } else {
      grid = videoGrids[videoIndex++]!;
      ed = edVideo;
      padId = videoTokenId;
    }
    const [gt, gh, gw] = grid;
    const count = gt * gh * gw;
    for (let j = ed; j < ed + count; j++) {
      if (j >= n || tok(j) !== padId) {
        throw new RopeIndexError("vision_token_mismatch", `vision block ${b} has fewer than ${count} contiguous pad tokens`);
      }
    }
    // Text between the previous block and this one.
    for (let j = st; j < ed; j++) {
      const p = next + (j - st);
      put(j, p, p, p);
    }
    const base = next + (ed - st);
    let j = ed;
    for (let a = 0; a < gt; a++) {
      for (let r = 0; r < gh; r++) {
        for (let c = 0; c < gw; c++) put(j++, base + a, base + r, base + c);
      }
    }
    next = base + Math.max(gt, gh, gw);
    st = ed + count;
  }
  for (let j = st; j < n; j++) {
    const p = next + (j - st);
    put(j, p, p, p);
  }
  // Largest position = last real token's text position, or the last block's max when it ends the row.
  const maxPos = st < n ? next + (n - st) - 1 : next - 1;
  // Padded slots hold 1 but HF's delta uses the max over real tokens only (`llm_positions.max()`).
  return { positionIds: [t, h, w], ropeDeltas: maxPos + 1 - L };
}

/**
 * Position (same on all three axes) of a token fed back during decoding: the k-th generated token
 * (k = 0 for the first one fed back) sits at `seqLen + k + ropeDeltas`, where `seqLen` is the prompt
 * length (padding included) — transformers' `cache_position + rope_deltas`.
 */
export function decodePosition(seqLen: number, k: number, ropeDeltas: number): number {
  if (!Number.isSafeInteger(seqLen) || seqLen < 0 || !Number.isSafeInteger(k) || k < 0 || !Number.isSafeInteger(ropeDeltas)) {
    throw new RopeIndexError("invalid_input", "decodePosition needs integer seqLen ≥ 0, k ≥ 0 and ropeDeltas");
  }
  return seqLen + k + ropeDeltas;
}

/**
 * `vision_encoder.onnx`: Qwen2-VL's vision tower (`visual.*`), several images per call.
 *
 * inputs   pixel_values [num_patches, C·T·P·P] (rows in the image processor's merge-window order, images
 *          concatenated) · grid_thw int64 [num_images, 3]
 * output   image_features [num_patches / merge², H]
 *
 * Mirrors transformers v4.46.1 `Qwen2VisionTransformerPretrainedModel` (eager attention):
 * `visual.patch_embed` (Conv3d with stride = kernel, no bias = one MatMul over the flattened patch) →
 * `visual.blocks.N` (x += attn.proj(attn(norm1(x))); x += mlp.fc2(act(mlp.fc1(norm2(x))))) with 2-D rotary
 * on q/k and attention restricted to each frame (transformers' `cu_seqlens`) → `visual.merger`
 * (ln_q → 2×2 windows concatenated → mlp.0 → GELU(erf) → mlp.2).
 *
 * The rotary positions are computed in the graph from grid_thw without loops: each patch row finds its
 * image from cumulative patch counts, then its (h, w) from the index inside the frame, undoing the
 * merge-window order (block row/col, then row/col inside the merge×merge block).
 */
import type { Qwen2VLConfig } from "../checkpoint/config.ts";
import type { Value } from "../onnx/index.ts";
import { ConvertError, F32_MIN, ModuleEmitter, ropeInvFreq } from "./common.ts";

/** The vision settings the encoder needs (the checkpoint module's `Qwen2VLConfig.vision`). */
export type VisionConfig = Omit<Qwen2VLConfig["vision"], "mlp_ratio">;

/** Vision-encoder options. */
export interface VisionOptions {
  /**
   * The blocks' Linear layers (qkv, proj, fc1, fc2: 99% of the encoder's FLOPs) as W8A8 integer GEMMs (see
   * `LinearOptions.int8Dynamic`); the patch embedding and the merger stay float. float32 graphs only.
   */
  int8?: boolean;
  /** Scores per attention chunk (default {@link VISION_ATTENTION_CHUNK_ELEMENTS}). */
  attentionChunkElements?: number;
}

/** Vision activation functions transformers' ACT2FN provides that this converter supports. */
export const VISION_ACTS = ["quick_gelu", "gelu", "silu"] as const;

/** Exact GELU as torch computes it: x·0.5·(1 + erf(x/√2)). */
function geluErf(e: ModuleEmitter, x: Value): Value {
  const g = e.g;
  const erf = g.op("Erf", [g.op("Mul", [x, e.constant([Math.SQRT1_2], [])])]);
  return g.op("Mul", [g.op("Mul", [x, e.constant([0.5], [])]), g.op("Add", [erf, e.constant([1], [])])]);
}

function activation(e: ModuleEmitter, x: Value, act: string): Value {
  const g = e.g;
  switch (act) {
    case "quick_gelu": // x·sigmoid(1.702x)
      return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, e.constant([1.702], [])])])]);
    case "gelu":
      return geluErf(e, x);
    case "silu":
      return g.op("Mul", [x, g.op("Sigmoid", [x])]);
    default:
      throw new ConvertError("unsupported", `vision_config.hidden_act ${JSON.stringify(act)} is not supported (${VISION_ACTS.join(", ")})`);
  }
}

/**
 * Per patch row: rotary cos/sin [N, head_dim] and the id of its frame (the first row of that frame),
 * from grid_thw.
 */
function patchPositions(e: ModuleEmitter, pixelValues: Value, gridThw: Value, cfg: VisionConfig) {
  const g = e.g;
  return g.within("visual/rot_pos_emb", () => {
    const m = cfg.spatial_merge_size;
    const col = (k: number) => g.op("Squeeze", [g.op("Slice", [gridThw, g.i64([k]), g.i64([k + 1]), g.i64([1])]), g.i64([1])]); // [I]
    const t = col(0);
    const h = col(1);
    const w = col(2);
    const frameSize = g.op("Mul", [h, w]);
    const count = g.op("Mul", [t, frameSize]);
    const ends = g.op("CumSum", [count, g.i64Scalar(0)]);
    const starts = g.op("Sub", [ends, count]);
    const n = g.op("Squeeze", [g.op("Shape", [pixelValues], { start: 0, end: 1 }), g.i64([0])]);
    const p = g.op("Range", [g.i64Scalar(0), n, g.i64Scalar(1)]); // [N]
    // image of row p = number of images that end at or before p
    const passed = g.op("Cast", [g.op("GreaterOrEqual", [g.op("Unsqueeze", [p, g.i64([1])]), g.op("Unsqueeze", [ends, g.i64([0])])])], { to: 7 });
    const img = g.op("ReduceSum", [passed, g.i64([1])], { keepdims: 0 }); // [N]
    const local = g.op("Sub", [p, g.op("Gather", [starts, img])]);
    const fs = g.op("Gather", [frameSize, img]);
    const wi = g.op("Gather", [w, img]);
    const inFrame = g.op("Mod", [local, fs]);
    const frameStart = g.op("Sub", [p, inFrame]); // equal for rows of the same frame, distinct across frames
    const mm = g.i64Scalar(m * m);
    const mS = g.i64Scalar(m);
    const block = g.op("Div", [inFrame, mm]);
    const within = g.op("Mod", [inFrame, mm]);
    const blocksPerRow = g.op("Div", [wi, mS]);
    const hpos = g.op("Add", [g.op("Mul", [g.op("Div", [block, blocksPerRow]), mS]), g.op("Div", [within, mS])]);
    const wpos = g.op("Add", [g.op("Mul", [g.op("Mod", [block, blocksPerRow]), mS]), g.op("Mod", [within, mS])]);
    // VisionRotaryEmbedding(head_dim/2, θ=10000): freqs = pos ⊗ inv_freq; rot = [h freqs | w freqs]
    const invFreq = g.constant("float32", ropeInvFreq(10000, cfg.head_dim / 2));
    const freqs = (pos: Value) => g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], { to: 1 }), g.i64([1])]), invFreq]);
    const rot = g.op("Concat", [freqs(hpos), freqs(wpos)], { axis: -1 }); // [N, hd/2]
    const emb = g.op("Concat", [rot, rot], { axis: -1 }); // [N, hd]
    return { cos: e.fromF32(g.op("Cos", [emb])), sin: e.fromF32(g.op("Sin", [emb])), frameStart };
  });
}

/**
 * Scores a chunk may hold (heads × query rows × keys): 2²⁴ float32 = 64 MiB. Attention over N patches
 * otherwise materializes [heads, N, N] scores several times over (3.6 GB each at 7488 patches, a
 * 1462×1010 X-ray at the reference's max_pixels), and ONNX Runtime's arena keeps its peak after the
 * request; chunks of query rows bound that to a few times this, whatever the image.
 */
export const VISION_ATTENTION_CHUNK_ELEMENTS = 1 << 24;

/**
 * Softmax attention of q [1, heads, N, hd] over k, v (same shape) restricted to each frame, in chunks of
 * query rows: a `Loop` whose body scores `c = clamp(⌊budget / (heads·N)⌋, 1, N)` rows against all keys.
 * Each row's scores, mask and softmax are the ones the whole [N, N] would give (transformers' eager
 * order: q·kᵀ, ÷√hd, + mask, softmax in float32, ·v). q is padded to a whole number of chunks; padded
 * rows belong to no frame (all keys masked) and are cut off. Returns the context [N, heads·hd].
 */
function frameAttention(e: ModuleEmitter, q: Value, k: Value, v: Value, frameStart: Value, cfg: VisionConfig, budget: number): Value {
  const g = e.g;
  const nH = cfg.num_heads;
  const n = g.op("Shape", [frameStart]); // [1]
  const c = g.op("Max", [g.i64([1]), g.op("Min", [n, g.op("Div", [g.i64([budget]), g.op("Mul", [n, g.i64([nH])])])])]);
  const chunks = g.op("Div", [g.op("Sub", [g.op("Add", [n, c]), g.i64([1])]), c]);
  const pad = g.op("Sub", [g.op("Mul", [chunks, c]), n]);
  const qPad = g.op("Pad", [q, g.op("Concat", [g.i64([0, 0, 0, 0, 0, 0]), pad, g.i64([0])], { axis: 0 })]);
  const framePad = g.op("Pad", [frameStart, g.op("Concat", [g.i64([0]), pad], { axis: 0 }), g.i64Scalar(-1)]);
  const kT = g.op("Transpose", [k], { perm: [0, 1, 3, 2] });
  const keyFrame = g.op("Unsqueeze", [frameStart, g.i64([0])]); // [1, N]
  const oneFrame = g.op("Equal", [g.op("ReduceMax", [frameStart], { keepdims: 0 }), g.i64Scalar(0)]);
  const scale = e.constant([Math.sqrt(cfg.head_dim)], []);

  const body = g.subgraph(`${g.name}${g.scope}/chunk`);
  const b = new ModuleEmitter(body, e.weights, e.options);
  const iter = body.input(`${g.scope}/chunk/i`, "int64", []);
  const condIn = body.input(`${g.scope}/chunk/cond`, "bool", []);
  const start = body.op("Mul", [body.op("Unsqueeze", [iter, body.i64([0])]), c]);
  const end = body.op("Add", [start, c]);
  const rows = body.op("Slice", [qPad, start, end, body.i64([2])]); // [1, heads, c, hd]
  const scores = b.toF32(body.op("Div", [body.op("MatMul", [rows, kT]), scale]));
  const softmax = (name: string, masked: boolean) => {
    const br = body.subgraph(`${body.name}/${name}`);
    let x = scores;
    if (masked) {
      const rowFrame = br.op("Unsqueeze", [br.op("Slice", [framePad, start, end, br.i64([0])]), br.i64([1])]); // [c, 1]
      x = br.op("Add", [x, br.op("Where", [br.op("Equal", [rowFrame, keyFrame]), br.f32Scalar(0), br.f32Scalar(F32_MIN)])]); // + [c, N]
    }
    br.output(br.op("Softmax", [x], { axis: -1 }), `${g.scope}/chunk/${name}/probs`, "float32", null);
    return { graph: br.build() };
  };
  // A single frame (one image) sees every key: its mask is all zeros, and x + 0 = x, so it is skipped.
  const probs = b.fromF32(body.op("If", [oneFrame], { then_branch: softmax("one_frame", false), else_branch: softmax("frames", true) }));
  const out = body.op("MatMul", [probs, v]); // [1, heads, c, hd]
  body.output(condIn, `${g.scope}/chunk/cond_out`, "bool", []);
  body.output(out, `${g.scope}/chunk/out`, e.float, null);

  const stacked = g.op("Loop", [g.op("Squeeze", [chunks, g.i64([0])]), ""], { body: { graph: body.build() } }); // [chunks, 1, heads, c, hd]
  const rowsFirst = g.op("Reshape", [g.op("Transpose", [stacked], { perm: [0, 3, 1, 2, 4] }), g.i64([-1, cfg.embed_dim])]);
  return g.op("Slice", [rowsFirst, g.i64([0]), n, g.i64([0])]); // [N, E]
}

/** `visual.blocks.N.attn`: qkv → 2-D rotary → per-frame softmax attention (chunked) → proj. */
function visionAttention(e: ModuleEmitter, x: Value, i: number, cfg: VisionConfig, cos: Value, sin: Value, frameStart: Value, opts: Required<VisionOptions>): Value {
  const g = e.g;
  const p = `visual.blocks.${i}.attn`;
  const nH = cfg.num_heads;
  const hd = cfg.head_dim;
  const qkv = e.linear(x, `${p}.qkv`, { bias: true, quantize: false, int8Dynamic: opts.int8 });
  const ctx = g.within(p, () => {
    // [N, 3E] → [N, 3, heads, hd] → [3, heads, N, hd] → q, k, v [1, heads, N, hd]
    const split = g.op("Transpose", [g.op("Reshape", [qkv, g.i64([-1, 3, nH, hd])])], { perm: [1, 2, 0, 3] });
    const [q, k, v] = g.node("Split", [split, g.i64([1, 1, 1])], { axis: 0 }, { outputs: 3 }) as [Value, Value, Value];
    return frameAttention(e, e.rotary(q, cos, sin, hd), e.rotary(k, cos, sin, hd), v, frameStart, cfg, opts.attentionChunkElements);
  });
  return e.linear(ctx, `${p}.proj`, { bias: true, quantize: false, int8Dynamic: opts.int8 });
}

/** Builds the vision encoder graph into `e.g`. */
export function buildVisionEncoder(e: ModuleEmitter, cfg: VisionConfig, options: VisionOptions = {}): void {
  const opts: Required<VisionOptions> = { int8: options.int8 ?? false, attentionChunkElements: options.attentionChunkElements ?? VISION_ATTENTION_CHUNK_ELEMENTS };
  const g = e.g;
  if (!(VISION_ACTS as readonly string[]).includes(cfg.hidden_act)) {
    throw new ConvertError("unsupported", `vision_config.hidden_act ${JSON.stringify(cfg.hidden_act)} is not supported (${VISION_ACTS.join(", ")})`);
  }
  const patchDim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
  const merge2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
  const pixelValues = g.input("pixel_values", e.float, ["num_patches", patchDim]);
  const gridThw = g.input("grid_thw", "int64", ["num_images", 3]);

  const { cos, sin, frameStart } = patchPositions(e, pixelValues, gridThw, cfg);

  // Conv3d(kernel = stride = (T, P, P), no bias) on one patch = dot product with the flattened kernel.
  let x = e.linear(pixelValues, "visual.patch_embed.proj", { bias: false, quantize: false, flatten: true });
  for (let i = 0; i < cfg.depth; i++) {
    const p = `visual.blocks.${i}`;
    const a = visionAttention(e, e.layerNorm(x, `${p}.norm1`, cfg.layer_norm_eps), i, cfg, cos, sin, frameStart, opts);
    x = g.within(p, () => g.op("Add", [x, a]));
    const h = e.linear(e.layerNorm(x, `${p}.norm2`, cfg.layer_norm_eps), `${p}.mlp.fc1`, { bias: true, quantize: false, int8Dynamic: opts.int8 });
    const act = g.within(`${p}.mlp`, () => activation(e, h, cfg.hidden_act));
    const m = e.linear(act, `${p}.mlp.fc2`, { bias: true, quantize: false, int8Dynamic: opts.int8 });
    x = g.within(p, () => g.op("Add", [x, m]));
  }
  const ln = e.layerNorm(x, "visual.merger.ln_q", cfg.layer_norm_eps);
  // Four consecutive rows are one merge window (the processor emits rows in that order).
  const windows = g.within("visual.merger", () => g.op("Reshape", [ln, g.i64([-1, cfg.embed_dim * merge2])]));
  const h0 = e.linear(windows, "visual.merger.mlp.0", { bias: true, quantize: false });
  const act = g.within("visual.merger.mlp", () => geluErf(e, h0));
  const out = e.linear(act, "visual.merger.mlp.2", { bias: true, quantize: false });
  g.output(out, "image_features", e.float, ["num_image_tokens", cfg.hidden_size]);
}

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
import { ConvertError, F32_MIN, type ModuleEmitter, ropeInvFreq } from "./common.ts";

/** The vision settings the encoder needs (the checkpoint module's `Qwen2VLConfig.vision`). */
export type VisionConfig = Omit<Qwen2VLConfig["vision"], "mlp_ratio">;

/** Vision-encoder options. */
export interface VisionOptions {
  /**
   * The blocks' Linear layers (qkv, proj, fc1, fc2: 99% of the encoder's FLOPs) as W8A8 integer GEMMs (see
   * `LinearOptions.int8Dynamic`); the patch embedding and the merger stay float. float32 graphs only.
   */
  int8?: boolean;
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

/** `visual.blocks.N.attn`: qkv → 2-D rotary → per-frame softmax attention → proj. */
function visionAttention(e: ModuleEmitter, x: Value, i: number, cfg: VisionConfig, cos: Value, sin: Value, bias: Value, int8: boolean): Value {
  const g = e.g;
  const p = `visual.blocks.${i}.attn`;
  const E = cfg.embed_dim;
  const nH = cfg.num_heads;
  const hd = cfg.head_dim;
  const qkv = e.linear(x, `${p}.qkv`, { bias: true, quantize: false, int8Dynamic: int8 });
  const ctx = g.within(p, () => {
    // [N, 3E] → [N, 3, heads, hd] → [3, heads, N, hd] → q, k, v [1, heads, N, hd]
    const split = g.op("Transpose", [g.op("Reshape", [qkv, g.i64([-1, 3, nH, hd])])], { perm: [1, 2, 0, 3] });
    const [q, k, v] = g.node("Split", [split, g.i64([1, 1, 1])], { axis: 0 }, { outputs: 3 }) as [Value, Value, Value];
    const qr = e.rotary(q, cos, sin, hd);
    const kr = e.rotary(k, cos, sin, hd);
    const scores = g.op("Div", [g.op("MatMul", [qr, g.op("Transpose", [kr], { perm: [0, 1, 3, 2] })]), e.constant([Math.sqrt(hd)], [])]);
    const probs = e.fromF32(g.op("Softmax", [g.op("Add", [e.toF32(scores), bias])], { axis: -1 }));
    const out = g.op("MatMul", [probs, v]); // [1, heads, N, hd]
    return g.op("Reshape", [g.op("Transpose", [out], { perm: [0, 2, 1, 3] }), g.i64([-1, E])]);
  });
  return e.linear(ctx, `${p}.proj`, { bias: true, quantize: false, int8Dynamic: int8 });
}

/** Builds the vision encoder graph into `e.g`. */
export function buildVisionEncoder(e: ModuleEmitter, cfg: VisionConfig, opts: VisionOptions = {}): void {
  const int8 = opts.int8 ?? false;
  const g = e.g;
  if (!(VISION_ACTS as readonly string[]).includes(cfg.hidden_act)) {
    throw new ConvertError("unsupported", `vision_config.hidden_act ${JSON.stringify(cfg.hidden_act)} is not supported (${VISION_ACTS.join(", ")})`);
  }
  const patchDim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
  const merge2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
  const pixelValues = g.input("pixel_values", e.float, ["num_patches", patchDim]);
  const gridThw = g.input("grid_thw", "int64", ["num_images", 3]);

  const { cos, sin, frameStart } = patchPositions(e, pixelValues, gridThw, cfg);
  // Attention only within a frame (block-diagonal); masked scores get float32 min like transformers.
  const bias = g.within("visual/attention_mask", () => {
    const same = g.op("Equal", [g.op("Unsqueeze", [frameStart, g.i64([1])]), g.op("Unsqueeze", [frameStart, g.i64([0])])]);
    return g.op("Where", [same, g.f32Scalar(0), g.f32Scalar(F32_MIN)]); // [N, N]
  });

  // Conv3d(kernel = stride = (T, P, P), no bias) on one patch = dot product with the flattened kernel.
  let x = e.linear(pixelValues, "visual.patch_embed.proj", { bias: false, quantize: false, flatten: true });
  for (let i = 0; i < cfg.depth; i++) {
    const p = `visual.blocks.${i}`;
    const a = visionAttention(e, e.layerNorm(x, `${p}.norm1`, cfg.layer_norm_eps), i, cfg, cos, sin, bias, int8);
    x = g.within(p, () => g.op("Add", [x, a]));
    const h = e.linear(e.layerNorm(x, `${p}.norm2`, cfg.layer_norm_eps), `${p}.mlp.fc1`, { bias: true, quantize: false, int8Dynamic: int8 });
    const act = g.within(`${p}.mlp`, () => activation(e, h, cfg.hidden_act));
    const m = e.linear(act, `${p}.mlp.fc2`, { bias: true, quantize: false, int8Dynamic: int8 });
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

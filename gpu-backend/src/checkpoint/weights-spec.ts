/**
 * The deterministic test-weight generator of `shared/golden/WEIGHTS.md` and the tensor list of
 * `Qwen2VLForConditionalGeneration.state_dict()` (transformers v4.46.1, old-style keys).
 *
 * Every value is a pure function of the tensor name and shape: seed = FNV-1a(name), one mulberry32 draw per
 * element in C order, a value rule chosen by name/rank, rounded once to float32.
 */
import type { Qwen2VLConfig } from "./config.ts";
import { numelOf } from "./safetensors.ts";

/** FNV-1a 32-bit hash of the UTF-8 bytes of `s` (the tensor's seed). */
export function fnv1a32(s: string): number {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(s)) {
    h ^= b;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

/**
 * mulberry32 as a resumable generator: `nextU32()` returns the raw uint32 (u = x / 2^32).
 * The state after k draws is `seed + k·0x6D2B79F5 mod 2^32`, so a chunked reader can start anywhere.
 */
export class Mulberry32 {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  /** Next output as a uint32. */
  nextU32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Next output as a float in [0, 1). */
  next(): number {
    return this.nextU32() / 4294967296;
  }
}

/** Which value rule of WEIGHTS.md §3 applies to a tensor (first match wins). */
export type SpecRule = "bias" | "vector" | "matrix";

/** Picks the value rule: `.bias` names, then 1-D tensors, then everything else. */
export function specRule(name: string, shape: readonly number[]): SpecRule {
  if (name.endsWith(".bias")) return "bias";
  if (shape.length === 1) return "vector";
  return "matrix";
}

/**
 * Generates a tensor's spec values in chunks of at most `chunkElems` float32 values, in C order, so multi-GB
 * tensors can be streamed. Concatenating the chunks equals {@link specTensor}.
 */
export function* specTensorChunks(name: string, shape: readonly number[], chunkElems = 1 << 22): Generator<Float32Array> {
  const n = numelOf(shape);
  const rule = specRule(name, shape);
  // fan-in: numel / shape[0]; sqrt is correctly rounded, then one division per element (in float64).
  const scale = rule === "matrix" ? Math.sqrt(n / (shape[0] as number)) : 1;
  // mulberry32 inlined (same int32 arithmetic as Mulberry32.nextU32): about 2x faster than a method call per element,
  // which matters for the 2.2 G elements of the 2B shape.
  let state = fnv1a32(name) | 0;
  for (let start = 0; start < n; start += chunkElems) {
    const len = Math.min(chunkElems, n - start);
    const out = new Float32Array(len);
    for (let i = 0; i < len; i++) {
      state = (state + 0x6d2b79f5) | 0;
      let t = Math.imul(state ^ (state >>> 15), state | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      const u = ((t ^ (t >>> 14)) >>> 0) / 4294967296;
      out[i] = rule === "matrix" ? (2 * u - 1) / scale : rule === "bias" ? 0.1 * (2 * u - 1) : 1 + 0.1 * (2 * u - 1);
    }
    yield out;
  }
}

/** The whole tensor's spec values (float32). */
export function specTensor(name: string, shape: readonly number[]): Float32Array {
  const out = new Float32Array(numelOf(shape));
  let off = 0;
  for (const c of specTensorChunks(name, shape)) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

/** A tensor name and shape. */
export interface TensorShape {
  name: string;
  shape: number[];
}

/**
 * Every parameter of `Qwen2VLForConditionalGeneration.state_dict()` for this config, in state_dict order
 * (vision encoder, decoder, then `lm_head.weight` only when the embeddings are not tied). Non-persistent
 * buffers (rotary inv_freq) are not part of it.
 */
export function qwen2vlTensorShapes(config: Qwen2VLConfig): TensorShape[] {
  const v = config.vision;
  const t = config.text;
  const E = v.embed_dim;
  const M = E * v.mlp_ratio;
  const merged = E * v.spatial_merge_size * v.spatial_merge_size;
  const H = t.hidden_size;
  const qDim = t.num_attention_heads * t.head_dim;
  const kvDim = t.num_key_value_heads * t.head_dim;
  const I = t.intermediate_size;
  const out: TensorShape[] = [];
  const add = (name: string, shape: number[]): void => {
    out.push({ name, shape });
  };
  add("visual.patch_embed.proj.weight", [E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size]);
  for (let i = 0; i < v.depth; i++) {
    const p = `visual.blocks.${i}`;
    add(`${p}.norm1.weight`, [E]);
    add(`${p}.norm1.bias`, [E]);
    add(`${p}.norm2.weight`, [E]);
    add(`${p}.norm2.bias`, [E]);
    add(`${p}.attn.qkv.weight`, [3 * E, E]);
    add(`${p}.attn.qkv.bias`, [3 * E]);
    add(`${p}.attn.proj.weight`, [E, E]);
    add(`${p}.attn.proj.bias`, [E]);
    add(`${p}.mlp.fc1.weight`, [M, E]);
    add(`${p}.mlp.fc1.bias`, [M]);
    add(`${p}.mlp.fc2.weight`, [E, M]);
    add(`${p}.mlp.fc2.bias`, [E]);
  }
  add("visual.merger.ln_q.weight", [E]);
  add("visual.merger.ln_q.bias", [E]);
  add("visual.merger.mlp.0.weight", [merged, merged]);
  add("visual.merger.mlp.0.bias", [merged]);
  add("visual.merger.mlp.2.weight", [v.hidden_size, merged]);
  add("visual.merger.mlp.2.bias", [v.hidden_size]);
  add("model.embed_tokens.weight", [t.vocab_size, H]);
  for (let i = 0; i < t.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    add(`${p}.self_attn.q_proj.weight`, [qDim, H]);
    add(`${p}.self_attn.q_proj.bias`, [qDim]);
    add(`${p}.self_attn.k_proj.weight`, [kvDim, H]);
    add(`${p}.self_attn.k_proj.bias`, [kvDim]);
    add(`${p}.self_attn.v_proj.weight`, [kvDim, H]);
    add(`${p}.self_attn.v_proj.bias`, [kvDim]);
    add(`${p}.self_attn.o_proj.weight`, [H, qDim]);
    add(`${p}.mlp.gate_proj.weight`, [I, H]);
    add(`${p}.mlp.up_proj.weight`, [I, H]);
    add(`${p}.mlp.down_proj.weight`, [H, I]);
    add(`${p}.input_layernorm.weight`, [H]);
    add(`${p}.post_attention_layernorm.weight`, [H]);
  }
  add("model.norm.weight", [H]);
  if (!t.tie_word_embeddings) add("lm_head.weight", [t.vocab_size, H]);
  return out;
}

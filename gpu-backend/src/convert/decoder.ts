/**
 * `decoder_model_merged.onnx`: the Qwen2 language model of Qwen2-VL with its KV cache, in the
 * onnx-community / transformers.js layout.
 *
 * inputs   inputs_embeds [batch, seq, H] · attention_mask int64 [batch, past+seq] ·
 *          position_ids int64 [3, batch, seq] (M-RoPE t/h/w) ·
 *          past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] (past may be 0)
 * outputs  logits [batch, 1 | seq, vocab] · present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]
 *
 * Mirrors transformers' Qwen2VLForConditionalGeneration language path (v4.46.1, eager attention):
 * `model.layers.N` = input_layernorm → self_attn (q/k/v with bias, M-RoPE, GQA, causal+padding mask,
 * float32 softmax) → residual → post_attention_layernorm → mlp (SwiGLU) → residual; `model.norm`;
 * `lm_head` (tied to `model.embed_tokens` unless the config says otherwise).
 *
 * float32 graphs fuse each RMSNorm (and the residual add before it) into ONNX Runtime's
 * `SimplifiedLayerNormalization` / `com.microsoft.SkipSimplifiedLayerNormalization` kernels; `present.*` are
 * the KV Concat outputs themselves, and grouped-query attention reads K/V without copying them.
 *
 * The same model with the engine's own KV contract (`kvCache: "append"`, `decoder_model_append.onnx`): the
 * past is a cache buffer of any number of slots, C (the filled ones, and left padding or spare capacity masked
 * out by `attention_mask` [batch, C+seq]), and the outputs are only the new tokens' K/V,
 * `new_key_values.{i}.key` / `.value` [batch, kv_heads, seq, head_dim], which the caller writes into its
 * buffer. Attention scores the queries against the buffer and against the new keys separately and joins the
 * scores ([…, C+seq], a few kB); nothing copies the cache, whose `Concat` in the layout above costs a full read
 * and write of it per layer and step (the larger part of attention at long contexts and in batches). Its
 * logits are those of the last `logits_to_keep` positions (int64 [1]; [batch, logits_to_keep, vocab]): 1 for a
 * decode step or a prefill, more to check a speculative draft in one pass.
 */
import type { Qwen2VLConfig } from "../checkpoint/config.ts";
import type { Value } from "../onnx/index.ts";
import { ConvertError, F32_MIN, type LinearOptions, type ModuleEmitter, ropeInvFreq } from "./common.ts";

/** The text-model settings the decoder needs (the checkpoint module's `Qwen2VLConfig.text`). */
export type DecoderConfig = Pick<
  Qwen2VLConfig["text"],
  | "hidden_size"
  | "num_hidden_layers"
  | "num_attention_heads"
  | "num_key_value_heads"
  | "head_dim"
  | "intermediate_size"
  | "hidden_act"
  | "rms_norm_eps"
  | "rope_theta"
  | "mrope_section"
  | "vocab_size"
  | "tie_word_embeddings"
>;

/** Decoder-specific options. */
export interface DecoderOptions {
  /** Logits of the last position only ([B, 1, V], default) or of every position ([B, S, V]). */
  lastLogitsOnly?: boolean;
  /** How the LM head is computed (default `"nbits"`: the dtype's MatMulNBits, float for fp32/fp16). */
  lmHead?: LmHeadMethod;
  /**
   * The layers' Linear weights as W8A8 (`LinearOptions.int8Dynamic`: MatMulInteger, int8 weights per output
   * feature, int8 activations per token) instead of MatMulNBits (float32 graphs; `ConvertOptions.w8a8`, int8
   * only). The LM head follows `lmHead`.
   */
  w8a8?: boolean;
  /**
   * A float LM head larger than this is split along the vocabulary into MatMuls on column slices of at most
   * about this many bytes, concatenated (`LinearOptions.maxSliceBytes`; same logits). Default
   * {@link LM_HEAD_SLICE_BYTES}; 0 = never split. A quantized LM head (MatMulNBits) stays one node.
   */
  lmHeadSliceBytes?: number;
  /**
   * The KV-cache contract: `"present"` (default) — the onnx-community layout, `past_key_values.*` in and
   * `present.*` (past + new) out; `"append"` — the past is a masked buffer of spare capacity and only the new
   * tokens' K/V come out, as `new_key_values.*` (see the module comment).
   */
  kvCache?: KvCacheContract;
}

/**
 * The LM head's computation: `"nbits"` — MatMulNBits with the dtype's bits and blocks (a float MatMul for
 * fp32/fp16); `"w8a8"` — MatMulInteger with int8 weights per output feature (vocabulary row) and the final
 * hidden state quantized to int8 per token (float32 graphs); `"float"` — a float MatMul on vocabulary slices.
 */
export type LmHeadMethod = "nbits" | "w8a8" | "float";

/** The decoder's KV-cache I/O contract (see {@link DecoderOptions.kvCache}). */
export type KvCacheContract = "present" | "append";

/**
 * Default largest float LM-head slice. ONNX Runtime holds a constant MatMul weight and its prepacked copy
 * together for a moment at load; a 2B-class float32 LM head (151936 × 1536, 933 MB) in four slices of
 * ~233 MB keeps that load-time peak to one slice.
 */
export const LM_HEAD_SLICE_BYTES = 256 * 1024 * 1024;

/** Symbolic dimension names (those transformers.js / onnx-community exports use). */
export const DIMS = {
  batch: "batch_size",
  seq: "sequence_length",
  past: "past_sequence_length",
  total: "total_sequence_length",
  /** The append graph's logits rows (its `logits_to_keep` input). */
  keep: "logits_to_keep",
} as const;

/** Position-derived tensors shared by all layers. */
interface AttentionInputs {
  /** [B, 1, S, hd] in the float type. */
  cos: Value;
  sin: Value;
  /**
   * Additive mask [B, 1, groups·S, T] float32 (the [B, 1, S, T] mask repeated for each query head of a KV
   * head): 0 where attending is allowed, float32 min elsewhere.
   */
  bias: Value;
}

/**
 * M-RoPE cos/sin: `inv_freq ⊗ position_ids` per axis ([3, B, S, hd/2]); the last dim is split by
 * `mrope_section` and chunk i comes from axis i (t, h, w); duplicated to hd like `cat(freqs, freqs)`.
 */
function mropeCosSin(e: ModuleEmitter, positionIds: Value, cfg: DecoderConfig): { cos: Value; sin: Value } {
  const g = e.g;
  return g.within("model/rotary_emb", () => {
    const invFreq = g.constant("float32", ropeInvFreq(cfg.rope_theta, cfg.head_dim));
    const pos = g.op("Unsqueeze", [g.op("Cast", [positionIds], { to: 1 }), g.i64([-1])]); // [3,B,S,1]
    const freqs = g.op("Mul", [pos, invFreq]); // [3,B,S,hd/2]
    const parts: Value[] = [];
    let off = 0;
    cfg.mrope_section.forEach((len, axis) => {
      if (len === 0) return;
      parts.push(g.op("Slice", [freqs, g.i64([axis, off]), g.i64([axis + 1, off + len]), g.i64([0, 3])]));
      off += len;
    });
    const sel = g.op("Squeeze", [parts.length === 1 ? parts[0]! : g.op("Concat", parts, { axis: -1 }), g.i64([0])]); // [B,S,hd/2]
    const emb = g.op("Unsqueeze", [g.op("Concat", [sel, sel], { axis: -1 }), g.i64([1])]); // [B,1,S,hd]
    return { cos: e.fromF32(g.op("Cos", [emb])), sin: e.fromF32(g.op("Sin", [emb])) };
  });
}

/**
 * The additive attention mask: key j is visible to query i (absolute position past+i) iff j ≤ past+i
 * and attention_mask[b, j] = 1. Masked entries get float32 min (not −inf), as transformers does, so a
 * fully padded query row stays finite.
 */
function attentionBias(e: ModuleEmitter, attentionMask: Value, inputsEmbeds: Value, groups: number): Value {
  const g = e.g;
  return g.within("model/causal_mask", () => {
    const total = g.op("Squeeze", [g.op("Shape", [attentionMask], { start: 1, end: 2 }), g.i64([0])]);
    const seq = g.op("Squeeze", [g.op("Shape", [inputsEmbeds], { start: 1, end: 2 }), g.i64([0])]);
    const past = g.op("Sub", [total, seq]);
    const one = g.i64Scalar(1);
    const qPos = g.op("Unsqueeze", [g.op("Range", [past, total, one]), g.i64([1])]); // [S,1]
    const kPos = g.op("Unsqueeze", [g.op("Range", [g.i64Scalar(0), total, one]), g.i64([0])]); // [1,T]
    const causal = g.op("LessOrEqual", [kPos, qPos]); // [S,T]
    const padding = g.op("Unsqueeze", [g.op("Cast", [attentionMask], { to: 9 }), g.i64([1, 2])]); // [B,1,1,T]
    const allowed = g.op("And", [causal, padding]); // [B,1,S,T]
    const bias = g.op("Where", [allowed, g.f32Scalar(0), g.f32Scalar(F32_MIN)]);
    // Rows in the order of the grouped queries (group-major, then position); broadcast over kv heads.
    return groups === 1 ? bias : g.op("Tile", [bias, g.i64([1, 1, groups, 1])]);
  });
}

/**
 * The Linears of one input (q/k/v, gate/up): one MatMulNBits for weight-only int8/int4, where a kernel call per
 * step is what they cost apart (int4 2B, 2 cores: decode −3…5%, prefill unchanged); separate for float and
 * W8A8 graphs, whose prefill the fused width made slower (W8A8: +15%: a [S, 17920] product plus its Split).
 */
function projections(e: ModuleEmitter, x: Value, modules: string[], opts: LinearOptions, w8a8: boolean): Value[] {
  return e.quant !== undefined && !w8a8 ? e.linears(x, modules, opts) : modules.map((m) => e.linear(x, m, opts));
}

/**
 * `model.layers.N.self_attn`; returns the attention output and the layer's K/V outputs: `present.{i}.*`
 * (past + new), or with `append` only the new tokens' `new_key_values.{i}.*`.
 */
function selfAttention(e: ModuleEmitter, x: Value, i: number, cfg: DecoderConfig, at: AttentionInputs, pastK: Value, pastV: Value, w8a8: boolean, append: boolean) {
  const g = e.g;
  const p = `model.layers.${i}.self_attn`;
  const nH = cfg.num_attention_heads;
  const kvH = cfg.num_key_value_heads;
  const hd = cfg.head_dim;
  const lin = { int8Dynamic: w8a8, ...(w8a8 ? { quantize: false } : {}) };
  const [q, k, v] = projections(e, x, [`${p}.q_proj`, `${p}.k_proj`, `${p}.v_proj`], { bias: true, ...lin }, w8a8) as [Value, Value, Value];
  return g.within(p, () => {
    // [B,S,heads·hd] → [B,heads,S,hd]
    const heads = (t: Value, n: number) => g.op("Transpose", [g.op("Reshape", [t, g.i64([0, 0, n, hd])])], { perm: [0, 2, 1, 3] });
    const qr = e.rotary(heads(q, nH), at.cos, at.sin, hd);
    const kr = e.rotary(heads(k, kvH), at.cos, at.sin, hd);
    const vh = heads(v, kvH);
    // GQA without copying K/V: the query heads of each KV head as one [groups·S, hd] matrix against that
    // head's K/V ([B, kvH, T, hd], used as they are — K's transpose folds into the MatMul).
    const qg = g.op("Reshape", [qr, g.i64([0, kvH, -1, hd])]); // [B,kvH,groups·S,hd]
    const scoresOf = (keys: Value) => g.op("MatMul", [qg, g.op("Transpose", [keys], { perm: [0, 1, 3, 2] })]);
    const softmax = (raw: Value) => {
      const scores = g.op("Div", [raw, e.constant([Math.sqrt(hd)], [])]);
      return e.fromF32(g.op("Softmax", [g.op("Add", [e.toF32(scores), at.bias])], { axis: -1 }));
    };
    let ctx: Value; // [B,kvH,groups·S,hd]
    let kvOut: [Value, Value];
    if (append) {
      // Keys are [C cache slots | S new]: the scores side by side, the context as the sum of both parts.
      const probs = softmax(g.op("Concat", [scoresOf(pastK), scoresOf(kr)], { axis: -1 }));
      const C = g.op("Shape", [pastK], { start: 2, end: 3 });
      const cached = g.op("MatMul", [g.op("Slice", [probs, g.i64([0]), C, g.i64([-1])]), pastV]);
      const fresh = g.op("MatMul", [g.op("Slice", [probs, C, g.i64([Number.MAX_SAFE_INTEGER]), g.i64([-1])]), vh]);
      ctx = g.op("Add", [cached, fresh]);
      kvOut = [kr, vh];
    } else {
      // Named as the graph outputs: no Identity copy of the whole cache per layer and step.
      const [presentK] = g.node("Concat", [pastK, kr], { axis: 2 }, { outputs: [`present.${i}.key`] }) as [Value];
      const [presentV] = g.node("Concat", [pastV, vh], { axis: 2 }, { outputs: [`present.${i}.value`] }) as [Value];
      ctx = g.op("MatMul", [softmax(scoresOf(presentK)), presentV]);
      kvOut = [presentK, presentV];
    }
    const merged = g.op("Reshape", [
      g.op("Transpose", [g.op("Reshape", [ctx, g.i64([0, nH, -1, hd])])], { perm: [0, 2, 1, 3] }),
      g.i64([0, 0, nH * hd]),
    ]);
    const out = e.linear(merged, `${p}.o_proj`, { bias: false, ...lin });
    return { out, kv: kvOut };
  });
}

/** Activation functions of the text MLP (config `hidden_act`). */
function textAct(e: ModuleEmitter, x: Value, act: string): Value {
  const g = e.g;
  if (act === "silu" || act === "swish") return g.op("Mul", [x, g.op("Sigmoid", [x])]);
  throw new ConvertError("unsupported", `hidden_act ${JSON.stringify(act)} is not supported (silu)`);
}

/** `model.layers.N.mlp`: down_proj(act(gate_proj(x)) · up_proj(x)). */
function mlp(e: ModuleEmitter, x: Value, i: number, cfg: DecoderConfig, w8a8: boolean): Value {
  const p = `model.layers.${i}.mlp`;
  const lin = { int8Dynamic: w8a8, ...(w8a8 ? { quantize: false } : {}) };
  const [gate, up] = projections(e, x, [`${p}.gate_proj`, `${p}.up_proj`], { bias: false, ...lin }, w8a8) as [Value, Value];
  const h = e.g.within(p, () => e.g.op("Mul", [textAct(e, gate, cfg.hidden_act), up]));
  return e.linear(h, `${p}.down_proj`, { bias: false, ...lin });
}

/** Builds the decoder graph into `e.g`. */
export function buildDecoder(e: ModuleEmitter, cfg: DecoderConfig, opts: DecoderOptions = {}): void {
  const g = e.g;
  const { batch, seq, past, total } = DIMS;
  const H = cfg.hidden_size;
  if (cfg.num_attention_heads % cfg.num_key_value_heads !== 0) {
    throw new ConvertError("unsupported", `num_attention_heads ${cfg.num_attention_heads} is not a multiple of num_key_value_heads ${cfg.num_key_value_heads}`);
  }
  if (cfg.hidden_act !== "silu" && cfg.hidden_act !== "swish") {
    throw new ConvertError("unsupported", `hidden_act ${JSON.stringify(cfg.hidden_act)} is not supported (silu)`);
  }
  const inputsEmbeds = g.input("inputs_embeds", e.float, [batch, seq, H]);
  const attentionMask = g.input("attention_mask", "int64", [batch, total]);
  const positionIds = g.input("position_ids", "int64", [3, batch, seq]);
  const pastKV: Array<[Value, Value]> = [];
  for (let i = 0; i < cfg.num_hidden_layers; i++) {
    const shape = [batch, cfg.num_key_value_heads, past, cfg.head_dim];
    pastKV.push([g.input(`past_key_values.${i}.key`, e.float, shape), g.input(`past_key_values.${i}.value`, e.float, shape)]);
  }

  const { cos, sin } = mropeCosSin(e, positionIds, cfg);
  const at: AttentionInputs = { cos, sin, bias: attentionBias(e, attentionMask, inputsEmbeds, cfg.num_attention_heads / cfg.num_key_value_heads) };

  // Residual stream: each RMSNorm after a residual add is one fused SkipSimplifiedLayerNormalization (float32
  // graphs); `pending` is the branch output not yet added to `h`.
  let h = inputsEmbeds;
  let pending: Value | null = null;
  const addNorm = (module: string, scope: string): Value => {
    if (pending === null) return e.rmsNormFused(h, module, cfg.rms_norm_eps);
    const r = e.skipRmsNorm(h, pending, module, cfg.rms_norm_eps, scope);
    h = r.sum;
    pending = null;
    return r.normed;
  };
  const append = (opts.kvCache ?? "present") === "append";
  const kvOuts: Array<[Value, Value]> = [];
  for (let i = 0; i < cfg.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    const normed = addNorm(`${p}.input_layernorm`, `model.layers.${i - 1}`);
    const attn = selfAttention(e, normed, i, cfg, at, pastKV[i]![0], pastKV[i]![1], opts.w8a8 ?? false, append);
    kvOuts.push(attn.kv);
    pending = attn.out;
    const normed2 = addNorm(`${p}.post_attention_layernorm`, p);
    pending = mlp(e, normed2, i, cfg, opts.w8a8 ?? false);
  }
  h = g.within(`model.layers.${cfg.num_hidden_layers - 1}`, () => g.op("Add", [h, pending!]));
  const lastOnly = opts.lastLogitsOnly ?? true;
  // The norm and LM head are per position: slicing first keeps [S, vocab] from ever existing. The append
  // graph takes how many of the last positions to keep (`logits_to_keep`, 1 for a decode step or a prefill;
  // 1 + the draft's length to verify a speculative draft in one pass).
  const keep = lastOnly && append ? g.input("logits_to_keep", "int64", [1]) : null;
  if (lastOnly) {
    const start = keep ? g.within("model", () => g.op("Neg", [keep])) : g.i64([-1]);
    h = g.within("model", () => g.op("Slice", [h, start, g.i64([Number.MAX_SAFE_INTEGER]), g.i64([1])]));
  }
  h = e.rmsNormFused(h, "model.norm", cfg.rms_norm_eps);
  const head = opts.lmHead ?? "nbits";
  const logits = e.linear(h, "lm_head", {
    bias: false,
    quantize: head === "nbits",
    int8Dynamic: head === "w8a8",
    maxSliceBytes: opts.lmHeadSliceBytes ?? LM_HEAD_SLICE_BYTES,
    ...(cfg.tie_word_embeddings ? { weight: "model.embed_tokens.weight" } : {}),
  });
  g.output(logits, "logits", e.float, [batch, keep ? DIMS.keep : lastOnly ? 1 : seq, cfg.vocab_size]);
  const [prefix, len] = append ? ["new_key_values", seq] : ["present", total];
  kvOuts.forEach(([k, v], i) => {
    const shape = [batch, cfg.num_key_value_heads, len, cfg.head_dim];
    g.output(k, `${prefix}.${i}.key`, e.float, shape);
    g.output(v, `${prefix}.${i}.value`, e.float, shape);
  });
}

/**
 * Configs other than the golden one (hold-out safety): an independent float64 reference of the
 * Qwen2-VL forward pass, first validated against the golden transformers outputs, then compared with
 * converted checkpoints of other shapes — BF16 storage, untied LM head, MHA and GQA ratios, other head
 * dims and M-RoPE sections, a different vision activation, and multi-frame grids (attention per frame).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import { CheckpointWeights, type Qwen2VLConfig, makeTestModel, readQwen2VLConfig } from "../../gpu-backend/src/checkpoint/index.ts";
import { convertModel } from "../../gpu-backend/src/convert/index.ts";
import { GOLDEN_DIR, loadGoldenCase, loadGoldenF32 } from "../support/golden.ts";
import { QwenOnnx, maxAbsDiff } from "./convert-support.ts";

const TINY = join(GOLDEN_DIR, "tiny-a");
const tmp = mkdtempSync(join(tmpdir(), "convert-variants-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

type Weights = (name: string) => Float32Array;

async function loadWeights(dir: string): Promise<Weights> {
  const ck = await CheckpointWeights.open(dir);
  const map = new Map<string, Float32Array>();
  for (const n of ck.names()) map.set(n, await ck.readF32(n));
  await ck.close();
  return (n) => {
    const w = map.get(n);
    if (!w) throw new Error(`no tensor ${n}`);
    return w;
  };
}

// ----------------------------------------------------------------------------------------------------
// float64 reference (written from transformers v4.46.1's modeling_qwen2_vl.py semantics)

/** y[r] = x[r]·Wᵀ (+ b); W [out, in]. */
function linear(x: Float64Array, rows: number, w: Float32Array, b?: Float32Array): Float64Array {
  const inF = x.length / rows;
  const outF = w.length / inF;
  const y = new Float64Array(rows * outF);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o]! : 0;
      for (let i = 0; i < inF; i++) s += x[r * inF + i]! * w[o * inF + i]!;
      y[r * outF + o] = s;
    }
  }
  return y;
}

function layerNorm(x: Float64Array, dim: number, w: Float32Array, b: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let r = 0; r < x.length / dim; r++) {
    let mean = 0;
    for (let i = 0; i < dim; i++) mean += x[r * dim + i]!;
    mean /= dim;
    let v = 0;
    for (let i = 0; i < dim; i++) v += (x[r * dim + i]! - mean) ** 2;
    const inv = 1 / Math.sqrt(v / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = (x[r * dim + i]! - mean) * inv * w[i]! + b[i]!;
  }
  return y;
}

function rmsNorm(x: Float64Array, dim: number, w: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let r = 0; r < x.length / dim; r++) {
    let ms = 0;
    for (let i = 0; i < dim; i++) ms += x[r * dim + i]! ** 2;
    const inv = 1 / Math.sqrt(ms / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = x[r * dim + i]! * inv * w[i]!;
  }
  return y;
}

/** erf with |error| < 1e-12 (Taylor series near 0, continued fraction of erfc beyond). */
function erf(x: number): number {
  const a = Math.abs(x);
  if (a < 2.5) {
    let term = a;
    let sum = a;
    for (let n = 1; n < 60; n++) {
      term *= (-a * a) / n;
      sum += term / (2 * n + 1);
    }
    return Math.sign(x) * ((2 / Math.sqrt(Math.PI)) * sum);
  }
  let f = 0;
  for (let n = 60; n >= 1; n--) f = n / 2 / (a + f);
  return Math.sign(x) * (1 - Math.exp(-a * a) / Math.sqrt(Math.PI) / (a + f));
}

const ACT: Record<string, (v: number) => number> = {
  quick_gelu: (v) => v / (1 + Math.exp(-1.702 * v)),
  gelu: (v) => 0.5 * v * (1 + erf(v / Math.SQRT2)),
  silu: (v) => v / (1 + Math.exp(-v)),
};

/** q·cos + rotate_half(q)·sin for one head vector, angles per dim. */
function rope(v: Float64Array, off: number, hd: number, angle: (j: number) => number): void {
  const half = hd / 2;
  const src = v.slice(off, off + hd);
  for (let j = 0; j < hd; j++) {
    const rot = j < half ? -src[j + half]! : src[j - half]!;
    const a = angle(j);
    v[off + j] = src[j]! * Math.cos(a) + rot * Math.sin(a);
  }
}

/** Softmax attention of query rows over allowed key rows; q/k/v as [rows, heads·hd]. */
function attend(q: Float64Array, k: Float64Array, v: Float64Array, rows: number, heads: number, kvHeads: number, hd: number, allowed: (i: number, j: number) => boolean): Float64Array {
  const out = new Float64Array(rows * heads * hd);
  const groups = heads / kvHeads;
  for (let h = 0; h < heads; h++) {
    const kh = Math.floor(h / groups);
    for (let i = 0; i < rows; i++) {
      const scores: number[] = [];
      const idx: number[] = [];
      for (let j = 0; j < rows; j++) {
        if (!allowed(i, j)) continue;
        let s = 0;
        for (let d = 0; d < hd; d++) s += q[i * heads * hd + h * hd + d]! * k[j * kvHeads * hd + kh * hd + d]!;
        scores.push(s / Math.sqrt(hd));
        idx.push(j);
      }
      const m = Math.max(...scores);
      const e = scores.map((s) => Math.exp(s - m));
      const z = e.reduce((a, b) => a + b, 0);
      for (let t = 0; t < idx.length; t++) {
        const o = i * heads * hd + h * hd;
        for (let d = 0; d < hd; d++) out[o + d] = out[o + d]! + (e[t]! / z) * v[idx[t]! * kvHeads * hd + kh * hd + d]!;
      }
    }
  }
  return out;
}

/** The vision tower: pixel rows [N, C·T·P·P] in merge-window order → merged features [N/m², H]. */
function refVision(cfg: Qwen2VLConfig["vision"], W: Weights, pv: Float32Array, grid: [number, number, number][]): Float64Array {
  const E = cfg.embed_dim;
  const hd = cfg.head_dim;
  const m = cfg.spatial_merge_size;
  const N = grid.reduce((s, [t, h, w]) => s + t * h * w, 0);
  let x = linear(Float64Array.from(pv), N, W("visual.patch_embed.proj.weight"));
  const hpos: number[] = [];
  const wpos: number[] = [];
  const frame: number[] = [];
  let f = 0;
  for (const [t, h, w] of grid) {
    for (let ti = 0; ti < t; ti++, f++) {
      for (let bh = 0; bh < h / m; bh++) for (let bw = 0; bw < w / m; bw++) for (let ih = 0; ih < m; ih++) for (let iw = 0; iw < m; iw++) {
        hpos.push(bh * m + ih);
        wpos.push(bw * m + iw);
        frame.push(f);
      }
    }
  }
  const dim = hd / 2;
  const inv = Array.from({ length: dim / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / dim));
  const angle = (n: number) => (j: number) => {
    const r = j % dim;
    return r < dim / 2 ? hpos[n]! * inv[r]! : wpos[n]! * inv[r - dim / 2]!;
  };
  for (let i = 0; i < cfg.depth; i++) {
    const p = `visual.blocks.${i}`;
    const ln = layerNorm(x, E, W(`${p}.norm1.weight`), W(`${p}.norm1.bias`), cfg.layer_norm_eps);
    const qkv = linear(ln, N, W(`${p}.attn.qkv.weight`), W(`${p}.attn.qkv.bias`));
    const q = new Float64Array(N * E);
    const k = new Float64Array(N * E);
    const v = new Float64Array(N * E);
    for (let n = 0; n < N; n++) {
      q.set(qkv.subarray(n * 3 * E, n * 3 * E + E), n * E);
      k.set(qkv.subarray(n * 3 * E + E, n * 3 * E + 2 * E), n * E);
      v.set(qkv.subarray(n * 3 * E + 2 * E, n * 3 * E + 3 * E), n * E);
      for (let h = 0; h < cfg.num_heads; h++) {
        rope(q, n * E + h * hd, hd, angle(n));
        rope(k, n * E + h * hd, hd, angle(n));
      }
    }
    const a = attend(q, k, v, N, cfg.num_heads, cfg.num_heads, hd, (r, c) => frame[r] === frame[c]);
    const proj = linear(a, N, W(`${p}.attn.proj.weight`), W(`${p}.attn.proj.bias`));
    x = x.map((val, j) => val + proj[j]!);
    const h1 = linear(layerNorm(x, E, W(`${p}.norm2.weight`), W(`${p}.norm2.bias`), cfg.layer_norm_eps), N, W(`${p}.mlp.fc1.weight`), W(`${p}.mlp.fc1.bias`)).map(ACT[cfg.hidden_act]!);
    const h2 = linear(h1, N, W(`${p}.mlp.fc2.weight`), W(`${p}.mlp.fc2.bias`));
    x = x.map((val, j) => val + h2[j]!);
  }
  const ln = layerNorm(x, E, W("visual.merger.ln_q.weight"), W("visual.merger.ln_q.bias"), cfg.layer_norm_eps);
  const rows = N / (m * m);
  const h0 = linear(ln, rows, W("visual.merger.mlp.0.weight"), W("visual.merger.mlp.0.bias")).map(ACT["gelu"]!);
  return linear(h0, rows, W("visual.merger.mlp.2.weight"), W("visual.merger.mlp.2.bias"));
}

/** The language model without cache: inputs_embeds [S, H], position ids [3][S] → logits of the last position. */
function refText(cfg: Qwen2VLConfig["text"], W: Weights, embeds: Float64Array, pos: number[][]): Float64Array {
  const H = cfg.hidden_size;
  const S = embeds.length / H;
  const hd = cfg.head_dim;
  const nH = cfg.num_attention_heads;
  const kvH = cfg.num_key_value_heads;
  const inv = Array.from({ length: hd / 2 }, (_, i) => 1 / cfg.rope_theta ** ((2 * i) / hd));
  const sectionAxis: number[] = [];
  cfg.mrope_section.forEach((len, axis) => {
    for (let i = 0; i < len; i++) sectionAxis.push(axis);
  });
  const angle = (s: number) => (j: number) => {
    const i = j % (hd / 2);
    return pos[sectionAxis[i]!]![s]! * inv[i]!;
  };
  let x = Float64Array.from(embeds);
  for (let l = 0; l < cfg.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    const xn = rmsNorm(x, H, W(`${p}.input_layernorm.weight`), cfg.rms_norm_eps);
    const q = linear(xn, S, W(`${p}.self_attn.q_proj.weight`), W(`${p}.self_attn.q_proj.bias`));
    const k = linear(xn, S, W(`${p}.self_attn.k_proj.weight`), W(`${p}.self_attn.k_proj.bias`));
    const v = linear(xn, S, W(`${p}.self_attn.v_proj.weight`), W(`${p}.self_attn.v_proj.bias`));
    for (let s = 0; s < S; s++) {
      for (let h = 0; h < nH; h++) rope(q, (s * nH + h) * hd, hd, angle(s));
      for (let h = 0; h < kvH; h++) rope(k, (s * kvH + h) * hd, hd, angle(s));
    }
    const a = attend(q, k, v, S, nH, kvH, hd, (i, j) => j <= i);
    const o = linear(a, S, W(`${p}.self_attn.o_proj.weight`));
    x = x.map((val, j) => val + o[j]!);
    const x2 = rmsNorm(x, H, W(`${p}.post_attention_layernorm.weight`), cfg.rms_norm_eps);
    const gate = linear(x2, S, W(`${p}.mlp.gate_proj.weight`)).map(ACT["silu"]!);
    const up = linear(x2, S, W(`${p}.mlp.up_proj.weight`));
    const d = linear(gate.map((g, j) => g * up[j]!), S, W(`${p}.mlp.down_proj.weight`));
    x = x.map((val, j) => val + d[j]!);
  }
  const last = rmsNorm(x.subarray((S - 1) * H), H, W("model.norm.weight"), cfg.rms_norm_eps);
  return linear(last, 1, W(cfg.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"));
}

function embedRows(W: Weights, ids: number[], H: number): Float64Array {
  const e = W("model.embed_tokens.weight");
  const out = new Float64Array(ids.length * H);
  ids.forEach((id, s) => {
    for (let i = 0; i < H; i++) out[s * H + i] = e[id * H + i]!;
  });
  return out;
}

// ----------------------------------------------------------------------------------------------------

describe("the float64 reference reproduces the golden transformers outputs (so it can judge other configs)", () => {
  it("vision (two images) and text prefill of config A", async () => {
    const cfg = await readQwen2VLConfig(TINY);
    const W = await loadWeights(TINY);
    const c5 = loadGoldenCase("case_05");
    const feats = refVision(cfg.vision, W, loadGoldenF32(c5.pixel_values!.file), c5.image_grid_thw!);
    expect(maxAbsDiff(feats, loadGoldenF32(c5.image_embeds!.file))).toBeLessThan(5e-6);
    const c4 = loadGoldenCase("case_04");
    const logits = refText(cfg.text, W, embedRows(W, c4.input_ids, 64), c4.position_ids);
    expect(maxAbsDiff(logits, loadGoldenF32(c4.prefill_logits.file))).toBeLessThan(5e-6);
  });
});

/** Deterministic values in [-a, a). */
function pseudo(n: number, seed: number, a: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s / 2 ** 31 - 1) * a;
  });
}

const VARIANTS: Array<[string, (c: Record<string, any>) => void, "f32" | "bf16"]> = [
  [
    "bf16, untied lm_head, GQA 3:1, head_dim 32, mrope [4,6,6], vision gelu / head_dim 16 / mlp_ratio 2",
    (c) => {
      Object.assign(c, { hidden_size: 96, num_attention_heads: 3, num_key_value_heads: 1, num_hidden_layers: 3, intermediate_size: 160, rms_norm_eps: 1e-5, tie_word_embeddings: false, torch_dtype: "bfloat16" });
      c["rope_scaling"] = { type: "default", rope_type: "default", mrope_section: [4, 6, 6] };
      Object.assign(c["vision_config"], { embed_dim: 48, num_heads: 3, depth: 1, mlp_ratio: 2, hidden_size: 96, hidden_act: "gelu" });
    },
    "bf16",
  ],
  [
    "MHA (kv heads = heads), mrope [4,2,2], rope_theta 1e4, vision silu",
    (c) => {
      Object.assign(c, { num_key_value_heads: 4, rope_theta: 10000 });
      c["rope_scaling"] = { type: "mrope", mrope_section: [4, 2, 2] };
      Object.assign(c["vision_config"], { hidden_act: "silu" });
    },
    "f32",
  ],
];

describe.each(VARIANTS)("variant: %s", (label, edit, dtype) => {
  it("vision (incl. a 2-frame grid), prefill and KV decode match the reference", async () => {
    const slug = label.replace(/[^a-z0-9]+/gi, "-").slice(0, 20);
    const cfgJson = JSON.parse(readFileSync(join(TINY, "config.json"), "utf8"));
    edit(cfgJson);
    const cfgPath = join(tmp, `${slug}.json`);
    writeFileSync(cfgPath, JSON.stringify(cfgJson));
    const ckpt = join(tmp, `${slug}-ckpt`);
    await makeTestModel({ configPath: cfgPath, outDir: ckpt, dtype });
    const out = join(tmp, `${slug}-onnx`);
    const res = await convertModel({ model: ckpt, outDir: out });
    const cfg = await readQwen2VLConfig(ckpt);
    const W = await loadWeights(ckpt);
    const model = await QwenOnnx.load(out, res.manifest.decoder);
    try {
      // Vision: an image 4×6 patches plus a 2-frame 2×4 grid (attention must stay inside each frame).
      const grid: [number, number, number][] = [
        [1, 4, 6],
        [2, 2, 4],
      ];
      const N = 24 + 16;
      const pv = pseudo(N * 1176, 11, 2);
      const vis = await model.vision.run({
        pixel_values: model.floatTensor(pv, [N, 1176]),
        grid_thw: new ort.Tensor("int64", BigInt64Array.from(grid.flat().map(BigInt)), [2, 3]),
      });
      const feats = QwenOnnx.floats(vis["image_features"]!);
      expect(vis["image_features"]!.dims).toEqual([N / 4, cfg.text.hidden_size]);
      expect(maxAbsDiff(feats, refVision(cfg.vision, W, pv, grid))).toBeLessThan(1e-4);

      // Text: distinct t/h/w positions (as inside an image), then 3 cached decode steps.
      const H = cfg.text.hidden_size;
      const ids = [151644, 872, 198, 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198];
      const pos = [ids.map((_, s) => s), ids.map((_, s) => s + (s % 3)), ids.map((_, s) => s + (s % 5))];
      const S = ids.length;
      const embeds = await model.embedTokens(ids, 1);
      expect(maxAbsDiff(embeds, embedRows(W, ids, H))).toBe(0);
      let { logits, present } = await model.decode(embeds, 1, S, new Array(S).fill(1), pos.flat(), model.emptyPast(1));
      expect(maxAbsDiff(logits, refText(cfg.text, W, embedRows(W, ids, H), pos))).toBeLessThan(1e-4);
      const next = [13708, 766, 397];
      for (let k = 0; k < next.length; k++) {
        const p = S + 4 + k;
        ids.push(next[k]!);
        for (const axis of pos) axis.push(p);
        ({ logits, present } = await model.decode(await model.embedTokens([next[k]!], 1), 1, 1, new Array(ids.length).fill(1), [p, p, p], present));
        expect(maxAbsDiff(logits, refText(cfg.text, W, embedRows(W, ids, H), pos))).toBeLessThan(1e-4);
      }
    } finally {
      await model.release();
    }
  });
});

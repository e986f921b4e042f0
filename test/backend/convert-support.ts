/**
 * Test harness for converted Qwen2-VL ONNX folders: loads the three graphs with onnxruntime and runs the
 * golden cases the way a serving loop does (vision → embed → scatter image rows → prefill → KV decode).
 */
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { float16Bytes } from "../../gpu-backend/src/convert/common.ts";
import { type GoldenCase, loadGoldenF32 } from "../support/golden.ts";

export const IMAGE_PAD_ID = 151655;

/** float16 bits → float32 values. */
export function f16ToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i]!;
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    out[i] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return out;
}

/** Indices of the k largest values, best first. */
export function topK(v: Float32Array, k: number): number[] {
  const best: number[] = [];
  for (let i = 0; i < v.length; i++) {
    if (best.length < k || v[i]! > v[best[best.length - 1]!]!) {
      let j = best.length < k ? best.length : k - 1;
      while (j > 0 && v[best[j - 1]!]! < v[i]!) {
        best[j] = best[j - 1]!;
        j--;
      }
      best[j] = i;
    }
  }
  return best;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

const i64 = (v: number[], dims: number[]) => new ort.Tensor("int64", BigInt64Array.from(v.map(BigInt)), dims);

/** The three sessions of a converted folder plus the decoder's cache geometry. */
export class QwenOnnx {
  private constructor(
    readonly vision: ort.InferenceSession,
    readonly embed: ort.InferenceSession,
    readonly decoder: ort.InferenceSession,
    readonly fp16: boolean,
    readonly layers: number,
    readonly kvHeads: number,
    readonly headDim: number,
    readonly hidden: number,
  ) {}

  static async load(dir: string, m: { num_hidden_layers: number; num_key_value_heads: number; head_dim: number; hidden_size: number }, fp16 = false) {
    const opts: ort.InferenceSession.SessionOptions = { intraOpNumThreads: 1, interOpNumThreads: 1 };
    const [v, e, d] = await Promise.all(
      ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"].map((f) => ort.InferenceSession.create(join(dir, f), opts)),
    );
    return new QwenOnnx(v!, e!, d!, fp16, m.num_hidden_layers, m.num_key_value_heads, m.head_dim, m.hidden_size);
  }

  async release(): Promise<void> {
    await Promise.all([this.vision.release(), this.embed.release(), this.decoder.release()]);
  }

  /** A float tensor in the graphs' I/O type. */
  floatTensor(v: Float32Array, dims: number[]): ort.Tensor {
    if (!this.fp16) return new ort.Tensor("float32", v, dims);
    const b = float16Bytes(v);
    return new ort.Tensor("float16", new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2), dims);
  }

  /** A float output as float32. */
  static floats(t: ort.Tensor): Float32Array {
    return t.type === "float16" ? f16ToF32(t.data as Uint16Array) : (t.data as Float32Array);
  }

  async imageFeatures(c: GoldenCase): Promise<{ data: Float32Array; dims: readonly number[] }> {
    const pv = loadGoldenF32(c.pixel_values!.file);
    const grid = c.image_grid_thw!;
    const out = await this.vision.run({ pixel_values: this.floatTensor(pv, c.pixel_values!.shape), grid_thw: i64(grid.flat(), [grid.length, 3]) });
    const t = out["image_features"]!;
    return { data: QwenOnnx.floats(t), dims: t.dims };
  }

  /** inputs_embeds [S, H] of a case with the vision rows scattered into the image-pad positions. */
  async promptEmbeds(c: GoldenCase): Promise<Float32Array> {
    const H = this.hidden;
    const out = await this.embed.run({ input_ids: i64(c.input_ids, [1, c.seq_len]) });
    const embeds = Float32Array.from(QwenOnnx.floats(out["inputs_embeds"]!));
    if (c.pixel_values) {
      const img = (await this.imageFeatures(c)).data;
      let r = 0;
      c.input_ids.forEach((id, s) => {
        if (id === IMAGE_PAD_ID) embeds.set(img.subarray(r * H, ++r * H), s * H);
      });
      if (r * H !== img.length) throw new Error(`${c.case}: ${r} image pads for ${img.length / H} feature rows`);
    }
    return embeds;
  }

  emptyPast(batch: number): Record<string, ort.Tensor> {
    const past: Record<string, ort.Tensor> = {};
    for (let i = 0; i < this.layers; i++) {
      for (const kv of ["key", "value"]) past[`past_key_values.${i}.${kv}`] = this.floatTensor(new Float32Array(0), [batch, this.kvHeads, 0, this.headDim]);
    }
    return past;
  }

  /**
   * One decoder call. `embeds` [B·S·H], `mask` [B·T], `positions` [3·B·S]; returns logits (as float32)
   * and the present tensors renamed as the next call's past.
   */
  async decode(embeds: Float32Array, batch: number, seq: number, mask: number[], positions: number[], past: Record<string, ort.Tensor>) {
    const out = await this.decoder.run({
      inputs_embeds: this.floatTensor(embeds, [batch, seq, this.hidden]),
      attention_mask: i64(mask, [batch, mask.length / batch]),
      position_ids: i64(positions, [3, batch, seq]),
      ...past,
    });
    const next: Record<string, ort.Tensor> = {};
    for (let i = 0; i < this.layers; i++) {
      for (const kv of ["key", "value"]) next[`past_key_values.${i}.${kv}`] = out[`present.${i}.${kv}`]!;
    }
    return { logits: QwenOnnx.floats(out["logits"]!), logitsDims: out["logits"]!.dims, present: next };
  }

  async embedTokens(ids: number[], batch: number): Promise<Float32Array> {
    const out = await this.embed.run({ input_ids: i64(ids, [batch, ids.length / batch]) });
    return Float32Array.from(QwenOnnx.floats(out["inputs_embeds"]!));
  }

  /**
   * Prefill + teacher-forced decode of a golden case (batch 1): step 0 is the prefill, step k ≥ 1 feeds
   * `ids[k − 1]` at position seq_len + k − 1 + rope_deltas on all three axes. `onStep(step, logits)` gets
   * the last-position logits. `ids` defaults to the case's forced_decode ids (23 ids → 24 steps).
   */
  async forcedDecode(c: GoldenCase, onStep: (step: number, logits: Float32Array) => void, ids: number[] = c.forced_decode.forced_ids, steps = ids.length + 1): Promise<void> {
    const S = c.seq_len;
    const embeds = await this.promptEmbeds(c);
    let { logits, present } = await this.decode(embeds, 1, S, new Array(S).fill(1), c.position_ids.flat(), this.emptyPast(1));
    onStep(0, logits);
    for (let k = 1; k < steps; k++) {
      const token = ids[k - 1]!;
      const pos = S + (k - 1) + c.rope_deltas;
      const e = await this.embedTokens([token], 1);
      ({ logits, present } = await this.decode(e, 1, 1, new Array(S + k).fill(1), [pos, pos, pos], present));
      onStep(k, logits);
    }
  }
}

/**
 * The nodes of an ONNX file (`name`, `op_type`, `domain`), read with a minimal protobuf walker: ModelProto
 * field 7 = graph, GraphProto field 1 = node, NodeProto fields 3/4/7 = name/op_type/domain. Initializer data
 * is skipped, never decoded.
 */
export function onnxNodes(bytes: Uint8Array): Array<{ name: string; opType: string; domain: string }> {
  const varint = (b: Uint8Array, p: { i: number }): number => {
    let v = 0;
    let mul = 1;
    for (;;) {
      const x = b[p.i++]!;
      v += (x & 0x7f) * mul;
      if (x < 0x80) return v;
      mul *= 128;
    }
  };
  /** Calls `on(field, payload)` for each length-delimited field of a message. */
  const fields = (b: Uint8Array, on: (field: number, payload: Uint8Array) => void): void => {
    const p = { i: 0 };
    while (p.i < b.length) {
      const key = varint(b, p);
      const wire = key & 7;
      const field = Math.floor(key / 8);
      if (wire === 0) varint(b, p);
      else if (wire === 1) p.i += 8;
      else if (wire === 5) p.i += 4;
      else if (wire === 2) {
        const n = varint(b, p);
        on(field, b.subarray(p.i, p.i + n));
        p.i += n;
      } else throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  };
  const text = (b: Uint8Array) => Buffer.from(b).toString("utf8");
  const nodes: Array<{ name: string; opType: string; domain: string }> = [];
  fields(bytes, (f, graph) => {
    if (f !== 7) return;
    fields(graph, (g, node) => {
      if (g !== 1) return;
      const n = { name: "", opType: "", domain: "" };
      fields(node, (k, v) => {
        if (k === 3) n.name = text(v);
        else if (k === 4) n.opType = text(v);
        else if (k === 7) n.domain = text(v);
      });
      nodes.push(n);
    });
  });
  return nodes;
}

/**
 * The vision-language generation loop for one sequence, as transformers' Qwen2-VL `generate()` runs it:
 * vision encoder over all of the request's images in one call → token embeddings with the image features
 * scattered into the `<|image_pad|>` positions → M-RoPE positions (`get_rope_index`) → prefill → decode with
 * the KV cache, each new token at position `seq_len + k + rope_deltas` on all three axes.
 */
import * as ort from "onnxruntime-node";
import { f16ToF32 } from "../checkpoint/safetensors.ts";
import { float16Bytes } from "../convert/common.ts";
import type { LoadedModel } from "./model.ts";
import { getRopeIndex, type GridThw } from "./rope-index.ts";

/** A failure of one request inside the engine; `code` is a public API error code. */
export class GenerationError extends Error {
  readonly code: "invalid_request" | "context_length_exceeded" | "internal_error";
  constructor(code: GenerationError["code"], message: string) {
    super(message);
    this.name = "GenerationError";
    this.code = code;
  }
}

/** Thrown (as an AbortError) when the request's signal fires; the request's tensors are dropped at once. */
export class CancelledError extends Error {
  constructor() {
    super("generation cancelled");
    this.name = "AbortError";
  }
}

type FloatData = Float32Array | Uint16Array;

/** The prompt, its images and (optionally) their preprocessed pixels. */
export interface PromptInput {
  /** Expanded input ids (each image's `<|image_pad|>` already repeated t·h·w/merge² times). */
  inputIds: Int32Array;
  pixelValues?: Float32Array | null;
  gridThw?: GridThw[];
}

/** Timings of one sequence, milliseconds. */
export interface StepTimings {
  vision_ms: number;
  prefill_ms: number;
  /** Each decode step (embedding + decoder run) in order. */
  decode_ms: number[];
}

/** Logits rows as float32, whatever the graph's float type. */
function toF32(t: ort.Tensor): Float32Array {
  return t.type === "float16" ? f16ToF32(t.data as Uint16Array) : (t.data as Float32Array);
}

function i64(values: ArrayLike<number>, dims: number[]): ort.Tensor {
  const data = new BigInt64Array(values.length);
  for (let i = 0; i < values.length; i++) data[i] = BigInt(values[i]!);
  return new ort.Tensor("int64", data, dims);
}

/**
 * A live sequence: its KV cache and position state. `prefill` then `step` repeatedly; each returns the
 * logits for the next token (float32, length = vocab).
 */
export class Sequence {
  readonly seqLen: number;
  /** KV cache by past_key_values input name, each [1, kv_heads, fed, head_dim]. */
  past: Map<string, ort.Tensor> = new Map();
  private ropeDeltas = 0;
  /** Tokens in the KV cache (prompt + generated tokens fed back). */
  fed = 0;
  readonly timings: StepTimings = { vision_ms: 0, prefill_ms: 0, decode_ms: [] };

  constructor(
    private readonly model: LoadedModel,
    private readonly prompt: PromptInput,
    private readonly signal?: AbortSignal,
  ) {
    this.seqLen = prompt.inputIds.length;
    if (this.seqLen === 0) throw new GenerationError("invalid_request", "the prompt is empty");
    if (this.seqLen >= model.config.text.max_position_embeddings) {
      throw new GenerationError("context_length_exceeded", `the prompt is ${this.seqLen} tokens; the context is ${model.config.text.max_position_embeddings}`);
    }
  }

  private check(): void {
    if (this.signal?.aborted) {
      this.past.clear();
      throw new CancelledError();
    }
  }

  /** `embed_tokens` for ids → [1, n, H] data. */
  private async embed(ids: ArrayLike<number>): Promise<ort.Tensor> {
    const out = await this.model.sessions.embed.run({ input_ids: i64(ids, [1, ids.length]) });
    return out.inputs_embeds!;
  }

  /** Vision features for the prompt's images, [Σ tokens, H], or null without images. */
  private async vision(): Promise<ort.Tensor | null> {
    const grids = this.prompt.gridThw ?? [];
    if (grids.length === 0) return null;
    const pv = this.prompt.pixelValues;
    const rows = grids.reduce((n, [t, h, w]) => n + t * h * w, 0);
    const width = this.model.config.vision.in_channels * this.model.config.vision.temporal_patch_size * this.model.config.vision.patch_size ** 2;
    if (!pv || pv.length !== rows * width) {
      throw new GenerationError("invalid_request", `pixel values hold ${pv ? pv.length / width : 0} patches; the grids need ${rows}`);
    }
    const gridData = grids.flat();
    const t0 = performance.now();
    const pixels =
      this.model.ioFloatType === "float16"
        ? new ort.Tensor("float16", new Uint16Array(float16Bytes(pv).buffer), [rows, width])
        : new ort.Tensor("float32", pv, [rows, width]);
    const out = await this.model.sessions.vision.run({
      pixel_values: pixels,
      grid_thw: i64(gridData, [grids.length, 3]),
    });
    this.timings.vision_ms = performance.now() - t0;
    return out.image_features!;
  }

  /** Runs the decoder on `embeds` [1, n, H] at `positions` [3][n]; returns the last row of logits. */
  private async decode(embeds: ort.Tensor, positions: [ArrayLike<number>, ArrayLike<number>, ArrayLike<number>]): Promise<Float32Array> {
    const n = embeds.dims[1]!;
    const { num_hidden_layers: layers, num_key_value_heads: kv, head_dim: hd } = this.model.config.text;
    const pastLen = this.fed;
    const feeds: Record<string, ort.Tensor> = {
      inputs_embeds: embeds,
      attention_mask: i64(new Array(pastLen + n).fill(1), [1, pastLen + n]),
      position_ids: i64([...Array.from(positions[0]), ...Array.from(positions[1]), ...Array.from(positions[2])], [3, 1, n]),
    };
    const floatType = embeds.type as "float32" | "float16";
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        const name = `past_key_values.${i}.${kind}`;
        feeds[name] =
          this.past.get(name) ??
          new ort.Tensor(floatType, floatType === "float16" ? new Uint16Array(0) : new Float32Array(0), [1, kv, 0, hd]);
      }
    }
    const out = await this.model.sessions.decoder.run(feeds);
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) this.past.set(`past_key_values.${i}.${kind}`, out[`present.${i}.${kind}`]!);
    }
    this.fed += n;
    const logits = out.logits!;
    const vocab = logits.dims[2]!;
    const rows = logits.dims[1]!;
    return toF32(logits).subarray((rows - 1) * vocab, rows * vocab);
  }

  /** Vision + embeddings + positions + the prompt's forward pass: logits of the first generated token. */
  async prefill(): Promise<Float32Array> {
    this.check();
    const { inputIds } = this.prompt;
    const features = await this.vision();
    this.check();
    const t0 = performance.now();
    const embeds = await this.embed(inputIds);
    if (features) scatterImageFeatures(embeds, features, inputIds, this.model.meta.image_token_id);
    else if (inputIds.includes(this.model.meta.image_token_id)) {
      throw new GenerationError("invalid_request", "the prompt has image tokens but no image");
    }
    const rope = getRopeIndex(inputIds, {
      imageGridThw: this.prompt.gridThw ?? [],
      spatialMergeSize: this.model.config.vision.spatial_merge_size,
      imageTokenId: this.model.meta.image_token_id,
      videoTokenId: this.model.meta.video_token_id,
      visionStartTokenId: this.model.meta.vision_start_token_id,
    });
    this.ropeDeltas = rope.ropeDeltas;
    const logits = await this.decode(embeds, rope.positionIds);
    this.timings.prefill_ms = performance.now() - t0;
    return logits;
  }

  /** Position of the next token fed back: `seq_len + k + rope_deltas` for the k-th generated token. */
  nextPosition(): number {
    this.check();
    if (this.fed + 1 > this.model.config.text.max_position_embeddings) {
      throw new GenerationError("context_length_exceeded", "the context is full");
    }
    const k = this.fed - this.seqLen;
    return this.seqLen + k + this.ropeDeltas;
  }

  /** Feeds `tokenId` (the k-th generated token, k = 0, 1, …) and returns the next logits. */
  async step(tokenId: number): Promise<Float32Array> {
    const pos = this.nextPosition();
    const t0 = performance.now();
    const logits = await this.decode(await this.embed([tokenId]), [[pos], [pos], [pos]]);
    this.timings.decode_ms.push(performance.now() - t0);
    return logits;
  }

  /** Drops the KV cache (the request's memory) at once. */
  release(): void {
    this.past.clear();
  }
}

/** `masked_scatter`: image feature rows replace the `<|image_pad|>` embeddings, in order. */
export function scatterImageFeatures(embeds: ort.Tensor, features: ort.Tensor, ids: ArrayLike<number>, imageTokenId: number): void {
  const hidden = embeds.dims[2]!;
  const dst = embeds.data as FloatData;
  const src = features.data as FloatData;
  if (features.type !== embeds.type) throw new GenerationError("internal_error", "vision and text graphs disagree on the float type");
  const rows = src.length / hidden;
  let r = 0;
  for (let i = 0; i < ids.length; i++) {
    if (ids[i] !== imageTokenId) continue;
    if (r >= rows) break;
    dst.set(src.subarray(r * hidden, (r + 1) * hidden), i * hidden);
    r++;
  }
  let pads = 0;
  for (let i = 0; i < ids.length; i++) if (ids[i] === imageTokenId) pads++;
  if (pads !== rows) {
    throw new GenerationError("invalid_request", `the prompt has ${pads} image tokens but the images produce ${rows} features`);
  }
}

/** Top-k `[id, logit]` pairs of a logits row, highest first (ties → lower id). */
export function topK(logits: Float32Array, k: number): [number, number][] {
  const best: [number, number][] = [];
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i]!;
    if (best.length < k || v > best[best.length - 1]![1]) {
      let j = best.length < k ? best.length : k - 1;
      best[j] = [i, v];
      while (j > 0 && best[j - 1]![1] < v) {
        [best[j - 1], best[j]] = [best[j]!, best[j - 1]!];
        j--;
      }
    }
  }
  return best;
}

/**
 * One decode step for several sequences at once (continuous batching): their KV caches are left-padded to
 * the longest, padding masked out by `attention_mask`, each sequence at its own M-RoPE position. Returns the
 * next-token logits per sequence and moves each sequence's cache forward by one token.
 * Masked positions get exactly zero attention weight, so each row equals its single-sequence result up to
 * float summation order.
 */
export async function decodeBatch(model: LoadedModel, seqs: Sequence[], tokenIds: number[]): Promise<Float32Array[]> {
  const B = seqs.length;
  if (B === 1) return [await seqs[0]!.step(tokenIds[0]!)];
  const positions = seqs.map((s) => s.nextPosition());
  const t0 = performance.now();
  const { num_hidden_layers: layers, num_key_value_heads: kv, head_dim: hd } = model.config.text;
  const lens = seqs.map((s) => s.fed);
  const L = Math.max(...lens);
  const embeds = (await model.sessions.embed.run({ input_ids: i64(tokenIds, [B, 1]) })).inputs_embeds!;
  const floatType = embeds.type as "float32" | "float16";
  const mask = new Array<number>(B * (L + 1)).fill(0);
  seqs.forEach((_, b) => mask.fill(1, b * (L + 1) + (L - lens[b]!), (b + 1) * (L + 1)));
  const feeds: Record<string, ort.Tensor> = {
    inputs_embeds: embeds,
    attention_mask: i64(mask, [B, L + 1]),
    position_ids: i64([...positions, ...positions, ...positions], [3, B, 1]),
  };
  const rowsPerHead = (len: number) => len * hd;
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) {
      const name = `past_key_values.${i}.${kind}`;
      const data = floatType === "float16" ? new Uint16Array(B * kv * L * hd) : new Float32Array(B * kv * L * hd);
      seqs.forEach((s, b) => {
        const src = s.past.get(name)!.data as Float32Array | Uint16Array;
        const pad = L - lens[b]!;
        for (let h = 0; h < kv; h++) {
          const from = h * rowsPerHead(lens[b]!);
          data.set(src.subarray(from, from + rowsPerHead(lens[b]!)), ((b * kv + h) * L + pad) * hd);
        }
      });
      feeds[name] = new ort.Tensor(floatType, data, [B, kv, L, hd]);
    }
  }
  const out = await model.sessions.decoder.run(feeds);
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) {
      const present = out[`present.${i}.${kind}`]!.data as Float32Array | Uint16Array;
      seqs.forEach((s, b) => {
        const len = lens[b]! + 1;
        const pad = L + 1 - len;
        const own = floatType === "float16" ? new Uint16Array(kv * len * hd) : new Float32Array(kv * len * hd);
        for (let h = 0; h < kv; h++) {
          const from = ((b * kv + h) * (L + 1) + pad) * hd;
          own.set(present.subarray(from, from + len * hd), h * len * hd);
        }
        s.past.set(`past_key_values.${i}.${kind}`, new ort.Tensor(floatType, own, [1, kv, len, hd]));
      });
    }
  }
  const logits = out.logits!;
  const vocab = logits.dims[2]!;
  const rows = logits.dims[1]!;
  const all = toF32(logits);
  const ms = performance.now() - t0;
  return seqs.map((s, b) => {
    s.fed += 1;
    s.timings.decode_ms.push(ms);
    return all.subarray((b * rows + rows - 1) * vocab, (b * rows + rows) * vocab);
  });
}

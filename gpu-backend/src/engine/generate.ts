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
import { KvCache, type KvSpec } from "./kv-cache.ts";
import { getRopeIndex, type GridThw } from "./rope-index.ts";
import { CodedError } from "../../../shared/src/errors.ts";

/** A failure of one request inside the engine; `code` is a public API error code. */
export class GenerationError extends CodedError<"invalid_request" | "context_length_exceeded" | "internal_error"> {}

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
  /** Each decode pass (embedding + decoder run; one token, or a speculative draft being checked) in order. */
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

/** `logits_to_keep` for a decoder that takes it ({@link LoadedModel.logitsToKeep}): the last `keep` positions' logits. */
export function logitsToKeepFeed(model: LoadedModel, keep: number): Record<string, ort.Tensor> {
  return model.logitsToKeep ? { logits_to_keep: new ort.Tensor("int64", BigInt64Array.of(BigInt(keep)), [1]) } : {};
}

/** The model's KV-cache spec (names per its decoder's contract), built once per model. */
const kvSpecs = new WeakMap<LoadedModel, KvSpec>();
export function kvSpec(model: LoadedModel): KvSpec {
  let spec = kvSpecs.get(model);
  if (!spec) {
    const { num_hidden_layers: layers, num_key_value_heads: kvHeads, head_dim: headDim } = model.config.text;
    const outPrefix = model.kvCache === "append" ? "new_key_values" : "present";
    const pastNames: string[] = [];
    const outNames: string[] = [];
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        pastNames.push(`past_key_values.${i}.${kind}`);
        outNames.push(`${outPrefix}.${i}.${kind}`);
      }
    }
    spec = { contract: model.kvCache, pastNames, outNames, kvHeads, headDim, type: model.ioFloatType };
    kvSpecs.set(model, spec);
  }
  return spec;
}

/** Sequences decoded together whose caches are the rows of one left-padded {@link KvCache}. */
class BatchKv {
  constructor(
    readonly seqs: Sequence[],
    readonly cache: KvCache,
  ) {}
}

type KvState = { kind: "own"; cache: KvCache | null } | { kind: "batch"; batch: BatchKv; row: number };

/**
 * A live sequence: its KV cache and position state. `prefill` then `step` repeatedly; each returns the
 * logits for the next token (float32, length = vocab).
 */
export class Sequence {
  readonly seqLen: number;
  /** KV cache: its own (one row holding `fed` positions), or a row of a batch's. */
  private kv: KvState = { kind: "own", cache: null };
  private ropeDeltas = 0;
  /** The prompt's embeddings and positions between {@link prepare} and its last {@link prefillNext} chunk. */
  private pendingPrompt: { embeds: ort.Tensor; positions: [Int32Array, Int32Array, Int32Array] } | null = null;
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
      this.release();
      throw new CancelledError();
    }
  }

  /** `embed_tokens` for ids → [1, n, H] data. */
  private embed(ids: ArrayLike<number>): Promise<ort.Tensor> {
    return this.model.embeddings.lookup(ids, [1, ids.length]);
  }

  /** @internal The batch holding this sequence's cache, if any. */
  batchKv(): { batch: BatchKv; row: number } | null {
    return this.kv.kind === "batch" ? this.kv : null;
  }

  /** @internal Hands the cache to a batch (its row `row` now holds it). */
  joinBatch(batch: BatchKv, row: number): void {
    this.kv = { kind: "batch", batch, row };
  }

  /** @internal Where this sequence's cache is: a cache and its row (null before the prefill). */
  kvSource(): { cache: KvCache; row: number } | null {
    if (this.kv.kind === "batch") return { cache: this.kv.batch.cache, row: this.kv.row };
    return this.kv.cache ? { cache: this.kv.cache, row: 0 } : null;
  }

  /** This sequence's own cache (copied out of its batch if it lives in one; created empty before the prefill). */
  private ownCache(): KvCache {
    if (this.kv.kind === "own" && this.kv.cache) return this.kv.cache;
    let cache: KvCache;
    if (this.kv.kind === "batch") {
      cache = KvCache.filled(kvSpec(this.model), 1, this.fed);
      this.kv.batch.cache.copyRowTo(this.kv.row, this.fed, cache, 0);
    } else {
      cache = new KvCache(kvSpec(this.model), 1);
    }
    this.kv = { kind: "own", cache };
    return cache;
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
    // A cancelled request's encoding is stopped where the session allows it (a vision process is killed).
    const out = await this.model.sessions.vision.run({ pixel_values: pixels, grid_thw: i64(gridData, [grids.length, 3]) }, this.signal).catch((e: unknown) => {
      this.check();
      throw e;
    });
    this.timings.vision_ms = performance.now() - t0;
    return out.image_features!;
  }

  /** Runs the decoder on `embeds` [1, n, H] at `positions` [3][n]; returns the logits of the last `keep` positions, in order. */
  private async decode(embeds: ort.Tensor, positions: [ArrayLike<number>, ArrayLike<number>, ArrayLike<number>], keep = 1): Promise<Float32Array[]> {
    const n = embeds.dims[1]!;
    const pos = new BigInt64Array(3 * n);
    for (let a = 0; a < 3; a++) for (let j = 0; j < n; j++) pos[a * n + j] = BigInt(positions[a]![j]!);
    const cache = this.ownCache();
    const feeds: Record<string, ort.Tensor> = {
      inputs_embeds: embeds,
      position_ids: new ort.Tensor("int64", pos, [3, 1, n]),
      ...cache.inputs(n, [0]),
      ...logitsToKeepFeed(this.model, keep),
    };
    const out = await this.model.sessions.decoder.run(feeds, { logits: null, ...cache.outputs(n) });
    cache.commit(n);
    this.fed += n;
    const logits = out.logits!;
    const vocab = logits.dims[2]!;
    const rows = logits.dims[1]!;
    if (rows < keep) throw new GenerationError("internal_error", `the decoder returned ${rows} logits rows, ${keep} were needed`);
    const all = toF32(logits);
    return Array.from({ length: keep }, (_, j) => all.subarray((rows - keep + j) * vocab, (rows - keep + j + 1) * vocab));
  }

  /**
   * Vision encoder, token embeddings with the image features scattered in, and M-RoPE positions: everything
   * the prompt's forward pass needs, computed once. {@link prefillNext} then feeds the prompt.
   */
  async prepare(): Promise<void> {
    if (this.prepared) return;
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
    this.pendingPrompt = { embeds, positions: rope.positionIds };
    this.timings.prefill_ms += performance.now() - t0;
  }

  /** {@link prepare} has run (or the prompt is already in the cache). */
  get prepared(): boolean {
    return this.pendingPrompt !== null || this.fed > 0;
  }

  /** Prompt tokens not yet fed to the decoder (the whole prompt before {@link prepare}). */
  get prefillRemaining(): number {
    return this.seqLen - Math.min(this.fed, this.seqLen);
  }

  /**
   * Feeds the next `maxTokens` prompt tokens (all that remain by default) through the decoder, preparing first
   * if needed. Returns the first generated token's logits once the whole prompt is in the cache, else null.
   * Feeding a long prompt in chunks lets a server interleave it with other sequences' decode steps; the
   * logits equal the single pass's up to float summation order (each chunk attends to the cache and itself).
   */
  async prefillNext(maxTokens = Infinity): Promise<Float32Array | null> {
    if (!(maxTokens >= 1)) throw new GenerationError("internal_error", `prefill chunk of ${maxTokens} tokens`);
    await this.prepare();
    const p = this.pendingPrompt;
    if (!p) throw new GenerationError("internal_error", "the prompt was already fed");
    this.check();
    const t0 = performance.now();
    const from = this.fed;
    const to = Math.min(this.seqLen, from + maxTokens);
    const hidden = p.embeds.dims[2]!;
    const whole = from === 0 && to === this.seqLen;
    const embeds = whole
      ? p.embeds
      : new ort.Tensor(p.embeds.type, (p.embeds.data as FloatData).slice(from * hidden, to * hidden), [1, to - from, hidden]);
    const [logits] = await this.decode(embeds, [p.positions[0].subarray(from, to), p.positions[1].subarray(from, to), p.positions[2].subarray(from, to)]);
    this.timings.prefill_ms += performance.now() - t0;
    if (to < this.seqLen) return null;
    this.pendingPrompt = null;
    return logits!;
  }

  /** Vision + embeddings + positions + the prompt's forward pass: logits of the first generated token. */
  async prefill(): Promise<Float32Array> {
    return (await this.prefillNext())!;
  }

  /**
   * Position of the next token fed back: `seq_len + k + rope_deltas` for the k-th generated token (the
   * following `n − 1` tokens, if fed in the same pass, take the next positions).
   */
  nextPosition(n = 1): number {
    this.check();
    if (this.fed + n > this.model.config.text.max_position_embeddings) {
      throw new GenerationError("context_length_exceeded", "the context is full");
    }
    const k = this.fed - this.seqLen;
    return this.seqLen + k + this.ropeDeltas;
  }

  /** Positions left in the context (what {@link verify} may feed at most). */
  get contextLeft(): number {
    return this.model.config.text.max_position_embeddings - this.fed;
  }

  /** Feeds `tokenId` (the k-th generated token, k = 0, 1, …) and returns the next logits. */
  async step(tokenId: number): Promise<Float32Array> {
    return (await this.verify([tokenId]))[0]!;
  }

  /**
   * Whether {@link verify} can check a draft in one pass: the decoder returns several positions' logits
   * (`logits_to_keep`) and its cache can forget positions (the append contract).
   */
  get canVerify(): boolean {
    return this.model.logitsToKeep && this.model.kvCache === "append";
  }

  /**
   * Feeds `ids` — the last chosen token, then a speculative draft of the tokens that may follow it — in one
   * decoder pass, and returns the logits after each of them (row j: the distribution after `ids[0..j]`). They
   * equal feeding the ids one {@link step} at a time up to float summation order (attention over several
   * positions runs other GEMM shapes): max |Δlogit| 1.5e-6 float32, 2.4e-7 W8A8 on the 2B shape. int4 rounds
   * its `MatMulNBits` inputs to int8 per block of 32 (accuracy level 4), which turns such last-bit differences
   * into whole rounding steps from the middle layers on: ~1 % relative RMS of the logits on the 2B shape, a
   * twentieth of int4's own error against float32, enough to swing near-ties. The caller then {@link rewind}s
   * the draft tokens it did not accept.
   */
  async verify(ids: readonly number[]): Promise<Float32Array[]> {
    if (ids.length > 1 && !this.canVerify) throw new GenerationError("internal_error", "this decoder cannot check a draft in one pass");
    const pos = this.nextPosition(ids.length);
    const P = ids.map((_, j) => pos + j);
    const t0 = performance.now();
    const rows = await this.decode(await this.embed(ids), [P, P, P], ids.length);
    this.timings.decode_ms.push(performance.now() - t0);
    return rows;
  }

  /** Forgets the last `n` tokens fed (a draft's rejected tail): the next token takes the first one's position. */
  rewind(n: number): void {
    if (n === 0) return;
    if (!(n > 0 && n <= this.fed - this.seqLen) || !this.canVerify) throw new GenerationError("internal_error", `cannot rewind ${n} tokens`);
    this.ownCache().drop(n);
    this.fed -= n;
  }

  /** Drops the KV cache (the request's memory) at once. */
  release(): void {
    this.kv = { kind: "own", cache: null };
    this.pendingPrompt = null;
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
 * float summation order. The padded batch cache is built only when the batch's membership changes; between
 * such changes the decoder reads its past from, and writes its new K/V into, the batch's own buffers
 * ({@link KvCache}), so a step costs no per-sequence copying.
 */
export async function decodeBatch(model: LoadedModel, seqs: Sequence[], tokenIds: number[]): Promise<Float32Array[]> {
  const B = seqs.length;
  if (B === 1) return [await seqs[0]!.step(tokenIds[0]!)];
  const positions = seqs.map((s) => s.nextPosition());
  const t0 = performance.now();
  const lens = seqs.map((s) => s.fed);
  // The same sequences in the same order as the last step: their cache already is the batch's.
  const prev = seqs[0]!.batchKv()?.batch;
  let batch: BatchKv;
  if (prev && prev.seqs.length === B && seqs.every((s, b) => prev.seqs[b] === s && s.batchKv()?.batch === prev && s.batchKv()!.row === b)) {
    batch = prev;
  } else {
    // Membership changed: build the left-padded batch cache once, trimmed to the longest sequence.
    const sources = seqs.map((s) => s.kvSource());
    if (sources.some((x) => x === null)) throw new GenerationError("internal_error", "a sequence joined a batch before its prefill");
    const cache = KvCache.filled(kvSpec(model), B, Math.max(...lens));
    sources.forEach((src, b) => src!.cache.copyRowTo(src!.row, lens[b]!, cache, b));
    batch = new BatchKv(seqs.slice(), cache);
    seqs.forEach((s, b) => s.joinBatch(batch, b));
  }
  const cache = batch.cache;
  const L = cache.L;
  const embeds = await model.embeddings.lookup(tokenIds, [B, 1]);
  const pos = new BigInt64Array(3 * B);
  for (let a = 0; a < 3; a++) for (let b = 0; b < B; b++) pos[a * B + b] = BigInt(positions[b]!);
  const feeds: Record<string, ort.Tensor> = {
    inputs_embeds: embeds,
    position_ids: new ort.Tensor("int64", pos, [3, B, 1]),
    ...cache.inputs(1, lens.map((len) => L - len)),
    ...logitsToKeepFeed(model, 1),
  };
  const out = await model.sessions.decoder.run(feeds, { logits: null, ...cache.outputs(1) });
  cache.commit(1);
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

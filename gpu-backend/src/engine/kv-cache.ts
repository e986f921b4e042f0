/**
 * The decoder's KV cache kept in JavaScript buffers that ONNX Runtime reads the past from and writes its
 * K/V outputs into directly (pre-allocated outputs): a decode step allocates nothing. Two contracts
 * (convert/decoder.ts):
 *
 * - `"append"` (`decoder_model_append.onnx`, our converter's default): one buffer per layer and kind,
 *   [B, kv_heads, capacity, head_dim], passed whole as `past_key_values.*` with the slots not yet filled masked
 *   out; the graph outputs only the new tokens' K/V (`new_key_values.*`), which {@link KvCache.commit} writes
 *   into the next slots. Nothing copies the cache per step except a growth every {@link HEADROOM} tokens.
 * - `"present"` (the onnx-community `decoder_model_merged.onnx`, e.g. another exporter's files): the graph's
 *   `Concat(past, new)` writes `present.*` straight into the other half of a double buffer, which becomes the
 *   next step's past ([B, kv_heads, L, head_dim], dense).
 *
 * Several sequences decoded together are rows of one cache, left-padded to a common length L (the padding
 * masked by `attention_mask`).
 */
import * as ort from "onnxruntime-node";
import type { KvCacheContract } from "../convert/decoder.ts";

export type FloatData = Float32Array | Uint16Array;
export type FloatType = "float32" | "float16";
/** The decoder graph's KV-cache contract (see the module comment; the converter's `KvCacheContract`). */
export type KvContract = KvCacheContract;

/**
 * Tokens of spare capacity allocated beyond what a step needs. It amortizes growth (each one copies the
 * cache once), and costs an append-contract step attention over at most this many masked slots.
 */
const HEADROOM = 64;

/** What a cache needs to know about its decoder graph. */
export interface KvSpec {
  contract: KvContract;
  /** `past_key_values.{i}.{key|value}` in layer order. */
  pastNames: readonly string[];
  /** The matching outputs: `present.*` ("present") or `new_key_values.*` ("append"). */
  outNames: readonly string[];
  kvHeads: number;
  headDim: number;
  type: FloatType;
}

function alloc(type: FloatType, n: number): FloatData {
  return type === "float16" ? new Uint16Array(n) : new Float32Array(n);
}

export class KvCache {
  /** Filled positions per row (including left padding). */
  L = 0;
  /** "append": slots per (row, head) in `bufs`. */
  private cap = 0;
  /** "append": the cache per name, and the new tokens' K/V outputs per name. */
  private bufs: FloatData[];
  private readonly fresh: FloatData[];
  /** "present": per name, the two halves of the double buffer; `cur` holds the past. */
  private readonly slabs: FloatData[][];
  private cur = 0;

  constructor(
    readonly spec: KvSpec,
    readonly B: number,
  ) {
    const names = spec.pastNames;
    this.bufs = names.map(() => alloc(spec.type, 0));
    this.fresh = names.map(() => alloc(spec.type, 0));
    this.slabs = spec.contract === "present" ? names.map(() => [alloc(spec.type, 0), alloc(spec.type, 0)]) : [];
  }

  private get append(): boolean {
    return this.spec.contract === "append";
  }

  /** Slots of the past the decoder sees: the buffer's capacity ("append", once filled) or L. */
  private get slots(): number {
    return this.append ? (this.L === 0 ? 0 : this.cap) : this.L;
  }

  /** Distance between two heads' rows in the buffer holding the past, in positions. */
  private get stride(): number {
    return this.append ? this.cap : this.L;
  }

  private elems(positions: number): number {
    return this.B * this.spec.kvHeads * positions * this.spec.headDim;
  }

  private pastData(j: number): FloatData {
    return this.append ? this.bufs[j]! : this.slabs[j]![this.cur]!;
  }

  /**
   * The decoder's cache inputs for a step feeding `n` tokens per row: `past_key_values.*` (views, no copy)
   * and `attention_mask` [B, slots + n], where row b's filled positions start at `starts[b]` (its left padding
   * before that, and spare capacity after L, are masked out).
   */
  inputs(n: number, starts: ArrayLike<number>): Record<string, ort.Tensor> {
    const { kvHeads, headDim, type } = this.spec;
    const S = this.slots;
    const out: Record<string, ort.Tensor> = {};
    const dims = [this.B, kvHeads, S, headDim];
    this.spec.pastNames.forEach((name, j) => {
      out[name] = new ort.Tensor(type, this.pastData(j).subarray(0, this.elems(S)), dims);
    });
    const width = S + n;
    const mask = new BigInt64Array(this.B * width);
    for (let b = 0; b < this.B; b++) {
      mask.fill(1n, b * width + starts[b]!, b * width + this.L);
      mask.fill(1n, b * width + S, (b + 1) * width);
    }
    out.attention_mask = new ort.Tensor("int64", mask, [this.B, width]);
    return out;
  }

  /** Pre-allocated K/V outputs for a step feeding `n` tokens per row. */
  outputs(n: number): Record<string, ort.Tensor> {
    const { kvHeads, headDim, type } = this.spec;
    const out: Record<string, ort.Tensor> = {};
    if (this.append) {
      const need = this.elems(n);
      this.spec.outNames.forEach((name, j) => {
        if (this.fresh[j]!.length !== need) this.fresh[j] = alloc(type, need);
        out[name] = new ort.Tensor(type, this.fresh[j]!, [this.B, kvHeads, n, headDim]);
      });
      return out;
    }
    const L = this.L + n;
    const need = this.elems(L);
    const other = 1 - this.cur;
    this.spec.outNames.forEach((name, j) => {
      const pair = this.slabs[j]!;
      if (pair[other]!.length < need) pair[other] = alloc(type, this.elems(L + HEADROOM));
      out[name] = new ort.Tensor(type, pair[other]!.subarray(0, need), [this.B, kvHeads, L, headDim]);
    });
    return out;
  }

  /** After the decoder ran with {@link outputs}(n): the new tokens join the past. */
  commit(n: number): void {
    if (!this.append) {
      this.cur = 1 - this.cur;
      this.L += n;
      return;
    }
    if (this.L + n > this.cap) this.grow(this.L + n + HEADROOM);
    const { kvHeads, headDim: hd } = this.spec;
    const rows = this.B * kvHeads;
    this.fresh.forEach((src, j) => {
      const dst = this.bufs[j]!;
      for (let r = 0; r < rows; r++) dst.set(src.subarray(r * n * hd, (r + 1) * n * hd), (r * this.cap + this.L) * hd);
    });
    this.L += n;
  }

  /**
   * "append": forgets the last `n` positions (a speculative draft's rejected tokens): their slots are masked
   * from now on and overwritten by the next commit. A "present" cache is dense (its layout depends on L), so
   * it cannot.
   */
  drop(n: number): void {
    if (!this.append || !(n >= 0 && n <= this.L)) throw new Error(`cannot drop ${n} of ${this.L} positions from a ${this.spec.contract} cache`);
    this.L -= n;
  }

  /** "append": moves the filled slots into buffers of `cap` slots. */
  private grow(cap: number): void {
    const { kvHeads, headDim: hd, type } = this.spec;
    const rows = this.B * kvHeads;
    this.bufs = this.bufs.map((old) => {
      const next = alloc(type, this.elems(cap));
      for (let r = 0; r < rows; r++) next.set(old.subarray(r * this.cap * hd, (r * this.cap + this.L) * hd), r * cap * hd);
      return next;
    });
    this.cap = cap;
  }

  /**
   * Copies the last `len` positions of row `row` (every layer, kind and head) into row `dstRow` of `dst`,
   * right-aligned (left padding before them). `dst` must have `dst.L ≥ len` and the same contract.
   */
  copyRowTo(row: number, len: number, dst: KvCache, dstRow: number): void {
    const { kvHeads: kv, headDim: hd } = this.spec;
    this.spec.pastNames.forEach((_, j) => {
      const src = this.pastData(j);
      const to = dst.pastData(j);
      for (let h = 0; h < kv; h++) {
        const from = ((row * kv + h) * this.stride + (this.L - len)) * hd;
        to.set(src.subarray(from, from + len * hd), ((dstRow * kv + h) * dst.stride + (dst.L - len)) * hd);
      }
    });
  }

  /** An empty cache of `L` positions (zeros) for `B` rows, ready to be filled with {@link copyRowTo}. */
  static filled(spec: KvSpec, B: number, L: number): KvCache {
    const c = new KvCache(spec, B);
    c.L = L;
    if (c.append) {
      c.cap = L + HEADROOM;
      c.bufs = c.bufs.map(() => alloc(spec.type, c.elems(c.cap)));
    } else {
      c.slabs.forEach((pair) => {
        pair[0] = alloc(spec.type, c.elems(L + 1 + HEADROOM));
      });
    }
    return c;
  }
}

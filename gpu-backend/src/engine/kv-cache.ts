/**
 * The decoder's KV cache kept in JavaScript buffers that ONNX Runtime reads the past from and writes the
 * present into directly (pre-allocated outputs), so a decode step allocates nothing and copies nothing on
 * the JavaScript side: the graph's `Concat(past, new)` writes `present.*` straight into the other half of a
 * double buffer, which becomes the next step's `past_key_values.*`.
 *
 * Layout per layer and kind (key/value): [B, kv_heads, L, head_dim], the onnx-community contract; several
 * sequences decoded together are left-padded to a common L (padding masked by `attention_mask`).
 */
import * as ort from "onnxruntime-node";

export type FloatData = Float32Array | Uint16Array;
export type FloatType = "float32" | "float16";

/** Tokens of headroom allocated beyond the next step (amortizes growth; a few MB at the 2B shape). */
const HEADROOM = 64;

function alloc(type: FloatType, n: number): FloatData {
  return type === "float16" ? new Uint16Array(n) : new Float32Array(n);
}

export class KvCache {
  /** Past length (including left padding). */
  L = 0;
  /** Per name: the two halves of the double buffer; `cur` holds the past. */
  private readonly slabs: FloatData[][];
  private cur = 0;

  constructor(
    readonly pastNames: readonly string[],
    readonly presentNames: readonly string[],
    readonly B: number,
    readonly kvHeads: number,
    readonly headDim: number,
    readonly type: FloatType,
  ) {
    this.slabs = pastNames.map(() => [alloc(type, 0), alloc(type, 0)]);
  }

  private elems(L: number): number {
    return this.B * this.kvHeads * L * this.headDim;
  }

  /** Past tensors of the current length (views, no copy). */
  past(): Record<string, ort.Tensor> {
    const out: Record<string, ort.Tensor> = {};
    const n = this.elems(this.L);
    const dims = [this.B, this.kvHeads, this.L, this.headDim];
    this.pastNames.forEach((name, j) => {
      out[name] = new ort.Tensor(this.type, this.slabs[j]![this.cur]!.subarray(0, n), dims);
    });
    return out;
  }

  /** Pre-allocated `present.*` outputs for a step feeding `n` new tokens (grows the other half if needed). */
  present(n: number): Record<string, ort.Tensor> {
    const out: Record<string, ort.Tensor> = {};
    const L = this.L + n;
    const need = this.elems(L);
    const dims = [this.B, this.kvHeads, L, this.headDim];
    const other = 1 - this.cur;
    this.presentNames.forEach((name, j) => {
      const pair = this.slabs[j]!;
      if (pair[other]!.length < need) pair[other] = alloc(this.type, this.elems(L + HEADROOM));
      out[name] = new ort.Tensor(this.type, pair[other]!.subarray(0, need), dims);
    });
    return out;
  }

  /** After the decoder ran with {@link present}(n) as its outputs: the present becomes the past. */
  commit(n: number): void {
    this.cur = 1 - this.cur;
    this.L += n;
  }

  /**
   * Copies the last `len` positions of row `row` (every layer, kind and head) into row `dstRow` of `dst`,
   * right-aligned (left padding before them). `dst` must have `dst.L ≥ len`.
   */
  copyRowTo(row: number, len: number, dst: KvCache, dstRow: number): void {
    const { kvHeads: kv, headDim: hd } = this;
    this.slabs.forEach((pair, j) => {
      const src = pair[this.cur]!;
      const to = dst.slabs[j]![dst.cur]!;
      for (let h = 0; h < kv; h++) {
        const from = ((row * kv + h) * this.L + (this.L - len)) * hd;
        to.set(src.subarray(from, from + len * hd), ((dstRow * kv + h) * dst.L + (dst.L - len)) * hd);
      }
    });
  }

  /** An empty cache of `L` positions (zeros), ready to be filled with {@link copyRowTo}. */
  static filled(like: { pastNames: readonly string[]; presentNames: readonly string[]; kvHeads: number; headDim: number; type: FloatType }, B: number, L: number): KvCache {
    const c = new KvCache(like.pastNames, like.presentNames, B, like.kvHeads, like.headDim, like.type);
    c.L = L;
    const n = c.elems(L + 1 + HEADROOM);
    c.slabs.forEach((pair) => {
      pair[0] = alloc(like.type, n);
    });
    return c;
  }
}

/**
 * The engine's KV cache bookkeeping for both decoder contracts: what the decoder is fed (past views and the
 * attention mask) and where each step's K/V end up. The decoder itself is played by writing known values into
 * the output tensors, as ONNX Runtime would; the graphs are checked against each other in convert-golden.
 */
import { describe, expect, it } from "vitest";
import { KvCache, type KvContract, type KvSpec } from "../../gpu-backend/src/engine/kv-cache.ts";

const KV = 2;
const HD = 3;

function spec(contract: KvContract): KvSpec {
  const pastNames = ["past_key_values.0.key", "past_key_values.0.value"];
  const outNames = contract === "append" ? ["new_key_values.0.key", "new_key_values.0.value"] : ["present.0.key", "present.0.value"];
  return { contract, pastNames, outNames, kvHeads: KV, headDim: HD, type: "float32" };
}

/** The value a fake decoder writes for (name j, row b, head h, absolute position p, dim d). */
const val = (j: number, b: number, h: number, p: number, d: number) => 1 + j * 1e5 + b * 1e4 + h * 1e3 + p * 10 + d;

/**
 * Plays one decoder call feeding `n` tokens per row: checks nothing, fills the outputs. "present" outputs hold
 * past + new (the past copied from the inputs, as the graph's Concat does), "append" outputs the new rows only.
 */
function fakeStep(cache: KvCache, n: number, starts: number[]) {
  const inputs = cache.inputs(n, starts);
  const outputs = cache.outputs(n);
  cache.spec.outNames.forEach((name, j) => {
    const out = outputs[name]!;
    const [B, , T] = out.dims as number[];
    const data = out.data as Float32Array;
    const past = inputs[cache.spec.pastNames[j]!]!;
    const P = past.dims[2]!;
    for (let b = 0; b < B!; b++) {
      for (let h = 0; h < KV; h++) {
        for (let t = 0; t < T!; t++) {
          const fromPast = cache.spec.contract === "present" && t < P;
          for (let d = 0; d < HD; d++) {
            data[((b * KV + h) * T! + t) * HD + d] = fromPast
              ? (past.data as Float32Array)[((b * KV + h) * P + t) * HD + d]!
              : val(j, b, h, cache.L + (cache.spec.contract === "present" ? t - P : t), d);
          }
        }
      }
    }
  });
  cache.commit(n);
  return inputs;
}

/** Row b's cached value at position p as the next step's past input shows it. */
function cached(cache: KvCache, j: number, b: number, h: number, p: number, d: number): number {
  const past = cache.inputs(1, new Array(cache.B).fill(0))[cache.spec.pastNames[j]!]!;
  const P = past.dims[2]!;
  return (past.data as Float32Array)[((b * KV + h) * P + p) * HD + d]!;
}

const mask = (t: { data: unknown; dims: readonly number[] }) => {
  const [B, W] = t.dims as [number, number];
  return Array.from({ length: B }, (_, b) => Array.from((t.data as BigInt64Array).subarray(b * W, (b + 1) * W), Number).join(""));
};

describe.each(["append", "present"] as const)("KvCache (%s)", (contract) => {
  it("prefill sees an empty past; every step's K/V land at their positions, across growth", () => {
    const c = new KvCache(spec(contract), 1);
    const first = fakeStep(c, 5, [0]);
    expect(first["past_key_values.0.key"]!.dims).toEqual([1, KV, 0, HD]);
    expect(mask(first.attention_mask!)).toEqual(["11111"]);
    for (let k = 0; k < 70; k++) fakeStep(c, 1, [0]); // beyond the 64 tokens of headroom: one growth
    expect(c.L).toBe(75);
    for (const p of [0, 4, 5, 68, 74]) for (let j = 0; j < 2; j++) for (let h = 0; h < KV; h++) expect(cached(c, j, 0, h, p, 2)).toBe(val(j, 0, h, p, 2));
    const next = c.inputs(1, [0]);
    const slots = next["past_key_values.0.value"]!.dims[2]!;
    if (contract === "append") {
      expect(slots).toBeGreaterThan(75); // spare capacity, masked out
      expect(mask(next.attention_mask!)).toEqual(["1".repeat(75) + "0".repeat(slots - 75) + "1"]);
    } else {
      expect(slots).toBe(75);
      expect(mask(next.attention_mask!)).toEqual(["1".repeat(76)]);
    }
  });

  it("rows of a batch: left padding is masked, rows move into a batch and back out unchanged", () => {
    const a = new KvCache(spec(contract), 1);
    const b = new KvCache(spec(contract), 1);
    fakeStep(a, 4, [0]);
    fakeStep(b, 2, [0]);
    const batch = KvCache.filled(spec(contract), 2, 4);
    a.copyRowTo(0, 4, batch, 0);
    b.copyRowTo(0, 2, batch, 1);
    const inputs = fakeStep(batch, 1, [0, 2]);
    const P = inputs["past_key_values.0.key"]!.dims[2]!;
    const spare = "0".repeat(P - 4);
    expect(mask(inputs.attention_mask!)).toEqual([`1111${spare}1`, `0011${spare}1`]);
    // Row 1 (b's two tokens right-aligned after two padding slots) then its new token at batch position 4.
    expect(cached(batch, 1, 1, 1, 2, 0)).toBe(val(1, 0, 1, 0, 0));
    expect(cached(batch, 1, 1, 1, 3, 0)).toBe(val(1, 0, 1, 1, 0));
    expect(cached(batch, 1, 1, 1, 4, 0)).toBe(val(1, 1, 1, 4, 0));
    // Back out of the batch: its last 3 positions as a sequence of its own.
    const own = KvCache.filled(spec(contract), 1, 3);
    batch.copyRowTo(1, 3, own, 0);
    expect([0, 1, 2].map((p) => cached(own, 0, 0, 0, p, 1))).toEqual([val(0, 0, 0, 0, 1), val(0, 0, 0, 1, 1), val(0, 1, 0, 4, 1)]);
    fakeStep(own, 1, [0]);
    expect(cached(own, 0, 0, 1, 3, 1)).toBe(val(0, 0, 1, 3, 1));
  });
});

describe("KvCache.drop (a speculative draft's rejected tokens)", () => {
  it("append: the dropped positions are masked, and the next tokens are written over them", () => {
    const c = new KvCache(spec("append"), 1);
    fakeStep(c, 4, [0]);
    fakeStep(c, 3, [0]); // the last token and a draft of two
    c.drop(2);
    expect(c.L).toBe(5);
    // Mark the first dropped slot (through the decoder's view of the buffer) to see it overwritten.
    for (const name of c.spec.pastNames) {
      const past = c.inputs(1, [0])[name]!;
      const P = past.dims[2]!;
      for (let h = 0; h < KV; h++) (past.data as Float32Array).fill(-1, (h * P + 5) * HD, (h * P + 6) * HD);
    }
    expect(cached(c, 0, 0, 1, 5, 2)).toBe(-1);
    const next = fakeStep(c, 1, [0]);
    const slots = next["past_key_values.0.key"]!.dims[2]!;
    expect(mask(next.attention_mask!)).toEqual(["1".repeat(5) + "0".repeat(slots - 5) + "1"]);
    // The token fed after the drop took position 5, where the first rejected draft token was.
    for (let j = 0; j < 2; j++) expect(cached(c, j, 0, 1, 5, 2)).toBe(val(j, 0, 1, 5, 2));
    expect(c.L).toBe(6);
    expect(() => c.drop(7)).toThrow(/cannot drop 7 of 6/);
  });

  it("present: refused (its buffers are dense, laid out by length)", () => {
    const c = new KvCache(spec("present"), 1);
    fakeStep(c, 3, [0]);
    expect(() => c.drop(1)).toThrow(/present cache/);
    expect(c.L).toBe(3);
  });
});

import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  SamplingError,
  Xoshiro128StarStar,
  argmax,
  createSampler,
  resolveSamplingParams,
  type SamplingParams,
} from "../../gpu-backend/src/engine/sampling.ts";
import { thrownBy } from "../support/errors.ts";

const V = 151936;
const f32 = (xs: number[]) => Float32Array.from(xs);
const logOf = (ps: number[]) => f32(ps.map(Math.log));

function softmax(xs: ArrayLike<number>, T = 1): number[] {
  const a = Array.from(xs);
  const m = a.reduce((x, y) => Math.max(x, y), -Infinity);
  const e = a.map((x) => Math.exp((x - m) / T));
  const z = e.reduce((s, x) => s + x, 0);
  return e.map((x) => x / z);
}

function expectClose(actual: ArrayLike<number>, expected: number[], tol = 1e-6): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) expect(Math.abs(actual[i]! - expected[i]!)).toBeLessThan(tol);
}

function expectError(fn: () => unknown, code: string, param?: string): void {
  const err = thrownBy(fn, SamplingError);
  expect(err.code).toBe(code);
  if (param !== undefined) expect(err.param).toBe(param);
}

/** Deterministic pseudo-random logits (not the sampler's RNG). */
function randomLogits(n: number, seed: number, scale = 3): Float32Array {
  const r = new Xoshiro128StarStar(seed + 1_000_003);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (r.nextDouble() * 2 - 1) * scale;
  return out;
}

/** HF TopPLogitsWarper written literally (full ascending sort + cumsum): the kept ids. */
function hfTopPKept(probs: number[], topP: number): Set<number> {
  const order = probs.map((p, i) => i).sort((a, b) => probs[a]! - probs[b]! || b - a); // ascending; ties: higher id first
  const kept = new Set<number>();
  let cum = 0;
  order.forEach((id, r) => {
    cum += probs[id]!;
    if (!(cum <= 1 - topP) || r === order.length - 1) kept.add(id);
  });
  return kept;
}

describe("PRNG (xoshiro128** seeded by SplitMix64)", () => {
  it("matches an independent big-integer implementation", () => {
    // Computed with Python's arbitrary-precision integers (SplitMix64 seed 0 → 0xe220a8397b1dcdaf, the published value).
    const take = (seed: number, n: number) => {
      const r = new Xoshiro128StarStar(seed);
      return Array.from({ length: n }, () => r.nextUint32());
    };
    expect(take(0, 6)).toEqual([3737715805, 2584255861, 2876756834, 3286328325, 1553311962, 1625202774]);
    expect(take(42, 6)).toEqual([1776835114, 4165204688, 17111135, 2317295270, 2792088233, 2554630222]);
    expect(take(-1, 4)).toEqual([477689756, 2493998634, 555695776, 607808419]);
  });

  it("nextDouble is uniform on [0, 1)", () => {
    const r = new Xoshiro128StarStar(123);
    let sum = 0;
    let min = 1;
    let max = 0;
    const n = 50_000;
    for (let i = 0; i < n; i++) {
      const x = r.nextDouble();
      sum += x;
      min = Math.min(min, x);
      max = Math.max(max, x);
    }
    expect(min).toBeGreaterThanOrEqual(0);
    expect(max).toBeLessThan(1);
    expect(Math.abs(sum / n - 0.5)).toBeLessThan(0.01);
    expectError(() => new Xoshiro128StarStar(1.5), "invalid_parameter", "seed");
  });
});

describe("greedy", () => {
  it("argmax ties go to the lowest id, like torch.argmax", () => {
    expect(argmax(f32([1, 3, 3, 2, 3]))).toBe(1);
    expect(argmax(f32([-Infinity, -5, -5]))).toBe(1);
    const s = createSampler({ temperature: 0 });
    expect(s.greedy).toBe(true);
    expect(s.sample(f32([0, 7, 7]))).toBe(1);
    expect(createSampler({ do_sample: false, temperature: 0.7 }).sample(f32([0, 7, 7]))).toBe(1);
    expect(Array.from(s.probabilities(f32([0, 7, 7])))).toEqual([0, 1, 0]);
  });

  it("a full-vocabulary row: the planted maximum wins, and the logits are left untouched", () => {
    const logits = randomLogits(V, 1);
    logits[123_456] = 10;
    const copy = logits.slice();
    const s = createSampler({ temperature: 0, repetition_penalty: 1.3 });
    s.observe([5, 6, 123_456]);
    // 10 / 1.3 ≈ 7.7 still beats every other logit (≤ 3).
    expect(s.sample(logits)).toBe(123_456);
    expect(Buffer.compare(Buffer.from(logits.buffer), Buffer.from(copy.buffer))).toBe(0);
  });

  it("rejects NaN, +Infinity, all −Infinity and empty rows", () => {
    const s = createSampler({ temperature: 0 });
    expectError(() => s.sample(f32([0, NaN, 1])), "invalid_logits");
    expectError(() => s.sample(f32([0, Infinity])), "invalid_logits");
    expectError(() => s.sample(f32([-Infinity, -Infinity])), "invalid_logits");
    expectError(() => s.sample(new Float32Array(0)), "invalid_logits");
  });
});

describe("repetition penalty (HF RepetitionPenaltyLogitsProcessor)", () => {
  it("divides positive and multiplies negative logits of seen ids, once per id", () => {
    const s = createSampler({ temperature: 1, repetition_penalty: 2, seed: 1 });
    s.observe([0, 1, 1, 1]);
    const p = s.probabilities(f32([2, -2, 1, 0.5]));
    expectClose(p, softmax([1, -4, 1, 0.5]), 1e-12);
    // Penalty < 1 rewards instead.
    const r = createSampler({ repetition_penalty: 0.5, seed: 1 });
    r.observe([3]);
    expectClose(r.probabilities(f32([2, -2, 1, 0.5])), softmax([2, -2, 1, 1]), 1e-12);
  });

  it("stores the penalised logit as float32 (its float32 neighbours order around it exactly)", () => {
    const bits = (x: number, d: number) => {
      const b = new Float32Array([x]);
      const u = new Uint32Array(b.buffer);
      u[0]! += d;
      return b[0]!;
    };
    const penalised = Math.fround(1 / Math.fround(1.1));
    const pick = (other: number) => {
      const s = createSampler({ temperature: 0, repetition_penalty: 1.1 });
      s.observe([1]);
      return s.sample(f32([other, 1]));
    };
    expect(pick(bits(penalised, -1))).toBe(1);
    expect(pick(penalised)).toBe(0); // exact tie → lowest id
    expect(pick(bits(penalised, 1))).toBe(0);
  });

  it("applies in greedy mode and tracks the sampled tokens", () => {
    const s = createSampler({ temperature: 0, repetition_penalty: 1.5 });
    const logits = f32([3, 2.9, 0]);
    const picks = [s.sample(logits), s.sample(logits), s.sample(logits)];
    // 0; then 3/1.5 = 2 < 2.9 → 1; then 2 vs 2.9/1.5 ≈ 1.93 → 0.
    expect(picks).toEqual([0, 1, 0]);
    expect(Array.from(logits)).toEqual(Array.from(f32([3, 2.9, 0])));
  });

  it("ignores ids outside the row and with penalty 1 changes nothing", () => {
    const s = createSampler({ repetition_penalty: 1.2, seed: 3 });
    s.observe([1, 10, -1, 2.5, 2 ** 40]);
    expectClose(s.probabilities(f32([1, 1, 1])), softmax([1, 1 / Math.fround(1.2), 1]), 1e-6);
    const none = createSampler({ repetition_penalty: 1, seed: 3 });
    none.observe([0, 1]);
    expectClose(none.probabilities(f32([1, 2, 3])), softmax([1, 2, 3]), 1e-12);
  });
});

describe("temperature, top-k, top-p (HF warper semantics)", () => {
  it("temperature scales logits before the softmax", () => {
    const l = f32([1, 2, 0.5, -1]);
    expectClose(createSampler({ temperature: 0.5, seed: 1 }).probabilities(l), softmax(l, 0.5), 1e-12);
    expectClose(createSampler({ temperature: 2, seed: 1 }).probabilities(l), softmax(l, 2), 1e-12);
  });

  it("top-k keeps every logit ≥ the k-th largest (ties survive)", () => {
    const l = f32([1, 5, 3, 3, 2]);
    expectClose(createSampler({ top_k: 2, seed: 1 }).probabilities(l), [0, ...softmax([5, 3, 3]), 0], 1e-12);
    expectClose(createSampler({ top_k: 1, seed: 1 }).probabilities(l), [0, 1, 0, 0, 0], 1e-12);
    expectClose(createSampler({ top_k: 4, seed: 1 }).probabilities(l), [0, ...softmax([5, 3, 3, 2])], 1e-12);
    // k ≥ vocabulary: no filtering.
    expectClose(createSampler({ top_k: 50, seed: 1 }).probabilities(l), softmax(l), 1e-12);
  });

  it("top-p keeps tokens while the mass above them is < top_p", () => {
    // Shuffled so that the order of ids differs from the order of probabilities.
    const ps = [0.15, 0.5, 0.05, 0.3];
    const l = logOf(ps);
    // Mass above: 0.5 → 0, 0.3 → 0.5, 0.15 → 0.8, 0.05 → 0.95.
    expectClose(createSampler({ top_p: 0.7, seed: 1 }).probabilities(l), [0, 0.5 / 0.8, 0, 0.3 / 0.8], 1e-6);
    expectClose(createSampler({ top_p: 0.85, seed: 1 }).probabilities(l), [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95], 1e-6);
    expectClose(createSampler({ top_p: 0.01, seed: 1 }).probabilities(l), [0, 1, 0, 0], 1e-12);
    expectClose(createSampler({ top_p: 1, seed: 1 }).probabilities(l), ps, 1e-6);
  });

  it("order: top-k renormalises before top-p; temperature applies before top-p", () => {
    const l = logOf([0.4, 0.3, 0.2, 0.1]);
    // top-p alone keeps 0.4 and 0.3 (mass above 0.3 is 0.4 < 0.5) ...
    expectClose(createSampler({ top_p: 0.5, seed: 1 }).probabilities(l), [4 / 7, 3 / 7, 0, 0], 1e-6);
    // ... but after top-k 2 the top token alone has 4/7 ≥ 0.5.
    expectClose(createSampler({ top_k: 2, top_p: 0.5, seed: 1 }).probabilities(l), [1, 0, 0, 0], 1e-12);
    const m = logOf([0.5, 0.3, 0.2]);
    expectClose(createSampler({ top_p: 0.6, seed: 1 }).probabilities(m), [0.5 / 0.8, 0.3 / 0.8, 0], 1e-6);
    // T = 0.5 sharpens the top token to 0.25/0.38 ≈ 0.66 ≥ 0.6.
    expectClose(createSampler({ temperature: 0.5, top_p: 0.6, seed: 1 }).probabilities(m), [1, 0, 0], 1e-12);
  });

  it("−Infinity logits get probability 0 and never count toward top-p", () => {
    const l = f32([-Infinity, 0, -Infinity, 0]);
    expectClose(createSampler({ top_p: 0.9, seed: 1 }).probabilities(l), [0, 0.5, 0, 0.5], 1e-12);
    expectClose(createSampler({ top_k: 3, seed: 1 }).probabilities(l), [0, 0.5, 0, 0.5], 1e-12);
    const s = createSampler({ seed: 1 });
    for (let i = 0; i < 50; i++) expect([1, 3]).toContain(s.sample(l));
    expectError(() => createSampler({ top_k: 2, seed: 1 }).sample(f32([0, NaN, 1])), "invalid_logits");
    expectError(() => createSampler({ top_p: 0.5, seed: 1 }).sample(f32([0, NaN, 1])), "invalid_logits");
  });

  it("property: top-p (quickselect) keeps exactly the set of a literal sort-and-cumsum implementation", () => {
    fc.assert(
      fc.property(
        fc.array(fc.float({ min: -8, max: 8, noNaN: true, noDefaultInfinity: true }), { minLength: 1, maxLength: 300 }),
        fc.double({ min: 0.01, max: 0.99, noNaN: true }),
        (xs, topP) => {
          const l = f32(xs);
          const probs = softmax(l);
          const kept = hfTopPKept(probs, topP);
          const p = createSampler({ top_p: topP, seed: 1 }).probabilities(l);
          const got = new Set<number>();
          p.forEach((v, i) => v > 0 && got.add(i));
          // Ties at the boundary may be split differently (torch's order is unspecified); compare sizes then.
          const boundaryTie = probs.some((x, i) => kept.has(i) && probs.some((y, j) => j !== i && y === x && !kept.has(j)));
          if (boundaryTie) expect(got.size).toBe(kept.size);
          else expect([...got].sort()).toEqual([...kept].sort());
        },
      ),
      { numRuns: 300 },
    );
  });

  it("full vocabulary: top-k 50 + top-p 0.9 and top-p alone match the literal implementation", () => {
    const l = randomLogits(V, 2, 6);
    // top-k 50 by sorting.
    const ids = Array.from({ length: V }, (_, i) => i).sort((a, b) => l[b]! - l[a]! || a - b);
    const top50 = ids.slice(0, 50);
    const p50 = softmax(top50.map((i) => l[i]!));
    const keptK = hfTopPKept(p50, 0.9);
    const pk = createSampler({ top_k: 50, top_p: 0.9, seed: 1 }).probabilities(l);
    const keptMass = [...keptK].reduce((s, j) => s + p50[j]!, 0);
    top50.forEach((id, j) => expect(Math.abs(pk[id]! - (keptK.has(j) ? p50[j]! / keptMass : 0))).toBeLessThan(1e-9));
    expect(pk.reduce((s, x) => s + x, 0)).toBeCloseTo(1, 9);

    const all = softmax(l);
    const keptP = hfTopPKept(all, 0.3);
    const pp = createSampler({ top_p: 0.3, seed: 1 }).probabilities(l);
    let n = 0;
    pp.forEach((v, i) => {
      if (v > 0) {
        n++;
        expect(keptP.has(i)).toBe(true);
      }
    });
    expect(n).toBe(keptP.size);
    expect(n).toBeGreaterThan(1000);
  });

  it("top-p whose boundary falls among the far tail (beyond 32 nats below the top) is still exact", () => {
    const n = 1001;
    const l = new Float32Array(n);
    for (let j = 1; j < n; j++) l[j] = -32.5 - j * 1e-3;
    const topP = 1 - 1e-12;
    const kept = hfTopPKept(softmax(l), topP);
    expect(kept.size).toBeGreaterThan(500);
    expect(kept.size).toBeLessThan(n);
    const p = createSampler({ top_p: topP, seed: 1 }).probabilities(l);
    const got = new Set<number>();
    p.forEach((v, i) => v > 0 && got.add(i));
    expect([...got].sort((a, b) => a - b)).toEqual([...kept].sort((a, b) => a - b));
  });
});

describe("multinomial draws", () => {
  it("same seed → same tokens; different seed → different tokens", () => {
    const l = randomLogits(20_000, 3, 4);
    const run = (params: SamplingParams) => {
      const s = createSampler(params);
      return Array.from({ length: 40 }, () => s.sample(l));
    };
    for (const p of [{}, { top_k: 40 }, { top_p: 0.8 }, { top_k: 100, top_p: 0.5, temperature: 0.7, repetition_penalty: 1.2 }]) {
      const a = run({ ...p, seed: 2024 });
      expect(run({ ...p, seed: 2024 })).toEqual(a);
      expect(run({ ...p, seed: 2025 })).not.toEqual(a);
    }
    const s = createSampler({});
    expect(Number.isSafeInteger(s.seed)).toBe(true);
    expect(createSampler({ seed: 77 }).seed).toBe(77);
  });

  it("empirical frequencies match the distribution (fixed seed, 4.5σ)", () => {
    const N = 40_000;
    const check = (params: SamplingParams, logits: Float32Array, expected: number[]) => {
      const s = createSampler(params);
      const counts = new Array(expected.length).fill(0);
      for (let i = 0; i < N; i++) counts[s.sample(logits)]++;
      expected.forEach((p, i) => {
        const sigma = Math.sqrt((p * (1 - p)) / N);
        expect(Math.abs(counts[i] / N - p)).toBeLessThanOrEqual(4.5 * sigma + 1e-12);
      });
    };
    const l = logOf([0.1, 0.2, 0.3, 0.4]);
    check({ seed: 7 }, l, [0.1, 0.2, 0.3, 0.4]);
    check({ seed: 8, top_k: 3 }, l, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]);
    check({ seed: 9, top_p: 0.6 }, l, [0, 0, 0.3 / 0.7, 0.4 / 0.7]);
    check({ seed: 10, temperature: 2 }, l, softmax(l, 2));
  });
});

describe("parameter validation", () => {
  it("defaults", () => {
    expect(resolveSamplingParams({})).toEqual({ temperature: 1, top_k: 0, top_p: 1, repetition_penalty: 1, do_sample: true });
    expect(resolveSamplingParams({ temperature: null, top_p: null, seed: null })).toEqual(resolveSamplingParams({}));
    expect(createSampler({}).greedy).toBe(false);
  });

  it("typed errors naming the parameter", () => {
    const bad: Array<[SamplingParams, string]> = [
      [{ temperature: -0.1 }, "temperature"],
      [{ temperature: NaN }, "temperature"],
      [{ temperature: Infinity }, "temperature"],
      [{ top_p: 0 }, "top_p"],
      [{ top_p: 1.01 }, "top_p"],
      [{ top_p: -0.5 }, "top_p"],
      [{ top_p: NaN }, "top_p"],
      [{ top_k: -1 }, "top_k"],
      [{ top_k: 2.5 }, "top_k"],
      [{ top_k: Infinity }, "top_k"],
      [{ repetition_penalty: 0 }, "repetition_penalty"],
      [{ repetition_penalty: -1 }, "repetition_penalty"],
      [{ repetition_penalty: Infinity }, "repetition_penalty"],
      [{ seed: 1.5 }, "seed"],
      [{ seed: 2 ** 60 }, "seed"],
      [{ temperature: "1" as unknown as number }, "temperature"],
      [{ do_sample: "yes" as unknown as boolean }, "do_sample"],
    ];
    for (const [params, name] of bad) expectError(() => createSampler(params), "invalid_parameter", name);
    expectError(() => createSampler(null as unknown as SamplingParams), "invalid_parameter");
  });
});

describe("speed (vocabulary 151936)", () => {
  it("a sampling step with top-k 50 + top-p stays well under a decode step's budget", () => {
    const l = randomLogits(V, 4, 5);
    const s = createSampler({ top_k: 50, top_p: 0.9, temperature: 0.7, repetition_penalty: 1.05, seed: 1 });
    s.observe(Array.from({ length: 300 }, (_, i) => i * 7));
    for (let i = 0; i < 5; i++) s.sample(l);
    const t0 = performance.now();
    for (let i = 0; i < 50; i++) s.sample(l);
    const per = (performance.now() - t0) / 50;
    // Typically ~0.5 ms; the bound is loose because the test machine is shared.
    expect(per).toBeLessThan(15);
  });
});

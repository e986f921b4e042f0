/**
 * Next-token selection over one row of logits, in the order of transformers' `generate()` (4.46.1):
 * repetition penalty (a logits *processor*, so it also applies to greedy decoding) → temperature →
 * top-k → top-p (the sampling *warpers*) → softmax → multinomial draw.
 *
 * Randomness: xoshiro128** 1.1 (Blackman & Vigna), its 128-bit state filled from SplitMix64(seed);
 * one draw = one 53-bit double in [0, 1) made from two 32-bit outputs. The same seed, parameters and
 * logits give the same tokens on every platform (integer arithmetic only; no `Math.random`).
 *
 * Cost per step: one pass over the vocabulary for greedy; with top-k a bounded min-heap pass plus work
 * proportional to k; top-p without top-k uses a weighted quickselect (expected O(V), no full sort).
 * Scratch buffers live in the sampler and are reused across steps.
 */
import { CodedError } from "../../../shared/src/errors.ts";

/** Sampling parameters (names as in the OpenAI / transformers APIs). `null` means "not set". */
export interface SamplingParams {
  /** ≥ 0; 0 means greedy. Default 1. */
  temperature?: number | null;
  /** Keep the k highest logits (ties with the k-th are kept, like HF); 0 = off. Default 0. */
  top_k?: number | null;
  /** Nucleus mass in (0, 1]; 1 = off. Default 1. */
  top_p?: number | null;
  /** > 0; 1 = off. Divides positive / multiplies negative logits of every token seen so far. Default 1. */
  repetition_penalty?: number | null;
  /** Any safe integer; omitted → a random seed (reported as {@link Sampler.seed}). */
  seed?: number | null;
  /** false → greedy regardless of temperature. Default true. */
  do_sample?: boolean | null;
}

/** Stable codes of {@link SamplingError}. `invalid_parameter` matches the public API code of the same name. */
export type SamplingErrorCode = "invalid_parameter" | "invalid_logits";

/** A bad sampling parameter (`param` names it) or logits that cannot be sampled (NaN, +∞, all −∞, empty). */
export class SamplingError extends CodedError<SamplingErrorCode> {
  readonly param: string | undefined;
  constructor(code: SamplingErrorCode, message: string, param?: string) {
    super(code, message);
    this.param = param;
  }
}

/** Picks tokens for one sequence; keeps the ids seen so far for the repetition penalty. */
export interface Sampler {
  /** True when decoding is greedy (temperature 0 or do_sample false). */
  readonly greedy: boolean;
  /** The seed in use (the given one, or the random one drawn at creation). */
  readonly seed: number;
  /** The validated parameters with defaults filled in. */
  readonly params: Readonly<ResolvedSamplingParams>;
  /** Adds ids to the repetition-penalty context: the prompt, and any token fed back that `sample` did not pick. */
  observe(ids: ArrayLike<number>): void;
  /**
   * Picks the next token from `logits` (one row, length = vocabulary) and adds it to the penalty
   * context. `logits` is used as scratch during the call but holds its original values afterwards.
   * @throws SamplingError `invalid_logits`
   */
  sample(logits: Float32Array): number;
  /** The distribution `sample` would draw from (dense; one-hot when greedy). For tests and diagnostics. */
  probabilities(logits: Float32Array): Float64Array;
}

/** Parameters after validation and defaults. */
export interface ResolvedSamplingParams {
  temperature: number;
  top_k: number;
  top_p: number;
  repetition_penalty: number;
  do_sample: boolean;
}

// ---------------------------------------------------------------------------------------------- PRNG

const MASK64 = (1n << 64n) - 1n;

/** xoshiro128** 1.1 with SplitMix64 seeding. Deterministic for a given seed. */
export class Xoshiro128StarStar {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** @param seed any safe integer (negative values are taken modulo 2⁶⁴) */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new SamplingError("invalid_parameter", "seed must be a safe integer", "seed");
    let x = BigInt.asUintN(64, BigInt(seed));
    const splitmix = (): bigint => {
      x = (x + 0x9e3779b97f4a7c15n) & MASK64;
      let z = x;
      z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
      z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
      return z ^ (z >> 31n);
    };
    const a = splitmix();
    const b = splitmix();
    this.s0 = Number(a & 0xffffffffn);
    this.s1 = Number(a >> 32n);
    this.s2 = Number(b & 0xffffffffn);
    this.s3 = Number(b >> 32n);
    // The all-zero state is the generator's only fixed point.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** Next 32-bit output as an unsigned integer. */
  nextUint32(): number {
    const s1 = this.s1;
    const r = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return r;
  }

  /** Uniform double in [0, 1) with 53 random bits (two outputs). */
  nextDouble(): number {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

// ------------------------------------------------------------------------------------ validation

function optionalNumber(params: SamplingParams, name: keyof SamplingParams, dflt: number): number {
  const v = params[name];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new SamplingError("invalid_parameter", `${name} must be a finite number`, name);
  }
  return v;
}

/**
 * Validates parameters and fills defaults (temperature 1, top_k 0, top_p 1, repetition_penalty 1, do_sample true).
 * @throws SamplingError `invalid_parameter` naming the parameter
 */
export function resolveSamplingParams(params: SamplingParams): ResolvedSamplingParams {
  if (params === null || typeof params !== "object") throw new SamplingError("invalid_parameter", "sampling parameters must be an object");
  const temperature = optionalNumber(params, "temperature", 1);
  if (temperature < 0) throw new SamplingError("invalid_parameter", "temperature must be ≥ 0", "temperature");
  const top_k = optionalNumber(params, "top_k", 0);
  if (top_k < 0 || !Number.isInteger(top_k)) throw new SamplingError("invalid_parameter", "top_k must be an integer ≥ 0", "top_k");
  const top_p = optionalNumber(params, "top_p", 1);
  if (!(top_p > 0 && top_p <= 1)) throw new SamplingError("invalid_parameter", "top_p must be in (0, 1]", "top_p");
  const repetition_penalty = optionalNumber(params, "repetition_penalty", 1);
  if (!(repetition_penalty > 0)) throw new SamplingError("invalid_parameter", "repetition_penalty must be > 0", "repetition_penalty");
  const ds = params.do_sample;
  if (ds !== undefined && ds !== null && typeof ds !== "boolean") {
    throw new SamplingError("invalid_parameter", "do_sample must be a boolean", "do_sample");
  }
  const seed = params.seed;
  if (seed !== undefined && seed !== null && (typeof seed !== "number" || !Number.isSafeInteger(seed))) {
    throw new SamplingError("invalid_parameter", "seed must be a safe integer", "seed");
  }
  return { temperature, top_k, top_p, repetition_penalty, do_sample: ds ?? true };
}

// ------------------------------------------------------------------------------------- sampler

/**
 * Creates a sampler for one sequence.
 * @param params validated here; see {@link resolveSamplingParams}
 * @param options.vocabSize initial size of the penalty bitmap (grows if needed); default 151936
 * @throws SamplingError `invalid_parameter`
 */
export function createSampler(params: SamplingParams, options: { vocabSize?: number } = {}): Sampler {
  const resolved = resolveSamplingParams(params);
  const seed = params.seed ?? randomSeed();
  return new SamplerImpl(resolved, seed, options.vocabSize ?? 151936);
}

function randomSeed(): number {
  const u = new Uint32Array(2);
  globalThis.crypto.getRandomValues(u);
  // 53-bit non-negative safe integer.
  return (u[0]! & 0x1fffff) * 4294967296 + u[1]!;
}

/** Top-p histogram: 64 buckets per nat of −log-weight up to 32 nats, then one bucket for the rest. */
const BUCKETS_PER_NAT = 64;
const BUCKET_RANGE = 32;
const LAST_BUCKET = BUCKETS_PER_NAT * BUCKET_RANGE;

class SamplerImpl implements Sampler {
  readonly greedy: boolean;
  readonly seed: number;
  readonly params: Readonly<ResolvedSamplingParams>;
  private readonly rng: Xoshiro128StarStar;
  private readonly penalty: number;

  // Repetition-penalty context: a bitmap of seen ids plus the list of them.
  private seen: Uint8Array | null = null;
  private seenIds = new Int32Array(0);
  private seenCount = 0;
  private saved = new Float32Array(0);

  // Per-step scratch, sized to the vocabulary on first use.
  private weights = new Float64Array(0);
  private cand = new Int32Array(0);
  private heap = new Float64Array(0);
  private readonly bucketMass = new Float64Array(LAST_BUCKET + 1);
  private readonly bucketCount = new Int32Array(LAST_BUCKET + 1);
  /** Result of `prepare`: kept token count, whether `cand` lists them (else ids 0..n-1), their total weight. */
  private kept = 0;
  private useCand = false;
  private keptMass = 0;

  constructor(params: ResolvedSamplingParams, seed: number, private readonly vocabSize: number) {
    this.params = Object.freeze({ ...params });
    this.greedy = !params.do_sample || params.temperature === 0;
    this.seed = seed;
    this.rng = new Xoshiro128StarStar(seed);
    // HF multiplies/divides by the penalty as a float32 scalar.
    this.penalty = Math.fround(params.repetition_penalty);
  }

  observe(ids: ArrayLike<number>): void {
    if (this.penalty === 1) return;
    for (let i = 0; i < ids.length; i++) this.remember(ids[i]!);
  }

  private remember(id: number): void {
    if (this.penalty === 1 || !Number.isInteger(id) || id < 0 || id > 0x7fffffff) return;
    if (!this.seen || id >= this.seen.length) {
      const grown = new Uint8Array(Math.max(id + 1, this.vocabSize, (this.seen?.length ?? 0) * 2));
      if (this.seen) grown.set(this.seen);
      this.seen = grown;
    }
    if (this.seen[id]) return;
    this.seen[id] = 1;
    if (this.seenCount === this.seenIds.length) {
      const grown = new Int32Array(Math.max(64, this.seenCount * 2));
      grown.set(this.seenIds);
      this.seenIds = grown;
    }
    this.seenIds[this.seenCount++] = id;
  }

  sample(logits: Float32Array): number {
    const id = this.withPenalty(logits, () => {
      if (this.greedy) return argmax(logits);
      this.prepare(logits);
      return this.draw();
    });
    this.remember(id);
    return id;
  }

  probabilities(logits: Float32Array): Float64Array {
    const out = new Float64Array(logits.length);
    this.withPenalty(logits, () => {
      if (this.greedy) {
        out[argmax(logits)] = 1;
        return 0;
      }
      this.prepare(logits);
      const w = this.weights;
      for (let j = 0; j < this.kept; j++) {
        const id = this.useCand ? this.cand[j]! : j;
        out[id] = w[id]! / this.keptMass;
      }
      return 0;
    });
    return out;
  }

  /** Applies the repetition penalty in place, runs `fn`, then restores the touched logits. */
  private withPenalty(logits: Float32Array, fn: () => number): number {
    if (this.penalty === 1 || this.seenCount === 0) return fn();
    if (this.saved.length < this.seenCount) this.saved = new Float32Array(this.seenIds.length);
    const p = this.penalty;
    const n = this.seenCount;
    for (let j = 0; j < n; j++) {
      const id = this.seenIds[j]!;
      if (id >= logits.length) continue;
      const v = logits[id]!;
      this.saved[j] = v;
      logits[id] = v < 0 ? v * p : v / p;
    }
    try {
      return fn();
    } finally {
      for (let j = 0; j < n; j++) {
        const id = this.seenIds[j]!;
        if (id < logits.length) logits[id] = this.saved[j]!;
      }
    }
  }

  /** Temperature → top-k → top-p; leaves the kept set and its weights exp((l − max) / T) in scratch. */
  private prepare(logits: Float32Array): void {
    const V = logits.length;
    if (V === 0) throw new SamplingError("invalid_logits", "empty logits");
    if (this.weights.length < V) {
      this.weights = new Float64Array(V);
      this.cand = new Int32Array(V);
    }
    const { top_k: k, top_p: topP, temperature: T } = this.params;
    const w = this.weights;
    const cand = this.cand;
    let n: number;
    let useCand = false;
    if (k > 0 && k < V) {
      if (this.heap.length < k) this.heap = new Float64Array(k);
      n = selectTopK(logits, k, this.heap, cand);
      useCand = true;
    } else {
      n = V;
    }

    let max = -Infinity;
    if (useCand) {
      for (let j = 0; j < n; j++) {
        const v = logits[cand[j]!]!;
        if (v > max) max = v;
      }
    } else {
      for (let i = 0; i < V; i++) {
        const v = logits[i]!;
        if (v > max) max = v;
        else if (v !== v) throw new SamplingError("invalid_logits", "logits contain NaN");
      }
    }
    if (max === Infinity) throw new SamplingError("invalid_logits", "logits contain +Infinity");
    if (max === -Infinity) throw new SamplingError("invalid_logits", "every logit is -Infinity");

    let Z = 0;
    if (useCand) {
      for (let j = 0; j < n; j++) {
        const id = cand[j]!;
        const e = Math.exp((logits[id]! - max) / T);
        w[id] = e;
        Z += e;
      }
      if (topP < 1) {
        n = nucleus(cand, n, w, topP * Z);
        Z = 0;
        for (let j = 0; j < n; j++) Z += w[cand[j]!]!;
      }
    } else if (topP < 1) {
      n = this.nucleusFullVocab(logits, max, T, topP);
      Z = 0;
      for (let j = 0; j < n; j++) Z += w[cand[j]!]!;
      useCand = true;
    } else {
      for (let i = 0; i < V; i++) {
        const e = Math.exp((logits[i]! - max) / T);
        w[i] = e;
        Z += e;
      }
    }
    this.kept = n;
    this.useCand = useCand;
    this.keptMass = Z;
  }

  /**
   * Top-p over the whole vocabulary without sorting it: one pass computes the weights and a histogram
   * of their mass over buckets of −log-weight (1/64 nat wide); walking the buckets from the top finds
   * the bucket where the kept mass crosses top_p · Z; a second pass lists the tokens of the buckets
   * above it (all kept) and the members of that bucket, among which {@link nucleus} picks the exact
   * boundary. Leaves the kept ids in `cand[0..n)` and returns n.
   */
  private nucleusFullVocab(logits: Float32Array, max: number, T: number, topP: number): number {
    const V = logits.length;
    const w = this.weights;
    const cand = this.cand;
    const mass = this.bucketMass;
    const count = this.bucketCount;
    mass.fill(0);
    count.fill(0);
    let Z = 0;
    for (let i = 0; i < V; i++) {
      const x = (max - logits[i]!) / T;
      const e = Math.exp(-x);
      w[i] = e;
      Z += e;
      const b = x < BUCKET_RANGE ? Math.floor(x * BUCKETS_PER_NAT) : LAST_BUCKET;
      mass[b] = mass[b]! + e;
      count[b]!++;
    }
    const target = topP * Z;
    let acc = 0;
    let above = 0; // tokens in buckets before the crossing one
    let c = 0;
    for (; c < LAST_BUCKET; c++) {
      if (acc + mass[c]! >= target) break;
      acc += mass[c]!;
      above += count[c]!;
    }
    // Buckets before `c` hold x < 32, hence weight > 0; zero weights (−∞ logits) sit in the last bucket.
    let k = 0;
    let m = above;
    for (let i = 0; i < V; i++) {
      const x = (max - logits[i]!) / T;
      const b = x < BUCKET_RANGE ? Math.floor(x * BUCKETS_PER_NAT) : LAST_BUCKET;
      if (b < c) cand[k++] = i;
      else if (b === c && w[i]! > 0) cand[m++] = i;
    }
    const members = m - above;
    const r = members > 0 ? nucleus(cand.subarray(above, m), members, w, target - acc) : 0;
    return Math.max(above + r, 1);
  }

  /** Multinomial draw over the kept set. */
  private draw(): number {
    const w = this.weights;
    let u = this.rng.nextDouble() * this.keptMass;
    let last = -1;
    for (let j = 0; j < this.kept; j++) {
      const id = this.useCand ? this.cand[j]! : j;
      const wi = w[id]!;
      if (wi > 0) {
        last = id;
        u -= wi;
        if (u < 0) return id;
      }
    }
    // Rounding can leave u ≥ 0 after the last token; it belongs to the last token with weight.
    if (last < 0) throw new SamplingError("invalid_logits", "no token has positive probability");
    return last;
  }
}

/**
 * Index of the largest logit; ties go to the lowest id (like `torch.argmax`).
 * @throws SamplingError `invalid_logits` on NaN, +∞, all −∞ or empty input
 */
export function argmax(logits: Float32Array): number {
  let best = -Infinity;
  let bi = -1;
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i]!;
    if (v > best) {
      best = v;
      bi = i;
    } else if (v !== v) {
      throw new SamplingError("invalid_logits", "logits contain NaN");
    }
  }
  if (bi < 0) throw new SamplingError("invalid_logits", logits.length === 0 ? "empty logits" : "every logit is -Infinity");
  if (best === Infinity) throw new SamplingError("invalid_logits", "logits contain +Infinity");
  return bi;
}

/**
 * Writes into `out` the ids whose logit is ≥ the k-th largest (HF `TopKLogitsWarper`: ties with the
 * k-th value survive, so the count can exceed k) and returns their count. One pass with a min-heap of
 * the k largest values, one pass to collect. Requires 0 < k < logits.length.
 */
function selectTopK(logits: Float32Array, k: number, heap: Float64Array, out: Int32Array): number {
  const V = logits.length;
  let size = 0;
  let nan = false;
  for (let i = 0; i < V; i++) {
    const v = logits[i]!;
    if (size < k) {
      if (v !== v) {
        nan = true;
        continue;
      }
      // Sift up.
      let c = size++;
      while (c > 0) {
        const p = (c - 1) >> 1;
        if (heap[p]! <= v) break;
        heap[c] = heap[p]!;
        c = p;
      }
      heap[c] = v;
    } else if (v > heap[0]!) {
      // Replace the root (smallest kept) and sift down.
      let c = 0;
      for (;;) {
        const l = 2 * c + 1;
        if (l >= k) break;
        const r = l + 1;
        const m = r < k && heap[r]! < heap[l]! ? r : l;
        if (heap[m]! >= v) break;
        heap[c] = heap[m]!;
        c = m;
      }
      heap[c] = v;
    } else if (v !== v) {
      nan = true;
    }
  }
  if (nan) throw new SamplingError("invalid_logits", "logits contain NaN");
  const thr = heap[0]!;
  let n = 0;
  for (let i = 0; i < V; i++) if (logits[i]! >= thr) out[n++] = i;
  return n;
}

/**
 * HF `TopPLogitsWarper` on the candidates `cand[0..n)` with weights `w[id]` (unnormalised): going
 * down from the most likely token, a token is kept while the mass of the tokens above it is below
 * `target` = top_p · total (equivalently HF removes it when its ascending cumulative probability is
 * ≤ 1 − top_p), and the top token is always kept. Reorders `cand` so the kept tokens come first and
 * returns their count.
 *
 * Weighted quickselect (expected O(n)) under a strict total order: higher weight first, equal
 * weights by lower id (torch's sort leaves tie order unspecified; this makes it deterministic).
 */
function nucleus(cand: Int32Array, n: number, w: Float64Array, target: number): number {
  const before = (a: number, b: number): boolean => {
    const wa = w[a]!;
    const wb = w[b]!;
    return wa > wb || (wa === wb && a < b);
  };
  let lo = 0;
  let hi = n;
  let acc = 0; // mass of cand[0..lo), all kept
  while (lo < hi) {
    // Median of three as pivot, moved to hi − 1.
    const mid = (lo + hi) >>> 1;
    const a = cand[lo]!;
    const b = cand[mid]!;
    const c = cand[hi - 1]!;
    let pi: number;
    if (before(a, b)) pi = before(b, c) ? mid : before(a, c) ? hi - 1 : lo;
    else pi = before(a, c) ? lo : before(b, c) ? hi - 1 : mid;
    const pivot = cand[pi]!;
    cand[pi] = cand[hi - 1]!;
    cand[hi - 1] = pivot;
    // Partition: tokens ranked before the pivot go left.
    let g = lo;
    let mass = 0;
    for (let j = lo; j < hi - 1; j++) {
      const x = cand[j]!;
      if (before(x, pivot)) {
        cand[j] = cand[g]!;
        cand[g++] = x;
        mass += w[x]!;
      }
    }
    cand[hi - 1] = cand[g]!;
    cand[g] = pivot;
    if (acc + mass >= target) {
      hi = g; // the crossing token is ranked before the pivot
    } else if (acc + mass + w[pivot]! >= target) {
      return g + 1; // the pivot is the crossing token: it and everything before it are kept
    } else {
      acc += mass + w[pivot]!;
      lo = g + 1;
    }
  }
  // Mass never reached the target (rounding at the boundary): everything confirmed so far is kept.
  return Math.max(lo, 1);
}

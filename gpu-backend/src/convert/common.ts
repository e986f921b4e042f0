/**
 * What the three graph builders share: the conversion dtype, a source of checkpoint tensors, and a
 * {@link ModuleEmitter} that turns checkpoint tensors into initializers (read lazily at write time, so
 * only one tensor is in memory at once) and emits the recurring layers (Linear, LayerNorm, RMSNorm).
 */
import type { DeferredBytes, ElemType, GraphBuilder, Value } from "../onnx/index.ts";
import { type QuantConfig, checkQuantConfig, quantizeBlockwise, zeroPointRowBytes } from "./quantize.ts";
import { CodedError } from "../../../shared/src/errors.ts";

/** Output precision of a conversion. */
export type ConvertDtype = "fp32" | "fp16" | "int8" | "int4";

/** All conversion dtypes. */
export const CONVERT_DTYPES: readonly ConvertDtype[] = ["fp32", "fp16", "int8", "int4"];

/** Where checkpoint tensors come from (satisfied by the checkpoint module's `CheckpointWeights`). */
export interface TensorSource {
  info(name: string): { shape: number[]; dtype?: string };
  readF32(name: string): Promise<Float32Array>;
  /** Raw stored bytes; lets F32 tensors be used without a decoding copy. */
  readRaw?(name: string): Promise<Uint8Array>;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A tensor as float32; an F32 tensor is viewed in place (no second copy of a large matrix). */
export async function readFloat32(src: TensorSource, name: string): Promise<Float32Array> {
  if (src.readRaw && LITTLE_ENDIAN && src.info(name).dtype === "F32") {
    const raw = await src.readRaw(name);
    if (raw.byteOffset % 4 === 0 && raw.byteLength % 4 === 0) return new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
  }
  return src.readF32(name);
}

/** Options shared by the graph builders. */
export interface BuildOptions {
  dtype: ConvertDtype;
  /** Quantization of int8/int4 (defaults: block 32, asymmetric, accuracy_level 4). */
  quant?: Partial<Omit<QuantConfig, "bits">>;
}

/** Thrown for a problem with the model being converted (names the tensor or setting). */
export class ConvertError extends CodedError<"unsupported" | "bad_weights" | "bad_options" | "output_exists"> {}

/** Activation element type for a conversion dtype (quantized graphs compute in float32). */
export function floatTypeOf(dtype: ConvertDtype): "float32" | "float16" {
  return dtype === "fp16" ? "float16" : "float32";
}

/** The smallest finite float32 (what transformers fills masked attention scores with). */
export const F32_MIN = -3.4028234663852886e38;

// ---------------------------------------------------------------------------------------------------------
// Tensor data

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** IEEE half bits of a float32 value, round-to-nearest-even (overflow → ±Inf, NaN kept). */
export function float32ToFloat16Bits(value: number): number {
  f32Scratch[0] = value;
  const x = u32Scratch[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal → ±0
    mant |= 0x800000; // implicit 1
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++; // may carry into the exponent: still correct
  return sign | half;
}

/** float32 values → little-endian float16 bytes. */
export function float16Bytes(values: Float32Array): Uint8Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = float32ToFloat16Bits(values[i]!);
  return new Uint8Array(out.buffer);
}

function bytesOf(a: Float32Array | Uint8Array): Uint8Array {
  return a instanceof Uint8Array ? a : new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Elements per piece when a transformed tensor is produced piecewise (16 MB of float32). */
const PIECE_ELEMS = 1 << 22;

/** float32 values as bytes of `type`: float32 as one view (no copy), float16 converted piece by piece. */
export async function* floatPieces(values: Float32Array, type: "float32" | "float16"): AsyncGenerator<Uint8Array> {
  if (type === "float32") {
    yield bytesOf(values);
    return;
  }
  for (let i = 0; i < values.length; i += PIECE_ELEMS) yield float16Bytes(values.subarray(i, i + PIECE_ELEMS));
}

/**
 * W [rows, cols] transposed to [cols, rows], produced a band of output rows at a time so that only W and
 * one band are in memory (the LM head of a real model is 151936 × 1536).
 */
export async function* transposedPieces(w: Float32Array, rows: number, cols: number, type: "float32" | "float16"): AsyncGenerator<Uint8Array> {
  const band = Math.max(1, Math.floor(PIECE_ELEMS / rows));
  for (let c0 = 0; c0 < cols; c0 += band) {
    const c1 = Math.min(cols, c0 + band);
    const piece = new Float32Array((c1 - c0) * rows);
    for (let r = 0; r < rows; r++) {
      const src = r * cols;
      for (let c = c0; c < c1; c++) piece[(c - c0) * rows + r] = w[src + c]!;
    }
    yield* floatPieces(piece, type);
  }
}

/** A deferred payload produced by `produce` (piecewise for the writer; concatenated by `read`). */
export function deferredPieces(byteLength: number, produce: () => AsyncIterable<Uint8Array>): DeferredBytes {
  return {
    byteLength,
    chunks: produce,
    read: async () => {
      const out = new Uint8Array(byteLength);
      let off = 0;
      for await (const piece of produce()) {
        if (off + piece.byteLength > byteLength) throw new ConvertError("bad_weights", `payload longer than the promised ${byteLength} bytes`);
        out.set(piece, off);
        off += piece.byteLength;
      }
      return out;
    },
  };
}

/**
 * A value computed once and handed to `uses` consumers (the packed weight, scales and zero points of one
 * quantized matrix come from a single read); dropped after the last consumer took it.
 */
function shared<T>(uses: number, make: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  let left = uses;
  return () => {
    const cur = p ?? (p = make());
    if (--left === 0) p = undefined;
    return cur;
  };
}

/**
 * The MatMulNBits settings of a conversion (undefined for fp32/fp16): bits from the dtype; block 32,
 * asymmetric and accuracy_level 4 (int8 compute) unless overridden.
 */
export function quantConfigFor(options: BuildOptions): QuantConfig | undefined {
  if (options.dtype !== "int8" && options.dtype !== "int4") return undefined;
  const q = options.quant ?? {};
  const cfg: QuantConfig = {
    bits: options.dtype === "int8" ? 8 : 4,
    blockSize: q.blockSize ?? 32,
    symmetric: q.symmetric ?? false,
    accuracyLevel: q.accuracyLevel ?? 4,
  };
  try {
    checkQuantConfig(cfg.blockSize, cfg);
  } catch (e) {
    throw new ConvertError("bad_options", (e as Error).message, { cause: e });
  }
  if (![0, 1, 2, 3, 4].includes(cfg.accuracyLevel!)) throw new ConvertError("bad_options", `accuracy_level must be 0..4, got ${cfg.accuracyLevel}`);
  return cfg;
}

// ---------------------------------------------------------------------------------------------------------
// Emitting layers

/** Options of {@link ModuleEmitter.linear}. */
export interface LinearOptions {
  /** Add `<module>.bias`. */
  bias: boolean;
  /** Quantize with MatMulNBits when the dtype is int8/int4 (default true). */
  quantize?: boolean;
  /** Take the weight from this checkpoint tensor instead of `<module>.weight` (tied LM head). */
  weight?: string;
  /** Treat a weight [N, ...] as [N, prod(...)] (Conv3d patch embedding with kernel = stride). */
  flatten?: boolean;
  /**
   * W8A8 instead of a float MatMul (float32 graphs): int8 weights with one scale per output feature, and the
   * input quantized at run time to int8 with one scale per row (token); the int32 product runs in
   * `MatMulInteger` (ONNX Runtime: VNNI/AMX integer GEMM) and is rescaled to float32.
   */
  int8Dynamic?: boolean;
  /**
   * Float MatMul only: when the transposed weight is larger than this many bytes, split it along the output
   * (column) axis into slices of at most about this size — one MatMul per slice, then a Concat on the last
   * axis. Each output element is the same dot product over K, so the result is identical. ONNX Runtime
   * prepacks every constant MatMul weight at load while the original is still resident, so the largest
   * float weight is briefly held twice; slicing bounds that transient by one slice (the LM head of a real
   * model is 151936 × 1536 float32 = 933 MB). Default: never split.
   */
  maxSliceBytes?: number;
}

/** Column width granularity of a sliced float MatMul weight (MLAS packs B in panels of 16 columns). */
const SLICE_COLUMNS = 16;

/**
 * Column ranges `[n0, n1)` splitting N output features so that each [K, n1 − n0] slice of `elemBytes`
 * elements stays within about `maxBytes` (widths rounded up to {@link SLICE_COLUMNS}); one range when the
 * whole weight fits or no limit is given.
 */
export function sliceColumns(N: number, K: number, elemBytes: number, maxBytes: number | undefined): Array<[number, number]> {
  const bytes = N * K * elemBytes;
  if (!maxBytes || !(maxBytes > 0) || bytes <= maxBytes) return [[0, N]];
  const parts = Math.ceil(bytes / maxBytes);
  const width = Math.ceil(Math.ceil(N / parts) / SLICE_COLUMNS) * SLICE_COLUMNS;
  const out: Array<[number, number]> = [];
  for (let n0 = 0; n0 < N; n0 += width) out.push([n0, Math.min(N, n0 + width)]);
  return out;
}

/**
 * Symmetric int8 weights for {@link LinearOptions.int8Dynamic}: W [N, K] → Wq int8 transposed [K, N] and
 * scales [N] with W[n, k] ≈ Wq[k, n] · scale[n] (scale = max|W[n, :]| / 127).
 */
export function quantizeInt8PerColumn(w: Float32Array, N: number, K: number): { q: Int8Array; scales: Float32Array } {
  const q = new Int8Array(K * N);
  const scales = new Float32Array(N);
  for (let n = 0; n < N; n++) {
    let amax = 0;
    for (let k = 0; k < K; k++) amax = Math.max(amax, Math.abs(w[n * K + k]!));
    const scale = Math.fround(amax / 127);
    scales[n] = scale;
    const inv = scale > 0 ? 1 / scale : 0;
    for (let k = 0; k < K; k++) q[k * N + n] = Math.max(-127, Math.min(127, Math.round(w[n * K + k]! * inv)));
  }
  return { q, scales };
}

/** `a.b.q_proj` + `a.b.k_proj` → `a.b.q_proj+k_proj`: the name of Linears of one parent computed as one. */
function fusedModuleName(modules: readonly string[]): string {
  const parent = (m: string) => m.slice(0, m.lastIndexOf("."));
  const p = parent(modules[0]!);
  if (modules.some((m) => parent(m) !== p)) throw new RangeError(`linears: ${modules.join(", ")} do not share a parent module`);
  return `${p}.${modules.map((m) => m.slice(p.length + 1)).join("+")}`;
}

/**
 * Emits layers into a graph, reading weights from a {@link TensorSource}. Initializers keep the
 * checkpoint's tensor names (`model.layers.0.self_attn.q_proj.bias`); derived tensors add a suffix:
 * `.weight_T` (transposed for MatMul), `.weight_Q4`/`_Q8`, `.weight_scales`, `.weight_zp`.
 */
export class ModuleEmitter {
  readonly float: "float32" | "float16";
  readonly quant: QuantConfig | undefined;

  constructor(
    readonly g: GraphBuilder,
    readonly weights: TensorSource,
    readonly options: BuildOptions,
  ) {
    this.float = floatTypeOf(options.dtype);
    this.quant = quantConfigFor(options);
  }

  /** Shape of a checkpoint tensor. */
  shape(name: string): number[] {
    return this.weights.info(name).shape;
  }

  /** A deferred initializer payload: `make` runs when the writer reaches this tensor. */
  private deferred(byteLength: number, make: () => Promise<Float32Array | Uint8Array>): DeferredBytes {
    return deferredPieces(byteLength, async function* () {
      yield bytesOf(await make());
    });
  }

  /** float32 data in the graph's float type. */
  toFloat(values: Float32Array): Uint8Array {
    return this.float === "float16" ? float16Bytes(values) : bytesOf(values);
  }

  /** Bytes per element of the float type. */
  get floatBytes(): number {
    return this.float === "float16" ? 2 : 4;
  }

  /** A checkpoint tensor as an initializer of the same name (float type, or float32 if `f32`). */
  param(name: string, opts: { f32?: boolean } = {}): Value {
    if (this.g.has(name)) return name;
    const shape = this.shape(name);
    const type: ElemType = opts.f32 ? "float32" : this.float;
    const n = shape.reduce((a, b) => a * b, 1);
    const bytes = type === "float16" ? 2 : 4;
    const weights = this.weights;
    return this.g.initializer(name, type, shape, deferredPieces(n * bytes, async function* () {
      yield* floatPieces(await readFloat32(weights, name), type);
    }));
  }

  /** A float scalar/1-D constant in the graph's float type (or float32). */
  constant(values: number[], dims?: number[], type: "float32" | "float16" = this.float): Value {
    if (type === "float32") return this.g.constant("float32", values, dims);
    return this.g.constantBytes("float16", float16Bytes(Float32Array.from(values)), dims ?? [values.length]);
  }

  /** Casts to float32 (no-op for float32 graphs). */
  toF32(x: Value): Value {
    return this.float === "float32" ? x : this.g.op("Cast", [x], { to: 1 });
  }

  /** Casts float32 back to the graph's float type (no-op for float32 graphs). */
  fromF32(x: Value): Value {
    return this.float === "float32" ? x : this.g.op("Cast", [x], { to: 10 });
  }

  /**
   * `y = x·Wᵀ (+ b)` for a torch Linear `<module>` (weight [out, in]). Float graphs: MatMul with the
   * transposed weight `<module>.weight_T` [in, out] (or, with {@link LinearOptions.maxSliceBytes}, column
   * slices `<module>.weight_T.<i>` with one MatMul each, concatenated). int8/int4: `com.microsoft.MatMulNBits`
   * with B/scales/zero points derived from the same weight.
   */
  linear(x: Value, module: string, opts: LinearOptions): Value {
    return this.linears(x, [module], opts)[0]!;
  }

  /**
   * Several Linears of the same input (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`) as one: their
   * weights stacked along the output axis into one MatMul (initializers named `<parent>.<a>+<b>….weight…`),
   * whose output is split back; each bias is added to its own part. Every output feature is its own dot
   * product over K, with its own quantization blocks (MatMulNBits) or scale (W8A8), so each part is what its
   * own Linear computes, up to the kernel's float summation order. One kernel call instead of several saves
   * thread-pool dispatches (3–5% of an int4 decode step on 2 cores).
   */
  linears(x: Value, modules: readonly string[], opts: LinearOptions): Value[] {
    if (modules.length === 0 || (modules.length > 1 && (opts.weight !== undefined || opts.flatten))) {
      throw new RangeError("linears: one module with `weight`/`flatten`, or several plain Linears");
    }
    const module = modules.length === 1 ? modules[0]! : fusedModuleName(modules);
    const wNames = opts.weight !== undefined ? [opts.weight] : modules.map((m) => `${m}.weight`);
    const widths = wNames.map((wName) => {
      const raw = this.shape(wName);
      const shape = opts.flatten ? [raw[0]!, raw.slice(1).reduce((a, b) => a * b, 1)] : raw;
      if (shape.length !== 2) throw new ConvertError("bad_weights", `${wName}: expected a 2-D Linear weight, got [${shape.join(", ")}]`);
      return shape as [number, number];
    });
    const K = widths[0]![1];
    const bad = widths.findIndex(([, k]) => k !== K);
    if (bad >= 0) throw new ConvertError("bad_weights", `${wNames[bad]}: input width ${widths[bad]![1]}, expected ${K} as ${wNames[0]}`);
    const Ns = widths.map(([n]) => n);
    const N = Ns.reduce((a, b) => a + b, 0);
    const weights = this.weights;
    // The [N, K] rows of every weight, stacked (a tensor is read when its bytes are written).
    const readRows = async (): Promise<Float32Array> => {
      if (wNames.length === 1) return readFloat32(weights, wNames[0]!);
      const rows = new Float32Array(N * K);
      let at = 0;
      for (const wName of wNames) {
        const w = await readFloat32(weights, wName);
        rows.set(w, at);
        at += w.length;
      }
      return rows;
    };
    const g = this.g;
    const q = opts.quantize === false ? undefined : this.quant;
    const base = `${module}.weight`;
    let y: Value;
    if (opts.int8Dynamic && this.float === "float32") {
      const get = shared(2, async () => quantizeInt8PerColumn(await readRows(), N, K));
      const B = g.initializer(`${base}_I8`, "int8", [K, N], this.deferred(N * K, async () => {
        const w = (await get()).q;
        return new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
      }));
      const S = g.initializer(`${base}_scales`, "float32", [N], this.deferred(N * 4, async () => (await get()).scales));
      y = g.within(module, () => {
        // Per-row (token) symmetric int8 input, carried as uint8 with zero point 128 (what MatMulInteger's u8×s8
        // GEMM takes): scale sx = max|x| / 127 over the last axis.
        const amax = g.op("ReduceMax", [g.op("Abs", [x])], { axes: [-1], keepdims: 1 });
        const sx = g.op("Div", [g.op("Max", [amax, g.f32Scalar(1e-30)]), g.f32Scalar(127)]); // [..., 1]
        // One QuantizeLinear over the rows (axis 0 of [rows, K], a scale and zero point per row): round-half-even
        // (x / sx) + 128 in one pass, the same bytes as Div → Round → Add → Cast (|x / sx| ≤ 127, nothing
        // saturates). The reshapes are views; the op count matters at decode (one row per sequence).
        const perRow = g.op("Reshape", [sx, g.i64([-1])]);
        const zp = g.op("Expand", [g.constant("uint8", [128], []), g.op("Shape", [perRow])]);
        const rows = g.op("QuantizeLinear", [g.op("Reshape", [x, g.i64([-1, K])]), perRow, zp], { axis: 0 });
        const xq = g.op("Reshape", [rows, g.op("Shape", [x])]);
        const acc = g.op("MatMulInteger", [xq, B, g.constant("uint8", [128], [])]);
        return g.op("Mul", [g.op("Mul", [g.op("Cast", [acc], { to: 1 }), sx]), S]);
      });
    } else if (q) {
      const kBlocks = checkQuantConfig(K, q);
      const blob = (q.blockSize * q.bits) / 8;
      const zpRow = zeroPointRowBytes(kBlocks, q.bits);
      const uses = q.symmetric ? 2 : 3;
      const get = shared(uses, async () => quantizeBlockwise(await readRows(), N, K, q));
      const B = g.initializer(`${base}_Q${q.bits}`, "uint8", [N, kBlocks, blob], this.deferred(N * kBlocks * blob, async () => (await get()).packed));
      const S = g.initializer(`${base}_scales`, this.float, [N, kBlocks], this.deferred(N * kBlocks * this.floatBytes, async () => this.toFloat((await get()).scales)));
      const inputs = [x, B, S];
      if (!q.symmetric) {
        inputs.push(g.initializer(`${base}_zp`, "uint8", [N, zpRow], this.deferred(N * zpRow, async () => (await get()).zeroPoints!)));
      }
      const attrs: Record<string, number> = { K, N, bits: q.bits, block_size: q.blockSize };
      if (q.accuracyLevel) attrs["accuracy_level"] = q.accuracyLevel;
      y = g.within(module, () => g.op("MatMulNBits", inputs, attrs, { domain: "com.microsoft" }));
    } else {
      const wt = `${base}_T`;
      const type = this.float;
      const slices = sliceColumns(N, K, this.floatBytes, opts.maxSliceBytes);
      if (slices.length === 1) {
        const W = g.has(wt)
          ? wt
          : g.initializer(wt, type, [K, N], deferredPieces(N * K * this.floatBytes, async function* () {
              yield* transposedPieces(await readRows(), N, K, type);
            }));
        y = g.within(module, () => g.op("MatMul", [x, W]));
      } else {
        // The slices are written one after another: the checkpoint tensor is read once for all of them.
        const get = shared(slices.length, readRows);
        const parts = slices.map(([n0, n1], i) => {
          const W = g.initializer(`${wt}.${i}`, type, [K, n1 - n0], deferredPieces((n1 - n0) * K * this.floatBytes, async function* () {
            yield* transposedPieces((await get()).subarray(n0 * K, n1 * K), n1 - n0, K, type);
          }));
          return g.within(module, () => g.op("MatMul", [x, W]));
        });
        y = g.within(module, () => g.op("Concat", parts, { axis: -1 }));
      }
    }
    const ys = modules.length === 1 ? [y] : g.within(module, () => g.node("Split", [y, g.i64(Ns)], { axis: -1 }, { outputs: Ns.length }));
    return ys.map((part, i) => (opts.bias ? g.within(modules[i]!, () => g.op("Add", [part, this.param(`${modules[i]}.bias`)])) : part));
  }

  /** torch LayerNorm over the last axis (`<module>.weight`, `.bias`); computed in float32. */
  layerNorm(x: Value, module: string, eps: number): Value {
    const g = this.g;
    return g.within(module, () =>
      this.fromF32(
        g.op("LayerNormalization", [this.toF32(x), this.param(`${module}.weight`, { f32: true }), this.param(`${module}.bias`, { f32: true })], {
          axis: -1,
          epsilon: { float: eps },
        }),
      ),
    );
  }

  /**
   * Qwen2RMSNorm exactly as transformers computes it: in float32 `x · 1/sqrt(mean(x²) + eps)`, cast back
   * to the input dtype, then times the weight.
   */
  rmsNorm(x: Value, module: string, eps: number): Value {
    const g = this.g;
    return g.within(module, () => {
      const x32 = this.toF32(x);
      const variance = g.op("ReduceMean", [g.op("Mul", [x32, x32])], { axes: [-1], keepdims: 1 });
      const inv = g.op("Div", [g.f32Scalar(1), g.op("Sqrt", [g.op("Add", [variance, g.f32Scalar(eps)])])]);
      return g.op("Mul", [this.param(`${module}.weight`), this.fromF32(g.op("Mul", [x32, inv]))]);
    });
  }

  /**
   * The same RMSNorm as {@link rmsNorm} in one ONNX Runtime kernel (`SimplifiedLayerNormalization`, ORT's
   * op in the ONNX domain: float32 statistics, `x / sqrt(mean(x²) + eps) · weight`). float32 graphs only:
   * float16 graphs keep transformers' cast-back-before-the-weight rounding through {@link rmsNorm}.
   */
  rmsNormFused(x: Value, module: string, eps: number): Value {
    if (this.float !== "float32") return this.rmsNorm(x, module, eps);
    const g = this.g;
    return g.within(module, () =>
      g.op("SimplifiedLayerNormalization", [x, this.param(`${module}.weight`)], { axis: -1, epsilon: { float: eps }, stash_type: 1 }),
    );
  }

  /**
   * Residual add + RMSNorm: `sum = x + skip` and `rmsNorm(sum)`, as one `com.microsoft.SkipSimplifiedLayerNormalization`
   * kernel in float32 graphs (the two ops of {@link rmsNorm} after an Add otherwise).
   */
  skipRmsNorm(x: Value, skip: Value, module: string, eps: number, addScope: string): { normed: Value; sum: Value } {
    const g = this.g;
    if (this.float !== "float32") {
      const sum = g.within(addScope, () => g.op("Add", [x, skip]));
      return { normed: this.rmsNorm(sum, module, eps), sum };
    }
    return g.within(module, () => {
      const [normed, , , sum] = g.node("SkipSimplifiedLayerNormalization", [x, skip, this.param(`${module}.weight`)], { epsilon: { float: eps } }, {
        outputs: 4,
        domain: "com.microsoft",
      }) as [Value, Value, Value, Value];
      return { normed, sum };
    });
  }

  /** `rotate_half(x)·sin + x·cos` over the last axis (cos/sin broadcastable to x). */
  rotary(x: Value, cos: Value, sin: Value, headDim: number): Value {
    const g = this.g;
    const half = headDim / 2;
    const [x1, x2] = g.node("Split", [x, g.i64([half, half])], { axis: -1 }, { outputs: 2 }) as [Value, Value];
    const rotated = g.op("Concat", [g.op("Neg", [x2]), x1], { axis: -1 });
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])]);
  }
}

/** `1 / base^(2i/dim)` for i < dim/2, computed like torch in float32 (arange/dim, pow, reciprocal). */
export function ropeInvFreq(base: number, dim: number): Float32Array {
  const out = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) {
    const exponent = Math.fround(Math.fround(2 * i) / Math.fround(dim));
    out[i] = Math.fround(1 / Math.fround(Math.pow(base, exponent)));
  }
  return out;
}

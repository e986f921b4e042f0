/**
 * Weight packing for com.microsoft.MatMulNBits and float16 conversion: checked against hand-made layouts
 * and against onnxruntime's own kernel (accuracy_level 0 dequantizes exactly, so ORT must reproduce
 * x·dequant(W)ᵀ to float32 rounding).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import { type BuildOptions, ModuleEmitter, type TensorSource, float16Bytes, float32ToFloat16Bits, transposedPieces } from "../../gpu-backend/src/convert/common.ts";
import { QuantizeError, dequantizeBlockwise, quantizeBlockwise } from "../../gpu-backend/src/convert/quantize.ts";
import { GraphBuilder, writeModel } from "../../gpu-backend/src/onnx/index.ts";
import { f16ToF32 } from "./convert-support.ts";

const tmp = mkdtempSync(join(tmpdir(), "convert-quantize-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Deterministic pseudo-random values in [-1, 1). */
function values(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  });
}

describe("quantizeBlockwise", () => {
  it("packs 4-bit values low nibble first, zero points likewise, scales per block", () => {
    // One row, K = 32, one block: values 0..15 then 15..0 in units of 1 → min 0, max 15, scale 1, zp 0.
    const w = Float32Array.from([...Array(16).keys(), ...[...Array(16).keys()].reverse()]);
    const q = quantizeBlockwise(w, 1, 32, { bits: 4, blockSize: 32 });
    expect(q.kBlocks).toBe(1);
    expect(q.blobSize).toBe(16);
    expect(q.scales[0]).toBe(1);
    expect(Array.from(q.zeroPoints!)).toEqual([0]);
    expect(q.packed[0]).toBe(0x10); // q[0]=0 low, q[1]=1 high
    expect(q.packed[1]).toBe(0x32);
    expect(q.packed[8]).toBe(0xef); // q[16]=15 low, q[17]=14 high
    // Two blocks with different zero points → one zp byte: block 0 low nibble, block 1 high nibble.
    const w2 = Float32Array.from({ length: 64 }, (_, k) => (k < 32 ? k - 10 : k - 32 - 5));
    const q2 = quantizeBlockwise(w2, 1, 64, { bits: 4, blockSize: 32 });
    const zp0 = Math.round(10 / q2.scales[0]!);
    const zp1 = Math.round(5 / q2.scales[1]!);
    expect(Array.from(q2.zeroPoints!)).toEqual([zp0 | (zp1 << 4)]);
  });

  it.each([
    [8, false],
    [8, true],
    [4, false],
    [4, true],
  ] as const)("bits %i symmetric=%s: dequantized values within half a step (K padded to whole blocks)", (bits, symmetric) => {
    const N = 5;
    const K = 80; // 3 blocks of 32, the last one padded
    const w = values(N * K, 7 + bits);
    const q = quantizeBlockwise(w, N, K, { bits, blockSize: 32, symmetric });
    expect(q.packed.length).toBe(N * 3 * ((32 * bits) / 8));
    expect(q.zeroPoints === undefined).toBe(symmetric);
    const d = dequantizeBlockwise(q);
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) {
        const scale = q.scales[n * 3 + Math.floor(k / 32)]!;
        expect(Math.abs(d[n * K + k]! - w[n * K + k]!)).toBeLessThanOrEqual(scale / 2 + 1e-7);
      }
    }
  });

  it("rejects what MatMulNBits cannot express", () => {
    expect(() => quantizeBlockwise(new Float32Array(64), 1, 64, { bits: 4, blockSize: 24 })).toThrow(QuantizeError);
    expect(() => quantizeBlockwise(new Float32Array(64), 1, 64, { bits: 3 as 4, blockSize: 32 })).toThrow(/bits/);
    expect(() => quantizeBlockwise(new Float32Array(63), 1, 64, { bits: 4, blockSize: 32 })).toThrow(/63 values/);
  });
});

describe("MatMulNBits in onnxruntime reads our packing", () => {
  it.each([
    [8, false],
    [8, true],
    [4, false],
    [4, true],
  ] as const)("bits %i symmetric=%s, K=80 N=6, block 32", async (bits, symmetric) => {
    const N = 6;
    const K = 80;
    const M = 3;
    const w = values(N * K, 99 + bits);
    const x = values(M * K, 5);
    const q = quantizeBlockwise(w, N, K, { bits, blockSize: 32, symmetric });
    const g = new GraphBuilder("nbits");
    const a = g.input("a", "float32", [M, K]);
    const inputs = [
      a,
      g.initializer("B", "uint8", [N, q.kBlocks, q.blobSize], q.packed),
      g.initializer("scales", "float32", [N, q.kBlocks], new Uint8Array(q.scales.buffer)),
    ];
    if (q.zeroPoints) inputs.push(g.initializer("zp", "uint8", [N, q.zeroPoints.length / N], q.zeroPoints));
    const y = g.op("MatMulNBits", inputs, { K, N, bits, block_size: 32, accuracy_level: 0 }, { domain: "com.microsoft" });
    g.output(y, "y", "float32", [M, N]);
    const path = join(tmp, `nbits-${bits}-${symmetric}.onnx`);
    await writeModel(path, g.model());
    const sess = await ort.InferenceSession.create(path);
    const out = (await sess.run({ a: new ort.Tensor("float32", x, [M, K]) })).y!.data as Float32Array;
    await sess.release();
    const d = dequantizeBlockwise(q);
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += x[m * K + k]! * d[n * K + k]!;
        expect(Math.abs(out[m * N + n]! - s)).toBeLessThan(1e-5);
      }
    }
  });
});

describe("ModuleEmitter.linears: projections of one input as one MatMul", () => {
  // q [6, 64], k [2, 64], v [2, 64] with biases; each part of the fused MatMul must be what its own Linear gives.
  const K = 64;
  const M = 3;
  const shapes: Record<string, number[]> = { "a.q.weight": [6, K], "a.k.weight": [2, K], "a.v.weight": [2, K], "a.q.bias": [6], "a.k.bias": [2], "a.v.bias": [2] };
  const data = Object.fromEntries(Object.entries(shapes).map(([name, shape], i) => [name, values(shape.reduce((a, b) => a * b, 1), 7 + i)]));
  const source: TensorSource = { info: (name) => ({ shape: shapes[name]!, dtype: "F32" }), readF32: async (name) => data[name]! };
  const x = values(M * K, 3);

  async function run(opts: BuildOptions, fused: boolean, int8Dynamic: boolean, name: string): Promise<Float32Array[]> {
    const g = new GraphBuilder(name);
    const e = new ModuleEmitter(g, source, opts);
    const input = g.input("x", "float32", [M, K]);
    const modules = ["a.q", "a.k", "a.v"];
    const lin = { bias: true, int8Dynamic };
    const ys = fused ? e.linears(input, modules, lin) : modules.map((m) => e.linear(input, m, lin));
    ys.forEach((y, i) => g.output(y, `y${i}`, "float32", [M, shapes[`${modules[i]}.bias`]![0]!]));
    const path = join(tmp, `${name}.onnx`);
    await writeModel(path, g.model({ opset: 17 }));
    const sess = await ort.InferenceSession.create(path);
    const out = await sess.run({ x: new ort.Tensor("float32", x, [M, K]) });
    await sess.release();
    return [0, 1, 2].map((i) => out[`y${i}`]!.data as Float32Array);
  }

  it.each([
    ["fp32", false],
    ["int8", false],
    ["int4", false],
    ["fp32", true],
  ] as const)("%s (W8A8: %s): each part equals the separate Linear", async (dtype, int8Dynamic) => {
    const tag = `${dtype}-${int8Dynamic}`;
    const separate = await run({ dtype }, false, int8Dynamic, `sep-${tag}`);
    const fused = await run({ dtype }, true, int8Dynamic, `fused-${tag}`);
    for (let i = 0; i < 3; i++) {
      expect(fused[i]!.length).toBe(separate[i]!.length);
      // The same products; a kernel may sum them in another order for another N (float32 rounding only).
      for (let j = 0; j < fused[i]!.length; j++) expect(Math.abs(fused[i]![j]! - separate[i]![j]!)).toBeLessThanOrEqual(1e-6 * Math.max(1, Math.abs(separate[i]![j]!)));
    }
  });

  it("refuses parts of different input widths, and modules of different parents", () => {
    const g = new GraphBuilder("bad");
    const odd: TensorSource = { info: (name) => ({ shape: name === "a.k.weight" ? [2, 32] : shapes[name]! }), readF32: async (name) => data[name]! };
    const input = g.input("x", "float32", [M, K]);
    expect(() => new ModuleEmitter(g, odd, { dtype: "fp32" }).linears(input, ["a.q", "a.k"], { bias: false })).toThrowError(/a\.k\.weight: input width 32, expected 64/);
    expect(() => new ModuleEmitter(g, source, { dtype: "fp32" }).linears(input, ["a.q", "b.k"], { bias: false })).toThrowError(/do not share a parent/);
  });
});

describe("ModuleEmitter.linear with int8Dynamic (W8A8): the exact arithmetic", () => {
  // x rows quantized per row: s = fround(max|x| / 127), q = roundHalfEven(fround(x / s)) (stored +128 as uint8);
  // W per output feature: w = round(W · (1 / t)), t = fround(max|W[n]| / 127); y = fround(fround(Σ q·w · s) · t) + b.
  const K = 48;
  const N = 5;
  const shapes: Record<string, number[]> = { "l.weight": [N, K], "l.bias": [N] };
  const data: Record<string, Float32Array> = { "l.weight": values(N * K, 11), "l.bias": values(N, 12) };
  const source: TensorSource = { info: (name) => ({ shape: shapes[name]!, dtype: "F32" }), readF32: async (name) => data[name]! };
  const roundHalfEven = (v: number) => {
    const f = Math.floor(v);
    const d = v - f;
    return d > 0.5 || (d === 0.5 && f % 2 !== 0) ? f + 1 : f;
  };

  function reference(x: Float32Array, rows: number): Float32Array {
    const w = data["l.weight"]!;
    const y = new Float32Array(rows * N);
    for (let r = 0; r < rows; r++) {
      let amax = 0;
      for (let k = 0; k < K; k++) amax = Math.max(amax, Math.abs(x[r * K + k]!));
      const s = Math.fround(Math.max(amax, 1e-30) / 127);
      const q = Array.from({ length: K }, (_, k) => roundHalfEven(Math.fround(x[r * K + k]! / s)));
      for (let n = 0; n < N; n++) {
        let wmax = 0;
        for (let k = 0; k < K; k++) wmax = Math.max(wmax, Math.abs(w[n * K + k]!));
        const t = Math.fround(wmax / 127);
        let acc = 0;
        for (let k = 0; k < K; k++) acc += q[k]! * Math.max(-127, Math.min(127, Math.round(w[n * K + k]! * (1 / t))));
        y[r * N + n] = Math.fround(Math.fround(Math.fround(acc) * s) * t) + data["l.bias"]![n]!;
      }
    }
    return y.map((v) => Math.fround(v));
  }

  it.each([
    ["2-D input [rows, K]", [4, K]],
    ["3-D input [batch, seq, K]", [2, 3, K]],
  ] as const)("%s: the same float32 bits as the reference", async (name, dims) => {
    const rows = dims.slice(0, -1).reduce((a, b) => a * b, 1);
    const x = values(rows * K, 5).map((v) => v * 3);
    // Row 0 holds exact half-way quotients: max 127 → scale 1, values k − 63.5 round half to even.
    x[0] = 127;
    for (let k = 1; k < K; k++) x[k] = k - 63.5;
    const g = new GraphBuilder("w8a8");
    const input = g.input("x", "float32", [...dims]);
    g.output(new ModuleEmitter(g, source, { dtype: "fp32" }).linear(input, "l", { bias: true, int8Dynamic: true }), "y", "float32", [...dims.slice(0, -1), N]);
    const path = join(tmp, `w8a8-${dims.length}.onnx`);
    await writeModel(path, g.model({ opset: 17 }));
    const sess = await ort.InferenceSession.create(path);
    const out = (await sess.run({ x: new ort.Tensor("float32", x, [...dims]) })).y!;
    await sess.release();
    expect(out.dims).toEqual([...dims.slice(0, -1), N]);
    expect(Array.from(out.data as Float32Array)).toEqual(Array.from(reference(x, rows)));
  });
});

describe("float16 and transpose helpers", () => {
  it("rounds to nearest even, handles subnormals, overflow and NaN", () => {
    expect(float32ToFloat16Bits(1)).toBe(0x3c00);
    expect(float32ToFloat16Bits(-2)).toBe(0xc000);
    expect(float32ToFloat16Bits(65504)).toBe(0x7bff);
    expect(float32ToFloat16Bits(65520)).toBe(0x7c00); // rounds up to Inf
    expect(float32ToFloat16Bits(65519)).toBe(0x7bff);
    expect(float32ToFloat16Bits(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(float32ToFloat16Bits(2 ** -25)).toBe(0x0000); // tie → even (0)
    expect(float32ToFloat16Bits(3 * 2 ** -25)).toBe(0x0002); // tie 1.5 → 2
    expect(float32ToFloat16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie → even
    expect(float32ToFloat16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie → even (up)
    expect(float32ToFloat16Bits(2 ** -14 - 2 ** -25)).toBe(0x0400); // rounds up into the normal range
    expect(float32ToFloat16Bits(NaN) & 0x7e00).toBe(0x7e00);
    expect(float32ToFloat16Bits(-Infinity)).toBe(0xfc00);
    const v = values(1000, 3).map((x) => x * 300);
    const back = f16ToF32(new Uint16Array(float16Bytes(v).buffer));
    for (let i = 0; i < v.length; i++) expect(Math.abs(back[i]! - v[i]!)).toBeLessThanOrEqual(Math.abs(v[i]!) * 2 ** -11);
  });

  it("transposes piecewise (several bands for tall matrices), in float32 and float16", async () => {
    const collect = async (it: AsyncIterable<Uint8Array>) => {
      const parts: Uint8Array[] = [];
      for await (const p of it) parts.push(Uint8Array.from(p));
      return { parts: parts.length, bytes: Buffer.concat(parts) };
    };
    for (const [rows, cols] of [
      [70, 130],
      [(1 << 20) + 3, 5], // 4M-element bands → 3 output rows per band → 2 bands
    ] as const) {
      const src = Float32Array.from({ length: rows * cols }, (_, i) => (i % 1000) - 500 + 0.25);
      const f32 = await collect(transposedPieces(src, rows, cols, "float32"));
      expect(f32.parts).toBe(rows > 1000 ? 2 : 1);
      const t = new Float32Array(f32.bytes.buffer, f32.bytes.byteOffset, rows * cols);
      for (const [i, j] of [
        [0, 0],
        [rows - 1, cols - 1],
        [3, cols - 2],
        [rows - 7, 1],
      ] as const) {
        expect(t[j * rows + i]).toBe(src[i * cols + j]);
      }
      const f16 = await collect(transposedPieces(src, rows, cols, "float16"));
      expect(f16.bytes.equals(Buffer.from(float16Bytes(t)))).toBe(true);
    }
  });
});

/**
 * Block-wise weight-only quantization in the layout of onnxruntime's contrib op `com.microsoft.MatMulNBits`:
 * a Linear weight W [N, K] (torch layout: out × in) is cut along K into blocks of `blockSize`; each block has
 * one scale and one zero point; values are unsigned `bits`-bit integers q with W ≈ (q − zp) · scale.
 *
 * - B: uint8 [N, kBlocks, blockSize·bits/8]; 4-bit values are packed two per byte, the first (even k) in the
 *   low nibble.
 * - scales: [N, kBlocks] (float32 here; the caller converts for float16 graphs).
 * - zero_points (asymmetric only): uint8 [N, ceil(kBlocks·bits/8)], packed like B.
 * K is padded with zeros up to a whole number of blocks (MatMulNBits ignores the padding).
 */
import { NamedError } from "../../../shared/src/errors.ts";

/** Quantization parameters. */
export interface QuantConfig {
  /** 4 or 8 bits per weight. */
  bits: 4 | 8;
  /** Block length along K: a power of two ≥ 16 (32 and 128 are the usual choices). */
  blockSize: number;
  /** Per-block zero points (asymmetric, default) or the implied 2^(bits−1) (symmetric). */
  symmetric?: boolean;
  /** MatMulNBits `accuracy_level`: 0 unset, 1 fp32, 4 = int8 compute (quantizes activations per block). */
  accuracyLevel?: number;
}

/** The packed tensors of one quantized weight. */
export interface QuantizedWeight {
  /** Output features (rows of W). */
  N: number;
  /** Input features (columns of W). */
  K: number;
  bits: 4 | 8;
  blockSize: number;
  kBlocks: number;
  blobSize: number;
  /** uint8 [N, kBlocks, blobSize]. */
  packed: Uint8Array;
  /** float32 [N, kBlocks]. */
  scales: Float32Array;
  /** uint8 [N, ceil(kBlocks·bits/8)], absent when symmetric. */
  zeroPoints?: Uint8Array;
}

/** Thrown for parameters MatMulNBits cannot represent. */
export class QuantizeError extends NamedError {}

/** Checks bits/blockSize; returns the number of K blocks. */
export function checkQuantConfig(K: number, q: QuantConfig): number {
  if (q.bits !== 4 && q.bits !== 8) throw new QuantizeError(`bits must be 4 or 8, got ${q.bits}`);
  if (!Number.isInteger(q.blockSize) || q.blockSize < 16 || (q.blockSize & (q.blockSize - 1)) !== 0) {
    throw new QuantizeError(`block_size must be a power of two ≥ 16, got ${q.blockSize}`);
  }
  if (!Number.isInteger(K) || K <= 0) throw new QuantizeError(`K must be a positive integer, got ${K}`);
  return Math.ceil(K / q.blockSize);
}

/** Zero-point bytes per row. */
export function zeroPointRowBytes(kBlocks: number, bits: 4 | 8): number {
  return Math.ceil((kBlocks * bits) / 8);
}

/**
 * Quantizes W [N, K] (row-major float32). Asymmetric: each block's range is widened to include 0 (so 0 is
 * exact), scale = (max − min)/(2^bits − 1), zp = round(−min/scale). Symmetric: scale = absmax/(2^(bits−1) − 1),
 * zp = 2^(bits−1).
 */
export function quantizeBlockwise(w: Float32Array, N: number, K: number, q: QuantConfig): QuantizedWeight {
  if (w.length !== N * K) throw new QuantizeError(`weight has ${w.length} values, expected ${N}×${K}`);
  const kBlocks = checkQuantConfig(K, q);
  const bits = q.bits;
  const bs = q.blockSize;
  const qmax = (1 << bits) - 1;
  const blobSize = (bs * bits) / 8;
  const packed = new Uint8Array(N * kBlocks * blobSize);
  const scales = new Float32Array(N * kBlocks);
  const zpRow = zeroPointRowBytes(kBlocks, bits);
  const zeroPoints = q.symmetric ? undefined : new Uint8Array(N * zpRow);
  const vals = new Uint8Array(bs);
  for (let n = 0; n < N; n++) {
    const row = n * K;
    for (let b = 0; b < kBlocks; b++) {
      const k0 = b * bs;
      const k1 = Math.min(K, k0 + bs);
      let scale: number;
      let zp: number;
      if (q.symmetric) {
        let amax = 0;
        for (let k = k0; k < k1; k++) amax = Math.max(amax, Math.abs(w[row + k]!));
        zp = 1 << (bits - 1);
        scale = Math.fround(amax / (zp - 1));
      } else {
        let lo = 0;
        let hi = 0;
        for (let k = k0; k < k1; k++) {
          const v = w[row + k]!;
          if (v < lo) lo = v;
          if (v > hi) hi = v;
        }
        scale = Math.fround((hi - lo) / qmax);
        zp = scale > 0 ? Math.min(qmax, Math.max(0, Math.round(-lo / scale))) : 0;
      }
      const inv = scale > 0 ? 1 / scale : 0;
      for (let k = 0; k < bs; k++) {
        const v = k0 + k < k1 ? w[row + k0 + k]! : 0;
        vals[k] = Math.min(qmax, Math.max(0, Math.round(v * inv) + zp));
      }
      scales[n * kBlocks + b] = scale;
      const blob = (n * kBlocks + b) * blobSize;
      if (bits === 8) {
        packed.set(vals, blob);
      } else {
        for (let j = 0; j < blobSize; j++) packed[blob + j] = vals[2 * j]! | (vals[2 * j + 1]! << 4);
      }
      if (zeroPoints) {
        if (bits === 8) zeroPoints[n * zpRow + b] = zp;
        else zeroPoints[n * zpRow + (b >> 1)]! |= (b & 1) === 0 ? zp : zp << 4;
      }
    }
  }
  const out: QuantizedWeight = { N, K, bits, blockSize: bs, kBlocks, blobSize, packed, scales };
  if (zeroPoints) out.zeroPoints = zeroPoints;
  return out;
}

/** The float32 weight [N, K] that MatMulNBits multiplies with: (q − zp) · scale. */
export function dequantizeBlockwise(qw: QuantizedWeight): Float32Array {
  const { N, K, bits, blockSize: bs, kBlocks, blobSize, packed, scales, zeroPoints } = qw;
  const out = new Float32Array(N * K);
  const zpRow = zeroPointRowBytes(kBlocks, bits);
  for (let n = 0; n < N; n++) {
    for (let b = 0; b < kBlocks; b++) {
      const scale = scales[n * kBlocks + b]!;
      let zp = 1 << (bits - 1);
      if (zeroPoints) {
        const byte = zeroPoints[n * zpRow + (bits === 8 ? b : b >> 1)]!;
        zp = bits === 8 ? byte : (b & 1) === 0 ? byte & 15 : byte >> 4;
      }
      const blob = (n * kBlocks + b) * blobSize;
      for (let k = 0; k < bs && b * bs + k < K; k++) {
        const qv = bits === 8 ? packed[blob + k]! : (packed[blob + (k >> 1)]! >> ((k & 1) * 4)) & 15;
        out[n * K + b * bs + k] = (qv - zp) * scale;
      }
    }
  }
  return out;
}

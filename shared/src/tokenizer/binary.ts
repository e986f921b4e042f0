/**
 * {@link CompiledBpe} as one binary blob, what the edge bundles instead of tokenizer.json: loading it is a
 * few typed-array views, not a JSON parse of the vocabulary and merges.
 *
 * Layout (little-endian): "MVBPE001" · u32 header length · header JSON (pattern, normalizer, added tokens,
 * array lengths) padded to 4 bytes · the Int32 arrays byteIds, mergeStart, mergeRight, mergeRank, mergeResult.
 */
import { TokenizerError, type CompiledBpe } from "./compile.ts";

const MAGIC = "MVBPE001";
const ARRAYS = ["byteIds", "mergeStart", "mergeRight", "mergeRank", "mergeResult"] as const;

interface Header {
  pattern: string;
  normalizer: CompiledBpe["normalizer"];
  added: CompiledBpe["added"];
  lengths: number[];
}

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) throw new Error("the tokenizer tables need a little-endian platform");

export function serializeBpe(t: CompiledBpe): Uint8Array {
  const header: Header = { pattern: t.pattern, normalizer: t.normalizer, added: t.added, lengths: ARRAYS.map((k) => t[k].length) };
  const json = new TextEncoder().encode(JSON.stringify(header));
  const start = (12 + json.length + 3) & ~3;
  const total = start + 4 * header.lengths.reduce((a, b) => a + b, 0);
  const out = new Uint8Array(total);
  out.set(new TextEncoder().encode(MAGIC), 0);
  new DataView(out.buffer).setUint32(8, json.length, true);
  out.set(json, 12);
  let at = start;
  for (const k of ARRAYS) {
    out.set(new Uint8Array(t[k].buffer, t[k].byteOffset, t[k].byteLength), at);
    at += t[k].byteLength;
  }
  return out;
}

/**
 * Reads a blob written by {@link serializeBpe}; the arrays are views into `bytes` when it is 4-byte aligned.
 * @throws TokenizerError `invalid_tokenizer_tables`
 */
export function deserializeBpe(bytes: Uint8Array): CompiledBpe {
  const bad = (why: string) => new TokenizerError("invalid_tokenizer_tables", `tokenizer tables: ${why}`);
  if (bytes.length < 12 || new TextDecoder().decode(bytes.subarray(0, 8)) !== MAGIC) throw bad(`not a ${MAGIC} blob`);
  const jsonLength = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(8, true);
  if (12 + jsonLength > bytes.length) throw bad("truncated header");
  let header: Header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + jsonLength))) as Header;
  } catch {
    throw bad("unreadable header");
  }
  const lengths = header.lengths;
  if (!Array.isArray(lengths) || lengths.length !== ARRAYS.length || !lengths.every((n) => Number.isInteger(n) && n >= 0)) throw bad("bad array lengths");
  let at = (12 + jsonLength + 3) & ~3;
  if (at + 4 * lengths.reduce((a, b) => a + b, 0) !== bytes.length) throw bad("size does not match the header");
  const aligned = (bytes.byteOffset & 3) === 0 ? bytes : bytes.slice();
  const arrays = lengths.map((n) => {
    const view = new Int32Array(aligned.buffer, aligned.byteOffset + at, n);
    at += 4 * n;
    return view;
  });
  const [byteIds, mergeStart, mergeRight, mergeRank, mergeResult] = arrays as [Int32Array, Int32Array, Int32Array, Int32Array, Int32Array];
  if (byteIds.length !== 256 || mergeStart.at(-1) !== mergeRight.length || mergeRank.length !== mergeRight.length || mergeResult.length !== mergeRight.length) {
    throw bad("inconsistent arrays");
  }
  return { pattern: header.pattern, normalizer: header.normalizer, added: header.added, byteIds, mergeStart, mergeRight, mergeRank, mergeResult };
}

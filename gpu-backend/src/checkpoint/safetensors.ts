/**
 * safetensors reading and writing for Hugging Face checkpoints.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON header
 * (`{"__metadata__": {...}, "<tensor>": {"dtype", "shape", "data_offsets": [begin, end]}, ...}`), then the
 * raw little-endian tensor data; `data_offsets` are relative to the first byte after the header.
 *
 * Reads use positional reads on one open file handle per file, never whole files: the released
 * Qwen2-VL-2B checkpoint is 4.4 GB of BF16 in two shards.
 */
import { open, readFile, stat, type FileHandle } from "node:fs/promises";
import { basename, join, resolve } from "node:path";
import { CodedError } from "../../../shared/src/errors.ts";
import { exists } from "../fs-util.ts";

/** Element types this converter reads and writes. */
export type DType = "F32" | "F16" | "BF16";

/** Bytes per element of each supported dtype. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = { F32: 4, F16: 2, BF16: 2 };

/** dtypes defined by the safetensors format that this converter does not handle (reported as unsupported, not malformed). */
const OTHER_SAFETENSORS_DTYPES = new Set([
  "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
  "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64",
]);

/** Where one tensor lives: `begin`/`end` are ABSOLUTE byte offsets in `file` (header already added). */
export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  file: string;
  begin: number;
  end: number;
}

/** Stable codes of {@link CheckpointError}; callers branch on these, never on the message. */
export type CheckpointErrorCode =
  | "not_found"
  | "truncated"
  | "bad_header"
  | "bad_offsets"
  | "dtype_mismatch"
  | "missing_tensor"
  | "unsupported_dtype"
  | "unsupported_architecture"
  | "bad_config"
  | "no_network"
  | "shape_mismatch"
  | "output_exists";

/** Any problem with a checkpoint folder, file, header, tensor or config; the message names the file/tensor. */
export class CheckpointError extends CodedError<CheckpointErrorCode> {}

/** The safetensors reference implementation refuses headers above 100 MB; so do we (a garbage length must not allocate). */
export const MAX_HEADER_BYTES = 100_000_000;

const IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A parsed safetensors header. */
export interface SafetensorsHeader {
  file: string;
  /** Absolute offset of the data section (8 + header length). */
  dataStart: number;
  /** Length of the data section (file size − dataStart). */
  dataLength: number;
  metadata: Record<string, string>;
  /** Tensors in header order, offsets absolute. */
  tensors: TensorInfo[];
}

function isNonNegInt(x: unknown): x is number {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}

/** Number of elements of a shape (1 for a scalar `[]`). */
export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Validates a header's JSON text against the size of the file it came from.
 * @param headerText the N header bytes decoded as UTF-8
 * @param file path used in messages and in each {@link TensorInfo}
 * @param fileSize total size of the file in bytes
 */
export function parseSafetensorsHeader(headerText: string, file: string, fileSize: number): SafetensorsHeader {
  const headerLength = Buffer.byteLength(headerText, "utf8");
  const dataStart = 8 + headerLength;
  const dataLength = fileSize - dataStart;
  let json: unknown;
  try {
    json = JSON.parse(headerText);
  } catch (e) {
    throw new CheckpointError("bad_header", `${file}: safetensors header is not valid JSON (${(e as Error).message})`);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new CheckpointError("bad_header", `${file}: safetensors header is not a JSON object`);
  }
  const metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
        throw new CheckpointError("bad_header", `${file}: __metadata__ is not an object`);
      }
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== "string") throw new CheckpointError("bad_header", `${file}: __metadata__.${k} is not a string`);
        metadata[k] = v;
      }
      continue;
    }
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
      throw new CheckpointError("bad_header", `${file}: tensor ${name}: header entry is not an object`);
    }
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (typeof dtype !== "string") throw new CheckpointError("bad_header", `${file}: tensor ${name}: dtype is missing`);
    if (!(dtype in DTYPE_BYTES)) {
      const what = OTHER_SAFETENSORS_DTYPES.has(dtype) ? "unsupported" : "unknown";
      throw new CheckpointError(
        "unsupported_dtype",
        `${file}: tensor ${name} has ${what} dtype ${JSON.stringify(dtype)} (supported: F32, F16, BF16)`,
      );
    }
    if (!Array.isArray(shape) || !shape.every(isNonNegInt)) {
      throw new CheckpointError("bad_header", `${file}: tensor ${name}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegInt)) {
      throw new CheckpointError("bad_offsets", `${file}: tensor ${name}: data_offsets ${JSON.stringify(offsets)} is not a pair of non-negative integers`);
    }
    const [b, e] = offsets as [number, number];
    if (b > e) throw new CheckpointError("bad_offsets", `${file}: tensor ${name}: data_offsets [${b}, ${e}] end before they begin`);
    const dt = dtype as DType;
    const need = numelOf(shape as number[]) * DTYPE_BYTES[dt];
    if (e - b !== need) {
      throw new CheckpointError(
        "dtype_mismatch",
        `${file}: tensor ${name}: dtype ${dt} shape [${(shape as number[]).join(", ")}] needs ${need} bytes but data_offsets [${b}, ${e}] span ${e - b}`,
      );
    }
    tensors.push({ name, dtype: dt, shape: [...(shape as number[])], file, begin: dataStart + b, end: dataStart + e });
  }
  // Overlaps and out-of-range ranges: sort by begin, then one sweep.
  const byBegin = [...tensors].sort((x, y) => x.begin - y.begin || x.end - y.end);
  let contiguous = true;
  let prev: TensorInfo | undefined;
  for (const t of byBegin) {
    if (prev && t.begin < prev.end && t.end > t.begin && prev.end > prev.begin) {
      throw new CheckpointError(
        "bad_offsets",
        `${file}: tensors ${prev.name} [${prev.begin - dataStart}, ${prev.end - dataStart}] and ${t.name} [${t.begin - dataStart}, ${t.end - dataStart}] overlap`,
      );
    }
    if (t.begin !== (prev ? prev.end : dataStart)) contiguous = false;
    if (!prev || t.end >= prev.end) prev = t;
  }
  const maxEnd = prev ? prev.end - dataStart : 0;
  if (maxEnd > dataLength) {
    // A well-formed (contiguous) layout that runs past the end means the file was cut short; otherwise the header lies.
    const last = prev as TensorInfo;
    if (contiguous) {
      throw new CheckpointError(
        "truncated",
        `${file}: file is truncated: ${fileSize} bytes, but its header describes ${dataStart + maxEnd} (tensor ${last.name} ends at data offset ${maxEnd})`,
      );
    }
    throw new CheckpointError(
      "bad_offsets",
      `${file}: tensor ${last.name}: data_offsets end at ${maxEnd}, past the end of the data section (${dataLength} bytes)`,
    );
  }
  return { file, dataStart, dataLength, metadata, tensors };
}

/** Reads exactly `length` bytes at `position` (a positional read may return fewer; loop). */
async function readExactly(fh: FileHandle, file: string, position: number, length: number, what: string): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  let done = 0;
  while (done < length) {
    // Node caps one read at 2 GiB.
    const chunk = Math.min(length - done, 1 << 30);
    const { bytesRead } = await fh.read(buf, done, chunk, position + done);
    if (bytesRead === 0) {
      throw new CheckpointError("truncated", `${file}: file ended while reading ${what} (${done} of ${length} bytes at offset ${position})`);
    }
    done += bytesRead;
  }
  return buf;
}

/** Reads and validates the header of one safetensors file through an open handle. */
export async function readSafetensorsHeaderFrom(fh: FileHandle, file: string): Promise<SafetensorsHeader> {
  const size = (await fh.stat()).size;
  if (size < 8) throw new CheckpointError("truncated", `${file}: file is truncated: ${size} bytes, shorter than the 8-byte header length`);
  const lenBuf = await readExactly(fh, file, 0, 8, "the header length");
  const n = lenBuf.readBigUInt64LE(0);
  if (n === 0n || n > BigInt(MAX_HEADER_BYTES)) {
    throw new CheckpointError("bad_header", `${file}: header length ${n} is not plausible (must be 1..${MAX_HEADER_BYTES}); not a safetensors file?`);
  }
  const headerLen = Number(n);
  if (8 + headerLen > size) {
    throw new CheckpointError("truncated", `${file}: file is truncated: ${size} bytes, but the header alone needs ${8 + headerLen}`);
  }
  const headerBuf = await readExactly(fh, file, 8, headerLen, "the header");
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(headerBuf);
  } catch {
    throw new CheckpointError("bad_header", `${file}: header is not valid UTF-8`);
  }
  if (!text.startsWith("{")) throw new CheckpointError("bad_header", `${file}: header does not start with '{'`);
  // Trailing spaces (the format's alignment padding) are JSON whitespace.
  return parseSafetensorsHeader(text, file, size);
}

/** Opens one safetensors file and returns its validated header. */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  const fh = await openOrNotFound(file);
  try {
    return await readSafetensorsHeaderFrom(fh, file);
  } finally {
    await fh.close();
  }
}

async function openOrNotFound(file: string): Promise<FileHandle> {
  try {
    return await open(file, "r");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new CheckpointError("not_found", `${file}: no such file`);
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Element conversions

/** Widens IEEE half floats to float32 exactly (subnormals, ±0, ±Inf and NaN included). */
export function f16ToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i] as number;
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    let mant = h & 0x3ff;
    if (exp === 0x1f) {
      outBits[i] = sign | 0x7f800000 | (mant << 13); // Inf / NaN (payload kept)
    } else if (exp !== 0) {
      outBits[i] = sign | ((exp + 112) << 23) | (mant << 13); // rebias 15 → 127
    } else if (mant === 0) {
      outBits[i] = sign; // ±0
    } else {
      // Subnormal half: value = mant · 2^-24; normalise into a float32 normal.
      let e = 113; // exponent field of 2^-14 in float32 is 127-14 = 113
      while ((mant & 0x400) === 0) {
        mant <<= 1;
        e--;
      }
      outBits[i] = sign | (e << 23) | ((mant & 0x3ff) << 13);
    }
  }
  return out;
}

/** Widens bfloat16 to float32 exactly: the bf16 bits are the top half of the float32 bits. */
export function bf16ToF32(bits: Uint16Array): Float32Array {
  const out = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = (bits[i] as number) << 16;
  return new Float32Array(out.buffer);
}

/** Rounds float32 values to bfloat16 bits, round-to-nearest-even (NaN stays a quiet NaN). */
export function f32ToBf16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i] as number;
    if ((b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff) !== 0) {
      out[i] = (b >>> 16) | 0x40;
    } else {
      out[i] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
    }
  }
  return out;
}

/** Copies little-endian bytes into a fresh, aligned Uint16Array (byte-swapping on big-endian hosts). */
function toU16(raw: Uint8Array): Uint16Array {
  const out = new Uint16Array(raw.length / 2);
  new Uint8Array(out.buffer).set(raw);
  if (!IS_LITTLE_ENDIAN) for (let i = 0; i < out.length; i++) out[i] = (((out[i] as number) & 0xff) << 8) | ((out[i] as number) >> 8);
  return out;
}

function toF32(raw: Uint8Array): Float32Array {
  const out = new Float32Array(raw.length / 4);
  new Uint8Array(out.buffer).set(raw);
  if (!IS_LITTLE_ENDIAN) swapBytes(new Uint8Array(out.buffer), 4);
  return out;
}

function swapBytes(b: Uint8Array, width: number): void {
  for (let i = 0; i < b.length; i += width) b.subarray(i, i + width).reverse();
}

/** Decodes raw little-endian tensor bytes of `dtype` into float32 values. */
export function decodeToF32(raw: Uint8Array, dtype: DType): Float32Array {
  switch (dtype) {
    case "F32":
      return toF32(raw);
    case "F16":
      return f16ToF32(toU16(raw));
    case "BF16":
      return bf16ToF32(toU16(raw));
  }
}

/** Little-endian bytes of a typed array (a view when the host is little-endian). */
export function littleEndianBytes(data: Float32Array | Uint16Array): Uint8Array {
  const view = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (IS_LITTLE_ENDIAN) return view;
  const copy = new Uint8Array(view);
  swapBytes(copy, data.BYTES_PER_ELEMENT);
  return copy;
}

// ---------------------------------------------------------------------------------------------------------------
// Canonical names

/**
 * Maps a weight name to the canonical (old-style, released-checkpoint) name.
 * Newer transformers save `model.language_model.X` (→ `model.X`) and `model.visual.X` (→ `visual.X`).
 */
export function canonicalTensorName(name: string): string {
  if (name.startsWith("model.language_model.")) return "model." + name.slice("model.language_model.".length);
  if (name.startsWith("model.visual.")) return name.slice("model.".length);
  return name;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading a checkpoint

/** Name of the shard index file written by `save_pretrained`. */
export const SAFETENSORS_INDEX = "model.safetensors.index.json";

/**
 * The tensors of a checkpoint: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.
 * Names are canonical (see {@link canonicalTensorName}); reads touch only the requested tensor's bytes.
 */
export class CheckpointWeights {
  private readonly byName: Map<string, TensorInfo>;
  private readonly handles: Map<string, FileHandle>;
  /** Original (on-disk) name of each canonical name. */
  private readonly stored: Map<string, string>;
  /** Metadata of each file (`__metadata__`). */
  readonly metadata: ReadonlyMap<string, Record<string, string>>;
  /** The files, in the order they were opened. */
  readonly files: readonly string[];

  private constructor(
    byName: Map<string, TensorInfo>,
    stored: Map<string, string>,
    handles: Map<string, FileHandle>,
    metadata: Map<string, Record<string, string>>,
  ) {
    this.byName = byName;
    this.stored = stored;
    this.handles = handles;
    this.metadata = metadata;
    this.files = [...handles.keys()];
  }

  /**
   * Opens a checkpoint folder (or one `.safetensors` file). With an index file, every tensor it lists must be in
   * the shard it names. Throws {@link CheckpointError} (`not_found`, `bad_header`, `truncated`, …) naming the file.
   */
  static async open(dir: string): Promise<CheckpointWeights> {
    const path = resolve(dir);
    let st;
    try {
      st = await stat(path);
    } catch {
      throw new CheckpointError("not_found", `${path}: no such checkpoint folder or file`);
    }
    let files: string[];
    let indexMap: Map<string, string> | undefined;
    if (st.isFile()) {
      files = [path];
    } else {
      const indexPath = join(path, SAFETENSORS_INDEX);
      const index = await readJsonIfExists(indexPath);
      if (index !== undefined) {
        indexMap = parseIndex(index, indexPath);
        files = [...new Set(indexMap.values())].map((f) => join(path, f));
      } else {
        const single = join(path, "model.safetensors");
        if (!(await exists(single))) {
          throw new CheckpointError("not_found", `${path}: no model.safetensors or ${SAFETENSORS_INDEX} in this folder`);
        }
        files = [single];
      }
    }
    const handles = new Map<string, FileHandle>();
    const byName = new Map<string, TensorInfo>();
    const stored = new Map<string, string>();
    const metadata = new Map<string, Record<string, string>>();
    try {
      for (const file of files) {
        const fh = await openOrNotFound(file);
        handles.set(file, fh);
        const header = await readSafetensorsHeaderFrom(fh, file);
        metadata.set(file, header.metadata);
        for (const t of header.tensors) {
          const canon = canonicalTensorName(t.name);
          const other = stored.get(canon);
          if (other !== undefined) {
            throw new CheckpointError(
              "bad_header",
              `${file}: tensor ${t.name} maps to ${canon}, which ${other === t.name ? "is" : `${other} also maps to and is`} already in ${byName.get(canon)?.file}`,
            );
          }
          stored.set(canon, t.name);
          byName.set(canon, { ...t, name: canon });
        }
      }
      if (indexMap) {
        for (const [name, shard] of indexMap) {
          const t = byName.get(canonicalTensorName(name));
          if (!t || basename(t.file) !== basename(shard) || stored.get(t.name) !== name) {
            throw new CheckpointError("missing_tensor", `${join(path, shard)}: tensor ${name} is listed in ${SAFETENSORS_INDEX} but not stored in that shard`);
          }
        }
      }
    } catch (e) {
      await Promise.allSettled([...handles.values()].map((h) => h.close()));
      throw e;
    }
    return new CheckpointWeights(byName, stored, handles, metadata);
  }

  /** Canonical names of all tensors, sorted. */
  names(): string[] {
    return [...this.byName.keys()].sort();
  }

  /** Whether the checkpoint has a tensor of this canonical name. */
  has(name: string): boolean {
    return this.byName.has(name);
  }

  /** Location, dtype and shape of a tensor; `missing_tensor` if absent. */
  info(name: string): TensorInfo {
    const t = this.byName.get(name);
    if (!t) {
      throw new CheckpointError("missing_tensor", `tensor ${name} is not in the checkpoint (${this.files.map((f) => basename(f)).join(", ")})`);
    }
    return { ...t, shape: [...t.shape] };
  }

  /** The name under which a tensor is stored on disk (differs from the canonical name for newer checkpoints). */
  storedName(name: string): string {
    this.info(name);
    return this.stored.get(name) as string;
  }

  /** The tensor's raw little-endian bytes, read from its byte range only. */
  async readRaw(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    const fh = this.handles.get(t.file);
    if (!fh) throw new CheckpointError("not_found", `${t.file}: checkpoint is closed`);
    return readExactly(fh, t.file, t.begin, t.end - t.begin, `tensor ${name}`);
  }

  /** The tensor as float32; F16 and BF16 are widened exactly. */
  async readF32(name: string): Promise<Float32Array> {
    const t = this.info(name);
    return decodeToF32(await this.readRaw(name), t.dtype);
  }

  /** Closes all file handles. */
  async close(): Promise<void> {
    const hs = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(hs.map((h) => h.close()));
  }
}

async function readJsonIfExists(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new CheckpointError("bad_header", `${path}: not valid JSON (${(e as Error).message})`);
  }
}

function parseIndex(json: unknown, indexPath: string): Map<string, string> {
  const wm = (json as { weight_map?: unknown } | null)?.weight_map;
  if (wm === null || typeof wm !== "object" || Array.isArray(wm)) {
    throw new CheckpointError("bad_header", `${indexPath}: no weight_map object`);
  }
  const map = new Map<string, string>();
  for (const [name, file] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof file !== "string" || file.includes("/") || file.includes("\\") || file.startsWith(".")) {
      throw new CheckpointError("bad_header", `${indexPath}: weight_map entry for ${name} is not a plain file name: ${JSON.stringify(file)}`);
    }
    map.set(name, file);
  }
  if (map.size === 0) throw new CheckpointError("bad_header", `${indexPath}: weight_map is empty`);
  return map;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

/** One tensor's header entry for writing. */
export interface TensorSpec {
  name: string;
  dtype: DType;
  shape: number[];
}

/** A planned safetensors file: header bytes (padded) and each tensor's data offsets. */
export interface SafetensorsLayout {
  header: Buffer;
  /** Tensors in the order their data is stored, with offsets relative to the data section. */
  entries: { spec: TensorSpec; begin: number; end: number }[];
  /** Total file size in bytes. */
  fileSize: number;
}

/**
 * Plans a safetensors file from shapes alone, so data can be streamed afterwards.
 * Data order follows the reference writer: larger dtypes first, then by name. The JSON is compact,
 * `__metadata__` first, padded with spaces to a multiple of 8 bytes.
 */
export function planSafetensors(specs: Iterable<TensorSpec>, metadata?: Record<string, string>): SafetensorsLayout {
  const list = [...specs];
  const seen = new Set<string>();
  for (const s of list) {
    if (seen.has(s.name)) throw new CheckpointError("bad_header", `tensor ${s.name} appears twice`);
    seen.add(s.name);
    if (!(s.dtype in DTYPE_BYTES)) throw new CheckpointError("unsupported_dtype", `tensor ${s.name}: cannot write dtype ${String(s.dtype)}`);
    if (!s.shape.every((d) => isNonNegInt(d))) throw new CheckpointError("bad_header", `tensor ${s.name}: invalid shape [${s.shape.join(", ")}]`);
  }
  list.sort((a, b) => DTYPE_BYTES[b.dtype] - DTYPE_BYTES[a.dtype] || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const obj: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) obj["__metadata__"] = metadata;
  const entries: SafetensorsLayout["entries"] = [];
  let off = 0;
  for (const spec of list) {
    const n = numelOf(spec.shape) * DTYPE_BYTES[spec.dtype];
    entries.push({ spec, begin: off, end: off + n });
    obj[spec.name] = { dtype: spec.dtype, shape: spec.shape, data_offsets: [off, off + n] };
    off += n;
  }
  let json = JSON.stringify(obj);
  const len = Buffer.byteLength(json, "utf8");
  json += " ".repeat((8 - (len % 8)) % 8);
  const body = Buffer.from(json, "utf8");
  const header = Buffer.alloc(8 + body.length);
  header.writeBigUInt64LE(BigInt(body.length), 0);
  body.copy(header, 8);
  return { header, entries, fileSize: header.length + off };
}

/**
 * Writes a safetensors file. `data` holds float32 values for F32, and raw 16-bit patterns for F16/BF16.
 * All tensors are held by the caller; for streaming large checkpoints use {@link planSafetensors} directly.
 */
export async function writeSafetensors(
  path: string,
  tensors: Iterable<{ name: string; dtype: DType; shape: number[]; data: Float32Array | Uint16Array }>,
  metadata?: Record<string, string>,
): Promise<void> {
  const list = [...tensors];
  const byName = new Map(list.map((t) => [t.name, t]));
  for (const t of list) {
    const want = numelOf(t.shape);
    const okType = t.dtype === "F32" ? t.data instanceof Float32Array : t.data instanceof Uint16Array;
    if (!okType || t.data.length !== want) {
      throw new CheckpointError(
        "dtype_mismatch",
        `${path}: tensor ${t.name}: ${t.dtype} [${t.shape.join(", ")}] needs ${want} ${t.dtype === "F32" ? "Float32Array" : "Uint16Array"} values, got ${t.data.constructor.name}(${t.data.length})`,
      );
    }
  }
  const layout = planSafetensors(list, metadata);
  const fh = await open(path, "w");
  try {
    await fh.write(layout.header, 0, layout.header.length, 0);
    for (const e of layout.entries) {
      const bytes = littleEndianBytes((byName.get(e.spec.name) as { data: Float32Array | Uint16Array }).data);
      if (bytes.length > 0) await fh.write(bytes, 0, bytes.length, layout.header.length + e.begin);
    }
  } finally {
    await fh.close();
  }
}

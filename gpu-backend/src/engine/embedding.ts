/**
 * Token embeddings without a second copy of the table in memory.
 *
 * The converter's `embed_tokens.onnx` is one `Gather` over `model.embed_tokens.weight` [vocab, H]; with tied
 * embeddings the decoder holds the same matrix again as its LM head, so loading the embedding graph into an
 * ORT session keeps the table twice (933 MB each in float32 at the 2B shape). Instead, {@link FileEmbeddings}
 * finds where the table's bytes lie in the graph file (inline `raw_data`, or its external-data file) and
 * reads one row per token with positional reads: only the rows a request uses are touched, and those pages
 * belong to the OS page cache, not the process. Graphs of another form (e.g. a quantized Gather from another
 * exporter) keep the ORT session ({@link SessionEmbeddings}).
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { dirname, join } from "node:path";
import * as ort from "onnxruntime-node";

/** Looks up `inputs_embeds` rows for token ids. */
export interface Embeddings {
  readonly type: "float32" | "float16";
  readonly hidden: number;
  /** `[batch, seq, H]` for ids in row-major [batch, seq] order. */
  lookup(ids: ArrayLike<number>, dims: [number, number]): Promise<ort.Tensor>;
  release(): Promise<void>;
}

/** Where a Gather table's bytes are. */
export interface TableLocation {
  /** File holding the bytes (the graph itself, or its external-data file). */
  file: string;
  /** Byte offset of row 0. */
  offset: number;
  rows: number;
  hidden: number;
  type: "float32" | "float16";
}

// ---------------------------------------------------------------------------------------------------------
// A minimal protobuf walker over a file (positional reads; never loads the file).

class FileReader {
  readonly size: number;
  private buf = Buffer.alloc(1 << 16);
  private bufStart = 0;
  private bufLen = 0;
  constructor(readonly fd: number) {
    this.size = fstatSync(fd).size;
  }

  /** Bytes [pos, pos + n), n ≤ 64 KiB, through a small read-ahead buffer. */
  bytes(pos: number, n: number): Buffer {
    if (pos < this.bufStart || pos + n > this.bufStart + this.bufLen) {
      this.bufStart = pos;
      this.bufLen = readSync(this.fd, this.buf, 0, this.buf.length, pos);
      if (this.bufLen < Math.min(n, this.size - pos)) throw new Error("short read");
    }
    return this.buf.subarray(pos - this.bufStart, pos - this.bufStart + n);
  }

  /** A varint at `pos`: [value, next position]. */
  varint(pos: number): [number, number] {
    const b = this.bytes(pos, Math.min(10, this.size - pos));
    let v = 0;
    let mul = 1;
    for (let i = 0; i < b.length; i++) {
      v += (b[i]! & 0x7f) * mul;
      if ((b[i]! & 0x80) === 0) return [v, pos + i + 1];
      mul *= 128;
    }
    throw new Error("bad varint");
  }

  string(pos: number, n: number): string {
    if (n > 1 << 16) throw new Error("string field too long");
    return this.bytes(pos, n).toString("utf8");
  }
}

interface Field {
  no: number;
  wire: number;
  /** varint value, or the length of a LEN field */
  value: number;
  /** start of a LEN field's payload */
  start: number;
  end: number;
}

/** The fields of the message occupying [start, end). */
function* fields(r: FileReader, start: number, end: number): Generator<Field> {
  let pos = start;
  while (pos < end) {
    const [tag, p1] = r.varint(pos);
    const no = Math.floor(tag / 8);
    const wire = tag & 7;
    if (wire === 0) {
      const [v, p2] = r.varint(p1);
      yield { no, wire, value: v, start: p1, end: p2 };
      pos = p2;
    } else if (wire === 2) {
      const [len, p2] = r.varint(p1);
      yield { no, wire, value: len, start: p2, end: p2 + len };
      pos = p2 + len;
    } else if (wire === 1) {
      pos = p1 + 8;
    } else if (wire === 5) {
      pos = p1 + 4;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
    if (pos > end) throw new Error("truncated message");
  }
}

interface TensorInfo {
  name: string;
  dims: number[];
  dataType: number;
  rawStart?: number;
  rawLength?: number;
  external?: Record<string, string>;
}

function readTensor(r: FileReader, start: number, end: number): TensorInfo {
  const t: TensorInfo = { name: "", dims: [], dataType: 0 };
  for (const f of fields(r, start, end)) {
    if (f.no === 1 && f.wire === 0) t.dims.push(f.value);
    else if (f.no === 1 && f.wire === 2) for (let p = f.start; p < f.end; ) { const [v, n] = r.varint(p); t.dims.push(v); p = n; }
    else if (f.no === 2 && f.wire === 0) t.dataType = f.value;
    else if (f.no === 8 && f.wire === 2) t.name = r.string(f.start, f.value);
    else if (f.no === 9 && f.wire === 2) { t.rawStart = f.start; t.rawLength = f.value; }
    else if (f.no === 13 && f.wire === 2) {
      let key = "";
      let value = "";
      for (const e of fields(r, f.start, f.end)) {
        if (e.no === 1) key = r.string(e.start, e.value);
        else if (e.no === 2) value = r.string(e.start, e.value);
      }
      (t.external ??= {})[key] = value;
    }
  }
  return t;
}

interface NodeInfo {
  opType: string;
  domain: string;
  inputs: string[];
  outputs: string[];
  axis: number;
}

function readNode(r: FileReader, start: number, end: number): NodeInfo {
  const n: NodeInfo = { opType: "", domain: "", inputs: [], outputs: [], axis: 0 };
  for (const f of fields(r, start, end)) {
    if (f.wire !== 2) continue;
    if (f.no === 1) n.inputs.push(r.string(f.start, f.value));
    else if (f.no === 2) n.outputs.push(r.string(f.start, f.value));
    else if (f.no === 4) n.opType = r.string(f.start, f.value);
    else if (f.no === 7) n.domain = r.string(f.start, f.value);
    else if (f.no === 5) {
      let name = "";
      let i = 0;
      for (const a of fields(r, f.start, f.end)) {
        if (a.no === 1 && a.wire === 2) name = r.string(a.start, a.value);
        else if (a.no === 3 && a.wire === 0) i = a.value;
      }
      if (name === "axis") n.axis = i;
    }
  }
  return n;
}

const FLOAT = 1;
const FLOAT16 = 10;

/**
 * Where the embedding table of `embed_tokens.onnx` lies, or null when the graph is not the plain
 * `inputs_embeds = Gather(table, input_ids, axis 0)` (optionally through Identity) over a float table.
 */
export function locateEmbeddingTable(graphPath: string): TableLocation | null {
  const fd = openSync(graphPath, "r");
  try {
    const r = new FileReader(fd);
    const tensors = new Map<string, TensorInfo>();
    const nodes: NodeInfo[] = [];
    const outputs: string[] = [];
    const inputs: string[] = [];
    for (const m of fields(r, 0, r.size)) {
      if (m.no !== 7 || m.wire !== 2) continue; // ModelProto.graph
      for (const g of fields(r, m.start, m.end)) {
        if (g.wire !== 2) continue;
        if (g.no === 5) { const t = readTensor(r, g.start, g.end); tensors.set(t.name, t); }
        else if (g.no === 1) nodes.push(readNode(r, g.start, g.end));
        else if (g.no === 11 || g.no === 12) {
          let name = "";
          for (const v of fields(r, g.start, g.end)) if (v.no === 1 && v.wire === 2) name = r.string(v.start, v.value);
          (g.no === 11 ? inputs : outputs).push(name);
        }
      }
    }
    if (!inputs.includes("input_ids") || !outputs.includes("inputs_embeds")) return null;
    const real = nodes.filter((n) => !(n.opType === "Identity" && n.domain === ""));
    if (real.length !== 1) return null;
    const gather = real[0]!;
    if (gather.opType !== "Gather" || gather.domain !== "" || gather.axis !== 0 || gather.inputs[1] !== "input_ids") return null;
    // The Gather's output reaches inputs_embeds through Identity nodes only.
    let out = gather.outputs[0]!;
    for (let hops = 0; out !== "inputs_embeds" && hops < nodes.length; hops++) {
      const next = nodes.find((n) => n.opType === "Identity" && n.inputs[0] === out);
      if (!next) return null;
      out = next.outputs[0]!;
    }
    if (out !== "inputs_embeds") return null;
    const t = tensors.get(gather.inputs[0]!);
    if (!t || t.dims.length !== 2 || (t.dataType !== FLOAT && t.dataType !== FLOAT16)) return null;
    const [rows, hidden] = t.dims as [number, number];
    const elem = t.dataType === FLOAT ? 4 : 2;
    const bytes = rows * hidden * elem;
    const type = t.dataType === FLOAT ? "float32" : "float16";
    if (t.external) {
      const loc = t.external.location;
      if (!loc || loc.includes("..") || loc.startsWith("/")) return null;
      const offset = Number(t.external.offset ?? 0);
      const length = t.external.length === undefined ? bytes : Number(t.external.length);
      if (length !== bytes) return null;
      const file = join(dirname(graphPath), loc);
      const dfd = openSync(file, "r");
      try {
        if (fstatSync(dfd).size < offset + bytes) return null;
      } finally {
        closeSync(dfd);
      }
      return { file, offset, rows, hidden, type };
    }
    if (t.rawStart === undefined || t.rawLength !== bytes) return null;
    return { file: graphPath, offset: t.rawStart, rows, hidden, type };
  } finally {
    closeSync(fd);
  }
}

/** Rows read straight from the graph's bytes on disk (see the module comment). */
export class FileEmbeddings implements Embeddings {
  readonly type: "float32" | "float16";
  readonly hidden: number;
  private fd: number | null;
  private readonly rowBytes: number;

  constructor(readonly location: TableLocation) {
    this.type = location.type;
    this.hidden = location.hidden;
    this.rowBytes = location.hidden * (location.type === "float32" ? 4 : 2);
    this.fd = openSync(location.file, "r");
  }

  async lookup(ids: ArrayLike<number>, dims: [number, number]): Promise<ort.Tensor> {
    if (this.fd === null) throw new Error("embeddings released");
    const n = ids.length;
    const data = this.type === "float32" ? new Float32Array(n * this.hidden) : new Uint16Array(n * this.hidden);
    const out = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const { rows, offset } = this.location;
    for (let i = 0; i < n; i++) {
      const id = ids[i]!;
      // Gather semantics: negative ids count from the end; anything else out of range is an error.
      const row = id < 0 ? id + rows : id;
      if (!Number.isInteger(row) || row < 0 || row >= rows) throw new RangeError(`token id ${id} is outside the vocabulary (${rows})`);
      let done = 0;
      while (done < this.rowBytes) {
        const got = readSync(this.fd, out, i * this.rowBytes + done, this.rowBytes - done, offset + row * this.rowBytes + done);
        if (got <= 0) throw new Error("short read from the embedding table");
        done += got;
      }
    }
    return new ort.Tensor(this.type, data, [dims[0], dims[1], this.hidden]);
  }

  async release(): Promise<void> {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}

/** The `embed_tokens` graph run by ONNX Runtime. */
export class SessionEmbeddings implements Embeddings {
  constructor(
    readonly session: ort.InferenceSession,
    readonly type: "float32" | "float16",
    readonly hidden: number,
  ) {}

  async lookup(ids: ArrayLike<number>, dims: [number, number]): Promise<ort.Tensor> {
    const data = new BigInt64Array(ids.length);
    for (let i = 0; i < ids.length; i++) data[i] = BigInt(ids[i]!);
    const out = await this.session.run({ input_ids: new ort.Tensor("int64", data, dims) });
    return out.inputs_embeds!;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

/**
 * Writes a model to disk, streaming: deferred tensor payloads are produced and written one at a time,
 * so peak memory is about one tensor, not the model. Initializers go either inline (raw_data) or into
 * `<model file>_data` beside the .onnx (ONNX external data; offsets aligned for mmap).
 */
import { open, type FileHandle } from "node:fs/promises";
import { basename } from "node:path";
import { type ExternalRef, type ModelSpec, encodeModel } from "./model.ts";
import { type Chunk, deferredChunks } from "./protobuf.ts";

/** protobuf's hard limit on one message (2 GiB − 1); stay clearly below it. */
const INLINE_LIMIT = 2 ** 31 - 64 * 2 ** 20;

/** How to place initializers. */
export interface WriteModelOptions {
  /**
   * `true`: tensors of at least `externalMinBytes` go to `<file>_data`; `false`: all inline (fails when
   * the model would exceed protobuf's 2 GiB); `"auto"` (default): external only when needed.
   */
  externalData?: boolean | "auto";
  /** Smaller tensors stay inline even in external mode (default 1024, like onnx's save_model). */
  externalMinBytes?: number;
  /** Alignment of each external tensor's offset (default 4096, a page). */
  align?: number;
  /** Largest model written inline in `"auto"` mode (default: protobuf's 2 GiB limit minus a margin). */
  inlineLimitBytes?: number;
  /** Called after each initializer payload is written: bytes done so far and the total. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /**
   * Point into the external data file that writing another graph of the same folder produced, instead of
   * writing one: initializers of the same name and size reference its bytes (two graphs of one model share
   * their weights on disk); any other initializer stays inline. `externalData` is then ignored.
   */
  shareDataOf?: WriteModelResult;
}

/** What was written. */
export interface WriteModelResult {
  modelPath: string;
  modelBytes: number;
  /** Path of the external data file, if one was written. */
  dataPath?: string;
  /** Bytes written to the external data file (0 when none was written, or with `shareDataOf`). */
  dataBytes: number;
  /** Where each external initializer lies in `dataPath`. */
  refs?: ReadonlyMap<string, ExternalRef>;
}

/** Coalesces small writes; deferred chunks are resolved and written in order. */
class ChunkSink {
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  written = 0;
  constructor(private readonly fh: FileHandle) {}

  async write(bytes: Uint8Array): Promise<void> {
    if (bytes.byteLength >= 1 << 20) {
      await this.flush();
      await this.writeAll(bytes);
      return;
    }
    this.pending.push(bytes);
    this.pendingBytes += bytes.byteLength;
    if (this.pendingBytes >= 1 << 20) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const buf = Buffer.concat(this.pending, this.pendingBytes);
    this.pending = [];
    this.pendingBytes = 0;
    await this.writeAll(buf);
  }

  private async writeAll(bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.byteLength) {
      const { bytesWritten } = await this.fh.write(bytes, off, bytes.byteLength - off);
      off += bytesWritten;
    }
    this.written += bytes.byteLength;
  }
}

/**
 * Encodes `model` into `path` (and `path + "_data"` in external mode). The caller owns atomicity
 * (write into a temporary folder, rename when everything is done).
 */
export async function writeModel(path: string, model: ModelSpec, options: WriteModelOptions = {}): Promise<WriteModelResult> {
  const minBytes = options.externalMinBytes ?? 1024;
  const align = options.align ?? 4096;
  const inits = model.graph.initializers;
  const totalInit = inits.reduce((s, t) => s + t.data.byteLength, 0);
  const mode = options.externalData ?? "auto";
  let external = mode === true;
  if (mode === "auto") external = encodeModel(model).byteLength > (options.inlineLimitBytes ?? INLINE_LIMIT);

  const refs = new Map<string, ExternalRef>();
  const shared = options.shareDataOf;
  if (shared?.refs && shared.dataPath) {
    for (const t of inits) {
      const ref = shared.refs.get(t.name);
      if (ref && ref.length === t.data.byteLength) refs.set(t.name, ref);
    }
    external = false; // nothing to write to a data file of this graph's own
  }
  const dataPath = `${path}_data`;
  const location = basename(dataPath);
  let dataBytes = 0;
  if (external) {
    for (const t of inits) {
      if (t.data.byteLength < minBytes) continue;
      dataBytes = Math.ceil(dataBytes / align) * align;
      refs.set(t.name, { location, offset: dataBytes, length: t.data.byteLength });
      dataBytes += t.data.byteLength;
    }
  }
  const proto = encodeModel(model, refs);
  if (proto.byteLength > 2 ** 31 - 1) {
    throw new Error(`${basename(path)}: ${proto.byteLength} bytes exceed protobuf's 2 GiB limit; use external data`);
  }

  let done = 0;
  const fh = await open(path, "w");
  try {
    const sink = new ChunkSink(fh);
    for (const c of proto.chunks() as Chunk[]) {
      if (c instanceof Uint8Array) {
        await sink.write(c);
      } else {
        for await (const piece of deferredChunks(c)) await sink.write(piece);
        done += c.byteLength;
        options.onProgress?.(done, totalInit);
      }
    }
    await sink.flush();
  } finally {
    await fh.close();
  }
  // Small inline tensors travel inside the proto's byte chunks and are not counted above; the graph is
  // whole now, so the last report always says so.
  const finish = <T>(res: T): T => {
    if (done !== totalInit) options.onProgress?.(totalInit, totalInit);
    return res;
  };
  if (shared && refs.size > 0) return finish({ modelPath: path, modelBytes: proto.byteLength, dataPath: shared.dataPath, dataBytes: 0, refs });
  if (!external || refs.size === 0) return finish({ modelPath: path, modelBytes: proto.byteLength, dataBytes: 0 });

  const dh = await open(dataPath, "w");
  try {
    const sink = new ChunkSink(dh);
    for (const t of inits) {
      const ref = refs.get(t.name);
      if (!ref) continue;
      // Every tensor is flushed, so `written` is the exact file position here.
      const gap = ref.offset - sink.written;
      if (gap > 0) await sink.write(new Uint8Array(gap));
      if (t.data instanceof Uint8Array) await sink.write(t.data);
      else for await (const piece of deferredChunks(t.data)) await sink.write(piece);
      await sink.flush();
      done += t.data.byteLength;
      options.onProgress?.(done, totalInit);
    }
    await sink.flush();
  } finally {
    await dh.close();
  }
  return finish({ modelPath: path, modelBytes: proto.byteLength, dataPath, dataBytes, refs });
}

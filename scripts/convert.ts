/**
 * Converts a Qwen2-VL checkpoint (local folder or Hugging Face Hub id) into ONNX graphs (onnx-community layout).
 *
 *   npx tsx scripts/convert.ts --model <folder|hub id> --out <folder> [--dtype fp32|fp16|int8|int4]
 *       [--block-size 32|128] [--symmetric] [--accuracy-level 0..4] [--lm-head nbits|w8a8|float] [--w8a8]
 *       [--vision-int8 | --no-vision-int8] [--vision-attention-chunk N] [--full-logits] [--no-append-decoder]
 *       [--external-data auto|always|never] [--hash-files] [--overwrite] [--revision R] [--cache-dir D]
 *
 * --revision / --cache-dir (Hub ids): the branch, tag, commit or `refs/pr/N` to download (default main), and the
 * hub cache folder (default $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub). The token: $HF_TOKEN,
 * $HUGGING_FACE_HUB_TOKEN, or the file `huggingface-cli login` writes.
 * --overwrite replaces a previous conversion at --out (a folder with this converter's manifest.json), nothing else.
 *
 * --w8a8 (with --dtype int8 only): the decoder layers as W8A8 integer GEMMs (MatMulInteger: int8 weights per
 * output feature, int8 activations per token) instead of weight-only MatMulNBits: faster prefill (time to first
 * token) on CPUs with VNNI/AMX; the vision encoder defaults to W8A8.
 * --lm-head: the LM head as MatMulNBits with the dtype's bits (nbits), as W8A8 MatMulInteger (int8 weights per
 * vocabulary row, int8 activations per token) or float32. Default: w8a8 for int4 and int8 --w8a8, nbits for
 * weight-only int8; fp32/fp16: float.
 * --vision-int8 / --no-vision-int8: the vision encoder's blocks as W8A8 integer GEMMs (int8 weights per output
 * feature, int8 activations per token) or float32. Default: W8A8 for int4 and for int8 --w8a8. fp16 has no
 * W8A8 vision.
 * --vision-attention-chunk N: the vision encoder's attention runs in chunks of query rows holding at most N scores
 * (default 2²⁴, 64 MiB in float32): memory bounded whatever the image. A GPU with memory to spare can take larger
 * chunks (fewer `Loop` iterations).
 * --no-append-decoder: skip decoder_model_append.onnx (the decoder with the engine's in-place KV cache; it
 * shares the weights' data file with decoder_model_merged.onnx) and write only the onnx-community layout.
 *
 * A progress bar on a TTY, one summary line otherwise. Exit status 0 on success, 1 when the conversion fails
 * (the message names the tensor/file/setting; nothing is left half-written), 2 for usage errors.
 */
import { pathToFileURL } from "node:url";
import { CheckpointError, formatBytes } from "../gpu-backend/src/checkpoint/index.ts";
import { type CliIO, parseCli, processIO, progressBar, type Usage, usageError } from "./lib/cli.ts";
import {
  CONVERT_DTYPES,
  type ConvertDtype,
  ConvertError,
  type ConvertManifest,
  type ConvertOptions,
  LM_HEAD_METHODS,
  type LmHeadMethod,
  convertModel,
} from "../gpu-backend/src/convert/index.ts";

/** The decoder's quantization in the summary line; the LM head is named when it differs from the layers. */
function quantSummary(head: LmHeadMethod, q: NonNullable<ConvertManifest["quantization"]>): string {
  const nbits = `${q.bits}-bit block ${q.blockSize}`;
  const headText = head === "nbits" ? nbits : head === "w8a8" ? "W8A8" : "float32";
  if (q.w8a8) return `W8A8 decoder layers, LM head ${headText}`;
  return head === "nbits" ? nbits : `${nbits}, LM head ${headText}`;
}

const USAGE =
  "usage: npx tsx scripts/convert.ts --model <folder|hub id> --out <folder> [--dtype fp32|fp16|int8|int4] " +
  "[--block-size N] [--symmetric] [--accuracy-level 0..4] [--lm-head nbits|w8a8|float] [--w8a8] " +
  "[--vision-int8 | --no-vision-int8] [--vision-attention-chunk N] [--full-logits] [--no-append-decoder] [--external-data auto|always|never] [--hash-files] [--overwrite] " +
  "[--revision R] [--cache-dir D]\n" +
  "  --w8a8                           --dtype int8 only: decoder layers as W8A8 int8 GEMMs (MatMulInteger, int8 activations " +
  "per token) instead of MatMulNBits: faster prefill/time to first token; vision W8A8 by default\n" +
  "  --lm-head nbits|w8a8|float       the LM head as MatMulNBits (the dtype's bits), W8A8 int8 GEMM (int8 weights per vocabulary row, " +
  "int8 activations per token) or float32 (default: w8a8 for int4 and int8 --w8a8, nbits for int8; fp32/fp16: float only)\n" +
  "  --vision-int8, --no-vision-int8  vision encoder blocks as W8A8 int8 GEMMs, or float32 " +
  "(default: int8 vision for --dtype int4 and for --dtype int8 --w8a8; not available for fp16)\n" +
  "  --vision-attention-chunk N       most attention scores per chunk of query rows in the vision encoder (default 16777216 = 2^24; " +
  "larger chunks, fewer iterations, more memory)\n" +
  "  --no-append-decoder              write only the onnx-community graphs, not decoder_model_append.onnx (the engine's " +
  "in-place KV cache decoder, which it prefers; it shares the decoder's weight data)";

/** Runs the converter CLI on `argv` (without node/script); returns the exit status. */
export async function runConvertCli(argv: string[], io: CliIO = processIO): Promise<number> {
  const u: Usage = { text: USAGE, io };
  const usage = (msg: string): number => usageError(u, msg);
  const values = parseCli(
    argv,
    {
      model: { type: "string" },
      out: { type: "string" },
      dtype: { type: "string", default: "fp32" },
      "block-size": { type: "string" },
      symmetric: { type: "boolean", default: false },
      "accuracy-level": { type: "string" },
      "lm-head": { type: "string" },
      w8a8: { type: "boolean", default: false },
      "vision-int8": { type: "boolean", default: false },
      "no-vision-int8": { type: "boolean", default: false },
      "vision-attention-chunk": { type: "string" },
      "full-logits": { type: "boolean", default: false },
      "no-append-decoder": { type: "boolean", default: false },
      "external-data": { type: "string", default: "auto" },
      "hash-files": { type: "boolean", default: false },
      overwrite: { type: "boolean", default: false },
      revision: { type: "string" },
      "cache-dir": { type: "string" },
    },
    u,
  );
  if (typeof values === "number") return values;
  if (!values.model || !values.out) return usage("--model and --out are required");
  const dtype = values.dtype as ConvertDtype;
  if (!CONVERT_DTYPES.includes(dtype)) return usage(`--dtype must be one of ${CONVERT_DTYPES.join(", ")}, got ${values.dtype}`);
  const ext = values["external-data"];
  if (ext !== "auto" && ext !== "always" && ext !== "never") return usage(`--external-data must be auto, always or never, got ${ext}`);
  const quant: NonNullable<ConvertOptions["quant"]> = {};
  if (values["block-size"] !== undefined) {
    const n = Number(values["block-size"]);
    if (!Number.isInteger(n)) return usage(`--block-size must be an integer, got ${values["block-size"]}`);
    quant.blockSize = n;
  }
  if (values["accuracy-level"] !== undefined) {
    const n = Number(values["accuracy-level"]);
    if (!Number.isInteger(n)) return usage(`--accuracy-level must be an integer, got ${values["accuracy-level"]}`);
    quant.accuracyLevel = n;
  }
  if (values.symmetric) quant.symmetric = true;
  const lmHead = values["lm-head"] as LmHeadMethod | undefined;
  if (lmHead !== undefined && !LM_HEAD_METHODS.includes(lmHead)) return usage(`--lm-head must be one of ${LM_HEAD_METHODS.join(", ")}, got ${lmHead}`);
  if (lmHead !== undefined && lmHead !== "float" && (dtype === "fp32" || dtype === "fp16")) return usage(`--lm-head ${lmHead} needs --dtype int8 or int4, got ${dtype}`);
  if (values.w8a8 && dtype !== "int8") return usage(`--w8a8 (W8A8 decoder layers) needs --dtype int8, got ${dtype}`);
  if (values["vision-int8"] && values["no-vision-int8"]) return usage("--vision-int8 and --no-vision-int8 exclude each other");
  if (values["vision-int8"] && dtype === "fp16") return usage("--vision-int8 needs a float32 vision encoder (--dtype fp32, int8 or int4), not fp16");
  const visionInt8 = values["vision-int8"] ? true : values["no-vision-int8"] ? false : undefined;
  const chunk = values["vision-attention-chunk"] === undefined ? undefined : Number(values["vision-attention-chunk"]);
  if (chunk !== undefined && !(Number.isSafeInteger(chunk) && chunk >= 1)) return usage(`--vision-attention-chunk must be an integer ≥ 1, got ${values["vision-attention-chunk"]}`);

  const started = performance.now();
  const bar = { lastDraw: 0 };
  let drew = false;
  try {
    const res = await convertModel({
      model: values.model,
      outDir: values.out,
      dtype,
      quant,
      lastLogitsOnly: !values["full-logits"],
      appendDecoder: !values["no-append-decoder"],
      ...(lmHead !== undefined ? { lmHead } : {}),
      ...(values.w8a8 ? { w8a8: true } : {}),
      ...(visionInt8 !== undefined ? { visionInt8 } : {}),
      ...(chunk !== undefined ? { visionAttentionChunkElements: chunk } : {}),
      externalData: ext === "auto" ? "auto" : ext === "always",
      hashWholeFiles: values["hash-files"],
      overwrite: values.overwrite,
      ...(values.revision !== undefined || values["cache-dir"] !== undefined
        ? { resolve: { ...(values.revision !== undefined ? { revision: values.revision } : {}), ...(values["cache-dir"] !== undefined ? { cacheDir: values["cache-dir"] } : {}) } }
        : {}),
      ...(io.isTTY
        ? {
            onProgress: (p) => {
              const frac = p.totalBytes > 0 ? p.doneBytes / p.totalBytes : 1;
              const label = `${formatBytes(p.doneBytes)}/${formatBytes(p.totalBytes)} ${p.graph}`;
              drew = progressBar(io, frac, label, p.doneBytes >= p.totalBytes, bar) || drew;
            },
          }
        : {}),
    });
    if (drew) io.stderr("\n");
    const m = res.manifest;
    const files = Object.values(m.graphs)
      .map((g) => `${g.file} ${formatBytes(g.bytes + (g.data_bytes ?? 0))}${g.data_file ? ` (+${g.data_file})` : ""}`)
      .join(", ");
    const rss = process.resourceUsage().maxRSS / 1024;
    io.stdout(
      `converted ${values.model} → ${res.outDir} (${m.dtype}` +
        `${m.quantization ? `, ${quantSummary(m.converter.options.lm_head, m.quantization)}` : ""}` +
        `${m.vision_quantization ? ", vision W8A8" : ""}) ` +
        `in ${((performance.now() - started) / 1000).toFixed(1)} s: ${files}; peak RSS ${rss.toFixed(0)} MB\n`,
    );
    return 0;
  } catch (e) {
    if (drew) io.stderr("\n");
    if (e instanceof ConvertError || e instanceof CheckpointError) {
      io.stderr(`convert failed [${e.code}]: ${e.message}\n`);
      return 1;
    }
    io.stderr(`convert failed: ${(e as Error).stack ?? String(e)}\n`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await runConvertCli(process.argv.slice(2));
}

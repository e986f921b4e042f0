/**
 * `vision`: the vision encoder on large images. Its attention is computed in chunks of query rows (converter
 * revision 7, `visionAttentionChunkElements`); the peer is the same graph with one chunk, i.e. the whole
 * [heads, N, N] attention at once, built from the cached checkpoint for this run. Per
 * patch count (`--vision-patches`, squares of an even side): time (median of `--runs` after a warm-up), peak
 * and after-run RSS, each graph and size in its own child, and the largest difference between the two graphs'
 * features. Default variant: int4 (the CPU serving default) unless --dtypes is given.
 */
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { VisionArgs, VisionRun } from "../children/vision.ts";
import { f16ToF32 } from "../../gpu-backend/src/checkpoint/safetensors.ts";
import type { ConvertDtype } from "../../gpu-backend/src/convert/index.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, log, runChild, spread, table, finishSuite } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

/** Query rows per chunk and chunks for `patches`, as the graph computes them (convert/vision.ts). */
export function attentionChunks(patches: number, heads: number, budget: number): { rows: number; chunks: number } {
  const rows = Math.max(1, Math.min(patches, Math.floor(budget / (heads * patches))));
  return { rows, chunks: Math.ceil(patches / rows) };
}

interface VisionPoint {
  patches: number;
  chunks: number;
  chunked: VisionRun;
  whole: VisionRun;
  /** whole / chunked median time. */
  speedup: number;
  max_abs_diff: number;
}

function readFeatures(file: string, type: "float32" | "float16"): Float32Array {
  const b = readFileSync(file);
  const bytes = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
  return type === "float16" ? f16ToF32(new Uint16Array(bytes)) : new Float32Array(bytes);
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY;
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

export async function visionSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.visionDtypes);
  const results: Array<{ dtype: string; budget: number; points: VisionPoint[] }> = [];
  let text = "";
  for (const [dtype, dir] of variants) {
    const manifest = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"));
    const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    const options = manifest.converter.options as { dtype: ConvertDtype; vision_int8: boolean; vision_attention_chunk_elements: number };
    const vc = config.vision_config as { num_heads: number; in_chans: number; temporal_patch_size: number; patch_size: number };
    const floatType: "float32" | "float16" = manifest.io_float_type === "float16" ? "float16" : "float32";
    const wholeDir = join(models.paths.root, `vision-whole-${dtype}`);
    const features = (name: string) => join(wholeDir, `${name}.features`);
    try {
      log(`vision: ${dtype}, building the one-chunk peer encoder`);
      await runChild("convert.ts", { kind: "vision", model: models.paths.ckpt, outDir: wholeDir, dtype: options.dtype, visionInt8: options.vision_int8, visionAttentionChunkElements: Number.MAX_SAFE_INTEGER }, { timeoutS: opts.childTimeoutS });
      const points: VisionPoint[] = [];
      for (const [i, patches] of opts.visionPatches.entries()) {
        const run = async (name: "chunked" | "whole") => {
          const args: VisionArgs = {
            graph: join(name === "chunked" ? dir : wholeDir, "vision_encoder.onnx"),
            side: Math.round(Math.sqrt(patches)),
            patchDim: vc.in_chans * vc.temporal_patch_size * vc.patch_size * vc.patch_size,
            floatType,
            runs: opts.runs,
            threads: opts.threads,
            featuresFile: features(name),
          };
          log(`vision: ${dtype}, ${patches} patches, ${name}`);
          return (await runChild<VisionRun>("vision.ts", args, { timeoutS: opts.childTimeoutS })).result;
        };
        // Alternate which graph runs first, so that a drift of the machine does not favour one.
        const order = i % 2 ? (["whole", "chunked"] as const) : (["chunked", "whole"] as const);
        const got = {} as Record<"chunked" | "whole", VisionRun>;
        for (const name of order) got[name] = await run(name);
        points.push({
          patches,
          chunks: attentionChunks(patches, vc.num_heads, options.vision_attention_chunk_elements).chunks,
          chunked: got.chunked,
          whole: got.whole,
          speedup: spread(got.whole.ms).median / spread(got.chunked.ms).median,
          max_abs_diff: maxAbsDiff(readFeatures(features("chunked"), floatType), readFeatures(features("whole"), floatType)),
        });
      }
      results.push({ dtype, budget: options.vision_attention_chunk_elements, points });
      const rows = [["patches", "chunks", "chunked s", "whole s", "whole / chunked", "peak RSS chunked", "peak RSS whole", "RSS after, chunked / whole", "max |Δ| features"]];
      for (const p of points) {
        rows.push([
          String(p.patches),
          String(p.chunks),
          fmt(spread(p.chunked.ms).median / 1000, 2),
          fmt(spread(p.whole.ms).median / 1000, 2),
          `×${fmt(p.speedup, 2)}`,
          fmtBytes(p.chunked.peak_rss_bytes),
          fmtBytes(p.whole.peak_rss_bytes),
          `${fmtBytes(p.chunked.rss_after_bytes)} / ${fmtBytes(p.whole.rss_after_bytes)}`,
          p.max_abs_diff.toExponential(1),
        ]);
      }
      text += `\nVision encoder, ${dtype} (${models.size}, ${opts.threads} threads, median of ${opts.runs} after a warm-up; attention chunks of at most ${options.vision_attention_chunk_elements} scores)\n${table(rows)}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    } finally {
      rmSync(wholeDir, { recursive: true, force: true });
    }
  }
  text += "chunked = the folder's vision_encoder.onnx (attention in chunks of query rows); whole = the same encoder with the whole [heads, N, N] attention at once\n";
  return finishSuite(opts, "vision", text, { machine, size: models.size, failures }, { results });
}

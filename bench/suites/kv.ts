/**
 * `kv`: what the engine's append KV contract (`decoder_model_append.onnx`, the cache read in place) saves
 * against the onnx-community one (`decoder_model_merged.onnx`, whose `Concat(past, new)` copies the cache every
 * step): the decode step of both graphs of one folder, interleaved in one child, per context length and batch
 * size, printed as present / append. Default variant: int4 (both decoders are loaded at once; --dtypes names others).
 */
import type { KvArgs, KvResult } from "../children/kv.ts";
import { type BenchOptions, childErrorText, fmt, fmtBytes, log, runChild, table, finishSuite } from "../lib/common.ts";
import { prepareVariants } from "../lib/models.ts";

export async function kvSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const { machine, models, variants, failures } = await prepareVariants(opts, opts.kvDtypes);
  const results: KvResult[] = [];
  let text = "";
  for (const [dtype, dir] of variants) {
    const args: KvArgs = {
      modelDir: dir,
      threads: opts.threads,
      contexts: opts.contexts,
      rows: opts.kvRows,
      steps: opts.quick ? 2 : 8,
      maxRowTokens: 8192,
      label: dtype,
    };
    log(`kv: ${dtype}, contexts ${args.contexts.join(",")} × rows ${args.rows.join(",")}, ${args.steps} steps per contract`);
    try {
      const { result } = await runChild<KvResult>("kv.ts", args, { timeoutS: opts.childTimeoutS });
      results.push(result);
      const rows = [["rows", "context", "KV cache", "append ms/step", "present ms/step", "present / append"]];
      for (const p of result.points) {
        rows.push([String(p.rows), String(p.context), fmtBytes(p.cache_bytes), fmt(p.append_ms, 1), fmt(p.present_ms, 1), `×${fmt(p.speedup, 2)}`]);
      }
      text += `\nKV contract, ${dtype} (${models.size}, ${opts.threads} threads, median of ${args.steps} interleaved steps; peak RSS ${fmtBytes(result.peak_rss_bytes)})\n${table(rows)}\n`;
      if (result.skipped.length) text += `skipped (rows × context > ${args.maxRowTokens}): ${result.skipped.map((s) => `${s.rows}×${s.context}`).join(", ")}\n`;
    } catch (e) {
      failures[dtype] = childErrorText(e);
    }
  }
  text += "append = decoder_model_append.onnx (new K/V written into a cache buffer with spare slots); present = decoder_model_merged.onnx (onnx-community: past + new copied into present every step)\n";
  return finishSuite(opts, "kv", text, { machine, size: models.size, failures }, { results });
}

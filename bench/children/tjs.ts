/**
 * Child: the same eval prompt through transformers.js (@huggingface/transformers, Qwen2VLForConditionalGeneration
 * + AutoProcessor) on OUR converted fp32 files. transformers.js expects the onnx-community layout: config and
 * tokenizer files at the top, graphs under `onnx/` named `<graph><dtype suffix>.onnx` (fp32: no suffix) with
 * external data `<graph>.onnx_data` beside them. A folder of symlinks in the work dir gives it that layout
 * without copying or changing the converter's output.
 *
 * The continuation is forced with a logits processor (every logit but the forced id set to -Infinity), which
 * also records the model's own argmax at each step for the parity check against our engine. Timing is taken
 * from a streamer's `put` calls: TTFT = reading the image → first generated token, decode tok/s between tokens.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { AutoProcessor, BaseStreamer, LogitsProcessor, LogitsProcessorList, Qwen2VLForConditionalGeneration, RawImage, Tensor, env } from "@huggingface/transformers";
import { withImageProcessorDefaults } from "../../shared/src/model-meta.ts";
import { childArgs, childDone, childMain } from "../lib/common.ts";
import type { RunSample } from "./single.ts";

export interface TjsArgs {
  modelDir: string;
  workDir: string;
  threads: number;
  runs: number;
  forcedIds: number[];
  warmupTokens: number;
  promptText: string;
  imagePath: string;
  /** Complete preprocessor_config.json with Python's defaults (default true; false = the files as they are). */
  explicitPreprocessor?: boolean;
}

export interface TjsResult {
  ok: boolean;
  /** Where it failed (load, processor, generate) and why, verbatim. */
  error?: { stage: string; message: string };
  layout: string[];
  /** Changes made beyond symlinks (and why), e.g. preprocessor keys transformers.js needs explicitly. */
  adaptations: string[];
  load_ms?: number;
  prompt_tokens?: number;
  image_tokens?: number;
  cold?: RunSample;
  runs?: RunSample[];
  argmax_ids?: number[];
  session_io?: Record<string, { inputs: string[]; outputs: string[] }>;
  peak_rss_bytes?: number;
}

/*
 * transformers.js applies none of Python's Qwen2VLImageProcessor defaults when preprocessor_config.json omits
 * them (its ImageProcessor: do_normalize undefined → no normalization, resample 2 (bilinear), do_resize only
 * when `size` is given); without them it feeds un-normalized pixels: different logits, same speed. The
 * converter now writes them into preprocessor_config.json (QWEN2VL_IMAGE_PROCESSOR_DEFAULTS); the completion
 * below remains for folders converted before it did, which the bench keeps reusing (bench/lib/models.ts
 * reconverts only when the dtype, shape or source checkpoint changed). For a current conversion it adds nothing.
 */

/**
 * Builds `<workDir>/tjs-model` in the layout transformers.js loads: symlinks, graphs under `onnx/`, and a
 * preprocessor_config.json completed with Python's defaults when the original lacks them (`explicitPreprocessor`).
 */
function linkLayout(modelDir: string, workDir: string, explicitPreprocessor: boolean): { dir: string; files: string[]; adaptations: string[] } {
  const dir = join(workDir, "tjs-model");
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(join(dir, "onnx"), { recursive: true });
  const files: string[] = [];
  const adaptations: string[] = [];
  for (const f of readdirSync(modelDir)) {
    const graph = f.endsWith(".onnx") || f.includes(".onnx_data");
    const rel = graph ? join("onnx", f) : f;
    files.push(rel);
    if (f === "preprocessor_config.json" && explicitPreprocessor) {
      const { config, added } = withImageProcessorDefaults(JSON.parse(readFileSync(join(modelDir, f), "utf8")) as Record<string, unknown>);
      if (added.length > 0) {
        writeFileSync(join(dir, rel), JSON.stringify(config, null, 2));
        adaptations.push(
          `preprocessor_config.json: added ${added.join(", ")} (Python Qwen2VLImageProcessor defaults; transformers.js does not normalize ` +
            "without do_normalize: true; a folder converted before the converter wrote them — reconvert to drop this)",
        );
        continue;
      }
    }
    symlinkSync(join(modelDir, f), join(dir, rel));
  }
  return { dir, files: files.sort(), adaptations };
}

class ForceContinuation extends LogitsProcessor {
  readonly argmax: number[] = [];
  constructor(
    private readonly forced: number[],
    private readonly promptLen: number,
  ) {
    super();
  }
  override _call(inputIds: bigint[][], logits: Tensor): Tensor {
    const step = inputIds[0]!.length - this.promptLen;
    const data = logits.data as Float32Array;
    const vocab = logits.dims.at(-1)!;
    for (let b = 0; b < (logits.dims.length > 1 ? logits.dims[0]! : 1); b++) {
      const row = data.subarray(b * vocab, (b + 1) * vocab);
      let best = 0;
      for (let i = 1; i < vocab; i++) if (row[i]! > row[best]!) best = i;
      if (b === 0) this.argmax.push(best);
      const id = this.forced[Math.min(step, this.forced.length - 1)]!;
      row.fill(-Infinity);
      row[id] = 0;
    }
    return logits;
  }
}

class Timer extends BaseStreamer {
  readonly times: number[] = [];
  private first = true;
  override put(_value: bigint[][]): void {
    if (this.first) {
      this.first = false; // the prompt
      return;
    }
    this.times.push(performance.now());
  }
  override end(): void {}
}

childMain(async () => {
  const a = childArgs<TjsArgs>();
  const { dir, files, adaptations } = linkLayout(a.modelDir, a.workDir, a.explicitPreprocessor ?? true);
  const result: TjsResult = { ok: false, layout: files, adaptations };
  const fail = (stage: string, e: unknown): never => {
    result.error = { stage, message: (e as Error).message ?? String(e) };
    childDone(result as unknown as Record<string, unknown>);
  };
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = a.workDir;
  env.useBrowserCache = false;
  // Use the external data file names the converter wrote, by graph.
  const external: Record<string, number> = {};
  for (const f of files) if (f.endsWith(".onnx_data")) external[f.slice("onnx/".length, -"_data".length)] = 1;

  const t0 = performance.now();
  let model: Qwen2VLForConditionalGeneration;
  let processor: Awaited<ReturnType<typeof AutoProcessor.from_pretrained>>;
  try {
    model = (await Qwen2VLForConditionalGeneration.from_pretrained("tjs-model", {
      local_files_only: true,
      dtype: "fp32",
      device: "cpu",
      ...(Object.keys(external).length ? { use_external_data_format: external } : {}),
      session_options: { intraOpNumThreads: a.threads, interOpNumThreads: 1, graphOptimizationLevel: "all" },
    })) as Qwen2VLForConditionalGeneration;
  } catch (e) {
    return fail("load model", e);
  }
  try {
    processor = await AutoProcessor.from_pretrained("tjs-model", { local_files_only: true });
  } catch (e) {
    return fail("load processor", e);
  }
  result.load_ms = performance.now() - t0;
  const sessions = (model as unknown as { sessions: Record<string, { inputNames: string[]; outputNames: string[]; run: (...x: unknown[]) => Promise<unknown> }> }).sessions;
  result.session_io = Object.fromEntries(Object.entries(sessions).map(([k, s]) => [k, { inputs: [...s.inputNames], outputs: [...s.outputNames] }]));
  process.stderr.write(`  transformers.js: loaded in ${(result.load_ms / 1000).toFixed(1)} s\n`);
  // Time each ORT call per session, to split transformers.js's own overhead from the runtime's work.
  const calls: Record<string, number[]> = {};
  for (const [name, session] of Object.entries(sessions)) {
    const run = session.run.bind(session);
    calls[name] = [];
    session.run = async (...x: unknown[]) => {
      const t = performance.now();
      try {
        return await run(...x);
      } finally {
        calls[name]!.push(performance.now() - t);
      }
    };
  }
  const resetCalls = () => Object.values(calls).forEach((v) => (v.length = 0));

  const once = async (forced: number[]): Promise<{ sample: RunSample; argmax: number[] }> => {
    resetCalls();
    const start = performance.now();
    const image = await RawImage.read(a.imagePath);
    const inputs = (await (processor as unknown as (t: string, i: unknown) => Promise<Record<string, Tensor>>)(a.promptText, image)) as Record<string, Tensor>;
    const preprocessMs = performance.now() - start;
    const ids = inputs.input_ids!;
    result.prompt_tokens = ids.dims.at(-1)!;
    const grid = inputs.image_grid_thw?.tolist() as number[][] | undefined;
    result.image_tokens = grid ? grid.reduce((n, [t, h, w]) => n + (Number(t) * Number(h) * Number(w)) / 4, 0) : 0;
    const forcer = new ForceContinuation(forced, result.prompt_tokens);
    const timer = new Timer();
    const processors = new LogitsProcessorList();
    processors.push(forcer);
    await model.generate({
      ...inputs,
      max_new_tokens: forced.length,
      do_sample: false,
      logits_processor: processors,
      streamer: timer,
    } as unknown as Parameters<typeof model.generate>[0]);
    const t = timer.times;
    if (t.length !== forced.length) throw new Error(`generated ${t.length} tokens, expected ${forced.length}`);
    const n = t.length - 1;
    const dec = calls.decoder_model_merged ?? [];
    const steps = dec.slice(1).sort((x, y) => x - y);
    return {
      sample: {
        preprocess_ms: preprocessMs,
        vision_ms: calls.vision_encoder?.[0] ?? NaN,
        prefill_ms: dec[0] ?? NaN,
        ttft_ms: t[0]! - start,
        decode_tokens: n,
        decode_tok_s: n > 0 ? n / ((t[n]! - t[0]!) / 1000) : NaN,
        // decoder run alone (ours: embedding + decoder run)
        decode_step_ms_median: steps.length ? steps[Math.floor((steps.length - 1) / 2)]! : NaN,
        total_ms: t[n]! - start,
      },
      argmax: forcer.argmax,
    };
  };

  try {
    const warm = await once(a.forcedIds.slice(0, a.warmupTokens));
    result.cold = warm.sample;
    result.argmax_ids = warm.argmax;
    process.stderr.write(`  transformers.js: warm-up TTFT ${(warm.sample.ttft_ms / 1000).toFixed(2)} s\n`);
    result.runs = [];
    for (let i = 0; i < a.runs; i++) {
      const { sample } = await once(a.forcedIds);
      result.runs.push(sample);
      process.stderr.write(`  transformers.js: run ${i + 1}/${a.runs}: TTFT ${(sample.ttft_ms / 1000).toFixed(2)} s, decode ${sample.decode_tok_s.toFixed(2)} tok/s\n`);
    }
  } catch (e) {
    return fail("generate", e);
  }
  result.ok = true;
  if (existsSync(dir)) rmSync(dir, { recursive: true, force: true });
  childDone(result as unknown as Record<string, unknown>);
});

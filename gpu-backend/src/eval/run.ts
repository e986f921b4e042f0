/**
 * Drives an evaluation: loads and validates the file, picks the items, checks the images exist, runs every
 * item with the reference settings (greedy, `max_new_tokens` 512 by default, the reference prompt) and
 * scores the replies (score.ts).
 *
 * Two ways to run the model:
 * - local: a converted model folder loaded in this process, items run through the serving engine's
 *   continuous batching (`BatchingEngine`, `batch` sequences decoded together). The prompt is built the way
 *   the edge builds it: chat template → tokens → `<|image_pad|>` expanded to the image's token count from its
 *   header dimensions (smart_resize); the engine decodes the image and checks the grid.
 * - api: each item POSTed to a deployment's `/v1/vqa` (multipart, bearer JWT), `batch` requests in flight.
 *   Overload answers (429, 503) are retried with backoff; authentication and routing failures stop the run.
 *
 * Nothing here prints an item's image, question or output; callers get them only in the per-item records.
 */
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import * as ort from "onnxruntime-node";
import { renderChatTemplate } from "../../../shared/src/chat-template.ts";
import { ApiError, NamedError } from "../../../shared/src/errors.ts";
import { sniffImage } from "../../../shared/src/image-header.ts";
import { expandImagePads } from "../../../shared/src/image-tokens.ts";
import { imageGrid } from "../../../shared/src/smart-resize.ts";
import { DEFAULT_PARAMS, type GenerationParams } from "../../../shared/src/wire.ts";
import { BatchingEngine } from "../engine/engine.ts";
import type { EngineEvent, EngineRequest } from "../engine/engine-types.ts";
import { loadModel, releaseModel, type ExecutionProvider, type LoadedModel } from "../engine/model.ts";
import { createTokenizer } from "../engine/prompt.ts";
import { runGeneration } from "../engine/run.ts";
import {
  findMissingImages,
  imagePath,
  loadDataset,
  promptFor,
  selectItems,
  type DatasetWarning,
  type EvalItem,
  type ItemPrompt,
} from "./dataset.ts";
import { gradeItem, summarize, type GradedItem, type ItemOutput, type Summary } from "./score.ts";

/** The reference evaluation's `max_new_tokens` (test_script.sh / test_qwen2vl_med.py). */
export const REFERENCE_MAX_NEW_TOKENS = 512;
/** Default number of sequences decoded together (local) or requests in flight (api). */
export const DEFAULT_BATCH = 4;

/** A problem that stops the whole run (bad arguments, missing images, authentication, model load). */
export class EvalError extends NamedError {}

/** Where the model runs. */
export type EvalTarget =
  | { kind: "local"; modelDir: string; provider?: ExecutionProvider; threads?: number }
  | { kind: "api"; baseUrl: string; token: string };

/** Everything one evaluation needs. */
export interface EvalOptions {
  /** The evaluation JSON file. */
  data: string;
  /** Folder the items' `image[0]` paths are relative to (the reference's `--base_path`). */
  images: string;
  target: EvalTarget;
  /** Sequences decoded together (local) / requests in flight (api). Default {@link DEFAULT_BATCH}. */
  batch?: number;
  /** Run only the first N selected items. */
  limit?: number;
  /** Run only one subset: MRI, CT, X-ray (Xray) or a subset name as written. */
  subset?: string;
  /** Default {@link REFERENCE_MAX_NEW_TOKENS}. */
  maxNewTokens?: number;
  /**
   * local: speculative decoding's draft size (the engine's `draftTokens`; it drafts while a sequence decodes alone,
   * so `batch` 1 drafts throughout). The replies are the same; the summary reports the draft tokens kept. An api
   * run reports them when the server drafts (its `DRAFT_TOKENS`).
   */
  draftTokens?: number;
  /** Leave out items whose image file is missing (counted as skipped) instead of refusing to start. */
  skipMissing?: boolean;
  /** Called once per dataset warning of a selected item, before the run. */
  onWarning?: (w: DatasetWarning) => void;
  /** Called after each item. */
  onProgress?: (p: Progress) => void;
  /**
   * Outputs of items an earlier run with the same settings answered (a resumed run, eval/journal.ts): those
   * items are not run again and count in the summary as if answered now.
   */
  done?: readonly ItemOutput[];
  /** Called with each output this run produces, as it arrives (the CLI's journal). */
  onItem?: (out: ItemOutput) => void;
  /** fetch for api mode (tests). */
  fetch?: typeof fetch;
  /** Base delay of api retries in ms (default 500; tests use less). */
  retryBaseMs?: number;
}

/** Progress after an item. */
export interface Progress {
  done: number;
  total: number;
  correct: number;
  elapsedMs: number;
}

/** A per-item record of the results file. */
export interface ItemRecord extends GradedItem {
  /** The subset name as written in the file. */
  subset_name: string;
  /** Which text the prompt was built from (see `ItemPrompt.source`). */
  prompt_source: ItemPrompt["source"];
  /** The raw completion; only kept on request (`--save-outputs`). */
  output?: string | null;
}

/** What ran the model. */
export interface EngineInfo {
  mode: "local" | "api";
  /** local: the model folder; api: the base URL. */
  model: string;
  /** local: manifest dtype, fingerprint, ORT version and provider. api: the model id the API reported. */
  details: Record<string, string | number | null>;
}

/** Result of {@link runEvaluation}. */
export interface EvalRun {
  summary: Summary;
  /** Sorted by file index; `output` is set on every record (callers drop it unless asked to keep it). */
  items: ItemRecord[];
  /** Warnings of the selected items. */
  warnings: DatasetWarning[];
  /** Items in the file / selected by --subset and --limit. */
  datasetItems: number;
  selectedItems: number;
  /** Items left out for a missing image (with skipMissing), by file index. */
  skippedIndices: number[];
  /** Items taken from {@link EvalOptions.done} instead of being run (their time is not in the summary's). */
  resumedItems: number;
  engine: EngineInfo;
  params: GenerationParams;
  startedAt: string;
}

/** Runs `worker` over `items` with at most `concurrency` at a time; the first thrown error stops new work and is rethrown. */
async function pool<T>(items: readonly T[], concurrency: number, worker: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { e: unknown } | null = null;
  const lanes = Array.from({ length: Math.min(concurrency, items.length) }, async () => {
    while (!failure && next < items.length) {
      const item = items[next++]!;
      try {
        await worker(item);
      } catch (e) {
        failure ??= { e };
      }
    }
  });
  await Promise.all(lanes);
  if (failure) throw (failure as { e: unknown }).e;
}

function errorOf(e: unknown): { code: string; message: string } {
  if (e instanceof ApiError) return { code: e.code, message: e.message };
  const code = (e as NodeJS.ErrnoException)?.code;
  if (typeof code === "string" && code.startsWith("E")) return { code: "image_unreadable", message: `cannot read the image (${code})` };
  return { code: "internal_error", message: (e as Error)?.message ?? String(e) };
}

/** Milliseconds since `t0`, rounded. */
const elapsed = (t0: number): number => Math.round(performance.now() - t0);

const failed = (item: EvalItem, prompt: ItemPrompt, err: { code: string; message: string }, ms: number): ItemOutput => ({
  index: item.index,
  subset: item.modality,
  gold: item.solution,
  options: prompt.options,
  output: null,
  error: err,
  completion_tokens: 0,
  finish_reason: null,
  ms,
});

// ------------------------------------------------------------------------------------------------ local

/** The engine request of one item (exported for tests): the edge's way of building it, from header dimensions. */
export async function buildLocalRequest(
  model: LoadedModel,
  tokenizer: ReturnType<typeof createTokenizer>,
  item: EvalItem,
  imagesDir: string,
  params: GenerationParams,
  id: string,
): Promise<EngineRequest> {
  const bytes = new Uint8Array(await readFile(imagePath(item, imagesDir)));
  const header = sniffImage(bytes);
  const p = model.preprocessor;
  const grid = imageGrid(
    { height: header.height, width: header.width },
    { patchSize: p.patch_size, mergeSize: p.merge_size, temporalPatchSize: p.temporal_patch_size, minPixels: p.min_pixels, maxPixels: p.max_pixels },
  );
  const text = renderChatTemplate(promptFor(item).messages, { addGenerationPrompt: true });
  const ids = tokenizer.encode(text);
  return {
    id,
    inputIds: expandImagePads(ids, [grid.tokens], model.meta.image_token_id),
    images: [{ bytes, mime: header.mime, minPixels: p.min_pixels, maxPixels: p.max_pixels, expectedGrid: grid.gridThw }],
    params,
    deadlineMs: null,
  };
}

/** Runs items through a `BatchingEngine` on a loaded model; `onItem` gets each item's output as it finishes. */
export async function runLocalItems(
  model: LoadedModel,
  items: readonly EvalItem[],
  opts: { imagesDir: string; batch: number; params: GenerationParams; draftTokens?: number; onItem: (o: ItemOutput) => void },
): Promise<void> {
  const tokenizer = createTokenizer(model);
  const engine = new BatchingEngine(model, { maxBatch: opts.batch, draftTokens: opts.draftTokens ?? 0 });
  try {
    await pool(items, opts.batch, async (item) => {
      const prompt = promptFor(item);
      const t0 = performance.now();
      let req: EngineRequest;
      try {
        req = await buildLocalRequest(model, tokenizer, item, opts.imagesDir, opts.params, `eval-${item.index}`);
      } catch (e) {
        opts.onItem(failed(item, prompt, errorOf(e), elapsed(t0)));
        return;
      }
      const end = await new Promise<EngineEvent>((resolve) => {
        engine.submit(req, (ev) => {
          if (ev.type === "done" || ev.type === "error") resolve(ev);
        });
      });
      const ms = elapsed(t0);
      if (end.type === "error") {
        opts.onItem(failed(item, prompt, { code: end.code, message: end.message }, ms));
      } else if (end.type === "done") {
        opts.onItem({
          index: item.index,
          subset: item.modality,
          gold: item.solution,
          options: prompt.options,
          output: end.text,
          error: null,
          completion_tokens: end.usage.completion_tokens,
          ...draftsOf(end.usage),
          finish_reason: end.finish_reason,
          ms,
        });
      }
    });
  } finally {
    await engine.close();
  }
}

/** A reply's `usage.completion_tokens_details` as {@link ItemOutput.drafts} (nothing when it did not draft). */
function draftsOf(usage: unknown): Pick<ItemOutput, "drafts"> {
  const d = (usage as { completion_tokens_details?: Record<string, unknown> } | undefined)?.completion_tokens_details;
  const accepted = Number(d?.accepted_prediction_tokens);
  const rejected = Number(d?.rejected_prediction_tokens);
  return Number.isFinite(accepted) && Number.isFinite(rejected) ? { drafts: { accepted, rejected } } : {};
}

// -------------------------------------------------------------------------------------------------- api

/** `<base>/v1/vqa` (a base that already ends in /v1/vqa is used as it is). */
export function vqaUrl(base: string): string {
  const b = base.replace(/\/+$/, "");
  return /\/v1\/vqa$/.test(b) ? b : `${b}/v1/vqa`;
}

/** Answers that stop an api run at once: every further request would fail the same way. */
const FATAL_STATUSES = new Set([401, 403, 404, 405]);
/** `invalid_parameter` concerns what every request sends alike (max_new_tokens above the server's cap). */
const FATAL_CODES = new Set(["invalid_parameter", "model_mismatch"]);
/** Answers worth retrying (overload, a backend restarting or failing for a moment, a timeout). */
const RETRY_STATUSES = new Set([429, 500, 502, 503, 504]);
const MAX_TRIES = 6;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface VqaAnswer {
  raw?: unknown;
  model?: unknown;
  finish_reason?: unknown;
  usage?: { completion_tokens?: unknown; completion_tokens_details?: unknown };
}

/** POSTs one item to `/v1/vqa`; returns its output (errors of the item included) or throws {@link EvalError} for run-stopping failures. */
async function apiItem(
  item: EvalItem,
  opts: { url: string; token: string; imagesDir: string; maxNewTokens: number; fetch: typeof fetch; retryBaseMs: number; onModel: (m: string) => void },
): Promise<ItemOutput> {
  const prompt = promptFor(item);
  const t0 = performance.now();
  let bytes: Uint8Array;
  let mime: string;
  try {
    bytes = new Uint8Array(await readFile(imagePath(item, opts.imagesDir)));
    mime = sniffImage(bytes).mime;
  } catch (e) {
    return failed(item, prompt, errorOf(e), elapsed(t0));
  }
  for (let attempt = 1; ; attempt++) {
    const form = new FormData();
    form.append("image", new Blob([bytes], { type: mime }), basename(item.image));
    form.append("question", prompt.question);
    for (const o of prompt.options) form.append("options", o);
    form.append("max_new_tokens", String(opts.maxNewTokens));
    let res: Response;
    try {
      res = await opts.fetch(opts.url, { method: "POST", headers: { authorization: `Bearer ${opts.token}` }, body: form });
    } catch (e) {
      if (attempt < 3) {
        await sleep(opts.retryBaseMs * 2 ** (attempt - 1));
        continue;
      }
      throw new EvalError(`cannot reach ${opts.url}: ${(e as Error).message}`);
    }
    const body = (await res.json().catch(() => null)) as (VqaAnswer & { error?: { code?: unknown; message?: unknown } }) | null;
    const code = typeof body?.error?.code === "string" ? body.error.code : `http_${res.status}`;
    const message = typeof body?.error?.message === "string" ? body.error.message : `HTTP ${res.status}`;
    if (res.ok && body && typeof body.raw === "string") {
      if (typeof body.model === "string") opts.onModel(body.model);
      const tokens = Number(body.usage?.completion_tokens);
      return {
        index: item.index,
        subset: item.modality,
        gold: item.solution,
        options: prompt.options,
        output: body.raw,
        error: null,
        completion_tokens: Number.isFinite(tokens) ? tokens : 0,
        ...draftsOf(body.usage),
        finish_reason: body.finish_reason === "length" ? "length" : body.finish_reason === "stop" ? "stop" : null,
        ms: elapsed(t0),
      };
    }
    if (res.ok) return failed(item, prompt, { code: "bad_response", message: "the API answered without a `raw` text" }, elapsed(t0));
    if (FATAL_STATUSES.has(res.status) || FATAL_CODES.has(code)) throw new EvalError(`${opts.url} answered ${res.status} ${code}: ${message}`);
    if (RETRY_STATUSES.has(res.status) && attempt < MAX_TRIES) {
      const after = Number(res.headers.get("retry-after"));
      await sleep(Number.isFinite(after) && after > 0 ? Math.min(after * 1000, 30_000) : Math.min(opts.retryBaseMs * 2 ** (attempt - 1), 10_000));
      continue;
    }
    return failed(item, prompt, { code, message }, elapsed(t0));
  }
}

// ------------------------------------------------------------------------------------------------ whole

/** Loads the file, selects the items, checks images, runs them (local or api) and scores them. */
export async function runEvaluation(o: EvalOptions): Promise<EvalRun> {
  const batch = o.batch ?? DEFAULT_BATCH;
  const maxNewTokens = o.maxNewTokens ?? REFERENCE_MAX_NEW_TOKENS;
  if (!Number.isSafeInteger(batch) || batch < 1) throw new EvalError(`batch must be a positive integer, got ${batch}`);
  if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 1) throw new EvalError(`max_new_tokens must be a positive integer, got ${maxNewTokens}`);
  if (o.limit !== undefined && (!Number.isSafeInteger(o.limit) || o.limit < 1)) throw new EvalError(`limit must be a positive integer, got ${o.limit}`);

  const dataset = await loadDataset(o.data);
  let items = selectItems(dataset.items, { ...(o.subset !== undefined ? { subset: o.subset } : {}), ...(o.limit !== undefined ? { limit: o.limit } : {}) });
  if (items.length === 0) {
    const names = [...new Set(dataset.items.map((i) => i.modality))].join(", ");
    throw new EvalError(`no item matches --subset ${o.subset}; the file's subsets are: ${names}`);
  }
  const missing = findMissingImages(items, o.images);
  let skippedIndices: number[] = [];
  if (missing.length > 0) {
    if (!o.skipMissing) {
      const first = missing.slice(0, 5).map((m) => `  item ${m.item.index}: ${m.path}`).join("\n");
      throw new EvalError(
        `${missing.length} of ${items.length} image files are missing under ${o.images}:\n${first}` +
          (missing.length > 5 ? `\n  … and ${missing.length - 5} more` : "") +
          "\nCheck --images (the folder the items' image paths are relative to), or pass --skip-missing to leave those items out.",
      );
    }
    const gone = new Set(missing.map((m) => m.item));
    skippedIndices = missing.map((m) => m.item.index);
    items = items.filter((i) => !gone.has(i));
  }
  const selected = new Set(items.map((i) => i.index));
  const warnings = dataset.warnings.filter((w) => selected.has(w.index));
  for (const w of warnings) o.onWarning?.(w);

  const params: GenerationParams = { ...DEFAULT_PARAMS, max_new_tokens: maxNewTokens, temperature: 0, seed: null, stop: [] };
  const startedAt = new Date().toISOString();
  const outputs = (o.done ?? []).filter((d) => selected.has(d.index));
  const resumedItems = outputs.length;
  const answered = new Set(outputs.map((d) => d.index));
  const toRun = items.filter((i) => !answered.has(i.index));
  let correct = outputs.filter((d) => gradeItem(d).correct).length;
  let t0 = performance.now();
  const onItem = (out: ItemOutput) => {
    outputs.push(out);
    o.onItem?.(out);
    if (gradeItem(out).correct) correct++;
    o.onProgress?.({ done: outputs.length, total: items.length, correct, elapsedMs: elapsed(t0) });
  };

  let engine: EngineInfo;
  if (toRun.length === 0) {
    engine = { mode: o.target.kind, model: o.target.kind === "local" ? o.target.modelDir : o.target.baseUrl, details: {} };
  } else if (o.target.kind === "local") {
    const t = o.target;
    const model = await loadModel(t.modelDir, { executionProvider: t.provider ?? "cpu", ...(t.threads ? { intraOpThreads: t.threads } : {}) });
    try {
      // Warm-up (kernel selection, allocations), outside the timed run — as the server does before it reports ready.
      await runGeneration(model, { inputIds: Int32Array.from([model.meta.vision_start_token_id - 8]) }, { ...DEFAULT_PARAMS, max_new_tokens: 2 });
      engine = {
        mode: "local",
        model: t.modelDir,
        details: {
          dtype: model.dtype,
          fingerprint: model.meta.fingerprint,
          onnxruntime: ort.env.versions.node ?? null,
          provider: t.provider ?? "cpu",
          threads: t.threads ?? null,
          draft_tokens: o.draftTokens ?? 0,
        },
      };
      t0 = performance.now();
      await runLocalItems(model, toRun, { imagesDir: o.images, batch, params, ...(o.draftTokens ? { draftTokens: o.draftTokens } : {}), onItem });
    } finally {
      await releaseModel(model);
    }
  } else {
    const t = o.target;
    let apiModel: string | null = null;
    const url = vqaUrl(t.baseUrl);
    t0 = performance.now();
    await pool(toRun, batch, async (item) => {
      onItem(
        await apiItem(item, {
          url,
          token: t.token,
          imagesDir: o.images,
          maxNewTokens,
          fetch: o.fetch ?? fetch,
          retryBaseMs: o.retryBaseMs ?? 500,
          onModel: (m) => (apiModel ??= m),
        }),
      );
    });
    engine = { mode: "api", model: url, details: { model_id: apiModel } };
  }
  const wallMs = elapsed(t0);

  const byIndex = new Map(items.map((i) => [i.index, i]));
  const records: ItemRecord[] = outputs
    .sort((a, b) => a.index - b.index)
    .map((out) => {
      const item = byIndex.get(out.index)!;
      const g = gradeItem(out);
      // Key order of the results file: the fields a reader scans first, then the rest.
      return {
        index: g.index,
        subset: g.subset,
        subset_name: item.subset,
        gold: g.gold,
        predicted: g.predicted,
        correct: g.correct,
        format_ok: g.format_ok,
        letter_in_options: g.letter_in_options,
        fallback_answer: g.fallback_answer,
        fallback: g.fallback,
        completion_tokens: g.completion_tokens,
        ...(g.drafts ? { drafts: g.drafts } : {}),
        finish_reason: g.finish_reason,
        ms: g.ms,
        error: g.error,
        prompt_source: promptFor(item).source,
        output: out.output,
      };
    });
  return {
    summary: summarize(records, { wallMs, skipped: skippedIndices.length }),
    items: records,
    warnings,
    datasetItems: dataset.items.length,
    selectedItems: items.length + skippedIndices.length,
    skippedIndices,
    resumedItems,
    engine,
    params,
    startedAt,
  };
}

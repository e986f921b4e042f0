/**
 * `npm run eval -- --data <file.json> --images <folder> (--model <onnx folder> | --api <base URL> --token <JWT>)
 *                  [--batch N] [--limit N] [--subset MRI|CT|X-ray|<name>] [--max-new-tokens N]
 *                  [--out results.json] [--resume] [--save-outputs] [--skip-missing] [--provider cpu|cuda] [--threads N] [--draft-tokens K]`
 *
 * Evaluates MedVLM-R1 on a file in the reference evaluation format (MRI_CT_XRAY_300each_dataset.json) the
 * way the paper did: the reference prompt, greedy decoding, 512 new tokens, the letter from
 * `<answer>\s*([A-Z])\s*</answer>` (first match; no match = wrong). Prints accuracy overall and per subset,
 * format compliance, tokens per answer, throughput and wall time; writes the same plus machine info and one
 * record per item to `--out` (default eval-results.json). Exit status 0 on success, 1 when the run fails,
 * 2 for usage errors. The token may also come from the EVAL_TOKEN environment variable (kept out of `ps`).
 * `--draft-tokens K` (local) decodes speculatively (the replies are the same) and reports the draft tokens kept:
 * with `--batch 1` every item drafts, which measures how often MedVLM-R1's text is drafted right.
 * Each answered item is appended to `<out>.partial.jsonl` as it ends; a run that stops keeps them, and
 * `--resume` (same data, model or API, subset, limit and max-new-tokens) answers only the rest and the items
 * that failed. The journal is deleted once the results file is written.
 */
import { dirname, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { EngineLoadError } from "../gpu-backend/src/engine/model.ts";
import { DatasetError } from "../gpu-backend/src/eval/dataset.ts";
import { buildResults, createProgress, formatTable, writeResults } from "../gpu-backend/src/eval/report.ts";
import { type CliIO, parseCli, processIO, type Usage, usageError } from "./lib/cli.ts";
import { type Journal, journalKey, journalPath, openJournal, readJournal } from "../gpu-backend/src/eval/journal.ts";
import { DEFAULT_BATCH, EvalError, REFERENCE_MAX_NEW_TOKENS, runEvaluation, vqaUrl, type EvalTarget } from "../gpu-backend/src/eval/run.ts";

const USAGE =
  "usage: npm run eval -- --data <file.json> [--images <folder>] (--model <onnx folder> | --api <base URL> --token <JWT>)\n" +
  `         [--batch N (default ${DEFAULT_BATCH})] [--limit N] [--subset MRI|CT|X-ray|<name>] [--max-new-tokens N (default ${REFERENCE_MAX_NEW_TOKENS})]\n` +
  "         [--out results.json (default eval-results.json)] [--resume] [--save-outputs] [--skip-missing] [--provider cpu|cuda] [--threads N]\n" +
  "         [--draft-tokens K (local: speculative decoding, drafts of up to K tokens; best with --batch 1)]\n" +
  "  --images defaults to the data file's folder; the items' image paths are relative to it.\n" +
  "  --resume continues a run that stopped, from <out>.partial.jsonl (the items it answered are kept).";

/** Most dataset warnings printed one by one (all are counted, and listed by index in the results file). */
const MAX_WARNING_LINES = 20;

/** Runs the evaluation CLI on `argv` (without node/script); returns the exit status. */
export async function runEvalCli(argv: string[], io: CliIO = processIO, env: NodeJS.ProcessEnv = process.env): Promise<number> {
  const u: Usage = { text: USAGE, io, prefix: "eval: " };
  const usage = (msg: string): number => usageError(u, msg);
  const values = parseCli(
    argv,
    {
      data: { type: "string" },
      images: { type: "string" },
      model: { type: "string" },
      api: { type: "string" },
      token: { type: "string" },
      batch: { type: "string" },
      limit: { type: "string" },
      subset: { type: "string" },
      "max-new-tokens": { type: "string" },
      out: { type: "string", default: "eval-results.json" },
      resume: { type: "boolean", default: false },
      "save-outputs": { type: "boolean", default: false },
      "skip-missing": { type: "boolean", default: false },
      provider: { type: "string", default: "cpu" },
      threads: { type: "string" },
      "draft-tokens": { type: "string" },
    },
    u,
  );
  if (typeof values === "number") return values;
  if (!values.data) return usage("--data is required");
  if (!values.model === !values.api) return usage("give exactly one of --model <onnx folder> (local) and --api <base URL>");
  const int = (name: string, v: string | undefined): number | undefined | null => {
    if (v === undefined) return undefined;
    const n = Number(v);
    return Number.isSafeInteger(n) && n >= 1 ? n : null;
  };
  const batch = int("batch", values.batch);
  const limit = int("limit", values.limit);
  const maxNew = int("max-new-tokens", values["max-new-tokens"]);
  const threads = int("threads", values.threads);
  const draftTokens = int("draft-tokens", values["draft-tokens"]);
  for (const [name, v] of [["batch", batch], ["limit", limit], ["max-new-tokens", maxNew], ["threads", threads], ["draft-tokens", draftTokens]] as const) {
    if (v === null) return usage(`--${name} must be a positive integer`);
  }
  if (draftTokens && !values.model) return usage("--draft-tokens is for a local run (--model); a server drafts by its DRAFT_TOKENS");
  if (values.provider !== "cpu" && values.provider !== "cuda") return usage(`--provider must be cpu or cuda, got ${values.provider}`);
  let target: EvalTarget;
  if (values.model) {
    target = { kind: "local", modelDir: resolve(values.model), provider: values.provider, ...(threads ? { threads } : {}) };
  } else {
    const token = values.token ?? env.EVAL_TOKEN;
    if (!token) return usage("--api needs --token <JWT> (or the EVAL_TOKEN environment variable)");
    try {
      const u = new URL(values.api!);
      if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error("not http(s)");
    } catch {
      return usage(`--api must be an http(s) URL, got ${values.api}`);
    }
    target = { kind: "api", baseUrl: values.api!, token };
  }
  const data = resolve(values.data);
  const images = resolve(values.images ?? dirname(data));
  const out = resolve(values.out);

  let warned = 0;
  const progress = createProgress(io);
  const journalFile = journalPath(out);
  let journal: Journal | undefined;
  let saved = 0;
  try {
    const key = journalKey(data, {
      target: target.kind === "local" ? target.modelDir : vqaUrl(target.baseUrl),
      max_new_tokens: maxNew ?? REFERENCE_MAX_NEW_TOKENS,
      subset: values.subset ?? null,
      limit: limit ?? null,
    });
    const done = values.resume ? readJournal(journalFile, key) : [];
    saved = done.length;
    journal = openJournal(journalFile, key, values.resume);
    const run = await runEvaluation({
      data,
      images,
      target,
      ...(batch ? { batch } : {}),
      ...(limit ? { limit } : {}),
      ...(values.subset !== undefined ? { subset: values.subset } : {}),
      ...(maxNew ? { maxNewTokens: maxNew } : {}),
      ...(draftTokens ? { draftTokens } : {}),
      skipMissing: values["skip-missing"],
      onWarning: (w) => {
        if (warned++ < MAX_WARNING_LINES) io.stderr(`warning: ${w.message}\n`);
      },
      onProgress: (p) => progress.update(p),
      done,
      onItem: (o) => {
        journal!.write(o);
        if (o.error === null) saved++;
      },
    });
    progress.end();
    if (warned > MAX_WARNING_LINES) io.stderr(`warning: … and ${warned - MAX_WARNING_LINES} more (indices in the results file)\n`);
    const results = buildResults(run, {
      data,
      images,
      batch: batch ?? DEFAULT_BATCH,
      ...(limit ? { limit } : {}),
      ...(values.subset !== undefined ? { subset: values.subset } : {}),
      saveOutputs: values["save-outputs"],
    });
    writeResults(out, results);
    journal.remove();
    const mismatches = run.warnings.filter((w) => w.kind === "problem_mismatch").length;
    io.stdout(formatTable(run.summary, { engine: run.engine, params: run.params, batch: batch ?? DEFAULT_BATCH, promptMismatches: mismatches }));
    io.stdout(`results              ${out}${values["save-outputs"] ? " (with raw outputs)" : ""}${run.resumedItems ? ` (${run.resumedItems} items resumed)` : ""}\n`);
    return 0;
  } catch (e) {
    progress.end();
    if (journal && saved > 0) {
      journal.close();
      io.stderr(`eval: ${saved} answered items are kept in ${journalFile}; run again with --resume to answer the rest\n`);
    } else journal?.remove();
    if (e instanceof EvalError || e instanceof DatasetError || e instanceof EngineLoadError) {
      io.stderr(`eval failed: ${e.message}\n`);
      return 1;
    }
    io.stderr(`eval failed: ${(e as Error).stack ?? String(e)}\n`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await runEvalCli(process.argv.slice(2));
}

/**
 * `npm run bench -- <suite> [options]` — benchmarks of the serving system; numbers are reported with a peer
 * measured in the same run (transformers.js, the memory-bandwidth bound, one stream) because absolute
 * numbers on a shared machine drift.
 *
 *   models       make the full-size (Qwen2-VL-2B shape) test checkpoint and convert it per dtype into the cache
 *   single       one stream, the MedVLM-R1 eval prompt: load, vision, TTFT, decode tok/s, peak RSS per dtype,
 *                and transformers.js on our fp32 files as the ratio ours/theirs
 *   bandwidth    memory read bandwidth, and each dtype's decode speed as a fraction of bandwidth / decoder bytes
 *   concurrency  aggregate decode tok/s and TTFT with 1, 2, 4, 8 simultaneous requests (BatchingEngine)
 *   arrivals     open-loop Poisson traffic at an offered load: TTFT, latency and token-gap percentiles per
 *                prefill-chunk setting, all on the same schedule; default variants int4 and int8-w8a8
 *   kv           the decode step with the append KV contract vs the onnx-community one (both graphs of one
 *                folder, interleaved) per context length and batch size; default variant int4
 *   draft        speculative decoding (prompt-lookup drafts, the engine's DRAFT_TOKENS): the decoder pass over
 *                1 + k tokens against a step, decode tok/s with drafts against none, and the speedup per
 *                acceptance rate; default variants int4 and int8-w8a8
 *   vision       the vision encoder on large images: attention in chunks (the converter's default) against the
 *                whole attention at once, time and peak RSS per patch count; default variant int4
 *   edge         the worker under `wrangler dev` against an instant backend double: req/s, p50/p99, cold start,
 *                tokenizer heap (proxy for isolate memory)
 *   all          every suite above, in that order
 *
 * Options: --dtypes fp32,int8,int4,int8-w8a8 (also fp16)  --runs 3  --tokens 32  --threads 2  --quick  --cache /tmp/medvlm-bench-cache
 *          --results-dir bench/results  --levels 1,2,4,8  --max-batch 8  --rounds 1  --requests 300  --clients 8
 *          --bandwidth-mib 1024  --contexts 300,1024,2048  --kv-rows 1,8  --prefill-chunks 0,128  --draft-tokens 1,2,4,8  --vision-patches 256,1024,4096  --arrivals 16  --load 1  --seed 1  --no-tjs  --child-timeout 900  --drop-checkpoint
 *          --probe-image <file> --probe-max-pixels N (concurrency: the arriving probe asks about this image, e.g. a large one)
 *          --vision-process 0,1 (concurrency: the vision encoder in the engine's thread and/or a process of its own)
 * Each suite prints a table and writes bench/results/<suite>-<timestamp>.json (with machine info).
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { CONFIG_DEFAULTS } from "../gpu-backend/src/server/config.ts";
import { ALL_DTYPES, BENCH_DIR, DEFAULT_CACHE, DEFAULT_DTYPES, type BenchOptions, type Dtype, log } from "./lib/common.ts";

export const SUITES = ["models", "single", "bandwidth", "concurrency", "arrivals", "kv", "draft", "vision", "edge"] as const;
export type Suite = (typeof SUITES)[number];

const USAGE =
  "usage: npm run bench -- <models|single|bandwidth|concurrency|arrivals|kv|draft|vision|edge|all> [--dtypes fp32,int8,int4,int8-w8a8] [--runs N] [--tokens N] [--threads N]\n" +
  "       [--quick] [--cache DIR] [--results-dir DIR] [--levels 1,2,4,8] [--max-batch N] [--rounds N] [--requests N] [--clients N]\n" +
  "       [--bandwidth-mib N] [--contexts 300,1024,2048] [--kv-rows 1,8] [--prefill-chunks 0,128] [--vision-process 0,1] [--draft-tokens 1,2,4,8] [--vision-patches 256,1024,4096] [--probe-image FILE] [--probe-max-pixels N]\n" +
  "       [--arrivals N] [--load X] [--seed N] [--no-tjs] [--child-timeout S] [--drop-checkpoint]";

export class UsageError extends Error {}

export function parseBenchArgs(argv: string[]): { suites: Suite[]; opts: BenchOptions } {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        dtypes: { type: "string" },
        runs: { type: "string" },
        tokens: { type: "string" },
        threads: { type: "string" },
        quick: { type: "boolean", default: false },
        cache: { type: "string" },
        "results-dir": { type: "string" },
        levels: { type: "string" },
        "max-batch": { type: "string" },
        rounds: { type: "string" },
        requests: { type: "string" },
        clients: { type: "string" },
        "bandwidth-mib": { type: "string" },
        contexts: { type: "string" },
        "kv-rows": { type: "string" },
        "prefill-chunks": { type: "string" },
        "vision-process": { type: "string" },
        "draft-tokens": { type: "string" },
        "vision-patches": { type: "string" },
        "probe-image": { type: "string" },
        "probe-max-pixels": { type: "string" },
        arrivals: { type: "string" },
        load: { type: "string" },
        seed: { type: "string" },
        "no-tjs": { type: "boolean", default: false },
        "child-timeout": { type: "string" },
        "drop-checkpoint": { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const { values: v, positionals } = parsed;
  if (v.help) throw new UsageError("");
  if (positionals.length !== 1) throw new UsageError("name one suite");
  const name = positionals[0]!;
  const suites: Suite[] = name === "all" ? [...SUITES] : SUITES.includes(name as Suite) ? [name as Suite] : [];
  if (suites.length === 0) throw new UsageError(`unknown suite ${JSON.stringify(name)}`);
  const int = (key: string, s: string | undefined, dflt: number, min = 1): number => {
    if (s === undefined) return dflt;
    const n = Number(s);
    if (!Number.isInteger(n) || n < min) throw new UsageError(`--${key} must be an integer ≥ ${min}, got ${s}`);
    return n;
  };
  const positive = (key: string, s: string | undefined, dflt: number): number => {
    if (s === undefined) return dflt;
    const x = Number(s);
    if (!Number.isFinite(x) || x <= 0) throw new UsageError(`--${key} must be a positive number, got ${s}`);
    return x;
  };
  const quick = v.quick;
  // int8-w8a8 (int8 with W8A8 decoder layers and vision: the fastest time to first token) is a supported
  // converter configuration, so the full runs measure it by default; --quick keeps to fp32 and int4.
  const dtypes = (v.dtypes ?? (quick ? "fp32,int4" : DEFAULT_DTYPES.join(","))).split(",").map((s) => s.trim()) as Dtype[];
  for (const d of dtypes) if (!ALL_DTYPES.includes(d)) throw new UsageError(`--dtypes: unknown dtype ${d} (${ALL_DTYPES.join(", ")})`);
  const levels = (v.levels ?? (quick ? "1,2" : "1,2,4,8")).split(",").map((s) => int("levels", s, 1));
  const opts: BenchOptions = {
    dtypes,
    runs: int("runs", v.runs, quick ? 1 : 3),
    tokens: int("tokens", v.tokens, quick ? 4 : 32, 2),
    threads: int("threads", v.threads, 2),
    quick,
    cache: v.cache ?? DEFAULT_CACHE,
    resultsDir: v["results-dir"] ?? join(BENCH_DIR, "results"),
    levels,
    maxBatch: int("max-batch", v["max-batch"], 8),
    rounds: int("rounds", v.rounds, 1),
    requests: int("requests", v.requests, quick ? 20 : 300),
    clients: int("clients", v.clients, quick ? 2 : 8),
    bandwidthMiB: int("bandwidth-mib", v["bandwidth-mib"], quick ? 64 : 1024),
    // kv loads both decoders of a folder at once: int4 unless --dtypes names others (two fp32 models: ~18 GB).
    kvDtypes: v.dtypes === undefined ? ["int4"] : dtypes,
    contexts: (v.contexts ?? (quick ? "40,100" : "300,1024,2048")).split(",").map((s) => int("contexts", s, 1)),
    kvRows: (v["kv-rows"] ?? (quick ? "1,2" : "1,8")).split(",").map((s) => int("kv-rows", s, 1)),
    // The serving default against whole-prompt admission (0) as its peer; the tiny model's prompts are short.
    prefillChunks: (v["prefill-chunks"] ?? (quick ? "0,32" : `0,${CONFIG_DEFAULTS.prefillChunk}`)).split(",").map((s) => int("prefill-chunks", s, 0, 0)),
    // The vision encoder in the engine's thread (0) and/or a process of its own (1); `0,1` compares them.
    visionProcesses: (v["vision-process"] ?? "0").split(",").map((s) => {
      if (s !== "0" && s !== "1") throw new UsageError(`--vision-process must list 0 and/or 1, got ${s}`);
      return s === "1";
    }),
    draftTokens: (v["draft-tokens"] ?? (quick ? "1,3" : "1,2,4,8")).split(",").map((s) => int("draft-tokens", s, 1)),
    // Speculative decoding pays where a pass over several tokens is cheap: compare the two serving configurations.
    draftDtypes: v.dtypes === undefined ? (quick ? ["int4"] : ["int4", "int8-w8a8"]) : dtypes,
    // Patch rows of a square image (an even side: whole 2×2 merge windows); 4096 = 896×896 pixels.
    visionPatches: (v["vision-patches"] ?? (quick ? "64,256" : "256,1024,4096")).split(",").map((s) => {
      const n = int("vision-patches", s, 16);
      const side = Math.round(Math.sqrt(n));
      if (side * side !== n || side % 2) throw new UsageError(`--vision-patches: ${n} is not the square of an even number (e.g. 256, 1024, 1936, 4096)`);
      return n;
    }),
    visionDtypes: v.dtypes === undefined ? ["int4"] : dtypes,
    probeImage: v["probe-image"] ?? null,
    probeMaxPixels: int("probe-max-pixels", v["probe-max-pixels"], 12845056, 3136),
    // The two serving configurations: int4 (least memory) and int8-w8a8 (fastest first token).
    arrivalsDtypes: v.dtypes === undefined ? (quick ? ["int4"] : ["int4", "int8-w8a8"]) : dtypes,
    arrivals: int("arrivals", v.arrivals, quick ? 6 : 16),
    load: positive("load", v.load, 1),
    seed: int("seed", v.seed, 1, 0),
    noTjs: v["no-tjs"],
    childTimeoutS: int("child-timeout", v["child-timeout"], 900),
    dropCheckpoint: v["drop-checkpoint"],
  };
  return { suites, opts };
}

/** Runs the suites; returns the result files written. */
export async function runBench(argv: string[]): Promise<string[]> {
  const { suites, opts } = parseBenchArgs(argv);
  const files: string[] = [];
  for (const suite of suites) {
    log(`suite ${suite}${opts.quick ? " (quick: tiny model)" : ""}`);
    let r: { file: string };
    switch (suite) {
      case "models":
        r = await (await import("./suites/models.ts")).modelsSuite(opts);
        break;
      case "single":
        r = await (await import("./suites/single.ts")).singleSuite(opts);
        break;
      case "bandwidth":
        r = await (await import("./suites/bandwidth.ts")).bandwidthSuite(opts);
        break;
      case "concurrency":
        r = await (await import("./suites/concurrency.ts")).concurrencySuite(opts);
        break;
      case "arrivals":
        r = await (await import("./suites/arrivals.ts")).arrivalsSuite(opts);
        break;
      case "kv":
        r = await (await import("./suites/kv.ts")).kvSuite(opts);
        break;
      case "draft":
        r = await (await import("./suites/draft.ts")).draftSuite(opts);
        break;
      case "vision":
        r = await (await import("./suites/vision.ts")).visionSuite(opts);
        break;
      case "edge":
        r = await (await import("./suites/edge.ts")).edgeSuite(opts);
        break;
    }
    process.stdout.write(`results: ${r.file}\n\n`);
    files.push(r.file);
  }
  return files;
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith("bench/run.ts")) {
  runBench(process.argv.slice(2)).then(
    () => process.exit(0),
    (e) => {
      if (e instanceof UsageError) {
        process.stderr.write(`${e.message ? `bench: ${e.message}\n` : ""}${USAGE}\n`);
        process.exit(e.message ? 2 : 0);
      }
      process.stderr.write(`bench: ${(e as Error).stack ?? String(e)}\n`);
      process.exit(1);
    },
  );
}

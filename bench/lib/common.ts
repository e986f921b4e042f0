/**
 * Shared pieces of the benchmark suites: options, statistics, tables, machine info, result files and
 * child processes (every model run happens in a child so that its peak RSS is its own).
 */
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { cpus, totalmem, freemem, loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import type { ConvertDtype } from "../../gpu-backend/src/convert/index.ts";

export const ROOT = resolve(fileURLToPath(new URL("../..", import.meta.url)));
export const BENCH_DIR = join(ROOT, "bench");
export const GOLDEN_DIR = resolve(ROOT, "..", "shared", "golden");
/** The model card's examples and the evaluation set's format (../shared/medvlm-r1). */
export const MEDVLM_DIR = resolve(ROOT, "..", "shared", "medvlm-r1");
export const TSX = join(ROOT, "node_modules", "tsx", "dist", "cli.mjs");
export const DEFAULT_CACHE = join(tmpdir(), "medvlm-bench-cache");

/**
 * What the suites measure, one converted folder each (`onnx-<dtype>` in the cache): the converter's dtypes,
 * and `int8-w8a8` = dtype int8 with W8A8 decoder layers (and, by the converter's default, W8A8 vision).
 */
export type Dtype = "fp32" | "fp16" | "int8" | "int4" | "int8-w8a8";
export const ALL_DTYPES: readonly Dtype[] = ["fp32", "fp16", "int8", "int4", "int8-w8a8"];

/** `--dtypes` when not given (without --quick). */
export const DEFAULT_DTYPES: readonly Dtype[] = ["fp32", "int8", "int4", "int8-w8a8"];

/** The converter options of each variant (everything else at the converter's defaults). */
export const CONVERT_VARIANTS: Readonly<Record<Dtype, { dtype: ConvertDtype; w8a8?: true }>> = {
  fp32: { dtype: "fp32" },
  fp16: { dtype: "fp16" },
  int8: { dtype: "int8" },
  int4: { dtype: "int4" },
  "int8-w8a8": { dtype: "int8", w8a8: true },
};

/** Options shared by all suites (see bench/run.ts for their defaults). */
export interface BenchOptions {
  dtypes: Dtype[];
  runs: number;
  tokens: number;
  threads: number;
  quick: boolean;
  cache: string;
  resultsDir: string;
  /** concurrency levels (concurrency suite) */
  levels: number[];
  maxBatch: number;
  /** concurrency suite: sweeps over the levels, interleaved */
  rounds: number;
  /** concurrency suite: the engine's `prefillChunk` settings, each level run once per setting (0 = whole prompt) */
  prefillChunks: number[];
  /** concurrency suite: the engine's `visionProcess` settings, each level run once per setting */
  visionProcesses: boolean[];
  /** concurrency suite: the probe's image instead of the eval image (null: the eval image), and its max_pixels */
  probeImage: string | null;
  probeMaxPixels: number;
  /** arrivals suite: variants (int4 and int8-w8a8 unless --dtypes is given), requests per run, offered load, schedule seed */
  arrivalsDtypes: Dtype[];
  arrivals: number;
  load: number;
  seed: number;
  /** edge suite: requests per measurement, and concurrent clients */
  requests: number;
  clients: number;
  /** bandwidth suite: buffer size in MiB and repetitions */
  bandwidthMiB: number;
  /** kv suite: variants (int4 unless --dtypes is given), past lengths and batch sizes */
  kvDtypes: Dtype[];
  contexts: number[];
  kvRows: number[];
  /** draft suite: draft sizes k (passes of k + 1 tokens) and variants (int4 and int8-w8a8 unless --dtypes is given) */
  draftTokens: number[];
  draftDtypes: Dtype[];
  /** vision suite: patch counts (squares of an even side) and variants (int4 unless --dtypes is given) */
  visionPatches: number[];
  visionDtypes: Dtype[];
  /** skip the transformers.js comparison in `single` */
  noTjs: boolean;
  /** per-child timeout in seconds */
  childTimeoutS: number;
  /** delete the bf16 checkpoint once every asked dtype is converted (models suite) */
  dropCheckpoint: boolean;
}

// ---------------------------------------------------------------------------------------------------------
// Statistics

export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function spread(values: number[]): Spread {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return { median: NaN, min: NaN, max: NaN, n: 0 };
  const mid = Math.floor(v.length / 2);
  const median = v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  return { median, min: v[0]!, max: v[v.length - 1]!, n: v.length };
}

/** The p-th percentile (0..100) of the finite values, nearest-rank. */
export function percentile(values: number[], p: number): number {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const rank = Math.min(v.length, Math.max(1, Math.ceil((p / 100) * v.length)));
  return v[rank - 1]!;
}

// ---------------------------------------------------------------------------------------------------------
// Formatting

export function fmt(x: number | null | undefined, digits = 1): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return "—";
  return x.toFixed(digits);
}

/** "median (min–max)" */
export function fmtSpread(s: Spread | null | undefined, digits = 1): string {
  if (!s || s.n === 0) return "—";
  if (s.n === 1) return fmt(s.median, digits);
  return `${fmt(s.median, digits)} (${fmt(s.min, digits)}–${fmt(s.max, digits)})`;
}

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

/** A plain-text table (first row = header). */
export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  const line = (r: string[]) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  const out = [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)];
  return out.join("\n");
}

export function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

// ---------------------------------------------------------------------------------------------------------
// Machine info

export interface MachineInfo {
  cpu_model: string;
  logical_cores: number;
  total_ram_bytes: number;
  free_ram_bytes_at_start: number;
  loadavg_at_start: number[];
  node: string;
  platform: string;
  ort_version: string;
  transformers_js_version: string | null;
  git_commit: string | null;
  git_dirty: boolean | null;
  /** `git status --porcelain` lines (what differs from the commit while this ran; others edit the checkout too). */
  git_changes: string[];
}

function packageVersion(name: string): string | null {
  try {
    const req = createRequire(join(ROOT, "package.json"));
    const file = req.resolve(`${name}/package.json`);
    return (JSON.parse(readFileSync(file, "utf8")) as { version: string }).version;
  } catch {
    try {
      const p = join(ROOT, "node_modules", ...name.split("/"), "package.json");
      return (JSON.parse(readFileSync(p, "utf8")) as { version: string }).version;
    } catch {
      return null;
    }
  }
}

export function machineInfo(): MachineInfo {
  let commit: string | null = null;
  let dirty: boolean | null = null;
  let changes: string[] = [];
  try {
    commit = execFileSync("git", ["rev-parse", "HEAD"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    changes = execFileSync("git", ["status", "--porcelain"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] })
      .split("\n")
      .filter(Boolean)
      .slice(0, 100);
    dirty = changes.some((l) => !l.startsWith("??"));
  } catch {
    // not a git checkout
  }
  const c = cpus();
  return {
    cpu_model: c[0]?.model ?? "unknown",
    logical_cores: c.length,
    total_ram_bytes: totalmem(),
    free_ram_bytes_at_start: freemem(),
    loadavg_at_start: loadavg(),
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    ort_version: packageVersion("onnxruntime-node") ?? "unknown",
    transformers_js_version: packageVersion("@huggingface/transformers"),
    git_commit: commit,
    git_dirty: dirty,
    git_changes: changes,
  };
}

export function machineLine(m: MachineInfo): string {
  return (
    `machine: ${m.cpu_model}, ${m.logical_cores} logical cores, ${fmtBytes(m.total_ram_bytes)} RAM ` +
    `(load avg ${m.loadavg_at_start.map((x) => x.toFixed(2)).join(" ")}), Node ${m.node}, onnxruntime-node ${m.ort_version}, ` +
    `commit ${m.git_commit?.slice(0, 10) ?? "?"}${m.git_dirty ? "+dirty" : ""}`
  );
}

// ---------------------------------------------------------------------------------------------------------
// Result files

export function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[:.]/g, "-");
}

/** Writes `<resultsDir>/<suite>-<timestamp>.json`; returns its path. */
export function writeResult(opts: BenchOptions, suite: string, body: Record<string, unknown>): string {
  mkdirSync(opts.resultsDir, { recursive: true });
  const file = join(opts.resultsDir, `${suite}-${timestamp()}.json`);
  writeFileSync(file, JSON.stringify(body, null, 2) + "\n");
  return file;
}

/**
 * A suite's ending: one line per variant not measured appended to `text`, the text printed, and the result file
 * written — the common fields (suite, created, machine, options, model size), then `body`, then `failures`.
 */
export function finishSuite(
  opts: BenchOptions,
  suite: string,
  text: string,
  run: { machine: MachineInfo; size: string; failures: Record<string, string> },
  body: Record<string, unknown>,
): { file: string; body: Record<string, unknown> } {
  for (const [d, why] of Object.entries(run.failures)) text += `${d}: not measured — ${why}\n`;
  process.stdout.write(text);
  const full = { suite, created: new Date().toISOString(), machine: run.machine, options: opts, size: run.size, ...body, failures: run.failures };
  return { file: writeResult(opts, suite, full), body: full };
}

// ---------------------------------------------------------------------------------------------------------
// Child processes

export interface ChildResult<T> {
  result: T;
  wall_ms: number;
}

export class ChildError extends Error {
  constructor(
    message: string,
    readonly stderrTail: string,
  ) {
    super(message);
    this.name = "ChildError";
  }
}

/** One line for a result file's `failures`: the error and, for a child, the last lines of its stderr. */
export function childErrorText(e: unknown): string {
  const tail = ((e as { stderrTail?: string }).stderrTail ?? "").trim().split("\n").slice(-3).join(" | ");
  return tail ? `${(e as Error).message} ${tail}` : (e as Error).message;
}

/**
 * Runs `bench/children/<script>` in a fresh Node process (through tsx) with `args` as JSON; the child writes
 * its result JSON to the file named by BENCH_RESULT_FILE. Its stderr is forwarded (progress) and its tail
 * kept for error messages.
 */
export async function runChild<T>(script: string, args: unknown, opts: { timeoutS: number; env?: Record<string, string>; quiet?: boolean }): Promise<ChildResult<T>> {
  const resultFile = join(tmpdir(), `medvlm-bench-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}.json`);
  const t0 = performance.now();
  const child = spawn(process.execPath, ["--expose-gc", TSX, join(BENCH_DIR, "children", script)], {
    cwd: ROOT,
    env: { ...process.env, ORT_DISABLE_TELEMETRY: "1", ...opts.env, BENCH_RESULT_FILE: resultFile, BENCH_ARGS: JSON.stringify(args) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let tail = "";
  const keep = (b: Buffer) => {
    tail = (tail + b.toString()).slice(-4000);
    if (!opts.quiet) process.stderr.write(b);
  };
  child.stdout.on("data", keep);
  child.stderr.on("data", keep);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, opts.timeoutS * 1000);
  const code = await new Promise<number | null>((done) => child.on("close", (c) => done(c)));
  clearTimeout(timer);
  const wall = performance.now() - t0;
  try {
    if (timedOut) throw new ChildError(`${script}: timed out after ${opts.timeoutS} s`, tail);
    if (code !== 0 || !existsSync(resultFile)) throw new ChildError(`${script}: exited with ${code}${existsSync(resultFile) ? "" : " (no result)"}`, tail);
    return { result: JSON.parse(readFileSync(resultFile, "utf8")) as T, wall_ms: wall };
  } finally {
    rmSync(resultFile, { force: true });
  }
}

/**
 * Inside a child: memory in use after three full collections — V8's heap plus memory held outside it for JS
 * objects (`heapUsed + external`; `external` includes ArrayBuffers) — and RSS, bytes.
 */
export function memoryAfterGc(): { heap: number; rss: number } {
  let gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) {
    setFlagsFromString("--expose-gc");
    gc = runInNewContext("gc") as () => void;
  }
  for (let i = 0; i < 3; i++) gc();
  const m = process.memoryUsage();
  return { heap: m.heapUsed + m.external, rss: m.rss };
}

/** Inside a child: its arguments. */
export function childArgs<T>(): T {
  const a = process.env.BENCH_ARGS;
  if (!a) throw new Error("BENCH_ARGS is not set: this script is started by bench/run.ts");
  return JSON.parse(a) as T;
}

/** Inside a child: writes its result (with the process's peak RSS) and exits. */
export function childDone(result: Record<string, unknown>): never {
  const ru = process.resourceUsage();
  const out = { ...result, peak_rss_bytes: ru.maxRSS * 1024 };
  writeFileSync(process.env.BENCH_RESULT_FILE!, JSON.stringify(out));
  process.exit(0);
}

/** Peak RSS so far of this process, bytes (getrusage ru_maxrss). */
export function peakRss(): number {
  return process.resourceUsage().maxRSS * 1024;
}

/** Runs `main` as a child entry point: errors are printed and exit with status 1. */
export function childMain(main: () => Promise<void>): void {
  main().catch((e) => {
    process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}

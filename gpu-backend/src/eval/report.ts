/**
 * Presentation of an evaluation: the terminal table (the paper's MRI / CT / X-ray rows plus format
 * compliance, tokens, throughput, wall time), a progress display, and the JSON results file (the same
 * numbers, the run's settings, machine info and one record per item).
 *
 * The results file carries an item's raw output only when asked (`--save-outputs`); the API token never
 * appears anywhere.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, renameSync, writeFileSync } from "node:fs";
import { cpus, arch, platform, release, totalmem } from "node:os";
import { dirname } from "node:path";
import type { GenerationParams } from "../../../shared/src/wire.ts";
import type { DatasetWarning } from "./dataset.ts";
import type { EngineInfo, EvalRun, ItemRecord, Progress } from "./run.ts";
import type { Summary } from "./score.ts";

/** Where CLI text goes (injectable for tests). */
export interface CliIO {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  /** Whether stderr is a terminal (progress bar) or not (one line per 10%). */
  isTTY: boolean;
  columns?: number;
}

const pct = (x: number | null): string => (x === null ? "—" : `${(x * 100).toFixed(2)}%`);
const fix = (x: number | null, d = 1): string => (x === null ? "—" : x.toFixed(d));

/** `1h02m03s`, `4m05s`, `12.3s`. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return "—";
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const total = Math.round(s);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = String(total % 60).padStart(2, "0");
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m${sec}s` : `${m}m${sec}s`;
}

/** The terminal report of a run. */
export function formatTable(summary: Summary, info: { engine: EngineInfo; params: GenerationParams; batch: number; promptMismatches: number }): string {
  const rows: [string, string, string, string, string][] = [["subset", "items", "correct", "accuracy", "format ok"]];
  for (const r of summary.by_subset) {
    rows.push([r.subset, String(r.items), String(r.correct), pct(r.accuracy), pct(r.items ? r.format_ok / r.items : null)]);
  }
  rows.push(["overall", String(summary.items), String(summary.correct), pct(summary.accuracy), pct(summary.format_rate)]);
  const w = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const line = (r: string[]) => r.map((cell, c) => (c === 0 ? cell.padEnd(w[c]!) : cell.padStart(w[c]!))).join("  ");
  const rule = "-".repeat(w.reduce((a, b) => a + b, 0) + 2 * (w.length - 1));
  const d = info.engine.details;
  const what =
    info.engine.mode === "local"
      ? `local ${info.engine.model} (${d.dtype ?? "?"}, ${d.provider ?? "cpu"})`
      : `api ${info.engine.model}${d.model_id ? ` (${d.model_id})` : ""}`;
  const ct = summary.completion_tokens;
  const out = [
    `MedVLM-R1 evaluation — ${what}, batch ${info.batch}, greedy, max_new_tokens ${info.params.max_new_tokens}`,
    "",
    line(rows[0]!),
    rule,
    ...rows.slice(1, -1).map(line),
    rule,
    line(rows[rows.length - 1]!),
    "",
    `format compliance    ${pct(summary.format_rate)} (${summary.format_ok}/${summary.items}: <think>…</think><answer>…</answer>)`,
    `no reference letter  ${summary.no_reference_letter} (a fallback finds a letter in ${summary.fallback_only}, ${summary.fallback_correct} of them right; not counted)` +
      (summary.letter_out_of_range ? `; letters outside the options: ${summary.letter_out_of_range}` : ""),
    `tokens per answer    mean ${fix(ct.mean)}, median ${fix(ct.median)}, max ${ct.max ?? "—"}; ${summary.truncated} cut at max_new_tokens`,
    `throughput           ${fix(summary.tokens_per_s)} tokens/s, ${fix(summary.items_per_s, 2)} items/s; latency median ${fix(summary.latency_ms.median, 0)} ms`,
    ...(summary.draft_tokens
      ? [`draft tokens kept    ${pct(summary.draft_tokens.acceptance)} (${summary.draft_tokens.accepted} of ${summary.draft_tokens.accepted + summary.draft_tokens.rejected}; speculative decoding)`]
      : []),
    `wall time            ${formatDuration(summary.wall_ms)}`,
  ];
  const notes: string[] = [];
  if (summary.errors) {
    const codes = Object.entries(summary.errors_by_code).map(([c, n]) => `${c} ${n}`).join(", ");
    notes.push(`errors ${summary.errors} (counted wrong: ${codes})`);
  }
  if (summary.skipped) notes.push(`skipped ${summary.skipped} (missing image)`);
  if (info.promptMismatches) notes.push(`${info.promptMismatches} items prompted with their 'problem' text (it differs from question + options)`);
  if (notes.length) out.push(`notes                ${notes.join("; ")}`);
  return out.join("\n") + "\n";
}

/** Machine facts for the results file (GPU name when nvidia-smi answers). */
export function machineInfo(): Record<string, string | number | null> {
  const c = cpus();
  let gpu: string | null = null;
  try {
    gpu = execFileSync("nvidia-smi", ["--query-gpu=name", "--format=csv,noheader"], { encoding: "utf8", timeout: 5000, stdio: ["ignore", "pipe", "ignore"] })
      .trim()
      .split("\n")
      .join("; ") || null;
  } catch {
    gpu = null;
  }
  return {
    platform: platform(),
    os_release: release(),
    arch: arch(),
    cpu: c[0]?.model ?? null,
    cpu_count: c.length,
    memory_gib: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    gpu,
    node: process.version,
  };
}

/** The JSON results file's content. */
export interface ResultsFile {
  tool: "medvlm-r1-eval";
  version: 1;
  started_at: string;
  finished_at: string;
  settings: {
    data: string;
    images: string;
    mode: "local" | "api";
    model: string;
    batch: number;
    limit: number | null;
    subset: string | null;
    params: GenerationParams;
    prompt: string;
    scoring: string;
  };
  engine: Record<string, string | number | null>;
  machine: Record<string, string | number | null>;
  dataset: { items: number; selected: number; skipped_indices: number[]; warnings: Record<string, number>; warning_indices: Record<string, number[]> };
  /** Items answered by an earlier, interrupted run and taken from its journal (`--resume`); the summary's times exclude them. */
  resumed_items: number;
  summary: Summary;
  items: ItemRecord[];
}

/** Builds the results file of a run; `output` is dropped from the items unless `saveOutputs`. */
export function buildResults(
  run: EvalRun,
  s: { data: string; images: string; batch: number; limit?: number; subset?: string; saveOutputs: boolean; machine?: Record<string, string | number | null> },
): ResultsFile {
  const counts: Record<string, number> = {};
  const indices: Record<string, number[]> = {};
  for (const w of run.warnings as DatasetWarning[]) {
    counts[w.kind] = (counts[w.kind] ?? 0) + 1;
    (indices[w.kind] ??= []).push(w.index);
  }
  return {
    tool: "medvlm-r1-eval",
    version: 1,
    started_at: run.startedAt,
    finished_at: new Date().toISOString(),
    settings: {
      data: s.data,
      images: s.images,
      mode: run.engine.mode,
      model: run.engine.model,
      batch: s.batch,
      limit: s.limit ?? null,
      subset: s.subset ?? null,
      params: run.params,
      prompt: "MedVLM-R1 reference template (prompt type 'complex') filled with the item's problem; one image before the text",
      scoring: "re.search(r'<answer>\\s*([A-Z])\\s*</answer>', output).group(1) == solution; no match = wrong",
    },
    engine: run.engine.details,
    machine: s.machine ?? machineInfo(),
    dataset: { items: run.datasetItems, selected: run.selectedItems, skipped_indices: run.skippedIndices, warnings: counts, warning_indices: indices },
    resumed_items: run.resumedItems,
    summary: run.summary,
    items: run.items.map((it) => {
      if (s.saveOutputs) return it;
      const { output: _drop, ...rest } = it;
      return rest;
    }),
  };
}

/** Writes the results file (via a temporary file and a rename: never half-written). */
export function writeResults(path: string, results: ResultsFile): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify(results, null, 2) + "\n");
  renameSync(tmp, path);
}

/**
 * Progress on stderr: on a TTY a redrawn bar (items done/total, accuracy so far, ETA), at most 10 times a
 * second; otherwise one line each time another 10% of the items is done.
 */
export function createProgress(io: CliIO): { update: (p: Progress) => void; end: () => void } {
  let lastDraw = 0;
  let drew = false;
  let nextDecile = 1;
  const describe = (p: Progress) => {
    const acc = p.done ? `${((p.correct / p.done) * 100).toFixed(1)}%` : "—";
    const eta = p.done ? formatDuration((p.elapsedMs / p.done) * (p.total - p.done)) : "—";
    return { acc, eta };
  };
  return {
    update(p) {
      if (io.isTTY) {
        const now = performance.now();
        if (now - lastDraw < 100 && p.done < p.total) return;
        lastDraw = now;
        drew = true;
        const width = 30;
        const fill = Math.round((p.done / p.total) * width);
        const { acc, eta } = describe(p);
        const text = `[${"#".repeat(fill)}${"-".repeat(width - fill)}] ${p.done}/${p.total} acc ${acc} ETA ${eta}`;
        io.stderr(`\r${text.slice(0, (io.columns || 120) - 1)}\x1b[K`);
        return;
      }
      let crossed = false;
      while (nextDecile <= 10 && p.done * 10 >= nextDecile * p.total) {
        nextDecile++;
        crossed = true;
      }
      if (crossed) {
        const { acc, eta } = describe(p);
        io.stderr(`eval: ${p.done}/${p.total} (${Math.floor((p.done / p.total) * 100)}%) acc ${acc}, elapsed ${formatDuration(p.elapsedMs)}, ETA ${eta}\n`);
      }
    },
    end() {
      if (drew) io.stderr("\n");
    },
  };
}

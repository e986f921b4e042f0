/**
 * The benchmark harness runs end to end on the tiny model (config A) with tiny counts and writes well-formed
 * result files. No timing is asserted: benchmarks are scripts (`npm run bench`), this only keeps them working.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parseBenchArgs, runBench, UsageError } from "../../bench/run.ts";

const work = mkdtempSync(join(tmpdir(), "bench-smoke-"));
const common = ["--quick", "--cache", join(work, "cache"), "--results-dir", join(work, "results")];
afterAll(() => rmSync(work, { recursive: true, force: true }));

function readResult(file: string): Record<string, any> {
  expect(file.startsWith(join(work, "results"))).toBe(true);
  return JSON.parse(readFileSync(file, "utf8"));
}

function expectMachine(r: Record<string, any>): void {
  expect(r.machine).toMatchObject({ cpu_model: expect.any(String), logical_cores: expect.any(Number), total_ram_bytes: expect.any(Number), node: process.version, ort_version: expect.stringMatching(/^\d+\.\d+/) });
  expect(r.machine).toHaveProperty("git_commit");
}

const positive = (x: unknown) => typeof x === "number" && Number.isFinite(x) && x > 0;

describe("bench (quick, tiny model)", () => {
  it("parses options and refuses bad ones", () => {
    const { suites, opts } = parseBenchArgs(["single", "--dtypes", "fp32,int4", "--runs", "3", "--tokens", "32", "--threads", "2"]);
    expect(suites).toEqual(["single"]);
    expect(opts).toMatchObject({ dtypes: ["fp32", "int4"], runs: 3, tokens: 32, threads: 2, quick: false });
    expect(parseBenchArgs(["all", "--quick"]).suites).toEqual(["models", "single", "bandwidth", "concurrency", "edge"]);
    expect(() => parseBenchArgs(["nope"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["single", "--dtypes", "int3"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["single", "--tokens", "1"])).toThrow(UsageError);
  });

  it("models: builds the checkpoint and conversions, then skips them by manifest", async () => {
    const [first] = await runBench(["models", ...common]);
    const r = readResult(first!);
    expectMachine(r);
    expect(r.steps.map((s: { step: string; status: string }) => [s.step, s.status])).toEqual([
      ["checkpoint", "built"],
      ["fp32", "built"],
      ["int4", "built"],
    ]);
    for (const s of r.steps) expect(positive(s.peak_rss_bytes) && positive(s.seconds)).toBe(true);
    const [again] = await runBench(["models", ...common]);
    expect(readResult(again!).steps.map((s: { status: string }) => s.status)).toEqual(["skipped", "skipped", "skipped"]);
  }, 240_000);

  it("single: per dtype, and transformers.js on our fp32 files as the peer", async () => {
    const [file] = await runBench(["single", ...common]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.workload).toMatchObject({ prompt_tokens: 200, image_tokens: 64, forced_tokens: 4 });
    for (const d of ["fp32", "int4"]) {
      const o = r.ours[d];
      expect(o).toMatchObject({ dtype: d, prompt_tokens: 200, image_tokens: 64 });
      expect(o.runs).toHaveLength(1);
      expect(o.runs[0].decode_tokens).toBe(3);
      for (const k of ["ttft_ms", "decode_tok_s", "vision_ms", "preprocess_ms"]) expect(positive(o.runs[0][k])).toBe(true);
      expect(positive(o.peak_rss_bytes) && positive(o.load_ms)).toBe(true);
    }
    expect(r.transformers_js.ok).toBe(true);
    expect(r.transformers_js).toMatchObject({ prompt_tokens: 200, image_tokens: 64 });
    expect(positive(r.ratios.ttft_ours_over_theirs) && positive(r.ratios.decode_tok_s_ours_over_theirs)).toBe(true);
    // Same files, same prompt: transformers.js's greedy choices equal ours (tiny model: golden ids).
    expect(r.parity.transformers_js_vs_ours_fp32.agreeing_prefix).toBe(r.transformers_js.argmax_ids.length);
  }, 300_000);

  it("bandwidth: a measured bound and each dtype's fraction of it", async () => {
    const [file] = await runBench(["bandwidth", ...common, "--dtypes", "int4"]);
    const r = readResult(file!);
    expectMachine(r);
    expect(positive(r.bandwidth.bound_bytes_per_s)).toBe(true);
    expect(r.decode).toHaveLength(1);
    expect(r.decode[0]).toMatchObject({ dtype: "int4" });
    expect(positive(r.decode[0].fraction) && positive(r.decode[0].bound_tok_s) && positive(r.decode[0].decoder_bytes)).toBe(true);
  }, 240_000);

  it("concurrency: aggregate decode per level through the BatchingEngine", async () => {
    const [file] = await runBench(["concurrency", ...common, "--dtypes", "int4"]);
    const r = readResult(file!);
    expectMachine(r);
    const levels = r.results[0].levels;
    expect(levels.map((l: { level: number }) => l.level)).toEqual([1, 2]);
    for (const l of levels) {
      expect(l.errors).toEqual([]);
      expect(l.completion_tokens).toEqual(Array(l.level).fill(4 + l.level));
      expect(positive(l.aggregate_decode_tok_s) && positive(l.probe_ttft_ms)).toBe(true);
      expect(l.ttft_ms).toHaveLength(l.level);
    }
  }, 240_000);

  it("edge: wrangler dev against the backend double", async () => {
    const [file] = await runBench(["edge", ...common, "--requests", "10", "--clients", "2"]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.cold_starts).toHaveLength(1);
    expect(r.cold_starts[0].statuses).toEqual([200, 200, 200]);
    expect(r.load.vqa.statuses).toEqual({ 200: 10 });
    expect(r.load.healthz.statuses).toEqual({ 200: 10 });
    expect(r.backend_double.malformed).toBe(0);
    expect(positive(r.tokenizer_heap_proxy.after_tokenizer)).toBe(true);
    expect(r.tokenizer_heap_proxy.bundle_bytes).toBeGreaterThan(1e6); // the bundled merge tables
    expect(positive(r.load.vqa.workerd_cpu_ms_per_request)).toBe(true);
    expect(positive(r.worker_startup.cpu_ms)).toBe(true);
    expect(r.worker_startup.cpu_ms).toBeLessThanOrEqual(r.worker_startup.span_ms);
  }, 300_000);
});

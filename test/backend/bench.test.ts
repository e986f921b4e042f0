/**
 * The benchmark harness runs end to end on the tiny model (config A) with tiny counts and writes well-formed
 * result files. No timing is asserted: benchmarks are scripts (`npm run bench`), this only keeps them working.
 */
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { ArrivalsRun } from "../../bench/children/arrivals.ts";
import { conversionMismatch } from "../../bench/lib/models.ts";
import { poissonArrivals, RECORDED_OUTPUT, RECORDED_OUTPUT_TOKENS } from "../../bench/lib/workload.ts";
import { parseBenchArgs, runBench, UsageError } from "../../bench/run.ts";
import { summarizeArrivals } from "../../bench/suites/arrivals.ts";
import { expectedTokensPerPass } from "../../bench/suites/draft.ts";
import { answerSeconds } from "../../bench/suites/single.ts";
import { attentionChunks } from "../../bench/suites/vision.ts";
import { CONVERTER_REVISION } from "../../gpu-backend/src/convert/index.ts";
import { BpeTokenizer } from "../../shared/src/tokenizer/index.ts";
import { GOLDEN_DIR, PROJECT_ROOT } from "../support/golden.ts";

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
    expect(parseBenchArgs(["all", "--quick"]).suites).toEqual(["models", "single", "bandwidth", "concurrency", "arrivals", "kv", "draft", "vision", "edge"]);
    expect(parseBenchArgs(["draft"]).opts).toMatchObject({ draftDtypes: ["int4", "int8-w8a8"], draftTokens: [1, 2, 4, 8] });
    expect(parseBenchArgs(["draft", "--dtypes", "fp32", "--draft-tokens", "3"]).opts).toMatchObject({ draftDtypes: ["fp32"], draftTokens: [3] });
    expect(() => parseBenchArgs(["draft", "--draft-tokens", "0"])).toThrow(UsageError);
    expect(parseBenchArgs(["concurrency", "--probe-image", "x.png", "--probe-max-pixels", "50176"]).opts).toMatchObject({ probeImage: "x.png", probeMaxPixels: 50176 });
    expect(() => parseBenchArgs(["concurrency", "--probe-max-pixels", "100"])).toThrow(UsageError);
    expect(parseBenchArgs(["arrivals"]).opts).toMatchObject({ arrivalsDtypes: ["int4", "int8-w8a8"], arrivals: 16, load: 1, seed: 1, prefillChunks: [0, 128] });
    expect(parseBenchArgs(["arrivals", "--dtypes", "fp32", "--load", "0.5", "--arrivals", "4", "--seed", "0"]).opts).toMatchObject({ arrivalsDtypes: ["fp32"], load: 0.5, arrivals: 4, seed: 0 });
    expect(() => parseBenchArgs(["arrivals", "--load", "0"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["arrivals", "--load", "x"])).toThrow(UsageError);
    expect(parseBenchArgs(["kv"]).opts).toMatchObject({ kvDtypes: ["int4"], contexts: [300, 1024, 2048], kvRows: [1, 8] });
    expect(parseBenchArgs(["kv", "--dtypes", "int8", "--contexts", "64"]).opts).toMatchObject({ kvDtypes: ["int8"], contexts: [64] });
    expect(parseBenchArgs(["vision"]).opts).toMatchObject({ visionDtypes: ["int4"], visionPatches: [256, 1024, 4096] });
    expect(parseBenchArgs(["vision", "--dtypes", "fp32", "--vision-patches", "1936"]).opts).toMatchObject({ visionDtypes: ["fp32"], visionPatches: [1936] });
    expect(() => parseBenchArgs(["vision", "--vision-patches", "1000"])).toThrow(/not the square of an even number/);
    expect(() => parseBenchArgs(["vision", "--vision-patches", "225"])).toThrow(UsageError);
    expect(parseBenchArgs(["concurrency"]).opts.prefillChunks).toEqual([0, 128]);
    expect(parseBenchArgs(["concurrency"]).opts.visionProcesses).toEqual([false]);
    expect(parseBenchArgs(["concurrency", "--vision-process", "0,1"]).opts.visionProcesses).toEqual([false, true]);
    expect(() => parseBenchArgs(["concurrency", "--vision-process", "yes"])).toThrow(/--vision-process must list 0 and\/or 1/);
    expect(parseBenchArgs(["concurrency", "--prefill-chunks", "64"]).opts.prefillChunks).toEqual([64]);
    expect(() => parseBenchArgs(["concurrency", "--prefill-chunks", "-1"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["nope"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["single", "--dtypes", "int3"])).toThrow(UsageError);
    expect(() => parseBenchArgs(["single", "--tokens", "1"])).toThrow(UsageError);
    expect(parseBenchArgs(["single"]).opts.dtypes).toEqual(["fp32", "int8", "int4", "int8-w8a8"]);
    expect(parseBenchArgs(["single", "--dtypes", "int4,int8-w8a8"]).opts.dtypes).toEqual(["int4", "int8-w8a8"]);
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

  it("models: a folder from another converter revision or with other graph options is not reused", () => {
    const dir = join(work, "cache", "tiny", "onnx-int4");
    expect(conversionMismatch(dir, "int4", "tiny", null)).toBeNull();
    const manifest = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"));
    expect(manifest.converter.revision).toBe(CONVERTER_REVISION);
    // A copy of the folder (graphs symlinked) with an edited manifest.
    const edited = (name: string, edit: (m: Record<string, any>) => void): string => {
      const d = join(work, name);
      mkdirSync(d);
      for (const f of readdirSync(dir)) if (f !== "manifest.json") symlinkSync(join(dir, f), join(d, f));
      const m = structuredClone(manifest);
      edit(m);
      writeFileSync(join(d, "manifest.json"), JSON.stringify(m));
      return d;
    };
    expect(conversionMismatch(edited("old", (m) => delete m.converter.revision), "int4", "tiny", null)).toBe(`converter revision (none), now ${CONVERTER_REVISION}`);
    expect(conversionMismatch(edited("older", (m) => (m.converter.revision = CONVERTER_REVISION - 1)), "int4", "tiny", null)).toMatch(/^converter revision \d+, now/);
    expect(conversionMismatch(edited("fv", (m) => (m.converter.options.vision_int8 = false)), "int4", "tiny", null)).toBe("converter options differ (vision_int8: false → true)");
    expect(conversionMismatch(edited("noopts", (m) => delete m.converter.options), "int4", "tiny", null)).toMatch(/^converter options differ \(dtype: null → "int4"/);
    // int8 weight-only vs int8-w8a8: same manifest dtype, told apart by the options.
    const int8 = edited("int8", (m) => {
      m.dtype = "int8";
      Object.assign(m.converter.options, { dtype: "int8", vision_int8: false, lm_head: "nbits", quant: { ...m.converter.options.quant, bits: 8 } });
    });
    expect(conversionMismatch(int8, "int8", "tiny", null)).toBeNull();
    expect(conversionMismatch(int8, "int8-w8a8", "tiny", null)).toBe('converter options differ (w8a8: false → true, lm_head: "nbits" → "w8a8", vision_int8: false → true)');
    expect(conversionMismatch(dir, "int8-w8a8", "tiny", null)).toBe("manifest dtype int4");
  });

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
    expect(r.answer.tokens).toBe(RECORDED_OUTPUT_TOKENS);
    expect(Object.keys(r.answer.seconds)).toEqual(["ours fp32", "ours int4", "transformers.js fp32"]);
    expect(r.answer.seconds["ours int4"]).toBeCloseTo(answerSeconds(r.summaries.int4, RECORDED_OUTPUT_TOKENS), 9);
  }, 300_000);

  it("single: a whole answer's time is the first token's plus the rest at the decode rate", () => {
    const s = { ttft_ms: { median: 1500, min: 0, max: 0, n: 1 }, decode_tok_s: { median: 10, min: 0, max: 0, n: 1 } };
    expect(answerSeconds(s, 21)).toBeCloseTo(3.5, 12);
    expect(answerSeconds(s, 1)).toBeCloseTo(1.5, 12);
  });

  it("the recorded answer's token count: MedVLM-R1's published answer in the Qwen2 tokenizer, <|im_end|> included", () => {
    const tok = BpeTokenizer.fromTokenizerJson(JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "tokenizer.json"), "utf8")));
    expect(tok.encode(RECORDED_OUTPUT).length + 1).toBe(RECORDED_OUTPUT_TOKENS);
  });

  it("bandwidth: a measured bound and each dtype's fraction of it (int8-w8a8 converted on demand)", async () => {
    const [file] = await runBench(["bandwidth", ...common, "--dtypes", "int4,int8-w8a8"]);
    const r = readResult(file!);
    expectMachine(r);
    expect(positive(r.bandwidth.bound_bytes_per_s)).toBe(true);
    expect(r.decode.map((d: { dtype: string }) => d.dtype)).toEqual(["int4", "int8-w8a8"]);
    for (const d of r.decode) expect(positive(d.fraction) && positive(d.bound_tok_s) && positive(d.decoder_bytes)).toBe(true);
    const m = JSON.parse(readFileSync(join(work, "cache", "tiny", "onnx-int8-w8a8", "manifest.json"), "utf8"));
    expect(m).toMatchObject({ dtype: "int8", quantization: { method: "MatMulInteger", w8a8: true }, converter: { options: { w8a8: true, vision_int8: true } } });
  }, 240_000);

  it("concurrency: aggregate decode per level through the BatchingEngine", async () => {
    // 12 tokens: long enough for both streams to decode together after a chunked admission.
    const [file] = await runBench(["concurrency", ...common, "--dtypes", "int4", "--tokens", "12"]);
    const r = readResult(file!);
    expectMachine(r);
    const levels = r.results[0].levels;
    // Each level once per prefill-chunk setting: whole-prompt admission and the quick default of 32 tokens.
    expect(levels.map((l: { level: number; prefill_chunk: number }) => [l.level, l.prefill_chunk])).toEqual([[1, 0], [1, 32], [2, 0], [2, 32]]);
    for (const l of levels) {
      expect(l.errors).toEqual([]);
      expect(l.completion_tokens).toEqual(Array(l.level).fill(12 + l.level));
      expect(positive(l.aggregate_decode_tok_s) && positive(l.probe_ttft_ms) && positive(l.itl_median_ms)).toBe(true);
      expect(l.ttft_ms).toHaveLength(l.level);
      // One stream has finished when the probe arrives: with one level, nothing is left running to stall.
      if (l.level === 2) expect(positive(l.probe_stall_ms)).toBe(true);
    }
  }, 240_000);

  it("arrivals: a seeded Poisson schedule, and latency percentiles pooled over rounds per setting", () => {
    const a = poissonArrivals(5000, 2, 7);
    expect(a[0]).toBe(0);
    for (let i = 1; i < a.length; i++) expect(a[i]!).toBeGreaterThan(a[i - 1]!);
    expect(poissonArrivals(5000, 2, 7)).toEqual(a);
    expect(poissonArrivals(5, 2, 8)).not.toEqual(a.slice(0, 5));
    // Exponential gaps at 2 req/s: mean 500 ms (standard error 7 ms over 4999 gaps), and a coefficient of variation of 1.
    const gaps = a.slice(1).map((t, i) => t - a[i]!);
    const mean = gaps.reduce((s, x) => s + x, 0) / gaps.length;
    const sd = Math.sqrt(gaps.reduce((s, x) => s + (x - mean) ** 2, 0) / gaps.length);
    expect(Math.abs(mean - 500)).toBeLessThan(30);
    expect(Math.abs(sd / mean - 1)).toBeLessThan(0.06);
    expect(() => poissonArrivals(3, 0, 1)).toThrow(RangeError);

    const run = (round: number, chunk: number, ttft: number[], tokS: number): ArrivalsRun => ({
      round, prefill_chunk: chunk, ttft_ms: ttft, e2e_ms: ttft.map((x) => x + 1000), gaps_ms: [10, 20, 30 * (round + 1)],
      completion_tokens: ttft.map(() => 3), output_tok_s: tokS, mean_in_system: 1, max_submit_lag_ms: 0, errors: [],
    });
    const [whole, chunked] = summarizeArrivals([run(0, 0, [100, 300], 5), run(0, 64, [200, NaN], 4), run(1, 0, [200, 400], 7), run(1, 64, [50, 60], 6)], [0, 64]);
    // Pooled over both rounds (nearest rank; a request with no token is left out of the percentiles).
    expect(whole).toMatchObject({ prefill_chunk: 0, ttft_p50_ms: 200, ttft_max_ms: 400, e2e_p90_ms: 1400, gap_max_ms: 60, output_tok_s: 6 });
    expect(chunked).toMatchObject({ prefill_chunk: 64, ttft_p50_ms: 60, ttft_max_ms: 200, gap_p50_ms: 20 });
  });

  it("arrivals: the same schedule for every prefill-chunk setting, every request answered in full", async () => {
    const [file] = await runBench(["arrivals", ...common, "--tokens", "8"]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.failures).toEqual({});
    const res = r.results[0];
    expect(positive(res.idle_e2e_ms) && res.idle_ttft_ms < res.idle_e2e_ms).toBe(true);
    expect(res.rate_per_s).toBeCloseTo(1 / (res.idle_e2e_ms / 1000), 6); // load 1
    expect(res.offsets_ms).toEqual(poissonArrivals(6, res.rate_per_s, 1));
    expect(res.runs.map((x: ArrivalsRun) => x.prefill_chunk)).toEqual([0, 32]);
    for (const x of res.runs as ArrivalsRun[]) {
      expect(x.errors).toEqual([]);
      expect(x.completion_tokens).toEqual(Array(6).fill(8));
      expect(x.gaps_ms).toHaveLength(6 * 7);
      x.ttft_ms.forEach((t, i) => expect(positive(t) && t < x.e2e_ms[i]!).toBe(true));
      expect(positive(x.output_tok_s) && positive(x.mean_in_system)).toBe(true);
      expect(x.max_submit_lag_ms).toBeGreaterThanOrEqual(0);
    }
    expect(r.summaries.int4.map((s: { prefill_chunk: number }) => s.prefill_chunk)).toEqual([0, 32]);
    expect(r.summaries.int4[1].ttft_max_ms).toBe(Math.max(...res.runs[1].ttft_ms));
  }, 240_000);

  it("kv: both decoder graphs of one folder, step by step, per context and batch size", async () => {
    const [file] = await runBench(["kv", ...common]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.failures).toEqual({});
    const points = r.results[0].points;
    expect(points.map((p: { rows: number; context: number }) => [p.rows, p.context])).toEqual([[1, 40], [1, 100], [2, 40], [2, 100]]);
    for (const p of points) {
      expect(p.append_steps_ms).toHaveLength(2);
      expect(p.present_steps_ms).toHaveLength(2);
      expect(positive(p.append_ms) && positive(p.present_ms) && positive(p.speedup)).toBe(true);
    }
    // tiny-a: 2 layers × K/V × 2 KV heads × 16 dims × 4 bytes per position and row.
    expect(points[3].cache_bytes).toBe(2 * 2 * 2 * 100 * 2 * 16 * 4);
  }, 240_000);

  it("draft: pass cost per tokens fed, decode with and without drafts (same tokens), and the derived speedups", async () => {
    const [file] = await runBench(["draft", ...common, "--tokens", "8"]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.failures).toEqual({});
    const [res] = r.results;
    expect(res.passes.map((p: { tokens: number }) => p.tokens)).toEqual([1, 2, 4]);
    expect(res.passes[0].ratio).toBe(1);
    for (const p of res.passes) expect(p.ms.n).toBe(2);
    expect(res.runs.map((x: { text: string; draft_tokens: number }) => `${x.text}:${x.draft_tokens}`)).toEqual([
      "greedy:0",
      "greedy:1",
      "greedy:3",
      "sampled:0",
      "sampled:1",
      "sampled:3",
      "recorded:0",
      "recorded:1",
      "recorded:3",
    ]);
    for (const x of res.runs) {
      expect(x.same_tokens).toBe(true);
      expect(positive(x.tok_s.median)).toBe(true);
    }
    // The tiny model's greedy text is one token repeated: once it has repeated, every draft is kept.
    const greedy3 = res.runs.find((x: { text: string; draft_tokens: number }) => x.text === "greedy" && x.draft_tokens === 3);
    expect(greedy3.acceptance).toBe(1);
    expect(greedy3.tokens_per_pass).toBeGreaterThan(1.5);
    expect(res.runs[0].acceptance).toBeNull();
    expect(res.runs[0].tokens_per_pass).toBe(1);
    // MedVLM-R1's published answer, replayed: the lookup guesses a few of its tokens (a phrase of the question), not most.
    for (const k of [1, 3]) {
      const rec = res.runs.find((x: { text: string; draft_tokens: number }) => x.text === "recorded" && x.draft_tokens === k);
      expect(rec.acceptance).toBeGreaterThan(0);
      expect(rec.acceptance).toBeLessThan(1);
      expect(rec.tokens_per_pass).toBeGreaterThan(1);
      expect(rec.tokens_per_pass).toBeLessThan(1.5);
    }
  }, 240_000);

  it("draft: tokens per pass at acceptance p", () => {
    expect(expectedTokensPerPass(0, 0.5)).toBe(1);
    expect(expectedTokensPerPass(3, 0.5)).toBe(1.875);
    expect(expectedTokensPerPass(4, 1)).toBe(5);
    expect(expectedTokensPerPass(4, 0)).toBe(1);
  });

  it("vision: the folder's chunked encoder against the whole attention, per patch count, each in its own child", async () => {
    const [file] = await runBench(["vision", ...common]);
    const r = readResult(file!);
    expectMachine(r);
    expect(r.failures).toEqual({});
    const [res] = r.results;
    expect(res.dtype).toBe("int4");
    expect(res.budget).toBe(1 << 24);
    expect(res.points.map((p: { patches: number; chunks: number }) => [p.patches, p.chunks])).toEqual([[64, 1], [256, 1]]);
    for (const p of res.points) {
      expect(p.max_abs_diff).toBe(0); // one chunk at these sizes: the same computation
      for (const g of [p.chunked, p.whole]) {
        expect(g.ms).toHaveLength(1);
        expect(g.patches).toBe(p.patches);
        expect(positive(g.peak_rss_bytes) && g.peak_rss_bytes >= g.load_rss_bytes).toBe(true);
      }
      expect(positive(p.speedup)).toBe(true);
    }
    expect(readdirSync(join(work, "cache", "tiny")).some((f) => f.startsWith("vision-whole"))).toBe(false); // the peer is removed
  }, 240_000);

  it("vision: query rows per attention chunk as the graph computes them", () => {
    expect(attentionChunks(256, 16, 1 << 24)).toEqual({ rows: 256, chunks: 1 });
    expect(attentionChunks(1936, 16, 1 << 24)).toEqual({ rows: 541, chunks: 4 });
    expect(attentionChunks(5476, 16, 1 << 24)).toEqual({ rows: 191, chunks: 29 });
    expect(attentionChunks(65536, 16, 1 << 24)).toEqual({ rows: 16, chunks: 4096 });
    expect(attentionChunks(288, 2, 2 * 37 * 288)).toEqual({ rows: 37, chunks: 8 });
    expect(attentionChunks(100, 16, 1)).toEqual({ rows: 1, chunks: 100 });
  });

  it("concurrency --probe-image --vision-process 0,1: the probe asks about another image at its own grid, encoded in either place", async () => {
    const [file] = await runBench(["concurrency", ...common, "--dtypes", "int4", "--tokens", "12", "--levels", "2", "--prefill-chunks", "32", "--probe-image", join(PROJECT_ROOT, "samples", "mdb146.png"), "--probe-max-pixels", "100352", "--vision-process", "0,1"]);
    const r = readResult(file!);
    expect(r.results[0].probe_grid).toEqual([1, 22, 22]); // the model card demo's size: 121 image tokens
    expect(r.results[0].levels.map((l: { vision_process: boolean }) => l.vision_process)).toEqual([false, true]);
    for (const l of r.results[0].levels) {
      expect(l.errors).toEqual([]);
      expect(l.completion_tokens).toEqual([14, 14]);
      expect(positive(l.probe_ttft_ms) && positive(l.probe_stall_ms)).toBe(true);
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
    // The worker in-process: every request answered, the double decoded every wire request, and /v1/vqa's
    // work (auth, parsing, tokenization, signing) costs more CPU than /healthz's.
    const own = r.worker_own_cpu;
    expect(own.healthz.statuses).toEqual({ 200: 10 });
    expect(own.vqa_hs256.statuses).toEqual({ 200: 10 });
    expect(own.vqa_es256.statuses).toEqual({ 200: 10 });
    expect(own.backend_double_malformed).toBe(0);
    expect(positive(own.healthz.cpu_p50_ms)).toBe(true);
    expect(own.vqa_hs256.cpu_mean_ms).toBeGreaterThan(own.healthz.cpu_mean_ms);
    expect(own.vqa_es256.cpu_p99_ms).toBeGreaterThanOrEqual(own.vqa_es256.cpu_p50_ms);
    // The main thread's share (Linux schedstat) is part of the whole process's CPU (two clocks: a small slack).
    expect(positive(own.vqa_hs256.thread_p50_ms)).toBe(true);
    expect(own.vqa_hs256.thread_mean_ms).toBeLessThanOrEqual(own.vqa_hs256.cpu_mean_ms * 1.1 + 0.1);
    // The tokenizer tables are loaded by the first /v1/vqa: the heap after the load holds them.
    expect(own.heap_after_load - own.heap_after_import).toBeGreaterThan(1e6);
    // A sampled profile of a few-ms startup can hold no busy sample: the check is that it ran and is bounded.
    expect(r.worker_startup).not.toBeNull();
    expect(r.worker_startup.cpu_ms).toBeGreaterThanOrEqual(0);
    expect(r.worker_startup.span_ms).toBeGreaterThan(0);
    expect(r.worker_startup.cpu_ms).toBeLessThanOrEqual(r.worker_startup.span_ms);
  }, 300_000);
});

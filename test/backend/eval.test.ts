/**
 * The evaluation harness (gpu-backend/src/eval/, scripts/eval.ts): the reference scoring rule on hand-made
 * replies, dataset validation and the released 900-item file, the missing-image check, api mode against a
 * stub `/v1/vqa`, and an end-to-end local run of the model card's 12 examples on the config-A demo model
 * (random weights: structure and consistency are checked, not accuracy) through the CLI as a subprocess.
 */
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { renderQuestion } from "../../shared/src/prompt.ts";
import {
  DatasetError,
  loadDataset,
  modalityOf,
  parseDataset,
  promptFor,
  selectItems,
  splitProblem,
} from "../../gpu-backend/src/eval/dataset.ts";
import { buildResults, createProgress, formatTable, type CliIO } from "../../gpu-backend/src/eval/report.ts";
import { EvalError, runEvaluation, type ItemRecord } from "../../gpu-backend/src/eval/run.ts";
import { gradeItem, summarize, type ItemOutput } from "../../gpu-backend/src/eval/score.ts";
import { PROJECT_ROOT } from "../support/golden.ts";
import { buildTinyModel } from "../support/tiny-model.ts";

const MEDVLM = resolve(PROJECT_ROOT, "..", "shared", "medvlm-r1");
const RELEASED = join(MEDVLM, "MRI_CT_XRAY_300each_dataset.json");
const SAMPLES = join(MEDVLM, "samples.json");
const tmp = mkdtempSync(join(tmpdir(), "eval-test-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A raw valid item (the released format). */
function rawItem(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    image: ["images/x.png"],
    problem: "What is shown?\nA) Brain\nB) Knee\nC) Lung\nD) Liver",
    solution: "C",
    question: "What is shown?",
    options: ["Brain", "Knee", "Lung", "Liver"],
    answer: "Lung",
    dataset: "OmniMedVQA",
    subset: "X-Ray",
    ...over,
  };
}

const OPTS4 = ["w", "x", "y", "z"];
function out(output: string | null, over: Partial<ItemOutput> = {}): ItemOutput {
  return { index: 0, subset: "MRI", gold: "B", options: OPTS4, output, error: null, completion_tokens: 10, finish_reason: "stop", ms: 100, ...over };
}

describe("score: the reference rule", () => {
  it("takes the first <answer>X</answer> match, with Python whitespace around the letter", () => {
    expect(gradeItem(out("<think>.</think><answer>B</answer>"))).toMatchObject({ predicted: "B", correct: true, format_ok: true });
    expect(gradeItem(out("<answer>A</answer> then <answer>B</answer>"))).toMatchObject({ predicted: "A", correct: false });
    // A non-matching <answer> first: the search goes on to the first one that matches.
    expect(gradeItem(out("<answer>AB</answer><answer> B </answer>"))).toMatchObject({ predicted: "B", correct: true });
    expect(gradeItem(out("<answer>\n\t B \u001c</answer>"))).toMatchObject({ predicted: "B", correct: true });
    // U+FEFF is JS whitespace but not Python's: no match.
    expect(gradeItem(out("<answer>\ufeffB</answer>"))).toMatchObject({ predicted: null, correct: false });
  });

  it("does not accept lower case, bare letters, extra text or an unclosed tag (no match = wrong)", () => {
    for (const reply of ["<answer>b</answer>", "B", "The answer is B.", "<answer>B) Knee</answer>", "<answer>B", "<ANSWER>B</ANSWER>", ""]) {
      const g = gradeItem(out(reply));
      expect(g, reply).toMatchObject({ predicted: null, correct: false });
    }
  });

  it("reports what only the tolerant fallback found, without counting it correct", () => {
    const g = gradeItem(out("<think>t</think><answer>b</answer>"));
    expect(g).toMatchObject({ predicted: null, correct: false, fallback_answer: "B", fallback: "answer_tag_letter", format_ok: true });
    expect(gradeItem(out("<answer>B</answer>"))).toMatchObject({ fallback_answer: null, fallback: null });
  });

  it("a letter outside the options is wrong and counted; a failed request is wrong and not format-compliant", () => {
    const e = gradeItem(out("<answer>E</answer>", { gold: "B" }));
    expect(e).toMatchObject({ predicted: "E", letter_in_options: false, correct: false });
    const f = gradeItem(out(null, { error: { code: "invalid_image", message: "bad" }, completion_tokens: 0, finish_reason: null }));
    expect(f).toMatchObject({ predicted: null, correct: false, format_ok: false });
    const s = summarize([e, f], { wallMs: 1000 });
    expect(s).toMatchObject({ items: 2, correct: 0, letter_out_of_range: 1, errors: 1, errors_by_code: { invalid_image: 1 } });
    expect(s.completion_tokens.total).toBe(10); // the failed item has no reply
  });

  it("summarizes accuracy per subset (paper order), format rate, tokens and throughput", () => {
    const items = [
      out("<think>a</think><answer>B</answer>", { index: 0, subset: "X-ray", completion_tokens: 10, ms: 10 }),
      out("<think>a</think> <answer>C</answer>", { index: 1, subset: "X-ray", completion_tokens: 20, ms: 20 }),
      out("<think>a</think><answer>B</answer>\n", { index: 2, subset: "MRI", completion_tokens: 30, ms: 30, finish_reason: "length" }),
      out("<answer>b</answer>", { index: 3, subset: "CT", completion_tokens: 40, ms: 40 }),
      out("<answer>A</answer>", { index: 4, subset: "successful_cases", gold: "A", completion_tokens: 50, ms: 50 }),
      out("nothing", { index: 5, subset: "CT", completion_tokens: 60, ms: 60 }),
    ].map(gradeItem);
    const s = summarize(items, { wallMs: 2000, skipped: 3 });
    expect(s.by_subset.map((r) => [r.subset, r.items, r.correct, r.format_ok])).toEqual([
      ["MRI", 1, 1, 0], // trailing newline: the format reward's fullmatch fails
      ["CT", 2, 0, 0],
      ["X-ray", 2, 1, 2],
      ["successful_cases", 1, 1, 0],
    ]);
    expect(s.by_subset[2]!.accuracy).toBe(0.5);
    expect(s).toMatchObject({
      items: 6,
      correct: 3,
      accuracy: 0.5,
      format_ok: 2,
      format_rate: 2 / 6,
      no_reference_letter: 2,
      fallback_only: 1,
      fallback_correct: 1,
      skipped: 3,
      truncated: 1,
      completion_tokens: { total: 210, mean: 35, median: 35, max: 60 },
      latency_ms: { median: 35 },
      wall_ms: 2000,
      tokens_per_s: 105,
      items_per_s: 3,
    });
    expect(summarize([], { wallMs: 0 })).toMatchObject({ items: 0, accuracy: null, format_rate: null, tokens_per_s: null });
  });
});

describe("dataset", () => {
  it("loads the released 900-item file: 300 per modality, every problem equal to question + options", async () => {
    const ds = await loadDataset(RELEASED);
    expect(ds.items).toHaveLength(900);
    expect(ds.warnings).toEqual([]);
    const count = (m: string) => ds.items.filter((i) => i.modality === m).length;
    expect([count("MRI"), count("CT"), count("X-ray")]).toEqual([300, 300, 300]);
    // The reference script's slices: MRI = [:300], CT = [300:600], X-ray = [600:].
    expect(ds.items.slice(0, 300).every((i) => i.modality === "MRI")).toBe(true);
    expect(ds.items.slice(600).every((i) => i.modality === "X-ray")).toBe(true);
    expect(ds.items[0]).toMatchObject({ index: 0, subset: "MR (Mag-netic Resonance Imaging)", solution: "D", problemMatches: true });
    expect(selectItems(ds.items, { subset: "Xray" })).toHaveLength(300);
    expect(selectItems(ds.items, { subset: "CT(Computed Tomography)", limit: 7 }).map((i) => i.index)).toEqual([300, 301, 302, 303, 304, 305, 306]);
  });

  it("maps subset names to the paper's rows", () => {
    expect(["MR (Mag-netic Resonance Imaging)", "MRI", "mr", "Magnetic Resonance Imaging"].map(modalityOf)).toEqual(["MRI", "MRI", "MRI", "MRI"]);
    expect(["CT(Computed Tomography)", "ct", "Computed Tomography"].map(modalityOf)).toEqual(["CT", "CT", "CT"]);
    expect(["X-Ray", "Xray", "x ray"].map(modalityOf)).toEqual(["X-ray", "X-ray", "X-ray"]);
    expect(["OCT (Optical Coherence Tomography)", "Ultrasound", " "].map(modalityOf)).toEqual(["OCT (Optical Coherence Tomography)", "Ultrasound", "(none)"]);
  });

  it("names the item index and the field of a bad item", () => {
    const bad = (over: Record<string, unknown>, at = 1) => {
      const list = [rawItem(), rawItem(), rawItem()];
      list[at] = rawItem(over);
      try {
        parseDataset(list);
      } catch (e) {
        expect(e).toBeInstanceOf(DatasetError);
        return { msg: (e as DatasetError).message, index: (e as DatasetError).index, field: (e as DatasetError).field };
      }
      throw new Error("no error");
    };
    expect(bad({ options: undefined })).toEqual({ msg: "item 1: field 'options' is missing", index: 1, field: "options" });
    expect(bad({ options: ["only one"] }, 2)).toMatchObject({ index: 2, field: "options", msg: expect.stringContaining("2 to 10 options, got 1") });
    expect(bad({ options: ["a", "b", 3] })).toMatchObject({ field: "options[2]", msg: "item 1: field 'options[2]' must be a string, got number" });
    expect(bad({ solution: "E" })).toMatchObject({ field: "solution", msg: expect.stringContaining("one option letter A–D, got \"E\"") });
    expect(bad({ solution: "c" })).toMatchObject({ field: "solution" });
    expect(bad({ solution: undefined }, 0)).toEqual({ msg: "item 0: field 'solution' is missing", index: 0, field: "solution" });
    expect(bad({ image: [] })).toMatchObject({ field: "image", msg: expect.stringContaining("empty list") });
    expect(bad({ image: 5 })).toMatchObject({ field: "image" });
    expect(bad({ question: "  " })).toMatchObject({ field: "question", msg: "item 1: field 'question' is empty" });
    expect(bad({ problem: ["x"] })).toMatchObject({ field: "problem", msg: expect.stringContaining("must be a string, got a list") });
    expect(() => parseDataset({ items: [] })).toThrow(/must be a JSON list of items, got object/);
    expect(() => parseDataset([])).toThrow(/no items/);
    expect(() => parseDataset([rawItem(), "x"])).toThrow("item 1: must be an object, got string");
  });

  it("tolerates quirks: a string image, missing problem/answer/subset, a padded solution; warns on mismatches", () => {
    const ds = parseDataset([
      rawItem({ image: "images/a.png", problem: undefined, answer: undefined, subset: undefined, solution: " C " }),
      rawItem({ answer: "Knee" }),
      rawItem({ image: ["images/a.png", "images/b.png"] }),
    ]);
    expect(ds.items[0]).toMatchObject({ image: "images/a.png", solution: "C", problem: "What is shown?\nA) Brain\nB) Knee\nC) Lung\nD) Liver", modality: "(none)" });
    expect(ds.items[2]!.image).toBe("images/a.png");
    expect(ds.warnings.map((w) => [w.index, w.kind])).toEqual([
      [1, "answer_mismatch"],
      [2, "extra_images"],
    ]);
  });

  it("takes question and options from the problem's lines when an item has neither (the model card's form)", () => {
    const problem = "What is shown?\nA) Brain\nB) Knee\nC) Lung\nD) Liver";
    const ds = parseDataset([rawItem({ question: undefined, options: undefined, problem })]);
    expect(ds.items[0]).toMatchObject({ question: "What is shown?", options: ["Brain", "Knee", "Lung", "Liver"], problem, problemMatches: true });
    expect(ds.warnings).toEqual([]);
    // A problem without option lines cannot stand in for them.
    expect(() => parseDataset([rawItem({ question: undefined, options: undefined, problem: "Free text" })])).toThrow("item 0: field 'question' is missing");
  });

  it("uses the problem's text when it differs from question + options (warned), as the reference prompt did", () => {
    const problem = "What organ is shown?\nA) Brain\nB) Knee";
    const ds = parseDataset([rawItem(), rawItem({ problem }), rawItem({ problem: "Free text with no option lines" })]);
    expect(ds.warnings.map((w) => [w.index, w.kind])).toEqual([
      [1, "problem_mismatch"],
      [2, "problem_mismatch"],
    ]);
    expect(ds.warnings[0]!.message).not.toContain("organ"); // never the item's text
    const same = promptFor(ds.items[0]!);
    expect(same.source).toBe("question_options");
    expect(same.messages[0]!.content).toEqual([{ type: "image" }, { type: "text", text: renderQuestion(ds.items[0]!.problem) }]);
    const p = promptFor(ds.items[1]!);
    expect(p).toMatchObject({ source: "problem", question: "What organ is shown?", options: ["Brain", "Knee"] });
    expect(p.messages[0]!.content).toEqual([{ type: "image" }, { type: "text", text: renderQuestion(problem) }]);
    const u = promptFor(ds.items[2]!);
    expect(u.source).toBe("problem_unsplittable");
    expect((u.messages[0]!.content as { text?: string }[])[1]!.text).toBe(renderQuestion("Free text with no option lines"));
    expect(splitProblem("Q\nline two\nA) a\nB) b\nC) c")).toEqual({ question: "Q\nline two", options: ["a", "b", "c"] });
    expect(splitProblem("Q\nA) a\nC) c")).toBeNull();
  });

  it("refuses to start when images are missing, listing the first few", async () => {
    const err = await runEvaluation({ data: RELEASED, images: MEDVLM, target: { kind: "api", baseUrl: "http://127.0.0.1:9", token: "t" } }).catch((e) => e);
    expect(err).toBeInstanceOf(EvalError);
    expect(err.message).toMatch(/^888 of 900 image files are missing under /);
    expect(err.message).toContain(`item 0: ${join(MEDVLM, "images/brain002206.png")}`);
    expect(err.message).toContain("… and 883 more");
    expect(err.message).toContain("--skip-missing");
  });
});

describe("report", () => {
  it("progress: a bar on a TTY, one line per 10% otherwise", () => {
    const mk = (isTTY: boolean): CliIO & { err: string } => {
      const r = { err: "", isTTY, columns: 200, stdout: () => {}, stderr: (s: string) => void (r.err += s) };
      return r;
    };
    const plain = mk(false);
    const p = createProgress(plain);
    for (let done = 1; done <= 25; done++) p.update({ done, total: 25, correct: Math.floor(done / 2), elapsedMs: done * 1000 });
    p.end();
    const lines = plain.err.trim().split("\n");
    expect(lines).toHaveLength(10);
    expect(lines[0]).toBe("eval: 3/25 (12%) acc 33.3%, elapsed 3.0s, ETA 22.0s");
    expect(lines[9]).toMatch(/^eval: 25\/25 \(100%\) acc 48\.0%/);
    const tty = mk(true);
    const q = createProgress(tty);
    q.update({ done: 5, total: 10, correct: 4, elapsedMs: 5000 });
    q.end();
    expect(tty.err).toBe("\r[###############---------------] 5/10 acc 80.0% ETA 5.0s\x1b[K\n");
  });
});

// ------------------------------------------------------------------------------------------------ api

interface Seen {
  auth: string | undefined;
  file: string;
  bytes: number;
  question: string;
  options: string[];
  maxNewTokens: string;
}

/** A stub `/v1/vqa`: replies chosen by the image's file name ("*": any other); one 429 before its first success for `retryOnce`. */
function stubApi(replies: Record<string, { raw?: string; status?: number; code?: string; drafts?: [number, number] }>, retryOnce: string): Promise<{ server: Server; url: string; seen: Seen[]; calls: () => number }> {
  const seen: Seen[] = [];
  let calls = 0;
  let retried = false;
  const server = createServer(async (req: IncomingMessage, res) => {
    calls++;
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const form = await new Request("http://stub" + req.url, { method: "POST", headers: req.headers as Record<string, string>, body: Buffer.concat(chunks) }).formData();
    const file = form.get("image") as File;
    const send = (status: number, body: unknown, headers: Record<string, string> = {}) => {
      res.writeHead(status, { "content-type": "application/json", ...headers });
      res.end(JSON.stringify(body));
    };
    if (req.url !== "/v1/vqa") return send(404, { error: { code: "not_found", message: "no route" } });
    if (req.headers.authorization !== "Bearer good-token") return send(401, { error: { code: "invalid_token", message: "bad token" } });
    if (file.name === retryOnce && !retried) {
      retried = true;
      return send(429, { error: { code: "rate_limited", message: "slow down" } }, { "retry-after": "0" });
    }
    seen.push({
      auth: req.headers.authorization,
      file: file.name,
      bytes: file.size,
      question: form.get("question") as string,
      options: form.getAll("options") as string[],
      maxNewTokens: form.get("max_new_tokens") as string,
    });
    const r = replies[file.name] ?? replies["*"] ?? { raw: "<think>no idea</think><answer>A</answer>" };
    if (r.status) return send(r.status, { error: { code: r.code, message: "refused" } });
    const details = r.drafts ? { completion_tokens_details: { accepted_prediction_tokens: r.drafts[0], rejected_prediction_tokens: r.drafts[1] } } : {};
    const usage = { prompt_tokens: 100, image_tokens: 64, completion_tokens: 17, ...details };
    send(200, { object: "vqa.answer", model: "medvlm-r1-stub", raw: r.raw, finish_reason: "stop", usage });
  });
  return new Promise((ok) =>
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as { port: number }).port;
      ok({ server, url: `http://127.0.0.1:${port}`, seen, calls: () => calls });
    }),
  );
}

describe("api mode", () => {
  it("posts each item to /v1/vqa with the bearer token and scores the replies (released file, --skip-missing)", async () => {
    // The 12 model-card images are part of the released set: with --skip-missing exactly those run.
    const ds = await loadDataset(RELEASED);
    const byFile = new Map(ds.items.map((i) => [basename(i.image), i]));
    const gold = (f: string) => byFile.get(f)!.solution;
    const wrong = (f: string) => (gold(f) === "A" ? "B" : "A");
    const { server, url, seen, calls } = await stubApi(
      {
        "knee031316.png": { raw: `<think>x</think>\n<answer> ${gold("knee031316.png")} </answer>`, drafts: [5, 2] }, // right, format ok; a server that drafts
        "brain003631.png": { raw: `<answer>${gold("brain003631.png")}</answer>` }, // right, no think
        "lung067009.png": { raw: `<think>x</think><answer>${gold("lung067009.png").toLowerCase()}</answer>` }, // fallback only
        "mdb146.png": { raw: `<think>x</think><answer>${wrong("mdb146.png")}</answer>` }, // wrong
        "abd-normal023599.png": { status: 422, code: "invalid_image" }, // failed item
      },
      "spine010017.png",
    );
    try {
      const progress: number[] = [];
      const run = await runEvaluation({
        data: RELEASED,
        images: MEDVLM,
        target: { kind: "api", baseUrl: url + "/", token: "good-token" },
        batch: 3,
        maxNewTokens: 8,
        skipMissing: true,
        retryBaseMs: 1,
        onProgress: (p) => progress.push(p.done),
      });
      expect(progress).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
      expect(run.skippedIndices).toHaveLength(888);
      expect(run.items.map((i) => i.index)).toEqual([18, 25, 34, 97, 103, 156, 171, 209, 310, 359, 856, 857]);
      // Every item was answered once (one 429 retried), with its own question, options and the token.
      expect(seen).toHaveLength(12);
      expect(calls()).toBe(13);
      for (const s of seen) {
        const item = byFile.get(s.file)!;
        expect(s).toMatchObject({ auth: "Bearer good-token", question: item.question, options: item.options, maxNewTokens: "8" });
        expect(s.bytes).toBe(readFileSync(join(MEDVLM, item.image)).length);
      }
      const s = run.summary;
      const special = new Set(["knee031316.png", "brain003631.png", "lung067009.png", "mdb146.png", "abd-normal023599.png"]);
      const rest = run.items.filter((i) => !special.has(basename(ds.items[i.index]!.image)));
      expect(rest).toHaveLength(7);
      const restCorrect = rest.filter((i) => i.gold === "A").length; // the stub's default reply is A
      expect(s).toMatchObject({ items: 12, skipped: 888, errors: 1, errors_by_code: { invalid_image: 1 }, fallback_only: 1, fallback_correct: 1 });
      expect(s.correct).toBe(2 + restCorrect);
      expect(s.draft_tokens).toEqual({ accepted: 5, rejected: 2, acceptance: 5 / 7 });
      expect(s.format_ok).toBe(3 + 7); // knee, lung, mdb146 and the 7 default replies
      expect(s.by_subset.map((r) => [r.subset, r.items])).toEqual([
        ["MRI", 8],
        ["CT", 2],
        ["X-ray", 2],
      ]);
      expect(run.engine).toEqual({ mode: "api", model: `${url}/v1/vqa`, details: { model_id: "medvlm-r1-stub" } });
      const file = JSON.stringify(buildResults(run, { data: RELEASED, images: MEDVLM, batch: 3, saveOutputs: false, machine: {} }));
      expect(file).not.toContain("good-token");
      expect(file).not.toContain('"output"');
      const table = formatTable(s, { engine: run.engine, params: run.params, batch: 3, promptMismatches: 0 });
      expect(table).toMatch(/^overall\s+12\s+\d+\s+[\d.]+%/m);
      expect(table).toContain("skipped 888 (missing image)");
      expect(table).toContain("errors 1 (counted wrong: invalid_image 1)");
    } finally {
      server.close();
    }
  });

  it("keeps every answered item when a run stops (an expired token), and --resume answers only the rest", async () => {
    let accepted = 5; // the token "expires" after five answers
    let requests = 0;
    const server = createServer(async (req, res) => {
      requests++;
      for await (const _ of req);
      const ok = accepted-- > 0;
      res.writeHead(ok ? 200 : 401, { "content-type": "application/json" });
      res.end(JSON.stringify(ok ? { model: "stub", raw: "<think>x</think><answer>A</answer>", finish_reason: "stop", usage: { completion_tokens: 9 } } : { error: { code: "token_expired", message: "expired" } }));
    });
    await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
    const api = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
    const { runEvalCli } = await import("../../scripts/eval.ts");
    const io = { out: "", err: "", isTTY: false, stdout: (s: string) => void (io.out += s), stderr: (s: string) => void (io.err += s) };
    const out = join(tmp, "resume", "results.json");
    const journal = `${out}.partial.jsonl`;
    const args = ["--data", SAMPLES, "--images", MEDVLM, "--api", api, "--token", "t", "--batch", "1", "--max-new-tokens", "64", "--out", out];
    try {
      expect(await runEvalCli(args, io)).toBe(1);
      expect(io.err).toContain("answered 401 token_expired");
      expect(io.err).toContain(`5 answered items are kept in ${journal}; run again with --resume`);
      expect(readFileSync(journal, "utf8").trim().split("\n")).toHaveLength(1 + 5); // the settings, then one line per item
      // Other settings cannot resume from it.
      io.err = "";
      expect(await runEvalCli([...args.slice(0, -4), "--max-new-tokens", "32", "--out", out, "--resume"], io)).toBe(1);
      expect(io.err).toContain("it was written with other settings (max_new_tokens)");
      accepted = 1000;
      requests = 0;
      expect(await runEvalCli([...args, "--resume"], io)).toBe(0);
      expect(requests).toBe(7);
      const results = JSON.parse(readFileSync(out, "utf8")) as { resumed_items: number; summary: { items: number }; items: { index: number }[] };
      expect(results.resumed_items).toBe(5);
      expect(results.summary.items).toBe(12);
      expect(results.items.map((i) => i.index)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
      expect(existsSync(journal)).toBe(false);
      // A results path that cannot be written fails before the first request.
      requests = 0;
      writeFileSync(join(tmp, "a-file"), "");
      expect(await runEvalCli([...args.slice(0, -1), join(tmp, "a-file", "results.json")], io)).toBe(1);
      expect(io.err).toContain("cannot write beside the results file");
      expect(requests).toBe(0);
    } finally {
      server.close();
    }
  });

  it("stops at once on an authentication failure", async () => {
    const { server, url, calls } = await stubApi({}, "");
    try {
      const err = await runEvaluation({ data: SAMPLES, images: MEDVLM, target: { kind: "api", baseUrl: url, token: "bad" }, batch: 2 }).catch((e) => e);
      expect(err).toBeInstanceOf(EvalError);
      expect(err.message).toMatch(/answered 401 invalid_token: bad token$/);
      expect(calls()).toBeLessThanOrEqual(2); // no new request after the first failure
    } finally {
      server.close();
    }
  });

  it("stops on invalid_parameter (e.g. max_new_tokens above the server's cap): every item would fail alike", async () => {
    const { server, url, calls } = await stubApi({ "*": { status: 422, code: "invalid_parameter" } }, "");
    try {
      const err = await runEvaluation({ data: SAMPLES, images: MEDVLM, target: { kind: "api", baseUrl: url, token: "good-token" }, batch: 1 }).catch((e) => e);
      expect(err).toBeInstanceOf(EvalError);
      expect(err.message).toContain("answered 422 invalid_parameter");
      expect(calls()).toBe(1);
    } finally {
      server.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------- local

describe("local mode end to end (config-A demo model)", () => {
  let modelDir: string;
  beforeAll(async () => {
    modelDir = await buildTinyModel(join(tmp, "model"));
  }, 120_000);

  it("the CLI runs the 12 model-card examples and writes a consistent results file", async () => {
    const outFile = join(tmp, "results.json");
    const { stdout, stderr } = await promisify(execFile)(
      process.execPath,
      [
        "node_modules/tsx/dist/cli.mjs",
        "scripts/eval.ts",
        "--data", SAMPLES,
        "--images", MEDVLM,
        "--model", modelDir,
        "--max-new-tokens", "8",
        "--batch", "4",
        "--threads", "2",
        "--out", outFile,
        "--save-outputs",
      ],
      { cwd: PROJECT_ROOT, timeout: 110_000 },
    );
    // Non-TTY progress: one line per 10% (12 items cross the ten deciles at 2,3,4,5,6,8,9,10,11,12).
    const progress = stderr.split("\n").filter((l) => l.startsWith("eval: "));
    expect(progress.map((l) => l.split(" ")[1])).toEqual(["2/12", "3/12", "4/12", "5/12", "6/12", "8/12", "9/12", "10/12", "11/12", "12/12"]);
    expect(stdout).toMatch(/^overall\s+12\s+\d+\s+[\d.]+%/m);
    expect(stdout).toContain(`results              ${outFile} (with raw outputs)`);

    const r = JSON.parse(readFileSync(outFile, "utf8"));
    expect(r.settings).toMatchObject({ mode: "local", batch: 4, params: { max_new_tokens: 8, temperature: 0 } });
    expect(r.engine).toMatchObject({ dtype: "fp32", provider: "cpu" });
    expect(r.machine).toMatchObject({ node: process.version, cpu_count: expect.any(Number) });
    const items = r.items as ItemRecord[];
    expect(items.map((i) => i.index)).toEqual([...Array(12).keys()]);
    const s = r.summary;
    expect(s.items).toBe(12);
    expect(s.by_subset.map((b: { subset: string; items: number }) => [b.subset, b.items])).toEqual([
      ["failure_cases", 4],
      ["successful_cases", 8],
    ]);
    expect(s.by_subset.reduce((a: number, b: { correct: number }) => a + b.correct, 0)).toBe(s.correct);
    expect(items.filter((i) => i.correct).length).toBe(s.correct);
    expect(items.filter((i) => i.format_ok).length).toBe(s.format_ok);
    for (const it of items) {
      expect(it.error).toBeNull();
      expect(typeof it.output).toBe("string");
      expect(it.completion_tokens).toBeGreaterThanOrEqual(1);
      expect(it.completion_tokens).toBeLessThanOrEqual(8);
      expect(it.correct).toBe(it.predicted !== null && it.predicted === it.gold);
      // Re-scoring the saved output gives the recorded verdict.
      const again = gradeItem(out(it.output!, { gold: it.gold }));
      expect([again.predicted, again.format_ok]).toEqual([it.predicted, it.format_ok]);
    }
    expect(s.completion_tokens.total).toBe(items.reduce((a, i) => a + i.completion_tokens, 0));
    expect(s.truncated).toBe(items.filter((i) => i.finish_reason === "length").length);
    expect(s.tokens_per_s).toBeCloseTo(s.completion_tokens.total / (s.wall_ms / 1000), 6);

    // Batched (4) and one-at-a-time greedy runs give every item the same reply: no mix-up between requests.
    const oneAtATime = (draftTokens?: number) =>
      runEvaluation({
        data: SAMPLES,
        images: MEDVLM,
        target: { kind: "local", modelDir, threads: 2 },
        subset: "failure_cases",
        batch: 1,
        maxNewTokens: 8,
        ...(draftTokens ? { draftTokens } : {}),
      });
    const single = await oneAtATime();
    expect(single.items.map((i) => i.index)).toEqual([8, 9, 10, 11]);
    expect(single.items.map((i) => i.output)).toEqual(items.slice(8).map((i) => i.output));
    expect(single.summary.draft_tokens).toBeNull();
    // Speculative decoding (one at a time, so every item drafts): the same replies, and the drafts counted.
    const drafted = await oneAtATime(3);
    expect(drafted.items.map((i) => i.output)).toEqual(single.items.map((i) => i.output));
    expect(drafted.engine.details.draft_tokens).toBe(3);
    const d = drafted.summary.draft_tokens!;
    expect(d.accepted).toBeGreaterThan(0);
    expect(d.accepted).toBe(drafted.items.reduce((a, i) => a + (i.drafts?.accepted ?? 0), 0));
    expect(d.acceptance).toBeCloseTo(d.accepted / (d.accepted + d.rejected), 12);
    expect(formatTable(drafted.summary, { engine: drafted.engine, params: drafted.params, batch: 1, promptMismatches: 0 })).toMatch(/^draft tokens kept\s+[\d.]+%/m);
    expect(new Set(items.map((i) => i.output)).size).toBeGreaterThan(1); // the replies do depend on the item
  }, 120_000);

  it("a data file that is not valid JSON is a clear failure (exit 1), bad flags are usage errors (exit 2)", async () => {
    const bad = join(tmp, "bad.json");
    writeFileSync(bad, "[{");
    const { runEvalCli } = await import("../../scripts/eval.ts");
    const io = { out: "", err: "", isTTY: false, stdout: (s: string) => void (io.out += s), stderr: (s: string) => void (io.err += s) };
    expect(await runEvalCli(["--data", bad, "--model", tmp], io)).toBe(1);
    expect(io.err).toMatch(/^eval failed: .*bad\.json is not valid JSON/);
    io.err = "";
    expect(await runEvalCli(["--data", bad, "--model", tmp, "--batch", "0"], io)).toBe(2);
    expect(io.err).toContain("--batch must be a positive integer");
    io.err = "";
    expect(await runEvalCli(["--data", bad, "--model", tmp, "--api", "http://x"], io)).toBe(2);
    expect(await runEvalCli(["--data", bad, "--api", "http://x"], io, {})).toBe(2);
    expect(io.err).toContain("--api needs --token");
  });
});

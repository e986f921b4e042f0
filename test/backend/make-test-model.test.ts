import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  CheckpointError,
  CheckpointWeights,
  DEMO_MODEL_DIR,
  Mulberry32,
  fnv1a32,
  loadQwen2VLCheckpoint,
  makeTestModel,
  missingCheckpointFiles,
  planShards,
  resolveModelDir,
  specRule,
  specTensor,
  specTensorChunks,
  writeSafetensors,
  type DType,
} from "../../gpu-backend/src/checkpoint/index.ts";
import { GOLDEN_DIR, PROJECT_ROOT } from "../support/golden.ts";
import { rejectionOf } from "../support/errors.ts";

interface ManifestEntry {
  name: string;
  shape: number[];
  first4: number[];
  sum_f64: number;
  sha256_stored_bytes: string;
}
const TINY_A = join(GOLDEN_DIR, "tiny-a");
const CONFIG_A = join(TINY_A, "config.json");
const manifest = JSON.parse(readFileSync(join(GOLDEN_DIR, "weights_manifest_a.json"), "utf8")) as ManifestEntry[];
const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

let tmp: string;
/** A config-A variant with a 512-token vocabulary: same tensor list, ~300× less data (for the slower paths). */
let smallConfig: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), "make-test-model-"));
  mkdirSync(join(tmp, "small-src"));
  smallConfig = join(tmp, "small-src", "config.json");
  writeFileSync(smallConfig, JSON.stringify({ ...JSON.parse(readFileSync(CONFIG_A, "utf8")), vocab_size: 512 }, null, 2));
});
afterAll(() => {
  rmSync(tmp, { recursive: true, force: true });
});


describe("weights spec (WEIGHTS.md)", () => {
  it("fnv1a seeds and mulberry32 draws match the test vectors", () => {
    const vectors: [string, number, number[]][] = [
      ["model.embed_tokens.weight", 0x403ade76, [703270156, 1481435073, 3534684375]],
      ["model.norm.weight", 0xbe0496c4, [3909095946, 851381002, 1636928649]],
      ["visual.patch_embed.proj.weight", 0xe5f9a072, [1661761148, 3153648990, 1399177086]],
      ["visual.blocks.0.attn.qkv.bias", 0xd6a421a5, [2884764937, 4200666805, 2452077984]],
    ];
    for (const [name, seed, draws] of vectors) {
      expect(fnv1a32(name), name).toBe(seed);
      const r = new Mulberry32(seed);
      expect([r.nextU32(), r.nextU32(), r.nextU32()], name).toEqual(draws);
    }
    expect(new Mulberry32(0xbe0496c4).next()).toBe(0.9101573252119124);
  });

  it("value rules and chunking: chunks concatenate to the whole tensor", () => {
    expect(specRule("visual.blocks.0.norm1.bias", [32])).toBe("bias");
    expect(specRule("model.norm.weight", [64])).toBe("vector");
    expect(specRule("model.layers.0.mlp.up_proj.weight", [128, 64])).toBe("matrix");
    expect(Array.from(specTensor("model.norm.weight", [64]).subarray(0, 4))).toEqual([
      1.082031488418579, 0.939645528793335, 0.9762254357337952, 1.0221495628356934,
    ]);
    const whole = specTensor("visual.patch_embed.proj.weight", [32, 3, 2, 14, 14]);
    const parts = [...specTensorChunks("visual.patch_embed.proj.weight", [32, 3, 2, 14, 14], 1000)];
    expect(parts).toHaveLength(Math.ceil(whole.length / 1000));
    const joined = new Float32Array(whole.length);
    let off = 0;
    for (const p of parts) {
      joined.set(p, off);
      off += p.length;
    }
    expect(joined).toEqual(whole);
    expect(Array.from(whole.subarray(0, 4))).toEqual([-0.006595605984330177, 0.013662678189575672, -0.010161223821341991, -0.02145550213754177]);
  });
});

describe("makeTestModel, config A", () => {
  it("f32: every tensor matches the manifest and model.safetensors is byte-identical to the golden file", async () => {
    const out = join(tmp, "a-f32");
    const res = await makeTestModel({ configPath: CONFIG_A, outDir: out });
    expect(res).toMatchObject({ outDir: out, weightFiles: ["model.safetensors"], tensors: 57, totalSize: 39_544_320 });
    expect(readdirSync(out).sort()).toEqual([
      "chat_template.json",
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "preprocessor_config.json",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
    expect(readdirSync(tmp).filter((f) => f.includes(".tmp-"))).toEqual([]);
    expect(sha256(readFileSync(join(out, "model.safetensors")))).toBe(sha256(readFileSync(join(TINY_A, "model.safetensors"))));
    for (const f of ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json", "chat_template.json"]) {
      expect(readFileSync(join(out, f), "utf8"), f).toBe(readFileSync(join(TINY_A, f), "utf8"));
    }
    // tokenizer.json: same content as the golden one; JSON.stringify puts integer-like vocab keys ("0".."9") first,
    // so compare after the same parse → stringify normalization on both sides.
    const norm = (p: string): string => JSON.stringify(JSON.parse(readFileSync(p, "utf8")));
    expect(norm(join(out, "tokenizer.json")) === norm(join(TINY_A, "tokenizer.json"))).toBe(true);

    const w = await CheckpointWeights.open(out);
    try {
      expect(w.names()).toEqual(manifest.map((m) => m.name).sort());
      for (const m of manifest) {
        expect(sha256(await w.readRaw(m.name)), m.name).toBe(m.sha256_stored_bytes);
        const f = await w.readF32(m.name);
        expect(Array.from(f.subarray(0, 4)), m.name).toEqual(m.first4);
        let s = 0;
        for (const x of f) s += x;
        expect(Math.abs(s - m.sum_f64), m.name).toBeLessThan(1e-9 * Math.max(1, Math.abs(m.sum_f64)));
      }
    } finally {
      await w.close();
    }

    const loaded = await loadQwen2VLCheckpoint(out);
    try {
      expect(loaded.dir).toBe(out);
      expect(loaded.config.text.hidden_size).toBe(64);
      expect(loaded.unused).toEqual([]);
    } finally {
      await loaded.weights.close();
    }
  });

  it("bf16: every weight is the RNE bf16 of the spec value and reads back as bits << 16", async () => {
    const out = join(tmp, "a-bf16");
    const res = await makeTestModel({ configPath: CONFIG_A, outDir: out, dtype: "bf16" });
    expect(res.totalSize).toBe(39_544_320 / 2);
    const w = await CheckpointWeights.open(out);
    try {
      for (const { name, shape } of manifest) {
        const info = w.info(name);
        expect(info.dtype).toBe("BF16");
        expect(info.shape).toEqual(shape);
        const raw = await w.readRaw(name);
        const got16 = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
        const spec32 = new Uint32Array(specTensor(name, shape).buffer);
        const back = new Uint32Array((await w.readF32(name)).buffer);
        let bad = 0;
        for (let i = 0; i < spec32.length; i++) {
          const b = spec32[i] as number;
          const want = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff; // WEIGHTS.md formula
          if (got16[i] !== want || back[i] !== ((want << 16) >>> 0)) bad++;
        }
        expect(bad, name).toBe(0);
      }
      // WEIGHTS.md test vector
      const norm = await w.readRaw("model.norm.weight");
      expect(Array.from(new Uint16Array(norm.buffer, norm.byteOffset, 4))).toEqual([0x3f8b, 0x3f71, 0x3f7a, 0x3f83]);
    } finally {
      await w.close();
    }
  });

  it("sharded output (0.4 MB shards) reads back identically, with an HF-style index", async () => {
    const out = join(tmp, "a-sharded");
    const limit = 400_000;
    const res = await makeTestModel({ configPath: CONFIG_A, outDir: out, shardSizeBytes: limit });
    const n = res.weightFiles.length;
    expect(n).toBeGreaterThanOrEqual(3);
    expect(res.weightFiles).toEqual(Array.from({ length: n }, (_, i) => `model-${String(i + 1).padStart(5, "0")}-of-${String(n).padStart(5, "0")}.safetensors`));
    expect(existsSync(join(out, "model.safetensors"))).toBe(false);
    const index = JSON.parse(readFileSync(join(out, "model.safetensors.index.json"), "utf8"));
    expect(index.metadata).toEqual({ total_size: 39_544_320 });
    expect(Object.keys(index.weight_map)).toEqual(manifest.map((m) => m.name).sort());
    // embed_tokens (38.9 MB) is over the limit: a shard of its own, emitted while the vision tensors still fill the current one.
    expect(index.weight_map["model.embed_tokens.weight"]).toBe(res.weightFiles[0]);
    expect(index.weight_map["visual.patch_embed.proj.weight"]).toBe(res.weightFiles[1]);
    expect(index.weight_map["model.norm.weight"]).toBe(res.weightFiles[n - 1]);
    for (const f of res.weightFiles) {
      const inFile = Object.entries(index.weight_map).filter(([, v]) => v === f).map(([k]) => k);
      const bytes = inFile.reduce((a, k) => a + (manifest.find((m) => m.name === k) as ManifestEntry).shape.reduce((x, y) => x * y, 4), 0);
      if (inFile.length > 1) expect(bytes, f).toBeLessThanOrEqual(limit);
    }
    const w = await CheckpointWeights.open(out);
    try {
      expect(w.files).toHaveLength(n);
      for (const m of manifest) expect(sha256(await w.readRaw(m.name)), m.name).toBe(m.sha256_stored_bytes);
    } finally {
      await w.close();
    }
  });
});

describe("planShards", () => {
  it("follows huggingface_hub: fill in order, a tensor over the limit gets its own shard at once", () => {
    // huggingface_hub's own test vector (tests/test_serialization.py, test_multiple_shards): sizes 6, 10, 30, 2, 2; max 10.
    const t = (name: string, bytes: number) => ({ name, dtype: "F16" as const, shape: [bytes / 2] });
    const plan = planShards([t("layer_1", 6), t("layer_2", 10), t("layer_3", 30), t("layer_4", 2), t("layer_5", 2)], 10);
    expect(plan.map((s) => [s.file, s.tensors.map((x) => x.name), s.bytes])).toEqual([
      ["model-00001-of-00004.safetensors", ["layer_1"], 6],
      ["model-00002-of-00004.safetensors", ["layer_3"], 30],
      ["model-00003-of-00004.safetensors", ["layer_2"], 10],
      ["model-00004-of-00004.safetensors", ["layer_4", "layer_5"], 4],
    ]);
    expect(planShards([t("a", 10)], 5e9).map((s) => s.file)).toEqual(["model.safetensors"]);
  });
});

describe("makeTestModel: companions, atomicity, errors", () => {
  it("copies json files from the config's own folder when present, else from gpu-backend/demo-model", async () => {
    writeFileSync(join(tmp, "small-src", "generation_config.json"), '{"custom": true}\n');
    const out = join(tmp, "small-companions");
    await makeTestModel({ configPath: smallConfig, outDir: out });
    expect(readFileSync(join(out, "generation_config.json"), "utf8")).toBe('{"custom": true}\n');
    expect(readFileSync(join(out, "preprocessor_config.json"), "utf8")).toBe(readFileSync(join(DEMO_MODEL_DIR, "preprocessor_config.json"), "utf8"));
    expect(readFileSync(join(out, "config.json"), "utf8")).toBe(readFileSync(smallConfig, "utf8"));
    rmSync(join(tmp, "small-src", "generation_config.json"));
  });

  it("a failure part-way leaves neither the output folder nor a temp folder", async () => {
    const out = join(tmp, "crash", "model");
    let calls = 0;
    await expect(
      makeTestModel({
        configPath: smallConfig,
        outDir: out,
        onProgress: () => {
          if (++calls === 10) throw new Error("simulated crash");
        },
      }),
    ).rejects.toThrow("simulated crash");
    expect(calls).toBe(10);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(join(tmp, "crash"))).toEqual([]);
  });

  it("refuses a non-empty output folder unless overwrite; overwrite replaces it", async () => {
    const out = join(tmp, "exists");
    mkdirSync(out);
    writeFileSync(join(out, "keep.txt"), "x");
    const r = await rejectionOf(makeTestModel({ configPath: smallConfig, outDir: out }), CheckpointError);
    expect(r.code).toBe("output_exists");
    expect(readdirSync(out)).toEqual(["keep.txt"]);
    await makeTestModel({ configPath: smallConfig, outDir: out, overwrite: true });
    expect(existsSync(join(out, "keep.txt"))).toBe(false);
    expect(existsSync(join(out, "model.safetensors"))).toBe(true);
    expect(readdirSync(tmp).filter((f) => f.startsWith("exists."))).toEqual([]);
  });

  it("a bad config fails before anything is written", async () => {
    const bad = join(tmp, "bad-config.json");
    writeFileSync(bad, JSON.stringify({ ...JSON.parse(readFileSync(CONFIG_A, "utf8")), vision_config: undefined }));
    const out = join(tmp, "bad-out");
    const r = await rejectionOf(makeTestModel({ configPath: bad, outDir: out }), CheckpointError);
    expect(r.code).toBe("bad_config");
    expect(r.message).toContain(bad);
    expect(existsSync(out)).toBe(false);
    expect((await rejectionOf(makeTestModel({ configPath: join(tmp, "none.json"), outDir: out }), CheckpointError)).code).toBe("not_found");
  });

  it("the CLI prints one summary line when not on a TTY, and typed errors with exit code 1", async () => {
    const run = promisify(execFile);
    const tsx = join(PROJECT_ROOT, "node_modules", ".bin", "tsx");
    const script = join(PROJECT_ROOT, "scripts", "make-test-model.ts");
    const out = join(tmp, "cli-out");
    const { stdout, stderr } = await run(tsx, [script, "--config", smallConfig, "--out", out, "--dtype", "bf16", "--shard-size-mb", "0.1"]);
    expect(stderr).toBe("");
    expect(stdout.trim().split("\n")).toHaveLength(1);
    expect(stdout).toMatch(/^wrote .*cli-out: 57 tensors, .* bf16 in \d+ file\(s\)/);
    const w = await CheckpointWeights.open(out);
    expect(w.info("model.norm.weight").dtype).toBe("BF16");
    expect(w.files.length).toBeGreaterThan(1);
    await w.close();
    const again = await run(tsx, [script, "--config", smallConfig, "--out", out]).catch((e: { code: number; stderr: string }) => e);
    expect(again).toMatchObject({ code: 1, stderr: expect.stringContaining("error [output_exists]") });
  });
});

describe("resolveModelDir / loadQwen2VLCheckpoint", () => {
  const ID = "JZPeterPan/MedVLM-R1";
  const SHA = "0123456789abcdef0123456789abcdef01234567";

  it("a local folder resolves to itself; without config.json → not_found; a non-id path → not_found", async () => {
    expect(await resolveModelDir(TINY_A)).toBe(TINY_A);
    const empty = mkdtempSync(join(tmp, "empty-"));
    expect((await rejectionOf(resolveModelDir(empty), CheckpointError)).code).toBe("not_found");
    expect((await rejectionOf(resolveModelDir(join(tmp, "no", "such", "dir")), CheckpointError)).code).toBe("not_found");
  });

  it("a Hub id with no network → no_network telling how to pass a local folder", async () => {
    const calls: string[] = [];
    const failing = (async (url: string | URL | Request) => {
      calls.push(String(url));
      throw new TypeError("fetch failed");
    }) as typeof fetch;
    const r = await rejectionOf(resolveModelDir(ID, { cacheDir: join(tmp, "hub-empty"), fetch: failing }), CheckpointError);
    expect(r.code).toBe("no_network");
    expect(r.message).toContain(`huggingface-cli download ${ID} --local-dir <dir>`);
    expect(r.message).toContain("--model <dir>");
    expect(calls.length).toBeGreaterThan(0);
    expect(calls[0]).toContain(`/api/models/${ID}/`);
  });

  it("sends the token of $HF_TOKEN, else $HUGGING_FACE_HUB_TOKEN, else the file huggingface-cli login writes", async () => {
    const saved = { HF_TOKEN: process.env["HF_TOKEN"], HUGGING_FACE_HUB_TOKEN: process.env["HUGGING_FACE_HUB_TOKEN"], HF_TOKEN_PATH: process.env["HF_TOKEN_PATH"] };
    const sent: (string | null)[] = [];
    const recording = (async (_url: string | URL | Request, init?: RequestInit) => {
      sent.push(new Headers(init?.headers).get("authorization"));
      throw new TypeError("fetch failed");
    }) as typeof fetch;
    const tokenFile = join(tmp, "hf-token");
    writeFileSync(tokenFile, "hf_from_file\n");
    try {
      delete process.env["HF_TOKEN"];
      delete process.env["HUGGING_FACE_HUB_TOKEN"];
      process.env["HF_TOKEN_PATH"] = tokenFile;
      for (const [env, want] of [[{}, "hf_from_file"], [{ HUGGING_FACE_HUB_TOKEN: "hf_legacy" }, "hf_legacy"], [{ HF_TOKEN: "hf_env" }, "hf_env"]] as const) {
        Object.assign(process.env, env);
        sent.length = 0;
        await resolveModelDir(ID, { cacheDir: join(tmp, "hub-token"), fetch: recording }).catch(() => {});
        expect(sent[0]).toBe(`Bearer ${want}`);
      }
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  it("with no network, a whole snapshot already in the cache is used (for a branch or a PR ref), a partial one is not", async () => {
    const cache = join(tmp, "hub-cached");
    const repo = join(cache, "models--JZPeterPan--MedVLM-R1");
    const snap = join(repo, "snapshots", SHA);
    mkdirSync(snap, { recursive: true });
    mkdirSync(join(repo, "refs", "refs", "pr"), { recursive: true }); // as huggingface_hub stores refs/pr/3
    writeFileSync(join(repo, "refs", "main"), SHA);
    writeFileSync(join(repo, "refs", "refs", "pr", "3"), SHA);
    const failing = (async () => {
      throw new TypeError("fetch failed");
    }) as typeof fetch;
    // Only config.json and one of two shards: what an interrupted download leaves.
    writeFileSync(join(snap, "config.json"), "{}");
    writeFileSync(join(snap, "model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors" } }));
    writeFileSync(join(snap, "model-00001-of-00002.safetensors"), "");
    expect(await missingCheckpointFiles(snap)).toEqual(["tokenizer.json", "preprocessor_config.json", "model-00002-of-00002.safetensors"]);
    expect((await rejectionOf(resolveModelDir(ID, { cacheDir: cache, fetch: failing }), CheckpointError)).code).toBe("no_network");
    for (const f of ["tokenizer.json", "preprocessor_config.json", "model-00002-of-00002.safetensors"]) writeFileSync(join(snap, f), "");
    expect(await resolveModelDir(ID, { cacheDir: cache, fetch: failing })).toBe(snap);
    expect(await resolveModelDir(ID, { cacheDir: cache, fetch: failing, revision: "refs/pr/3" })).toBe(snap);
    expect((await rejectionOf(resolveModelDir(ID, { cacheDir: cache, fetch: failing, revision: "../../x" }), CheckpointError)).code).toBe("not_found");
  });

  it("downloads only configs, weights and tokenizer files from a (mock) Hub, then loads", async () => {
    const small = join(tmp, "hub-src");
    await makeTestModel({ configPath: smallConfig, outDir: small });
    const files: Record<string, Buffer> = {};
    for (const f of readdirSync(small)) files[f] = readFileSync(join(small, f));
    files["README.md"] = Buffer.from("# card");
    files["demo.ipynb"] = Buffer.from("{}");
    const requested: string[] = [];
    const hub = (async (input: string | URL | Request, init?: RequestInit) => {
      const url = new URL(String(input));
      const path = decodeURIComponent(url.pathname);
      requested.push(`${init?.method ?? "GET"} ${path}`);
      if (path === `/api/models/${ID}/revision/main` || path === `/api/models/${ID}/revision/refs/pr/3`) return Response.json({ _id: "x", id: ID, sha: SHA, private: false });
      if (path === `/api/models/${ID}/tree/${SHA}`) {
        return Response.json([
          ...Object.entries(files).map(([p, b]) => ({ type: "file", path: p, size: b.length, oid: sha256(b).slice(0, 40) })),
          { type: "directory", path: "images", size: 0, oid: "d".repeat(40) },
        ]);
      }
      if (path === `/api/models/${ID}/paths-info/${SHA}`) {
        const { paths } = JSON.parse(String(init?.body)) as { paths: string[] };
        return Response.json(paths.map((p) => ({ type: "file", path: p, size: files[p]?.length, oid: sha256(files[p] as Buffer).slice(0, 40) })));
      }
      const prefix = `/${ID}/resolve/${SHA}/`;
      if (path.startsWith(prefix)) {
        const body = files[path.slice(prefix.length)];
        if (!body) return new Response("missing", { status: 404 });
        const range = new Headers(init?.headers).get("Range");
        const m = range && /bytes=(\d+)-(\d*)/.exec(range);
        const a = m ? Number(m[1]) : 0;
        const b = m && m[2] ? Number(m[2]) : body.length - 1;
        return new Response(body.subarray(a, b + 1), {
          status: m ? 206 : 200,
          headers: { "Content-Range": `bytes ${a}-${b}/${body.length}`, ETag: `"${sha256(body)}"`, "Content-Length": String(b - a + 1) },
        });
      }
      return new Response("not found", { status: 404 });
    }) as typeof fetch;

    const cache = join(tmp, "hub-cache");
    const dir = await resolveModelDir(ID, { cacheDir: cache, fetch: hub });
    expect(dir).toBe(join(cache, "models--JZPeterPan--MedVLM-R1", "snapshots", SHA));
    expect(readdirSync(dir).sort()).toEqual(readdirSync(small).sort()); // no README.md / demo.ipynb / images
    expect(requested.some((r) => r.includes("README.md") || r.includes("demo.ipynb"))).toBe(false);
    expect(readFileSync(join(dir, "model.safetensors")).equals(files["model.safetensors"] as Buffer)).toBe(true);
    // A PR ref (a name with slashes) is recorded like a branch.
    expect(await resolveModelDir(ID, { cacheDir: cache, fetch: hub, revision: "refs/pr/3" })).toBe(dir);
    expect(readFileSync(join(cache, "models--JZPeterPan--MedVLM-R1", "refs", "refs", "pr", "3"), "utf8")).toBe(SHA);

    const loaded = await loadQwen2VLCheckpoint(ID, { cacheDir: cache, fetch: hub });
    try {
      expect(loaded.dir).toBe(dir);
      expect(loaded.config.text.vocab_size).toBe(512);
      expect(Array.from(await loaded.weights.readF32("model.norm.weight"))).toEqual(Array.from(specTensor("model.norm.weight", [64])));
    } finally {
      await loaded.weights.close();
    }

    // A local failure (the cache path is a file) is not mistaken for a missing network.
    const fileAsCache = join(tmp, "cache-is-a-file");
    writeFileSync(fileAsCache, "x");
    const local = await resolveModelDir(ID, { cacheDir: fileAsCache, fetch: hub }).catch((e: unknown) => e);
    expect(local).toBeInstanceOf(Error);
    expect((local as { code?: string }).code).not.toBe("no_network");

    const notThere = (async () => new Response(JSON.stringify({ error: "Repository not found" }), { status: 404 })) as typeof fetch;
    expect((await rejectionOf(resolveModelDir("nobody/nothing", { cacheDir: cache, fetch: notThere }), CheckpointError)).code).toBe("not_found");
  });

  it("loadQwen2VLCheckpoint: missing tensor and wrong shape are typed errors", async () => {
    const src = join(tmp, "hub-src");
    const broken = join(tmp, "broken");
    mkdirSync(broken);
    writeFileSync(join(broken, "config.json"), readFileSync(join(src, "config.json")));
    const w = await CheckpointWeights.open(src);
    const tensors: { name: string; dtype: DType; shape: number[]; data: Float32Array }[] = [];
    for (const name of w.names()) {
      if (name === "model.layers.1.mlp.up_proj.weight") continue;
      const info = w.info(name);
      const data = await w.readF32(name);
      tensors.push({ name, dtype: "F32", shape: info.shape, data });
    }
    await w.close();
    await writeSafetensors(join(broken, "model.safetensors"), tensors);
    const r = await rejectionOf(loadQwen2VLCheckpoint(broken), CheckpointError);
    expect(r.code).toBe("missing_tensor");
    expect(r.message).toContain("model.layers.1.mlp.up_proj.weight");

    const norm = tensors.find((t) => t.name === "model.norm.weight");
    if (norm) norm.shape = [8, 8];
    tensors.push({ name: "model.layers.1.mlp.up_proj.weight", dtype: "F32", shape: [128, 64], data: new Float32Array(128 * 64) });
    await writeSafetensors(join(broken, "model.safetensors"), tensors);
    const r2 = await rejectionOf(loadQwen2VLCheckpoint(broken), CheckpointError);
    expect(r2.code).toBe("shape_mismatch");
    expect(r2.message).toContain("model.norm.weight");
  });
});

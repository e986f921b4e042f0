/**
 * scripts/convert.ts and convertModel's failure behaviour: typed errors naming the problem, nothing
 * half-written (no output folder, no temporary folder), existing output untouched.
 */
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { CheckpointError } from "../../gpu-backend/src/checkpoint/index.ts";
import { ConvertError, convertModel } from "../../gpu-backend/src/convert/index.ts";
import { runConvertCli } from "../../scripts/convert.ts";
import type { CliIO } from "../../scripts/lib/cli.ts";
import { GOLDEN_DIR, PROJECT_ROOT } from "../support/golden.ts";

const TINY = join(GOLDEN_DIR, "tiny-a");
const tmp = mkdtempSync(join(tmpdir(), "convert-cli-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function io(isTTY: boolean): CliIO & { out: string; err: string } {
  const r = { out: "", err: "", isTTY, columns: 200, stdout: (s: string) => void (r.out += s), stderr: (s: string) => void (r.err += s) };
  return r;
}

/** A copy of tiny-a at `dir` made of symlinks, without the files in `except`. */
function linkedCopy(dir: string, except: readonly string[] = []): string {
  mkdirSync(dir);
  for (const f of readdirSync(TINY)) if (!except.includes(f)) symlinkSync(join(TINY, f), join(dir, f));
  return dir;
}

/** A copy of tiny-a whose config.json is edited (weights symlinked, not copied). */
function variant(name: string, edit: (cfg: Record<string, unknown>) => void): string {
  const dir = linkedCopy(join(tmp, name), ["config.json"]);
  const cfg = JSON.parse(readFileSync(join(TINY, "config.json"), "utf8"));
  edit(cfg);
  writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
  return dir;
}

/** Nothing named like the output (or its temporary/backup folders) exists. */
function nothingWritten(out: string): void {
  const base = out.split("/").pop()!;
  expect(readdirSync(tmp).filter((f) => f.startsWith(base))).toEqual([]);
}

describe("convert CLI", () => {
  it("converts (non-TTY: one summary line, no progress) with quantization options", async () => {
    const out = join(tmp, "int8");
    const o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", out, "--dtype", "int8", "--block-size", "64", "--accuracy-level", "0", "--no-append-decoder"], o)).toBe(0);
    expect(o.err).toBe("");
    expect(o.out.split("\n").filter(Boolean)).toHaveLength(1);
    expect(o.out).toMatch(/^converted .* \(int8, 8-bit block 64\) in [\d.]+ s: vision_encoder\.onnx .*decoder_model_merged\.onnx/);
    const m = JSON.parse(readFileSync(join(out, "manifest.json"), "utf8"));
    expect(m.quantization).toMatchObject({ method: "MatMulNBits", bits: 8, blockSize: 64, accuracyLevel: 0, symmetric: false });
    expect(m.converter.opset).toEqual({ "": 17, "com.microsoft": 1 });
    // --no-append-decoder: the onnx-community layout only.
    expect(m.converter.options.append_decoder).toBe(false);
    expect(m.graphs.decoder_model_append).toBeUndefined();
    expect(existsSync(join(out, "decoder_model_append.onnx"))).toBe(false);
    expect(existsSync(join(out, "decoder_model_merged.onnx"))).toBe(true);
  });

  it("draws a progress bar on a TTY", async () => {
    const o = io(true);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "tty"), "--dtype", "int4", "--lm-head", "float"], o)).toBe(0);
    expect(o.err).toContain("\r[");
    expect(o.err).toContain("100.0%");
    const m = JSON.parse(readFileSync(join(tmp, "tty", "manifest.json"), "utf8"));
    expect(m.quantization.applies_to).toMatch(/lm_head float32/);
    expect(m.converter.options.lm_head).toBe("float");
  });

  it("--vision-int8 / --no-vision-int8 override the dtype's default (W8A8 vision for int4, and int8 with --w8a8)", async () => {
    const visionOps = (dir: string) => readFileSync(join(dir, "vision_encoder.onnx")).includes("MatMulInteger");
    let o = io(false);
    const fp32 = join(tmp, "fp32-v8");
    expect(await runConvertCli(["--model", TINY, "--out", fp32, "--vision-int8"], o)).toBe(0);
    expect(o.out).toMatch(/\(fp32, vision W8A8\) in/);
    expect(JSON.parse(readFileSync(join(fp32, "manifest.json"), "utf8")).vision_quantization).toMatchObject({ method: "MatMulInteger" });
    expect(visionOps(fp32)).toBe(true);
    o = io(false);
    const int4 = join(tmp, "int4-vf");
    expect(await runConvertCli(["--model", TINY, "--out", int4, "--dtype", "int4", "--no-vision-int8"], o)).toBe(0);
    expect(o.out).toMatch(/\(int4, 4-bit block 32, LM head W8A8\) in/);
    expect(JSON.parse(readFileSync(join(int4, "manifest.json"), "utf8")).vision_quantization).toBeUndefined();
    expect(visionOps(int4)).toBe(false);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "v"), "--vision-int8", "--no-vision-int8"], o)).toBe(2);
    expect(o.err).toMatch(/--vision-int8 and --no-vision-int8 exclude each other/);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "v"), "--dtype", "fp16", "--vision-int8"], o)).toBe(2);
    expect(o.err).toMatch(/--vision-int8 needs a float32 vision encoder/);
    nothingWritten(join(tmp, "v"));
    o = io(false);
    expect(await runConvertCli(["--help"], o)).toBe(0);
    expect(o.out).toContain("--vision-int8, --no-vision-int8");
  });

  it("--vision-attention-chunk sets the vision encoder's attention chunk, recorded in the manifest; a bad value is a usage error", async () => {
    let o = io(false);
    const dir = join(tmp, "fp32-chunk");
    expect(await runConvertCli(["--model", TINY, "--out", dir, "--vision-attention-chunk", "4096", "--no-append-decoder"], o)).toBe(0);
    expect(JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")).converter.options.vision_attention_chunk_elements).toBe(4096);
    for (const bad of ["0", "1.5", "x"]) {
      o = io(false);
      expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "c"), "--vision-attention-chunk", bad], o)).toBe(2);
      expect(o.err).toMatch(/--vision-attention-chunk must be an integer ≥ 1/);
    }
    nothingWritten(join(tmp, "c"));
    o = io(false);
    expect(await runConvertCli(["--help"], o)).toBe(0);
    expect(o.out).toContain("--vision-attention-chunk N");
  });

  it("--w8a8 (int8 only): W8A8 decoder layers, W8A8 vision by default, said in the summary and the manifest", async () => {
    const w8 = join(tmp, "int8-w8a8");
    let o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", w8, "--dtype", "int8", "--w8a8"], o)).toBe(0);
    expect(o.err).toBe("");
    expect(o.out).toMatch(/\(int8, W8A8 decoder layers, LM head W8A8, vision W8A8\) in/);
    const m = JSON.parse(readFileSync(join(w8, "manifest.json"), "utf8"));
    expect(m.quantization).toMatchObject({ method: "MatMulInteger", w8a8: true, parts: { decoder_layers: expect.stringMatching(/^MatMulInteger W8A8/), lm_head: expect.stringMatching(/^MatMulInteger W8A8/) } });
    o = io(false);
    const nb = join(tmp, "int8-w8a8-nbits");
    expect(await runConvertCli(["--model", TINY, "--out", nb, "--dtype", "int8", "--w8a8", "--lm-head", "nbits"], o)).toBe(0);
    expect(o.out).toMatch(/\(int8, W8A8 decoder layers, LM head 8-bit block 32, vision W8A8\) in/);
    expect(JSON.parse(readFileSync(join(nb, "manifest.json"), "utf8")).quantization.parts.lm_head).toMatch(/^MatMulNBits int8/);
    expect(m.vision_quantization).toMatchObject({ method: "MatMulInteger" });
    expect(m.converter.options).toMatchObject({ dtype: "int8", w8a8: true, vision_int8: true });
    o = io(false);
    const fv = join(tmp, "int8-w8a8-fv");
    expect(await runConvertCli(["--model", TINY, "--out", fv, "--dtype", "int8", "--w8a8", "--no-vision-int8", "--lm-head", "float"], o)).toBe(0);
    expect(o.out).toMatch(/\(int8, W8A8 decoder layers, LM head float32\) in/);
    const mf = JSON.parse(readFileSync(join(fv, "manifest.json"), "utf8"));
    expect(mf.vision_quantization).toBeUndefined();
    expect(mf.quantization.parts.lm_head).toBe("float32");
    for (const dtype of [[], ["--dtype", "fp32"], ["--dtype", "fp16"], ["--dtype", "int4"]]) {
      o = io(false);
      expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "w"), ...dtype, "--w8a8"], o)).toBe(2);
      expect(o.err).toMatch(/--w8a8 \(W8A8 decoder layers\) needs --dtype int8, got (fp32|fp16|int4)\n/);
      expect(o.err).toContain("usage: npx tsx scripts/convert.ts");
    }
    nothingWritten(join(tmp, "w"));
    o = io(false);
    expect(await runConvertCli(["--help"], o)).toBe(0);
    expect(o.out).toMatch(/--w8a8 +--dtype int8 only/);
  });

  it("usage errors exit 2 naming the flag", async () => {
    let o = io(false);
    expect(await runConvertCli(["--model", TINY], o)).toBe(2);
    expect(o.err).toMatch(/--model and --out are required/);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "x"), "--dtype", "bf16"], o)).toBe(2);
    expect(o.err).toMatch(/--dtype must be one of fp32, fp16, int8, int4, got bf16/);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "x"), "--external-data", "sometimes"], o)).toBe(2);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "x"), "--dtype", "int4", "--lm-head", "int2"], o)).toBe(2);
    expect(o.err).toMatch(/--lm-head must be one of nbits, w8a8, float, got int2/);
    o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "x"), "--lm-head", "w8a8"], o)).toBe(2);
    expect(o.err).toMatch(/--lm-head w8a8 needs --dtype int8 or int4, got fp32/);
    o = io(false);
    expect(await runConvertCli(["--bogus"], o)).toBe(2);
    nothingWritten(join(tmp, "x"));
  });

  it("a bad block size is a bad_options error before anything is written", async () => {
    const o = io(false);
    expect(await runConvertCli(["--model", TINY, "--out", join(tmp, "bs"), "--dtype", "int4", "--block-size", "24"], o)).toBe(1);
    expect(o.err).toMatch(/\[bad_options\].*block_size must be a power of two/);
    nothingWritten(join(tmp, "bs"));
  });

  it("runs as a script (tsx entry point)", async () => {
    const { stdout } = await promisify(execFile)(join(PROJECT_ROOT, "node_modules", ".bin", "tsx"), ["scripts/convert.ts", "--help"], { cwd: PROJECT_ROOT });
    expect(stdout).toMatch(/^usage: npx tsx scripts\/convert\.ts --model/);
  });
});

/** Converting `model` into `<tmp>/<outName>` fails with a `type` error of `code` whose message has `says`; nothing is written. */
async function failsClearly(model: string, outName: string, type: typeof CheckpointError | typeof ConvertError, code: string, says: string | RegExp): Promise<void> {
  const out = join(tmp, outName);
  const err = await convertModel({ model, outDir: out }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(type);
  expect((err as CheckpointError | ConvertError).code).toBe(code);
  expect((err as Error).message).toMatch(says);
  nothingWritten(out);
}

describe("convertModel failures leave nothing half-written", () => {
  it("missing tensor: names it", async () => {
    const src = variant("three-layers", (c) => (c["num_hidden_layers"] = 3));
    await failsClearly(src, "missing", CheckpointError, "missing_tensor", "model.layers.2.self_attn.q_proj.weight");
  });

  it("unsupported architecture: names it", async () => {
    const src = variant("llama", (c) => {
      c["architectures"] = ["LlamaForCausalLM"];
      c["model_type"] = "llama";
    });
    const o = io(false);
    expect(await runConvertCli(["--model", src, "--out", join(tmp, "llama-out")], o)).toBe(1);
    expect(o.err).toMatch(/\[unsupported_architecture\].*model_type "llama" is not supported/);
    nothingWritten(join(tmp, "llama-out"));
  });

  it("unsupported activation: names the setting", async () => {
    const src = variant("relu", (c) => ((c["vision_config"] as Record<string, unknown>)["hidden_act"] = "relu"));
    await failsClearly(src, "relu-out", ConvertError, "unsupported", /vision_config\.hidden_act "relu"/);
  });

  it("a failure in the middle of writing removes the temporary folder", async () => {
    const out = join(tmp, "interrupted");
    let calls = 0;
    const err = await convertModel({
      model: TINY,
      outDir: out,
      onProgress: (p) => {
        if (++calls === 20) {
          expect(existsSync(`${out}.tmp-${process.pid}`)).toBe(true);
          throw new Error(`disk full at ${p.graph}`);
        }
      },
    }).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/disk full/);
    nothingWritten(out);
  });

  it("an existing output folder is kept unless overwrite is given, and overwrite replaces only a previous conversion", async () => {
    const out = join(tmp, "existing");
    mkdirSync(out);
    writeFileSync(join(out, "keep.txt"), "mine");
    for (const overwrite of [false, true]) {
      const err = await convertModel({ model: TINY, outDir: out, overwrite }).catch((e: unknown) => e);
      expect((err as ConvertError).code, `overwrite ${overwrite}`).toBe("output_exists");
      expect(readdirSync(out)).toEqual(["keep.txt"]);
    }
    rmSync(join(out, "keep.txt"));
    await convertModel({ model: TINY, outDir: out, dtype: "fp32", appendDecoder: false }); // empty: fine
    await convertModel({ model: TINY, outDir: out, overwrite: true, dtype: "int4" });
    expect(JSON.parse(readFileSync(join(out, "manifest.json"), "utf8")).dtype).toBe("int4");
    expect(readdirSync(tmp).filter((f) => f.startsWith("existing."))).toEqual([]);
  });

  it("never deletes the checkpoint: the checkpoint folder itself, or a conversion folder holding it, is refused", async () => {
    // `--model X --out X --overwrite`: X is not a conversion, so overwrite does not touch it (X: links to tiny-a).
    const x = linkedCopy(join(tmp, "x"));
    const o = io(false);
    expect(await runConvertCli(["--model", x, "--out", x, "--overwrite"], o)).toBe(1);
    expect(o.err).toMatch(/convert failed \[output_exists\]: .*overwrite replaces only a previous conversion/);
    expect(readdirSync(x).sort()).toEqual(readdirSync(TINY).sort());
    // A previous conversion that the checkpoint was later put inside.
    const conv = join(tmp, "holder");
    await convertModel({ model: TINY, outDir: conv, appendDecoder: false });
    const inner = linkedCopy(join(conv, "ckpt"));
    const err = await convertModel({ model: inner, outDir: conv, overwrite: true }).catch((e: unknown) => e);
    expect((err as ConvertError).code).toBe("bad_options");
    expect(existsSync(join(inner, "config.json"))).toBe(true);
  });

  it("a checkpoint without its tokenizer or preprocessor config is not_found, naming them, before anything is written", async () => {
    const dir = linkedCopy(join(tmp, "no-tokenizer"), ["tokenizer.json", "preprocessor_config.json"]);
    await failsClearly(dir, "no-tokenizer-out", CheckpointError, "not_found", "tokenizer.json, preprocessor_config.json missing");
  });

  it("removes temporary folders an interrupted conversion left (its process gone), keeps a live one's", async () => {
    const out = join(tmp, "stale");
    const dead = `${out}.tmp-4194305`; // above Linux's largest pid: no such process
    const live = `${out}.tmp-${process.ppid}`;
    for (const d of [dead, live]) mkdirSync(d);
    await convertModel({ model: TINY, outDir: out, appendDecoder: false });
    expect(existsSync(dead)).toBe(false);
    expect(existsSync(live)).toBe(true);
    rmSync(live, { recursive: true });
  });

  it("hashes whole safetensors files on request", async () => {
    const out = join(tmp, "hashed");
    const res = await convertModel({ model: TINY, outDir: out, dtype: "int4", hashWholeFiles: true });
    const { createHash } = await import("node:crypto");
    expect(res.manifest.source.files[0]).toMatchObject({
      hashed: "file",
      sha256: createHash("sha256").update(readFileSync(join(TINY, "model.safetensors"))).digest("hex"),
    });
  });
});

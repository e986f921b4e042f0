import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  CheckpointError,
  CheckpointWeights,
  bf16ToF32,
  canonicalTensorName,
  f16ToF32,
  f32ToBf16,
  readSafetensorsHeader,
  writeSafetensors,
} from "../../gpu-backend/src/checkpoint/index.ts";
import { GOLDEN_DIR } from "../support/golden.ts";
import { rejectionOf } from "../support/errors.ts";

interface ManifestEntry {
  name: string;
  shape: number[];
  dtype: string;
  first4: number[];
  sum_f64: number;
  sha256_stored_bytes: string;
}
const manifest = JSON.parse(readFileSync(join(GOLDEN_DIR, "weights_manifest_a.json"), "utf8")) as ManifestEntry[];
const TINY_A = join(GOLDEN_DIR, "tiny-a");

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), "safetensors-test-"));
});
afterAll(() => {
  rmSync(tmp, { recursive: true, force: true });
});

let seq = 0;
/** Writes a safetensors file from a header object and raw data bytes (no validation: used to forge bad files). */
function forge(header: unknown, data: Uint8Array, opts: { headerLength?: bigint; cutTo?: number; rawHeader?: string } = {}): string {
  const text = opts.rawHeader ?? JSON.stringify(header);
  const body = Buffer.from(text, "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(opts.headerLength ?? BigInt(body.length));
  let file = Buffer.concat([len, body, data]);
  if (opts.cutTo !== undefined) file = file.subarray(0, opts.cutTo);
  const path = join(tmp, `forged-${seq++}.safetensors`);
  writeFileSync(path, file);
  return path;
}


const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

describe("reading the golden tiny-a checkpoint", () => {
  it("lists the 57 manifest tensors under canonical names, sorted, with absolute offsets", async () => {
    const w = await CheckpointWeights.open(TINY_A);
    try {
      expect(w.names()).toEqual(manifest.map((m) => m.name).sort());
      const header = await readSafetensorsHeader(join(TINY_A, "model.safetensors"));
      expect(header.metadata).toEqual({ format: "pt" });
      expect(header.dataStart % 8).toBe(0);
      const embed = w.info("model.embed_tokens.weight");
      expect(embed).toEqual({
        name: "model.embed_tokens.weight",
        dtype: "F32",
        shape: [151936, 64],
        file: join(TINY_A, "model.safetensors"),
        begin: header.dataStart, // first in name order
        end: header.dataStart + 151936 * 64 * 4,
      });
    } finally {
      await w.close();
    }
  });

  it("readRaw returns exactly each tensor's stored bytes (sha256, first4 and sum match the manifest)", async () => {
    const w = await CheckpointWeights.open(TINY_A);
    try {
      for (const m of manifest) {
        const raw = await w.readRaw(m.name);
        expect(sha256(raw), m.name).toBe(m.sha256_stored_bytes);
        const f = await w.readF32(m.name);
        expect(Array.from(f.subarray(0, 4))).toEqual(m.first4);
        let s = 0;
        for (const x of f) s += x;
        expect(s).toBeCloseTo(m.sum_f64, 6);
      }
    } finally {
      await w.close();
    }
  });

  it("also opens a single .safetensors file path directly", async () => {
    const w = await CheckpointWeights.open(join(TINY_A, "model.safetensors"));
    expect(w.names()).toHaveLength(57);
    await w.close();
  });
});

describe("element conversions", () => {
  /** Independent reference: the mathematical value of a binary16 pattern. */
  function halfValue(h: number): number {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    if (e === 0x1f) return m ? NaN : s * Infinity;
    if (e === 0) return s * m * 2 ** -24;
    return s * (1 + m / 1024) * 2 ** (e - 15);
  }

  it("F16 → F32 is exact for all 65536 patterns (subnormals, ±0, ±inf, NaN)", () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const out = f16ToF32(all);
    const wrong: string[] = [];
    for (let i = 0; i < 65536; i++) {
      const want = halfValue(i);
      const got = out[i] as number;
      if (Number.isNaN(want) ? !Number.isNaN(got) : !Object.is(got, want)) wrong.push(`0x${i.toString(16)}: ${got} vs ${want}`);
    }
    expect(wrong).toEqual([]);
  });

  it("F16 spot values", () => {
    const v = f16ToF32(new Uint16Array([0x0001, 0x03ff, 0x0400, 0x3c00, 0xc000, 0x7bff, 0x7c00, 0xfc00, 0x8000, 0x8001]));
    expect(Array.from(v)).toEqual([2 ** -24, 1023 * 2 ** -24, 2 ** -14, 1, -2, 65504, Infinity, -Infinity, -0, -(2 ** -24)]);
    expect(Object.is(v[8], -0)).toBe(true);
  });

  it("BF16 → F32 is bits << 16 for all 65536 patterns", () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const bits = new Uint32Array(bf16ToF32(all).buffer);
    for (let i = 0; i < 65536; i++) if (bits[i] !== i << 16 >>> 0) throw new Error(`0x${i.toString(16)} → 0x${bits[i]?.toString(16)}`);
    expect(bits[0x3f80]).toBe(0x3f800000);
  });

  it("F32 → BF16 rounds to nearest even", () => {
    const f = new Float32Array(new Uint32Array([0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, 0xbf80c000, 0x7f7fffff]).buffer);
    expect(Array.from(f32ToBf16(f))).toEqual([0x3f80, 0x3f82, 0x3f81, 0x3f80, 0xbf81, 0x7f80]);
    // WEIGHTS.md test vector: model.norm.weight first values as BF16.
    const norm = new Float32Array([1.082031488418579, 0.939645528793335, 0.9762254357337952, 1.0221495628356934]);
    expect(Array.from(f32ToBf16(norm))).toEqual([0x3f8b, 0x3f71, 0x3f7a, 0x3f83]);
  });
});

describe("writeSafetensors", () => {
  it("round-trips F32, F16 and BF16 tensors with metadata; header padded to 8 bytes", async () => {
    const path = join(tmp, "rt.safetensors");
    const a = new Float32Array([1.5, -2, 3.25, 0, 7, 8]);
    const h = new Uint16Array([0x3c00, 0x0001, 0xfc00]);
    const b = new Uint16Array([0x3f80, 0xc040]);
    await writeSafetensors(
      path,
      [
        { name: "z.half", dtype: "F16", shape: [3], data: h },
        { name: "a.mat", dtype: "F32", shape: [2, 3], data: a },
        { name: "m.bf", dtype: "BF16", shape: [1, 2], data: b },
        { name: "empty", dtype: "F32", shape: [0, 4], data: new Float32Array(0) },
      ],
      { format: "pt", note: "x" },
    );
    const bytes = readFileSync(path);
    const n = Number(bytes.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    const json = JSON.parse(bytes.subarray(8, 8 + n).toString("utf8"));
    expect(Object.keys(json)).toEqual(["__metadata__", "a.mat", "empty", "m.bf", "z.half"]); // F32 first, then name order
    expect(json["a.mat"]).toEqual({ dtype: "F32", shape: [2, 3], data_offsets: [0, 24] });
    expect(bytes.length).toBe(8 + n + 24 + 4 + 6);

    const w = await CheckpointWeights.open(path);
    try {
      expect(w.names()).toEqual(["a.mat", "empty", "m.bf", "z.half"]);
      expect(await w.readF32("a.mat")).toEqual(a);
      expect(Array.from(await w.readF32("z.half"))).toEqual([1, 2 ** -24, -Infinity]);
      expect(Array.from(await w.readF32("m.bf"))).toEqual([1, -3]);
      expect(new Uint8Array(await w.readRaw("m.bf"))).toEqual(new Uint8Array(b.buffer));
      expect(await w.readF32("empty")).toHaveLength(0);
      expect(w.metadata.get(path)).toEqual({ format: "pt", note: "x" });
    } finally {
      await w.close();
    }
  });

  it("rejects data whose length or type does not match dtype × shape", async () => {
    const r = await rejectionOf(writeSafetensors(join(tmp, "bad.safetensors"), [{ name: "t", dtype: "F32", shape: [3], data: new Float32Array(2) }]), CheckpointError);
    expect(r.code).toBe("dtype_mismatch");
    expect(r.message).toContain("tensor t");
    const r2 = await rejectionOf(writeSafetensors(join(tmp, "bad.safetensors"), [{ name: "u", dtype: "BF16", shape: [2], data: new Float32Array(2) }]), CheckpointError);
    expect(r2.code).toBe("dtype_mismatch");
  });
});

describe("corrupt files give typed errors naming file and tensor", () => {
  const good = { __metadata__: { format: "pt" }, a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "F32", shape: [1], data_offsets: [8, 12] } };
  const data12 = new Uint8Array(12);

  it("a forged file that is valid opens", async () => {
    const w = await CheckpointWeights.open(forge(good, data12));
    expect(w.names()).toEqual(["a", "b"]);
    await w.close();
  });

  it("truncated: data cut short, header cut short, shorter than 8 bytes", async () => {
    const p = forge(good, data12.subarray(0, 10));
    const r = await rejectionOf(CheckpointWeights.open(p), CheckpointError);
    expect(r.code).toBe("truncated");
    expect(r.message).toContain(p);
    expect(r.message).toContain("tensor b");
    expect((await rejectionOf(CheckpointWeights.open(forge(good, data12, { cutTo: 30 })), CheckpointError)).code).toBe("truncated");
    expect((await rejectionOf(CheckpointWeights.open(forge(good, data12, { cutTo: 5 })), CheckpointError)).code).toBe("truncated");
    // The real tiny-a file cut in the middle of its data.
    const cut = join(tmp, "cut.safetensors");
    writeFileSync(cut, readFileSync(join(TINY_A, "model.safetensors")).subarray(0, 1_000_000));
    expect((await rejectionOf(CheckpointWeights.open(cut), CheckpointError)).code).toBe("truncated");
  });

  it("header lying about offsets: past the data section, or end before begin", async () => {
    const lying = { a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "F32", shape: [1], data_offsets: [100, 104] } };
    const r = await rejectionOf(CheckpointWeights.open(forge(lying, data12)), CheckpointError);
    expect(r.code).toBe("bad_offsets");
    expect(r.message).toContain("tensor b");
    const backwards = { a: { dtype: "F32", shape: [0], data_offsets: [8, 4] } };
    expect((await rejectionOf(CheckpointWeights.open(forge(backwards, data12)), CheckpointError)).code).toBe("bad_offsets");
    const notInts = { a: { dtype: "F32", shape: [1], data_offsets: [0, "4"] } };
    expect((await rejectionOf(CheckpointWeights.open(forge(notInts, data12)), CheckpointError)).code).toBe("bad_offsets");
  });

  it("overlapping ranges", async () => {
    const overlap = { a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "F32", shape: [1], data_offsets: [4, 8] } };
    const r = await rejectionOf(CheckpointWeights.open(forge(overlap, data12)), CheckpointError);
    expect(r.code).toBe("bad_offsets");
    expect(r.message).toMatch(/tensors a .* and b .* overlap/);
  });

  it("length / dtype mismatch", async () => {
    const mism = { a: { dtype: "BF16", shape: [2], data_offsets: [0, 8] } };
    const r = await rejectionOf(CheckpointWeights.open(forge(mism, data12)), CheckpointError);
    expect(r.code).toBe("dtype_mismatch");
    expect(r.message).toContain("tensor a");
    expect(r.message).toContain("BF16");
  });

  it("unknown and unsupported dtypes name the dtype and the tensor", async () => {
    const r = await rejectionOf(CheckpointWeights.open(forge({ w: { dtype: "Q4_K", shape: [1], data_offsets: [0, 4] } }, data12)), CheckpointError);
    expect(r.code).toBe("unsupported_dtype");
    expect(r.message).toContain("Q4_K");
    expect(r.message).toContain("tensor w");
    const r2 = await rejectionOf(CheckpointWeights.open(forge({ ids: { dtype: "I64", shape: [1], data_offsets: [0, 8] } }, data12)), CheckpointError);
    expect(r2.code).toBe("unsupported_dtype");
    expect(r2.message).toContain("I64");
  });

  it("bad header: invalid JSON, not an object, absurd length, bad shape", async () => {
    expect((await rejectionOf(CheckpointWeights.open(forge(null, data12, { rawHeader: '{"a": ' })), CheckpointError)).code).toBe("bad_header");
    expect((await rejectionOf(CheckpointWeights.open(forge([1, 2], data12)), CheckpointError)).code).toBe("bad_header");
    expect((await rejectionOf(CheckpointWeights.open(forge(good, data12, { headerLength: 1n << 60n })), CheckpointError)).code).toBe("bad_header");
    expect((await rejectionOf(CheckpointWeights.open(forge({ a: { dtype: "F32", shape: [-1], data_offsets: [0, 4] } }, data12)), CheckpointError)).code).toBe(
      "bad_header",
    );
  });

  it("missing tensor and missing files", async () => {
    const w = await CheckpointWeights.open(TINY_A);
    try {
      expect(w.has("lm_head.weight")).toBe(false);
      const r = await rejectionOf(w.readF32("lm_head.weight"), CheckpointError);
      expect(r.code).toBe("missing_tensor");
      expect(r.message).toContain("lm_head.weight");
      expect(() => w.info("model.layers.9.mlp.up_proj.weight")).toThrowError(/model\.layers\.9\.mlp\.up_proj\.weight/);
    } finally {
      await w.close();
    }
    expect((await rejectionOf(CheckpointWeights.open(join(tmp, "nope")), CheckpointError)).code).toBe("not_found");
    expect((await rejectionOf(CheckpointWeights.open(tmp), CheckpointError)).code).toBe("not_found"); // folder without weights
  });
});

describe("naming schemes", () => {
  it("maps model.language_model.* and model.visual.* onto the canonical names", async () => {
    expect(canonicalTensorName("model.language_model.layers.3.mlp.up_proj.weight")).toBe("model.layers.3.mlp.up_proj.weight");
    expect(canonicalTensorName("model.language_model.embed_tokens.weight")).toBe("model.embed_tokens.weight");
    expect(canonicalTensorName("model.visual.blocks.0.attn.qkv.bias")).toBe("visual.blocks.0.attn.qkv.bias");
    expect(canonicalTensorName("lm_head.weight")).toBe("lm_head.weight");
    expect(canonicalTensorName("visual.merger.ln_q.weight")).toBe("visual.merger.ln_q.weight");
    const path = join(tmp, "newstyle.safetensors");
    await writeSafetensors(path, [
      { name: "model.language_model.norm.weight", dtype: "F32", shape: [2], data: new Float32Array([1, 2]) },
      { name: "model.visual.merger.ln_q.bias", dtype: "F32", shape: [1], data: new Float32Array([3]) },
      { name: "lm_head.weight", dtype: "F32", shape: [1, 1], data: new Float32Array([4]) },
    ]);
    const w = await CheckpointWeights.open(path);
    try {
      expect(w.names()).toEqual(["lm_head.weight", "model.norm.weight", "visual.merger.ln_q.bias"]);
      expect(Array.from(await w.readF32("model.norm.weight"))).toEqual([1, 2]);
      expect(Array.from(await w.readF32("visual.merger.ln_q.bias"))).toEqual([3]);
      expect(w.info("model.norm.weight").name).toBe("model.norm.weight");
      expect(w.storedName("model.norm.weight")).toBe("model.language_model.norm.weight");
      expect(w.has("model.language_model.norm.weight")).toBe(false);
    } finally {
      await w.close();
    }
  });

  it("a file holding both spellings of one tensor is rejected as ambiguous", async () => {
    const path = join(tmp, "both.safetensors");
    await writeSafetensors(path, [
      { name: "model.norm.weight", dtype: "F32", shape: [1], data: new Float32Array([1]) },
      { name: "model.language_model.norm.weight", dtype: "F32", shape: [1], data: new Float32Array([2]) },
    ]);
    const r = await rejectionOf(CheckpointWeights.open(path), CheckpointError);
    expect(r.code).toBe("bad_header");
    expect(r.message).toContain("model.norm.weight");
  });
});

describe("sharded checkpoints", () => {
  it("reads shards through model.safetensors.index.json; an index entry missing from its shard is missing_tensor", async () => {
    const dir = mkdtempSync(join(tmp, "shards-"));
    await writeSafetensors(join(dir, "model-00001-of-00002.safetensors"), [
      { name: "model.language_model.embed_tokens.weight", dtype: "BF16", shape: [2, 2], data: new Uint16Array([0x3f80, 0x4000, 0x4040, 0x4080]) },
    ]);
    await writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), [
      { name: "model.visual.patch_embed.proj.weight", dtype: "F16", shape: [2], data: new Uint16Array([0x3c00, 0x3800]) },
    ]);
    const index = {
      metadata: { total_size: 12 },
      weight_map: {
        "model.language_model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.visual.patch_embed.proj.weight": "model-00002-of-00002.safetensors",
      },
    };
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify(index));
    const w = await CheckpointWeights.open(dir);
    try {
      expect(w.names()).toEqual(["model.embed_tokens.weight", "visual.patch_embed.proj.weight"]);
      expect(Array.from(await w.readF32("model.embed_tokens.weight"))).toEqual([1, 2, 3, 4]);
      expect(Array.from(await w.readF32("visual.patch_embed.proj.weight"))).toEqual([1, 0.5]);
      expect(w.info("visual.patch_embed.proj.weight").file).toBe(join(dir, "model-00002-of-00002.safetensors"));
    } finally {
      await w.close();
    }
    writeFileSync(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify({ weight_map: { ...index.weight_map, "model.language_model.norm.weight": "model-00002-of-00002.safetensors" } }),
    );
    const r = await rejectionOf(CheckpointWeights.open(dir), CheckpointError);
    expect(r.code).toBe("missing_tensor");
    expect(r.message).toContain("model.language_model.norm.weight");
    expect(r.message).toContain("model-00002-of-00002.safetensors");
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: { x: "model-00009-of-00009.safetensors" } }));
    expect((await rejectionOf(CheckpointWeights.open(dir), CheckpointError)).code).toBe("not_found");
  });
});

describe("positional reads", () => {
  it("reads one small tensor from a 3 GB (sparse) file without reading the file", async () => {
    const big = 750_000_000; // F32 elements = 3e9 bytes, more than one Buffer can hold
    const header = { big: { dtype: "F32", shape: [big], data_offsets: [0, big * 4] }, small: { dtype: "F32", shape: [2], data_offsets: [big * 4, big * 4 + 8] } };
    const body = Buffer.from(JSON.stringify(header));
    const path = join(tmp, "sparse.safetensors");
    const fh = await open(path, "w");
    try {
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(body.length));
      await fh.write(Buffer.concat([len, body]), 0, 8 + body.length, 0);
      const tail = new Float32Array([6.5, -1]);
      await fh.write(new Uint8Array(tail.buffer), 0, 8, 8 + body.length + big * 4); // leaves a 3 GB hole
    } finally {
      await fh.close();
    }
    const w = await CheckpointWeights.open(path);
    try {
      const t0 = performance.now();
      expect(Array.from(await w.readF32("small"))).toEqual([6.5, -1]);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect(w.info("big").end - w.info("big").begin).toBe(3e9);
    } finally {
      await w.close();
      rmSync(path);
    }
  });
});

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import {
  CheckpointError,
  parseQwen2VLConfig,
  qwen2vlTensorShapes,
  readQwen2VLConfig,
  type CheckpointErrorCode,
  type Qwen2VLConfig,
} from "../../gpu-backend/src/checkpoint/index.ts";
import { GOLDEN_DIR } from "../support/golden.ts";

type Json = Record<string, unknown>;
const configA = JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "config.json"), "utf8")) as Json;
const clone = (x: Json): Json => JSON.parse(JSON.stringify(x)) as Json;

/** Qwen2-VL-2B-Instruct's released config.json (the MedVLM-R1 base model). */
const QWEN2VL_2B: Json = {
  architectures: ["Qwen2VLForConditionalGeneration"],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  vision_start_token_id: 151652,
  vision_end_token_id: 151653,
  vision_token_id: 151654,
  image_token_id: 151655,
  video_token_id: 151656,
  hidden_act: "silu",
  hidden_size: 1536,
  initializer_range: 0.02,
  intermediate_size: 8960,
  max_position_embeddings: 32768,
  max_window_layers: 28,
  model_type: "qwen2_vl",
  num_attention_heads: 12,
  num_hidden_layers: 28,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  transformers_version: "4.41.2",
  use_cache: true,
  use_sliding_window: false,
  vision_config: { depth: 32, embed_dim: 1280, mlp_ratio: 4, num_heads: 16, in_chans: 3, hidden_size: 1536, patch_size: 14, spatial_merge_size: 2, temporal_patch_size: 2 },
  rope_scaling: { type: "mrope", mrope_section: [16, 24, 24] },
  vocab_size: 151936,
};

function errorOf(json: unknown): { code: CheckpointErrorCode; message: string } {
  try {
    parseQwen2VLConfig(json);
  } catch (e) {
    expect(e).toBeInstanceOf(CheckpointError);
    return { code: (e as CheckpointError).code, message: (e as Error).message };
  }
  throw new Error("expected a CheckpointError");
}

const tmp = mkdtempSync(join(tmpdir(), "config-test-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("parseQwen2VLConfig", () => {
  it("normalizes golden config A, filling the transformers 4.46.1 defaults it omits", () => {
    const want: Qwen2VLConfig = {
      architecture: "Qwen2VLForConditionalGeneration",
      text: {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        intermediate_size: 128,
        hidden_act: "silu",
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        mrope_section: [2, 3, 3],
        vocab_size: 151936,
        tie_word_embeddings: true,
        max_position_embeddings: 32768,
      },
      vision: {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        head_dim: 16,
        mlp_ratio: 4,
        hidden_size: 64,
        patch_size: 14,
        temporal_patch_size: 2,
        spatial_merge_size: 2,
        in_channels: 3,
        hidden_act: "quick_gelu", // omitted in the file
        layer_norm_eps: 1e-6, // hard-coded in the model
      },
      image_token_id: 151655,
      video_token_id: 151656,
      vision_start_token_id: 151652,
      vision_end_token_id: 151653,
      bos_token_id: 151643,
      eos_token_id: 151645,
      torch_dtype: "float32",
    };
    expect(parseQwen2VLConfig(configA)).toEqual(want);
  });

  it("accepts both rope_scaling forms with the same result", () => {
    const resaved = clone(configA);
    resaved["rope_scaling"] = { type: "default", rope_type: "default", mrope_section: [2, 3, 3] };
    expect(parseQwen2VLConfig(resaved)).toEqual(parseQwen2VLConfig(configA));
    const other = clone(configA);
    other["rope_scaling"] = { rope_type: "default", mrope_section: [4, 2, 2] };
    expect(parseQwen2VLConfig(other).text.mrope_section).toEqual([4, 2, 2]);
  });

  it("reads text parameters nested under text_config (newer transformers) and the newer key spellings", () => {
    const nested: Json = {
      architectures: ["Qwen2VLForConditionalGeneration"],
      model_type: "qwen2_vl",
      dtype: "float32",
      image_token_id: 151655,
      text_config: {
        model_type: "qwen2_vl_text",
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        hidden_act: "silu",
        rms_norm_eps: 1e-6,
        max_position_embeddings: 32768,
        rope_scaling: { type: "default", rope_type: "default", mrope_section: [2, 3, 3] },
        rope_theta: 1000000.0,
        vocab_size: 151936,
        tie_word_embeddings: true,
      },
      vision_config: { depth: 2, embed_dim: 32, mlp_ratio: 4, num_heads: 2, in_channels: 3, hidden_size: 64, hidden_act: "quick_gelu" },
      bos_token_id: 151643,
      eos_token_id: 151645,
    };
    expect(parseQwen2VLConfig(nested)).toEqual(parseQwen2VLConfig(configA));
  });

  it("in_channels wins over in_chans; either alone is used; default 3", () => {
    const c = clone(configA);
    (c["vision_config"] as Json)["in_chans"] = 1;
    expect(parseQwen2VLConfig(c).vision.in_channels).toBe(1);
    (c["vision_config"] as Json)["in_channels"] = 4;
    expect(parseQwen2VLConfig(c).vision.in_channels).toBe(4);
    delete (c["vision_config"] as Json)["in_channels"];
    delete (c["vision_config"] as Json)["in_chans"];
    expect(parseQwen2VLConfig(c).vision.in_channels).toBe(3);
  });

  it("a minimal config gets transformers 4.46.1 class defaults", () => {
    const minimal: Json = {
      model_type: "qwen2_vl",
      hidden_size: 3584, // the vision default merger width, so the dims agree
      num_attention_heads: 56, // a multiple of the default 8 KV heads
      rope_scaling: { type: "mrope", mrope_section: [8, 12, 12] },
      vision_config: {},
    };
    const c = parseQwen2VLConfig(minimal);
    expect(c.text).toMatchObject({ num_hidden_layers: 80, num_key_value_heads: 8, intermediate_size: 29568, rms_norm_eps: 1e-5, vocab_size: 152064 });
    expect(c.text).toMatchObject({ tie_word_embeddings: false, rope_theta: 1e6, hidden_act: "silu", max_position_embeddings: 32768, head_dim: 64 });
    expect(c.vision).toEqual({
      embed_dim: 1280,
      depth: 32,
      num_heads: 16,
      head_dim: 80,
      mlp_ratio: 4,
      hidden_size: 3584,
      patch_size: 14,
      temporal_patch_size: 2,
      spatial_merge_size: 2,
      in_channels: 3,
      hidden_act: "quick_gelu",
      layer_norm_eps: 1e-6,
    });
    expect(c.bos_token_id).toBeNull();
    expect(c.eos_token_id).toBeNull();
    expect(c.torch_dtype).toBe("float32");
    // num_key_value_heads: null means "same as attention heads" in transformers.
    expect(parseQwen2VLConfig({ ...minimal, num_key_value_heads: null }).text.num_key_value_heads).toBe(56);
  });

  it("a MedVLM-R1-style re-saved config (full vision dict, eos list) parses", () => {
    const c = clone(QWEN2VL_2B);
    c["rope_scaling"] = { mrope_section: [16, 24, 24], rope_type: "default", type: "default" };
    c["eos_token_id"] = [151645, 151643];
    c["vision_config"] = { ...(c["vision_config"] as Json), in_channels: 3, hidden_act: "quick_gelu", model_type: "qwen2_vl", architectures: null, torch_dtype: "bfloat16" };
    const p = parseQwen2VLConfig(c);
    expect(p.eos_token_id).toEqual([151645, 151643]);
    expect(p.text.mrope_section).toEqual([16, 24, 24]);
    expect(p.torch_dtype).toBe("bfloat16");
  });

  describe("errors", () => {
    it("missing vision_config → bad_config", () => {
      const c = clone(configA);
      delete c["vision_config"];
      const r = errorOf(c);
      expect(r.code).toBe("bad_config");
      expect(r.message).toContain("vision_config");
    });

    it("unknown architectures / model_type → unsupported_architecture naming it", () => {
      const r = errorOf({ ...clone(configA), architectures: ["LlamaForCausalLM"] });
      expect(r.code).toBe("unsupported_architecture");
      expect(r.message).toContain("LlamaForCausalLM");
      const r2 = errorOf({ ...clone(configA), model_type: "qwen2_5_vl", architectures: ["Qwen2_5_VLForConditionalGeneration"] });
      expect(r2.code).toBe("unsupported_architecture");
      expect(r2.message).toContain("qwen2_5_vl");
      const noIdentity = clone(configA);
      delete noIdentity["architectures"];
      delete noIdentity["model_type"];
      expect(errorOf(noIdentity).code).toBe("bad_config");
    });

    it("inconsistent or malformed fields → bad_config naming the field", () => {
      const cases: [Json, string][] = [
        [{ rope_scaling: { type: "mrope", mrope_section: [2, 3, 4] } }, "mrope_section"],
        [{ rope_scaling: null }, "rope_scaling"],
        [{ rope_scaling: { type: "yarn", factor: 4, mrope_section: [2, 3, 3] } }, "yarn"],
        [{ hidden_size: 66 }, "hidden_size"],
        [{ num_key_value_heads: 3 }, "num_key_value_heads"],
        [{ vocab_size: "151936" }, "vocab_size"],
        [{ rms_norm_eps: -1 }, "rms_norm_eps"],
        [{ tie_word_embeddings: "yes" }, "tie_word_embeddings"],
        [{ vision_config: { ...(configA["vision_config"] as Json), hidden_size: 128 } }, "vision_config.hidden_size"],
        [{ vision_config: { ...(configA["vision_config"] as Json), num_heads: 5 } }, "vision_config.num_heads"],
        [{ vision_config: { ...(configA["vision_config"] as Json), depth: 0 } }, "vision_config.depth"],
        [{ eos_token_id: [151645, "x"] }, "eos_token_id"],
      ];
      for (const [patch, field] of cases) {
        const r = errorOf({ ...clone(configA), ...patch });
        expect(r.code, JSON.stringify(patch)).toBe("bad_config");
        expect(r.message, JSON.stringify(patch)).toContain(field);
      }
      expect(errorOf("config").code).toBe("bad_config");
      expect(errorOf(null).code).toBe("bad_config");
    });
  });
});

describe("readQwen2VLConfig", () => {
  it("reads <dir>/config.json; missing file → not_found, bad JSON → bad_config naming the path", async () => {
    expect((await readQwen2VLConfig(join(GOLDEN_DIR, "tiny-a"))).text.hidden_size).toBe(64);
    await expect(readQwen2VLConfig(tmp)).rejects.toMatchObject({ code: "not_found" });
    writeFileSync(join(tmp, "config.json"), "{ nope");
    await expect(readQwen2VLConfig(tmp)).rejects.toMatchObject({ code: "bad_config", message: expect.stringContaining(join(tmp, "config.json")) });
    writeFileSync(join(tmp, "config.json"), JSON.stringify({ ...configA, architectures: ["MistralForCausalLM"] }));
    await expect(readQwen2VLConfig(tmp)).rejects.toMatchObject({
      code: "unsupported_architecture",
      message: expect.stringContaining(join(tmp, "config.json")),
    });
  });
});

describe("qwen2vlTensorShapes", () => {
  it("config A: exactly the 57 tensors of weights_manifest_a.json, in the same (state_dict) order", () => {
    const manifest = JSON.parse(readFileSync(join(GOLDEN_DIR, "weights_manifest_a.json"), "utf8")) as { name: string; shape: number[] }[];
    expect(qwen2vlTensorShapes(parseQwen2VLConfig(configA))).toEqual(manifest.map(({ name, shape }) => ({ name, shape })));
  });

  it("Qwen2-VL-2B shape: 729 tensors, tied (no lm_head), the released shapes", () => {
    const shapes = qwen2vlTensorShapes(parseQwen2VLConfig(QWEN2VL_2B));
    expect(shapes).toHaveLength(1 + 32 * 12 + 6 + 1 + 28 * 12 + 1);
    const m = new Map(shapes.map((s) => [s.name, s.shape]));
    expect(m.get("visual.patch_embed.proj.weight")).toEqual([1280, 3, 2, 14, 14]);
    expect(m.get("visual.blocks.31.attn.qkv.weight")).toEqual([3840, 1280]);
    expect(m.get("visual.blocks.31.mlp.fc1.weight")).toEqual([5120, 1280]);
    expect(m.get("visual.merger.mlp.0.weight")).toEqual([5120, 5120]);
    expect(m.get("visual.merger.mlp.2.weight")).toEqual([1536, 5120]);
    expect(m.get("model.embed_tokens.weight")).toEqual([151936, 1536]);
    expect(m.get("model.layers.27.self_attn.q_proj.weight")).toEqual([1536, 1536]);
    expect(m.get("model.layers.27.self_attn.k_proj.bias")).toEqual([256]);
    expect(m.get("model.layers.27.mlp.down_proj.weight")).toEqual([1536, 8960]);
    expect(m.has("lm_head.weight")).toBe(false);
    expect(m.has("model.layers.28.mlp.up_proj.weight")).toBe(false);
    const params = shapes.reduce((a, s) => a + s.shape.reduce((x, y) => x * y, 1), 0);
    expect(params).toBe(2_208_985_600);
  });

  it("an untied config adds lm_head.weight [vocab, hidden] last", () => {
    const shapes = qwen2vlTensorShapes(parseQwen2VLConfig({ ...clone(configA), tie_word_embeddings: false }));
    expect(shapes).toHaveLength(58);
    expect(shapes.at(-1)).toEqual({ name: "lm_head.weight", shape: [151936, 64] });
  });
});

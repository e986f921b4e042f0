/** scripts/build-edge-model.ts: the demo bundle is the golden Qwen2-VL tokenizer and config A's geometry. */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { modelFingerprint } from "../../shared/src/fingerprint.ts";
import { modelMetaFromFiles, withImageProcessorDefaults } from "../../shared/src/model-meta.ts";
import { compileBpe, serializeBpe } from "../../shared/src/tokenizer/index.ts";
import { GOLDEN_DIR, PROJECT_ROOT } from "../support/golden.ts";

describe("edge model bundle", () => {
  it("derives exactly the golden tokenizer (as compiled tables) and fingerprints tokenizer + configs", async () => {
    execFileSync(process.execPath, [join(PROJECT_ROOT, "node_modules/tsx/dist/cli.mjs"), "scripts/build-edge-model.ts"], { cwd: PROJECT_ROOT, env: { ...process.env, MODEL_DIR: "" } });
    const bundled = new Uint8Array(readFileSync(join(PROJECT_ROOT, "edge/generated/tokenizer.bin")));
    const golden = JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a/tokenizer.json"), "utf8"));
    // The bundle is the golden tokenizer's tables (the fingerprint below also covers its JSON).
    expect(Buffer.from(bundled).equals(Buffer.from(serializeBpe(compileBpe(golden))))).toBe(true);
    const meta = JSON.parse(readFileSync(join(PROJECT_ROOT, "edge/generated/model-meta.json"), "utf8"));
    const readJson = (f: string) => JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", f), "utf8"));
    expect(meta.fingerprint).toBe(
      await modelFingerprint({ tokenizer: golden, config: readJson("config.json"), preprocessor: readJson("preprocessor_config.json") }),
    );
    expect(meta).toMatchObject({ vocab_size: 151936, min_pixels: 3136, max_pixels: 12845056, eos_token_ids: [151645, 151643] });
  });

  it("reads the pixel bounds as min_pixels/max_pixels, else as size (newer transformers), else transformers' defaults", () => {
    const bounds = (preprocessor: unknown) => {
      const { min_pixels, max_pixels } = modelMetaFromFiles({ config: {}, preprocessor, generation: {}, fingerprint: "f" });
      return [min_pixels, max_pixels];
    };
    expect(bounds({ min_pixels: 3136, max_pixels: 12845056, size: { shortest_edge: 1, longest_edge: 2 } })).toEqual([3136, 12845056]);
    expect(bounds({ size: { shortest_edge: 3136, longest_edge: 12845056 } })).toEqual([3136, 12845056]);
    expect(bounds({})).toEqual([3136, 1003520]);
  });

  it("the fingerprint ignores formatting and key order but not content", async () => {
    const a = await modelFingerprint({ tokenizer: { a: 1, b: [1, 2] }, config: {}, preprocessor: {} });
    const b = await modelFingerprint({ tokenizer: { b: [1, 2], a: 1 }, config: {}, preprocessor: {} });
    const c = await modelFingerprint({ tokenizer: { b: [2, 1], a: 1 }, config: {}, preprocessor: {} });
    expect(a).toBe(b);
    expect(a).not.toBe(c);
  });

  it("the fingerprint treats Python's image-processor defaults spelled out (as the converter writes them) as absent", async () => {
    const pre = JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "preprocessor_config.json"), "utf8"));
    const fp = (preprocessor: unknown) => modelFingerprint({ tokenizer: { t: 1 }, config: { c: 2 }, preprocessor });
    const { config: completed, added } = withImageProcessorDefaults(pre);
    expect(added).toEqual(["do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize"]);
    expect(completed).toMatchObject({ ...pre, resample: 3, rescale_factor: 0.00392156862745098, do_normalize: true });
    expect(await fp(completed)).toBe(await fp(pre)); // a checkpoint and its conversion match
    expect(await fp({ ...pre, do_normalize: false })).not.toBe(await fp(pre)); // a non-default value counts
    expect(await fp({ ...pre, resample: 2 })).not.toBe(await fp(pre));
    // Present keys are never overwritten.
    expect(withImageProcessorDefaults({ ...pre, do_normalize: false, resample: 2 }).config).toMatchObject({ do_normalize: false, resample: 2, do_rescale: true });
  });
});

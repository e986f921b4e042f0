/**
 * Access to the golden reference data beside the project (`../shared/golden`, also present in CI).
 * Node-side only; edge tests (workerd, no file system) get the same data through vitest's
 * `provide`/`inject` (see vitest.config.ts and `goldenForWorkers`).
 */
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { GoldenCase, GoldenForWorkers } from "./golden-types.ts";

export type * from "./golden-types.ts";

export const PROJECT_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const GOLDEN_DIR = resolve(PROJECT_ROOT, "..", "shared", "golden");

export function goldenCaseNames(): string[] {
  return readdirSync(join(GOLDEN_DIR, "cases-a"))
    .filter((f) => /^case_\d+\.json$/.test(f))
    .sort()
    .map((f) => f.replace(/\.json$/, ""));
}

export function loadGoldenCase(name: string): GoldenCase {
  return JSON.parse(readFileSync(join(GOLDEN_DIR, "cases-a", `${name}.json`), "utf8")) as GoldenCase;
}

export function loadGoldenCases(): GoldenCase[] {
  return goldenCaseNames().map(loadGoldenCase);
}

/** A golden float32 binary (raw little-endian, C order). */
export function loadGoldenF32(file: string): Float32Array {
  const buf = readFileSync(join(GOLDEN_DIR, "cases-a", file));
  return new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
}

export function goldenImagePath(rel: string): string {
  return join(GOLDEN_DIR, rel);
}

export function goldenForWorkers(): GoldenForWorkers {
  const cases = loadGoldenCases().map((c) => ({
    case: c.case,
    messages: c.messages,
    prompt_text: c.prompt_text,
    input_ids_unexpanded: c.input_ids_unexpanded,
    input_ids: c.input_ids,
    image_grid_thw: c.image_grid_thw,
    images: c.images,
    question_template: c.question_template,
  }));
  const images: Record<string, string> = {};
  for (const f of readdirSync(join(GOLDEN_DIR, "images"))) {
    images[`images/${f}`] = readFileSync(join(GOLDEN_DIR, "images", f)).toString("base64");
  }
  const tokenizeCases = JSON.parse(readFileSync(join(GOLDEN_DIR, "tokenizer", "tokenize_cases.json"), "utf8"));
  return { cases, images, tokenizeCases };
}

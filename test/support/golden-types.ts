/** Shapes of the golden reference data (`../shared/golden/cases-a/case_NN.json`). No runtime code. */

export interface GoldenImage {
  image: string;
  qwen_vl_utils_kwargs: { min_pixels?: number; max_pixels?: number };
  original_size_wh: [number, number];
  original_mode: string;
  original_format: string;
  fetched_size_wh: [number, number];
  fetched_rgb_u8_sha256: string;
  grid_thw: [number, number, number];
  pixel_value_rows: [number, number];
  merged_tokens: [number, number];
}

export interface GoldenBinary {
  file: string;
  shape: number[];
  sha256: string;
}

export interface GoldenCase {
  case: string;
  description: string;
  messages: Array<{ role: string; content: string | Array<Record<string, unknown>> }>;
  question_template: string;
  prompt_text: string;
  input_ids_unexpanded: number[];
  input_ids: number[];
  seq_len: number;
  image_grid_thw: [number, number, number][] | null;
  images: GoldenImage[];
  position_ids: [number[], number[], number[]];
  rope_deltas: number;
  pixel_values: GoldenBinary | null;
  image_embeds: GoldenBinary | null;
  prefill_logits: GoldenBinary;
  prefill_top5: [number, number][];
  generated_ids: number[];
  generated_text: string;
  steps: Array<{ step: number; input_position: number | null; token_id: number; top5: [number, number][] }>;
  forced_decode: {
    text: string;
    forced_ids: number[];
    steps: Array<{ step: number; input_token: number | null; input_position: number | null; top5: [number, number][] }>;
  };
  [key: string]: unknown;
}

/** What edge tests receive via `inject("golden")`: cases without the bulky per-step data, images as base64. */
export interface GoldenForWorkers {
  cases: Array<Pick<GoldenCase, "case" | "messages" | "prompt_text" | "input_ids_unexpanded" | "input_ids" | "image_grid_thw" | "images" | "question_template">>;
  images: Record<string, string>;
  tokenizeCases: unknown;
}


/** The edge's bundled tokenizer inside workerd, against the reference tokenizer's outputs. */
import { describe, expect, inject, it } from "vitest";
import { MODEL_META, encode } from "../../edge/src/tokenizer/index.ts";

const golden = inject("golden");
const cases = (golden.tokenizeCases as { cases: { text: string | null; ids: number[] }[] }).cases;

describe("edge tokenizer", () => {
  it("encodes every golden tokenizer string to the reference ids", () => {
    const checked = cases.filter((c) => c.text !== null);
    expect(checked.length).toBeGreaterThanOrEqual(40);
    for (const c of checked) expect(encode(c.text!), JSON.stringify(c.text).slice(0, 60)).toEqual(c.ids);
  });

  it("encodes every golden prompt to its unexpanded ids", () => {
    for (const c of golden.cases) expect(encode(c.prompt_text), c.case).toEqual(c.input_ids_unexpanded);
  });

  it("bundles the model's special ids and image geometry", () => {
    expect(MODEL_META).toMatchObject({ image_token_id: 151655, vision_start_token_id: 151652, eos_token_ids: [151645, 151643], patch_size: 14, merge_size: 2 });
  });
});

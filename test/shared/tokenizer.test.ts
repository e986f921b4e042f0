/**
 * shared/src/tokenizer: the compiled byte-level BPE encoder against the reference ids (golden, computed by
 * transformers) and against the `tokenizers` implementation of @huggingface/tokenizers as an oracle on
 * generated text; its tables' binary form; and the tokenizer.json features it refuses.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { BpeTokenizer, compileBpe, deserializeBpe, serializeBpe, translatePattern, TokenizerError, type CompiledBpe } from "../../shared/src/tokenizer/index.ts";
import { GOLDEN_DIR, loadGoldenCases } from "../support/golden.ts";
import { codeOf } from "../support/errors.ts";

const tokenizerJson = (): Record<string, unknown> => JSON.parse(readFileSync(join(GOLDEN_DIR, "tiny-a", "tokenizer.json"), "utf8"));

let compiled: CompiledBpe;
let ours: BpeTokenizer;
let oracle: Tokenizer;

beforeAll(() => {
  compiled = compileBpe(tokenizerJson());
  ours = new BpeTokenizer(deserializeBpe(serializeBpe(compiled)));
  oracle = new Tokenizer(tokenizerJson(), { clean_up_tokenization_spaces: false });
});

const oracleIds = (text: string, tok = oracle) => tok.encode(text, { add_special_tokens: false }).ids;


describe("BpeTokenizer", () => {
  it("encodes every golden tokenizer string to the reference ids", () => {
    const cases = (JSON.parse(readFileSync(join(GOLDEN_DIR, "tokenizer", "tokenize_cases.json"), "utf8")) as { cases: { text: string | null; ids: number[] }[] }).cases;
    const checked = cases.filter((c) => c.text !== null);
    expect(checked.length).toBeGreaterThanOrEqual(40);
    for (const c of checked) expect(ours.encode(c.text!), JSON.stringify(c.text).slice(0, 60)).toEqual(c.ids);
  });

  it("encodes every golden prompt to its unexpanded ids", () => {
    for (const c of loadGoldenCases()) expect(ours.encode(c.prompt_text), c.case).toEqual(c.input_ids_unexpanded);
  });

  it("agrees with the tokenizers oracle on generated text (whitespace classes, contractions, scripts, specials)", () => {
    const parts = [
      "a", "b", "the", "The", "THE", " ", "  ", "\n", "\r\n", "\t", "\u000b", "'s", "'S", "'Ll", "'VE", "'d", "1", "23", "456",
      "é", "e\u0301", "中文", "😀", "👍🏽", "\u00a0", "\u0085", "\ufeff", "\u2009", "\u3000", "\u001c", "\u200d", "Ą", "ß", "İ",
      "!", "?", "...", "-", "(x)", "<", "|", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|im_start", "\u0000",
    ];
    fc.assert(
      fc.property(fc.array(fc.constantFrom(...parts), { maxLength: 24 }), (xs) => {
        const text = xs.join("");
        expect(ours.encode(text)).toEqual(oracleIds(text));
      }),
      { numRuns: 3000, seed: 20261128 },
    );
    fc.assert(
      fc.property(fc.string({ unit: "binary", maxLength: 40 }), (text) => {
        expect(ours.encode(text)).toEqual(oracleIds(text));
      }),
      { numRuns: 3000, seed: 7 },
    );
  });

  it("merges long single pieces like the oracle (heap merge, not a quadratic rescan)", () => {
    for (const text of ["a".repeat(5000), "ab".repeat(3000), "1".repeat(2000), "😀".repeat(700), " ".repeat(3000) + "x"]) {
      expect(ours.encode(text)).toEqual(oracleIds(text));
    }
  });

  it("absorbs whitespace around added tokens marked lstrip / rstrip, as the oracle does", () => {
    const json = tokenizerJson();
    for (const t of json["added_tokens"] as { content: string; lstrip: boolean; rstrip: boolean }[]) {
      if (t.content === "<|im_end|>") t.lstrip = true;
      if (t.content === "<|im_start|>") t.rstrip = true;
    }
    const a = BpeTokenizer.fromTokenizerJson(json);
    const b = new Tokenizer(json, { clean_up_tokenization_spaces: false });
    for (const text of ["x  <|im_end|> y", "<|im_start|>  \n user", "a\t<|im_end|><|im_start|> b", "<|im_end|>"]) {
      expect(a.encode(text), JSON.stringify(text)).toEqual(oracleIds(text, b));
    }
    expect(a.encode("x  <|im_end|>")).toEqual([...ours.encode("x"), 151645]);
  });

  it("lists the added tokens", () => {
    expect(ours.addedTokens.map((t) => t.content)).toContain("<|image_pad|>");
    expect(ours.addedTokens.find((t) => t.content === "<|im_end|>")).toMatchObject({ id: 151645, special: true });
  });
});

describe("compileBpe", () => {
  it("indexes every merge by its left id, sorted by right id, keeping its rank and result", () => {
    const json = tokenizerJson();
    const model = json["model"] as { vocab: Record<string, number>; merges: [string, string][] };
    expect(compiled.mergeRight.length).toBe(model.merges.length);
    for (const r of [0, 1, 1000, model.merges.length - 1]) {
      const [a, b] = model.merges[r]!;
      const l = model.vocab[a]!;
      const i = Array.from(compiled.mergeRight.subarray(compiled.mergeStart[l], compiled.mergeStart[l + 1])).indexOf(model.vocab[b]!);
      expect(i).toBeGreaterThanOrEqual(0);
      expect(compiled.mergeRank[compiled.mergeStart[l]! + i]).toBe(r);
      expect(compiled.mergeResult[compiled.mergeStart[l]! + i]).toBe(model.vocab[a + b]);
    }
    for (let l = 0; l < 2000; l++) {
      const row = compiled.mergeRight.subarray(compiled.mergeStart[l], compiled.mergeStart[l + 1]);
      for (let k = 1; k < row.length; k++) expect(row[k]!).toBeGreaterThan(row[k - 1]!);
    }
  });

  it("refuses tokenizers it would encode differently", () => {
    const variant = (edit: (j: Record<string, unknown>) => void) => () => {
      const j = tokenizerJson();
      edit(j);
      return compileBpe(j);
    };
    const model = (j: Record<string, unknown>) => j["model"] as Record<string, unknown>;
    expect(codeOf(variant((j) => (model(j)["type"] = "WordPiece")), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (model(j)["byte_fallback"] = true)), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (model(j)["ignore_merges"] = true)), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (model(j)["dropout"] = 0.1)), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (j["normalizer"] = { type: "NFKC" })), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (j["pre_tokenizer"] = { type: "Whitespace" })), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => ((j["added_tokens"] as { single_word: boolean }[])[0]!.single_word = true)), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(variant((j) => (model(j)["merges"] = [["Ġ", "not-a-token"]])), TokenizerError)).toBe("invalid_tokenizer");
    expect(codeOf(variant((j) => delete (model(j)["vocab"] as Record<string, number>)["Ġ"]), TokenizerError)).toBe("invalid_tokenizer");
    expect(codeOf(() => compileBpe("{}"), TokenizerError)).toBe("invalid_tokenizer");
  });

  it("accepts a plain ByteLevel pre-tokenizer with GPT-2's pattern and matches the oracle", () => {
    const j = tokenizerJson();
    j["pre_tokenizer"] = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
    const a = BpeTokenizer.fromTokenizerJson(j);
    const b = new Tokenizer(j, { clean_up_tokenization_spaces: false });
    for (const text of ["Hello world", "I'm  here\n\n 123456", "x\t\ty   ", "中文 text"]) expect(a.encode(text)).toEqual(oracleIds(text, b));
  });
});

describe("translatePattern", () => {
  it("spells \\s as Unicode White_Space (Rust regex) and expands (?i:) literal groups", () => {
    const re = new RegExp(translatePattern("(?i:'s|'ll)|\\s+|[^\\s\\p{L}]+"), "gu");
    expect("'S'lL".match(re)).toEqual(["'S", "'lL"]);
    expect("\u0085".match(re)).toEqual(["\u0085"]); // White_Space, not JavaScript \s
    expect("a\ufeffb".match(re)).toEqual(["\ufeff"]); // JavaScript \s, not White_Space
  });

  it("refuses constructs whose meaning differs between the dialects", () => {
    expect(codeOf(() => translatePattern("\\w+"), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(() => translatePattern("[^\\S]"), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(() => translatePattern("(?i:[a-z])"), TokenizerError)).toBe("unsupported_tokenizer");
    expect(codeOf(() => translatePattern("(?x) a"), TokenizerError)).toBe("unsupported_tokenizer");
  });
});

describe("tokenizer tables (binary)", () => {
  it("round-trips the compiled tables exactly", () => {
    expect(deserializeBpe(serializeBpe(compiled))).toEqual(compiled);
    const shifted = new Uint8Array(serializeBpe(compiled).length + 1);
    shifted.set(serializeBpe(compiled), 1);
    expect(deserializeBpe(shifted.subarray(1))).toEqual(compiled); // unaligned input is copied
  });

  it("rejects a blob that is not, or no longer, the tables", () => {
    const blob = serializeBpe(compiled);
    expect(codeOf(() => deserializeBpe(new TextEncoder().encode("{\"model\":{}}")), TokenizerError)).toBe("invalid_tokenizer_tables");
    expect(codeOf(() => deserializeBpe(blob.subarray(0, blob.length - 4)), TokenizerError)).toBe("invalid_tokenizer_tables");
    const corrupt = blob.slice();
    corrupt[12] = 0x7b + 1;
    expect(codeOf(() => deserializeBpe(corrupt), TokenizerError)).toBe("invalid_tokenizer_tables");
  });
});

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import {
  DetokenizerError,
  DetokenizerVocab,
  IncrementalDetokenizer,
  Utf8StreamDecoder,
} from "../../gpu-backend/src/engine/detokenizer.ts";
import { GOLDEN_DIR } from "../support/golden.ts";

interface TokenizeCase {
  text: string;
  ids: number[];
  decoded: string;
  decoded_skip_special: string;
}
interface DecodeCase {
  description: string;
  ids: number[];
  skip_special_tokens: boolean;
  text: string | null;
}

const readJson = (...p: string[]) => JSON.parse(readFileSync(join(GOLDEN_DIR, ...p), "utf8"));
const tokenizeCases: TokenizeCase[] = readJson("tokenizer", "tokenize_cases.json").cases;
const decodeCases: DecodeCase[] = readJson("tokenizer", "decode_cases.json").cases;

let vocab: DetokenizerVocab;
let reference: Tokenizer;
let tokenizerJson: Record<string, unknown>;

beforeAll(() => {
  tokenizerJson = readJson("tiny-a", "tokenizer.json");
  vocab = DetokenizerVocab.fromTokenizerJson(tokenizerJson);
  reference = new Tokenizer(tokenizerJson, readJson("tiny-a", "tokenizer_config.json"));
});

/** The JS library's decode (it throws on an empty list, where the answer is ""). */
const refDecode = (ids: number[], skip: boolean) => (ids.length === 0 ? "" : reference.decode(ids, { skip_special_tokens: skip }));

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Pushes ids one by one; returns the deltas (flush last) and checks each is well-formed. */
function stream(ids: readonly number[], skipSpecialTokens: boolean): string[] {
  const d = new IncrementalDetokenizer(vocab, { skipSpecialTokens });
  const deltas = ids.map((id) => d.push(id));
  deltas.push(d.flush());
  expect(d.pendingBytes).toBe(0);
  for (const s of deltas) expect(LONE_SURROGATE.test(s)).toBe(false);
  return deltas;
}

describe("vocabulary", () => {
  it("maps byte-level characters back to bytes (GPT-2 bytes↔unicode)", () => {
    expect(Array.from(vocab.tokenBytes(220)!)).toEqual([0x20]); // Ġ
    expect(Array.from(vocab.tokenBytes(198)!)).toEqual([0x0a]); // Ċ
    expect(Array.from(vocab.tokenBytes(197)!)).toEqual([0x09]); // ĉ
    expect(new TextDecoder().decode(vocab.tokenBytes(9707)!)).toBe("Hello");
    // 🩻 = F0 9F A9 BB spread over three tokens.
    expect([9284, 102, 119].flatMap((id) => Array.from(vocab.tokenBytes(id)!))).toEqual([0xf0, 0x9f, 0xa9, 0xbb]);
    expect(vocab.addedToken(151645)).toEqual({ content: "<|im_end|>", special: true });
    for (const id of [-1, 1.5, 151643, 151700, 2 ** 40, NaN]) expect(vocab.tokenBytes(id)).toBeUndefined();
  });

  it("every single-byte value is reachable through exactly one single-character token", () => {
    const seen = new Set<number>();
    for (let id = 0; id < 151643; id++) {
      const b = vocab.tokenBytes(id)!;
      if (b.length === 1) seen.add(b[0]!);
    }
    expect(seen.size).toBe(256);
  });

  it("rejects tokenizer.json objects it cannot read", () => {
    const bad: unknown[] = [
      null,
      [],
      { model: { type: "WordPiece", vocab: {} }, decoder: { type: "ByteLevel" } },
      { model: { type: "BPE", vocab: { a: 0 } }, decoder: { type: "Metaspace" } },
      { model: { type: "BPE", vocab: { a: -1 } }, decoder: { type: "ByteLevel" } },
      { model: { type: "BPE", vocab: { a: 0 } }, decoder: { type: "ByteLevel" }, added_tokens: [{ id: "x", content: "y" }] },
    ];
    for (const b of bad) {
      let err: unknown;
      try {
        DetokenizerVocab.fromTokenizerJson(b);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(DetokenizerError);
      expect((err as DetokenizerError).code).toBe("invalid_tokenizer");
    }
    // A Sequence decoder containing ByteLevel is fine; non-byte characters fall back to their UTF-8 bytes.
    const v = DetokenizerVocab.fromTokenizerJson({
      model: { type: "BPE", vocab: { "Ġa": 0, "é€": 1 } },
      decoder: { type: "Sequence", decoders: [{ type: "ByteLevel" }] },
    });
    const d = new IncrementalDetokenizer(v);
    expect(d.push(0) + d.push(1) + d.flush()).toBe(" aé€");
  });
});

describe("golden tokenizer cases (transformers slow Qwen2Tokenizer)", () => {
  it("has the expected number of cases", () => {
    expect(tokenizeCases.length).toBe(42);
    expect(decodeCases.length).toBe(14);
  });

  it("tokenize_cases: concatenated deltas equal decoded / decoded_skip_special and the JS tokenizer", () => {
    for (const c of tokenizeCases) {
      for (const skip of [false, true]) {
        const deltas = stream(c.ids, skip);
        const text = deltas.join("");
        expect(text, c.text).toBe(skip ? c.decoded_skip_special : c.decoded);
        expect(text).toBe(refDecode(c.ids, skip));
        // These are all complete texts: no delta may carry a replacement character.
        if (!text.includes("\uFFFD")) for (const s of deltas) expect(s.includes("\uFFFD")).toBe(false);
      }
    }
  });

  it("decode_cases: partial UTF-8, byte soup, specials kept/skipped, empty, id without a token", () => {
    for (const c of decodeCases) {
      const text = stream(c.ids, c.skip_special_tokens).join("");
      // The slow tokenizer raised on the id without a token; the Rust/JS libraries skip it, and so do we.
      const expected = c.text ?? refDecode(c.ids, c.skip_special_tokens);
      expect(text, c.description).toBe(expected);
    }
    expect(stream([370, 151700, 4385], false).join("")).toBe("abcd");
  });
});

describe("streaming", () => {
  it("a 4-byte emoji over three tokens is emitted only when complete", () => {
    const d = new IncrementalDetokenizer(vocab);
    expect(d.push(9284)).toBe("");
    expect(d.pendingBytes).toBe(2);
    expect(d.push(102)).toBe("");
    expect(d.pendingBytes).toBe(3);
    expect(d.push(119)).toBe("🩻");
    expect(d.pendingBytes).toBe(0);
    expect(d.flush()).toBe("");
  });

  it("multi-byte characters of the golden strings never come out partially", () => {
    // For every prefix of the ids, the text emitted so far must be exactly the complete characters of
    // the prefix's bytes: a prefix of the final text, with no U+FFFD the final text does not have there.
    const enc = new TextEncoder();
    let multiByteSplits = 0;
    for (const c of tokenizeCases) {
      const full = c.decoded;
      const d = new IncrementalDetokenizer(vocab);
      const hasAdded = c.ids.some((i) => vocab.addedToken(i) !== undefined);
      let emitted = "";
      let pushedBytes = 0;
      for (const id of c.ids) {
        emitted += d.push(id);
        pushedBytes += vocab.tokenBytes(id)?.length ?? 0;
        expect(full.startsWith(emitted)).toBe(true);
        if (d.pendingBytes > 0) multiByteSplits++;
        // Emitted text + held-back bytes account for every byte pushed: nothing lost, nothing invented.
        if (!hasAdded) expect(enc.encode(emitted).length + d.pendingBytes).toBe(pushedBytes);
      }
      expect(emitted + d.flush()).toBe(full);
    }
    // CJK / emoji / Arabic / non-BMP cases do split characters across tokens.
    expect(multiByteSplits).toBeGreaterThanOrEqual(5);
  });

  it("an emitted special token closes a dangling partial character; a skipped one is transparent", () => {
    const ids = [9284, 151645, 102, 119];
    expect(stream(ids, false)).toEqual(["", "\uFFFD<|im_end|>", "\uFFFD", "\uFFFD", ""]);
    expect(stream(ids, true)).toEqual(["", "", "", "🩻", ""]);
    for (const skip of [false, true]) {
      expect(stream(ids, skip).join("")).toBe(refDecode(ids, skip));
    }
  });

  it("ids without a token (negative, fractional, unassigned, huge) are skipped", () => {
    const d = new IncrementalDetokenizer(vocab);
    expect([d.push(370), d.push(-1), d.push(0.5), d.push(151700), d.push(151935), d.push(2 ** 31), d.push(4385)].join("")).toBe("abcd");
  });

  it("property: random id sequences (incl. specials and byte fragments) decode like the JS tokenizer", () => {
    const id = fc.oneof(
      { weight: 6, arbitrary: fc.integer({ min: 0, max: 151642 }) },
      // Single-byte tokens, many of them UTF-8 continuation / lead bytes.
      { weight: 6, arbitrary: fc.integer({ min: 0, max: 255 }) },
      { weight: 1, arbitrary: fc.integer({ min: 151643, max: 151656 }) },
      { weight: 1, arbitrary: fc.integer({ min: 151657, max: 151935 }) },
    );
    fc.assert(
      fc.property(fc.array(id, { maxLength: 40 }), fc.boolean(), (ids, skip) => {
        expect(stream(ids, skip).join("")).toBe(refDecode(ids, skip));
      }),
      { numRuns: 300 },
    );
  });
});

describe("Utf8StreamDecoder", () => {
  it("property: any chunking of any bytes gives one-shot TextDecoder output; held bytes ≤ 3", () => {
    const oneShot = new TextDecoder("utf-8", { ignoreBOM: true });
    const interesting = fc.constantFrom(0x00, 0x41, 0x7f, 0x80, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff, 0x9f, 0xa0, 0x8f, 0x90);
    const bytes = fc.array(fc.oneof(fc.integer({ min: 0, max: 255 }), interesting), { maxLength: 64 });
    fc.assert(
      fc.property(bytes, fc.array(fc.integer({ min: 0, max: 64 }), { maxLength: 8 }), (bs, cuts) => {
        const u8 = Uint8Array.from(bs);
        const points = [...new Set(cuts.map((c) => Math.min(c, u8.length)))].sort((a, b) => a - b);
        const dec = new Utf8StreamDecoder();
        let out = "";
        let prev = 0;
        for (const p of [...points, u8.length]) {
          const piece = dec.write(u8.subarray(prev, p));
          expect(LONE_SURROGATE.test(piece)).toBe(false);
          expect(dec.pendingBytes).toBeLessThanOrEqual(3);
          out += piece;
          prev = p;
        }
        out += dec.end();
        expect(out).toBe(oneShot.decode(u8));
      }),
      { numRuns: 1000 },
    );
  });

  it("known sequences: maximal subparts, overlongs, surrogates, beyond U+10FFFF, BOM kept", () => {
    const dec = (b: number[]) => {
      const d = new Utf8StreamDecoder();
      return d.write(Uint8Array.from(b)) + d.end();
    };
    expect(dec([0xf0, 0x9f, 0xa9])).toBe("\uFFFD"); // truncated 4-byte: one replacement
    expect(dec([0xf0, 0x9f, 0x41])).toBe("\uFFFDA");
    expect(dec([0xc0, 0xaf])).toBe("\uFFFD\uFFFD"); // overlong
    expect(dec([0xe0, 0x80, 0x80])).toBe("\uFFFD\uFFFD\uFFFD");
    expect(dec([0xed, 0xa0, 0x80])).toBe("\uFFFD\uFFFD\uFFFD"); // UTF-8-encoded surrogate
    expect(dec([0xf4, 0x90, 0x80, 0x80])).toBe("\uFFFD\uFFFD\uFFFD\uFFFD");
    expect(dec([0xef, 0xbb, 0xbf, 0x41])).toBe("\uFEFFA");
    expect(dec([0xf0, 0x9f, 0xa9, 0xbb])).toBe("🩻");
  });
});

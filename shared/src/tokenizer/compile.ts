/**
 * A Hugging Face `tokenizer.json` (byte-level BPE: Qwen2, GPT-2 family) → {@link CompiledBpe}, the tables
 * {@link BpeTokenizer} encodes with: the pre-tokenizer regex translated to JavaScript, the 256 byte tokens,
 * and the merges indexed by (left id, right id). Compiling needs the whole JSON (vocab + merges); encoding
 * needs only the tables, which is what the edge bundles (see ./binary.ts) so that an isolate starts without
 * parsing megabytes of JSON.
 *
 * Anything this encoder would get wrong (other models, normalizers, pre-tokenizers, BPE options) is refused
 * here with a {@link TokenizerError}, never approximated.
 */
import { CodedError } from "../errors.ts";

/** Stable codes of {@link TokenizerError}. */
export type TokenizerErrorCode = "invalid_tokenizer" | "unsupported_tokenizer" | "invalid_tokenizer_tables";

export class TokenizerError extends CodedError<TokenizerErrorCode> {}

/** An entry of `added_tokens`: matched in the raw text before normalization and pre-tokenization. */
export interface AddedToken {
  id: number;
  content: string;
  special: boolean;
  /** Whitespace to the token's left / right is absorbed into it. */
  lstrip: boolean;
  rstrip: boolean;
}

export interface CompiledBpe {
  /** Pre-tokenizer split pattern as JavaScript RegExp source (used with flags `gu`); matches and gaps are pieces. */
  pattern: string;
  normalizer: "NFC" | null;
  /** Token id of each byte's byte-level character. */
  byteIds: Int32Array;
  /** Merges grouped by left id: those of left id `l` are at `mergeStart[l] .. mergeStart[l + 1]`, sorted by right id. */
  mergeStart: Int32Array;
  mergeRight: Int32Array;
  /** Priority (index in `model.merges`; lower merges first) and resulting token id of each merge. */
  mergeRank: Int32Array;
  mergeResult: Int32Array;
  added: AddedToken[];
}

/**
 * GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the other 68 to U+0100.. in byte
 * order. The byte-level alphabet every vocabulary entry is written in.
 */
export function byteLevelChars(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const chars: string[] = [];
  let n = 0;
  for (let b = 0; b < 256; b++) chars.push(String.fromCharCode(printable(b) ? b : 256 + n++));
  return chars;
}

/** GPT-2's split pattern, what a `ByteLevel` pre-tokenizer with `use_regex: true` applies. */
const GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/**
 * Unicode White_Space, what `\s` means in the Rust `regex` crate (the `tokenizers` library). JavaScript's
 * `\s` differs: it adds U+FEFF and lacks U+0085.
 */
const WHITE_SPACE = "\\t-\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";

/**
 * Translates a `tokenizers` (Rust regex) pattern into JavaScript source for the `u` flag: `\s`/`\S` as
 * White_Space, and `(?i:…)` groups of literal alternatives as explicit case classes (Node 20 has no inline
 * modifiers). Other constructs are shared by both dialects; patterns with ones that are not are refused.
 */
export function translatePattern(rust: string): string {
  const unsupported = (what: string) => new TokenizerError("unsupported_tokenizer", `pre-tokenizer pattern: ${what} is not supported`);
  let out = "";
  let inClass = false;
  for (let i = 0; i < rust.length; i++) {
    const c = rust[i]!;
    if (c === "\\") {
      const e = rust[i + 1];
      if (e === undefined) throw unsupported("a trailing backslash");
      i++;
      if (e === "s") out += inClass ? WHITE_SPACE : `[${WHITE_SPACE}]`;
      else if (e === "S") {
        if (inClass) throw unsupported("\\S inside a character class");
        out += `[^${WHITE_SPACE}]`;
      } else if ("dwbDWB".includes(e)) throw unsupported(`\\${e}`); // ASCII-only in JS, Unicode in Rust
      else out += `\\${e}`;
      continue;
    }
    if (inClass) {
      if (c === "[") throw unsupported("a nested character class");
      if (c === "]") inClass = false;
      out += c;
      continue;
    }
    if (c === "[") {
      inClass = true;
      out += c;
      if (rust[i + 1] === "^") out += rust[++i];
      continue;
    }
    if (rust.startsWith("(?i:", i)) {
      const end = rust.indexOf(")", i);
      const body = rust.slice(i + 4, end);
      if (end < 0 || !/^[A-Za-z'|]*$/.test(body)) throw unsupported("a case-insensitive group other than literal alternatives");
      out += "(?:" + body.replace(/[A-Za-z]/g, (ch) => `[${ch.toLowerCase()}${ch.toUpperCase()}]`) + ")";
      i = end;
      continue;
    }
    if (rust.startsWith("(?", i) && !rust.startsWith("(?:", i) && !rust.startsWith("(?=", i) && !rust.startsWith("(?!", i)) {
      throw unsupported(`the group ${rust.slice(i, i + 4)}`);
    }
    out += c;
  }
  try {
    new RegExp(out, "gu");
  } catch (e) {
    throw new TokenizerError("unsupported_tokenizer", `pre-tokenizer pattern does not translate to JavaScript: ${(e as Error).message}`);
  }
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** The split pattern of a supported pre-tokenizer: `Split(Regex, Isolated)` + `ByteLevel(use_regex: false)`, or `ByteLevel(use_regex: true)`. */
function splitPattern(pre: unknown): string {
  const unsupported = (why: string) => new TokenizerError("unsupported_tokenizer", `pre_tokenizer: ${why}`);
  if (!isObject(pre)) throw unsupported("missing");
  const steps = pre["type"] === "Sequence" ? pre["pretokenizers"] : [pre];
  if (!Array.isArray(steps) || !steps.every(isObject)) throw unsupported("a Sequence needs a list of pre-tokenizers");
  const last = steps.at(-1);
  if (last?.["type"] !== "ByteLevel") throw unsupported("the last step must be ByteLevel");
  if (last["add_prefix_space"] === true) throw unsupported("ByteLevel add_prefix_space is not supported");
  if (steps.length === 1) {
    if (last["use_regex"] === false) throw unsupported("ByteLevel without a split pattern");
    return translatePattern(GPT2_PATTERN);
  }
  const split = steps[0]!;
  const regex = isObject(split["pattern"]) ? split["pattern"]["Regex"] : undefined;
  if (steps.length !== 2 || split["type"] !== "Split" || typeof regex !== "string") throw unsupported("expected Split(Regex) then ByteLevel");
  if (split["behavior"] !== "Isolated" || split["invert"] === true) throw unsupported("Split must be Isolated and not inverted");
  if (last["use_regex"] !== false) throw unsupported("ByteLevel after Split must have use_regex: false");
  return translatePattern(regex);
}

/**
 * Compiles a parsed tokenizer.json.
 * @throws TokenizerError `invalid_tokenizer` (malformed) or `unsupported_tokenizer` (a feature this encoder lacks)
 */
export function compileBpe(tokenizerJson: unknown): CompiledBpe {
  const bad = (why: string) => new TokenizerError("invalid_tokenizer", `tokenizer.json: ${why}`);
  const unsupported = (why: string) => new TokenizerError("unsupported_tokenizer", `tokenizer.json: ${why}`);
  if (!isObject(tokenizerJson)) throw bad("not an object");
  const model = tokenizerJson["model"];
  if (!isObject(model) || model["type"] !== "BPE") throw unsupported("model must be BPE");
  const vocab = model["vocab"];
  const merges = model["merges"];
  if (!isObject(vocab) || !Array.isArray(merges)) throw bad("model needs vocab and merges");
  if (model["dropout"] != null && model["dropout"] !== 0) throw unsupported("BPE dropout");
  if (model["byte_fallback"] === true) throw unsupported("byte_fallback");
  if (model["ignore_merges"] === true) throw unsupported("ignore_merges");
  if (model["continuing_subword_prefix"] || model["end_of_word_suffix"]) throw unsupported("subword prefixes/suffixes");

  const normalizer = tokenizerJson["normalizer"];
  let norm: CompiledBpe["normalizer"] = null;
  if (isObject(normalizer)) {
    if (normalizer["type"] !== "NFC") throw unsupported(`normalizer ${String(normalizer["type"])}`);
    norm = "NFC";
  } else if (normalizer != null) throw bad("normalizer");
  const pattern = splitPattern(tokenizerJson["pre_tokenizer"]);

  const ids = new Map<string, number>();
  let vocabSize = 0;
  for (const [token, id] of Object.entries(vocab)) {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= 1 << 24) throw bad(`vocab id of ${JSON.stringify(token)}`);
    ids.set(token, id);
    vocabSize = Math.max(vocabSize, id + 1);
  }
  const byteIds = new Int32Array(256);
  byteLevelChars().forEach((ch, b) => {
    const id = ids.get(ch);
    if (id === undefined) throw bad(`the vocab lacks the byte token ${JSON.stringify(ch)}`);
    byteIds[b] = id;
  });

  // Merges as (left, right, rank, result), then grouped by left and sorted by right (CSR).
  const n = merges.length;
  const left = new Int32Array(n);
  const right = new Int32Array(n);
  const result = new Int32Array(n);
  for (let r = 0; r < n; r++) {
    const m = merges[r];
    const pair = typeof m === "string" ? m.split(" ") : m;
    if (!Array.isArray(pair) || pair.length !== 2 || typeof pair[0] !== "string" || typeof pair[1] !== "string") throw bad(`merge ${r}`);
    const a = ids.get(pair[0]);
    const b = ids.get(pair[1]);
    const ab = ids.get(pair[0] + pair[1]);
    if (a === undefined || b === undefined || ab === undefined) throw bad(`merge ${r} (${pair.join(" ")}) uses or makes a token outside the vocab`);
    left[r] = a;
    right[r] = b;
    result[r] = ab;
  }
  const order = Array.from({ length: n }, (_, r) => r).sort((x, y) => left[x]! - left[y]! || right[x]! - right[y]! || x - y);
  const mergeStart = new Int32Array(vocabSize + 1);
  const mergeRight = new Int32Array(n);
  const mergeRank = new Int32Array(n);
  const mergeResult = new Int32Array(n);
  let k = 0;
  for (let i = 0; i < n; i++) {
    const r = order[i]!;
    // A pair listed twice keeps its last rank, as the merge maps of `tokenizers` and transformers do.
    const next = order[i + 1];
    if (next !== undefined && left[next] === left[r] && right[next] === right[r]) continue;
    mergeRight[k] = right[r]!;
    mergeRank[k] = r;
    mergeResult[k] = result[r]!;
    mergeStart[left[r]! + 1]! += 1;
    k++;
  }
  for (let i = 0; i < vocabSize; i++) mergeStart[i + 1]! += mergeStart[i]!;

  const addedJson = tokenizerJson["added_tokens"] ?? [];
  if (!Array.isArray(addedJson)) throw bad("added_tokens must be a list");
  const added: AddedToken[] = addedJson.map((t, i) => {
    if (!isObject(t) || typeof t["id"] !== "number" || typeof t["content"] !== "string" || t["content"] === "") throw bad(`added_tokens[${i}]`);
    if (t["single_word"] === true) throw unsupported(`added token ${JSON.stringify(t["content"])} has single_word`);
    if (t["special"] !== true && t["normalized"] === true && norm && t["content"].normalize(norm) !== t["content"]) {
      throw unsupported(`added token ${JSON.stringify(t["content"])} changes under normalization`);
    }
    return { id: t["id"], content: t["content"], special: t["special"] === true, lstrip: t["lstrip"] === true, rstrip: t["rstrip"] === true };
  });

  return {
    pattern,
    normalizer: norm,
    byteIds,
    mergeStart,
    mergeRight: mergeRight.slice(0, k),
    mergeRank: mergeRank.slice(0, k),
    mergeResult: mergeResult.slice(0, k),
    added,
  };
}

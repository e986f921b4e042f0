/**
 * Incremental detokenization for byte-level BPE tokenizers (Qwen2 / GPT-2 family): token ids go in one
 * at a time, text deltas come out, and a delta never ends in the middle of a UTF-8 character — bytes of
 * an incomplete character are held until the character completes (or the stream ends).
 *
 * Concatenating all deltas plus {@link IncrementalDetokenizer.flush} gives exactly what a one-shot decode
 * gives (transformers `decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False)`, and the
 * `tokenizers` library): byte-level tokens are mapped back to bytes through GPT-2's bytes↔unicode table
 * and decoded as UTF-8, invalid bytes becoming U+FFFD one per maximal invalid subsequence (the WHATWG /
 * `TextDecoder` rule, which Python's `errors="replace"` also follows). An emitted added token (e.g.
 * `<|im_end|>`) ends the byte run before it, so a dangling partial character there becomes U+FFFD;
 * a skipped special token is transparent. Ids with no token are skipped.
 */

import { byteLevelChars } from "../../../shared/src/tokenizer/index.ts";
import { CodedError } from "../../../shared/src/errors.ts";

/** Stable codes of {@link DetokenizerError}. */
export type DetokenizerErrorCode = "invalid_tokenizer";

/** The tokenizer.json object is not a byte-level BPE tokenizer this module can read. */
export class DetokenizerError extends CodedError<DetokenizerErrorCode> {}

/** Inverse of GPT-2's `bytes_to_unicode` (see {@link byteLevelChars}): char code → byte (−1 if not a byte char). */
function unicodeToByteTable(): Int16Array {
  const table = new Int16Array(256 + 68).fill(-1);
  byteLevelChars().forEach((ch, b) => (table[ch.charCodeAt(0)] = b));
  return table;
}

const UNICODE_TO_BYTE = unicodeToByteTable();

/** What the detokenizer needs from a tokenizer.json, precomputed once per process and shared. */
export class DetokenizerVocab {
  /** Bytes of every vocabulary token, concatenated; token `id` is `bytes[offsets[id] .. offsets[id + 1])`. */
  private readonly bytes: Uint8Array;
  private readonly offsets: Int32Array;
  /** Added tokens (`added_tokens`): their text and whether they are special. They take precedence over the vocabulary. */
  private readonly added: Map<number, { content: string; special: boolean }>;

  private constructor(bytes: Uint8Array, offsets: Int32Array, added: Map<number, { content: string; special: boolean }>) {
    this.bytes = bytes;
    this.offsets = offsets;
    this.added = added;
  }

  /**
   * Reads `model.vocab` (byte-level BPE) and `added_tokens` of a parsed tokenizer.json.
   * @throws DetokenizerError `invalid_tokenizer`
   */
  static fromTokenizerJson(tokenizerJson: unknown): DetokenizerVocab {
    const bad = (why: string) => new DetokenizerError("invalid_tokenizer", `tokenizer.json: ${why}`);
    if (!isObject(tokenizerJson)) throw bad("not an object");
    const model = tokenizerJson["model"];
    if (!isObject(model) || model["type"] !== "BPE" || !isObject(model["vocab"])) throw bad("model must be BPE with a vocab");
    if (!hasByteLevelDecoder(tokenizerJson["decoder"])) throw bad("decoder must be ByteLevel");
    const vocab = model["vocab"];

    const entries = Object.entries(vocab);
    let maxId = -1;
    for (const [, id] of entries) {
      if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id > 0x7ffffff) throw bad("vocab ids must be small non-negative integers");
      if (id > maxId) maxId = id;
    }
    const addedList = tokenizerJson["added_tokens"] ?? [];
    if (!Array.isArray(addedList)) throw bad("added_tokens must be an array");
    const added = new Map<number, { content: string; special: boolean }>();
    for (const t of addedList) {
      if (!isObject(t) || typeof t["content"] !== "string" || typeof t["id"] !== "number" || !Number.isInteger(t["id"]) || t["id"] < 0) {
        throw bad("added_tokens entries need an integer id and a string content");
      }
      added.set(t["id"], { content: t["content"], special: t["special"] === true });
    }

    // Byte length per id first, then one buffer; tokens with a char outside the byte table keep their
    // UTF-8 bytes (what the `tokenizers` ByteLevel decoder does).
    const encoder = new TextEncoder();
    const lengths = new Int32Array(maxId + 1);
    const fallback = new Map<number, Uint8Array>();
    for (const [tok, id] of entries as Array<[string, number]>) {
      let ok = true;
      for (let j = 0; j < tok.length; j++) {
        const c = tok.charCodeAt(j);
        if (c >= UNICODE_TO_BYTE.length || UNICODE_TO_BYTE[c]! < 0) {
          ok = false;
          break;
        }
      }
      if (ok) lengths[id] = tok.length;
      else {
        const b = encoder.encode(tok);
        fallback.set(id, b);
        lengths[id] = b.length;
      }
    }
    const offsets = new Int32Array(maxId + 2);
    for (let id = 0; id <= maxId; id++) offsets[id + 1] = offsets[id]! + lengths[id]!;
    const bytes = new Uint8Array(offsets[maxId + 1]!);
    for (const [tok, id] of entries as Array<[string, number]>) {
      const o = offsets[id]!;
      const fb = fallback.get(id);
      if (fb) bytes.set(fb, o);
      else for (let j = 0; j < tok.length; j++) bytes[o + j] = UNICODE_TO_BYTE[tok.charCodeAt(j)]!;
    }
    return new DetokenizerVocab(bytes, offsets, added);
  }

  /** The added token with this id, if any. */
  addedToken(id: number): { content: string; special: boolean } | undefined {
    return this.added.get(id);
  }

  /** The bytes of a vocabulary token (a view; do not modify), or undefined when the id has no token. */
  tokenBytes(id: number): Uint8Array | undefined {
    if (!Number.isInteger(id) || id < 0 || id >= this.offsets.length - 1) return undefined;
    const a = this.offsets[id]!;
    const b = this.offsets[id + 1]!;
    return b > a ? this.bytes.subarray(a, b) : undefined;
  }
}

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

function hasByteLevelDecoder(d: unknown): boolean {
  if (!isObject(d)) return false;
  if (d["type"] === "ByteLevel") return true;
  return d["type"] === "Sequence" && Array.isArray(d["decoders"]) && d["decoders"].some((x) => isObject(x) && x["type"] === "ByteLevel");
}

/**
 * Streaming UTF-8 → UTF-16 decoder with the WHATWG error rule (U+FFFD per maximal invalid subsequence,
 * same output as one-shot `new TextDecoder("utf-8", { ignoreBOM: true })`). A BOM is kept, as Python keeps it.
 */
export class Utf8StreamDecoder {
  private needed = 0;
  private seen = 0;
  private cp = 0;
  private lower = 0x80;
  private upper = 0xbf;
  private units: number[] = [];

  /** Bytes of an incomplete character currently held back (0 when at a character boundary). */
  get pendingBytes(): number {
    return this.needed === 0 ? 0 : this.seen + 1;
  }

  /** Decodes `bytes`, returning the text of every character completed (or found invalid) so far. */
  write(bytes: Uint8Array): string {
    for (let i = 0; i < bytes.length; i++) this.byte(bytes[i]!);
    return this.take();
  }

  /** Ends the stream: an incomplete trailing character becomes U+FFFD. */
  end(): string {
    if (this.needed !== 0) {
      this.reset();
      this.units.push(0xfffd);
    }
    return this.take();
  }

  private reset(): void {
    this.needed = 0;
    this.seen = 0;
    this.cp = 0;
    this.lower = 0x80;
    this.upper = 0xbf;
  }

  private byte(b: number): void {
    if (this.needed === 0) {
      if (b <= 0x7f) this.units.push(b);
      else if (b >= 0xc2 && b <= 0xdf) {
        this.needed = 1;
        this.cp = b & 0x1f;
      } else if (b >= 0xe0 && b <= 0xef) {
        if (b === 0xe0) this.lower = 0xa0; // no overlong forms
        if (b === 0xed) this.upper = 0x9f; // no surrogates
        this.needed = 2;
        this.cp = b & 0x0f;
      } else if (b >= 0xf0 && b <= 0xf4) {
        if (b === 0xf0) this.lower = 0x90;
        if (b === 0xf4) this.upper = 0x8f; // ≤ U+10FFFF
        this.needed = 3;
        this.cp = b & 0x07;
      } else {
        this.units.push(0xfffd);
      }
      return;
    }
    if (b < this.lower || b > this.upper) {
      // The partial character is invalid: one U+FFFD for it, then this byte starts afresh.
      this.reset();
      this.units.push(0xfffd);
      this.byte(b);
      return;
    }
    this.lower = 0x80;
    this.upper = 0xbf;
    this.cp = (this.cp << 6) | (b & 0x3f);
    if (++this.seen === this.needed) {
      const cp = this.cp;
      this.reset();
      if (cp < 0x10000) this.units.push(cp);
      else this.units.push(0xd800 + ((cp - 0x10000) >> 10), 0xdc00 + ((cp - 0x10000) & 0x3ff));
    }
  }

  private take(): string {
    const u = this.units;
    if (u.length === 0) return "";
    let s = "";
    // Chunked to stay below the engine's argument-count limit.
    for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode.apply(null, u.slice(i, i + 8192));
    this.units = [];
    return s;
  }
}

/** Options of {@link IncrementalDetokenizer}. */
export interface DetokenizerOptions {
  /** Drop special added tokens (transformers `skip_special_tokens`). Default false. */
  skipSpecialTokens?: boolean;
}

/** Per-sequence detokenizer state: `push` each generated id, `flush` once at the end. */
export class IncrementalDetokenizer {
  private readonly utf8 = new Utf8StreamDecoder();
  private readonly skipSpecial: boolean;

  constructor(
    private readonly vocab: DetokenizerVocab,
    options: DetokenizerOptions = {},
  ) {
    this.skipSpecial = options.skipSpecialTokens ?? false;
  }

  /** Bytes of an incomplete character held back from the text returned so far. */
  get pendingBytes(): number {
    return this.utf8.pendingBytes;
  }

  /** Adds one token; returns the text it completes (often "", e.g. for the first bytes of an emoji). */
  push(id: number): string {
    const added = this.vocab.addedToken(id);
    if (added) {
      if (added.special && this.skipSpecial) return "";
      // An added token is decoded as text on its own: close the byte run before it.
      return this.utf8.end() + added.content;
    }
    const bytes = this.vocab.tokenBytes(id);
    return bytes ? this.utf8.write(bytes) : "";
  }

  /** Ends the sequence: held-back bytes of an incomplete character become U+FFFD. */
  flush(): string {
    return this.utf8.end();
  }
}

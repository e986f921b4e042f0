/**
 * Byte-level BPE encoding from compiled tables ({@link CompiledBpe}), producing the ids the `tokenizers`
 * library produces for `encode(text, add_special_tokens=False)`: added tokens split out of the raw text,
 * the rest normalized, split by the pre-tokenizer pattern, mapped to bytes and merged by rank.
 *
 * Merging follows `tokenizers`' `Word::merge_all`: a heap of (rank, position), lowest first; a popped merge
 * is applied only if the pair now at that position still makes the same token. O(n log n) per piece, so a
 * long run of letters costs no more than its length.
 */
import { compileBpe, type AddedToken, type CompiledBpe } from "./compile.ts";

/** Pieces up to this many UTF-16 units are cached (prompts repeat words; long runs are rare and unbounded). */
const CACHE_MAX_PIECE = 64;
const CACHE_MAX_ENTRIES = 8192;

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
}

/** Whitespace an added token with lstrip/rstrip absorbs (Rust `char::is_whitespace`, i.e. White_Space). */
const WS = "[\\t-\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]*";

export class BpeTokenizer {
  private readonly t: CompiledBpe;
  private readonly pieces: RegExp;
  private readonly addedPattern: RegExp | null;
  /** Id of the added token whose capture group is `i + 1` in `addedPattern`. */
  private readonly addedGroupIds: number[];
  private readonly utf8 = new TextEncoder();
  private readonly cache = new Map<string, number[]>();

  constructor(tables: CompiledBpe) {
    this.t = tables;
    this.pieces = new RegExp(tables.pattern, "gu");
    // Leftmost match, longest content first at a position (what `tokenizers`' LeftmostLongest automaton finds).
    const added = [...tables.added].sort((a, b) => b.content.length - a.content.length);
    this.addedGroupIds = added.map((a) => a.id);
    const alternatives = added.map((a) => `${a.lstrip ? WS : ""}(${escapeRegExp(a.content)})${a.rstrip ? WS : ""}`);
    this.addedPattern = alternatives.length ? new RegExp(alternatives.join("|"), "gu") : null;
  }

  /** Compiles a parsed tokenizer.json (see {@link compileBpe} for what is supported). */
  static fromTokenizerJson(tokenizerJson: unknown): BpeTokenizer {
    return new BpeTokenizer(compileBpe(tokenizerJson));
  }

  /** The tokenizer's added tokens (`<|im_start|>`, `<|image_pad|>`, …). */
  get addedTokens(): readonly AddedToken[] {
    return this.t.added;
  }

  /** Token ids of `text`, with no special tokens added around it (the chat template has them). */
  encode(text: string): number[] {
    const ids: number[] = [];
    if (!this.addedPattern) {
      this.encodeText(text, ids);
      return ids;
    }
    let at = 0;
    for (const m of text.matchAll(this.addedPattern)) {
      this.encodeText(text.slice(at, m.index), ids);
      ids.push(this.addedGroupIds[m.findIndex((g, i) => i > 0 && g !== undefined) - 1]!);
      at = m.index + m[0].length;
    }
    this.encodeText(text.slice(at), ids);
    return ids;
  }

  private encodeText(text: string, out: number[]): void {
    if (text === "") return;
    const normalized = this.t.normalizer ? text.normalize(this.t.normalizer) : text;
    let at = 0;
    for (const m of normalized.matchAll(this.pieces)) {
      if (m[0] === "") continue;
      if (m.index > at) this.encodePiece(normalized.slice(at, m.index), out);
      this.encodePiece(m[0], out);
      at = m.index + m[0].length;
    }
    if (at < normalized.length) this.encodePiece(normalized.slice(at), out);
  }

  private encodePiece(piece: string, out: number[]): void {
    const cached = this.cache.get(piece);
    if (cached) {
      for (const id of cached) out.push(id);
      return;
    }
    const ids = this.merge(this.utf8.encode(piece));
    if (piece.length <= CACHE_MAX_PIECE) {
      if (this.cache.size >= CACHE_MAX_ENTRIES) this.cache.clear();
      this.cache.set(piece, ids);
    }
    for (const id of ids) out.push(id);
  }

  /** The merge of the pair (a, b): its index in the tables, or −1. */
  private findMerge(a: number, b: number): number {
    const { mergeStart, mergeRight } = this.t;
    if (a + 1 >= mergeStart.length) return -1;
    let lo = mergeStart[a]!;
    let hi = mergeStart[a + 1]! - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = mergeRight[mid]!;
      if (r === b) return mid;
      if (r < b) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  private merge(bytes: Uint8Array): number[] {
    const n = bytes.length;
    const id = new Int32Array(n);
    for (let i = 0; i < n; i++) id[i] = this.t.byteIds[bytes[i]!]!;
    if (n < 2) return Array.from(id);
    // Symbols as a doubly linked list over positions; a merged-away symbol gets alive = 0.
    const prev = new Int32Array(n);
    const next = new Int32Array(n);
    const alive = new Uint8Array(n).fill(1);
    for (let i = 0; i < n; i++) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    const heap = new MergeHeap();
    const { mergeRank, mergeResult } = this.t;
    const push = (pos: number) => {
      const nx = next[pos]!;
      if (nx < 0) return;
      const m = this.findMerge(id[pos]!, id[nx]!);
      if (m >= 0) heap.push(mergeRank[m]!, pos, mergeResult[m]!);
    };
    for (let i = 0; i < n - 1; i++) push(i);
    while (heap.size > 0) {
      const { pos, result } = heap.pop();
      if (!alive[pos]) continue;
      const nx = next[pos]!;
      if (nx < 0) continue;
      const m = this.findMerge(id[pos]!, id[nx]!);
      if (m < 0 || mergeResult[m] !== result) continue; // stale: the pair at pos changed
      id[pos] = result;
      alive[nx] = 0;
      const after = next[nx]!;
      next[pos] = after;
      if (after >= 0) prev[after] = pos;
      if (prev[pos]! >= 0) push(prev[pos]!);
      push(pos);
    }
    const ids: number[] = [];
    for (let i = 0; i >= 0; i = next[i]!) ids.push(id[i]!);
    return ids;
  }
}

/** Min-heap of pending merges ordered by (rank, position). */
class MergeHeap {
  private rank: number[] = [];
  private pos: number[] = [];
  private result: number[] = [];

  get size(): number {
    return this.rank.length;
  }

  private less(i: number, j: number): boolean {
    return this.rank[i]! < this.rank[j]! || (this.rank[i] === this.rank[j] && this.pos[i]! < this.pos[j]!);
  }

  private swap(i: number, j: number): void {
    for (const a of [this.rank, this.pos, this.result]) [a[i], a[j]] = [a[j]!, a[i]!];
  }

  push(rank: number, pos: number, result: number): void {
    this.rank.push(rank);
    this.pos.push(pos);
    this.result.push(result);
    for (let i = this.rank.length - 1; i > 0; ) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  pop(): { pos: number; result: number } {
    const top = { pos: this.pos[0]!, result: this.result[0]! };
    const last = this.rank.length - 1;
    this.swap(0, last);
    this.rank.pop();
    this.pos.pop();
    this.result.pop();
    for (let i = 0; ; ) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < last && this.less(l, m)) m = l;
      if (r < last && this.less(r, m)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
    return top;
  }
}

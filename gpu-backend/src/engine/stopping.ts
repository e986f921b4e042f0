/**
 * When generation ends, and which text may be streamed before it does.
 *
 * Stops on: an eos token id (generation_config: 151645 `<|im_end|>`, 151643 `<|endoftext|>`), a stop
 * string appearing in the decoded text (matched across token boundaries), `max_new_tokens`, and the
 * context length (prompt + generated tokens may not exceed it; transformers' `MaxLengthCriteria`).
 * finish_reason follows OpenAI: "stop" for eos or a stop string, "length" for either limit; the
 * {@link StopCause} says which one fired (for logs and metrics — it never carries generated text).
 *
 * Streaming: text that could be the beginning of a stop string is held back until the following text
 * decides it; emitted text never contains a stop string or anything after it. Eos tokens contribute no
 * text.
 */

/** Token ids that end generation in Qwen2-VL's generation_config.json (`eos_token_id`). */
export const QWEN2_VL_EOS_TOKEN_IDS: readonly number[] = Object.freeze([151645, 151643]);

/** OpenAI-style finish reason (the public API's). */
import type { FinishReason } from "../../../shared/src/api.ts";
import { CodedError } from "../../../shared/src/errors.ts";
export type { FinishReason };

/**
 * What ended generation. For a stop string: `stopIndex` = its position in the configured list (log
 * this rather than `stop`, which is request content), `offset` = where it began in the generated text.
 */
export type StopCause =
  | { kind: "eos"; tokenId: number }
  | { kind: "stop_string"; stop: string; stopIndex: number; offset: number }
  | { kind: "max_new_tokens" }
  | { kind: "context_length" };

/** Stable codes of {@link StopConfigError}; both are also public API error codes. */
export type StopConfigErrorCode = "invalid_parameter" | "context_length_exceeded";

/** Invalid stopping configuration; `param` names the offending field. */
export class StopConfigError extends CodedError<StopConfigErrorCode> {
  readonly param: string | undefined;
  constructor(code: StopConfigErrorCode, message: string, param?: string) {
    super(code, message);
    this.param = param;
  }
}

/** Thrown when a finished {@link StoppingCriteria} is fed another token. */
export class StoppingStateError extends CodedError<"already_finished"> {
  constructor() {
    super("already_finished", "generation already finished");
  }
}

function isWellFormed(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff) {
      const d = s.charCodeAt(i + 1);
      if (!(d >= 0xdc00 && d <= 0xdfff)) return false;
      i++;
    } else if (c >= 0xdc00 && c <= 0xdfff) return false;
  }
  return true;
}

/** Result of feeding text to a {@link StopStringMatcher}. */
export interface MatchResult {
  /** Text that is now safe to emit. */
  text: string;
  /** The stop string that matched (the matcher is then finished), or null. */
  matched: string | null;
  /** Position of `matched` in the list given to the constructor, or -1. */
  stopIndex: number;
  /** UTF-16 offset of the match in all text fed so far, or -1. */
  offset: number;
}

/**
 * Finds stop strings in a stream of text deltas. Holds back the longest tail that is a proper prefix
 * of some stop string. When several stop strings occur, the one that is complete first (smallest end
 * offset; on a tie the longer one) wins, which makes the result independent of how the text was
 * split into deltas.
 */
export class StopStringMatcher {
  private readonly stops: readonly string[];
  private readonly order: ReadonlyMap<string, number>;
  private buf = "";
  private emitted = 0; // characters emitted before `buf`
  private finished = false;

  /** @throws StopConfigError `invalid_parameter` for empty or ill-formed (lone surrogate) stop strings */
  constructor(stops: readonly string[]) {
    if (!Array.isArray(stops)) throw new StopConfigError("invalid_parameter", "stop must be a list of strings", "stop");
    for (const s of stops) {
      if (typeof s !== "string" || s.length === 0 || !isWellFormed(s)) {
        throw new StopConfigError("invalid_parameter", "stop strings must be non-empty, well-formed strings", "stop");
      }
    }
    this.stops = [...new Set(stops)];
    this.order = new Map(this.stops.map((s) => [s, stops.indexOf(s)]));
  }

  /** True once a stop string matched or {@link end} was called. */
  get done(): boolean {
    return this.finished;
  }

  /** Characters currently held back. */
  get heldBack(): number {
    return this.buf.length;
  }

  /** Feeds a delta; returns what may be emitted now and whether a stop string matched. */
  push(delta: string): MatchResult {
    if (this.finished) return { text: "", matched: null, stopIndex: -1, offset: -1 };
    if (this.stops.length === 0) {
      this.emitted += delta.length;
      return { text: delta, matched: null, stopIndex: -1, offset: -1 };
    }
    const buf = this.buf + delta;
    let best: string | null = null;
    let bestStart = -1;
    let bestEnd = Infinity;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i < 0) continue;
      const end = i + s.length;
      if (end < bestEnd || (end === bestEnd && i < bestStart)) {
        best = s;
        bestStart = i;
        bestEnd = end;
      }
    }
    if (best !== null) {
      this.finished = true;
      this.buf = "";
      const offset = this.emitted + bestStart;
      this.emitted += bestStart;
      return { text: buf.slice(0, bestStart), matched: best, stopIndex: this.order.get(best)!, offset };
    }
    const hold = this.partialTail(buf);
    this.buf = buf.slice(buf.length - hold);
    const text = buf.slice(0, buf.length - hold);
    this.emitted += text.length;
    return { text, matched: null, stopIndex: -1, offset: -1 };
  }

  /** Ends the stream: the held-back text is released (no stop string can complete any more). */
  end(): string {
    if (this.finished) return "";
    this.finished = true;
    const t = this.buf;
    this.buf = "";
    this.emitted += t.length;
    return t;
  }

  /** Length of the longest suffix of `buf` that is a proper prefix of a stop string. */
  private partialTail(buf: string): number {
    let best = 0;
    for (const s of this.stops) {
      const first = s.charCodeAt(0);
      // Candidate starts: positions in the last (|s| − 1) characters holding s[0], longest first.
      for (let start = Math.max(0, buf.length - (s.length - 1)); start < buf.length; start++) {
        const len = buf.length - start;
        if (len <= best) break;
        if (buf.charCodeAt(start) === first && buf.endsWith(s.slice(0, len))) {
          best = len;
          break;
        }
      }
    }
    return best;
  }
}

/** Where generated text comes from: an {@link IncrementalDetokenizer} or anything shaped like it. */
export interface TextDeltaSource {
  push(id: number): string;
  flush(): string;
}

/** Options of {@link StoppingCriteria}. */
export interface StoppingConfig {
  /** Default {@link QWEN2_VL_EOS_TOKEN_IDS}. */
  eosTokenIds?: readonly number[];
  /** Stop strings (OpenAI `stop`); default none. */
  stopStrings?: readonly string[];
  /** ≥ 1. */
  maxNewTokens: number;
  /** Most tokens the sequence may hold, prompt included (Qwen2-VL: max_position_embeddings 32768). */
  contextLength: number;
  /** Prompt length in tokens (after image-pad expansion). */
  promptLength: number;
}

/** Outcome of one generated token. */
export interface StepResult {
  /** Text to stream now (may be ""). */
  text: string;
  /** True when generation must end after this token. */
  done: boolean;
  finishReason: FinishReason | null;
  cause: StopCause | null;
}

function checkInt(name: string, v: unknown, min: number): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    throw new StopConfigError("invalid_parameter", `${name} must be an integer ≥ ${min}`, name);
  }
  return v;
}

/**
 * Per-sequence stopping logic: feed every generated token id (including the eos that ends it) to
 * {@link step}; stream `text`; stop when `done`.
 */
export class StoppingCriteria {
  private readonly eos: ReadonlySet<number>;
  private readonly matcher: StopStringMatcher;
  private readonly maxNewTokens: number;
  private readonly contextLength: number;
  private readonly promptLength: number;
  private count = 0;
  private finishedWith: { reason: FinishReason | null; cause: StopCause | null } | null = null;

  /**
   * @throws StopConfigError `invalid_parameter` (bad numbers, eos ids or stop strings) or
   *   `context_length_exceeded` (the prompt leaves no room for a generated token)
   */
  constructor(
    config: StoppingConfig,
    private readonly source: TextDeltaSource,
  ) {
    this.maxNewTokens = checkInt("maxNewTokens", config.maxNewTokens, 1);
    this.contextLength = checkInt("contextLength", config.contextLength, 1);
    this.promptLength = checkInt("promptLength", config.promptLength, 0);
    const eos = config.eosTokenIds ?? QWEN2_VL_EOS_TOKEN_IDS;
    if (!Array.isArray(eos)) throw new StopConfigError("invalid_parameter", "eosTokenIds must be a list", "eosTokenIds");
    for (const id of eos) checkInt("eosTokenIds", id, 0);
    this.eos = new Set(eos);
    this.matcher = new StopStringMatcher(config.stopStrings ?? []);
    if (this.promptLength >= this.contextLength) {
      throw new StopConfigError(
        "context_length_exceeded",
        `prompt of ${this.promptLength} tokens leaves no room within the context length ${this.contextLength}`,
      );
    }
  }

  /** Tokens generated so far (eos included). */
  get generatedTokens(): number {
    return this.count;
  }

  /** True once a step returned done (or {@link finish} was called). */
  get done(): boolean {
    return this.finishedWith !== null;
  }

  /** finish_reason, once done (null while running or after {@link finish}). */
  get finishReason(): FinishReason | null {
    return this.finishedWith?.reason ?? null;
  }

  /** What ended generation, once done. */
  get cause(): StopCause | null {
    return this.finishedWith?.cause ?? null;
  }

  /**
   * Accounts for one generated token.
   * @throws StoppingStateError after generation finished
   */
  step(tokenId: number): StepResult {
    if (this.finishedWith) throw new StoppingStateError();
    this.count++;
    if (this.eos.has(tokenId)) {
      // The eos token itself adds no text; what was held back is final now.
      return this.end("stop", { kind: "eos", tokenId });
    }
    const r = this.matcher.push(this.source.push(tokenId));
    if (r.matched !== null) return this.stopped(r.text, r);
    if (this.count >= this.maxNewTokens) return this.end("length", { kind: "max_new_tokens" }, r.text);
    if (this.promptLength + this.count >= this.contextLength) return this.end("length", { kind: "context_length" }, r.text);
    return { text: r.text, done: false, finishReason: null, cause: null };
  }

  /**
   * Ends generation from outside (client gone, deadline, error): returns the text still held back
   * (incomplete UTF-8 → U+FFFD) up to any stop string it completes. finishReason stays null.
   */
  finish(): string {
    if (this.finishedWith) return "";
    const r = this.matcher.push(this.source.flush());
    const text = r.matched !== null ? r.text : r.text + this.matcher.end();
    this.finishedWith = { reason: null, cause: null };
    return text;
  }

  private stopped(text: string, m: MatchResult): StepResult {
    const cause: StopCause = { kind: "stop_string", stop: m.matched!, stopIndex: m.stopIndex, offset: m.offset };
    this.finishedWith = { reason: "stop", cause };
    return { text, done: true, finishReason: "stop", cause };
  }

  /** Flushes the detokenizer and the matcher; a stop string completed by the flush still wins. */
  private end(reason: FinishReason, cause: StopCause, prefix = ""): StepResult {
    const r = this.matcher.push(this.source.flush());
    if (r.matched !== null) return this.stopped(prefix + r.text, r);
    const text = prefix + r.text + this.matcher.end();
    this.finishedWith = { reason, cause };
    return { text, done: true, finishReason: reason, cause };
  }
}

/**
 * The edge→backend wire format, version 1: a *tensorized* generation request. The edge has already rendered
 * the prompt, tokenized it and expanded every `<|image_pad|>` to the image's token count, so the backend
 * receives token ids plus the image bytes and the grid the edge computed for each image; the backend
 * decodes the image and checks that its own grid agrees.
 *
 * Body layout (all integers little-endian):
 *
 *   offset 0   4 bytes  magic "MVLM"
 *          4   u16      format version (1)
 *          6   u16      reserved (0)
 *          8   u32      header length H
 *         12   H bytes  header: UTF-8 JSON (`WireHeader`)
 *     12 + H   4·N      input ids as int32, N = header.input_ids_count
 *     ...      bytes    each image's bytes, in order, `header.images[i].byte_length` each
 *
 * The body is authenticated by HMAC-SHA256 (see `signWireRequest`); the backend answers with a stream of
 * newline-delimited JSON events (`BackendEvent`), sent as soon as it admits the request: a refusal after that is
 * the stream's first event (an `error` before `start`). Refusals at admission are HTTP errors.
 */
import { ApiError, isErrorCode, type ErrorCode } from "./errors.ts";
import type { FinishReason, Usage, Timings } from "./api.ts";

export const WIRE_MAGIC = "MVLM";
export const WIRE_VERSION = 1;
export const WIRE_CONTENT_TYPE = "application/vnd.medvlm.generate.v1";
export const WIRE_EVENTS_CONTENT_TYPE = "application/x-ndjson";
export const GENERATE_PATH = "/internal/v1/generate";

/** Request headers carrying the signature. */
export const SIGNATURE_HEADER = "x-medvlm-signature";
export const TIMESTAMP_HEADER = "x-medvlm-timestamp";
/** Response header in which a backend reports its load (`active`/`queued`/`capacity`) for balancing. */
export const LOAD_HEADER = "x-medvlm-load";

const PREFIX_BYTES = 12;
const MAX_HEADER_BYTES = 64 * 1024;

export interface WireImage {
  mime: "image/png" | "image/jpeg" | "image/webp";
  byte_length: number;
  /** Dimensions read from the image header by the edge. */
  width: number;
  height: number;
  /** [t, h, w] in patches, as the edge computed with smart_resize; the backend must agree. */
  grid_thw: [number, number, number];
  /** Effective per-image bounds used for that grid (server caps narrowed by the request). */
  min_pixels: number;
  max_pixels: number;
  /** A size the request asked for (qwen_vl_utils' `resized_height`/`resized_width`): both or neither. */
  resized_height?: number;
  resized_width?: number;
}

export interface GenerationParams {
  max_new_tokens: number;
  /** 0 = greedy (the reference setting). */
  temperature: number;
  top_p: number;
  top_k: number;
  repetition_penalty: number;
  seed: number | null;
  stop: string[];
}

export interface WireHeader {
  request_id: string;
  /** `modelFingerprint()` of the tokenizer + configs the ids were made with; the backend refuses others (409). */
  model_fingerprint: string;
  input_ids_count: number;
  images: WireImage[];
  params: GenerationParams;
  /** true: NDJSON events as tokens are produced; false: a single JSON result. */
  stream: boolean;
  /** Absolute deadline (Unix ms) after which the backend gives up on the request. */
  deadline_ms: number | null;
}

export interface WireRequest {
  header: WireHeader;
  inputIds: Int32Array;
  images: Uint8Array[];
}

/** Greedy decoding with the model card's defaults. */
export const DEFAULT_PARAMS: GenerationParams = {
  max_new_tokens: 1024,
  temperature: 0,
  top_p: 1,
  top_k: 0,
  repetition_penalty: 1,
  seed: null,
  stop: [],
};

export function encodeWireRequest(req: WireRequest): Uint8Array {
  const { header, inputIds, images } = req;
  if (header.input_ids_count !== inputIds.length) throw new Error("input_ids_count does not match inputIds");
  if (header.images.length !== images.length) throw new Error("header.images does not match images");
  header.images.forEach((img, i) => {
    if (img.byte_length !== images[i]!.length) throw new Error(`image ${i}: byte_length does not match`);
  });
  const headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const imagesLength = images.reduce((n, b) => n + b.length, 0);
  const out = new Uint8Array(PREFIX_BYTES + headerBytes.length + inputIds.length * 4 + imagesLength);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode(WIRE_MAGIC), 0);
  view.setUint16(4, WIRE_VERSION, true);
  view.setUint16(6, 0, true);
  view.setUint32(8, headerBytes.length, true);
  out.set(headerBytes, PREFIX_BYTES);
  let off = PREFIX_BYTES + headerBytes.length;
  for (let i = 0; i < inputIds.length; i++, off += 4) view.setInt32(off, inputIds[i]!, true);
  for (const img of images) {
    out.set(img, off);
    off += img.length;
  }
  return out;
}

function bad(message: string): ApiError {
  return new ApiError("invalid_request", `wire format: ${message}`);
}

function isPositiveInt(x: unknown): x is number {
  return typeof x === "number" && Number.isInteger(x) && x > 0;
}

function checkHeader(h: unknown): WireHeader {
  if (h === null || typeof h !== "object") throw bad("header is not an object");
  const o = h as Record<string, unknown>;
  if (typeof o.request_id !== "string" || !/^[A-Za-z0-9._:-]{1,128}$/.test(o.request_id)) throw bad("bad request_id");
  if (typeof o.model_fingerprint !== "string" || o.model_fingerprint.length > 128) throw bad("bad model_fingerprint");
  if (!isPositiveInt(o.input_ids_count)) throw bad("bad input_ids_count");
  if (!Array.isArray(o.images) || o.images.length > 16) throw bad("bad images");
  for (const [i, im] of (o.images as unknown[]).entries()) {
    const m = (im ?? {}) as Record<string, unknown>;
    const grid = m.grid_thw;
    if (
      !["image/png", "image/jpeg", "image/webp"].includes(m.mime as string) ||
      !isPositiveInt(m.byte_length) ||
      !isPositiveInt(m.width) ||
      !isPositiveInt(m.height) ||
      !isPositiveInt(m.min_pixels) ||
      !isPositiveInt(m.max_pixels) ||
      !Array.isArray(grid) ||
      grid.length !== 3 ||
      !grid.every(isPositiveInt) ||
      (m.resized_height === undefined) !== (m.resized_width === undefined) ||
      (m.resized_height !== undefined && !(isPositiveInt(m.resized_height) && isPositiveInt(m.resized_width)))
    ) {
      throw bad(`bad image ${i}`);
    }
  }
  const p = (o.params ?? {}) as Record<string, unknown>;
  const finite = (x: unknown) => typeof x === "number" && Number.isFinite(x);
  if (
    !isPositiveInt(p.max_new_tokens) ||
    !finite(p.temperature) ||
    !finite(p.top_p) ||
    !(typeof p.top_k === "number" && Number.isInteger(p.top_k) && p.top_k >= 0) ||
    !finite(p.repetition_penalty) ||
    !(p.seed === null || (typeof p.seed === "number" && Number.isInteger(p.seed))) ||
    !(Array.isArray(p.stop) && p.stop.length <= 8 && p.stop.every((s) => typeof s === "string" && s.length > 0 && s.length <= 256))
  ) {
    throw bad("bad params");
  }
  if (typeof o.stream !== "boolean") throw bad("bad stream");
  if (!(o.deadline_ms === null || isPositiveInt(o.deadline_ms))) throw bad("bad deadline_ms");
  return o as unknown as WireHeader;
}

/** Parses and structurally validates a wire body. Semantic checks (vocabulary, grids, context) are the backend's. */
export function decodeWireRequest(body: Uint8Array): WireRequest {
  if (body.length < PREFIX_BYTES) throw bad("truncated prefix");
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  if (new TextDecoder().decode(body.subarray(0, 4)) !== WIRE_MAGIC) throw bad("bad magic");
  const version = view.getUint16(4, true);
  if (version !== WIRE_VERSION) throw new ApiError("invalid_request", `wire format: unsupported version ${version}`);
  const headerLength = view.getUint32(8, true);
  if (headerLength > MAX_HEADER_BYTES || PREFIX_BYTES + headerLength > body.length) throw bad("bad header length");
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(body.subarray(PREFIX_BYTES, PREFIX_BYTES + headerLength)));
  } catch {
    throw bad("header is not JSON");
  }
  const header = checkHeader(parsed);
  let off = PREFIX_BYTES + headerLength;
  const idsBytes = header.input_ids_count * 4;
  const imagesBytes = header.images.reduce((n, im) => n + im.byte_length, 0);
  if (off + idsBytes + imagesBytes !== body.length) throw bad("body length does not match the header");
  const inputIds = new Int32Array(header.input_ids_count);
  for (let i = 0; i < inputIds.length; i++, off += 4) inputIds[i] = view.getInt32(off, true);
  const images: Uint8Array[] = [];
  for (const im of header.images) {
    images.push(body.subarray(off, off + im.byte_length));
    off += im.byte_length;
  }
  return { header, inputIds, images };
}

// ---------------------------------------------------------------------------------------------------------
// Signing: HMAC-SHA256(key, "medvlm-wire-v1\n<timestamp>\n<hex sha256(body)>"), sent as `v1=<hex>`.
// The request id inside the (hashed) body is the replay nonce: the backend remembers ids it accepted
// within the replay window and refuses stale timestamps outside it.

export const REPLAY_WINDOW_SECONDS = 60;

function hex(buf: ArrayBuffer): string {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function hmacKey(secret: string) {
  return crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
    "verify",
  ]);
}

async function signingInput(body: Uint8Array, timestamp: number): Promise<Uint8Array> {
  const digest = hex(await crypto.subtle.digest("SHA-256", body as Uint8Array<ArrayBuffer>));
  return new TextEncoder().encode(`medvlm-wire-v1\n${timestamp}\n${digest}`);
}

/** Headers to send with `body`: timestamp (Unix seconds) and signature. */
export async function signWireRequest(
  body: Uint8Array,
  secret: string,
  nowMs: number = Date.now(),
): Promise<Record<string, string>> {
  const timestamp = Math.floor(nowMs / 1000);
  const mac = await crypto.subtle.sign("HMAC", await hmacKey(secret), (await signingInput(body, timestamp)) as Uint8Array<ArrayBuffer>);
  return { [TIMESTAMP_HEADER]: String(timestamp), [SIGNATURE_HEADER]: `v1=${hex(mac)}` };
}

function unhex(s: string): Uint8Array | null {
  if (!/^(?:[0-9a-f]{2})+$/.test(s)) return null;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/**
 * Verifies a signed body: well-formed headers, timestamp within the replay window, HMAC (constant time via
 * WebCrypto's verify). Replay of a still-fresh request is the caller's check (`ReplayGuard`), by request id.
 * Throws ApiError `invalid_signature` (401) with a message that never echoes the signature.
 */
export async function verifyWireSignature(
  body: Uint8Array,
  headers: { get(name: string): string | null },
  secret: string,
  nowMs: number = Date.now(),
): Promise<void> {
  const ts = headers.get(TIMESTAMP_HEADER);
  const sig = headers.get(SIGNATURE_HEADER);
  if (!ts || !sig) throw new ApiError("invalid_signature", "missing request signature");
  if (!/^\d{1,12}$/.test(ts)) throw new ApiError("invalid_signature", "malformed signature timestamp");
  const timestamp = Number(ts);
  if (Math.abs(nowMs / 1000 - timestamp) > REPLAY_WINDOW_SECONDS) {
    throw new ApiError("invalid_signature", "stale request signature");
  }
  const mac = sig.startsWith("v1=") ? unhex(sig.slice(3)) : null;
  if (!mac || mac.length !== 32) throw new ApiError("invalid_signature", "malformed request signature");
  const ok = await crypto.subtle.verify(
    "HMAC",
    await hmacKey(secret),
    mac as Uint8Array<ArrayBuffer>,
    (await signingInput(body, timestamp)) as Uint8Array<ArrayBuffer>,
  );
  if (!ok) throw new ApiError("invalid_signature", "bad request signature");
}

/** Remembers accepted request ids for the replay window (memory bounded by the window × request rate). */
export class ReplayGuard {
  private readonly seen = new Map<string, number>();
  constructor(private readonly windowMs: number = REPLAY_WINDOW_SECONDS * 2 * 1000) {}
  /** Throws `invalid_signature` when `id` was already accepted within the window; records it otherwise. */
  check(id: string, nowMs: number = Date.now()): void {
    for (const [k, t] of this.seen) {
      if (nowMs - t <= this.windowMs) break; // insertion order = time order
      this.seen.delete(k);
    }
    if (this.seen.has(id)) throw new ApiError("invalid_signature", "replayed request");
    this.seen.set(id, nowMs);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backend → edge events, one JSON object per line.

export type BackendEvent =
  | { type: "start"; request_id: string; prompt_tokens: number; image_tokens: number; queue_ms: number }
  | { type: "token"; id: number; text: string }
  | {
      type: "done";
      finish_reason: FinishReason;
      /** Full decoded completion, special tokens skipped (equals the concatenated token texts). */
      text: string;
      usage: Usage;
      timings: Timings;
    }
  | { type: "error"; code: ErrorCode; message: string };

export function encodeEvent(ev: BackendEvent): string {
  return `${JSON.stringify(ev)}\n`;
}

const isCount = (x: unknown): boolean => Number.isSafeInteger(x) && (x as number) >= 0;
const isMs = (x: unknown): boolean => typeof x === "number" && Number.isFinite(x) && x >= 0;
const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/** The fields the edge reads from a start, token or done event have the types {@link BackendEvent} says. */
function isWellFormed(o: Record<string, unknown>): boolean {
  switch (o.type) {
    case "start":
      return typeof o.request_id === "string" && isCount(o.prompt_tokens) && isCount(o.image_tokens) && isMs(o.queue_ms);
    case "token":
      return isCount(o.id) && typeof o.text === "string";
    default: {
      const u = o.usage;
      const details = isObject(u) ? u.completion_tokens_details : undefined;
      return (
        typeof o.text === "string" &&
        (o.finish_reason === "stop" || o.finish_reason === "length") &&
        isObject(u) &&
        isCount(u.prompt_tokens) &&
        isCount(u.image_tokens) &&
        isCount(u.completion_tokens) &&
        (details === undefined ||
          (isObject(details) && isCount(details.accepted_prediction_tokens) && isCount(details.rejected_prediction_tokens))) &&
        // The timings are spread into the client's answer: milliseconds only.
        isObject(o.timings) &&
        Object.values(o.timings).every(isMs)
      );
    }
  }
}

/** Parses one NDJSON line into an event; malformed lines and events become a `backend_error` event. */
export function parseEvent(line: string): BackendEvent {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return { type: "error", code: "backend_error", message: "malformed backend event" };
  }
  switch (o?.type) {
    case "start":
    case "token":
    case "done":
      return isWellFormed(o) ? (o as unknown as BackendEvent) : { type: "error", code: "backend_error", message: "malformed backend event" };
    case "error":
      return {
        type: "error",
        code: isErrorCode(o.code) ? o.code : "backend_error",
        message: typeof o.message === "string" ? o.message : "backend error",
      };
    default:
      return { type: "error", code: "backend_error", message: "unknown backend event" };
  }
}

/** Splits a byte stream of NDJSON into events (handles lines split across chunks and UTF-8 across chunks). */
export async function* readEvents(stream: ReadableStream<Uint8Array>): AsyncGenerator<BackendEvent> {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line) yield parseEvent(line);
      }
    }
    buf += decoder.decode();
    if (buf.trim()) yield parseEvent(buf.trim());
  } finally {
    reader.releaseLock();
  }
}

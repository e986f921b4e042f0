/**
 * Shared set-up for the backend server tests: a real HTTP server on 127.0.0.1:0 around `createBackendApp`,
 * a small model meta, and signed wire requests built with the shared encoder and signer.
 */
import { readFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { serve, type ServerType } from "@hono/node-server";
import type { ModelMeta } from "../../shared/src/model-meta.ts";
import {
  DEFAULT_PARAMS,
  GENERATE_PATH,
  WIRE_CONTENT_TYPE,
  encodeWireRequest,
  readEvents,
  signWireRequest,
  type BackendEvent,
  type WireHeader,
  type WireRequest,
} from "../../shared/src/wire.ts";
import type { Engine } from "../../gpu-backend/src/engine/engine-types.ts";
import { createBackendApp, type BackendApp, type BackendAppDeps } from "../../gpu-backend/src/server/app.ts";
import { closeServer } from "../../gpu-backend/src/server/main.ts";
import { createLogger, type Logger } from "../../gpu-backend/src/server/log.ts";

export const SECRET = "server-test-secret-0123456789abcdef";

/** A small model: vocabulary of 1000, merge size 2, context 4096. */
export const META: ModelMeta = {
  fingerprint: "fp1-servertest0000000000000000000000",
  model_type: "qwen2_vl",
  vocab_size: 1000,
  max_position_embeddings: 4096,
  image_token_id: 900,
  video_token_id: 901,
  vision_start_token_id: 902,
  vision_end_token_id: 903,
  eos_token_ids: [904],
  pad_token_id: null,
  patch_size: 14,
  merge_size: 2,
  temporal_patch_size: 2,
  min_pixels: 3136,
  max_pixels: 12845056,
};

export const CONFIG: BackendAppDeps["config"] = {
  hmacSecret: SECRET,
  queueSize: 2,
  maxNewTokensCap: 512,
  maxTotalTokens: 2048,
  maxImageTokens: 256,
  maxBodyBytes: 64 * 1024,
};

let seq = 0;
/** A unique request id (the replay guard refuses repeats). */
export function rid(prefix = "req"): string {
  return `${prefix}-${process.pid}-${++seq}-${Date.now()}`;
}

/** Fake image bytes (the fake engines do not decode): PNG magic then a pattern. */
export function imageBytes(n = 64): Uint8Array {
  const b = new Uint8Array(n);
  b.set([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  for (let i = 8; i < n; i++) b[i] = i % 251;
  return b;
}

/**
 * A valid request: `text ids, <|vision_start|>, pads, <|vision_end|>, text ids` per image; each image's grid
 * [1, 4, 4] needs 4 pads (merge 2).
 */
export function wireRequest(over: { header?: Partial<WireHeader>; inputIds?: Int32Array; images?: Uint8Array[]; grid?: [number, number, number] } = {}): WireRequest {
  const grid = over.grid ?? [1, 4, 4];
  const images = over.images ?? [imageBytes()];
  const padsPer = (grid[0] * grid[1] * grid[2]) / 4;
  const ids: number[] = [10, 11, 12];
  for (let i = 0; i < images.length; i++) ids.push(META.vision_start_token_id, ...Array(padsPer).fill(META.image_token_id), META.vision_end_token_id);
  ids.push(13, 14);
  const inputIds = over.inputIds ?? Int32Array.from(ids);
  const header: WireHeader = {
    request_id: rid(),
    model_fingerprint: META.fingerprint,
    input_ids_count: inputIds.length,
    images: images.map((b) => ({
      mime: "image/png" as const,
      byte_length: b.length,
      width: 56,
      height: 56,
      grid_thw: grid,
      min_pixels: 3136,
      max_pixels: 12845056,
    })),
    params: { ...DEFAULT_PARAMS, max_new_tokens: 64 },
    stream: true,
    deadline_ms: null,
    ...over.header,
  };
  return { header, inputIds, images };
}

export interface PostOptions {
  secret?: string;
  nowMs?: number;
  /** Change the body after signing. */
  tamper?: (body: Uint8Array) => void;
  unsigned?: boolean;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/** Encodes, signs and POSTs a wire request. */
export async function postWire(base: string, wire: WireRequest, o: PostOptions = {}): Promise<Response> {
  const body = encodeWireRequest(wire);
  const sig = o.unsigned ? {} : await signWireRequest(body, o.secret ?? SECRET, o.nowMs);
  o.tamper?.(body);
  return postRaw(base, body, { "content-type": WIRE_CONTENT_TYPE, ...sig, ...o.headers }, o.signal);
}

/** POSTs raw bytes to the generate path. */
export function postRaw(base: string, body: Uint8Array, headers: Record<string, string>, signal?: AbortSignal): Promise<Response> {
  return fetch(`${base}${GENERATE_PATH}`, { method: "POST", body: body as Uint8Array<ArrayBuffer>, headers, signal });
}

/** All NDJSON events of a response (bounded by the stream ending). */
export async function events(res: Response): Promise<BackendEvent[]> {
  const out: BackendEvent[] = [];
  for await (const ev of readEvents(res.body!)) out.push(ev);
  return out;
}

/** Collects the JSON log lines the real logger would write. */
export function memoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return { lines, ...createLogger((line) => lines.push(line)) };
}

export interface Running {
  base: string;
  app: BackendApp;
  server: ServerType;
  close(): Promise<void>;
}

/** Serves `createBackendApp` on 127.0.0.1 with an ephemeral port. */
export async function startServer(engine: Engine, over: Partial<BackendAppDeps> = {}): Promise<Running> {
  const app = createBackendApp({ engine, config: CONFIG, meta: META, ...over });
  const server = await new Promise<ServerType>((resolve) => {
    const s = serve({ fetch: app.fetch, port: 0, hostname: "127.0.0.1" }, () => resolve(s));
  });
  const { port } = server.address() as AddressInfo;
  return { base: `http://127.0.0.1:${port}`, app, server, close: () => closeServer(server, 50) };
}

/** Whether a process with this id runs: it exists (signal 0 only checks) and is not a zombie nobody reaped yet. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !/^\d+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false; // gone in between
  }
}

/** Polls `cond` every 5 ms, at most `ms`. */
export async function waitFor(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("waitFor: condition not met in time");
    await new Promise((r) => setTimeout(r, 5));
  }
}

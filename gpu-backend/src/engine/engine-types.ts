/**
 * The contract between the HTTP service (gpu-backend/src/server/) and the generation engine
 * (gpu-backend/src/engine/). The engine runs continuous batching inside one worker thread that owns the
 * ONNX Runtime sessions; `server/worker-bridge.ts` exposes the same interface on the main thread.
 *
 * Delivery rules every implementation keeps (the server relies on them):
 * - `submit` never throws for a bad request: every problem becomes an `error` event through `sink`.
 * - Events for one request arrive in order: optionally `start`, then `token`s, then exactly one terminal
 *   event (`done` or `error`). Nothing follows the terminal event.
 * - Image decoding and the grid check happen before `start`; an `error` before `start` means the request
 *   was refused (e.g. `invalid_image` 422; `invalid_request` when the grid of the decoded image differs from
 *   `expectedGrid` or the `<|image_pad|>` count differs from the grid's token count).
 * - `cancel(id)` frees the request's memory at once and silences it: once `cancel` returns, `sink` is never
 *   called again for `id` (no `cancelled` event, so no new error code is needed). The caller, which decided to
 *   cancel, writes the request's final answer itself (`backend_timeout`, `backend_unavailable`, or nothing
 *   for a client that went away). Cancelling an unknown or finished id does nothing.
 */
import type { ModelMeta } from "../../../shared/src/model-meta.ts";
import type { BackendEvent, GenerationParams } from "../../../shared/src/wire.ts";

/** One request image, still encoded; the engine decodes it and checks its grid. */
export interface EngineImage {
  bytes: Uint8Array;
  mime: string;
  /** Effective per-image pixel bounds the edge used for `expectedGrid`. */
  minPixels: number;
  maxPixels: number;
  /** The size the request asked for (qwen_vl_utils' `resized_height`/`resized_width`), if any: it replaces the bounds. */
  resizedHeight?: number;
  resizedWidth?: number;
  /** [t, h, w] in patches, as the edge computed it; the engine refuses the request when its own grid differs. */
  expectedGrid: [number, number, number];
}

/** A validated generation request (the server has checked vocabulary, pad counts, context and params). */
export interface EngineRequest {
  /** The wire request id (unique among live requests; the replay guard makes it so). */
  id: string;
  /** Expanded prompt ids: each image's `<|image_pad|>` already repeated t·h·w/merge² times. */
  inputIds: Int32Array;
  images: EngineImage[];
  params: GenerationParams;
  /** Absolute deadline (Unix ms) or null; the server also enforces it (cancel + `backend_timeout`). */
  deadlineMs: number | null;
}

/**
 * An event of one request. `request_id` (not `id`: token events already use `id` for the token id) names the
 * request; it is the same value as `start.request_id`.
 */
export type EngineEvent = BackendEvent & { request_id: string };

/** A snapshot of the engine's load; cheap, synchronous. */
export interface EngineStats {
  /** Sequences being generated now: the running batch and the request being admitted (preprocessing or prefill). */
  active: number;
  /** Submitted requests waiting for a batch slot. */
  queued: number;
  /** Batch size: how many sequences run at once (MAX_BATCH). */
  capacity: number;
  /** Model loaded and warmed up: requests are served. */
  ready: boolean;
  /** A part of the engine stopped for good (a vision process that could not be started again): only a restart helps. */
  failed?: boolean;
  /**
   * The engine's thread has not answered for longer than the server's stall limit (ENGINE_STALL_S): it is stuck in
   * one run (a hung runtime or device). Not ready while it lasts; clears when the thread answers again.
   */
  stalled?: boolean;
  /** Times the vision process was started again: an encoding cancelled while it ran, or the process died. */
  visionRestarts?: number;
}

/** The generation engine. See the module comment for the delivery rules. */
export interface Engine {
  /** Starts a request; its events arrive through `sink` in order (see the module comment). */
  submit(req: EngineRequest, sink: (ev: EngineEvent) => void): void;
  /** Frees the request's memory at once; `sink` is not called again for `id` after this returns. */
  cancel(id: string): void;
  stats(): EngineStats;
  /** Stops the engine and releases its sessions; requests still live get no further events. */
  close(): Promise<void>;
  /** The loaded model's meta, when the engine knows it (the bridge forwards it from the worker). */
  readonly meta?: ModelMeta;
}

/**
 * What `gpu-backend/src/engine/index.ts` exports as `createEngine`: builds the engine (loads the model, warms
 * it up) inside the engine's worker thread. `options` is the backend config (structured-cloneable).
 */
export type EngineFactory<O = unknown> = (options: O) => Engine | Promise<Engine>;

/**
 * Calls the GPU backends: signs the wire request, picks the least-loaded healthy backend, fails over to the
 * next one when a backend cannot be reached or reports overload before answering, and maps every failure to a
 * stable error. The client's cancellation (`signal`) aborts the backend call, which stops the backend's work.
 */
import { ApiError } from "../../../shared/src/errors.ts";
import {
  GENERATE_PATH,
  LOAD_HEADER,
  WIRE_CONTENT_TYPE,
  encodeWireRequest,
  signWireRequest,
  type WireRequest,
} from "../../../shared/src/wire.ts";
import type { EdgeConfig } from "../config.ts";
import { log } from "../log.ts";

interface BackendState {
  /** Reported load in [0, ∞): (active + queued) / capacity. */
  load: number;
  /** Unix ms before which the backend is skipped after a failure. */
  downUntil: number;
}

/** Per-isolate view of the backends (isolates are short-lived; this is a hint, not a registry). */
const state = new Map<string, BackendState>();
const DOWN_MS = 10_000;

/** Parses `x-medvlm-load: active=3;queued=1;capacity=8`. */
export function parseLoad(header: string | null): number | null {
  if (!header) return null;
  const f = Object.fromEntries(
    header.split(";").map((kv) => {
      const [k, v] = kv.split("=");
      return [k?.trim(), Number(v)];
    }),
  );
  const capacity = f.capacity > 0 ? f.capacity : 1;
  const busy = (Number.isFinite(f.active) ? f.active : 0) + (Number.isFinite(f.queued) ? f.queued : 0);
  return busy / capacity;
}

/** Healthy backends first, least loaded first; ties keep the configured order. Down ones last (still tried). */
export function orderBackends(urls: string[], now: number = Date.now()): string[] {
  const rank = (u: string) => {
    const s = state.get(u);
    const down = s && s.downUntil > now ? 1 : 0;
    return [down, s?.load ?? 0] as const;
  };
  return urls
    .map((u, i) => ({ u, i, r: rank(u) }))
    .sort((a, b) => a.r[0] - b.r[0] || a.r[1] - b.r[1] || a.i - b.i)
    .map((x) => x.u);
}

function noteLoad(url: string, res: Response): void {
  const load = parseLoad(res.headers.get(LOAD_HEADER));
  const s = state.get(url) ?? { load: 0, downUntil: 0 };
  if (load !== null) s.load = load;
  s.downUntil = 0;
  state.set(url, s);
}

function markDown(url: string): void {
  const s = state.get(url) ?? { load: 0, downUntil: 0 };
  s.downUntil = Date.now() + DOWN_MS;
  state.set(url, s);
}

/** Test hook: forget what this isolate learned about backends. */
export function resetBackendState(): void {
  state.clear();
}

async function errorFromResponse(res: Response): Promise<ApiError> {
  let code: string | undefined;
  let message = "";
  try {
    const body = (await res.json()) as { error?: { code?: string; message?: string } };
    code = body.error?.code;
    message = body.error?.message ?? "";
  } catch {
    // not our JSON: fall through to the status mapping
  }
  // Client-side problems the backend found in the request itself (e.g. an image that does not decode).
  if (res.status === 422 && code && ["invalid_image", "too_many_image_tokens", "context_length_exceeded", "invalid_parameter", "unsupported_media_type", "image_too_large"].includes(code)) {
    return new ApiError(code as "invalid_image", message || "the backend refused the request");
  }
  if (res.status === 503) {
    const retryAfter = res.headers.get("retry-after") ?? "1";
    return new ApiError("backend_overloaded", "the model is busy; retry later", { "Retry-After": retryAfter });
  }
  if (res.status === 504) return new ApiError("backend_timeout", "the model did not answer in time");
  // 401/409/400 mean the edge and backend disagree (keys, model version): a server fault, not the client's.
  return new ApiError("backend_error", `the model backend failed (${res.status}${code ? ` ${code}` : ""})`);
}

export interface BackendCall {
  response: Response;
  backend: string;
  /** Fires when the request's time at the backend (BACKEND_TIMEOUT_MS) is up; it also aborts the body. */
  timeout: AbortSignal;
}

/**
 * Sends the request; resolves with the first backend response that is OK (2xx), whose body the caller reads.
 * Retries on the next backend for connection failures and 503 overload; a definite answer (other errors) is
 * final. The timeout covers the whole call, headers and body (it is also the deadline sent to the backend).
 */
export async function callBackend(
  config: EdgeConfig,
  req: WireRequest,
  signal: AbortSignal,
  fetcher: typeof fetch = fetch,
): Promise<BackendCall> {
  const body = encodeWireRequest(req);
  let lastError: ApiError = new ApiError("backend_unavailable", "no model backend is reachable", { "Retry-After": "5" });
  let attempt = 0;
  for (const url of orderBackends(config.backendUrls)) {
    attempt++;
    if (signal.aborted) throw new ApiError("backend_unavailable", "request cancelled");
    const headers = { "content-type": WIRE_CONTENT_TYPE, ...(await signWireRequest(body, config.backendSecret)) };
    const timeout = AbortSignal.timeout(config.backendTimeoutMs);
    let res: Response;
    try {
      res = await fetcher(`${url}${GENERATE_PATH}`, {
        method: "POST",
        headers,
        body,
        signal: AbortSignal.any([signal, timeout]),
      });
    } catch (e) {
      if (signal.aborted) throw new ApiError("backend_unavailable", "request cancelled");
      if (timeout.aborted) {
        log("warn", "backend timeout", { request_id: req.header.request_id, backend: url, attempt });
        throw new ApiError("backend_timeout", "the model did not answer in time");
      }
      log("warn", "backend unreachable", { request_id: req.header.request_id, backend: url, attempt });
      markDown(url);
      continue;
    }
    if (res.ok) {
      noteLoad(url, res);
      return { response: res, backend: url, timeout };
    }
    const err = await errorFromResponse(res);
    if (err.code === "backend_overloaded") {
      noteLoad(url, res);
      lastError = err;
      continue;
    }
    log("warn", "backend error", { request_id: req.header.request_id, backend: url, status: res.status, code: err.code, attempt });
    throw err;
  }
  throw lastError;
}

/**
 * Calls the GPU backends: signs the wire request, picks the least-loaded healthy backend, fails over to the
 * next one when a backend cannot be reached, does not answer, is overloaded or fails before generating, and maps
 * every failure to a stable error. The client's cancellation (`signal`) aborts the backend call, which stops the
 * backend's work.
 */
import { ApiError, type ErrorCode } from "../../../shared/src/errors.ts";
import {
  GENERATE_PATH,
  LOAD_HEADER,
  WIRE_CONTENT_TYPE,
  encodeWireRequest,
  readEvents,
  signWireRequest,
  type BackendEvent,
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

/** Codes a backend finds in the request itself (e.g. an image that does not decode): the client's to fix. */
const REQUEST_VERDICTS: ReadonlySet<string> = new Set<ErrorCode>([
  "invalid_image",
  "too_many_image_tokens",
  "context_length_exceeded",
  "invalid_parameter",
  "unsupported_media_type",
  "image_too_large",
]);

/**
 * What the client is told of an error a backend reported after answering 200 (an `error` event in its
 * stream): its verdicts on the request and its busy/timeout states pass, with their meaning; anything else
 * (a signature, model or engine fault) is the backend's failure, a 502 whose message reveals nothing of it.
 */
export function clientErrorOf(code: string, message: string): ApiError {
  if (REQUEST_VERDICTS.has(code)) return new ApiError(code as ErrorCode, message || "the backend refused the request");
  if (code === "backend_overloaded" || code === "backend_unavailable") {
    return new ApiError(code, "the model is busy; retry later", { "Retry-After": "1" });
  }
  if (code === "backend_timeout") return new ApiError("backend_timeout", "the model did not finish in time");
  return new ApiError("backend_error", "the model backend failed");
}

async function errorFromResponse(res: Response): Promise<ApiError> {
  let code: string | undefined;
  let message = "";
  try {
    const body = (await res.json()) as { error?: { code?: string; message?: string } };
    code = body.error?.code;
    message = body.error?.message ?? "";
  } catch {
    // not our JSON (e.g. a proxy's error page): fall through to the status mapping
  }
  if (res.status === 422 && code && REQUEST_VERDICTS.has(code)) return clientErrorOf(code, message);
  if (res.status === 503) {
    const retryAfter = res.headers.get("retry-after") ?? "1";
    // Starting, draining or stalled: not a full queue, so the backend is skipped for a while (below), not ranked by load.
    if (code === "backend_unavailable") return new ApiError("backend_unavailable", "the model is not available; retry later", { "Retry-After": retryAfter });
    return new ApiError("backend_overloaded", "the model is busy; retry later", { "Retry-After": retryAfter });
  }
  if (res.status === 504) return new ApiError("backend_timeout", "the model did not answer in time");
  // 401/409/400 mean the edge and this backend disagree (keys, model version), 5xx/404 that it (or the proxy
  // in front of it) failed: a server fault, not the client's.
  return new ApiError("backend_error", `the model backend failed (${res.status}${code ? ` ${code}` : ""})`);
}

export interface BackendCall {
  /** The backend's events from its first (usually `start`), which showed that this backend serves the request. */
  events: AsyncIterable<BackendEvent>;
  backend: string;
  /** Fires when the request's time at the backend (BACKEND_TIMEOUT_MS) is up; it also aborts the body. */
  timeout: AbortSignal;
}

/**
 * Whether a backend's refusal (before it generated anything) ends the request: a verdict on the request, or its
 * deadline spent. Otherwise the next backend is tried, and one that failed (not merely busy) is skipped for a while.
 */
function isFinal(err: ApiError): boolean {
  return err.code === "backend_timeout" || REQUEST_VERDICTS.has(err.code);
}

/** `first`, then the rest of `rest`; returning early releases `rest` (its body's reader). */
async function* resume(first: BackendEvent, rest: AsyncIterator<BackendEvent>): AsyncGenerator<BackendEvent> {
  try {
    yield first;
    for (let r = await rest.next(); !r.done; r = await rest.next()) yield r.value;
  } finally {
    await rest.return?.(undefined);
  }
}

/**
 * Sends the request; resolves once a backend serves it: its response is OK (2xx) and its first event is not an
 * error. Backends answer on admission, before queueing, so one that sends no headers within
 * BACKEND_HEADERS_TIMEOUT_MS is taken for down. Retries on the next backend when one cannot be reached, does not
 * answer, is overloaded (503) or fails before generating (an HTTP error, or an `error` event before any other),
 * unless the failure is final ({@link isFinal}); nothing was generated yet, so a retry is safe. BACKEND_TIMEOUT_MS
 * covers the whole call, headers and body (it is also the deadline sent to the backend).
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
    const headers = { "content-type": WIRE_CONTENT_TYPE, ...config.backendAccessHeaders, ...(await signWireRequest(body, config.backendSecret)) };
    const timeout = AbortSignal.timeout(config.backendTimeoutMs);
    const silent = new AbortController();
    const silentTimer = setTimeout(() => silent.abort(), Math.min(config.backendHeadersTimeoutMs, config.backendTimeoutMs));
    // The backend was not reached, went silent, or its stream broke: the error that ends the call (a client that
    // left, the request's time spent), or null after marking the backend down, to try the next one.
    const lost = (what: string) => {
      if (signal.aborted) return new ApiError("backend_unavailable", "request cancelled");
      if (timeout.aborted) {
        log("warn", "backend timeout", { request_id: req.header.request_id, backend: url, attempt });
        return new ApiError("backend_timeout", "the model did not answer in time");
      }
      log("warn", what, { request_id: req.header.request_id, backend: url, attempt });
      markDown(url);
      return null;
    };
    let res: Response;
    try {
      res = await fetcher(`${url}${GENERATE_PATH}`, {
        method: "POST",
        headers,
        body,
        signal: AbortSignal.any([signal, timeout, silent.signal]),
      });
    } catch {
      const err = lost(silent.signal.aborted ? "backend did not answer" : "backend unreachable");
      if (err) throw err;
      continue;
    } finally {
      clearTimeout(silentTimer);
    }
    let err: ApiError;
    if (res.ok) {
      noteLoad(url, res);
      // The first event decides, as a status would: an error before any other is the backend's refusal.
      const events = res.body ? readEvents(res.body)[Symbol.asyncIterator]() : null;
      let first: IteratorResult<BackendEvent> | null = null;
      try {
        first = events ? await events.next() : null;
      } catch {
        const gone = lost("backend stream broke before start");
        if (gone) throw gone;
        continue;
      }
      if (events && first && !first.done && first.value.type !== "error") return { events: resume(first.value, events), backend: url, timeout };
      await events?.return?.(undefined);
      void res.body?.cancel().catch(() => {});
      const refusal = first && !first.done && first.value.type === "error" ? first.value : null;
      err = refusal ? clientErrorOf(refusal.code, refusal.message) : new ApiError("backend_error", "the model backend answered without events");
    } else {
      err = await errorFromResponse(res);
    }
    if (isFinal(err)) throw err;
    lastError = err;
    if (err.code === "backend_overloaded") {
      noteLoad(url, res);
      continue;
    }
    log("warn", "backend error", { request_id: req.header.request_id, backend: url, status: res.status, code: err.code, attempt });
    markDown(url);
  }
  throw lastError;
}

/**
 * Per-subject rate limiting: a token bucket (sustained rate + burst) and a cap on concurrent
 * requests, enforced by one `RateLimiter` Durable Object per subject. Runs after authentication
 * (it reads `c.get("auth").subjectHash`).
 *
 * Every response carries the IETF `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
 * headers; refusals are 429 with `Retry-After` and code `rate_limited` or `too_many_concurrent`.
 * The concurrency slot is held until the response body has been fully sent or the client went away
 * (streamed generations included), and expires on its own after `leaseTtlMs` as a backstop.
 */
import type { Context, MiddlewareHandler } from "hono";
import { HTTPException } from "hono/http-exception";
import { ApiError } from "../../../../shared/src/errors.ts";
import { log } from "../../log.ts";
import type { AcquireParams, AcquireResult, RateLimiter, RateLimitState } from "./durable-object.ts";
import { DEFAULT_LEASE_TTL_MS, positiveNumber, RateLimitConfigError, validateLimits } from "./limits.ts";

export { DEFAULT_LEASE_TTL_MS, RateLimitConfigError } from "./limits.ts";
export type { AcquireGranted, AcquireRefused, AcquireResult, RateLimitState } from "./durable-object.ts";

/** Options of {@link rateLimit}. */
export interface RateLimitOptions {
  /** Sustained requests per minute per subject (> 0; fractional allowed). */
  rpm: number;
  /** Requests a subject may make back to back (positive integer). */
  burst: number;
  /** Requests a subject may have in flight at once (positive integer). */
  maxConcurrent: number;
  /** Backstop lifetime of a concurrency slot in ms, for requests that never finish (default 10 min). */
  leaseTtlMs?: number;
}

/**
 * The part of the auth middleware's `auth` variable this middleware reads; jwt-auth's
 * `AuthContext` (`{ subject, scopes, subjectHash }`) satisfies it structurally.
 */
export interface RateLimitAuth {
  /** Stable hash of the subject: the Durable Object name and the only identity ever logged. */
  readonly subjectHash: string;
}

/** Hono environment of {@link rateLimit}. */
export interface RateLimitEnv {
  Bindings: { RATE_LIMITER: DurableObjectNamespace };
  Variables: { auth: RateLimitAuth };
}

/** The environment variables {@link rateLimitOptionsFromEnv} reads (a subset of `EdgeEnv`). */
export interface RateLimitEnvVars {
  RATE_LIMIT_RPM?: string;
  RATE_LIMIT_BURST?: string;
  RATE_LIMIT_MAX_CONCURRENT?: string;
}

/**
 * Reads the limits from `RATE_LIMIT_RPM`, `RATE_LIMIT_BURST` and `RATE_LIMIT_MAX_CONCURRENT`.
 * Throws {@link RateLimitConfigError} naming the variable when one is missing, not a number, or not
 * positive (burst and concurrency must also be integers): a misconfigured limiter must stop the
 * worker at startup, not silently let everything through.
 */
export function rateLimitOptionsFromEnv(env: RateLimitEnvVars): Required<RateLimitOptions> {
  return {
    rpm: fromVar("RATE_LIMIT_RPM", env.RATE_LIMIT_RPM, false),
    burst: fromVar("RATE_LIMIT_BURST", env.RATE_LIMIT_BURST, true),
    maxConcurrent: fromVar("RATE_LIMIT_MAX_CONCURRENT", env.RATE_LIMIT_MAX_CONCURRENT, true),
    leaseTtlMs: DEFAULT_LEASE_TTL_MS,
  };
}

function fromVar(name: string, raw: string | undefined, integer: boolean): number {
  if (raw === undefined || raw.trim() === "") {
    throw new RateLimitConfigError(name, `rate limit setting ${name} is not set`);
  }
  // Number() rather than parseInt: "10abc" must be rejected, not read as 10.
  const value = Number(raw);
  if (!Number.isFinite(value)) {
    throw new RateLimitConfigError(name, `rate limit setting ${name} must be a number, got ${JSON.stringify(raw)}`);
  }
  return positiveNumber(name, value, integer);
}

/** The IETF RateLimit header fields for a limiter outcome. */
export function rateLimitHeaders(state: RateLimitState): Record<string, string> {
  return {
    "RateLimit-Limit": String(state.limit),
    "RateLimit-Remaining": String(state.remaining),
    "RateLimit-Reset": String(state.resetSeconds),
  };
}

/**
 * Rate-limits each authenticated subject. Options are validated when the middleware is built
 * (throws {@link RateLimitConfigError}).
 *
 * Refusals are thrown as an `HTTPException` whose response is complete (status, JSON body
 * `{ error: { code, message } }`, headers), so they render with Hono's default error handler; its
 * `cause` is the equivalent {@link ApiError} for an app-wide handler (same contract as jwt-auth).
 *
 * Fails closed: when the Durable Object can't be reached the request is refused with 503
 * `backend_unavailable` instead of being let through. This is a medical API in front of a small,
 * expensive GPU pool; an unmetered burst during a limiter outage would starve every other client,
 * while a brief 503 is retried safely. A request that reaches this middleware without `auth` is
 * refused with 500 `internal_error` for the same reason (it means the middleware order is wrong).
 */
export function rateLimit(options: RateLimitOptions): MiddlewareHandler<RateLimitEnv> {
  const limits = validateLimits(options);

  return async (c, next) => {
    const subjectHash = c.get("auth")?.subjectHash;
    if (typeof subjectHash !== "string" || subjectHash === "") {
      log("error", "rate limiter reached without an authenticated subject (middleware order)");
      throw refusal(new ApiError("internal_error", "internal error"));
    }

    // The binding is declared untyped in EdgeEnv; its class is RateLimiter (wrangler.toml).
    const namespace = c.env.RATE_LIMITER as unknown as DurableObjectNamespace<RateLimiter>;
    let stub: DurableObjectStub<RateLimiter>;
    let result: AcquireResult;
    try {
      stub = namespace.get(namespace.idFromName(subjectHash));
      const params: AcquireParams = { ...limits };
      result = await stub.acquire(params);
    } catch (err) {
      logFailure("rate limiter unavailable", subjectHash, err);
      throw refusal(
        new ApiError(
          "backend_unavailable",
          "The rate limiter is temporarily unavailable, so the request was not admitted. Please retry shortly.",
          { "Retry-After": "1" },
        ),
      );
    }

    const headers = rateLimitHeaders(result);
    if (!result.ok) {
      headers["Retry-After"] = String(Math.max(1, Math.ceil(result.retryAfterSeconds)));
      const error =
        result.reason === "rate"
          ? new ApiError(
              "rate_limited",
              `Rate limit exceeded (${limits.rpm} requests per minute, bursts of ${limits.burst}). Retry after ${headers["Retry-After"]} s.`,
              headers,
            )
          : new ApiError(
              "too_many_concurrent",
              `Too many concurrent requests (at most ${limits.maxConcurrent} in flight per client). Retry when an earlier request has finished.`,
              headers,
            );
      throw refusal(error);
    }

    const release = releaseOnce(c, stub, result.leaseId, subjectHash);
    try {
      await next();
    } catch (err) {
      release();
      throw err;
    }

    const res = c.res;
    // No body will be streamed: a failed handler, an empty response, or HEAD (Hono drops the GET
    // body without cancelling it, so waiting for the stream would hold the slot until the TTL).
    const releaseNow = c.error !== undefined || res.body === null || c.req.method === "HEAD";
    const body = res.body && !releaseNow ? releaseWhenDone(res.body, release) : res.body;
    if (releaseNow) release();
    // A fresh Response: the handler's may have immutable headers (e.g. a proxied fetch response).
    const out = new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
    for (const [name, value] of Object.entries(headers)) out.headers.set(name, value);
    c.res = out;
  };
}

/** The HTTPException carrying the complete refusal response; `cause` is the ApiError. */
function refusal(error: ApiError): HTTPException {
  const res = new Response(JSON.stringify(error.toBody()), {
    status: error.status,
    headers: { ...error.headers, "Content-Type": "application/json; charset=UTF-8", "Cache-Control": "no-store" },
  });
  return new HTTPException(error.status as 429 | 500 | 503, { res, message: error.message, cause: error });
}

/** A release callback that runs at most once, in the background (`waitUntil`) so it outlives the response. */
function releaseOnce(c: Context, stub: DurableObjectStub<RateLimiter>, leaseId: string, subjectHash: string): () => void {
  let released = false;
  return () => {
    if (released) return;
    released = true;
    const done = stub.release(leaseId).then(
      () => undefined,
      // The lease then expires after its TTL; nothing else to do.
      (err: unknown) => logFailure("rate limiter release failed", subjectHash, err),
    );
    try {
      c.executionCtx.waitUntil(done);
    } catch {
      // No ExecutionContext (e.g. a bare app.fetch): the promise still runs and can't reject.
    }
  };
}

/**
 * Passes `source` through unchanged and calls `onDone` once it ends: fully read, failed, or
 * cancelled by the consumer (client disconnect), forwarding the cancellation upstream.
 */
function releaseWhenDone(source: ReadableStream<Uint8Array>, onDone: () => void): ReadableStream<Uint8Array> {
  const reader = source.getReader();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (err) {
          onDone();
          controller.error(err);
          return;
        }
        if (chunk.done) {
          onDone();
          controller.close();
        } else {
          controller.enqueue(chunk.value);
        }
      },
      async cancel(reason) {
        onDone();
        await reader.cancel(reason);
      },
    },
    // Pull only on demand, so the upstream (the generation stream) is never read ahead of the client.
    { highWaterMark: 0 },
  );
}

/** Logs a limiter failure by subject hash and error class only (never the raw subject). */
function logFailure(what: string, subjectHash: string, err: unknown): void {
  const kind = err instanceof Error ? err.name : typeof err;
  log("error", `${what}: ${kind}`, { subject_hash: subjectHash });
}

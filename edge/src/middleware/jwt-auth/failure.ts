/**
 * The failures the JWT auth middleware can report, each with a stable code from the public API's
 * error table and a fixed description. Descriptions are constants chosen here: they never echo the
 * token, its claims or anything else the client sent.
 */
import { HTTPException } from "hono/http-exception";
import { ApiError, CodedError } from "../../../../shared/src/errors.ts";

/** Codes this middleware reports (a subset of `ErrorCode` in shared/src/errors.ts). */
export type JwtAuthErrorCode = "missing_token" | "invalid_token" | "token_expired" | "insufficient_scope" | "auth_unavailable" | "internal_error";

/** An authentication failure, before it is turned into a response by {@link toHttpException}. */
export class JwtAuthError extends CodedError<JwtAuthErrorCode> {}

/** Generic message of a 500: a misconfiguration is not the client's business. */
export const INTERNAL_MESSAGE = "internal error";

/** The message of a 503 `auth_unavailable`: the key source is down, which says nothing about the token. */
export const KEYS_UNAVAILABLE_MESSAGE = "the token issuer's keys are unavailable; retry later";

/** Seconds a client should wait after `auth_unavailable` (about a JWKS fetch's cooldown). */
const KEYS_RETRY_AFTER_S = "5";

/**
 * The RFC 6750 §3 challenge for a failure. No token at all → a bare challenge (§3.1: no error code
 * when the client sent no credentials); a bad token → `invalid_token` with a description; a valid
 * token without the scope → `insufficient_scope` naming the scope. 500s and 503s carry no challenge.
 */
export function challengeFor(err: JwtAuthError, realm: string, requiredScope?: string): string | undefined {
  switch (err.code) {
    case "missing_token":
      return `Bearer realm="${realm}"`;
    case "invalid_token":
    case "token_expired":
      return `Bearer realm="${realm}", error="invalid_token", error_description="${err.message}"`;
    case "insufficient_scope":
      return `Bearer realm="${realm}", error="insufficient_scope"${requiredScope ? `, scope="${requiredScope}"` : ""}`;
    case "auth_unavailable":
    case "internal_error":
      return undefined;
  }
}

/**
 * The `HTTPException` thrown for a failure: its `res` is the complete response (status, JSON body
 * `{ error: { code, message } }`, `WWW-Authenticate`), so the middleware works with Hono's default
 * error handler; its `cause` is the equivalent {@link ApiError} for an app-wide handler that wants to
 * render every error the same way (e.g. adding a request id).
 */
export function toHttpException(err: JwtAuthError, realm: string, requiredScope?: string): HTTPException {
  const challenge = challengeFor(err, realm, requiredScope);
  const headers: Record<string, string> = challenge ? { "WWW-Authenticate": challenge } : {};
  if (err.code === "auth_unavailable") headers["Retry-After"] = KEYS_RETRY_AFTER_S;
  const apiError = new ApiError(err.code, err.message, headers);
  const res = new Response(JSON.stringify(apiError.toBody()), {
    status: apiError.status,
    headers: { ...headers, "Content-Type": "application/json; charset=UTF-8", "Cache-Control": "no-store" },
  });
  return new HTTPException(apiError.status as 401 | 403 | 500 | 503, { res, message: err.message, cause: apiError });
}

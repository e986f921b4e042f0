/**
 * Stable error codes of the public API and the internal edge→backend API.
 * Clients branch on `code`, never on `message`; codes are never renamed.
 */
export const ERROR_STATUS = {
  invalid_request: 400,
  invalid_json: 400,
  missing_token: 401,
  invalid_token: 401,
  token_expired: 401,
  invalid_signature: 401,
  insufficient_scope: 403,
  not_found: 404,
  method_not_allowed: 405,
  model_mismatch: 409,
  payload_too_large: 413,
  unsupported_media_type: 415,
  invalid_image: 422,
  image_too_large: 422,
  image_too_small: 422,
  aspect_ratio_too_large: 422,
  too_many_image_tokens: 422,
  invalid_question: 422,
  invalid_options: 422,
  invalid_parameter: 422,
  remote_image_url: 422,
  context_length_exceeded: 422,
  rate_limited: 429,
  too_many_concurrent: 429,
  internal_error: 500,
  backend_error: 502,
  backend_unavailable: 503,
  /** The token issuer's keys (JWKS) cannot be fetched: nothing is wrong with the token; retry. */
  auth_unavailable: 503,
  backend_overloaded: 503,
  backend_timeout: 504,
} as const;

export type ErrorCode = keyof typeof ERROR_STATUS;

/** JSON body of every error response: `{ error: { code, message } }`. */
export interface ErrorBody {
  error: { code: ErrorCode; message: string; request_id?: string };
}

/** An error whose `name` is its class's name (what logs and `instanceof`-free checks see). */
export class NamedError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * Base of the project's typed errors, as jose's: `code` is stable and what callers branch on (never the
 * message); subclasses narrow `C` to their codes and add their own fields.
 */
export class CodedError<C extends string> extends NamedError {
  readonly code: C;
  constructor(code: C, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** An error that carries a stable code; its HTTP status follows from the code. */
export class ApiError extends CodedError<ErrorCode> {
  readonly status: number;
  /** Extra response headers (e.g. `Retry-After`, `WWW-Authenticate`). */
  readonly headers: Record<string, string>;
  constructor(code: ErrorCode, message: string, headers: Record<string, string> = {}) {
    super(code, message);
    this.status = ERROR_STATUS[code];
    this.headers = headers;
  }
  toBody(requestId?: string): ErrorBody {
    return { error: { code: this.code, message: this.message, ...(requestId ? { request_id: requestId } : {}) } };
  }
}

export function isErrorCode(x: unknown): x is ErrorCode {
  return typeof x === "string" && Object.prototype.hasOwnProperty.call(ERROR_STATUS, x);
}

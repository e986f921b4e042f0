/**
 * Validation of rate-limit configuration. Limits are operator configuration, so a bad value is a
 * startup error with a message naming the setting, never a silently disabled limiter.
 */
import { ConfigError } from "../../config.ts";

/** How long a concurrency lease lives if nobody releases it (a crashed or evicted request). */
export const DEFAULT_LEASE_TTL_MS = 10 * 60_000;

/** Fully resolved limits of one subject, as the Durable Object receives them. */
export interface RateLimitLimits {
  /** Sustained requests per minute (the bucket's refill rate); > 0, may be fractional. */
  rpm: number;
  /** Bucket capacity: requests allowed back to back; a positive integer. */
  burst: number;
  /** Requests in flight at once per subject; a positive integer. */
  maxConcurrent: number;
  /** Lifetime of a concurrency lease in milliseconds; a positive integer. */
  leaseTtlMs: number;
}

/**
 * A rate-limit setting is missing, not a number, or not positive. A `ConfigError`, so the app's
 * error handler logs it and answers 500 `internal_error` like any other misconfiguration.
 */
export class RateLimitConfigError extends ConfigError {
  override name = "RateLimitConfigError";
  /** The option or environment variable at fault, e.g. `RATE_LIMIT_RPM`. */
  readonly setting: string;
  constructor(setting: string, message: string) {
    super(message);
    this.setting = setting;
  }
}

/**
 * Checks one numeric setting: finite, > 0 and (when `integer`) whole. `setting` names it in the
 * error message so an operator can find it.
 */
export function positiveNumber(setting: string, value: unknown, integer: boolean): number {
  const kind = integer ? "a positive integer" : "a positive number";
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0 || (integer && !Number.isInteger(value))) {
    throw new RateLimitConfigError(setting, `rate limit setting ${setting} must be ${kind}, got ${describe(value)}`);
  }
  return value;
}

/** Validates a complete set of limits (middleware options or Durable Object RPC parameters). */
export function validateLimits(x: {
  rpm?: unknown;
  burst?: unknown;
  maxConcurrent?: unknown;
  leaseTtlMs?: unknown;
}): RateLimitLimits {
  return {
    rpm: positiveNumber("rpm", x.rpm, false),
    burst: positiveNumber("burst", x.burst, true),
    maxConcurrent: positiveNumber("maxConcurrent", x.maxConcurrent, true),
    leaseTtlMs: positiveNumber("leaseTtlMs", x.leaseTtlMs ?? DEFAULT_LEASE_TTL_MS, true),
  };
}

function describe(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number") return String(value);
  return typeof value;
}

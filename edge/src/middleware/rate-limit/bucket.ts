/**
 * Pure token-bucket arithmetic for the per-subject rate limiter. No I/O and no clock: every
 * function takes `now` (epoch milliseconds) explicitly, so the Durable Object and the tests share
 * exactly the same math.
 *
 * Model: a bucket holds at most `burst` tokens and refills continuously at `rpm / 60` tokens per
 * second; each request takes one token. A new subject starts with a full bucket.
 */

/** Limits of one bucket. `rpm` > 0 (may be fractional), `burst` a positive integer. */
export interface BucketLimits {
  /** Sustained rate: tokens added per minute. */
  rpm: number;
  /** Capacity: the most requests that can be made back to back. */
  burst: number;
}

/** Persisted state of one bucket. */
export interface BucketState {
  /** Tokens available at `updatedAtMs` (fractional: refill is continuous). */
  tokens: number;
  /** Epoch milliseconds of the last refill. */
  updatedAtMs: number;
}

/** Outcome of {@link takeToken}: the new state plus the values the RateLimit-* headers need. */
export type TakeResult =
  | { ok: true; state: BucketState; remaining: number; resetSeconds: number }
  | { ok: false; state: BucketState; remaining: number; resetSeconds: number; retryAfterSeconds: number };

/**
 * Float refill accumulates rounding error (e.g. 0.1 + 0.2); a bucket that is a hair short of a
 * whole token after exactly the right wait must still grant it.
 */
const EPSILON = 1e-9;

/** Tokens refilled per millisecond. */
function ratePerMs(limits: BucketLimits): number {
  return limits.rpm / 60_000;
}

/** A full bucket, as seen by a subject's first request. */
export function fullBucket(limits: BucketLimits, now: number): BucketState {
  return { tokens: limits.burst, updatedAtMs: now };
}

/**
 * The bucket at `now`: refilled for the time elapsed since `updatedAtMs` and capped at `burst`
 * (also when `burst` was lowered by a configuration change). A clock that goes backwards refills
 * nothing and never moves `updatedAtMs` back, so the same interval is never credited twice.
 */
export function refill(state: BucketState, limits: BucketLimits, now: number): BucketState {
  const elapsed = Math.max(0, now - state.updatedAtMs);
  // elapsed * rpm is exact for integer inputs; dividing once keeps whole-token waits exact.
  const tokens = Math.min(limits.burst, state.tokens + (elapsed * limits.rpm) / 60_000);
  return { tokens, updatedAtMs: Math.max(state.updatedAtMs, now) };
}

/** Whether the (already refilled) bucket holds at least one whole token. */
export function hasToken(state: BucketState): boolean {
  return state.tokens + EPSILON >= 1;
}

/** Whole tokens left, as reported in `RateLimit-Remaining`. */
export function remainingTokens(state: BucketState): number {
  return Math.max(0, Math.floor(state.tokens + EPSILON));
}

/** Seconds (rounded up) until the bucket is full again; 0 when it is already full. */
export function secondsUntilFull(state: BucketState, limits: BucketLimits): number {
  const missing = limits.burst - state.tokens;
  if (missing <= EPSILON) return 0;
  return Math.ceil(missing / ratePerMs(limits) / 1000 - EPSILON);
}

/**
 * Seconds until one whole token is available: the `Retry-After` of a refused request. Always at
 * least 1, because `Retry-After: 0` invites an immediate retry storm.
 */
export function secondsUntilToken(state: BucketState, limits: BucketLimits): number {
  const missing = 1 - state.tokens;
  if (missing <= EPSILON) return 1;
  return Math.max(1, Math.ceil(missing / ratePerMs(limits) / 1000 - EPSILON));
}

/**
 * Refills the bucket to `now` and takes one token if there is one. A refusal consumes nothing;
 * its state is still the refilled one (persisting it is harmless but unnecessary).
 */
export function takeToken(state: BucketState, limits: BucketLimits, now: number): TakeResult {
  const current = refill(state, limits, now);
  if (!hasToken(current)) {
    return {
      ok: false,
      state: current,
      remaining: 0,
      resetSeconds: secondsUntilFull(current, limits),
      retryAfterSeconds: secondsUntilToken(current, limits),
    };
  }
  const next: BucketState = { tokens: Math.max(0, current.tokens - 1), updatedAtMs: current.updatedAtMs };
  return { ok: true, state: next, remaining: remainingTokens(next), resetSeconds: secondsUntilFull(next, limits) };
}

/**
 * `RateLimiter`: one Durable Object per subject (addressed by `idFromName(subjectHash)`), holding
 * that subject's token bucket and its concurrency leases in the object's SQLite storage, so the
 * state survives eviction and restarts. A single object serialises all of one subject's requests,
 * which makes check-and-take atomic without locks; subjects never contend with each other.
 *
 * Leases expire lazily (an expired lease simply stops counting on the next `acquire`). The alarm
 * only collects garbage: once a subject is idle (no live leases, bucket full again) its storage is
 * deleted, so the object costs nothing until the subject returns.
 */
import { DurableObject } from "cloudflare:workers";
import { fullBucket, refill, remainingTokens, secondsUntilFull, takeToken, type BucketLimits, type BucketState } from "./bucket.ts";
import { validateLimits, type RateLimitLimits } from "./limits.ts";

/** Parameters of {@link RateLimiter.acquire}. */
export interface AcquireParams extends Omit<RateLimitLimits, "leaseTtlMs"> {
  /** Lease lifetime; defaults to 10 minutes. */
  leaseTtlMs?: number;
  /** Clock override (epoch ms) for tests; production callers leave it out. */
  now?: number;
}

/** Values for the IETF `RateLimit-*` headers, present on every outcome. */
export interface RateLimitState {
  /** Bucket capacity (`RateLimit-Limit`). */
  limit: number;
  /** Whole tokens left (`RateLimit-Remaining`). */
  remaining: number;
  /** Seconds until the bucket is full again (`RateLimit-Reset`). */
  resetSeconds: number;
}

/** A granted request: hold `leaseId` while the request runs, then {@link RateLimiter.release} it. */
export interface AcquireGranted extends RateLimitState {
  ok: true;
  leaseId: string;
}

/** A refused request: `rate` when the bucket is empty, `concurrency` when all slots are taken. */
export interface AcquireRefused extends RateLimitState {
  ok: false;
  reason: "rate" | "concurrency";
  /** Whole seconds, at least 1. */
  retryAfterSeconds: number;
}

/** Result of {@link RateLimiter.acquire}. */
export type AcquireResult = AcquireGranted | AcquireRefused;

/**
 * A concurrency refusal can't know when an in-flight request will finish; 1 s is a short,
 * honest hint (clients are expected to back off further on repeated 429s).
 */
const CONCURRENCY_RETRY_AFTER_S = 1;
/** Lower bound between garbage-collection alarms, so a busy subject doesn't spin the alarm. */
const MIN_ALARM_DELAY_MS = 1_000;

interface BucketRow extends Record<string, SqlStorageValue> {
  tokens: number;
  updated_at: number;
  rpm: number;
  burst: number;
}

/** Per-subject token bucket + concurrency leases (SQLite-backed Durable Object). */
export class RateLimiter extends DurableObject<unknown> {
  /** Tables exist in this instance's database (reset after `deleteAll`, which drops them). */
  #schemaReady = false;

  #sql(): SqlStorage {
    const sql = this.ctx.storage.sql;
    if (!this.#schemaReady) {
      // The bucket row also keeps the limits it was last used with, for the alarm's idleness check.
      sql.exec(
        `CREATE TABLE IF NOT EXISTS bucket (
           id INTEGER PRIMARY KEY CHECK (id = 0),
           tokens REAL NOT NULL, updated_at INTEGER NOT NULL, rpm REAL NOT NULL, burst INTEGER NOT NULL)`,
      );
      sql.exec(`CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL)`);
      this.#schemaReady = true;
    }
    return sql;
  }

  /**
   * Takes one token and one concurrency slot, or neither. Checks the rate first (its Retry-After is
   * exact); a request refused for concurrency consumes no token. Throws `RateLimitConfigError` on
   * invalid limits (the caller fails closed).
   */
  async acquire(params: AcquireParams): Promise<AcquireResult> {
    const limits = validateLimits(params);
    const now = params.now ?? Date.now();
    if (typeof now !== "number" || !Number.isFinite(now)) {
      throw new TypeError("acquire: `now` must be a finite number of epoch milliseconds");
    }

    // Everything below up to the alarm is synchronous SQLite: no other call can interleave.
    const sql = this.#sql();
    sql.exec("DELETE FROM leases WHERE expires_at <= ?", now);
    const current = refill(this.#loadBucket(limits, now), limits, now);
    const base = { limit: limits.burst };

    const take = takeToken(current, limits, now);
    if (!take.ok) {
      return { ok: false, reason: "rate", retryAfterSeconds: take.retryAfterSeconds, ...base, remaining: take.remaining, resetSeconds: take.resetSeconds };
    }
    const live = sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM leases").one().n;
    if (live >= limits.maxConcurrent) {
      return {
        ok: false,
        reason: "concurrency",
        retryAfterSeconds: CONCURRENCY_RETRY_AFTER_S,
        ...base,
        remaining: remainingTokens(current),
        resetSeconds: secondsUntilFull(current, limits),
      };
    }

    const leaseId = crypto.randomUUID();
    this.#saveBucket(take.state, limits);
    sql.exec("INSERT INTO leases (id, expires_at) VALUES (?, ?)", leaseId, now + limits.leaseTtlMs);
    await this.#ensureAlarm(limits.leaseTtlMs);
    return { ok: true, leaseId, ...base, remaining: take.remaining, resetSeconds: take.resetSeconds };
  }

  /**
   * Frees a concurrency slot. Idempotent: returns whether a live lease was removed (false for an
   * unknown, already released or expired lease, and for a malformed id).
   */
  async release(leaseId: string): Promise<boolean> {
    if (typeof leaseId !== "string" || leaseId.length === 0 || leaseId.length > 64) return false;
    return this.#sql().exec("DELETE FROM leases WHERE id = ?", leaseId).rowsWritten > 0;
  }

  /**
   * Garbage collection: drops expired leases; when the subject is idle (no live lease and the
   * bucket refilled) deletes all storage, otherwise checks again when that could next be true.
   */
  override async alarm(): Promise<void> {
    const now = Date.now();
    const sql = this.#sql();
    sql.exec("DELETE FROM leases WHERE expires_at <= ?", now);
    const lastLease = sql.exec<{ t: number | null }>("SELECT MAX(expires_at) AS t FROM leases").one().t;
    const row = sql.exec<BucketRow>("SELECT tokens, updated_at, rpm, burst FROM bucket WHERE id = 0").toArray()[0];

    let fullAt = now;
    if (row) {
      const limits: BucketLimits = { rpm: row.rpm, burst: row.burst };
      const bucket = refill({ tokens: row.tokens, updatedAtMs: row.updated_at }, limits, now);
      fullAt = now + secondsUntilFull(bucket, limits) * 1000;
    }
    if (lastLease === null && fullAt <= now) {
      await this.ctx.storage.deleteAlarm();
      await this.ctx.storage.deleteAll();
      this.#schemaReady = false;
      return;
    }
    await this.ctx.storage.setAlarm(Math.max(lastLease ?? 0, fullAt, now + MIN_ALARM_DELAY_MS));
  }

  #loadBucket(limits: BucketLimits, now: number): BucketState {
    const row = this.#sql().exec<BucketRow>("SELECT tokens, updated_at FROM bucket WHERE id = 0").toArray()[0];
    return row ? { tokens: row.tokens, updatedAtMs: row.updated_at } : fullBucket(limits, now);
  }

  #saveBucket(state: BucketState, limits: BucketLimits): void {
    this.#sql().exec(
      `INSERT INTO bucket (id, tokens, updated_at, rpm, burst) VALUES (0, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at,
         rpm = excluded.rpm, burst = excluded.burst`,
      state.tokens,
      state.updatedAtMs,
      limits.rpm,
      limits.burst,
    );
  }

  /**
   * One pending alarm is enough: it reschedules itself until the subject is idle. The first one is
   * due when this lease would expire (real clock: the alarm always runs on real time).
   */
  async #ensureAlarm(leaseTtlMs: number): Promise<void> {
    if ((await this.ctx.storage.getAlarm()) === null) {
      await this.ctx.storage.setAlarm(Date.now() + leaseTtlMs);
    }
  }
}

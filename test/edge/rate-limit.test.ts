/**
 * Per-subject rate limiting inside workerd: the pure token-bucket math, the `RateLimiter` Durable
 * Object (real SQLite storage through the RATE_LIMITER binding of wrangler.toml), and the Hono
 * middleware on a small app. Every test uses fresh subject names, so objects never collide.
 */
import {
  abortAllDurableObjects,
  createExecutionContext,
  runDurableObjectAlarm,
  runInDurableObject,
  waitOnExecutionContext,
} from "cloudflare:test";
import { env } from "cloudflare:workers";
import fc from "fast-check";
import { Hono } from "hono";
import { describe, expect, it } from "vitest";
import { ConfigError } from "../../edge/src/config.ts";
import {
  fullBucket,
  refill,
  secondsUntilFull,
  secondsUntilToken,
  takeToken,
  type BucketLimits,
  type BucketState,
} from "../../edge/src/middleware/rate-limit/bucket.ts";
import type { AcquireParams, RateLimiter } from "../../edge/src/middleware/rate-limit/durable-object.ts";
import {
  rateLimit,
  RateLimitConfigError,
  rateLimitOptionsFromEnv,
  type RateLimitEnv,
  type RateLimitOptions,
} from "../../edge/src/middleware/rate-limit/index.ts";

const namespace = env.RATE_LIMITER as unknown as DurableObjectNamespace<RateLimiter>;
const freshSubject = (): string => `test-${crypto.randomUUID()}`;
const stubFor = (subjectHash: string): DurableObjectStub<RateLimiter> => namespace.get(namespace.idFromName(subjectHash));

/** Live (unexpired as of `now`) leases in a subject's object, read from its storage directly. */
async function liveLeases(subjectHash: string, now = Date.now()): Promise<number> {
  return runInDurableObject(stubFor(subjectHash), (_instance, state) => {
    const tables = state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM sqlite_master WHERE name = 'leases'").one().n;
    if (tables === 0) return 0;
    return state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM leases WHERE expires_at > ?", now).one().n;
  });
}

describe("token bucket math", () => {
  const limits: BucketLimits = { rpm: 60, burst: 3 }; // one token per second
  const t0 = 1_700_000_000_000;

  it("grants `burst` requests back to back, then refuses with the wait for one token", () => {
    let state: BucketState = fullBucket(limits, t0);
    const remaining: number[] = [];
    for (let i = 0; i < 3; i++) {
      const r = takeToken(state, limits, t0);
      expect(r.ok).toBe(true);
      remaining.push(r.remaining);
      state = r.state;
    }
    expect(remaining).toEqual([2, 1, 0]);
    const refused = takeToken(state, limits, t0);
    expect(refused).toMatchObject({ ok: false, remaining: 0, retryAfterSeconds: 1, resetSeconds: 3 });
    // A refusal consumes nothing.
    expect(refused.state.tokens).toBe(0);
  });

  it("refills continuously at rpm/60 tokens per second", () => {
    const empty: BucketState = { tokens: 0, updatedAtMs: t0 };
    expect(refill(empty, limits, t0 + 500).tokens).toBeCloseTo(0.5, 12);
    expect(takeToken(empty, limits, t0 + 999).ok).toBe(false);
    expect(takeToken(empty, limits, t0 + 1000).ok).toBe(true);
    // 6 rpm: one token per 10 s.
    const slow: BucketLimits = { rpm: 6, burst: 1 };
    expect(refill(empty, slow, t0 + 2_500).tokens).toBeCloseTo(0.25, 12);
    expect(takeToken(empty, slow, t0 + 9_999).ok).toBe(false);
    expect(takeToken(empty, slow, t0 + 10_000).ok).toBe(true);
  });

  it("caps the bucket at burst, also after the burst setting is lowered", () => {
    const empty: BucketState = { tokens: 0, updatedAtMs: t0 };
    expect(refill(empty, limits, t0 + 3_600_000).tokens).toBe(3);
    expect(refill({ tokens: 10, updatedAtMs: t0 }, limits, t0).tokens).toBe(3);
  });

  it("computes Retry-After (≥ 1 s, rounded up) and Reset (time to full)", () => {
    const slow: BucketLimits = { rpm: 6, burst: 4 };
    const empty: BucketState = { tokens: 0, updatedAtMs: t0 };
    expect(secondsUntilToken(empty, slow)).toBe(10);
    expect(secondsUntilToken(refill(empty, slow, t0 + 2_500), slow)).toBe(8); // 7.5 s → 8
    expect(secondsUntilToken({ tokens: 0.9999, updatedAtMs: t0 }, limits)).toBe(1); // never 0
    expect(secondsUntilFull(empty, slow)).toBe(40);
    expect(secondsUntilFull({ tokens: 4, updatedAtMs: t0 }, slow)).toBe(0);
    const r = takeToken(fullBucket(slow, t0), slow, t0);
    expect(r).toMatchObject({ ok: true, remaining: 3, resetSeconds: 10 });
  });

  it("never refills for a clock that goes backwards, nor moves the refill time back", () => {
    const s: BucketState = { tokens: 1, updatedAtMs: t0 };
    const back = refill(s, limits, t0 - 5_000);
    expect(back).toEqual({ tokens: 1, updatedAtMs: t0 });
    expect(refill(back, limits, t0 + 1_000).tokens).toBe(2);
  });

  it("grants exactly one token after one token period, however the wait is split (float drift)", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 600 }),
        fc.array(fc.double({ min: 0.01, max: 1, noNaN: true }), { minLength: 1, maxLength: 20 }),
        (rpm, weights) => {
          const l: BucketLimits = { rpm, burst: 5 };
          const period = 60_000 / rpm;
          const total = weights.reduce((a, b) => a + b, 0);
          let state: BucketState = { tokens: 0, updatedAtMs: 0 };
          let t = 0;
          for (const w of weights) {
            t += (w / total) * period;
            state = refill(state, l, t);
          }
          // Refusal-free exactly at the period (drift tolerated), but only one token.
          const first = takeToken(state, l, period);
          expect(first.ok).toBe(true);
          if (first.ok) expect(takeToken(first.state, l, period).ok).toBe(false);
        },
      ),
    );
  });

  it("never grants more than burst + rate × elapsed requests", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 120 }),
        fc.integer({ min: 1, max: 10 }),
        fc.array(fc.integer({ min: 0, max: 5_000 }), { minLength: 1, maxLength: 60 }),
        (rpm, burst, gaps) => {
          const l: BucketLimits = { rpm, burst };
          let state = fullBucket(l, 0);
          let t = 0;
          let granted = 0;
          for (const gap of gaps) {
            t += gap;
            const r = takeToken(state, l, t);
            state = r.state;
            if (r.ok) granted++;
          }
          expect(granted).toBeLessThanOrEqual(burst + Math.floor((rpm * t) / 60_000 + 1e-9));
        },
      ),
    );
  });
});

describe("configuration", () => {
  it("reads the limits from the environment", () => {
    expect(rateLimitOptionsFromEnv({ RATE_LIMIT_RPM: "60", RATE_LIMIT_BURST: "10", RATE_LIMIT_MAX_CONCURRENT: "2" })).toEqual({
      rpm: 60,
      burst: 10,
      maxConcurrent: 2,
      leaseTtlMs: 600_000,
    });
    expect(rateLimitOptionsFromEnv({ RATE_LIMIT_RPM: "0.5", RATE_LIMIT_BURST: "1", RATE_LIMIT_MAX_CONCURRENT: "1" }).rpm).toBe(0.5);
    // The worker's real configuration (wrangler.toml) is valid.
    expect(() => rateLimitOptionsFromEnv(env)).not.toThrow();
  });

  it.each([
    ["RATE_LIMIT_RPM", "0"],
    ["RATE_LIMIT_RPM", "-5"],
    ["RATE_LIMIT_RPM", "abc"],
    ["RATE_LIMIT_RPM", "NaN"],
    ["RATE_LIMIT_RPM", "Infinity"],
    ["RATE_LIMIT_BURST", "10abc"],
    ["RATE_LIMIT_BURST", "1.5"],
    ["RATE_LIMIT_BURST", ""],
    ["RATE_LIMIT_MAX_CONCURRENT", "0"],
    ["RATE_LIMIT_MAX_CONCURRENT", undefined],
  ])("rejects %s=%j with an error naming the variable", (name, value) => {
    const vars: Record<string, string | undefined> = { RATE_LIMIT_RPM: "60", RATE_LIMIT_BURST: "10", RATE_LIMIT_MAX_CONCURRENT: "2", [name]: value };
    let error: unknown;
    try {
      rateLimitOptionsFromEnv(vars);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(RateLimitConfigError);
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as RateLimitConfigError).setting).toBe(name);
    expect((error as Error).message).toContain(name);
  });

  it("validates options when the middleware is built", () => {
    const ok: RateLimitOptions = { rpm: 60, burst: 10, maxConcurrent: 2 };
    expect(() => rateLimit(ok)).not.toThrow();
    expect(() => rateLimit({ ...ok, rpm: Number.NaN })).toThrow(/rpm/);
    expect(() => rateLimit({ ...ok, burst: 0 })).toThrow(/burst/);
    expect(() => rateLimit({ ...ok, maxConcurrent: -1 })).toThrow(/maxConcurrent/);
    expect(() => rateLimit({ ...ok, leaseTtlMs: 0 })).toThrow(/leaseTtlMs/);
  });
});

describe("RateLimiter Durable Object", () => {
  const base: AcquireParams = { rpm: 60, burst: 3, maxConcurrent: 100 };

  it("refuses after burst requests, then recovers as time passes", async () => {
    const stub = stubFor(freshSubject());
    const t0 = Date.now();
    for (const remaining of [2, 1, 0]) {
      expect(await stub.acquire({ ...base, now: t0 })).toMatchObject({ ok: true, limit: 3, remaining });
    }
    expect(await stub.acquire({ ...base, now: t0 })).toMatchObject({
      ok: false,
      reason: "rate",
      retryAfterSeconds: 1,
      limit: 3,
      remaining: 0,
      resetSeconds: 3,
    });
    expect((await stub.acquire({ ...base, now: t0 + 999 })).ok).toBe(false);
    expect(await stub.acquire({ ...base, now: t0 + 1_000 })).toMatchObject({ ok: true, remaining: 0 });
    // After a long pause the bucket is full again, not over-full.
    expect(await stub.acquire({ ...base, now: t0 + 3_600_000 })).toMatchObject({ ok: true, remaining: 2 });
  });

  it("keeps the bucket in storage across an eviction of the object", async () => {
    const subject = freshSubject();
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) await stubFor(subject).acquire({ ...base, now: t0 });
    await abortAllDurableObjects();
    expect(await stubFor(subject).acquire({ ...base, now: t0 + 10 })).toMatchObject({ ok: false, reason: "rate" });
  });

  it("isolates subjects: A exhausted, B unaffected", async () => {
    const a = stubFor(freshSubject());
    const b = stubFor(freshSubject());
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) await a.acquire({ ...base, now: t0 });
    expect((await a.acquire({ ...base, now: t0 })).ok).toBe(false);
    expect(await b.acquire({ ...base, now: t0 })).toMatchObject({ ok: true, remaining: 2 });
  });

  it("caps concurrent leases without consuming tokens for refused requests", async () => {
    const subject = freshSubject();
    const stub = stubFor(subject);
    const params: AcquireParams = { rpm: 60, burst: 10, maxConcurrent: 2 };
    const t0 = Date.now();
    const first = await stub.acquire({ ...params, now: t0 });
    const second = await stub.acquire({ ...params, now: t0 });
    if (!first.ok || !second.ok) throw new Error("expected two leases");
    expect(first.leaseId).not.toBe(second.leaseId);
    for (let i = 0; i < 5; i++) {
      expect(await stub.acquire({ ...params, now: t0 })).toMatchObject({ ok: false, reason: "concurrency", retryAfterSeconds: 1, remaining: 8 });
    }
    expect(await liveLeases(subject, t0)).toBe(2);
    expect(await stub.release(first.leaseId)).toBe(true);
    expect(await stub.release(first.leaseId)).toBe(false); // idempotent
    // Still 8 tokens: the five refusals took none.
    expect(await stub.acquire({ ...params, now: t0 })).toMatchObject({ ok: true, remaining: 7 });
  });

  it("expires a lease that is never released after leaseTtlMs", async () => {
    const stub = stubFor(freshSubject());
    const params: AcquireParams = { rpm: 600, burst: 10, maxConcurrent: 1, leaseTtlMs: 5_000 };
    const t0 = Date.now();
    const held = await stub.acquire({ ...params, now: t0 });
    expect(held.ok).toBe(true);
    expect(await stub.acquire({ ...params, now: t0 + 4_999 })).toMatchObject({ ok: false, reason: "concurrency" });
    expect((await stub.acquire({ ...params, now: t0 + 5_000 })).ok).toBe(true);
    if (held.ok) expect(await stub.release(held.leaseId)).toBe(false); // already gone
  });

  it("deletes an idle subject's storage from its alarm", async () => {
    const subject = freshSubject();
    const stub = stubFor(subject);
    // Everything happened an hour ago: the lease has expired and the bucket has refilled.
    expect((await stub.acquire({ ...base, leaseTtlMs: 60_000, now: Date.now() - 3_600_000 })).ok).toBe(true);
    expect(await runDurableObjectAlarm(stub)).toBe(true);
    const tables = await runInDurableObject(stub, (_i, state) =>
      state.storage.sql.exec<{ name: string }>("SELECT name FROM sqlite_master WHERE name IN ('bucket', 'leases')").toArray(),
    );
    expect(tables).toEqual([]);
    expect(await runInDurableObject(stub, (_i, state) => state.storage.getAlarm())).toBeNull();
    // The object works again afterwards, starting from a full bucket.
    expect(await stub.acquire(base)).toMatchObject({ ok: true, remaining: 2 });
  });

  it("keeps a subject with a live lease and re-arms its alarm", async () => {
    const subject = freshSubject();
    const stub = stubFor(subject);
    const params: AcquireParams = { ...base, maxConcurrent: 1 };
    expect((await stub.acquire(params)).ok).toBe(true);
    expect(await runDurableObjectAlarm(stub)).toBe(true);
    expect(await liveLeases(subject)).toBe(1);
    expect(await stub.acquire(params)).toMatchObject({ ok: false, reason: "concurrency" });
    expect(await runInDurableObject(stub, (_i, state) => state.storage.getAlarm())).toBeGreaterThan(Date.now());
  });

  it("rejects invalid limits and ignores malformed lease ids", async () => {
    const stub = stubFor(freshSubject());
    // Awaited through a plain promise: handing an RPC promise to expect() lets vitest touch
    // properties on it, each of which becomes a pipelined call that rejects unhandled.
    const failure = (p: Promise<unknown>): Promise<unknown> => p.then(() => undefined, (e: unknown) => e);
    expect(await failure(stub.acquire({ ...base, rpm: 0 }))).toMatchObject({ message: expect.stringMatching(/rpm/) });
    expect(await failure(stub.acquire({ ...base, burst: 2.5 }))).toMatchObject({ message: expect.stringMatching(/burst/) });
    expect(await failure(stub.acquire({ ...base, now: Number.NaN }))).toMatchObject({ message: expect.stringMatching(/now/) });
    expect(await stub.release("")).toBe(false);
    expect(await stub.release("x".repeat(1000))).toBe(false);
    expect(await stub.release(42 as unknown as string)).toBe(false);
  });
});

describe("rateLimit middleware", () => {
  /** A test-controlled streamed body: the test decides when it ends and sees a cancellation. */
  class ControlledStream {
    controller!: ReadableStreamDefaultController<Uint8Array>;
    cancelledWith: unknown = "not cancelled";
    readonly stream = new ReadableStream<Uint8Array>({
      start: (controller) => {
        this.controller = controller;
      },
      cancel: (reason) => {
        this.cancelledWith = reason;
      },
    });
    send(text: string): void {
      this.controller.enqueue(new TextEncoder().encode(text));
    }
  }

  interface TestApp {
    app: Hono<RateLimitEnv>;
    streams: ControlledStream[];
    handled: () => number;
  }

  function makeApp(options: RateLimitOptions, onError?: boolean): TestApp {
    const app = new Hono<RateLimitEnv>();
    const streams: ControlledStream[] = [];
    let handled = 0;
    // Stands in for jwt-auth: the subject hash comes from a header, absent header → no auth.
    app.use(async (c, next) => {
      const subjectHash = c.req.header("x-subject");
      if (subjectHash) c.set("auth", { subjectHash });
      await next();
    });
    app.use(rateLimit(options));
    app.get("/ok", (c) => {
      handled++;
      return c.json({ ok: true }, 200, { "X-Handler": "yes" });
    });
    app.get("/stream", () => {
      handled++;
      const s = new ControlledStream();
      streams.push(s);
      return new Response(s.stream, { headers: { "Content-Type": "text/event-stream" } });
    });
    app.get("/boom", () => {
      handled++;
      throw new Error("handler failed");
    });
    if (onError) app.onError((err, c) => c.json({ error: { code: "internal_error", message: err.name } }, 500));
    return { app, streams, handled: () => handled };
  }

  async function send(t: TestApp, path: string, subject: string | undefined, method = "GET", bindings: object = env) {
    const ctx = createExecutionContext();
    const headers: Record<string, string> = subject ? { "x-subject": subject } : {};
    const res = await t.app.fetch(new Request(`https://api.test${path}`, { method, headers }), bindings, ctx);
    return { res, ctx };
  }

  /** Sends, reads the whole body and waits for background work (the release). */
  async function complete(t: TestApp, path: string, subject: string | undefined, method = "GET", bindings: object = env) {
    const { res, ctx } = await send(t, path, subject, method, bindings);
    const text = await res.text();
    await waitOnExecutionContext(ctx);
    return { res, text };
  }

  // 1 request per minute: header values don't move while a test runs.
  const slow: RateLimitOptions = { rpm: 1, burst: 2, maxConcurrent: 1 };

  it("adds RateLimit-* headers to a successful response and leaves it otherwise intact", async () => {
    const t = makeApp(slow);
    const { res, text } = await complete(t, "/ok", freshSubject());
    expect(res.status).toBe(200);
    expect(JSON.parse(text)).toEqual({ ok: true });
    expect(res.headers.get("X-Handler")).toBe("yes");
    expect(res.headers.get("Content-Type")).toMatch(/application\/json/);
    expect(res.headers.get("RateLimit-Limit")).toBe("2");
    expect(res.headers.get("RateLimit-Remaining")).toBe("1");
    expect(res.headers.get("RateLimit-Reset")).toBe("60");
  });

  it("answers 429 rate_limited with Retry-After and RateLimit-* once the burst is spent", async () => {
    const t = makeApp(slow);
    const subject = freshSubject();
    expect((await complete(t, "/ok", subject)).res.status).toBe(200);
    expect((await complete(t, "/ok", subject)).res.status).toBe(200);
    const { res, text } = await complete(t, "/ok", subject);
    expect(res.status).toBe(429);
    expect(res.headers.get("Content-Type")).toMatch(/application\/json/);
    const body = JSON.parse(text) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("rate_limited");
    expect(body.error.message).toMatch(/rate limit/i);
    expect(res.headers.get("Retry-After")).toBe("60");
    expect(res.headers.get("RateLimit-Limit")).toBe("2");
    expect(res.headers.get("RateLimit-Remaining")).toBe("0");
    expect(res.headers.get("RateLimit-Reset")).toBe("120");
    expect(t.handled()).toBe(2);
    // Another subject is unaffected.
    expect((await complete(t, "/ok", freshSubject())).res.status).toBe(200);
  });

  it("holds the slot while a streamed body is sent and releases it when the stream ends", async () => {
    const t = makeApp({ ...slow, burst: 10 });
    const subject = freshSubject();
    const streaming = await send(t, "/stream", subject);
    expect(streaming.res.status).toBe(200);
    expect(streaming.res.headers.get("RateLimit-Remaining")).toBe("9");

    const refused = await complete(t, "/ok", subject);
    expect(refused.res.status).toBe(429);
    expect(JSON.parse(refused.text)).toMatchObject({ error: { code: "too_many_concurrent" } });
    expect(refused.res.headers.get("Retry-After")).toBe("1");
    expect(refused.res.headers.get("RateLimit-Remaining")).toBe("9"); // no token taken
    expect(t.handled()).toBe(1);

    const stream = t.streams[0]!;
    const reading = streaming.res.text();
    stream.send("data: a\n\n");
    stream.send("data: b\n\n");
    stream.controller.close();
    expect(await reading).toBe("data: a\n\ndata: b\n\n");
    await waitOnExecutionContext(streaming.ctx);
    expect(await liveLeases(subject)).toBe(0);
    expect((await complete(t, "/ok", subject)).res.status).toBe(200);
  });

  it("releases the slot when the client cancels the streamed body, and cancels the source", async () => {
    const t = makeApp({ ...slow, burst: 10 });
    const subject = freshSubject();
    const streaming = await send(t, "/stream", subject);
    const stream = t.streams[0]!;
    stream.send("data: partial\n\n");
    const reader = streaming.res.body!.getReader();
    expect(new TextDecoder().decode((await reader.read()).value)).toBe("data: partial\n\n");
    expect(await liveLeases(subject)).toBe(1);

    await reader.cancel("client went away");
    await waitOnExecutionContext(streaming.ctx);
    expect(stream.cancelledWith).toBe("client went away");
    expect(await liveLeases(subject)).toBe(0);
    expect((await complete(t, "/ok", subject)).res.status).toBe(200);
  });

  it("releases the slot when the streamed body fails midway", async () => {
    const t = makeApp({ ...slow, burst: 10 });
    const subject = freshSubject();
    const streaming = await send(t, "/stream", subject);
    const reading = streaming.res.text();
    t.streams[0]!.controller.error(new Error("backend died"));
    await expect(reading).rejects.toThrow();
    await waitOnExecutionContext(streaming.ctx);
    expect(await liveLeases(subject)).toBe(0);
  });

  it.each([
    ["Hono's default error handler", false],
    ["an app error handler", true],
  ])("releases the slot when the handler throws (%s)", async (_name, onError) => {
    const t = makeApp({ ...slow, burst: 10 }, onError);
    const subject = freshSubject();
    const failed = await send(t, "/boom", subject);
    await waitOnExecutionContext(failed.ctx);
    // Released without anyone reading the error body.
    expect(await liveLeases(subject)).toBe(0);
    expect(failed.res.status).toBe(500);
    expect(failed.res.headers.get("RateLimit-Remaining")).toBe("9");
    await failed.res.arrayBuffer();
    expect((await complete(t, "/ok", subject)).res.status).toBe(200);
  });

  it("releases the slot at once for HEAD, whose body is never sent", async () => {
    const t = makeApp({ ...slow, burst: 10 });
    const subject = freshSubject();
    const { res, ctx } = await send(t, "/stream", subject, "HEAD");
    expect(res.status).toBe(200);
    await waitOnExecutionContext(ctx);
    expect(await liveLeases(subject)).toBe(0);
  });

  it("fails closed with 503 backend_unavailable when the Durable Object can't be reached", async () => {
    const t = makeApp(slow);
    // The dependency fails, not the code under test: a namespace whose object rejects every call.
    const unreachable = {
      idFromName: (name: string) => namespace.idFromName(name),
      get: () => ({
        acquire: () => Promise.reject(new Error("Durable Object reset because its code was updated")),
        release: () => Promise.reject(new Error("unreachable")),
      }),
    };
    const { res, text } = await complete(t, "/ok", freshSubject(), "GET", { RATE_LIMITER: unreachable });
    expect(res.status).toBe(503);
    const body = JSON.parse(text) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("backend_unavailable");
    expect(body.error.message).toMatch(/rate limiter/i);
    expect(res.headers.get("Retry-After")).toBe("1");
    expect(t.handled()).toBe(0);
  });

  it("refuses a request that reaches it without an authenticated subject", async () => {
    const t = makeApp(slow);
    const { res, text } = await complete(t, "/ok", undefined);
    expect(res.status).toBe(500);
    expect(JSON.parse(text)).toMatchObject({ error: { code: "internal_error" } });
    expect(t.handled()).toBe(0);
  });
});

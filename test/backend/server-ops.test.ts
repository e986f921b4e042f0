/**
 * Health, readiness, metrics and graceful shutdown of the backend service, over real HTTP.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { LOAD_HEADER } from "../../shared/src/wire.ts";
import { BackendMetrics, Counter, Histogram, RateWindow, Registry } from "../../gpu-backend/src/server/metrics.ts";
import { shutdownBackend } from "../../gpu-backend/src/server/main.ts";
import { silentLogger } from "../../gpu-backend/src/server/log.ts";
import { ScriptedEngine } from "./fixtures/fake-engine.ts";
import { events, postWire, rid, startServer, waitFor, wireRequest, type Running } from "./server-harness.ts";

let engine: ScriptedEngine;
let srv: Running;

beforeEach(async () => {
  engine = new ScriptedEngine();
  srv = await startServer(engine);
});
afterEach(async () => {
  await srv.close();
  await engine.close();
});

describe("health and readiness", () => {
  it("/healthz answers while the model is not ready; /readyz follows the engine", async () => {
    engine.ready = false;
    const h = await fetch(`${srv.base}/healthz`);
    expect(h.status).toBe(200);
    expect(h.headers.get(LOAD_HEADER)).toBe("active=0;queued=0;capacity=4");
    const notReady = await fetch(`${srv.base}/readyz`);
    expect(notReady.status).toBe(503);
    expect(notReady.headers.get("retry-after")).toBe("5");
    expect(await notReady.json()).toMatchObject({ status: "starting" });
    engine.ready = true;
    const ready = await fetch(`${srv.base}/readyz`);
    expect(ready.status).toBe(200);
    expect(await ready.json()).toMatchObject({ status: "ready" });
  });

  it("/healthz fails once the engine reports a part stopped for good (liveness: the orchestrator restarts it)", async () => {
    engine.failed = true;
    engine.ready = false;
    const h = await fetch(`${srv.base}/healthz`);
    expect(h.status).toBe(503);
    expect(await h.json()).toEqual({ status: "failed" });
  });

  it("unknown routes → 404 not_found; GET on the generate path → 405", async () => {
    const r = await fetch(`${srv.base}/nope`);
    expect(r.status).toBe(404);
    expect(r.headers.get(LOAD_HEADER)).toBe("active=0;queued=0;capacity=4");
    expect(await r.json()).toMatchObject({ error: { code: "not_found" } });
    const g = await fetch(`${srv.base}/internal/v1/generate`);
    expect(g.status).toBe(405);
    expect(await g.json()).toMatchObject({ error: { code: "method_not_allowed" } });
  });
});

describe("/metrics", () => {
  it("exposes queue depth, active sequences, tokens, latencies, requests and errors by code", async () => {
    engine.script = (r) => (r.id.startsWith("q-") ? { kind: "queue" } : { kind: "tokens", texts: ["a", "b", "c"], delayMs: 2, drafts: [2, 5] });
    await events(await postWire(srv.base, wireRequest()));
    await postWire(srv.base, wireRequest(), { unsigned: true });
    const ac = new AbortController();
    const pending = postWire(srv.base, wireRequest({ header: { request_id: rid("q"), stream: false } }), { signal: ac.signal }).catch(() => null);
    await waitFor(() => engine.stats().queued === 1);
    engine.visionRestarts = 2;

    const res = await fetch(`${srv.base}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/plain");
    const text = await res.text();
    const value = (re: RegExp) => Number(re.exec(text)?.[1]);
    expect(value(/^medvlm_backend_queue_depth (\S+)$/m)).toBe(1);
    expect(value(/^medvlm_backend_active_sequences (\S+)$/m)).toBe(0);
    expect(value(/^medvlm_backend_capacity (\S+)$/m)).toBe(4);
    expect(value(/^medvlm_backend_ready (\S+)$/m)).toBe(1);
    expect(value(/^medvlm_backend_vision_restarts_total (\S+)$/m)).toBe(2);
    expect(text).toContain("# TYPE medvlm_backend_vision_restarts_total counter");
    expect(value(/^medvlm_backend_generated_tokens_total (\S+)$/m)).toBe(3);
    expect(value(/^medvlm_backend_draft_tokens_total\{outcome="accepted"\} (\S+)$/m)).toBe(2);
    expect(value(/^medvlm_backend_draft_tokens_total\{outcome="rejected"\} (\S+)$/m)).toBe(5);
    expect(value(/^medvlm_backend_tokens_per_second (\S+)$/m)).toBeGreaterThan(0);
    expect(value(/^medvlm_backend_time_to_first_token_seconds_count (\S+)$/m)).toBe(1);
    expect(value(/^medvlm_backend_token_latency_seconds_count (\S+)$/m)).toBe(2);
    expect(value(/^medvlm_backend_requests_total\{outcome="ok"\} (\S+)$/m)).toBe(1);
    expect(value(/^medvlm_backend_errors_total\{code="invalid_signature"\} (\S+)$/m)).toBe(1);
    expect(text).toContain("# TYPE medvlm_backend_time_to_first_token_seconds histogram");
    ac.abort();
    await pending;
  });

  it("the registry renders Prometheus text: cumulative buckets, escaped labels", () => {
    const r = new Registry();
    const c = r.register(new Counter("x_total", "help"));
    c.inc({ code: 'a"b\\c' }, 2);
    const h = r.register(new Histogram("h_seconds", "help", [0.1, 1]));
    h.observe(0.05);
    h.observe(0.5);
    h.observe(5);
    h.observe(Number.NaN); // ignored
    const text = r.render();
    expect(text).toContain('x_total{code="a\\"b\\\\c"} 2');
    expect(text).toContain('h_seconds_bucket{le="0.1"} 1\nh_seconds_bucket{le="1"} 2\nh_seconds_bucket{le="+Inf"} 3\nh_seconds_sum 5.55\nh_seconds_count 3');
    expect(text.endsWith("\n")).toBe(true);
  });

  it("tokens/s is a sliding 10 s window", () => {
    let now = 1_000_000;
    const w = new RateWindow(10, () => now);
    w.add(50);
    expect(w.rate()).toBe(5);
    now += 12_000;
    expect(w.rate()).toBe(0);
    const m = new BackendMetrics(() => ({ active: 0, queued: 0, capacity: 1, ready: true }), () => now);
    m.outcome("cancelled");
    expect(m.requests.get({ outcome: "cancelled" })).toBe(1);
    expect(m.errors.get({ code: "cancelled" })).toBe(0);
  });
});

describe("graceful shutdown", () => {
  it("stops admitting, lets in-flight requests finish, cancels the rest with a final error", async () => {
    engine.script = (r) =>
      r.id.startsWith("slow-") ? { kind: "tokens", texts: ["a", "b", "c", "d"], delayMs: 40 } : { kind: "hang", texts: ["x"] };
    const slow = wireRequest({ header: { request_id: rid("slow") } });
    const stuck = wireRequest({ header: { request_id: rid("stuck") } });
    const slowRes = await postWire(srv.base, slow);
    const stuckRes = await postWire(srv.base, stuck);
    const slowEvents = events(slowRes);
    const stuckEvents = events(stuckRes);
    await waitFor(() => srv.app.lifecycle.inFlight() === 2);

    const t0 = Date.now();
    const drained = srv.app.lifecycle.shutdown(400);
    expect(srv.app.lifecycle.draining).toBe(true);

    // new work is refused at once, and readiness drops
    const refused = await postWire(srv.base, wireRequest());
    expect(refused.status).toBe(503);
    expect(refused.headers.get("retry-after")).toBe("5");
    expect(await refused.json()).toMatchObject({ error: { code: "backend_unavailable" } });
    const ready = await fetch(`${srv.base}/readyz`);
    expect(ready.status).toBe(503);
    expect(await ready.json()).toMatchObject({ status: "draining" });

    // the in-flight request that can finish does; the stuck one is cancelled after the grace period
    const s = await slowEvents;
    expect(s.at(-1)).toMatchObject({ type: "done", text: "abcd" });
    const k = await stuckEvents;
    expect(k.map((e) => e.type)).toEqual(["start", "token", "error"]);
    expect(k.at(-1)).toMatchObject({ type: "error", code: "backend_unavailable" });
    expect(await drained).toEqual({ finished: 1, cancelled: 1 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(350);
    expect(engine.cancelled).toEqual([stuck.header.request_id]);
    expect(engine.submitted.map((r) => r.id)).toEqual([slow.header.request_id, stuck.header.request_id]);
  });

  it("shutdownBackend drains, closes the server and the engine", async () => {
    engine.script = () => ({ kind: "tokens", texts: ["a", "b"], delayMs: 30 });
    const res = await postWire(srv.base, wireRequest());
    const evs = events(res);
    await waitFor(() => srv.app.lifecycle.inFlight() === 1);
    await shutdownBackend({ app: srv.app, server: srv.server, engine, graceMs: 2000, logger: silentLogger, flushTimeoutMs: 500 });
    expect((await evs).at(-1)).toMatchObject({ type: "done" });
    expect(engine.closed).toBe(true);
    expect(srv.server.listening).toBe(false);
    await expect(fetch(`${srv.base}/healthz`)).rejects.toThrow();
  });

  it("with nothing in flight, shutdown is immediate", async () => {
    const t0 = Date.now();
    expect(await srv.app.lifecycle.shutdown(5000)).toEqual({ finished: 0, cancelled: 0 });
    expect(Date.now() - t0).toBeLessThan(500);
  });
});

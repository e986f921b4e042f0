/**
 * The worker bridge with a fake engine module in a real worker thread: events in order, cancel, buffers
 * transferred (not copied), start failures, a crashing worker, and the HTTP app on top of the bridge.
 */
import { afterEach, describe, expect, it } from "vitest";
import type { EngineEvent, EngineRequest } from "../../gpu-backend/src/engine/engine-types.ts";
import { EngineStartError, createWorkerEngine, type WorkerEngine } from "../../gpu-backend/src/server/worker-bridge.ts";
import type { FakeWorkerOptions, Received } from "./fixtures/fake-engine.ts";
import { META, events, memoryLogger, postWire, startServer, waitFor, wireRequest } from "./server-harness.ts";
import { DEFAULT_PARAMS } from "../../shared/src/wire.ts";

const FAKE = new URL("./fixtures/fake-engine.ts", import.meta.url);
const started: WorkerEngine[] = [];

function start(options: FakeWorkerOptions = {}, onExit?: () => void): WorkerEngine {
  const e = createWorkerEngine({ module: FAKE, options, statsIntervalMs: 20, onExit });
  started.push(e);
  return e;
}

afterEach(async () => {
  await Promise.all(started.splice(0).map((e) => e.close(2000)));
});

function request(id: string, images: Uint8Array[] = []): EngineRequest {
  return {
    id,
    inputIds: Int32Array.from([1, 2, 3, 900, 4]),
    images: images.map((bytes) => ({ bytes, mime: "image/png", minPixels: 3136, maxPixels: 1_000_000, expectedGrid: [1, 4, 4] })),
    params: DEFAULT_PARAMS,
    deadlineMs: null,
  };
}

/** Submits and collects events until the terminal one (bounded by `ms`). */
function run(engine: WorkerEngine, req: EngineRequest, ms = 5000): Promise<EngineEvent[]> {
  return new Promise((resolve, reject) => {
    const out: EngineEvent[] = [];
    const timer = setTimeout(() => reject(new Error(`no terminal event for ${req.id}`)), ms);
    engine.submit(req, (ev) => {
      out.push(ev);
      if (ev.type === "done" || ev.type === "error") {
        clearTimeout(timer);
        resolve(out);
      }
    });
  });
}

async function report(engine: WorkerEngine, id = `report-${Date.now()}`): Promise<{ received: Received[]; cancelled: string[] }> {
  const evs = await run(engine, request(id));
  const done = evs.at(-1)!;
  if (done.type !== "done") throw new Error("report failed");
  return JSON.parse(done.text) as { received: Received[]; cancelled: string[] };
}

describe("worker bridge", () => {
  it("loads the factory in a worker and round-trips events in order", async () => {
    const engine = start({ meta: META });
    expect(engine.stats().ready).toBe(false);
    await engine.loaded;
    expect(engine.stats()).toEqual({ active: 0, queued: 0, capacity: 4, ready: true });
    expect(engine.meta).toEqual(META); // forwarded from the worker
    const img = new Uint8Array([9, 8, 7, 6, 5]);
    const evs = await run(engine, request("r1", [img]));
    expect(evs.map((e) => e.type)).toEqual(["start", "token", "done"]);
    expect(evs.every((e) => e.request_id === "r1")).toBe(true);
    expect(evs[1]).toMatchObject({ type: "token", id: 0, text: "img0:5" });
    expect(evs[2]).toMatchObject({ type: "done", text: "img0:5", usage: { prompt_tokens: 5, completion_tokens: 1 } });
  });

  it("transfers the request's buffers (detached here) and the worker gets the same bytes", async () => {
    const engine = start();
    await engine.loaded;
    // two images that are views into one body buffer, as decodeWireRequest produces them
    const body = new Uint8Array(64).map((_, i) => i);
    const a = body.subarray(10, 20);
    const b = body.subarray(30, 60);
    const req = request("r-transfer", [a, b]);
    const ids = req.inputIds;
    const evs = run(engine, req);
    expect(ids.buffer.byteLength).toBe(0); // detached: moved, not copied
    expect(body.buffer.byteLength).toBe(0);
    expect(a.byteLength).toBe(0);
    await evs;
    const rep = await report(engine);
    const got = rep.received.find((r) => r.id === "r-transfer")!;
    expect(got.idsType).toBe("Int32Array");
    expect(got.ids).toEqual([1, 2, 3, 900, 4]);
    expect(got.imageLengths).toEqual([10, 30]);
    expect(got.imageSums).toEqual([145, 1335]); // sum(10..19), sum(30..59)
    expect(got.grids).toEqual([[1, 4, 4], [1, 4, 4]]);
  });

  it("cancel reaches the worker and silences the request at once", async () => {
    const engine = start({ tokenDelayMs: 5 });
    await engine.loaded;
    const seen: EngineEvent[] = [];
    engine.submit(request("slow-1"), (ev) => seen.push(ev));
    await waitFor(() => seen.filter((e) => e.type === "token").length >= 2);
    expect(engine.stats().active).toBe(1);
    engine.cancel("slow-1");
    const count = seen.length;
    const rep = await report(engine);
    expect(rep.cancelled).toEqual(["slow-1"]);
    await new Promise((r) => setTimeout(r, 40));
    expect(seen.length).toBe(count); // nothing after cancel, not even events already in flight
    expect(seen.some((e) => e.type === "done" || e.type === "error")).toBe(false);
    await waitFor(() => engine.stats().active === 0);
  });

  it("counts submits the worker has not acknowledged as queued (no over-admission in a burst)", async () => {
    const engine = start();
    await engine.loaded;
    const all = [0, 1, 2].map((i) => run(engine, request(`burst-${i}`)));
    expect(engine.stats().queued).toBe(3);
    await Promise.all(all);
    await waitFor(() => engine.stats().queued === 0);
  });

  it("refuses a duplicate live id with an error event", async () => {
    const engine = start({ tokenDelayMs: 5 });
    await engine.loaded;
    engine.submit(request("slow-dup"), () => {});
    const evs = await run(engine, request("slow-dup"));
    expect(evs).toEqual([expect.objectContaining({ type: "error", code: "invalid_request" })]);
    engine.cancel("slow-dup");
  });

  it("a factory that throws rejects `loaded` with a clear EngineStartError", async () => {
    const engine = start({ failLoad: true });
    await expect(engine.loaded).rejects.toBeInstanceOf(EngineStartError);
    await expect(engine.loaded).rejects.toThrow(/the engine failed to start: fake load failure: MODEL_DIR has no decoder/);
    expect(engine.stats().ready).toBe(false);
    const evs = await run(engine, request("after-fail"));
    expect(evs).toEqual([expect.objectContaining({ type: "error", code: "backend_unavailable" })]);
  });

  it("a module without the factory export fails clearly", async () => {
    const engine = createWorkerEngine({ module: FAKE, exportName: "noSuchFactory" });
    started.push(engine);
    await expect(engine.loaded).rejects.toThrow(/does not export a function noSuchFactory\(\)/);
  });

  it("a crashing worker ends every live request with an error and reports the exit", async () => {
    let exited = 0;
    const engine = start({ tokenDelayMs: 5 }, () => exited++);
    await engine.loaded;
    const live = run(engine, request("slow-live"));
    const crash = run(engine, request("crash-1"));
    const [a, b] = await Promise.all([live, crash]);
    expect(a.at(-1)).toMatchObject({ type: "error", code: "internal_error" });
    expect(b).toEqual([expect.objectContaining({ type: "error", code: "internal_error" })]);
    expect(exited).toBe(1);
    expect(engine.stats().ready).toBe(false);
  });

  it("serves HTTP through the bridge: stream, then a disconnect cancels in the worker", async () => {
    const engine = start({ meta: META, tokenDelayMs: 5 });
    await engine.loaded;
    const logs = memoryLogger();
    const srv = await startServer(engine, { logger: logs });
    try {
      const wire = wireRequest();
      const res = await postWire(srv.base, wire);
      expect(res.status).toBe(200);
      const evs = await events(res);
      expect(evs.map((e) => e.type)).toEqual(["start", "token", "done"]);
      expect(evs[1]).toEqual({ type: "token", id: 0, text: "img0:64" });
      // sizes are logged as admitted, although the buffers now live in the worker
      await waitFor(() => logs.lines.some((l) => l.includes("generate finished")));
      for (const what of ["generate admitted", "generate finished"]) {
        const line = JSON.parse(logs.lines.find((l) => l.includes(what))!) as Record<string, unknown>;
        expect(line, what).toMatchObject({ request_id: wire.header.request_id, prompt_tokens: wire.inputIds.length, images: 1, image_bytes: 64 });
      }

      const ac = new AbortController();
      const slow = wireRequest({ header: { request_id: `slow-http-${Date.now()}` } });
      const r2 = await postWire(srv.base, slow, { signal: ac.signal });
      const reader = r2.body!.getReader();
      await reader.read();
      ac.abort();
      await waitFor(() => srv.app.lifecycle.inFlight() === 0);
      const rep = await report(engine);
      expect(rep.cancelled).toEqual([slow.header.request_id]);
    } finally {
      await srv.close();
    }
  });

  it("a worker silent for longer than stallMs is stalled: not ready, /healthz and /readyz 503, requests refused; it recovers when it answers", async () => {
    const engine = createWorkerEngine({ module: FAKE, options: { meta: META }, statsIntervalMs: 20, stallMs: 500 });
    started.push(engine);
    await engine.loaded;
    const srv = await startServer(engine);
    try {
      await new Promise((r) => setTimeout(r, 700)); // longer than stallMs, but the idle worker keeps reporting
      expect(engine.stats()).toMatchObject({ ready: true });
      expect(engine.stats().stalled).toBeUndefined();
      const blocked = run(engine, request("block-2500-a"), 8000);
      await waitFor(() => engine.stats().stalled === true, 5000);
      expect(engine.stats().ready).toBe(false);
      const health = await fetch(`${srv.base}/healthz`);
      expect(health.status).toBe(503);
      expect(await health.json()).toEqual({ status: "stalled" });
      const ready = await fetch(`${srv.base}/readyz`);
      expect(ready.status).toBe(503);
      expect(await ready.json()).toMatchObject({ status: "stalled" });
      const refused = await postWire(srv.base, wireRequest());
      expect(refused.status).toBe(503);
      expect(refused.headers.get("retry-after")).toBeTruthy();
      expect(((await refused.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: "backend_unavailable", message: "the engine is not responding" });
      // The run ends, the worker answers again: the request finishes and the engine is ready.
      expect((await blocked).at(-1)).toMatchObject({ type: "done" });
      await waitFor(() => engine.stats().ready, 5000);
      expect(engine.stats().stalled).toBeUndefined();
      expect((await fetch(`${srv.base}/healthz`)).status).toBe(200);
    } finally {
      await srv.close();
    }
  });

  it("without stallMs, a long silence is not a stall", async () => {
    const engine = start({ meta: META });
    await engine.loaded;
    const blocked = run(engine, request("block-400-b"));
    await new Promise((r) => setTimeout(r, 300));
    expect(engine.stats().ready).toBe(true);
    expect(engine.stats().stalled).toBeUndefined();
    expect((await blocked).at(-1)).toMatchObject({ type: "done" });
  });

  it("close() closes the engine in the worker and stops it", async () => {
    const engine = start();
    await engine.loaded;
    await engine.close(2000);
    expect(engine.stats().ready).toBe(false);
    const evs = await run(engine, request("after-close"));
    expect(evs).toEqual([expect.objectContaining({ type: "error", code: "backend_unavailable" })]);
  });
});

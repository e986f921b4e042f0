/**
 * POST /internal/v1/generate over real HTTP (127.0.0.1:0) with a scripted engine: authentication, replay,
 * validation, admission, streaming, non-streaming, engine errors, disconnects and deadlines.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ERROR_STATUS } from "../../shared/src/errors.ts";
import { LOAD_HEADER, REPLAY_WINDOW_SECONDS, encodeWireRequest, signWireRequest, WIRE_CONTENT_TYPE } from "../../shared/src/wire.ts";
import { ScriptedEngine, type Behavior } from "./fixtures/fake-engine.ts";
import { CONFIG, META, events, imageBytes, memoryLogger, postRaw, postWire, rid, startServer, waitFor, wireRequest, type Running } from "./server-harness.ts";

let engine: ScriptedEngine;
let srv: Running;
let logs: ReturnType<typeof memoryLogger>;

beforeEach(async () => {
  engine = new ScriptedEngine();
  logs = memoryLogger();
  srv = await startServer(engine, { logger: logs });
});
afterEach(async () => {
  await srv.close();
  await engine.close();
});

async function errorOf(res: Response): Promise<{ code: string; message: string; request_id?: string }> {
  expect(res.headers.get("content-type")).toContain("application/json");
  return ((await res.json()) as { error: { code: string; message: string } }).error;
}

describe("streaming generate", () => {
  it("streams NDJSON events from start to done, with the load header", async () => {
    engine.script = () => ({ kind: "tokens", texts: ["<think>", "a", "</think><answer>B</answer>"] });
    const wire = wireRequest();
    const res = await postWire(srv.base, wire);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("application/x-ndjson");
    expect(res.headers.get(LOAD_HEADER)).toMatch(/^active=\d+;queued=\d+;capacity=4$/);
    const evs = await events(res);
    expect(evs.map((e) => e.type)).toEqual(["start", "token", "token", "token", "done"]);
    expect(evs[0]).toMatchObject({ type: "start", request_id: wire.header.request_id });
    // token events on the wire carry the token id, not the engine's request id
    expect(evs[1]).toEqual({ type: "token", id: 100, text: "<think>" });
    const done = evs[4]!;
    expect(done).toMatchObject({ type: "done", finish_reason: "stop", text: "<think>a</think><answer>B</answer>" });
    if (done.type === "done") expect(done.timings.backend_ms).toBeGreaterThanOrEqual(0);
    // the engine got exactly what was sent
    expect(engine.submitted).toHaveLength(1);
    const got = engine.submitted[0]!;
    expect(got.id).toBe(wire.header.request_id);
    expect([...got.inputIds]).toEqual([...wire.inputIds]);
    expect([...got.images[0]!.bytes]).toEqual([...wire.images[0]!]);
    expect(got.images[0]).toMatchObject({ mime: "image/png", expectedGrid: [1, 4, 4], minPixels: 3136, maxPixels: 12845056 });
    expect(got.params.max_new_tokens).toBe(64);
  });

  it("a fixed image size (resized_height/width) reaches the engine; without one, none is set", async () => {
    engine.script = () => ({ kind: "tokens", texts: ["x"] });
    const fixed = wireRequest();
    Object.assign(fixed.header.images[0]!, { resized_height: 56, resized_width: 60 });
    expect((await postWire(srv.base, fixed)).status).toBe(200);
    expect((await postWire(srv.base, wireRequest())).status).toBe(200);
    expect(engine.submitted[0]!.images[0]).toMatchObject({ resizedHeight: 56, resizedWidth: 60 });
    expect(engine.submitted[1]!.images[0]).not.toHaveProperty("resizedHeight");
  });

  it("passes a done without start through as the only event", async () => {
    engine.script = () => ({ kind: "done_only", text: "x" });
    const evs = await events(await postWire(srv.base, wireRequest()));
    expect(evs.map((e) => e.type)).toEqual(["done"]);
  });

  it("an engine error after start ends the stream with one error event", async () => {
    engine.script = () => ({ kind: "fail", texts: ["a"], code: "internal_error", message: "decoder failed" });
    const res = await postWire(srv.base, wireRequest());
    expect(res.status).toBe(200);
    const evs = await events(res);
    expect(evs.map((e) => e.type)).toEqual(["start", "token", "error"]);
    expect(evs[2]).toEqual({ type: "error", code: "internal_error", message: "decoder failed" });
  });
});

describe("stream:false", () => {
  it("answers one JSON object at the end", async () => {
    engine.script = () => ({ kind: "tokens", texts: ["<answer>", "A", "</answer>"], finish: "length" });
    const res = await postWire(srv.base, wireRequest({ header: { stream: false } }));
    expect(res.status).toBe(200);
    expect(res.headers.get(LOAD_HEADER)).toBeTruthy();
    const body = (await res.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(["finish_reason", "text", "timings", "usage"]);
    expect(body).toMatchObject({ text: "<answer>A</answer>", finish_reason: "length", usage: { completion_tokens: 3 } });
  });

  it("an engine error keeps its HTTP status", async () => {
    engine.script = () => ({ kind: "fail", texts: ["a"], code: "context_length_exceeded", message: "too long" });
    const res = await postWire(srv.base, wireRequest({ header: { stream: false } }));
    expect(res.status).toBe(422);
    expect((await errorOf(res)).code).toBe("context_length_exceeded");
  });
});

describe("signature and replay", () => {
  const cases: [string, (w: ReturnType<typeof wireRequest>) => Promise<Response>][] = [
    ["unsigned", (w) => postWire(srv.base, w, { unsigned: true })],
    ["wrong key", (w) => postWire(srv.base, w, { secret: "another-secret-0123456789abcdef" })],
    ["stale", (w) => postWire(srv.base, w, { nowMs: Date.now() - (REPLAY_WINDOW_SECONDS + 30) * 1000 })],
    ["tampered", (w) => postWire(srv.base, w, { tamper: (b) => void (b[b.length - 1]! ^= 1) })],
    ["malformed signature", (w) => postWire(srv.base, w, { headers: { "x-medvlm-signature": "v1=zz" } })],
  ];
  for (const [name, send] of cases) {
    it(`${name} → 401 invalid_signature, never reaches the engine`, async () => {
      const res = await send(wireRequest());
      expect(res.status).toBe(401);
      const err = await errorOf(res);
      expect(err.code).toBe("invalid_signature");
      expect(err.message).not.toMatch(/[0-9a-f]{64}/); // never echoes a signature
      expect(engine.submitted).toHaveLength(0);
    });
  }

  it("a replayed request id → 401, the engine sees it once", async () => {
    const wire = wireRequest();
    const first = await postWire(srv.base, wire);
    expect(first.status).toBe(200);
    await events(first);
    // byte-identical replay, freshly signed (a captured request replayed within the window)
    const again = await postWire(srv.base, wire);
    expect(again.status).toBe(401);
    expect((await errorOf(again)).code).toBe("invalid_signature");
    expect(engine.submitted).toHaveLength(1);
  });
});

describe("refusals before the engine", () => {
  async function refused(res: Response, status: number, code: string) {
    expect(res.status).toBe(status);
    expect(res.headers.get(LOAD_HEADER)).toMatch(/^active=/);
    expect((await errorOf(res)).code).toBe(code);
    expect(engine.submitted).toHaveLength(0);
  }

  it("fingerprint mismatch → 409 model_mismatch", async () => {
    await refused(await postWire(srv.base, wireRequest({ header: { model_fingerprint: "fp1-someothermodel" } })), 409, "model_mismatch");
  });

  it("ids outside the vocabulary → 422 invalid_parameter", async () => {
    const w = wireRequest();
    const ids = Int32Array.from(w.inputIds);
    ids[1] = META.vocab_size;
    await refused(await postWire(srv.base, wireRequest({ inputIds: ids })), 422, "invalid_parameter");
    const neg = Int32Array.from(w.inputIds);
    neg[0] = -1;
    await refused(await postWire(srv.base, wireRequest({ inputIds: neg })), 422, "invalid_parameter");
  });

  it("image-pad count ≠ the grids' tokens → 422 invalid_parameter", async () => {
    const w = wireRequest();
    const fewer = Int32Array.from([...w.inputIds].filter((id, i) => !(id === META.image_token_id && i === 4)));
    const res = await postWire(srv.base, wireRequest({ inputIds: fewer }));
    expect(res.status).toBe(422);
    const err = await errorOf(res);
    expect(err.code).toBe("invalid_parameter");
    expect(err.message).toContain("3 <|image_pad|> tokens");
    expect(err.message).toContain("need 4");
    // the right total but for a grid that needs more
    await refused(await postWire(srv.base, wireRequest({ inputIds: w.inputIds, grid: [1, 4, 8] })), 422, "invalid_parameter");
  });

  it("pads not after <|vision_start|>, or video tokens → 422", async () => {
    const w = wireRequest();
    const moved = Int32Array.from(w.inputIds);
    moved[3] = 12; // replace <|vision_start|>
    await refused(await postWire(srv.base, wireRequest({ inputIds: moved })), 422, "invalid_parameter");
    const video = Int32Array.from([...w.inputIds, META.video_token_id]);
    await refused(await postWire(srv.base, wireRequest({ inputIds: video })), 422, "invalid_parameter");
  });

  it("context overflow → 422 context_length_exceeded", async () => {
    // prompt 11 + 512 new within the cap, but the server's MAX_TOTAL_TOKENS is 2048
    const long = Int32Array.from([...wireRequest().inputIds, ...Array(CONFIG.maxTotalTokens - 100).fill(5)]);
    await refused(
      await postWire(srv.base, wireRequest({ inputIds: long, header: { params: { ...wireRequest().header.params, max_new_tokens: 200 } } })),
      422,
      "context_length_exceeded",
    );
  });

  it("too many image tokens → 422 too_many_image_tokens", async () => {
    const grid: [number, number, number] = [1, 34, 34]; // 289 tokens > 256
    const imgs = [imageBytes()];
    await refused(await postWire(srv.base, wireRequest({ grid, images: imgs })), 422, "too_many_image_tokens");
  });

  const base = wireRequest().header.params;
  const badParams: [string, Partial<typeof base>][] = [
    ["max_new_tokens over the cap", { max_new_tokens: CONFIG.maxNewTokensCap + 1 }],
    ["temperature > 2", { temperature: 2.5 }],
    ["negative temperature", { temperature: -0.1 }],
    ["top_p 0", { top_p: 0 }],
    ["top_p > 1", { top_p: 1.5 }],
    ["repetition_penalty 0", { repetition_penalty: 0 }],
    ["repetition_penalty > 2", { repetition_penalty: 2.5 }],
  ];
  for (const [name, p] of badParams) {
    it(`${name} → 422 invalid_parameter`, async () => {
      await refused(await postWire(srv.base, wireRequest({ header: { params: { ...base, ...p } } })), 422, "invalid_parameter");
    });
  }

  it("a deadline already passed → 504 backend_timeout", async () => {
    await refused(await postWire(srv.base, wireRequest({ header: { deadline_ms: Date.now() - 1000 } })), 504, "backend_timeout");
  });

  it("a body over MAX_BODY_BYTES → 413, a malformed wire body → 400, a wrong content type → 415", async () => {
    const big = wireRequest({ images: [imageBytes(CONFIG.maxBodyBytes + 10)] });
    await refused(await postWire(srv.base, big), 413, "payload_too_large");
    const junk = new TextEncoder().encode("not a wire body at all");
    await refused(await postRaw(srv.base, junk, { "content-type": WIRE_CONTENT_TYPE, ...(await signWireRequest(junk, CONFIG.hmacSecret)) }), 400, "invalid_request");
    await refused(await postWire(srv.base, wireRequest(), { headers: { "content-type": "application/json" } }), 415, "unsupported_media_type");
  });

  it("a body streamed past the cap without content-length → 413", async () => {
    const chunk = new Uint8Array(16 * 1024);
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(c) {
        if (sent >= 10) return c.close(); // bounded: 160 KiB > 64 KiB cap
        sent++;
        c.enqueue(chunk);
      },
    });
    const res = await fetch(`${srv.base}/internal/v1/generate`, {
      method: "POST",
      body,
      headers: { "content-type": WIRE_CONTENT_TYPE },
      duplex: "half",
    } as RequestInit);
    await refused(res, 413, "payload_too_large");
  });

  it("a client aborting mid-body is not admitted and not counted as a server error", async () => {
    const ac = new AbortController();
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new Uint8Array(100)); // and never ends
      },
    });
    const sent = fetch(`${srv.base}/internal/v1/generate`, {
      method: "POST",
      body,
      headers: { "content-type": WIRE_CONTENT_TYPE },
      duplex: "half",
      signal: ac.signal,
    } as RequestInit).catch((e: Error) => e);
    await new Promise((r) => setTimeout(r, 100));
    ac.abort();
    expect(await sent).toBeInstanceOf(Error);
    await waitFor(() => logs.lines.some((l) => l.includes("generate abandoned")));
    const metrics = await (await fetch(`${srv.base}/metrics`)).text();
    expect(metrics).toMatch(/^medvlm_backend_requests_total\{outcome="cancelled"\} 1$/m);
    expect(metrics).not.toContain("internal_error");
    expect(engine.submitted).toHaveLength(0);
  });

  it("engine not ready → 503 with Retry-After", async () => {
    engine.ready = false;
    const res = await postWire(srv.base, wireRequest());
    expect(res.headers.get("retry-after")).toBe("5");
    await refused(res, 503, "backend_unavailable");
  });
});

describe("engine refusals before start", () => {
  const mapped: [Behavior & { kind: "refuse" }, number][] = [
    [{ kind: "refuse", code: "invalid_image", message: "the image does not decode" }, 422],
    [{ kind: "refuse", code: "invalid_request", message: "grid mismatch", delayMs: 5 }, 400],
    [{ kind: "refuse", code: "internal_error", message: "x" }, 500],
    [{ kind: "refuse", code: "backend_overloaded", message: "busy" }, 503],
  ];
  for (const [b, status] of mapped) {
    it(`${b.code}: stream:false → HTTP ${status}; a stream (answered on admission) → its one event`, async () => {
      engine.script = () => b;
      const wire = wireRequest({ header: { stream: false } });
      const res = await postWire(srv.base, wire);
      expect(res.status).toBe(status);
      expect(status).toBe(ERROR_STATUS[b.code]);
      expect(await errorOf(res)).toMatchObject({ code: b.code, message: b.message, request_id: wire.header.request_id });
      if (b.code === "backend_overloaded") expect(res.headers.get("retry-after")).toBe("1");
      const streamed = await postWire(srv.base, wireRequest());
      expect(streamed.status).toBe(200);
      expect(streamed.headers.get(LOAD_HEADER)).toBeTruthy();
      expect(await events(streamed)).toEqual([{ type: "error", code: b.code, message: b.message }]);
    });
  }

  it("a stream's headers go out on admission, before the request leaves the queue", async () => {
    engine.script = () => ({ kind: "queue" });
    const ac = new AbortController();
    const res = await postWire(srv.base, wireRequest(), { signal: ac.signal });
    expect(res.status).toBe(200); // answered while the request still waits in the engine's queue
    expect(engine.stats().queued).toBe(1);
    ac.abort();
    await waitFor(() => engine.cancelled.length === 1);
  });
});

describe("admission control", () => {
  it("a full queue → 503 backend_overloaded with Retry-After, at once", async () => {
    engine.script = (r) => (r.id.startsWith("q-") ? { kind: "queue" } : { kind: "tokens", texts: ["a"] });
    // Two stream:false requests sit in the queue (QUEUE_SIZE 2) without answering yet.
    const aborts = [new AbortController(), new AbortController()];
    const pending = aborts.map((a) => postWire(srv.base, wireRequest({ header: { request_id: rid("q"), stream: false } }), { signal: a.signal }).catch(() => null));
    await waitFor(() => engine.stats().queued === 2);
    const t0 = Date.now();
    const res = await postWire(srv.base, wireRequest());
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).toBe("1");
    expect(res.headers.get(LOAD_HEADER)).toBe("active=0;queued=2;capacity=4");
    expect((await errorOf(res)).code).toBe("backend_overloaded");
    expect(engine.submitted).toHaveLength(2);
    // the queued clients give up: their requests are cancelled and the queue frees
    aborts.forEach((a) => a.abort());
    await Promise.all(pending);
    await waitFor(() => engine.cancelled.length === 2);
    expect(engine.stats().queued).toBe(0);
    const ok = await postWire(srv.base, wireRequest());
    expect(ok.status).toBe(200);
    await events(ok);
  });
});

describe("cancellation", () => {
  it("a client disconnect mid-stream cancels the engine request (visible in /metrics)", async () => {
    engine.script = () => ({ kind: "hang", texts: ["a", "b"] });
    const ac = new AbortController();
    const wire = wireRequest();
    const res = await postWire(srv.base, wire, { signal: ac.signal });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const first = await reader.read(); // at least the start event arrived
    expect(new TextDecoder().decode(first.value)).toContain('"start"');
    ac.abort();
    await waitFor(() => engine.cancelled.includes(wire.header.request_id));
    expect(engine.liveIds()).toEqual([]);
    const metrics = await (await fetch(`${srv.base}/metrics`)).text();
    expect(metrics).toMatch(/^medvlm_backend_cancellations_total\{reason="client_disconnect"\} 1$/m);
    expect(metrics).toMatch(/^medvlm_backend_requests_total\{outcome="cancelled"\} 1$/m);
  });

  it("a client disconnect before start (stream:false) cancels too", async () => {
    engine.script = () => ({ kind: "queue" });
    const ac = new AbortController();
    const wire = wireRequest({ header: { stream: false } });
    const p = postWire(srv.base, wire, { signal: ac.signal }).catch((e: Error) => e);
    await waitFor(() => engine.submitted.length === 1);
    ac.abort();
    expect(await p).toBeInstanceOf(Error);
    await waitFor(() => engine.cancelled.includes(wire.header.request_id));
  });

  it("the deadline passing mid-stream → cancel + a final backend_timeout error event", async () => {
    engine.script = () => ({ kind: "hang", texts: ["a"] });
    const wire = wireRequest({ header: { deadline_ms: Date.now() + 150 } });
    const res = await postWire(srv.base, wire);
    expect(res.status).toBe(200);
    const evs = await events(res);
    expect(evs.map((e) => e.type)).toEqual(["start", "token", "error"]);
    expect(evs[2]).toMatchObject({ type: "error", code: "backend_timeout" });
    expect(engine.cancelled).toEqual([wire.header.request_id]);
    const metrics = await (await fetch(`${srv.base}/metrics`)).text();
    expect(metrics).toMatch(/^medvlm_backend_cancellations_total\{reason="deadline"\} 1$/m);
    expect(metrics).toMatch(/^medvlm_backend_errors_total\{code="backend_timeout"\} 1$/m);
  });

  it("the deadline passing before start → 504 (stream:false), or the stream's one backend_timeout event", async () => {
    engine.script = () => ({ kind: "queue" });
    const res = await postWire(srv.base, wireRequest({ header: { deadline_ms: Date.now() + 100, stream: false } }));
    expect(res.status).toBe(504);
    expect((await errorOf(res)).code).toBe("backend_timeout");
    expect(engine.cancelled).toHaveLength(1);
    const streamed = await postWire(srv.base, wireRequest({ header: { deadline_ms: Date.now() + 100 } }));
    expect(streamed.status).toBe(200);
    expect(await events(streamed)).toEqual([{ type: "error", code: "backend_timeout", message: expect.any(String) }]);
    expect(engine.cancelled).toHaveLength(2);
  });
});

describe("logs", () => {
  it("carry ids, sizes and timings, never prompts, outputs or image bytes", async () => {
    engine.script = () => ({ kind: "tokens", texts: ["SECRET-ANSWER-TEXT"] });
    const wire = wireRequest();
    await events(await postWire(srv.base, wire));
    await waitFor(() => logs.lines.some((l) => l.includes("generate finished")));
    const all = logs.lines.join("\n");
    expect(all).toContain(wire.header.request_id);
    expect(all).not.toContain("SECRET-ANSWER-TEXT");
    const finished = JSON.parse(logs.lines.find((l) => l.includes("generate finished"))!) as Record<string, unknown>;
    expect(finished).toMatchObject({ prompt_tokens: wire.inputIds.length, completion_tokens: 1, images: 1, image_bytes: 64 });
    expect(typeof finished.total_ms).toBe("number");
    // the encoded body (ids, image) never appears
    expect(all).not.toContain(Buffer.from(encodeWireRequest(wire)).toString("base64").slice(0, 40));
  });
});

/**
 * The whole stack for real: `wrangler dev` (the Workers runtime) → two backend processes running the
 * converted demo checkpoint (config A, so its answers are checkable against the golden data).
 */
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { GENERATE_PATH, DEFAULT_PARAMS, WIRE_CONTENT_TYPE, encodeWireRequest, signWireRequest } from "../../shared/src/wire.ts";
import { devTokenForRepo } from "../../scripts/dev-secrets.ts";
import { ROOT, ensureServedModel, startBackend, startEdge, waitFor200, type Proc } from "../../scripts/lib/stack.ts";
import { GOLDEN_DIR, loadGoldenCase } from "../support/golden.ts";

const case01 = loadGoldenCase("case_01");
const case05 = loadGoldenCase("case_05");
let modelDir: string;
let secret: string;
let token: string;
let edge: Proc;
const backends: Proc[] = [];
const ports: number[] = [];
let edgeUrl: string;

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
}

const golden = (rel: string) => new Uint8Array(readFileSync(join(GOLDEN_DIR, rel)));

function vqaForm(stream: boolean, maxNew = 24): FormData {
  const form = new FormData();
  form.append("image", new Blob([golden("images/brain003631.png")], { type: "image/png" }), "brain.png");
  form.append("question", "What attribute can be observed in this image?");
  for (const o of ["Focal flair hyperintensity", "Bone fracture", "Vascular malformation", "Ligament tear"]) form.append("options", o);
  form.append("max_new_tokens", String(maxNew));
  form.append("stream", String(stream));
  return form;
}

/** Reads an SSE body into events. */
async function sse(res: Response): Promise<{ event: string; data: Record<string, unknown> }[]> {
  const out: { event: string; data: Record<string, unknown> }[] = [];
  for (const block of (await res.text()).split("\n\n").filter(Boolean)) {
    const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
    const data = /^data: (.*)$/m.exec(block)?.[1];
    if (data && data !== "[DONE]") out.push({ event, data: JSON.parse(data) });
  }
  return out;
}

async function metric(port: number, name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  return text
    .split("\n")
    .filter((l) => l.startsWith(name))
    .reduce((sum, l) => sum + Number(l.split(" ").at(-1)), 0);
}

beforeAll(async () => {
  modelDir = await ensureServedModel();
  const dev = await devTokenForRepo(ROOT, { sub: "e2e" });
  secret = dev.devVars.vars.BACKEND_HMAC_SECRET!;
  token = dev.token;
  for (let i = 0; i < 2; i++) {
    const port = await freePort();
    ports.push(port);
    backends.push(startBackend({ modelDir, port, secret, env: { QUEUE_SIZE: "2", MAX_BATCH: "2", ORT_THREADS: "1" } }));
  }
  const edgePort = await freePort();
  edgeUrl = `http://127.0.0.1:${edgePort}`;
  edge = startEdge({ modelDir, port: edgePort, backendUrls: ports.map((p) => `http://127.0.0.1:${p}`), vars: { RATE_LIMIT_MAX_CONCURRENT: "8", RATE_LIMIT_BURST: "100" } });
  await Promise.all([...ports.map((p, i) => waitFor200(`http://127.0.0.1:${p}/readyz`, 120_000, backends[i])), waitFor200(`${edgeUrl}/healthz`, 120_000, edge)]);
}, 240_000);

afterAll(async () => {
  await Promise.all([edge?.stop(), ...backends.map((b) => b.stop())]);
});

describe("through wrangler dev to a real backend", () => {
  it("/v1/vqa on a golden image generates exactly the golden greedy ids", async () => {
    const res = await fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm(true) });
    expect(res.status).toBe(200);
    const events = await sse(res);
    const tokens = events.filter((e) => e.event === "token");
    expect(tokens.map((e) => e.data.token_id)).toEqual(case01.generated_ids);
    expect(tokens.map((e) => e.data.index)).toEqual(case01.generated_ids.map((_, i) => i)); // every token once, in order
    const done = events.filter((e) => e.event === "done");
    expect(done).toHaveLength(1);
    expect(done[0]!.data).toMatchObject({ raw: case01.generated_text, finish_reason: "length", usage: { prompt_tokens: 200, image_tokens: 64, completion_tokens: 24 } });
    expect(tokens.map((e) => e.data.delta).join("")).toBe(case01.generated_text);
  });

  it("non-streamed /v1/vqa returns the parsed answer JSON", async () => {
    const res = await fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm(false) });
    expect(res.status).toBe(200);
    const body = (await res.json()) as Record<string, unknown>;
    expect(body).toMatchObject({ object: "vqa.answer", raw: case01.generated_text, answer: null, format_ok: false });
  });

  it("the official openai client works, streaming and not (golden case_05, two images)", async () => {
    const client = new OpenAI({ baseURL: `${edgeUrl}/v1`, apiKey: token });
    const content = case05.messages[0]!.content as Array<Record<string, unknown>>;
    const parts = content.map((p) =>
      p.type === "image"
        ? { type: "image_url" as const, image_url: { url: `data:image/png;base64,${Buffer.from(golden(p.image as string)).toString("base64")}` } }
        : { type: "text" as const, text: p.text as string },
    );
    const messages = [{ role: "user" as const, content: parts }];
    const completion = await client.chat.completions.create({ model: "medvlm-r1", messages, max_tokens: 24 });
    expect(completion.choices[0]!.message.content).toBe(case05.generated_text);
    expect(completion.usage?.completion_tokens).toBe(24);
    const stream = await client.chat.completions.create({ model: "medvlm-r1", messages, max_tokens: 24, stream: true });
    let text = "";
    let finish: string | null = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    expect(text).toBe(case05.generated_text);
    expect(finish).toBe("length");
  });

  it("a client that closes its stream stops the backend's work (visible in /metrics)", async () => {
    const before = await Promise.all(ports.map((p) => metric(p, "medvlm_backend_cancellations_total")));
    const abort = new AbortController();
    const res = await fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm(true, 2000), signal: abort.signal });
    const reader = res.body!.getReader();
    await reader.read();
    abort.abort();
    let after = before;
    for (let i = 0; i < 40 && after.every((v, j) => v === before[j]); i++) {
      await new Promise((r) => setTimeout(r, 250));
      after = await Promise.all(ports.map((p) => metric(p, "medvlm_backend_cancellations_total")));
    }
    expect(after.reduce((a, b) => a + b, 0)).toBe(before.reduce((a, b) => a + b, 0) + 1);
    const active = await Promise.all(ports.map((p) => metric(p, "medvlm_backend_active_sequences")));
    expect(active.reduce((a, b) => a + b, 0)).toBe(0);
  });

  it("a request signed with the wrong key is refused by the backend directly", async () => {
    const body = encodeWireRequest({
      header: { request_id: "e2e-wrong-key", model_fingerprint: "x", input_ids_count: 1, images: [], params: DEFAULT_PARAMS, stream: true, deadline_ms: null },
      inputIds: Int32Array.from([1]),
      images: [],
    });
    const res = await fetch(`http://127.0.0.1:${ports[0]}${GENERATE_PATH}`, {
      method: "POST",
      headers: { "content-type": WIRE_CONTENT_TYPE, ...(await signWireRequest(body, "not-the-right-secret-at-all")) },
      body,
    });
    expect(res.status).toBe(401);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_signature");
  });

  it("a full queue answers 503 with Retry-After at once", async () => {
    // Distinct subjects, so the per-subject rate limiter is not what refuses them.
    const tokens = await Promise.all(Array.from({ length: 12 }, (_, i) => devTokenForRepo(ROOT, { sub: `e2e-queue-${i}` })));
    const fire = async (t: string) => {
      const t0 = Date.now();
      const res = await fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${t}` }, body: vqaForm(false, 400) });
      return { res, ms: Date.now() - t0 };
    };
    const t0 = Date.now();
    // 2 backends × (2 running + 2 queued) fit; more are refused by admission control.
    const timed = await Promise.all(tokens.map((t) => fire(t.token)));
    const results = timed.map((x) => x.res);
    const refused = timed.filter((x) => x.res.status === 503);
    expect(refused.length).toBeGreaterThan(0);
    expect(Math.max(...refused.map((x) => x.ms))).toBeLessThan(5_000); // refused at once, not after a timeout
    const r = refused[0]!.res;
    expect(r.headers.get("retry-after")).toMatch(/^\d+$/);
    expect(((await r.json()) as { error: { code: string } }).error.code).toBe("backend_overloaded");
    expect(results.every((x) => x.status === 200 || x.status === 503)).toBe(true);
    await Promise.all(results.map((x) => (x.bodyUsed ? undefined : x.body?.cancel())));
    expect(Date.now() - t0).toBeLessThan(120_000);
  }, 180_000);

  it("with one backend killed mid-run, requests fail over or end cleanly; none hangs", async () => {
    const inflight = fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm(true, 300) });
    await new Promise((r) => setTimeout(r, 500));
    await backends[0]!.stop(0);
    const res = await inflight;
    // Either it ran on the survivor (200 with a done event) or it ends with a clean error event/status.
    if (res.status === 200) {
      const events = await sse(res);
      const last = events.at(-1)!;
      expect(["done", "error"]).toContain(last.event);
      if (last.event === "error") expect((last.data as { error: { code: string } }).error.code).toMatch(/^backend_/);
    } else {
      expect([502, 503]).toContain(res.status);
    }
    // New requests go to the surviving backend.
    const after = await fetch(`${edgeUrl}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm(false, 4) });
    expect(after.status).toBe(200);
  }, 120_000);
});

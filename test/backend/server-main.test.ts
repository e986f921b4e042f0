/**
 * The backend process end to end (main.ts in a child process with the fake engine in its worker thread):
 * configuration errors, start-up, readiness, a signed request, and SIGTERM's graceful shutdown.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { readModelMeta } from "../../gpu-backend/src/server/config.ts";
import { events, postWire, rid, waitFor, wireRequest, META, SECRET } from "./server-harness.ts";

const MAIN = new URL("../../gpu-backend/src/server/main.ts", import.meta.url).href;
const FAKE = new URL("./fixtures/fake-engine.ts", import.meta.url).href;
const dir = mkdtempSync(join(tmpdir(), "backend-main-"));
const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

function writeModel(): string {
  const m = mkdtempSync(join(dir, "model-"));
  const config = {
    model_type: "qwen2_vl",
    vocab_size: META.vocab_size,
    max_position_embeddings: META.max_position_embeddings,
    image_token_id: META.image_token_id,
    video_token_id: META.video_token_id,
    vision_start_token_id: META.vision_start_token_id,
    vision_end_token_id: META.vision_end_token_id,
  };
  writeFileSync(join(m, "config.json"), JSON.stringify(config));
  writeFileSync(join(m, "preprocessor_config.json"), JSON.stringify({ patch_size: 14, merge_size: 2 }));
  writeFileSync(join(m, "tokenizer.json"), JSON.stringify({ model: { type: "BPE" } }));
  return m;
}

interface Proc {
  child: ChildProcess;
  out: string[];
  err: string[];
  exited: Promise<number | null>;
}

/** Runs `main(env, { engineModule: fake })` in a child process (tsx loader). */
function runMain(env: Record<string, string>, fakeEngine = true): Proc {
  const code = `import { main } from ${JSON.stringify(MAIN)}; await main(process.env${fakeEngine ? `, { engineModule: new URL(${JSON.stringify(FAKE)}) }` : ""});`;
  const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], {
    env: { PATH: process.env.PATH ?? "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.push(child);
  const out: string[] = [];
  const err: string[] = [];
  child.stdout!.on("data", (d: Buffer) => out.push(...d.toString().split("\n").filter(Boolean)));
  child.stderr!.on("data", (d: Buffer) => err.push(d.toString()));
  const exited = new Promise<number | null>((r) => child.on("exit", (c) => r(c)));
  return { child, out, err, exited };
}

describe("main", () => {
  it("exits 1 listing every configuration problem", async () => {
    const p = runMain({ EXECUTION_PROVIDER: "tpu" });
    expect(await p.exited).toBe(1);
    const text = p.err.join("");
    expect(text).toContain("invalid backend configuration");
    expect(text).toContain("MODEL_DIR is required");
    expect(text).toContain("BACKEND_HMAC_SECRET is required");
    expect(text).toContain('EXECUTION_PROVIDER must be "cpu" or "cuda"');
  });

  it("starts, serves, and on SIGTERM finishes in-flight work, cancels the rest, exits 0", async () => {
    const modelDir = writeModel();
    const meta = await readModelMeta(modelDir);
    const p = runMain({ MODEL_DIR: modelDir, BACKEND_HMAC_SECRET: SECRET, BACKEND_PORT: "0", SHUTDOWN_GRACE_MS: "300", QUEUE_SIZE: "4" });
    await waitFor(() => p.out.some((l) => l.includes('"listening"')) || p.child.exitCode !== null, 20_000);
    const listening = JSON.parse(p.out.find((l) => l.includes('"listening"'))!) as { port: number; host: string };
    expect(listening.host).toBe("127.0.0.1");
    const base = `http://127.0.0.1:${listening.port}`;
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
    // ready once the worker has built the (fake) engine
    for (let i = 0; i < 200 && (await fetch(`${base}/readyz`)).status !== 200; i++) await new Promise((r) => setTimeout(r, 25));
    expect((await fetch(`${base}/readyz`)).status).toBe(200);

    const ok = await postWire(base, wireRequest({ header: { model_fingerprint: meta.fingerprint } }));
    expect(ok.status).toBe(200);
    expect((await events(ok)).at(-1)).toMatchObject({ type: "done", text: "img0:64" });

    // a long generation is in flight when SIGTERM arrives
    const slow = await postWire(base, wireRequest({ header: { model_fingerprint: meta.fingerprint, request_id: rid("slow") } }));
    expect(slow.status).toBe(200);
    const slowEvents = events(slow);
    p.child.kill("SIGTERM");
    await waitFor(() => p.out.some((l) => l.includes("shutdown: draining")), 5000);
    const refused = await postWire(base, wireRequest({ header: { model_fingerprint: meta.fingerprint } }));
    expect(refused.status).toBe(503);
    expect(refused.headers.get("retry-after")).toBeTruthy();
    expect(refused.headers.get("connection")).toBe("close");
    expect(await refused.json()).toMatchObject({ error: { code: "backend_unavailable" } });
    const evs = await slowEvents;
    expect(evs.at(-1)).toMatchObject({ type: "error", code: "backend_unavailable" });
    expect(evs.filter((e) => e.type === "error")).toHaveLength(1);
    expect(await p.exited).toBe(0);
    // logs are JSON lines without request content
    for (const line of p.out) expect(() => JSON.parse(line)).not.toThrow();
    expect(p.out.join("\n")).toContain("shutdown: complete");
  });

  it("when the engine worker dies, every live request still gets its final error before the process exits 1", async () => {
    const modelDir = writeModel();
    const meta = await readModelMeta(modelDir);
    const p = runMain({ MODEL_DIR: modelDir, BACKEND_HMAC_SECRET: SECRET, BACKEND_PORT: "0" });
    await waitFor(() => p.out.some((l) => l.includes('"listening"')) || p.child.exitCode !== null, 20_000);
    const base = `http://127.0.0.1:${(JSON.parse(p.out.find((l) => l.includes('"listening"'))!) as { port: number }).port}`;
    for (let i = 0; i < 200 && (await fetch(`${base}/readyz`)).status !== 200; i++) await new Promise((r) => setTimeout(r, 25));
    const header = { model_fingerprint: meta.fingerprint };
    const streaming = await postWire(base, wireRequest({ header: { ...header, request_id: rid("slow") } }));
    expect(streaming.status).toBe(200);
    const streamed = events(streaming);
    const collected = postWire(base, wireRequest({ header: { ...header, request_id: rid("slow"), stream: false } }));
    await new Promise((r) => setTimeout(r, 100));
    const crashing = postWire(base, wireRequest({ header: { ...header, request_id: rid("crash"), stream: false } }));
    const evs = await streamed;
    expect(evs.at(-1)).toMatchObject({ type: "error", code: "internal_error" });
    expect(evs.filter((e) => e.type === "error" || e.type === "done")).toHaveLength(1);
    for (const res of [await collected, await crashing]) {
      expect(res.status).toBe(500);
      expect(await res.json()).toMatchObject({ error: { code: "internal_error" } });
    }
    expect(await p.exited).toBe(1);
    expect(p.err.join("")).toContain("engine worker stopped unexpectedly");
  });
});

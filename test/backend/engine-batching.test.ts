/**
 * The serving engine's continuous batching on the config-A test model: batched greedy decoding equals the
 * golden (= single-sequence) ids token for token, requests join and leave between steps, and every request
 * ends in exactly one terminal event.
 */
import { mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BatchingEngine, DEFAULT_PREFILL_RUN_MAX, nextPrefillChunk } from "../../gpu-backend/src/engine/engine.ts";
import type { EngineEvent, EngineStats } from "../../gpu-backend/src/engine/engine-types.ts";
import { type LoadedModel, loadModel, releaseModel } from "../../gpu-backend/src/engine/model.ts";
import type { VisionProcess } from "../../gpu-backend/src/engine/vision-process.ts";
import { evalRequest, imageGrid } from "../../bench/lib/traces.ts";
import { PROJECT_ROOT, loadGoldenCases } from "../support/golden.ts";
import { useTinyModel } from "../support/tiny-model.ts";
import { collect, requestFor, tokenIds } from "../support/engine-requests.ts";
import { alive, waitFor } from "./server-harness.ts";

const cases = loadGoldenCases();
const tiny = useTinyModel("engine-batch-");

describe("BatchingEngine", () => {
  it.each(["append", "present"] as const)("six concurrent requests (batch 4) each reproduce the golden greedy ids (%s KV contract)", async (kv) => {
    const m = kv === tiny.model.kvCache ? tiny.model : await loadModel(join(tiny.dir, "onnx"), { intraOpThreads: 2, kvCache: kv });
    expect(m.kvCache).toBe(kv);
    const engine = new BatchingEngine(m, { maxBatch: 4 });
    let maxActive = 0;
    const runs = cases.map((c, i) => collect(engine, requestFor(c, `r${i}`), () => (maxActive = Math.max(maxActive, engine.stats().active))));
    const results = await Promise.all(runs);
    results.forEach((events, i) => {
      const c = cases[i]!;
      expect(events[0]!.type).toBe("start");
      expect(events.filter((e) => e.type === "done" || e.type === "error")).toHaveLength(1);
      expect(tokenIds(events), c.case).toEqual(c.generated_ids);
      const done = events.at(-1)!;
      expect(done).toMatchObject({ type: "done", finish_reason: "length", text: c.generated_text, usage: { prompt_tokens: c.seq_len, completion_tokens: 24 } });
    });
    expect(maxActive).toBe(4); // sequences really shared decode steps
    expect(engine.stats()).toMatchObject({ active: 0, queued: 0 });
    await engine.close();
    if (m !== tiny.model) await releaseModel(m);
  });

  it("a running stream keeps decoding while an arrival's image is preprocessed; an arrival without images starts at once", async () => {
    const text = cases.find((c) => !c.image_grid_thw)!;
    const big = await imageGrid(tiny.model, join(PROJECT_ROOT, "samples", "mdb146.png"), 12845056); // decode + resize of 1462×1010
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    let streamTokens = 0;
    let atSubmit = -1;
    let atStart = -1;
    const probe = new Promise<EngineEvent[]>((resolve) => {
      engine.submit(requestFor(text, "running", { max_new_tokens: 20_000 }), (ev) => {
        if (ev.type !== "token" || ++streamTokens !== 2) return;
        atSubmit = streamTokens;
        resolve(collect(engine, evalRequest("probe", 2, big), (p) => void (p.type === "start" && (atStart = streamTokens))));
      });
    });
    const events = await probe;
    engine.cancel("running");
    expect(events.at(-1)).toMatchObject({ type: "done", usage: { image_tokens: 1369, completion_tokens: 2 } });
    // Before the probe's start event (sent once its images are preprocessed), the stream went on getting tokens.
    expect(atStart - atSubmit).toBeGreaterThan(0);
    // A request without images has nothing to wait for: it starts in the turn it is admitted, before the next step.
    let second = 0;
    engine.submit(requestFor(text, "running-2", { max_new_tokens: 20_000 }), (ev) => void (ev.type === "token" && second++));
    await waitFor(() => second >= 2);
    const textSubmit = second;
    let textStart = -1;
    await collect(engine, requestFor(text, "text", { max_new_tokens: 2 }), (p) => void (p.type === "start" && (textStart = second)));
    engine.cancel("running-2");
    expect(textStart).toBe(textSubmit);
  });

  it("a request cancelled while its image is preprocessed holds the admission slot until that work ends, then the next is served", async () => {
    const text = cases.find((c) => !c.image_grid_thw)!;
    const withImage = cases.find((c) => c.image_grid_thw)!;
    const big = await imageGrid(tiny.model, join(PROJECT_ROOT, "samples", "mdb146.png"), 12845056);
    const engine = new BatchingEngine(tiny.model, { maxBatch: 4 });
    const dropped: EngineEvent[] = [];
    let streamTokens = 0;
    let cancelledAt = -1;
    const queuedAfter: number[] = [];
    let atCancel: EngineStats | null = null;
    let next: Promise<EngineEvent[]> | null = null;
    engine.submit(requestFor(text, "running", { max_new_tokens: 20_000 }), (ev) => {
      if (ev.type !== "token") return;
      streamTokens++;
      if (streamTokens === 2) engine.submit(evalRequest("dropped", 2, big), (e) => dropped.push(e));
      if (streamTokens === 3) {
        // "dropped" was admitted a turn ago; its preprocessing (~100 ms) outlasts the few ms of a decode step here.
        atCancel = engine.stats();
        engine.cancel("dropped");
        cancelledAt = streamTokens;
        next = collect(engine, requestFor(withImage, "next"));
      }
      if (cancelledAt > 0 && streamTokens <= cancelledAt + 2) queuedAfter.push(engine.stats().queued);
    });
    await waitFor(() => next !== null, 10_000);
    const served = await next!;
    engine.cancel("running");
    expect(atCancel).toMatchObject({ active: 2, queued: 0 });
    expect(queuedAfter.slice(0, 3)).toEqual([1, 1, 1]); // "next" waited while the cancelled preprocessing ran
    expect(dropped).toEqual([]);
    expect(tokenIds(served)).toEqual(withImage.generated_ids);
    expect(engine.stats()).toMatchObject({ active: 0, queued: 0 });
    await engine.close();
  });

  it("cancel silences a request at once and frees its slot", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    const c = cases[0]!;
    const seen: EngineEvent[] = [];
    let cancelledAt = -1;
    const other = collect(engine, requestFor(c, "keep"));
    engine.submit(requestFor(c, "drop", { max_new_tokens: 200 }), (ev) => {
      seen.push(ev);
      if (ev.type === "token" && seen.filter((e) => e.type === "token").length === 3) {
        engine.cancel("drop");
        cancelledAt = seen.length;
      }
    });
    const kept = await other;
    expect(tokenIds(kept)).toEqual(c.generated_ids);
    expect(seen.length).toBe(cancelledAt); // nothing after cancel
    expect(engine.stats()).toMatchObject({ active: 0, queued: 0 });
    await engine.close();
  });

  it("an image asked at a fixed size (resized_height/width) equal to its fetched size gives the golden ids; the bounds are not used", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    for (const c of cases.filter((k) => k.images.length === 1)) {
      const req = requestFor(c, `fixed-${c.case}`);
      const [width, height] = c.images[0]!.fetched_size_wh;
      Object.assign(req.images[0]!, { resizedHeight: height, resizedWidth: width, minPixels: 3136, maxPixels: 12845056 });
      expect(tokenIds(await collect(engine, req)), c.case).toEqual(c.generated_ids);
    }
    await engine.close();
  });

  it("refuses an image whose decoded grid differs from the declared one, before start", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    const req = requestFor(cases[0]!, "bad-grid");
    req.images[0]!.expectedGrid = [1, 14, 16];
    const events = await collect(engine, req);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ type: "error", code: "invalid_request" });
    await engine.close();
  });

  it("a corrupt image is invalid_image", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    const req = requestFor(cases[0]!, "corrupt");
    req.images[0]!.bytes = req.images[0]!.bytes.subarray(0, 200);
    const events = await collect(engine, req);
    expect(events).toEqual([expect.objectContaining({ type: "error", code: "invalid_image" })]);
    await engine.close();
  });

  it("logits the runtime returns as NaN end the request as the engine's failure (internal_error), not the client's", async () => {
    const m = await loadModel(join(tiny.dir, "onnx"), { intraOpThreads: 2 });
    const decoder = m.sessions.decoder;
    const run = decoder.run.bind(decoder);
    // A fault in the runtime's output (e.g. an fp16 overflow on a GPU), injected where ONNX Runtime hands it over.
    decoder.run = (async (...args: Parameters<typeof run>) => {
      const out = await run(...args);
      (out.logits!.data as Float32Array).fill(Number.NaN);
      return out;
    }) as typeof decoder.run;
    const engine = new BatchingEngine(m, { maxBatch: 2 });
    const events = await collect(engine, requestFor(cases[0]!, "nan"));
    expect(events.at(-1)).toEqual({ type: "error", request_id: "nan", code: "internal_error", message: "the engine failed" });
    await engine.close();
    await releaseModel(m);
  });

  it("a stop string ends generation with finish_reason stop and is not emitted", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 2 });
    const c = cases.find((x) => x.case === "case_05")!; // greedy text: " Bach Bach Bach …"
    const events = await collect(engine, requestFor(c, "stop", { stop: ["h Ba"] }));
    const done = events.at(-1)!;
    expect(done).toMatchObject({ type: "done", finish_reason: "stop", text: " Bac" });
    expect(events.filter((e) => e.type === "token").map((e) => (e as { text: string }).text).join("")).toBe(" Bac");
    await engine.close();
  });

  it("seeded sampling is reproducible and the seed matters", async () => {
    const engine = new BatchingEngine(tiny.model, { maxBatch: 3 });
    const c = cases[3]!;
    const p = { temperature: 1, top_p: 0.95, max_new_tokens: 16 };
    const [a, b, d] = await Promise.all([
      collect(engine, requestFor(c, "s1", { ...p, seed: 42 })),
      collect(engine, requestFor(c, "s2", { ...p, seed: 42 })),
      collect(engine, requestFor(c, "s3", { ...p, seed: 7 })),
    ]);
    expect(tokenIds(a)).toEqual(tokenIds(b));
    expect(tokenIds(a)).not.toEqual(tokenIds(d));
    await engine.close();
  });

  describe("prefillChunk: an arrival's prompt fed between the other sequences' decode steps", () => {
    const decoding = cases[3]!;
    const arrival = cases.find((c) => c.images.length > 0)!;
    /** Submits `decoding`, then `arrival` once the first has streamed two tokens; returns both event logs in order. */
    async function arrive(engine: BatchingEngine, onArrivalEvent?: (ev: EngineEvent) => void) {
      const order: Array<[string, EngineEvent]> = [];
      let arrived: Promise<EngineEvent[]> | null = null;
      const first = collect(engine, requestFor(decoding, "A", { max_new_tokens: 90 }), (ev) => {
        order.push(["A", ev]);
        if (ev.type === "token" && !arrived && order.filter(([, e]) => e.type === "token").length === 2) {
          arrived = collect(engine, requestFor(arrival, "B"), (e) => {
            order.push(["B", e]);
            onArrivalEvent?.(e);
          });
        }
      });
      const a = await first;
      return { a, b: await arrived!, order };
    }
    /** A's tokens between B's start and B's first token. */
    const tokensDuringAdmission = (order: Array<[string, EngineEvent]>) => {
      const start = order.findIndex(([who, e]) => who === "B" && e.type === "start");
      const firstB = order.findIndex(([who, e]) => who === "B" && e.type === "token");
      return order.slice(start, firstB).filter(([who, e]) => who === "A" && e.type === "token").length;
    };

    /** The sequence lengths of the decoder runs that feed prompt tokens (more than one per row), in order. */
    async function promptRuns<T>(body: () => Promise<T>): Promise<{ result: T; lengths: number[] }> {
      const session = tiny.model.sessions.decoder;
      const run = session.run;
      const lengths: number[] = [];
      session.run = ((feeds: Record<string, { dims: readonly number[] }>, ...rest: unknown[]) => {
        const s = feeds.inputs_embeds!.dims[1]!;
        if (s > 1) lengths.push(s);
        return (run as (...a: unknown[]) => unknown).call(session, feeds, ...rest);
      }) as typeof run;
      try {
        return { result: await body(), lengths };
      } finally {
        session.run = run;
      }
    }

    it("alone, a prompt longer than prefillRunMax goes in the fewest equal runs of at most that size, one per turn, and gives the golden ids", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 2, prefillRunMax: 64 });
      const { result: events, lengths } = await promptRuns(() => collect(engine, requestFor(arrival, "long")));
      const n = Math.ceil(arrival.seq_len / 64);
      expect(n).toBeGreaterThan(1);
      expect(lengths).toEqual(Array.from({ length: n }, (_, i) => Math.floor((arrival.seq_len + i) / n)).reverse());
      expect(tokenIds(events)).toEqual(arrival.generated_ids);
      await engine.close();
      // At the default maximum the same prompt is one run.
      const whole = new BatchingEngine(tiny.model, { maxBatch: 2 });
      const r = await promptRuns(() => collect(whole, requestFor(arrival, "whole")));
      expect(r.lengths).toEqual([arrival.seq_len]);
      expect(tokenIds(r.result)).toEqual(arrival.generated_ids);
      await whole.close();
    });

    it("chunk sizes: the fewest chunks of at most the maximum, equal to within one token", () => {
      expect([264, 176, 88].map((r) => nextPrefillChunk(r, 128))).toEqual([88, 88, 88]);
      for (let n = 1; n <= 300; n++) {
        for (let max = 1; max <= 40; max++) {
          const sizes: number[] = [];
          for (let left = n; left > 0; left -= sizes.at(-1)!) sizes.push(nextPrefillChunk(left, max));
          expect(sizes.length).toBe(Math.ceil(n / max));
          expect(Math.max(...sizes)).toBeLessThanOrEqual(max);
          expect(Math.max(...sizes) - Math.min(...sizes)).toBeLessThanOrEqual(1);
        }
      }
    });

    it.each([0, 16])("chunk %i: both reproduce the golden ids; A streams through B's admission only when chunked", async (chunk) => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 2, prefillChunk: chunk });
      let activeAtStart = -1;
      const {
        result: { a, b, order },
        lengths,
      } = await promptRuns(() =>
        arrive(engine, (ev) => {
          if (ev.type === "start") activeAtStart = engine.stats().active;
        }),
      );
      // A's prompt in one run (nothing else decodes), then B's: whole, or in ⌈seq_len / 16⌉ chunks of equal size.
      const n = Math.ceil(arrival.seq_len / 16);
      const chunks = Array.from({ length: n }, (_, i) => Math.floor((arrival.seq_len + i) / n)).reverse();
      expect(lengths).toEqual([decoding.seq_len, ...(chunk === 0 ? [arrival.seq_len] : chunks)]);
      expect(tokenIds(a).slice(0, decoding.generated_ids.length)).toEqual(decoding.generated_ids);
      expect(tokenIds(b)).toEqual(arrival.generated_ids);
      expect(activeAtStart).toBe(2); // the request being admitted counts as active
      // One unit per turn while A decodes: the vision encoder, then ⌈seq_len / chunk⌉ chunks; B's first token
      // comes out in the turn of its last chunk, before that turn's decode step.
      const units = 1 + Math.ceil(arrival.seq_len / chunk);
      expect(tokensDuringAdmission(order)).toBe(chunk === 0 ? 0 : units - 1);
      expect(engine.stats()).toMatchObject({ active: 0, queued: 0 });
      await engine.close();
    });

    it("cancelling a request mid-prefill silences it and frees the admission for the next one", async () => {
      const engine = new BatchingEngine(tiny.model, { maxBatch: 2, prefillChunk: 4 });
      const seen: EngineEvent[] = [];
      let submitted = false;
      const a = collect(engine, requestFor(decoding, "A", { max_new_tokens: 40 }), (ev) => {
        if (ev.type === "token" && !submitted) {
          submitted = true;
          engine.submit(requestFor(arrival, "B"), (e) => {
            seen.push(e);
            if (e.type === "start") setImmediate(() => engine.cancel("B"));
          });
        }
      });
      const kept = await a;
      expect(tokenIds(kept).slice(0, decoding.generated_ids.length)).toEqual(decoding.generated_ids);
      expect(seen.map((e) => e.type)).toEqual(["start"]);
      expect(engine.stats()).toMatchObject({ active: 0, queued: 0 });
      const next = await collect(engine, requestFor(arrival, "C"));
      expect(tokenIds(next)).toEqual(arrival.generated_ids);
      await engine.close();
    });
  });
});

describe("BatchingEngine with the vision encoder in its own process", () => {
  let apart: LoadedModel;
  beforeAll(async () => {
    apart = await loadModel(join(tiny.dir, "onnx"), { intraOpThreads: 2, visionProcess: true });
  }, 60_000);
  afterAll(async () => {
    if (apart) await releaseModel(apart);
  });

  it("a process that stops fails the encoding it was running (one it had not begun goes to the next process), and serves the next request", async () => {
    const vision = apart.sessions.vision as VisionProcess;
    const engine = new BatchingEngine(apart, { maxBatch: 2 });
    const c = cases.find((k) => k.image_grid_thw)!;
    const restarts = vision.restarts;
    // The crash is called as the request starts; its encoding is sent to the stopping process right after, which
    // never begins it: the new process encodes it, and the request gets its golden ids.
    const resent = await collect(engine, requestFor(c, "resent"), (ev) => void (ev.type === "start" && vision.crash()));
    expect(tokenIds(resent)).toEqual(c.generated_ids);
    expect(vision.restarts).toBe(restarts + 1);
    // The crash comes once the process has begun a long encoding: that request fails.
    const big = await imageGrid(apart, join(PROJECT_ROOT, "samples", "mdb146.png"), 12845056);
    const crashWhenRunning = setInterval(() => {
      if (!vision.running) return;
      clearInterval(crashWhenRunning);
      vision.crash();
    }, 2);
    const lost = await collect(engine, evalRequest("lost", 3, big));
    clearInterval(crashWhenRunning);
    expect(vision.restarts).toBe(restarts + 2);
    expect(lost.map((e) => e.type)).toEqual(["start", "error"]);
    expect(lost.at(-1)).toMatchObject({ code: "internal_error", message: "the engine failed" });
    const next = await collect(engine, requestFor(c, "next"));
    expect(tokenIds(next)).toEqual(c.generated_ids);
    expect(vision.failed).toBeNull();
    expect(engine.stats()).toMatchObject({ ready: true, failed: false });
    await engine.close();
  });

  it("a request cancelled while its image is encoded ends that encoding at once, alone or beside a running stream", async () => {
    const vision = apart.sessions.vision as VisionProcess;
    const big = await imageGrid(apart, join(PROJECT_ROOT, "samples", "mdb146.png"), 12845056);
    const withImage = cases.find((k) => k.image_grid_thw)!;
    const text = cases.find((k) => !k.image_grid_thw)!;
    const run = vision.run.bind(vision);
    for (const beside of [false, true]) {
      const engine = new BatchingEngine(apart, { maxBatch: 2, prefillChunk: 32 });
      const stream: EngineEvent[] = [];
      if (beside) {
        engine.submit(requestFor(text, "running", { max_new_tokens: 20_000 }), (ev) => stream.push(ev));
        await waitFor(() => engine.stats().active === 1 && engine.stats().queued === 0 && tokenIds(stream).length > 0, 10_000);
      }
      const restarts = vision.restarts;
      const pid = vision.pid!;
      // Cancel as the engine hands the encoding to the process (the request's signal is what stops it there).
      let activeAtEncoding = -1;
      vision.run = (feeds, signal) => {
        const p = run(feeds, signal);
        activeAtEncoding = engine.stats().active; // the stream (beside) and the request being admitted
        if (vision.busy) engine.cancel("big");
        return p;
      };
      const seen: EngineEvent[] = [];
      engine.submit(evalRequest("big", 3, big), (ev) => seen.push(ev));
      await waitFor(() => vision.pid !== null && vision.pid !== pid, 30_000); // the new process is up
      vision.run = run;
      expect(activeAtEncoding, `beside ${beside}`).toBe(beside ? 2 : 1);
      expect(vision.restarts).toBe(restarts + 1);
      expect(engine.stats().visionRestarts).toBe(restarts + 1); // what /metrics reports
      expect(seen.map((e) => e.type), `beside ${beside}`).toEqual(["start"]); // cancelled: silent from then on
      expect(alive(pid)).toBe(false);
      if (beside) {
        await waitFor(() => tokenIds(stream).length >= text.generated_ids.length, 30_000);
        engine.cancel("running");
        expect(tokenIds(stream).slice(0, text.generated_ids.length)).toEqual(text.generated_ids);
      }
      expect(tokenIds(await collect(engine, requestFor(withImage, "next")))).toEqual(withImage.generated_ids);
      expect(engine.stats()).toMatchObject({ active: 0, queued: 0, ready: true });
      await engine.close();
    }
  }, 120_000);

  it("a process that cannot be started again leaves the engine not ready, failing image requests only", async () => {
    const dir = mkdtempSync(join(tmpdir(), "engine-vision-restart-"));
    try {
      for (const f of readdirSync(join(tiny.dir, "onnx"))) symlinkSync(join(tiny.dir, "onnx", f), join(dir, f));
      const m = await loadModel(dir, { intraOpThreads: 2, visionProcess: true });
      const vision = m.sessions.vision as VisionProcess;
      const engine = new BatchingEngine(m, { maxBatch: 2 });
      rmSync(join(dir, "vision_encoder.onnx"));
      writeFileSync(join(dir, "vision_encoder.onnx"), "gone bad");
      vision.crash();
      await waitFor(() => vision.failed !== null);
      expect(engine.stats()).toMatchObject({ ready: false, failed: true });
      const withImage = cases.find((k) => k.image_grid_thw)!;
      expect((await collect(engine, requestFor(withImage, "img"))).at(-1)).toMatchObject({ type: "error", code: "internal_error" });
      const text = cases.find((k) => !k.image_grid_thw)!;
      expect(tokenIds(await collect(engine, requestFor(text, "txt")))).toEqual(text.generated_ids);
      await engine.close();
      await releaseModel(m);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("six concurrent requests (batch 4, prompts in chunks) reproduce the golden greedy ids", async () => {
    expect(apart.visionProcess).toBe(true);
    const engine = new BatchingEngine(apart, { maxBatch: 4, prefillChunk: 32 });
    const results = await Promise.all(cases.map((c, i) => collect(engine, requestFor(c, `t${i}`))));
    results.forEach((events, i) => {
      expect(tokenIds(events), cases[i]!.case).toEqual(cases[i]!.generated_ids);
      expect(events.at(-1)).toMatchObject({ type: "done", usage: { completion_tokens: 24 } });
    });
    await engine.close();
  });

  it("a running stream keeps getting tokens while an arrival's image is encoded in the process, and none when the engine's thread encodes it", async () => {
    const text = cases.find((c) => !c.image_grid_thw)!;
    const big = await imageGrid(apart, join(PROJECT_ROOT, "samples", "mdb146.png"), 12845056);
    expect(big.grid).toEqual([1, 74, 74]); // 1369 image tokens: an encoding that takes many decode steps' time
    const probeIds: number[][] = [];
    for (const model of [tiny.model, apart]) {
      const engine = new BatchingEngine(model, { maxBatch: 2, prefillChunk: 0 });
      let streamTokens = 0;
      let atProbeStart = -1;
      let atProbeFirst = -1;
      const probe: Promise<EngineEvent[]> = new Promise((resolve) => {
        const running = collect(engine, requestFor(text, "running", { max_new_tokens: 20_000 }), (ev) => {
          if (ev.type !== "token" || ++streamTokens !== 2) return;
          resolve(
            collect(engine, evalRequest("probe", 3, big), (p) => {
              if (p.type === "start") atProbeStart = streamTokens;
              if (p.type === "token" && atProbeFirst < 0) {
                atProbeFirst = streamTokens;
                engine.cancel("running");
              }
            }),
          );
        });
        void running;
      });
      const events = await probe;
      expect(events.at(-1)).toMatchObject({ type: "done", usage: { image_tokens: 1369, completion_tokens: 3 } });
      probeIds.push(tokenIds(events));
      const during = atProbeFirst - atProbeStart;
      // On the engine's thread the encoder and the first prefill run are one turn; the prompt's further runs (of at
      // most DEFAULT_PREFILL_RUN_MAX tokens) each let the stream take one step. In its own process, the stream goes on.
      const start = events.find((e) => e.type === "start") as { prompt_tokens: number };
      const runs = Math.ceil(start.prompt_tokens / DEFAULT_PREFILL_RUN_MAX);
      if (model.visionProcess) expect(during, "stream tokens while the probe was encoded and prefilled").toBeGreaterThan(runs - 1);
      else expect(during).toBe(runs - 1);
      await engine.close();
    }
    expect(probeIds[1]).toEqual(probeIds[0]); // the process's features give the same tokens
  }, 120_000);
});

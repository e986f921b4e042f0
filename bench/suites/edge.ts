/**
 * `edge`: the worker's own work under `wrangler dev` (auth, rate-limit Durable Object, multipart parsing and
 * validation, chat template + tokenization, wire encoding + HMAC signing, NDJSON relay), with the backend
 * answered at once by a local double (start + one token + done). Measures:
 *   - cold start: spawning wrangler → /healthz answers → first successful /v1/vqa (the tokenizer tables are
 *     loaded on the first /v1/vqa), and that first /v1/vqa vs the second, over several fresh starts
 *   - load: req/s and p50/p99 of /v1/vqa (not streamed) with N requests from C concurrent clients, and of
 *     /healthz (auth-free, no work) as the peer measured on the same worker in the same run
 *   - worker startup CPU (`wrangler check startup`'s profile: script evaluation before the first request)
 *   - the worker's own CPU per request, in-process: Node's V8 runs the worker's source with the Durable Object
 *     and the backend answered by doubles (bench/children/edge-worker.ts), p50/p99 per request; and the heap
 *     the whole worker holds after that load
 *   - isolate memory proxy: heap growth of building the tokenizer in a Node child (see the child)
 * Loopback only; the rate limits are raised by --var so that the limiter admits every request (its
 * Durable Object call still runs).
 */
import { execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { createServer as createHttpServer, type Server } from "node:http";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { devTokenForRepo } from "../../scripts/dev-secrets.ts";
import { ensureServedModel, startEdge } from "../../scripts/lib/stack.ts";
import { GENERATE_PATH, LOAD_HEADER, WIRE_EVENTS_CONTENT_TYPE, decodeWireRequest, encodeEvent } from "../../shared/src/wire.ts";
import type { EdgeWorkerResult } from "../children/edge-worker.ts";
import type { TokenizerHeapResult } from "../children/tokenizer-heap.ts";
import { type BenchOptions, GOLDEN_DIR, ROOT, fmt, fmtBytes, log, machineInfo, machineLine, percentile, runChild, spread, table, writeResult } from "../lib/common.ts";

const WRANGLER = join(ROOT, "node_modules", "wrangler", "bin", "wrangler.js");

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createNetServer()
      .once("error", reject)
      .listen(0, "127.0.0.1", () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => resolve(p));
      });
  });
}

/**
 * What the instant backend answers to a wire request body: start + one token + done, for the request's id and
 * prompt length (decoded, so that a malformed request shows as `malformed`).
 */
export function backendDoubleAnswer(body: Uint8Array): { events: string; malformed: boolean } {
  let requestId = "unknown";
  let promptTokens = 0;
  let malformed = false;
  try {
    const w = decodeWireRequest(body);
    requestId = w.header.request_id;
    promptTokens = w.inputIds.length;
  } catch {
    malformed = true;
  }
  const imageTokens = 64;
  const events =
    encodeEvent({ type: "start", request_id: requestId, prompt_tokens: promptTokens, image_tokens: imageTokens, queue_ms: 0 }) +
    encodeEvent({ type: "token", id: 32, text: "A" }) +
    encodeEvent({
      type: "done",
      finish_reason: "length",
      text: "A",
      usage: { prompt_tokens: promptTokens, image_tokens: imageTokens, completion_tokens: 1 },
      timings: { queue_ms: 0, vision_ms: 0, prefill_ms: 0, decode_ms: 0, backend_ms: 0 },
    });
  return { events, malformed };
}

/** The instant backend: decodes the wire request (so malformed ones would show), answers start + 1 token + done. */
export async function startBackendDouble(): Promise<{ url: string; served: () => number; bad: () => number; close: () => Promise<void> }> {
  let served = 0;
  let bad = 0;
  const server: Server = createHttpServer((req, res) => {
    if (req.method === "GET" && (req.url === "/healthz" || req.url === "/readyz")) {
      res.writeHead(200, { "content-type": "application/json" }).end('{"status":"ok"}');
      return;
    }
    if (req.method !== "POST" || req.url !== GENERATE_PATH) {
      res.writeHead(404).end();
      return;
    }
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const answer = backendDoubleAnswer(new Uint8Array(Buffer.concat(chunks)));
      if (answer.malformed) bad++;
      served++;
      res.writeHead(200, { "content-type": WIRE_EVENTS_CONTENT_TYPE, [LOAD_HEADER]: "active=0;queued=0;capacity=8" });
      res.end(answer.events);
    });
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", () => r()));
  return {
    url: `http://127.0.0.1:${port}`,
    served: () => served,
    bad: () => bad,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

interface Edge {
  url: string;
  child: ChildProcess;
  stop(): Promise<void>;
}

function startWrangler(p: { modelDir: string; backendUrl: string; persistDir: string; logFile: string }): Promise<Edge> {
  return (async () => {
    const port = await freePort();
    const inspector = await freePort();
    const vars = { RATE_LIMIT_RPM: "100000000", RATE_LIMIT_BURST: "100000000", RATE_LIMIT_MAX_CONCURRENT: "100000" };
    const proc = startEdge({
      modelDir: p.modelDir,
      port,
      backendUrls: [p.backendUrl],
      logFile: p.logFile,
      vars,
      args: ["--inspector-port", String(inspector), "--persist-to", p.persistDir],
    });
    return { url: `http://127.0.0.1:${port}`, child: proc.child, stop: () => proc.stop() };
  })();
}

/** Kernel clock ticks per second, the unit of /proc/<pid>/stat CPU times. */
const CLK_TCK = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/**
 * RSS and CPU time (user + system) of the workerd process(es) in wrangler's process group (Linux /proc);
 * null where unavailable. RSS is a second proxy for isolate memory (the real runtime, but the whole process:
 * runtime + every isolate); CPU over a load run divided by its requests bounds the worker's own CPU per
 * request from above (it includes workerd's HTTP handling, the Durable Object and the backend fetch).
 */
export function workerdProc(pgid: number): { rss: number; cpu_ms: number } | null {
  try {
    let rss = 0;
    let cpu = 0;
    let found = false;
    for (const pid of readdirSync("/proc").filter((d) => /^\d+$/.test(d))) {
      let stat: string;
      try {
        stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      } catch {
        continue;
      }
      const close = stat.lastIndexOf(")");
      const comm = stat.slice(stat.indexOf("(") + 1, close);
      const fields = stat.slice(close + 2).split(" ");
      if (Number(fields[2]) !== pgid || !comm.includes("workerd")) continue;
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
      if (m) {
        rss += Number(m[1]) * 1024;
        cpu += ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
        found = true;
      }
    }
    return found ? { rss, cpu_ms: cpu } : null;
  } catch {
    return null;
  }
}

const image = new Uint8Array(readFileSync(join(GOLDEN_DIR, "images", "brain003631.png")));

/** The /v1/vqa form the suite sends (the golden brain MRI, the eval question, four options, one token). */
export function vqaForm(): FormData {
  const form = new FormData();
  form.append("image", new Blob([image], { type: "image/png" }), "brain.png");
  form.append("question", "What attribute can be observed in this image?");
  for (const o of ["Focal flair hyperintensity", "Bone fracture", "Vascular malformation", "Ligament tear"]) form.append("options", o);
  form.append("max_new_tokens", "1");
  form.append("stream", "false");
  return form;
}

async function vqa(url: string, token: string): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: vqaForm() });
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - t0 };
}

async function healthz(url: string): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  const res = await fetch(`${url}/healthz`);
  await res.arrayBuffer();
  return { status: res.status, ms: performance.now() - t0 };
}

async function waitUntil(ok: () => Promise<boolean>, timeoutMs: number, child: ChildProcess): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (child.exitCode !== null) throw new Error(`wrangler exited (${child.exitCode})`);
    try {
      if (await ok()) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`wrangler dev was not ready within ${timeoutMs} ms`);
}

export interface LoadResult {
  requests: number;
  clients: number;
  wall_ms: number;
  rps: number;
  p50_ms: number;
  p99_ms: number;
  max_ms: number;
  statuses: Record<string, number>;
  /** workerd CPU time (user + system) over the run / requests; set by the caller */
  workerd_cpu_ms_per_request?: number;
}

async function load(n: number, clients: number, one: () => Promise<{ status: number; ms: number }>): Promise<LoadResult> {
  const lat: number[] = [];
  const statuses: Record<string, number> = {};
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < n) {
        next++;
        try {
          const r = await one();
          lat.push(r.ms);
          statuses[r.status] = (statuses[r.status] ?? 0) + 1;
        } catch (e) {
          statuses[`error ${(e as Error).message}`] = (statuses[`error ${(e as Error).message}`] ?? 0) + 1;
        }
      }
    }),
  );
  const wall = performance.now() - t0;
  return { requests: n, clients, wall_ms: wall, rps: n / (wall / 1000), p50_ms: percentile(lat, 50), p99_ms: percentile(lat, 99), max_ms: Math.max(...lat), statuses };
}

/**
 * The worker's startup (script evaluation: module top level, Hono app, bundled tables) as `wrangler check
 * startup` profiles it: CPU ms = the profile's non-idle samples. What Cloudflare counts against its startup
 * limit, measured on this CPU; null when the command fails.
 */
function startupCpuMs(modelDir: string, dir: string): { cpu_ms: number; span_ms: number } | null {
  const out = join(dir, "startup.cpuprofile");
  try {
    execFileSync(process.execPath, [WRANGLER, "check", "startup", "--outfile", out], {
      cwd: ROOT,
      stdio: "ignore",
      timeout: 180_000,
      env: { ...process.env, WRANGLER_SEND_METRICS: "false", CLOUDFLARE_CF_FETCH_ENABLED: "false", MODEL_DIR: modelDir },
    });
    const p = JSON.parse(readFileSync(out, "utf8")) as {
      nodes: { id: number; callFrame: { functionName: string } }[];
      samples: number[];
      timeDeltas: number[];
      startTime: number;
      endTime: number;
    };
    const idle = new Set(p.nodes.filter((n) => n.callFrame.functionName === "(idle)").map((n) => n.id));
    let busy = 0;
    p.samples.forEach((id, i) => {
      if (!idle.has(id)) busy += p.timeDeltas[i] ?? 0;
    });
    return { cpu_ms: busy / 1000, span_ms: (p.endTime - p.startTime) / 1000 };
  } catch {
    return null;
  }
}

export async function edgeSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const machine = machineInfo();
  log(machineLine(machine));
  // The demo model (the same tokenizer and meta the tests bundle), so edge/generated stays what they expect.
  const modelDir = await ensureServedModel({ log });
  const { token } = await devTokenForRepo(ROOT, { sub: "bench-edge" });
  const double = await startBackendDouble();
  const persistDir = mkdtempSync(join(tmpdir(), "medvlm-bench-edge-"));
  const logFile = join(persistDir, "wrangler.log");
  const starts = opts.quick ? 1 : 3;
  const cold: Array<{
    healthy_ms: number;
    first_vqa_done_ms: number;
    first_vqa_ms: number;
    second_vqa_ms: number;
    third_vqa_ms: number;
    statuses: number[];
    workerd_rss_after_healthz: number | null;
    workerd_rss_after_first_vqa: number | null;
  }> = [];
  let workerdRssAfterLoad: number | null = null;
  let edge: Edge | null = null;
  let loads: { healthz: LoadResult; vqa: LoadResult } | null = null;
  try {
    for (let i = 0; i < starts; i++) {
      log(`edge: fresh wrangler dev start ${i + 1}/${starts}`);
      const t0 = performance.now();
      edge = await startWrangler({ modelDir, backendUrl: double.url, persistDir, logFile });
      const e = edge;
      await waitUntil(async () => (await healthz(e.url)).status === 200, 120_000, e.child);
      const healthy = performance.now() - t0;
      const rssHealthy = workerdProc(e.child.pid!)?.rss ?? null;
      const first = await vqa(e.url, token);
      const firstDone = performance.now() - t0;
      const rssFirst = workerdProc(e.child.pid!)?.rss ?? null;
      const second = await vqa(e.url, token);
      const third = await vqa(e.url, token);
      cold.push({
        healthy_ms: healthy,
        first_vqa_done_ms: firstDone,
        first_vqa_ms: first.ms,
        second_vqa_ms: second.ms,
        third_vqa_ms: third.ms,
        statuses: [first.status, second.status, third.status],
        workerd_rss_after_healthz: rssHealthy,
        workerd_rss_after_first_vqa: rssFirst,
      });
      if (first.status !== 200) throw new Error(`/v1/vqa answered ${first.status} (see ${logFile})`);
      if (i < starts - 1) {
        await e.stop();
        edge = null;
      }
    }
    const e = edge!;
    log(`edge: warm-up, then ${opts.requests} × /healthz and ${opts.requests} × /v1/vqa with ${opts.clients} clients`);
    await load(Math.min(20, opts.requests), opts.clients, () => vqa(e.url, token));
    const cpu = () => workerdProc(e.child.pid!)?.cpu_ms ?? NaN;
    const c0 = cpu();
    const h = await load(opts.requests, opts.clients, () => healthz(e.url));
    const c1 = cpu();
    const v = await load(opts.requests, opts.clients, () => vqa(e.url, token));
    const c2 = cpu();
    h.workerd_cpu_ms_per_request = (c1 - c0) / h.requests;
    v.workerd_cpu_ms_per_request = (c2 - c1) / v.requests;
    loads = { healthz: h, vqa: v };
    workerdRssAfterLoad = workerdProc(e.child.pid!)?.rss ?? null;
  } finally {
    await edge?.stop();
    await double.close();
  }
  log("edge: tokenizer heap proxy (Node child)");
  log("edge: wrangler check startup (worker startup CPU profile)");
  const startup = startupCpuMs(modelDir, persistDir);
  const heap = (
    await runChild<TokenizerHeapResult>(
      "tokenizer-heap.ts",
      { file: join(ROOT, "edge", "generated", "tokenizer.bin"), sample: "What attribute can be observed in this image?\nA) Focal flair hyperintensity" },
      { timeoutS: 120 },
    )
  ).result;
  log(`edge: the worker in-process (Node's V8, Durable Object and backend doubles), ${opts.requests} requests per route`);
  const own = (await runChild<EdgeWorkerResult>("edge-worker.ts", { requests: opts.requests, warmup: Math.min(50, opts.requests) }, { timeoutS: 300, quiet: true })).result;
  rmSync(persistDir, { recursive: true, force: true });

  const c = {
    healthy_ms: spread(cold.map((x) => x.healthy_ms)),
    first_vqa_done_ms: spread(cold.map((x) => x.first_vqa_done_ms)),
    first_vqa_ms: spread(cold.map((x) => x.first_vqa_ms)),
    second_vqa_ms: spread(cold.map((x) => x.second_vqa_ms)),
    third_vqa_ms: spread(cold.map((x) => x.third_vqa_ms)),
  };
  const fmtS = (s: ReturnType<typeof spread>) => (s.n > 1 ? `${fmt(s.median, 0)} (${fmt(s.min, 0)}–${fmt(s.max, 0)})` : fmt(s.median, 0));
  let text = `\nedge cold start (${starts} fresh wrangler dev starts; ms, median (min–max))\n`;
  text += table([
    ["spawn → /healthz 200", "spawn → first /v1/vqa done", "first /v1/vqa", "second", "third", "first / second"],
    [fmtS(c.healthy_ms), fmtS(c.first_vqa_done_ms), fmtS(c.first_vqa_ms), fmtS(c.second_vqa_ms), fmtS(c.third_vqa_ms), `×${fmt(c.first_vqa_ms.median / c.second_vqa_ms.median, 1)}`],
  ]);
  if (loads) {
    const row = (name: string, r: LoadResult) => [name, String(r.requests), String(r.clients), fmt(r.rps, 1), fmt(r.p50_ms, 1), fmt(r.p99_ms, 1), fmt(r.max_ms, 1), fmt(r.workerd_cpu_ms_per_request ?? NaN, 2), Object.entries(r.statuses).map(([k, v]) => `${k}×${v}`).join(" ")];
    text += `\n\nedge under load (backend double answers at once; loopback; the client runs on the same 2 cores)\n`;
    text += table([["route", "requests", "clients", "req/s", "p50 ms", "p99 ms", "max ms", "workerd CPU ms/req", "statuses"], row("GET /healthz", loads.healthz), row("POST /v1/vqa", loads.vqa)]);
    text += `\n/v1/vqa's own CPU (workerd CPU per /v1/vqa minus per /healthz): ${fmt(loads.vqa.workerd_cpu_ms_per_request! - loads.healthz.workerd_cpu_ms_per_request!, 2)} ms`;
    text += `\n/v1/vqa vs /healthz on the same worker: p50 ×${fmt(loads.vqa.p50_ms / loads.healthz.p50_ms, 1)}, req/s ×${fmt(loads.vqa.rps / loads.healthz.rps, 2)}; backend double served ${double.served()} (${double.bad()} malformed)`;
  }
  const rssGrowth = spread(cold.map((x) => (x.workerd_rss_after_first_vqa ?? NaN) - (x.workerd_rss_after_healthz ?? NaN)));
  if (rssGrowth.n > 0) {
    text += `\n\nworkerd process RSS (whole runtime): after /healthz ${fmtBytes(cold[0]!.workerd_rss_after_healthz)}, growth over the first /v1/vqa ${fmtBytes(rssGrowth.median)} (median of ${rssGrowth.n} starts), after the load test ${fmtBytes(workerdRssAfterLoad)}`;
  }
  const ownRow = (name: string, r: EdgeWorkerResult["healthz"]) => [
    name,
    String(r.requests),
    fmt(r.thread_p50_ms ?? NaN, 2),
    fmt(r.thread_p99_ms ?? NaN, 2),
    fmt(r.thread_mean_ms ?? NaN, 2),
    fmt(r.cpu_p50_ms, 2),
    fmt(r.cpu_p99_ms, 2),
    fmt(r.wall_p50_ms, 2),
    Object.entries(r.statuses).map(([k, v]) => `${k}×${v}`).join(" "),
  ];
  text += `\n\nthe worker's own CPU per request, ms (in-process: Node's V8 runs the worker's source; Durable Object and backend doubles, not counted; ${own.warmup} warm-up rounds, routes interleaved). Main thread = where the worker's JavaScript runs; process = plus V8's background GC/compiler threads\n`;
  text += table([
    ["route", "requests", "main thread p50", "p99", "mean", "process p50", "p99", "wall p50", "statuses"],
    ownRow("GET /healthz", own.healthz),
    ownRow("POST /v1/vqa, HS256 token", own.vqa_hs256),
    ownRow("POST /v1/vqa, ES256 token (public JWK)", own.vqa_es256),
  ]);
  text += `\nbackend double ${fmt(own.backend_double_cpu_ms, 2)} ms CPU per /v1/vqa (subtracted; ${own.backend_double_malformed} malformed); worker heap (heapUsed + external, after gc): ${fmtBytes(own.heap_after_import)} after import, ${fmtBytes(own.heap_after_load)} after the load`;
  text += `\n\nworker startup (wrangler check startup, this CPU): ${startup ? `${fmt(startup.cpu_ms, 1)} ms CPU over a ${fmt(startup.span_ms, 0)} ms profile` : "unavailable"}`;
  text += `\n\nisolate memory proxy (Node V8, not workerd): tokenizer tables ${fmtBytes(heap.bundle_bytes)}; heap+external after loading them ${fmtBytes(heap.after_bundle)}, after new BpeTokenizer ${fmtBytes(heap.after_tokenizer)}, after two encodes ${fmtBytes(heap.after_encode)} (RSS +${fmtBytes(heap.rss_delta)}); construct ${fmt(heap.construct_ms, 1)} ms, first encode ${fmt(heap.first_encode_ms, 1)} ms, then ${fmt(heap.second_encode_ms, 2)} ms\n`;
  process.stdout.write(text);
  const body = { suite: "edge", created: new Date().toISOString(), machine, options: opts, cold_starts: cold, cold_summary: c, workerd_rss_after_load: workerdRssAfterLoad, load: loads, backend_double: { served: double.served(), malformed: double.bad() }, tokenizer_heap_proxy: heap, worker_startup: startup, worker_own_cpu: own };
  return { file: writeResult(opts, "edge", body), body };
}

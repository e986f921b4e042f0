/**
 * Child: the edge worker's own CPU per request, and its heap, measured in-process. Node's V8 runs the worker's
 * source (edge/src/index.ts; `cloudflare:workers` and the `.bin` Data module through bench/lib/worker-modules.mjs)
 * with `app.fetch(request, env, ctx)`; the two peers the worker does not run are answered by doubles: the rate
 * limiter's Durable Object (grants every request; on Cloudflare it is another isolate with its own CPU) and the
 * backend (start + one token + done at once; its own CPU is measured and subtracted).
 *
 * CPU per request, around one request with its response body read to the end (the Request is built beforehand,
 * as the runtime does): of the main thread alone, where the worker's JavaScript runs (what an isolate's CPU
 * time is), and of the whole process (`process.cpuUsage()`: V8's background GC and compiler threads too). workerd's V8 and its C++ Request/FormData differ from Node's (undici is JavaScript), so this
 * is the worker's work on this CPU, not Cloudflare's billing number; workerd's whole-process CPU per request
 * (the edge suite) bounds it from the other side.
 */
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { readFileSync } from "node:fs";
import { register } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { devTokenForRepo, readDevVars, readWranglerVars } from "../../scripts/dev-secrets.ts";
import { GENERATE_PATH, WIRE_EVENTS_CONTENT_TYPE } from "../../shared/src/wire.ts";
import { ROOT, childArgs, childDone, childMain, memoryAfterGc, percentile } from "../lib/common.ts";
import { backendDoubleAnswer, vqaForm } from "../suites/edge.ts";

/** One route's per-request numbers, ms. */
export interface RouteCpu {
  requests: number;
  statuses: Record<string, number>;
  cpu_p50_ms: number;
  cpu_p99_ms: number;
  cpu_mean_ms: number;
  /** the main thread alone (null where Linux's schedstat is unavailable) */
  thread_p50_ms: number | null;
  thread_p99_ms: number | null;
  thread_mean_ms: number | null;
  wall_p50_ms: number;
}

export interface EdgeWorkerResult {
  warmup: number;
  healthz: RouteCpu;
  /** /v1/vqa with the development HS256 token */
  vqa_hs256: RouteCpu;
  /** /v1/vqa with an ES256 token checked against a public JWK (what a production issuer's JWKS gives) */
  vqa_es256: RouteCpu;
  /** the backend double's own CPU per /v1/vqa (subtracted above) */
  backend_double_cpu_ms: number;
  /** requests the double could not decode as wire requests */
  backend_double_malformed: number;
  /** heapUsed + external over the baseline before the worker was imported, after gc: bytes */
  heap_after_import: number;
  heap_after_load: number;
  peak_rss_bytes: number;
}

/** CPU so far, ms: the whole process (user + system) and the main thread alone. */
interface Clock {
  proc: number;
  thread: number;
}

/**
 * CPU time of the main thread alone (where the worker's JavaScript runs), ns, from Linux's schedstat; null
 * elsewhere. `process.cpuUsage()` also counts V8's background GC and compiler threads.
 */
function mainThreadMs(): number {
  try {
    return Number(readFileSync(`/proc/self/task/${process.pid}/schedstat`, "latin1").split(" ")[0]) / 1e6;
  } catch {
    return NaN;
  }
}

function clock(): Clock {
  const u = process.cpuUsage();
  return { proc: (u.user + u.system) / 1000, thread: mainThreadMs() };
}

interface Worker {
  fetch(req: Request, env: object, ctx: object): Response | Promise<Response>;
}

childMain(async () => {
  const { requests, warmup } = childArgs<{ requests: number; warmup: number }>();
  const heap = () => memoryAfterGc().heap;

  // The backend double, in place of the global fetch the worker's backend client uses.
  const doubleCpu: Clock = { proc: 0, thread: 0 };
  let malformed = 0;
  const realFetch = globalThis.fetch;
  globalThis.fetch = (async (input: string | URL | Request, init?: RequestInit) => {
    const url = String(input instanceof Request ? input.url : input);
    if (!url.endsWith(GENERATE_PATH)) return realFetch(input, init);
    const c0 = clock();
    const answer = backendDoubleAnswer(init?.body as Uint8Array);
    if (answer.malformed) malformed++;
    const res = new Response(answer.events, { status: 200, headers: { "content-type": WIRE_EVENTS_CONTENT_TYPE } });
    const c1 = clock();
    doubleCpu.proc += c1.proc - c0.proc;
    doubleCpu.thread += c1.thread - c0.thread;
    return res;
  }) as typeof fetch;

  // The rate limiter's Durable Object double: grants every request.
  const limiter = {
    idFromName: (name: string) => ({ name }),
    get: () => ({
      acquire: async () => ({ ok: true, leaseId: "bench-lease", limit: 1e8, remaining: 1e8, resetSeconds: 0 }),
      release: async () => true,
    }),
  };

  const { token: hsToken, issuer, audience, scope } = await devTokenForRepo(ROOT, { sub: "bench-edge" });
  const { publicKey, privateKey } = await generateKeyPair("ES256", { extractable: true });
  const jwk = { ...(await exportJWK(publicKey)), alg: "ES256", kid: "bench" };
  const now = Math.floor(Date.now() / 1000);
  const esToken = await new SignJWT({ scope })
    .setProtectedHeader({ alg: "ES256", kid: "bench", typ: "JWT" })
    .setIssuer(issuer)
    .setAudience(audience)
    .setSubject("bench-edge-es256")
    .setIssuedAt(now)
    .setExpirationTime(now + 3600)
    .sign(privateKey);
  const env = {
    ...readWranglerVars(join(ROOT, "wrangler.toml")),
    ...readDevVars(join(ROOT, ".dev.vars")),
    BACKEND_URLS: "https://backend.double",
    JWT_PUBLIC_JWK: JSON.stringify(jwk),
    RATE_LIMITER: limiter,
  };

  const base = heap();
  register(pathToFileURL(join(ROOT, "bench", "lib", "worker-modules.mjs")));
  const worker = (await import(pathToFileURL(join(ROOT, "edge", "src", "index.ts")).href)).default as Worker;
  const heapAfterImport = heap() - base;

  const probe = new Request("https://edge.bench/", { method: "POST", body: vqaForm() });
  const formType = probe.headers.get("content-type")!;
  const formBytes = new Uint8Array(await probe.arrayBuffer());
  const vqaRequest = (token: string) =>
    new Request("https://edge.bench/v1/vqa", {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": formType, "content-length": String(formBytes.length) },
      body: formBytes,
    });
  const routes = {
    healthz: () => new Request("https://edge.bench/healthz"),
    vqa_hs256: () => vqaRequest(hsToken),
    vqa_es256: () => vqaRequest(esToken),
  };
  type Route = keyof typeof routes;
  const samples: Record<Route, { cpu: number[]; thread: number[]; wall: number[]; statuses: Record<string, number> }> = {
    healthz: { cpu: [], thread: [], wall: [], statuses: {} },
    vqa_hs256: { cpu: [], thread: [], wall: [], statuses: {} },
    vqa_es256: { cpu: [], thread: [], wall: [], statuses: {} },
  };

  const one = async (route: Route, record: boolean) => {
    const req = routes[route]();
    const waits: Promise<unknown>[] = [];
    const ctx = { waitUntil: (p: Promise<unknown>) => void waits.push(p), passThroughOnException: () => {}, props: {} };
    const peer0 = { ...doubleCpu };
    const t0 = performance.now();
    const c0 = clock();
    const res = await worker.fetch(req, env, ctx);
    await res.arrayBuffer();
    await Promise.all(waits);
    const c1 = clock();
    const wall = performance.now() - t0;
    if (!record) return;
    const s = samples[route];
    s.cpu.push(c1.proc - c0.proc - (doubleCpu.proc - peer0.proc));
    s.thread.push(c1.thread - c0.thread - (doubleCpu.thread - peer0.thread));
    s.wall.push(wall);
    s.statuses[res.status] = (s.statuses[res.status] ?? 0) + 1;
  };

  // Interleaved, so that drift (JIT tiers, the machine's load) falls on every route alike.
  for (let i = 0; i < warmup; i++) for (const r of Object.keys(routes) as Route[]) await one(r, false);
  const doubleBefore = doubleCpu.proc;
  for (let i = 0; i < requests; i++) for (const r of Object.keys(routes) as Route[]) await one(r, true);
  const vqaCount = samples.vqa_hs256.cpu.length + samples.vqa_es256.cpu.length;
  const summary = (route: Route): RouteCpu => {
    const s = samples[route];
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const thread = s.thread.every(Number.isFinite);
    return {
      requests: s.cpu.length,
      statuses: s.statuses,
      cpu_p50_ms: percentile(s.cpu, 50),
      cpu_p99_ms: percentile(s.cpu, 99),
      cpu_mean_ms: mean(s.cpu),
      thread_p50_ms: thread ? percentile(s.thread, 50) : null,
      thread_p99_ms: thread ? percentile(s.thread, 99) : null,
      thread_mean_ms: thread ? mean(s.thread) : null,
      wall_p50_ms: percentile(s.wall, 50),
    };
  };
  const result: Omit<EdgeWorkerResult, "peak_rss_bytes"> = {
    warmup,
    healthz: summary("healthz"),
    vqa_hs256: summary("vqa_hs256"),
    vqa_es256: summary("vqa_es256"),
    backend_double_cpu_ms: (doubleCpu.proc - doubleBefore) / vqaCount,
    backend_double_malformed: malformed,
    heap_after_import: heapAfterImport,
    heap_after_load: heap() - base,
  };
  childDone({ ...result });
});

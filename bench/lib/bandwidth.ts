/**
 * Memory read bandwidth from Node: `threads` worker threads each scan their own slice of one large
 * SharedArrayBuffer (written first so that every page is really backed), started together; bandwidth =
 * bytes read / slowest thread's time, best of `reps`. Two scans per slice:
 *   memchr  Buffer#indexOf of a byte that is not there (libc memchr, vectorized): close to the hardware's
 *           streaming read rate
 *   f64sum  a JavaScript loop summing a Float64Array with 4 accumulators: what plain JS code reaches
 * The higher one is the bound used for the decode fraction.
 */
import { Worker } from "node:worker_threads";

const WORKER = `
const { parentPort, workerData } = require("node:worker_threads");
const { sab, offset, length } = workerData;
const bytes = new Uint8Array(sab, offset, length);
bytes.fill(7);
const buf = Buffer.from(sab, offset, length);
const f64 = new Float64Array(sab, offset, Math.floor(length / 8));
function f64sum() {
  let a = 0, b = 0, c = 0, d = 0;
  const n = f64.length - (f64.length % 4);
  for (let i = 0; i < n; i += 4) { a += f64[i]; b += f64[i + 1]; c += f64[i + 2]; d += f64[i + 3]; }
  return a + b + c + d;
}
parentPort.on("message", (m) => {
  if (m === "exit") { process.exit(0); }
  const t0 = performance.now();
  let r;
  if (m === "memchr") r = buf.indexOf(1);
  else r = f64sum();
  parentPort.postMessage({ ms: performance.now() - t0, r });
});
parentPort.postMessage({ ready: true });
`;

export interface BandwidthResult {
  threads: number;
  buffer_bytes: number;
  reps: number;
  /** bytes/s, best rep */
  memchr_bytes_per_s: number;
  f64sum_bytes_per_s: number;
  best_bytes_per_s: number;
  all_reps: { method: string; bytes_per_s: number }[];
}

export async function measureBandwidth(opts: { mib: number; threads: number; reps: number }): Promise<BandwidthResult> {
  const total = opts.mib * 1024 * 1024;
  const slice = Math.floor(total / opts.threads / 64) * 64;
  const sab = new SharedArrayBuffer(slice * opts.threads);
  const workers: Worker[] = [];
  const ready: Promise<void>[] = [];
  for (let i = 0; i < opts.threads; i++) {
    const w = new Worker(WORKER, { eval: true, workerData: { sab, offset: i * slice, length: slice } });
    workers.push(w);
    ready.push(new Promise((res) => w.once("message", () => res())));
  }
  await Promise.all(ready);
  const run = async (method: string): Promise<number> => {
    const times = await Promise.all(workers.map((w) => new Promise<number>((res) => {
      w.once("message", (m: { ms: number }) => res(m.ms));
      w.postMessage(method);
    })));
    return (slice * opts.threads) / (Math.max(...times) / 1000);
  };
  const all: { method: string; bytes_per_s: number }[] = [];
  for (const method of ["memchr", "f64sum"]) {
    await run(method); // warm-up (JIT, TLB)
    for (let r = 0; r < opts.reps; r++) all.push({ method, bytes_per_s: await run(method) });
  }
  await Promise.all(workers.map((w) => new Promise<void>((res) => { w.once("exit", () => res()); w.postMessage("exit"); })));
  const best = (m: string) => Math.max(...all.filter((x) => x.method === m).map((x) => x.bytes_per_s));
  const memchr = best("memchr");
  const f64 = best("f64sum");
  return { threads: opts.threads, buffer_bytes: slice * opts.threads, reps: opts.reps, memchr_bytes_per_s: memchr, f64sum_bytes_per_s: f64, best_bytes_per_s: Math.max(memchr, f64), all_reps: all };
}

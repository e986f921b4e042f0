/**
 * The local stack, as `npm start` and the end-to-end tests run it: the served model (the demo checkpoint
 * made and converted once, or a real one), the backend process and `wrangler dev`, each in its own process
 * group so that stopping the stack stops everything it started.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, openSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { makeTestModel } from "../../gpu-backend/src/checkpoint/make-test-model.ts";
import { resolveModelDir } from "../../gpu-backend/src/checkpoint/load.ts";
import { convertModel, type ConvertDtype } from "../../gpu-backend/src/convert/index.ts";

export const ROOT = resolve(import.meta.dirname, "..", "..");
const WRANGLER = join(ROOT, "node_modules", "wrangler", "bin", "wrangler.js");

/** A converted folder is complete once its manifest exists (the converter writes it last, atomically). */
const isConverted = (dir: string) => existsSync(join(dir, "manifest.json")) && existsSync(join(dir, "decoder_model_merged.onnx"));

/**
 * The ONNX folder to serve. Without `model`: the demo model (golden config A's dimensions, random weights),
 * made by make-test-model and converted to fp32 under `models/demo/` once. With `model` (a folder — a
 * checkpoint or an already converted one — or a Hub id): converted once into `models/<name>-<dtype>/`.
 */
export async function ensureServedModel(opts: { model?: string; dtype?: ConvertDtype; log?: (m: string) => void } = {}): Promise<string> {
  const log = opts.log ?? (() => {});
  const dtype = opts.dtype ?? "fp32";
  if (!opts.model) {
    const dir = join(ROOT, "models", "demo");
    const onnx = join(dir, "onnx");
    if (isConverted(onnx)) return onnx;
    mkdirSync(dir, { recursive: true });
    if (!existsSync(join(dir, "ckpt", "config.json"))) {
      log("building the demo checkpoint (config A, deterministic random weights)…");
      await makeTestModel({ configPath: join(ROOT, "gpu-backend", "demo-model", "config.json"), outDir: join(dir, "ckpt"), overwrite: true });
    }
    log("converting the demo checkpoint to ONNX (fp32)…");
    await convertModel({ model: join(dir, "ckpt"), outDir: onnx, dtype: "fp32", overwrite: true });
    return onnx;
  }
  if (existsSync(opts.model) && isConverted(opts.model)) return resolve(opts.model);
  const source = await resolveModelDir(opts.model);
  const onnx = join(ROOT, "models", `${basename(source)}-${dtype}`);
  if (isConverted(onnx)) return onnx;
  log(`converting ${opts.model} to ONNX (${dtype}); this reads the whole checkpoint once…`);
  await convertModel({ model: source, outDir: onnx, dtype, overwrite: true });
  return onnx;
}

export interface Proc {
  child: ChildProcess;
  /** Stops the whole process group (SIGTERM, then SIGKILL after `graceMs`). */
  stop(graceMs?: number): Promise<void>;
}

function startGroup(cmd: string, args: string[], env: NodeJS.ProcessEnv, logFile?: string): Proc {
  const out = logFile ? openSync(logFile, "a") : "ignore";
  const child = spawn(cmd, args, { cwd: ROOT, env, detached: true, stdio: ["ignore", out, out] });
  const stop = (graceMs = 10_000) =>
    new Promise<void>((done) => {
      if (child.exitCode !== null || child.signalCode !== null) return done();
      const kill = (sig: NodeJS.Signals) => {
        try {
          process.kill(-child.pid!, sig);
        } catch {
          // already gone
        }
      };
      const timer = setTimeout(() => kill("SIGKILL"), graceMs);
      child.once("exit", () => {
        clearTimeout(timer);
        kill("SIGKILL"); // anything left in the group (wrangler's workerd)
        done();
      });
      kill("SIGTERM");
    });
  return { child, stop };
}

const QUIET = { WRANGLER_SEND_METRICS: "false", CLOUDFLARE_CF_FETCH_ENABLED: "false", ORT_DISABLE_TELEMETRY: "1" };

export function startBackend(p: { modelDir: string; port: number; secret: string; logFile?: string; env?: Record<string, string> }): Proc {
  return startGroup(
    process.execPath,
    // tsx as a loader in one process (as the Dockerfile runs it), not its CLI, which would relay the group's SIGTERM
    // to the server a second time and cut its drain short.
    ["--import", "tsx", "gpu-backend/src/server/main.ts"],
    { ...process.env, ...QUIET, MODEL_DIR: p.modelDir, BACKEND_PORT: String(p.port), BACKEND_HMAC_SECRET: p.secret, ...p.env },
    p.logFile,
  );
}

/** `wrangler dev` for the edge; its build step bundles the served model's tokenizer (MODEL_DIR). */
export function startEdge(p: {
  modelDir: string;
  port: number;
  backendUrls: string[];
  logFile?: string;
  vars?: Record<string, string>;
  /** More `wrangler dev` arguments (e.g. `--inspector-port`, `--persist-to`). */
  args?: string[];
}): Proc {
  const vars = { BACKEND_URLS: p.backendUrls.join(","), ...p.vars };
  return startGroup(
    process.execPath,
    [
      WRANGLER,
      "dev",
      "--port",
      String(p.port),
      "--ip",
      "127.0.0.1",
      "--show-interactive-dev-session=false",
      ...(p.args ?? []),
      ...Object.entries(vars).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
    ],
    { ...process.env, ...QUIET, MODEL_DIR: p.modelDir },
    p.logFile,
  );
}

/** Polls `url` until it answers 200 or `timeoutMs` passes (then throws naming the URL). */
export async function waitFor200(url: string, timeoutMs: number, proc?: Proc): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (proc && proc.child.exitCode !== null) throw new Error(`${url}: the process exited (${proc.child.exitCode})`);
    try {
      const r = await fetch(url, { signal: AbortSignal.timeout(2000) });
      if (r.status === 200) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${url} did not become ready within ${timeoutMs} ms`);
}

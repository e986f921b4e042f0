/**
 * The backend process: `tsx gpu-backend/src/server/main.ts` (env: see config.ts).
 *
 * Start-up: validate the configuration → read the model's meta from MODEL_DIR → start the engine's worker
 * thread (`createEngine(config)` from gpu-backend/src/engine/index.ts runs there) → listen at once, so
 * /healthz answers while the model loads and /readyz turns 200 when the engine reports ready.
 * Shutdown (SIGTERM/SIGINT): stop admitting (503 + Retry-After, /readyz 503), let in-flight requests finish
 * within SHUTDOWN_GRACE_MS, cancel the rest (each gets its final `error` event), stop listening, close the
 * engine, exit 0. A second signal exits at once (1).
 */
import { existsSync } from "node:fs";
import type { Server } from "node:http";
import { fileURLToPath, pathToFileURL } from "node:url";
import { serve, type ServerType } from "@hono/node-server";
import type { Engine } from "../engine/engine-types.ts";
import { createBackendApp, type BackendApp } from "./app.ts";
import { BackendConfigError, loadBackendConfig, readModelMeta, type Env } from "./config.ts";
import { createLogger, type Logger } from "./log.ts";
import { createWorkerEngine } from "./worker-bridge.ts";

/** After the engine worker dies: how long the live requests' final errors get to reach their clients. */
const CRASH_FLUSH_MS = 2_000;

/** Where the lead's engine factory lives (`export function createEngine(config: BackendConfig): Engine | Promise<Engine>`). */
export function engineModuleUrl(): URL {
  return new URL(`../engine/index.${import.meta.url.endsWith(".ts") ? "ts" : "js"}`, import.meta.url);
}

/**
 * Stops listening: idle keep-alive connections close now and as soon as their response ends (checked every
 * 25 ms: `close()` alone only closes those idle at the call); any still busy after `timeoutMs` are cut.
 */
export function closeServer(server: ServerType, timeoutMs: number): Promise<void> {
  const http = server as Server;
  return new Promise<void>((resolve) => {
    const sweep = setInterval(() => http.closeIdleConnections?.(), 25);
    const timer = setTimeout(() => http.closeAllConnections?.(), timeoutMs);
    http.close(() => {
      clearInterval(sweep);
      clearTimeout(timer);
      resolve();
    });
    http.closeIdleConnections?.();
  });
}

/**
 * Graceful shutdown: drain the app (in-flight requests finish within `graceMs`, the rest are cancelled
 * with a final error event), let the responses flush, stop the server, close the engine.
 */
export async function shutdownBackend(p: {
  app: BackendApp;
  server: ServerType;
  engine: Engine;
  graceMs: number;
  logger: Logger;
  /** Bound on waiting for responses to finish after the drain; default 5 s. */
  flushTimeoutMs?: number;
}): Promise<void> {
  await p.app.lifecycle.shutdown(p.graceMs);
  await closeServer(p.server, p.flushTimeoutMs ?? 5_000);
  await p.engine.close();
  p.logger.log("info", "shutdown: complete");
}

/**
 * Starts the backend from `env`; resolves once the server is listening (the model may still be loading).
 * Exits the process on fatal start-up errors, after a signal-driven shutdown, and (1) when the engine worker
 * dies, once the live requests' final errors have gone out. `engineModule` replaces
 * the engine factory's module (tests run the process with a fake engine).
 */
export async function main(env: Env = process.env, overrides: { engineModule?: URL } = {}): Promise<void> {
  const logger = createLogger();
  const fatal = (msg: string, fields: Record<string, string | number> = {}): never => {
    logger.log("error", msg, fields);
    process.exit(1);
  };

  let config;
  try {
    config = loadBackendConfig(env);
  } catch (e) {
    if (e instanceof BackendConfigError) {
      process.stderr.write(`${e.message}\n`);
      process.exit(1);
    }
    throw e;
  }

  let meta;
  try {
    meta = await readModelMeta(config.modelDir);
  } catch (e) {
    process.stderr.write(`cannot read the model in MODEL_DIR: ${(e as Error).message}\n`);
    process.exit(1);
  }

  const moduleUrl = overrides.engineModule ?? engineModuleUrl();
  if (!existsSync(fileURLToPath(moduleUrl))) {
    process.stderr.write(
      `the generation engine is not available: ${fileURLToPath(moduleUrl)} does not exist. ` +
        "It must export createEngine(config) returning an Engine (gpu-backend/src/engine/engine-types.ts).\n",
    );
    process.exit(1);
  }

  const startedAt = Date.now();
  let server: ServerType | undefined;
  const engine = createWorkerEngine({
    module: moduleUrl,
    options: config,
    stallMs: config.engineStallMs,
    onExit: ({ code, error }) => {
      logger.log("error", "engine worker stopped unexpectedly", { code: code ?? -1, error: error?.name ?? "exit" });
      // Every live request has its final error queued by now: let the responses go out, then exit.
      void (server ? closeServer(server, CRASH_FLUSH_MS) : Promise.resolve()).finally(() => process.exit(1));
    },
  });
  const app = createBackendApp({ engine, config, meta, logger });
  server = await new Promise<ServerType>((resolve) => {
    const s = serve({ fetch: app.fetch, port: config.port, hostname: config.host }, (info) => {
      logger.log("info", "listening", { host: info.address, port: info.port, fingerprint: meta.fingerprint, execution_provider: config.executionProvider });
      resolve(s);
    });
    s.once("error", (e: NodeJS.ErrnoException) => fatal(`cannot listen on ${config.host}:${config.port}`, { error: e.code ?? e.name }));
  });

  engine.loaded.then(
    () => {
      if (engine.meta && engine.meta.fingerprint !== meta.fingerprint) {
        fatal("the engine loaded a different model than MODEL_DIR describes", { fingerprint: engine.meta.fingerprint });
      }
      logger.log("info", "engine ready", { load_ms: Date.now() - startedAt, capacity: engine.stats().capacity });
    },
    (e: Error) => fatal(`engine failed to start: ${e.message}`),
  );

  // A stall (the engine's thread silent for ENGINE_STALL_S: /healthz turns 503) and its end, logged once each; and
  // restarts of the vision process (a cancelled encoding is ended with its process).
  let stalled = false;
  let visionRestarts = 0;
  setInterval(() => {
    const stats = engine.stats();
    const now = stats.stalled === true;
    if (now !== stalled) {
      logger.log(now ? "error" : "info", now ? "engine stalled" : "engine answering again", { stall_limit_s: config.engineStallMs / 1000, in_flight: app.lifecycle.inFlight() });
    }
    stalled = now;
    if ((stats.visionRestarts ?? 0) > visionRestarts) {
      logger.log("warn", "vision process restarted", { restarts_total: stats.visionRestarts!, restarts: stats.visionRestarts! - visionRestarts });
      visionRestarts = stats.visionRestarts!;
    }
  }, 1000).unref();

  let stopping = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      logger.log("warn", "second signal: exiting now", { signal });
      process.exit(1);
    }
    stopping = true;
    logger.log("info", "shutdown: signal", { signal, in_flight: app.lifecycle.inFlight(), grace_ms: config.shutdownGraceMs });
    shutdownBackend({ app, server: server!, engine, graceMs: config.shutdownGraceMs, logger }).then(
      () => process.exit(0),
      (e: Error) => fatal("shutdown failed", { error: e?.name ?? "error" }),
    );
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}

/**
 * `npm start`: the whole stack on this machine. Builds (once, cached) the served model, generates
 * development secrets into `.dev.vars`, starts the GPU backend and `wrangler dev`, waits until both are
 * ready, then prints the URL, a development token and a ready-to-paste `curl`. Ctrl-C stops everything.
 *
 * Env: MODEL=<folder or hub id> serves a real checkpoint (converted once to MODEL_DTYPE, default fp32);
 * EDGE_PORT (8787), BACKEND_PORT (8788); EXECUTION_PROVIDER=cuda for a GPU.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type { ConvertDtype } from "../gpu-backend/src/convert/index.ts";
import { devTokenForRepo } from "./dev-secrets.ts";
import { ROOT, ensureServedModel, startBackend, startEdge, waitFor200 } from "./lib/stack.ts";

const edgePort = Number(process.env.EDGE_PORT ?? 8787);
const backendPort = Number(process.env.BACKEND_PORT ?? 8788);
const say = (m: string) => process.stderr.write(`[start] ${m}\n`);

const modelDir = await ensureServedModel({
  ...(process.env.MODEL ? { model: process.env.MODEL } : {}),
  dtype: (process.env.MODEL_DTYPE as ConvertDtype | undefined) ?? "fp32",
  log: say,
});
const { token, devVars } = await devTokenForRepo(ROOT, { sub: "dev-user", ttlSec: 12 * 3600 });
if (devVars.created) say("created .dev.vars with development secrets");
const logs = join(ROOT, ".dev", "logs");
mkdirSync(logs, { recursive: true });

say(`model: ${modelDir}`);
const backend = startBackend({
  modelDir,
  port: backendPort,
  secret: devVars.vars.BACKEND_HMAC_SECRET!,
  logFile: join(logs, "backend.log"),
  env: process.env.EXECUTION_PROVIDER ? { EXECUTION_PROVIDER: process.env.EXECUTION_PROVIDER } : {},
});
const edge = startEdge({ modelDir, port: edgePort, backendUrls: [`http://127.0.0.1:${backendPort}`], logFile: join(logs, "edge.log") });
let stopping = false;
const stopAll = async (code: number) => {
  if (stopping) return;
  stopping = true;
  say("stopping…");
  await Promise.all([edge.stop(), backend.stop()]);
  process.exit(code);
};
process.on("SIGINT", () => void stopAll(0));
process.on("SIGTERM", () => void stopAll(0));

try {
  say(`starting the backend on :${backendPort} and wrangler dev on :${edgePort} (logs in .dev/logs/)…`);
  await Promise.all([
    waitFor200(`http://127.0.0.1:${backendPort}/readyz`, 600_000, backend),
    waitFor200(`http://127.0.0.1:${edgePort}/healthz`, 180_000, edge),
  ]);
} catch (e) {
  say(`${(e as Error).message}; see .dev/logs/`);
  await stopAll(1);
}

const url = `http://127.0.0.1:${edgePort}`;
process.stdout.write(
  [
    "",
    `MedVLM-R1 API: ${url}   (OpenAPI: ${url}/openapi.json)`,
    process.env.MODEL
      ? `Serving ${process.env.MODEL}.`
      : "Serving the DEMO model: random weights, it answers nonsense. MODEL=JZPeterPan/MedVLM-R1 npm start serves the real one.",
    "",
    "Development token (12 h):",
    token,
    "",
    "Try it:",
    `curl -s ${url}/v1/vqa -H "authorization: Bearer ${token}" \\`,
    `  -F image=@samples/brain003631.png -F question="What attribute can be observed in this image?" \\`,
    `  -F options="Focal flair hyperintensity" -F options="Bone fracture" -F options="Vascular malformation" -F options="Ligament tear" \\`,
    `  -F max_new_tokens=64`,
    "",
    `or: npm run vqa -- --image samples/brain003631.png --question "What attribute can be observed in this image?" --option "Focal flair hyperintensity" --option "Bone fracture" --max-new-tokens 64`,
    "",
    "Ctrl-C stops everything.",
    "",
  ].join("\n"),
);
// Stay up until a signal; if a child dies, stop the rest.
for (const [name, p] of [["backend", backend], ["edge", edge]] as const) {
  p.child.once("exit", (code) => {
    if (!stopping) {
      say(`${name} exited (${code}); see .dev/logs/${name}.log`);
      void stopAll(1);
    }
  });
}

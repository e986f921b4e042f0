// Module hooks that let Node import the edge worker's source as wrangler bundles it (bench/children/
// edge-worker.ts): `cloudflare:workers` becomes a bare DurableObject base class (the rate limiter's
// Durable Object is answered by a double; only its class must exist), and `*.bin` modules become an
// ArrayBuffer default export read from the file, as wrangler's Data rule does.
import { fileURLToPath } from "node:url";

const WORKERS_SHIM = "export class DurableObject { constructor(ctx, env) { this.ctx = ctx; this.env = env; } }";

export async function resolve(specifier, context, next) {
  if (specifier === "cloudflare:workers") {
    return { url: `data:text/javascript,${encodeURIComponent(WORKERS_SHIM)}`, shortCircuit: true };
  }
  return next(specifier, context);
}

export async function load(url, context, next) {
  if (url.startsWith("file:") && url.endsWith(".bin")) {
    const path = JSON.stringify(fileURLToPath(url));
    const source = `import { readFileSync } from "node:fs";\nconst b = readFileSync(${path});\nexport default b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);\n`;
    return { format: "module", source, shortCircuit: true };
  }
  return next(url, context);
}

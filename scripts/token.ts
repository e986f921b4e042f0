/**
 * `npm run token -- [--scope vqa] [--sub dev-user] [--ttl 3600]`
 *
 * Mints a development HS256 JWT for the local edge worker: `iss`/`aud`/default scope from
 * wrangler.toml `[vars]`, the secret from `.dev.vars` (created with fresh secrets if missing).
 * The token is printed alone on the last line of stdout; everything else goes to stderr, so
 * `TOKEN=$(npm run -s token)` works.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { devTokenForRepo } from "./dev-secrets.ts";

const USAGE = "usage: npm run token -- [--scope vqa] [--sub dev-user] [--ttl 3600]";

interface Args {
  scope?: string;
  sub: string;
  ttl: number;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { sub: "dev-user", ttl: 3600 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? "";
    if (arg === "--help" || arg === "-h") {
      console.error(USAGE);
      process.exit(0);
    }
    const eq = arg.indexOf("=");
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (name !== "--scope" && name !== "--sub" && name !== "--ttl") throw new Error(`unknown argument ${JSON.stringify(arg)}`);
    const value = eq === -1 ? argv[++i] : arg.slice(eq + 1);
    if (value === undefined) throw new Error(`${name} needs a value`);
    if (name === "--scope") args.scope = value;
    else if (name === "--sub") args.sub = value;
    else {
      if (!/^\d+$/.test(value)) throw new Error("--ttl must be a whole number of seconds");
      args.ttl = Number(value);
    }
  }
  return args;
}

async function main(): Promise<void> {
  const root = fileURLToPath(new URL("..", import.meta.url));
  const args = parseArgs(process.argv.slice(2));
  const { token, issuer, audience, scope, sub, ttlSec, devVars } = await devTokenForRepo(root, {
    sub: args.sub,
    ttlSec: args.ttl,
    ...(args.scope !== undefined ? { scope: args.scope } : {}),
  });
  const devVarsPath = join(root, ".dev.vars");
  if (devVars.created) console.error(`created ${devVarsPath} with fresh secrets (${devVars.added.join(", ")})`);
  else if (devVars.added.length > 0) console.error(`added ${devVars.added.join(", ")} to ${devVarsPath}`);
  const expires = new Date(Date.now() + ttlSec * 1000).toISOString();
  console.error(`HS256 token: iss=${issuer} aud=${audience} sub=${sub} scope=${scope || "(none)"} expires≈${expires}`);
  process.stdout.write(`${token}\n`);
}

main().catch((err: unknown) => {
  console.error(`token: ${err instanceof Error ? err.message : String(err)}`);
  console.error(USAGE);
  process.exit(1);
});

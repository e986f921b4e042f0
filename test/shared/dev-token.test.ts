/**
 * Development secrets (.dev.vars) and development tokens (scripts/dev-secrets.ts), plus the
 * `npm run token` CLI end to end against a temporary copy of the repo layout.
 */
import { execFile } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { decodeProtectedHeader, jwtVerify } from "jose";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  DEV_SECRET_KEYS,
  ensureDevVars,
  mintDevToken,
  parseDevVars,
  readDevVars,
  readWranglerVars,
} from "../../scripts/dev-secrets.ts";

const repoRoot = fileURLToPath(new URL("../..", import.meta.url));
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "dev-vars-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe("ensureDevVars", () => {
  it("creates .dev.vars with fresh, distinct, strong secrets (mode 0600)", () => {
    const path = join(dir, ".dev.vars");
    const first = ensureDevVars(path);
    expect(first.created).toBe(true);
    expect(first.added).toEqual([...DEV_SECRET_KEYS]);
    const onDisk = readDevVars(path);
    expect(onDisk).toEqual(first.vars);
    for (const key of DEV_SECRET_KEYS) expect(onDisk[key]).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(onDisk.JWT_HS256_SECRET).not.toBe(onDisk.BACKEND_HMAC_SECRET);
    if (process.platform !== "win32") expect(statSync(path).mode & 0o077).toBe(0);

    // Another directory gets other secrets: they are random, not derived.
    const other = ensureDevVars(join(dir, "other.vars"));
    expect(other.vars.JWT_HS256_SECRET).not.toBe(onDisk.JWT_HS256_SECRET);
  });

  it("preserves existing secrets and the file byte for byte when nothing is missing", () => {
    const path = join(dir, ".dev.vars");
    ensureDevVars(path);
    const before = readFileSync(path, "utf8");
    const again = ensureDevVars(path);
    expect(again).toMatchObject({ created: false, added: [] });
    expect(readFileSync(path, "utf8")).toBe(before);
    expect(again.vars).toEqual(parseDevVars(before));
  });

  it("appends only the missing key, keeping other lines (quoted values, comments, no final newline)", () => {
    const path = join(dir, ".dev.vars");
    const original = '# mine\nJWT_HS256_SECRET="my-own-secret-my-own-secret-1234567"\nOTHER=1';
    writeFileSync(path, original);
    const result = ensureDevVars(path);
    expect(result.added).toEqual(["BACKEND_HMAC_SECRET"]);
    const text = readFileSync(path, "utf8");
    expect(text.startsWith(`${original}\n`)).toBe(true);
    expect(readDevVars(path)).toEqual({
      JWT_HS256_SECRET: "my-own-secret-my-own-secret-1234567",
      OTHER: "1",
      BACKEND_HMAC_SECRET: result.vars.BACKEND_HMAC_SECRET,
    });
  });

  it("treats an empty value as missing", () => {
    const path = join(dir, ".dev.vars");
    writeFileSync(path, "JWT_HS256_SECRET=\nBACKEND_HMAC_SECRET=keep-me\n");
    const result = ensureDevVars(path);
    expect(result.added).toEqual(["JWT_HS256_SECRET"]);
    expect(readDevVars(path).JWT_HS256_SECRET).toBe(result.vars.JWT_HS256_SECRET);
    expect(readDevVars(path).BACKEND_HMAC_SECRET).toBe("keep-me");
  });
});

describe("parsers", () => {
  it("parseDevVars: KEY=VALUE, quotes, export, comments; later assignment wins", () => {
    const text = [
      "# comment",
      "",
      "A=plain",
      'B="double quoted = with equals"',
      "C='single'",
      "export D=exported",
      "E=value # inline comment",
      'F="esc \\"q\\" \\\\ line\\nbreak"',
      "A=override",
      "not a line",
      "1BAD=x",
    ].join("\r\n");
    expect(parseDevVars(text)).toEqual({
      A: "override",
      B: "double quoted = with equals",
      C: "single",
      D: "exported",
      E: "value",
      F: 'esc "q" \\ line\nbreak',
    });
  });

  it("readDevVars of an absent file is empty", () => {
    expect(readDevVars(join(dir, "missing"))).toEqual({});
  });

  it("readWranglerVars reads only the [vars] table", () => {
    const path = join(dir, "wrangler.toml");
    writeFileSync(path, 'name = "x"\nJWT_ISSUER = "top-level"\n[vars]\nJWT_ISSUER = "iss-1" # c\nN = 30\nS = \'sq\'\n\n[[durable_objects.bindings]]\nname = "RL"\n');
    expect(readWranglerVars(path)).toEqual({ JWT_ISSUER: "iss-1", N: "30", S: "sq" });
  });

  it("readWranglerVars on the project's wrangler.toml has the JWT settings", () => {
    expect(readWranglerVars(join(repoRoot, "wrangler.toml"))).toMatchObject({
      JWT_ISSUER: "medvlm-dev",
      JWT_AUDIENCE: "medvlm-api",
      JWT_REQUIRED_SCOPE: "vqa",
    });
  });
});

describe("mintDevToken", () => {
  const secret = "dev-token-test-secret-0123456789abcdef";
  const base = { secret, issuer: "medvlm-dev", audience: "medvlm-api", scope: "vqa", sub: "dev-user", ttlSec: 3600 };

  it("mints an HS256 JWT that verifies with jose and carries the claims", async () => {
    const t0 = Math.floor(Date.now() / 1000);
    const token = await mintDevToken(base);
    expect(decodeProtectedHeader(token)).toEqual({ alg: "HS256", typ: "JWT" });
    const { payload } = await jwtVerify(token, new TextEncoder().encode(secret), {
      algorithms: ["HS256"],
      issuer: "medvlm-dev",
      audience: "medvlm-api",
      requiredClaims: ["exp", "sub", "iat", "jti"],
    });
    expect(payload).toMatchObject({ iss: "medvlm-dev", aud: "medvlm-api", sub: "dev-user", scope: "vqa" });
    expect(payload.exp! - payload.iat!).toBe(3600);
    expect(payload.iat!).toBeGreaterThanOrEqual(t0);
    await expect(jwtVerify(token, new TextEncoder().encode(`${secret}x`))).rejects.toThrow();
  });

  it("an empty scope mints a token without a scope claim", async () => {
    const { payload } = await jwtVerify(await mintDevToken({ ...base, scope: "" }), new TextEncoder().encode(secret));
    expect(payload.scope).toBeUndefined();
  });

  it("rejects a short secret, an empty subject and bad TTLs", async () => {
    await expect(mintDevToken({ ...base, secret: "short" })).rejects.toThrow(RangeError);
    await expect(mintDevToken({ ...base, sub: "" })).rejects.toThrow(RangeError);
    for (const ttlSec of [0, -1, 1.5, Number.NaN, 31 * 24 * 3600]) {
      await expect(mintDevToken({ ...base, ttlSec })).rejects.toThrow(RangeError);
    }
  });
});

describe("npm run token (scripts/token.ts)", () => {
  it("creates .dev.vars and prints a verifiable token alone on the last stdout line", async () => {
    // A throwaway repo layout, so the real checkout's .dev.vars is never touched.
    mkdirSync(join(dir, "scripts"));
    for (const f of ["scripts/token.ts", "scripts/dev-secrets.ts", "wrangler.toml"]) copyFileSync(join(repoRoot, f), join(dir, f));
    symlinkSync(join(repoRoot, "node_modules"), join(dir, "node_modules"), "dir");
    const tsx = join(repoRoot, "node_modules", ".bin", "tsx");
    const { stdout, stderr } = await promisify(execFile)(tsx, [join(dir, "scripts/token.ts"), "--sub", "alice", "--ttl=120"], { cwd: dir });
    const lines = stdout.trimEnd().split("\n");
    const token = lines[lines.length - 1] ?? "";
    expect(token).toMatch(/^[\w-]+\.[\w-]+\.[\w-]+$/);
    expect(stderr).not.toContain(token);
    const secret = readDevVars(join(dir, ".dev.vars")).JWT_HS256_SECRET ?? "";
    expect(secret).not.toBe("");
    const { payload } = await jwtVerify(token, new TextEncoder().encode(secret), { issuer: "medvlm-dev", audience: "medvlm-api" });
    expect(payload).toMatchObject({ sub: "alice", scope: "vqa" });
    expect(payload.exp! - payload.iat!).toBe(120);
  });
});

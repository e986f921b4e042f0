/**
 * JWT auth middleware, exercised inside workerd on a small Hono app. Tokens are minted here with
 * jose; the JWKS endpoint is a test double served through jose's `customFetch`.
 */
import { env } from "cloudflare:workers";
import { Hono } from "hono";
import { SignJWT, UnsecuredJWT, exportJWK, exportSPKI, generateKeyPair, type CryptoKey, type JWK, type JWTPayload } from "jose";
import { afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import {
  jwtAuth,
  jwtAuthOptionsFromEnv,
  type AuthVariables,
  type JwksFetch,
  type JwtAuthOptions,
} from "../../edge/src/middleware/jwt-auth/index.ts";

const ISS = "https://issuer.test/";
const AUD = "medvlm-api";
const HS_SECRET = "unit-test-hs256-secret-0123456789abcdef";
const JWKS_URL = "https://issuer.test/.well-known/jwks.json";
const BARE = 'Bearer realm="medvlm"';
const invalid = (description: string) => `Bearer realm="medvlm", error="invalid_token", error_description="${description}"`;
const INSUFFICIENT = 'Bearer realm="medvlm", error="insufficient_scope", scope="vqa"';

const now = () => Math.floor(Date.now() / 1000);
const hsKey = new TextEncoder().encode(HS_SECRET);

/** Claims of a valid token; a test overrides or deletes (`undefined`) some. */
function claims(overrides: Record<string, unknown> = {}): JWTPayload {
  const base: Record<string, unknown> = { iss: ISS, aud: AUD, sub: "user-1", scope: "vqa", iat: now(), exp: now() + 600, ...overrides };
  for (const [k, v] of Object.entries(base)) if (v === undefined) delete base[k];
  return base as JWTPayload;
}

function sign(key: CryptoKey | Uint8Array, alg: string, overrides: Record<string, unknown> = {}, kid?: string): Promise<string> {
  return new SignJWT(claims(overrides)).setProtectedHeader({ alg, typ: "JWT", ...(kid ? { kid } : {}) }).sign(key);
}

function appWith(options: JwtAuthOptions) {
  const app = new Hono<{ Variables: AuthVariables }>();
  app.use("/p/*", jwtAuth(options));
  app.get("/p/me", (c) => c.json(c.get("auth")));
  app.get("/p/boom", () => {
    throw new Error("handler failure");
  });
  return app;
}

function call(app: ReturnType<typeof appWith>, authorization?: string, path = "/p/me") {
  return app.request(path, { headers: authorization === undefined ? {} : { Authorization: authorization } });
}

/** Asserts status, `WWW-Authenticate` and `error.code`; returns the body text. */
async function expectFailure(res: Response, status: number, code: string, challenge: string | null): Promise<string> {
  const text = await res.text();
  expect(res.status, text).toBe(status);
  expect(res.headers.get("WWW-Authenticate")).toBe(challenge);
  expect(res.headers.get("Content-Type")).toMatch(/^application\/json/);
  const body = JSON.parse(text) as { error: { code: string; message: string } };
  expect(body.error.code).toBe(code);
  expect(typeof body.error.message).toBe("string");
  return text;
}

async function sha256Hex16(s: string): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(s)));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("").slice(0, 16);
}

let es256: { privateKey: CryptoKey; publicJwk: JWK };
let es256Other: { privateKey: CryptoKey };
let rs256: { privateKey: CryptoKey; publicJwk: JWK; spkiPem: string };

beforeAll(async () => {
  const a = await generateKeyPair("ES256", { extractable: true });
  es256 = { privateKey: a.privateKey, publicJwk: await exportJWK(a.publicKey) };
  es256Other = { privateKey: (await generateKeyPair("ES256")).privateKey };
  const r = await generateKeyPair("RS256", { extractable: true });
  rs256 = { privateKey: r.privateKey, publicJwk: await exportJWK(r.publicKey), spkiPem: await exportSPKI(r.publicKey) };
});

let errorLog: ReturnType<typeof vi.spyOn>;
beforeAll(() => {
  errorLog = vi.spyOn(console, "error").mockImplementation(() => {});
});
afterEach(() => errorLog.mockClear());

const hsOptions: JwtAuthOptions = { hs256Secret: HS_SECRET, issuer: ISS, audience: AUD, requiredScope: "vqa" };
const esOptions = (): JwtAuthOptions => ({
  publicJwk: JSON.stringify(es256.publicJwk),
  issuer: ISS,
  audience: AUD,
  requiredScope: "vqa",
  algorithms: ["ES256"],
});

describe("bearer header", () => {
  const app = () => appWith(hsOptions);

  it("missing Authorization → 401 missing_token with a bare challenge", async () => {
    await expectFailure(await call(app()), 401, "missing_token", BARE);
  });

  it("another scheme (Basic, garbage) → 401 missing_token, no error code in the challenge", async () => {
    await expectFailure(await call(app(), "Basic dXNlcjpwYXNz"), 401, "missing_token", BARE);
    await expectFailure(await call(app(), "garbage"), 401, "missing_token", BARE);
  });

  it("`Bearer` alone or with a non-b64token value → 401 invalid_token", async () => {
    for (const h of ["Bearer", "Bearer    ", "Bearer a b", 'Bearer "quoted"', "Bearer a,b"]) {
      await expectFailure(await call(app(), h), 401, "invalid_token", invalid("malformed bearer credentials"));
    }
  });

  it("a b64token that is not a JWT → 401 invalid_token malformed token", async () => {
    for (const t of ["garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "a.b.c.d.e"]) {
      await expectFailure(await call(app(), `Bearer ${t}`), 401, "invalid_token", invalid("malformed token"));
    }
  });

  it("an oversized token → 401 invalid_token", async () => {
    await expectFailure(await call(app(), `Bearer ${"a".repeat(9000)}`), 401, "invalid_token", invalid("token too large"));
  });

  it("the scheme is case-insensitive", async () => {
    const res = await call(app(), `bearer ${await sign(hsKey, "HS256")}`);
    expect(res.status).toBe(200);
  });
});

describe("algorithms", () => {
  it("alg none is rejected whatever the key source", async () => {
    const none = new UnsecuredJWT(claims()).encode();
    for (const options of [hsOptions, esOptions()]) {
      await expectFailure(await call(appWith(options), `Bearer ${none}`), 401, "invalid_token", invalid("token algorithm not accepted"));
    }
  });

  it("HS256 token when only an ES256 key is configured → 401", async () => {
    const token = await sign(hsKey, "HS256");
    await expectFailure(await call(appWith(esOptions()), `Bearer ${token}`), 401, "invalid_token", invalid("token algorithm not accepted"));
  });

  it("ES256 token when only the HS256 secret is configured → 401", async () => {
    const token = await sign(es256.privateKey, "ES256");
    await expectFailure(await call(appWith(hsOptions), `Bearer ${token}`), 401, "invalid_token", invalid("token algorithm not accepted"));
  });

  it("RS/HS confusion: HS256 token keyed with the RSA public key's bytes is rejected", async () => {
    const rsOnly: JwtAuthOptions = { publicJwk: rs256.publicJwk, issuer: ISS, audience: AUD, algorithms: ["RS256"] };
    for (const keyBytes of [rs256.spkiPem, JSON.stringify(rs256.publicJwk)]) {
      const forged = await sign(new TextEncoder().encode(keyBytes), "HS256");
      await expectFailure(await call(appWith(rsOnly), `Bearer ${forged}`), 401, "invalid_token", invalid("token algorithm not accepted"));
      // With the HS secret configured too, the forged token goes to the secret, never to the public key.
      const both = appWith({ ...rsOnly, hs256Secret: HS_SECRET });
      await expectFailure(await call(both, `Bearer ${forged}`), 401, "invalid_token", invalid("signature verification failed"));
    }
    // The genuine RS256 token passes, so the rejections above are about the algorithm, not the key.
    expect((await call(appWith(rsOnly), `Bearer ${await sign(rs256.privateKey, "RS256")}`)).status).toBe(200);
  });

  it("with both an HS secret and a JWK configured, each token is routed to its own key", async () => {
    const app = appWith({ ...esOptions(), hs256Secret: HS_SECRET });
    expect((await call(app, `Bearer ${await sign(hsKey, "HS256")}`)).status).toBe(200);
    expect((await call(app, `Bearer ${await sign(es256.privateKey, "ES256")}`)).status).toBe(200);
    // HS384/HS512 are never accepted, even with the secret configured.
    const hs512 = await sign(hsKey, "HS512");
    await expectFailure(await call(app, `Bearer ${hs512}`), 401, "invalid_token", invalid("token algorithm not accepted"));
  });

  it("an asymmetric algorithm outside the allow-list is rejected", async () => {
    const token = await sign(rs256.privateKey, "RS256");
    const app = appWith({ publicJwk: rs256.publicJwk, issuer: ISS, audience: AUD, algorithms: ["ES256"] });
    await expectFailure(await call(app, `Bearer ${token}`), 401, "invalid_token", invalid("token algorithm not accepted"));
  });
});

describe("signature and claims", () => {
  it("bad signature → 401 (other key, wrong secret, tampered payload)", async () => {
    const sigFailed = invalid("signature verification failed");
    await expectFailure(await call(appWith(esOptions()), `Bearer ${await sign(es256Other.privateKey, "ES256")}`), 401, "invalid_token", sigFailed);
    const wrongSecret = await sign(new TextEncoder().encode("another-secret-of-sufficient-length-000"), "HS256");
    await expectFailure(await call(appWith(hsOptions), `Bearer ${wrongSecret}`), 401, "invalid_token", sigFailed);
    const [h, , s] = (await sign(hsKey, "HS256")).split(".");
    const tamperedPayload = btoa(JSON.stringify(claims({ sub: "admin" }))).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
    await expectFailure(await call(appWith(hsOptions), `Bearer ${h}.${tamperedPayload}.${s}`), 401, "invalid_token", sigFailed);
  });

  it("expired → 401 token_expired; within the clock tolerance → accepted", async () => {
    const app = appWith({ ...hsOptions, clockToleranceSec: 30 });
    await expectFailure(await call(app, `Bearer ${await sign(hsKey, "HS256", { exp: now() - 3600 })}`), 401, "token_expired", invalid("token expired"));
    await expectFailure(await call(app, `Bearer ${await sign(hsKey, "HS256", { exp: now() - 31 })}`), 401, "token_expired", invalid("token expired"));
    expect((await call(app, `Bearer ${await sign(hsKey, "HS256", { exp: now() - 10 })}`)).status).toBe(200);
  });

  it("not yet valid (nbf) → 401; nbf within the tolerance → accepted", async () => {
    const app = appWith({ ...hsOptions, clockToleranceSec: 30 });
    const early = await sign(hsKey, "HS256", { nbf: now() + 3600 });
    await expectFailure(await call(app, `Bearer ${early}`), 401, "invalid_token", invalid("token not yet valid"));
    expect((await call(app, `Bearer ${await sign(hsKey, "HS256", { nbf: now() + 10 })}`)).status).toBe(200);
  });

  it("wrong or missing issuer → 401", async () => {
    for (const iss of ["https://evil.test/", undefined]) {
      const t = await sign(hsKey, "HS256", { iss });
      await expectFailure(await call(appWith(hsOptions), `Bearer ${t}`), 401, "invalid_token", invalid("unexpected issuer"));
    }
  });

  it("wrong or missing audience → 401; an aud array containing ours → accepted", async () => {
    for (const aud of ["other-api", ["a", "b"], undefined]) {
      const t = await sign(hsKey, "HS256", { aud });
      await expectFailure(await call(appWith(hsOptions), `Bearer ${t}`), 401, "invalid_token", invalid("unexpected audience"));
    }
    expect((await call(appWith(hsOptions), `Bearer ${await sign(hsKey, "HS256", { aud: ["x", AUD] })}`)).status).toBe(200);
  });

  it("missing or non-numeric exp → 401", async () => {
    for (const exp of [undefined, "tomorrow"]) {
      const t = await sign(hsKey, "HS256", { exp });
      await expectFailure(await call(appWith(hsOptions), `Bearer ${t}`), 401, "invalid_token", invalid("token has no valid expiry"));
    }
  });

  it("missing or empty subject → 401", async () => {
    for (const sub of [undefined, "", 42]) {
      const t = await sign(hsKey, "HS256", { sub });
      await expectFailure(await call(appWith(hsOptions), `Bearer ${t}`), 401, "invalid_token", invalid("token has no subject"));
    }
  });

  it("missing scope → 403 insufficient_scope naming the scope", async () => {
    for (const extra of [{ scope: undefined }, { scope: "read write" }, { scope: "vqa-admin" }, { scope: undefined, scp: ["read"] }]) {
      const t = await sign(hsKey, "HS256", extra);
      await expectFailure(await call(appWith(hsOptions), `Bearer ${t}`), 403, "insufficient_scope", INSUFFICIENT);
    }
  });

  it("scope from a space-separated `scope` or an `scp` array", async () => {
    for (const extra of [{ scope: "read vqa" }, { scope: undefined, scp: ["read", "vqa"] }, { scope: "read", scp: "vqa" }]) {
      const res = await call(appWith(hsOptions), `Bearer ${await sign(hsKey, "HS256", extra)}`);
      expect(res.status).toBe(200);
      expect(((await res.json()) as { scopes: string[] }).scopes).toContain("vqa");
    }
  });

  it("no required scope configured → any valid token passes", async () => {
    const { requiredScope: _omit, ...noScope } = hsOptions;
    expect((await call(appWith(noScope), `Bearer ${await sign(hsKey, "HS256", { scope: undefined })}`)).status).toBe(200);
  });

  it("failure responses and logs never contain the token", async () => {
    const token = await sign(hsKey, "HS256", { exp: now() - 3600, sub: "secret-subject" });
    const res = await call(appWith(hsOptions), `Bearer ${token}`);
    const text = await res.text();
    expect(text).not.toContain(token);
    expect(text).not.toContain("secret-subject");
    expect(res.headers.get("WWW-Authenticate")).not.toContain(token);
    expect(errorLog).not.toHaveBeenCalled();
  });
});

describe("success", () => {
  it("HS256 sets auth {subject, scopes, subjectHash = sha256(iss|sub)[0..16]}", async () => {
    const res = await call(appWith(hsOptions), `Bearer ${await sign(hsKey, "HS256", { scope: "vqa read" })}`);
    expect(res.status).toBe(200);
    const auth = (await res.json()) as { subject: string; scopes: string[]; subjectHash: string };
    expect(auth).toEqual({ subject: "user-1", scopes: ["vqa", "read"], subjectHash: await sha256Hex16(`${ISS}|user-1`) });
    expect(auth.subjectHash).toMatch(/^[0-9a-f]{16}$/);
  });

  it("static ES256 JWK (JSON string), with or without kid", async () => {
    expect((await call(appWith(esOptions()), `Bearer ${await sign(es256.privateKey, "ES256")}`)).status).toBe(200);
    const withKid = { ...esOptions(), publicJwk: JSON.stringify({ ...es256.publicJwk, kid: "k1" }) };
    expect((await call(appWith(withKid), `Bearer ${await sign(es256.privateKey, "ES256", {}, "k1")}`)).status).toBe(200);
    await expectFailure(
      await call(appWith(withKid), `Bearer ${await sign(es256.privateKey, "ES256", {}, "k2")}`),
      401,
      "invalid_token",
      invalid("no matching key"),
    );
  });

  it("errors thrown by the route after auth are not turned into auth failures", async () => {
    const res = await call(appWith(hsOptions), `Bearer ${await sign(hsKey, "HS256")}`, "/p/boom");
    expect(res.status).toBe(500);
    expect(res.headers.get("WWW-Authenticate")).toBeNull();
  });
});

describe("remote JWKS", () => {
  /** A JWKS endpoint double: serves `keys`, counts fetches. */
  function jwksServer(initial: JWK[]) {
    const server = { keys: initial, fetches: 0, status: 200 };
    const fetchImpl: JwksFetch = async (url) => {
      server.fetches++;
      expect(url).toBe(JWKS_URL);
      return new Response(JSON.stringify({ keys: server.keys }), { status: server.status, headers: { "Content-Type": "application/json" } });
    };
    return { server, fetchImpl };
  }
  const jwksOptions = (fetchImpl: JwksFetch, extra: Partial<JwtAuthOptions> = {}): JwtAuthOptions => ({
    jwksUrl: JWKS_URL,
    issuer: ISS,
    audience: AUD,
    requiredScope: "vqa",
    fetch: fetchImpl,
    ...extra,
  });

  it("verifies with a fetched key and caches the set per isolate", async () => {
    const { server, fetchImpl } = jwksServer([{ ...es256.publicJwk, kid: "k1", alg: "ES256", use: "sig" }]);
    const token = await sign(es256.privateKey, "ES256", {}, "k1");
    expect((await call(appWith(jwksOptions(fetchImpl)), `Bearer ${token}`)).status).toBe(200);
    // A second middleware instance with the same URL and fetch reuses the cached set.
    expect((await call(appWith(jwksOptions(fetchImpl)), `Bearer ${token}`)).status).toBe(200);
    expect(server.fetches).toBe(1);
  });

  it("rotation: a token with a new kid is accepted after a refetch", async () => {
    const { server, fetchImpl } = jwksServer([{ ...rs256.publicJwk, kid: "old", alg: "RS256" }]);
    const app = appWith(jwksOptions(fetchImpl, { jwksCooldownMs: 0 }));
    expect((await call(app, `Bearer ${await sign(rs256.privateKey, "RS256", {}, "old")}`)).status).toBe(200);
    expect(server.fetches).toBe(1);

    server.keys = [{ ...es256.publicJwk, kid: "new", alg: "ES256" }];
    expect((await call(app, `Bearer ${await sign(es256.privateKey, "ES256", {}, "new")}`)).status).toBe(200);
    expect(server.fetches).toBe(2);
    // The retired key is gone after the rotation.
    await expectFailure(await call(app, `Bearer ${await sign(rs256.privateKey, "RS256", {}, "old")}`), 401, "invalid_token", invalid("no matching key"));
  });

  it("unknown kids within the cooldown do not refetch (no JWKS flood)", async () => {
    const { server, fetchImpl } = jwksServer([{ ...es256.publicJwk, kid: "k1" }]);
    const app = appWith(jwksOptions(fetchImpl, { jwksCooldownMs: 60_000 }));
    expect((await call(app, `Bearer ${await sign(es256.privateKey, "ES256", {}, "k1")}`)).status).toBe(200);
    for (const kid of ["x1", "x2", "x3"]) {
      await expectFailure(await call(app, `Bearer ${await sign(es256.privateKey, "ES256", {}, kid)}`), 401, "invalid_token", invalid("no matching key"));
    }
    expect(server.fetches).toBe(1);
  });

  it("an unreachable or broken JWKS → 503 auth_unavailable with Retry-After, not 401 (the token may be fine)", async () => {
    const { server, fetchImpl } = jwksServer([]);
    server.status = 503;
    const token = await sign(es256.privateKey, "ES256", {}, "k1");
    const res = await call(appWith(jwksOptions(fetchImpl)), `Bearer ${token}`);
    expect(res.headers.get("Retry-After")).toBe("5");
    const text = await expectFailure(res, 503, "auth_unavailable", null);
    expect(text).not.toContain("issuer.test");
    expect(errorLog).toHaveBeenCalledTimes(1);
    expect(String(errorLog.mock.calls[0]?.[0])).not.toContain(token);

    const throwing: JwksFetch = async () => {
      throw new TypeError("network down");
    };
    await expectFailure(await call(appWith(jwksOptions(throwing)), `Bearer ${token}`), 503, "auth_unavailable", null);
  });
});

describe("configuration", () => {
  const misconfigurations: [string, JwtAuthOptions][] = [
    ["no key source", { issuer: ISS, audience: AUD }],
    ["HS256 in the asymmetric allow-list", { ...esOptionsStatic(), algorithms: ["ES256", "HS256"] }],
    ["none in the allow-list", { ...esOptionsStatic(), algorithms: ["none"] }],
    ["short HS secret", { ...hsOptions, hs256Secret: "short" }],
    ["private key material in publicJwk", { ...esOptionsStatic(), publicJwk: '{"kty":"EC","crv":"P-256","x":"a","y":"b","d":"c"}' }],
    ["symmetric publicJwk", { ...esOptionsStatic(), publicJwk: '{"kty":"oct","k":"abc"}' }],
    ["unparsable publicJwk", { ...esOptionsStatic(), publicJwk: "{not json" }],
    ["plain-http JWKS URL", { jwksUrl: "http://issuer.test/jwks", issuer: ISS, audience: AUD }],
    ["missing issuer", { ...hsOptions, issuer: "" }],
    ["missing audience", { ...hsOptions, audience: "" }],
    ["unusable clock tolerance", { ...hsOptions, clockToleranceSec: Number.NaN }],
  ];
  /** Static options valid in themselves (the ES256 key is filled in lazily by esOptions()). */
  function esOptionsStatic(): JwtAuthOptions {
    return { publicJwk: '{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"}', issuer: ISS, audience: AUD };
  }

  it.each(misconfigurations)("%s → 500 internal_error without details", async (_name, options) => {
    const app = appWith(options);
    const text = await expectFailure(await call(app, `Bearer ${await sign(hsKey, "HS256")}`), 500, "internal_error", null);
    expect(JSON.parse(text)).toEqual({ error: { code: "internal_error", message: "internal error" } });
    // Logged once per middleware, without the secret.
    await call(app);
    expect(errorLog).toHaveBeenCalledTimes(1);
    expect(String(errorLog.mock.calls[0]?.[0])).toMatch(/^jwt-auth: misconfigured/);
    expect(String(errorLog.mock.calls[0]?.[0])).not.toContain(HS_SECRET);
  });

  it("jwtAuthOptionsFromEnv reads the JWT_* bindings", () => {
    const options = jwtAuthOptionsFromEnv(env);
    expect(options).toMatchObject({
      hs256Secret: env.JWT_HS256_SECRET,
      issuer: "medvlm-dev",
      audience: "medvlm-api",
      requiredScope: "vqa",
      algorithms: ["ES256", "RS256", "EdDSA"],
      clockToleranceSec: 30,
    });
    expect(options.jwksUrl).toBeUndefined();
    expect(options.publicJwk).toBeUndefined();
  });

  it("the worker's bindings authenticate a dev HS256 token", async () => {
    const secret = new TextEncoder().encode(env.JWT_HS256_SECRET);
    const token = await new SignJWT({ scope: "vqa" })
      .setProtectedHeader({ alg: "HS256" })
      .setIssuer(env.JWT_ISSUER ?? "")
      .setAudience(env.JWT_AUDIENCE ?? "")
      .setSubject("dev-user")
      .setExpirationTime("5m")
      .sign(secret);
    const res = await call(appWith(jwtAuthOptionsFromEnv(env)), `Bearer ${token}`);
    expect(res.status).toBe(200);
    expect(((await res.json()) as { subject: string }).subject).toBe("dev-user");
  });

  it("bindings without a key source, or with a bad tolerance, → 500 internal_error", async () => {
    const token = await sign(hsKey, "HS256");
    for (const broken of [{ JWT_HS256_SECRET: undefined }, { JWT_CLOCK_TOLERANCE_S: "thirty" }, { JWT_ALGORITHMS: "ES256,HS256" }]) {
      const app = appWith(jwtAuthOptionsFromEnv({ ...env, ...broken }));
      await expectFailure(await call(app, `Bearer ${token}`), 500, "internal_error", null);
    }
  });
});

/**
 * Options of the JWT auth middleware, how they are read from the worker's bindings, and their
 * validation into a resolved configuration. Validation never throws: a bad configuration becomes a
 * `reason` (naming the offending setting, never its value) that the middleware turns into a 500.
 */
import type { FetchImplementation, JSONWebKeySet } from "jose";
import type { EdgeEnv } from "../../env.ts";

/** Asymmetric JWS algorithms that may appear in the allow-list (HMAC and `none` never may). */
export const ASYMMETRIC_ALGORITHMS = [
  "RS256",
  "RS384",
  "RS512",
  "PS256",
  "PS384",
  "PS512",
  "ES256",
  "ES384",
  "ES512",
  "EdDSA",
  "Ed25519",
] as const;

/** One of {@link ASYMMETRIC_ALGORITHMS}. */
export type AsymmetricAlgorithm = (typeof ASYMMETRIC_ALGORITHMS)[number];

/** The allow-list used with JWK/JWKS keys when none is configured. */
export const DEFAULT_ALGORITHMS: readonly AsymmetricAlgorithm[] = ["ES256", "RS256", "EdDSA"];

/** Clock skew tolerated on `exp`/`nbf` when none is configured, in seconds. */
export const DEFAULT_CLOCK_TOLERANCE_SEC = 30;
/** Largest accepted clock tolerance: more would make `exp` meaningless. */
export const MAX_CLOCK_TOLERANCE_SEC = 300;
/** RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (32 bytes). */
export const MIN_HS256_SECRET_BYTES = 32;

/** Fetch used to download a JWKS (jose's `customFetch` shape; the global `fetch` fits). */
export type JwksFetch = FetchImplementation;

/**
 * Options of {@link jwtAuth}. At least one key source is required: `jwksUrl` or `publicJwk`
 * (asymmetric, checked against `algorithms`) and/or `hs256Secret` (HS256 only, for development).
 * Tokens are routed to a key source by their `alg`, so an HS256 token is never checked against a
 * public key and an asymmetric token never against the shared secret.
 */
export interface JwtAuthOptions {
  /** HTTPS URL of the issuer's JWKS (`http:` only for localhost). Cached per isolate. */
  jwksUrl?: string;
  /** A static public JWK, or a `{ "keys": [...] }` set, as JSON text or an object. */
  publicJwk?: string | object;
  /** Development shared secret for HS256 tokens (at least 32 bytes). */
  hs256Secret?: string;
  /** Expected `iss`. */
  issuer: string;
  /** Expected `aud` (the token's `aud` must contain it, or one of them). */
  audience: string | readonly string[];
  /** Scope the token must grant (`scope` string or `scp`); omitted: any valid token passes. */
  requiredScope?: string;
  /** Asymmetric algorithms accepted with JWK/JWKS keys. Default {@link DEFAULT_ALGORITHMS}. */
  algorithms?: readonly string[];
  /** Tolerated clock skew on `exp`/`nbf`, seconds (0–300). Default 30. */
  clockToleranceSec?: number;
  /** Fetch for the JWKS download (tests, or a service binding). Default: the global `fetch`. */
  fetch?: JwksFetch;
  /** Minimum time between JWKS refetches triggered by an unknown `kid`. Default 30 000 ms. */
  jwksCooldownMs?: number;
  /** Maximum age of the cached JWKS before it is refetched. Default 600 000 ms. */
  jwksCacheMaxAgeMs?: number;
  /** Timeout of one JWKS download. Default 5 000 ms. */
  jwksTimeoutMs?: number;
  /** `realm` of the `WWW-Authenticate` challenge. Default `"medvlm"`. */
  realm?: string;
}

/** The validated form of {@link JwtAuthOptions}. */
export interface ResolvedJwtAuthConfig {
  jwksUrl?: URL;
  /** Parsed JWKS (a single JWK is wrapped). */
  publicJwks?: JSONWebKeySet;
  hs256Key?: Uint8Array;
  issuer: string;
  audience: string[];
  requiredScope?: string;
  algorithms: AsymmetricAlgorithm[];
  clockToleranceSec: number;
  fetch?: JwksFetch;
  jwksCooldownMs: number;
  jwksCacheMaxAgeMs: number;
  jwksTimeoutMs: number;
  realm: string;
}

/** Result of {@link resolveJwtAuthConfig}. */
export type ConfigResult = { ok: true; config: ResolvedJwtAuthConfig } | { ok: false; reason: string };

/** RFC 6749 §3.3 scope-token: printable ASCII without space, `"` and `\` (safe to quote in a header). */
const SCOPE_TOKEN = /^[\x21\x23-\x5B\x5D-\x7E]+$/;
/** Realm is echoed inside a quoted-string: keep it to plain visible characters. */
const REALM = /^[\x20\x21\x23-\x5B\x5D-\x7E]+$/;
const PRIVATE_JWK_MEMBERS = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/**
 * Reads the middleware options from the worker's bindings (`JWT_*`). Never throws: malformed values
 * are passed on as-is (or as `NaN`) so that {@link resolveJwtAuthConfig} reports them, and the
 * middleware answers 500 `internal_error` instead of the worker failing to start.
 */
export function jwtAuthOptionsFromEnv(env: EdgeEnv): JwtAuthOptions {
  const nonEmpty = (v: string | undefined) => (v !== undefined && v.trim() !== "" ? v.trim() : undefined);
  const tolerance = nonEmpty(env.JWT_CLOCK_TOLERANCE_S);
  const algorithms = nonEmpty(env.JWT_ALGORITHMS);
  const options: JwtAuthOptions = {
    issuer: nonEmpty(env.JWT_ISSUER) ?? "",
    audience: nonEmpty(env.JWT_AUDIENCE) ?? "",
  };
  const jwksUrl = nonEmpty(env.JWT_JWKS_URL);
  if (jwksUrl) options.jwksUrl = jwksUrl;
  const publicJwk = nonEmpty(env.JWT_PUBLIC_JWK);
  if (publicJwk) options.publicJwk = publicJwk;
  // The secret is used verbatim (no trim): whitespace may be part of it.
  if (env.JWT_HS256_SECRET) options.hs256Secret = env.JWT_HS256_SECRET;
  const scope = nonEmpty(env.JWT_REQUIRED_SCOPE);
  if (scope) options.requiredScope = scope;
  if (algorithms) options.algorithms = algorithms.split(",").map((a) => a.trim()).filter((a) => a !== "");
  // `Number("")` would be 0; an unparsable value must surface as a configuration error instead.
  if (tolerance !== undefined) options.clockToleranceSec = /^\d+$/.test(tolerance) ? Number(tolerance) : Number.NaN;
  return options;
}

function parseJwks(input: string | object): JSONWebKeySet | string {
  let value: unknown = input;
  if (typeof input === "string") {
    try {
      value = JSON.parse(input);
    } catch {
      return "publicJwk is not valid JSON";
    }
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return "publicJwk must be a JSON object";
  const keys: unknown = "keys" in value ? (value as { keys: unknown }).keys : [value];
  if (!Array.isArray(keys) || keys.length === 0) return "publicJwk set has no keys";
  for (const key of keys) {
    if (typeof key !== "object" || key === null || Array.isArray(key)) return "publicJwk keys must be objects";
    const jwk = key as Record<string, unknown>;
    // Symmetric or private material in a "public" key is a configuration mistake worth refusing.
    if (jwk.kty !== "RSA" && jwk.kty !== "EC" && jwk.kty !== "OKP") return "publicJwk must be an RSA, EC or OKP key";
    if (PRIVATE_JWK_MEMBERS.some((m) => m in jwk)) return "publicJwk must not contain private key material";
  }
  return { keys } as JSONWebKeySet;
}

function parseJwksUrl(raw: string): URL | string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    return "jwksUrl is not a valid URL";
  }
  const local = url.hostname === "localhost" || url.hostname === "127.0.0.1" || url.hostname === "[::1]";
  if (url.protocol !== "https:" && !(url.protocol === "http:" && local)) return "jwksUrl must use https";
  return url;
}

function durationMs(value: number | undefined, fallback: number, name: string): number | string {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 0) return `${name} must be a non-negative integer`;
  return value;
}

/**
 * Validates {@link JwtAuthOptions}. A failure reason names the setting at fault, never its value,
 * so it is safe to log.
 */
export function resolveJwtAuthConfig(options: JwtAuthOptions): ConfigResult {
  const fail = (reason: string): ConfigResult => ({ ok: false, reason });
  if (typeof options !== "object" || options === null) return fail("options missing");
  if (!options.jwksUrl && options.publicJwk === undefined && !options.hs256Secret) return fail("no key source configured");
  if (options.jwksUrl && options.publicJwk !== undefined) return fail("configure either jwksUrl or publicJwk, not both");

  const issuer = typeof options.issuer === "string" ? options.issuer.trim() : "";
  if (!issuer) return fail("issuer missing");
  const audience = (typeof options.audience === "string" ? [options.audience] : [...(options.audience ?? [])])
    .filter((a) => typeof a === "string")
    .map((a) => a.trim())
    .filter((a) => a !== "");
  if (audience.length === 0) return fail("audience missing");

  const requiredScope = options.requiredScope === undefined ? undefined : options.requiredScope.trim();
  if (requiredScope !== undefined && !SCOPE_TOKEN.test(requiredScope)) return fail("requiredScope is not a single scope token");

  const realm = options.realm ?? "medvlm";
  if (!REALM.test(realm)) return fail("realm contains characters not allowed in a header");

  const algorithms: AsymmetricAlgorithm[] = [];
  for (const alg of options.algorithms ?? DEFAULT_ALGORITHMS) {
    if (!(ASYMMETRIC_ALGORITHMS as readonly string[]).includes(alg)) return fail("algorithms may list only asymmetric JWS algorithms");
    if (!algorithms.includes(alg as AsymmetricAlgorithm)) algorithms.push(alg as AsymmetricAlgorithm);
  }
  const asymmetric = Boolean(options.jwksUrl) || options.publicJwk !== undefined;
  if (asymmetric && algorithms.length === 0) return fail("algorithms is empty");

  const clockToleranceSec = options.clockToleranceSec ?? DEFAULT_CLOCK_TOLERANCE_SEC;
  if (!Number.isInteger(clockToleranceSec) || clockToleranceSec < 0 || clockToleranceSec > MAX_CLOCK_TOLERANCE_SEC) {
    return fail(`clockToleranceSec must be an integer in 0..${MAX_CLOCK_TOLERANCE_SEC}`);
  }

  const jwksCooldownMs = durationMs(options.jwksCooldownMs, 30_000, "jwksCooldownMs");
  if (typeof jwksCooldownMs === "string") return fail(jwksCooldownMs);
  const jwksCacheMaxAgeMs = durationMs(options.jwksCacheMaxAgeMs, 600_000, "jwksCacheMaxAgeMs");
  if (typeof jwksCacheMaxAgeMs === "string") return fail(jwksCacheMaxAgeMs);
  const jwksTimeoutMs = durationMs(options.jwksTimeoutMs, 5_000, "jwksTimeoutMs");
  if (typeof jwksTimeoutMs === "string") return fail(jwksTimeoutMs);

  const config: ResolvedJwtAuthConfig = {
    issuer,
    audience,
    algorithms,
    clockToleranceSec,
    jwksCooldownMs,
    jwksCacheMaxAgeMs,
    jwksTimeoutMs,
    realm,
  };
  if (requiredScope !== undefined) config.requiredScope = requiredScope;
  if (options.fetch) config.fetch = options.fetch;

  if (options.jwksUrl) {
    const url = parseJwksUrl(options.jwksUrl);
    if (typeof url === "string") return fail(url);
    config.jwksUrl = url;
  }
  if (options.publicJwk !== undefined) {
    const jwks = parseJwks(options.publicJwk);
    if (typeof jwks === "string") return fail(jwks);
    config.publicJwks = jwks;
  }
  if (options.hs256Secret) {
    const key = new TextEncoder().encode(options.hs256Secret);
    if (key.byteLength < MIN_HS256_SECRET_BYTES) return fail(`hs256Secret must be at least ${MIN_HS256_SECRET_BYTES} bytes`);
    config.hs256Key = key;
  }
  return { ok: true, config };
}

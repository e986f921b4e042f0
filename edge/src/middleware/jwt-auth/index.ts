/**
 * JWT bearer authentication for the edge worker.
 *
 * @example
 * ```ts
 * import { env } from "cloudflare:workers";
 * // Build once per isolate: the static JWK import and the middleware's config are then reused
 * // (a JWKS is cached per isolate either way).
 * const app = new Hono<{ Bindings: EdgeEnv; Variables: AuthVariables }>();
 * app.use("/v1/*", jwtAuth(jwtAuthOptionsFromEnv(env)));
 * app.post("/v1/vqa", (c) => c.json({ user: c.get("auth").subjectHash }));
 * ```
 */
import type { MiddlewareHandler } from "hono";
import { createMiddleware } from "hono/factory";
import { extractBearerToken } from "./bearer.ts";
import { scopesOf, subjectHash } from "./claims.ts";
import { INTERNAL_MESSAGE, JwtAuthError, toHttpException } from "./failure.ts";
import { createKeySources, type KeySources } from "./keys.ts";
import { resolveJwtAuthConfig, type JwtAuthOptions } from "./options.ts";
import { verifyToken } from "./verify.ts";

export { jwtAuthOptionsFromEnv, ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS, DEFAULT_CLOCK_TOLERANCE_SEC } from "./options.ts";
export type { AsymmetricAlgorithm, JwksFetch, JwtAuthOptions } from "./options.ts";
export { JwtAuthError, type JwtAuthErrorCode } from "./failure.ts";
export { MAX_TOKEN_CHARS } from "./bearer.ts";
export { scopesOf, subjectHash } from "./claims.ts";

/** The authenticated caller, set on the context as `auth` by {@link jwtAuth}. */
export interface AuthContext {
  /** The token's `sub`. Do not log it: log {@link AuthContext.subjectHash} instead. */
  subject: string;
  /** Scopes granted by the token (`scope` and `scp`, deduplicated). */
  scopes: readonly string[];
  /** First 16 hex chars of SHA-256(`iss|sub`): the rate-limit key and the caller's id in logs. */
  subjectHash: string;
}

/** Context variables provided by {@link jwtAuth}. */
export type AuthVariables = { auth: AuthContext };

/** Hono env of {@link jwtAuth}. */
export type JwtAuthEnv = { Variables: AuthVariables };

/**
 * Class or jose code of the innermost cause, for logs. Only that: error messages are token-free in
 * jose, but a log line needs no more to tell a JWKS timeout from a bad response.
 */
function rootKind(err: unknown): string {
  let current = err;
  for (let depth = 0; depth < 4 && current instanceof Error && current.cause !== undefined; depth++) current = current.cause;
  if (!(current instanceof Error)) return typeof current;
  const code = (current as { code?: unknown }).code;
  return typeof code === "string" ? code : current.name;
}

/** Middleware that answers every request with 500: the configuration was rejected. */
function misconfigured(reason: string): MiddlewareHandler<JwtAuthEnv> {
  let logged = false;
  return async () => {
    if (!logged) {
      logged = true;
      // The reason names the setting at fault, never its value.
      console.error(`jwt-auth: misconfigured (${reason}); refusing all requests`);
    }
    throw toHttpException(new JwtAuthError("internal_error", INTERNAL_MESSAGE), "medvlm");
  };
}

/**
 * JWT bearer authentication middleware.
 *
 * Reads `Authorization: Bearer <JWT>`, verifies it with the configured key source (remote JWKS,
 * static JWK, or development HS256 secret; see {@link JwtAuthOptions}), checks `exp` (required),
 * `nbf`, `iss`, `aud`, `sub` and the required scope, then sets `c.get("auth")` ({@link AuthContext}).
 *
 * Failures throw an `HTTPException` whose response has the JSON body `{ error: { code, message } }`:
 * - 401 `missing_token`, `WWW-Authenticate: Bearer realm="medvlm"` (no Bearer credentials);
 * - 401 `invalid_token` / `token_expired`, `Bearer realm="medvlm", error="invalid_token", error_description="…"`;
 * - 403 `insufficient_scope`, `Bearer realm="medvlm", error="insufficient_scope", scope="vqa"`;
 * - 503 `auth_unavailable` with `Retry-After` when the JWKS cannot be fetched (the cause is logged, not sent);
 * - 500 `internal_error` for a rejected configuration.
 *
 * Never throws at construction: a bad configuration yields a middleware that answers 500.
 */
export function jwtAuth(options: JwtAuthOptions): MiddlewareHandler<JwtAuthEnv> {
  const resolved = resolveJwtAuthConfig(options);
  if (!resolved.ok) return misconfigured(resolved.reason);
  const config = resolved.config;
  let keys: KeySources;
  try {
    keys = createKeySources(config);
  } catch {
    return misconfigured("publicJwk is not a valid JWK set");
  }

  return createMiddleware<JwtAuthEnv>(async (c, next) => {
    let auth: AuthContext;
    try {
      const token = extractBearerToken(c.req.header("Authorization"));
      const claims = await verifyToken(token, config, keys);
      const scopes = scopesOf(claims);
      if (config.requiredScope !== undefined && !scopes.includes(config.requiredScope)) {
        throw new JwtAuthError("insufficient_scope", `token lacks the required scope "${config.requiredScope}"`);
      }
      auth = { subject: claims.sub, scopes, subjectHash: await subjectHash(claims.iss, claims.sub) };
    } catch (err) {
      const failure = err instanceof JwtAuthError ? err : new JwtAuthError("internal_error", INTERNAL_MESSAGE);
      if (failure.code === "auth_unavailable") console.error(`jwt-auth: key source unavailable (${rootKind(err)})`);
      if (failure.code === "internal_error") {
        console.error(`jwt-auth: ${failure.message === INTERNAL_MESSAGE ? "unexpected error" : failure.message} (${rootKind(err)})`);
        throw toHttpException(new JwtAuthError("internal_error", INTERNAL_MESSAGE), config.realm);
      }
      throw toHttpException(failure, config.realm, config.requiredScope);
    }
    c.set("auth", auth);
    await next();
  });
}

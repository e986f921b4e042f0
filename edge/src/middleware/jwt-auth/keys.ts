/**
 * Key sources for token verification: a remote JWKS (cached per isolate, refetched on an unknown
 * `kid` at most once per cooldown), a static JWK set, and the development HS256 secret.
 */
import { createLocalJWKSet, createRemoteJWKSet, customFetch, errors, type JWTVerifyGetKey, type RemoteJWKSet } from "jose";
import type { JwksFetch, ResolvedJwtAuthConfig } from "./options.ts";
import { NamedError } from "../../../../shared/src/errors.ts";

/**
 * The key material could not be obtained (JWKS unreachable, non-200, malformed, or a configured key
 * that does not import). Not the client's fault: reported as 500, never as `invalid_token`, so that
 * clients do not discard good tokens during an issuer outage.
 */
export class KeySourceError extends NamedError {
  constructor(cause: unknown) {
    super("key source unavailable", { cause });
  }
}

/** Keys for the two verification routes; HS256 and asymmetric tokens never share a key. */
export interface KeySources {
  /** Resolver for asymmetric tokens (JWKS or static JWK), if configured. */
  asymmetric?: JWTVerifyGetKey;
  /** The HS256 secret, if configured. */
  hs256?: Uint8Array;
}

// Per-isolate cache: one remote set per (fetch, URL, timings), shared by every middleware instance
// so that building the middleware per request (e.g. from `c.env`) still fetches the JWKS once.
const DEFAULT_FETCH: object = {};
const remoteSets = new WeakMap<object, Map<string, RemoteJWKSet>>();

function remoteSet(config: ResolvedJwtAuthConfig & { jwksUrl: URL }): RemoteJWKSet {
  const owner: object = config.fetch ?? DEFAULT_FETCH;
  let byKey = remoteSets.get(owner);
  if (!byKey) remoteSets.set(owner, (byKey = new Map()));
  const key = [config.jwksUrl.href, config.jwksCooldownMs, config.jwksCacheMaxAgeMs, config.jwksTimeoutMs].join("\n");
  let set = byKey.get(key);
  if (!set) {
    const fetchImpl: JwksFetch | undefined = config.fetch;
    set = createRemoteJWKSet(config.jwksUrl, {
      cooldownDuration: config.jwksCooldownMs,
      cacheMaxAge: config.jwksCacheMaxAgeMs,
      timeoutDuration: config.jwksTimeoutMs,
      ...(fetchImpl ? { [customFetch]: fetchImpl } : {}),
    });
    byKey.set(key, set);
  }
  return set;
}

/**
 * Errors that say "this token does not fit our keys" pass through (→ `invalid_token`); anything else
 * raised while resolving a key is the key source's fault and becomes a {@link KeySourceError}.
 */
function guardKeySource(resolve: JWTVerifyGetKey): JWTVerifyGetKey {
  return async (header, token) => {
    try {
      return await resolve(header, token);
    } catch (err) {
      if (
        err instanceof errors.JWKSNoMatchingKey ||
        err instanceof errors.JWKSMultipleMatchingKeys ||
        err instanceof errors.JOSENotSupported
      ) {
        throw err;
      }
      throw new KeySourceError(err);
    }
  };
}

/**
 * Builds the key sources of a validated configuration.
 *
 * @throws {errors.JWKSInvalid} when the static JWK set is malformed (a configuration error).
 */
export function createKeySources(config: ResolvedJwtAuthConfig): KeySources {
  const sources: KeySources = {};
  if (config.jwksUrl) sources.asymmetric = guardKeySource(remoteSet({ ...config, jwksUrl: config.jwksUrl }));
  else if (config.publicJwks) sources.asymmetric = guardKeySource(createLocalJWKSet(config.publicJwks));
  if (config.hs256Key) sources.hs256 = config.hs256Key;
  return sources;
}

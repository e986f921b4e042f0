/**
 * Verification of a bearer JWT: algorithm routing (HS256 only with the shared secret, asymmetric
 * algorithms only with JWK/JWKS keys, `none` never), signature, `exp` (required), `nbf`, `iss`,
 * `aud` and `sub`, with every failure mapped to a stable code and a fixed description.
 */
import { decodeProtectedHeader, errors, jwtVerify, type JWTPayload } from "jose";
import { JwtAuthError, KEYS_UNAVAILABLE_MESSAGE } from "./failure.ts";
import { KeySourceError, type KeySources } from "./keys.ts";
import type { ResolvedJwtAuthConfig } from "./options.ts";

/** Longest accepted `sub`; it is hashed, never stored, but unbounded input is never useful. */
const MAX_SUBJECT_CHARS = 1024;

/** Claims of a token that passed {@link verifyToken}. */
export interface VerifiedClaims extends JWTPayload {
  iss: string;
  sub: string;
  exp: number;
}

function describeClaimFailure(claim: string): string {
  switch (claim) {
    case "nbf":
      return "token not yet valid";
    case "iss":
      return "unexpected issuer";
    case "aud":
      return "unexpected audience";
    case "exp":
      return "token has no valid expiry";
    case "sub":
      return "token has no subject";
    default:
      return "invalid token claims";
  }
}

/** Maps what jose (or a key source) threw to the middleware's failure. */
function classify(err: unknown): JwtAuthError {
  if (err instanceof JwtAuthError) return err;
  if (err instanceof KeySourceError) return new JwtAuthError("auth_unavailable", KEYS_UNAVAILABLE_MESSAGE, { cause: err });
  if (err instanceof errors.JWTExpired) return new JwtAuthError("token_expired", "token expired");
  if (err instanceof errors.JWTClaimValidationFailed) return new JwtAuthError("invalid_token", describeClaimFailure(err.claim));
  if (err instanceof errors.JWSSignatureVerificationFailed) return new JwtAuthError("invalid_token", "signature verification failed");
  if (err instanceof errors.JOSEAlgNotAllowed) return new JwtAuthError("invalid_token", "token algorithm not accepted");
  if (err instanceof errors.JWKSNoMatchingKey) return new JwtAuthError("invalid_token", "no matching key");
  // Several keys fit a token without `kid`; trying each would multiply the work an attacker can cause.
  if (err instanceof errors.JWKSMultipleMatchingKeys) return new JwtAuthError("invalid_token", "token must name its key (kid)");
  return new JwtAuthError("invalid_token", "malformed token");
}

/**
 * Verifies a compact JWT against the configured key sources and claim expectations.
 *
 * @returns the claims, with `iss`, `sub` (non-empty string) and `exp` guaranteed present.
 * @throws {JwtAuthError} `invalid_token`, `token_expired`, or `auth_unavailable` when the key source
 *   is unavailable.
 */
export async function verifyToken(token: string, config: ResolvedJwtAuthConfig, keys: KeySources): Promise<VerifiedClaims> {
  try {
    let alg: unknown;
    try {
      alg = decodeProtectedHeader(token).alg;
    } catch {
      throw new JwtAuthError("invalid_token", "malformed token");
    }
    // Route by `alg` before touching any key, so that a key is only ever used with its own family:
    // this is what prevents HS/RS confusion (an HS256 token "signed" with a public key's bytes).
    const common = {
      issuer: config.issuer,
      audience: config.audience,
      clockTolerance: config.clockToleranceSec,
      requiredClaims: ["exp", "sub"],
    };
    let payload: JWTPayload;
    if (alg === "HS256" && keys.hs256) {
      ({ payload } = await jwtVerify(token, keys.hs256, { ...common, algorithms: ["HS256"] }));
    } else if (typeof alg === "string" && keys.asymmetric && (config.algorithms as readonly string[]).includes(alg)) {
      ({ payload } = await jwtVerify(token, keys.asymmetric, { ...common, algorithms: config.algorithms }));
    } else {
      throw new JwtAuthError("invalid_token", "token algorithm not accepted");
    }
    if (typeof payload.sub !== "string" || payload.sub === "" || payload.sub.length > MAX_SUBJECT_CHARS) {
      throw new JwtAuthError("invalid_token", "token has no subject");
    }
    // jose checked `iss` against the configured issuer and `exp` for presence and type.
    return payload as VerifiedClaims;
  } catch (err) {
    throw classify(err);
  }
}

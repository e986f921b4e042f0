/**
 * Extraction of the bearer token from the `Authorization` header (RFC 6750 §2.1).
 */
import { JwtAuthError } from "./failure.ts";

/** Longest accepted token; real access tokens are far smaller, and this bounds the work per request. */
export const MAX_TOKEN_CHARS = 8192;

/** RFC 6750 §2.1 b64token (token68). */
const B64TOKEN = /^[A-Za-z0-9\-._~+/]+=*$/;

/**
 * Returns the token of an `Authorization: Bearer <token>` header.
 *
 * @throws {JwtAuthError} `missing_token` when there is no header or it uses another scheme (the client
 *   sent no bearer credentials, RFC 6750 §3.1); `invalid_token` when a Bearer header is malformed.
 */
export function extractBearerToken(header: string | undefined | null): string {
  const value = header?.trim() ?? "";
  if (value === "") throw new JwtAuthError("missing_token", "bearer token required");
  const space = value.indexOf(" ");
  const scheme = space === -1 ? value : value.slice(0, space);
  // The auth-scheme is case-insensitive (RFC 9110 §11.1).
  if (scheme.toLowerCase() !== "bearer") throw new JwtAuthError("missing_token", "bearer token required");
  const token = space === -1 ? "" : value.slice(space + 1).trimStart();
  if (token.length > MAX_TOKEN_CHARS) throw new JwtAuthError("invalid_token", "token too large");
  if (!B64TOKEN.test(token)) throw new JwtAuthError("invalid_token", "malformed bearer credentials");
  return token;
}

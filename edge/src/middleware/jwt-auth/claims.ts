/**
 * What the middleware reads from verified claims: the granted scopes and the subject's hashed id.
 */
import type { JWTPayload } from "jose";

/**
 * Scopes granted by a verified token: the union of `scope` (space-separated string, RFC 8693 §4.2)
 * and `scp` (array of strings, or a space-separated string as some issuers emit). Values of other
 * types grant nothing.
 */
export function scopesOf(payload: JWTPayload): string[] {
  const scopes = new Set<string>();
  const addAll = (value: unknown) => {
    if (typeof value === "string") {
      for (const s of value.split(" ")) if (s !== "") scopes.add(s);
    } else if (Array.isArray(value)) {
      for (const s of value) if (typeof s === "string" && s !== "" && !s.includes(" ")) scopes.add(s);
    }
  };
  addAll(payload.scope);
  addAll(payload.scp);
  return [...scopes];
}

/**
 * Pseudonymous id of a subject: hex SHA-256 of `iss + "|" + sub`, first 16 hex chars (64 bits).
 * Used as the rate-limit key and in logs, so the raw subject never has to be logged. The issuer is
 * part of the input so equal `sub`s from different issuers stay distinct.
 */
export async function subjectHash(issuer: string, subject: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(`${issuer}|${subject}`));
  let hex = "";
  for (const byte of new Uint8Array(digest, 0, 8)) hex += byte.toString(16).padStart(2, "0");
  return hex;
}

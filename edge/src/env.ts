/**
 * Bindings of the edge worker: wrangler.toml `[vars]` (strings), secrets (`wrangler secret put` or
 * `.dev.vars` locally) and the rate limiter's Durable Object namespace. Parsed and validated once per
 * isolate by `loadConfig` (config.ts).
 */
export interface EdgeEnv {
  /** Comma-separated backend base URLs; the edge balances across them by reported load. */
  BACKEND_URLS?: string;
  BACKEND_TIMEOUT_MS?: string;
  BACKEND_HEADERS_TIMEOUT_MS?: string;
  /** Secret: HMAC-SHA256 key shared with the backends (wire-format request signing). */
  BACKEND_HMAC_SECRET?: string;
  /** Secrets, both or neither: a Cloudflare Access service token in front of the backends (sent as `CF-Access-Client-*`). */
  BACKEND_ACCESS_CLIENT_ID?: string;
  BACKEND_ACCESS_CLIENT_SECRET?: string;

  /** Production: issuer's JWKS URL (cached, refetched on unknown `kid`). */
  JWT_JWKS_URL?: string;
  /** Development: a static public JWK (JSON) for asymmetric tokens. */
  JWT_PUBLIC_JWK?: string;
  /** Development: an HS256 shared secret (secret). */
  JWT_HS256_SECRET?: string;
  JWT_ISSUER?: string;
  JWT_AUDIENCE?: string;
  JWT_REQUIRED_SCOPE?: string;
  /** Comma-separated asymmetric algorithms accepted with JWKS/JWK keys (HS256 only with the HS secret). */
  JWT_ALGORITHMS?: string;
  JWT_CLOCK_TOLERANCE_S?: string;

  RATE_LIMIT_RPM?: string;
  RATE_LIMIT_BURST?: string;
  RATE_LIMIT_MAX_CONCURRENT?: string;

  MAX_UPLOAD_BYTES?: string;
  /** Decompression-bomb guard: width × height of an upload as declared by its header. */
  MAX_IMAGE_PIXELS?: string;
  /** Server caps for smart_resize; a request may lower them, never raise them. */
  MIN_PIXELS?: string;
  MAX_PIXELS?: string;
  MAX_IMAGE_TOKENS?: string;
  MAX_QUESTION_CHARS?: string;
  MAX_PROMPT_CHARS?: string;
  MAX_NEW_TOKENS_DEFAULT?: string;
  MAX_NEW_TOKENS_CAP?: string;
  MODEL_ID?: string;

  RATE_LIMITER: DurableObjectNamespace;
}

declare global {
  namespace Cloudflare {
    interface Env extends EdgeEnv {}
  }
}

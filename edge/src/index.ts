/**
 * The MedVLM-R1 edge gateway (Cloudflare Workers): authenticates, rate-limits, validates uploads, renders and
 * tokenizes the prompt, and forwards a signed tensorized request to a GPU backend, relaying its tokens.
 */
import { Hono, type MiddlewareHandler } from "hono";
import { HTTPException } from "hono/http-exception";
import { ApiError } from "../../shared/src/errors.ts";
import type { ModelCard } from "../../shared/src/api.ts";
import type { AppEnv } from "./app-env.ts";
import { ConfigError, configErrorToApi, loadConfig } from "./config.ts";
import type { EdgeEnv } from "./env.ts";
import { log } from "./log.ts";
import { jwtAuth, jwtAuthOptionsFromEnv } from "./middleware/jwt-auth/index.ts";
import { rateLimit, rateLimitOptionsFromEnv } from "./middleware/rate-limit/index.ts";
import { OPENAPI } from "./openapi.ts";
import { chatHandler } from "./routes/chat.ts";
import { vqaHandler } from "./routes/vqa.ts";
import { MODEL_META } from "./tokenizer/index.ts";

export { RateLimiter } from "./middleware/rate-limit/durable-object.ts";

/** Builds a middleware once per isolate (per env object): the JWKS cache and parsed keys live in it. */
function perEnv(make: (env: EdgeEnv) => MiddlewareHandler): MiddlewareHandler<AppEnv> {
  const built = new WeakMap<object, MiddlewareHandler>();
  return (c, next) => {
    let mw = built.get(c.env);
    if (!mw) {
      mw = make(c.env);
      built.set(c.env, mw);
    }
    return mw(c, next);
  };
}

function newRequestId(): string {
  const b = crypto.getRandomValues(new Uint8Array(10));
  return `req_${[...b].map((x) => x.toString(16).padStart(2, "0")).join("")}`;
}

const app = new Hono<AppEnv>();

app.use("*", async (c, next) => {
  const started = Date.now();
  const requestId = newRequestId();
  c.set("requestId", requestId);
  c.set("logFields", {});
  await next();
  c.header("x-request-id", requestId);
  const err = c.error instanceof HTTPException ? c.error.cause : c.error;
  log(c.res.status >= 500 ? "error" : "info", "request", {
    request_id: requestId,
    route: c.req.routePath,
    method: c.req.method,
    status: c.res.status,
    code: err instanceof ApiError ? err.code : undefined,
    subject_hash: c.get("auth")?.subjectHash,
    bytes_in: Number(c.req.header("content-length")) || undefined,
    total_ms: Date.now() - started,
    ...c.get("logFields"),
  });
});

app.get("/healthz", (c) => c.json({ status: "ok", model: MODEL_META.fingerprint }));
app.get("/openapi.json", (c) => c.json(OPENAPI));

const auth = perEnv((env) => jwtAuth(jwtAuthOptionsFromEnv(env)) as unknown as MiddlewareHandler);
const limit = perEnv((env) => rateLimit(rateLimitOptionsFromEnv(env)) as unknown as MiddlewareHandler);

app.use("/v1/*", auth);
app.get("/v1/models", (c) => {
  const config = loadConfig(c.env);
  const card: ModelCard = { id: config.modelId, object: "model", created: 0, owned_by: "medvlm", fingerprint: MODEL_META.fingerprint };
  return c.json({ object: "list", data: [card] });
});
app.post("/v1/vqa", limit, vqaHandler);
app.post("/v1/chat/completions", limit, chatHandler);
for (const path of ["/v1/vqa", "/v1/chat/completions"]) {
  app.all(path, () => {
    throw new ApiError("method_not_allowed", "use POST", { Allow: "POST" });
  });
}

app.notFound((c) => c.json(new ApiError("not_found", "no such route").toBody(c.get("requestId")), 404));

app.onError((err, c) => {
  const requestId = c.get("requestId");
  if (err instanceof HTTPException) {
    // Middleware (auth, rate limit) build complete responses; add the request id to our JSON errors.
    const res = err.getResponse();
    if (!(err.cause instanceof ApiError)) return res;
    const headers = new Headers(res.headers);
    headers.set("content-type", "application/json");
    return new Response(JSON.stringify(err.cause.toBody(requestId)), { status: res.status, headers });
  }
  let apiError: ApiError;
  if (err instanceof ApiError) apiError = err;
  else if (err instanceof ConfigError) {
    log("error", `configuration: ${err.message}`, { request_id: requestId });
    apiError = configErrorToApi();
  } else {
    // Only the class name: messages of unexpected errors could carry request content.
    log("error", `unexpected ${err?.name ?? "error"}`, { request_id: requestId });
    apiError = new ApiError("internal_error", "internal error");
  }
  return c.json(apiError.toBody(requestId), apiError.status as 400, apiError.headers);
});

export default app;

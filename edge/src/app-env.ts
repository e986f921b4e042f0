/** Hono typing of the edge app: bindings and per-request variables set by the middleware. */
import type { EdgeEnv } from "./env.ts";
import type { LogFields } from "./log.ts";

/** Set by the jwt-auth middleware. */
export type { AuthContext } from "./middleware/jwt-auth/index.ts";
import type { AuthContext } from "./middleware/jwt-auth/index.ts";


export type AppEnv = {
  Bindings: EdgeEnv;
  Variables: {
    requestId: string;
    auth: AuthContext;
    /** Extra non-PHI fields for the request's access log line. */
    logFields: LogFields;
  };
};

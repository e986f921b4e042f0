import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";
import { goldenForWorkers } from "./test/support/golden.ts";

/** Test vars for the worker under test (secrets are test-only values, never used elsewhere). */
export const EDGE_TEST_BINDINGS = {
  JWT_HS256_SECRET: "test-hs256-secret-0123456789abcdef0123456789abcdef",
  BACKEND_HMAC_SECRET: "test-backend-hmac-secret-0123456789abcdef",
  BACKEND_URLS: "https://backend.test",
};

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "node",
          include: ["test/shared/**/*.test.ts", "test/backend/**/*.test.ts", "test/e2e/**/*.test.ts"],
          environment: "node",
          testTimeout: 60_000,
        },
      },
      {
        plugins: [
          cloudflareTest({
            wrangler: { configPath: "./wrangler.toml" },
            miniflare: { bindings: EDGE_TEST_BINDINGS },
          }),
        ],
        test: {
          name: "edge",
          include: ["test/edge/**/*.test.ts"],
          // workerd has no file system: golden data travels as provided values (`inject("golden")`).
          provide: { golden: goldenForWorkers() },
          testTimeout: 60_000,
        },
      },
    ],
  },
});


/** The backend's log lines: allow-listed fields only, so request content never reaches a log. */
import { describe, expect, it } from "vitest";
import { formatLogLine } from "../../gpu-backend/src/server/log.ts";

describe("formatLogLine", () => {
  const at = new Date("2026-11-29T03:00:00Z");

  it("keeps the operational fields the server logs (stall limit, vision restarts) and drops anything else", () => {
    const line = JSON.parse(
      formatLogLine("warn", "vision process restarted", { restarts_total: 3, restarts: 1, stall_limit_s: 120, in_flight: 2, prompt: "a question", text: "an answer", ip: "10.0.0.1" }, at),
    );
    expect(line).toEqual({ level: "warn", msg: "vision process restarted", ts: "2026-11-29T03:00:00.000Z", restarts_total: 3, restarts: 1, stall_limit_s: 120, in_flight: 2 });
  });
});

import { SELF } from "cloudflare:test";
import { expect, inject, it } from "vitest";
it("healthz", async () => {
  const r = await SELF.fetch("http://x/healthz");
  expect(await r.json()).toMatchObject({ ok: true });
  expect(inject("golden").cases.length).toBe(6);
});

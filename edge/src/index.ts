import { Hono } from "hono";
import tokenizerText from "../generated/tokenizer.json.txt";
const app = new Hono();
app.get("/healthz", (c) => c.json({ ok: true, n: tokenizerText.length }));
export default app;
export class RateLimiter {
  constructor(_s: DurableObjectState) {}
  fetch() { return new Response("x"); }
}

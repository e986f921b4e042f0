/**
 * `npm run vqa -- --image x.png --question "…" --option "…" --option "…" [--max-new-tokens N] [--url URL] [--token JWT]`
 *
 * A small client of `/v1/vqa`: streams the model's reasoning as it is generated, then prints the parsed answer.
 * Without --token it mints a development token from `.dev.vars` (as `npm run token` does).
 */
import { readFile } from "node:fs/promises";
import { basename, extname } from "node:path";
import { parseArgs } from "node:util";
import { devTokenForRepo } from "./dev-secrets.ts";
import { ROOT } from "./lib/stack.ts";

const { values } = parseArgs({
  options: {
    image: { type: "string" },
    question: { type: "string" },
    option: { type: "string", multiple: true },
    "max-new-tokens": { type: "string" },
    url: { type: "string" },
    token: { type: "string" },
  },
});
const fail = (m: string): never => {
  process.stderr.write(`vqa: ${m}\n`);
  process.exit(2);
};
if (!values.image || !values.question || !values.option || values.option.length < 2) {
  fail('usage: npm run vqa -- --image x.png --question "…" --option "…" --option "…" [--max-new-tokens N] [--url URL]');
}
const image = values.image!;
const question = values.question!;
const options = values.option!;
const url = (values.url ?? `http://127.0.0.1:${process.env.EDGE_PORT ?? 8787}`).replace(/\/+$/, "");
const token = values.token ?? (await devTokenForRepo(ROOT, { sub: "vqa-cli" })).token;
const mime = { ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp" }[extname(image).toLowerCase()];
const form = new FormData();
form.append("image", new Blob([new Uint8Array(await readFile(image))], { type: mime ?? "application/octet-stream" }), basename(image));
form.append("question", question);
for (const o of options) form.append("options", o);
if (values["max-new-tokens"]) form.append("max_new_tokens", values["max-new-tokens"]);
form.append("stream", "true");

const res = await fetch(`${url}/v1/vqa`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: form }).catch((e: Error) =>
  fail(`cannot reach ${url}: ${e.message} (is npm start running?)`),
);
if (!res.ok || !res.body) {
  const body = await res.text();
  fail(`HTTP ${res.status}: ${body}`);
}
const decoder = new TextDecoder();
let buf = "";
let final: Record<string, unknown> | null = null;
for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
  buf += decoder.decode(chunk, { stream: true });
  let sep: number;
  while ((sep = buf.indexOf("\n\n")) >= 0) {
    const block = buf.slice(0, sep);
    buf = buf.slice(sep + 2);
    const event = /^event: (.*)$/m.exec(block)?.[1];
    const data = /^data: (.*)$/m.exec(block)?.[1];
    if (!data) continue;
    const payload = JSON.parse(data) as Record<string, unknown>;
    if (event === "token") process.stdout.write(String(payload.delta));
    else if (event === "done") final = payload;
    else if (event === "error") fail(`\n${JSON.stringify(payload)}`);
  }
}
if (!final) fail("\nthe stream ended without an answer");
const f = final!;
process.stdout.write(
  `\n\nanswer: ${f.answer ?? "(none)"}${f.answer_text ? ` — ${f.answer_text}` : ""}` +
    `${f.fallback ? ` (recovered by fallback: ${f.fallback})` : ""}\nformat_ok: ${f.format_ok}  finish: ${f.finish_reason}  ` +
    `tokens: ${(f.usage as { completion_tokens: number }).completion_tokens}\n`,
);

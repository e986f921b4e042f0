/**
 * Child: a proxy for the edge isolate's memory — in Node's V8, the heap growth from what the worker does on
 * its first /v1/vqa: the bundled tokenizer text (a module string in the worker), JSON.parse, and
 * `new Tokenizer(...)` from @huggingface/tokenizers, plus one encode. workerd's isolate is a different V8
 * embedding, so these are proxies, not the isolate's own numbers.
 */
import { readFileSync } from "node:fs";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { Tokenizer } from "@huggingface/tokenizers";
import { childArgs, childDone, childMain } from "../lib/common.ts";

export interface TokenizerHeapResult {
  text_bytes: number;
  /** heapUsed + external + arrayBuffers deltas over the baseline, bytes */
  after_text: number;
  after_parse: number;
  after_tokenizer: number;
  /** tokenizer + module text kept, parsed JSON dropped (what the worker holds after its first request) */
  retained: number;
  rss_delta: number;
  construct_ms: number;
  first_encode_ms: number;
  second_encode_ms: number;
  peak_rss_bytes: number;
}

function gcFn(): () => void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return g;
  setFlagsFromString("--expose-gc");
  return runInNewContext("gc") as () => void;
}

childMain(async () => {
  const { file, sample } = childArgs<{ file: string; sample: string }>();
  const gc = gcFn();
  const used = () => {
    for (let i = 0; i < 3; i++) gc();
    const m = process.memoryUsage();
    return { heap: m.heapUsed + m.external + m.arrayBuffers, rss: m.rss };
  };
  const base = used();
  let text: string | null = readFileSync(file, "utf8");
  const afterText = used();
  let json: unknown = JSON.parse(text);
  const afterParse = used();
  const t0 = performance.now();
  const tok = new Tokenizer(json as Record<string, unknown>, { clean_up_tokenization_spaces: false });
  const constructMs = performance.now() - t0;
  const t1 = performance.now();
  tok.encode(sample, { add_special_tokens: false });
  const firstEncodeMs = performance.now() - t1;
  const t2 = performance.now();
  const ids = tok.encode(sample, { add_special_tokens: false }).ids;
  const secondEncodeMs = performance.now() - t2;
  const afterTok = used();
  json = null;
  const retained = used();
  const textBytes = Buffer.byteLength(text);
  text = text.length ? text : null; // keep the module string alive until here, like the worker does
  if (ids.length === 0) throw new Error("empty encoding");
  childDone({
    text_bytes: textBytes,
    after_text: afterText.heap - base.heap,
    after_parse: afterParse.heap - base.heap,
    after_tokenizer: afterTok.heap - base.heap,
    retained: retained.heap - base.heap,
    rss_delta: retained.rss - base.rss,
    construct_ms: constructMs,
    first_encode_ms: firstEncodeMs,
    second_encode_ms: secondEncodeMs,
  });
});

/**
 * Child: a proxy for the edge isolate's memory — in Node's V8, the heap growth from what the worker does on
 * its first /v1/vqa: the bundled tokenizer tables (edge/generated/tokenizer.bin, an ArrayBuffer module in the
 * worker), `deserializeBpe` + `new BpeTokenizer`, plus one encode. workerd's isolate is a different V8
 * embedding, so these are proxies, not the isolate's own numbers.
 */
import { readFileSync } from "node:fs";
import { BpeTokenizer, deserializeBpe } from "../../shared/src/tokenizer/index.ts";
import { childArgs, childDone, childMain, memoryAfterGc } from "../lib/common.ts";

export interface TokenizerHeapResult {
  /** size of the bundled tables */
  bundle_bytes: number;
  /** heapUsed + external (ArrayBuffers included) deltas over the baseline, bytes */
  after_bundle: number;
  after_tokenizer: number;
  /** after two encodes (regexes compiled, piece cache filled) */
  after_encode: number;
  rss_delta: number;
  construct_ms: number;
  first_encode_ms: number;
  second_encode_ms: number;
  peak_rss_bytes: number;
}

childMain(async () => {
  const { file, sample } = childArgs<{ file: string; sample: string }>();
  const used = memoryAfterGc;
  const base = used();
  const bytes = new Uint8Array(readFileSync(file));
  const afterBundle = used();
  const t0 = performance.now();
  const tok = new BpeTokenizer(deserializeBpe(bytes));
  const constructMs = performance.now() - t0;
  const afterTok = used();
  const t1 = performance.now();
  tok.encode(sample);
  const firstEncodeMs = performance.now() - t1;
  const t2 = performance.now();
  const ids = tok.encode(sample);
  const secondEncodeMs = performance.now() - t2;
  const afterEncode = used();
  if (ids.length === 0) throw new Error("empty encoding");
  childDone({
    bundle_bytes: bytes.byteLength,
    after_bundle: afterBundle.heap - base.heap,
    after_tokenizer: afterTok.heap - base.heap,
    after_encode: afterEncode.heap - base.heap,
    rss_delta: afterEncode.rss - base.rss,
    construct_ms: constructMs,
    first_encode_ms: firstEncodeMs,
    second_encode_ms: secondEncodeMs,
  });
});

/**
 * Child: one vision encoder graph on one image size, as the engine opens it: a warm-up run, then `runs` timed
 * runs; the features of the last run are written to `featuresFile` (raw bytes of the graph's float type) so
 * that the suite can compare two graphs. One size per child, so that the peak RSS is this size's.
 */
import { writeFileSync } from "node:fs";
import * as ort from "onnxruntime-node";
import { sessionOptions } from "../../gpu-backend/src/engine/model.ts";
import { float16Bytes } from "../../gpu-backend/src/convert/common.ts";
import { childArgs, childDone, childMain } from "../lib/common.ts";

export interface VisionArgs {
  graph: string;
  /** Patch rows: grid [1, side, side]. */
  side: number;
  /** Values per patch row (channels × temporal patch × patch²). */
  patchDim: number;
  floatType: "float32" | "float16";
  runs: number;
  threads: number;
  featuresFile: string;
}

export interface VisionRun {
  patches: number;
  ms: number[];
  /** RSS after the session was created, bytes. */
  load_rss_bytes: number;
  /** RSS after the timed runs (ONNX Runtime's arena keeps its peak). */
  rss_after_bytes: number;
  peak_rss_bytes: number;
}

/** Deterministic values in the normalized pixel range (the encoder's cost does not depend on them). */
function pixelValues(n: number): Float32Array {
  const v = new Float32Array(n);
  let x = 12345;
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    v[i] = (x / 2 ** 32) * 3.9 - 1.8;
  }
  return v;
}

childMain(async () => {
  const a = childArgs<VisionArgs>();
  const session = await ort.InferenceSession.create(a.graph, sessionOptions({ intraOpThreads: a.threads }));
  const loadRss = process.memoryUsage().rss;
  const patches = a.side * a.side;
  const values = pixelValues(patches * a.patchDim);
  const pixels =
    a.floatType === "float16"
      ? new ort.Tensor("float16", new Uint16Array(float16Bytes(values).buffer), [patches, a.patchDim])
      : new ort.Tensor("float32", values, [patches, a.patchDim]);
  const feeds = { pixel_values: pixels, grid_thw: new ort.Tensor("int64", BigInt64Array.from([1n, BigInt(a.side), BigInt(a.side)]), [1, 3]) };
  await session.run(feeds);
  const ms: number[] = [];
  let features: ort.Tensor | undefined;
  for (let i = 0; i < a.runs; i++) {
    const t0 = performance.now();
    features = (await session.run(feeds))["image_features"];
    ms.push(performance.now() - t0);
  }
  const data = features!.data as Float32Array | Uint16Array;
  writeFileSync(a.featuresFile, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  const run: Omit<VisionRun, "peak_rss_bytes"> = { patches, ms, load_rss_bytes: loadRss, rss_after_bytes: process.memoryUsage().rss };
  childDone({ ...run });
});

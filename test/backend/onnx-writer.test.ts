import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import {
  GraphBuildError,
  GraphBuilder,
  OnnxSpecError,
  ProtoMessage,
  ProtobufEncodeError,
  encodeAttribute,
  writeModel,
} from "../../gpu-backend/src/onnx/index.ts";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const tmp = mkdtempSync(join(tmpdir(), "onnx-writer-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("protobuf wire encoding", () => {
  it("encodes the protobuf documentation's examples", async () => {
    expect(hex(await new ProtoMessage().varint(1, 150).toBytes())).toBe("089601");
    expect(hex(await new ProtoMessage().string(2, "testing").toBytes())).toBe("120774657374696e67");
    expect(hex(await new ProtoMessage().packedVarints(4, [3, 270, 86942]).toBytes())).toBe("2206038e029ea705");
    // Embedded message: field 3 { field 1: 150 }
    expect(hex(await new ProtoMessage().message(3, new ProtoMessage().varint(1, 150)).toBytes())).toBe("1a03089601");
  });

  it("writes negative int64 as 10-byte two's complement and floats as fixed32", async () => {
    expect(hex(await new ProtoMessage().varint(3, -1).toBytes())).toBe("18ffffffffffffffffff01");
    expect(hex(await new ProtoMessage().varint(3, -2n).toBytes())).toBe("18feffffffffffffffff01");
    expect(hex(await new ProtoMessage().varint(1, 2n ** 63n - 1n).toBytes())).toBe("08ffffffffffffffff7f");
    expect(hex(await new ProtoMessage().float(2, 1.5).toBytes())).toBe("150000c03f");
  });

  it("rejects values it cannot encode", () => {
    expect(() => new ProtoMessage().varint(1, 0.5)).toThrow(ProtobufEncodeError);
    expect(() => new ProtoMessage().varint(1, 2n ** 64n)).toThrow(/range/);
    expect(() => new ProtoMessage().varint(0, 1)).toThrow(/field number/);
  });

  it("keeps deferred payloads deferred and checks their length", async () => {
    let reads = 0;
    const payload = new Uint8Array(10_000).fill(7);
    const m = new ProtoMessage().varint(1, 5).bytes(2, { byteLength: payload.length, read: () => (reads++, payload) });
    const outer = new ProtoMessage().message(9, m).varint(3, 1);
    expect(reads).toBe(0);
    // outer: tag 9/LEN (1) + length 10005 (2) + inner [0805, tag 12, length 10000 (2), payload] + 1803
    expect(outer.byteLength).toBe(1 + 2 + (2 + 1 + 2 + payload.length) + 2);
    const bytes = await outer.toBytes();
    expect(reads).toBe(1);
    expect(bytes.length).toBe(outer.byteLength);
    expect(hex(bytes.subarray(0, 8))).toBe("4a954e080512904e");
    expect(bytes[8]).toBe(7);
    expect(hex(bytes.subarray(bytes.length - 2))).toBe("1801");
    const bad = new ProtoMessage().bytes(1, { byteLength: 4, read: () => new Uint8Array(3) });
    await expect(bad.toBytes()).rejects.toThrow(/promised 4/);
  });
});

describe("ONNX messages", () => {
  it("types attributes explicitly", async () => {
    // name "axis", i = -1, type INT(2)
    expect(hex(await encodeAttribute("axis", -1).toBytes())).toBe("0a0461786973" + "18ffffffffffffffffff01" + "a00102");
    // f = 0.5 (fixed32), type FLOAT(1)
    expect(hex(await encodeAttribute("alpha", { float: 0.5 }).toBytes())).toBe("0a05616c706861" + "150000003f" + "a00101");
    expect(() => encodeAttribute("alpha", 0.5)).toThrow(OnnxSpecError);
  });
});

/** y = softmax(LeakyRelu(x·W + b), axis=-1) and z = Cast(ArgMax(y)) — attributes of every kind ORT must parse. */
function tinyModel(weights: Float32Array, deferredReads?: { n: number }) {
  const g = new GraphBuilder("tiny");
  const x = g.input("x", "float32", ["batch", 3]);
  const wBytes = new Uint8Array(weights.buffer.slice(0));
  const w = g.initializer("fc.weight", "float32", [3, 4], deferredReads
    ? { byteLength: wBytes.length, read: () => (deferredReads.n++, wBytes) }
    : wBytes);
  const b = g.initializer("fc.bias", "float32", [4], new Uint8Array(Float32Array.from([0.1, -0.2, 0.3, 0]).buffer));
  const h = g.within("fc", () => g.op("Add", [g.op("MatMul", [x, w]), b]));
  const a = g.op("LeakyRelu", [h], { alpha: { float: 0.25 } });
  const y = g.op("Softmax", [a], { axis: -1 });
  const am = g.op("ArgMax", [y], { axis: 1, keepdims: 0 });
  const s = g.op("Slice", [y, g.i64([0]), g.i64([2]), g.i64([-1])]);
  g.output(y, "y", "float32", ["batch", 4]);
  g.output(am, "z", "int64", ["batch"]);
  g.output(s, "first2", "float32", ["batch", 2]);
  return g.model();
}

function reference(x: number[][], w: Float32Array) {
  const bias = [0.1, -0.2, 0.3, 0];
  return x.map((row) => {
    const h = [0, 1, 2, 3].map((j) => row.reduce((s, xi, i) => s + xi * w[i * 4 + j]!, 0) + bias[j]!);
    const a = h.map((v) => (v >= 0 ? v : 0.25 * v));
    const m = Math.max(...a);
    const e = a.map((v) => Math.exp(v - m));
    const sum = e.reduce((p, q) => p + q, 0);
    return e.map((v) => v / sum);
  });
}

async function runTiny(path: string, x: number[][]) {
  const sess = await ort.InferenceSession.create(path);
  try {
    const out = await sess.run({ x: new ort.Tensor("float32", Float32Array.from(x.flat()), [x.length, 3]) });
    return { y: out.y!.data as Float32Array, z: out.z!.data as BigInt64Array, first2: out.first2!.data as Float32Array, dims: out.y!.dims };
  } finally {
    await sess.release();
  }
}

describe("tiny graph through onnxruntime", () => {
  const w = Float32Array.from({ length: 12 }, (_, i) => Math.sin(i + 1));
  const x = [
    [1, 2, 3],
    [-1, 0.5, 2],
  ];
  const ref = reference(x, w);

  it("runs an inline model and matches a hand computation", async () => {
    const path = join(tmp, "tiny.onnx");
    const res = await writeModel(path, tinyModel(w));
    expect(res.dataPath).toBeUndefined();
    expect(statSync(path).size).toBe(res.modelBytes);
    const out = await runTiny(path, x);
    expect(out.dims).toEqual([2, 4]);
    for (let r = 0; r < 2; r++) {
      for (let j = 0; j < 4; j++) expect(out.y[r * 4 + j]).toBeCloseTo(ref[r]![j]!, 6);
      const argmax = ref[r]!.indexOf(Math.max(...ref[r]!));
      expect(Number(out.z[r])).toBe(argmax);
      expect(out.first2[r * 2]).toBeCloseTo(ref[r]![0]!, 6);
    }
  });

  it("writes external data (aligned, streamed once per tensor) that onnxruntime loads", async () => {
    const dir = mkdtempSync(join(tmp, "ext-"));
    const path = join(dir, "tiny.onnx");
    const reads = { n: 0 };
    const progress: [number, number][] = [];
    const res = await writeModel(path, tinyModel(w, reads), {
      externalData: true,
      externalMinBytes: 16,
      align: 64,
      onProgress: (done, total) => progress.push([done, total]),
    });
    expect(reads.n).toBe(1);
    // Progress only grows, and the last report is complete even though the int64 constants stay inline.
    const total = progress[0]![1];
    expect(progress.map(([d]) => d)).toEqual([...progress.map(([d]) => d)].sort((a, b) => a - b));
    expect(progress.at(-1)).toEqual([total, total]);
    expect(progress.at(-2)![0]).toBeLessThan(total);
    expect(res.dataPath).toBe(`${path}_data`);
    // fc.weight (48 B) at 0, fc.bias (16 B) at 64; the int64 Slice constants (8 B) stay inline.
    expect(res.dataBytes).toBe(64 + 16);
    const data = readFileSync(res.dataPath!);
    expect(new Float32Array(data.buffer, data.byteOffset, 12)).toEqual(w);
    expect(new Float32Array(data.buffer, data.byteOffset + 64, 4)[1]).toBeCloseTo(-0.2, 7);
    const model = readFileSync(path);
    expect(model.includes(Buffer.from("tiny.onnx_data"))).toBe(true);
    const out = await runTiny(path, x);
    for (let j = 0; j < 4; j++) expect(out.y[j]).toBeCloseTo(ref[0]![j]!, 6);
  });

  it("a second graph can point into the first one's external data instead of writing its own", async () => {
    const dir = mkdtempSync(join(tmp, "share-"));
    const first = await writeModel(join(dir, "a.onnx"), tinyModel(w), { externalData: true, externalMinBytes: 16, align: 64 });
    const reads = { n: 0 };
    const second = await writeModel(join(dir, "b.onnx"), tinyModel(w, reads), { shareDataOf: first, externalMinBytes: 16 });
    expect(reads.n).toBe(0); // its weights were not produced again
    expect(second).toMatchObject({ dataPath: first.dataPath, dataBytes: 0 });
    expect(existsSync(join(dir, "b.onnx_data"))).toBe(false);
    expect(readFileSync(join(dir, "b.onnx")).includes(Buffer.from("a.onnx_data"))).toBe(true);
    const out = await runTiny(join(dir, "b.onnx"), x);
    for (let j = 0; j < 4; j++) expect(out.y[j]).toBeCloseTo(ref[0]![j]!, 6);
  });

  it("auto mode stays inline below the limit and goes external above it", async () => {
    const res = await writeModel(join(tmp, "auto.onnx"), tinyModel(w), { externalData: "auto" });
    expect(res.dataBytes).toBe(0);
    const dir = mkdtempSync(join(tmp, "auto-"));
    const big = await writeModel(join(dir, "tiny.onnx"), tinyModel(w), { externalData: "auto", inlineLimitBytes: 100, externalMinBytes: 16 });
    expect(big.dataPath).toBe(join(dir, "tiny.onnx_data"));
    const out = await runTiny(join(dir, "tiny.onnx"), x);
    for (let j = 0; j < 4; j++) expect(out.y[j]).toBeCloseTo(ref[0]![j]!, 6);
  });
});

describe("subgraphs (a Loop body)", () => {
  /** y[i] = x · (i + 1) · w for i < n, stacked: the body reads x and w from the outer graph. */
  function loopModel() {
    const g = new GraphBuilder("loop");
    const x = g.input("x", "float32", [2]);
    const n = g.input("n", "int64", []);
    const w = g.initializer("w", "float32", [2], new Uint8Array(Float32Array.from([10, -1]).buffer));
    const body = g.subgraph("body");
    const i = body.input("i", "int64", []);
    const cond = body.input("cond", "bool", []);
    const scale = body.op("Cast", [body.op("Add", [i, body.i64Scalar(1)])], { to: 1 });
    body.output(cond, "cond_out", "bool", []);
    body.output(body.op("Mul", [body.op("Mul", [x, w]), scale]), "row", "float32", [2]);
    const y = g.op("Loop", [n, ""], { body: { graph: body.build() } });
    g.output(y, "y", "float32", ["n", 2]);
    return { g, body };
  }

  it("a Loop whose body reads outer values runs in onnxruntime", async () => {
    const path = join(tmp, "loop.onnx");
    await writeModel(path, loopModel().g.model());
    const sess = await ort.InferenceSession.create(path);
    try {
      const out = await sess.run({ x: new ort.Tensor("float32", Float32Array.from([1, 2]), [2]), n: new ort.Tensor("int64", BigInt64Array.from([3n]), []) });
      expect(out.y!.dims).toEqual([3, 2]);
      expect(Array.from(out.y!.data as Float32Array)).toEqual([10, -2, 20, -4, 30, -6]);
    } finally {
      await sess.release();
    }
  });

  it("body constants live in the outer graph; names are unique across scopes; body values stay inside", () => {
    const { g, body } = loopModel();
    expect(body.initializers).toEqual([]);
    expect(g.initializers.map((t) => t.name)).toContain(body.i64Scalar(1));
    expect(body.i64Scalar(1)).toBe(g.i64Scalar(1));
    expect(body.has("x") && body.has("w")).toBe(true);
    expect(g.has("i")).toBe(false);
    expect(() => g.op("Neg", ["i"])).toThrow(/unknown input i/);
    expect(() => body.input("x", "float32", [2])).toThrow(/defined twice/);
    expect(() => g.input("cond", "bool", [])).toThrow(/defined twice/);
  });
});

describe("graph builder errors", () => {
  it("names the node with an unknown input", () => {
    const g = new GraphBuilder("g");
    g.input("a", "float32", [1]);
    expect(() => g.within("blk", () => g.op("Add", ["a", "nope"]))).toThrow(/\/blk\/Add.*unknown input nope/);
    expect(() => g.op("Add", ["a", "nope"])).toThrow(GraphBuildError);
  });
  it("rejects duplicate tensor names and wrong initializer sizes", () => {
    const g = new GraphBuilder("g");
    g.input("a", "float32", [1]);
    expect(() => g.input("a", "float32", [1])).toThrow(/defined twice/);
    expect(() => g.initializer("w", "float32", [2, 2], new Uint8Array(12))).toThrow(/expected 16/);
    expect(() => g.build()).toThrow(/no outputs/);
  });
  it("deduplicates constants and unique-ifies node names", () => {
    const g = new GraphBuilder("g");
    expect(g.i64([1, 2])).toBe(g.i64([1, 2]));
    expect(g.i64([1, 2])).not.toBe(g.i64([2, 1]));
    g.input("a", "float32", [1]);
    const o1 = g.op("Neg", ["a"]);
    const o2 = g.op("Neg", ["a"]);
    expect(o1).not.toBe(o2);
    expect(new Set(g.nodes.map((n) => n.name)).size).toBe(2);
  });
});

/**
 * A small graph builder over the ONNX specs: values are tensor names (strings), nodes are appended in
 * topological order, every input must already exist when a node uses it (caught at build time, with
 * the node's name), initializer names are unique, and small constants are deduplicated.
 */
import type { DeferredBytes } from "./protobuf.ts";
import {
  type AttrValue,
  type Dim,
  type ElemType,
  type GraphSpec,
  type ModelSpec,
  type NodeSpec,
  type TensorSpec,
  type ValueInfoSpec,
  tensorByteLength,
} from "./model.ts";
import { NamedError } from "../../../shared/src/errors.ts";

/** A tensor in the graph, by name. */
export type Value = string;

/** Options of one node. */
export interface NodeOptions {
  /** Operator domain ("" = ONNX, "com.microsoft" = ORT contrib). */
  domain?: string;
  /** Number of outputs (default 1) or their explicit names. */
  outputs?: number | string[];
  /** Node name; default `<scope>/<opType>` made unique. */
  name?: string;
}

/** Thrown when the graph being built is inconsistent (unknown input, duplicate name, ...). */
export class GraphBuildError extends NamedError {}

function typedBytes(type: ElemType, values: ArrayLike<number | bigint>): Uint8Array {
  switch (type) {
    case "float32":
      return new Uint8Array(Float32Array.from(values as ArrayLike<number>).buffer);
    case "double":
      return new Uint8Array(Float64Array.from(values as ArrayLike<number>).buffer);
    case "int64":
      return new Uint8Array(BigInt64Array.from(Array.from(values, (v) => BigInt(v))).buffer);
    case "int32":
      return new Uint8Array(Int32Array.from(values as ArrayLike<number>).buffer);
    case "uint8":
    case "bool":
      return Uint8Array.from(values as ArrayLike<number>);
    case "int8":
      return new Uint8Array(Int8Array.from(values as ArrayLike<number>).buffer);
    case "float16":
      throw new GraphBuildError("float16 constants: pass the bytes (see convert/tensor-data.ts float16Bytes)");
  }
}

/** Names shared by a graph and its subgraphs: ONNX forbids a subgraph to redefine an outer name. */
interface Names {
  readonly tensors: Set<string>;
  readonly nodes: Set<string>;
  readonly constants: Map<string, Value>;
  constCount: number;
}

/** Builds a GraphSpec. */
export class GraphBuilder {
  readonly nodes: NodeSpec[] = [];
  readonly inputs: ValueInfoSpec[] = [];
  readonly outputs: ValueInfoSpec[] = [];
  readonly initializers: TensorSpec[] = [];
  /** Tensors defined in this graph (not in its outer graphs or subgraphs). */
  private readonly local = new Set<string>();
  private readonly names: Names;
  private readonly scopes: string[];

  /**
   * @param parent for a subgraph (a `Loop` body): the graph whose values it may read. Its initializers
   *   (constants included) are added to the outermost graph, which subgraphs see as outer scope.
   */
  constructor(
    readonly name: string,
    private readonly parent?: GraphBuilder,
  ) {
    this.names = parent?.names ?? { tensors: new Set(), nodes: new Set(), constants: new Map(), constCount: 0 };
    this.scopes = parent ? [...parent.scopes] : [];
  }

  private define(name: string, what: string): void {
    if (!name) throw new GraphBuildError(`${what}: empty tensor name`);
    if (this.names.tensors.has(name)) throw new GraphBuildError(`${what}: tensor name ${name} is defined twice`);
    this.names.tensors.add(name);
    this.local.add(name);
  }

  /** Whether a tensor of this name is visible here (defined in this graph or an outer one). */
  has(name: string): boolean {
    return this.local.has(name) || (this.parent?.has(name) ?? false);
  }

  /** A builder for a subgraph of this graph (see the constructor's `parent`). */
  subgraph(name: string): GraphBuilder {
    return new GraphBuilder(name, this);
  }

  /** Current scope prefix, e.g. `/model/layers.0/self_attn`. */
  get scope(): string {
    return this.scopes.length ? `/${this.scopes.join("/")}` : "";
  }

  /** Runs `fn` with `part` appended to the node-name scope (mirrors the module path). */
  within<T>(part: string, fn: () => T): T {
    this.scopes.push(part);
    try {
      return fn();
    } finally {
      this.scopes.pop();
    }
  }

  /** Declares a graph input. */
  input(name: string, type: ElemType, shape: Dim[]): Value {
    this.define(name, "graph input");
    this.inputs.push({ name, type, shape });
    return name;
  }

  /** Declares a graph output named `name` carrying `value` (an Identity is inserted if names differ). */
  output(value: Value, name: string, type: ElemType, shape: Dim[] | null): Value {
    if (!this.has(value)) throw new GraphBuildError(`graph output ${name}: unknown value ${value}`);
    let v = value;
    if (value !== name) {
      const [out] = this.node("Identity", [value], {}, { outputs: [name], name: `/${name}/Identity` });
      v = out!;
    }
    this.outputs.push({ name: v, type, shape });
    return v;
  }

  /** Adds a named initializer (weights); a subgraph's go to the outermost graph. */
  initializer(name: string, type: ElemType, dims: number[], data: Uint8Array | DeferredBytes): Value {
    if (this.parent) return this.parent.initializer(name, type, dims, data);
    this.define(name, "initializer");
    const expected = tensorByteLength(type, dims);
    if (data.byteLength !== expected) {
      throw new GraphBuildError(`initializer ${name}: ${data.byteLength} bytes for ${type}[${dims.join(",")}], expected ${expected}`);
    }
    this.initializers.push({ name, type, dims, data });
    return name;
  }

  /** A small constant initializer, deduplicated by type/shape/value. `dims` defaults to 1-D. */
  constant(type: ElemType, values: ArrayLike<number | bigint>, dims?: number[]): Value {
    const shape = dims ?? [values.length];
    const key = `${type}|${shape.join(",")}|${Array.from(values, String).join(",")}`;
    const hit = this.names.constants.get(key);
    if (hit) return hit;
    const name = `/const/${type}_${this.names.constCount++}`;
    this.initializer(name, type, shape, typedBytes(type, values));
    this.names.constants.set(key, name);
    return name;
  }

  /** Constant from raw bytes (e.g. float16), deduplicated by content. */
  constantBytes(type: ElemType, bytes: Uint8Array, dims: number[]): Value {
    const key = `${type}|${dims.join(",")}|bytes:${Buffer.from(bytes).toString("base64")}`;
    const hit = this.names.constants.get(key);
    if (hit) return hit;
    const name = `/const/${type}_${this.names.constCount++}`;
    this.initializer(name, type, dims, bytes);
    this.names.constants.set(key, name);
    return name;
  }

  /** int64 1-D constant. */
  i64(values: number[]): Value {
    return this.constant("int64", values);
  }

  /** int64 scalar constant. */
  i64Scalar(value: number): Value {
    return this.constant("int64", [value], []);
  }

  /** float32 scalar constant. */
  f32Scalar(value: number): Value {
    return this.constant("float32", [value], []);
  }

  /** Appends a node; returns its output names. */
  node(opType: string, inputs: Value[], attributes: Record<string, AttrValue> = {}, opts: NodeOptions = {}): Value[] {
    let name = opts.name ?? `${this.scope}/${opType}`;
    if (this.names.nodes.has(name)) {
      let i = 1;
      while (this.names.nodes.has(`${name}_${i}`)) i++;
      name = `${name}_${i}`;
    }
    this.names.nodes.add(name);
    for (const i of inputs) {
      if (i !== "" && !this.has(i)) throw new GraphBuildError(`node ${name} (${opType}): unknown input ${i}`);
    }
    const outs = Array.isArray(opts.outputs)
      ? opts.outputs
      : Array.from({ length: opts.outputs ?? 1 }, (_, k) => `${name}_output_${k}`);
    for (const o of outs) this.define(o, `node ${name}`);
    const spec: NodeSpec = { opType, inputs, outputs: outs, name, attributes };
    if (opts.domain) spec.domain = opts.domain;
    this.nodes.push(spec);
    return outs;
  }

  /** Appends a single-output node; returns its output. */
  op(opType: string, inputs: Value[], attributes: Record<string, AttrValue> = {}, opts: Omit<NodeOptions, "outputs"> = {}): Value {
    return this.node(opType, inputs, attributes, opts)[0]!;
  }

  /** The finished graph. Throws if it has no outputs. */
  build(docString?: string): GraphSpec {
    if (this.outputs.length === 0) throw new GraphBuildError(`graph ${this.name} has no outputs`);
    const g: GraphSpec = {
      name: this.name,
      nodes: this.nodes,
      inputs: this.inputs,
      outputs: this.outputs,
      initializers: this.initializers,
    };
    if (docString) g.docString = docString;
    return g;
  }

  /** The finished model with the given opsets (default: ONNX 17 and, if used, com.microsoft 1). */
  model(opts: { opset?: number; producerVersion?: string; docString?: string; metadata?: Record<string, string> } = {}): ModelSpec {
    const graph = this.build();
    const opsetImports = [{ domain: "", version: opts.opset ?? DEFAULT_OPSET }];
    if (graph.nodes.some((n) => n.domain === "com.microsoft")) opsetImports.push({ domain: "com.microsoft", version: 1 });
    const m: ModelSpec = {
      graph,
      opsetImports,
      irVersion: IR_VERSION,
      producerName: "medvlm-r1-serving convert",
    };
    if (opts.producerVersion) m.producerVersion = opts.producerVersion;
    if (opts.docString) m.docString = opts.docString;
    if (opts.metadata) m.metadata = opts.metadata;
    return m;
  }
}

/** ONNX opset of the default domain written by the converter (LayerNormalization needs 17). */
export const DEFAULT_OPSET = 17;
/** IR version matching opset 17 (ONNX 1.12). */
export const IR_VERSION = 8;

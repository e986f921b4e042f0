/**
 * ONNX messages (onnx/onnx.proto, proto2) as plain objects, and their protobuf encoding.
 * Field numbers are those of onnx.proto; only the fields this project writes are covered:
 * ModelProto, OperatorSetIdProto, GraphProto, NodeProto, AttributeProto, TensorProto (raw or external
 * data), ValueInfoProto / TypeProto.Tensor / TensorShapeProto, StringStringEntryProto.
 */
import { type DeferredBytes, ProtoMessage } from "./protobuf.ts";
import { NamedError } from "../../../shared/src/errors.ts";

/** Element types used by the converter, by their ONNX TensorProto.DataType code. */
export const ELEM_TYPES = {
  float32: { code: 1, bytes: 4 },
  uint8: { code: 2, bytes: 1 },
  int8: { code: 3, bytes: 1 },
  int32: { code: 6, bytes: 4 },
  int64: { code: 7, bytes: 8 },
  bool: { code: 9, bytes: 1 },
  float16: { code: 10, bytes: 2 },
  double: { code: 11, bytes: 8 },
} as const;

/** Tensor element type name. */
export type ElemType = keyof typeof ELEM_TYPES;

/** A dimension: fixed size or a symbolic name (e.g. "batch_size"). */
export type Dim = number | string;

/** Tensor data (initializer or attribute tensor); `data` holds the raw little-endian bytes. */
export interface TensorSpec {
  name: string;
  type: ElemType;
  dims: number[];
  data: Uint8Array | DeferredBytes;
}

/** A graph input/output/value_info: name, element type and (optional) shape. */
export interface ValueInfoSpec {
  name: string;
  type: ElemType;
  /** `null` = rank unknown. */
  shape: Dim[] | null;
}

/**
 * Attribute values. A plain number is an INT (must be an integer); floats are written `{ float: x }`
 * so that `1` vs `1.0` is never guessed.
 */
export type AttrValue =
  | number
  | string
  | number[]
  | string[]
  | { float: number }
  | { floats: number[] }
  | { tensor: TensorSpec }
  | { graph: GraphSpec };

/** One node. `domain` empty = the default ONNX domain. Empty input name = omitted optional input. */
export interface NodeSpec {
  opType: string;
  inputs: string[];
  outputs: string[];
  name?: string;
  domain?: string;
  attributes?: Record<string, AttrValue>;
}

/** A graph. */
export interface GraphSpec {
  name: string;
  nodes: NodeSpec[];
  inputs: ValueInfoSpec[];
  outputs: ValueInfoSpec[];
  initializers: TensorSpec[];
  valueInfo?: ValueInfoSpec[];
  docString?: string;
}

/** A model: graph plus opset imports and producer metadata. */
export interface ModelSpec {
  graph: GraphSpec;
  opsetImports: Array<{ domain: string; version: number }>;
  irVersion: number;
  producerName?: string;
  producerVersion?: string;
  docString?: string;
  metadata?: Record<string, string>;
}

/** Where an initializer's bytes live when stored outside the .onnx file. */
export interface ExternalRef {
  /** Path relative to the .onnx file's folder. */
  location: string;
  offset: number;
  length: number;
}

/** Thrown for a spec that cannot be encoded (bad attribute, data length not matching dims, ...). */
export class OnnxSpecError extends NamedError {}

/** Bytes a tensor of this type and shape occupies. */
export function tensorByteLength(type: ElemType, dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) {
    if (!Number.isInteger(d) || d < 0) throw new OnnxSpecError(`bad tensor dim ${d} in [${dims.join(", ")}]`);
    n *= d;
  }
  return n * ELEM_TYPES[type].bytes;
}

function stringEntry(key: string, value: string): ProtoMessage {
  return new ProtoMessage().string(1, key).string(2, value);
}

/** TensorProto. With `external`, the bytes are referenced instead of embedded (data_location EXTERNAL). */
export function encodeTensor(t: TensorSpec, external?: ExternalRef): ProtoMessage {
  const expected = tensorByteLength(t.type, t.dims);
  if (t.data.byteLength !== expected) {
    throw new OnnxSpecError(`tensor ${t.name}: ${t.data.byteLength} bytes for ${t.type}[${t.dims.join(",")}], expected ${expected}`);
  }
  const m = new ProtoMessage();
  m.packedVarints(1, t.dims); // dims
  m.varint(2, ELEM_TYPES[t.type].code); // data_type
  m.string(8, t.name); // name
  if (external) {
    m.message(13, stringEntry("location", external.location)); // external_data
    m.message(13, stringEntry("offset", String(external.offset)));
    m.message(13, stringEntry("length", String(external.length)));
    m.varint(14, 1); // data_location = EXTERNAL
  } else {
    m.bytes(9, t.data); // raw_data
  }
  return m;
}

/** AttributeProto, with its `type` field (AttributeType enum). */
export function encodeAttribute(name: string, value: AttrValue): ProtoMessage {
  const m = new ProtoMessage().string(1, name);
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new OnnxSpecError(`attribute ${name}: ${value} is not an integer (write { float: ${value} })`);
    m.varint(3, value).varint(20, 2); // i, INT
  } else if (typeof value === "string") {
    m.string(4, value).varint(20, 3); // s, STRING
  } else if (Array.isArray(value)) {
    if (value.every((v): v is number => typeof v === "number")) {
      for (const v of value) {
        if (!Number.isSafeInteger(v)) throw new OnnxSpecError(`attribute ${name}: ${v} is not an integer`);
      }
      m.packedVarints(8, value).varint(20, 7); // ints, INTS
    } else if (value.every((v): v is string => typeof v === "string")) {
      for (const v of value) m.string(9, v);
      m.varint(20, 8); // strings, STRINGS
    } else {
      throw new OnnxSpecError(`attribute ${name}: mixed list`);
    }
  } else if ("float" in value) {
    m.float(2, value.float).varint(20, 1); // f, FLOAT
  } else if ("floats" in value) {
    m.packedFloats(7, value.floats).varint(20, 6); // floats, FLOATS
  } else if ("tensor" in value) {
    m.message(5, encodeTensor(value.tensor)).varint(20, 4); // t, TENSOR
  } else if ("graph" in value) {
    m.message(6, encodeGraph(value.graph)).varint(20, 5); // g, GRAPH (a Loop body; its constants live in the outer graph)
  } else {
    throw new OnnxSpecError(`attribute ${name}: unsupported value`);
  }
  return m;
}

/** NodeProto. */
export function encodeNode(n: NodeSpec): ProtoMessage {
  const m = new ProtoMessage();
  for (const i of n.inputs) m.string(1, i);
  for (const o of n.outputs) m.string(2, o);
  if (n.name) m.string(3, n.name);
  m.string(4, n.opType);
  for (const [k, v] of Object.entries(n.attributes ?? {})) m.message(5, encodeAttribute(k, v));
  if (n.domain) m.string(7, n.domain);
  return m;
}

/** ValueInfoProto with a tensor type (TypeProto.tensor_type) and optional shape. */
export function encodeValueInfo(v: ValueInfoSpec): ProtoMessage {
  const tensorType = new ProtoMessage().varint(1, ELEM_TYPES[v.type].code); // elem_type
  if (v.shape) {
    const shape = new ProtoMessage();
    for (const d of v.shape) {
      const dim = new ProtoMessage();
      if (typeof d === "number") dim.varint(1, d); // dim_value
      else dim.string(2, d); // dim_param
      shape.message(1, dim);
    }
    tensorType.message(2, shape);
  }
  const type = new ProtoMessage().message(1, tensorType); // TypeProto.tensor_type
  return new ProtoMessage().string(1, v.name).message(2, type);
}

/** GraphProto; initializers named in `external` are written as references. */
export function encodeGraph(g: GraphSpec, external?: ReadonlyMap<string, ExternalRef>): ProtoMessage {
  const m = new ProtoMessage();
  for (const n of g.nodes) m.message(1, encodeNode(n));
  m.string(2, g.name);
  for (const t of g.initializers) m.message(5, encodeTensor(t, external?.get(t.name)));
  if (g.docString) m.string(10, g.docString);
  for (const v of g.inputs) m.message(11, encodeValueInfo(v));
  for (const v of g.outputs) m.message(12, encodeValueInfo(v));
  for (const v of g.valueInfo ?? []) m.message(13, encodeValueInfo(v));
  return m;
}

/** ModelProto. */
export function encodeModel(model: ModelSpec, external?: ReadonlyMap<string, ExternalRef>): ProtoMessage {
  const m = new ProtoMessage();
  m.varint(1, model.irVersion);
  if (model.producerName) m.string(2, model.producerName);
  if (model.producerVersion) m.string(3, model.producerVersion);
  if (model.docString) m.string(6, model.docString);
  m.message(7, encodeGraph(model.graph, external));
  for (const op of model.opsetImports) m.message(8, new ProtoMessage().string(1, op.domain).varint(2, op.version));
  for (const [k, v] of Object.entries(model.metadata ?? {})) m.message(14, stringEntry(k, v));
  return m;
}

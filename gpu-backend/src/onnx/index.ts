/** Minimal hand-written ONNX writer: protobuf wire encoding, ONNX messages, a graph builder, a streaming file writer. */
export { type Chunk, type DeferredBytes, ProtoMessage, ProtobufEncodeError, deferredChunks, resolveDeferred } from "./protobuf.ts";
export {
  type AttrValue,
  type Dim,
  ELEM_TYPES,
  type ElemType,
  type ExternalRef,
  type GraphSpec,
  type ModelSpec,
  type NodeSpec,
  OnnxSpecError,
  type TensorSpec,
  type ValueInfoSpec,
  encodeAttribute,
  encodeGraph,
  encodeModel,
  encodeNode,
  encodeTensor,
  encodeValueInfo,
  tensorByteLength,
} from "./model.ts";
export { DEFAULT_OPSET, GraphBuildError, GraphBuilder, IR_VERSION, type NodeOptions, type Value } from "./graph.ts";
export { type WriteModelOptions, type WriteModelResult, writeModel } from "./write.ts";

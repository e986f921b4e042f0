/**
 * Checkpoint I/O for the Qwen2-VL → ONNX converter: safetensors reading/writing, config normalization,
 * the deterministic test-weight spec, model folder resolution (local or Hub) and the test-model writer.
 */
export {
  CheckpointError,
  CheckpointWeights,
  DTYPE_BYTES,
  MAX_HEADER_BYTES,
  SAFETENSORS_INDEX,
  bf16ToF32,
  canonicalTensorName,
  decodeToF32,
  f16ToF32,
  f32ToBf16,
  littleEndianBytes,
  numelOf,
  parseSafetensorsHeader,
  planSafetensors,
  readSafetensorsHeader,
  readSafetensorsHeaderFrom,
  writeSafetensors,
  type CheckpointErrorCode,
  type DType,
  type SafetensorsHeader,
  type SafetensorsLayout,
  type TensorInfo,
  type TensorSpec,
} from "./safetensors.ts";
export {
  QWEN2VL_ARCHITECTURE,
  TEXT_DEFAULTS,
  TOKEN_ID_DEFAULTS,
  VISION_DEFAULTS,
  parseQwen2VLConfig,
  readQwen2VLConfig,
  type Qwen2VLConfig,
} from "./config.ts";
export { Mulberry32, fnv1a32, qwen2vlTensorShapes, specRule, specTensor, specTensorChunks, type SpecRule, type TensorShape } from "./weights-spec.ts";
export { REQUIRED_FILES, isNeededHubFile, loadQwen2VLCheckpoint, missingCheckpointFiles, resolveModelDir, type LoadedCheckpoint, type ResolveOptions } from "./load.ts";
export {
  COPIED_FILES,
  DEFAULT_SHARD_BYTES,
  DEMO_MODEL_DIR,
  formatBytes,
  makeTestModel,
  planShards,
  qwen2vlTokenizerJson,
  type MakeTestModelOptions,
  type MakeTestModelResult,
  type ShardPlan,
} from "./make-test-model.ts";

/** Byte-level BPE tokenization shared by the edge (bundled tables) and the backend (compiled at load). */
export { BpeTokenizer } from "./bpe.ts";
export { byteLevelChars, compileBpe, translatePattern, TokenizerError, type AddedToken, type CompiledBpe, type TokenizerErrorCode } from "./compile.ts";
export { deserializeBpe, serializeBpe } from "./binary.ts";

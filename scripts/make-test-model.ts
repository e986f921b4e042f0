/**
 * Writes a deterministic Qwen2-VL test checkpoint (weights per shared/golden/WEIGHTS.md) for a config.json.
 *
 *   npx tsx scripts/make-test-model.ts --config <config.json> --out <folder> [--dtype f32|bf16] [--shard-size-mb N] [--overwrite]
 */
import { parseArgs } from "node:util";
import { CheckpointError } from "../gpu-backend/src/checkpoint/safetensors.ts";
import { formatBytes, makeTestModel } from "../gpu-backend/src/checkpoint/make-test-model.ts";

const USAGE =
  "usage: npx tsx scripts/make-test-model.ts --config <config.json> --out <folder> [--dtype f32|bf16] [--shard-size-mb N] [--overwrite]";

function fail(msg: string): never {
  process.stderr.write(`${msg}\n`);
  process.exit(2);
}

async function main(): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        config: { type: "string" },
        out: { type: "string" },
        dtype: { type: "string", default: "f32" },
        "shard-size-mb": { type: "string" },
        overwrite: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (e) {
    fail(`${(e as Error).message}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  if (!values.config || !values.out) fail(USAGE);
  const dtype = values.dtype;
  if (dtype !== "f32" && dtype !== "bf16") fail(`--dtype must be f32 or bf16, got ${dtype}\n${USAGE}`);
  let shardSizeBytes: number | undefined;
  if (values["shard-size-mb"] !== undefined) {
    const mb = Number(values["shard-size-mb"]);
    if (!(mb > 0)) fail(`--shard-size-mb must be a positive number, got ${values["shard-size-mb"]}`);
    shardSizeBytes = Math.floor(mb * 1e6); // HF's "MB" is 10^6 bytes
  }

  const tty = process.stderr.isTTY === true;
  let lastDraw = 0;
  const started = performance.now();
  try {
    const res = await makeTestModel({
      configPath: values.config,
      outDir: values.out,
      dtype,
      overwrite: values.overwrite,
      ...(shardSizeBytes !== undefined ? { shardSizeBytes } : {}),
      onProgress: tty
        ? (p) => {
            const now = performance.now();
            if (now - lastDraw < 100 && p.tensorsDone < p.tensorsTotal) return;
            lastDraw = now;
            const frac = p.bytesTotal > 0 ? p.bytesDone / p.bytesTotal : 1;
            const width = 30;
            const fill = Math.round(frac * width);
            const bar = "#".repeat(fill) + "-".repeat(width - fill);
            const line = `[${bar}] ${(frac * 100).toFixed(1).padStart(5)}% ${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)} ${p.tensorsDone}/${p.tensorsTotal} ${p.tensor}`;
            process.stderr.write(`\r${line.slice(0, (process.stderr.columns || 120) - 1)}\x1b[K`);
          }
        : undefined,
    });
    if (tty) process.stderr.write("\n");
    const rssMb = process.resourceUsage().maxRSS / 1024;
    const secs = (performance.now() - started) / 1000;
    process.stdout.write(
      `wrote ${res.outDir}: ${res.tensors} tensors, ${formatBytes(res.totalSize)} ${dtype} in ${res.weightFiles.length} file(s) ` +
        `(${res.weightFiles.join(", ")}), ${secs.toFixed(1)} s, peak RSS ${rssMb.toFixed(0)} MB\n`,
    );
  } catch (e) {
    if (tty) process.stderr.write("\n");
    if (e instanceof CheckpointError) {
      process.stderr.write(`error [${e.code}]: ${e.message}\n`);
      process.exit(1);
    }
    throw e;
  }
}

await main();

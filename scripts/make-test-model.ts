/**
 * Writes a deterministic Qwen2-VL test checkpoint (weights per shared/golden/WEIGHTS.md) for a config.json.
 *
 *   npx tsx scripts/make-test-model.ts --config <config.json> --out <folder> [--dtype f32|bf16] [--shard-size-mb N] [--overwrite]
 */
import { CheckpointError } from "../gpu-backend/src/checkpoint/safetensors.ts";
import { formatBytes, makeTestModel } from "../gpu-backend/src/checkpoint/make-test-model.ts";
import { type CliIO, parseCli, processIO, progressBar, type Usage, usageError } from "./lib/cli.ts";

const USAGE =
  "usage: npx tsx scripts/make-test-model.ts --config <config.json> --out <folder> [--dtype f32|bf16] [--shard-size-mb N] [--overwrite]";

/** Runs the script on `argv`; returns the exit status. */
async function main(argv: string[], io: CliIO = processIO): Promise<number> {
  const u: Usage = { text: USAGE, io };
  const values = parseCli(
    argv,
    {
      config: { type: "string" },
      out: { type: "string" },
      dtype: { type: "string", default: "f32" },
      "shard-size-mb": { type: "string" },
      overwrite: { type: "boolean", default: false },
    },
    u,
  );
  if (typeof values === "number") return values;
  if (!values.config || !values.out) return usageError(u, "--config and --out are required");
  const dtype = values.dtype;
  if (dtype !== "f32" && dtype !== "bf16") return usageError(u, `--dtype must be f32 or bf16, got ${dtype}`);
  let shardSizeBytes: number | undefined;
  if (values["shard-size-mb"] !== undefined) {
    const mb = Number(values["shard-size-mb"]);
    if (!(mb > 0)) return usageError(u, `--shard-size-mb must be a positive number, got ${values["shard-size-mb"]}`);
    shardSizeBytes = Math.floor(mb * 1e6); // HF's "MB" is 10^6 bytes
  }

  const bar = { lastDraw: 0 };
  let drew = false;
  const started = performance.now();
  try {
    const res = await makeTestModel({
      configPath: values.config,
      outDir: values.out,
      dtype,
      overwrite: values.overwrite,
      ...(shardSizeBytes !== undefined ? { shardSizeBytes } : {}),
      onProgress: io.isTTY
        ? (p) => {
            const frac = p.bytesTotal > 0 ? p.bytesDone / p.bytesTotal : 1;
            const label = `${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)} ${p.tensorsDone}/${p.tensorsTotal} ${p.tensor}`;
            drew = progressBar(io, frac, label, p.tensorsDone >= p.tensorsTotal, bar) || drew;
          }
        : undefined,
    });
    if (drew) io.stderr("\n");
    const rssMb = process.resourceUsage().maxRSS / 1024;
    const secs = (performance.now() - started) / 1000;
    io.stdout(
      `wrote ${res.outDir}: ${res.tensors} tensors, ${formatBytes(res.totalSize)} ${dtype} in ${res.weightFiles.length} file(s) ` +
        `(${res.weightFiles.join(", ")}), ${secs.toFixed(1)} s, peak RSS ${rssMb.toFixed(0)} MB\n`,
    );
    return 0;
  } catch (e) {
    if (drew) io.stderr("\n");
    if (e instanceof CheckpointError) {
      io.stderr(`error [${e.code}]: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}

process.exitCode = await main(process.argv.slice(2));

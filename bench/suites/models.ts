/** `models`: the full-size test checkpoint and its conversions, with time and peak RSS of each step. */
import { existsSync, rmSync } from "node:fs";
import { type BenchOptions, log, machineInfo, machineLine, table, writeResult } from "../lib/common.ts";
import { ensureModels, stepsTable } from "../lib/models.ts";

export async function modelsSuite(opts: BenchOptions): Promise<{ file: string; body: Record<string, unknown> }> {
  const machine = machineInfo();
  log(machineLine(machine));
  const r = await ensureModels(opts, opts.dtypes);
  process.stdout.write(`\nmodels (${r.size}, cache ${r.paths.root})\n${table(stepsTable(r.steps))}\n`);
  let checkpointDropped = false;
  if (opts.dropCheckpoint && opts.dtypes.every((d) => r.available[d]) && existsSync(r.paths.ckpt)) {
    rmSync(r.paths.ckpt, { recursive: true, force: true });
    checkpointDropped = true;
    log(`deleted the checkpoint ${r.paths.ckpt} (--drop-checkpoint); converting another dtype later rebuilds it`);
  }
  const body = { suite: "models", created: new Date().toISOString(), machine, options: opts, size: r.size, cache: r.paths.root, steps: r.steps, available: r.available, checkpoint_dropped: checkpointDropped };
  const file = writeResult(opts, "models", body);
  return { file, body };
}

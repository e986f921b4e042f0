/**
 * The vision encoder in a process of its own (engine/vision-process.ts) on the config-A test model: the same
 * features as the in-thread session, runs in order, and a cancelled run stopped by ending the process, which
 * is started again for the runs behind it. An orphaned process does not outlive its parent.
 */
import { spawn } from "node:child_process";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { sessionOptions } from "../../gpu-backend/src/engine/model.ts";
import { VisionCancelledError, VisionProcess } from "../../gpu-backend/src/engine/vision-process.ts";
import { PROJECT_ROOT, loadGoldenCases, loadGoldenF32 } from "../support/golden.ts";
import { useTinyModel } from "../support/tiny-model.ts";
import { alive, waitFor } from "./server-harness.ts";

const tiny = useTinyModel("vision-process-");
const withImages = loadGoldenCases().filter((c) => c.pixel_values && c.image_grid_thw);

function feedsOf(pixels: Float32Array, grids: number[][]): Record<string, ort.Tensor> {
  const rows = grids.reduce((n, [t, h, w]) => n + t! * h! * w!, 0);
  return {
    pixel_values: new ort.Tensor("float32", pixels, [rows, pixels.length / rows]),
    grid_thw: new ort.Tensor("int64", BigInt64Array.from(grids.flat().map(BigInt)), [grids.length, 3]),
  };
}

/** A golden case's inputs. */
function goldenFeeds(i = 0): Record<string, ort.Tensor> {
  const c = withImages[i]!;
  return feedsOf(loadGoldenF32(c.pixel_values!.file), c.image_grid_thw!);
}

/** Deterministic pixel values for a [1, side, side] grid: an encoding far longer than the golden ones. */
function largeInput(side: number): { pixels: Float32Array; grid: number[] } {
  const width = 3 * 2 * 14 * 14;
  const pixels = new Float32Array(side * side * width);
  for (let i = 0; i < pixels.length; i++) pixels[i] = ((i * 2654435761) % 1000) / 500 - 1;
  return { pixels, grid: [1, side, side] };
}

/** This process's live children running the vision program (`node --input-type=module -e …`). */
function visionChildren(): number[] {
  return readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .flatMap((d) => {
      try {
        const stat = readFileSync(`/proc/${d}/stat`, "utf8");
        const [state, ppid] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
        const cmd = readFileSync(`/proc/${d}/cmdline`, "utf8");
        return Number(ppid) === process.pid && state !== "Z" && cmd.includes("--input-type=module") ? [Number(d)] : [];
      } catch {
        return [];
      }
    });
}

describe("VisionProcess", () => {
  let vision: VisionProcess;
  beforeAll(async () => {
    vision = await VisionProcess.open(join(tiny.dir, "onnx", "vision_encoder.onnx"), sessionOptions({ intraOpThreads: 2 }));
  }, 60_000);
  afterAll(async () => {
    await vision?.release();
  });

  it("gives the in-thread session's features bit for bit, for every golden image case", async () => {
    expect(withImages.length).toBeGreaterThan(0);
    for (let i = 0; i < withImages.length; i++) {
      const [here, there] = [await tiny.model.sessions.vision.run(goldenFeeds(i)), await vision.run(goldenFeeds(i))];
      expect(there.image_features!.dims).toEqual(here.image_features!.dims);
      expect(there.image_features!.data, withImages[i]!.case).toEqual(here.image_features!.data);
    }
  });

  it("a run cancelled while it waits leaves the queue; the one running is not disturbed", async () => {
    const pid = vision.pid;
    const restarts = vision.restarts;
    const ac = new AbortController();
    const first = vision.run(goldenFeeds());
    const second = vision.run(goldenFeeds(), ac.signal);
    ac.abort();
    await expect(second).rejects.toBeInstanceOf(VisionCancelledError);
    expect((await first).image_features!.data).toEqual((await tiny.model.sessions.vision.run(goldenFeeds())).image_features!.data);
    expect([vision.pid, vision.restarts]).toEqual([pid, restarts]);
    await expect(vision.run(goldenFeeds(), AbortSignal.abort())).rejects.toBeInstanceOf(VisionCancelledError);
  });

  it("a run cancelled while it runs ends the process at once; a new one serves the next runs", async () => {
    const { pixels, grid } = largeInput(96);
    const pid = vision.pid!;
    const restarts = vision.restarts;
    const ac = new AbortController();
    const long = vision.run(feedsOf(pixels, [grid]), ac.signal);
    const behind = vision.run(goldenFeeds()); // queued behind it: runs in the new process
    expect(vision.busy).toBe(true);
    ac.abort();
    await expect(long).rejects.toBeInstanceOf(VisionCancelledError);
    expect((await behind).image_features!.data).toEqual((await tiny.model.sessions.vision.run(goldenFeeds())).image_features!.data);
    expect(vision.restarts).toBe(restarts + 1);
    expect(vision.pid).not.toBe(pid);
    expect(alive(pid)).toBe(false);
    expect(vision.failed).toBeNull();
  }, 60_000);

  it("a process that dies during a run fails that run only; the next run is served", async () => {
    const restarts = vision.restarts;
    const lost = vision.run(feedsOf(largeInput(96).pixels, [[1, 96, 96]]));
    await waitFor(() => vision.running, 10_000);
    vision.crash();
    await expect(lost).rejects.toMatchObject({ name: "VisionProcessError", message: expect.stringMatching(/exited \(SIGKILL\)/) });
    expect((await vision.run(goldenFeeds())).image_features!.dims).toEqual(withImages[0]!.image_embeds!.shape);
    expect(vision.restarts).toBe(restarts + 1);
  }, 60_000);

  it("a run sent to a process that died before beginning it is served by the next process", async () => {
    const restarts = vision.restarts;
    const pid = vision.pid!;
    vision.crash(); // killed, its exit not yet seen: the run below is sent to it
    const out = await vision.run(goldenFeeds());
    expect(out.image_features!.data).toEqual((await tiny.model.sessions.vision.run(goldenFeeds())).image_features!.data);
    expect(vision.restarts).toBe(restarts + 1);
    expect(vision.pid).not.toBe(pid);
  }, 60_000);
});

describe("VisionProcess start and release", () => {
  it("a load that takes longer than its limit fails and leaves no process", async () => {
    const before = visionChildren();
    const err = await VisionProcess.open(join(tiny.dir, "onnx", "vision_encoder.onnx"), sessionOptions({ intraOpThreads: 1 }), 1).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: "VisionProcessError", message: "the vision encoder did not load within 0.001 s" });
    expect(visionChildren()).toEqual(before);
  });

  it("release while a cancelled run's process is being replaced ends both, and later runs fail", async () => {
    const before = visionChildren();
    const vp = await VisionProcess.open(join(tiny.dir, "onnx", "vision_encoder.onnx"), sessionOptions({ intraOpThreads: 1 }));
    expect(visionChildren()).toHaveLength(before.length + 1);
    const ac = new AbortController();
    const long = vp.run(feedsOf(largeInput(96).pixels, [[1, 96, 96]]), ac.signal);
    ac.abort();
    await expect(long).rejects.toBeInstanceOf(VisionCancelledError);
    await vp.release(); // the restart has begun
    expect(vp.pid).toBeNull();
    expect(visionChildren()).toEqual(before);
    await expect(vp.run(goldenFeeds())).rejects.toMatchObject({ name: "VisionProcessError", message: "the vision process was released" });
  }, 60_000);

  it("processes that keep dying right after their start are not started again: the session fails", async () => {
    const vp = await VisionProcess.open(join(tiny.dir, "onnx", "vision_encoder.onnx"), sessionOptions({ intraOpThreads: 1 }));
    try {
      const dieOnce = async () => {
        const pid = vp.pid!;
        vp.crash();
        await waitFor(() => vp.failed !== null || (vp.pid !== null && vp.pid !== pid), 30_000);
      };
      await dieOnce();
      await dieOnce();
      expect((await vp.run(goldenFeeds())).image_features!.dims).toEqual(withImages[0]!.image_embeds!.shape); // a run finished: the count starts over
      await dieOnce();
      await dieOnce();
      expect(vp.failed).toBeNull();
      await dieOnce();
      expect(vp.failed).toMatchObject({ message: "the vision process died 3 times in a row within 10 s of starting; not started again" });
      expect(vp.restarts).toBe(4);
      await expect(vp.run(goldenFeeds())).rejects.toBe(vp.failed);
    } finally {
      await vp.release();
    }
  }, 120_000);
});

describe("a VisionProcess whose parent dies", () => {
  it("ends itself in the middle of an encoding, not when the encoding is over", async () => {
    const { pixels, grid } = largeInput(160); // a few seconds per run on one thread
    const file = join(tiny.dir, "large-pixels.bin");
    writeFileSync(file, pixels);
    const parent = spawn(process.execPath, ["--import", "tsx", join(PROJECT_ROOT, "test", "backend", "fixtures", "vision-parent.ts"), join(tiny.dir, "onnx", "vision_encoder.onnx"), file, grid.join(",")], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const lines: string[] = [];
    let pending = "";
    parent.stdout.on("data", (d: Buffer) => {
      pending += String(d);
      const parts = pending.split("\n");
      pending = parts.pop()!;
      lines.push(...parts);
    });
    try {
      // One whole run tells how long an encoding takes here; the parent dies a third into the next one.
      await waitFor(() => lines.some((l) => l.startsWith("ran ")), 60_000);
      const runMs = Number(lines.find((l) => l.startsWith("ran "))!.slice(4));
      const pid = Number(lines.find((l) => l.startsWith("pid "))!.slice(4));
      await waitFor(() => lines.filter((l) => l === "run").length === 2);
      await new Promise((r) => setTimeout(r, runMs / 3));
      expect(alive(pid)).toBe(true);
      parent.kill("SIGKILL");
      // Dead well before the encoding could end (two thirds of a run later) and tell it its parent is gone.
      await waitFor(() => !alive(pid), runMs / 3);
    } finally {
      parent.kill("SIGKILL");
    }
  }, 120_000);
});

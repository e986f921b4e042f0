/**
 * The vision encoder's session in a worker thread of its own. onnxruntime-node's `run()` works on the calling
 * thread until the result is ready, so an encoder run in the engine's thread stops every running stream for
 * the whole encoding (tens of seconds for a large X-ray on a CPU). Here the engine's thread only posts the
 * inputs and awaits the features, and keeps stepping the other sequences meanwhile (engine.ts).
 */
import { Worker } from "node:worker_threads";
import * as ort from "onnxruntime-node";

/** What the engine uses of a vision session: an in-thread `InferenceSession` or a {@link VisionThread}. */
export interface VisionSession {
  run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>>;
  release(): Promise<void>;
  /** Set once the session can no longer run (a {@link VisionThread} that could not be started again). */
  readonly failed?: Error | null;
}

/** A tensor as it crosses threads (structured clone). */
interface WireTensor {
  type: ort.Tensor.Type;
  dims: readonly number[];
  data: ort.Tensor.DataType;
}

type FromVision = { t: "ready" } | { t: "load_error"; message: string } | { t: "result"; id: number; outputs: Record<string, WireTensor> } | { t: "error"; id: number; message: string };

/**
 * The worker, as a script that only uses dynamic imports (workers evaluate it as a script or a module,
 * depending on the process's flags). Results go back with their buffers transferred, not copied.
 */
const WORKER = `import("node:worker_threads").then(async ({ parentPort, workerData }) => {
  const ort = await import(workerData.ort);
  let session;
  try {
    session = await ort.InferenceSession.create(workerData.path, workerData.options);
  } catch (e) {
    parentPort.postMessage({ t: "load_error", message: String(e && e.message ? e.message : e) });
    return;
  }
  parentPort.on("message", async ({ id, feeds }) => {
    try {
      const inputs = {};
      for (const [k, v] of Object.entries(feeds)) inputs[k] = new ort.Tensor(v.type, v.data, v.dims);
      const out = await session.run(inputs);
      const outputs = {};
      const buffers = [];
      for (const [k, v] of Object.entries(out)) {
        outputs[k] = { type: v.type, dims: v.dims, data: v.data };
        buffers.push(v.data.buffer);
      }
      parentPort.postMessage({ t: "result", id, outputs }, buffers);
    } catch (e) {
      parentPort.postMessage({ t: "error", id, message: String(e && e.message ? e.message : e) });
    }
  });
  parentPort.postMessage({ t: "ready" });
}).catch((e) => { setImmediate(() => { throw e; }); });`;

/** Thrown when the thread cannot load the graph, or stops. */
export class VisionThreadError extends Error {
  override readonly name = "VisionThreadError";
}

/**
 * A vision encoder session running in its own worker thread; `run` resolves with the outputs in this thread.
 * A thread that stops (an uncaught error or out of memory in it) fails its pending runs and is started again
 * for the next ones; only a restart that cannot load the graph leaves it {@link failed} for good.
 */
export class VisionThread implements VisionSession {
  private readonly pending = new Map<number, { resolve: (out: Record<string, ort.Tensor>) => void; reject: (e: Error) => void }>();
  private nextId = 0;
  private released = false;
  private restarting: Promise<void> | null = null;
  private failure: Error | null = null;

  private constructor(
    private worker: Worker,
    private readonly path: string,
    private readonly options: ort.InferenceSession.SessionOptions,
  ) {
    this.attach(worker);
  }

  /** Starts the thread and loads `path` there with `options` (plain, cloneable session options). */
  static async open(path: string, options: ort.InferenceSession.SessionOptions): Promise<VisionThread> {
    return new VisionThread(await spawn(path, options), path, options);
  }

  /** Set when the thread stopped and could not be started again: every run rejects with it (after release too). */
  get failed(): Error | null {
    return this.released ? null : this.failure;
  }

  run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.restarting) return this.restarting.then(() => this.run(feeds));
    const id = this.nextId++;
    const wire = Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, { type: t.type, dims: t.dims, data: t.data } satisfies WireTensor]));
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, feeds: wire });
    });
  }

  async release(): Promise<void> {
    this.released = true;
    this.failure ??= new VisionThreadError("the vision thread was released");
    await this.restarting;
    await this.worker.terminate();
  }

  /** Test hook: stops the thread as a crash in it would. */
  async crash(): Promise<void> {
    await this.worker.terminate();
  }

  private attach(worker: Worker): void {
    worker.on("message", (m: FromVision) => {
      if (m.t !== "result" && m.t !== "error") return;
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.t === "error") p.reject(new VisionThreadError(m.message));
      else p.resolve(Object.fromEntries(Object.entries(m.outputs).map(([k, v]) => [k, new ort.Tensor(v.type, v.data as never, v.dims)])));
    });
    // "error" is followed by "exit"; either ends this worker once.
    let stopped = false;
    const stop = (why: string) => {
      if (stopped || this.worker !== worker) return;
      stopped = true;
      const error = this.failure ?? new VisionThreadError(why);
      for (const p of this.pending.values()) p.reject(error);
      this.pending.clear();
      if (!this.released) this.restart();
    };
    worker.on("error", (e) => stop(`the vision thread failed: ${e.message}`));
    worker.on("exit", (code) => stop(`the vision thread exited (${code})`));
  }

  private restart(): void {
    this.restarting = spawn(this.path, this.options).then(
      (worker) => {
        this.restarting = null;
        if (this.released) return void worker.terminate();
        this.worker = worker;
        this.attach(worker);
      },
      (e: Error) => {
        this.restarting = null;
        this.failure ??= new VisionThreadError(`the vision thread stopped and could not be started again: ${e.message}`);
      },
    );
  }
}

/** Starts a worker and waits until it has loaded `path`. */
async function spawn(path: string, options: ort.InferenceSession.SessionOptions): Promise<Worker> {
  const worker = new Worker(WORKER, { eval: true, workerData: { ort: import.meta.resolve("onnxruntime-node"), path, options } });
  let onMessage!: (m: FromVision) => void;
  let onError!: (e: Error) => void;
  let onExit!: (code: number) => void;
  const first = await new Promise<FromVision | Error>((resolve) => {
    onMessage = resolve;
    onError = resolve;
    onExit = (code) => resolve(new VisionThreadError(`the vision thread exited (${code}) while loading`));
    worker.on("message", onMessage).on("error", onError).on("exit", onExit);
  });
  worker.off("message", onMessage).off("error", onError).off("exit", onExit);
  if (first instanceof Error || first.t !== "ready") {
    await worker.terminate();
    throw new VisionThreadError(first instanceof Error ? first.message : first.t === "load_error" ? first.message : "unexpected message");
  }
  return worker;
}

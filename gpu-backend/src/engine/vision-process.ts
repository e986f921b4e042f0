/**
 * The vision encoder's session in a child process of its own. onnxruntime-node's `run()` works on the calling
 * thread until the result is ready, so an encoder run in the engine's thread stops every running stream for
 * the whole encoding (tens of seconds for a large X-ray on a CPU). Here the engine's thread only sends the
 * inputs and awaits the features, and keeps stepping the other sequences meanwhile (engine.ts).
 *
 * A process rather than a worker thread, because a run cannot be stopped from outside once it has started:
 * ONNX Runtime's terminate flag is not reachable from the Node API, and a worker thread's termination waits
 * for the native call to return. An encoding whose request is cancelled (the client left, its deadline
 * passed) would otherwise hold the encoder for as long as the image takes — up to hours for the largest
 * images the processor allows on a CPU — and every later image would wait behind it; a call that never
 * returns would hold it for good. A process is killed at once and started again for the next image.
 */
import { type ChildProcess, spawn } from "node:child_process";
import * as ort from "onnxruntime-node";

/**
 * What the engine uses of a vision session: an in-thread `InferenceSession` ({@link inThreadVision}) or a
 * {@link VisionProcess}.
 */
export interface VisionSession {
  /**
   * Runs the encoder. When `signal` aborts, the run rejects with a {@link VisionCancelledError}: at once where
   * the encoding can be stopped (a {@link VisionProcess}), else when it returns.
   */
  run(feeds: Record<string, ort.Tensor>, signal?: AbortSignal): Promise<Record<string, ort.Tensor>>;
  release(): Promise<void>;
  /** Set once the session can no longer run (a {@link VisionProcess} that could not be started again, or kept dying). */
  readonly failed?: Error | null;
  /** Times the session was started again after a cancelled encoding or a failure (a {@link VisionProcess}). */
  readonly restarts?: number;
}

/** A session in the calling thread: its run cannot be stopped, so an abort only takes effect when it returns. */
export function inThreadVision(session: ort.InferenceSession): VisionSession {
  return {
    async run(feeds, signal) {
      if (signal?.aborted) throw new VisionCancelledError();
      const out = await session.run(feeds);
      if (signal?.aborted) throw new VisionCancelledError();
      return out;
    },
    release: () => session.release(),
  };
}

/** A tensor as it crosses the process boundary (the IPC channel's structured clone). */
interface WireTensor {
  type: ort.Tensor.Type;
  dims: readonly number[];
  data: ort.Tensor.DataType;
}

type FromChild =
  | { t: "ready" }
  | { t: "load_error"; message: string }
  | { t: "begin"; id: number }
  | { t: "result"; id: number; outputs: Record<string, WireTensor> }
  | { t: "error"; id: number; message: string };

/**
 * The child's program (`node -e`, dynamic imports only; argv[1]: the parent's pid). Its main thread is inside
 * `session.run` for a whole encoding, so a worker thread watches for the parent's death (the process is
 * re-parented) and ends the child then, rather than letting an orphan finish an encoding nobody waits for.
 */
const CHILD = `const { Worker } = await import("node:worker_threads");
new Worker('const parent = ' + Number(process.argv[1]) + '; setInterval(() => { if (process.ppid !== parent) process.kill(process.pid, "SIGKILL"); }, 250);', { eval: true }).unref();
process.on("disconnect", () => process.exit(0));
process.once("message", async ({ ort: ortUrl, path, options }) => {
  const ort = await import(ortUrl);
  let session;
  try {
    session = await ort.InferenceSession.create(path, options);
  } catch (e) {
    process.send({ t: "load_error", message: String(e && e.message ? e.message : e) });
    return;
  }
  process.on("message", async ({ id, feeds }) => {
    process.send({ t: "begin", id });
    try {
      const inputs = {};
      for (const [k, v] of Object.entries(feeds)) inputs[k] = new ort.Tensor(v.type, v.data, v.dims);
      const out = await session.run(inputs);
      const outputs = {};
      for (const [k, v] of Object.entries(out)) outputs[k] = { type: v.type, dims: v.dims, data: v.data };
      process.send({ t: "result", id, outputs });
    } catch (e) {
      process.send({ t: "error", id, message: String(e && e.message ? e.message : e) });
    }
  });
  process.send({ t: "ready" });
});`;

/** A process dying this soon after its start, {@link MAX_QUICK_EXITS} times in a row with no run finished, is not started again. */
const QUICK_EXIT_MS = 10_000;
const MAX_QUICK_EXITS = 3;

/** Thrown when the process cannot load the graph, or stops during a run. */
export class VisionProcessError extends Error {
  override readonly name = "VisionProcessError";
}

/** A run ended because its signal aborted. */
export class VisionCancelledError extends Error {
  override readonly name = "AbortError";
  constructor() {
    super("the encoding was cancelled");
  }
}

interface Job {
  id: number;
  feeds: Record<string, WireTensor>;
  resolve: (out: Record<string, ort.Tensor>) => void;
  reject: (e: Error) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
  /** The process acknowledged the run: from then on its death is the run's failure. */
  began?: boolean;
  /** Sent again once already, after a process died before beginning it. */
  resent?: boolean;
}

/**
 * A vision encoder session in its own process; runs go there one at a time, in order, and resolve with the
 * outputs here. A run whose signal aborts leaves the queue, or, when it is the one running, ends with the
 * process (SIGKILL), which is then started again for the runs behind it. A process that stops by itself (a
 * crash, out of memory) fails the run it was on and is started again too; a run it had been sent but had not
 * begun (it died just before) goes to the next process instead, once. The session {@link failed} for good
 * when a restart cannot load the graph, or when processes keep dying right after their start (a crash loop).
 */
export class VisionProcess implements VisionSession {
  private readonly queue: Job[] = [];
  private current: Job | null = null;
  private child: ChildProcess | null = null;
  private starting: Promise<void> | null = null;
  private nextId = 0;
  private released = false;
  private failure: Error | null = null;
  private restartCount = 0;
  /** A process being started again, not yet loaded. */
  private loading: ChildProcess | null = null;
  /** Processes in a row that died within {@link QUICK_EXIT_MS} of starting without finishing a run. */
  private quickExits = 0;

  private constructor(
    private readonly path: string,
    private readonly options: ort.InferenceSession.SessionOptions,
    private readonly loadTimeoutMs: number,
  ) {}

  /**
   * Starts the process and loads `path` there with `options` (plain, cloneable session options). A load (this one
   * or a restart's) that takes longer than `loadTimeoutMs` (default 10 min) fails.
   */
  static async open(path: string, options: ort.InferenceSession.SessionOptions, loadTimeoutMs = 600_000): Promise<VisionProcess> {
    const vp = new VisionProcess(path, options, loadTimeoutMs);
    vp.attach(await start(path, options, loadTimeoutMs));
    return vp;
  }

  /** Set when the process stopped and could not be started again: every run rejects with it (after release too). */
  get failed(): Error | null {
    return this.released ? null : this.failure;
  }

  /** Times the process was started again (after a cancelled run or a crash), whether or not it could be. */
  get restarts(): number {
    return this.restartCount;
  }

  /** A run has been sent to the process and not yet answered. */
  get busy(): boolean {
    return this.current !== null;
  }

  /** The process has begun the run it was sent. */
  get running(): boolean {
    return this.current?.began === true;
  }

  /** The process's id (null while it is being started again). */
  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  run(feeds: Record<string, ort.Tensor>, signal?: AbortSignal): Promise<Record<string, ort.Tensor>> {
    if (this.failure) return Promise.reject(this.failure);
    if (signal?.aborted) return Promise.reject(new VisionCancelledError());
    return new Promise((resolve, reject) => {
      const job: Job = {
        id: this.nextId++,
        feeds: Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, { type: t.type, dims: t.dims, data: t.data }])),
        resolve,
        reject,
        ...(signal ? { signal } : {}),
      };
      if (signal) {
        job.onAbort = () => this.abort(job);
        signal.addEventListener("abort", job.onAbort, { once: true });
      }
      this.queue.push(job);
      this.pump();
    });
  }

  async release(): Promise<void> {
    this.released = true;
    this.failure ??= new VisionProcessError("the vision process was released");
    for (const job of this.queue.splice(0)) this.settle(job, this.failure);
    if (this.current) this.settle(this.current, this.failure);
    this.current = null;
    this.loading?.kill("SIGKILL"); // a restart under way: its load fails at once
    await this.starting;
    await stop(this.child);
  }

  /** Test hook: stops the process as a crash in it would. */
  crash(): void {
    this.child?.kill("SIGKILL");
  }

  private pump(): void {
    if (this.current || !this.child || this.starting) return;
    const job = this.queue.shift();
    if (!job) return;
    this.current = job;
    const child = this.child;
    // A failed send (the channel closed under it) ends the process; its exit fails the job and restarts it.
    child.send({ id: job.id, feeds: job.feeds }, (e) => e && child.kill("SIGKILL"));
  }

  private settle(job: Job, result: Error | Record<string, ort.Tensor>): void {
    if (job.onAbort) job.signal!.removeEventListener("abort", job.onAbort);
    if (result instanceof Error) job.reject(result);
    else job.resolve(result);
  }

  private abort(job: Job): void {
    const queued = this.queue.indexOf(job);
    if (queued >= 0) {
      this.queue.splice(queued, 1);
      this.settle(job, new VisionCancelledError());
    } else if (this.current === job) {
      // The process is inside the run: ending it is the only way to stop the encoding.
      this.current = null;
      this.settle(job, new VisionCancelledError());
      const child = this.child;
      this.child = null;
      this.restart(child);
    }
  }

  private attach(child: ChildProcess): void {
    this.child = child;
    const startedAt = performance.now();
    child.on("error", () => child.kill("SIGKILL")); // e.g. a message it could not be sent; the exit below follows
    child.on("message", (m: FromChild) => {
      if (m.t !== "begin" && m.t !== "result" && m.t !== "error") return;
      const job = this.current;
      if (!job || job.id !== m.id) return;
      if (m.t === "begin") return void (job.began = true);
      this.current = null;
      this.quickExits = 0; // it works
      if (m.t === "error") this.settle(job, new VisionProcessError(m.message));
      else this.settle(job, Object.fromEntries(Object.entries(m.outputs).map(([k, v]) => [k, new ort.Tensor(v.type, v.data as never, v.dims)])));
      this.pump();
    });
    child.once("exit", (code, signal) => {
      if (this.child !== child) return;
      this.child = null;
      const job = this.current;
      this.current = null;
      if (job && !job.began && !job.resent && !this.failure) {
        // It died before it read this run (e.g. right after answering the previous one): the death is not this
        // run's doing, so the next process gets it. Once only: a run whose very message kills the process fails.
        job.resent = true;
        this.queue.unshift(job);
      } else if (job) this.settle(job, this.failure ?? new VisionProcessError(`the vision process exited (${signal ?? code})`));
      if (this.released) return;
      // Processes that die right after starting, run after run, would be restarted in a loop: give up instead.
      this.quickExits = performance.now() - startedAt < QUICK_EXIT_MS ? this.quickExits + 1 : 0;
      if (this.quickExits >= MAX_QUICK_EXITS) {
        this.failure ??= new VisionProcessError(`the vision process died ${this.quickExits} times in a row within ${QUICK_EXIT_MS / 1000} s of starting; not started again`);
        for (const queued of this.queue.splice(0)) this.settle(queued, this.failure);
        return;
      }
      this.restart(null);
    });
  }

  /** Starts a new process once `old` (if any) has been killed and has exited; runs wait for it meanwhile. */
  private restart(old: ChildProcess | null): void {
    this.restartCount++;
    const load = () => (this.released ? null : start(this.path, this.options, this.loadTimeoutMs, (c) => (this.loading = c)));
    this.starting = stop(old)
      .then(load)
      .then(
        (child) => {
          this.starting = null;
          this.loading = null;
          if (!child) return;
          if (this.released) return void stop(child);
          this.attach(child);
          this.pump();
        },
        (e: Error) => {
          this.starting = null;
          this.loading = null;
          this.failure ??= new VisionProcessError(`the vision process stopped and could not be started again: ${e.message}`);
          for (const job of this.queue.splice(0)) this.settle(job, this.failure);
        },
      );
  }
}

/**
 * Starts a child and waits until it has loaded `path`, at most `timeoutMs` (a load that hangs — a stuck device or
 * file system — is killed and fails like a load error). `onSpawn` gets the child before it has loaded.
 */
async function start(path: string, options: ort.InferenceSession.SessionOptions, timeoutMs: number, onSpawn?: (child: ChildProcess) => void): Promise<ChildProcess> {
  // A process group of its own: a Ctrl-C or a signal to the server's group must not end an encoding while the
  // server drains; the child ends with its parent anyway (CHILD).
  const child = spawn(process.execPath, ["--input-type=module", "-e", CHILD, String(process.pid)], {
    stdio: ["ignore", "inherit", "inherit", "ipc"],
    serialization: "advanced",
    detached: true,
  });
  onSpawn?.(child);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, timeoutMs);
  let onMessage!: (m: FromChild) => void;
  let onError!: (e: Error) => void;
  let onExit!: (code: number | null, signal: NodeJS.Signals | null) => void;
  const first = await new Promise<FromChild | Error>((resolve) => {
    onMessage = resolve;
    onError = resolve;
    onExit = (code, signal) =>
      resolve(new VisionProcessError(timedOut ? `the vision encoder did not load within ${timeoutMs / 1000} s` : `the vision process exited (${signal ?? code}) while loading`));
    child.on("message", onMessage).on("error", onError).on("exit", onExit);
    child.send({ ort: import.meta.resolve("onnxruntime-node"), path, options }, (e) => e && resolve(e));
  });
  clearTimeout(timer);
  child.off("message", onMessage).off("error", onError).off("exit", onExit);
  if (first instanceof Error || first.t !== "ready") {
    await stop(child);
    throw new VisionProcessError(first instanceof Error ? first.message : first.t === "load_error" ? first.message : "unexpected message");
  }
  return child;
}

/** Kills `child` and waits until it has exited. */
async function stop(child: ChildProcess | null): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await exited;
}

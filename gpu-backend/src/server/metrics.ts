/**
 * A tiny Prometheus text-format (0.0.4) registry: counters and histograms with labels, gauges read at
 * scrape time. No dependency; enough for the backend's own metrics (`BackendMetrics`).
 */

/** Label names to values of one series. */
export type Labels = Record<string, string>;

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function labelText(labels: Labels): string {
  const keys = Object.keys(labels).sort();
  return keys.length === 0 ? "" : `{${keys.map((k) => `${k}="${escapeLabel(labels[k]!)}"`).join(",")}}`;
}

function fmt(n: number): string {
  if (n === Infinity) return "+Inf";
  if (n === -Infinity) return "-Inf";
  return Number.isNaN(n) ? "NaN" : String(n);
}

interface Metric {
  render(): string;
}

/** A monotonically increasing counter, one series per label set. */
export class Counter implements Metric {
  private readonly series = new Map<string, number>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const key = labelText(labels);
    this.series.set(key, (this.series.get(key) ?? 0) + by);
  }
  get(labels: Labels = {}): number {
    return this.series.get(labelText(labels)) ?? 0;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const [k, v] of this.series) lines.push(`${this.name}${k} ${fmt(v)}`);
    return lines.join("\n");
  }
}

/** A gauge whose value is read when scraped; or a counter kept elsewhere (`type` "counter"), read the same way. */
export class Gauge implements Metric {
  constructor(
    readonly name: string,
    readonly help: string,
    private readonly read: () => number,
    private readonly type: "gauge" | "counter" = "gauge",
  ) {}
  render(): string {
    return [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} ${this.type}`, `${this.name} ${fmt(this.read())}`].join("\n");
  }
}

/** A cumulative histogram with fixed upper bounds (seconds, by convention). */
export class Histogram implements Metric {
  private readonly counts: number[];
  private sum = 0;
  private count = 0;
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: number[],
  ) {
    this.counts = buckets.map(() => 0);
  }
  observe(v: number): void {
    if (!Number.isFinite(v)) return;
    this.sum += v;
    this.count++;
    for (let i = 0; i < this.buckets.length; i++) if (v <= this.buckets[i]!) this.counts[i]!++;
  }
  get total(): number {
    return this.count;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    this.buckets.forEach((b, i) => lines.push(`${this.name}_bucket{le="${fmt(b)}"} ${this.counts[i]}`));
    lines.push(`${this.name}_bucket{le="+Inf"} ${this.count}`, `${this.name}_sum ${fmt(this.sum)}`, `${this.name}_count ${this.count}`);
    return lines.join("\n");
  }
}

/** A set of metrics rendered together. */
export class Registry {
  private readonly metrics: Metric[] = [];
  register<M extends Metric>(m: M): M {
    this.metrics.push(m);
    return m;
  }
  render(): string {
    return `${this.metrics.map((m) => m.render()).join("\n")}\n`;
  }
}

/** Tokens per second over a sliding window (1 s buckets), for the throughput gauge. */
export class RateWindow {
  private readonly buckets = new Map<number, number>();
  constructor(
    private readonly windowS = 10,
    private readonly now: () => number = Date.now,
  ) {}
  add(n = 1): void {
    const s = Math.floor(this.now() / 1000);
    this.buckets.set(s, (this.buckets.get(s) ?? 0) + n);
    this.prune(s);
  }
  /** Events per second over the last `windowS` whole seconds plus the current one. */
  rate(): number {
    const s = Math.floor(this.now() / 1000);
    this.prune(s);
    let total = 0;
    for (const v of this.buckets.values()) total += v;
    return total / this.windowS;
  }
  private prune(s: number): void {
    for (const k of this.buckets.keys()) if (k < s - this.windowS) this.buckets.delete(k);
  }
}

const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120];
const TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2];

/** Why a request was cancelled by the server. */
export type CancelReason = "client_disconnect" | "deadline" | "shutdown";

/** The backend's metrics. Gauges read the engine's stats at scrape time. */
export class BackendMetrics {
  readonly registry = new Registry();
  readonly requests: Counter;
  readonly errors: Counter;
  readonly cancellations: Counter;
  readonly generatedTokens: Counter;
  readonly draftTokens: Counter;
  readonly ttft: Histogram;
  readonly tokenLatency: Histogram;
  readonly requestDuration: Histogram;
  private readonly tokenRate: RateWindow;

  constructor(stats: () => { active: number; queued: number; capacity: number; ready: boolean; visionRestarts?: number }, now: () => number = Date.now) {
    const r = this.registry;
    this.tokenRate = new RateWindow(10, now);
    r.register(new Gauge("medvlm_backend_queue_depth", "Requests waiting for a batch slot.", () => stats().queued));
    r.register(new Gauge("medvlm_backend_active_sequences", "Sequences being generated.", () => stats().active));
    r.register(new Gauge("medvlm_backend_capacity", "Sequences generated at once (batch size).", () => stats().capacity));
    r.register(new Gauge("medvlm_backend_ready", "1 when the model is loaded and warmed up and its engine thread answers (0 while stalled).", () => (stats().ready ? 1 : 0)));
    r.register(
      new Gauge(
        "medvlm_backend_vision_restarts_total",
        "Times the vision process was started again: an encoding cancelled while it ran, or the process died.",
        () => stats().visionRestarts ?? 0,
        "counter",
      ),
    );
    this.requests = r.register(new Counter("medvlm_backend_requests_total", "Generate requests by final outcome (ok or error code)."));
    this.errors = r.register(new Counter("medvlm_backend_errors_total", "Generate requests that ended in an error, by code."));
    this.cancellations = r.register(new Counter("medvlm_backend_cancellations_total", "Requests cancelled by the server, by reason."));
    this.generatedTokens = r.register(new Counter("medvlm_backend_generated_tokens_total", "Tokens generated."));
    this.draftTokens = r.register(
      new Counter("medvlm_backend_draft_tokens_total", "Speculative decoding's draft tokens checked, by outcome (accepted, rejected)."),
    );
    r.register(new Gauge("medvlm_backend_tokens_per_second", "Tokens generated per second over the last 10 s.", () => this.tokenRate.rate()));
    this.ttft = r.register(new Histogram("medvlm_backend_time_to_first_token_seconds", "Admission to first generated token.", LATENCY_BUCKETS));
    this.tokenLatency = r.register(new Histogram("medvlm_backend_token_latency_seconds", "Time between consecutive generated tokens.", TOKEN_BUCKETS));
    this.requestDuration = r.register(new Histogram("medvlm_backend_request_duration_seconds", "Admission to the final event.", LATENCY_BUCKETS));
  }

  /** Records one generated token. */
  token(): void {
    this.generatedTokens.inc();
    this.tokenRate.add();
  }

  /** Records a finished request's speculative-decoding counts (its `usage.completion_tokens_details`). */
  drafts(d: { accepted_prediction_tokens: number; rejected_prediction_tokens: number } | undefined): void {
    if (!d) return;
    this.draftTokens.inc({ outcome: "accepted" }, d.accepted_prediction_tokens);
    this.draftTokens.inc({ outcome: "rejected" }, d.rejected_prediction_tokens);
  }

  /**
   * Records a request's outcome: `ok`, `cancelled` (the client went away) or the error code it ended with
   * (refusals before the engine included).
   */
  outcome(code: string): void {
    if (code === "ok" || code === "cancelled") {
      this.requests.inc({ outcome: code });
      return;
    }
    this.requests.inc({ outcome: "error" });
    this.errors.inc({ code });
  }

  render(): string {
    return this.registry.render();
  }
}

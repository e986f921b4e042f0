/**
 * A recording double of the GPU backend (a peer the edge talks to over HTTP), installed as the worker's
 * global `fetch` for edge tests. It checks the request signature and wire format with the shared code,
 * records every request, and answers with a scripted NDJSON event stream or error.
 */
import { vi } from "vitest";
import {
  GENERATE_PATH,
  LOAD_HEADER,
  decodeWireRequest,
  encodeEvent,
  verifyWireSignature,
  type BackendEvent,
  type WireRequest,
} from "../../../shared/src/wire.ts";

export const TEST_BACKEND_SECRET = "test-backend-hmac-secret-0123456789abcdef";

export interface Recorded {
  url: string;
  wire: WireRequest;
  signal: AbortSignal | null;
  headers: Headers;
}

export type Script =
  | { kind: "events"; events: BackendEvent[]; delayMs?: number; load?: string }
  | { kind: "status"; status: number; body?: unknown; headers?: Record<string, string> }
  | { kind: "unreachable" }
  /** Any response, e.g. a proxy's HTML error page or a body-less 200. */
  | { kind: "response"; make: () => Response }
  /** Streams `events`, then keeps the connection open until the request is aborted. */
  | { kind: "hang"; events: BackendEvent[] }
  /** Takes the request and never answers (no headers) until it is aborted: a hung or blackholed backend. */
  | { kind: "silent" };

export function tokensDone(texts: string[], finish: "stop" | "length" = "stop"): BackendEvent[] {
  const text = texts.join("");
  return [
    { type: "start", request_id: "x", prompt_tokens: 1, image_tokens: 0, queue_ms: 0 },
    ...texts.map((t, i) => ({ type: "token" as const, id: 1000 + i, text: t })),
    { type: "done", finish_reason: finish, text, usage: { prompt_tokens: 1, image_tokens: 0, completion_tokens: texts.length }, timings: { backend_ms: 5 } },
  ];
}

export class BackendDouble {
  readonly requests: Recorded[] = [];
  readonly aborted: string[] = [];
  /** Script per backend base URL; `default` for any other. */
  scripts = new Map<string, Script>();
  private realFetch = globalThis.fetch;

  install(): this {
    vi.stubGlobal("fetch", (input: RequestInfo | URL, init?: RequestInit) => this.handle(input, init));
    return this;
  }

  uninstall(): void {
    vi.unstubAllGlobals();
    globalThis.fetch = this.realFetch;
  }

  script(base: string, s: Script): this {
    this.scripts.set(base, s);
    return this;
  }

  private async handle(input: RequestInfo | URL, init?: RequestInit): Promise<Response> {
    const req = new Request(input, init);
    const url = new URL(req.url);
    const base = `${url.protocol}//${url.host}`;
    const s = this.scripts.get(base) ?? this.scripts.get("default");
    if (!s || s.kind === "unreachable") throw new TypeError("fetch failed: connection refused");
    if (url.pathname !== GENERATE_PATH) return new Response("not found", { status: 404 });
    const body = new Uint8Array(await req.arrayBuffer());
    try {
      await verifyWireSignature(body, req.headers, TEST_BACKEND_SECRET);
    } catch {
      return Response.json({ error: { code: "invalid_signature", message: "bad signature" } }, { status: 401 });
    }
    const wire = decodeWireRequest(body);
    const signal = init?.signal ?? null;
    this.requests.push({ url: base, wire, signal, headers: req.headers });
    signal?.addEventListener("abort", () => this.aborted.push(wire.header.request_id));
    if (s.kind === "response") return s.make();
    if (s.kind === "silent") {
      return new Promise<Response>((_, reject) => {
        const fail = () => reject(new DOMException("the request was aborted", "AbortError"));
        if (signal?.aborted) fail();
        else signal?.addEventListener("abort", fail);
      });
    }
    if (s.kind === "status") {
      return Response.json(s.body ?? { error: { code: "internal_error", message: "x" } }, { status: s.status, headers: s.headers });
    }
    const enc = new TextEncoder();
    const events = s.events;
    const delay = s.kind === "events" ? (s.delayMs ?? 0) : 0;
    const hang = s.kind === "hang";
    const stream = new ReadableStream<Uint8Array>({
      async start(controller) {
        for (const ev of events) {
          if (signal?.aborted) return;
          if (delay) await new Promise((r) => setTimeout(r, delay));
          controller.enqueue(enc.encode(encodeEvent(ev)));
        }
        if (hang) {
          await new Promise<void>((resolve) => signal?.addEventListener("abort", () => resolve()));
          controller.error(new Error("aborted"));
          return;
        }
        controller.close();
      },
    });
    return new Response(stream, {
      headers: { "content-type": "application/x-ndjson", ...(s.kind === "events" && s.load ? { [LOAD_HEADER]: s.load } : {}) },
    });
  }
}

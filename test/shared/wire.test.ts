import { describe, expect, it } from "vitest";
import { ApiError } from "../../shared/src/errors.ts";
import {
  DEFAULT_PARAMS,
  ReplayGuard,
  SIGNATURE_HEADER,
  TIMESTAMP_HEADER,
  decodeWireRequest,
  encodeEvent,
  encodeWireRequest,
  parseEvent,
  readEvents,
  signWireRequest,
  verifyWireSignature,
  type BackendEvent,
  type WireRequest,
} from "../../shared/src/wire.ts";
import { thrownBy } from "../support/errors.ts";

function sample(): WireRequest {
  const img1 = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
  const img2 = new Uint8Array([0xff, 0xd8, 0xff, 9]);
  return {
    header: {
      request_id: "req_123",
      model_fingerprint: "fp1-abc",
      input_ids_count: 5,
      images: [
        { mime: "image/png", byte_length: img1.length, width: 224, height: 224, grid_thw: [1, 16, 16], min_pixels: 3136, max_pixels: 12845056 },
        { mime: "image/jpeg", byte_length: img2.length, width: 126, height: 70, grid_thw: [1, 4, 8], min_pixels: 3136, max_pixels: 100352, resized_height: 70, resized_width: 126 },
      ],
      params: { ...DEFAULT_PARAMS, max_new_tokens: 64, stop: ["</answer>"] },
      stream: true,
      deadline_ms: 1_900_000_000_000,
    },
    inputIds: Int32Array.from([151644, 8948, 198, 151655, -1]),
    images: [img1, img2],
  };
}

function expectCode(fn: () => unknown, code: string) {
  expect(thrownBy(fn, ApiError).code).toBe(code);
}

describe("wire format v1", () => {
  it("round-trips header, ids and image bytes", () => {
    const req = sample();
    const back = decodeWireRequest(encodeWireRequest(req));
    expect(back.header).toEqual(req.header);
    expect([...back.inputIds]).toEqual([...req.inputIds]);
    expect(back.images.map((b) => [...b])).toEqual(req.images.map((b) => [...b]));
  });

  it("refuses to encode inconsistent requests", () => {
    const req = sample();
    req.header.input_ids_count = 4;
    expect(() => encodeWireRequest(req)).toThrow(/input_ids_count/);
  });

  it("rejects bad magic, unknown version, truncation and lying lengths", () => {
    const body = encodeWireRequest(sample());
    const badMagic = body.slice();
    badMagic[0] = 0x41;
    expectCode(() => decodeWireRequest(badMagic), "invalid_request");
    const v2 = body.slice();
    new DataView(v2.buffer).setUint16(4, 2, true);
    expect(() => decodeWireRequest(v2)).toThrow(/unsupported version 2/);
    expectCode(() => decodeWireRequest(body.subarray(0, 8)), "invalid_request");
    expectCode(() => decodeWireRequest(body.subarray(0, body.length - 1)), "invalid_request");
    const longer = new Uint8Array(body.length + 1);
    longer.set(body);
    expectCode(() => decodeWireRequest(longer), "invalid_request");
    const hugeHeader = body.slice();
    new DataView(hugeHeader.buffer).setUint32(8, 0xffffffff, true);
    expectCode(() => decodeWireRequest(hugeHeader), "invalid_request");
  });

  it("rejects structurally invalid headers", () => {
    const mutate = (f: (r: WireRequest) => void) => {
      const r = sample();
      f(r);
      return encodeWireRequest(r);
    };
    for (const body of [
      mutate((r) => (r.header.request_id = "bad id with spaces")),
      mutate((r) => (r.header.params.temperature = Number.NaN)),
      mutate((r) => (r.header.params.max_new_tokens = 0)),
      mutate((r) => (r.header.params.top_k = -1)),
      mutate((r) => (r.header.images[0]!.grid_thw = [1, 0, 16])),
      mutate((r) => ((r.header.images[0] as { mime: string }).mime = "image/gif")),
      mutate((r) => (r.header.params.stop = [""])),
      mutate((r) => (r.header.images[0]!.resized_height = 280)), // without resized_width
      mutate((r) => Object.assign(r.header.images[0]!, { resized_height: 280, resized_width: 0 })),
      mutate((r) => Object.assign(r.header.images[0]!, { resized_height: 280.5, resized_width: 420 })),
    ]) {
      expectCode(() => decodeWireRequest(body), "invalid_request");
    }
  });
});

describe("wire signing", () => {
  const secret = "s3cret-key-for-tests";
  const now = 1_800_000_000_000;
  const headersOf = (h: Record<string, string>) => new Headers(h);

  it("accepts a correctly signed body", async () => {
    const body = encodeWireRequest(sample());
    const h = await signWireRequest(body, secret, now);
    expect(h[SIGNATURE_HEADER]).toMatch(/^v1=[0-9a-f]{64}$/);
    await expect(verifyWireSignature(body, headersOf(h), secret, now + 5_000)).resolves.toBeUndefined();
  });

  it("rejects tampering, wrong keys, stale or missing signatures", async () => {
    const body = encodeWireRequest(sample());
    const h = await signWireRequest(body, secret, now);
    const tampered = body.slice();
    tampered[tampered.length - 1]! ^= 1;
    const cases: Array<[Uint8Array, Record<string, string>, string, number, RegExp]> = [
      [tampered, h, secret, now, /bad request signature/],
      [body, h, "another-secret", now, /bad request signature/],
      [body, h, secret, now + 61_000, /stale/],
      [body, h, secret, now - 61_000, /stale/],
      [body, { [TIMESTAMP_HEADER]: h[TIMESTAMP_HEADER]! }, secret, now, /missing/],
      [body, { ...h, [SIGNATURE_HEADER]: "v1=zz" }, secret, now, /malformed/],
      [body, { ...h, [TIMESTAMP_HEADER]: String(Number(h[TIMESTAMP_HEADER]) + 1) }, secret, now, /bad request signature/],
    ];
    for (const [b, hh, key, at, msg] of cases) {
      const err = await verifyWireSignature(b, headersOf(hh), key, at).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ApiError);
      expect((err as ApiError).code).toBe("invalid_signature");
      expect((err as ApiError).status).toBe(401);
      expect((err as ApiError).message).toMatch(msg);
    }
  });

  it("replay guard refuses a request id seen within the window and forgets old ones", () => {
    const g = new ReplayGuard(1000);
    g.check("a", 0);
    expectCode(() => g.check("a", 500), "invalid_signature");
    g.check("b", 600);
    g.check("a", 1601); // "a" expired from the window
  });
});

describe("backend events", () => {
  it("reassembles NDJSON lines split at arbitrary byte boundaries, including inside UTF-8", async () => {
    const events: BackendEvent[] = [
      { type: "start", request_id: "r", prompt_tokens: 200, image_tokens: 64, queue_ms: 1 },
      { type: "token", id: 1, text: "héllo 🧠" },
      { type: "done", finish_reason: "stop", text: "héllo 🧠", usage: { prompt_tokens: 200, image_tokens: 64, completion_tokens: 1 }, timings: {} },
    ];
    const bytes = new TextEncoder().encode(events.map(encodeEvent).join(""));
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        for (let i = 0; i < bytes.length; i += 3) c.enqueue(bytes.subarray(i, i + 3));
        c.close();
      },
    });
    const got: BackendEvent[] = [];
    for await (const ev of readEvents(stream)) got.push(ev);
    expect(got).toEqual(events);
  });

  it("turns malformed or unknown lines into backend_error events", async () => {
    const stream = new Response('not json\n{"type":"weird"}\n{"type":"error","code":"nope","message":"x"}\n').body!;
    const got: BackendEvent[] = [];
    for await (const ev of readEvents(stream)) got.push(ev);
    expect(got.map((e) => e.type === "error" && e.code)).toEqual(["backend_error", "backend_error", "backend_error"]);
  });

  it("turns events whose fields are missing or mistyped into backend_error events", () => {
    const usage = { prompt_tokens: 1, image_tokens: 0, completion_tokens: 1 };
    const done = { type: "done", finish_reason: "stop", text: "hi", usage, timings: { queue_ms: 0, prefill_ms: 12.5 } };
    const details = { accepted_prediction_tokens: 1, rejected_prediction_tokens: 0 };
    const start = { type: "start", request_id: "r", prompt_tokens: 200, image_tokens: 0, queue_ms: 0.25 };
    for (const ok of [done, { ...done, timings: {} }, { ...done, usage: { ...usage, completion_tokens_details: details } }, start, { type: "token", id: 0, text: "" }]) {
      expect(parseEvent(JSON.stringify(ok)), JSON.stringify(ok)).toEqual(ok);
    }
    const malformed = [
      { type: "done", text: "hi" },
      { ...done, finish_reason: "eos" },
      { ...done, text: 3 },
      { ...done, usage: { ...usage, completion_tokens: "1" } },
      { ...done, usage: null },
      { ...done, timings: undefined },
      { ...done, timings: { prefill_ms: "12" } },
      { ...done, timings: { internals: { host: "gpu-7" } } },
      { ...done, usage: { ...usage, completion_tokens_details: { ...details, rejected_prediction_tokens: "0" } } },
      { ...done, usage: { ...usage, completion_tokens_details: null } },
      { type: "token", id: -1, text: "a" },
      { type: "token", id: 1.5, text: "a" },
      { type: "token", id: 1 },
      { ...start, prompt_tokens: "200" },
      { ...start, queue_ms: undefined },
      { ...start, queue_ms: -1 },
    ];
    for (const m of malformed) expect(parseEvent(JSON.stringify(m)), JSON.stringify(m)).toEqual({ type: "error", code: "backend_error", message: "malformed backend event" });
  });
});

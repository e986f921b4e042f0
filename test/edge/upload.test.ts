/**
 * Upload validation for `POST /v1/vqa`: the byte-capped body reader and the multipart/JSON parser,
 * exercised with real Request objects inside workerd. Rejections assert status, code and that the
 * message names the offending field (or the limit, for body-level refusals).
 */
import fc from "fast-check";
import { describe, expect, inject, it } from "vitest";
import { ApiError } from "../../shared/src/errors.ts";
import {
  decodeBase64,
  decodeDataUri,
  parseVqaRequest,
  readBodyLimited,
  requestBodyCap,
  validateImageBytes,
  type VqaLimits,
} from "../../edge/src/upload/index.ts";
import { crc32 } from "../support/crc32.ts";

const g = inject("golden");

const LIMITS: VqaLimits = {
  maxUploadBytes: 1_000_000,
  maxImagePixels: 50_000_000,
  maxQuestionChars: 200,
  maxOptions: 10,
  minOptions: 2,
  maxOptionChars: 50,
  maxNewTokensCap: 2048,
};

function b64bytes(b64: string): Uint8Array {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
function toB64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}
const BRAIN = b64bytes(g.images["images/brain003631.png"]!); // 224x224 PNG
const JPEG = b64bytes(g.images["images/synth_rgb_1000x700.jpg"]!); // 1000x700 JPEG

/** A PNG signature + IHDR claiming w x h (valid CRC), followed by a dummy IDAT/IEND tail. */
function pngClaiming(w: number, h: number): Uint8Array {
  const out = BRAIN.slice(0, 33 + 64);
  const dv = new DataView(out.buffer);
  dv.setUint32(16, w);
  dv.setUint32(20, h);
  dv.setUint32(29, crc32(out.subarray(12, 29)));
  return out;
}
const te = new TextEncoder();

type Fields = Record<string, string | string[] | File>;
function multipart(fields: Fields): Request {
  const fd = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    if (Array.isArray(v)) for (const x of v) fd.append(k, x);
    else fd.append(k, v);
  }
  return new Request("http://edge.test/v1/vqa", { method: "POST", body: fd });
}
const file = (b: Uint8Array, type = "image/png", name = "scan.png") => new File([b], name, { type });
const baseMultipart = (over: Partial<Fields> = {}): Fields => ({
  image: file(BRAIN),
  question: "What imaging modality is shown?",
  options: ["CT", "MRI", "X-ray", "Ultrasound"],
  ...over,
});
function json(body: unknown): Request {
  return new Request("http://edge.test/v1/vqa", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}
const baseJson = (over: Record<string, unknown> = {}) => ({
  image: toB64(BRAIN),
  question: "What imaging modality is shown?",
  options: ["CT", "MRI"],
  ...over,
});

/** Awaits `p`, expecting an ApiError with `code`; returns it for further checks. */
async function rejects(p: Promise<unknown> | (() => unknown), code: string, status: number, mention?: string | RegExp): Promise<ApiError> {
  let err: unknown;
  try {
    await (typeof p === "function" ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err, "expected an ApiError").toBeInstanceOf(ApiError);
  const e = err as ApiError;
  expect(e.code).toBe(code);
  expect(e.status).toBe(status);
  if (mention !== undefined) expect(e.message).toMatch(mention);
  return e;
}

/** A body stream of `chunk`-byte pieces (at most `total` bytes, unbounded when undefined) that records its use. */
function countingStream(chunk: number, total?: number) {
  const stats = { pulls: 0, bytes: 0, cancelled: false };
  const stream = new ReadableStream<Uint8Array>(
    {
      pull(c) {
        stats.pulls++;
        const n = total === undefined ? chunk : Math.min(chunk, total - stats.bytes);
        if (n <= 0) return c.close();
        stats.bytes += n;
        c.enqueue(new Uint8Array(n).fill(7));
      },
      cancel() {
        stats.cancelled = true;
      },
    },
    { highWaterMark: 0 }, // no eager pull: every pull is caused by the reader
  );
  return { stream, stats };
}
const streamed = (stream: ReadableStream, headers: Record<string, string> = {}) =>
  new Request("http://edge.test/", { method: "POST", body: stream, headers, duplex: "half" } as RequestInit);

describe("readBodyLimited", () => {
  it("returns the whole body, across chunks, up to exactly the cap", async () => {
    const { stream } = countingStream(1000, 4500);
    const out = await readBodyLimited(streamed(stream), 4500);
    expect(out.length).toBe(4500);
    expect(out.every((x) => x === 7)).toBe(true);
    expect((await readBodyLimited(new Request("http://x/", { method: "POST", body: "abc" }), 10)).length).toBe(3);
    expect((await readBodyLimited(new Request("http://x/", { method: "GET" }), 10)).length).toBe(0);
  });

  it("refuses an honest Content-Length over the cap without reading the body", async () => {
    const { stream, stats } = countingStream(1000, 5000);
    await rejects(readBodyLimited(streamed(stream, { "content-length": "5000" }), 4999), "payload_too_large", 413, /4999 bytes/);
    expect(stats.pulls).toBe(0);
    expect(stats.bytes).toBe(0);
  });

  it("cancels a chunked body without Content-Length as soon as it passes the cap", async () => {
    const { stream, stats } = countingStream(64 * 1024); // endless
    await rejects(readBodyLimited(streamed(stream), 1_000_000), "payload_too_large", 413, /1000000 bytes/);
    expect(stats.cancelled).toBe(true);
    // 16 chunks reach 1 048 576 > cap: nothing past the chunk that crossed the cap was requested.
    expect(stats.bytes).toBe(16 * 64 * 1024);
  });

  it("does not trust a Content-Length that understates the body", async () => {
    const { stream, stats } = countingStream(1000, 100_000);
    await rejects(readBodyLimited(streamed(stream, { "content-length": "10" }), 5000), "payload_too_large", 413);
    expect(stats.bytes).toBeLessThanOrEqual(6000);
  });

  it("a body stream that errors is invalid_request", async () => {
    const stream = new ReadableStream({ pull(c) { c.error(new Error("connection reset")); } });
    await rejects(readBodyLimited(streamed(stream), 100), "invalid_request", 400, /body/);
  });
});

describe("parseVqaRequest: multipart/form-data", () => {
  it("options as repeated fields; all optional fields", async () => {
    const input = await parseVqaRequest(
      multipart(baseMultipart({ question: "  Which organ?  ", options: [" Brain ", "Liver", "Heart"], max_new_tokens: "512", min_pixels: "3136", max_pixels: "401408", stream: "1" })),
      LIMITS,
    );
    expect(input).toEqual({
      image: { bytes: BRAIN, mime: "image/png", width: 224, height: 224 },
      question: "Which organ?",
      options: ["Brain", "Liver", "Heart"],
      max_new_tokens: 512,
      min_pixels: 3136,
      max_pixels: 401408,
      stream: true,
    });
  });

  it("options as one field holding a JSON array; defaults when optional fields are absent", async () => {
    const input = await parseVqaRequest(
      multipart(baseMultipart({ image: file(JPEG, "image/jpeg", "x.jpg"), options: JSON.stringify(["A lesion", "No lesion"]), stream: "false" })),
      LIMITS,
    );
    expect(input.options).toEqual(["A lesion", "No lesion"]);
    expect(input.image).toMatchObject({ mime: "image/jpeg", width: 1000, height: 700 });
    expect(input.stream).toBe(false);
    expect("max_new_tokens" in input).toBe(false);
  });

  it("a file part without a declared type is judged by its bytes", async () => {
    const input = await parseVqaRequest(multipart(baseMultipart({ image: file(BRAIN, "application/octet-stream", "blob") })), LIMITS);
    expect(input.image.mime).toBe("image/png");
  });

  it("each golden case image parses to its recorded size", async () => {
    for (const c of g.cases) {
      for (const im of c.images) {
        const input = await parseVqaRequest(multipart(baseMultipart({ image: file(b64bytes(g.images[im.image]!), "", "f") })), LIMITS);
        expect([input.image.width, input.image.height], im.image).toEqual(im.original_size_wh);
      }
    }
  });

  it("oversize: honest Content-Length over the body cap", async () => {
    const cap = requestBodyCap(LIMITS, "multipart");
    const { stream, stats } = countingStream(1000, cap + 1);
    const req = streamed(stream, { "content-type": "multipart/form-data; boundary=x", "content-length": String(cap + 1) });
    await rejects(parseVqaRequest(req, LIMITS), "payload_too_large", 413, new RegExp(`${cap} bytes`));
    expect(stats.pulls).toBe(0);
  });

  it("oversize: chunked body without Content-Length is cut off", async () => {
    const { stream, stats } = countingStream(64 * 1024);
    const req = streamed(stream, { "content-type": "multipart/form-data; boundary=x" });
    await rejects(parseVqaRequest(req, LIMITS), "payload_too_large", 413, /exceeds the limit/);
    expect(stats.cancelled).toBe(true);
    expect(stats.bytes).toBeLessThanOrEqual(requestBodyCap(LIMITS, "multipart") + 64 * 1024);
  });

  it("oversize: an image file over maxUploadBytes inside an allowed body", async () => {
    const small = { ...LIMITS, maxUploadBytes: 10_000 };
    await rejects(parseVqaRequest(multipart(baseMultipart()), small), "payload_too_large", 413, /'image'.*10000 bytes/);
  });

  it("spoofed or unsupported types are 415", async () => {
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(BRAIN, "image/jpeg", "x.jpg") })), LIMITS), "unsupported_media_type", 415, /'image'.*image\/jpeg.*image\/png/);
    const gif = te.encode("GIF89a\x0a\x00\x0a\x00\x00\x00\x00;");
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(gif, "image/gif", "x.gif") })), LIMITS), "unsupported_media_type", 415, /'image'/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(gif, "image/png", "x.png") })), LIMITS), "unsupported_media_type", 415, /'image'/);
    const pdf = te.encode("%PDF-1.7\n1 0 obj\n<<>>\nendobj\n");
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(pdf, "application/pdf", "x.pdf") })), LIMITS), "unsupported_media_type", 415, /'image'/);
    // Real PNG bytes but a declared type we do not serve.
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(BRAIN, "image/gif", "x.gif") })), LIMITS), "unsupported_media_type", 415, /'image'/);
  });

  it("truncated or empty image is invalid_image", async () => {
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(BRAIN.slice(0, 20)) })), LIMITS), "invalid_image", 422, /'image'/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(new Uint8Array(0)) })), LIMITS), "invalid_image", 422, /'image'.*empty/);
  });

  it("bomb dimensions: a PNG header claiming 50000x50000", async () => {
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(pngClaiming(50000, 50000)) })), LIMITS), "image_too_large", 422, /'image'.*50000x50000.*50000000/);
  });

  it("extreme aspect ratio: 10x3000 refused, 10x2000 (exactly 200) accepted", async () => {
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(pngClaiming(10, 3000)) })), LIMITS), "aspect_ratio_too_large", 422, /'image'.*10x3000.*200/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: file(pngClaiming(3000, 10)) })), LIMITS), "aspect_ratio_too_large", 422, /'image'/);
    const ok = await parseVqaRequest(multipart(baseMultipart({ image: file(pngClaiming(10, 2000)) })), LIMITS);
    expect([ok.image.width, ok.image.height]).toEqual([10, 2000]);
  });

  it("options: too many, too few, empty, too long, malformed JSON array", async () => {
    const opts = (o: string | string[]) => parseVqaRequest(multipart(baseMultipart({ options: o })), LIMITS);
    await rejects(opts(Array.from({ length: 11 }, (_, i) => `option ${i}`)), "invalid_options", 422, /'options'.*at most 10.*11/);
    await rejects(opts(["only one"]), "invalid_options", 422, /'options'.*at least 2.*1/);
    await rejects(opts(JSON.stringify(["only one"])), "invalid_options", 422, /'options'.*at least 2/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ options: [] })), LIMITS), "invalid_options", 422, /'options'.*got 0/);
    await rejects(opts(["CT", "   "]), "invalid_options", 422, /'options' item 1.*empty/);
    await rejects(opts(["CT", "x".repeat(51)]), "invalid_options", 422, /'options' item 1.*50/);
    await rejects(opts("[\"CT\", \"MRI\""), "invalid_options", 422, /'options'/);
    await rejects(opts(JSON.stringify(["CT", 3])), "invalid_options", 422, /'options' item 1.*string/);
    await rejects(opts(JSON.stringify({ a: 1 })), "invalid_options", 422, /'options'.*at least 2/); // not an array: one option
    // 10 options and 50-character options are within the limits.
    expect((await opts(Array.from({ length: 10 }, (_, i) => `${i}`.padEnd(50, "y")))).options).toHaveLength(10);
  });

  it("question: missing, empty, too long, sent twice", async () => {
    const { question: _q, ...noQuestion } = baseMultipart();
    await rejects(parseVqaRequest(multipart(noQuestion), LIMITS), "invalid_question", 422, /'question'.*required/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ question: " \n\t " })), LIMITS), "invalid_question", 422, /'question'.*empty/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ question: "q".repeat(201) })), LIMITS), "invalid_question", 422, /'question'.*200/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ question: ["a?", "b?"] })), LIMITS), "invalid_question", 422, /'question'.*2 times/);
    // 200 astral characters are 400 UTF-16 units but 200 characters: accepted.
    expect((await parseVqaRequest(multipart(baseMultipart({ question: "🧠".repeat(200) })), LIMITS)).question).toHaveLength(400);
  });

  it("bad max_new_tokens, min/max_pixels, stream", async () => {
    const withField = (k: string, v: string) => parseVqaRequest(multipart(baseMultipart({ [k]: v })), LIMITS);
    for (const v of ["0", "-1", "abc", "1.5", "1e3", "2049", "12 34"]) {
      await rejects(withField("max_new_tokens", v), "invalid_parameter", 422, /'max_new_tokens'/);
    }
    await rejects(withField("max_new_tokens", "2049"), "invalid_parameter", 422, /'max_new_tokens'.*2048/);
    expect((await withField("max_new_tokens", "2048")).max_new_tokens).toBe(2048);
    expect("max_new_tokens" in (await withField("max_new_tokens", " "))).toBe(false); // blank form input = not sent
    await rejects(withField("min_pixels", "0"), "invalid_parameter", 422, /'min_pixels'/);
    await rejects(withField("max_pixels", "-5"), "invalid_parameter", 422, /'max_pixels'/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ min_pixels: "5000", max_pixels: "4000" })), LIMITS), "invalid_parameter", 422, /'min_pixels'.*'max_pixels'/);
    await rejects(withField("stream", "yes"), "invalid_parameter", 422, /'stream'/);
    expect((await withField("stream", "TRUE")).stream).toBe(true);
    expect((await withField("stream", "0")).stream).toBe(false);
  });

  it("resized_height and resized_width: both or neither, never with min/max_pixels", async () => {
    const form = (fields: Record<string, string>) => parseVqaRequest(multipart(baseMultipart(fields)), LIMITS);
    expect(await form({ resized_height: "280", resized_width: "420" })).toMatchObject({ resized_height: 280, resized_width: 420 });
    await rejects(form({ resized_height: "280" }), "invalid_parameter", 422, /'resized_height' and 'resized_width' go together/);
    await rejects(form({ resized_width: "420", resized_height: " " }), "invalid_parameter", 422, /go together/);
    await rejects(form({ resized_height: "280", resized_width: "0" }), "invalid_parameter", 422, /'resized_width'/);
    await rejects(form({ resized_height: "280", resized_width: "420", max_pixels: "401408" }), "invalid_parameter", 422, /cannot be combined/);
    await rejects(form({ resized_height: "280", resized_width: "420", min_pixels: "3136" }), "invalid_parameter", 422, /cannot be combined/);
    expect(await parseVqaRequest(json(baseJson({ resized_height: 280, resized_width: 420 })), LIMITS)).toMatchObject({ resized_height: 280, resized_width: 420 });
    await rejects(parseVqaRequest(json(baseJson({ resized_height: 280.5, resized_width: 420 })), LIMITS), "invalid_parameter", 422, /'resized_height'/);
    await rejects(parseVqaRequest(json(baseJson({ resized_width: 420 })), LIMITS), "invalid_parameter", 422, /go together/);
  });

  it("an unknown field is refused, not ignored (a misspelt parameter would silently take its default)", async () => {
    const withField = (k: string) => parseVqaRequest(multipart(baseMultipart({ [k]: "64" })), LIMITS);
    await rejects(withField("max_tokens"), "invalid_parameter", 422, /unknown field 'max_tokens'.*max_new_tokens/);
    await rejects(withField("options[]"), "invalid_parameter", 422, /unknown field 'options\[\]'/);
    // A name that is not a name (free text) is not quoted back.
    const e = await rejects(withField("patient Jane Doe, 1970"), "invalid_parameter", 422, /unknown field; /);
    expect(e.message).not.toContain("Jane");
  });

  it("missing image, two images, image as text, malformed multipart", async () => {
    const { image: _i, ...noImage } = baseMultipart();
    await rejects(parseVqaRequest(multipart(noImage), LIMITS), "invalid_request", 400, /'image'.*required/);
    const two = multipart(baseMultipart());
    const fd = await two.formData();
    fd.append("image", file(BRAIN));
    await rejects(parseVqaRequest(new Request("http://x/", { method: "POST", body: fd }), LIMITS), "invalid_request", 400, /'image'.*exactly one/);
    await rejects(parseVqaRequest(multipart(baseMultipart({ image: "data:image/png;base64,AAAA" })), LIMITS), "invalid_request", 400, /'image'.*file/);
    const broken = new Request("http://x/", { method: "POST", headers: { "content-type": "multipart/form-data; boundary=zzz" }, body: "not multipart at all" });
    await rejects(parseVqaRequest(broken, LIMITS), "invalid_request", 400, /multipart/);
  });

  it("a Content-Type that is neither multipart nor JSON is 415", async () => {
    for (const ct of ["text/plain", "application/x-www-form-urlencoded", "image/png"]) {
      const req = new Request("http://x/", { method: "POST", headers: { "content-type": ct }, body: BRAIN });
      await rejects(parseVqaRequest(req, LIMITS), "unsupported_media_type", 415, /Content-Type/);
    }
    await rejects(parseVqaRequest(new Request("http://x/", { method: "POST", body: BRAIN }), LIMITS), "unsupported_media_type", 415, /Content-Type/);
  });
});

describe("parseVqaRequest: application/json", () => {
  it("plain base64 image", async () => {
    const input = await parseVqaRequest(json(baseJson({ max_new_tokens: 64, stream: true })), LIMITS);
    expect(input).toEqual({
      image: { bytes: BRAIN, mime: "image/png", width: 224, height: 224 },
      question: "What imaging modality is shown?",
      options: ["CT", "MRI"],
      max_new_tokens: 64,
      stream: true,
    });
  });

  it("data: URI image (with parameters, line-wrapped base64)", async () => {
    const wrapped = toB64(JPEG).replace(/.{76}/g, "$&\r\n");
    const input = await parseVqaRequest(json(baseJson({ image: `data:image/jpeg;name=x.jpg;base64,${wrapped}` })), LIMITS);
    expect(input.image.bytes).toEqual(JPEG);
    expect(input.image).toMatchObject({ mime: "image/jpeg", width: 1000, height: 700 });
  });

  it("remote URLs are refused, never fetched", async () => {
    for (const url of ["https://example.com/scan.png", "http://169.254.169.254/latest", "file:///etc/passwd", "ftp://x/y.png"]) {
      await rejects(parseVqaRequest(json(baseJson({ image: url })), LIMITS), "remote_image_url", 422, /'image'.*remote image URLs are not fetched; send a data: URI/);
    }
  });

  it("spoofed data: URI type, non-image data: URI, non-base64 data: URI", async () => {
    await rejects(parseVqaRequest(json(baseJson({ image: `data:image/jpeg;base64,${toB64(BRAIN)}` })), LIMITS), "unsupported_media_type", 415, /'image'.*image\/jpeg/);
    await rejects(parseVqaRequest(json(baseJson({ image: `data:application/pdf;base64,${toB64(te.encode("%PDF-1.4"))}` })), LIMITS), "unsupported_media_type", 415, /'image'/);
    await rejects(parseVqaRequest(json(baseJson({ image: "data:image/png,%89PNG" })), LIMITS), "invalid_image", 422, /'image'.*base64/);
    await rejects(parseVqaRequest(json(baseJson({ image: toB64(te.encode("GIF89a\x01\x00\x01\x00")) })), LIMITS), "unsupported_media_type", 415, /'image'/);
  });

  it("decoded image over maxUploadBytes is 413 before validation", async () => {
    const small = { ...LIMITS, maxUploadBytes: 30_000 };
    await rejects(parseVqaRequest(json(baseJson()), small), "payload_too_large", 413, /'image'.*45181 bytes.*30000/);
    await rejects(parseVqaRequest(json(baseJson({ image: `data:image/png;base64,${toB64(BRAIN)}` })), small), "payload_too_large", 413, /'image'/);
  });

  it("body over the JSON cap (with and without Content-Length)", async () => {
    const cap = requestBodyCap(LIMITS, "json");
    const { stream, stats } = countingStream(64 * 1024);
    await rejects(parseVqaRequest(streamed(stream, { "content-type": "application/json" }), LIMITS), "payload_too_large", 413, new RegExp(`${cap} bytes`));
    expect(stats.cancelled).toBe(true);
    const { stream: s2, stats: st2 } = countingStream(1000);
    await rejects(parseVqaRequest(streamed(s2, { "content-type": "application/json", "content-length": String(cap + 1) }), LIMITS), "payload_too_large", 413);
    expect(st2.pulls).toBe(0);
  });

  it("malformed bodies and missing fields", async () => {
    await rejects(parseVqaRequest(json("{not json"), LIMITS), "invalid_json", 400);
    await rejects(parseVqaRequest(json("[1,2]"), LIMITS), "invalid_request", 400, /object/);
    await rejects(parseVqaRequest(json("null"), LIMITS), "invalid_request", 400, /object/);
    const badUtf8 = new Request("http://x/", { method: "POST", headers: { "content-type": "application/json" }, body: new Uint8Array([0x7b, 0xff, 0x7d]) });
    await rejects(parseVqaRequest(badUtf8, LIMITS), "invalid_json", 400);
    const { image: _i, ...noImage } = baseJson();
    await rejects(parseVqaRequest(json(noImage), LIMITS), "invalid_request", 400, /'image'.*required/);
    await rejects(parseVqaRequest(json(baseJson({ image: 42 })), LIMITS), "invalid_request", 400, /'image'/);
    await rejects(parseVqaRequest(json(baseJson({ image: "not base64!" })), LIMITS), "invalid_image", 422, /'image'.*base64/);
    await rejects(parseVqaRequest(json(baseJson({ image: toB64(BRAIN.slice(0, 30)) })), LIMITS), "invalid_image", 422, /'image'/);
  });

  it("an unknown field is refused", async () => {
    await rejects(parseVqaRequest(json(baseJson({ temperature: 0.7 })), LIMITS), "invalid_parameter", 422, /unknown field 'temperature'/);
  });

  it("field type errors name the field", async () => {
    await rejects(parseVqaRequest(json(baseJson({ question: "" })), LIMITS), "invalid_question", 422, /'question'.*empty/);
    await rejects(parseVqaRequest(json(baseJson({ question: 7 })), LIMITS), "invalid_question", 422, /'question'/);
    await rejects(parseVqaRequest(json(baseJson({ question: "bad \ud800 text" })), LIMITS), "invalid_question", 422, /'question'.*surrogate/);
    await rejects(parseVqaRequest(json(baseJson({ options: "CT,MRI" })), LIMITS), "invalid_options", 422, /'options'/);
    await rejects(parseVqaRequest(json(baseJson({ options: undefined })), LIMITS), "invalid_options", 422, /'options'.*required/);
    await rejects(parseVqaRequest(json(baseJson({ options: ["CT", null] })), LIMITS), "invalid_options", 422, /'options' item 1/);
    await rejects(parseVqaRequest(json(baseJson({ options: Array(11).fill("x") })), LIMITS), "invalid_options", 422, /'options'.*at most 10/);
    for (const v of [0, -3, 1.5, "64", 1e20, true, 4096]) {
      await rejects(parseVqaRequest(json(baseJson({ max_new_tokens: v })), LIMITS), "invalid_parameter", 422, /'max_new_tokens'/);
    }
    await rejects(parseVqaRequest(json(baseJson({ max_pixels: 0 })), LIMITS), "invalid_parameter", 422, /'max_pixels'/);
    await rejects(parseVqaRequest(json(baseJson({ stream: "maybe" })), LIMITS), "invalid_parameter", 422, /'stream'/);
    // null means "not sent".
    const input = await parseVqaRequest(json(baseJson({ max_new_tokens: null, stream: null })), LIMITS);
    expect(input.stream).toBe(false);
    expect("max_new_tokens" in input).toBe(false);
  });
});

describe("exports reused by the OpenAI-compatible route", () => {
  it("decodeDataUri returns the bytes and declared type; refuses remote URLs", async () => {
    const { bytes, declaredMime } = decodeDataUri(`data:IMAGE/PNG;base64,${toB64(BRAIN)}`);
    expect(bytes).toEqual(BRAIN);
    expect(declaredMime).toBe("image/png");
    await rejects(() => decodeDataUri("https://example.com/a.png"), "remote_image_url", 422, "remote image URLs are not fetched; send a data: URI");
    await rejects(() => decodeDataUri("iVBORw0KGgo="), "invalid_image", 422, /data:/);
    await rejects(() => decodeDataUri(`data:image/png;base64,${toB64(BRAIN)}`, 1000), "payload_too_large", 413);
  });

  it("validateImageBytes names the given field", async () => {
    await rejects(() => validateImageBytes(pngClaiming(50000, 50000), "image/png", LIMITS, "messages[0].content[1].image_url"), "image_too_large", 422, /messages\[0\]\.content\[1\]\.image_url/);
    expect(validateImageBytes(JPEG, "image/jpg", LIMITS)).toMatchObject({ mime: "image/jpeg", width: 1000, height: 700 });
  });

  it("decodeBase64 agrees with atob on random data, in both alphabets, padded or not", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), fc.boolean(), fc.boolean(), (data, urlSafe, stripPad) => {
        let s = toB64(data);
        if (urlSafe) s = s.replace(/\+/g, "-").replace(/\//g, "_");
        if (stripPad) s = s.replace(/=+$/, "");
        expect(decodeBase64(s)).toEqual(data);
      }),
      { numRuns: 500 },
    );
  });

  it("decodeBase64 rejects malformed input", async () => {
    for (const s of ["A", "AAAAA", "AA=A", "AA===", "A===", "QQ==QQ==", "ä"]) {
      await rejects(() => decodeBase64(s), "invalid_image", 422, /base64/);
    }
  });
});

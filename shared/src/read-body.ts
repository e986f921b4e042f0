/**
 * Byte-capped reading of a request body (the edge's uploads, the backend's wire requests). Clients may lie
 * about `Content-Length` or omit it (chunked transfer), so the declared length only allows an early refusal;
 * the real guard counts the bytes of the stream as they arrive and cancels it as soon as the count passes
 * the cap.
 */
import { ApiError } from "./errors.ts";

/**
 * Reads `request`'s body into one fresh `Uint8Array` (its own buffer: never a runtime chunk or a slice of
 * Node's shared pool, so it can be transferred to a worker thread) of at most `maxBytes` bytes.
 *
 * - `Content-Length` above the cap: `payload_too_large` (413) at once, without reading anything.
 * - Otherwise the stream is read chunk by chunk; once the total passes the cap the stream is cancelled
 *   and `payload_too_large` is thrown, so at most `maxBytes` plus one chunk is ever held.
 * - A body that fails mid-read (client gone): `invalid_request` (400).
 * - No body: an empty array.
 */
export async function readBodyLimited(request: Request, maxBytes: number): Promise<Uint8Array> {
  const tooLarge = () =>
    new ApiError("payload_too_large", `request body exceeds the limit of ${maxBytes} bytes`);

  const declared = parseContentLength(request.headers.get("content-length"));
  if (declared !== undefined && declared > maxBytes) {
    // Tell the runtime we will not read it; failures here do not matter.
    await request.body?.cancel().catch(() => {});
    throw tooLarge();
  }
  const body = request.body;
  if (!body) return new Uint8Array(0);

  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    let step: Awaited<ReturnType<typeof reader.read>>;
    try {
      step = await reader.read();
    } catch {
      throw new ApiError("invalid_request", "request body could not be read");
    }
    if (step.done) break;
    const chunk = step.value;
    total += chunk.byteLength;
    if (total > maxBytes) {
      await reader.cancel("payload too large").catch(() => {});
      throw tooLarge();
    }
    chunks.push(chunk);
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.byteLength;
  }
  return out;
}

/** A well-formed `Content-Length` (digits only), else undefined: a malformed one is not trusted either way. */
function parseContentLength(v: string | null): number | undefined {
  if (v === null || !/^\s*\d{1,16}\s*$/.test(v)) return undefined;
  return Number(v.trim());
}

/**
 * `POST /v1/vqa` request parsing: multipart/form-data (browsers, curl) or JSON (mobile clients) into one
 * normalized `VqaInput`, with every field validated against the server's limits. The image is checked
 * from its header only (type by magic bytes, dimensions, pixel and aspect caps); nothing is decoded here.
 *
 * Error messages name the field and the limit but never echo the user's text or image content.
 */
import { ApiError } from "../../../shared/src/errors.ts";
import { IMAGE_MIMES, ImageHeaderError, sniffImage, type ImageMime } from "../../../shared/src/image-header.ts";
import { readBodyLimited } from "../../../shared/src/read-body.ts";

/** Server limits applied while parsing (from the worker's config). */
export interface VqaLimits {
  /** Largest accepted image, in bytes (after base64 decoding for JSON bodies). */
  maxUploadBytes: number;
  /** Decompression-bomb guard: largest width × height an image header may declare. */
  maxImagePixels: number;
  /** Longest question, in Unicode code points (after trimming). */
  maxQuestionChars: number;
  /** Most answer options (the prompt letters them A, B, …). */
  maxOptions: number;
  /** Fewest answer options. */
  minOptions: number;
  /** Longest option, in Unicode code points (after trimming). */
  maxOptionChars: number;
  /** Highest `max_new_tokens` a request may ask for. */
  maxNewTokensCap: number;
}

/** An uploaded image whose header has been validated. */
export interface VqaImage {
  bytes: Uint8Array;
  /** The type found from the magic bytes (a client's declared type must agree with it). */
  mime: ImageMime;
  width: number;
  height: number;
}

/**
 * How a request asks for one image to be sized, with qwen_vl_utils' names: bounds that narrow the server's, or a
 * fixed size (both or neither, and not with the bounds). Absent fields were not sent.
 */
export interface ImageSizing {
  min_pixels?: number;
  max_pixels?: number;
  resized_height?: number;
  resized_width?: number;
}

/** The fields of {@link ImageSizing}. */
export const IMAGE_SIZING_FIELDS = ["min_pixels", "max_pixels", "resized_height", "resized_width"] as const;

/** A validated `/v1/vqa` request. Optional numbers are absent when the client did not send them. */
export interface VqaInput extends ImageSizing {
  image: VqaImage;
  /** Trimmed, non-empty. */
  question: string;
  /** Trimmed, non-empty, `minOptions`..`maxOptions` of them. */
  options: string[];
  max_new_tokens?: number;
  stream: boolean;
}

/** smart_resize (qwen_vl_utils / transformers) refuses images whose long side exceeds 200 × the short side. */
export const MAX_ASPECT_RATIO = 200;

/**
 * The byte cap for a whole `/v1/vqa` body: the image cap (grown by base64's 4/3 plus line-break slack for
 * JSON) plus room for the question, options and framing (worst-case escaping of every character).
 */
export function requestBodyCap(limits: VqaLimits, kind: "multipart" | "json"): number {
  const textChars = limits.maxQuestionChars + limits.maxOptions * limits.maxOptionChars;
  const text = 64 * 1024 + 12 * textChars;
  const image = kind === "json" ? Math.ceil(((limits.maxUploadBytes * 4) / 3) * 1.07) : limits.maxUploadBytes;
  return image + text;
}

/**
 * Reads and validates a `/v1/vqa` request (multipart/form-data or application/json) into a `VqaInput`.
 * Throws `ApiError` with a stable code for every kind of bad input (see the API docs for the list).
 */
export async function parseVqaRequest(request: Request, limits: VqaLimits): Promise<VqaInput> {
  if ((await acceptedMediaType(request, ["multipart/form-data", "application/json"])) === "multipart/form-data") {
    const body = await readBodyLimited(request, requestBodyCap(limits, "multipart"));
    return parseMultipart(body, request.headers.get("content-type") ?? "", limits);
  }
  const body = await readBodyLimited(request, requestBodyCap(limits, "json"));
  return parseJson(body, limits);
}

/**
 * The media type of `request`'s body (Content-Type without parameters, lower-case) when it is one of
 * `accepted`; otherwise the body is cancelled unread and `unsupported_media_type` (415) is thrown.
 */
export async function acceptedMediaType<T extends string>(request: Request, accepted: readonly T[]): Promise<T> {
  const essence = (request.headers.get("content-type") ?? "").split(";")[0]!.trim().toLowerCase();
  if ((accepted as readonly string[]).includes(essence)) return essence as T;
  // Refuse before reading anything.
  await request.body?.cancel().catch(() => {});
  throw new ApiError("unsupported_media_type", `Content-Type must be ${accepted.join(" or ")}`);
}

// ----------------------------------------------------------------------------------------- multipart

async function parseMultipart(body: Uint8Array, contentType: string, limits: VqaLimits): Promise<VqaInput> {
  let form: FormData;
  try {
    // Parsed only after the capped read, from bytes we already hold.
    form = await new Response(body, { headers: { "content-type": contentType } }).formData();
  } catch {
    throw new ApiError("invalid_request", "body is not valid multipart/form-data (check the boundary)");
  }

  refuseUnknownFields(form.keys());
  const images = entries(form, "image");
  if (images.length === 0) throw new ApiError("invalid_request", "field 'image' is required (one image file)");
  if (images.length > 1) throw new ApiError("invalid_request", `field 'image' must hold exactly one image, got ${images.length}`);
  const file = images[0]!;
  if (typeof file === "string") throw new ApiError("invalid_request", "field 'image' must be a file part, not text");
  // Cheap refusal before copying the file's bytes.
  if (file.size > limits.maxUploadBytes) throw imageTooManyBytes("image", file.size, limits.maxUploadBytes);
  const image = validateImageBytes(new Uint8Array(await file.arrayBuffer()), file.type, limits, "image");

  const question = checkQuestion(singleText(form, "question", "invalid_question"), limits);

  const rawOptions = entries(form, "options");
  let options: unknown[] = rawOptions;
  // One field holding a JSON array is the alternative to repeated fields.
  const first = rawOptions[0];
  if (rawOptions.length === 1 && typeof first === "string" && first.trimStart().startsWith("[")) {
    options = parseOptionsJson(first);
  }
  const out: VqaInput = { image, question, options: checkOptions(options, limits), stream: false };

  // A blank field counts as not sent: HTML forms submit empty inputs as "".
  const param = (name: string) => {
    const v = singleText(form, name, "invalid_parameter");
    return v === undefined || v.trim() === "" ? undefined : new FormText(v);
  };
  const mnt = param("max_new_tokens");
  if (mnt) out.max_new_tokens = checkPositiveInt("max_new_tokens", mnt, limits.maxNewTokensCap);
  Object.assign(out, checkImageSizing(param));
  const stream = param("stream");
  if (stream) out.stream = checkStream(stream);
  return out;
}

/**
 * All values of a form field. The default workers-types describe pre-2021 FormData (strings only); with
 * this worker's compatibility date, file parts are `File` objects.
 */
function entries(form: FormData, name: string): (string | File)[] {
  return form.getAll(name) as unknown as (string | File)[];
}

/** A form field's text, marked so that parameter checks may parse it (JSON values must be typed). */
class FormText {
  constructor(readonly text: string) {}
}

/** The single text value of a form field, undefined when absent. */
function singleText(form: FormData, name: string, code: "invalid_question" | "invalid_parameter"): string | undefined {
  const values = entries(form, name);
  if (values.length === 0) return undefined;
  if (values.length > 1) throw new ApiError(code, `field '${name}' was sent ${values.length} times; send it once`);
  const v = values[0]!;
  if (typeof v !== "string") throw new ApiError(code, `field '${name}' must be text, not a file`);
  return v;
}

function parseOptionsJson(text: string): unknown[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ApiError("invalid_options", "field 'options' looks like a JSON array but does not parse");
  }
  // Text starting with '[' that parses is an array.
  return parsed as unknown[];
}

// ---------------------------------------------------------------------------------------------- JSON

async function parseJson(body: Uint8Array, limits: VqaLimits): Promise<VqaInput> {
  let o: unknown;
  try {
    o = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(body));
  } catch {
    throw new ApiError("invalid_json", "body is not valid UTF-8 JSON");
  }
  if (typeof o !== "object" || o === null || Array.isArray(o)) {
    throw new ApiError("invalid_request", "body must be a JSON object");
  }
  const req = o as Record<string, unknown>;
  refuseUnknownFields(Object.keys(req));

  const img = req.image;
  if (img === undefined || img === null || img === "") {
    throw new ApiError("invalid_request", "field 'image' is required (base64 or a data:image/...;base64 URI)");
  }
  if (typeof img !== "string") throw new ApiError("invalid_request", "field 'image' must be a string (base64 or data: URI)");
  let bytes: Uint8Array;
  let declared: string | undefined;
  if (/^[a-z][a-z0-9+.-]*:/i.test(img.trimStart())) {
    // Base64 never contains ':', so a scheme means a URI.
    ({ bytes, declaredMime: declared } = decodeDataUri(img, limits.maxUploadBytes, "image"));
  } else {
    bytes = decodeBase64(img, limits.maxUploadBytes, "image");
  }
  const image = validateImageBytes(bytes, declared, limits, "image");

  const question = checkQuestion(req.question, limits);
  if (req.options === undefined || req.options === null) {
    throw new ApiError("invalid_options", `field 'options' is required (${limits.minOptions} to ${limits.maxOptions} strings)`);
  }
  if (!Array.isArray(req.options)) throw new ApiError("invalid_options", "field 'options' must be an array of strings");
  const out: VqaInput = { image, question, options: checkOptions(req.options, limits), stream: false };

  if (present(req.max_new_tokens)) out.max_new_tokens = checkPositiveInt("max_new_tokens", req.max_new_tokens, limits.maxNewTokensCap);
  Object.assign(out, checkImageSizing((name) => (present(req[name]) ? req[name] : undefined)));
  if (present(req.stream)) out.stream = checkStream(req.stream);
  return out;
}

const present = (v: unknown) => v !== undefined && v !== null;

// ------------------------------------------------------------------------------------------- fields

/** The fields `/v1/vqa` reads. */
export const VQA_FIELDS: readonly string[] = ["image", "question", "options", "max_new_tokens", ...IMAGE_SIZING_FIELDS, "stream"];

/**
 * Any other field is refused (422), so that a misspelt parameter (`max_tokens`, `options[]`) is not silently
 * ignored. The field's name is quoted only when it looks like a name (never free text a client put there).
 */
export function refuseUnknownFields(names: Iterable<string>, allowed: readonly string[] = VQA_FIELDS, where = "/v1/vqa"): void {
  for (const name of names) {
    if (allowed.includes(name)) continue;
    const shown = /^[A-Za-z0-9_.[\]-]{1,40}$/.test(name) ? ` '${name}'` : "";
    throw new ApiError("invalid_parameter", `unknown field${shown}; ${where} accepts ${allowed.join(", ")}`);
  }
}

function checkQuestion(v: unknown, limits: VqaLimits): string {
  if (v === undefined || v === null) throw new ApiError("invalid_question", "field 'question' is required");
  if (typeof v !== "string") throw new ApiError("invalid_question", "field 'question' must be a string");
  const q = v.trim();
  if (q === "") throw new ApiError("invalid_question", "field 'question' must not be empty");
  if (tooLong(q, limits.maxQuestionChars)) {
    throw new ApiError("invalid_question", `field 'question' exceeds the limit of ${limits.maxQuestionChars} characters`);
  }
  if (hasLoneSurrogate(q)) throw new ApiError("invalid_question", "field 'question' contains invalid Unicode (lone surrogate)");
  return q;
}

function checkOptions(list: unknown[], limits: VqaLimits): string[] {
  if (list.length < limits.minOptions) {
    throw new ApiError("invalid_options", `field 'options' needs at least ${limits.minOptions} options, got ${list.length}`);
  }
  if (list.length > limits.maxOptions) {
    throw new ApiError("invalid_options", `field 'options' allows at most ${limits.maxOptions} options, got ${list.length}`);
  }
  return list.map((v, i) => {
    if (typeof v !== "string") throw new ApiError("invalid_options", `field 'options' item ${i} must be a string`);
    const s = v.trim();
    if (s === "") throw new ApiError("invalid_options", `field 'options' item ${i} must not be empty`);
    if (tooLong(s, limits.maxOptionChars)) {
      throw new ApiError("invalid_options", `field 'options' item ${i} exceeds the limit of ${limits.maxOptionChars} characters`);
    }
    if (hasLoneSurrogate(s)) throw new ApiError("invalid_options", `field 'options' item ${i} contains invalid Unicode (lone surrogate)`);
    return s;
  });
}

/**
 * A positive safe integer, at most `cap` when given: a JSON number, or (form fields, which are text)
 * decimal digits. JSON strings are refused so that both encodings stay strictly typed.
 */
function checkPositiveInt(name: string, v: unknown, cap?: number): number {
  let n: number;
  if (typeof v === "number") n = v;
  else if (v instanceof FormText && /^\s*\+?\d{1,16}\s*$/.test(v.text)) n = Number(v.text.trim());
  else throw new ApiError("invalid_parameter", `field '${name}' must be a positive integer`);
  if (!Number.isSafeInteger(n) || n <= 0) throw new ApiError("invalid_parameter", `field '${name}' must be a positive integer`);
  if (cap !== undefined && n > cap) throw new ApiError("invalid_parameter", `field '${name}' exceeds the limit of ${cap}`);
  return n;
}

function checkStream(v: unknown): boolean {
  if (typeof v === "boolean") return v;
  if (v instanceof FormText) {
    const s = v.text.trim().toLowerCase();
    if (s === "true" || s === "1") return true;
    if (s === "false" || s === "0") return false;
  }
  throw new ApiError("invalid_parameter", "field 'stream' must be true/false (or \"1\"/\"0\")");
}

/**
 * Reads and checks one image's {@link ImageSizing} fields: `read(name)` gives a field's value (undefined when not
 * sent); `prefix` names where they sit in error messages (e.g. `messages[0].content[1].image_url.`).
 */
export function checkImageSizing(read: (name: string) => unknown, prefix = ""): ImageSizing {
  const out: ImageSizing = {};
  for (const name of IMAGE_SIZING_FIELDS) {
    const v = read(name);
    if (v !== undefined) out[name] = checkPositiveInt(prefix + name, v);
  }
  if (out.min_pixels !== undefined && out.max_pixels !== undefined && out.min_pixels > out.max_pixels) {
    throw new ApiError("invalid_parameter", `field '${prefix}min_pixels' must not exceed field '${prefix}max_pixels'`);
  }
  const fixed = [out.resized_height, out.resized_width].filter((v) => v !== undefined).length;
  if (fixed === 1) throw new ApiError("invalid_parameter", `fields '${prefix}resized_height' and '${prefix}resized_width' go together`);
  // qwen_vl_utils would silently ignore the bounds next to a fixed size: refused, so no client is surprised.
  if (fixed === 2 && (out.min_pixels !== undefined || out.max_pixels !== undefined)) {
    throw new ApiError("invalid_parameter", `fields '${prefix}resized_height'/'${prefix}resized_width' cannot be combined with '${prefix}min_pixels'/'${prefix}max_pixels'`);
  }
  return out;
}

/** Whether `s` has more than `limit` code points (counting stops just past the limit). */
function tooLong(s: string, limit: number): boolean {
  if (s.length <= limit) return false; // code points never outnumber UTF-16 units
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    if (++n > limit) return true;
  }
  return false;
}

function hasLoneSurrogate(s: string): boolean {
  return /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(s);
}

// ------------------------------------------------------------------------------------------- images

function imageTooManyBytes(field: string, n: number, max: number): ApiError {
  return new ApiError("payload_too_large", `field '${field}' is ${n} bytes; the limit is ${max} bytes`);
}

const MIME_ALIASES: Record<string, ImageMime> = {
  "image/png": "image/png",
  "image/x-png": "image/png",
  "image/jpeg": "image/jpeg",
  "image/jpg": "image/jpeg",
  "image/pjpeg": "image/jpeg",
  "image/webp": "image/webp",
};

/**
 * Validates an image's bytes from its header: a PNG/JPEG/WebP by magic bytes, agreeing with the client's
 * declared type (`declaredMime`; empty, undefined or application/octet-stream means "not declared"),
 * within the byte cap, the pixel cap (`maxImagePixels`) and smart_resize's aspect-ratio limit.
 * `field` names the request field in error messages.
 */
export function validateImageBytes(
  bytes: Uint8Array,
  declaredMime: string | undefined,
  limits: Pick<VqaLimits, "maxUploadBytes" | "maxImagePixels">,
  field = "image",
): VqaImage {
  if (bytes.length === 0) throw new ApiError("invalid_image", `field '${field}' is empty`);
  if (bytes.length > limits.maxUploadBytes) throw imageTooManyBytes(field, bytes.length, limits.maxUploadBytes);
  let header;
  try {
    header = sniffImage(bytes);
  } catch (e) {
    if (e instanceof ImageHeaderError) throw new ApiError(e.code, `field '${field}': ${e.message}`);
    throw e;
  }
  const declared = (declaredMime ?? "").split(";")[0]!.trim().toLowerCase();
  if (declared !== "" && declared !== "application/octet-stream") {
    const norm = MIME_ALIASES[declared];
    if (norm === undefined) {
      throw new ApiError("unsupported_media_type", `field '${field}' declares an unsupported type; send ${IMAGE_MIMES.join(", ")}`);
    }
    if (norm !== header.mime) {
      throw new ApiError("unsupported_media_type", `field '${field}' is declared as ${norm} but its bytes are ${header.mime}`);
    }
  }
  const { width, height } = header;
  if (width * height > limits.maxImagePixels) {
    throw new ApiError(
      "image_too_large",
      `field '${field}' is ${width}x${height} = ${width * height} pixels; the limit is ${limits.maxImagePixels}`,
    );
  }
  if (Math.max(width, height) / Math.min(width, height) > MAX_ASPECT_RATIO) {
    throw new ApiError(
      "aspect_ratio_too_large",
      `field '${field}' is ${width}x${height}; the long side may be at most ${MAX_ASPECT_RATIO} times the short side`,
    );
  }
  return { bytes, mime: header.mime, width, height };
}

// ---------------------------------------------------------------------------------- data URIs, base64

/**
 * Decodes a `data:image/...;base64,...` URI. Remote or other URLs (http:, https:, file:, …) are refused
 * with `remote_image_url`: the edge never fetches on a client's behalf. Non-image or non-base64 data URIs
 * are refused too. With `maxBytes`, a payload whose decoded size would exceed it is refused (413) before
 * anything is allocated. `field` names the request field in error messages.
 */
export function decodeDataUri(uri: string, maxBytes?: number, field = "image"): { bytes: Uint8Array; declaredMime: string } {
  const s = uri.trimStart();
  if (!/^data:/i.test(s)) {
    if (/^[a-z][a-z0-9+.-]*:/i.test(s)) {
      throw new ApiError("remote_image_url", `field '${field}': remote image URLs are not fetched; send a data: URI`);
    }
    throw new ApiError("invalid_image", `field '${field}' must be a data:image/...;base64,... URI`);
  }
  const comma = s.indexOf(",");
  if (comma < 0) throw new ApiError("invalid_image", `field '${field}' is a data: URI without a ',' separator`);
  const params = s.slice(5, comma).split(";").map((p) => p.trim().toLowerCase());
  const mime = params[0] ?? "";
  if (params.length < 2 || params[params.length - 1] !== "base64") {
    throw new ApiError("invalid_image", `field '${field}': only base64 data: URIs are accepted (data:image/...;base64,...)`);
  }
  if (!mime.startsWith("image/")) {
    throw new ApiError("unsupported_media_type", `field '${field}' is a data: URI of a non-image type; send ${IMAGE_MIMES.join(", ")}`);
  }
  return { bytes: decodeBase64(s.slice(comma + 1), maxBytes, field), declaredMime: mime };
}

// Lookup: base64 digit value, -1 invalid, -2 ASCII whitespace. Both the standard and URL-safe alphabets.
const B64 = new Int8Array(128).fill(-1);
for (let i = 0; i < 64; i++) B64["ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".charCodeAt(i)] = i;
B64["-".charCodeAt(0)] = 62;
B64["_".charCodeAt(0)] = 63;
for (const c of " \t\r\n\f") B64[c.charCodeAt(0)] = -2;

/**
 * Strict base64 (standard or URL-safe alphabet, optional '=' padding, ASCII whitespace ignored).
 * Invalid input: `invalid_image`. Decoded size over `maxBytes`: `payload_too_large`, checked before decoding.
 */
export function decodeBase64(text: string, maxBytes?: number, field = "image"): Uint8Array {
  const bad = () => new ApiError("invalid_image", `field '${field}' is not valid base64`);
  // Pass 1: validate and count digits, so the size is known before allocating.
  let digits = 0;
  let pad = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const v = c < 128 ? B64[c]! : -1;
    if (v === -2) continue;
    if (c === 0x3d /* = */) {
      pad++;
      continue;
    }
    if (v < 0 || pad > 0) throw bad(); // no digits after padding
    digits++;
  }
  if (pad > 2 || digits % 4 === 1 || (pad > 0 && (digits + pad) % 4 !== 0)) throw bad();
  const size = Math.floor((digits * 6) / 8);
  if (maxBytes !== undefined && size > maxBytes) throw imageTooManyBytes(field, size, maxBytes);
  // Pass 2: decode.
  const out = new Uint8Array(size);
  let acc = 0, bits = 0, o = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const v = B64[c]!; // every character was checked above
    if (v < 0) continue; // whitespace; '=' maps to -1 and only trails
    acc = ((acc << 6) | v) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (acc >>> bits) & 0xff;
    }
  }
  return out;
}

/**
 * Protocol-buffers wire encoding, just what ONNX's messages need: varints (incl. negative int64),
 * fixed32 floats, length-delimited bytes/strings/sub-messages and packed repeated scalars.
 *
 * Large payloads (tensor bytes) may be *deferred*: only their length is known while the message tree
 * is built, and the bytes are produced when the message is written out. That lets a multi-GB model be
 * serialized with one tensor in memory at a time.
 */
import { NamedError } from "../../../shared/src/errors.ts";

/**
 * Bytes whose length is known now and whose content is produced when written: all at once (`read`) or,
 * to keep peak memory low for large transformed tensors, as a sequence of pieces (`chunks`, preferred by
 * the file writer when present).
 */
export interface DeferredBytes {
  readonly byteLength: number;
  /** Produces exactly `byteLength` bytes. Called at most once per write. */
  read(): Promise<Uint8Array> | Uint8Array;
  /** Produces the same bytes in pieces. */
  chunks?(): AsyncIterable<Uint8Array>;
}

/** A piece of an encoded message: literal bytes or a deferred payload. */
export type Chunk = Uint8Array | DeferredBytes;

/** Protobuf wire types used here. */
const WIRE_VARINT = 0;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

const TWO_POW_64 = 1n << 64n;

/** Thrown when a value cannot be encoded (out of range, non-integer, wrong deferred length). */
export class ProtobufEncodeError extends NamedError {}

/**
 * A message under construction. Fields are appended in call order; nested messages are embedded by
 * value (their length is final once they are added).
 */
export class ProtoMessage {
  private readonly done: Chunk[] = [];
  private buf = new Uint8Array(64);
  private pos = 0;
  private flushedLength = 0;

  /** Total encoded length in bytes, deferred payloads included. */
  get byteLength(): number {
    return this.flushedLength + this.pos;
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
  }

  private flush(): void {
    if (this.pos === 0) return;
    this.done.push(this.buf.slice(0, this.pos));
    this.flushedLength += this.pos;
    this.pos = 0;
  }

  private rawVarint(value: number | bigint): void {
    let v: bigint;
    if (typeof value === "number") {
      if (!Number.isSafeInteger(value)) throw new ProtobufEncodeError(`not a safe integer: ${value}`);
      v = BigInt(value);
    } else {
      v = value;
    }
    if (v < -(1n << 63n) || v >= TWO_POW_64) throw new ProtobufEncodeError(`varint out of int64/uint64 range: ${v}`);
    if (v < 0n) v += TWO_POW_64; // int64 two's complement: always 10 bytes
    this.ensure(10);
    // Fast path for the common small values.
    if (v < 0x80n) {
      this.buf[this.pos++] = Number(v);
      return;
    }
    while (v >= 0x80n) {
      this.buf[this.pos++] = Number(v & 0x7fn) | 0x80;
      v >>= 7n;
    }
    this.buf[this.pos++] = Number(v);
  }

  private tag(field: number, wire: number): void {
    if (!Number.isInteger(field) || field < 1 || field > 0x1fffffff) throw new ProtobufEncodeError(`bad field number ${field}`);
    this.rawVarint(field * 8 + wire);
  }

  /** int32/int64/uint64/enum/bool field (varint; negative values as 64-bit two's complement). */
  varint(field: number, value: number | bigint | boolean): this {
    this.tag(field, WIRE_VARINT);
    this.rawVarint(typeof value === "boolean" ? (value ? 1 : 0) : value);
    return this;
  }

  /** `float` field (fixed32, little-endian IEEE single). */
  float(field: number, value: number): this {
    this.tag(field, WIRE_FIXED32);
    this.ensure(4);
    new DataView(this.buf.buffer, this.buf.byteOffset).setFloat32(this.pos, value, true);
    this.pos += 4;
    return this;
  }

  /** `string` field (UTF-8). */
  string(field: number, value: string): this {
    return this.bytes(field, new TextEncoder().encode(value));
  }

  /** `bytes` field; a deferred payload is produced only when the message is written. */
  bytes(field: number, value: Uint8Array | DeferredBytes): this {
    this.tag(field, WIRE_LEN);
    this.rawVarint(value.byteLength);
    if (value instanceof Uint8Array && value.byteLength <= 4096) {
      this.ensure(value.byteLength);
      this.buf.set(value, this.pos);
      this.pos += value.byteLength;
    } else {
      this.flush();
      this.done.push(value);
      this.flushedLength += value.byteLength;
    }
    return this;
  }

  /** Embedded message field. */
  message(field: number, msg: ProtoMessage): this {
    this.tag(field, WIRE_LEN);
    this.rawVarint(msg.byteLength);
    this.flush();
    for (const c of msg.chunks()) this.done.push(c);
    this.flushedLength += msg.byteLength;
    return this;
  }

  /** Packed repeated varint field (int64/int32). Writes nothing for an empty list. */
  packedVarints(field: number, values: ArrayLike<number | bigint>): this {
    if (values.length === 0) return this;
    const inner = new ProtoMessage();
    for (let i = 0; i < values.length; i++) inner.rawVarint(values[i]!);
    this.tag(field, WIRE_LEN);
    this.rawVarint(inner.byteLength);
    const bytes = inner.buf.subarray(0, inner.pos);
    this.ensure(bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
    return this;
  }

  /** Packed repeated float field. Writes nothing for an empty list. */
  packedFloats(field: number, values: ArrayLike<number>): this {
    if (values.length === 0) return this;
    const f32 = Float32Array.from(values);
    return this.bytes(field, new Uint8Array(f32.buffer));
  }

  /** The encoded message as chunks (literal bytes and deferred payloads, in order). */
  chunks(): Chunk[] {
    this.flush();
    return this.done.slice();
  }

  /** The whole encoding in one buffer (resolves deferred payloads). For small messages and tests. */
  async toBytes(): Promise<Uint8Array> {
    const out = new Uint8Array(this.byteLength);
    let off = 0;
    for (const c of this.chunks()) {
      const bytes = c instanceof Uint8Array ? c : await resolveDeferred(c);
      out.set(bytes, off);
      off += bytes.byteLength;
    }
    return out;
  }
}

/** Reads a deferred payload and checks that it has the promised length. */
export async function resolveDeferred(d: DeferredBytes): Promise<Uint8Array> {
  const bytes = await d.read();
  if (bytes.byteLength !== d.byteLength) {
    throw new ProtobufEncodeError(`deferred payload produced ${bytes.byteLength} bytes, promised ${d.byteLength}`);
  }
  return bytes;
}

/** The pieces of a deferred payload (one piece when it has no `chunks`), checking the total length. */
export async function* deferredChunks(d: DeferredBytes): AsyncGenerator<Uint8Array> {
  if (!d.chunks) {
    yield await resolveDeferred(d);
    return;
  }
  let total = 0;
  for await (const c of d.chunks()) {
    total += c.byteLength;
    if (total > d.byteLength) break;
    yield c;
  }
  if (total !== d.byteLength) throw new ProtobufEncodeError(`deferred payload produced ${total}+ bytes, promised ${d.byteLength}`);
}

/**
 * Relays the backend's NDJSON events to a client: collected into one result, or re-framed as Server-Sent
 * Events as tokens arrive. Either way the request ends in exactly one final answer or one error, and a
 * client that goes away aborts the backend call (which cancels the generation there).
 */
import { ApiError } from "../../shared/src/errors.ts";
import type { FinishReason, Timings, Usage } from "../../shared/src/api.ts";
import { type BackendCall, clientErrorOf } from "./backend/client.ts";

export interface Completion {
  text: string;
  finish_reason: FinishReason;
  usage: Usage;
  timings: Timings;
}

export interface TokenDelta {
  id: number;
  text: string;
  index: number;
}

/**
 * Reads events until `done`; calls `onToken` for each token. Throws ApiError for an `error` event, for a
 * stream that ends without `done`, and for a broken connection.
 */
export async function consume(call: BackendCall, onToken?: (t: TokenDelta) => void | Promise<void>): Promise<Completion> {
  let index = 0;
  try {
    for await (const ev of call.events) {
      if (ev.type === "token") await onToken?.({ id: ev.id, text: ev.text, index: index++ });
      else if (ev.type === "done") {
        return { text: ev.text, finish_reason: ev.finish_reason, usage: ev.usage, timings: ev.timings };
      } else if (ev.type === "error") throw clientErrorOf(ev.code, ev.message);
    }
  } catch (e) {
    if (e instanceof ApiError) throw e;
    if (call.timeout.aborted) throw new ApiError("backend_timeout", "the model did not finish in time");
    throw new ApiError("backend_error", "the connection to the model backend broke");
  }
  throw new ApiError("backend_error", "the model backend ended the stream without a result");
}

export interface SseFormat {
  token(t: TokenDelta): string;
  done(c: Completion): string;
  error(e: ApiError): string;
}

export function sseEvent(data: unknown, event?: string): string {
  return `${event ? `event: ${event}\n` : ""}data: ${typeof data === "string" ? data : JSON.stringify(data)}\n\n`;
}

/**
 * An SSE body. Cancelling it (client disconnect) aborts `abort`, which aborts the backend fetch.
 * `onEnd` runs once, with the outcome, when the stream is finished, failed or cancelled.
 */
export function sseStream(
  call: BackendCall,
  abort: AbortController,
  format: SseFormat,
  onEnd: (outcome: { completion?: Completion; error?: ApiError; cancelled?: boolean }) => void,
): ReadableStream<Uint8Array> {
  const enc = new TextEncoder();
  let ended = false;
  const end = (o: Parameters<typeof onEnd>[0]) => {
    if (!ended) {
      ended = true;
      onEnd(o);
    }
  };
  return new ReadableStream<Uint8Array>({
    async start(controller) {
      try {
        const completion = await consume(call, (t) => {
          if (!ended) controller.enqueue(enc.encode(format.token(t)));
        });
        if (ended) return;
        controller.enqueue(enc.encode(format.done(completion)));
        end({ completion });
      } catch (e) {
        if (ended) return;
        const err = e instanceof ApiError ? e : new ApiError("internal_error", "internal error");
        controller.enqueue(enc.encode(format.error(err)));
        end({ error: err });
      }
      controller.close();
    },
    cancel() {
      end({ cancelled: true });
      abort.abort();
    },
  });
}

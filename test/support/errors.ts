/** Assertions on the project's typed errors (shared/src/errors.ts); no Node imports, so edge tests may use it too. */
import { ApiError, type CodedError } from "../../shared/src/errors.ts";

type ErrorClass<E extends CodedError<string>> = abstract new (...args: never[]) => E;

/**
 * The `code` of the error `f` throws when it is a `cls` (default `ApiError`); a "not a …" string for any other
 * throw (so an equality assertion fails and shows it); undefined when `f` returns.
 */
export function codeOf<E extends CodedError<string> = ApiError>(f: () => unknown, cls: ErrorClass<E> = ApiError as unknown as ErrorClass<E>): E["code"] | string | undefined {
  try {
    f();
  } catch (e) {
    return e instanceof cls ? e.code : `not a ${cls.name}: ${String(e)}`;
  }
  return undefined;
}

/** Awaits `p`, which must reject with a `cls`: its code and message (throws otherwise). */
export async function rejectionOf<E extends CodedError<string>>(p: Promise<unknown>, cls: ErrorClass<E>): Promise<{ code: E["code"]; message: string }> {
  try {
    await p;
  } catch (e) {
    if (e instanceof cls) return { code: e.code, message: e.message };
    throw new Error(`expected a ${cls.name}, got ${String(e)}`);
  }
  throw new Error(`expected a ${cls.name}, nothing was thrown`);
}

/** The error `f` throws, which must be a `cls` (throws, failing the test, otherwise). */
export function thrownBy<E extends Error>(f: () => unknown, cls: abstract new (...args: never[]) => E): E {
  try {
    f();
  } catch (e) {
    if (e instanceof cls) return e;
    throw new Error(`expected a ${cls.name}, got ${String(e)}`);
  }
  throw new Error(`expected a ${cls.name}, nothing was thrown`);
}

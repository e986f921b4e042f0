/**
 * The evaluation's journal: one JSON line per answered item, appended and flushed as each item ends, beside
 * the results file (`<out>.partial.jsonl`). A run that stops (an expired token, a lost network, Ctrl-C) keeps
 * what it answered; `--resume` runs only the rest. The first line names the settings the outputs depend on,
 * and a resumed run must have the same ones.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { EvalError } from "./run.ts";
import type { ItemOutput } from "./score.ts";

/** The settings that make two runs' outputs interchangeable (greedy decoding: same model, items and budget). */
export interface JournalKey {
  /** sha256 of the data file. */
  data_sha256: string;
  /** The onnx folder or the API's URL. */
  target: string;
  max_new_tokens: number;
  subset: string | null;
  limit: number | null;
}

/** The journal of the results file `out`. */
export function journalPath(out: string): string {
  return `${out}.partial.jsonl`;
}

/** {@link JournalKey} of a run over `dataFile`. */
export function journalKey(dataFile: string, rest: Omit<JournalKey, "data_sha256">): JournalKey {
  let bytes: Buffer;
  try {
    bytes = readFileSync(dataFile);
  } catch (e) {
    throw new EvalError(`cannot read ${dataFile}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return { data_sha256: createHash("sha256").update(bytes).digest("hex"), ...rest };
}

/**
 * The outputs a journal holds for `key`, without the failed ones (a resumed run asks again); the last line
 * of an item wins, and a line cut short by a crash is ignored. Throws {@link EvalError} when there is no
 * journal or it belongs to other settings.
 */
export function readJournal(path: string, key: JournalKey): ItemOutput[] {
  if (!existsSync(path)) throw new EvalError(`nothing to resume: ${path} does not exist`);
  const [head, ...lines] = readFileSync(path, "utf8").split("\n");
  let saved: unknown;
  try {
    saved = (JSON.parse(head ?? "") as { key?: unknown }).key;
  } catch {
    saved = undefined;
  }
  const differs = Object.entries(key).filter(([k, v]) => (saved as Record<string, unknown> | undefined)?.[k] !== v).map(([k]) => k);
  if (differs.length > 0) throw new EvalError(`cannot resume from ${path}: it was written with other settings (${differs.join(", ")})`);
  const byIndex = new Map<number, ItemOutput>();
  for (const line of lines) {
    let out: ItemOutput;
    try {
      out = JSON.parse(line) as ItemOutput;
    } catch {
      continue;
    }
    if (Number.isSafeInteger(out?.index)) byIndex.set(out.index, out);
  }
  return [...byIndex.values()].filter((o) => o.error === null);
}

/** An open journal: `write` appends one item's line (written through at once: a crash of the process loses none). */
export interface Journal {
  write(out: ItemOutput): void;
  close(): void;
  /** Closes and deletes it (the results file holds everything now). */
  remove(): void;
}

/**
 * Opens the journal at `path`: a new one (its folder created, and any old one replaced) or, to resume, the
 * existing one for appending. Opening first is also the check that the results can be written at all.
 */
export function openJournal(path: string, key: JournalKey, resume: boolean): Journal {
  let fd: number;
  try {
    mkdirSync(dirname(path), { recursive: true });
    fd = openSync(path, resume ? "a" : "w");
  } catch (e) {
    throw new EvalError(`cannot write beside the results file: ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  if (!resume) writeSync(fd, JSON.stringify({ key }) + "\n");
  let open = true;
  const close = () => {
    if (open) closeSync(fd);
    open = false;
  };
  return {
    write: (out) => void writeSync(fd, JSON.stringify(out) + "\n"),
    close,
    remove: () => {
      close();
      rmSync(path, { force: true });
    },
  };
}

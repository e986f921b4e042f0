/**
 * The MedVLM-R1 evaluation file (`MRI_CT_XRAY_300each_dataset.json` and files in its format): a JSON list
 * of `{image: [path], problem, solution, question, options, answer, dataset, subset}`.
 *
 * Loading validates every item and fails with an {@link DatasetError} naming the item index and the field.
 * Tolerated quirks of the released file and its relatives:
 * - subset names are free text ("MR (Mag-netic Resonance Imaging)", "CT(Computed Tomography)", "X-Ray"):
 *   {@link modalityOf} maps them to the paper's table rows MRI / CT / X-ray (other names are kept as they are);
 * - `image` may be a single string instead of a one-element list; a longer list uses its first path (the
 *   reference reads `image[0]` only) with a warning;
 * - `problem`, `answer`, `dataset` and `subset` may be missing (`problem` is then built from `question` and
 *   `options`, as the reference's data builder does); `question` and `options` may both be missing when
 *   `problem` ends in its option lines (`A) …`), which they are then read from (the model card's items);
 * - `answer` (the option text) is not used for scoring (the reference scores `solution`); when it disagrees
 *   with `options[solution]`, the item gets a warning.
 *
 * The prompt. The reference evaluation (`src/eval/test_qwen2vl_med.py`) fills its template with the item's
 * `problem` as it is written in the file. The serving prompt (`buildVqaMessages`) builds the same text from
 * `question` and `options` (`formatProblem`). For every item this module checks that both agree; when they do
 * not, the item gets a `problem_mismatch` warning and the evaluation uses `problem`'s text (what the
 * reference model saw) — see {@link promptFor}.
 */
import { readFile } from "node:fs/promises";
import { existsSync, statSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import type { ChatMessage } from "../../../shared/src/chat-template.ts";
import { ApiError, NamedError } from "../../../shared/src/errors.ts";
import { MAX_OPTIONS, MIN_OPTIONS, OPTION_LETTERS, buildVqaMessages, formatProblem, renderQuestion } from "../../../shared/src/prompt.ts";

/** One validated evaluation item. */
export interface EvalItem {
  /** 0-based position in the file (the reference slices the file by position: MRI 0–299, CT 300–599, X-ray 600–899). */
  index: number;
  /** The image path as written (`image[0]`), relative to the images folder unless absolute. */
  image: string;
  /** The `problem` text the reference prompt is built from (built from question + options when absent). */
  problem: string;
  question: string;
  options: string[];
  /** The gold letter (`solution`). */
  solution: string;
  /** The gold option text, when the file has it. */
  answer: string | null;
  dataset: string | null;
  /** The subset name as written ("" when absent). */
  subset: string;
  /** The table row: "MRI", "CT", "X-ray", or the subset name as written for other subsets. */
  modality: string;
  /** `formatProblem(question, options) === problem`. */
  problemMatches: boolean;
}

/** Something about an item that loading tolerated. Messages never contain the item's text. */
export interface DatasetWarning {
  index: number;
  kind: "problem_mismatch" | "answer_mismatch" | "extra_images";
  message: string;
}

/** A loaded evaluation file. */
export interface Dataset {
  items: EvalItem[];
  warnings: DatasetWarning[];
}

/** A file that cannot be evaluated; `index` and `field` name the culprit when it is one item. */
export class DatasetError extends NamedError {
  constructor(
    message: string,
    readonly index?: number,
    readonly field?: string,
  ) {
    super(message);
  }
}

/** The paper's table rows, in its order. */
export const MODALITIES = ["MRI", "CT", "X-ray"] as const;

/**
 * The table row of a subset name: "MRI" for MR / magnetic resonance names, "CT" for CT / computed tomography,
 * "X-ray" for X-ray / radiograph names (case, spaces, hyphens and brackets ignored, so the released file's
 * "MR (Mag-netic Resonance Imaging)", "CT(Computed Tomography)" and "X-Ray" as well as the reference script's
 * `--modality` values MRI, CT, Xray all map). Any other name is returned unchanged (trimmed; "(none)" when empty).
 */
export function modalityOf(subset: string): string {
  const s = subset.toLowerCase().replace(/[^a-z]/g, "");
  if (s === "mr" || s === "mri" || s.startsWith("mrmag") || s.includes("magneticresonance")) return "MRI";
  if (s === "ct" || s.startsWith("ctcomputed") || s.includes("computedtomography")) return "CT";
  if (s === "xray" || s.startsWith("xray") || s.includes("radiograph")) return "X-ray";
  const t = subset.trim();
  return t === "" ? "(none)" : t;
}

function fail(index: number, field: string, what: string): never {
  throw new DatasetError(`item ${index}: field '${field}' ${what}`, index, field);
}

const kindOf = (v: unknown): string => (v === null ? "null" : Array.isArray(v) ? "a list" : typeof v);

function str(obj: Record<string, unknown>, index: number, field: string, required: true): string;
function str(obj: Record<string, unknown>, index: number, field: string, required: false): string | null;
function str(obj: Record<string, unknown>, index: number, field: string, required: boolean): string | null {
  const v = obj[field];
  if (v === undefined || v === null) {
    if (required) fail(index, field, "is missing");
    return null;
  }
  if (typeof v !== "string") fail(index, field, `must be a string, got ${kindOf(v)}`);
  return v;
}

/** Validates one parsed item (see the module comment for what is tolerated). */
export function parseItem(raw: unknown, index: number, warnings: DatasetWarning[] = []): EvalItem {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new DatasetError(`item ${index}: must be an object, got ${kindOf(raw)}`, index);
  }
  const obj = raw as Record<string, unknown>;

  // image: ["path"] (the released format) or "path".
  let image: string;
  const img = obj.image;
  if (typeof img === "string") image = img;
  else if (Array.isArray(img)) {
    if (img.length === 0) fail(index, "image", "is an empty list (one image path is needed)");
    img.forEach((p, k) => {
      if (typeof p !== "string" || p.trim() === "") fail(index, `image[${k}]`, "must be a non-empty path");
    });
    image = img[0] as string;
    if (img.length > 1) {
      warnings.push({ index, kind: "extra_images", message: `item ${index}: ${img.length} images listed; only image[0] is used (as in the reference)` });
    }
  } else if (img === undefined || img === null) fail(index, "image", "is missing");
  else fail(index, "image", `must be a list with one image path, got ${kindOf(img)}`);
  if (image.trim() === "") fail(index, "image", "must be a non-empty path");

  // The reference reads only image, problem and solution (the model card's items have no question or options):
  // without both, they come from the problem's own lines.
  const problemField = str(obj, index, "problem", false);
  const fromProblem = obj.question == null && obj.options == null && problemField !== null ? splitProblem(problemField) : null;
  const question = fromProblem?.question ?? str(obj, index, "question", true);
  if (question.trim() === "") fail(index, "question", "is empty");

  const opts: unknown = fromProblem?.options ?? obj.options;
  if (opts === undefined || opts === null) fail(index, "options", "is missing");
  if (!Array.isArray(opts)) fail(index, "options", `must be a list of strings, got ${kindOf(opts)}`);
  if (opts.length < MIN_OPTIONS || opts.length > MAX_OPTIONS) {
    fail(index, "options", `must hold ${MIN_OPTIONS} to ${MAX_OPTIONS} options, got ${opts.length}`);
  }
  opts.forEach((o, k) => {
    if (typeof o !== "string") fail(index, `options[${k}]`, `must be a string, got ${kindOf(o)}`);
    if (o.trim() === "") fail(index, `options[${k}]`, "is empty");
  });
  const options = opts as string[];

  const solRaw = str(obj, index, "solution", true);
  const solution = solRaw.trim();
  const letters = OPTION_LETTERS.slice(0, options.length);
  if (!(letters as readonly string[]).includes(solution)) {
    fail(index, "solution", `must be one option letter ${letters[0]}–${letters[letters.length - 1]}, got ${JSON.stringify(solRaw.slice(0, 20))}`);
  }

  const built = formatProblem(question, options);
  const problem = problemField ?? built;
  if (problem.trim() === "") fail(index, "problem", "is empty");
  const problemMatches = problem === built;
  if (!problemMatches) {
    warnings.push({
      index,
      kind: "problem_mismatch",
      message: `item ${index}: 'problem' differs from question + options; the prompt uses 'problem' (as the reference evaluation did)`,
    });
  }

  const answer = str(obj, index, "answer", false);
  const goldText = options[solution.charCodeAt(0) - 0x41]!;
  if (answer !== null && answer.trim() !== goldText.trim()) {
    warnings.push({
      index,
      kind: "answer_mismatch",
      message: `item ${index}: 'answer' is not the text of option ${solution}; scoring uses 'solution' (as the reference did)`,
    });
  }
  const subset = str(obj, index, "subset", false) ?? "";
  return {
    index,
    image,
    problem,
    question,
    options: [...options],
    solution,
    answer,
    dataset: str(obj, index, "dataset", false),
    subset,
    modality: modalityOf(subset),
    problemMatches,
  };
}

/** Validates a parsed evaluation file (a JSON list of items). */
export function parseDataset(json: unknown): Dataset {
  if (!Array.isArray(json)) {
    throw new DatasetError(`the evaluation file must be a JSON list of items, got ${kindOf(json)}`);
  }
  if (json.length === 0) throw new DatasetError("the evaluation file has no items");
  const warnings: DatasetWarning[] = [];
  const items = json.map((raw, i) => {
    try {
      return parseItem(raw, i, warnings);
    } catch (e) {
      // formatProblem's ApiError (e.g. an option that is only whitespace) is still this item's fault.
      if (e instanceof ApiError) throw new DatasetError(`item ${i}: ${e.message}`, i);
      throw e;
    }
  });
  return { items, warnings };
}

/** Reads and validates an evaluation file. */
export async function loadDataset(path: string): Promise<Dataset> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new DatasetError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text);
  } catch (e) {
    throw new DatasetError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
  return parseDataset(json);
}

/** Which items to run: `subset` (a table row such as MRI / CT / X-ray / Xray, or a subset name as written, any case), then the first `limit`. */
export function selectItems(items: readonly EvalItem[], opts: { subset?: string; limit?: number } = {}): EvalItem[] {
  let out = [...items];
  if (opts.subset !== undefined) {
    const want = modalityOf(opts.subset).toLowerCase();
    const raw = opts.subset.trim().toLowerCase();
    out = out.filter((it) => it.modality.toLowerCase() === want || it.subset.trim().toLowerCase() === raw);
  }
  if (opts.limit !== undefined) out = out.slice(0, opts.limit);
  return out;
}

/** The item's image file: `image[0]` resolved against the images folder (the reference's `{base_path}/{image[0]}`). */
export function imagePath(item: EvalItem, imagesDir: string): string {
  return isAbsolute(item.image) ? item.image : resolve(imagesDir, item.image);
}

/** Items whose image file does not exist (or is not a file). */
export function findMissingImages(items: readonly EvalItem[], imagesDir: string): { item: EvalItem; path: string }[] {
  const missing: { item: EvalItem; path: string }[] = [];
  for (const item of items) {
    const path = imagePath(item, imagesDir);
    if (!existsSync(path) || !statSync(path).isFile()) missing.push({ item, path });
  }
  return missing;
}

/**
 * Splits a `problem` text back into a question and its options: the trailing lines must be `A) …`, `B) …`, …
 * in order (at least two). Returns null when the text does not end that way.
 */
export function splitProblem(problem: string): { question: string; options: string[] } | null {
  const lines = problem.split("\n");
  const last = lines[lines.length - 1] ?? "";
  const m = /^([A-J])\) /.exec(last);
  if (!m) return null;
  const n = m[1]!.charCodeAt(0) - 0x41 + 1;
  if (n < MIN_OPTIONS || lines.length < n + 1) return null;
  const optLines = lines.slice(lines.length - n);
  const options: string[] = [];
  for (let k = 0; k < n; k++) {
    const prefix = `${OPTION_LETTERS[k]}) `;
    if (!optLines[k]!.startsWith(prefix)) return null;
    options.push(optLines[k]!.slice(prefix.length));
  }
  const question = lines.slice(0, lines.length - n).join("\n");
  try {
    return formatProblem(question, options) === problem ? { question, options } : null;
  } catch {
    return null;
  }
}

/** The prompt of one item. */
export interface ItemPrompt {
  /** HF-format messages: one user turn, one image item, then the template filled with the problem. */
  messages: ChatMessage[];
  /** The question and options to send to `/v1/vqa` (whose prompt is `formatProblem(question, options)`). */
  question: string;
  options: string[];
  /**
   * "question_options": `problem` equals `formatProblem(question, options)` (the usual case; both modes send
   * the reference prompt). "problem": they differ; local mode renders `problem` itself; the API gets the
   * problem's own lines split back into a question and options. "problem_unsplittable": they differ and the
   * problem does not end in option lines; local mode renders `problem`, the API can only get question +
   * options (the prompt then differs from the reference's).
   */
  source: "question_options" | "problem" | "problem_unsplittable";
}

/**
 * The evaluation prompt of an item: `buildVqaMessages` with the item's question and options when they
 * reproduce its `problem`; otherwise the reference template filled with `problem` itself (what the
 * reference evaluation did in every case).
 */
export function promptFor(item: EvalItem): ItemPrompt {
  if (item.problemMatches) {
    return {
      messages: buildVqaMessages({ question: item.question, options: item.options, imageCount: 1 }),
      question: item.question,
      options: item.options,
      source: "question_options",
    };
  }
  const messages: ChatMessage[] = [{ role: "user", content: [{ type: "image" }, { type: "text", text: renderQuestion(item.problem) }] }];
  const split = splitProblem(item.problem);
  return split
    ? { messages, question: split.question, options: split.options, source: "problem" }
    : { messages, question: item.question, options: item.options, source: "problem_unsplittable" };
}

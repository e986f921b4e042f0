/**
 * Locating and opening a Qwen2-VL checkpoint: a local folder, or a Hugging Face Hub id downloaded into the
 * standard hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
 */
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { downloadFileToCacheDir, getHFHubCachePath, getRepoFolderName, listFiles, modelInfo } from "@huggingface/hub";
import { readQwen2VLConfig, type Qwen2VLConfig } from "./config.ts";
import { CheckpointError, CheckpointWeights, SAFETENSORS_INDEX } from "./safetensors.ts";
import { qwen2vlTensorShapes } from "./weights-spec.ts";
import { exists, isDir } from "../fs-util.ts";

/** Options for {@link resolveModelDir}. */
export interface ResolveOptions {
  /** Hub cache folder (default: the standard hub cache). */
  cacheDir?: string;
  /** Branch, tag or commit (default `main`). */
  revision?: string;
  /** fetch used for every Hub request (tests inject a failing one). */
  fetch?: typeof fetch;
  /** Hub access token for gated/private repos (default `$HF_TOKEN`, `$HUGGING_FACE_HUB_TOKEN`, or the token file of `huggingface-cli login`). */
  accessToken?: string;
}

/** A Hub model id: `owner/name` (letters, digits, `-_.`), not a path. */
const HUB_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]*\/[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** Which repository files a conversion needs: configs, weights, tokenizer. */
export function isNeededHubFile(path: string): boolean {
  if (path.includes("/")) return false; // weights and configs live at the repo root; skip images/, src/, …
  return (
    path.endsWith(".json") ||
    path.endsWith(".safetensors") ||
    path === "tokenizer.model" ||
    path === "vocab.json" ||
    path === "merges.txt" ||
    path.endsWith(".jinja")
  );
}

function noNetworkError(id: string, cause: unknown): CheckpointError {
  const why = cause instanceof Error ? cause.message : String(cause);
  return new CheckpointError(
    "no_network",
    `cannot download ${id} from the Hugging Face Hub (${why}). Without network access, download the checkpoint on another ` +
      `machine, e.g. \`huggingface-cli download ${id} --local-dir <dir>\`, copy <dir> here and pass \`--model <dir>\` ` +
      `(a folder with config.json and *.safetensors).`,
    { cause },
  );
}

/** An HTTP status carried by a Hub API error. */
function httpStatus(e: unknown): number | undefined {
  const s = (e as { statusCode?: unknown } | null)?.statusCode;
  return typeof s === "number" ? s : undefined;
}

/** Marks a failure of the fetch call itself (DNS, refused, offline) as opposed to an HTTP answer or a disk error. */
class FetchFailure extends Error {
  constructor(cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause), { cause });
    this.name = "FetchFailure";
  }
}

/** The {@link FetchFailure} in `e`'s cause chain, if any. */
function findFetchFailure(e: unknown): FetchFailure | undefined {
  for (let x: unknown = e, i = 0; x instanceof Error && i < 8; x = x.cause, i++) if (x instanceof FetchFailure) return x;
  return undefined;
}

function wrapFetch(f: typeof fetch): typeof fetch {
  return (async (...args: Parameters<typeof fetch>) => {
    try {
      return await f(...args);
    } catch (e) {
      throw new FetchFailure(e);
    }
  }) as typeof fetch;
}

/** What a servable conversion needs besides the weights: the engine reads these from the converted folder. */
export const REQUIRED_FILES = ["config.json", "tokenizer.json", "preprocessor_config.json"] as const;

/** The files of {@link REQUIRED_FILES} and the weights (every shard the index names) that `dir` lacks. */
export async function missingCheckpointFiles(dir: string): Promise<string[]> {
  const missing: string[] = [];
  for (const f of REQUIRED_FILES) if (!(await exists(join(dir, f)))) missing.push(f);
  if (await exists(join(dir, SAFETENSORS_INDEX))) {
    let shards: string[] = [];
    try {
      const index = JSON.parse(await readFile(join(dir, SAFETENSORS_INDEX), "utf8")) as { weight_map?: Record<string, string> };
      shards = [...new Set(Object.values(index.weight_map ?? {}))];
    } catch {
      missing.push(SAFETENSORS_INDEX);
    }
    for (const s of shards) if (!(await exists(join(dir, s)))) missing.push(s);
  } else if (!(await exists(join(dir, "model.safetensors")))) missing.push("model.safetensors");
  return missing;
}

/** The Hub token: `$HF_TOKEN`, `$HUGGING_FACE_HUB_TOKEN`, else the file `huggingface-cli login` writes. */
async function hubToken(): Promise<string | undefined> {
  const env = process.env["HF_TOKEN"] || process.env["HUGGING_FACE_HUB_TOKEN"];
  if (env) return env;
  const file = process.env["HF_TOKEN_PATH"] ?? join(process.env["HF_HOME"] ?? join(homedir(), ".cache", "huggingface"), "token");
  try {
    return (await readFile(file, "utf8")).trim() || undefined;
  } catch {
    return undefined;
  }
}

/**
 * A whole snapshot already in the cache for this revision (used when the Hub cannot be reached); one that a
 * download left partial, or that holds only some files (e.g. the model's but not the processor's), is not used.
 */
async function cachedSnapshot(storage: string, revision: string): Promise<string | undefined> {
  let commit = revision;
  if (!/^[0-9a-f]{40}$/.test(revision)) {
    try {
      commit = (await readFile(join(storage, "refs", revision), "utf8")).trim();
    } catch {
      return undefined;
    }
  }
  const dir = join(storage, "snapshots", commit);
  return (await missingCheckpointFiles(dir)).length === 0 ? dir : undefined;
}

/**
 * Resolves a model argument to a local checkpoint folder. A local folder is returned as is (it must contain
 * `config.json`, else `not_found`). A Hub id such as `JZPeterPan/MedVLM-R1` is downloaded (only `*.json`,
 * `*.safetensors` and tokenizer files at the repo root) into the hub cache; the snapshot folder is returned.
 * Without network → `no_network`, whose message explains how to pass a local folder instead; a snapshot
 * already in the cache is used in that case.
 */
export async function resolveModelDir(
  modelOrHubId: string,
  opts: { cacheDir?: string; revision?: string; fetch?: typeof fetch; accessToken?: string } = {},
): Promise<string> {
  const local = resolve(modelOrHubId);
  if (await isDir(local)) {
    if (!(await exists(join(local, "config.json")))) {
      throw new CheckpointError("not_found", `${local}: model folder has no config.json`);
    }
    return local;
  }
  if (!HUB_ID.test(modelOrHubId) || (await exists(local))) {
    throw new CheckpointError("not_found", `${modelOrHubId}: no such model folder, and not a Hub id of the form owner/name`);
  }
  const id = modelOrHubId;
  const revision = opts.revision ?? "main";
  if (!/^[A-Za-z0-9._/-]+$/.test(revision) || revision.split("/").includes("..")) {
    throw new CheckpointError("not_found", `${revision}: not a branch, tag or commit name`);
  }
  const cacheDir = opts.cacheDir ?? getHFHubCachePath();
  const storage = join(cacheDir, getRepoFolderName({ type: "model", name: id }));
  const accessToken = opts.accessToken ?? (await hubToken());
  const common = { fetch: wrapFetch(opts.fetch ?? fetch), ...(accessToken ? { accessToken } : {}) };
  try {
    const info = await modelInfo({ name: id, revision, additionalFields: ["sha"], ...common });
    const commit = info.sha;
    if (revision !== commit) {
      await mkdir(dirname(join(storage, "refs", revision)), { recursive: true }); // (refs/pr/3 has a folder)
      await writeFile(join(storage, "refs", revision), commit);
    }
    const paths: string[] = [];
    for await (const entry of listFiles({ repo: { type: "model", name: id }, revision: commit, ...common })) {
      if (entry.type === "file" && isNeededHubFile(entry.path)) paths.push(entry.path);
    }
    if (!paths.includes("config.json")) throw new CheckpointError("not_found", `${id}@${revision}: the repository has no config.json`);
    for (const path of paths) {
      await downloadFileToCacheDir({ repo: { type: "model", name: id }, path, revision: commit, cacheDir, ...common });
    }
    return join(storage, "snapshots", commit);
  } catch (e) {
    if (e instanceof CheckpointError) throw e;
    const status = httpStatus(e);
    if (status === 401 || status === 403 || status === 404) {
      throw new CheckpointError(
        "not_found",
        `${id}@${revision}: not found on the Hugging Face Hub (HTTP ${status}${status === 404 ? "" : "; gated or private? set HF_TOKEN"})`,
        { cause: e },
      );
    }
    const offline = findFetchFailure(e);
    if (offline) {
      const cached = await cachedSnapshot(storage, revision);
      if (cached) return cached;
      throw noNetworkError(id, offline.cause);
    }
    throw e;
  }
}

/** An opened checkpoint whose tensors match its config. */
export interface LoadedCheckpoint {
  dir: string;
  config: Qwen2VLConfig;
  weights: CheckpointWeights;
  /** Tensors in the files that the model does not use (e.g. a stored tied `lm_head.weight`). */
  unused: string[];
}

/**
 * Resolves, reads config.json and opens the weights, then checks that every tensor the config implies is present
 * (`missing_tensor`) with the right shape (`shape_mismatch`). The caller must `weights.close()`.
 */
export async function loadQwen2VLCheckpoint(modelOrHubId: string, opts: ResolveOptions = {}): Promise<LoadedCheckpoint> {
  const dir = await resolveModelDir(modelOrHubId, opts);
  const config = await readQwen2VLConfig(dir);
  const weights = await CheckpointWeights.open(dir);
  try {
    const expected = qwen2vlTensorShapes(config);
    for (const { name, shape } of expected) {
      const info = weights.info(name);
      if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
        throw new CheckpointError(
          "shape_mismatch",
          `${info.file}: tensor ${name} has shape [${info.shape.join(", ")}], but config.json implies [${shape.join(", ")}]`,
        );
      }
    }
    const want = new Set(expected.map((t) => t.name));
    return { dir, config, weights, unused: weights.names().filter((n) => !want.has(n)) };
  } catch (e) {
    await weights.close();
    throw e;
  }
}

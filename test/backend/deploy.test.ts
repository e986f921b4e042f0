/**
 * Offline checks of the GPU backend's deployment artifacts: gpu-backend/Dockerfile, the root .dockerignore and
 * the Kubernetes manifests in deploy/k8s/. No Docker engine, cluster or network is needed:
 *
 * - every manifest is parsed strictly (YAML 1.2, and must read the same under YAML 1.1, as Kubernetes reads it),
 *   validated against the Kubernetes JSON schemas (kubernetes-models' `validate()`), and type-checked against the
 *   Kubernetes API types with TypeScript's excess-property check, which catches unknown (misspelt) fields the way
 *   `kubectl apply --validate=strict` would;
 * - the manifests are checked against each other, against the Dockerfile and against the backend's own
 *   configuration parser (ports, probes, selectors, secrets, volumes, shutdown grace, autoscaling metric, ...);
 * - the Dockerfile is parsed and checked statically (pinned bases, non-root USER, HEALTHCHECK, EXPOSE, CMD), and
 *   the files the backend imports are followed from its entry point to make sure the image holds them.
 *
 * Each consistency check is a function returning problems; the real artifacts must give none, and a table of
 * mutations (one wrong detail each) shows that every check reports the mistake it exists for.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join, posix, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as appsV1 from "kubernetes-models/apps/v1";
import * as autoscalingV2 from "kubernetes-models/autoscaling/v2";
import * as batchV1 from "kubernetes-models/batch/v1";
import * as policyV1 from "kubernetes-models/policy/v1";
import * as coreV1 from "kubernetes-models/v1";
import ts from "typescript";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { BackendConfigError, CONFIG_DEFAULTS, loadBackendConfig, type Env } from "../../gpu-backend/src/server/config.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const K8S_DIR = "deploy/k8s";
const DOCKERFILE = "gpu-backend/Dockerfile";
const DOCKERIGNORE = ".dockerignore";
/** The backend's entry point (gpu-backend/src/server/main.ts), as the Dockerfile's CMD must name it. */
const BACKEND_ENTRY = "gpu-backend/src/server/main.ts";
/** The HPA scales on the server's queue-depth gauge (a Pods metric named after it, see deploy/README.md). */
const QUEUE_METRIC_RE = /queue_depth$/;
/** Not applied by the kustomization: a placeholder Secret. */
const SECRET_EXAMPLE = "secret.example.yaml";
/** A probe budget long enough to load and warm up a 2B-parameter model. */
const MIN_STARTUP_BUDGET_S = 600;
/** Time SIGKILL must leave after the drain. */
const SHUTDOWN_MARGIN_S = 10;

// Parsed YAML is untyped; the checks below read it defensively.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type K = any;

// ---------------------------------------------------------------------------------------------------------------
// Inputs

/** The texts every check works from (mutations edit copies of these). */
interface Texts {
  k8s: Record<string, string>;
  dockerfile: string;
  dockerignore: string;
  packageJson: string;
}

function readTexts(): Texts {
  const k8s: Record<string, string> = {};
  for (const f of readdirSync(join(ROOT, K8S_DIR)).sort()) {
    if (/\.ya?ml$/.test(f)) k8s[f] = readFileSync(join(ROOT, K8S_DIR, f), "utf8");
  }
  return {
    k8s,
    dockerfile: readFileSync(join(ROOT, DOCKERFILE), "utf8"),
    dockerignore: readFileSync(join(ROOT, DOCKERIGNORE), "utf8"),
    packageJson: readFileSync(join(ROOT, "package.json"), "utf8"),
  };
}

interface Manifest {
  file: string;
  obj: K;
}

interface Ctx {
  texts: Texts;
  /** Problems met while parsing (YAML errors, 1.1/1.2 ambiguities, missing apiVersion/kind). */
  parseProblems: string[];
  /** Every Kubernetes object of every file, secret.example.yaml included, the kustomization excluded. */
  objects: Manifest[];
  kustomization: K;
  docker: Dockerfile;
  ignore: IgnorePattern[];
  pkg: K;
}

function buildCtx(texts: Texts): Ctx {
  const parseProblems: string[] = [];
  const objects: Manifest[] = [];
  let kustomization: K = undefined;
  for (const [file, text] of Object.entries(texts.k8s)) {
    const docs = parseAllDocuments(text, { prettyErrors: false, uniqueKeys: true });
    const docs11 = parseAllDocuments(text, { version: "1.1", uniqueKeys: true });
    if (!Array.isArray(docs) || !Array.isArray(docs11)) {
      parseProblems.push(`${file}: not a YAML stream`);
      continue;
    }
    docs.forEach((doc, i) => {
      for (const e of [...doc.errors, ...doc.warnings]) parseProblems.push(`${file}: ${e.message}`);
      const obj = doc.toJS() as K;
      if (obj === null || obj === undefined) return;
      if (JSON.stringify(obj) !== JSON.stringify(docs11[i]?.toJS())) {
        parseProblems.push(`${file}: reads differently as YAML 1.1 (Kubernetes): quote values like yes/no/on/off/y/n or 0755`);
      }
      if (typeof obj !== "object" || typeof obj.apiVersion !== "string" || typeof obj.kind !== "string") {
        parseProblems.push(`${file}: document ${i} has no apiVersion/kind`);
        return;
      }
      if (obj.kind === "Kustomization") kustomization = obj;
      else objects.push({ file, obj });
    });
  }
  return {
    texts,
    parseProblems,
    objects,
    kustomization,
    docker: parseDockerfile(texts.dockerfile),
    ignore: parseDockerignore(texts.dockerignore),
    pkg: JSON.parse(texts.packageJson) as K,
  };
}

const id = (m: Manifest): string => `${m.file} ${m.obj.kind}/${m.obj.metadata?.name ?? "?"}`;
const ofKind = (ctx: Ctx, kind: string): Manifest[] => ctx.objects.filter((m) => m.obj.kind === kind);
const one = (ctx: Ctx, kind: string): Manifest | undefined => ofKind(ctx, kind)[0];
const applied = (ctx: Ctx): Manifest[] => ctx.objects.filter((m) => m.file !== SECRET_EXAMPLE);

/** The backend Deployment, its pod spec and its main container (the one exposing a port). */
function backend(ctx: Ctx): { dep: Manifest; pod: K; c: K } | undefined {
  const dep = one(ctx, "Deployment");
  const pod = dep?.obj.spec?.template?.spec;
  const c = (pod?.containers ?? []).find((x: K) => (x.ports ?? []).length > 0) ?? pod?.containers?.[0];
  return dep && pod && c ? { dep, pod, c } : undefined;
}

function envOf(container: K): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of container?.env ?? []) if (typeof e.value === "string") out[e.name] = e.value;
  return out;
}

/** matchLabels (matchExpressions are not used here and count as a mismatch) selects `labels`. */
function selects(selector: K, labels: K): boolean {
  if (!selector || typeof selector !== "object" || Object.keys(selector).length === 0) return false;
  const match = selector.matchLabels ?? selector;
  if (selector.matchExpressions) return false;
  return Object.entries(match).every(([k, v]) => labels?.[k] === v);
}

/** Kubernetes quantity → number (cores, bytes, or plain count). */
function quantity(q: unknown): number {
  if (typeof q === "number") return q;
  const m = /^([0-9.]+)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$/.exec(String(q));
  if (!m) return Number.NaN;
  const mult: Record<string, number> = { m: 1e-3, k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50 };
  return Number(m[1]) * (m[2] ? mult[m[2]]! : 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Dockerfile

interface Instr {
  cmd: string;
  args: string;
  line: number;
}
interface Stage {
  name: string | undefined;
  image: string;
  instrs: Instr[];
}
interface Dockerfile {
  /** ARG defaults declared before the first FROM. */
  globalArgs: Record<string, string>;
  stages: Stage[];
}

/** Instructions with continuation lines joined and comment lines dropped (as BuildKit does). */
function dockerInstructions(text: string): Instr[] {
  const out: Instr[] = [];
  let buf = "";
  let start = 0;
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/\r$/, "");
    const trimmed = line.trim();
    if (trimmed.startsWith("#") || (buf !== "" && trimmed === "")) return;
    if (buf === "" && trimmed === "") return;
    if (buf === "") start = i + 1;
    if (/\\\s*$/.test(line)) {
      buf += line.replace(/\\\s*$/, "");
      return;
    }
    buf += line;
    const m = /^\s*([A-Za-z]+)\s*([\s\S]*)$/.exec(buf);
    if (m) out.push({ cmd: m[1]!.toUpperCase(), args: m[2]!.trim(), line: start });
    buf = "";
  });
  return out;
}

function substitute(s: string, vars: Record<string, string>): string {
  return s.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (all, a: string | undefined, b: string | undefined) => vars[(a ?? b)!] ?? all);
}

function parseDockerfile(text: string): Dockerfile {
  const globalArgs: Record<string, string> = {};
  const stages: Stage[] = [];
  for (const ins of dockerInstructions(text)) {
    if (ins.cmd === "FROM") {
      const words = ins.args.split(/\s+/).filter((w) => !w.startsWith("--"));
      const asAt = words.findIndex((w) => w.toUpperCase() === "AS");
      stages.push({ image: substitute(words[0] ?? "", globalArgs), name: asAt >= 0 ? words[asAt + 1] : undefined, instrs: [] });
    } else if (stages.length === 0) {
      if (ins.cmd === "ARG") {
        const m = /^([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$/.exec(ins.args);
        if (m) globalArgs[m[1]!] = (m[2] ?? "").replace(/^"(.*)"$/, "$1");
      }
    } else {
      stages[stages.length - 1]!.instrs.push(ins);
    }
  }
  return { globalArgs, stages };
}

/** Shell-like words of an instruction's arguments (quotes removed, also inside a word: Y="a b" → Y=a b). */
function words(s: string): string[] {
  const out: string[] = [];
  let cur: string | null = null;
  let quote: string | null = null;
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    if (quote) {
      if (ch === quote) quote = null;
      else if (ch === "\\" && quote === '"' && i + 1 < s.length) cur = (cur ?? "") + s[++i]!;
      else cur = (cur ?? "") + ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      cur ??= "";
    } else if (/\s/.test(ch)) {
      if (cur !== null) out.push(cur);
      cur = null;
    } else cur = (cur ?? "") + ch;
  }
  if (cur !== null) out.push(cur);
  return out;
}

/** ENV instructions of a stage, in order (KEY=VALUE pairs; the legacy `ENV KEY value` form too). */
function stageEnv(stage: Stage | undefined): Record<string, string> {
  const env: Record<string, string> = {};
  for (const ins of stage?.instrs ?? []) {
    if (ins.cmd !== "ENV") continue;
    const w = words(ins.args);
    if (w[0] && !w[0].includes("=")) env[w[0]] = w.slice(1).join(" ");
    else for (const kv of w) env[kv.slice(0, kv.indexOf("="))] = kv.slice(kv.indexOf("=") + 1);
  }
  return env;
}

/** An instruction's exec-form (JSON array) arguments, or undefined for the shell form. */
function execForm(args: string): string[] | undefined {
  if (!args.trimStart().startsWith("[")) return undefined;
  try {
    const v = JSON.parse(args) as unknown;
    return Array.isArray(v) && v.every((x) => typeof x === "string") ? (v as string[]) : undefined;
  } catch {
    return undefined;
  }
}

const finalStage = (d: Dockerfile): Stage | undefined => d.stages[d.stages.length - 1];
const instrs = (s: Stage | undefined, cmd: string): Instr[] => (s?.instrs ?? []).filter((i) => i.cmd === cmd);
const lastInstr = (s: Stage | undefined, cmd: string): Instr | undefined => instrs(s, cmd).at(-1);

/** The stage the final image copies /app from (`COPY --from=<stage> /app /app`). */
function appSourceStage(d: Dockerfile): Stage | undefined {
  for (const ins of instrs(finalStage(d), "COPY")) {
    const w = words(ins.args);
    const from = w.find((x) => x.startsWith("--from="))?.slice("--from=".length);
    const rest = w.filter((x) => !x.startsWith("--"));
    if (from && rest[0]?.replace(/\/$/, "") === "/app" && rest[1]?.replace(/\/$/, "") === "/app") {
      return d.stages.find((s) => s.name === from);
    }
  }
  return undefined;
}

function workdir(s: Stage | undefined): string {
  return lastInstr(s, "WORKDIR")?.args.trim() ?? "/";
}

/**
 * Where `file` (repository-relative) lands in `stage`'s file system, through a COPY from the build context,
 * or undefined when no COPY brings it in.
 */
function copiedTo(stage: Stage | undefined, file: string): string | undefined {
  let cwd = "/";
  for (const ins of stage?.instrs ?? []) {
    if (ins.cmd === "WORKDIR") cwd = posix.resolve(cwd, ins.args.trim());
    if (ins.cmd !== "COPY" && ins.cmd !== "ADD") continue;
    const w = execForm(ins.args) ?? words(ins.args);
    if (w.some((x) => x.startsWith("--from="))) continue;
    const paths = w.filter((x) => !x.startsWith("--"));
    const dest = paths.pop();
    if (!dest) continue;
    const destAbs = posix.resolve(cwd, dest);
    const destIsDir = dest.endsWith("/") || paths.length > 1;
    for (const src of paths) {
      const s = posix.normalize(src).replace(/\/$/, "").replace(/^\.\//, "");
      if (s === file) return destIsDir ? posix.join(destAbs, posix.basename(s)) : destAbs;
      if (s === "." || file.startsWith(`${s}/`)) return posix.join(destAbs, s === "." ? file : file.slice(s.length + 1));
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------
// .dockerignore (moby/patternmatcher semantics: last matching pattern wins; a pattern matching a parent
// directory matches everything below it)

interface IgnorePattern {
  re: RegExp;
  negate: boolean;
}

function parseDockerignore(text: string): IgnorePattern[] {
  const out: IgnorePattern[] = [];
  for (const raw of text.split("\n")) {
    let p = raw.trim();
    if (p === "" || p.startsWith("#")) continue;
    const negate = p.startsWith("!");
    if (negate) p = p.slice(1).trim();
    p = posix.normalize(p).replace(/^\/+/, "").replace(/\/+$/, "");
    let re = "";
    for (let i = 0; i < p.length; i++) {
      const ch = p[i]!;
      if (ch === "*" && p[i + 1] === "*") {
        i++;
        if (p[i + 1] === "/") {
          i++;
          re += "(?:.*/)?";
        } else re += ".*";
      } else if (ch === "*") re += "[^/]*";
      else if (ch === "?") re += "[^/]";
      else re += ch.replace(/[.+^${}()|[\]\\]/g, "\\$&");
    }
    out.push({ re: new RegExp(`^${re}$`), negate });
  }
  return out;
}

function ignored(patterns: IgnorePattern[], file: string): boolean {
  const parts = file.split("/");
  const candidates = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
  let matched = false;
  for (const p of patterns) if (candidates.some((c) => p.re.test(c))) matched = !p.negate;
  return matched;
}

// ---------------------------------------------------------------------------------------------------------------
// The backend's sources: import graph and environment variables

interface ImportGraph {
  files: string[];
  packages: Map<string, string>;
  missing: string[];
}

/** Files reachable from `entries` through runtime imports (type-only imports are erased by tsx). */
function importGraph(entries: string[]): ImportGraph {
  const files = new Set<string>();
  const packages = new Map<string, string>();
  const missing: string[] = [];
  const builtins = new Set(builtinModules);
  const queue = [...entries];
  while (queue.length > 0) {
    const file = queue.shift()!;
    if (files.has(file)) continue;
    const abs = join(ROOT, file);
    if (!existsSync(abs)) {
      missing.push(file);
      continue;
    }
    files.add(file);
    if (!/\.[cm]?tsx?$/.test(file)) continue;
    const sf = ts.createSourceFile(abs, readFileSync(abs, "utf8"), ts.ScriptTarget.ES2022, true);
    const specs: string[] = [];
    const visit = (node: ts.Node): void => {
      if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier) && !node.importClause?.isTypeOnly) {
        specs.push(node.moduleSpecifier.text);
      } else if (ts.isExportDeclaration(node) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier) && !node.isTypeOnly) {
        specs.push(node.moduleSpecifier.text);
      } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword && node.arguments[0] && ts.isStringLiteral(node.arguments[0])) {
        specs.push(node.arguments[0].text);
      } else if (ts.isCallExpression(node) && node.expression.getText(sf) === "import.meta.resolve" && node.arguments[0] && ts.isStringLiteral(node.arguments[0])) {
        specs.push(node.arguments[0].text);
      } else if (ts.isNewExpression(node) && node.expression.getText(sf) === "URL" && node.arguments?.[1]?.getText(sf) === "import.meta.url") {
        // Files loaded at run time (worker entries, engine modules): `new URL("./x.ts", import.meta.url)`, also
        // as a template choosing .ts/.js, read as its .ts variant.
        const a = node.arguments[0]!;
        const text = ts.isStringLiteral(a) || ts.isNoSubstitutionTemplateLiteral(a) ? a.text : ts.isTemplateExpression(a) ? a.head.text + a.templateSpans.map((t) => `ts${t.literal.text}`).join("") : undefined;
        if (text?.startsWith(".") && /\.[cm]?[jt]s$/.test(text)) specs.push(text);
      }
      ts.forEachChild(node, visit);
    };
    visit(sf);
    for (const spec of specs) {
      if (spec.startsWith(".")) {
        const base = posix.normalize(posix.join(posix.dirname(file), spec));
        const found = [base, `${base}.ts`, `${base}/index.ts`].find((c) => existsSync(join(ROOT, c)) && statSync(join(ROOT, c)).isFile());
        queue.push(found ?? base);
      } else if (!spec.startsWith("node:") && !builtins.has(spec)) {
        const parts = spec.split("/");
        const name = spec.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0]!;
        if (!packages.has(name)) packages.set(name, file);
      }
    }
  }
  return { files: [...files].sort(), packages, missing };
}

function listTs(dir: string): string[] {
  const abs = join(ROOT, dir);
  if (!existsSync(abs)) return [];
  return readdirSync(abs, { recursive: true, encoding: "utf8" })
    .filter((f) => f.endsWith(".ts"))
    .map((f) => posix.join(dir, f.split("\\").join("/")));
}

/** Environment variable names the backend's sources mention ("NAME" literals, env.NAME, env["NAME"]). */
function backendEnvNames(): Set<string> {
  const names = new Set<string>();
  for (const f of [...listTs("gpu-backend/src"), ...listTs("shared/src")]) {
    const src = readFileSync(join(ROOT, f), "utf8");
    for (const m of src.matchAll(/["'`]([A-Z][A-Z0-9_]{2,})["'`]|\benv\.([A-Z][A-Z0-9_]{2,})\b/g)) names.add((m[1] ?? m[2])!);
  }
  return names;
}

/** Read by dependencies or the runtime rather than the backend's own code. */
const THIRD_PARTY_ENV = new Set(["NODE_ENV", "NODE_OPTIONS", "TSX_DISABLE_CACHE", "HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "ONNXRUNTIME_NODE_INSTALL"]);
const knownEnv = (name: string, known: Set<string>): boolean => known.has(name) || THIRD_PARTY_ENV.has(name) || name.startsWith("NPM_CONFIG_");

/** The .ts entry file of an npm script (`tsx path/to/cli.ts …`), if it has one. */
function scriptEntry(script: unknown): string | undefined {
  return typeof script === "string" ? words(script).find((w) => /\.[cm]?ts$/.test(w)) : undefined;
}

const VALID_SECRET = "0123456789abcdef0123456789abcdef";

/** Names of the gauges the backend's server registers (`new Gauge("name", …)`), as GET /metrics exports them. */
function serverGauges(): Set<string> {
  const names = new Set<string>();
  for (const f of listTs(posix.dirname(BACKEND_ENTRY))) {
    for (const m of readFileSync(join(ROOT, f), "utf8").matchAll(/new Gauge\(\s*["'`]([a-zA-Z_:][a-zA-Z0-9_:]*)["'`]/g)) names.add(m[1]!);
  }
  return names;
}

/** The HPA's Pods metric on queue depth, if any. */
const queueMetric = (hpa: Manifest | undefined): K => (hpa?.obj.spec?.metrics ?? []).find((x: K) => x.type === "Pods" && QUEUE_METRIC_RE.test(x.pods?.metric?.name ?? ""));

// ---------------------------------------------------------------------------------------------------------------
// Schema validation

const GROUPS: Record<string, { module: string; exports: Record<string, unknown> }> = {
  v1: { module: "kubernetes-models/v1", exports: coreV1 },
  "apps/v1": { module: "kubernetes-models/apps/v1", exports: appsV1 },
  "batch/v1": { module: "kubernetes-models/batch/v1", exports: batchV1 },
  "autoscaling/v2": { module: "kubernetes-models/autoscaling/v2", exports: autoscalingV2 },
  "policy/v1": { module: "kubernetes-models/policy/v1", exports: policyV1 },
};

type ModelClass = new (data: unknown) => { validate(): void };

function schemaProblems(ctx: Ctx): string[] {
  const problems: string[] = [];
  for (const m of ctx.objects) {
    const cls = GROUPS[m.obj.apiVersion]?.exports[m.obj.kind] as ModelClass | undefined;
    if (typeof cls !== "function") {
      problems.push(`${id(m)}: unknown apiVersion/kind ${m.obj.apiVersion} ${m.obj.kind}`);
      continue;
    }
    try {
      new cls(m.obj).validate();
    } catch (e) {
      problems.push(`${id(m)}: ${(e as Error).message}`);
    }
  }
  return problems;
}

const declarationCache = new Map<string, ts.SourceFile>();

/**
 * TypeScript's excess-property and type checks of every object literal against kubernetes-models' interface for
 * its kind: an unknown or misspelt field anywhere in a manifest is an error (Kubernetes' JSON schemas allow them).
 */
function typeProblems(ctx: Ctx): string[] {
  const virtual = join(ROOT, "test", "backend", "__deploy_manifests__.ts");
  const aliases = Object.keys(GROUPS);
  let src = aliases.map((v, i) => `import type * as g${i} from ${JSON.stringify(GROUPS[v]!.module)};\n`).join("");
  const spans: Array<{ from: number; to: number; what: string }> = [];
  const problems: string[] = [];
  ctx.objects.forEach((m, i) => {
    const g = aliases.indexOf(m.obj.apiVersion);
    if (g < 0) {
      problems.push(`${id(m)}: no types for apiVersion ${m.obj.apiVersion}`);
      return;
    }
    const from = src.split("\n").length;
    src += `export const m${i}: g${g}.I${m.obj.kind} = ${JSON.stringify(m.obj, null, 1)};\n`;
    spans.push({ from, to: src.split("\n").length, what: id(m) });
  });
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    skipLibCheck: true,
    types: [],
    lib: ["lib.es2022.d.ts"],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, lang, ...rest) => {
    if (resolve(name) === virtual) return ts.createSourceFile(name, src, lang);
    // Declaration files are parsed once for all calls (the mutation tests type-check many variants).
    let sf = declarationCache.get(name);
    if (!sf) {
      sf = getSourceFile.call(host, name, lang, ...rest);
      if (sf) declarationCache.set(name, sf);
    }
    return sf;
  };
  host.fileExists = (name) => resolve(name) === virtual || fileExists.call(host, name);
  host.readFile = (name) => (resolve(name) === virtual ? src : readFile.call(host, name));
  const program = ts.createProgram([virtual], options, host);
  const sf = program.getSourceFile(virtual)!;
  for (const d of [...program.getSyntacticDiagnostics(sf), ...program.getSemanticDiagnostics(sf)]) {
    const line = d.start === undefined ? 0 : sf.getLineAndCharacterOfPosition(d.start).line + 1;
    const what = spans.find((s) => line >= s.from && line < s.to)?.what ?? "imports";
    problems.push(`${what}: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`);
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------------------------
// Consistency checks (each returns its problems)

function kustomizationProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const k = ctx.kustomization;
  if (!k) return ["kustomization.yaml: missing"];
  if (k.apiVersion !== "kustomize.config.k8s.io/v1beta1") p.push(`kustomization.yaml: apiVersion ${k.apiVersion}`);
  const known = new Set(["apiVersion", "kind", "namespace", "resources", "images", "labels", "commonAnnotations"]);
  for (const key of Object.keys(k)) if (!known.has(key)) p.push(`kustomization.yaml: unexpected field ${key}`);
  const resources: string[] = k.resources ?? [];
  const expected = Object.keys(ctx.texts.k8s).filter((f) => f !== "kustomization.yaml" && f !== SECRET_EXAMPLE);
  for (const f of expected) if (!resources.includes(f)) p.push(`kustomization.yaml: does not list ${f}`);
  for (const r of resources) {
    if (r === SECRET_EXAMPLE) p.push(`kustomization.yaml: lists the placeholder ${SECRET_EXAMPLE}`);
    else if (!(r in ctx.texts.k8s)) p.push(`kustomization.yaml: lists ${r}, which does not exist`);
  }
  if (new Set(resources).size !== resources.length) p.push("kustomization.yaml: lists a file twice");
  const ns = one(ctx, "Namespace")?.obj.metadata?.name;
  if (!ns || k.namespace !== ns) p.push(`kustomization.yaml: namespace ${k.namespace} is not the Namespace's (${ns})`);
  for (const m of ctx.objects) {
    if (m.obj.kind !== "Namespace" && m.obj.metadata?.namespace !== ns) p.push(`${id(m)}: namespace ${m.obj.metadata?.namespace} (expected ${ns})`);
  }
  // Every container image is mapped to a pinned registry reference.
  const images: K[] = k.images ?? [];
  for (const m of applied(ctx)) {
    const pod = m.obj.spec?.template?.spec;
    for (const c of [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])]) {
      const entry = images.find((i) => i.name === c.image);
      const ref = entry ? `${entry.newName ?? entry.name}${entry.digest ? `@${entry.digest}` : `:${entry.newTag ?? ""}`}` : c.image;
      if (!/@sha256:[0-9a-f]{64}$/.test(ref) && !/:[^/:]*\d[^/:]*$/.test(ref)) p.push(`${id(m)}: image ${c.image} resolves to ${ref}, not a pinned version tag or digest`);
      if (/:latest$/.test(ref)) p.push(`${id(m)}: image ${ref} uses latest`);
    }
  }
  return p;
}

function selectorProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  const podLabels = b.dep.obj.spec.template.metadata?.labels ?? {};
  if (!selects(b.dep.obj.spec.selector, podLabels)) p.push(`${id(b.dep)}: selector does not match its pod template labels`);
  const svc = one(ctx, "Service");
  if (!svc || !selects(svc.obj.spec?.selector, podLabels)) p.push("Service: selector does not select the backend pods");
  const pdb = one(ctx, "PodDisruptionBudget");
  if (!pdb || !selects(pdb.obj.spec?.selector, podLabels)) p.push("PodDisruptionBudget: selector does not select the backend pods");
  // Neither may select the conversion Job's pods (they serve nothing).
  for (const job of ofKind(ctx, "Job")) {
    const labels = job.obj.spec?.template?.metadata?.labels ?? {};
    if (svc && selects(svc.obj.spec?.selector, labels)) p.push(`Service: selector also selects ${id(job)}'s pods`);
    if (pdb && selects(pdb.obj.spec?.selector, labels)) p.push(`PodDisruptionBudget: selector also selects ${id(job)}'s pods`);
  }
  return p;
}

function portProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  const ports: K[] = b.c.ports ?? [];
  const port = ports[0];
  const envPort = Number(envOf(b.c).BACKEND_PORT ?? CONFIG_DEFAULTS.port);
  if (ports.length !== 1 || port.containerPort !== envPort) p.push(`${id(b.dep)}: containerPort ${port?.containerPort} is not BACKEND_PORT ${envPort}`);
  const expose = words(lastInstr(finalStage(ctx.docker), "EXPOSE")?.args ?? "").map((w) => Number(w.split("/")[0]));
  if (!expose.includes(port?.containerPort)) p.push(`${DOCKERFILE}: EXPOSE ${expose.join(" ")} does not include containerPort ${port?.containerPort}`);
  const svc = one(ctx, "Service");
  const sp: K = svc?.obj.spec?.ports?.[0];
  if (!svc || svc.obj.spec.type !== "ClusterIP") p.push("Service: not a ClusterIP Service");
  if (sp?.port !== port?.containerPort) p.push(`Service: port ${sp?.port} (expected ${port?.containerPort}, as BACKEND_URLS and the docs use)`);
  const target = sp?.targetPort;
  if (!(typeof target === "string" ? target === port?.name : target === port?.containerPort)) p.push(`Service: targetPort ${target} is not the backend container's port`);
  const ann = b.dep.obj.spec.template.metadata?.annotations ?? {};
  if (ann["prometheus.io/port"] !== undefined && Number(ann["prometheus.io/port"]) !== port?.containerPort) p.push(`${id(b.dep)}: prometheus.io/port ${ann["prometheus.io/port"]} is not the container port`);
  if (ann["prometheus.io/path"] !== undefined && ann["prometheus.io/path"] !== "/metrics") p.push(`${id(b.dep)}: prometheus.io/path is not /metrics`);
  return p;
}

function probeProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  const port = b.c.ports?.[0];
  const want: Record<string, string[]> = { readinessProbe: ["/readyz"], livenessProbe: ["/healthz"], startupProbe: ["/readyz", "/healthz"] };
  for (const [name, paths] of Object.entries(want)) {
    const probe = b.c[name];
    const get = probe?.httpGet;
    if (!get) {
      p.push(`${id(b.dep)}: ${name} is not an httpGet probe`);
      continue;
    }
    if (!paths.includes(get.path)) p.push(`${id(b.dep)}: ${name} path ${get.path} (expected ${paths.join(" or ")})`);
    if (!(get.port === port?.name || get.port === port?.containerPort)) p.push(`${id(b.dep)}: ${name} port ${get.port} is not the container port`);
    if (get.scheme !== undefined && get.scheme !== "HTTP") p.push(`${id(b.dep)}: ${name} scheme ${get.scheme}`);
  }
  const s = b.c.startupProbe;
  const budget = (s?.periodSeconds ?? 10) * (s?.failureThreshold ?? 3) + (s?.initialDelaySeconds ?? 0);
  if (budget < MIN_STARTUP_BUDGET_S) p.push(`${id(b.dep)}: startupProbe allows ${budget} s for the model to load (at least ${MIN_STARTUP_BUDGET_S})`);
  return p;
}

function resourceProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  const r = b.c.resources ?? {};
  if (quantity(r.limits?.["nvidia.com/gpu"]) !== 1) p.push(`${id(b.dep)}: limits nvidia.com/gpu is ${r.limits?.["nvidia.com/gpu"]} (expected 1)`);
  if (r.requests?.["nvidia.com/gpu"] !== undefined && quantity(r.requests["nvidia.com/gpu"]) !== quantity(r.limits?.["nvidia.com/gpu"])) p.push(`${id(b.dep)}: GPU request differs from its limit`);
  for (const m of applied(ctx)) {
    const pod = m.obj.spec?.template?.spec;
    for (const c of [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])]) {
      for (const res of ["cpu", "memory"]) {
        const req = quantity(c.resources?.requests?.[res]);
        const lim = quantity(c.resources?.limits?.[res]);
        if (!(req > 0)) p.push(`${id(m)} ${c.name}: no ${res} request`);
        if (res === "memory" && !(lim > 0)) p.push(`${id(m)} ${c.name}: no memory limit`);
        if (lim > 0 && req > lim) p.push(`${id(m)} ${c.name}: ${res} request above its limit`);
      }
    }
  }
  return p;
}

function configProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  // The Deployment's environment as the backend sees it: the image's ENV, overridden by the container's env.
  const env: Env = { ...stageEnv(finalStage(ctx.docker)), ...envOf(b.c), BACKEND_HMAC_SECRET: VALID_SECRET };
  try {
    const cfg = loadBackendConfig(env);
    if (cfg.host !== "0.0.0.0" && cfg.host !== "::") p.push(`${id(b.dep)}: BACKEND_HOST ${cfg.host} is not reachable from outside the pod`);
    if (cfg.executionProvider !== "cuda") p.push(`${id(b.dep)}: EXECUTION_PROVIDER is ${cfg.executionProvider} (expected cuda)`);
    const mount = (b.c.volumeMounts ?? []).find((v: K) => cfg.modelDir === v.mountPath || cfg.modelDir.startsWith(`${v.mountPath}/`));
    if (!mount) p.push(`${id(b.dep)}: MODEL_DIR ${cfg.modelDir} is on no volume`);
    else if (mount.readOnly !== true) p.push(`${id(b.dep)}: the model volume is not mounted read-only`);
    const cpu = quantity(b.c.resources?.requests?.cpu);
    if (cfg.ortThreads !== null && cpu > 0 && cfg.ortThreads > Math.ceil(quantity(b.c.resources?.limits?.cpu ?? cpu))) p.push(`${id(b.dep)}: ORT_THREADS ${cfg.ortThreads} above the CPU limit`);
    // Graceful shutdown: preStop + the backend's drain must end before SIGKILL.
    const pre = b.c.lifecycle?.preStop;
    const preStopS = pre?.sleep?.seconds ?? (pre?.exec?.command?.[0] === "sleep" ? Number(pre.exec.command[1]) : 0);
    const grace = b.pod.terminationGracePeriodSeconds ?? 30;
    const need = preStopS + cfg.shutdownGraceMs / 1000 + SHUTDOWN_MARGIN_S;
    if (grace < need) p.push(`${id(b.dep)}: terminationGracePeriodSeconds ${grace} < preStop ${preStopS} s + SHUTDOWN_GRACE_MS ${cfg.shutdownGraceMs / 1000} s + ${SHUTDOWN_MARGIN_S} s`);
    // Autoscaling must ask for pods before the admission queue is full.
    const hpa = one(ctx, "HorizontalPodAutoscaler");
    const target = queueMetric(hpa)?.pods?.target;
    if (target && !(quantity(target.averageValue) < cfg.queueSize)) p.push(`HorizontalPodAutoscaler: target ${target.averageValue} is not below QUEUE_SIZE ${cfg.queueSize}`);
  } catch (e) {
    p.push(`${id(b.dep)}: the backend rejects its configuration: ${e instanceof BackendConfigError ? e.problems.join("; ") : String(e)}`);
  }
  return p;
}

function envNameProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const known = backendEnvNames();
  for (const m of applied(ctx)) {
    const pod = m.obj.spec?.template?.spec;
    for (const c of [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])]) {
      const script = [...(c.command ?? []), ...(c.args ?? [])].join("\n");
      for (const e of c.env ?? []) {
        const usedByScript = new RegExp(`\\$\\{?${e.name}\\b`).test(script);
        if (!knownEnv(e.name, known) && !usedByScript) p.push(`${id(m)} ${c.name}: env ${e.name} is read by nothing (misspelt?)`);
      }
    }
  }
  for (const name of Object.keys(stageEnv(finalStage(ctx.docker)))) {
    if (!knownEnv(name, known)) p.push(`${DOCKERFILE}: ENV ${name} is read by nothing (misspelt?)`);
  }
  return p;
}

function secretProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  if (!b) return ["no backend Deployment"];
  const example = ctx.objects.find((m) => m.file === SECRET_EXAMPLE);
  if (!example || example.obj.kind !== "Secret") return [`${SECRET_EXAMPLE}: no Secret`];
  const e = (b.c.env ?? []).find((x: K) => x.name === "BACKEND_HMAC_SECRET");
  const ref = e?.valueFrom?.secretKeyRef;
  if (!ref || e.value !== undefined) p.push(`${id(b.dep)}: BACKEND_HMAC_SECRET does not come from a Secret`);
  else {
    if (ref.name !== example.obj.metadata?.name) p.push(`${id(b.dep)}: BACKEND_HMAC_SECRET refers to Secret ${ref.name}, not ${example.obj.metadata?.name}`);
    const data = { ...(example.obj.stringData ?? {}), ...(example.obj.data ?? {}) };
    if (!(ref.key in data)) p.push(`${id(b.dep)}: BACKEND_HMAC_SECRET refers to key ${ref.key}, which ${SECRET_EXAMPLE} does not have`);
    if (ref.optional === true) p.push(`${id(b.dep)}: BACKEND_HMAC_SECRET must not be optional`);
  }
  // No literal secret anywhere in the applied manifests.
  for (const m of applied(ctx)) {
    if (m.obj.kind === "Secret") p.push(`${id(m)}: a Secret among the applied manifests`);
    const pod = m.obj.spec?.template?.spec;
    for (const c of [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])]) {
      for (const x of c.env ?? []) if (/SECRET|TOKEN|PASSWORD|KEY/.test(x.name) && x.value !== undefined) p.push(`${id(m)} ${c.name}: ${x.name} has a literal value`);
    }
  }
  // The placeholder must not be usable as a key: the backend refuses it.
  const placeholder = example.obj.stringData?.BACKEND_HMAC_SECRET;
  try {
    loadBackendConfig({ MODEL_DIR: "/models/x", BACKEND_HMAC_SECRET: placeholder });
    p.push(`${SECRET_EXAMPLE}: the backend would accept the placeholder ${JSON.stringify(placeholder)} as its key`);
  } catch (err) {
    if (!(err instanceof BackendConfigError)) throw err;
  }
  return p;
}

function volumeProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  const pvc = one(ctx, "PersistentVolumeClaim");
  const job = one(ctx, "Job");
  if (!b || !pvc || !job) return ["a backend Deployment, a PersistentVolumeClaim and a Job are needed"];
  const modelDirs = new Set<string | undefined>([envOf(b.c).MODEL_DIR, stageEnv(finalStage(ctx.docker)).MODEL_DIR]);
  const jpod = job.obj.spec.template.spec;
  const jc = jpod.containers?.[0];
  modelDirs.add(envOf(jc).MODEL_DIR);
  if (modelDirs.size !== 1) p.push(`MODEL_DIR differs between the Dockerfile, the Deployment and the Job: ${[...modelDirs].join(", ")}`);
  const modelDir = envOf(b.c).MODEL_DIR ?? "";
  const claimOf = (pod: K, c: K): { vol: K; mount: K } | undefined => {
    const mount = (c?.volumeMounts ?? []).find((v: K) => modelDir === v.mountPath || modelDir.startsWith(`${v.mountPath}/`));
    const vol = (pod.volumes ?? []).find((v: K) => v.name === mount?.name);
    return mount && vol ? { vol, mount } : undefined;
  };
  const mine = claimOf(b.pod, b.c);
  if (!mine || mine.vol.persistentVolumeClaim?.claimName !== pvc.obj.metadata.name) p.push(`${id(b.dep)}: the model volume is not the PVC ${pvc.obj.metadata.name}`);
  else if (mine.vol.persistentVolumeClaim.readOnly !== true || mine.mount.readOnly !== true) p.push(`${id(b.dep)}: the model PVC is not read-only`);
  const theirs = claimOf(jpod, jc);
  if (!theirs || theirs.vol.persistentVolumeClaim?.claimName !== pvc.obj.metadata.name) p.push(`${id(job)}: does not write MODEL_DIR into the PVC ${pvc.obj.metadata.name}`);
  else if (theirs.mount.readOnly === true || theirs.vol.persistentVolumeClaim.readOnly === true) p.push(`${id(job)}: the model PVC is read-only for the converter`);
  // Every other directory the converter writes must be a writable volume (its root file system is read-only).
  const jenv = envOf(jc);
  for (const name of ["HF_HUB_CACHE", "NPM_CONFIG_CACHE"]) {
    const dir = jenv[name];
    if (!dir) p.push(`${id(job)}: ${name} is not set (the default lies on the read-only root file system)`);
    else if (!(jc.volumeMounts ?? []).some((v: K) => (dir === v.mountPath || dir.startsWith(`${v.mountPath}/`)) && v.readOnly !== true)) p.push(`${id(job)}: ${name} ${dir} is on no writable volume`);
  }
  // More than one replica means pods on several nodes reading the same claim.
  const hpa = one(ctx, "HorizontalPodAutoscaler");
  const modes: string[] = pvc.obj.spec?.accessModes ?? [];
  if ((hpa?.obj.spec?.maxReplicas ?? 1) > 1 && !modes.some((x) => x === "ReadWriteMany" || x === "ReadOnlyMany")) p.push(`${id(pvc)}: accessModes ${modes.join(",")} cannot serve ${hpa?.obj.spec?.maxReplicas} replicas on several nodes`);
  return p;
}

function securityProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const user = lastInstr(finalStage(ctx.docker), "USER")?.args.trim() ?? "";
  const uid = Number(user.split(":")[0]);
  const ns = one(ctx, "Namespace");
  if (ns?.obj.metadata?.labels?.["pod-security.kubernetes.io/enforce"] !== "restricted") p.push("Namespace: does not enforce the restricted Pod Security Standard");
  for (const m of applied(ctx)) {
    const pod = m.obj.spec?.template?.spec;
    if (!pod) continue;
    const psc = pod.securityContext ?? {};
    if (psc.runAsNonRoot !== true) p.push(`${id(m)}: pod runAsNonRoot is not true`);
    if (psc.runAsUser !== uid) p.push(`${id(m)}: pod runAsUser ${psc.runAsUser} is not the image's USER ${user}`);
    if (pod.automountServiceAccountToken !== false) p.push(`${id(m)}: mounts a service account token it does not need`);
    for (const c of [...(pod.initContainers ?? []), ...(pod.containers ?? [])]) {
      const sc = c.securityContext ?? {};
      const where = `${id(m)} ${c.name}`;
      if (sc.allowPrivilegeEscalation !== false) p.push(`${where}: allowPrivilegeEscalation is not false`);
      if (sc.readOnlyRootFilesystem !== true) p.push(`${where}: readOnlyRootFilesystem is not true`);
      if ((sc.runAsNonRoot ?? psc.runAsNonRoot) !== true) p.push(`${where}: runAsNonRoot is not true`);
      if ((sc.runAsUser ?? psc.runAsUser) === 0) p.push(`${where}: runs as root`);
      if (sc.privileged === true) p.push(`${where}: privileged`);
      if (!(sc.capabilities?.drop ?? []).includes("ALL")) p.push(`${where}: does not drop ALL capabilities`);
      if ((sc.capabilities?.add ?? []).length > 0) p.push(`${where}: adds capabilities`);
      if ((sc.seccompProfile?.type ?? psc.seccompProfile?.type) !== "RuntimeDefault") p.push(`${where}: seccomp profile is not RuntimeDefault`);
    }
  }
  return p;
}

function hpaProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const hpa = one(ctx, "HorizontalPodAutoscaler");
  const dep = one(ctx, "Deployment");
  if (!hpa || !dep) return ["an HPA and a Deployment are needed"];
  const ref = hpa.obj.spec?.scaleTargetRef ?? {};
  if (ref.apiVersion !== dep.obj.apiVersion || ref.kind !== "Deployment" || ref.name !== dep.obj.metadata.name) p.push(`${id(hpa)}: scaleTargetRef ${ref.apiVersion} ${ref.kind}/${ref.name} is not ${id(dep)}`);
  const min = hpa.obj.spec?.minReplicas ?? 1;
  const max = hpa.obj.spec?.maxReplicas;
  if (!(min >= 1 && max >= min)) p.push(`${id(hpa)}: replicas ${min}..${max}`);
  const q = queueMetric(hpa);
  const gauges = serverGauges();
  if (!q) p.push(`${id(hpa)}: no Pods metric on queue depth`);
  else if (!gauges.has(q.pods.metric.name)) p.push(`${id(hpa)}: Pods metric ${q.pods.metric.name} is none of the server's gauges (${[...gauges].join(", ")})`);
  else if (q.pods.target?.type !== "AverageValue" || !(quantity(q.pods.target.averageValue) > 0)) p.push(`${id(hpa)}: ${q.pods.metric.name} target is not a positive AverageValue`);
  const pdb = one(ctx, "PodDisruptionBudget");
  const s = pdb?.obj.spec ?? {};
  const blocksDrains = s.maxUnavailable !== undefined ? quantity(s.maxUnavailable) < 1 && !String(s.maxUnavailable).endsWith("%") : quantity(s.minAvailable) >= min;
  if (!pdb || blocksDrains) p.push(`PodDisruptionBudget: would block node drains at ${min} replica(s)`);
  return p;
}

function jobProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const b = backend(ctx);
  const job = one(ctx, "Job");
  if (!b || !job) return ["a backend Deployment and a Job are needed"];
  const pod = job.obj.spec?.template?.spec ?? {};
  const c = pod.containers?.[0];
  if (pod.restartPolicy !== "Never" && pod.restartPolicy !== "OnFailure") p.push(`${id(job)}: restartPolicy ${pod.restartPolicy}`);
  if (c?.image !== b.c.image) p.push(`${id(job)}: image ${c?.image} is not the backend's ${b.c.image}`);
  for (const ic of b.pod.initContainers ?? []) if (ic.image !== b.c.image) p.push(`${id(b.dep)} ${ic.name}: image ${ic.image} is not the backend's`);
  const script = [...(c?.command ?? []), ...(c?.args ?? [])].join("\n");
  if (!/\bnpm run convert -- /.test(script)) p.push(`${id(job)}: does not run \`npm run convert -- …\``);
  if (!/--out "?\$\{?MODEL_DIR\b/.test(script)) p.push(`${id(job)}: does not convert into $MODEL_DIR`);
  if (!/--model /.test(script)) p.push(`${id(job)}: passes no --model`);
  if (!/manifest\.json/.test(script)) p.push(`${id(job)}: is not idempotent (no check for an existing converted model)`);
  if (!ctx.pkg.scripts?.convert) p.push("package.json: no `convert` script for the Job to run");
  if (c?.resources?.limits?.["nvidia.com/gpu"] !== undefined) p.push(`${id(job)}: holds a GPU it does not use`);
  const dtype = envOf(c).CONVERT_DTYPE;
  if (dtype !== undefined && !["fp32", "fp16", "int8", "int4"].includes(dtype)) p.push(`${id(job)}: CONVERT_DTYPE ${dtype}`);
  const init = (b.pod.initContainers ?? []).map((x: K) => [...(x.command ?? []), ...(x.args ?? [])].join("\n")).join("\n");
  if (!/manifest\.json/.test(init)) p.push(`${id(b.dep)}: no init container waits for the converted model`);
  return p;
}

function dockerBaseProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const { stages } = ctx.docker;
  if (stages.length < 2) p.push(`${DOCKERFILE}: not multi-stage`);
  for (const s of stages) {
    if (stages.some((x) => x.name !== undefined && x.name === s.image)) continue; // FROM an earlier stage
    const digest = /@sha256:[0-9a-f]{64}$/.test(s.image);
    const tag = /^[^@]+:([^/:@]+)(@.*)?$/.exec(s.image)?.[1];
    if (!digest && (!tag || tag === "latest" || !/\d+\.\d+/.test(tag))) p.push(`${DOCKERFILE}: FROM ${s.image} is not pinned to a version tag or digest`);
    if (/\$/.test(s.image)) p.push(`${DOCKERFILE}: FROM ${s.image} has an unresolved variable`);
  }
  const last = finalStage(ctx.docker);
  if (!/^nvidia\/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?$/.test(last?.image ?? "")) p.push(`${DOCKERFILE}: runtime base ${last?.image} is not an nvidia/cuda 12.x cuDNN runtime image`);
  const build = appSourceStage(ctx.docker);
  if (!build) return [...p, `${DOCKERFILE}: the final stage does not COPY --from=<stage> /app /app`];
  const node = /^node:(\d+)\.(\d+)\.(\d+)-/.exec(build.image);
  const engines = /(\d+)\.(\d+)/.exec(ctx.pkg.engines?.node ?? "");
  if (!node || node[1] !== "20") p.push(`${DOCKERFILE}: build stage ${build.image} is not Node 20`);
  else if (engines && (Number(node[1]) < Number(engines[1]) || (node[1] === engines[1] && Number(node[2]) < Number(engines[2])))) p.push(`${DOCKERFILE}: ${build.image} is older than engines.node ${ctx.pkg.engines.node}`);
  // The runtime uses the build stage's node binary.
  if (!instrs(last, "COPY").some((i) => i.args.includes(`--from=${build.name}`) && i.args.includes("/usr/local/bin/node"))) p.push(`${DOCKERFILE}: the runtime stage does not get node from the build stage`);
  return p;
}

function dockerInstallProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const build = appSourceStage(ctx.docker);
  const runs = instrs(build, "RUN").map((i) => i.args);
  const ci = runs.findIndex((r) => /\bnpm ci\b/.test(r));
  const ciCmd = runs[ci] ?? "";
  if (ci < 0) return [`${DOCKERFILE}: the build stage does not run npm ci`];
  if (!/--omit=dev\b/.test(ciCmd)) p.push(`${DOCKERFILE}: npm ci keeps dev dependencies`);
  if (!/--ignore-scripts\b/.test(ciCmd)) p.push(`${DOCKERFILE}: npm ci runs install scripts (npm 10 and 11 differ there)`);
  // onnxruntime-node's own install script, run explicitly for CUDA 12.
  const ortPkg = JSON.parse(readFileSync(join(ROOT, "node_modules/onnxruntime-node/package.json"), "utf8")) as K;
  const script = /^node (\S+)$/.exec(ortPkg.scripts?.postinstall ?? "")?.[1];
  const scriptPath = script ? posix.join("node_modules/onnxruntime-node", script.endsWith(".js") ? script : `${script}.js`) : "";
  const ort = runs.findIndex((r) => r.includes(scriptPath) || (scriptPath.endsWith(".js") && r.includes(scriptPath.slice(0, -3))));
  if (!script || !existsSync(join(ROOT, scriptPath))) p.push(`onnxruntime-node: its postinstall is no longer \`node <script>\` (${ortPkg.scripts?.postinstall})`);
  else if (ort < 0) p.push(`${DOCKERFILE}: does not run onnxruntime-node's install script (${scriptPath})`);
  else {
    if (ort < ci) p.push(`${DOCKERFILE}: runs onnxruntime-node's install script before npm ci`);
    const cmd = runs[ort]!;
    if (!/ONNXRUNTIME_NODE_INSTALL=cuda12\b/.test(cmd)) p.push(`${DOCKERFILE}: onnxruntime-node's install script runs without ONNXRUNTIME_NODE_INSTALL=cuda12`);
    // The files the Dockerfile checks for are the ones the script installs.
    const metadataJs = join(ROOT, "node_modules/onnxruntime-node/script/install-metadata.js");
    const metadata = JSON.parse(execFileSync(process.execPath, ["-e", "process.stdout.write(JSON.stringify(require(process.argv[1])))", metadataJs], { encoding: "utf8" })) as K;
    if (!(metadata.requirements?.["linux/x64"] ?? []).includes("cuda12")) p.push("onnxruntime-node: no cuda12 installation for linux/x64");
    const files = Object.keys(metadata.manifests?.["linux/x64:cuda12"] ?? {}).map((f) => posix.basename(f));
    for (const lib of ["libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so"]) {
      if (!files.includes(lib)) p.push(`onnxruntime-node: ${lib} is no longer installed by cuda12`);
      if (!new RegExp(`test -s \\S*/bin/napi-v6/linux/x64/${lib.replace(/\./g, "\\.")}`).test(cmd)) p.push(`${DOCKERFILE}: does not check that ${lib} was installed`);
    }
  }
  return p;
}

function dockerRuntimeProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const last = finalStage(ctx.docker);
  const all = last?.instrs ?? [];
  const user = lastInstr(last, "USER");
  const cmdAt = all.findIndex((i) => i.cmd === "CMD");
  const uid = Number((user?.args.trim() ?? "").split(":")[0]);
  if (!user || !/^\d+(:\d+)?$/.test(user.args.trim()) || !(uid > 0)) p.push(`${DOCKERFILE}: USER ${user?.args ?? "(none)"} is not a numeric non-root user`);
  else if (all.indexOf(user) > cmdAt) p.push(`${DOCKERFILE}: USER comes after CMD`);
  const env = stageEnv(last);
  try {
    const cfg = loadBackendConfig({ ...env, BACKEND_HMAC_SECRET: VALID_SECRET });
    if (cfg.host !== "0.0.0.0" && cfg.host !== "::") p.push(`${DOCKERFILE}: BACKEND_HOST ${cfg.host}: unreachable from outside the container`);
    if (cfg.executionProvider !== "cuda") p.push(`${DOCKERFILE}: EXECUTION_PROVIDER is not cuda`);
    const expose = words(lastInstr(last, "EXPOSE")?.args ?? "").map((w) => Number(w.split("/")[0]));
    if (expose.length !== 1 || expose[0] !== cfg.port) p.push(`${DOCKERFILE}: EXPOSE ${expose.join(" ")} is not the backend's port ${cfg.port}`);
    const volumes = instrs(last, "VOLUME").flatMap((i) => execForm(i.args) ?? words(i.args));
    if (!volumes.some((v) => cfg.modelDir === v || cfg.modelDir.startsWith(`${v.replace(/\/$/, "")}/`))) p.push(`${DOCKERFILE}: MODEL_DIR ${cfg.modelDir} is not under a VOLUME`);
    // HEALTHCHECK: node (no curl in the image) fetching /healthz on the backend's port.
    const hc = lastInstr(last, "HEALTHCHECK");
    const hcCmd = /\bCMD\s+([\s\S]*)$/.exec(hc?.args ?? "")?.[1] ?? "";
    const hcExec = execForm(hcCmd) ?? words(hcCmd);
    if (!hc || /^NONE$/i.test(hc.args.trim())) p.push(`${DOCKERFILE}: no HEALTHCHECK`);
    else {
      if (hcExec[0] !== "node") p.push(`${DOCKERFILE}: HEALTHCHECK does not use node`);
      if (!hcCmd.includes("/healthz")) p.push(`${DOCKERFILE}: HEALTHCHECK does not hit /healthz`);
      if (!hcCmd.includes("BACKEND_PORT") && !hcCmd.includes(String(cfg.port))) p.push(`${DOCKERFILE}: HEALTHCHECK does not use the backend's port`);
      if (/\b(curl|wget)\b/.test(hcCmd)) p.push(`${DOCKERFILE}: HEALTHCHECK uses a tool the image lacks`);
    }
  } catch (e) {
    p.push(`${DOCKERFILE}: the backend rejects the image's ENV: ${e instanceof BackendConfigError ? e.problems.join("; ") : String(e)}`);
  }
  if (workdir(last) !== "/app") p.push(`${DOCKERFILE}: the runtime WORKDIR is ${workdir(last)}, not /app`);
  return p;
}

/** CMD and the files it needs: the entry point, its import graph, tsx and production dependencies only. */
function dockerContentProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  const last = finalStage(ctx.docker);
  const build = appSourceStage(ctx.docker);
  const cmd = execForm(lastInstr(last, "CMD")?.args ?? "");
  if (!cmd) return [`${DOCKERFILE}: CMD is missing or not in exec form (node must be PID 1 to get SIGTERM)`];
  if (cmd[0] !== "node" || cmd[1] !== "--import" || cmd[2] !== "tsx" || cmd.length !== 4) p.push(`${DOCKERFILE}: CMD ${JSON.stringify(cmd)} is not ["node", "--import", "tsx", <entry>]`);
  const entry = cmd.at(-1)!;
  if (entry !== BACKEND_ENTRY) p.push(`${DOCKERFILE}: CMD runs ${entry}, not ${BACKEND_ENTRY}`);
  const entries = [entry];
  const convert = scriptEntry(ctx.pkg.scripts?.convert);
  if (convert) entries.push(convert);
  const graph = importGraph(entries);
  for (const f of graph.missing) p.push(`${f}: imported or run by the image, but not in the repository`);
  for (const f of [...graph.files, "package.json", "package-lock.json"]) {
    if (ignored(ctx.ignore, f)) p.push(`${DOCKERIGNORE}: leaves out ${f}, which the image needs`);
    if (copiedTo(build, f) !== posix.join("/app", f)) p.push(`${DOCKERFILE}: no COPY puts ${f} at /app/${f}`);
  }
  // Only production dependencies are installed.
  const deps = ctx.pkg.dependencies ?? {};
  for (const [name, from] of graph.packages) {
    if (!(name in deps)) p.push(`${from}: imports ${name}, which is not a production dependency (npm ci --omit=dev leaves it out)`);
  }
  // tsx runs the backend's TypeScript: it must survive --omit=dev.
  if (!("tsx" in deps)) p.push("package.json: tsx runs the backend and must be a production dependency (npm ci --omit=dev leaves it out)");
  // The lockfile pins tsx's whole dependency tree (npm ci installs exactly that).
  const lock = JSON.parse(readFileSync(join(ROOT, "package-lock.json"), "utf8")) as K;
  if (!lock.packages?.["node_modules/tsx"]?.version) p.push("package-lock.json: no tsx entry");
  return p;
}

function dockerignoreProblems(ctx: Ctx): string[] {
  const p: string[] = [];
  for (const f of ["package.json", "package-lock.json", "tsconfig.json", "tsconfig.base.json"]) if (ignored(ctx.ignore, f)) p.push(`${DOCKERIGNORE}: leaves out ${f}`);
  // Every COPY source of the build context is let in.
  for (const s of ctx.docker.stages) {
    for (const ins of instrs(s, "COPY")) {
      if (ins.args.includes("--from=")) continue;
      const paths = (execForm(ins.args) ?? words(ins.args)).filter((x) => !x.startsWith("--")).slice(0, -1);
      for (const src of paths) {
        if (!existsSync(join(ROOT, src))) p.push(`${DOCKERFILE}: COPY ${src}: not in the repository`);
        else if (ignored(ctx.ignore, posix.normalize(src).replace(/\/$/, ""))) p.push(`${DOCKERIGNORE}: leaves out ${src}, which the Dockerfile copies`);
      }
    }
  }
  // Secrets, installed modules, models and VCS data never enter the build context.
  for (const f of [".dev.vars", "node_modules/hono/package.json", "shared/src/node_modules/x", ".git/config", "models/medvlm-r1/decoder_model_merged.onnx", "gpu-backend/src/x.onnx", "scripts/.dev.vars", "edge/src/index.ts", "test/backend/deploy.test.ts"]) {
    if (!ignored(ctx.ignore, f)) p.push(`${DOCKERIGNORE}: lets ${f} into the build context`);
  }
  return p;
}

const CHECKS: Record<string, (ctx: Ctx) => string[]> = {
  "manifests parse strictly, the same as YAML 1.1 and 1.2": (ctx) => ctx.parseProblems,
  "objects validate against the Kubernetes schemas": schemaProblems,
  "kustomization lists every manifest but the placeholder Secret, one namespace, pinned images": kustomizationProblems,
  "selectors of the Deployment, Service and PDB match the backend pods only": selectorProblems,
  "ports agree: container, BACKEND_PORT, EXPOSE, Service, scrape annotation": portProblems,
  "probes: /readyz readiness, /healthz liveness, a startup budget for the model load": probeProblems,
  "resources: one GPU, requests within limits": resourceProblems,
  "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE": configProblems,
  "environment variable names are ones something reads": envNameProblems,
  "BACKEND_HMAC_SECRET comes from the Secret; no literal secrets; the placeholder is refused": secretProblems,
  "model volume: one PVC, read-only for the backend, written by the Job; writable caches": volumeProblems,
  "restricted pod security: non-root (the image's USER), read-only root, no privilege escalation": securityProblems,
  "HPA scales the Deployment on the server's queue-depth gauge; the PDB does not block drains": hpaProblems,
  "conversion Job: same image, idempotent npm run convert into MODEL_DIR; pods wait for the model": jobProblems,
  "Dockerfile: multi-stage, pinned bases, CUDA 12 cuDNN runtime, Node 20 from the build stage": dockerBaseProblems,
  "Dockerfile: npm ci --omit=dev --ignore-scripts, then onnxruntime-node's CUDA 12 install": dockerInstallProblems,
  "Dockerfile: non-root USER, HEALTHCHECK with node on /healthz, EXPOSE, ENV the backend accepts": dockerRuntimeProblems,
  "Dockerfile: CMD entry and every file it imports are in the image; only production dependencies": dockerContentProblems,
  ".dockerignore lets in what the Dockerfile copies and keeps secrets and models out": dockerignoreProblems,
};

// ---------------------------------------------------------------------------------------------------------------

const TEXTS = readTexts();
const CTX = buildCtx(TEXTS);

describe("deployment artifacts (offline)", () => {
  it("deploy/k8s holds the expected manifests", () => {
    const kinds = CTX.objects.map((m) => `${m.file}:${m.obj.kind}`).sort();
    expect(kinds).toEqual([
      "backend-deployment.yaml:Deployment",
      "backend-hpa.yaml:HorizontalPodAutoscaler",
      "backend-pdb.yaml:PodDisruptionBudget",
      "backend-service.yaml:Service",
      "convert-job.yaml:Job",
      "model-pvc.yaml:PersistentVolumeClaim",
      "namespace.yaml:Namespace",
      "secret.example.yaml:Secret",
    ]);
    expect(CTX.kustomization?.kind).toBe("Kustomization");
  });

  it.each(Object.keys(CHECKS))("%s", (name) => {
    expect(CHECKS[name]!(CTX)).toEqual([]);
  });

  it("no unknown or mistyped fields (TypeScript check against the Kubernetes API types)", () => {
    expect(typeProblems(CTX)).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Each check reports the mistake it exists for.

interface Mutation {
  what: string;
  /** Which text to edit: a deploy/k8s file name, "Dockerfile", ".dockerignore" or "package.json". */
  file: string;
  from: string | RegExp;
  to: string;
  check: string;
  expect: RegExp;
}

const M = (what: string, file: string, from: string | RegExp, to: string, check: keyof typeof CHECKS | "types", expectRe: RegExp): Mutation => ({ what, file, from, to, check, expect: expectRe });

const MUTATIONS: Mutation[] = [
  M("a YAML 1.1 boolean", "backend-deployment.yaml", 'prometheus.io/scrape: "true"', "prometheus.io/scrape: yes", "manifests parse strictly, the same as YAML 1.1 and 1.2", /YAML 1\.1/),
  M("a duplicate key", "backend-service.yaml", "  type: ClusterIP\n", "  type: ClusterIP\n  type: NodePort\n", "manifests parse strictly, the same as YAML 1.1 and 1.2", /unique|duplicate/i),
  M("a string replica count", "backend-deployment.yaml", "replicas: 1", 'replicas: "1"', "objects validate against the Kubernetes schemas", /replicas must be integer/),
  M("a malformed quantity", "backend-deployment.yaml", "memory: 32Gi", "memory: 32 GB", "objects validate against the Kubernetes schemas", /quantity/),
  M("an HPA metric without a target", "backend-hpa.yaml", /        target:\n          type: AverageValue\n          averageValue: "4"\n/, "", "objects validate against the Kubernetes schemas", /target/),
  M("a misspelt field", "backend-deployment.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimt: 5", "types", /revisionHistoryLimt/),
  M("a misspelt probe field", "backend-deployment.yaml", "failureThreshold: 120", "failureTreshold: 120", "types", /failureTreshold/),
  M("a misspelt label field", "model-pvc.yaml", "  labels:\n", "  lables:\n", "types", /lables/),
  M("a wrong kind in the HPA", "backend-hpa.yaml", "apiVersion: autoscaling/v2", "apiVersion: autoscaling/v1", "objects validate against the Kubernetes schemas", /unknown apiVersion/),
  M("a manifest left out of the kustomization", "kustomization.yaml", "  - backend-pdb.yaml\n", "", "kustomization lists every manifest but the placeholder Secret, one namespace, pinned images", /does not list backend-pdb\.yaml/),
  M("the placeholder Secret in the kustomization", "kustomization.yaml", "  - backend-pdb.yaml\n", "  - backend-pdb.yaml\n  - secret.example.yaml\n", "kustomization lists every manifest but the placeholder Secret, one namespace, pinned images", /placeholder/),
  M("an unpinned image", "kustomization.yaml", 'newTag: "0.1.0"', "newTag: latest", "kustomization lists every manifest but the placeholder Secret, one namespace, pinned images", /not a pinned|latest/),
  M("another namespace", "backend-service.yaml", "namespace: medvlm", "namespace: default", "kustomization lists every manifest but the placeholder Secret, one namespace, pinned images", /namespace default/),
  M("a mismatched PDB selector", "backend-pdb.yaml", "app.kubernetes.io/instance: medvlm-r1", "app.kubernetes.io/instance: medvlm", "selectors of the Deployment, Service and PDB match the backend pods only", /PodDisruptionBudget: selector/),
  M("a mismatched Service selector", "backend-service.yaml", "app.kubernetes.io/name: medvlm-backend\n    app.kubernetes.io/instance", "app.kubernetes.io/name: backend\n    app.kubernetes.io/instance", "selectors of the Deployment, Service and PDB match the backend pods only", /Service: selector/),
  M("a Service selecting the Job", "backend-service.yaml", "    app.kubernetes.io/name: medvlm-backend\n    app.kubernetes.io/instance: medvlm-r1\n  ports", "    app.kubernetes.io/instance: medvlm-r1\n  ports", "selectors of the Deployment, Service and PDB match the backend pods only", /also selects/),
  M("a wrong targetPort", "backend-service.yaml", "targetPort: http", "targetPort: 8080", "ports agree: container, BACKEND_PORT, EXPOSE, Service, scrape annotation", /targetPort/),
  M("BACKEND_PORT not the container port", "backend-deployment.yaml", /- name: BACKEND_PORT\n( +)value: "8788"/, '- name: BACKEND_PORT\n$1value: "9000"', "ports agree: container, BACKEND_PORT, EXPOSE, Service, scrape annotation", /containerPort 8788 is not BACKEND_PORT 9000/),
  M("a wrong EXPOSE", "Dockerfile", "EXPOSE 8788", "EXPOSE 8080", "ports agree: container, BACKEND_PORT, EXPOSE, Service, scrape annotation", /EXPOSE 8080/),
  M("liveness on /readyz", "backend-deployment.yaml", /path: \/healthz/, "path: /readyz", "probes: /readyz readiness, /healthz liveness, a startup budget for the model load", /livenessProbe path/),
  M("a short startup budget", "backend-deployment.yaml", "failureThreshold: 120", "failureThreshold: 12", "probes: /readyz readiness, /healthz liveness, a startup budget for the model load", /startupProbe allows 120 s/),
  M("a probe on another port", "backend-deployment.yaml", /path: \/readyz\n( +)port: http/, "path: /readyz\n$1port: 9090", "probes: /readyz readiness, /healthz liveness, a startup budget for the model load", /port 9090/),
  M("no GPU limit", "backend-deployment.yaml", /( +)limits:\n( +)cpu: "8"\n( +)memory: 32Gi\n( +)ephemeral-storage: 2Gi\n( +)nvidia\.com\/gpu: 1\n/, '$1limits:\n$2cpu: "8"\n$3memory: 32Gi\n$4ephemeral-storage: 2Gi\n', "resources: one GPU, requests within limits", /nvidia\.com\/gpu/),
  M("a request above its limit", "backend-deployment.yaml", "memory: 16Gi", "memory: 48Gi", "resources: one GPU, requests within limits", /memory request above its limit/),
  M("the default loopback host", "backend-deployment.yaml", /- name: BACKEND_HOST\n( +)value: "0\.0\.0\.0"/, '- name: BACKEND_HOST\n$1value: "127.0.0.1"', "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE", /not reachable/),
  M("an invalid QUEUE_SIZE", "backend-deployment.yaml", 'value: "16"', 'value: "sixteen"', "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE", /QUEUE_SIZE must be an integer/),
  M("a grace period shorter than the drain", "backend-deployment.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 30", "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE", /terminationGracePeriodSeconds 30/),
  M("an HPA target at the queue bound", "backend-hpa.yaml", 'averageValue: "4"', 'averageValue: "16"', "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE", /not below QUEUE_SIZE/),
  M("a writable model mount", "backend-deployment.yaml", /mountPath: \/models\n( +)readOnly: true\n( +)- name: tmp/, "mountPath: /models\n$2- name: tmp", "the backend accepts the Deployment's configuration; shutdown grace; HPA target below QUEUE_SIZE", /not mounted read-only/),
  M("a misspelt variable", "backend-deployment.yaml", "name: MAX_BATCH", "name: MAX_BACTH", "environment variable names are ones something reads", /MAX_BACTH/),
  M("a misspelt image ENV", "Dockerfile", "EXECUTION_PROVIDER=cuda", "EXECUTION_PROVIDER=cuda EXECUTON_PROVIDER=cuda", "environment variable names are ones something reads", /EXECUTON_PROVIDER/),
  M("a literal HMAC secret", "backend-deployment.yaml", /- name: BACKEND_HMAC_SECRET\n( +)valueFrom:\n( +)secretKeyRef:\n( +)name: medvlm-backend\n( +)key: BACKEND_HMAC_SECRET/, '- name: BACKEND_HMAC_SECRET\n$1value: "0123456789abcdef0123"', "BACKEND_HMAC_SECRET comes from the Secret; no literal secrets; the placeholder is refused", /does not come from a Secret|literal value/),
  M("a secret key the Secret lacks", "backend-deployment.yaml", "key: BACKEND_HMAC_SECRET", "key: HMAC_SECRET", "BACKEND_HMAC_SECRET comes from the Secret; no literal secrets; the placeholder is refused", /key HMAC_SECRET/),
  M("a usable placeholder", "secret.example.yaml", 'BACKEND_HMAC_SECRET: "REPLACE-ME"', 'BACKEND_HMAC_SECRET: "REPLACE-ME-REPLACE-ME"', "BACKEND_HMAC_SECRET comes from the Secret; no literal secrets; the placeholder is refused", /would accept the placeholder/),
  M("another MODEL_DIR in the Job", "convert-job.yaml", "value: /models/medvlm-r1", "value: /models/medvlm", "model volume: one PVC, read-only for the backend, written by the Job; writable caches", /MODEL_DIR differs/),
  M("a wrong claim name", "backend-deployment.yaml", "claimName: medvlm-model", "claimName: model", "model volume: one PVC, read-only for the backend, written by the Job; writable caches", /not the PVC/),
  M("an RWO claim with several replicas", "model-pvc.yaml", "- ReadWriteMany", "- ReadWriteOnce", "model volume: one PVC, read-only for the backend, written by the Job; writable caches", /cannot serve 4 replicas/),
  M("the hub cache on the read-only root", "convert-job.yaml", "value: /hf-cache", "value: /home/medvlm/.cache", "model volume: one PVC, read-only for the backend, written by the Job; writable caches", /HF_HUB_CACHE/),
  M("a writable root file system", "backend-deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "restricted pod security: non-root (the image's USER), read-only root, no privilege escalation", /readOnlyRootFilesystem/),
  M("a uid that is not the image's", "convert-job.yaml", "runAsUser: 10001", "runAsUser: 1000", "restricted pod security: non-root (the image's USER), read-only root, no privilege escalation", /runAsUser 1000/),
  M("capabilities kept", "convert-job.yaml", 'drop: ["ALL"]', 'drop: ["NET_RAW"]', "restricted pod security: non-root (the image's USER), read-only root, no privilege escalation", /drop ALL/),
  M("an HPA on another Deployment", "backend-hpa.yaml", "    name: medvlm-backend\n  minReplicas", "    name: medvlm\n  minReplicas", "HPA scales the Deployment on the server's queue-depth gauge; the PDB does not block drains", /scaleTargetRef/),
  M("an HPA on a metric the server does not export", "backend-hpa.yaml", "name: medvlm_backend_queue_depth", "name: medvlm_queue_depth", "HPA scales the Deployment on the server's queue-depth gauge; the PDB does not block drains", /none of the server's gauges/),
  M("a PDB blocking drains", "backend-pdb.yaml", "maxUnavailable: 1", "minAvailable: 1", "HPA scales the Deployment on the server's queue-depth gauge; the PDB does not block drains", /block node drains/),
  M("another image in the Job", "convert-job.yaml", "image: medvlm-backend", "image: medvlm-converter", "conversion Job: same image, idempotent npm run convert into MODEL_DIR; pods wait for the model", /image medvlm-converter/),
  M("a non-idempotent Job", "convert-job.yaml", 'if [ -f "$MODEL_DIR/manifest.json" ]; then', "if false; then", "conversion Job: same image, idempotent npm run convert into MODEL_DIR; pods wait for the model", /idempotent/),
  M("no convert script", "package.json", /"convert": "[^"]*",/, "", "conversion Job: same image, idempotent npm run convert into MODEL_DIR; pods wait for the model", /no `convert` script|package\.json/),
  M("an unpinned base", "Dockerfile", "ARG NODE_IMAGE=node:20.20.2-bookworm-slim", "ARG NODE_IMAGE=node:20-bookworm-slim", "Dockerfile: multi-stage, pinned bases, CUDA 12 cuDNN runtime, Node 20 from the build stage", /not pinned/),
  M("a CUDA 11 base", "Dockerfile", "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04", "nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04", "Dockerfile: multi-stage, pinned bases, CUDA 12 cuDNN runtime, Node 20 from the build stage", /not an nvidia\/cuda 12/),
  M("dev dependencies kept", "Dockerfile", "npm ci --omit=dev --ignore-scripts", "npm ci --ignore-scripts", "Dockerfile: npm ci --omit=dev --ignore-scripts, then onnxruntime-node's CUDA 12 install", /keeps dev dependencies/),
  M("no CUDA provider install", "Dockerfile", "ONNXRUNTIME_NODE_INSTALL=cuda12 node", "node", "Dockerfile: npm ci --omit=dev --ignore-scripts, then onnxruntime-node's CUDA 12 install", /without ONNXRUNTIME_NODE_INSTALL=cuda12/),
  M("running as root", "Dockerfile", "USER 10001:10001", "USER root", "Dockerfile: non-root USER, HEALTHCHECK with node on /healthz, EXPOSE, ENV the backend accepts", /not a numeric non-root user/),
  M("a curl HEALTHCHECK", "Dockerfile", /CMD \["node", "-e", "fetch[^\n]*/, 'CMD ["curl", "-f", "http://127.0.0.1:8788/healthz"]', "Dockerfile: non-root USER, HEALTHCHECK with node on /healthz, EXPOSE, ENV the backend accepts", /does not use node/),
  M("a loopback-only image", "Dockerfile", "BACKEND_HOST=0.0.0.0", "BACKEND_HOST=127.0.0.1", "Dockerfile: non-root USER, HEALTHCHECK with node on /healthz, EXPOSE, ENV the backend accepts", /unreachable/),
  M("another CMD entry", "Dockerfile", '"gpu-backend/src/server/main.ts"]', '"gpu-backend/src/main.ts"]', "Dockerfile: CMD entry and every file it imports are in the image; only production dependencies", /not gpu-backend\/src\/server\/main\.ts/),
  M("a source folder not copied", "Dockerfile", "COPY scripts scripts\n", "", "Dockerfile: CMD entry and every file it imports are in the image; only production dependencies", /no COPY puts scripts\/dev-secrets\.ts/),
  M("a source folder ignored", ".dockerignore", "!scripts\n", "", ".dockerignore lets in what the Dockerfile copies and keeps secrets and models out", /leaves out scripts/),
  M("secrets let in", ".dockerignore", "**/.dev.vars\n", "", ".dockerignore lets in what the Dockerfile copies and keeps secrets and models out", /\.dev\.vars/),
];

function mutate(texts: Texts, m: Mutation): Texts {
  const next: Texts = structuredClone(texts);
  const edit = (s: string): string => {
    const found = typeof m.from === "string" ? s.includes(m.from) : m.from.test(s);
    if (!found) throw new Error(`mutation "${m.what}": ${String(m.from)} not found in ${m.file}`);
    return s.replace(m.from, m.to);
  };
  if (m.file === "Dockerfile") next.dockerfile = edit(next.dockerfile);
  else if (m.file === ".dockerignore") next.dockerignore = edit(next.dockerignore);
  else if (m.file === "package.json") next.packageJson = edit(next.packageJson);
  else next.k8s[m.file] = edit(next.k8s[m.file] ?? "");
  return next;
}

describe("each check catches the mistake it exists for", () => {
  it.each(MUTATIONS.map((m) => [m.what, m] as const))("%s", (_what, m) => {
    const ctx = buildCtx(mutate(TEXTS, m));
    const problems = m.check === "types" ? typeProblems(ctx) : CHECKS[m.check]!(ctx);
    expect(problems.some((p) => m.expect.test(p)), `problems: ${JSON.stringify(problems)}`).toBe(true);
  });

  it(".dockerignore matching follows Docker's rules", () => {
    const pats = parseDockerignore("*\n!src\nsrc/**/*.log\n!keep.txt\n**/secret");
    expect(ignored(pats, "README.md")).toBe(true);
    expect(ignored(pats, "src/a/b.ts")).toBe(false);
    expect(ignored(pats, "src/a/b.log")).toBe(true);
    expect(ignored(pats, "keep.txt")).toBe(false);
    expect(ignored(pats, "src/x/secret")).toBe(true);
    expect(ignored(pats, "srcx/a.ts")).toBe(true);
  });

  it("Dockerfile parsing joins continuation lines and skips comments", () => {
    const d = parseDockerfile('ARG B=img:1.2.3\nFROM ${B} AS one\n# c\nRUN a \\\n  # inner comment\n  && b\nENV X=1 Y="two words"\nFROM one\nUSER 5');
    expect(d.stages.map((s) => [s.image, s.name])).toEqual([["img:1.2.3", "one"], ["one", undefined]]);
    expect(d.stages[0]!.instrs.map((i) => [i.cmd, i.args])).toEqual([["RUN", "a   && b"], ["ENV", 'X=1 Y="two words"']]);
    expect(stageEnv(d.stages[0])).toEqual({ X: "1", Y: "two words" });
  });
});

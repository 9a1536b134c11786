/**
 * The API config (`api_config.yaml`, a `google.api.Service` with
 * `config_version: 3`) turned into the plan the local gateway runs on.
 *
 * ESPv2 never reads the YAML: Service Management normalises it first (methods
 * filled in from the descriptor set, wildcard selectors expanded, "last rule
 * wins"), and ESPv2 consumes the result. {@link loadApiConfig} does both
 * steps for the local gateway: it validates the YAML against the fields ESPv2
 * honours and the descriptor set, then resolves every rule per method into an
 * immutable {@link ApiConfigPlan}. Section numbers (§) refer to
 * `reference/gateway-behaviour.md`.
 *
 * Where this validator is stricter than Google it says so at the check; the
 * aim is that a config accepted here (without the `local` option) is also
 * accepted by API Gateway and behaves there as it does locally.
 */
import { readFile } from "node:fs/promises";
import type { Registry } from "@bufbuild/protobuf";
import { type Document, LineCounter, parseDocument } from "yaml";
import { type DescriptorMethod, hasService, listMethods, loadDescriptorSet } from "./descriptor.ts";

// ---------------------------------------------------------------------------
// Plan types: imported by the gateway proxy; keep them stable.
// ---------------------------------------------------------------------------

/**
 * Where a provider looks for a JWT (§2.2). Header names are lowercase, as
 * `node:http2` presents them. For a header with a `valuePrefix`, the token
 * follows the prefix (Envoy searches the prefix anywhere in the value); an
 * empty prefix means the whole value is the token.
 */
export type JwtLocation =
  | { readonly header: string; readonly valuePrefix: string }
  | { readonly query: string };

/** Where an API key is looked for (§6). Header names are lowercase. */
export type ApiKeyLocation = { readonly header: string } | { readonly query: string };

/** One `authentication.providers[]` entry, defaults applied (§2.1, §2.2, §2.5). */
export interface ProviderPlan {
  /** `id`, referenced by `requirements[].provider_id`. */
  readonly id: string;
  /** `issuer`, compared verbatim with the token's `iss` (§2.6). */
  readonly issuer: string;
  /**
   * `jwks_uri`: a JWKS document or Google's X.509 certificate map (§2.8).
   * `undefined` when the config leaves it empty: the gateway must then run
   * OpenID discovery at start-up, at {@link ProviderPlan.discoveryUri}, and
   * fail to start when that fails (as ESPv2 does).
   */
  readonly jwksUri: string | undefined;
  /**
   * `<issuer>/.well-known/openid-configuration` (issuer prefixed `https://`
   * when it lacks a scheme, trailing `/` trimmed) when `jwksUri` is
   * `undefined`; otherwise `undefined`.
   */
  readonly discoveryUri: string | undefined;
  /**
   * Allowed `aud` values: `audiences` split on `,` and trimmed; when empty,
   * the single default `https://<service name>` (§2.5). Compare with
   * {@link audienceMatches}.
   */
  readonly audiences: readonly string[];
  /**
   * `jwt_locations`, or when there are none the defaults
   * {@link defaultJwtLocations}: `authorization` with `Bearer `,
   * `x-goog-iap-jwt-assertion`, query `access_token`.
   */
  readonly locations: readonly JwtLocation[];
}

/** One provider a method accepts, with the audiences that apply to this method. */
export interface RequirementPlan {
  /** The provider (the same object as in {@link ApiConfigPlan.providers}). */
  readonly provider: ProviderPlan;
  /**
   * Effective audiences: the requirement's own (deprecated) `audiences` when
   * set, else the provider's (already defaulted) audiences (§2.3, §2.5).
   */
  readonly audiences: readonly string[];
}

/** JWT authentication of one method (§2.3). */
export interface AuthPlan {
  /**
   * At least one entry. With one, that provider must verify the token; with
   * several, any one of them may (Envoy `requires_any`; when all fail, the
   * status of the last one is reported).
   */
  readonly requirements: readonly RequirementPlan[];
  /**
   * `allow_without_credential`: a request with no token at all passes
   * (unverified, no userinfo header); a token that is present must still
   * verify.
   */
  readonly allowWithoutCredential: boolean;
}

/** API key requirement of one method (§6). */
export interface ApiKeyPlan {
  /**
   * Where the key is read from: `system_parameters` `api_key` entries for
   * the method, or {@link defaultApiKeyLocations}. API Gateway checks the key
   * with Service Control, which a local gateway cannot do; accepting any key
   * or a configured set is the gateway's choice.
   */
  readonly locations: readonly ApiKeyLocation[];
}

/** One upstream endpoint parsed from `backend.rules[].address` (§1.3). */
export interface BackendAddress {
  /** Lowercase scheme; a missing scheme means `https`. */
  readonly scheme: "grpc" | "grpcs" | "http" | "https";
  /** Host name or IP address, without IPv6 brackets (what `net.connect` takes). */
  readonly host: string;
  /** TCP port: the explicit one, or 443 for TLS schemes and 80 otherwise. */
  readonly port: number;
  /**
   * TLS (`grpcs`, `https`): connect with TLS, SNI = `host`, ALPN `h2`.
   * Otherwise cleartext HTTP/2 with prior knowledge (h2c).
   */
  readonly tls: boolean;
  /**
   * `:authority` to send upstream: the backend host name, without port (IPv6
   * in brackets), as ESPv2 rewrites it for remote backends. Cloud Run routes
   * on it.
   */
  readonly authority: string;
  /** The address as written in the config, trimmed. */
  readonly address: string;
}

/** Where and how one method is forwarded (§1.3, §4.1, §5.2). */
export interface BackendPlan {
  /**
   * At least one entry. More than one only with the local extension (a
   * comma-separated `address`, `local` option): each RPC goes to the next
   * address, round robin.
   */
  readonly addresses: readonly BackendAddress[];
  /**
   * Identifies the address list: methods with equal `poolKey` share one
   * round-robin position and one set of pooled sessions.
   */
  readonly poolKey: string;
  /**
   * Audience of the ID token the gateway sends as `Authorization` (§4.1):
   * `jwt_audience` verbatim, else derived from the address
   * (`https://<host>` for TLS schemes, `http://<host>` otherwise);
   * `undefined` with `disable_auth: true`, in which case `Authorization` is
   * forwarded untouched and no `x-forwarded-authorization` is added.
   */
  readonly jwtAudience: string | undefined;
  /**
   * Route timeout in ms, from the end of the request to the complete response
   * (Envoy `timeout`); on expiry the gateway answers UNAVAILABLE
   * `{"code":504,"message":"upstream request timeout"}`. Unary methods:
   * `deadline` (seconds, rounded to ms) or 15 000. Streaming methods (any
   * side): `undefined`, i.e. no total limit (§5.2).
   */
  readonly deadlineMs: number | undefined;
  /**
   * Idle timeout in ms (Envoy route `idle_timeout`): the longest gap without
   * activity on the stream. Unary: max(deadline + 1 s, 5 min). Streaming:
   * `deadline` when set, else 5 min. On expiry: UNKNOWN `stream timeout`
   * before response headers, a stream reset after.
   */
  readonly idleTimeoutMs: number;
}

/** Everything the gateway needs to serve one RPC. */
export interface MethodPlan {
  /** Operation name: `echo.v1.EchoService.Echo`. */
  readonly selector: string;
  /**
   * The only `:path` this method answers: `/echo.v1.EchoService/Echo` (ESPv2
   * also matches a trailing `/`), with `:method` POST (§1.4).
   */
  readonly path: string;
  /** Fully qualified service: `echo.v1.EchoService`. */
  readonly service: string;
  /** Method name: `Echo`. */
  readonly name: string;
  /** Client streaming or bidi. */
  readonly requestStreaming: boolean;
  /** Server streaming or bidi. */
  readonly responseStreaming: boolean;
  /** JWT check, or `undefined`: no check, any token forwarded untouched, no userinfo header. */
  readonly auth: AuthPlan | undefined;
  /**
   * API key requirement, or `undefined` when the method's usage rule sets
   * `allow_unregistered_calls` or `skip_service_control`.
   */
  readonly apiKey: ApiKeyPlan | undefined;
  /** Where the RPC goes. */
  readonly backend: BackendPlan;
}

/** A validation problem, or a warning, tied to a place in the YAML. */
export interface ApiConfigProblem {
  /** YAML path such as `backend.rules[1].address`; empty for the document itself. */
  readonly path: string;
  /** What is wrong and, where it is not obvious, how to fix it. */
  readonly message: string;
  /** 1-based line in the YAML text, when the config was given as text. */
  readonly line: number | undefined;
}

/** The normalised API config (§10 step 1). Deeply frozen. */
export interface ApiConfigPlan {
  /** `name`: the service name; the default JWT audience is `https://<name>`. */
  readonly serviceName: string;
  /** `title`, if any. */
  readonly title: string | undefined;
  /** Whether the config was loaded with the local extensions allowed. */
  readonly local: boolean;
  /** Every method of the services in `apis[]`, in descriptor order. */
  readonly methods: readonly MethodPlan[];
  /** The same methods by `:path`, for routing. Anything else is UNIMPLEMENTED (§1.4). */
  readonly methodsByPath: ReadonlyMap<string, MethodPlan>;
  /** `authentication.providers`, in file order. */
  readonly providers: readonly ProviderPlan[];
  /**
   * Fields that are valid but that the local gateway does not act on (HTTP
   * transcoding, quota, CORS), and likely mistakes that are not errors. To be
   * logged once at start-up.
   */
  readonly warnings: readonly ApiConfigProblem[];
}

/** Options of {@link loadApiConfig}. */
export interface LoadApiConfigOptions {
  /**
   * Allow the local gateway's extensions; default false (the config must be
   * acceptable to API Gateway). The only extension: `backend.rules[].address`
   * may list several addresses separated by commas, served round robin.
   */
  readonly local?: boolean;
  /** File name used in messages. */
  readonly sourceName?: string;
}

/**
 * An invalid API config: every problem found, each with its YAML path.
 * `code` is stable: `ERR_API_CONFIG_INVALID`. The message has one line per
 * problem, `file:line: path: message`.
 */
export class ApiConfigError extends Error {
  override name = "ApiConfigError";
  readonly code = "ERR_API_CONFIG_INVALID";
  /** Every problem, in document order of discovery. */
  readonly problems: readonly ApiConfigProblem[];

  constructor(problems: readonly ApiConfigProblem[], sourceName?: string) {
    super(problems.map((p) => formatProblem(p, sourceName)).join("\n"));
    this.problems = problems;
  }
}

/** `file:line: path: message`, leaving out the parts that are unknown. */
export function formatProblem(problem: ApiConfigProblem, sourceName?: string): string {
  const where = [sourceName, problem.line].filter((part) => part !== undefined).join(":");
  const what = problem.path === "" ? problem.message : `${problem.path}: ${problem.message}`;
  return where === "" ? what : `${where}: ${what}`;
}

// ---------------------------------------------------------------------------
// Constants from the spec
// ---------------------------------------------------------------------------

/** Unary route timeout without a `deadline` (§5.2). */
export const defaultDeadlineMs = 15_000;
/** Envoy `stream_idle_timeout` as ESPv2 sets it (§5.2). */
export const defaultStreamIdleTimeoutMs = 300_000;
/** Largest `deadline` API Gateway accepts, in seconds (§5.2). */
export const maxDeadlineSeconds = 3600;

/** Token locations of a provider without `jwt_locations` (§2.2). */
export const defaultJwtLocations: readonly JwtLocation[] = Object.freeze([
  Object.freeze({ header: "authorization", valuePrefix: "Bearer " }),
  Object.freeze({ header: "x-goog-iap-jwt-assertion", valuePrefix: "" }),
  Object.freeze({ query: "access_token" }),
]);

/** API key locations without a `system_parameters` rule (§6). */
export const defaultApiKeyLocations: readonly ApiKeyLocation[] = Object.freeze([
  Object.freeze({ query: "key" }),
  Object.freeze({ query: "api_key" }),
  Object.freeze({ header: "x-api-key" }),
]);

// ---------------------------------------------------------------------------
// Audiences (§2.5)
// ---------------------------------------------------------------------------

/**
 * An audience as jwt_verify_lib compares it: one leading `http://` or
 * `https://` and one trailing `/` removed; nothing else (case is kept).
 */
export function normalizeAudience(audience: string): string {
  let out = audience;
  if (out.startsWith("https://")) {
    out = out.slice("https://".length);
  } else if (out.startsWith("http://")) {
    out = out.slice("http://".length);
  }
  if (out.endsWith("/")) {
    out = out.slice(0, -1);
  }
  return out;
}

/**
 * Whether a token's `aud` (a string or a list) contains a value allowed by
 * `allowed`, both sides normalised with {@link normalizeAudience}: so
 * `https://svc`, `http://svc`, `svc` and `https://svc/` all match each other.
 */
export function audienceMatches(
  tokenAud: string | readonly string[],
  allowed: readonly string[],
): boolean {
  const wanted = new Set(allowed.map(normalizeAudience));
  const given = typeof tokenAud === "string" ? [tokenAud] : tokenAud;
  return given.some((aud) => wanted.has(normalizeAudience(aud)));
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/**
 * Reads the rendered API config and the descriptor set and returns the plan;
 * see {@link loadApiConfig}. Throws {@link ApiConfigError} (or
 * `DescriptorError` for the descriptor set).
 */
export async function loadApiConfigFiles(
  files: { readonly config: string; readonly descriptor: string },
  options: Omit<LoadApiConfigOptions, "sourceName"> = {},
): Promise<ApiConfigPlan> {
  const registry = await loadDescriptorSet(files.descriptor);
  let text: string;
  try {
    text = await readFile(files.config, "utf8");
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new ApiConfigError(
      [{ path: "", message: `cannot read the API config: ${reason}`, line: undefined }],
      files.config,
    );
  }
  return loadApiConfig(text, registry, { ...options, sourceName: files.config });
}

/**
 * Validates an API config against the fields ESPv2 honours (§1.2) and the
 * descriptor set, and normalises it into an immutable plan (§1.1, §10).
 *
 * `source` is the YAML text (problems then carry line numbers) or the value
 * it parses to. Every problem is collected; if there is any, an
 * {@link ApiConfigError} listing all of them is thrown.
 */
export function loadApiConfig(
  source: string | object,
  registry: Registry,
  options: LoadApiConfigOptions = {},
): ApiConfigPlan {
  const ctx = new Context(options.local ?? false);
  let root: unknown = source;
  if (typeof source === "string") {
    root = ctx.parseYaml(source);
  }
  let plan: ApiConfigPlan | undefined;
  if (ctx.problems.length === 0) {
    plan = buildPlan(root, registry, ctx);
  }
  if (ctx.problems.length > 0 || plan === undefined) {
    throw new ApiConfigError(ctx.problems, options.sourceName);
  }
  return plan;
}

// ---------------------------------------------------------------------------
// Validation machinery
// ---------------------------------------------------------------------------

type PathSegment = string | number;
type Path = readonly PathSegment[];

function formatPath(path: Path): string {
  let out = "";
  for (const segment of path) {
    if (typeof segment === "number") {
      out += `[${segment}]`;
    } else {
      out += out === "" ? segment : `.${segment}`;
    }
  }
  return out;
}

type Fields = Record<string, unknown>;

class Context {
  readonly problems: ApiConfigProblem[] = [];
  readonly warnings: ApiConfigProblem[] = [];
  readonly local: boolean;
  private doc: Document | undefined;
  private lineCounter: LineCounter | undefined;

  constructor(local: boolean) {
    this.local = local;
  }

  parseYaml(text: string): unknown {
    this.lineCounter = new LineCounter();
    this.doc = parseDocument(text, { lineCounter: this.lineCounter, uniqueKeys: true });
    for (const err of this.doc.errors) {
      const first = err.message.split("\n")[0] ?? err.message;
      this.problems.push({
        path: "",
        message: `invalid YAML: ${first.replace(/ at line \d+, column \d+:?$/, "")}`,
        line: err.linePos?.[0].line,
      });
    }
    if (this.doc.errors.length > 0) {
      return undefined;
    }
    return this.doc.toJS({ maxAliasCount: 100 });
  }

  problem(path: Path, message: string): void {
    this.problems.push({ path: formatPath(path), message, line: this.lineOf(path) });
  }

  warn(path: Path, message: string): void {
    this.warnings.push({ path: formatPath(path), message, line: this.lineOf(path) });
  }

  /** Line of the node at `path`, or of its nearest ancestor present in the document. */
  private lineOf(path: Path): number | undefined {
    if (this.doc === undefined || this.lineCounter === undefined) {
      return undefined;
    }
    for (let n = path.length; n > 0; n--) {
      const node = this.doc.getIn(path.slice(0, n), true) as
        | { range?: [number, number, number] }
        | undefined;
      if (node !== null && typeof node === "object" && Array.isArray(node.range)) {
        return this.lineCounter.linePos(node.range[0]).line;
      }
    }
    return undefined;
  }

  /**
   * A mapping whose keys are all in `allowed`; every other key is reported as
   * an unknown field. Undefined (and a problem) when `value` is not a mapping.
   */
  mapping(value: unknown, path: Path, allowed: readonly string[]): Fields | undefined {
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      this.problem(path, "must be a mapping");
      return undefined;
    }
    for (const key of Object.keys(value)) {
      if (!allowed.includes(key)) {
        this.problem([...path, key], unknownFieldMessage(key, allowed));
      }
    }
    return value as Fields;
  }

  /** A list; a missing field is an empty list. */
  list(fields: Fields, key: string, path: Path): readonly unknown[] {
    const value = fields[key];
    if (value === undefined || value === null) {
      return [];
    }
    if (!Array.isArray(value)) {
      this.problem([...path, key], "must be a list");
      return [];
    }
    return value;
  }

  string(fields: Fields, key: string, path: Path, required = false): string | undefined {
    const value = fields[key];
    if (value === undefined || value === null) {
      if (required) {
        this.problem([...path, key], "required");
      }
      return undefined;
    }
    if (typeof value !== "string") {
      this.problem([...path, key], `must be a string, got ${describe(value)}`);
      return undefined;
    }
    if (required && value.trim() === "") {
      this.problem([...path, key], "must not be empty");
      return undefined;
    }
    return value;
  }

  boolean(fields: Fields, key: string, path: Path): boolean | undefined {
    const value = fields[key];
    if (value === undefined || value === null) {
      return undefined;
    }
    if (typeof value !== "boolean") {
      this.problem([...path, key], `must be true or false, got ${describe(value)}`);
      return undefined;
    }
    return value;
  }
}

function describe(value: unknown): string {
  if (Array.isArray(value)) {
    return "a list";
  }
  if (typeof value === "object" && value !== null) {
    return "a mapping";
  }
  return JSON.stringify(value);
}

/**
 * Fields of `google.api.Service` (and its messages) that ESPv2 never reads
 * (§1.2 "Ignored by ESPv2"), or that it reads but has no meaning for this
 * gRPC-only gateway. They are refused rather than silently dropped, so that a
 * config does not promise behaviour that neither gateway delivers.
 */
const ignoredByEspv2 = new Set([
  "documentation",
  "oauth",
  "min_deadline",
  "operation_deadline",
  "load_balancing_policy",
  "authorization_url",
  "cookie",
  "logging",
  "monitoring",
  "billing",
  "metrics",
  "monitored_resources",
  "logs",
  "context",
  "source_info",
  "producer_project_id",
  "id",
  "enums",
  "publishing",
  "system_types",
  "custom_error",
]);

function unknownFieldMessage(key: string, allowed: readonly string[]): string {
  const snake = key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
  if (snake !== key && allowed.includes(snake)) {
    return `unknown field; write it in snake_case: ${snake}`;
  }
  if (ignoredByEspv2.has(key)) {
    return "unknown field: google.api.Service defines it, but API Gateway (ESPv2) ignores it, so it is refused here";
  }
  return `unknown field (expected one of: ${allowed.join(", ")})`;
}

// ---------------------------------------------------------------------------
// Selectors (§1.1)
// ---------------------------------------------------------------------------

const selectorComponent = "[A-Za-z_][A-Za-z0-9_]*";
const selectorPattern = new RegExp(
  `^(?:\\*|${selectorComponent}(?:\\.${selectorComponent})*(?:\\.\\*)?)$`,
);

/**
 * The methods a selector names: a comma-separated list of patterns, each `*`
 * (every method), a full method name, or a name prefix ending in `.*` (one or
 * more further components). Undefined when the selector is invalid.
 *
 * Each pattern must match at least one method. ESPv2 silently ignores rules
 * whose selector names no method (and whether Service Management rejects
 * them is unconfirmed); this validator rejects them, because such a rule is
 * almost always a typo that leaves methods without the intended auth or
 * backend.
 */
function expandSelector(
  raw: unknown,
  path: Path,
  methods: readonly DescriptorMethod[],
  ctx: Context,
  checkMatches: boolean,
): DescriptorMethod[] | undefined {
  if (raw === undefined || raw === null || raw === "") {
    ctx.problem(path, "required");
    return undefined;
  }
  if (typeof raw !== "string") {
    ctx.problem(path, `must be a string, got ${describe(raw)}`);
    return undefined;
  }
  const matched = new Set<DescriptorMethod>();
  let valid = true;
  for (const pattern of raw.split(",").map((s) => s.trim())) {
    if (!selectorPattern.test(pattern)) {
      ctx.problem(
        path,
        `invalid selector "${pattern}": use "*", a method name (pkg.Service.Method), or a name ending in ".*"; a wildcard stands only alone or for whole last components`,
      );
      valid = false;
      continue;
    }
    const hits = methods.filter((m) =>
      pattern === "*"
        ? true
        : pattern.endsWith(".*")
          ? m.selector.startsWith(pattern.slice(0, -1))
          : m.selector === pattern,
    );
    if (hits.length === 0 && checkMatches) {
      ctx.problem(
        path,
        `selector "${pattern}" matches no method of the services in apis[] (ESPv2 would silently ignore this rule)`,
      );
      valid = false;
    }
    for (const hit of hits) {
      matched.add(hit);
    }
  }
  return valid ? methods.filter((m) => matched.has(m)) : undefined;
}

// ---------------------------------------------------------------------------
// Backend addresses (§1.3, §4.1)
// ---------------------------------------------------------------------------

const backendSchemes = ["grpc", "grpcs", "http", "https"] as const;
type BackendScheme = (typeof backendSchemes)[number];
const hostPortPath =
  /^(?<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(?<port>\d{1,5}))?(?<path>\/[^?#\s]*)?$/;

function parseBackendAddress(raw: string): BackendAddress | string {
  const address = raw.trim();
  const schemeMatch = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/(.*)$/.exec(address);
  const schemeText = schemeMatch?.[1] ?? "https";
  const rest = schemeMatch?.[2] ?? address;
  const scheme = schemeText.toLowerCase();
  if (!(backendSchemes as readonly string[]).includes(scheme)) {
    // ESPv2's own wording (util.ParseURI).
    return `unknown backend scheme [${schemeText}], should be one of "http(s)" or "grpc(s)"`;
  }
  const match = hostPortPath.exec(rest);
  const groups = match?.groups;
  if (groups?.host === undefined) {
    return `"${address}" is not scheme://host[:port]`;
  }
  const tls = scheme.endsWith("s");
  const port = groups.port === undefined ? (tls ? 443 : 80) : Number(groups.port);
  if (port < 1 || port > 65535) {
    return `"${address}": port ${groups.port} is out of range`;
  }
  const path = (groups.path ?? "").replace(/\/$/, "");
  if (path !== "") {
    // ESPv2 would prepend the path to `/<pkg.Service>/<Method>` (path
    // translation), which no gRPC server answers.
    return `"${address}": a gRPC backend address takes no path (found "${path}")`;
  }
  const authority = groups.host;
  return {
    scheme: scheme as BackendScheme,
    host: authority.replace(/^\[(.*)\]$/, "$1"),
    port,
    tls,
    authority,
    address,
  };
}

/** ESPv2's derived backend audience: scheme by TLS, host only (§4.1). */
function derivedAudience(address: BackendAddress): string {
  return `${address.tls ? "https" : "http"}://${address.authority}`;
}

// ---------------------------------------------------------------------------
// Field lists (§1.2): anything else is an unknown field
// ---------------------------------------------------------------------------

const topFields = [
  "type",
  "config_version",
  "name",
  "title",
  "apis",
  "types",
  "usage",
  "backend",
  "authentication",
  "endpoints",
  "system_parameters",
  "quota",
  "control",
  "http",
];
const backendRuleFields = [
  "selector",
  "address",
  "deadline",
  "path_translation",
  "jwt_audience",
  "disable_auth",
  "protocol",
  "overrides_by_request_protocol",
];
const httpRuleFields = [
  "selector",
  "get",
  "put",
  "post",
  "delete",
  "patch",
  "custom",
  "body",
  "response_body",
  "additional_bindings",
];
const serviceNamePattern =
  /^(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$/;
const headerNamePattern = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

// ---------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------

/** A backend rule minus what depends on the method kind. */
interface BackendRulePlan {
  readonly addresses: readonly BackendAddress[];
  readonly poolKey: string;
  readonly jwtAudience: string | undefined;
  readonly deadlineSeconds: number | undefined;
}

function buildPlan(root: unknown, registry: Registry, ctx: Context): ApiConfigPlan | undefined {
  if (root === undefined || root === null) {
    ctx.problem([], "the API config is empty");
    return undefined;
  }
  const top = ctx.mapping(root, [], topFields);
  if (top === undefined) {
    return undefined;
  }

  // Header fields.
  const type = ctx.string(top, "type", [], true);
  if (type !== undefined && type !== "google.api.Service") {
    ctx.problem(["type"], `must be "google.api.Service", got "${type}"`);
  }
  const configVersion = top.config_version;
  if (configVersion === undefined) {
    ctx.problem(["config_version"], "required: 3");
  } else if (configVersion !== 3 && configVersion !== "3") {
    ctx.problem(["config_version"], `must be 3, got ${describe(configVersion)}`);
  }
  const serviceName = ctx.string(top, "name", [], true) ?? "";
  if (serviceName !== "" && !serviceNamePattern.test(serviceName)) {
    ctx.problem(
      ["name"],
      `"${serviceName}" is not a service name: write a DNS name, "*.apigateway.PROJECT_ID.cloud.goog" for API Gateway`,
    );
  }
  const title = ctx.string(top, "title", []);

  // apis[] → methods from the descriptor (§1.1).
  const apiNames: string[] = [];
  let apisComplete = true;
  const apis = ctx.list(top, "apis", []);
  if (apis.length === 0) {
    if (top.apis === undefined || top.apis === null || Array.isArray(top.apis)) {
      ctx.problem(["apis"], "required: list the gRPC services, e.g. `- name: echo.v1.EchoService`");
    }
    apisComplete = false;
  }
  apis.forEach((api, i) => {
    const path = ["apis", i];
    const fields = ctx.mapping(api, path, ["name", "version"]);
    if (fields === undefined) {
      apisComplete = false;
      return;
    }
    ctx.string(fields, "version", path);
    const name = ctx.string(fields, "name", path, true);
    if (name === undefined) {
      apisComplete = false;
    } else if (!hasService(registry, name)) {
      const known = listServices(registry);
      ctx.problem(
        [...path, "name"],
        `service "${name}" is not in the descriptor set (it has: ${known.join(", ") || "no services"})`,
      );
      apisComplete = false;
    } else if (apiNames.includes(name)) {
      ctx.problem([...path, "name"], `service "${name}" is listed twice`);
    } else {
      apiNames.push(name);
    }
  });
  const methods = listMethods(registry, apiNames);
  // With a broken apis[] every selector would "match nothing": don't pile
  // those consequences onto the real problem.
  const checkMatches = apisComplete;

  // types[]: only used for transcoding; must name messages.
  ctx.list(top, "types", []).forEach((entry, i) => {
    const fields = ctx.mapping(entry, ["types", i], ["name"]);
    const name = fields && ctx.string(fields, "name", ["types", i], true);
    if (name !== undefined && registry.getMessage(name) === undefined) {
      ctx.problem(["types", i, "name"], `message "${name}" is not in the descriptor set`);
    }
  });

  // Per-method rule assignment: "last one wins" (§1.1).
  const backendByMethod = new Map<DescriptorMethod, BackendRulePlan | "invalid">();
  const backendRules = section(ctx, top, "backend");
  backendRules.forEach((rule, i) => {
    const path = ["backend", "rules", i];
    const fields = ctx.mapping(rule, path, backendRuleFields);
    if (fields === undefined) {
      return;
    }
    const matched = expandSelector(
      fields.selector,
      [...path, "selector"],
      methods,
      ctx,
      checkMatches,
    );
    const planned = backendRule(fields, path, ctx);
    for (const method of matched ?? []) {
      backendByMethod.set(method, planned ?? "invalid");
    }
  });

  const providers = authProviders(ctx, top, serviceName);
  const authByMethod = new Map<DescriptorMethod, AuthPlan | undefined>();
  const authentication = top.authentication;
  if (authentication !== undefined && authentication !== null) {
    const fields = ctx.mapping(authentication, ["authentication"], ["providers", "rules"]);
    if (fields !== undefined) {
      ctx.list(fields, "rules", ["authentication"]).forEach((rule, i) => {
        const path = ["authentication", "rules", i];
        const ruleFields = ctx.mapping(rule, path, [
          "selector",
          "requirements",
          "allow_without_credential",
        ]);
        if (ruleFields === undefined) {
          return;
        }
        const matched = expandSelector(
          ruleFields.selector,
          [...path, "selector"],
          methods,
          ctx,
          checkMatches,
        );
        const auth = authRule(ruleFields, path, providers, ctx);
        for (const method of matched ?? []) {
          authByMethod.set(method, auth);
        }
      });
    }
  }

  const usageByMethod = new Map<DescriptorMethod, boolean>();
  section(ctx, top, "usage").forEach((rule, i) => {
    const path = ["usage", "rules", i];
    const fields = ctx.mapping(rule, path, [
      "selector",
      "allow_unregistered_calls",
      "skip_service_control",
    ]);
    if (fields === undefined) {
      return;
    }
    const matched = expandSelector(
      fields.selector,
      [...path, "selector"],
      methods,
      ctx,
      checkMatches,
    );
    const allowUnregistered = ctx.boolean(fields, "allow_unregistered_calls", path) ?? false;
    const skip = ctx.boolean(fields, "skip_service_control", path) ?? false;
    for (const method of matched ?? []) {
      usageByMethod.set(method, allowUnregistered || skip);
    }
  });

  const apiKeyLocationsByMethod = systemParameters(ctx, top, methods, checkMatches);
  otherSections(ctx, top, methods, checkMatches);

  // Every method needs a backend: API Gateway has no local backend.
  if (checkMatches) {
    const missing = methods.filter((m) => !backendByMethod.has(m)).map((m) => m.selector);
    if (missing.length > 0) {
      ctx.problem(
        ["backend", "rules"],
        `no backend rule for ${missing.join(", ")}: add a rule (selector "*" covers every method)`,
      );
    }
  }

  const keyRequired = methods.filter((m) => usageByMethod.get(m) !== true).map((m) => m.selector);
  if (keyRequired.length > 0 && checkMatches) {
    ctx.warn(
      ["usage", "rules"],
      `API key required for ${keyRequired.join(", ")} (no usage rule with allow_unregistered_calls: true); API Gateway rejects calls without one`,
    );
  }

  if (ctx.problems.length > 0) {
    return undefined;
  }

  const methodPlans: MethodPlan[] = [];
  for (const method of methods) {
    const backend = backendByMethod.get(method);
    if (backend === undefined || backend === "invalid") {
      return undefined;
    }
    const streaming = method.requestStreaming || method.responseStreaming;
    const configured =
      backend.deadlineSeconds === undefined
        ? undefined
        : Math.round(backend.deadlineSeconds * 1000);
    methodPlans.push({
      selector: method.selector,
      path: method.path,
      service: method.service,
      name: method.name,
      requestStreaming: method.requestStreaming,
      responseStreaming: method.responseStreaming,
      auth: authByMethod.get(method),
      apiKey:
        usageByMethod.get(method) === true
          ? undefined
          : { locations: apiKeyLocationsByMethod.get(method) ?? defaultApiKeyLocations },
      backend: {
        addresses: backend.addresses,
        poolKey: backend.poolKey,
        jwtAudience: backend.jwtAudience,
        // §5.2: streaming routes have no total timeout; the deadline becomes the idle timeout.
        deadlineMs: streaming ? undefined : (configured ?? defaultDeadlineMs),
        idleTimeoutMs: streaming
          ? (configured ?? defaultStreamIdleTimeoutMs)
          : Math.max((configured ?? defaultDeadlineMs) + 1000, defaultStreamIdleTimeoutMs),
      },
    });
  }

  return deepFreeze({
    serviceName,
    title,
    local: ctx.local,
    methods: methodPlans,
    methodsByPath: new Map(methodPlans.map((m) => [m.path, m])),
    providers: [...providers.values()],
    warnings: ctx.warnings,
  });
}

function listServices(registry: Registry): string[] {
  return [...registry].flatMap((desc) => (desc.kind === "service" ? [desc.typeName] : []));
}

/** `<key>.rules` of a section that has only `rules` (backend, usage). */
function section(ctx: Context, top: Fields, key: string): readonly unknown[] {
  const value = top[key];
  if (value === undefined || value === null) {
    return [];
  }
  const fields = ctx.mapping(value, [key], ["rules"]);
  return fields === undefined ? [] : ctx.list(fields, "rules", [key]);
}

function backendRule(fields: Fields, path: Path, ctx: Context): BackendRulePlan | undefined {
  const problemsBefore = ctx.problems.length;

  const protocol = ctx.string(fields, "protocol", path);
  if (protocol !== undefined && !["", "http/1.1", "h2"].includes(protocol)) {
    ctx.problem([...path, "protocol"], `must be "http/1.1" or "h2", got "${protocol}"`);
  }
  const translation = ctx.string(fields, "path_translation", path);
  if (
    translation !== undefined &&
    !["PATH_TRANSLATION_UNSPECIFIED", "CONSTANT_ADDRESS", "APPEND_PATH_TO_ADDRESS"].includes(
      translation,
    )
  ) {
    ctx.problem(
      [...path, "path_translation"],
      `must be CONSTANT_ADDRESS or APPEND_PATH_TO_ADDRESS, got "${translation}"`,
    );
  }
  const overrides = fields.overrides_by_request_protocol;
  if (overrides !== undefined) {
    ctx.warn(
      [...path, "overrides_by_request_protocol"],
      "applies to transcoded HTTP requests only; the local gateway does not transcode",
    );
  }

  // address: one, or with the local extension a comma-separated list.
  const addressPath = [...path, "address"];
  const rawAddress = ctx.string(fields, "address", path, true);
  const addresses: BackendAddress[] = [];
  if (rawAddress !== undefined) {
    const parts = rawAddress.split(",").map((s) => s.trim());
    if (parts.length > 1 && !ctx.local) {
      ctx.problem(
        addressPath,
        "several comma-separated addresses (round robin) are a local-gateway extension; API Gateway takes exactly one address per rule (render with --local for the local gateway)",
      );
    }
    for (const part of parts) {
      if (part === "") {
        ctx.problem(addressPath, "empty entry in the address list");
        continue;
      }
      const parsed = parseBackendAddress(part);
      if (typeof parsed === "string") {
        ctx.problem(addressPath, parsed);
        continue;
      }
      if ((parsed.scheme === "http" || parsed.scheme === "https") && protocol !== "h2") {
        // ESPv2 would accept this and talk HTTP/1.1, on which no gRPC call works.
        ctx.problem(
          addressPath,
          `"${parsed.address}": ${parsed.scheme}:// backends are called over HTTP/1.1 unless protocol is "h2", and gRPC needs HTTP/2; use ${parsed.tls ? "grpcs" : "grpc"}:// (the form API Gateway documents for Cloud Run) or set protocol: h2`,
        );
        continue;
      }
      addresses.push(parsed);
    }
  }

  // deadline: seconds (§5.2). ESPv2 treats 0 and negatives as "default"; this
  // validator rejects them, since they are never what was meant.
  let deadlineSeconds: number | undefined;
  const deadline = fields.deadline;
  if (deadline !== undefined && deadline !== null) {
    if (typeof deadline !== "number" || !Number.isFinite(deadline)) {
      ctx.problem([...path, "deadline"], `must be a number of seconds, got ${describe(deadline)}`);
    } else if (deadline <= 0 || deadline > maxDeadlineSeconds) {
      ctx.problem(
        [...path, "deadline"],
        `must be more than 0 and at most ${maxDeadlineSeconds} seconds, got ${deadline}`,
      );
    } else {
      deadlineSeconds = deadline;
    }
  }

  // jwt_audience / disable_auth: a proto oneof (§4.1).
  let jwtAudience: string | undefined;
  const hasAudience = fields.jwt_audience !== undefined && fields.jwt_audience !== null;
  const hasDisable = fields.disable_auth !== undefined && fields.disable_auth !== null;
  const disableAuth = ctx.boolean(fields, "disable_auth", path) ?? false;
  if (hasAudience && hasDisable) {
    ctx.problem(
      [...path, "jwt_audience"],
      "jwt_audience and disable_auth are mutually exclusive (a proto oneof): set only one",
    );
  } else if (hasAudience) {
    const audience = ctx.string(fields, "jwt_audience", path);
    if (audience?.trim() === "") {
      ctx.problem(
        [...path, "jwt_audience"],
        "must not be empty; leave it out to derive it from the address",
      );
    } else {
      jwtAudience = audience;
    }
  } else if (!disableAuth && addresses.length > 0) {
    const derived = [...new Set(addresses.map(derivedAudience))];
    if (derived.length > 1) {
      ctx.problem(
        addressPath,
        `the addresses derive different backend audiences (${derived.join(", ")}); set jwt_audience or disable_auth`,
      );
    }
    jwtAudience = derived[0];
  }

  if (ctx.problems.length > problemsBefore || addresses.length === 0) {
    return undefined;
  }
  return {
    addresses,
    poolKey: addresses.map((a) => `${a.scheme}://${a.authority}:${a.port}`).join(","),
    jwtAudience,
    deadlineSeconds,
  };
}

function authProviders(ctx: Context, top: Fields, serviceName: string): Map<string, ProviderPlan> {
  const providers = new Map<string, ProviderPlan>();
  const authentication = top.authentication;
  if (
    authentication === undefined ||
    authentication === null ||
    typeof authentication !== "object" ||
    Array.isArray(authentication)
  ) {
    return providers; // the section itself is checked by the caller
  }
  ctx.list(authentication as Fields, "providers", ["authentication"]).forEach((entry, i) => {
    const path = ["authentication", "providers", i];
    const fields = ctx.mapping(entry, path, [
      "id",
      "issuer",
      "jwks_uri",
      "audiences",
      "jwt_locations",
    ]);
    if (fields === undefined) {
      return;
    }
    const id = ctx.string(fields, "id", path, true);
    const issuer = ctx.string(fields, "issuer", path, true);
    const jwksUri = ctx.string(fields, "jwks_uri", path);
    if (jwksUri !== undefined && jwksUri !== "" && !isHttpUrl(jwksUri)) {
      ctx.problem([...path, "jwks_uri"], `"${jwksUri}" is not an http(s) URL`);
    }
    const audiences = splitList(ctx.string(fields, "audiences", path));
    if (audiences.length === 0 && serviceName.startsWith("*.")) {
      ctx.warn(
        [...path, "audiences"],
        `no audiences: the default is https://<service name>, and API Gateway replaces "${serviceName}" with its managed service name, which clients do not know; set audiences`,
      );
    }
    const locations = jwtLocations(ctx, fields, path);
    if (id === undefined || issuer === undefined) {
      return;
    }
    if (providers.has(id)) {
      ctx.problem([...path, "id"], `provider id "${id}" is defined twice`);
      return;
    }
    const discovery = jwksUri === undefined || jwksUri === "";
    providers.set(id, {
      id,
      issuer,
      jwksUri: discovery ? undefined : jwksUri,
      discoveryUri: discovery ? discoveryUri(issuer) : undefined,
      audiences: audiences.length > 0 ? audiences : [`https://${serviceName}`],
      locations,
    });
  });
  return providers;
}

function jwtLocations(ctx: Context, fields: Fields, path: Path): readonly JwtLocation[] {
  const entries = ctx.list(fields, "jwt_locations", path);
  if (entries.length === 0) {
    return defaultJwtLocations;
  }
  const locations: JwtLocation[] = [];
  entries.forEach((entry, i) => {
    const at = [...path, "jwt_locations", i];
    const loc = ctx.mapping(entry, at, ["header", "query", "value_prefix"]);
    if (loc === undefined) {
      return;
    }
    const header = ctx.string(loc, "header", at);
    const query = ctx.string(loc, "query", at);
    const prefix = ctx.string(loc, "value_prefix", at);
    if ((header === undefined) === (query === undefined)) {
      ctx.problem(at, "set exactly one of header or query");
    } else if (header !== undefined) {
      if (!headerNamePattern.test(header)) {
        ctx.problem([...at, "header"], `"${header}" is not a header name`);
      } else {
        locations.push({ header: header.toLowerCase(), valuePrefix: prefix ?? "" });
      }
    } else if (query !== undefined) {
      if (prefix !== undefined) {
        // ESPv2 refuses this combination at config time.
        ctx.problem(
          [...at, "value_prefix"],
          "not allowed with query: only header locations take a value_prefix",
        );
      } else if (query === "") {
        ctx.problem([...at, "query"], "must not be empty");
      } else {
        locations.push({ query });
      }
    }
  });
  return locations;
}

function authRule(
  fields: Fields,
  path: Path,
  providers: ReadonlyMap<string, ProviderPlan>,
  ctx: Context,
): AuthPlan | undefined {
  const allowWithoutCredential = ctx.boolean(fields, "allow_without_credential", path) ?? false;
  const requirements: RequirementPlan[] = [];
  ctx.list(fields, "requirements", path).forEach((entry, j) => {
    const at = [...path, "requirements", j];
    const req = ctx.mapping(entry, at, ["provider_id", "audiences"]);
    if (req === undefined) {
      return;
    }
    const providerId = ctx.string(req, "provider_id", at, true);
    const audiences = splitList(ctx.string(req, "audiences", at));
    if (providerId === undefined) {
      return;
    }
    const provider = providers.get(providerId);
    if (provider === undefined) {
      const defined = [...providers.keys()];
      ctx.problem(
        [...at, "provider_id"],
        `provider "${providerId}" is not defined in authentication.providers (defined: ${defined.join(", ") || "none"})`,
      );
      return;
    }
    requirements.push({
      provider,
      audiences: audiences.length > 0 ? audiences : provider.audiences,
    });
  });
  // §2.3: a rule without requirements switches JWT checks off for its methods.
  return requirements.length === 0 ? undefined : { requirements, allowWithoutCredential };
}

function systemParameters(
  ctx: Context,
  top: Fields,
  methods: readonly DescriptorMethod[],
  checkMatches: boolean,
): Map<DescriptorMethod, readonly ApiKeyLocation[]> {
  const byMethod = new Map<DescriptorMethod, readonly ApiKeyLocation[]>();
  section(ctx, top, "system_parameters").forEach((rule, i) => {
    const path = ["system_parameters", "rules", i];
    const fields = ctx.mapping(rule, path, ["selector", "parameters"]);
    if (fields === undefined) {
      return;
    }
    const matched = expandSelector(
      fields.selector,
      [...path, "selector"],
      methods,
      ctx,
      checkMatches,
    );
    const locations: ApiKeyLocation[] = [];
    ctx.list(fields, "parameters", path).forEach((param, j) => {
      const at = [...path, "parameters", j];
      const p = ctx.mapping(param, at, ["name", "http_header", "url_query_parameter"]);
      if (p === undefined) {
        return;
      }
      const name = ctx.string(p, "name", at, true);
      if (name !== undefined && name !== "api_key") {
        ctx.problem([...at, "name"], `only "api_key" is honoured by ESPv2, got "${name}"`);
      }
      const header = ctx.string(p, "http_header", at);
      const query = ctx.string(p, "url_query_parameter", at);
      if (header) {
        locations.push({ header: header.toLowerCase() });
      }
      if (query) {
        locations.push({ query });
      }
    });
    for (const method of matched ?? []) {
      if (locations.length > 0) {
        byMethod.set(method, locations);
      } else {
        byMethod.delete(method);
      }
    }
  });
  return byMethod;
}

/** Sections the local gateway validates but does not act on. */
function otherSections(
  ctx: Context,
  top: Fields,
  methods: readonly DescriptorMethod[],
  checkMatches: boolean,
): void {
  ctx.list(top, "endpoints", []).forEach((entry, i) => {
    const fields = ctx.mapping(entry, ["endpoints", i], ["name", "allow_cors"]);
    if (fields !== undefined) {
      ctx.string(fields, "name", ["endpoints", i], true);
      if (ctx.boolean(fields, "allow_cors", ["endpoints", i]) === true) {
        ctx.warn(["endpoints", i, "allow_cors"], "CORS is not handled by the local gateway");
      }
    }
  });

  if (top.control !== undefined && top.control !== null) {
    const fields = ctx.mapping(top.control, ["control"], ["environment"]);
    if (fields !== undefined) {
      ctx.string(fields, "environment", ["control"]);
      ctx.warn(["control"], "Service Control is not called by the local gateway");
    }
  }

  if (top.quota !== undefined && top.quota !== null) {
    const fields = ctx.mapping(top.quota, ["quota"], ["metric_rules"]);
    if (fields !== undefined) {
      ctx.list(fields, "metric_rules", ["quota"]).forEach((rule, i) => {
        const path = ["quota", "metric_rules", i];
        const ruleFields = ctx.mapping(rule, path, ["selector", "metric_costs"]);
        if (ruleFields !== undefined) {
          expandSelector(ruleFields.selector, [...path, "selector"], methods, ctx, checkMatches);
        }
      });
      ctx.warn(["quota"], "quota is not enforced by the local gateway");
    }
  }

  const httpRules = section(ctx, top, "http");
  httpRules.forEach((rule, i) => {
    const path = ["http", "rules", i];
    const fields = ctx.mapping(rule, path, httpRuleFields);
    if (fields === undefined) {
      return;
    }
    expandSelector(fields.selector, [...path, "selector"], methods, ctx, checkMatches);
    ctx.list(fields, "additional_bindings", path).forEach((binding, j) => {
      ctx.mapping(binding, [...path, "additional_bindings", j], httpRuleFields);
    });
  });
  if (httpRules.length > 0) {
    ctx.warn(["http", "rules"], "HTTP/JSON transcoding is not performed by the local gateway");
  }
}

function splitList(raw: string | undefined): string[] {
  return (raw ?? "")
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

function isHttpUrl(raw: string): boolean {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:";
  } catch {
    return false;
  }
}

/** §2.1: where ESPv2 looks for the JWKS URI when `jwks_uri` is empty. */
function discoveryUri(issuer: string): string {
  const base = issuer.startsWith("http") ? issuer : `https://${issuer}`;
  return `${base.replace(/\/$/, "")}/.well-known/openid-configuration`;
}

function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    const children = value instanceof Map ? [...value.values()] : Object.values(value);
    for (const child of children) {
      deepFreeze(child);
    }
  }
  return value;
}

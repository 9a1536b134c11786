/**
 * Renders `gateway/api_config.yaml.tmpl` into the `api_config.yaml` that is
 * uploaded to API Gateway and loaded by the local gateway, and validates the
 * result against the descriptor set before writing anything.
 *
 * ```sh
 * npm run gateway:config -- --template gateway/api_config.yaml.tmpl \
 *   --descriptor gen/echo.pb --out api_config.yaml [--local]
 * ```
 *
 * Substitution works like `envsubst` given a list of variables: only the
 * braced form `${NAME}` is replaced (a bare `$NAME` is left alone), there are
 * no defaults, and every variable that is unset or empty is reported in one
 * go. Exit status: 0 written, 1 the template, environment or resulting config
 * is invalid (one problem per line on stderr), 2 bad command line.
 */
import { readFile, writeFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import type { Registry } from "@bufbuild/protobuf";
import { type ApiConfigPlan, ApiConfigError, formatProblem, loadApiConfig } from "./api-config.ts";
import { DescriptorError, loadDescriptorSet } from "./descriptor.ts";

/** Environment as `process.env` has it. */
export type Env = Readonly<Record<string, string | undefined>>;

/**
 * A template that cannot be rendered: unset/empty variables, malformed `${…}`
 * references, values that cannot be placed in the YAML. `code` is stable:
 * `ERR_TEMPLATE_INVALID`.
 */
export class TemplateError extends Error {
  override name = "TemplateError";
  readonly code = "ERR_TEMPLATE_INVALID";
  /** Names of the variables that are unset or empty, in order of first use. */
  readonly missing: readonly string[];
  /** One line per problem, each starting with the variable or the template line. */
  readonly problems: readonly string[];

  constructor(problems: readonly string[], missing: readonly string[]) {
    super(problems.join("\n"));
    this.problems = problems;
    this.missing = missing;
  }
}

const variableName = /^[A-Za-z_][A-Za-z0-9_]*$/;

interface Reference {
  readonly name: string;
  readonly start: number;
  readonly end: number;
  readonly line: number;
}

/**
 * Finds the `${NAME}` references of a template. Malformed references
 * (`${}`, `${A-B}`, an unclosed `${`) are reported in `problems`.
 */
function scan(text: string): { references: Reference[]; problems: string[] } {
  const references: Reference[] = [];
  const problems: string[] = [];
  let from = 0;
  for (;;) {
    const start = text.indexOf("${", from);
    if (start < 0) {
      break;
    }
    const line = text.slice(0, start).split("\n").length;
    const lineEnd = text.indexOf("\n", start);
    const close = text.indexOf("}", start);
    if (close < 0 || (lineEnd >= 0 && close > lineEnd)) {
      problems.push(`line ${line}: unclosed "\${" (write \${NAME})`);
      from = start + 2;
      continue;
    }
    const name = text.slice(start + 2, close);
    if (!variableName.test(name)) {
      problems.push(
        `line ${line}: "\${${name}}" is not a variable reference (write \${NAME}: letters, digits, _)`,
      );
    } else {
      references.push({ name, start, end: close + 1, line });
    }
    from = close + 1;
  }
  return { references, problems };
}

/** The variables a template uses, each once, in order of first use. */
export function templateVariables(text: string): string[] {
  return [...new Set(scan(text).references.map((r) => r.name))];
}

/**
 * Replaces every `${NAME}` in `text` with `env[NAME]`. Throws
 * {@link TemplateError} naming every variable that is unset or empty (an
 * empty value would silently produce an empty config field) and every value
 * that contains a line break, control character, `"` or `\` (values are
 * placed inside one-line double-quoted YAML strings, where those would end
 * the string or start an escape).
 */
export function renderTemplate(text: string, env: Env): string {
  const { references, problems } = scan(text);
  const missing: string[] = [];
  const seen = new Set<string>();
  for (const ref of references) {
    if (seen.has(ref.name)) {
      continue;
    }
    seen.add(ref.name);
    const value = env[ref.name];
    if (value === undefined || value === "") {
      missing.push(ref.name);
      problems.push(
        `${ref.name}: ${value === undefined ? "not set" : "set but empty"} (used on line ${ref.line})`,
      );
    } else if (!isPlainValue(value)) {
      problems.push(
        `${ref.name}: must be one line without control characters, " or \\ (used on line ${ref.line})`,
      );
    }
  }
  if (problems.length > 0) {
    throw new TemplateError(problems, missing);
  }
  let out = "";
  let last = 0;
  for (const ref of references) {
    out += text.slice(last, ref.start) + env[ref.name];
    last = ref.end;
  }
  return out + text.slice(last);
}

/** Input of {@link renderApiConfig}. */
export interface RenderApiConfigInput {
  /** Template text. */
  readonly template: string;
  /** Descriptor set the API config is checked against. */
  readonly registry: Registry;
  /** Variables for the template. */
  readonly env: Env;
  /** Allow the local gateway's extensions (see `LoadApiConfigOptions.local`). */
  readonly local?: boolean;
  /** Template file name, used in messages. */
  readonly sourceName?: string;
}

/**
 * Renders and validates, without I/O. Throws {@link TemplateError} or
 * `ApiConfigError` (whose line numbers are the template's: values are single
 * lines, so rendering moves no line).
 */
export function renderApiConfig(input: RenderApiConfigInput): {
  text: string;
  plan: ApiConfigPlan;
} {
  const text = renderTemplate(input.template, input.env);
  const plan = loadApiConfig(text, input.registry, {
    local: input.local ?? false,
    ...(input.sourceName === undefined ? {} : { sourceName: input.sourceName }),
  });
  return { text, plan };
}

/** Where {@link main} writes. */
export interface Io {
  readonly stdout: { write(chunk: string): unknown };
  readonly stderr: { write(chunk: string): unknown };
}

const usage = `usage: node gateway/render-config.ts [options]

Renders the API Gateway config template from the environment, validates it
against the descriptor set and writes it.

  --template FILE    template (default gateway/api_config.yaml.tmpl)
  --descriptor FILE  FileDescriptorSet (default gen/echo.pb)
  --out FILE         output, "-" for stdout (default api_config.yaml)
  --local            allow local-gateway extensions (several backend addresses)
  --help             this text

Exit status: 0 written, 1 invalid template/environment/config, 2 bad usage.
`;

/**
 * The CLI: parses `argv` (without the node and script arguments), renders
 * with `env`, prints problems one per line on stderr and returns the exit
 * status. Nothing is written unless the result is valid.
 */
export async function main(
  argv: readonly string[],
  env: Env,
  io: Io = { stdout: process.stdout, stderr: process.stderr },
): Promise<number> {
  let values: {
    template: string;
    descriptor: string;
    out: string;
    local: boolean;
    help: boolean;
  };
  try {
    const parsed = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        template: { type: "string", default: "gateway/api_config.yaml.tmpl" },
        descriptor: { type: "string", default: "gen/echo.pb" },
        out: { type: "string", default: "api_config.yaml" },
        local: { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
    });
    values = parsed.values;
  } catch (err) {
    io.stderr.write(`${err instanceof Error ? err.message : String(err)}\n\n${usage}`);
    return 2;
  }
  if (values.help) {
    io.stdout.write(usage);
    return 0;
  }

  let template: string;
  try {
    template = await readFile(values.template, "utf8");
  } catch (err) {
    io.stderr.write(`${values.template}: cannot read the template: ${errorText(err)}\n`);
    return 1;
  }

  let result: { text: string; plan: ApiConfigPlan };
  try {
    const registry = await loadDescriptorSet(values.descriptor);
    result = renderApiConfig({
      template,
      registry,
      env,
      local: values.local,
      sourceName: values.template,
    });
  } catch (err) {
    if (err instanceof TemplateError) {
      for (const problem of err.problems) {
        io.stderr.write(`${values.template}: ${problem}\n`);
      }
      return 1;
    }
    if (err instanceof ApiConfigError || err instanceof DescriptorError) {
      io.stderr.write(`${err.message}\n`);
      return 1;
    }
    throw err;
  }

  for (const warning of result.plan.warnings) {
    io.stderr.write(`warning: ${formatProblem(warning, values.template)}\n`);
  }
  if (values.out === "-") {
    io.stdout.write(result.text);
    return 0;
  }
  try {
    await writeFile(values.out, result.text);
  } catch (err) {
    io.stderr.write(`${values.out}: cannot write: ${errorText(err)}\n`);
    return 1;
  }
  io.stderr.write(
    `wrote ${values.out}: ${result.plan.methods.length} methods of ${result.plan.serviceName}${values.local ? " (local extensions allowed)" : ""}\n`,
  );
  return 0;
}

/** No control characters (line breaks included), no `"` and no `\\`. */
function isPlainValue(value: string): boolean {
  for (const char of value) {
    const code = char.charCodeAt(0);
    if (code < 0x20 || code === 0x7f || char === '"' || char === "\\") {
      return false;
    }
  }
  return true;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2), process.env);
}

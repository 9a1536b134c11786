/**
 * Deploys the Echo server to Cloud Run behind Google API Gateway, with gcloud:
 *
 * ```sh
 * node deploy/deploy.ts --project P --region R [--service echo] [--gateway echo-gw]
 *   [--api echo-api] [--image IMAGE] [--repository echo] [--dry-run]
 * ```
 *
 * The runbook is data: {@link planDeployment} turns the options into a list of
 * {@link Command}s, without I/O, and one runner carries them out (or, with
 * `--dry-run`, prints them, shell-quoted, one per line). Steps that create
 * something first describe it, so running the script again converges instead
 * of failing; a dry run assumes nothing exists yet and so shows the full
 * creation path. deploy/README.md walks through the same steps by hand.
 *
 * Two values are only known once the cloud answers, and the plan is built
 * around them:
 * - The service URL must be in the server's configuration (ECHO_AUDIENCES)
 *   before the first revision starts. Cloud Run's deterministic URL,
 *   `https://SERVICE-PROJECT_NUMBER.REGION.run.app`, is computed from the
 *   project number before deploying; after deploying the script checks that
 *   Cloud Run reports exactly that URL.
 * - The gateway's host, the audience clients put in their tokens, exists
 *   only after the gateway does. A first deployment therefore creates the
 *   gateway with a provisional config (an audience no client uses), reads
 *   the host, and then rolls out the real config.
 *
 * `node deploy/deploy.ts render-service --out FILE` is the step that fills
 * deploy/service.yaml from the environment and checks it; the plan calls it.
 *
 * Exit status: 0 done, 1 a step failed, 2 bad usage or no gcloud on PATH.
 */
import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { parseArgs } from "node:util";
import { parse as parseYaml } from "yaml";
import { renderTemplate, TemplateError } from "../gateway/render-config.ts";
import { ConfigError } from "../lib/config-error.ts";
import { loadServerConfig } from "../server/config.ts";

/** What to deploy where. Resolved by {@link parseDeployArgs}; every field set. */
export interface DeployOptions {
  /** Project id. `--project`, required. */
  readonly project: string;
  /** Region of the Cloud Run service, the gateway and the image repository. `--region`, required. */
  readonly region: string;
  /** Cloud Run service name; also the prefix of the service accounts. `--service`, default `echo`. */
  readonly service: string;
  /** API Gateway gateway id. `--gateway`, default `echo-gw`. */
  readonly gateway: string;
  /** API Gateway API id. `--api`, default `echo-api`. */
  readonly api: string;
  /**
   * Image to deploy. `--image`; unset: build ./Dockerfile with Cloud Build
   * and push it to Artifact Registry.
   */
  readonly image: string | undefined;
  /** Artifact Registry repository (docker) for built images. `--repository`, default `echo`. */
  readonly repository: string;
  /**
   * Suffix that makes the API config id and the image tag unique.
   * `--stamp`, default the UTC time as `yyyymmdd-hhmmss`.
   */
  readonly stamp: string;
  /** Where rendered files go. `--work-dir`, default `$TMPDIR/echo-deploy-STAMP`. */
  readonly workDir: string;
}

/**
 * One step of the runbook. `{{name}}` in `argv` and `env` values stands for
 * a value captured by an earlier step.
 */
export interface Command {
  /** What the step does, printed before it runs. */
  readonly title: string;
  /** Program and arguments; `node` means the Node running this script. */
  readonly argv: readonly string[];
  /** Extra environment, printed as `NAME=value` before the program. */
  readonly env?: Readonly<Record<string, string>>;
  /**
   * A describe: exit status 0 means the resource exists, which is recorded
   * under this key. Anything else counts as absent. A dry run assumes absent.
   */
  readonly probe?: string;
  /** Skip the step when the probe with this key found the resource. */
  readonly unlessExists?: string;
  /**
   * Keep the trimmed stdout as `{{name}}`. `dryRun` stands in for it in a dry
   * run; `expect`, when set, is what the value must be (after substitution).
   */
  readonly capture?: { readonly name: string; readonly dryRun: string; readonly expect?: string };
  /**
   * Run again until stdout is `until`, at most `attempts` times, `intervalMs`
   * apart; a value in `failOn` stops at once.
   */
  readonly poll?: {
    readonly until: string;
    readonly failOn: readonly string[];
    readonly attempts: number;
    readonly intervalMs: number;
  };
}

/** Service accounts the deployment creates, by role. */
export function serviceAccounts(options: Pick<DeployOptions, "project" | "service">) {
  const email = (id: string) => `${id}@${options.project}.iam.gserviceaccount.com`;
  return {
    /** The server's runtime identity; it needs no roles. */
    server: { id: `${options.service}-server`, email: email(`${options.service}-server`) },
    /** API Gateway's identity toward Cloud Run; the only run.invoker. */
    gateway: { id: `${options.service}-gateway`, email: email(`${options.service}-gateway`) },
    /** What clients impersonate to get ID tokens for the gateway. */
    client: { id: `${options.service}-client`, email: email(`${options.service}-client`) },
  };
}

/** APIs the deployment uses; the last two only when building the image. */
export const requiredServices = [
  "run.googleapis.com",
  "iam.googleapis.com",
  "iamcredentials.googleapis.com",
  "apigateway.googleapis.com",
  "servicemanagement.googleapis.com",
  "servicecontrol.googleapis.com",
];
export const buildServices = ["cloudbuild.googleapis.com", "artifactregistry.googleapis.com"];

/** Google's signing keys for ID tokens, as the gateway's JWT provider uses them. */
export const googleJwksUri = "https://www.googleapis.com/oauth2/v3/certs";

/** The descriptor set uploaded with the API config. */
export const descriptorFile = "gen/echo.pb";

/**
 * The runbook for `options`, in order. Pure: the same options give the same
 * list, which is what `--dry-run` prints and what the tests compare.
 */
export function planDeployment(options: DeployOptions): Command[] {
  const { project, region, service, gateway, api } = options;
  const at = [`--project=${project}`];
  const inRegion = [`--region=${region}`, ...at];
  const atLocation = [`--location=${region}`, ...at];
  const sa = serviceAccounts(options);
  const building = options.image === undefined;
  const image =
    options.image ??
    `${region}-docker.pkg.dev/${project}/${options.repository}/${service}:${options.stamp}`;
  const serviceHost = `${service}-{{projectNumber}}.${region}.run.app`;
  const serviceUrl = `https://${serviceHost}`;
  const configId = `${api}-${options.stamp}`;
  const bootstrapConfigId = `${configId}-init`;
  const commands: Command[] = [];
  const add = (command: Command) => commands.push(command);

  add({
    title: "enable the APIs the deployment uses",
    argv: [
      "gcloud",
      "services",
      "enable",
      ...requiredServices,
      ...(building ? buildServices : []),
      ...at,
    ],
  });
  add({
    title: "read the project number (part of the service's deterministic URL)",
    argv: ["gcloud", "projects", "describe", project, "--format=value(projectNumber)"],
    capture: { name: "projectNumber", dryRun: "PROJECT_NUMBER" },
  });

  const accountTitles = {
    server: "Echo server (Cloud Run runtime)",
    gateway: "Echo API Gateway backend identity",
    client: "Echo client (calls the gateway)",
  };
  for (const role of ["server", "gateway", "client"] as const) {
    const account = sa[role];
    add({
      title: `does service account ${account.email} exist?`,
      argv: ["gcloud", "iam", "service-accounts", "describe", account.email, ...at],
      probe: `sa-${role}`,
    });
    add({
      title: `create service account ${account.email}`,
      argv: [
        "gcloud",
        "iam",
        "service-accounts",
        "create",
        account.id,
        `--display-name=${accountTitles[role]}`,
        ...at,
      ],
      unlessExists: `sa-${role}`,
    });
  }

  if (building) {
    add({
      title: `does Artifact Registry repository ${options.repository} exist?`,
      argv: ["gcloud", "artifacts", "repositories", "describe", options.repository, ...atLocation],
      probe: "repository",
    });
    add({
      title: `create Artifact Registry repository ${options.repository}`,
      argv: [
        "gcloud",
        "artifacts",
        "repositories",
        "create",
        options.repository,
        "--repository-format=docker",
        ...atLocation,
      ],
      unlessExists: "repository",
    });
    add({
      title: "build ./Dockerfile with Cloud Build and push the image",
      argv: ["gcloud", "builds", "submit", ".", `--tag=${image}`, ...at],
    });
  }

  const manifest = join(options.workDir, "service.yaml");
  add({
    title: "fill deploy/service.yaml and check the server accepts its environment",
    env: {
      SERVICE_NAME: service,
      IMAGE: image,
      SERVICE_URL: serviceUrl,
      SERVER_SERVICE_ACCOUNT: sa.server.email,
      GATEWAY_SERVICE_ACCOUNT: sa.gateway.email,
      PROJECT_ID: project,
    },
    argv: ["node", "deploy/deploy.ts", "render-service", `--out=${manifest}`],
  });
  add({
    title: `deploy Cloud Run service ${service} from the manifest`,
    argv: ["gcloud", "run", "services", "replace", manifest, ...inRegion],
  });
  add({
    title: `let the gateway's account, and only it, invoke ${service}`,
    argv: [
      "gcloud",
      "run",
      "services",
      "add-iam-policy-binding",
      service,
      `--member=serviceAccount:${sa.gateway.email}`,
      "--role=roles/run.invoker",
      ...inRegion,
    ],
  });
  add({
    title: "read the service URL (it must be the deterministic URL the server was configured with)",
    argv: [
      "gcloud",
      "run",
      "services",
      "describe",
      service,
      ...inRegion,
      "--format=value(status.url)",
    ],
    capture: { name: "serviceUrl", dryRun: serviceUrl, expect: serviceUrl },
  });

  add({
    title: `does API ${api} exist?`,
    argv: ["gcloud", "api-gateway", "apis", "describe", api, ...at],
    probe: "api",
  });
  add({
    title: `create API ${api}`,
    argv: ["gcloud", "api-gateway", "apis", "create", api, ...at],
    unlessExists: "api",
  });
  add({
    title: "read the API's managed service name",
    argv: [
      "gcloud",
      "api-gateway",
      "apis",
      "describe",
      api,
      ...at,
      "--format=value(managedService)",
    ],
    capture: { name: "managedService", dryRun: "MANAGED_SERVICE" },
  });
  add({
    title: "enable the API's managed service",
    argv: ["gcloud", "services", "enable", "{{managedService}}", ...at],
  });

  const configSteps = (id: string, file: string, audience: string, why: string): Command[] => [
    {
      title: `render and validate the API config ${why}`,
      env: {
        GATEWAY_SERVICE_NAME: `*.apigateway.${project}.cloud.goog`,
        BACKEND_ADDRESS: `grpcs://${serviceHost}`,
        BACKEND_AUDIENCE: serviceUrl,
        JWKS_URI: googleJwksUri,
        GATEWAY_AUDIENCE: audience,
      },
      argv: [
        "node",
        "gateway/render-config.ts",
        "--template=gateway/api_config.yaml.tmpl",
        `--descriptor=${descriptorFile}`,
        `--out=${file}`,
      ],
    },
    {
      title: `upload API config ${id}`,
      argv: [
        "gcloud",
        "api-gateway",
        "api-configs",
        "create",
        id,
        `--api=${api}`,
        `--grpc-files=${file},${descriptorFile}`,
        `--backend-auth-service-account=${sa.gateway.email}`,
        ...at,
      ],
    },
    {
      title: `wait until API config ${id} is ACTIVE`,
      argv: [
        "gcloud",
        "api-gateway",
        "api-configs",
        "describe",
        id,
        `--api=${api}`,
        ...at,
        "--format=value(state)",
      ],
      poll: { until: "ACTIVE", failOn: ["FAILED"], attempts: 60, intervalMs: 10_000 },
    },
  ];

  add({
    title: `does gateway ${gateway} exist?`,
    argv: ["gcloud", "api-gateway", "gateways", "describe", gateway, ...atLocation],
    probe: "gateway",
  });
  // First deployment only: the gateway's host is the clients' audience but is
  // assigned when the gateway is created, so the gateway starts on a config
  // whose audience (a reserved .invalid name) no client token carries.
  for (const step of configSteps(
    bootstrapConfigId,
    join(options.workDir, "api_config.init.yaml"),
    `https://${gateway}.pending.invalid`,
    "the new gateway starts with",
  )) {
    add({ ...step, unlessExists: "gateway" });
  }
  add({
    title: `create gateway ${gateway}`,
    argv: [
      "gcloud",
      "api-gateway",
      "gateways",
      "create",
      gateway,
      `--api=${api}`,
      `--api-config=${bootstrapConfigId}`,
      ...atLocation,
    ],
    unlessExists: "gateway",
  });
  add({
    title: "read the gateway's host",
    argv: [
      "gcloud",
      "api-gateway",
      "gateways",
      "describe",
      gateway,
      ...atLocation,
      "--format=value(defaultHostname)",
    ],
    capture: { name: "gatewayHost", dryRun: "GATEWAY_HOST" },
  });
  for (const step of configSteps(
    configId,
    join(options.workDir, "api_config.yaml"),
    "https://{{gatewayHost}}",
    "for clients of https://<gateway host>",
  )) {
    add(step);
  }
  add({
    title: `switch gateway ${gateway} to API config ${configId}`,
    argv: [
      "gcloud",
      "api-gateway",
      "gateways",
      "update",
      gateway,
      `--api=${api}`,
      `--api-config=${configId}`,
      ...atLocation,
    ],
  });
  return commands;
}

/** How to call the deployed gateway, one line per entry (no trailing newline). */
export function callInstructions(options: DeployOptions, host: string): string[] {
  const client = serviceAccounts(options).client.email;
  return [
    `gateway: https://${host}`,
    "call it:",
    `  npm run client -- --address ${host}:443 --audience https://${host} --impersonate-service-account ${client}`,
    `impersonating ${client} needs roles/iam.serviceAccountTokenCreator on it, e.g.:`,
    `  gcloud iam service-accounts add-iam-policy-binding ${client} --member=user:YOU@example.com --role=roles/iam.serviceAccountTokenCreator --project=${options.project}`,
  ];
}

/** Shell-quotes one word (POSIX sh): bare when safe, otherwise in single quotes. */
export function shellQuote(word: string): string {
  if (word !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(word)) {
    return word;
  }
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

/** Replaces `{{name}}` with `values[name]`; unknown names stay as they are. */
export function substitute(text: string, values: Readonly<Record<string, string>>): string {
  return text.replace(/\{\{(\w+)\}\}/g, (whole, name: string) => values[name] ?? whole);
}

/** The command as one shell line, values filled in. */
export function formatCommand(
  command: Command,
  values: Readonly<Record<string, string>> = {},
): string {
  const env = Object.entries(command.env ?? {}).map(
    ([name, value]) => `${name}=${shellQuote(substitute(value, values))}`,
  );
  return [...env, ...command.argv.map((a) => shellQuote(substitute(a, values)))].join(" ");
}

/** The values a dry run assumes for what real steps would capture. */
export function dryRunValues(commands: readonly Command[]): Record<string, string> {
  const values: Record<string, string> = {};
  for (const command of commands) {
    if (command.capture) {
      values[command.capture.name] = substitute(command.capture.dryRun, values);
    }
  }
  return values;
}

/** What a dry run prints: every command, then how to call the gateway, as comments. */
export function dryRunLines(options: DeployOptions): string[] {
  const commands = planDeployment(options);
  const values = dryRunValues(commands);
  return [
    ...commands.map((c) => formatCommand(c, values)),
    ...callInstructions(options, values["gatewayHost"] ?? "GATEWAY_HOST").map((l) => `# ${l}`),
  ];
}

const usage = `usage: node deploy/deploy.ts --project P --region R [options]

Deploys the Echo server to Cloud Run behind API Gateway with gcloud.

  --project P        Google Cloud project id (required)
  --region R         region of the service, gateway and images (required)
  --service NAME     Cloud Run service (default echo); service accounts are
                     NAME-server, NAME-gateway and NAME-client
  --gateway ID       API Gateway gateway (default echo-gw)
  --api ID           API Gateway API (default echo-api)
  --image IMAGE      deploy this image instead of building ./Dockerfile
  --repository NAME  Artifact Registry repository for built images (default echo)
  --stamp S          unique suffix of the API config id and image tag
                     (default the UTC time, yyyymmdd-hhmmss)
  --work-dir DIR     where rendered files go (default $TMPDIR/echo-deploy-STAMP)
  --dry-run          print the commands, shell-quoted, and run none
  --help             this text

gcloud runs with prompts disabled (CLOUDSDK_CORE_DISABLE_PROMPTS=1).
Exit status: 0 done, 1 a step failed, 2 bad usage or no gcloud on PATH.

  node deploy/deploy.ts render-service --out FILE [--template deploy/service.yaml]

fills the manifest from SERVICE_NAME, IMAGE, SERVICE_URL,
SERVER_SERVICE_ACCOUNT, GATEWAY_SERVICE_ACCOUNT and PROJECT_ID and checks that
the server accepts the environment it sets.
`;

/** A bad command line: one line per problem; exit status 2. */
export class UsageError extends Error {
  override name = "UsageError";
  readonly code = "ERR_USAGE";
  readonly problems: readonly string[];
  constructor(problems: readonly string[]) {
    super(problems.join("; "));
    this.problems = problems;
  }
}

const deployFlags = {
  project: { type: "string" },
  region: { type: "string" },
  service: { type: "string", default: "echo" },
  gateway: { type: "string", default: "echo-gw" },
  api: { type: "string", default: "echo-api" },
  image: { type: "string" },
  repository: { type: "string", default: "echo" },
  stamp: { type: "string" },
  "work-dir": { type: "string" },
  "dry-run": { type: "boolean", default: false },
  help: { type: "boolean", default: false },
} as const;

/** `yyyymmdd-hhmmss` in UTC. */
export function timeStamp(date: Date): string {
  return date
    .toISOString()
    .replace(/\.\d+Z$/, "")
    .replaceAll(/[-:]/g, "")
    .replace("T", "-");
}

/**
 * Parses the deploy command line. Throws {@link UsageError} listing every
 * problem (names are checked against Google's rules, so a typo fails here,
 * not halfway through the deployment).
 */
export function parseDeployArgs(
  argv: readonly string[],
  now: Date = new Date(),
  temp: string = tmpdir(),
): { options: DeployOptions; dryRun: boolean; help: boolean } {
  let values: ReturnType<typeof parseFlags>;
  try {
    values = parseFlags(argv);
  } catch (err) {
    throw new UsageError([err instanceof Error ? err.message : String(err)]);
  }
  const problems: string[] = [];
  const project = values.project ?? "";
  const region = values.region ?? "";
  if (project === "") {
    problems.push("--project is required: the Google Cloud project id to deploy to");
  } else if (!/^[a-z][a-z0-9-]{4,28}[a-z0-9]$/.test(project)) {
    problems.push(`--project: "${project}" is not a project id (6-30 of a-z, 0-9, -)`);
  }
  if (region === "") {
    problems.push("--region is required, e.g. us-central1");
  } else if (!/^[a-z]+-[a-z]+[0-9]+$/.test(region)) {
    problems.push(`--region: "${region}" is not a region name like us-central1`);
  }
  // Service accounts are named SERVICE-gateway etc.: ids are 6-30 characters.
  if (!/^[a-z][a-z0-9-]{0,20}[a-z0-9]$/.test(values.service)) {
    problems.push(
      `--service: "${values.service}" must be 2-22 of a-z, 0-9, - (starting with a letter), so that ${values.service}-gateway is a valid service account id`,
    );
  }
  if (!/^[a-z0-9][a-z0-9-]{0,48}$/.test(values.gateway)) {
    problems.push(`--gateway: "${values.gateway}" must be 1-49 of a-z, 0-9, - (no leading -)`);
  }
  if (!/^[a-z][a-z0-9-]{0,34}[a-z0-9]$/.test(values.api)) {
    problems.push(
      `--api: "${values.api}" must be 2-36 of a-z, 0-9, - (starting with a letter; it starts config ids)`,
    );
  }
  if (!/^[a-z][a-z0-9-]{0,61}[a-z0-9]$/.test(values.repository)) {
    problems.push(`--repository: "${values.repository}" must be a-z, 0-9, - (up to 63)`);
  }
  const stamp = values.stamp ?? timeStamp(now);
  if (!/^[a-z0-9]+(-[a-z0-9]+)*$/.test(stamp) || stamp.length > 20) {
    problems.push(`--stamp: "${stamp}" must be at most 20 of a-z, 0-9, - (it ends a config id)`);
  }
  if (values.image !== undefined && values.image.trim() === "") {
    problems.push("--image: empty; leave it out to build ./Dockerfile");
  }
  if (problems.length > 0) {
    throw new UsageError(problems);
  }
  return {
    options: {
      project,
      region,
      service: values.service,
      gateway: values.gateway,
      api: values.api,
      image: values.image,
      repository: values.repository,
      stamp,
      workDir: values["work-dir"] ?? join(temp, `echo-deploy-${stamp}`),
    },
    dryRun: values["dry-run"],
    help: values.help,
  };
}

function parseFlags(argv: readonly string[]) {
  return parseArgs({ args: [...argv], options: deployFlags, strict: true, allowPositionals: false })
    .values;
}

/** Result of running one program. */
export interface Outcome {
  readonly code: number;
  readonly stdout: string;
}

/** Runs programs for {@link executePlan}; tests can replace it. */
export interface Exec {
  /**
   * Runs `argv` in the project root with `env` added. With `capture`, stdout
   * is collected and returned; with `quiet`, stderr is dropped.
   */
  run(
    argv: readonly string[],
    env: Readonly<Record<string, string>>,
    mode: { capture: boolean; quiet: boolean },
  ): Promise<Outcome>;
  sleep(ms: number): Promise<void>;
}

/** Where the script writes. */
export interface Io {
  readonly stdout: { write(chunk: string): unknown };
  readonly stderr: { write(chunk: string): unknown };
}

const projectRoot = new URL("..", import.meta.url).pathname;

/** Runs programs as child processes in the project root; `node` is this Node. */
export const processExec: Exec = {
  run(argv, env, mode) {
    return new Promise((resolve, reject) => {
      const [program = "", ...args] = argv;
      const child = spawn(program === "node" ? process.execPath : program, args, {
        cwd: projectRoot,
        env: { ...process.env, CLOUDSDK_CORE_DISABLE_PROMPTS: "1", ...env },
        stdio: ["ignore", mode.capture ? "pipe" : "inherit", mode.quiet ? "ignore" : "inherit"],
      });
      let stdout = "";
      child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
        stdout += chunk;
      });
      // Only when the program cannot be started at all (ENOENT, EACCES).
      child.once("error", reject);
      child.once("close", (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout }));
    });
  },
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};

/** A step that failed; the message says which and why. */
export class StepError extends Error {
  override name = "StepError";
  readonly code = "ERR_DEPLOY_STEP";
}

/**
 * Carries out `commands` in order: probes record existence, `unlessExists`
 * steps are skipped for what exists, captures feed later `{{name}}`s, polls
 * repeat. Returns the captured values. Throws {@link StepError} at the first
 * failure; nothing after it runs.
 */
export async function executePlan(
  commands: readonly Command[],
  exec: Exec,
  io: Io,
): Promise<Record<string, string>> {
  const values: Record<string, string> = {};
  const exists = new Set<string>();
  for (const command of commands) {
    if (command.unlessExists !== undefined && exists.has(command.unlessExists)) {
      continue;
    }
    const line = formatCommand(command, values);
    const unresolved = /\{\{(\w+)\}\}/.exec(line);
    if (unresolved) {
      throw new StepError(`${command.title}: no value for {{${unresolved[1]}}}`);
    }
    const argv = command.argv.map((a) => substitute(a, values));
    const env = Object.fromEntries(
      Object.entries(command.env ?? {}).map(([k, v]) => [k, substitute(v, values)]),
    );
    io.stderr.write(`\n==> ${command.title}\n$ ${line}\n`);
    const run = async (mode: { capture: boolean; quiet: boolean }) => {
      try {
        return await exec.run(argv, env, mode);
      } catch (err) {
        throw new StepError(
          `${command.title}: cannot run ${argv[0]}: ${err instanceof Error ? err.message : String(err)}`,
        );
      }
    };
    const capture = command.capture !== undefined || command.poll !== undefined;
    if (command.probe !== undefined) {
      const outcome = await run({ capture: true, quiet: true });
      if (outcome.code === 0) {
        exists.add(command.probe);
        io.stderr.write("exists\n");
      } else {
        io.stderr.write("not found\n");
      }
      continue;
    }
    if (command.poll) {
      const { until, failOn, attempts, intervalMs } = command.poll;
      let state = "";
      for (let attempt = 1; ; attempt++) {
        const outcome = await run({ capture: true, quiet: false });
        state = outcome.stdout.trim();
        if (outcome.code === 0 && state === until) {
          break;
        }
        if (failOn.includes(state)) {
          throw new StepError(`${command.title}: state is ${state}`);
        }
        if (attempt >= attempts) {
          throw new StepError(
            `${command.title}: still "${state}" after ${attempts} attempts ${intervalMs / 1000} s apart`,
          );
        }
        await exec.sleep(intervalMs);
      }
      continue;
    }
    const outcome = await run({ capture, quiet: false });
    if (outcome.code !== 0) {
      throw new StepError(`${command.title}: exit status ${outcome.code}`);
    }
    if (command.capture) {
      const value = outcome.stdout.trim();
      if (value === "") {
        throw new StepError(`${command.title}: printed nothing`);
      }
      const expected =
        command.capture.expect === undefined
          ? undefined
          : substitute(command.capture.expect, values);
      if (expected !== undefined && value !== expected) {
        throw new StepError(
          `${command.title}: Cloud Run reports ${value}, but the server was configured for ${expected}. ` +
            "The service has no deterministic URL (SERVICE-PROJECT_NUMBER must fit in 63 characters, and run.app URLs must be enabled); " +
            "choose a shorter --service, or set ECHO_AUDIENCES and the API config's jwt_audience to the URL Cloud Run reports (deploy/README.md).",
        );
      }
      values[command.capture.name] = value;
      io.stderr.write(`${command.capture.name} = ${value}\n`);
    }
  }
  return values;
}

/** Finds an executable `name` on `PATH`. */
export function findOnPath(name: string, path: string | undefined): string | undefined {
  for (const dir of (path ?? "").split(delimiter)) {
    if (dir === "") {
      continue;
    }
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here; keep looking
    }
  }
  return undefined;
}

/** Variables `render-service` fills in deploy/service.yaml. */
export const manifestVariables = [
  "SERVICE_NAME",
  "IMAGE",
  "SERVICE_URL",
  "SERVER_SERVICE_ACCOUNT",
  "GATEWAY_SERVICE_ACCOUNT",
  "PROJECT_ID",
] as const;

/**
 * The environment the manifest gives the server container, as `name → value`.
 * Throws TypeError when the document is not a Service with one container.
 */
export function manifestEnv(doc: unknown): Record<string, string> {
  const containers = (doc as { spec?: { template?: { spec?: { containers?: unknown } } } })?.spec
    ?.template?.spec?.containers;
  if (!Array.isArray(containers) || containers.length !== 1) {
    throw new TypeError("spec.template.spec.containers must list exactly one container");
  }
  const env: unknown = (containers[0] as { env?: unknown }).env ?? [];
  if (!Array.isArray(env)) {
    throw new TypeError("spec.template.spec.containers[0].env must be a list");
  }
  const out: Record<string, string> = {};
  for (const [i, entry] of env.entries()) {
    const { name, value } = (entry ?? {}) as { name?: unknown; value?: unknown };
    if (typeof name !== "string" || typeof value !== "string") {
      throw new TypeError(
        `spec.template.spec.containers[0].env[${i}]: name and value must be strings`,
      );
    }
    out[name] = value;
  }
  return out;
}

/**
 * Fills the manifest template from `env` and checks that the server loads
 * the environment it sets, as Cloud Run would start it (with `PORT` from the
 * container port). Throws TemplateError, ConfigError or TypeError.
 */
export function renderServiceManifest(
  template: string,
  env: Readonly<Record<string, string | undefined>>,
): string {
  const vars: Record<string, string | undefined> = {};
  for (const name of manifestVariables) {
    vars[name] = env[name];
  }
  const text = renderTemplate(template, vars);
  const doc: unknown = parseYaml(text);
  loadServerConfig({ ...manifestEnv(doc), PORT: "8080" }, []);
  return text;
}

async function renderServiceMain(argv: readonly string[], env: NodeJS.ProcessEnv, io: Io) {
  let values: { out?: string | undefined; template: string };
  try {
    values = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        out: { type: "string" },
        template: { type: "string", default: join(projectRoot, "deploy/service.yaml") },
      },
    }).values;
  } catch (err) {
    io.stderr.write(`deploy: ${err instanceof Error ? err.message : String(err)}\n`);
    return 2;
  }
  if (values.out === undefined) {
    io.stderr.write("deploy: render-service needs --out FILE\n");
    return 2;
  }
  try {
    const text = renderServiceManifest(await readFile(values.template, "utf8"), env);
    await writeFile(values.out, text);
  } catch (err) {
    const problems =
      err instanceof TemplateError || err instanceof ConfigError
        ? err.problems
        : [err instanceof Error ? err.message : String(err)];
    for (const problem of problems) {
      io.stderr.write(`deploy: ${values.template}: ${problem}\n`);
    }
    return 1;
  }
  io.stderr.write(`wrote ${values.out}\n`);
  return 0;
}

/** Dependencies of {@link main}, replaceable in tests. */
export interface MainDeps {
  readonly env: NodeJS.ProcessEnv;
  readonly io: Io;
  readonly exec: Exec;
  readonly now: Date;
}

/** The CLI; returns the exit status. */
export async function main(argv: readonly string[], deps: Partial<MainDeps> = {}): Promise<number> {
  const env = deps.env ?? process.env;
  const io = deps.io ?? { stdout: process.stdout, stderr: process.stderr };
  if (argv[0] === "render-service") {
    return renderServiceMain(argv.slice(1), env, io);
  }
  let parsed: ReturnType<typeof parseDeployArgs>;
  try {
    parsed = parseDeployArgs(argv, deps.now ?? new Date(), env["TMPDIR"] || tmpdir());
  } catch (err) {
    if (err instanceof UsageError) {
      for (const problem of err.problems) {
        io.stderr.write(`deploy: ${problem}\n`);
      }
      return 2;
    }
    throw err;
  }
  if (parsed.help) {
    io.stdout.write(usage);
    return 0;
  }
  const { options } = parsed;
  if (parsed.dryRun) {
    io.stdout.write(`${dryRunLines(options).join("\n")}\n`);
    return 0;
  }
  if (!findOnPath("gcloud", env["PATH"])) {
    io.stderr.write(
      "deploy: gcloud is not on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry-run\n",
    );
    return 2;
  }
  await mkdir(options.workDir, { recursive: true });
  let values: Record<string, string>;
  try {
    values = await executePlan(planDeployment(options), deps.exec ?? processExec, io);
  } catch (err) {
    if (err instanceof StepError) {
      io.stderr.write(`deploy: failed: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
  io.stdout.write(
    `${callInstructions(options, values["gatewayHost"] ?? "GATEWAY_HOST").join("\n")}\n`,
  );
  return 0;
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2));
}

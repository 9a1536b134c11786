/**
 * `npm run google`: every Google part the chain needs, on loopback — the
 * issuer stand-in and one metadata server per service account (`client-sa`,
 * `gateway-sa` by default) — plus the environment to export so that
 * google-auth-library and the verifiers use them. Stays up until SIGINT or
 * SIGTERM.
 *
 *   node local/google.ts [--issuer-port N] [--metadata-port client-sa=N]…
 *                        [--account NAME]… [--project ID] [--numeric-project N] [--region R]
 *
 * The orchestrator (`npm start`) and tests call {@link startGoogleStandIns}.
 */
import { parseArgs } from "node:util";
import type { Logger } from "pino";
import { createLogger } from "../lib/logging.ts";
import { createIssuer, type Issuer } from "./issuer.ts";
import { createMetadataServer, type MetadataServer } from "./metadata-server.ts";

/** Service accounts started by default, by short name. */
export const defaultAccounts: readonly string[] = ["client-sa", "gateway-sa"];

/**
 * Variables a process must NOT inherit when it should use a metadata
 * stand-in: a key file would win over the metadata server, and any of the
 * other three makes gcp-metadata assume it runs on Google Cloud, which skips
 * `METADATA_SERVER_DETECTION` and removes its request timeout.
 */
export const conflictingGoogleEnv: readonly string[] = [
  "GOOGLE_APPLICATION_CREDENTIALS",
  "K_SERVICE",
  "CLOUD_RUN_JOB",
  "FUNCTION_NAME",
];

export interface GoogleStandInsOptions {
  /** Project id of the accounts and metadata servers; default "stand-in-project". */
  projectId?: string;
  /** `project/numeric-project-id`; default "123456789012". */
  numericProjectId?: string;
  /** `instance/region`; default "us-central1". */
  region?: string;
  /** Short names of the service accounts; default {@link defaultAccounts}. */
  accounts?: readonly string[];
  /** Issuer port; default 0 (any free port). */
  issuerPort?: number;
  /** Metadata server port per account name; default 0 each. */
  metadataPorts?: Readonly<Record<string, number>>;
  /** Passed to the stand-ins for debug request logs. */
  logger?: Logger;
}

export interface GoogleStandIns {
  issuer: Issuer;
  /** One metadata server per account short name, e.g. `metadata["gateway-sa"]`. */
  metadata: Record<string, MetadataServer>;
  /**
   * Environment for a process that should act as `account`: that metadata
   * server's `env` (GCE_METADATA_HOST, METADATA_SERVER_DETECTION,
   * GOOGLE_CLOUD_PROJECT). Also remove {@link conflictingGoogleEnv} from the
   * child's environment and point `CLOUDSDK_CONFIG` at an empty directory
   * so a developer's gcloud credentials are not picked up.
   */
  envFor(account: string): Record<string, string>;
  /** Closes the metadata servers, then the issuer. */
  close(): Promise<void>;
}

/** `<name>@<project>.iam.gserviceaccount.com`, the shape of a service-account email. */
export function serviceAccountEmail(name: string, projectId: string): string {
  return `${name}@${projectId}.iam.gserviceaccount.com`;
}

/** Starts the issuer and one metadata server per account. */
export async function startGoogleStandIns(
  options: GoogleStandInsOptions = {},
): Promise<GoogleStandIns> {
  const projectId = options.projectId ?? "stand-in-project";
  const accounts = options.accounts ?? defaultAccounts;
  const issuer = await createIssuer({
    projectId,
    ...(options.issuerPort === undefined ? {} : { port: options.issuerPort }),
    ...(options.logger ? { logger: options.logger } : {}),
  });
  const metadata: Record<string, MetadataServer> = {};
  try {
    for (const name of accounts) {
      const port = options.metadataPorts?.[name];
      metadata[name] = await createMetadataServer({
        issuer,
        email: serviceAccountEmail(name, projectId),
        projectId,
        ...(options.numericProjectId ? { numericProjectId: options.numericProjectId } : {}),
        ...(options.region ? { region: options.region } : {}),
        ...(port === undefined ? {} : { port }),
        ...(options.logger ? { logger: options.logger } : {}),
      });
    }
  } catch (err) {
    await Promise.all(Object.values(metadata).map((m) => m.close()));
    await issuer.close();
    throw err;
  }
  return {
    issuer,
    metadata,
    envFor(account) {
      const server = metadata[account];
      if (!server) {
        throw new TypeError(
          `no metadata server for account "${account}" (have: ${Object.keys(metadata).join(", ")})`,
        );
      }
      return { ...server.env };
    },
    async close() {
      await Promise.all(Object.values(metadata).map((m) => m.close()));
      await issuer.close();
    },
  };
}

/** The text `npm run google` prints: what runs where, and what to export. */
export function describeStandIns(standIns: GoogleStandIns): string {
  const { issuer, metadata } = standIns;
  const lines = [
    "Google stand-ins are up; Ctrl-C stops them.",
    "",
    `# Issuer (iss ${issuer.issuer}) at ${issuer.url}`,
    `#   JWKS       ${issuer.jwksUri}`,
    `#   X.509 map  ${issuer.x509Uri}`,
    `#   token      ${issuer.tokenUri}`,
    "# A server verifying tokens from it:",
    `export ECHO_JWKS_URI=${issuer.jwksUri}`,
  ];
  for (const [name, server] of Object.entries(metadata)) {
    lines.push(
      "",
      `# ${name}: ${server.email}, metadata server at ${server.url}`,
      `# In a shell that should act as ${name}:`,
      ...Object.entries(server.env).map(([key, value]) => `export ${key}=${value}`),
      'export CLOUDSDK_CONFIG="$(mktemp -d)"',
      `unset ${conflictingGoogleEnv.join(" ")}`,
    );
  }
  return `${lines.join("\n")}\n`;
}

function parsePort(value: string, flag: string): number {
  const port = Number(value);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new TypeError(`${flag}: "${value}" is not a port number (0-65535)`);
  }
  return port;
}

async function main(): Promise<void> {
  const logger = createLogger({ base: { component: "google-stand-ins" } });
  const { values } = parseArgs({
    options: {
      "issuer-port": { type: "string" },
      "metadata-port": { type: "string", multiple: true },
      account: { type: "string", multiple: true },
      project: { type: "string" },
      "numeric-project": { type: "string" },
      region: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    process.stdout.write(
      "usage: node local/google.ts [--issuer-port N] [--metadata-port NAME=N]... [--account NAME]...\n" +
        "                            [--project ID] [--numeric-project N] [--region R]\n",
    );
    return;
  }
  const metadataPorts: Record<string, number> = {};
  for (const entry of values["metadata-port"] ?? []) {
    const [name, port] = entry.split("=");
    if (!name || port === undefined) {
      throw new TypeError(`--metadata-port: "${entry}" is not NAME=PORT (e.g. client-sa=8081)`);
    }
    metadataPorts[name] = parsePort(port, "--metadata-port");
  }
  const standIns = await startGoogleStandIns({
    ...(values.project ? { projectId: values.project } : {}),
    ...(values["numeric-project"] ? { numericProjectId: values["numeric-project"] } : {}),
    ...(values.region ? { region: values.region } : {}),
    ...(values.account?.length ? { accounts: values.account } : {}),
    ...(values["issuer-port"] === undefined
      ? {}
      : { issuerPort: parsePort(values["issuer-port"], "--issuer-port") }),
    metadataPorts,
    logger,
  });
  process.stdout.write(describeStandIns(standIns));

  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) {
      // A second Ctrl-C means "now".
      process.exit(1);
    }
    stopping = true;
    logger.info({ signal }, "stopping Google stand-ins");
    standIns.close().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error({ err }, "stopping Google stand-ins failed");
        process.exit(1);
      },
    );
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    process.stderr.write(`google stand-ins: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}

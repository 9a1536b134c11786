/**
 * Configuration of the local gateway process: flags > environment >
 * defaults, validated once at start. What the gateway enforces comes from
 * the API config file; this is only how the process runs.
 */
import { parseArgs } from "node:util";
import { ConfigError, ValueParser } from "../lib/config-error.ts";
import { type LogLevel, logLevels } from "../lib/logging.ts";

export interface GatewayConfig {
  /** Rendered `api_config.yaml`. `--config`, `GATEWAY_CONFIG`; required. */
  readonly configFile: string;
  /** FileDescriptorSet of the API. `--descriptor`, `GATEWAY_DESCRIPTOR`; default `gen/echo.pb`. */
  readonly descriptorFile: string;
  /** `--host`, `HOST`; default `0.0.0.0`. */
  readonly host: string;
  /** `--port`, `PORT`; default 8080. 0 picks a free port. */
  readonly port: number;
  /** PEM files to serve TLS (ALPN h2). `--tls-cert`/`--tls-key`, `GATEWAY_TLS_CERT`/`GATEWAY_TLS_KEY`. */
  readonly tls: { readonly certFile: string; readonly keyFile: string } | undefined;
  /** CA bundle trusted for `grpcs://` backends. `--backend-ca`, `GATEWAY_BACKEND_CA`; default Node's roots. */
  readonly backendCaFile: string | undefined;
  /**
   * Prefix of the generated headers (ESPv2 `--generated_header_prefix`):
   * `X-Apigateway-` as API Gateway uses, so backends see
   * `X-Apigateway-Api-Userinfo`. `--header-prefix`, `GATEWAY_HEADER_PREFIX`.
   */
  readonly headerPrefix: string;
  /**
   * Accept the local extensions of the API config (several comma-separated
   * backend addresses, round robin). `--strict` turns them off, to check a
   * config exactly as API Gateway would take it. Default on.
   */
  readonly local: boolean;
  /** Retries on another backend before response headers (ESPv2: 1). `--retries`, `GATEWAY_RETRIES`. */
  readonly retries: number;
  /**
   * `host:port` of the metadata server that mints the gateway's backend ID
   * tokens. `--metadata-host`, `GATEWAY_METADATA_HOST`. Default: Application
   * Default Credentials (`GCE_METADATA_HOST`, `GOOGLE_APPLICATION_CREDENTIALS`,
   * or the real metadata server on Google Cloud).
   */
  readonly metadataHost: string | undefined;
  /** `--log-level`, `GATEWAY_LOG_LEVEL`; default `info`. */
  readonly logLevel: LogLevel;
  /** Project for trace correlation in logs. `GOOGLE_CLOUD_PROJECT`. */
  readonly projectId: string | undefined;
  /**
   * After SIGTERM, how long in-flight calls may continue, in ms.
   * `--shutdown-timeout-ms`, `GATEWAY_SHUTDOWN_TIMEOUT_MS`; default 8000.
   */
  readonly shutdownTimeoutMs: number;
}

export const gatewayFlags = {
  config: { type: "string" },
  descriptor: { type: "string" },
  host: { type: "string" },
  port: { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  "backend-ca": { type: "string" },
  "header-prefix": { type: "string" },
  strict: { type: "boolean" },
  retries: { type: "string" },
  "metadata-host": { type: "string" },
  "log-level": { type: "string" },
  "shutdown-timeout-ms": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

export const gatewayEnvNames: Record<string, string> = {
  config: "GATEWAY_CONFIG",
  descriptor: "GATEWAY_DESCRIPTOR",
  host: "HOST",
  port: "PORT",
  "tls-cert": "GATEWAY_TLS_CERT",
  "tls-key": "GATEWAY_TLS_KEY",
  "backend-ca": "GATEWAY_BACKEND_CA",
  "header-prefix": "GATEWAY_HEADER_PREFIX",
  retries: "GATEWAY_RETRIES",
  "metadata-host": "GATEWAY_METADATA_HOST",
  "log-level": "GATEWAY_LOG_LEVEL",
  "shutdown-timeout-ms": "GATEWAY_SHUTDOWN_TIMEOUT_MS",
};

export function loadGatewayConfig(
  env: NodeJS.ProcessEnv = process.env,
  argv: string[] = process.argv.slice(2),
): GatewayConfig {
  let flags: ReturnType<typeof parse>;
  try {
    flags = parse(argv);
  } catch (err) {
    throw new ConfigError([err instanceof Error ? err.message : String(err)]);
  }
  const p = new ValueParser();
  const value = (
    name: keyof typeof gatewayEnvNames & keyof typeof flags,
  ): [string | undefined, string] => {
    const flag = flags[name];
    if (typeof flag === "string") {
      return [flag, `--${name}`];
    }
    const envName = gatewayEnvNames[name] ?? name;
    return [env[envName], envName];
  };
  const [configFile] = value("config");
  if (!configFile) {
    p.problems.push(
      "GATEWAY_CONFIG (--config) is required: the rendered api_config.yaml (npm run gateway:config)",
    );
  }
  const [certFile] = value("tls-cert");
  const [keyFile] = value("tls-key");
  if (Boolean(certFile) !== Boolean(keyFile)) {
    p.problems.push(
      "GATEWAY_TLS_CERT and GATEWAY_TLS_KEY (--tls-cert, --tls-key) must be set together",
    );
  }
  const headerPrefix = value("header-prefix")[0] ?? "X-Apigateway-";
  if (!/^[A-Za-z0-9-]+$/.test(headerPrefix)) {
    p.problems.push(`GATEWAY_HEADER_PREFIX: "${headerPrefix}" is not a header name prefix`);
  }
  const config: GatewayConfig = {
    configFile: configFile ?? "",
    descriptorFile: value("descriptor")[0] ?? "gen/echo.pb",
    host: value("host")[0] ?? "0.0.0.0",
    port: p.int(...value("port"), 8080, 0, 65535),
    tls: certFile && keyFile ? { certFile, keyFile } : undefined,
    backendCaFile: value("backend-ca")[0],
    headerPrefix,
    local: !(flags.strict ?? false),
    retries: p.int(...value("retries"), 1, 0, 5),
    metadataHost: value("metadata-host")[0],
    logLevel: p.oneOf(...value("log-level"), "info", logLevels),
    projectId: env["GOOGLE_CLOUD_PROJECT"] || undefined,
    shutdownTimeoutMs: p.int(...value("shutdown-timeout-ms"), 8000, 0, 3_600_000),
  };
  if (p.problems.length > 0) {
    throw new ConfigError(p.problems);
  }
  return Object.freeze(config);
}

function parse(argv: string[]) {
  return parseArgs({ args: argv, options: gatewayFlags, strict: true, allowPositionals: false })
    .values;
}

/**
 * Server configuration: flags > environment > defaults, validated once at
 * start. Cloud Run sets `PORT`, `K_SERVICE`, `K_REVISION`; the server's own
 * variables are prefixed `ECHO_`.
 */
import { parseArgs } from "node:util";
import { ConfigError, ValueParser, splitList } from "../lib/config-error.ts";
import { type LogLevel, logLevels } from "../lib/logging.ts";
import type { ServerAuthConfig } from "./auth.ts";

export interface ServerConfig {
  /** Address to bind. `HOST`, `--host`; default `0.0.0.0` (Cloud Run requires all interfaces). */
  readonly host: string;
  /** TCP port. `PORT`, `--port`; default 8080. 0 picks a free port. */
  readonly port: number;
  /**
   * PEM files for TLS (HTTP/2 over TLS with ALPN `h2`, HTTP/1.1 allowed for
   * gRPC-Web/Connect). `ECHO_TLS_CERT`/`ECHO_TLS_KEY`, `--tls-cert`/`--tls-key`.
   * Unset: cleartext HTTP/2 with prior knowledge (h2c), as Cloud Run's
   * end-to-end HTTP/2 needs.
   */
  readonly tls: { readonly certFile: string; readonly keyFile: string } | undefined;
  /** Service name reported in responses. `K_SERVICE`; default `echo`. */
  readonly service: string;
  /** Revision reported in responses. `K_REVISION`; default `local`. */
  readonly revision: string;
  /** Project for trace correlation in logs. `GOOGLE_CLOUD_PROJECT`; default none. */
  readonly projectId: string | undefined;
  /**
   * Largest `count` EchoServerStream accepts (INVALID_ARGUMENT above it).
   * `ECHO_MAX_STREAM_COUNT`, `--max-stream-count`; default 10 000.
   */
  readonly maxStreamCount: number;
  /**
   * Largest request message in bytes (RESOURCE_EXHAUSTED above it), as
   * gRPC's `GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH`. `ECHO_READ_MAX_BYTES`,
   * `--read-max-bytes`; default 4 MiB, gRPC's default.
   */
  readonly readMaxBytes: number;
  /**
   * After SIGTERM, how long in-flight RPCs may run before they are aborted.
   * Cloud Run kills the container 10 s after SIGTERM, so this stays below.
   * `ECHO_SHUTDOWN_TIMEOUT_MS`, `--shutdown-timeout-ms`; default 8000.
   */
  readonly shutdownTimeoutMs: number;
  /** `ECHO_LOG_LEVEL`, `--log-level`; default `info`. */
  readonly logLevel: LogLevel;
  /** Caller verification; see {@link ServerAuthConfig}. */
  readonly auth: ServerAuthConfig;
}

export const defaultIssuers = ["https://accounts.google.com", "accounts.google.com"];
export const defaultJwksUri = "https://www.googleapis.com/oauth2/v3/certs";

const authModes = ["off", "verify", "cloud-run"] as const;

/** The flags `loadServerConfig` understands, for `--help` and docs. */
export const serverFlags = {
  host: { type: "string" },
  port: { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  "max-stream-count": { type: "string" },
  "read-max-bytes": { type: "string" },
  "shutdown-timeout-ms": { type: "string" },
  "log-level": { type: "string" },
  "auth-mode": { type: "string" },
  "validate-token": { type: "boolean" },
  "target-audience": { type: "string", multiple: true },
  "jwks-uri": { type: "string" },
  issuer: { type: "string", multiple: true },
  "allowed-principal": { type: "string", multiple: true },
  help: { type: "boolean", short: "h" },
} as const;

/**
 * Reads the configuration from flags and environment. Throws a
 * {@link ConfigError} listing every problem. `--validate-token` is the
 * original sample's flag and means `--auth-mode verify`.
 */
export function loadServerConfig(
  env: NodeJS.ProcessEnv = process.env,
  argv: string[] = process.argv.slice(2),
): ServerConfig {
  let flags: ReturnType<typeof parseFlags>;
  try {
    flags = parseFlags(argv);
  } catch (err) {
    throw new ConfigError([err instanceof Error ? err.message : String(err)]);
  }
  const p = new ValueParser();
  const pick = (flag: string | undefined, name: string): [string | undefined, string] =>
    flag !== undefined ? [flag, `--${name}`] : [env[envNames[name] ?? ""], envNames[name] ?? name];

  const port = p.int(...pick(flags["port"], "port"), 8080, 0, 65535);
  const certFile = flags["tls-cert"] ?? env["ECHO_TLS_CERT"];
  const keyFile = flags["tls-key"] ?? env["ECHO_TLS_KEY"];
  if (Boolean(certFile) !== Boolean(keyFile)) {
    p.problems.push("ECHO_TLS_CERT and ECHO_TLS_KEY (--tls-cert, --tls-key) must be set together");
  }
  const modeSource = pick(flags["auth-mode"], "auth-mode");
  let mode = p.oneOf(...modeSource, "off", authModes);
  if (flags["validate-token"] && flags["auth-mode"] === undefined) {
    mode = "verify";
  }
  const audiences =
    flags["target-audience"]?.flatMap((a) => splitList(a)) ?? splitList(env["ECHO_AUDIENCES"]);
  if (mode !== "off" && audiences.length === 0) {
    p.problems.push(
      `ECHO_AUDIENCES (--target-audience) is required when auth mode is ${mode}: set it to the URL callers use as audience, e.g. https://echo-abc-uc.a.run.app`,
    );
  }
  const issuers = flags.issuer?.flatMap((i) => splitList(i)) ?? splitList(env["ECHO_ISSUERS"]);
  const allowed =
    flags["allowed-principal"]?.flatMap((a) => splitList(a)) ??
    splitList(env["ECHO_ALLOWED_PRINCIPALS"]);

  const config: ServerConfig = {
    host: flags.host ?? env["HOST"] ?? "0.0.0.0",
    port,
    tls: certFile && keyFile ? { certFile, keyFile } : undefined,
    service: env["K_SERVICE"] || "echo",
    revision: env["K_REVISION"] || "local",
    projectId: env["GOOGLE_CLOUD_PROJECT"] || undefined,
    maxStreamCount: p.int(...pick(flags["max-stream-count"], "max-stream-count"), 10_000, 0, 1e9),
    readMaxBytes: p.int(
      ...pick(flags["read-max-bytes"], "read-max-bytes"),
      4 * 1024 * 1024,
      1024,
      64 * 1024 * 1024,
    ),
    shutdownTimeoutMs: p.int(
      ...pick(flags["shutdown-timeout-ms"], "shutdown-timeout-ms"),
      8000,
      0,
      3_600_000,
    ),
    logLevel: p.oneOf(...pick(flags["log-level"], "log-level"), "info", logLevels),
    auth: {
      mode,
      audiences,
      issuers: issuers.length > 0 ? issuers : defaultIssuers,
      jwksUri: p.url(...pick(flags["jwks-uri"], "jwks-uri"), defaultJwksUri),
      allowedPrincipals: allowed,
      clockSkewSeconds: 60,
    },
  };
  if (p.problems.length > 0) {
    throw new ConfigError(p.problems);
  }
  return Object.freeze(config);
}

/** Environment variable behind each flag. */
export const envNames: Record<string, string> = {
  host: "HOST",
  port: "PORT",
  "tls-cert": "ECHO_TLS_CERT",
  "tls-key": "ECHO_TLS_KEY",
  "max-stream-count": "ECHO_MAX_STREAM_COUNT",
  "read-max-bytes": "ECHO_READ_MAX_BYTES",
  "shutdown-timeout-ms": "ECHO_SHUTDOWN_TIMEOUT_MS",
  "log-level": "ECHO_LOG_LEVEL",
  "auth-mode": "ECHO_AUTH_MODE",
  "target-audience": "ECHO_AUDIENCES",
  "jwks-uri": "ECHO_JWKS_URI",
  issuer: "ECHO_ISSUERS",
  "allowed-principal": "ECHO_ALLOWED_PRINCIPALS",
};

function parseFlags(argv: string[]) {
  return parseArgs({ args: argv, options: serverFlags, strict: true, allowPositionals: false })
    .values;
}

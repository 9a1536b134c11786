/**
 * Structured logging in Google Cloud Logging's JSON format, shared by the
 * server, the gateway and the local tools.
 *
 * Cloud Logging reads one JSON object per line from stdout and maps
 * `severity`, `message`, `logging.googleapis.com/trace`, `…/spanId` and
 * `…/trace_sampled` onto the LogEntry
 * (https://cloud.google.com/logging/docs/structured-logging). The few lines of
 * pino configuration that do this are written here by hand: the maintained
 * package for it (`@google-cloud/pino-logging-gcp-config`) pulls in
 * `@google-cloud/logging` and its gRPC stack, which would double the server's
 * cold start on Cloud Run.
 */
import { type DestinationStream, type Logger, type LoggerOptions, pino } from "pino";

/** pino level name → Cloud Logging `LogSeverity`. */
const severityByLevel: Record<string, string> = {
  trace: "DEBUG",
  debug: "DEBUG",
  info: "INFO",
  warn: "WARNING",
  error: "ERROR",
  fatal: "CRITICAL",
};

/** Header names as they arrive over HTTP/2 (always lowercase). */
export const headerTraceparent = "traceparent";
export const headerCloudTraceContext = "x-cloud-trace-context";

/**
 * Paths pino censors wherever they appear in a log record. Tokens must never
 * reach the logs, whichever component logs a header set.
 */
export const redactPaths: string[] = [
  "authorization",
  "headers.authorization",
  'headers["x-forwarded-authorization"]',
  'headers["x-apigateway-api-userinfo"]',
  "req.headers.authorization",
  'req.headers["x-forwarded-authorization"]',
  'req.headers["x-apigateway-api-userinfo"]',
  "token",
  "idToken",
];

export type LogLevel = "trace" | "debug" | "info" | "warn" | "error" | "fatal" | "silent";
export const logLevels: readonly LogLevel[] = [
  "trace",
  "debug",
  "info",
  "warn",
  "error",
  "fatal",
  "silent",
];

export interface LoggerConfig {
  /** Minimum level written. Default "info". */
  level?: LogLevel;
  /** Fields added to every record (e.g. `{ component: "gateway" }`). */
  base?: Record<string, unknown>;
  /**
   * Human-readable output instead of JSON. Default: only when stdout is a
   * terminal, so containers and pipes always get JSON.
   */
  pretty?: boolean;
}

/**
 * pino options producing Cloud Logging JSON. Exposed separately because
 * Fastify takes options, not a logger, when it should own the instance.
 */
export function cloudLoggingOptions(config: LoggerConfig = {}): LoggerOptions {
  // pino-pretty is a development dependency: a production install (the
  // container) always logs JSON, even on a terminal.
  const pretty = (config.pretty ?? process.stdout.isTTY === true) && prettyAvailable();
  const options: LoggerOptions = {
    level: config.level ?? "info",
    messageKey: "message",
    base: config.base ?? null,
    // Cloud Logging parses RFC 3339 `time`; pino's isoTime gives `"time":"…Z"`.
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: { paths: redactPaths, censor: "[redacted]" },
    formatters: {
      level(label) {
        return { severity: severityByLevel[label] ?? "DEFAULT" };
      },
    },
  };
  if (pretty) {
    options.transport = {
      target: "pino-pretty",
      options: { messageKey: "message", ignore: "pid,hostname", translateTime: "SYS:HH:MM:ss.l" },
    };
    // pino-pretty needs the numeric level, so keep pino's default formatter.
    delete options.formatters;
  }
  return options;
}

function prettyAvailable(): boolean {
  try {
    import.meta.resolve("pino-pretty");
    return true;
  } catch {
    return false;
  }
}

/** A pino logger writing Cloud Logging JSON to `destination` (stdout by default). */
export function createLogger(config: LoggerConfig = {}, destination?: DestinationStream): Logger {
  const options = cloudLoggingOptions(destination ? { ...config, pretty: false } : config);
  return destination ? pino(options, destination) : pino(options);
}

export interface TraceContext {
  /** 32 lowercase hex characters. */
  traceId: string;
  /** Span id as Cloud Logging wants it: 16 hex characters. */
  spanId?: string;
  sampled?: boolean;
}

/**
 * Reads the trace context of a request: W3C `traceparent`
 * (`00-<32 hex>-<16 hex>-<2 hex flags>`) first, then Google's
 * `X-Cloud-Trace-Context` (`TRACE_ID/SPAN_ID;o=1`, span id in decimal).
 * Returns undefined for absent or malformed values; never throws.
 */
export function parseTraceContext(
  get: (name: string) => string | null | undefined,
): TraceContext | undefined {
  const traceparent = get(headerTraceparent);
  if (traceparent) {
    const m = /^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/.exec(traceparent.trim());
    if (m?.[1] && m[2] && m[3] && !/^0+$/.test(m[1])) {
      return {
        traceId: m[1],
        spanId: m[2],
        sampled: (Number.parseInt(m[3], 16) & 1) === 1,
      };
    }
  }
  const cloud = get(headerCloudTraceContext);
  if (cloud) {
    const m = /^([0-9a-fA-F]{32})(?:\/(\d{1,20}))?(?:;o=([01]))?$/.exec(cloud.trim());
    if (m?.[1]) {
      const context: TraceContext = { traceId: m[1].toLowerCase() };
      if (m[2]) {
        context.spanId = BigInt.asUintN(64, BigInt(m[2])).toString(16).padStart(16, "0");
      }
      if (m[3]) {
        context.sampled = m[3] === "1";
      }
      return context;
    }
  }
  return undefined;
}

/**
 * Log fields that make Cloud Logging group a request's entries under its
 * trace: `projects/<project>/traces/<trace>`. Without a project id the trace
 * id is logged bare, which Cloud Logging ignores but a reader can still grep.
 */
export function traceLogFields(
  context: TraceContext | undefined,
  projectId: string | undefined,
): Record<string, unknown> {
  if (!context) {
    return {};
  }
  const fields: Record<string, unknown> = {
    "logging.googleapis.com/trace": projectId
      ? `projects/${projectId}/traces/${context.traceId}`
      : context.traceId,
  };
  if (context.spanId) {
    fields["logging.googleapis.com/spanId"] = context.spanId;
  }
  if (context.sampled !== undefined) {
    fields["logging.googleapis.com/trace_sampled"] = context.sampled;
  }
  return fields;
}

/**
 * Starts the real Echo server (Fastify, HTTP/2) on 127.0.0.1 with an
 * ephemeral port, for tests.
 */
import { Writable } from "node:stream";
import type { Logger } from "pino";
import { createLogger } from "../../lib/logging.ts";
import { createCallerVerifier } from "../../server/auth.ts";
import { buildServer, type EchoServer, type ServerDeps } from "../../server/app.ts";
import { loadServerConfig, type ServerConfig } from "../../server/config.ts";

export interface StartedServer extends EchoServer {
  config: ServerConfig;
  port: number;
  /** `127.0.0.1:PORT` */
  address: string;
  /** Every log record written so far. */
  logs: Record<string, unknown>[];
  close(): Promise<void>;
}

/** A logger that keeps records in memory instead of printing them. */
export function createCaptureLogger(): {
  logger: Logger;
  logs: Record<string, unknown>[];
  raw: string[];
} {
  const logs: Record<string, unknown>[] = [];
  const raw: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString("utf8").split("\n")) {
        if (line.trim() !== "") {
          raw.push(line);
          logs.push(JSON.parse(line) as Record<string, unknown>);
        }
      }
      cb();
    },
  });
  return { logger: createLogger({ level: "debug" }, sink), logs, raw };
}

/**
 * `env` and `argv` go through the real config loader; HOST and PORT default
 * to 127.0.0.1:0.
 */
export async function startServer(
  env: Record<string, string> = {},
  argv: string[] = [],
  deps: ServerDeps = {},
): Promise<StartedServer> {
  const config = loadServerConfig({ HOST: "127.0.0.1", PORT: "0", ...env }, argv);
  const { logger, logs } = createCaptureLogger();
  const verifier =
    deps.verifier ?? (config.auth.mode === "off" ? undefined : createCallerVerifier(config.auth));
  const server = await buildServer(config, { logger, ...deps, ...(verifier ? { verifier } : {}) });
  await server.app.listen({ host: config.host, port: config.port });
  const first = server.app.addresses()[0];
  const port = typeof first === "object" ? first.port : undefined;
  if (port === undefined) {
    throw new Error("server did not report its port");
  }
  return {
    ...server,
    config,
    port,
    address: `127.0.0.1:${port}`,
    logs,
    close: () => server.app.close(),
  };
}

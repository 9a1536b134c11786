/**
 * Server variants for the bench's "what we tried" table: the project's
 * server with one thing changed, started the way server/main.ts starts it
 * (same config loader, verifier, logger, listening line), so each change is
 * measured on its own.
 *
 *   node bench/variants/serve.ts <variant>
 *
 * Variants:
 *   stock-plugin   @connectrpc/connect-fastify's plugin, as server/app.ts
 *                  mounted Connect before server/connect-route.ts
 *   no-shutdown-signal  the lean route without Connect's shutdownSignal
 *                  (one listener per call on a long-lived signal)
 *   no-compression the lean route with acceptCompression: [] (no gzip/br
 *                  negotiation)
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { fastifyConnectPlugin } from "@connectrpc/connect-fastify";
import { fastify, LogController } from "fastify";
import { createLogger } from "../../lib/logging.ts";
import type { EchoApp } from "../../server/app.ts";
import { createCallerVerifier } from "../../server/auth.ts";
import { loadServerConfig } from "../../server/config.ts";
import { registerConnectRoutes } from "../../server/connect-route.ts";
import { HealthStatus } from "../../server/health.ts";
import { createInstance } from "../../server/instance.ts";
import { createAccessLogInterceptor, createAuthInterceptor } from "../../server/interceptors.ts";
import { createRoutes, publicServices } from "../../server/routes.ts";
import { EchoService } from "../../gen/echo/v1/echo_pb.ts";

const variants = ["stock-plugin", "no-shutdown-signal", "no-compression"] as const;
type Variant = (typeof variants)[number];
const variant = process.argv[2] as Variant;
if (!variants.includes(variant)) {
  process.stderr.write(`usage: node bench/variants/serve.ts <${variants.join("|")}>\n`);
  process.exit(2);
}

const config = loadServerConfig(process.env, []);
const logger = createLogger({ level: config.logLevel, base: { component: "server" } });
const instance = createInstance(config.service, config.revision);
const health = new HealthStatus([EchoService.typeName]);
const interceptors: Interceptor[] = [
  createAccessLogInterceptor({ logger, projectId: config.projectId }),
];
if (config.auth.mode !== "off") {
  interceptors.push(createAuthInterceptor(createCallerVerifier(config.auth), publicServices));
}
const app = fastify({
  loggerInstance: logger,
  logController: new LogController({ disableRequestLogging: true }),
  http2SessionTimeout: 300_000,
  http2: true,
}) as EchoApp;
const routes = createRoutes({ instance, health, maxStreamCount: config.maxStreamCount });
const shutdown = new AbortController();

if (variant === "stock-plugin") {
  await app.register(fastifyConnectPlugin, {
    routes,
    interceptors,
    readMaxBytes: config.readMaxBytes,
    shutdownSignal: shutdown.signal,
  });
} else {
  await app.register(async (scope) => {
    registerConnectRoutes(scope, {
      routes,
      interceptors,
      readMaxBytes: config.readMaxBytes,
      ...(variant === "no-shutdown-signal" ? {} : { shutdownSignal: shutdown.signal }),
      ...(variant === "no-compression" ? { acceptCompression: [] } : {}),
    });
  });
}

await app.listen({ host: config.host, port: config.port });
const address = app.addresses()[0];
logger.info(
  {
    address: [typeof address === "object" ? `${address.address}:${address.port}` : address],
    variant,
  },
  "echo server listening",
);
const stop = async () => {
  setTimeout(
    () => shutdown.abort(new ConnectError("shutting down", Code.Unavailable)),
    1000,
  ).unref();
  await app.close();
  process.exit(0);
};
process.on("SIGTERM", () => void stop());
process.on("SIGINT", () => void stop());

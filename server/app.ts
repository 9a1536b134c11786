/**
 * The Fastify application: HTTP/2 (h2c, or TLS when configured) serving the
 * Connect routes over gRPC, gRPC-Web and Connect. It never listens; main.ts
 * and the tests do.
 */
import { readFileSync } from "node:fs";
import type {
  Http2SecureServer,
  Http2Server,
  Http2ServerRequest,
  Http2ServerResponse,
  ServerHttp2Session,
} from "node:http2";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { type FastifyInstance, type FastifyServerOptions, fastify, LogController } from "fastify";
import type { Logger } from "pino";
import { cloudLoggingOptions, createLogger } from "../lib/logging.ts";
import type { ServerConfig } from "./config.ts";
import { registerConnectRoutes } from "./connect-route.ts";
import { HealthStatus } from "./health.ts";
import { createInstance } from "./instance.ts";
import {
  type CallerVerifier,
  createAccessLogInterceptor,
  createAuthInterceptor,
} from "./interceptors.ts";
import { createRoutes, publicServices } from "./routes.ts";
import { EchoService, type Instance } from "../gen/echo/v1/echo_pb.ts";

export interface ServerDeps {
  /** Verifies callers; required when `config.auth.mode` is not "off". */
  verifier?: CallerVerifier;
  /** Shared instance identity; created from the config when absent. */
  instance?: Instance;
  /** Logger; one writing Cloud Logging JSON to stdout when absent. */
  logger?: Logger;
  /**
   * Close HTTP/2 connections without any frame for this long; default
   * 300 000 (5 min). For tests.
   */
  idleSessionTimeoutMs?: number;
}

/**
 * Memory one HTTP/2 connection may use, in MB (node:http2's default is 10).
 * Behind the gateway every caller's calls share one connection per backend:
 * a burst of a few thousand calls, fewer with large headers, overran 10 MB,
 * and node then tore the whole connection down, failing every call on it.
 * (Advertising a concurrent-stream limit instead would make node reset
 * streams at random once a client uses all of it: node still counts streams
 * that have just closed.)
 */
const http2Limits = { maxSessionMemory: 128 };

/** The Fastify instance of the server: HTTP/2, cleartext or TLS, logging with pino. */
export type EchoApp = FastifyInstance<
  Http2Server | Http2SecureServer,
  Http2ServerRequest,
  Http2ServerResponse,
  Logger
>;

export interface EchoServer {
  app: EchoApp;
  instance: Instance;
  health: HealthStatus;
}

/**
 * Builds the server. The caller listens (`app.listen`) and closes
 * (`app.close`, which lets in-flight RPCs finish: HTTP/2 sessions get a
 * GOAWAY, and after `shutdownTimeoutMs` what is left is aborted).
 */
export async function buildServer(
  config: ServerConfig,
  deps: ServerDeps = {},
): Promise<EchoServer> {
  const instance = deps.instance ?? createInstance(config.service, config.revision);
  const health = new HealthStatus([EchoService.typeName]);
  const logger =
    deps.logger ?? createLogger({ level: config.logLevel, base: { component: "server" } });

  const idleSessionTimeoutMs = deps.idleSessionTimeoutMs ?? 300_000;
  const tls = config.tls
    ? { key: readFileSync(config.tls.keyFile), cert: readFileSync(config.tls.certFile) }
    : undefined;
  const common = {
    loggerInstance: logger,
    // One access line per RPC comes from the Connect interceptor instead,
    // with the gRPC status that Fastify never sees.
    logController: new LogController({ disableRequestLogging: true }),
    // Idle connections are closed below, not by Fastify.
    http2SessionTimeout: 0,
    schemaController: noFastifySchemas,
  };
  // Fastify hands `http` to http2.createServer for h2c (its types omit it).
  const h2c = { ...common, http2: true as const, http: http2Limits };
  const app = (
    tls
      ? fastify({ ...common, http2: true, https: { ...tls, allowHTTP1: true, ...http2Limits } })
      : fastify(h2c)
  ) as EchoApp;
  // gRPC clients keep connections open; close them after 5 min without a
  // frame, as grpc-go's MaxConnectionIdle would: GOAWAY (streams in flight
  // may finish), then destroy() after a grace period. Fastify's own
  // http2SessionTimeout uses close(), which waits for open streams (a client
  // that never ends a stream holds the connection forever) and leaves the
  // socket half-closed for a peer that may never answer.
  app.server.on("session", (session: ServerHttp2Session) => {
    session.setTimeout(idleSessionTimeoutMs, () => {
      session.goaway();
      setTimeout(() => session.destroy(), Math.min(idleSessionTimeoutMs, 5000)).unref();
    });
  });

  const interceptors: Interceptor[] = [
    createAccessLogInterceptor({ logger, projectId: config.projectId }),
  ];
  if (config.auth.mode !== "off") {
    if (!deps.verifier) {
      throw new TypeError(`auth mode ${config.auth.mode} needs deps.verifier`);
    }
    interceptors.push(createAuthInterceptor(deps.verifier, publicServices));
  }

  const shutdown = new AbortController();
  // Connect's handlers on lean Fastify routes (server/connect-route.ts)
  // rather than @connectrpc/connect-fastify's plugin: same protocol
  // handlers, less glue per request. Registered as a plugin so that its
  // content-type parsers stay inside it.
  await app.register(async (scope) => {
    registerConnectRoutes(scope, {
      routes: createRoutes({ instance, health, maxStreamCount: config.maxStreamCount }),
      interceptors,
      readMaxBytes: config.readMaxBytes,
      // grpc-timeout may ask for up to 99,999,999 hours, but a node timer
      // beyond 2^31−1 ms fires at once: such a deadline would expire
      // immediately. Refuse it (INVALID_ARGUMENT) instead; 24 days is plenty.
      maxTimeoutMs: 2 ** 31 - 1,
      // Handlers still running `shutdownTimeoutMs` after close() began are
      // aborted with UNAVAILABLE (clients may retry elsewhere); the timer is
      // cleared when close completes, so a quick close exits at once.
      shutdownSignal: shutdown.signal,
      onHandlerError: (err, rpc) => logger.error({ err, rpc }, "rpc handler failed"),
    });
  });
  let shutdownTimer: NodeJS.Timeout | undefined;
  app.addHook("preClose", (done) => {
    health.shutdown();
    shutdownTimer = setTimeout(
      () => shutdown.abort(new ConnectError("server is shutting down", Code.Unavailable)),
      config.shutdownTimeoutMs,
    );
    done();
  });
  app.addHook("onClose", (_instance, done) => {
    clearTimeout(shutdownTimer);
    done();
  });
  return { app, instance, health };
}

/**
 * The server declares no Fastify (JSON) schemas: Connect checks messages
 * itself. Naming our own schema compilers keeps Fastify from loading its
 * default ones (ajv and fast-json-stringify), which cost about 50 ms of
 * every cold start (measured by `npm run bench`, see bench/README.md). A
 * route that declares a schema fails at start-up with the message below.
 */
const noFastifySchemas: FastifyServerOptions["schemaController"] = {
  compilersFactory: {
    buildValidator: () => () => {
      throw new Error("the Echo server has no Fastify schema validator (see server/app.ts)");
    },
    buildSerializer: () => () => {
      throw new Error("the Echo server has no Fastify schema serializer (see server/app.ts)");
    },
  },
};

export { cloudLoggingOptions };

/**
 * Builds the local gateway from an API config plan: the HTTP/2 listener
 * (h2c, or TLS with ALPN h2), the JWT step with its key sets, the gateway's
 * own backend identity, and a pool of HTTP/2 sessions per backend address
 * list. Listening and closing are the caller's.
 */
import { readFileSync } from "node:fs";
import * as http2 from "node:http2";
import type { Socket } from "node:net";
import type { Logger } from "pino";
import type { ApiConfigPlan } from "./api-config.ts";
import type { BackendAuth } from "./backend-auth.ts";
import { Backend, BackendPool } from "./backends.ts";
import { createChain } from "./chain.ts";
import type { JwtAuthn } from "./jwt-authn.ts";

export interface GatewayDeps {
  plan: ApiConfigPlan;
  jwt: JwtAuthn | undefined;
  backendAuth: BackendAuth | undefined;
  logger: Logger;
  /** ESPv2 `--generated_header_prefix`; default `X-Apigateway-`. */
  headerPrefix?: string;
  /** Retries before response headers; default 1 (ESPv2). */
  retries?: number;
  /** Default 64 KiB. */
  replayLimitBytes?: number;
  tls?: { certFile: string; keyFile: string } | undefined;
  backendCa?: string | Buffer | undefined;
  projectId?: string | undefined;
  /** Skip a backend after a failed connect for this long; default 1000 ms. */
  downBackoffMs?: number;
  /**
   * Close a client connection after this long without any frame: GOAWAY
   * first, then, if streams still hold it open, a hard close after a
   * grace period. Default 300 000 (5 min).
   */
  idleSessionTimeoutMs?: number;
}

/**
 * Most request header bytes accepted, counted as HTTP/2 does (name + value
 * + 32 per field): Envoy's `max_request_headers_kb` of 60 (spec §5.4).
 */
export const maxRequestHeaderListBytes = 60 * 1024;

/**
 * Streams a client may have open on one connection at a time. Google's front
 * end gives API Gateway's clients 100, and Envoy's edge-proxy guidance says
 * the same: well-behaved clients queue beyond it, a client that ignores it
 * loses its connection (GOAWAY PROTOCOL_ERROR), so one connection cannot
 * pile thousands of streams onto the shared backend sessions. (node:http2
 * still counts streams that have just closed, so a client using all 100
 * with large headers may see a few reset with ENHANCE_YOUR_CALM.)
 */
export const maxConcurrentStreamsPerConnection = 100;

/**
 * Most header fields in a request (pseudo-headers included): Envoy's default
 * `max_headers_count`. node:http2 would take 128, and the few headers the
 * gateway adds would then push a request over the backend's own limit of
 * 128, turning it into a misleading UNAVAILABLE.
 */
export const maxRequestHeaderFields = 100;

export interface Gateway {
  server: http2.Http2Server | http2.Http2SecureServer;
  pools: ReadonlyMap<string, BackendPool>;
  listen(port: number, host: string): Promise<number>;
  /**
   * Stops accepting, sends GOAWAY on every client session and waits for
   * in-flight calls to finish, up to `timeoutMs`; then closes what is left.
   */
  close(timeoutMs?: number): Promise<void>;
}

export function buildGateway(deps: GatewayDeps): Gateway {
  const pools = new Map<string, BackendPool>();
  for (const method of deps.plan.methods) {
    const key = method.backend.poolKey;
    if (!pools.has(key)) {
      pools.set(
        key,
        new BackendPool(
          method.backend.addresses.map(
            (a) =>
              new Backend(a, {
                logger: deps.logger,
                ...(deps.backendCa ? { ca: deps.backendCa } : {}),
                ...(deps.downBackoffMs !== undefined ? { downBackoffMs: deps.downBackoffMs } : {}),
              }),
          ),
        ),
      );
    }
  }
  const handleStream = createChain({
    plan: deps.plan,
    jwt: deps.jwt,
    backendAuth: deps.backendAuth,
    pools,
    userInfoHeader: `${deps.headerPrefix ?? "X-Apigateway-"}Api-Userinfo`.toLowerCase(),
    retries: deps.retries ?? 1,
    replayLimitBytes: deps.replayLimitBytes ?? 64 * 1024,
    maxRequestHeaderListBytes,
    projectId: deps.projectId,
    logger: deps.logger,
  });

  const settings: http2.Settings = {
    enablePush: false,
    // 60 KB of request headers, Envoy's `max_request_headers_kb` (§5.4).
    // node:http2 applies it only once the client acknowledged our SETTINGS;
    // the chain checks every request itself as well.
    maxHeaderListSize: maxRequestHeaderListBytes,
    maxConcurrentStreams: maxConcurrentStreamsPerConnection,
  };
  const server = deps.tls
    ? http2.createSecureServer({
        key: readFileSync(deps.tls.keyFile),
        cert: readFileSync(deps.tls.certFile),
        ALPNProtocols: ["h2"],
        settings,
        maxHeaderListPairs: maxRequestHeaderFields,
      })
    : http2.createServer({ settings, maxHeaderListPairs: maxRequestHeaderFields });
  server.on("stream", handleStream);
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session: http2.ServerHttp2Session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
    session.on("error", () => {
      // Connection-level errors end the session; nothing to answer.
    });
    // Idle client connections are closed after 5 minutes: GOAWAY (streams in
    // flight may finish), then destroy() after a grace period. Not close():
    // it waits for open streams, which a client that never ends a stream
    // keeps forever, and leaves the socket half-closed for a peer that may
    // never answer.
    const idleMs = deps.idleSessionTimeoutMs ?? 300_000;
    session.setTimeout(idleMs, () => {
      session.goaway();
      setTimeout(() => session.destroy(), Math.min(idleMs, 5000)).unref();
    });
  });
  const sockets = new Set<Socket>();
  server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });

  return {
    server,
    pools,
    listen(port, host) {
      return new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => {
          server.off("error", reject);
          const address = server.address();
          resolve(typeof address === "object" && address ? address.port : port);
        });
      });
    },
    close(timeoutMs = 8000) {
      return new Promise((resolve) => {
        const timer = setTimeout(() => {
          for (const s of sessions) {
            s.destroy();
          }
          for (const s of sockets) {
            s.destroy();
          }
        }, timeoutMs);
        timer.unref();
        server.close(() => {
          clearTimeout(timer);
          for (const pool of pools.values()) {
            pool.close();
          }
          deps.jwt?.close();
          resolve();
        });
        for (const s of sessions) {
          s.close();
        }
      });
    },
  };
}

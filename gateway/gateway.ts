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
}

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
    projectId: deps.projectId,
    logger: deps.logger,
  });

  const settings: http2.Settings = {
    enablePush: false,
    // 60 KB of request headers, Envoy's `max_request_headers_kb` (§5.4).
    maxHeaderListSize: 60 * 1024,
  };
  const server = deps.tls
    ? http2.createSecureServer({
        key: readFileSync(deps.tls.keyFile),
        cert: readFileSync(deps.tls.certFile),
        ALPNProtocols: ["h2"],
        settings,
      })
    : http2.createServer({ settings });
  server.on("stream", handleStream);
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session: http2.ServerHttp2Session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
    session.on("error", () => {
      // Connection-level errors end the session; nothing to answer.
    });
    // Idle client connections are closed after 5 minutes.
    session.setTimeout(300_000, () => session.close());
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

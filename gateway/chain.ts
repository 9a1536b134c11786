/**
 * The request chain of the local gateway, in ESPv2's filter order (spec
 * §1.5): route → JWT authentication → backend authentication → pick backend
 * → forward. This file is the only place that knows the order.
 */
import * as http2 from "node:http2";
import type { Logger } from "pino";
import { parseTraceContext, traceLogFields } from "../lib/logging.ts";
import type { ApiConfigPlan, MethodPlan } from "./api-config.ts";
import type { BackendAuth } from "./backend-auth.ts";
import type { BackendPool } from "./backends.ts";
import { forward } from "./forward.ts";
import type { JwtAuthn, TokenSource } from "./jwt-authn.ts";
import { isGrpcRequest, sendLocalReply } from "./local-reply.ts";

/** Request headers never forwarded (hop-by-hop, or rewritten per backend). */
const hopByHop = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "transfer-encoding",
  "upgrade",
  "host",
  "http2-settings",
]);

export const headerForwardedAuthorization = "x-forwarded-authorization";

export interface ChainOptions {
  plan: ApiConfigPlan;
  /** Absent when no method requires a JWT. */
  jwt: JwtAuthn | undefined;
  /** Absent when no backend needs the gateway's identity. */
  backendAuth: BackendAuth | undefined;
  /** Pool per `BackendPlan.poolKey`. */
  pools: ReadonlyMap<string, BackendPool>;
  /**
   * Lowercase name of the header carrying the verified JWT payload:
   * `x-apigateway-api-userinfo` as API Gateway sends it (ESPv2's
   * `--generated_header_prefix` + `API-UserInfo`).
   */
  userInfoHeader: string;
  retries: number;
  replayLimitBytes: number;
  /**
   * Largest request header list (name + value + 32 per field); larger ones
   * are reset with ENHANCE_YOUR_CALM, as node:http2 itself does once the
   * client has acknowledged the gateway's SETTINGS.
   */
  maxRequestHeaderListBytes: number;
  projectId: string | undefined;
  logger: Logger;
}

/** Handles one HTTP/2 stream of the gateway's listener. */
export function createChain(options: ChainOptions) {
  const { plan, logger } = options;
  const stripped = new Set([...hopByHop, headerForwardedAuthorization, options.userInfoHeader]);

  return function handleStream(
    stream: http2.ServerHttp2Stream,
    headers: http2.IncomingHttpHeaders,
    _flags: number,
    rawHeaders: string[],
  ): void {
    const started = performance.now();
    stream.on("error", () => {
      // A reset from the client surfaces here; the chain's own handlers deal
      // with it through "close". Without a listener it would crash the process.
    });
    let headerListBytes = 0;
    for (let i = 0; i < rawHeaders.length; i++) {
      headerListBytes += (rawHeaders[i] as string).length + (i % 2 === 0 ? 32 : 0);
    }
    if (headerListBytes > options.maxRequestHeaderListBytes) {
      stream.close(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
      return;
    }
    const rawPath = headers[":path"] ?? "";
    const queryAt = rawPath.indexOf("?");
    const path = queryAt < 0 ? rawPath : rawPath.slice(0, queryAt);
    const grpc = isGrpcRequest(headers["content-type"]);

    // 1. Route: exact `POST /pkg.Service/Method` (ESPv2 also takes a
    // trailing slash). Anything else is answered before any auth (§1.4).
    const method =
      plan.methodsByPath.get(path) ??
      (path.endsWith("/") ? plan.methodsByPath.get(path.slice(0, -1)) : undefined);
    if (!method) {
      sendLocalReply(stream, grpc, {
        httpStatus: 404,
        message: "The current request is not defined by this API.",
      });
      return;
    }
    if (headers[":method"] !== "POST") {
      sendLocalReply(stream, grpc, {
        httpStatus: 405,
        message: `The current request is matched to the defined url template "${method.path}" but its http method is not allowed`,
      });
      return;
    }

    const log = (fields: Record<string, unknown>) => {
      const durationMs = Math.round((performance.now() - started) * 1000) / 1000;
      const trace = traceLogFields(
        parseTraceContext((n) => headers[n] as string | undefined),
        options.projectId,
      );
      logger.info({ rpc: method.selector, durationMs, ...trace, ...fields }, "rpc");
    };

    void authorizeAndForward(
      stream,
      headers,
      rawHeaders,
      method,
      rawPath,
      queryAt,
      grpc,
      log,
    ).catch((err: unknown) => {
      logger.error({ err, rpc: method.selector }, "gateway chain failed");
      sendLocalReply(stream, grpc, { httpStatus: 500, message: "internal gateway error" });
    });
  };

  async function authorizeAndForward(
    stream: http2.ServerHttp2Stream,
    headers: http2.IncomingHttpHeaders,
    rawHeaders: string[],
    method: MethodPlan,
    rawPath: string,
    queryAt: number,
    grpc: boolean,
    log: (fields: Record<string, unknown>) => void,
  ): Promise<void> {
    // Request headers for the backend. Client-sent copies of the headers the
    // gateway vouches for are removed first, on every route: a backend must
    // never mistake them for the gateway's (ESPv2 does so only where it sets
    // them; we are stricter).
    const out: http2.OutgoingHttpHeaders = {};
    for (const name of Object.keys(headers)) {
      if (name.charCodeAt(0) !== 58 /* ":" */ && !stripped.has(name)) {
        out[name] = headers[name];
      }
    }

    // 2. JWT authentication.
    let principal: string | undefined;
    if (method.auth && options.jwt) {
      const source: TokenSource = {
        // Every value of a repeated header, as Envoy's extractor sees them:
        // node:http2 keeps only the first of a repeated `authorization` in
        // `headers`, and joins others with ", ".
        header: (name) => {
          const values: string[] = [];
          for (let i = 0; i < rawHeaders.length; i += 2) {
            if (rawHeaders[i] === name) {
              values.push(rawHeaders[i + 1] as string);
            }
          }
          return values.length > 1 ? values : values[0];
        },
        query: (name) =>
          queryAt < 0 ? [] : new URLSearchParams(rawPath.slice(queryAt + 1)).getAll(name),
      };
      const result = await options.jwt.authenticate(method.auth, source);
      if (!result.ok) {
        const scheme = headers[":scheme"] ?? "http";
        const realm = `${scheme}://${headers[":authority"] ?? ""}${method.path}`.slice(0, 256);
        sendLocalReply(stream, grpc, {
          httpStatus: result.httpStatus,
          message: result.message,
          headers: {
            "www-authenticate":
              result.message === "Jwt is missing"
                ? `Bearer realm="${realm}"`
                : `Bearer realm="${realm}", error="invalid_token"`,
          },
        });
        log({ code: "rejected", status: result.httpStatus, reason: result.message });
        return;
      }
      if (result.payloadSegment !== undefined) {
        out[options.userInfoHeader] = result.payloadSegment;
        principal =
          typeof result.payload?.["email"] === "string" ? result.payload["email"] : undefined;
      }
    }
    if (stream.closed) {
      return;
    }

    // 3. Backend authentication: the gateway's own ID token replaces the
    // caller's, which moves to X-Forwarded-Authorization (§3, §4).
    const audience = method.backend.jwtAudience;
    if (audience !== undefined && options.backendAuth) {
      const token = await options.backendAuth.token(audience);
      if (token === undefined) {
        sendLocalReply(stream, grpc, {
          httpStatus: 500,
          message: `Token not found for audience: ${audience}`,
        });
        log({ code: "no_backend_token", audience });
        return;
      }
      if (headers.authorization !== undefined) {
        out[headerForwardedAuthorization] = headers.authorization;
      }
      out.authorization = `Bearer ${token}`;
    }
    if (stream.closed) {
      return;
    }

    // 4 + 5. Pick a backend (round robin, per RPC) and forward.
    const pool = options.pools.get(method.backend.poolKey);
    if (!pool) {
      throw new Error(`no pool for ${method.backend.poolKey}`);
    }
    forward(stream, {
      pool,
      headers: out,
      path: method.path,
      grpc,
      timeoutMs: method.backend.deadlineMs,
      idleTimeoutMs: method.backend.idleTimeoutMs,
      retries: options.retries,
      replayLimitBytes: options.replayLimitBytes,
      logger,
      onDone: (outcome) =>
        log({
          code: outcome.grpcStatus ?? "",
          backend: outcome.backend,
          attempts: outcome.attempts,
          caller: principal,
          ...(outcome.error ? { reason: outcome.error } : {}),
        }),
    });
  }
}

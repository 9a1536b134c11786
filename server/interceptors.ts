/**
 * Server interceptors: the access log with error hygiene, and caller
 * verification. They run inside Connect, so they cover gRPC, gRPC-Web and
 * Connect alike, and every RPC kind.
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import { parseTraceContext, traceLogFields } from "../lib/logging.ts";
import { callerKey } from "./caller-context.ts";

/** What a verifier returns; see server/auth.ts. */
export interface CallerVerifier {
  verify(headers: Headers): Promise<import("../gen/echo/v1/echo_pb.ts").Caller>;
}

export interface AccessLogOptions {
  logger: Logger;
  projectId: string | undefined;
}

/**
 * Logs one line per RPC (`rpc`, `code`, `durationMs`, caller, trace), and
 * turns any error that is not a ConnectError into INTERNAL "internal error":
 * a plain Error would otherwise reach the client as UNKNOWN with its
 * message, which may carry internals.
 */
export function createAccessLogInterceptor(options: AccessLogOptions): Interceptor {
  const { logger, projectId } = options;
  return (next) => async (req) => {
    const started = performance.now();
    const fields = () => {
      const caller = req.contextValues.get(callerKey);
      return {
        rpc: `${req.service.typeName}/${req.method.name}`,
        caller: caller.principal?.email || undefined,
        endUser: caller.endUser?.email || undefined,
        ...traceLogFields(
          parseTraceContext((n) => req.header.get(n)),
          projectId,
        ),
      };
    };
    const finish = (err: unknown) => {
      const durationMs = Math.round((performance.now() - started) * 1000) / 1000;
      if (err === undefined) {
        logger.info({ ...fields(), code: "ok", durationMs }, "rpc");
        return undefined;
      }
      if (err instanceof ConnectError) {
        const level = err.code === Code.Internal || err.code === Code.Unknown ? "error" : "info";
        logger[level](
          { ...fields(), code: codeToString(err.code), reason: err.rawMessage, durationMs },
          "rpc",
        );
        return err;
      }
      logger.error({ ...fields(), code: "internal", err, durationMs }, "rpc failed unexpectedly");
      return new ConnectError("internal error", Code.Internal);
    };
    let res: Awaited<ReturnType<typeof next>>;
    try {
      res = await next(req);
    } catch (err) {
      throw finish(err);
    }
    if (!res.stream) {
      finish(undefined);
      return res;
    }
    return {
      ...res,
      message: (async function* () {
        try {
          yield* res.message;
        } catch (err) {
          throw finish(err);
        }
        finish(undefined);
      })(),
    };
  };
}

/**
 * Verifies the caller of every RPC except the open services (health,
 * reflection), and hands the result to handlers through `callerKey`.
 */
export function createAuthInterceptor(
  verifier: CallerVerifier,
  openServices: ReadonlySet<string>,
): Interceptor {
  return (next) => async (req) => {
    if (!openServices.has(req.service.typeName)) {
      req.contextValues.set(callerKey, await verifier.verify(req.header));
    }
    return next(req);
  };
}

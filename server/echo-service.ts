/**
 * The EchoService implementation. It knows nothing of Fastify or HTTP: it is
 * registered on a ConnectRouter and reads the caller from context values.
 */
import { create } from "@bufbuild/protobuf";
import { type Duration, durationMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  EchoBidiStreamResponseSchema,
  EchoClientStreamResponseSchema,
  EchoResponseSchema,
  EchoServerStreamResponseSchema,
  type EchoService,
  type Instance,
} from "../gen/echo/v1/echo_pb.ts";
import { callerKey } from "./caller-context.ts";

export interface EchoServiceOptions {
  /** The identity stamped on every response (shared, may change once). */
  instance: Instance;
  /** Largest accepted EchoServerStream `count`. */
  maxStreamCount: number;
}

/** Longest pause accepted between two server-stream responses. */
const maxIntervalMs = 60_000;

export function createEchoService(options: EchoServiceOptions): ServiceImpl<typeof EchoService> {
  const { instance, maxStreamCount } = options;
  return {
    echo(req, ctx) {
      return create(EchoResponseSchema, {
        message: req.message,
        instance,
        caller: ctx.values.get(callerKey),
      });
    },

    async *echoServerStream(req, ctx) {
      if (req.count > maxStreamCount) {
        throw new ConnectError(
          `count ${req.count} exceeds the maximum of ${maxStreamCount}`,
          Code.InvalidArgument,
        );
      }
      const intervalMs = req.interval ? checkedInterval(req.interval) : 0;
      const caller = ctx.values.get(callerKey);
      for (let index = 0; index < req.count; index++) {
        if (index > 0 && intervalMs > 0) {
          await sleep(intervalMs, ctx);
        }
        yield create(EchoServerStreamResponseSchema, {
          message: req.message,
          index,
          instance,
          caller,
        });
      }
    },

    async echoClientStream(requests, ctx) {
      const messages: string[] = [];
      for await (const req of requests) {
        messages.push(req.message);
      }
      return create(EchoClientStreamResponseSchema, {
        message: messages.join(" "),
        count: messages.length,
        instance,
        caller: ctx.values.get(callerKey),
      });
    },

    async *echoBidiStream(requests, ctx) {
      const caller = ctx.values.get(callerKey);
      let index = 0;
      for await (const req of requests) {
        yield create(EchoBidiStreamResponseSchema, {
          message: req.message,
          index: index++,
          instance,
          caller,
        });
      }
    },
  };
}

function checkedInterval(interval: Duration): number {
  const ms = durationMs(interval);
  if (!Number.isFinite(ms) || ms < 0 || ms > maxIntervalMs) {
    throw new ConnectError(
      `interval must be between 0 and ${maxIntervalMs / 1000}s`,
      Code.InvalidArgument,
    );
  }
  return ms;
}

/** Waits, but ends early with the RPC (client cancel, deadline, shutdown). */
function sleep(ms: number, ctx: HandlerContext): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(ConnectError.from(ctx.signal.reason, Code.Canceled));
    };
    const timer = setTimeout(() => {
      ctx.signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    if (ctx.signal.aborted) {
      onAbort();
    } else {
      ctx.signal.addEventListener("abort", onAbort, { once: true });
    }
  });
}

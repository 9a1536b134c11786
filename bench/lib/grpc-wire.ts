/**
 * gRPC on the wire for the bench: pre-encoded request bodies for h2load, and
 * a raw node:http2 caller that reads `grpc-status` (h2load counts HTTP 200 as
 * success whatever the status, so correctness is checked here).
 */
import * as http2 from "node:http2";
import { type DescMessage, type MessageInitShape, create, toBinary } from "@bufbuild/protobuf";

/** Paths of the two methods the bench drives. */
export const echoPath = "/echo.v1.EchoService/Echo";
export const serverStreamPath = "/echo.v1.EchoService/EchoServerStream";

/** One length-prefixed, uncompressed gRPC message: the whole body of a unary request. */
export function grpcFrame<Desc extends DescMessage>(
  schema: Desc,
  init: MessageInitShape<Desc>,
): Buffer {
  const payload = toBinary(schema, create(schema, init));
  const out = Buffer.alloc(5 + payload.length);
  out.writeUInt32BE(payload.length, 1);
  out.set(payload, 5);
  return out;
}

/** Request headers of every bench call, besides pseudo-headers. */
export function grpcHeaders(token?: string): Record<string, string> {
  return {
    "content-type": "application/grpc",
    te: "trailers",
    ...(token ? { authorization: `Bearer ${token}` } : {}),
  };
}

export interface RawCallResult {
  httpStatus: number;
  /** From the trailers, or from the headers of a trailers-only answer; "" when absent. */
  grpcStatus: string;
  grpcMessage: string;
  /** gRPC messages received (5-byte prefixes counted over the body). */
  messages: number;
  durationMs: number;
  /** Transport failure (reset, refused connection); grpcStatus is "" then. */
  error: string | undefined;
}

/**
 * Sends one gRPC request over `session` and reads the whole answer. Never
 * rejects: failures come back in `error`.
 */
export function rawCall(
  session: http2.ClientHttp2Session,
  path: string,
  body: Buffer,
  headers: Record<string, string>,
  timeoutMs = 5000,
): Promise<RawCallResult> {
  const started = performance.now();
  return new Promise((resolve) => {
    let httpStatus = 0;
    let grpcStatus = "";
    let grpcMessage = "";
    let buffered: Buffer = Buffer.alloc(0);
    let messages = 0;
    let settled = false;
    const finish = (error: string | undefined) => {
      if (settled) {
        return;
      }
      settled = true;
      clearTimeout(timer);
      resolve({
        httpStatus,
        grpcStatus,
        grpcMessage: decodeURIComponent(grpcMessage),
        messages,
        durationMs: performance.now() - started,
        error,
      });
    };
    let req: http2.ClientHttp2Stream;
    try {
      req = session.request({ ":method": "POST", ":path": path, ...headers });
    } catch (err) {
      finish(err instanceof Error ? err.message : String(err));
      return;
    }
    const timer = setTimeout(() => {
      req.close(http2.constants.NGHTTP2_CANCEL);
      finish(`no answer within ${timeoutMs} ms`);
    }, timeoutMs);
    const readStatus = (h: http2.IncomingHttpHeaders) => {
      if (h["grpc-status"] !== undefined) {
        grpcStatus = String(h["grpc-status"]);
        grpcMessage = String(h["grpc-message"] ?? "");
      }
    };
    req.on("response", (h) => {
      httpStatus = Number(h[":status"]);
      readStatus(h);
    });
    req.on("trailers", readStatus);
    req.on("data", (chunk: Buffer) => {
      // Count complete messages without keeping more than one partial frame.
      buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
      while (buffered.length >= 5) {
        const length = buffered.readUInt32BE(1);
        if (buffered.length < 5 + length) {
          break;
        }
        messages++;
        buffered = buffered.subarray(5 + length);
      }
    });
    req.on("error", (err) => finish(err.message));
    req.on("close", () => finish(req.rstCode ? `reset (code ${req.rstCode})` : undefined));
    req.end(body);
  });
}

/** An h2c session to `127.0.0.1:port`, resolved once connected. */
export function connectH2c(port: number, timeoutMs = 5000): Promise<http2.ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://127.0.0.1:${port}`);
    const timer = setTimeout(() => {
      session.destroy();
      reject(new Error(`no HTTP/2 connection to port ${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    session.once("connect", () => {
      clearTimeout(timer);
      session.off("error", onError);
      session.on("error", () => {});
      resolve(session);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      reject(err);
    };
    session.once("error", onError);
  });
}

/** Tally of sampled calls: how many, and how many did not end with grpc-status 0. */
export interface SampleTally {
  calls: number;
  notOk: number;
  /** A few distinct failure descriptions, for the report. */
  examples: string[];
}

/**
 * Sends one call every `everyMs` over its own connection until stopped, and
 * tallies grpc-status. It runs beside the load generator so that a server
 * answering HTTP 200 with a gRPC error under load is seen.
 */
export function startStatusSampler(
  port: number,
  path: string,
  body: Buffer,
  headers: Record<string, string>,
  everyMs = 50,
): { stop(): Promise<SampleTally> } {
  const tally: SampleTally = { calls: 0, notOk: 0, examples: [] };
  let stopped = false;
  const loop = (async () => {
    let session: http2.ClientHttp2Session | undefined;
    while (!stopped) {
      try {
        session ??= await connectH2c(port);
        const r = await rawCall(session, path, body, headers, 10_000);
        tally.calls++;
        if (r.grpcStatus !== "0") {
          tally.notOk++;
          const example = r.error ?? `grpc-status ${r.grpcStatus || "(none)"} ${r.grpcMessage}`;
          if (tally.examples.length < 3 && !tally.examples.includes(example)) {
            tally.examples.push(example);
          }
        }
        if (session.closed || session.destroyed) {
          session = undefined;
        }
      } catch (err) {
        tally.calls++;
        tally.notOk++;
        const example = err instanceof Error ? err.message : String(err);
        if (tally.examples.length < 3 && !tally.examples.includes(example)) {
          tally.examples.push(example);
        }
        session = undefined;
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
    session?.close();
  })();
  return {
    async stop() {
      stopped = true;
      await loop;
      return tally;
    },
  };
}

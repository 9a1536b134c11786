/**
 * Forwards one gRPC call (any streaming kind) to a backend, frame by frame:
 * request messages as they arrive, response headers, messages and trailers
 * as the backend sends them, resets in both directions. Nothing is parsed or
 * buffered beyond what a retry needs.
 */
import * as http2 from "node:http2";
import type { Logger } from "pino";
import type { Backend, BackendPool } from "./backends.ts";
import { encodeGrpcMessage, localReplyBody, sendLocalReply } from "./local-reply.ts";

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM, NGHTTP2_FLAG_END_STREAM } =
  http2.constants;

/** Response headers never passed back (hop-by-hop, and Envoy's grpc_metadata_scrubber). */
const droppedResponseHeaders = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "transfer-encoding",
  "upgrade",
  "content-length",
]);

export interface ForwardOptions {
  pool: BackendPool;
  /** Request headers for the backend, without pseudo-headers. */
  headers: http2.OutgoingHttpHeaders;
  path: string;
  /** Is the caller speaking gRPC (selects the local-reply format)? */
  grpc: boolean;
  /**
   * Route timeout (spec §5.2): unary methods only. Expiry answers
   * UNAVAILABLE `upstream request timeout`, as Envoy's 504 becomes.
   */
  timeoutMs: number | undefined;
  /**
   * Longest time without any frame on the call (Envoy route `idle_timeout`,
   * spec §5.2). Before response headers the gateway answers UNKNOWN
   * `stream timeout` (Envoy's 408); after them it resets the stream.
   */
  idleTimeoutMs: number | undefined;
  /**
   * Retries on another backend when the attempt failed before response
   * headers: connect failure, refused stream, reset (ESPv2's `retry_on:
   * reset,connect-failure,refused-stream`, `num_retries: 1`).
   */
  retries: number;
  /**
   * Request bytes kept for a retry. A request that sent more than this
   * before the failure is not retried (Envoy's retry buffer does the same).
   */
  replayLimitBytes: number;
  logger: Logger;
  /** Called once when the call ends, with the backend used and how it ended. */
  onDone?: (outcome: ForwardOutcome) => void;
}

export interface ForwardOutcome {
  backend: string | undefined;
  attempts: number;
  /** grpc-status as sent to the client, when known. */
  grpcStatus: string | undefined;
  /** Set when the gateway answered by itself or reset the stream. */
  error: string | undefined;
}

export function forward(down: http2.ServerHttp2Stream, options: ForwardOptions): void {
  const { pool, logger } = options;
  const tried = new Set<Backend>();
  let up: http2.ClientHttp2Stream | undefined;
  let backend: Backend | undefined;
  let attempts = 0;
  let replay: Buffer[] | undefined = [];
  let replayBytes = 0;
  // The request may have ended already, while the chain was verifying a
  // token: an empty body's END_STREAM emits "end" even before anyone reads.
  let downEnded = down.readableEnded;
  let responded = false;
  let done = false;
  let upTrailers: http2.IncomingHttpHeaders | undefined;
  let lastReason = "";
  let timer: NodeJS.Timeout | undefined;

  const finish = (grpcStatus: string | undefined, error: string | undefined) => {
    if (done) {
      return;
    }
    done = true;
    clearTimeout(timer);
    options.onDone?.({ backend: backend?.origin, attempts, grpcStatus, error });
  };

  const fail = (httpStatus: number, message: string) => {
    sendLocalReply(down, options.grpc, { httpStatus, message });
    if (up && !up.closed) {
      up.close(NGHTTP2_CANCEL);
    }
    finish(undefined, message);
  };

  if (options.timeoutMs !== undefined && options.timeoutMs > 0) {
    timer = setTimeout(() => {
      if (!responded) {
        fail(504, "upstream request timeout");
      } else if (!down.closed) {
        up?.close(NGHTTP2_CANCEL);
        down.close(NGHTTP2_CANCEL);
        finish(undefined, "upstream request timeout");
      }
    }, options.timeoutMs);
  }

  if (options.idleTimeoutMs !== undefined && options.idleTimeoutMs > 0) {
    down.setTimeout(options.idleTimeoutMs, () => {
      if (!responded) {
        fail(408, "stream timeout");
      } else if (!down.closed) {
        up?.close(NGHTTP2_CANCEL);
        down.close(NGHTTP2_CANCEL);
        finish(undefined, "stream timeout");
      }
    });
  }

  // Client → backend. Chunks are written to whichever attempt is current and
  // kept for a replay until response headers arrive.
  down.on("data", (chunk: Buffer) => {
    if (replay) {
      replayBytes += chunk.length;
      if (replayBytes > options.replayLimitBytes) {
        replay = undefined;
      } else {
        replay.push(chunk);
      }
    }
    const current = up;
    if (current && !current.destroyed && !current.write(chunk)) {
      down.pause();
      current.once("drain", () => {
        if (current === up) {
          down.resume();
        }
      });
    }
  });
  down.on("end", () => {
    downEnded = true;
    if (up && !up.destroyed) {
      up.end();
    }
  });
  // The client went away (cancel, deadline, connection loss): cancel upstream.
  down.on("close", () => {
    if (up && !up.closed) {
      up.close(NGHTTP2_CANCEL);
    }
    finish(undefined, done ? undefined : "client cancelled");
  });
  down.on("error", () => {
    // Reported through "close"; an unhandled "error" would crash the process.
  });
  down.on("wantTrailers", () => {
    down.sendTrailers(filterHeaders(upTrailers ?? {}));
  });

  const attempt = () => {
    const next = pool.pick(tried);
    if (!next) {
      fail(503, upstreamFailureMessage(attempts, lastReason));
      return;
    }
    backend = next;
    tried.add(next);
    attempts++;
    let stream: http2.ClientHttp2Stream;
    let session: http2.ClientHttp2Session;
    try {
      session = next.session();
      stream = session.request(
        {
          ...options.headers,
          ":method": "POST",
          ":path": options.path,
          ":scheme": next.address.tls ? "https" : "http",
          ":authority": next.authority,
        },
        { endStream: false },
      );
    } catch (err) {
      // The session closed between the pick and the request (GOAWAY race).
      lastReason = describeError(err);
      retryOrFail();
      return;
    }
    up = stream;
    if (down.isPaused()) {
      down.resume();
    }
    for (const chunk of replay ?? []) {
      stream.write(chunk);
    }
    if (downEnded) {
      stream.end();
    }

    stream.on("response", (headers, flags) => {
      if (stream !== up || down.closed) {
        return;
      }
      responded = true;
      replay = undefined;
      const out = filterHeaders(headers);
      if ((flags & NGHTTP2_FLAG_END_STREAM) !== 0) {
        // Trailers-only response (usually an error status): keep it so.
        down.respond(out, { endStream: true });
        finish(String(headers["grpc-status"] ?? ""), undefined);
        return;
      }
      down.respond(out, { waitForTrailers: true });
      // Ended here once the backend's trailers are in, or in "close" below:
      // a lost connection also ends the body, without trailers.
      stream.pipe(down, { end: false });
      stream.once("end", () => {
        if (upTrailers !== undefined && !down.writableEnded) {
          down.end();
        }
      });
    });
    stream.on("trailers", (trailers) => {
      upTrailers = trailers;
    });
    stream.on("error", (err) => {
      lastReason = describeError(err);
    });
    stream.on("close", () => {
      if (stream !== up) {
        return;
      }
      if (!responded) {
        if (done || down.closed) {
          return;
        }
        if (stream.rstCode === NGHTTP2_REFUSED_STREAM) {
          lastReason = "remote refused stream reset";
        } else if (!lastReason) {
          lastReason = `remote reset (code ${stream.rstCode})`;
        }
        retryOrFail();
        return;
      }
      if (
        upTrailers === undefined &&
        session.destroyed &&
        readsTrailers(options.headers) &&
        !down.closed &&
        !down.writableEnded
      ) {
        // The connection to the backend is gone (the backend crashed): end
        // the call with UNAVAILABLE in trailers, which a gRPC client can act
        // on, rather than a bare reset it would read as CANCELLED.
        const message = "upstream connection lost after response headers";
        upTrailers = {
          "grpc-status": "14",
          "grpc-message": encodeGrpcMessage(localReplyBody(503, message)),
        };
        down.end();
        finish("14", message);
        return;
      }
      if (stream.rstCode !== undefined && stream.rstCode !== NGHTTP2_NO_ERROR && !down.closed) {
        // The backend reset mid-response: pass the reset on.
        down.close(stream.rstCode);
        finish(undefined, `backend reset (code ${stream.rstCode})`);
        return;
      }
      if (!down.writableEnded && !down.closed) {
        down.end();
      }
      finish(String(upTrailers?.["grpc-status"] ?? ""), undefined);
    });
  };

  const retryOrFail = () => {
    if (attempts <= options.retries && replay !== undefined) {
      logger.debug({ backend: backend?.origin, reason: lastReason }, "retrying on another backend");
      attempt();
    } else {
      fail(503, upstreamFailureMessage(attempts, lastReason));
    }
  };

  attempt();
}

/** Envoy's text for a failed upstream, as ESPv2 returns it (spec §5.3). */
function upstreamFailureMessage(attempts: number, reason: string): string {
  return `upstream connect error or disconnect/reset before headers. ${
    attempts > 1 ? "retried and the latest " : ""
  }reset reason: ${reason || "connection failure"}`;
}

/** gRPC proper (not gRPC-Web or Connect): the caller reads HTTP/2 trailers. */
function readsTrailers(headers: http2.OutgoingHttpHeaders): boolean {
  return /^application\/grpc(?:$|[+;])/.test(String(headers["content-type"] ?? ""));
}

function describeError(err: unknown): string {
  // A stream pending on a session whose connection failed is cancelled with
  // the connection error as `cause`.
  const outer = err as NodeJS.ErrnoException & { cause?: unknown };
  const e = (
    outer.code === "ERR_HTTP2_STREAM_CANCEL" && outer.cause ? outer.cause : outer
  ) as NodeJS.ErrnoException;
  if (e.code === "ECONNREFUSED") {
    return "remote connection failure, transport failure reason: delayed connect error: 111";
  }
  if (e.code === "ECONNRESET") {
    return "connection termination";
  }
  return `${e.code ?? "error"}: ${e.message}`;
}

function filterHeaders(headers: http2.IncomingHttpHeaders): http2.OutgoingHttpHeaders {
  const out: http2.OutgoingHttpHeaders = {};
  for (const name of Object.keys(headers)) {
    if (name.startsWith(":") && name !== ":status") {
      continue;
    }
    if (droppedResponseHeaders.has(name)) {
      continue;
    }
    out[name] = headers[name];
  }
  return out;
}

/**
 * One HTTP/2 request through node:http2 with every outcome recorded
 * (status, grpc-status and message from headers or trailers, RST_STREAM
 * code, timing), for hostile-input tests that need more control than a gRPC
 * client gives: any headers (duplicates included), any body bytes, a reset
 * or no end at all.
 */
import * as http2 from "node:http2";

export interface H2Outcome {
  /** `:status`, when response headers came. */
  status: number | undefined;
  /** grpc-status from a trailers-only response or from trailers. */
  grpcStatus: string | undefined;
  /** grpc-message, percent-decoded. */
  grpcMessage: string | undefined;
  /** RST_STREAM code the stream closed with (0 for a normal close). */
  rstCode: number | undefined;
  /** Response body bytes received. */
  bodyBytes: number;
  /** The response body (kept up to 1 MiB). */
  body: Buffer;
  /**
   * Milliseconds until the response was complete (END_STREAM from the peer,
   * or a reset), or until timeout. With `ending: "open"` the request side may
   * still be open at that point; the stream is then cancelled.
   */
  durationMs: number;
  /** The stream was still open after `timeoutMs`. */
  timedOut: boolean;
  /** request() threw (node refused to send it); the error code. */
  refusedLocally: string | undefined;
}

export interface H2CallOptions {
  /** Request body, written at once. */
  body?: Uint8Array;
  /** After the body: "end" (default), "open" (never end), or "reset" (RST_STREAM CANCEL after `resetAfterMs`). */
  ending?: "end" | "open" | "reset";
  resetAfterMs?: number;
  /** Give up after this long; default 5000. */
  timeoutMs?: number;
  /** Reuse this session instead of connecting (it is not closed). */
  session?: http2.ClientHttp2Session;
}

/** Base gRPC request headers for `path`. */
export function grpcHeaders(path: string, extra: http2.OutgoingHttpHeaders = {}) {
  return {
    ":method": "POST",
    ":path": path,
    "content-type": "application/grpc",
    te: "trailers",
    ...extra,
  } satisfies http2.OutgoingHttpHeaders;
}

/** A session that may send repeated single-value headers (e.g. several `authorization`). */
export function connectLoose(address: string): http2.ClientHttp2Session {
  const session = http2.connect(`http://${address}`, {
    // node:http2 refuses to send a repeated `authorization` by default.
    strictSingleValueFields: false,
    maxSendHeaderBlockLength: 1 << 20,
  } as http2.SecureClientSessionOptions);
  session.on("error", () => {});
  return session;
}

/** A gRPC length-prefixed message. */
export function envelope(payload: Uint8Array, flags = 0, declaredLength?: number): Buffer {
  const out = Buffer.alloc(5 + payload.length);
  out[0] = flags;
  out.writeUInt32BE((declaredLength ?? payload.length) >>> 0, 1);
  out.set(payload, 5);
  return out;
}

/** `EchoRequest{message: "hi"}`, enveloped. */
export const echoHi = envelope(Uint8Array.from([0x0a, 0x02, 0x68, 0x69]));

/**
 * Sends one request. `headers` may be an object or a raw `[name, value, …]`
 * list (repeated names allowed).
 */
export function h2call(
  address: string,
  headers: http2.OutgoingHttpHeaders | string[],
  options: H2CallOptions = {},
): Promise<H2Outcome> {
  const session = options.session ?? connectLoose(address);
  const ownSession = options.session === undefined;
  const started = performance.now();
  const outcome: H2Outcome = {
    status: undefined,
    grpcStatus: undefined,
    grpcMessage: undefined,
    rstCode: undefined,
    bodyBytes: 0,
    body: Buffer.alloc(0),
    durationMs: 0,
    timedOut: false,
    refusedLocally: undefined,
  };
  const readGrpc = (h: http2.IncomingHttpHeaders) => {
    if (h["grpc-status"] !== undefined) {
      outcome.grpcStatus = String(h["grpc-status"]);
      const m = h["grpc-message"];
      outcome.grpcMessage = m === undefined ? undefined : decodeURIComponent(String(m));
    }
  };
  return new Promise((resolve) => {
    let finished = false;
    const done = () => {
      if (finished) {
        return;
      }
      finished = true;
      clearTimeout(timer);
      outcome.body = Buffer.concat(chunks);
      outcome.durationMs = performance.now() - started;
      if (ownSession) {
        session.destroy();
      }
      resolve(outcome);
    };
    const timer = setTimeout(() => {
      outcome.timedOut = true;
      done();
    }, options.timeoutMs ?? 5000);
    let stream: http2.ClientHttp2Stream;
    try {
      stream = session.request(headers as http2.OutgoingHttpHeaders, { endStream: false });
    } catch (err) {
      outcome.refusedLocally = (err as NodeJS.ErrnoException).code ?? String(err);
      done();
      return;
    }
    stream.on("response", (h) => {
      outcome.status = Number(h[":status"]);
      readGrpc(h);
    });
    stream.on("trailers", readGrpc);
    const chunks: Buffer[] = [];
    stream.on("data", (d: Buffer) => {
      outcome.bodyBytes += d.length;
      if (outcome.bodyBytes <= 2 ** 20) {
        chunks.push(d);
      }
    });
    stream.on("end", () => {
      // The peer ended its side: the answer is complete even if ours is not.
      if ((options.ending ?? "end") === "open") {
        outcome.rstCode = stream.rstCode;
        stream.close(http2.constants.NGHTTP2_CANCEL);
        done();
      }
    });
    stream.on("error", () => {});
    stream.on("close", () => {
      outcome.rstCode = stream.rstCode;
      done();
    });
    if (options.body) {
      stream.write(options.body);
    }
    const ending = options.ending ?? "end";
    if (ending === "end") {
      stream.end();
    } else if (ending === "reset") {
      setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), options.resetAfterMs ?? 0);
    }
  });
}

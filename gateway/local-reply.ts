/**
 * Replies the gateway itself generates (routing, JWT and backend failures),
 * in the wire format of API Gateway (ESPv2 on Envoy): for gRPC callers a
 * trailers-only response, HTTP 200 with `grpc-status` from Envoy's
 * HTTP→gRPC mapping and `grpc-message` holding ESPv2's JSON body
 * `{"code":<http>,"message":"<text>"}` (spec §2.10). Other callers get that
 * JSON body with the HTTP status.
 */
import type { ServerHttp2Stream } from "node:http2";

/** Envoy's `httpToGrpcStatus` (source/common/grpc/status.cc). */
export function grpcStatusForHttp(httpStatus: number): number {
  switch (httpStatus) {
    case 400:
      return 13; // INTERNAL
    case 401:
      return 16; // UNAUTHENTICATED
    case 403:
      return 7; // PERMISSION_DENIED
    case 404:
      return 12; // UNIMPLEMENTED
    case 429:
    case 502:
    case 503:
    case 504:
      return 14; // UNAVAILABLE
    default:
      return 2; // UNKNOWN
  }
}

/** The body ESPv2 renders for local replies (keys in this order). */
export function localReplyBody(httpStatus: number, message: string): string {
  return JSON.stringify({ code: httpStatus, message });
}

/**
 * Percent-encodes `grpc-message` as the gRPC HTTP/2 spec asks: bytes outside
 * printable ASCII and `%` itself. (Envoy's PercentEncoding::encode.)
 */
export function encodeGrpcMessage(message: string): string {
  let out = "";
  for (const byte of Buffer.from(message, "utf8")) {
    if (byte < 0x20 || byte > 0x7e || byte === 0x25) {
      out += `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
    } else {
      out += String.fromCharCode(byte);
    }
  }
  return out;
}

export function isGrpcRequest(contentType: string | undefined): boolean {
  return contentType?.startsWith("application/grpc") === true;
}

export interface LocalReply {
  httpStatus: number;
  message: string;
  /** Extra response headers, e.g. `www-authenticate`. */
  headers?: Record<string, string>;
}

/** Sends `reply` on `stream` unless the stream is already answered or gone. */
export function sendLocalReply(stream: ServerHttp2Stream, grpc: boolean, reply: LocalReply): void {
  if (stream.destroyed || stream.closed || stream.headersSent) {
    return;
  }
  const body = localReplyBody(reply.httpStatus, reply.message);
  if (grpc) {
    stream.respond(
      {
        ":status": 200,
        "content-type": "application/grpc",
        "grpc-status": String(grpcStatusForHttp(reply.httpStatus)),
        "grpc-message": encodeGrpcMessage(body),
        ...reply.headers,
      },
      { endStream: true },
    );
  } else {
    stream.respond({
      ":status": reply.httpStatus,
      "content-type": "application/json",
      ...reply.headers,
    });
    stream.end(`${body}\n`);
  }
  // Whatever the client still sends is not read; drain it so flow control
  // does not stall the connection.
  stream.resume();
}

/**
 * A bare node:http2 gRPC backend that records the headers it receives and
 * answers every call with one EchoResponse, or never answers ("hang"). For
 * asserting exactly what the gateway sends upstream.
 */
import * as http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { EchoResponseSchema } from "../../gen/echo/v1/echo_pb.ts";

export interface RawBackend {
  address: string;
  received: http2.IncomingHttpHeaders[];
  mode: "answer" | "hang";
  /** Trailers sent after the response message. */
  trailers: http2.OutgoingHttpHeaders;
  /** Resolves with the RST_STREAM code (or 0) of each stream as it closes, in order. */
  closedStreams: number[];
  close(): Promise<void>;
}

export async function startRawBackend(tls?: { key: Buffer; cert: Buffer }): Promise<RawBackend> {
  const received: http2.IncomingHttpHeaders[] = [];
  const server = tls
    ? http2.createSecureServer({ ...tls, ALPNProtocols: ["h2"] })
    : http2.createServer();
  const backend: RawBackend = {
    address: "",
    received,
    mode: "answer",
    trailers: { "grpc-status": "0" },
    closedStreams: [],
    close: () =>
      new Promise((resolve) => {
        server.close(() => resolve());
        for (const s of sessions) {
          s.destroy();
        }
      }),
  };
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (s) => {
    sessions.add(s);
    s.once("close", () => sessions.delete(s));
  });
  server.on("stream", (stream, headers) => {
    received.push(headers);
    stream.on("error", () => {});
    stream.on("close", () => backend.closedStreams.push(stream.rstCode ?? 0));
    stream.resume();
    if (backend.mode === "hang") {
      return;
    }
    stream.on("end", () => {
      if (stream.destroyed) {
        // The caller (the gateway) cancelled meanwhile.
        return;
      }
      const body = toBinary(EchoResponseSchema, create(EchoResponseSchema, { message: "raw" }));
      const frame = Buffer.alloc(5 + body.length);
      frame.writeUInt32BE(body.length, 1);
      frame.set(body, 5);
      stream.respond(
        { ":status": 200, "content-type": "application/grpc" },
        { waitForTrailers: true },
      );
      stream.once("wantTrailers", () => stream.sendTrailers(backend.trailers));
      stream.end(frame);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  backend.address = `127.0.0.1:${typeof address === "object" && address ? address.port : 0}`;
  return backend;
}

/** Response headers and trailers of a raw call, merged; pseudo-headers included. */
export interface RawResponse {
  [name: string]: unknown;
  /** True for a trailers-only response (END_STREAM on the first HEADERS frame). */
  endStreamOnHeaders: boolean;
}

/** Sends one raw gRPC request and returns the response headers and trailers merged. */
export function rawGrpcCall(
  address: string,
  path: string,
  headers: http2.OutgoingHttpHeaders = {},
  body: Uint8Array = new Uint8Array([0, 0, 0, 0, 0]),
): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://${address}`);
    session.on("error", reject);
    const stream = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
      ...headers,
    });
    let merged: http2.IncomingHttpHeaders = {};
    let endStreamOnHeaders = false;
    stream.on("response", (h, flags) => {
      merged = { ...h };
      endStreamOnHeaders = (flags & http2.constants.NGHTTP2_FLAG_END_STREAM) !== 0;
    });
    stream.on("trailers", (t) => {
      merged = { ...merged, ...t };
    });
    stream.on("close", () => {
      session.close();
      resolve({ ...merged, endStreamOnHeaders });
    });
    stream.on("error", reject);
    stream.resume();
    stream.end(body);
  });
}

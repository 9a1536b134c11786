/**
 * Ceiling: the smallest gRPC Echo node:http2 can serve. gRPC's framing
 * (5-byte message prefix, trailers) is written by hand, messages go through
 * protobuf-es like everywhere else; no routing beyond the path, no
 * compression, no deadlines, no interceptors. Nothing real should look like
 * this; it shows what the runtime itself costs.
 *
 *   PORT=9000 node bench/peers/raw-h2.ts
 */
import * as http2 from "node:http2";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  EchoRequestSchema,
  EchoResponseSchema,
  EchoServerStreamRequestSchema,
  EchoServerStreamResponseSchema,
} from "../../gen/echo/v1/echo_pb.ts";
import {
  announce,
  echoResponse,
  exitOnSignal,
  maxStreamCount,
  peerPort,
  streamResponse,
} from "./common.ts";

const echoPath = "/echo.v1.EchoService/Echo";
const serverStreamPath = "/echo.v1.EchoService/EchoServerStream";

/** One length-prefixed, uncompressed gRPC message. */
function frame(payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + payload.length);
  out[0] = 0;
  out.writeUInt32BE(payload.length, 1);
  out.set(payload, 5);
  return out;
}

/** The single message of a unary request body, or undefined when malformed. */
function unframe(body: Buffer): Uint8Array | undefined {
  if (body.length < 5 || body[0] !== 0) {
    return undefined;
  }
  const length = body.readUInt32BE(1);
  return body.length === 5 + length ? body.subarray(5) : undefined;
}

function trailersOnly(stream: http2.ServerHttp2Stream, status: number, message: string): void {
  stream.respond(
    {
      ":status": 200,
      "content-type": "application/grpc",
      "grpc-status": String(status),
      "grpc-message": encodeURIComponent(message),
    },
    { endStream: true },
  );
}

const server = http2.createServer();
server.on("stream", (stream, headers) => {
  stream.on("error", () => {});
  const path = headers[":path"];
  if (path !== echoPath && path !== serverStreamPath) {
    trailersOnly(stream, 12, `unknown method ${path}`);
    return;
  }
  const chunks: Buffer[] = [];
  stream.on("data", (chunk: Buffer) => chunks.push(chunk));
  stream.on("end", () => {
    const payload = unframe(chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks));
    if (payload === undefined) {
      trailersOnly(stream, 13, "malformed request");
      return;
    }
    if (path === echoPath) {
      const req = fromBinary(EchoRequestSchema, payload);
      const out = frame(toBinary(EchoResponseSchema, echoResponse(req.message)));
      stream.respond(
        { ":status": 200, "content-type": "application/grpc" },
        { waitForTrailers: true },
      );
      stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(out);
      return;
    }
    const req = fromBinary(EchoServerStreamRequestSchema, payload);
    if (req.count > maxStreamCount) {
      trailersOnly(stream, 3, `count ${req.count} exceeds the maximum of ${maxStreamCount}`);
      return;
    }
    stream.respond(
      { ":status": 200, "content-type": "application/grpc" },
      { waitForTrailers: true },
    );
    stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
    let index = 0;
    const writeSome = () => {
      while (index < req.count) {
        const out = frame(
          toBinary(EchoServerStreamResponseSchema, streamResponse(req.message, index++)),
        );
        if (!stream.write(out)) {
          stream.once("drain", writeSome);
          return;
        }
      }
      stream.end();
    };
    writeSome();
  });
});

server.listen(peerPort(), "127.0.0.1", () => {
  const address = server.address();
  announce("raw-h2", typeof address === "object" && address ? address.port : 0);
});
exitOnSignal(() => server.close());

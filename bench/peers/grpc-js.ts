/**
 * Reference: @grpc/grpc-js serving the same proto. Messages are
 * (de)serialised with protobuf-es, as in every other peer, so the comparison
 * is between transports, not between protobuf libraries.
 *
 *   PORT=9000 node bench/peers/grpc-js.ts
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  type EchoRequest,
  EchoRequestSchema,
  type EchoResponse,
  EchoResponseSchema,
  type EchoServerStreamRequest,
  EchoServerStreamRequestSchema,
  type EchoServerStreamResponse,
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

const definition: grpc.ServiceDefinition = {
  echo: {
    path: "/echo.v1.EchoService/Echo",
    requestStream: false,
    responseStream: false,
    requestDeserialize: (b: Buffer) => fromBinary(EchoRequestSchema, b),
    requestSerialize: (m: EchoRequest) => Buffer.from(toBinary(EchoRequestSchema, m)),
    responseDeserialize: (b: Buffer) => fromBinary(EchoResponseSchema, b),
    responseSerialize: (m: EchoResponse) => Buffer.from(toBinary(EchoResponseSchema, m)),
  },
  echoServerStream: {
    path: "/echo.v1.EchoService/EchoServerStream",
    requestStream: false,
    responseStream: true,
    requestDeserialize: (b: Buffer) => fromBinary(EchoServerStreamRequestSchema, b),
    requestSerialize: (m: EchoServerStreamRequest) =>
      Buffer.from(toBinary(EchoServerStreamRequestSchema, m)),
    responseDeserialize: (b: Buffer) => fromBinary(EchoServerStreamResponseSchema, b),
    responseSerialize: (m: EchoServerStreamResponse) =>
      Buffer.from(toBinary(EchoServerStreamResponseSchema, m)),
  },
};

const implementation: grpc.UntypedServiceImplementation = {
  echo(
    call: grpc.ServerUnaryCall<EchoRequest, EchoResponse>,
    callback: grpc.sendUnaryData<EchoResponse>,
  ) {
    callback(null, echoResponse(call.request.message));
  },
  echoServerStream(
    call: grpc.ServerWritableStream<EchoServerStreamRequest, EchoServerStreamResponse>,
  ) {
    const { message, count } = call.request;
    if (count > maxStreamCount) {
      call.destroy(
        Object.assign(new Error(`count ${count} exceeds the maximum`), {
          code: grpc.status.INVALID_ARGUMENT,
        }),
      );
      return;
    }
    let index = 0;
    const writeSome = () => {
      while (index < count) {
        if (!call.write(streamResponse(message, index++))) {
          call.once("drain", writeSome);
          return;
        }
      }
      call.end();
    };
    writeSome();
  },
};

const server = new grpc.Server();
server.addService(definition, implementation);
server.bindAsync(
  `127.0.0.1:${peerPort()}`,
  grpc.ServerCredentials.createInsecure(),
  (err, port) => {
    if (err) {
      process.stderr.write(`${err.message}\n`);
      process.exit(1);
    }
    announce("grpc-js", port);
  },
);
exitOnSignal(() => server.forceShutdown());

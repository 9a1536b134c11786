/**
 * Reference: Connect-ES on bare node:http2 (`connectNodeAdapter`), no
 * Fastify. Same Connect version, same protocol handlers, no interceptors: the
 * difference to the project's server is the mounting layer (and our
 * interceptors).
 *
 *   PORT=9000 node bench/peers/connect-node.ts
 */
import * as http2 from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { EchoService } from "../../gen/echo/v1/echo_pb.ts";
import {
  announce,
  echoResponse,
  exitOnSignal,
  maxStreamCount,
  peerPort,
  streamResponse,
} from "./common.ts";

const handler = connectNodeAdapter({
  routes(router) {
    router.service(EchoService, {
      echo: (req) => echoResponse(req.message),
      async *echoServerStream(req) {
        if (req.count > maxStreamCount) {
          throw new ConnectError(`count ${req.count} exceeds the maximum`, Code.InvalidArgument);
        }
        for (let index = 0; index < req.count; index++) {
          yield streamResponse(req.message, index);
        }
      },
    });
  },
});

const server = http2.createServer(handler);
server.listen(peerPort(), "127.0.0.1", () => {
  const address = server.address();
  announce("connect-node", typeof address === "object" && address ? address.port : 0);
});
exitOnSignal(() => server.close());

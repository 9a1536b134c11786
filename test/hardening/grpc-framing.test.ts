/**
 * Hostile gRPC framing at both front doors (the gateway, and a server
 * directly): every malformed request gets a defined grpc-status, the
 * gateway passes the server's answer through unchanged, and both keep
 * serving afterwards.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { backendAudience, type Chain, gatewayEmail, startChain } from "../helpers/chain.ts";
import { echoHi, envelope, grpcHeaders, type H2Outcome, h2call } from "../helpers/h2-call.ts";

const echoPath = "/echo.v1.EchoService/Echo";
const hi = Uint8Array.from([0x0a, 0x02, 0x68, 0x69]);

interface Case {
  desc: string;
  /** Default Echo (unary). */
  path?: string;
  headers?: Record<string, string>;
  body: Uint8Array;
  ending?: "end" | "open";
  /** Expected grpc-status and a pattern of grpc-message. */
  grpcStatus: string;
  message?: RegExp;
}

const cases: Case[] = [
  {
    desc: "a frame cut short (length 4, 1 byte sent)",
    body: envelope(hi).subarray(0, 6),
    grpcStatus: "3",
    message: /incomplete envelope/,
  },
  {
    desc: "a length prefix cut short (3 of 5 bytes)",
    body: Uint8Array.from([0, 0, 0]),
    grpcStatus: "3",
    message: /incomplete envelope/,
  },
  {
    desc: "a length prefix of 4 GiB − 1, stream left open",
    body: envelope(hi, 0, 0xffffffff),
    ending: "open",
    grpcStatus: "8",
    message: /message size 4294967295 is larger than configured readMaxBytes/,
  },
  {
    desc: "a length prefix of 4 GiB − 1 on a client stream, 1 MiB following",
    path: "/echo.v1.EchoService/EchoClientStream",
    body: Buffer.concat([envelope(hi, 0, 0xffffffff), Buffer.alloc(2 ** 20)]),
    ending: "open",
    grpcStatus: "8",
    message: /message size 4294967295 is larger than configured readMaxBytes/,
  },
  {
    desc: "the compressed flag without grpc-encoding",
    body: envelope(hi, 1),
    grpcStatus: "13",
    message: /compressed envelope/,
  },
  {
    desc: "an unknown grpc-encoding",
    headers: { "grpc-encoding": "snappy-x" },
    body: envelope(hi, 1),
    grpcStatus: "12",
    message: /unknown compression "snappy-x"/,
  },
  {
    desc: "gzip announced, garbage sent",
    headers: { "grpc-encoding": "gzip" },
    body: envelope(Buffer.from("definitely not gzip"), 1),
    grpcStatus: "3",
    message: /decompression failed/,
  },
  {
    desc: "garbage protobuf",
    body: envelope(Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0x0f])),
    grpcStatus: "13",
    message: /parse binary/,
  },
  {
    desc: "a wrong wire type for field 1",
    body: envelope(Uint8Array.from([0x08, 0x96, 0x01])),
    grpcStatus: "13",
  },
  {
    desc: "a grpc-timeout beyond node's timers (99999999H)",
    headers: { "grpc-timeout": "99999999H" },
    body: echoHi,
    grpcStatus: "3",
    message: /timeout 359999996400000ms must be <= 2147483647/,
  },
  {
    desc: "a malformed grpc-timeout",
    headers: { "grpc-timeout": "soon" },
    body: echoHi,
    grpcStatus: "3",
    message: /invalid grpc timeout value/,
  },
  {
    desc: "a grpc-timeout of 500 hours (served)",
    headers: { "grpc-timeout": "500H" },
    body: echoHi,
    grpcStatus: "0",
  },
  {
    desc: "two messages for a unary method",
    body: Buffer.concat([echoHi, echoHi]),
    grpcStatus: "12",
    message: /extra input message/,
  },
  {
    desc: "no message at all for a unary method",
    body: new Uint8Array(0),
    grpcStatus: "12",
    message: /missing input message/,
  },
];

describe("hostile gRPC framing at the gateway and the server", () => {
  let chain: Chain;
  let gatewayAuth: string;
  let serverAuth: string;
  before(async () => {
    chain = await startChain({ servers: 1 });
    gatewayAuth = `Bearer ${await chain.clientToken()}`;
    serverAuth = `Bearer ${await chain.issuer.mintIdToken(gatewayEmail, backendAudience)}`;
  });
  after(() => chain.close());

  const call = (door: "gateway" | "server", c: Case): Promise<H2Outcome> =>
    h2call(
      door === "gateway" ? chain.address : (chain.servers[0]?.address as string),
      grpcHeaders(c.path ?? echoPath, {
        authorization: door === "gateway" ? gatewayAuth : serverAuth,
        ...c.headers,
      }),
      { body: c.body, ending: c.ending ?? "end", timeoutMs: 3000 },
    );

  for (const c of cases) {
    it(`answers ${c.desc} with grpc-status ${c.grpcStatus}, the same at both doors`, async () => {
      const rssBefore = process.memoryUsage.rss();
      const server = await call("server", c);
      const gateway = await call("gateway", c);
      for (const [door, o] of [
        ["server", server],
        ["gateway", gateway],
      ] as const) {
        assert.equal(o.timedOut, false, `${door} answered`);
        assert.equal(o.status, 200, `${door} :status`);
        assert.equal(o.grpcStatus, c.grpcStatus, `${door}: ${o.grpcMessage}`);
        if (c.message) {
          assert.match(o.grpcMessage ?? "", c.message, door);
        }
      }
      assert.equal(gateway.grpcMessage, server.grpcMessage, "passed through unchanged");
      if (c.ending === "open") {
        // Answered while the request was still open: nothing was buffered
        // toward 4 GiB.
        assert.ok(server.durationMs < 2000 && gateway.durationMs < 2000);
        assert.ok(process.memoryUsage.rss() - rssBefore < 64 * 2 ** 20, "no large allocation");
      }
    });
  }

  it("keeps serving at both doors afterwards", async () => {
    const { client } = await chain.client();
    assert.equal((await client.echo({ message: "still here" })).message, "still here");
    const direct = await h2call(
      chain.servers[0]?.address as string,
      grpcHeaders(echoPath, { authorization: serverAuth }),
      { body: echoHi },
    );
    assert.equal(direct.grpcStatus, "0");
  });
});

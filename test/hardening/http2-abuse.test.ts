/**
 * HTTP/2 abuse at both front doors: oversized header blocks, thousands of
 * streams on one connection, streams reset mid-message, requests without
 * content-type or te, idle connections. Neither process may crash or wedge,
 * and each case gets a defined answer (see docs/reliability.md).
 */
import assert from "node:assert/strict";
import { connect } from "node:net";
import { after, before, describe, it } from "node:test";
import { backendAudience, type Chain, gatewayEmail, startChain } from "../helpers/chain.ts";
import {
  connectLoose,
  echoHi,
  envelope,
  grpcHeaders,
  type H2Outcome,
  h2call,
} from "../helpers/h2-call.ts";
import {
  clientPreface,
  flag,
  frame,
  frameType,
  grpcRequestHeaders,
  h2Error,
  headerBlock,
  rawH2Connect,
  rstStreamFrame,
} from "../helpers/h2-frames.ts";

const echoPath = "/echo.v1.EchoService/Echo";
const clientStreamPath = "/echo.v1.EchoService/EchoClientStream";

function tally(outcomes: readonly H2Outcome[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const o of outcomes) {
    const key = o.timedOut
      ? "timeout"
      : o.grpcStatus !== undefined
        ? `grpc-${o.grpcStatus}`
        : `rst-${o.rstCode}`;
    out[key] = (out[key] ?? 0) + 1;
  }
  return out;
}

describe("HTTP/2 abuse at the gateway and the server", () => {
  let chain: Chain;
  let gatewayAuth: string;
  let serverAuth: string;
  let serverAddress: string;
  before(async () => {
    chain = await startChain({ servers: 1 });
    gatewayAuth = `Bearer ${await chain.clientToken()}`;
    serverAuth = `Bearer ${await chain.issuer.mintIdToken(gatewayEmail, backendAudience)}`;
    serverAddress = chain.servers[0]?.address as string;
  });
  after(() => chain.close());

  const assertServing = async () => {
    const { client } = await chain.client();
    assert.equal((await client.echo({ message: "alive" })).message, "alive");
    const direct = await h2call(
      serverAddress,
      grpcHeaders(echoPath, { authorization: serverAuth }),
      {
        body: echoHi,
      },
    );
    assert.equal(direct.grpcStatus, "0", "the server answers directly too");
  };

  describe("header blocks", () => {
    it("gateway: resets a request with over 60 KB of headers (ENHANCE_YOUR_CALM), before and after SETTINGS are acknowledged", async () => {
      const big = { authorization: gatewayAuth, "x-big": "a".repeat(61 * 1024) };
      // First request of a connection: node:http2 has not applied its own
      // limit yet (the client did not acknowledge the SETTINGS).
      const first = await h2call(chain.address, grpcHeaders(echoPath, big), { body: echoHi });
      assert.equal(first.rstCode, h2Error.enhanceYourCalm);
      assert.equal(first.status, undefined, "no response headers");
      // On a connection in use.
      const session = connectLoose(chain.address);
      try {
        const ok = await h2call(
          chain.address,
          grpcHeaders(echoPath, { authorization: gatewayAuth }),
          { body: echoHi, session },
        );
        assert.equal(ok.grpcStatus, "0");
        const later = await h2call(chain.address, grpcHeaders(echoPath, big), {
          body: echoHi,
          session,
        });
        assert.equal(later.rstCode, h2Error.enhanceYourCalm);
      } finally {
        session.destroy();
      }
      // Just under the limit passes, although the gateway adds its own headers.
      const under = await h2call(
        chain.address,
        grpcHeaders(echoPath, { authorization: gatewayAuth, "x-big": "a".repeat(58 * 1024) }),
        { body: echoHi },
      );
      assert.equal(under.grpcStatus, "0");
    });

    it("gateway: resets 90 KB of headers in CONTINUATION frames from a client that never acknowledges SETTINGS", async () => {
      const conn = await rawH2Connect(chain.gateway.port, { ackSettings: false });
      try {
        const block = headerBlock(
          grpcRequestHeaders(echoPath, chain.address, [
            ["authorization", gatewayAuth],
            ["x-a", "a".repeat(30_000)],
            ["x-b", "b".repeat(30_000)],
            ["x-c", "c".repeat(30_000)],
          ]),
        );
        const chunks: Buffer[] = [];
        for (let i = 0; i < block.length; i += 16_384) {
          chunks.push(block.subarray(i, i + 16_384));
        }
        for (const [i, chunk] of chunks.entries()) {
          conn.write(
            frame(
              i === 0 ? frameType.headers : frameType.continuation,
              i === chunks.length - 1 ? flag.endHeaders : 0,
              1,
              chunk,
            ),
          );
        }
        conn.write(frame(frameType.data, flag.endStream, 1, echoHi));
        const answer = await conn.waitForFrame((f) => f.streamId === 1, 3000);
        assert.equal(answer?.type, frameType.rstStream);
        assert.equal(conn.resetCode(1), h2Error.enhanceYourCalm);
      } finally {
        conn.destroy();
      }
    });

    it("gateway: resets a request with more than 100 header fields; 90 pass through to the backend", async () => {
      const fields = (n: number) =>
        Object.fromEntries(Array.from({ length: n }, (_, i) => [`x-f${i}`, "v"]));
      const over = await h2call(
        chain.address,
        grpcHeaders(echoPath, { authorization: gatewayAuth, ...fields(101) }),
        { body: echoHi },
      );
      assert.equal(over.rstCode, h2Error.enhanceYourCalm);
      const under = await h2call(
        chain.address,
        grpcHeaders(echoPath, { authorization: gatewayAuth, ...fields(90) }),
        { body: echoHi },
      );
      assert.equal(under.grpcStatus, "0", "not turned into UNAVAILABLE by the backend's own limit");
    });

    it("server: serves 100 KB of headers in two fields, resets 2,000 fields (ENHANCE_YOUR_CALM) and a 70 KB field (COMPRESSION_ERROR)", async () => {
      const call = (extra: Record<string, string>) =>
        h2call(serverAddress, grpcHeaders(echoPath, { authorization: serverAuth, ...extra }), {
          body: echoHi,
        });
      assert.equal(
        (await call({ "x-a": "a".repeat(50_000), "x-b": "b".repeat(50_000) })).grpcStatus,
        "0",
      );
      const many = await call(
        Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [`x-f${i}`, "v"])),
      );
      assert.equal(many.rstCode, h2Error.enhanceYourCalm);
      // Characters Huffman coding cannot shrink below nghttp2's 64 KB per field.
      const noisy = Buffer.from(
        Array.from({ length: 70_000 }, (_, i) => 33 + ((i * 7919) % 90)),
      ).toString("latin1");
      assert.equal((await call({ "x-noisy": noisy })).rstCode, h2Error.compressionError);
      await assertServing();
    });
  });

  describe("many streams", () => {
    it("queues 3,000 concurrent calls of one well-behaved connection at the gateway (100 at a time); the server takes them all", async () => {
      for (const [address, auth] of [
        [chain.address, gatewayAuth],
        [serverAddress, serverAuth],
      ] as const) {
        const session = connectLoose(address);
        try {
          await new Promise((resolve) => session.once("remoteSettings", resolve));
          const limit = session.remoteSettings.maxConcurrentStreams;
          assert.equal(limit, address === chain.address ? 100 : 2 ** 32 - 1);
          const outcomes = await Promise.all(
            Array.from({ length: 3000 }, () =>
              h2call(address, grpcHeaders(echoPath, { authorization: auth }), {
                body: echoHi,
                session,
                timeoutMs: 30_000,
              }),
            ),
          );
          assert.deepEqual(tally(outcomes), { "grpc-0": 3000 });
        } finally {
          session.destroy();
        }
      }
    });

    it("gateway: closes the connection of a client that opens more than 100 streams (GOAWAY PROTOCOL_ERROR)", async () => {
      for (const [port, auth, limit] of [[chain.gateway.port, gatewayAuth, 100]] as const) {
        const conn = await rawH2Connect(port);
        try {
          await conn.waitForFrame((f) => f.type === frameType.settings && f.flags === 0, 2000);
          // Let our SETTINGS ACK arrive, so the limit is in force.
          await new Promise((r) => setTimeout(r, 100));
          const block = headerBlock(
            grpcRequestHeaders(clientStreamPath, "x", [["authorization", auth]]),
          );
          const frames: Buffer[] = [];
          for (let i = 0; i < limit + 50; i++) {
            frames.push(frame(frameType.headers, flag.endHeaders, 1 + 2 * i, block));
          }
          conn.write(Buffer.concat(frames));
          assert.equal(await conn.waitForClose(3000), true, `port ${port} closed the connection`);
          assert.equal(conn.goawayCode(), h2Error.protocolError);
        } finally {
          conn.destroy();
        }
      }
      await assertServing();
    });

    it("carries 5,000 concurrent calls from 50 connections, with 8 KB of headers each, without failing a bystander", async () => {
      const { client } = await chain.client();
      let bystanderOk = 0;
      let stop = false;
      const bystander = (async () => {
        while (!stop) {
          await client.echo({ message: "bystander" });
          bystanderOk++;
        }
      })();
      const sessions = Array.from({ length: 50 }, () => connectLoose(chain.address));
      try {
        const outcomes = await Promise.all(
          Array.from({ length: 5000 }, (_, i) =>
            h2call(
              chain.address,
              grpcHeaders(echoPath, { authorization: gatewayAuth, "x-pad": "p".repeat(8192) }),
              { body: echoHi, session: sessions[i % 50], timeoutMs: 60_000 },
            ),
          ),
        );
        assert.deepEqual(tally(outcomes), { "grpc-0": 5000 });
      } finally {
        stop = true;
        for (const s of sessions) {
          s.destroy();
        }
      }
      await bystander;
      assert.ok(bystanderOk > 0);
    });

    it("cancels upstream work of 1,000 streams reset mid-message, and keeps serving", async () => {
      const gatewayLogsBefore = chain.gatewayLogs.length;
      const serverLogsBefore = chain.servers[0]?.logs.length ?? 0;
      const sessions = Array.from({ length: 10 }, () => connectLoose(chain.address));
      try {
        const outcomes = await Promise.all(
          Array.from({ length: 1000 }, (_, i) =>
            h2call(chain.address, grpcHeaders(clientStreamPath, { authorization: gatewayAuth }), {
              body: envelope(Uint8Array.from([0x0a, 0x02, 0x68, 0x69])).subarray(0, 6),
              ending: "reset",
              // Some before the gateway forwarded them, most after.
              resetAfterMs: i % 5 === 0 ? 0 : 100 + (i % 100),
              session: sessions[i % 10],
            }),
          ),
        );
        assert.deepEqual(tally(outcomes), { [`rst-${h2Error.cancel}`]: 1000 });
      } finally {
        for (const s of sessions) {
          s.destroy();
        }
      }
      await assertServing();
      // Every stream that reached a backend was cancelled there: none is left
      // running on the server (its access log has one line per finished RPC).
      await new Promise((r) => setTimeout(r, 200));
      const forwarded = chain.gatewayLogs
        .slice(gatewayLogsBefore)
        .filter(
          (l) => l["rpc"] === "echo.v1.EchoService.EchoClientStream" && l["backend"] !== undefined,
        );
      assert.ok(
        forwarded.every((l) => l["reason"] === "client cancelled"),
        "the gateway logged each forwarded stream as cancelled by the client",
      );
      const atServer = (chain.servers[0]?.logs ?? [])
        .slice(serverLogsBefore)
        .filter((l) => l["rpc"] === "echo.v1.EchoService/EchoClientStream");
      assert.equal(atServer.length, forwarded.length, "each forwarded stream ended at the server");
      assert.ok(forwarded.length > 500, `${forwarded.length} reached a backend`);
      // Ended without a result: cancelled, aborted, or (when the reset
      // raced the half message) an incomplete envelope.
      assert.ok(
        atServer.every((l) => l["code"] !== "ok"),
        `no stream completed: ${JSON.stringify([...new Set(atServer.map((l) => l["code"]))])}`,
      );
    });

    it("closes a rapid-reset flood (5,000 HEADERS + RST_STREAM) with GOAWAY, and keeps serving", async () => {
      for (const [port, auth] of [
        [chain.gateway.port, gatewayAuth],
        [chain.servers[0]?.port as number, serverAuth],
      ] as const) {
        const conn = await rawH2Connect(port);
        try {
          const block = headerBlock(grpcRequestHeaders(echoPath, "x", [["authorization", auth]]));
          const frames: Buffer[] = [];
          for (let i = 0; i < 5000; i++) {
            frames.push(frame(frameType.headers, flag.endHeaders, 1 + 2 * i, block));
            frames.push(rstStreamFrame(1 + 2 * i, h2Error.cancel));
          }
          conn.write(Buffer.concat(frames));
          assert.equal(await conn.waitForClose(5000), true);
          assert.notEqual(conn.goawayCode(), undefined, "GOAWAY before the close");
        } finally {
          conn.destroy();
        }
      }
      await assertServing();
    });
  });

  describe("content-type and te", () => {
    const cases: {
      desc: string;
      headers: Record<string, string | undefined>;
      expect: Partial<H2Outcome>;
    }[] = [
      {
        desc: "no content-type → HTTP 415 from the server (passed through)",
        headers: { "content-type": undefined },
        expect: { status: 415 },
      },
      {
        desc: "content-type text/plain → HTTP 415",
        headers: { "content-type": "text/plain" },
        expect: { status: 415 },
      },
      {
        desc: "no te → served (te is optional for Connect's gRPC handler)",
        headers: { te: undefined },
        expect: { status: 200, grpcStatus: "0" },
      },
    ];
    for (const tc of cases) {
      it(tc.desc, async () => {
        for (const [address, auth] of [
          [chain.address, gatewayAuth],
          [serverAddress, serverAuth],
        ] as const) {
          const headers: Record<string, string> = {};
          for (const [k, v] of Object.entries(
            grpcHeaders(echoPath, { authorization: auth, ...tc.headers }),
          )) {
            if (v !== undefined) {
              headers[k] = String(v);
            }
          }
          const o = await h2call(address, headers, { body: echoHi });
          for (const [k, v] of Object.entries(tc.expect)) {
            assert.equal(o[k as keyof H2Outcome], v, `${address} ${k}`);
          }
        }
      });
    }

    it("te other than trailers → RST_STREAM PROTOCOL_ERROR (nghttp2), at both doors", async () => {
      for (const [port, auth] of [
        [chain.gateway.port, gatewayAuth],
        [chain.servers[0]?.port as number, serverAuth],
      ] as const) {
        const conn = await rawH2Connect(port);
        try {
          const headers = grpcRequestHeaders(echoPath, "x", [["authorization", auth]]).map(
            ([k, v]) => [k, k === "te" ? "gzip" : v] as [string, string],
          );
          conn.write(
            frame(frameType.headers, flag.endHeaders | flag.endStream, 1, headerBlock(headers)),
          );
          await conn.waitForFrame((f) => f.streamId === 1, 2000);
          assert.equal(conn.resetCode(1), h2Error.protocolError);
        } finally {
          conn.destroy();
        }
      }
    });
  });
});

describe("idle connections at the gateway and the server", () => {
  let chain: Chain;
  before(async () => {
    chain = await startChain({ servers: 1, idleSessionTimeoutMs: 400 });
  });
  after(() => chain.close());

  it("closes silent TCP connections, bare prefaces, idle sessions and sessions held by a silent stream", async () => {
    const gatewayAuth = `Bearer ${await chain.clientToken()}`;
    const serverAuth = `Bearer ${await chain.issuer.mintIdToken(gatewayEmail, backendAudience)}`;
    const started = performance.now();
    const closedAfter = new Map<string, number>();
    const watchers: Promise<void>[] = [];
    const watch = (name: string, closed: Promise<unknown>) =>
      watchers.push(
        closed.then(() => {
          closedAfter.set(name, performance.now() - started);
        }),
      );
    for (const [door, port, auth] of [
      ["gateway", chain.gateway.port, gatewayAuth],
      ["server", chain.servers[0]?.port as number, serverAuth],
    ] as const) {
      // Reads (to see the server's FIN) but never sends a byte.
      const silent = connect(port, "127.0.0.1");
      silent.on("error", () => {});
      silent.resume();
      watch(`${door}: TCP without a byte`, new Promise((r) => silent.once("close", r)));
      const preface = connect(port, "127.0.0.1", () => preface.write(clientPreface));
      preface.on("error", () => {});
      preface.resume();
      watch(`${door}: preface only`, new Promise((r) => preface.once("close", r)));
      const idle = await rawH2Connect(port);
      watch(`${door}: idle session`, idle.waitForClose(10_000));
      // A request answered at once (unknown method) whose client never ends it.
      const halfOpen = await rawH2Connect(port);
      halfOpen.write(
        frame(
          frameType.headers,
          flag.endHeaders,
          1,
          headerBlock(grpcRequestHeaders("/no.Such/Method", "x", [["authorization", auth]])),
        ),
      );
      watch(`${door}: answered stream left open`, halfOpen.waitForClose(10_000));
      // A client stream that sends half a message and then nothing.
      const silentStream = await rawH2Connect(port);
      silentStream.write(
        frame(
          frameType.headers,
          flag.endHeaders,
          1,
          headerBlock(grpcRequestHeaders(clientStreamPath, "x", [["authorization", auth]])),
        ),
      );
      silentStream.write(frame(frameType.data, 0, 1, echoHi.subarray(0, 3)));
      watch(`${door}: silent stream`, silentStream.waitForClose(10_000));
    }
    await Promise.all(watchers);
    for (const [name, ms] of closedAfter) {
      // Idle 400 ms, then GOAWAY; streams still open are cut 400 ms later.
      assert.ok(ms < 3000, `${name} closed after ${Math.round(ms)} ms`);
    }
    assert.equal(closedAfter.size, 10);
  });
});

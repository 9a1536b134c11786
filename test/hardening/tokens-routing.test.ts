/**
 * Hostile tokens and routing tricks: oversized and deeply nested JWTs,
 * repeated authorization headers, tokens in several locations, paths that
 * try to escape the route table, and an :authority naming another host.
 * Each gets a defined answer, and nothing reaches a backend that the
 * gateway did not vouch for.
 */
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { after, before, describe, it } from "node:test";
import { fromBinary } from "@bufbuild/protobuf";
import { EchoResponseSchema } from "../../gen/echo/v1/echo_pb.ts";
import {
  backendAudience,
  type Chain,
  clientEmail,
  defaultApiConfig,
  gatewayAudience,
  gatewayEmail,
  startChain,
} from "../helpers/chain.ts";
import { echoHi, grpcHeaders, type H2Outcome, h2call } from "../helpers/h2-call.ts";
import { type RawBackend, startRawBackend } from "../helpers/raw-backend.ts";

const echoPath = "/echo.v1.EchoService/Echo";
const otherEmail = "other-sa@echo-test.iam.gserviceaccount.com";

/** A token with the real header and a payload of our choosing, signature of another token. */
function forge(real: string, payloadJson: string): string {
  const [h, , s] = real.split(".");
  return `${h}.${Buffer.from(payloadJson).toString("base64url")}.${s}`;
}

function nested(depth: number): string {
  return "[".repeat(depth) + "]".repeat(depth);
}

/** Raw header list with `authorization` repeated. */
function withAuthorizations(path: string, values: string[]): string[] {
  return [
    ":method",
    "POST",
    ":path",
    path,
    "content-type",
    "application/grpc",
    "te",
    "trailers",
    ...values.flatMap((v) => ["authorization", v]),
  ];
}

/** One Echo call; `endUser` is the end user the server reported, when it answered OK. */
async function echoVia(
  address: string,
  headers: Parameters<typeof h2call>[1],
): Promise<H2Outcome & { endUser: string | undefined }> {
  const o = await h2call(address, headers, { body: echoHi });
  const endUser =
    o.grpcStatus === "0" && o.body.length > 5
      ? fromBinary(EchoResponseSchema, o.body.subarray(5)).caller?.endUser?.email
      : undefined;
  return { ...o, endUser };
}

describe("hostile tokens at the gateway and the server", () => {
  let chain: Chain;
  let token: string;
  let serverAddress: string;
  let serverAuth: string;
  before(async () => {
    chain = await startChain({ servers: 1 });
    token = await chain.clientToken();
    serverAddress = chain.servers[0]?.address as string;
    serverAuth = `Bearer ${await chain.issuer.mintIdToken(gatewayEmail, backendAudience)}`;
  });
  after(() => chain.close());

  const gw = (extra: Record<string, string>, path = echoPath) =>
    echoVia(chain.address, grpcHeaders(path, extra));

  it("accepts a validly signed JWT over 16 KB (20 KB and 40 KB), end to end", async () => {
    for (const kb of [20, 40]) {
      const big = await chain.clientToken({ pad: "x".repeat(kb * 1024) });
      assert.ok(big.length > kb * 1024);
      const o = await gw({ authorization: `Bearer ${big}` });
      assert.equal(o.grpcStatus, "0", `${kb} KB: ${o.grpcMessage}`);
      assert.equal(o.endUser, clientEmail, "the server read the forwarded payload");
    }
  });

  it("rejects a forged 20 KB JWT at the gateway (401) and a 40 KB one at the server (UNAUTHENTICATED)", async () => {
    const payload = JSON.stringify({
      iss: "https://accounts.google.com",
      aud: gatewayAudience,
      email: "mallory@evil.test",
      exp: Math.floor(Date.now() / 1000) + 600,
      pad: "x".repeat(20 * 1024),
    });
    const o = await gw({ authorization: `Bearer ${forge(token, payload)}` });
    assert.equal(o.grpcStatus, "16");
    assert.equal(o.grpcMessage, '{"code":401,"message":"Jwt verification fails"}');
    const direct = await h2call(
      serverAddress,
      grpcHeaders(echoPath, { authorization: `Bearer ${"A".repeat(40 * 1024)}.e30.sig` }),
      { body: echoHi },
    );
    assert.equal(direct.grpcStatus, "16");
  });

  it("handles deeply nested and huge claims: parsed, never crashing either process", async () => {
    // Signed, 1,000 levels deep and 2,500 claims: verified at both hops.
    const deep = JSON.parse(`{"deep":${nested(1000)}}`) as Record<string, unknown>;
    const many = Object.fromEntries(Array.from({ length: 2500 }, (_, i) => [`c${i}`, i]));
    for (const claims of [deep, many]) {
      const signed = await chain.clientToken(claims);
      const o = await gw({ authorization: `Bearer ${signed}` });
      assert.equal(o.grpcStatus, "0", o.grpcMessage);
      assert.equal(o.endUser, clientEmail);
    }
    // Forged, 20,000 levels deep (JSON.parse copes; nothing walks it).
    const payload = `{"iss":"https://accounts.google.com","aud":"${gatewayAudience}","exp":${
      Math.floor(Date.now() / 1000) + 600
    },"deep":${nested(20_000)}}`;
    const o = await gw({ authorization: `Bearer ${forge(token, payload)}` });
    assert.equal(o.grpcMessage, '{"code":401,"message":"Jwt verification fails"}');
    const direct = await h2call(
      serverAddress,
      grpcHeaders(echoPath, { authorization: `Bearer ${forge(token, payload)}` }),
      { body: echoHi },
    );
    assert.equal(direct.grpcStatus, "16");
    const { client } = await chain.client();
    assert.equal((await client.echo({ message: "alive" })).message, "alive");
  });

  it("gateway: verifies every repeated authorization header (all must pass, as Envoy does)", async () => {
    const cases: [string, string[], string][] = [
      ["50 copies of a valid token", Array(50).fill(`Bearer ${token}`), "0"],
      ["valid, then garbage", [`Bearer ${token}`, "Bearer x.y.z"], "16"],
      ["garbage, then valid", ["Bearer x.y.z", `Bearer ${token}`], "16"],
      ["valid, then expired", [`Bearer ${token}`, `Bearer ${await expired()}`], "16"],
    ];
    for (const [desc, values, status] of cases) {
      const o = await h2call(chain.address, withAuthorizations(echoPath, values), {
        body: echoHi,
      });
      assert.equal(o.grpcStatus, status, `${desc}: ${o.grpcMessage}`);
    }
    async function expired() {
      const now = Math.floor(Date.now() / 1000);
      return chain.clientToken({ iat: now - 7200, exp: now - 3600 });
    }
  });

  it("server: the first of repeated authorization headers counts (node:http2 keeps the first)", async () => {
    const valid = await h2call(serverAddress, withAuthorizations(echoPath, [serverAuth, "x"]), {
      body: echoHi,
    });
    assert.equal(valid.grpcStatus, "0");
    const invalid = await h2call(
      serverAddress,
      withAuthorizations(echoPath, ["Bearer x.y.z", serverAuth]),
      { body: echoHi },
    );
    assert.equal(invalid.grpcStatus, "16");
  });

  it("gateway: requires every token in every location to verify; the last one verified is the end user", async () => {
    const other = await chain.clientToken({ email: otherEmail });
    const all = await gw(
      { authorization: `Bearer ${token}`, "x-goog-iap-jwt-assertion": token },
      `${echoPath}?access_token=${token}`,
    );
    assert.equal(all.grpcStatus, "0");
    assert.equal(all.endUser, clientEmail);
    const oneBad = await gw(
      { authorization: `Bearer ${token}`, "x-goog-iap-jwt-assertion": "e30.e30.e30" },
      `${echoPath}?access_token=${token}`,
    );
    assert.equal(oneBad.grpcStatus, "16", oneBad.grpcMessage);
    const badQuery = await gw({ authorization: `Bearer ${token}` }, `${echoPath}?access_token=x`);
    assert.equal(badQuery.grpcStatus, "16");
    // Two identities, both valid: accepted; the payload forwarded is the one
    // checked last (query after headers), as Envoy's forward_payload_header.
    const two = await gw({ authorization: `Bearer ${token}` }, `${echoPath}?access_token=${other}`);
    assert.equal(two.grpcStatus, "0");
    assert.equal(two.endUser, otherEmail);
  });
});

describe("routing tricks at the gateway", () => {
  let chain: Chain;
  let raw: RawBackend;
  let token: string;
  before(async () => {
    raw = await startRawBackend();
    chain = await startChain({
      servers: 0,
      apiConfig: (vars) => defaultApiConfig({ ...vars, backends: `grpc://${raw.address}` }),
    });
    token = await chain.clientToken();
  });
  after(async () => {
    await chain.close();
    await raw.close();
  });

  const notDefined = '{"code":404,"message":"The current request is not defined by this API."}';
  const cases: [string, string, string, string?][] = [
    ["a path with ..", "/echo.v1.EchoService/../echo.v1.EchoService/Echo", "12", notDefined],
    ["an encoded slash", "/echo.v1.EchoService%2FEcho", "12", notDefined],
    ["an encoded dot-dot", "/echo.v1.EchoService/%2e%2e/Echo", "12", notDefined],
    ["a double slash", "//echo.v1.EchoService/Echo", "12", notDefined],
    ["an unknown service", "/evil.v1.Admin/DeleteEverything", "12", notDefined],
    ["a known method in the wrong case", "/echo.v1.echoservice/echo", "12", notDefined],
    ["a trailing slash (ESPv2 takes it)", "/echo.v1.EchoService/Echo/", "0"],
    ["a query string", "/echo.v1.EchoService/Echo?debug=1", "0"],
  ];
  for (const [desc, path, status, message] of cases) {
    it(`${desc} → grpc-status ${status}`, async () => {
      raw.received.length = 0;
      const o = await h2call(
        chain.address,
        grpcHeaders(path, { authorization: `Bearer ${token}` }),
        { body: echoHi },
      );
      assert.equal(o.grpcStatus, status, o.grpcMessage);
      if (message) {
        assert.equal(o.grpcMessage, message);
        assert.equal(raw.received.length, 0, "nothing reached the backend");
      } else {
        // Forwarded with the canonical path only.
        assert.equal(raw.received[0]?.[":path"], "/echo.v1.EchoService/Echo");
      }
    });
  }

  it("answers an unknown path before authentication (no token needed to learn it is unknown)", async () => {
    const o = await h2call(chain.address, grpcHeaders("/evil.v1.Admin/Delete"), { body: echoHi });
    assert.equal(o.grpcStatus, "12");
  });

  it("never connects to the host an :authority names; the backend sees its own", async () => {
    const connections: Socket[] = [];
    const trap = createServer((s) => {
      connections.push(s);
      s.destroy();
    });
    await new Promise<void>((r) => trap.listen(0, "127.0.0.1", r));
    const address = trap.address();
    const trapAuthority = `127.0.0.1:${typeof address === "object" && address ? address.port : 0}`;
    try {
      for (const authority of [trapAuthority, "evil.example:443", "metadata.google.internal"]) {
        raw.received.length = 0;
        const o = await h2call(
          chain.address,
          grpcHeaders(echoPath, { authorization: `Bearer ${token}`, ":authority": authority }),
          { body: echoHi },
        );
        assert.equal(o.grpcStatus, "0");
        assert.equal(raw.received[0]?.[":authority"], raw.address);
      }
      assert.equal(connections.length, 0, "no connection to the named host");
    } finally {
      await new Promise<void>((r) => trap.close(() => r()));
    }
  });
});

/**
 * The whole chain with real identities at both hops: the client gets its ID
 * token from client-sa's metadata server through google-auth-library, the
 * gateway its own from gateway-sa's, and three servers verify the gateway's
 * token against the stand-in issuer's JWKS.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createEchoClient, type EchoProtocol } from "../../client/echo-client.ts";
import { createIdTokenSource } from "../../client/id-token.ts";
import { createIdTokenInterceptor } from "../../client/id-token-interceptor.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";
import {
  type Chain,
  clientEmail,
  gatewayAudience,
  gatewayEmail,
  startChain,
} from "../helpers/chain.ts";

describe("end to end: client-sa → gateway (as gateway-sa) → three servers", () => {
  let chain: Chain;
  let clientMetadata: MetadataServer;
  before(async () => {
    chain = await startChain();
    clientMetadata = await createMetadataServer({ issuer: chain.issuer, email: clientEmail });
  });
  after(async () => {
    await chain.close();
    await clientMetadata.close();
  });

  const client = (protocol: EchoProtocol = "grpc") =>
    createEchoClient({
      address: chain.address,
      plaintext: true,
      protocol,
      idleConnectionTimeoutMs: 100,
      interceptors: [
        createIdTokenInterceptor(
          createIdTokenSource({ audience: gatewayAudience, metadataHost: clientMetadata.host }),
        ),
      ],
    });

  it("balances over one connection, with verification at both hops", async () => {
    const c = client();
    const seen = new Map<string, number>();
    for (let i = 0; i < 12; i++) {
      const res = await c.client.echo({ message: `e2e-${i}` });
      assert.equal(res.message, `e2e-${i}`);
      assert.equal(res.caller?.verification, "verified");
      assert.equal(res.caller?.principal?.email, gatewayEmail, "the server saw the gateway");
      assert.equal(res.caller?.endUser?.email, clientEmail, "and the client as end user");
      const id = res.instance?.id ?? "";
      seen.set(id, (seen.get(id) ?? 0) + 1);
    }
    c.close();
    assert.deepEqual([...seen.values()], [4, 4, 4], "round robin: 4 calls per instance");
    // One ID token for the gateway audience, reused for all 12 calls.
    assert.equal(clientMetadata.identityRequests(), 1);
    // One backend token for the gateway, fetched at start.
    assert.equal(chain.gatewayMetadata.identityRequests(), 1);
  });

  it("logs the verified caller at every hop and never a token", async () => {
    const c = client();
    await c.client.echo({ message: "logged" });
    c.close();
    const gatewayLine = chain.gatewayLogs.findLast((l) => l["rpc"] === "echo.v1.EchoService.Echo");
    assert.equal(gatewayLine?.["caller"], clientEmail);
    const serverLines = chain.servers.flatMap((s) => s.logs);
    assert.ok(
      serverLines.some((l) => l["caller"] === gatewayEmail && l["endUser"] === clientEmail),
    );
    const everything = JSON.stringify([chain.gatewayLogs, serverLines]);
    assert.doesNotMatch(everything, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}/, "no JWT in logs");
  });

  for (const protocol of ["grpc-web", "connect"] as const) {
    it(`passes ${protocol} through unchanged`, async () => {
      const c = client(protocol);
      const res = await c.client.echo({ message: protocol });
      assert.equal(res.message, protocol);
      assert.equal(res.caller?.endUser?.email, clientEmail);
      let n = 0;
      for await (const r of c.client.echoServerStream({ message: "s", count: 3 })) {
        assert.equal(r.index, n++);
      }
      assert.equal(n, 3);
      c.close();
    });
  }

  it("rejects a client without a token over the Connect protocol too", async () => {
    const c = createEchoClient({
      address: chain.address,
      plaintext: true,
      protocol: "connect",
      idleConnectionTimeoutMs: 100,
    });
    await assert.rejects(c.client.echo({ message: "x" }), (err: unknown) => {
      assert.equal(ConnectError.from(err).code, Code.Unauthenticated);
      return true;
    });
    c.close();
  });
});

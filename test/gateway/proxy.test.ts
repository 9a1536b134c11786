import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createEchoClient } from "../../client/echo-client.ts";
import { loadGatewayConfig } from "../../gateway/config.ts";
import { startGateway } from "../../gateway/start.ts";
import {
  bearer,
  type Chain,
  clientEmail,
  defaultApiConfig,
  gatewayAudience,
  startChain,
} from "../helpers/chain.ts";
import { type RawBackend, rawGrpcCall, startRawBackend } from "../helpers/raw-backend.ts";
import { createCaptureLogger } from "../helpers/server.ts";
import { createTestCertificates, type TestCertificates } from "../helpers/tls.ts";

describe("gateway forwarding details", () => {
  let raw: RawBackend;
  let chain: Chain;
  before(async () => {
    raw = await startRawBackend();
    chain = await startChain({
      servers: 0,
      apiConfig: (vars) => defaultApiConfig({ ...vars, backends: `grpc://${raw.address}` }),
    });
  });
  after(async () => {
    await chain.close();
    await raw.close();
  });

  it("forwards grpc-timeout and custom metadata unchanged", async () => {
    raw.received.length = 0;
    await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
      authorization: `Bearer ${await chain.clientToken()}`,
      "grpc-timeout": "2500m",
      "x-request-tag": "abc",
    });
    assert.equal(raw.received[0]?.["grpc-timeout"], "2500m");
    assert.equal(raw.received[0]?.["x-request-tag"], "abc");
  });

  it("passes the backend's trailing metadata and error details through", async () => {
    raw.trailers = {
      "grpc-status": "9",
      "grpc-message": "precondition%20failed",
      "x-backend-trailer": "t1",
      "grpc-status-details-bin": "AAEC",
    };
    try {
      const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
        authorization: `Bearer ${await chain.clientToken()}`,
      });
      assert.equal(res["grpc-status"], "9");
      assert.equal(res["grpc-message"], "precondition%20failed");
      assert.equal(res["x-backend-trailer"], "t1");
      assert.equal(res["grpc-status-details-bin"], "AAEC");
    } finally {
      raw.trailers = { "grpc-status": "0" };
    }
  });

  it("cancels the backend stream when the client cancels", async () => {
    raw.mode = "hang";
    raw.received.length = 0;
    raw.closedStreams.length = 0;
    try {
      const c = createEchoClient({
        address: chain.address,
        plaintext: true,
        idleConnectionTimeoutMs: 50,
        interceptors: [bearer(await chain.clientToken())],
      });
      const controller = new AbortController();
      const call = c.client.echo({ message: "x" }, { signal: controller.signal });
      // Wait until the backend has the stream, then cancel.
      while (raw.received.length === 0) {
        await new Promise((r) => setTimeout(r, 5));
      }
      controller.abort();
      await assert.rejects(call, (err: unknown) => {
        assert.equal(ConnectError.from(err).code, Code.Canceled);
        return true;
      });
      while (raw.closedStreams.length < 1) {
        await new Promise((r) => setTimeout(r, 5));
      }
      assert.equal(raw.closedStreams.at(-1), 8, "backend stream reset with CANCEL");
      c.close();
    } finally {
      raw.mode = "answer";
    }
  });
});

describe("gateway auth rules per method", () => {
  let chain: Chain;
  before(async () => {
    chain = await startChain({
      servers: 1,
      apiConfig: (vars) =>
        `${defaultApiConfig(vars)}    - selector: echo.v1.EchoService.EchoServerStream
      allow_without_credential: true
      requirements:
        - provider_id: google_id_token
    - selector: echo.v1.EchoService.EchoBidiStream
`.replace("audiences: https://echo-gateway.test", "audiences: echo-gateway.test/"),
    });
  });
  after(() => chain.close());

  it("normalises audiences as jwt_verify_lib does (scheme and trailing slash)", async () => {
    const { client } = await chain.client();
    // Token aud is https://echo-gateway.test; the config says echo-gateway.test/.
    assert.equal((await client.echo({ message: "aud" })).message, "aud");
  });

  it("lets a method with allow_without_credential through without a token", async () => {
    const { client } = await chain.client({ token: null });
    let n = 0;
    for await (const r of client.echoServerStream({ message: "anon", count: 2 })) {
      assert.equal(r.caller?.endUser, undefined, "no userinfo without a verified token");
      n++;
    }
    assert.equal(n, 2);
  });

  it("still rejects a bad token on a method with allow_without_credential", async () => {
    const { client } = await chain.client({ token: await chain.clientToken({ aud: "https://x" }) });
    await assert.rejects(
      async () => {
        for await (const _ of client.echoServerStream({ message: "x", count: 1 })) {
          // drain
        }
      },
      (err: unknown) => {
        assert.equal(ConnectError.from(err).code, Code.PermissionDenied);
        return true;
      },
    );
  });

  it("does not check tokens on a method whose last rule has no requirements", async () => {
    const { client } = await chain.client({ token: null });
    const replies = [];
    for await (const r of client.echoBidiStream(
      (async function* () {
        yield { message: "open" };
      })(),
    )) {
      replies.push(r.message);
    }
    assert.deepEqual(replies, ["open"]);
  });

  it("still requires a token on the other methods", async () => {
    const { client } = await chain.client({ token: null });
    await assert.rejects(client.echo({ message: "x" }), (err: unknown) => {
      assert.equal(ConnectError.from(err).code, Code.Unauthenticated);
      return true;
    });
  });
});

describe("gateway with Google's X.509 certificate map as key source", () => {
  it("verifies tokens against /oauth2/v1/certs", async () => {
    const chain = await startChain({
      servers: 1,
      apiConfig: (vars) =>
        defaultApiConfig({
          ...vars,
          jwksUri: vars.jwksUri.replace("/oauth2/v3/certs", "/oauth2/v1/certs"),
        }),
    });
    try {
      const { client } = await chain.client();
      const res = await client.echo({ message: "x509" });
      assert.equal(res.caller?.endUser?.email, clientEmail);
      assert.ok(chain.issuer.requestCount("/oauth2/v1/certs") >= 1);
    } finally {
      await chain.close();
    }
  });
});

describe("gateway over TLS to a grpcs:// backend", () => {
  let certs: TestCertificates;
  before(() => {
    certs = createTestCertificates();
  });
  after(() => certs.cleanup());

  it("serves TLS to clients and verifies the backend's certificate", async () => {
    const raw = await startRawBackend({
      key: readFileSync(certs.keyFile),
      cert: readFileSync(certs.certFile),
    });
    const chain = await startChain({
      servers: 0,
      apiConfig: (vars) => defaultApiConfig({ ...vars, backends: `grpcs://${raw.address}` }),
    });
    const { logger } = createCaptureLogger();
    const config = loadGatewayConfig({}, [
      "--config",
      chain.configFile,
      "--host",
      "127.0.0.1",
      "--port",
      "0",
      "--metadata-host",
      chain.gatewayMetadata.host,
      "--tls-cert",
      certs.certFile,
      "--tls-key",
      certs.keyFile,
      "--backend-ca",
      certs.caFile,
    ]);
    const tlsGateway = await startGateway(config, { logger });
    try {
      const c = createEchoClient({
        address: `127.0.0.1:${tlsGateway.port}`,
        ca: certs.ca,
        servername: "echo.test",
        idleConnectionTimeoutMs: 50,
        interceptors: [bearer(await chain.clientToken())],
      });
      const res = await c.client.echo({ message: "tls" });
      c.close();
      assert.equal(res.message, "raw");
      const seen = raw.received.at(-1);
      assert.equal(seen?.[":scheme"], "https");
      assert.equal(seen?.[":authority"], raw.address);
    } finally {
      await tlsGateway.close();
      await chain.close();
      await raw.close();
    }
  });

  it("refuses a backend whose certificate it does not trust", async () => {
    const raw = await startRawBackend({
      key: readFileSync(certs.keyFile),
      cert: readFileSync(certs.certFile),
    });
    const chain = await startChain({
      servers: 0,
      apiConfig: (vars) => defaultApiConfig({ ...vars, backends: `grpcs://${raw.address}` }),
    });
    try {
      const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
        authorization: `Bearer ${await chain.clientToken({ aud: gatewayAudience })}`,
      });
      assert.equal(res["grpc-status"], "14");
      assert.equal(raw.received.length, 0, "nothing reached the untrusted backend");
    } finally {
      await chain.close();
      await raw.close();
    }
  });
});

describe("gateway idle timeout on streams", () => {
  it("answers UNKNOWN stream timeout when a streaming call stays silent past its deadline", async () => {
    const raw = await startRawBackend();
    raw.mode = "hang";
    const chain = await startChain({
      servers: 0,
      apiConfig: (vars) =>
        defaultApiConfig({ ...vars, backends: `grpc://${raw.address}` }).replace(
          "deadline: 15",
          "deadline: 0.2",
        ),
    });
    try {
      const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/EchoBidiStream", {
        authorization: `Bearer ${await chain.clientToken()}`,
      });
      assert.equal(res["grpc-status"], "2");
      assert.equal(
        decodeURIComponent(String(res["grpc-message"])),
        '{"code":408,"message":"stream timeout"}',
      );
    } finally {
      await chain.close();
      await raw.close();
    }
  });
});

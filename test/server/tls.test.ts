import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createEchoClient } from "../../client/echo-client.ts";
import { type StartedServer, startServer } from "../helpers/server.ts";
import { createTestCertificates, type TestCertificates } from "../helpers/tls.ts";

describe("Echo server over TLS", () => {
  let certs: TestCertificates;
  let server: StartedServer;
  before(async () => {
    certs = createTestCertificates();
    server = await startServer({ ECHO_TLS_CERT: certs.certFile, ECHO_TLS_KEY: certs.keyFile });
  });
  after(async () => {
    await server.close();
    certs.cleanup();
  });

  for (const protocol of ["grpc", "grpc-web", "connect"] as const) {
    it(`serves ${protocol} with the given certificate`, async () => {
      const c = createEchoClient({
        address: `127.0.0.1:${server.port}`,
        ca: certs.ca,
        servername: "echo.test",
        protocol,
        idleConnectionTimeoutMs: 50,
      });
      assert.equal((await c.client.echo({ message: "tls" })).message, "tls");
      c.close();
    });
  }

  it("is refused by a client that does not trust the CA", async () => {
    const c = createEchoClient({
      address: `127.0.0.1:${server.port}`,
      idleConnectionTimeoutMs: 50,
    });
    await assert.rejects(c.client.echo({ message: "x" }), (err: unknown) => {
      // Connect reports TLS verification failures as INTERNAL, with Node's reason.
      const e = ConnectError.from(err);
      assert.equal(e.code, Code.Internal);
      assert.match(e.rawMessage, /certificate/);
      return true;
    });
    c.close();
  });

  it("is refused by a client expecting another server name", async () => {
    const c = createEchoClient({
      address: `127.0.0.1:${server.port}`,
      ca: certs.ca,
      servername: "other.test",
      idleConnectionTimeoutMs: 50,
    });
    await assert.rejects(c.client.echo({ message: "x" }));
    c.close();
  });
});

/**
 * Caller verification as wired into the server: every protocol (gRPC,
 * gRPC-Web, Connect) and every RPC kind is covered; health and reflection
 * stay open. The verifier's full bad-token matrix is in auth.test.ts.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createEchoClient, type EchoClient } from "../../client/echo-client.ts";
import { Health } from "../../gen/grpc/health/v1/health_pb.ts";
import { createIssuer, type Issuer } from "../../local/issuer.ts";
import { bearer } from "../helpers/chain.ts";
import { projectRoot } from "../helpers/process.ts";
import { type StartedServer, startServer } from "../helpers/server.ts";

const audience = "https://echo.test";
const allowed = "gateway-sa@p.iam.gserviceaccount.com";

type Rpc = (c: EchoClient) => Promise<unknown>;
const rpcs: Record<string, Rpc> = {
  Echo: (c) => c.client.echo({ message: "x" }),
  EchoServerStream: async (c) => {
    for await (const _ of c.client.echoServerStream({ message: "x", count: 2 })) {
      // drain
    }
  },
  EchoClientStream: (c) =>
    c.client.echoClientStream(
      (async function* () {
        yield { message: "x" };
      })(),
    ),
  EchoBidiStream: async (c) => {
    for await (const _ of c.client.echoBidiStream(
      (async function* () {
        yield { message: "x" };
      })(),
    )) {
      // drain
    }
  },
};

describe("server with verification on", () => {
  let issuer: Issuer;
  let server: StartedServer;
  before(async () => {
    issuer = await createIssuer();
    server = await startServer({
      ECHO_AUTH_MODE: "verify",
      ECHO_AUDIENCES: audience,
      ECHO_JWKS_URI: issuer.jwksUri,
      ECHO_ALLOWED_PRINCIPALS: allowed,
    });
  });
  after(async () => {
    await server.close();
    await issuer.close();
  });

  const now = () => Math.floor(Date.now() / 1000);
  const cases: {
    desc: string;
    token: () => Promise<string | undefined>;
    code: Code | undefined;
  }[] = [
    {
      desc: "a valid token",
      token: () => issuer.sign({ aud: audience, email: allowed }),
      code: undefined,
    },
    { desc: "no token", token: async () => undefined, code: Code.Unauthenticated },
    {
      desc: "an expired token",
      token: () => issuer.sign({ aud: audience, email: allowed }, { nowSeconds: now() - 7200 }),
      code: Code.Unauthenticated,
    },
    {
      desc: "a token for another audience",
      token: () => issuer.sign({ aud: "https://other.test", email: allowed }),
      code: Code.Unauthenticated,
    },
    {
      desc: "a token of a principal not allowed",
      token: () => issuer.sign({ aud: audience, email: "intruder@p.iam.gserviceaccount.com" }),
      code: Code.PermissionDenied,
    },
  ];

  for (const protocol of ["grpc", "grpc-web", "connect"] as const) {
    for (const [rpc, call] of Object.entries(rpcs)) {
      for (const tc of cases) {
        it(`${protocol} ${rpc}: ${tc.desc} → ${tc.code === undefined ? "OK" : Code[tc.code]}`, async () => {
          const token = await tc.token();
          const c = createEchoClient({
            address: server.address,
            plaintext: true,
            protocol,
            idleConnectionTimeoutMs: 50,
            interceptors: token ? [bearer(token)] : [],
          });
          try {
            if (tc.code === undefined) {
              await call(c);
            } else {
              await assert.rejects(call(c), (err: unknown) => {
                const e = ConnectError.from(err);
                assert.equal(Code[e.code], Code[tc.code as Code]);
                assert.ok(token === undefined || !e.rawMessage.includes(token), "no token echoed");
                return true;
              });
            }
          } finally {
            c.close();
          }
        });
      }
    }
  }

  it("reports the verified caller in responses", async () => {
    const c = createEchoClient({
      address: server.address,
      plaintext: true,
      idleConnectionTimeoutMs: 50,
      interceptors: [bearer(await issuer.sign({ aud: audience, email: allowed }))],
    });
    const res = await c.client.echo({ message: "who" });
    c.close();
    assert.equal(res.caller?.principal?.email, allowed);
    assert.equal(res.caller?.principal?.issuer, "https://accounts.google.com");
    assert.equal(res.caller?.verification, "verified");
  });

  it("leaves health checks open", async () => {
    const health = createClient(
      Health,
      createGrpcTransport({ baseUrl: `http://${server.address}`, idleConnectionTimeoutMs: 50 }),
    );
    assert.equal((await health.check({})).status, 1);
  });

  it("leaves reflection open (buf curl without a token)", async () => {
    const { stdout } = await promisify(execFile)(
      `${projectRoot}node_modules/.bin/buf`,
      ["curl", "--http2-prior-knowledge", "--list-methods", `http://${server.address}`],
      { cwd: projectRoot },
    );
    assert.match(stdout, /echo\.v1\.EchoService\/Echo/);
  });
});

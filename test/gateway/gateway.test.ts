import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createServer } from "node:net";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { Code, ConnectError } from "@connectrpc/connect";
import { projectRoot } from "../helpers/process.ts";
import { type RawBackend, rawGrpcCall, startRawBackend } from "../helpers/raw-backend.ts";
import {
  backendAudience,
  type Chain,
  clientEmail,
  defaultApiConfig,
  gatewayAudience,
  gatewayEmail,
  startChain,
} from "../helpers/chain.ts";

const execFileAsync = promisify(execFile);

function assertCode(err: unknown, code: Code, rawMessage?: string): true {
  const e = ConnectError.from(err);
  assert.equal(Code[e.code], Code[code], `code of ${e.message}`);
  if (rawMessage !== undefined) {
    assert.equal(e.rawMessage, rawMessage);
  }
  return true;
}

async function* numbered(n: number) {
  for (let i = 0; i < n; i++) {
    yield { message: `m${i}` };
  }
}

/** A loopback port with nothing listening on it. */
async function deadPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const address = srv.address();
  const port = typeof address === "object" && address ? address.port : 0;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

describe("local gateway: client → gateway → three servers", () => {
  let chain: Chain;
  before(async () => {
    chain = await startChain();
  });
  after(() => chain.close());

  it("balances unary RPCs of one connection across all instances, each seeing the gateway as caller and the client as end user", async () => {
    const { client } = await chain.client();
    const ids = new Set<string>();
    for (let i = 0; i < 9; i++) {
      const res = await client.echo({ message: `n${i}` });
      assert.equal(res.message, `n${i}`);
      ids.add(res.instance?.id ?? "");
      assert.equal(res.caller?.verification, "verified");
      assert.equal(res.caller?.principal?.email, gatewayEmail);
      assert.equal(res.caller?.endUser?.email, clientEmail);
    }
    assert.equal(ids.size, 3, `replies came from ${[...ids].join(", ")}`);
    assert.deepEqual(ids, new Set(chain.servers.map((s) => s.instance.id)));
  });

  it("never lets client-forged userinfo reach a backend", async () => {
    const forged = Buffer.from(
      JSON.stringify({ iss: "https://accounts.google.com", email: "mallory@evil.test" }),
    ).toString("base64url");
    const { client } = await chain.client();
    const res = await client.echo(
      { message: "x" },
      {
        headers: {
          "x-apigateway-api-userinfo": forged,
          "x-forwarded-authorization": "Bearer forged",
        },
      },
    );
    assert.equal(res.caller?.endUser?.email, clientEmail);
  });

  it("streams 10,000 messages each way, complete and in order", async () => {
    const { client } = await chain.client();
    const n = 10_000;
    let index = 0;
    for await (const r of client.echoServerStream({ message: "s", count: n })) {
      assert.equal(r.index, index++);
    }
    assert.equal(index, n);

    const collected = await client.echoClientStream(numbered(n));
    assert.equal(collected.count, n);
    assert.equal(collected.message, Array.from({ length: n }, (_, i) => `m${i}`).join(" "));

    index = 0;
    for await (const r of client.echoBidiStream(numbered(n))) {
      assert.equal(r.index, index);
      assert.equal(r.message, `m${index}`);
      index++;
    }
    assert.equal(index, n);
  });

  describe("JWT rejections (ESPv2's codes and messages)", () => {
    const hour = 3600;
    const now = () => Math.floor(Date.now() / 1000);
    const cases: {
      desc: string;
      token: () => Promise<string | null>;
      code: Code;
      message: string;
    }[] = [
      {
        desc: "no token",
        token: async () => null,
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt is missing"}',
      },
      {
        desc: "not a JWT",
        token: async () => "not-a-jwt",
        code: Code.Unauthenticated,
        message:
          '{"code":401,"message":"Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"}',
      },
      {
        desc: "header not base64url",
        token: async () => "abcde.e30.c2ln",
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt header is an invalid Base64url encoded"}',
      },
      {
        desc: "wrong issuer",
        token: () => chain.clientToken({ iss: "https://evil.test" }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt issuer is not configured"}',
      },
      {
        desc: "expired",
        token: () =>
          chain.issuer.sign(
            { aud: gatewayAudience, email: clientEmail },
            { nowSeconds: now() - 2 * hour },
          ),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt is expired"}',
      },
      {
        desc: "not yet valid",
        token: () => chain.clientToken({ nbf: now() + hour }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt not yet valid"}',
      },
      {
        desc: "wrong audience",
        token: () => chain.clientToken({ aud: "https://other.test" }),
        code: Code.PermissionDenied,
        message: '{"code":403,"message":"Audiences in Jwt are not allowed"}',
      },
      {
        desc: "alg none",
        token: () =>
          chain.issuer.sign({ aud: gatewayAudience, email: clientEmail }, { alg: "none" }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt header [alg] is not supported"}',
      },
      {
        desc: "HS256 with the public key as secret",
        token: () =>
          chain.issuer.sign({ aud: gatewayAudience, email: clientEmail }, { alg: "HS256" }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt header [alg] is not supported"}',
      },
      {
        desc: "unknown kid",
        token: () =>
          chain.issuer.sign(
            { aud: gatewayAudience, email: clientEmail },
            { header: { kid: "no-such-key" } },
          ),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwks doesn\'t have key to match kid or alg from Jwt"}',
      },
      {
        desc: "bad signature",
        token: () =>
          chain.issuer.sign({ aud: gatewayAudience, email: clientEmail }, { signature: "corrupt" }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt verification fails"}',
      },
      {
        desc: "no exp (refused, unlike ESPv2)",
        token: () => chain.clientToken({ exp: undefined }),
        code: Code.Unauthenticated,
        message: '{"code":401,"message":"Jwt payload [exp] field is required"}',
      },
    ];
    for (const tc of cases) {
      it(tc.desc, async () => {
        const { client } = await chain.client({ token: await tc.token() });
        await assert.rejects(client.echo({ message: "x" }), (err) =>
          assertCode(err, tc.code, tc.message),
        );
      });
    }

    it("answers trailers-only with www-authenticate", async () => {
      const missing = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo");
      assert.equal(missing.endStreamOnHeaders, true);
      assert.equal(missing[":status"], 200);
      assert.equal(missing["grpc-status"], "16");
      assert.match(
        String(missing["www-authenticate"]),
        /^Bearer realm="http:\/\/127\.0\.0\.1:\d+\/echo\.v1\.EchoService\/Echo"$/,
      );
      const bad = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
        authorization: "Bearer x.y.z",
      });
      assert.match(String(bad["www-authenticate"]), /, error="invalid_token"$/);
    });

    it("rejects a token in the query like one in the header", async () => {
      const token = await chain.clientToken({ aud: "https://other.test" });
      const res = await rawGrpcCall(
        chain.address,
        `/echo.v1.EchoService/Echo?access_token=${token}`,
      );
      assert.equal(res["grpc-status"], "7");
    });
  });

  it("answers an unknown method UNIMPLEMENTED before any auth", async () => {
    const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Nope");
    assert.equal(res["grpc-status"], "12");
    assert.equal(
      decodeURIComponent(String(res["grpc-message"])),
      '{"code":404,"message":"The current request is not defined by this API."}',
    );
    const reflection = await rawGrpcCall(
      chain.address,
      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    );
    assert.equal(reflection["grpc-status"], "12");
  });

  it("answers a known path with another HTTP method as ESPv2 does", async () => {
    const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", { ":method": "PUT" });
    assert.equal(res["grpc-status"], "2");
    assert.match(String(res["grpc-message"]), /its http method is not allowed/);
  });

  it("is callable with buf curl and a bearer token", async () => {
    const token = await chain.clientToken();
    const { stdout } = await execFileAsync(
      `${projectRoot}node_modules/.bin/buf`,
      [
        "curl",
        "--http2-prior-knowledge",
        "--protocol",
        "grpc",
        "--schema",
        "gen/echo.pb#format=binpb",
        "-H",
        `Authorization: Bearer ${token}`,
        "-d",
        '{"message":"curl"}',
        `http://${chain.address}/echo.v1.EchoService/Echo`,
      ],
      { cwd: projectRoot },
    );
    const out = JSON.parse(stdout);
    assert.equal(out.message, "curl");
    assert.equal(out.caller.endUser.email, clientEmail);
  });

  it("passes backend statuses and messages through unchanged", async () => {
    const { client } = await chain.client();
    await assert.rejects(
      async () => {
        for await (const _ of client.echoServerStream({ message: "s", count: 1_000_000 })) {
          // drain
        }
      },
      (err) => assertCode(err, Code.InvalidArgument, "count 1000000 exceeds the maximum of 10000"),
    );
  });
});

describe("local gateway: what the backend receives", () => {
  let chain: Chain;
  let raw: RawBackend;
  before(async () => {
    raw = await startRawBackend();
    chain = await startChain({
      servers: 0,
      apiConfig: (vars) =>
        defaultApiConfig({ ...vars, backends: `grpc://${raw.address}` }).replace(
          "deadline: 15",
          "deadline: 0.3",
        ),
    });
  });
  after(async () => {
    await chain.close();
    await raw.close();
  });

  it("replaces Authorization with the gateway's token and moves the caller's aside", async () => {
    const token = await chain.clientToken();
    raw.received.length = 0;
    const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
      authorization: `Bearer ${token}`,
      "x-forwarded-authorization": "Bearer forged",
      "x-apigateway-api-userinfo": "forged",
      "x-custom": "kept",
    });
    assert.equal(res["grpc-status"], "0");
    const seen = raw.received[0];
    assert.ok(seen);
    assert.equal(seen["x-forwarded-authorization"], `Bearer ${token}`);
    assert.equal(seen["x-apigateway-api-userinfo"], token.split(".")[1]);
    assert.equal(seen["x-custom"], "kept");
    assert.equal(seen[":authority"], raw.address);
    const gatewayToken = String(seen.authorization).replace(/^Bearer /, "");
    const claims = JSON.parse(
      Buffer.from(gatewayToken.split(".")[1] ?? "", "base64url").toString(),
    );
    assert.equal(claims.email, gatewayEmail);
    assert.equal(claims.aud, backendAudience);
  });

  it("answers UNAVAILABLE upstream request timeout when a unary call outlives its deadline", async () => {
    raw.mode = "hang";
    try {
      const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
        authorization: `Bearer ${await chain.clientToken()}`,
      });
      assert.equal(res["grpc-status"], "14");
      assert.equal(
        decodeURIComponent(String(res["grpc-message"])),
        '{"code":504,"message":"upstream request timeout"}',
      );
    } finally {
      raw.mode = "answer";
    }
  });

  it("keeps using its cached backend token while its metadata server is down", async () => {
    const token = await chain.clientToken();
    await chain.gatewayMetadata.close();
    const res = await rawGrpcCall(chain.address, "/echo.v1.EchoService/Echo", {
      authorization: `Bearer ${token}`,
    });
    assert.equal(res["grpc-status"], "0");
  });
});

describe("local gateway: without a backend token", () => {
  it("answers ESPv2's 500 (UNKNOWN) naming the audience, without hanging", async () => {
    const chain = await startChain({ servers: 1, gatewayMetadataDown: true });
    try {
      const { client } = await chain.client();
      await assert.rejects(client.echo({ message: "x" }), (err) =>
        assertCode(
          err,
          Code.Unknown,
          `{"code":500,"message":"Token not found for audience: ${backendAudience}"}`,
        ),
      );
    } finally {
      await chain.close();
    }
  });
});

describe("local gateway: backend failures", () => {
  it("answers UNAVAILABLE when no backend answers, and recovers when one returns", async () => {
    const port = await deadPort();
    const chain = await startChain({
      servers: 0,
      apiConfig: (vars) => defaultApiConfig({ ...vars, backends: `grpc://127.0.0.1:${port}` }),
      downBackoffMs: 50,
    });
    try {
      const { client } = await chain.client();
      await assert.rejects(client.echo({ message: "x" }), (err) => {
        assertCode(err, Code.Unavailable);
        assert.match(
          ConnectError.from(err).rawMessage,
          /^\{"code":503,"message":"upstream connect error or disconnect\/reset before headers\. .*reset reason: remote connection failure/,
        );
        return true;
      });
      // The backend comes up on that port.
      const { startServer } = await import("../helpers/server.ts");
      const server = await startServer({
        PORT: String(port),
        ECHO_AUTH_MODE: "verify",
        ECHO_AUDIENCES: backendAudience,
        ECHO_JWKS_URI: chain.issuer.jwksUri,
        ECHO_ALLOWED_PRINCIPALS: gatewayEmail,
      });
      try {
        await new Promise((r) => setTimeout(r, 120));
        const res = await client.echo({ message: "back" });
        assert.equal(res.message, "back");
      } finally {
        await server.close();
      }
    } finally {
      await chain.close();
    }
  });

  it("retries a refused connection on another backend without failing the call", async () => {
    const port = await deadPort();
    const chain = await startChain({ servers: 1, extraBackends: [`grpc://127.0.0.1:${port}`] });
    try {
      const { client } = await chain.client();
      for (let i = 0; i < 6; i++) {
        assert.equal((await client.echo({ message: `r${i}` })).message, `r${i}`);
      }
    } finally {
      await chain.close();
    }
  });
});

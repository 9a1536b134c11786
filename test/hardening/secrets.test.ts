/**
 * Secrets never reach the logs. One chain run at debug level, every process
 * included (the gateway and the servers as child processes, the Google
 * stand-ins and the client in this one), with tokens flowing in every
 * location, valid and rejected, through outages of the key server and of
 * the gateway's metadata server. Then every byte written to stdout or
 * stderr is searched for tokens, token parts and key material.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { createEchoClient } from "../../client/echo-client.ts";
import { createIdTokenSource } from "../../client/id-token.ts";
import { createIdTokenInterceptor } from "../../client/id-token-interceptor.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";
import {
  backendAudience,
  bearer,
  clientEmail,
  gatewayAudience,
  gatewayEmail,
} from "../helpers/chain.ts";
import { echoHi, grpcHeaders, h2call } from "../helpers/h2-call.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";
import { createCaptureLogger } from "../helpers/server.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("secrets in the logs of a whole chain run", () => {
  const standIns = createCaptureLogger();
  const clientLogs = createCaptureLogger();
  let chain: ProcessChain;
  let clientMetadata: MetadataServer;
  /** Every token the run handled that the test can know. */
  const tokens: string[] = [];
  before(async () => {
    chain = await startProcessChain({
      servers: 2,
      gatewayProcess: true,
      logLevel: "debug",
      standInLogger: standIns.logger,
      gatewayTokenLifetimeSeconds: 5,
    });
    clientMetadata = await createMetadataServer({
      issuer: chain.issuer,
      email: clientEmail,
      logger: standIns.logger,
    });
  });
  after(async () => {
    await chain.close();
    await clientMetadata.close();
  });

  it("writes no token, token part or private key, whatever the call", async (t) => {
    const source = createIdTokenSource({
      audience: gatewayAudience,
      metadataHost: clientMetadata.host,
      logger: clientLogs.logger,
    });
    tokens.push(await source.getIdToken());
    const good = createEchoClient({
      address: chain.address,
      plaintext: true,
      idleConnectionTimeoutMs: 100,
      interceptors: [createIdTokenInterceptor(source)],
    });
    const now = Math.floor(Date.now() / 1000);
    const sign = chain.issuer.sign.bind(chain.issuer);
    const bad = {
      expired: await sign({
        aud: gatewayAudience,
        email: clientEmail,
        iat: now - 7200,
        exp: now - 3600,
      }),
      wrongAudience: await sign({ aud: "https://elsewhere.test", email: clientEmail }),
      corrupt: await sign({ aud: gatewayAudience, email: clientEmail }, { signature: "corrupt" }),
      none: await sign({ aud: gatewayAudience, email: clientEmail }, { alg: "none" }),
      hs256: await sign({ aud: gatewayAudience, email: clientEmail }, { alg: "HS256" }),
      unknownKid: await sign(
        { aud: gatewayAudience, email: clientEmail },
        { header: { kid: "nope" } },
      ),
      big: await sign({ aud: gatewayAudience, email: clientEmail, pad: "p".repeat(20_000) }),
    };
    tokens.push(...Object.values(bad));
    const gatewayToken = await chain.issuer.mintIdToken(gatewayEmail, backendAudience);
    tokens.push(gatewayToken);
    const serviceAccountKey = await chain.issuer.createServiceAccountKey(clientEmail);

    // Valid traffic of every kind.
    for (let i = 0; i < 10; i++) {
      await good.client.echo({ message: `ok ${i}` });
    }
    for await (const _ of good.client.echoServerStream({
      message: "s",
      count: 3,
      interval: durationFromMs(10),
    })) {
      // drain
    }
    await good.client.echoClientStream(
      (async function* () {
        yield { message: "a" };
      })(),
    );
    // Rejected tokens, in every location.
    for (const token of Object.values(bad)) {
      const c = createEchoClient({
        address: chain.address,
        plaintext: true,
        idleConnectionTimeoutMs: 100,
        interceptors: [bearer(token)],
      });
      await c.client.echo({ message: "x" }).catch(() => {});
      c.close();
      await h2call(chain.address, grpcHeaders(`/echo.v1.EchoService/Echo?access_token=${token}`), {
        body: echoHi,
      });
      await h2call(
        chain.address,
        grpcHeaders("/echo.v1.EchoService/Echo", { "x-goog-iap-jwt-assertion": token }),
        { body: echoHi },
      );
      // Directly at a server, as a caller that bypasses the gateway.
      await h2call(
        chain.servers[0]?.address as string,
        grpcHeaders("/echo.v1.EchoService/Echo", { authorization: `Bearer ${token}` }),
        { body: echoHi },
      );
    }
    // A valid token with forged gateway headers, a valid one in the query,
    // and the gateway's own token presented to a server directly.
    await h2call(
      chain.address,
      grpcHeaders(`/echo.v1.EchoService/Echo?access_token=${tokens[0]}`, {
        "x-forwarded-authorization": `Bearer ${bad.corrupt}`,
        "x-apigateway-api-userinfo": bad.corrupt.split(".")[1] ?? "",
      }),
      { body: echoHi },
    );
    await h2call(
      chain.servers[1]?.address as string,
      grpcHeaders("/echo.v1.EchoService/Echo", { authorization: `Bearer ${gatewayToken}` }),
      { body: echoHi },
    );
    // The key server down, and a rotated key nobody can fetch.
    chain.issuer.setAvailable(false);
    await chain.issuer.rotate();
    const rotated = await sign({ aud: gatewayAudience, email: clientEmail });
    tokens.push(rotated);
    await h2call(
      chain.address,
      grpcHeaders("/echo.v1.EchoService/Echo", { authorization: `Bearer ${rotated}` }),
      { body: echoHi },
    );
    chain.issuer.setAvailable(true);
    // The gateway's metadata server refusing while its 5 s token runs out.
    chain.gatewayMetadata.setAvailable(false);
    const until = Date.now() + 6500;
    while (Date.now() < until) {
      await good.client.echo({ message: "during" }).catch(() => {});
      await sleep(250);
    }
    chain.gatewayMetadata.setAvailable(true);
    await good.client.echo({ message: "after" }).catch(() => {});
    good.close();
    await sleep(300);

    const outputs: Record<string, string> = {
      gateway: `${chain.gatewayProc?.stdout()}${chain.gatewayProc?.stderr()}`,
      ...Object.fromEntries(
        chain.servers.map((s, i) => [`server${i}`, `${s.proc.stdout()}${s.proc.stderr()}`]),
      ),
      "stand-ins": standIns.raw.join("\n"),
      client: clientLogs.raw.join("\n"),
    };
    const lines = Object.values(outputs).join("\n").split("\n").length;
    t.diagnostic(`${lines} log lines searched`);
    // The run logged what happened: rejections with their reasons included.
    assert.match(outputs["gateway"] ?? "", /Jwt verification fails/);
    assert.match(outputs["gateway"] ?? "", /"code":"no_backend_token"/);
    assert.match(outputs["server0"] ?? "", /"code":"unauthenticated"/);
    assert.match(outputs["stand-ins"] ?? "", /identity/);

    for (const [name, text] of Object.entries(outputs)) {
      // Any JWT, or the start of one (a base64url JSON header and a dot).
      assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{8,}\./, `${name}: a JWT`);
      // Signatures, key material, long secrets: long base64url runs.
      assert.doesNotMatch(text, /[A-Za-z0-9_-]{100,}/, `${name}: a long base64url string`);
      assert.doesNotMatch(text, /PRIVATE KEY/, `${name}: a PEM key`);
      assert.doesNotMatch(text, /Bearer [A-Za-z0-9_-]/, `${name}: a bearer credential`);
      for (const token of tokens) {
        for (const part of token.split(".")) {
          if (part.length >= 16) {
            assert.ok(!text.includes(part), `${name}: part of a token`);
          }
        }
      }
      for (const line of serviceAccountKey.private_key.split("\n")) {
        if (line.length >= 32) {
          assert.ok(!text.includes(line), `${name}: a line of a private key`);
        }
      }
    }
  });
});

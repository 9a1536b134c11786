/**
 * google-auth-library fetching real tokens from the stand-ins. The library
 * reads its configuration from the process environment, so this file sets it
 * in `before` and restores it in `after`; node --test runs each test file in
 * its own process, so nothing leaks into other files either.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  createRouterTransport,
  type Interceptor,
} from "@connectrpc/connect";
import { createRemoteJWKSet, decodeJwt, jwtVerify } from "jose";
import { createIdTokenInterceptor } from "../../client/id-token-interceptor.ts";
import { createIdTokenSource } from "../../client/id-token.ts";
import { EchoResponseSchema, EchoService } from "../../gen/echo/v1/echo_pb.ts";
import { createIssuer, googleIssuer, type Issuer } from "../../local/issuer.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";

const clientEmail = "client-sa@id-project.iam.gserviceaccount.com";
const audience = "https://gateway.example.gateway.dev";

/** The variables google-auth-library and gcp-metadata read, saved to restore. */
const touchedEnv = [
  "GCE_METADATA_HOST",
  "GCE_METADATA_IP",
  "METADATA_SERVER_DETECTION",
  "GOOGLE_CLOUD_PROJECT",
  "GCLOUD_PROJECT",
  "CLOUDSDK_CONFIG",
  "GOOGLE_APPLICATION_CREDENTIALS",
  "K_SERVICE",
  "CLOUD_RUN_JOB",
  "FUNCTION_NAME",
];

function expectConnectError(code: Code, pattern: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof ConnectError, `expected ConnectError, got ${String(err)}`);
    assert.equal(err.code, code, `${Code[err.code]}: ${err.rawMessage}`);
    assert.match(err.rawMessage, pattern);
    assert.doesNotMatch(err.rawMessage, /\n/, "one line");
    assert.doesNotMatch(err.rawMessage, /eyJ[\w-]+\.eyJ/, "no token in the message");
    return true;
  };
}

describe("createIdTokenSource()", () => {
  let issuer: Issuer;
  let metadata: MetadataServer;
  let tmp: string;
  const savedEnv = new Map<string, string | undefined>();

  before(async () => {
    issuer = await createIssuer();
    metadata = await createMetadataServer({ issuer, email: clientEmail });
    tmp = await mkdtemp(join(tmpdir(), "id-token-test-"));
    const sdkConfig = join(tmp, "gcloud");
    await mkdir(sdkConfig);
    for (const name of touchedEnv) {
      savedEnv.set(name, process.env[name]);
      delete process.env[name];
    }
    // identity.md §7: point ADC at the stand-in and nowhere else — no ping
    // (assume-present), no `gcloud` exec for the project, no developer ADC
    // file (empty CLOUDSDK_CONFIG), no key file, and no "on Google Cloud"
    // markers (K_SERVICE…) that would disable request timeouts.
    process.env.GCE_METADATA_HOST = metadata.host;
    process.env.METADATA_SERVER_DETECTION = "assume-present";
    process.env.GOOGLE_CLOUD_PROJECT = "id-project";
    process.env.CLOUDSDK_CONFIG = sdkConfig;
  });

  after(async () => {
    for (const [name, value] of savedEnv) {
      if (value === undefined) {
        delete process.env[name];
      } else {
        process.env[name] = value;
      }
    }
    await metadata.close();
    await issuer.close();
    await rm(tmp, { recursive: true, force: true });
  });

  async function verify(token: string, aud = audience) {
    const { payload } = await jwtVerify(token, createRemoteJWKSet(new URL(issuer.jwksUri)), {
      issuer: googleIssuer,
      audience: aud,
      algorithms: ["RS256"],
      requiredClaims: ["exp", "iat"],
    });
    return payload;
  }

  describe("from the metadata server (Application Default Credentials)", () => {
    it("gets a token google-auth-library fetched from GCE_METADATA_HOST", async () => {
      metadata.resetCounts();
      const source = createIdTokenSource({ audience });
      const payload = await verify(await source.getIdToken());
      assert.equal(payload.email, clientEmail);
      assert.equal(payload.aud, audience);
      assert.equal(metadata.identityRequests(), 1);
      // Exactly the library's request: format=full and the audience, nothing else asked.
      assert.deepEqual(Object.keys(metadata.requestCounts()), [
        "/computeMetadata/v1/instance/service-accounts/default/identity",
      ]);
    });

    it("shares one metadata request among concurrent first calls", async () => {
      metadata.resetCounts();
      const source = createIdTokenSource({ audience });
      const tokens = await Promise.all(Array.from({ length: 20 }, () => source.getIdToken()));
      assert.equal(new Set(tokens).size, 1);
      assert.equal(metadata.identityRequests(), 1);
    });

    it("reuses the token until shortly before it expires", async () => {
      metadata.resetCounts();
      const source = createIdTokenSource({ audience });
      const first = await source.getIdToken();
      for (let i = 0; i < 5; i++) {
        assert.equal(await source.getIdToken(), first);
      }
      assert.equal(metadata.identityRequests(), 1);
    });

    it("keeps one token per audience", async () => {
      metadata.resetCounts();
      const source = createIdTokenSource({ audience });
      const other = "https://backend.example.run.app";
      const [a, b] = await Promise.all([source.getIdToken(), source.getIdToken(other)]);
      assert.notEqual(a, b);
      assert.equal((await verify(b, other)).aud, other);
      assert.equal(await source.getIdToken(other), b);
      assert.equal(metadata.identityRequests(), 2);
    });

    it("refreshes a token that enters the refresh threshold, without failing a call", async (t) => {
      const shortLived = await createMetadataServer({
        issuer,
        email: clientEmail,
        tokenLifetimeSeconds: 4,
      });
      t.after(() => shortLived.close());
      process.env.GCE_METADATA_HOST = shortLived.host;
      t.after(() => {
        process.env.GCE_METADATA_HOST = metadata.host;
      });
      const source = createIdTokenSource({ audience, refreshThresholdMs: 2_000 });
      const first = await source.getIdToken();
      assert.equal(await source.getIdToken(), first, "4 s left > 2 s threshold: reused");
      await sleep(2_100);
      // Less than 2 s left now: every caller gets the new token, one fetch.
      const next = await Promise.all(Array.from({ length: 5 }, () => source.getIdToken()));
      assert.equal(new Set(next).size, 1);
      assert.notEqual(next[0], first);
      assert.ok((decodeJwt(next[0] as string).exp as number) > (decodeJwt(first).exp as number));
      assert.equal(shortLived.identityRequests(), 2);
    });

    it("fails with Unavailable, naming GCE_METADATA_HOST, when the metadata server answers 503", async (t) => {
      metadata.setAvailable(false);
      t.after(() => metadata.setAvailable(true));
      const source = createIdTokenSource({ audience });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(
          Code.Unavailable,
          /metadata server at 127\.0\.0\.1:\d+: HTTP 503.*GCE_METADATA_HOST/,
        ),
      );
      // Not cached: once the server is back, the same source succeeds.
      metadata.setAvailable(true);
      await verify(await source.getIdToken());
    });

    it("fails with Unauthenticated, saying what to set, when there are no credentials", async (t) => {
      process.env.METADATA_SERVER_DETECTION = "none";
      t.after(() => {
        process.env.METADATA_SERVER_DETECTION = "assume-present";
      });
      const source = createIdTokenSource({ audience });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(
          Code.Unauthenticated,
          /GOOGLE_APPLICATION_CREDENTIALS.*GCE_METADATA_HOST/,
        ),
      );
    });
  });

  describe("from a metadata server given directly (metadataHost)", () => {
    it("gets tokens without going through GCE_METADATA_HOST", async (t) => {
      const other = await createMetadataServer({
        issuer,
        email: "gateway-sa@id-project.iam.gserviceaccount.com",
      });
      t.after(() => other.close());
      const source = createIdTokenSource({ audience, metadataHost: other.host });
      const tokens = await Promise.all([source.getIdToken(), source.getIdToken()]);
      assert.equal(tokens[0], tokens[1]);
      assert.equal((await verify(tokens[0] as string)).email, other.email);
      assert.equal(other.identityRequests(), 1);
    });

    it("returns the cached token while a refresh fails and it has not expired", async (t) => {
      const flaky = await createMetadataServer({
        issuer,
        email: clientEmail,
        tokenLifetimeSeconds: 5,
      });
      t.after(() => flaky.close());
      const warnings: object[] = [];
      const source = createIdTokenSource({
        audience,
        metadataHost: flaky.host,
        refreshThresholdMs: 4_500,
        logger: { warn: (obj) => warnings.push(obj) },
      });
      const first = await source.getIdToken();
      await sleep(700); // now inside the 4.5 s threshold, but still valid
      flaky.setAvailable(false);
      assert.equal(await source.getIdToken(), first);
      assert.equal(warnings.length, 1);
      assert.doesNotMatch(JSON.stringify(warnings), /eyJ/, "the warning holds no token");
      flaky.setAvailable(true);
      flaky.resetCounts();
      await verify(await source.getIdToken());
      assert.equal(flaky.identityRequests(), 1, "the next call refreshes again");
    });

    it("fails with Unavailable when the metadata server is gone", async () => {
      const gone = await createMetadataServer({ issuer, email: clientEmail });
      const host = gone.host;
      await gone.close();
      const source = createIdTokenSource({ audience, metadataHost: host });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(Code.Unavailable, /ECONNREFUSED/),
      );
    });

    it("refuses to combine metadataHost with a key file", () => {
      assert.throws(
        () => createIdTokenSource({ metadataHost: "127.0.0.1:1", keyFile: "key.json" }),
        TypeError,
      );
    });
  });

  describe("from a service-account key file", () => {
    const keyEmail = "key-sa@id-project.iam.gserviceaccount.com";

    it("exchanges a signed assertion at the stand-in's token endpoint", async () => {
      const keyFile = join(tmp, "key.json");
      await writeFile(keyFile, JSON.stringify(await issuer.createServiceAccountKey(keyEmail)));
      issuer.resetCounts();
      metadata.resetCounts();
      const source = createIdTokenSource({ audience, keyFile });
      const tokens = await Promise.all(Array.from({ length: 5 }, () => source.getIdToken()));
      assert.equal(new Set(tokens).size, 1);
      const payload = await verify(tokens[0] as string);
      assert.equal(payload.email, keyEmail);
      assert.equal(issuer.requestCount("/token"), 1);
      assert.equal(metadata.identityRequests(), 0, "the key file, not the metadata server");
    });

    it("fails with Unauthenticated when the token endpoint rejects the key", async () => {
      const key = await issuer.createServiceAccountKey(keyEmail);
      const stranger = await issuer.createServiceAccountKey(
        "stranger@id-project.iam.gserviceaccount.com",
      );
      const keyFile = join(tmp, "wrong-key.json");
      await writeFile(keyFile, JSON.stringify({ ...key, private_key: stranger.private_key }));
      const source = createIdTokenSource({ audience, keyFile });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(Code.Unauthenticated, /refused \(HTTP 400 invalid_grant\).*key file/),
      );
    });

    it("fails with Unauthenticated naming the file when it cannot be read", async () => {
      const keyFile = join(tmp, "missing.json");
      const source = createIdTokenSource({ audience, keyFile });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(Code.Unauthenticated, /missing\.json \(ENOENT\).*--service-account/),
      );
    });

    it("fails with Unauthenticated when the file is not a service-account key", async () => {
      const keyFile = join(tmp, "user.json");
      await writeFile(keyFile, JSON.stringify({ type: "authorized_user", refresh_token: "x" }));
      await assert.rejects(
        createIdTokenSource({ audience, keyFile }).getIdToken(),
        expectConnectError(Code.Unauthenticated, /not a service-account key/),
      );
    });

    it("posts to tokenUrl when given, over the key file's token_uri", async () => {
      const keyFile = join(tmp, "override.json");
      await writeFile(keyFile, JSON.stringify(await issuer.createServiceAccountKey(keyEmail)));
      issuer.resetCounts();
      // A closed loopback port: the call fails there, and the stand-in named
      // by the file's token_uri never hears of it.
      const source = createIdTokenSource({
        audience,
        keyFile,
        tokenUrl: "http://127.0.0.1:9/token",
      });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(
          Code.Unavailable,
          /token endpoint http:\/\/127\.0\.0\.1:9\/token.*unreachable/,
        ),
      );
      assert.equal(issuer.requestCount("/token"), 0);
    });
  });

  describe("by impersonation", () => {
    const target = "target-sa@id-project.iam.gserviceaccount.com";

    it("uses the metadata server's access token to call generateIdToken", async () => {
      issuer.resetCounts();
      metadata.resetCounts();
      const source = createIdTokenSource({
        audience,
        impersonateServiceAccount: target,
        impersonationEndpoint: issuer.url,
      });
      const payload = await verify(await source.getIdToken());
      assert.equal(payload.email, target);
      assert.equal(payload.azp, target);
      assert.equal(
        issuer.requestCount(`/v1/projects/-/serviceAccounts/${target}:generateIdToken`),
        1,
      );
      assert.equal(
        metadata.requestCounts()["/computeMetadata/v1/instance/service-accounts/default/token"],
        1,
      );
      assert.equal(metadata.identityRequests(), 0);
    });

    it("uses a key file's access token as the source", async () => {
      const keyFile = join(tmp, "source-key.json");
      const sourceEmail = "source-sa@id-project.iam.gserviceaccount.com";
      await writeFile(keyFile, JSON.stringify(await issuer.createServiceAccountKey(sourceEmail)));
      issuer.resetCounts();
      const source = createIdTokenSource({
        audience,
        keyFile,
        impersonateServiceAccount: target,
        impersonationEndpoint: issuer.url,
      });
      assert.equal((await verify(await source.getIdToken())).email, target);
      assert.equal(issuer.requestCount("/token"), 1, "access token for the source");
    });

    it("fails with Unauthenticated when the source may not impersonate the target", async (t) => {
      const strict = await createIssuer({ canImpersonate: () => false });
      t.after(() => strict.close());
      const strictMetadata = await createMetadataServer({ issuer: strict, email: clientEmail });
      t.after(() => strictMetadata.close());
      const source = createIdTokenSource({
        audience,
        impersonateServiceAccount: target,
        impersonationEndpoint: strict.url,
      });
      process.env.GCE_METADATA_HOST = strictMetadata.host;
      t.after(() => {
        process.env.GCE_METADATA_HOST = metadata.host;
      });
      await assert.rejects(
        source.getIdToken(),
        expectConnectError(
          Code.Unauthenticated,
          /refused \(HTTP 403 PERMISSION_DENIED\).*serviceAccountTokenCreator/,
        ),
      );
    });
  });

  it("rejects a call without audience when none is configured", async () => {
    await assert.rejects(createIdTokenSource().getIdToken(), TypeError);
  });
});

describe("createIdTokenInterceptor()", () => {
  /** An in-memory Echo service that answers with the authorization header it received. */
  function clientWith(interceptors: Interceptor[], onCall: () => void = () => {}) {
    return createClient(
      EchoService,
      createRouterTransport(
        ({ service }) => {
          service(EchoService, {
            echo(_req, ctx) {
              onCall();
              return create(EchoResponseSchema, {
                message: ctx.requestHeader.get("authorization") ?? "",
              });
            },
          });
        },
        { transport: { interceptors } },
      ),
    );
  }

  it("sends authorization: Bearer <token> on every call, replacing any other", async () => {
    const audiences: (string | undefined)[] = [];
    const source = {
      async getIdToken(aud?: string) {
        audiences.push(aud);
        return `token-for-${aud ?? "default"}`;
      },
    };
    assert.equal((await clientWith([]).echo({ message: "x" })).message, "", "baseline");
    const client = clientWith([createIdTokenInterceptor(source, { audience: "aud-1" })]);
    for (let i = 0; i < 3; i++) {
      const res = await client.echo(
        { message: "x" },
        { headers: { authorization: "Bearer stale" } },
      );
      assert.equal(res.message, "Bearer token-for-aud-1");
    }
    assert.deepEqual(audiences, ["aud-1", "aud-1", "aud-1"]);
  });

  it("fails the call with the source's error, before sending anything", async () => {
    let served = 0;
    const failing = {
      async getIdToken(): Promise<string> {
        throw new ConnectError(
          "no credentials: set GOOGLE_APPLICATION_CREDENTIALS",
          Code.Unauthenticated,
        );
      },
    };
    const client = clientWith([createIdTokenInterceptor(failing)], () => served++);
    await assert.rejects(client.echo({ message: "x" }), (err: ConnectError) => {
      assert.equal(err.code, Code.Unauthenticated);
      assert.match(err.rawMessage, /GOOGLE_APPLICATION_CREDENTIALS/);
      return true;
    });
    assert.equal(served, 0);
  });
});

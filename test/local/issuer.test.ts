import assert from "node:assert/strict";
import { createHmac, createPublicKey, X509Certificate } from "node:crypto";
import { after, before, describe, it } from "node:test";
import {
  createLocalJWKSet,
  decodeJwt,
  decodeProtectedHeader,
  importPKCS8,
  importX509,
  type JWK,
  jwtVerify,
  SignJWT,
} from "jose";
import {
  createIssuer,
  googleIssuer,
  googleTokenUrl,
  type Issuer,
  signatureRemovedByGoogle,
} from "../../local/issuer.ts";

const audience = "https://echo.example.run.app";
const email = "someone@stand-in-project.iam.gserviceaccount.com";

async function getJson(url: string): Promise<{ status: number; body: unknown; headers: Headers }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.json(), headers: res.headers };
}

async function jwks(issuer: Issuer): Promise<{ keys: JWK[] }> {
  return (await getJson(issuer.jwksUri)).body as { keys: JWK[] };
}

function segments(token: string): [string, string, string] {
  const [h = "", p = "", s = ""] = token.split(".");
  return [h, p, s];
}

/** A jwt-bearer assertion as google-auth-library's key-file flow builds it. */
async function assertion(
  privateKeyPem: string,
  claims: Record<string, unknown>,
  nowSeconds = Math.floor(Date.now() / 1000),
): Promise<string> {
  return new SignJWT({ aud: googleTokenUrl, iat: nowSeconds, exp: nowSeconds + 3600, ...claims })
    .setProtectedHeader({ alg: "RS256" })
    .sign(await importPKCS8(privateKeyPem, "RS256"));
}

async function postToken(issuer: Issuer, form: Record<string, string>) {
  const res = await fetch(issuer.tokenUri, { method: "POST", body: new URLSearchParams(form) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function generateIdToken(
  issuer: Issuer,
  target: string,
  accessToken: string | undefined,
  body: unknown,
) {
  const res = await fetch(`${issuer.url}/v1/projects/-/serviceAccounts/${target}:generateIdToken`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(accessToken ? { authorization: `Bearer ${accessToken}` } : {}),
    },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

describe("createIssuer()", () => {
  let issuer: Issuer;
  before(async () => {
    issuer = await createIssuer();
  });
  after(() => issuer.close());

  it("listens on loopback and serves OpenID discovery", async () => {
    assert.match(issuer.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    const { status, body } = await getJson(`${issuer.url}/.well-known/openid-configuration`);
    assert.equal(status, 200);
    assert.deepEqual(
      {
        ...(body as Record<string, unknown>),
        response_types_supported: undefined,
        subject_types_supported: undefined,
        claims_supported: undefined,
      },
      {
        issuer: googleIssuer,
        jwks_uri: issuer.jwksUri,
        token_endpoint: issuer.tokenUri,
        id_token_signing_alg_values_supported: ["RS256"],
        response_types_supported: undefined,
        subject_types_supported: undefined,
        claims_supported: undefined,
      },
    );
  });

  it("publishes the public key as a JWKS with kid, alg and use, and nothing private", async () => {
    const { keys } = await jwks(issuer);
    assert.equal(keys.length, 1);
    const [key] = keys;
    assert.equal(key?.kid, issuer.currentKid);
    assert.match(issuer.currentKid, /^[0-9a-f]{40}$/);
    assert.equal(key?.alg, "RS256");
    assert.equal(key?.use, "sig");
    assert.equal(key?.kty, "RSA");
    assert.equal(key?.d, undefined);
    assert.equal(key?.p, undefined);
  });

  it("publishes a self-signed X.509 certificate of the same key, keyed by kid", async () => {
    const { status, body } = await getJson(issuer.x509Uri);
    assert.equal(status, 200);
    const map = body as Record<string, string>;
    assert.deepEqual(Object.keys(map), [issuer.currentKid]);
    const pem = map[issuer.currentKid] as string;
    assert.match(
      pem,
      /^-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n$/,
    );
    const cert = new X509Certificate(pem);
    assert.equal(cert.verify(cert.publicKey), true, "self-signed signature checks out");
    assert.equal(cert.ca, false);
    assert.ok(new Date(cert.validFrom) <= new Date() && new Date() < new Date(cert.validTo));
    const [jwk] = (await jwks(issuer)).keys;
    const fromCert = cert.publicKey.export({ format: "jwk" });
    assert.equal(fromCert.n, jwk?.n);
    assert.equal(fromCert.e, jwk?.e);
    // jose's own certificate parser reads it too, and its key verifies tokens.
    const token = await issuer.sign({ aud: audience, email });
    const { payload } = await jwtVerify(token, await importX509(pem, "RS256"));
    assert.equal(payload.email, email);
  });

  it("signs Google-shaped ID tokens that verify against the JWKS", async () => {
    const before = Math.floor(Date.now() / 1000);
    const token = await issuer.sign({ aud: audience, email });
    const header = decodeProtectedHeader(token);
    assert.deepEqual(header, { alg: "RS256", kid: issuer.currentKid, typ: "JWT" });
    const { payload } = await jwtVerify(token, createLocalJWKSet(await jwks(issuer)), {
      issuer: googleIssuer,
      audience,
      algorithms: ["RS256"],
    });
    const sub = issuer.subjectFor(email);
    assert.match(sub, /^1\d{20}$/);
    assert.equal(payload.sub, sub);
    assert.equal(payload.azp, sub);
    assert.equal(payload.email, email);
    assert.equal(payload.email_verified, true);
    assert.ok((payload.iat as number) >= before);
    assert.equal((payload.exp as number) - (payload.iat as number), 3600);
  });

  it("lets a token override or omit any claim", async () => {
    const token = await issuer.sign(
      { aud: ["a", "b"], email, iss: "accounts.google.com", azp: undefined, custom: 1 },
      { nowSeconds: 1_000, lifetimeSeconds: 10 },
    );
    const claims = decodeJwt(token);
    assert.equal(claims.iss, "accounts.google.com");
    assert.deepEqual(claims.aud, ["a", "b"]);
    assert.equal("azp" in claims, false);
    assert.equal(claims.custom, 1);
    assert.equal(claims.iat, 1_000);
    assert.equal(claims.exp, 1_010);
  });

  it("uses the issuer configured per stand-in", async () => {
    const other = await createIssuer({
      issuer: "https://issuer.example",
      tokenLifetimeSeconds: 60,
    });
    try {
      const claims = decodeJwt(await other.sign({ aud: audience }));
      assert.equal(claims.iss, "https://issuer.example");
      assert.equal((claims.exp as number) - (claims.iat as number), 60);
      const { body } = await getJson(`${other.url}/.well-known/openid-configuration`);
      assert.equal((body as { issuer: string }).issuer, "https://issuer.example");
    } finally {
      await other.close();
    }
  });

  it("builds the tokens of negative tests", async () => {
    const local = createLocalJWKSet(await jwks(issuer));

    const none = await issuer.sign({ aud: audience }, { alg: "none" });
    assert.equal(decodeProtectedHeader(none).alg, "none");
    assert.equal(segments(none)[2], "");

    // HS256 keyed with the public key's PEM: the classic alg-confusion forgery.
    const hs = await issuer.sign({ aud: audience }, { alg: "HS256" });
    const [h, p, s] = segments(hs);
    const pem = createPublicKey({ key: (await jwks(issuer)).keys[0] as JWK, format: "jwk" })
      .export({ type: "spki", format: "pem" })
      .toString();
    assert.equal(createHmac("sha256", pem).update(`${h}.${p}`).digest("base64url"), s);

    const unknownKid = await issuer.sign({ aud: audience }, { header: { kid: "nope" } });
    assert.equal(decodeProtectedHeader(unknownKid).kid, "nope");
    const noKid = await issuer.sign({ aud: audience }, { header: { kid: undefined } });
    assert.equal(decodeProtectedHeader(noKid).kid, undefined);

    const corrupt = await issuer.sign({ aud: audience }, { signature: "corrupt" });
    await assert.rejects(jwtVerify(corrupt, local), {
      code: "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    });
    const removed = await issuer.sign({ aud: audience }, { signature: "removed" });
    assert.equal(segments(removed)[2], signatureRemovedByGoogle);
    const empty = await issuer.sign({ aud: audience }, { signature: "empty" });
    assert.equal(segments(empty)[2], "");
  });

  it("rotates keys, keeping the previous one published and able to sign", async () => {
    const rotating = await createIssuer();
    try {
      const first = rotating.currentKid;
      const second = await rotating.rotate();
      assert.notEqual(second, first);
      assert.equal(rotating.currentKid, second);
      assert.deepEqual(
        (await jwks(rotating)).keys.map((k) => k.kid),
        [second, first],
      );
      assert.deepEqual(Object.keys((await getJson(rotating.x509Uri)).body as object), [
        second,
        first,
      ]);
      const old = await rotating.sign({ aud: audience }, { key: "previous" });
      assert.equal(decodeProtectedHeader(old).kid, first);
      await jwtVerify(old, createLocalJWKSet(await jwks(rotating)));

      const third = await rotating.rotate();
      assert.deepEqual(rotating.publishedKids(), [third, second]);
      await assert.rejects(jwtVerify(old, createLocalJWKSet(await jwks(rotating))), {
        code: "ERR_JWKS_NO_MATCHING_KEY",
      });
    } finally {
      await rotating.close();
    }
  });

  it("answers 503 on the key endpoints while unavailable, and counts requests per path", async () => {
    issuer.resetCounts();
    issuer.setAvailable(false);
    try {
      for (const url of [
        issuer.jwksUri,
        issuer.x509Uri,
        `${issuer.url}/.well-known/openid-configuration`,
      ]) {
        assert.equal((await fetch(url)).status, 503, url);
      }
      // The token endpoint is not a key endpoint: it keeps answering.
      const { status } = await postToken(issuer, { grant_type: "password" });
      assert.equal(status, 400);
    } finally {
      issuer.setAvailable(true);
    }
    assert.equal((await fetch(issuer.jwksUri)).status, 200);
    assert.equal(issuer.requestCount("/oauth2/v3/certs"), 2);
    assert.equal(issuer.requestCount("/oauth2/v1/certs"), 1);
    assert.equal(issuer.requestCount("/token"), 1);
    assert.equal(issuer.requestCounts()["/.well-known/openid-configuration"], 1);
  });

  describe("token endpoint (jwt-bearer grant)", () => {
    const saEmail = "key-user@stand-in-project.iam.gserviceaccount.com";

    it("creates key files google-auth-library can read", async () => {
      const key = await issuer.createServiceAccountKey(saEmail);
      assert.equal(key.type, "service_account");
      assert.equal(key.client_email, saEmail);
      assert.equal(key.project_id, "stand-in-project");
      assert.equal(key.token_uri, issuer.tokenUri);
      assert.equal(key.client_id, issuer.subjectFor(saEmail));
      assert.match(key.private_key, /^-----BEGIN PRIVATE KEY-----\n/);
      assert.match(key.private_key_id, /^[0-9a-f]{40}$/);
    });

    it("exchanges an assertion with target_audience for an ID token", async () => {
      const key = await issuer.createServiceAccountKey(saEmail);
      const { status, body } = await postToken(issuer, {
        grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion: await assertion(key.private_key, { iss: saEmail, target_audience: audience }),
      });
      assert.equal(status, 200);
      const { payload } = await jwtVerify(
        body.id_token as string,
        createLocalJWKSet(await jwks(issuer)),
        { audience, issuer: googleIssuer },
      );
      assert.equal(payload.email, saEmail);
      assert.equal(payload.sub, issuer.subjectFor(saEmail));
    });

    it("exchanges an assertion without target_audience for an access token", async () => {
      const key = await issuer.createServiceAccountKey(saEmail);
      const { status, body } = await postToken(issuer, {
        grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion: await assertion(key.private_key, {
          iss: saEmail,
          scope: "https://www.googleapis.com/auth/cloud-platform",
        }),
      });
      assert.equal(status, 200);
      assert.equal(body.token_type, "Bearer");
      assert.equal(issuer.accessTokenOwner(body.access_token as string), saEmail);
    });

    const rejected: {
      desc: string;
      form: (key: { private_key: string }, otherKey: string) => Promise<Record<string, string>>;
      error: string;
    }[] = [
      {
        desc: "a wrong grant type",
        form: async () => ({ grant_type: "client_credentials" }),
        error: "unsupported_grant_type",
      },
      {
        desc: "a malformed assertion",
        form: async () => ({
          grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
          assertion: "a.b",
        }),
        error: "invalid_grant",
      },
      {
        desc: "an assertion signed by another account's key",
        form: async (_key, otherKey) => ({
          grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
          assertion: await assertion(otherKey, { iss: saEmail, target_audience: audience }),
        }),
        error: "invalid_grant",
      },
      {
        desc: "an assertion naming an unknown account",
        form: async (key) => ({
          grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
          assertion: await assertion(key.private_key, {
            iss: "nobody@stand-in-project.iam.gserviceaccount.com",
            target_audience: audience,
          }),
        }),
        error: "invalid_grant",
      },
      {
        desc: "an expired assertion",
        form: async (key) => ({
          grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
          assertion: await assertion(
            key.private_key,
            { iss: saEmail, target_audience: audience },
            Math.floor(Date.now() / 1000) - 7200,
          ),
        }),
        error: "invalid_grant",
      },
      {
        desc: "an assertion for another audience",
        form: async (key) => ({
          grant_type: "urn:ietf:params:oauth:grant-type:jwt-bearer",
          assertion: await assertion(key.private_key, {
            iss: saEmail,
            aud: "https://elsewhere.example/token",
            target_audience: audience,
          }),
        }),
        error: "invalid_grant",
      },
    ];
    for (const tc of rejected) {
      it(`rejects ${tc.desc} with 400 ${tc.error}`, async () => {
        const key = await issuer.createServiceAccountKey(saEmail);
        const other = await issuer.createServiceAccountKey(
          "other@stand-in-project.iam.gserviceaccount.com",
        );
        const { status, body } = await postToken(issuer, await tc.form(key, other.private_key));
        assert.equal(status, 400);
        assert.equal(body.error, tc.error);
        assert.equal(body.id_token, undefined);
      });
    }
  });

  describe("generateIdToken (impersonation)", () => {
    const target = "target@stand-in-project.iam.gserviceaccount.com";

    it("mints a token for the target when called with a valid access token", async () => {
      const { access_token } = issuer.issueAccessToken(
        "source@stand-in-project.iam.gserviceaccount.com",
      );
      const { status, body } = await generateIdToken(issuer, target, access_token, {
        audience,
        includeEmail: true,
        useEmailAzp: true,
      });
      assert.equal(status, 200);
      const { payload } = await jwtVerify(
        body.token as string,
        createLocalJWKSet(await jwks(issuer)),
        {
          audience,
        },
      );
      assert.equal(payload.email, target);
      assert.equal(payload.azp, target);
      assert.equal(payload.sub, issuer.subjectFor(target));
    });

    it("leaves the email out unless includeEmail is set, as Google does", async () => {
      const { access_token } = issuer.issueAccessToken("source@x.iam.gserviceaccount.com");
      const { body } = await generateIdToken(issuer, target, access_token, { audience });
      const claims = decodeJwt(body.token as string);
      assert.equal(claims.email, undefined);
      assert.equal(claims.azp, issuer.subjectFor(target));
    });

    it("answers 401 without a known access token", async () => {
      assert.equal((await generateIdToken(issuer, target, undefined, { audience })).status, 401);
      const { status, body } = await generateIdToken(issuer, target, "ya29.forged", { audience });
      assert.equal(status, 401);
      assert.equal((body.error as { status: string }).status, "UNAUTHENTICATED");
    });

    it("answers 400 without an audience", async () => {
      const { access_token } = issuer.issueAccessToken("source@x.iam.gserviceaccount.com");
      assert.equal((await generateIdToken(issuer, target, access_token, {})).status, 400);
    });

    it("answers 403 when the caller may not impersonate the target", async () => {
      const strict = await createIssuer({
        canImpersonate: (caller) => caller.startsWith("admin@"),
      });
      try {
        const denied = strict.issueAccessToken("someone@x.iam.gserviceaccount.com");
        const { status, body } = await generateIdToken(strict, target, denied.access_token, {
          audience,
        });
        assert.equal(status, 403);
        assert.equal((body.error as { status: string }).status, "PERMISSION_DENIED");
        const allowed = strict.issueAccessToken("admin@x.iam.gserviceaccount.com");
        assert.equal(
          (await generateIdToken(strict, target, allowed.access_token, { audience })).status,
          200,
        );
      } finally {
        await strict.close();
      }
    });
  });

  it("refuses connections after close()", async () => {
    const closing = await createIssuer();
    const url = closing.jwksUri;
    assert.equal((await fetch(url)).status, 200);
    await closing.close();
    await assert.rejects(fetch(url), (err: Error) => {
      assert.equal((err.cause as { code?: string }).code, "ECONNREFUSED");
      return true;
    });
  });
});

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createRemoteKeySet, type RemoteKeySet } from "../../lib/jwt-keys.ts";
import {
  createIssuer,
  type Issuer,
  type SignOptions,
  type TokenClaims,
} from "../../local/issuer.ts";
import {
  type CallerVerifier,
  createCallerVerifier,
  defaultServerAuthConfig,
  headerApiUserInfo,
  type ServerAuthConfig,
} from "../../server/auth.ts";

const audience = "https://echo-abc-uc.a.run.app";
const gatewayEmail = "gateway-sa@stand-in-project.iam.gserviceaccount.com";
const strangerEmail = "stranger@other-project.iam.gserviceaccount.com";

function config(overrides: Partial<ServerAuthConfig>): ServerAuthConfig {
  return { ...defaultServerAuthConfig, audiences: [audience], ...overrides };
}

function headers(token?: string, extra: Record<string, string> = {}): Headers {
  return new Headers({
    ...(token === undefined ? {} : { authorization: `Bearer ${token}` }),
    ...extra,
  });
}

function rejectsWith(code: Code, message: string | RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof ConnectError, `expected ConnectError, got ${String(err)}`);
    assert.equal(Code[err.code], Code[code], err.rawMessage);
    if (typeof message === "string") {
      assert.equal(err.rawMessage, message);
    } else {
      assert.match(err.rawMessage, message);
    }
    assert.doesNotMatch(err.rawMessage, /eyJ/, "never echoes the token");
    return true;
  };
}

/** Counts key lookups, i.e. signature checks, of a real key set. */
function countingKeySet(inner: RemoteKeySet): RemoteKeySet & { lookups: () => number } {
  let lookups = 0;
  const fn = (...args: Parameters<RemoteKeySet>) => {
    lookups++;
    return inner(...args);
  };
  return Object.assign(fn, {
    url: inner.url,
    reload: inner.reload,
    warm: inner.warm,
    status: inner.status,
    close: inner.close,
    lookups: () => lookups,
  });
}

function base64urlJson(value: unknown): string {
  return Buffer.from(JSON.stringify(value)).toString("base64url");
}

describe("createCallerVerifier()", () => {
  let issuer: Issuer;
  const verifiers: CallerVerifier[] = [];
  const track = (v: CallerVerifier) => {
    verifiers.push(v);
    return v;
  };
  const sign = (claims: TokenClaims = {}, options?: SignOptions) =>
    issuer.sign({ aud: audience, email: gatewayEmail, ...claims }, options);

  before(async () => {
    issuer = await createIssuer();
  });
  after(async () => {
    for (const v of verifiers) {
      v.close();
    }
    await issuer.close();
  });

  describe('mode "verify"', () => {
    let verifier: CallerVerifier;
    before(() => {
      verifier = track(
        createCallerVerifier(
          config({ mode: "verify", jwksUri: issuer.jwksUri, allowedPrincipals: [gatewayEmail] }),
        ),
      );
    });

    it("returns the verified principal", async () => {
      const caller = await verifier.verify(headers(await sign()));
      assert.equal(caller.verification, "verified");
      assert.equal(caller.principal?.email, gatewayEmail);
      assert.equal(caller.principal?.subject, issuer.subjectFor(gatewayEmail));
      assert.equal(caller.principal?.issuer, "https://accounts.google.com");
      assert.equal(caller.endUser, undefined);
    });

    it("accepts the scheme in any case and both Google issuer spellings", async () => {
      const token = await sign({ iss: "accounts.google.com" });
      const caller = await verifier.verify(new Headers({ authorization: `bearer ${token}` }));
      assert.equal(caller.principal?.issuer, "accounts.google.com");
    });

    it("accepts a token whose aud list contains the audience", async () => {
      const caller = await verifier.verify(
        headers(await sign({ aud: ["https://other", audience] })),
      );
      assert.equal(caller.verification, "verified");
    });

    const now = () => Math.floor(Date.now() / 1000);
    const badTokens: {
      desc: string;
      header: () => Promise<Headers>;
      code: Code;
      message: string | RegExp;
    }[] = [
      {
        desc: "no authorization header",
        header: async () => headers(),
        code: Code.Unauthenticated,
        message: "missing bearer token",
      },
      {
        desc: "`Bearer` with nothing",
        header: async () => new Headers({ authorization: "Bearer" }),
        code: Code.Unauthenticated,
        message: "missing bearer token",
      },
      {
        desc: "`Bearer ` and spaces",
        header: async () => new Headers({ authorization: "Bearer    " }),
        code: Code.Unauthenticated,
        message: "missing bearer token",
      },
      {
        desc: "another scheme",
        header: async () => new Headers({ authorization: `Basic ${btoa("a:b")}` }),
        code: Code.Unauthenticated,
        message: "missing bearer token",
      },
      {
        desc: "not a JWT",
        header: async () => headers("not-a-jwt"),
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "malformed base64",
        header: async () => headers("e%%.e%%.s%%"),
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "a header that is not JSON",
        header: async () => {
          const [, p, s] = (await sign()).split(".");
          return headers(`${Buffer.from("{alg").toString("base64url")}.${p}.${s}`);
        },
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "expired (beyond the 60 s skew)",
        header: async () => headers(await sign({}, { nowSeconds: now() - 3_700 })),
        code: Code.Unauthenticated,
        message: "invalid token: expired",
      },
      {
        desc: "not yet valid (nbf in the future)",
        header: async () => headers(await sign({ nbf: now() + 600 })),
        code: Code.Unauthenticated,
        message: "invalid token: not yet valid",
      },
      {
        desc: "wrong audience",
        header: async () => headers(await sign({ aud: "https://someone-else.run.app" })),
        code: Code.Unauthenticated,
        message: "invalid token: audience mismatch",
      },
      {
        desc: "wrong issuer",
        header: async () => headers(await sign({ iss: "https://evil.example" })),
        code: Code.Unauthenticated,
        message: "invalid token: issuer mismatch",
      },
      {
        desc: "no exp",
        header: async () => headers(await sign({ exp: undefined })),
        code: Code.Unauthenticated,
        message: "invalid token: missing exp claim",
      },
      {
        desc: "no iat",
        header: async () => headers(await sign({ iat: undefined })),
        code: Code.Unauthenticated,
        message: "invalid token: missing iat claim",
      },
      {
        desc: "alg none",
        header: async () => headers(await sign({}, { alg: "none" })),
        code: Code.Unauthenticated,
        message: "invalid token: algorithm not allowed",
      },
      {
        desc: "HS256 signed with the public key as secret",
        header: async () => headers(await sign({}, { alg: "HS256" })),
        code: Code.Unauthenticated,
        message: "invalid token: algorithm not allowed",
      },
      {
        desc: "RS256 header over an HS256 signature",
        header: async () => headers(await sign({}, { alg: "HS256", header: { alg: "RS256" } })),
        code: Code.Unauthenticated,
        message: "invalid token: bad signature",
      },
      {
        desc: "unknown kid",
        header: async () => headers(await sign({}, { header: { kid: "0123456789abcdef" } })),
        code: Code.Unauthenticated,
        message: "invalid token: no signing key matches kid",
      },
      {
        desc: "bad signature",
        header: async () => headers(await sign({}, { signature: "corrupt" })),
        code: Code.Unauthenticated,
        message: "invalid token: bad signature",
      },
      {
        desc: "signature removed by Cloud Run",
        header: async () => headers(await sign({}, { signature: "removed" })),
        code: Code.Unauthenticated,
        message: "invalid token: bad signature",
      },
      {
        desc: "empty signature",
        header: async () => headers(await sign({}, { signature: "empty" })),
        code: Code.Unauthenticated,
        message: /^invalid token: (bad signature|malformed)$/,
      },
      {
        desc: "tampered payload",
        header: async () => {
          const [h, , s] = (await sign()).split(".");
          const forged = base64urlJson({
            iss: "https://accounts.google.com",
            aud: audience,
            email: gatewayEmail,
            email_verified: true,
            sub: "1",
            iat: now(),
            exp: now() + 3600,
          });
          return headers(`${h}.${forged}.${s}`);
        },
        code: Code.Unauthenticated,
        message: "invalid token: bad signature",
      },
      {
        desc: "a valid token of a principal not on the allow-list",
        header: async () => headers(await sign({ email: strangerEmail })),
        code: Code.PermissionDenied,
        message: `principal not allowed: ${strangerEmail}`,
      },
      {
        desc: "an allowed email that is not verified",
        header: async () => headers(await sign({ email_verified: false })),
        code: Code.PermissionDenied,
        message: `principal not allowed: ${gatewayEmail}`,
      },
    ];
    for (const tc of badTokens) {
      it(`rejects ${tc.desc} with ${Code[tc.code]}`, async () => {
        await assert.rejects(verifier.verify(await tc.header()), rejectsWith(tc.code, tc.message));
      });
    }

    it("tolerates clockSkewSeconds of expiry", async () => {
      const justExpired = await sign({}, { nowSeconds: now() - 3_630 }); // expired 30 s ago
      assert.equal((await verifier.verify(headers(justExpired))).verification, "verified");
      const strict = track(
        createCallerVerifier(
          config({ mode: "verify", jwksUri: issuer.jwksUri, clockSkewSeconds: 0 }),
        ),
      );
      await assert.rejects(
        strict.verify(headers(justExpired)),
        rejectsWith(Code.Unauthenticated, "invalid token: expired"),
      );
    });

    it("never crashes or answers OK on garbage", async () => {
      const valid = await sign();
      // Flip one character inside a segment. The last character of a segment
      // is skipped: some of its bits are base64 padding, so changing it may
      // leave the decoded bytes, and the token, valid.
      const mutations = Array.from({ length: 40 }, (_, i) => {
        const chars = [...valid];
        let at = (i * 37) % (chars.length - 1);
        while (chars[at] === "." || chars[at + 1] === "." || at + 1 >= chars.length) {
          at = (at + 1) % (chars.length - 1);
        }
        chars[at] = chars[at] === "A" ? "B" : "A";
        return chars.join("");
      });
      const samples = [
        ...Array.from({ length: 30 }, () => randomBytes(40).toString("base64url")),
        ...mutations,
        "..",
        "a.b.c.d",
        `${valid}.`,
        `${valid}x`,
        valid.split(".").slice(0, 2).join("."),
      ];
      for (const sample of samples) {
        if (sample === valid) {
          continue;
        }
        await assert.rejects(
          verifier.verify(new Headers({ authorization: `Bearer ${sample}` })),
          (err) => {
            assert.ok(err instanceof ConnectError);
            assert.ok(
              err.code === Code.Unauthenticated || err.code === Code.PermissionDenied,
              `${sample}: ${Code[err.code]} ${err.rawMessage}`,
            );
            return true;
          },
        );
      }
    });

    it("verifies each token's signature once, then remembers it until it expires", async () => {
      let clock = Date.now();
      const keys = countingKeySet(createRemoteKeySet({ url: issuer.jwksUri }));
      const cached = track(
        createCallerVerifier(config({ mode: "verify", jwksUri: issuer.jwksUri }), {
          keySet: keys,
          now: () => clock,
        }),
      );
      const token = await sign({}, { lifetimeSeconds: 600 });
      for (let i = 0; i < 5; i++) {
        assert.equal((await cached.verify(headers(token))).principal?.email, gatewayEmail);
      }
      assert.equal(keys.lookups(), 1);
      const other = await sign({ n: 2 });
      await cached.verify(headers(other));
      assert.equal(keys.lookups(), 2);

      clock += 661_000; // past exp + 60 s skew
      await assert.rejects(
        cached.verify(headers(token)),
        rejectsWith(Code.Unauthenticated, "invalid token: expired"),
      );
      keys.close();
    });

    it("accepts a rotated key without restart, and tokens of the previous key", async (t) => {
      const rotating = await createIssuer();
      t.after(() => rotating.close());
      const keys = createRemoteKeySet({ url: rotating.jwksUri, cooldownMs: 100 });
      t.after(() => keys.close());
      const v = track(
        createCallerVerifier(config({ mode: "verify", jwksUri: rotating.jwksUri }), {
          keySet: keys,
        }),
      );
      const mint = (options?: SignOptions) =>
        rotating.sign({ aud: audience, email: gatewayEmail }, options);
      await v.verify(headers(await mint()));
      await rotating.rotate();
      await sleep(150); // Google publishes new keys well before using them
      const caller = await v.verify(headers(await mint()));
      assert.equal(caller.verification, "verified");
      await v.verify(
        headers(await mint({ key: "previous", nowSeconds: Math.floor(Date.now() / 1000) - 1 })),
      );
      assert.equal(rotating.requestCount("/oauth2/v3/certs"), 2);
    });

    it("keeps verifying with cached keys when the JWKS goes down after the first fetch", async (t) => {
      const flaky = await createIssuer();
      t.after(() => flaky.close());
      const keys = createRemoteKeySet({
        url: flaky.jwksUri,
        cacheMaxAgeMs: 50,
        retryAfterErrorMs: 10,
      });
      t.after(() => keys.close());
      const v = track(
        createCallerVerifier(config({ mode: "verify", jwksUri: flaky.jwksUri }), { keySet: keys }),
      );
      const mint = (claims: TokenClaims = {}) =>
        flaky.sign({ aud: audience, email: gatewayEmail, ...claims });
      await v.verify(headers(await mint()));
      flaky.setAvailable(false);
      await sleep(120); // the cache is stale and refreshes failed
      for (let i = 0; i < 3; i++) {
        const caller = await v.verify(headers(await mint({ n: i })));
        assert.equal(caller.verification, "verified");
      }
      assert.ok(flaky.requestCount("/oauth2/v3/certs") > 1, "refreshes were attempted");
      assert.equal(keys.status().lastError?.code, "ERR_JWKS_FETCH");
    });

    it("answers Unavailable when the JWKS cannot be fetched and nothing is cached", async (t) => {
      const down = await createIssuer();
      t.after(() => down.close());
      down.setAvailable(false);
      const v = track(createCallerVerifier(config({ mode: "verify", jwksUri: down.jwksUri })));
      const token = await down.sign({ aud: audience, email: gatewayEmail });
      await assert.rejects(
        v.verify(headers(token)),
        rejectsWith(Code.Unavailable, "cannot verify token: signing keys unavailable"),
      );
      // A bad token is still refused for what it is, before any key is needed.
      await assert.rejects(
        v.verify(headers(await down.sign({ aud: audience }, { alg: "none" }))),
        rejectsWith(Code.Unauthenticated, "invalid token: algorithm not allowed"),
      );
    });

    it("warms its key set on request, reporting whether keys are cached", async (t) => {
      const warmIssuer = await createIssuer();
      t.after(() => warmIssuer.close());
      const v = track(
        createCallerVerifier(config({ mode: "verify", jwksUri: warmIssuer.jwksUri })),
      );
      assert.equal(await v.warm(), true);
      assert.equal(warmIssuer.requestCount("/oauth2/v3/certs"), 1);
      await v.verify(headers(await warmIssuer.sign({ aud: audience, email: gatewayEmail })));
      assert.equal(warmIssuer.requestCount("/oauth2/v3/certs"), 1, "no fetch on the first call");
      warmIssuer.setAvailable(false);
      const cold = track(
        createCallerVerifier(config({ mode: "verify", jwksUri: warmIssuer.jwksUri })),
      );
      assert.equal(await cold.warm(), false);
    });

    it("uses Google's X.509 certificate map as key source", async () => {
      const v = track(createCallerVerifier(config({ mode: "verify", jwksUri: issuer.x509Uri })));
      const caller = await v.verify(headers(await sign()));
      assert.equal(caller.verification, "verified");
      await assert.rejects(
        v.verify(headers(await sign({}, { signature: "corrupt" }))),
        rejectsWith(Code.Unauthenticated, "invalid token: bad signature"),
      );
    });

    it("allows principals by numeric sub and by IAM-style member", async () => {
      const bySub = track(
        createCallerVerifier(
          config({
            mode: "verify",
            jwksUri: issuer.jwksUri,
            allowedPrincipals: [issuer.subjectFor(strangerEmail)],
          }),
        ),
      );
      assert.equal(
        (await bySub.verify(headers(await sign({ email: strangerEmail })))).principal?.email,
        strangerEmail,
      );
      const byMember = track(
        createCallerVerifier(
          config({
            mode: "verify",
            jwksUri: issuer.jwksUri,
            allowedPrincipals: [`serviceAccount:${gatewayEmail.toUpperCase()}`],
          }),
        ),
      );
      await byMember.verify(headers(await sign()));
      await assert.rejects(
        byMember.verify(headers(await sign({ email: strangerEmail }))),
        rejectsWith(Code.PermissionDenied, /^principal not allowed/),
      );
    });

    it("reads the end user forwarded by the gateway", async () => {
      const endUser = {
        iss: "https://accounts.google.com",
        sub: "1234",
        email: "client-sa@stand-in-project.iam.gserviceaccount.com",
        aud: "https://gateway.example",
      };
      const caller = await verifier.verify(
        headers(await sign(), { [headerApiUserInfo]: base64urlJson(endUser) }),
      );
      assert.deepEqual(
        {
          email: caller.endUser?.email,
          subject: caller.endUser?.subject,
          issuer: caller.endUser?.issuer,
        },
        { email: endUser.email, subject: "1234", issuer: endUser.iss },
      );
      // Padded standard base64 (another encoder's spelling) reads the same.
      const padded = Buffer.from(JSON.stringify(endUser)).toString("base64");
      const again = await verifier.verify(headers(await sign(), { [headerApiUserInfo]: padded }));
      assert.equal(again.endUser?.email, endUser.email);
    });

    it("ignores an unreadable end-user header instead of failing the call", async () => {
      for (const value of ["%%%", base64urlJson("a string"), base64urlJson([1]), "e30"]) {
        const caller = await verifier.verify(headers(await sign(), { [headerApiUserInfo]: value }));
        assert.equal(caller.verification, "verified");
        if (value === "e30") {
          assert.deepEqual(caller.endUser?.email, "", "{} is an end user without claims");
        } else {
          assert.equal(caller.endUser, undefined, value);
        }
      }
    });
  });

  describe('mode "cloud-run"', () => {
    let verifier: CallerVerifier;
    before(() => {
      verifier = track(
        createCallerVerifier(config({ mode: "cloud-run", allowedPrincipals: [gatewayEmail] })),
      );
    });

    it("decodes a token whose signature Cloud Run removed", async () => {
      const caller = await verifier.verify(
        headers(await sign({}, { signature: "removed" }), {
          [headerApiUserInfo]: base64urlJson({ email: "user@example.com", sub: "9" }),
        }),
      );
      assert.equal(caller.verification, "decoded");
      assert.equal(caller.principal?.email, gatewayEmail);
      assert.equal(caller.endUser?.email, "user@example.com");
    });

    it("decodes a token with its signature intact, without fetching keys", async () => {
      issuer.resetCounts();
      const caller = await verifier.verify(headers(await sign()));
      assert.equal(caller.verification, "decoded");
      assert.equal(issuer.requestCount("/oauth2/v3/certs"), 0);
    });

    const now = () => Math.floor(Date.now() / 1000);
    const cases: { desc: string; header: () => Promise<Headers>; code: Code; message: string }[] = [
      {
        desc: "no token",
        header: async () => headers(),
        code: Code.Unauthenticated,
        message: "missing bearer token",
      },
      {
        desc: "not a JWT",
        header: async () => headers("abc"),
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "undecodable payload",
        header: async () => headers("eyJhbGciOiJSUzI1NiJ9.%%%.SIGNATURE_REMOVED_BY_GOOGLE"),
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "an empty signature",
        header: async () => headers(await sign({}, { signature: "empty" })),
        code: Code.Unauthenticated,
        message: "invalid token: malformed",
      },
      {
        desc: "alg none",
        header: async () => headers(`${(await sign({}, { alg: "none" })).slice(0, -1)}.x`),
        code: Code.Unauthenticated,
        message: "invalid token: algorithm not allowed",
      },
      {
        desc: "wrong audience",
        header: async () => headers(await sign({ aud: "https://other" }, { signature: "removed" })),
        code: Code.Unauthenticated,
        message: "invalid token: audience mismatch",
      },
      {
        desc: "wrong issuer",
        header: async () => headers(await sign({ iss: "https://evil" }, { signature: "removed" })),
        code: Code.Unauthenticated,
        message: "invalid token: issuer mismatch",
      },
      {
        desc: "expired",
        header: async () =>
          headers(await sign({}, { signature: "removed", nowSeconds: now() - 4_000 })),
        code: Code.Unauthenticated,
        message: "invalid token: expired",
      },
      {
        desc: "no exp",
        header: async () => headers(await sign({ exp: undefined }, { signature: "removed" })),
        code: Code.Unauthenticated,
        message: "invalid token: missing exp claim",
      },
      {
        desc: "not yet valid",
        header: async () => headers(await sign({ nbf: now() + 600 }, { signature: "removed" })),
        code: Code.Unauthenticated,
        message: "invalid token: not yet valid",
      },
      {
        desc: "a principal not on the allow-list",
        header: async () => headers(await sign({ email: strangerEmail }, { signature: "removed" })),
        code: Code.PermissionDenied,
        message: `principal not allowed: ${strangerEmail}`,
      },
    ];
    for (const tc of cases) {
      it(`rejects ${tc.desc} with ${Code[tc.code]}`, async () => {
        await assert.rejects(verifier.verify(await tc.header()), rejectsWith(tc.code, tc.message));
      });
    }
  });

  describe('mode "off"', () => {
    it("reports every caller as unverified and trusts no header", async () => {
      const verifier = createCallerVerifier(defaultServerAuthConfig);
      for (const h of [
        headers(),
        headers("garbage", { [headerApiUserInfo]: base64urlJson({ email: "forged@example.com" }) }),
      ]) {
        const caller = await verifier.verify(h);
        assert.equal(caller.verification, "none");
        assert.equal(caller.principal, undefined);
        assert.equal(caller.endUser, undefined);
      }
    });
  });

  it("refuses a configuration that cannot work, naming the field", () => {
    assert.throws(
      () => createCallerVerifier(config({ mode: "verify", audiences: [] })),
      /ServerAuthConfig: audiences/,
    );
    assert.throws(
      () => createCallerVerifier(config({ mode: "cloud-run", audiences: [""] })),
      /audiences/,
    );
    assert.throws(
      () => createCallerVerifier(config({ mode: "verify", jwksUri: "not a url" })),
      /jwksUri/,
    );
    assert.throws(
      () => createCallerVerifier(config({ mode: "verify", clockSkewSeconds: -1 })),
      /clockSkewSeconds/,
    );
  });
});

import assert from "node:assert/strict";
import { createServer, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, it, type TestContext } from "node:test";
import { errors, jwtVerify } from "jose";
import {
  createRemoteKeySet,
  createVerifiedTokenCache,
  isKeySetUnavailable,
  isNoMatchingKey,
  JWKSFetchFailed,
  type RemoteKeySet,
  toJsonWebKeySet,
} from "../../lib/jwt-keys.ts";
import { createIssuer, type Issuer } from "../../local/issuer.ts";

const audience = "https://echo.example";

/** A loopback server whose answers the test decides; closed after the test. */
async function startServer(
  t: TestContext,
  handler: (res: ServerResponse) => void,
): Promise<{ url: string; requests: () => number }> {
  let requests = 0;
  const server: Server = createServer((_req, res) => {
    requests++;
    handler(res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  );
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/certs`,
    requests: () => requests,
  };
}

function keySet(t: TestContext, options: Parameters<typeof createRemoteKeySet>[0]): RemoteKeySet {
  const keys = createRemoteKeySet(options);
  t.after(() => keys.close());
  return keys;
}

describe("createRemoteKeySet()", () => {
  let issuer: Issuer;
  before(async () => {
    issuer = await createIssuer();
  });
  after(() => issuer.close());

  it("verifies tokens with keys from a JWKS URL, as a jose key function", async (t) => {
    const keys = keySet(t, { url: issuer.jwksUri });
    const token = await issuer.sign({ aud: audience, email: "a@x.iam.gserviceaccount.com" });
    const { payload } = await jwtVerify(token, keys, { audience, algorithms: ["RS256"] });
    assert.equal(payload.email, "a@x.iam.gserviceaccount.com");
    assert.equal(keys.status().format, "jwks");
    assert.deepEqual(keys.status().kids, [issuer.currentKid]);
  });

  it("verifies tokens with keys from Google's X.509 certificate map", async (t) => {
    const keys = keySet(t, { url: issuer.x509Uri });
    const token = await issuer.sign({ aud: audience });
    await jwtVerify(token, keys, { audience, algorithms: ["RS256"] });
    assert.equal(keys.status().format, "x509");
    assert.deepEqual(keys.status().kids, [issuer.currentKid]);
  });

  it("fetches once for many verifications, and once for concurrent first calls", async (t) => {
    issuer.resetCounts();
    const keys = keySet(t, { url: issuer.jwksUri });
    const tokens = await Promise.all(
      Array.from({ length: 10 }, (_, i) => issuer.sign({ aud: audience, n: i })),
    );
    await Promise.all(tokens.map((token) => jwtVerify(token, keys, { audience })));
    for (const token of tokens) {
      await jwtVerify(token, keys, { audience });
    }
    assert.equal(issuer.requestCount("/oauth2/v3/certs"), 1);
    assert.equal(keys.status().fetchCount, 1);
  });

  it("picks up a rotated key on an unknown kid, at most once per cooldown", async (t) => {
    const rotating = await createIssuer();
    t.after(() => rotating.close());
    const keys = keySet(t, { url: rotating.jwksUri, cooldownMs: 300 });
    await jwtVerify(await rotating.sign({ aud: audience }), keys);
    await rotating.rotate();
    const fresh = await rotating.sign({ aud: audience });

    // Within the cooldown the unknown kid is refused without a fetch…
    rotating.resetCounts();
    await assert.rejects(jwtVerify(fresh, keys), (err) => {
      assert.ok(isNoMatchingKey(err));
      assert.equal((err as errors.JOSEError).code, "ERR_JWKS_NO_MATCHING_KEY");
      return true;
    });
    assert.equal(rotating.requestCount("/oauth2/v3/certs"), 0);

    // …after it, one refetch finds the new key, and the old key still works.
    await sleep(350);
    await jwtVerify(fresh, keys);
    await jwtVerify(await rotating.sign({ aud: audience }, { key: "previous" }), keys);
    assert.equal(rotating.requestCount("/oauth2/v3/certs"), 1);

    // A forged kid costs one fetch per cooldown, not one per token.
    await sleep(350);
    for (let i = 0; i < 5; i++) {
      const forged = await rotating.sign({ aud: audience }, { header: { kid: `forged-${i}` } });
      await assert.rejects(jwtVerify(forged, keys), { code: "ERR_JWKS_NO_MATCHING_KEY" });
    }
    assert.equal(rotating.requestCount("/oauth2/v3/certs"), 2);
  });

  it("does not refetch on an unknown kid when refetchOnUnknownKid is false (ESPv2)", async (t) => {
    const rotating = await createIssuer();
    t.after(() => rotating.close());
    const keys = keySet(t, { url: rotating.jwksUri, cooldownMs: 0, refetchOnUnknownKid: false });
    await keys.warm();
    await rotating.rotate();
    rotating.resetCounts();
    await assert.rejects(jwtVerify(await rotating.sign({ aud: audience }), keys), {
      code: "ERR_JWKS_NO_MATCHING_KEY",
    });
    assert.equal(rotating.requestCount("/oauth2/v3/certs"), 0);
  });

  it("keeps verifying with cached keys when the key server goes down (stale-while-error)", async (t) => {
    const flaky = await createIssuer();
    t.after(() => flaky.close());
    const keys = keySet(t, { url: flaky.jwksUri, cacheMaxAgeMs: 100, retryAfterErrorMs: 20 });
    await jwtVerify(await flaky.sign({ aud: audience }), keys);
    flaky.setAvailable(false);
    await sleep(250); // past cacheMaxAgeMs: refreshes have been tried and failed
    await jwtVerify(await flaky.sign({ aud: audience, n: 2 }), keys);
    const status = keys.status();
    assert.equal(status.hasKeys, true);
    assert.equal(status.fresh, false);
    assert.equal(status.lastError?.code, "ERR_JWKS_FETCH");
    assert.match(status.lastError?.message ?? "", /HTTP 503/);
    assert.ok(status.fetchCount >= 2, `refresh was attempted (fetchCount ${status.fetchCount})`);

    flaky.setAvailable(true);
    // A background retry may be in flight since before the switch; reload()
    // shares it, so the second reload is the one sure to see the server up.
    await keys.reload().catch(() => {});
    await keys.reload();
    assert.equal(keys.status().fresh, true);
    assert.equal(keys.status().lastError, undefined);
  });

  it("refreshes in the background before the cache expires", async (t) => {
    issuer.resetCounts();
    const keys = keySet(t, { url: issuer.jwksUri, cacheMaxAgeMs: 300, refreshAheadMs: 150 });
    await keys.warm();
    assert.equal(issuer.requestCount("/oauth2/v3/certs"), 1);
    await sleep(280); // refresh due at 150 ms, with no request in between
    assert.equal(issuer.requestCount("/oauth2/v3/certs"), 2);
    assert.equal(keys.status().fresh, true);
  });

  it("throws ERR_JWKS_FETCH when the key server fails and nothing is cached", async (t) => {
    issuer.setAvailable(false);
    t.after(() => issuer.setAvailable(true));
    issuer.resetCounts();
    const keys = keySet(t, { url: issuer.jwksUri, retryAfterErrorMs: 60_000 });
    const token = await issuer.sign({ aud: audience });
    await assert.rejects(jwtVerify(token, keys), (err) => {
      assert.ok(err instanceof JWKSFetchFailed);
      assert.ok(err instanceof errors.JOSEError);
      assert.equal(err.code, "ERR_JWKS_FETCH");
      assert.equal(err.status, 503);
      assert.ok(isKeySetUnavailable(err));
      assert.ok(!isNoMatchingKey(err));
      return true;
    });
    // Within retryAfterErrorMs the failure is answered from memory.
    await assert.rejects(jwtVerify(token, keys), { code: "ERR_JWKS_FETCH" });
    assert.equal(issuer.requestCount("/oauth2/v3/certs"), 1);
    assert.equal(await keys.warm(), false);
  });

  it("throws ERR_JWKS_FETCH when the key server refuses connections", async (t) => {
    const gone = await createIssuer();
    const url = gone.jwksUri;
    await gone.close();
    const keys = keySet(t, { url });
    await assert.rejects(keys(), (err: JWKSFetchFailed) => {
      assert.equal(err.code, "ERR_JWKS_FETCH");
      assert.match(err.message, /ECONNREFUSED/);
      return true;
    });
  });

  it("throws ERR_JWKS_FETCH after timeoutMs when the key server hangs", async (t) => {
    const hanging = await startServer(t, () => {
      // Never answers.
    });
    const keys = keySet(t, { url: hanging.url, timeoutMs: 150 });
    const started = performance.now();
    await assert.rejects(keys(), (err: JWKSFetchFailed) => {
      assert.equal(err.code, "ERR_JWKS_FETCH");
      assert.match(err.message, /timed out after 150 ms/);
      return true;
    });
    assert.ok(performance.now() - started < 2_000);
  });

  const badBodies: { desc: string; body: string }[] = [
    { desc: "not JSON", body: "<html>" },
    { desc: "an empty object", body: "{}" },
    { desc: "keys that are not an array", body: '{"keys": {}}' },
    { desc: "a map whose values are not certificates", body: '{"kid": "hello"}' },
    {
      desc: "a certificate that does not parse",
      body: JSON.stringify({
        kid: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
      }),
    },
  ];
  for (const tc of badBodies) {
    it(`throws ERR_JWKS_FETCH for a body that is ${tc.desc}`, async (t) => {
      const server = await startServer(t, (res) => {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(tc.body);
      });
      const keys = keySet(t, { url: server.url });
      await assert.rejects(keys({ alg: "RS256" }), { code: "ERR_JWKS_FETCH" });
      assert.equal(keys.status().hasKeys, false);
    });
  }

  it("treats a redirect as a failure rather than following it elsewhere", async (t) => {
    const redirecting = await startServer(t, (res) => {
      res.writeHead(302, { location: issuer.jwksUri });
      res.end();
    });
    const keys = keySet(t, { url: redirecting.url });
    await assert.rejects(keys({ alg: "RS256" }), (err: JWKSFetchFailed) => err.status === 302);
  });

  it("finds the right key for a token without kid when several are published", async (t) => {
    const rotating = await createIssuer();
    t.after(() => rotating.close());
    await rotating.rotate();
    const keys = keySet(t, { url: rotating.jwksUri });
    for (const key of ["current", "previous"] as const) {
      const token = await rotating.sign({ aud: audience }, { key, header: { kid: undefined } });
      await jwtVerify(token, keys, { audience });
    }
    const forged = await rotating.sign(
      { aud: audience },
      { header: { kid: undefined }, signature: "corrupt" },
    );
    await assert.rejects(jwtVerify(forged, keys), {
      code: "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    });
  });

  it("validates its options", () => {
    assert.throws(() => createRemoteKeySet({ url: "not a url" }), TypeError);
    assert.throws(() => createRemoteKeySet({ url: issuer.jwksUri, timeoutMs: -1 }), /timeoutMs/);
  });
});

describe("toJsonWebKeySet()", () => {
  it("rejects arrays and null with jose's JWKSInvalid", () => {
    assert.throws(() => toJsonWebKeySet([]), errors.JWKSInvalid);
    assert.throws(() => toJsonWebKeySet(null), errors.JWKSInvalid);
  });
});

describe("createVerifiedTokenCache()", () => {
  it("returns a value until it expires", () => {
    const cache = createVerifiedTokenCache<string>();
    cache.set("token", "payload", 2_000);
    assert.equal(cache.get("token", 1_999), "payload");
    assert.equal(cache.get("token", 2_000), undefined);
    assert.equal(cache.size, 0, "expired entries are dropped on read");
    assert.equal(cache.get("other", 0), undefined);
  });

  it("keeps at most maxEntries, dropping the least recently used", () => {
    const cache = createVerifiedTokenCache<number>({ maxEntries: 2 });
    const far = Date.now() + 60_000;
    cache.set("a", 1, far);
    cache.set("b", 2, far);
    assert.equal(cache.get("a"), 1); // "b" is now the least recently used
    cache.set("c", 3, far);
    assert.equal(cache.size, 2);
    assert.equal(cache.get("b"), undefined);
    assert.equal(cache.get("a"), 1);
    assert.equal(cache.get("c"), 3);
  });

  it("forgets on delete and clear", () => {
    const cache = createVerifiedTokenCache<number>();
    const far = Date.now() + 60_000;
    cache.set("a", 1, far);
    cache.set("b", 2, far);
    cache.delete("a");
    assert.equal(cache.get("a"), undefined);
    cache.clear();
    assert.equal(cache.size, 0);
  });
});

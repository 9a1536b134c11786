import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gcpMetadata } from "google-auth-library";
import { createRemoteJWKSet, decodeJwt, jwtVerify } from "jose";
import { describeStandIns, startGoogleStandIns } from "../../local/google.ts";
import { createIssuer, googleIssuer, type Issuer } from "../../local/issuer.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";

const email = "runner@meta-project.iam.gserviceaccount.com";
const audience = "https://backend.example.run.app";
const flavor = { "metadata-flavor": "Google" };

describe("createMetadataServer()", () => {
  let issuer: Issuer;
  let metadata: MetadataServer;
  let base: string;
  before(async () => {
    issuer = await createIssuer();
    metadata = await createMetadataServer({
      issuer,
      email,
      numericProjectId: "4242424242",
      region: "europe-west1",
      instanceId: "instance-1",
    });
    base = `${metadata.url}/computeMetadata/v1`;
  });
  after(async () => {
    await metadata.close();
    await issuer.close();
  });

  async function get(path: string, headers: Record<string, string> = flavor) {
    const res = await fetch(`${base}/${path}`, { headers });
    return {
      status: res.status,
      text: await res.text(),
      flavor: res.headers.get("metadata-flavor"),
    };
  }

  it("exposes host as GCE_METADATA_HOST wants it, and the env to use it", () => {
    assert.match(metadata.host, /^127\.0\.0\.1:\d+$/);
    assert.equal(metadata.url, `http://${metadata.host}`);
    assert.deepEqual(metadata.env, {
      GCE_METADATA_HOST: metadata.host,
      METADATA_SERVER_DETECTION: "assume-present",
      GOOGLE_CLOUD_PROJECT: "meta-project",
    });
  });

  it("mints identity tokens for the audience, signed by the issuer", async () => {
    metadata.resetCounts();
    const res = await get(
      `instance/service-accounts/default/identity?audience=${audience}&format=full`,
    );
    assert.equal(res.status, 200);
    assert.equal(res.flavor, "Google");
    const { payload } = await jwtVerify(res.text, createRemoteJWKSet(new URL(issuer.jwksUri)), {
      issuer: googleIssuer,
      audience,
      algorithms: ["RS256"],
    });
    assert.equal(payload.email, email);
    assert.equal(payload.email_verified, true);
    assert.equal(payload.sub, issuer.subjectFor(email));
    assert.equal(payload.azp, payload.sub);
    assert.equal(metadata.identityRequests(), 1);
  });

  it("leaves the email out of format=standard tokens (the default), as Google does", async () => {
    for (const query of [`audience=${audience}`, `audience=${audience}&format=standard`]) {
      const res = await get(`instance/service-accounts/default/identity?${query}`);
      assert.equal(res.status, 200);
      const claims = decodeJwt(res.text);
      assert.equal(claims.email, undefined, query);
      assert.equal(claims.aud, audience);
    }
  });

  it("answers the account's email path as an alias of default", async () => {
    const res = await get(
      `instance/service-accounts/${encodeURIComponent(email)}/identity?audience=${audience}`,
    );
    assert.equal(res.status, 200);
    assert.equal(decodeJwt(res.text).sub, issuer.subjectFor(email));
    assert.equal((await get(`instance/service-accounts/${email}/email`)).text, email);
    assert.equal(
      (await get("instance/service-accounts/other@x.iam.gserviceaccount.com/email")).status,
      404,
    );
  });

  it("answers 400 when the audience is missing", async () => {
    metadata.resetCounts();
    const res = await get("instance/service-accounts/default/identity");
    assert.equal(res.status, 400);
    assert.equal(res.flavor, "Google");
    assert.equal((await get("instance/service-accounts/default/identity?audience=")).status, 400);
    assert.equal(metadata.identityRequests(), 0);
  });

  it("refuses requests without Metadata-Flavor: Google, with 403", async () => {
    const variants: Record<string, string>[] = [
      {},
      { "metadata-flavor": "google" },
      { "metadata-flavor": "Other" },
    ];
    for (const headers of variants) {
      const res = await get(
        `instance/service-accounts/default/identity?audience=${audience}`,
        headers,
      );
      assert.equal(res.status, 403, JSON.stringify(headers));
      assert.equal(res.flavor, "Google");
      assert.doesNotMatch(res.text, /^eyJ/);
    }
  });

  it("refuses requests that went through a proxy (X-Forwarded-For), with 403", async () => {
    const res = await get("instance/service-accounts/default/token", {
      ...flavor,
      "x-forwarded-for": "203.0.113.7",
    });
    assert.equal(res.status, 403);
    assert.equal(res.flavor, "Google");
  });

  it("serves the email, an access token the issuer accepts, and the directory", async () => {
    assert.equal((await get("instance/service-accounts/default/email")).text, email);
    const token = await get("instance/service-accounts/default/token");
    assert.equal(token.status, 200);
    const body = JSON.parse(token.text) as {
      access_token: string;
      expires_in: number;
      token_type: string;
    };
    assert.equal(body.token_type, "Bearer");
    assert.ok(body.expires_in > 3000);
    assert.equal(issuer.accessTokenOwner(body.access_token), email);
    assert.match(
      (await get("instance/service-accounts/default/")).text,
      /^aliases\nemail\nidentity\n/m,
    );
    assert.equal((await get("instance/service-accounts/")).text, `default/\n${email}/\n`);
  });

  it("serves instance and project facts", async () => {
    const cases: [string, string][] = [
      ["instance/id", "instance-1"],
      ["instance/region", "projects/4242424242/regions/europe-west1"],
      ["instance/zone", "projects/4242424242/zones/europe-west1-1"],
      ["project/project-id", "meta-project"],
      ["project/numeric-project-id", "4242424242"],
    ];
    for (const [path, expected] of cases) {
      const res = await get(path);
      assert.equal(res.status, 200, path);
      assert.equal(res.text, expected, path);
      assert.equal(res.flavor, "Google", path);
    }
  });

  it("answers the root and the availability ping, and 404 elsewhere, always with the flavor header", async () => {
    const root = await fetch(`${metadata.url}/`);
    assert.equal(root.status, 200);
    assert.equal(root.headers.get("metadata-flavor"), "Google");
    assert.equal((await get("instance")).status, 200);
    const missing = await get("instance/attributes/nothing");
    assert.equal(missing.status, 404);
    assert.equal(missing.flavor, "Google");
  });

  it("answers 503 while unavailable, and recovers", async () => {
    metadata.setAvailable(false);
    try {
      const res = await get(`instance/service-accounts/default/identity?audience=${audience}`);
      assert.equal(res.status, 503);
      assert.equal(res.flavor, "Google");
    } finally {
      metadata.setAvailable(true);
    }
    assert.equal((await get("instance/id")).status, 200);
  });

  it("counts requests per path", async () => {
    metadata.resetCounts();
    await get("instance/id");
    await get("instance/id", {});
    assert.equal(metadata.requestCounts()["/computeMetadata/v1/instance/id"], 2);
  });

  it("is what gcp-metadata (google-auth-library's metadata client) reads through GCE_METADATA_HOST", async () => {
    // This test file is its own process under node --test; the variables are
    // restored anyway so later tests in this file see the original values.
    const saved = { ...process.env };
    const sdkConfig = await mkdtemp(join(tmpdir(), "metadata-test-"));
    try {
      Object.assign(process.env, metadata.env, { CLOUDSDK_CONFIG: sdkConfig });
      delete process.env.GCE_METADATA_IP;
      assert.equal(await gcpMetadata.instance("id"), "instance-1");
      assert.equal(await gcpMetadata.project("project-id"), "meta-project");
      assert.equal(await gcpMetadata.instance("service-accounts/default/email"), email);
    } finally {
      for (const key of Object.keys(process.env)) {
        if (!(key in saved)) {
          delete process.env[key];
        }
      }
      Object.assign(process.env, saved);
      await rm(sdkConfig, { recursive: true, force: true });
    }
  });
});

describe("startGoogleStandIns()", () => {
  it("starts the issuer and one metadata server per account, minting for that account", async () => {
    const standIns = await startGoogleStandIns({ projectId: "chain-project" });
    try {
      assert.deepEqual(Object.keys(standIns.metadata), ["client-sa", "gateway-sa"]);
      const gateway = standIns.metadata["gateway-sa"] as MetadataServer;
      assert.equal(gateway.email, "gateway-sa@chain-project.iam.gserviceaccount.com");
      assert.deepEqual(standIns.envFor("gateway-sa"), {
        GCE_METADATA_HOST: gateway.host,
        METADATA_SERVER_DETECTION: "assume-present",
        GOOGLE_CLOUD_PROJECT: "chain-project",
      });
      assert.throws(() => standIns.envFor("nobody"), /no metadata server for account "nobody"/);
      const res = await fetch(
        `${gateway.url}/computeMetadata/v1/instance/service-accounts/default/identity?audience=${audience}&format=full`,
        { headers: flavor },
      );
      const { payload } = await jwtVerify(
        await res.text(),
        createRemoteJWKSet(new URL(standIns.issuer.jwksUri)),
        { audience },
      );
      assert.equal(payload.email, gateway.email);
      const text = describeStandIns(standIns);
      assert.match(text, new RegExp(`export GCE_METADATA_HOST=${gateway.host}`));
      assert.match(text, new RegExp(`export ECHO_JWKS_URI=${standIns.issuer.jwksUri}`));
    } finally {
      await standIns.close();
    }
    await assert.rejects(fetch(standIns.issuer.jwksUri));
  });
});

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { createEchoClient } from "../../client/echo-client.ts";
import { ConfigError } from "../../lib/config-error.ts";
import { loadServerConfig } from "../../server/config.ts";
import { spawnNode } from "../helpers/process.ts";

describe("server/main.ts", () => {
  it("on SIGTERM finishes the in-flight stream, refuses new calls and exits 0", async () => {
    const server = spawnNode(["server/main.ts"], {
      PORT: "0",
      HOST: "127.0.0.1",
      K_SERVICE: "",
      GCE_METADATA_HOST: "",
    });
    try {
      const [, port] = await server.waitFor(/"address":\["127\.0\.0\.1:(\d+)"\]/);
      const address = `127.0.0.1:${port}`;
      const c = createEchoClient({ address, plaintext: true, idleConnectionTimeoutMs: 50 });
      const received: number[] = [];
      const stream = (async () => {
        for await (const r of c.client.echoServerStream({
          message: "drain",
          count: 6,
          interval: durationFromMs(150),
        })) {
          received.push(r.index);
          if (r.index === 0) {
            server.child.kill("SIGTERM");
          }
        }
      })();
      await server.waitFor(/shutting down/);
      // A new connection is refused once the listener is closed.
      const late = createEchoClient({ address, plaintext: true, idleConnectionTimeoutMs: 50 });
      await assert.rejects(late.client.echo({ message: "late" }), (err: unknown) => {
        assert.equal(ConnectError.from(err).code, Code.Unavailable);
        return true;
      });
      late.close();
      await stream;
      c.close();
      assert.deepEqual(received, [0, 1, 2, 3, 4, 5]);
      assert.equal(await server.exited, 0);
    } finally {
      server.kill();
    }
  });

  it("prints one line per configuration problem and exits 2", async () => {
    const server = spawnNode(["server/main.ts"], {
      PORT: "http",
      ECHO_AUTH_MODE: "verify",
      ECHO_AUDIENCES: "",
    });
    assert.equal(await server.exited, 2);
    assert.equal(
      server.stderr(),
      'echo-server: PORT: "http" is not an integer between 0 and 65535\n' +
        "echo-server: ECHO_AUDIENCES (--target-audience) is required when auth mode is verify: set it to the URL callers use as audience, e.g. https://echo-abc-uc.a.run.app\n",
    );
  });
});

describe("loadServerConfig()", () => {
  it("reads Cloud Run's variables and the defaults", () => {
    const config = loadServerConfig(
      { PORT: "9000", K_SERVICE: "echo", K_REVISION: "echo-00002" },
      [],
    );
    assert.equal(config.port, 9000);
    assert.equal(config.host, "0.0.0.0");
    assert.equal(config.service, "echo");
    assert.equal(config.revision, "echo-00002");
    assert.equal(config.auth.mode, "off");
    assert.equal(config.readMaxBytes, 4 * 1024 * 1024);
    assert.ok(Object.isFrozen(config));
  });

  it("lets flags win over the environment, and --validate-token mean verify", () => {
    const config = loadServerConfig({ PORT: "9000", ECHO_AUDIENCES: "https://env" }, [
      "--port",
      "9001",
      "--validate-token",
      "--target-audience",
      "https://a,https://b",
      "--allowed-principal",
      "gw@p.iam.gserviceaccount.com",
    ]);
    assert.equal(config.port, 9001);
    assert.equal(config.auth.mode, "verify");
    assert.deepEqual(config.auth.audiences, ["https://a", "https://b"]);
    assert.deepEqual(config.auth.allowedPrincipals, ["gw@p.iam.gserviceaccount.com"]);
  });

  const bad: { desc: string; env: Record<string, string>; argv?: string[]; problem: string }[] = [
    {
      desc: "unknown auth mode",
      env: { ECHO_AUTH_MODE: "maybe" },
      problem: 'ECHO_AUTH_MODE: "maybe" is not one of off, verify, cloud-run',
    },
    {
      desc: "JWKS URI not a URL",
      env: { ECHO_JWKS_URI: "ftp://x" },
      problem: 'ECHO_JWKS_URI: "ftp://x" is not an http(s) URL',
    },
    {
      desc: "half a TLS pair",
      env: { ECHO_TLS_CERT: "cert.pem" },
      problem: "ECHO_TLS_CERT and ECHO_TLS_KEY (--tls-cert, --tls-key) must be set together",
    },
    { desc: "unknown flag", env: {}, argv: ["--prot", "1"], problem: "Unknown option '--prot'" },
    {
      desc: "tiny read limit",
      env: { ECHO_READ_MAX_BYTES: "10" },
      problem: 'ECHO_READ_MAX_BYTES: "10" is not an integer between 1024 and 67108864',
    },
  ];
  for (const tc of bad) {
    it(`refuses ${tc.desc}`, () => {
      assert.throws(
        () => loadServerConfig(tc.env, tc.argv ?? []),
        (err: unknown) => {
          assert.ok(err instanceof ConfigError);
          assert.ok(
            err.problems.some((p) => p.startsWith(tc.problem)),
            `${err.problems.join(" | ")} should contain ${tc.problem}`,
          );
          return true;
        },
      );
    });
  }
});

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, describe, it } from "node:test";
import { parseCliOptions } from "../../client/cli.ts";
import { ConfigError } from "../../lib/config-error.ts";
import { spawnNode } from "../helpers/process.ts";
import { type StartedServer, startServer } from "../helpers/server.ts";

describe("client CLI", () => {
  let server: StartedServer;
  before(async () => {
    server = await startServer({ K_SERVICE: "echo", K_REVISION: "echo-7" });
  });
  after(() => server.close());

  it("prints each reply with the instance that served it", async () => {
    const run = spawnNode(
      [
        "client/cli.ts",
        "--address",
        server.address,
        "--plaintext",
        "--count",
        "3",
        "--stream",
        "--stream-count",
        "2",
        "--message",
        "hey",
      ],
      { GCE_METADATA_HOST: "", GOOGLE_APPLICATION_CREDENTIALS: "" },
    );
    assert.equal(await run.exited, 0, run.stderr());
    const lines = run.stdout().trim().split("\n");
    assert.deepEqual(lines, [
      ...[1, 2, 3].map((n) => `Echo #${n}: "hey" from echo/echo-7/${server.instance.id}`),
      ...[0, 1].map((i) => `EchoServerStream[${i}]: "hey" from echo/echo-7/${server.instance.id}`),
    ]);
  });

  it("prints JSON lines with --json", async () => {
    const run = spawnNode(["client/cli.ts", "--address", server.address, "--plaintext", "--json"], {
      GCE_METADATA_HOST: "",
    });
    assert.equal(await run.exited, 0, run.stderr());
    const reply = JSON.parse(run.stdout());
    assert.equal(reply.call, "Echo #1");
    assert.equal(reply.instance.revision, "echo-7");
  });

  it("fails with one line naming the gRPC code when the server is down", async () => {
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
    const a = srv.address();
    const port = typeof a === "object" && a ? a.port : 0;
    await new Promise((r) => srv.close(r));
    const run = spawnNode(["client/cli.ts", "--address", `127.0.0.1:${port}`, "--plaintext"], {
      GCE_METADATA_HOST: "",
    });
    assert.equal(await run.exited, 1);
    assert.match(run.stderr(), /^echo-client: unavailable: .+\n$/);
    assert.equal(run.stderr().split("\n").length, 2, "exactly one line");
  });

  it("refuses bad usage with exit code 2", async () => {
    const run = spawnNode(["client/cli.ts", "--count", "many"]);
    assert.equal(await run.exited, 2);
    assert.equal(
      run.stderr(),
      'echo-client: --address HOST:PORT is required\necho-client: --count: "many" is not an integer between 0 and 1000000\n',
    );
  });
});

describe("parseCliOptions()", () => {
  it("defaults the audience to the https origin of the address", () => {
    const o = parseCliOptions(["--address", "echo.example.com:443", "--auth", "on"], {});
    assert.equal(o.audience, "https://echo.example.com");
    assert.equal(o.auth, "on");
  });

  it("sends a token automatically only when a source of one is configured", () => {
    assert.equal(parseCliOptions(["--address", "h:1"], {}).auth, "off");
    assert.equal(
      parseCliOptions(["--address", "h:1"], { GCE_METADATA_HOST: "127.0.0.1:1" }).auth,
      "on",
    );
    assert.equal(parseCliOptions(["--address", "h:1", "--audience", "https://x"], {}).auth, "on");
  });

  it("rejects contradicting options", () => {
    assert.throws(
      () => parseCliOptions(["--address", "h:1", "--auth", "off", "--audience", "https://x"], {}),
      ConfigError,
    );
  });
});

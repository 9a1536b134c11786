import assert from "node:assert/strict";
import { createServer } from "node:net";
import { describe, it } from "node:test";
import { spawnNode } from "../helpers/process.ts";

async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, async () => {
      const srv = createServer();
      await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
      return srv;
    }),
  );
  const ports = servers.map((s) => {
    const a = s.address();
    return typeof a === "object" && a ? a.port : 0;
  });
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

function portArgs(ports: number[]): string[] {
  const [gateway, s1, s2, s3, issuer, clientMd, gatewayMd] = ports.map(String);
  return [
    "--port",
    gateway ?? "",
    "--server-ports",
    `${s1},${s2},${s3}`,
    "--issuer-port",
    issuer ?? "",
    "--client-metadata-port",
    clientMd ?? "",
    "--gateway-metadata-port",
    gatewayMd ?? "",
  ];
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function records(stdout: string): Record<string, unknown>[] {
  return stdout
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe("npm start (local/start.ts)", () => {
  it("runs the client through the gateway, balanced over three verifying servers", async () => {
    const ports = await freePorts(7);
    const run = spawnNode(["local/start.ts", "--once", "--json", ...portArgs(ports)]);
    try {
      const code = await run.exited;
      assert.equal(code, 0, run.stderr() + run.stdout());
    } finally {
      run.kill();
    }
    const lines = records(run.stdout())
      .filter((r) => r["process"] === "client")
      .map((r) => String(r["message"]));
    const unary = lines.filter((l) => l.startsWith("Echo #"));
    assert.equal(unary.length, 10);
    const instances = new Set(unary.map((l) => /from (\S+),/.exec(l)?.[1]));
    assert.equal(instances.size, 3, unary.join("\n"));
    for (const line of unary) {
      assert.match(line, /caller gateway-sa@echo-local\.iam\.gserviceaccount\.com \(verified\)/);
      assert.match(line, /end user client-sa@echo-local\.iam\.gserviceaccount\.com/);
    }
    assert.equal(lines.filter((l) => l.startsWith("EchoServerStream[")).length, 5);
  });

  it("stays up, prints how to call it, and leaves no process behind on SIGTERM", async () => {
    const ports = await freePorts(7);
    const run = spawnNode(["local/start.ts", "--json", ...portArgs(ports)]);
    try {
      await run.waitFor(/The local chain is up/, 30_000);
      assert.match(run.stdout(), /buf curl --http2-prior-knowledge/);
      assert.match(run.stdout(), /npm run client -- --address 127\.0\.0\.1:\d+ --plaintext/);
      const pids = records(run.stdout())
        .filter((r) => typeof r["pid"] === "number" && String(r["message"]).startsWith("started"))
        .map((r) => r["pid"] as number);
      assert.equal(pids.length, 5, "3 servers, the gateway and the client");
      run.child.kill("SIGTERM");
      assert.equal(await run.exited, 0);
      for (const pid of pids) {
        assert.equal(isAlive(pid), false, `process ${pid} still running`);
      }
    } finally {
      run.kill();
    }
  });

  it("takes the stack down naming the process that died", async () => {
    const ports = await freePorts(7);
    // A server port that is already taken makes that server exit at start.
    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(ports[2], "127.0.0.1", r));
    const run = spawnNode(["local/start.ts", "--once", "--json", ...portArgs(ports)]);
    try {
      assert.equal(await run.exited, 1);
      assert.match(run.stdout(), /server-2 exited/);
      assert.match(run.stdout(), /already in use/);
    } finally {
      run.kill();
      await new Promise((r) => blocker.close(r));
    }
  });
});

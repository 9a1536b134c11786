import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as http2 from "node:http2";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createEchoClient, type EchoProtocol } from "../../client/echo-client.ts";
import {
  Health,
  HealthCheckResponse_ServingStatus as ServingStatus,
} from "../../gen/grpc/health/v1/health_pb.ts";
import { type StartedServer, startServer } from "../helpers/server.ts";
import { projectRoot } from "../helpers/process.ts";

const execFileAsync = promisify(execFile);
const buf = `${projectRoot}node_modules/.bin/buf`;

async function* requests(messages: string[]) {
  for (const message of messages) {
    yield { message };
  }
}

describe("Echo server", () => {
  let server: StartedServer;
  before(async () => {
    server = await startServer({ K_SERVICE: "echo-test", K_REVISION: "echo-test-00001" }, [
      "--max-stream-count",
      "50",
      "--read-max-bytes",
      "65536",
    ]);
  });
  after(() => server.close());

  const client = (protocol: EchoProtocol = "grpc") =>
    createEchoClient({
      address: server.address,
      plaintext: true,
      protocol,
      idleConnectionTimeoutMs: 50,
    });

  for (const protocol of ["grpc", "grpc-web", "connect"] as const) {
    describe(`over ${protocol}`, () => {
      it("answers Echo with the message, the instance and the caller", async () => {
        const c = client(protocol);
        const res = await c.client.echo({ message: "hello" });
        c.close();
        assert.equal(res.message, "hello");
        assert.equal(res.instance?.service, "echo-test");
        assert.equal(res.instance?.revision, "echo-test-00001");
        assert.match(res.instance?.id ?? "", /^local-[0-9a-f]{12}$/);
        assert.equal(res.caller?.verification, "none");
      });

      it("sends count responses on EchoServerStream, indexed from 0", async () => {
        const c = client(protocol);
        const got = [];
        for await (const r of c.client.echoServerStream({ message: "s", count: 7 })) {
          got.push([r.index, r.message]);
        }
        c.close();
        assert.deepEqual(
          got,
          Array.from({ length: 7 }, (_, i) => [i, "s"]),
        );
      });

      it("collects every message on EchoClientStream", async () => {
        // Connect and gRPC-Web over HTTP/2 support client streams with Node's transport.
        const c = client(protocol);
        const res = await c.client.echoClientStream(requests(["a", "b", "c"]));
        c.close();
        assert.equal(res.message, "a b c");
        assert.equal(res.count, 3);
      });

      it("answers each message on EchoBidiStream", async () => {
        const c = client(protocol);
        const got = [];
        for await (const r of c.client.echoBidiStream(requests(["x", "y"]))) {
          got.push(`${r.index}:${r.message}`);
        }
        c.close();
        assert.deepEqual(got, ["0:x", "1:y"]);
      });
    });
  }

  it("refuses a stream count above the maximum with INVALID_ARGUMENT", async () => {
    const c = client();
    await assert.rejects(
      async () => {
        for await (const _ of c.client.echoServerStream({ message: "s", count: 51 })) {
          // drain
        }
      },
      (err: unknown) => {
        const e = ConnectError.from(err);
        assert.equal(e.code, Code.InvalidArgument);
        assert.equal(e.rawMessage, "count 51 exceeds the maximum of 50");
        return true;
      },
    );
    c.close();
  });

  it("paces the server stream by the requested interval", async () => {
    const c = client();
    const started = performance.now();
    let n = 0;
    for await (const _ of c.client.echoServerStream({
      message: "s",
      count: 3,
      interval: durationFromMs(40),
    })) {
      n++;
    }
    c.close();
    assert.equal(n, 3);
    // Two pauses of 40 ms: a lower bound only, never an upper one.
    assert.ok(performance.now() - started >= 75);
  });

  it("refuses an oversized message with RESOURCE_EXHAUSTED and keeps serving", async () => {
    const c = client();
    await assert.rejects(c.client.echo({ message: "x".repeat(70_000) }), (err: unknown) => {
      assert.equal(ConnectError.from(err).code, Code.ResourceExhausted);
      return true;
    });
    assert.equal((await c.client.echo({ message: "still here" })).message, "still here");
    c.close();
  });

  it("answers a malformed protobuf body with an error status and keeps serving", async () => {
    const session = http2.connect(`http://${server.address}`);
    const body = Buffer.from([0, 0, 0, 0, 3, 0xff, 0xff, 0xff]);
    const stream = session.request({
      ":method": "POST",
      ":path": "/echo.v1.EchoService/Echo",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.end(body);
    const trailers = await new Promise<http2.IncomingHttpHeaders>((resolve) => {
      stream.on("trailers", resolve);
      stream.on("response", (h) => {
        if (h["grpc-status"] !== undefined) resolve(h);
      });
      stream.resume();
    });
    session.close();
    assert.equal(trailers["grpc-status"], String(Code.Internal));
    const c = client();
    assert.equal((await c.client.echo({ message: "ok" })).message, "ok");
    c.close();
  });

  it("serves grpc.health.v1 Check and Watch", async () => {
    const transport = createGrpcTransport({
      baseUrl: `http://${server.address}`,
      idleConnectionTimeoutMs: 50,
    });
    const health = createClient(Health, transport);
    assert.equal((await health.check({})).status, ServingStatus.SERVING);
    assert.equal(
      (await health.check({ service: "echo.v1.EchoService" })).status,
      ServingStatus.SERVING,
    );
    await assert.rejects(health.check({ service: "nope.v1.Nope" }), (err: unknown) => {
      assert.equal(ConnectError.from(err).code, Code.NotFound);
      return true;
    });
    const controller = new AbortController();
    const first = await health
      .watch({ service: "nope.v1.Nope" }, { signal: controller.signal })
      [Symbol.asyncIterator]()
      .next();
    assert.equal(first.value?.status, ServingStatus.SERVICE_UNKNOWN);
    controller.abort();
  });

  it("writes one access log line per RPC with the trace of the request", async () => {
    const c = createEchoClient({
      address: server.address,
      plaintext: true,
      idleConnectionTimeoutMs: 50,
    });
    await c.client.echo(
      { message: "traced" },
      { headers: { "x-cloud-trace-context": "0123456789abcdef0123456789abcdef/1;o=1" } },
    );
    c.close();
    const line = server.logs.find(
      (l) => l["logging.googleapis.com/trace"] === "0123456789abcdef0123456789abcdef",
    );
    assert.ok(line, "access log line with the trace id");
    assert.equal(line["rpc"], "echo.v1.EchoService/Echo");
    assert.equal(line["code"], "ok");
    assert.equal(line["severity"], "INFO");
    assert.equal(line["logging.googleapis.com/spanId"], "0000000000000001");
  });

  describe("buf curl", () => {
    const echoUrl = () => `http://${server.address}/echo.v1.EchoService/Echo`;
    const streamUrl = () => `http://${server.address}/echo.v1.EchoService/EchoServerStream`;
    const curl = async (...args: string[]) => {
      const { stdout } = await execFileAsync(
        buf,
        ["curl", "--http2-prior-knowledge", "--protocol", "grpc", ...args],
        {
          cwd: projectRoot,
        },
      );
      return stdout;
    };

    it("calls Echo by server reflection", async () => {
      const out = JSON.parse(await curl("-d", '{"message":"hi"}', echoUrl()));
      assert.equal(out.message, "hi");
      assert.equal(out.instance.service, "echo-test");
    });

    it("calls EchoServerStream by server reflection", async () => {
      const out = await curl("-d", '{"message":"hi","count":3}', streamUrl());
      assert.equal(out.match(/"message": "hi"/g)?.length, 3);
    });

    it("calls Echo and EchoServerStream with gen/echo.pb as schema", async () => {
      const schema = ["--schema", "gen/echo.pb#format=binpb"];
      assert.equal(
        JSON.parse(await curl(...schema, "-d", '{"message":"pb"}', echoUrl())).message,
        "pb",
      );
      const out = await curl(...schema, "-d", '{"message":"pb","count":2}', streamUrl());
      assert.equal(out.match(/"index": 1/g)?.length, 1);
    });

    it("lists the served services", async () => {
      const { stdout } = await execFileAsync(
        buf,
        ["curl", "--http2-prior-knowledge", "--list-methods", `http://${server.address}`],
        { cwd: projectRoot },
      );
      assert.match(stdout, /echo\.v1\.EchoService\/EchoBidiStream/);
      assert.match(stdout, /grpc\.health\.v1\.Health\/Check/);
    });
  });
});

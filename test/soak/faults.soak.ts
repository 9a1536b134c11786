/**
 * Faults under full load (`npm run soak`): 1,000 server streams open and
 * unary calls flowing while a backend is killed, a backend is stopped, and
 * the gateway is restarted. The npm-test-sized versions are in
 * test/hardening/faults.test.ts.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import type { EchoClient } from "../../client/echo-client.ts";
import { runUnaryLoad, totalErrors } from "../helpers/load.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const streams = 1000;

interface StreamResult {
  instanceId: string | undefined;
  received: number;
  error: string | undefined;
  message?: string;
}

/**
 * `streams` server streams of `count` messages 500 ms apart, spread over
 * the connections (the gateway takes 100 per connection): 2,000 messages a
 * second in all, well within what this machine carries beside the unary
 * calls, so that drains finish in their 8 s.
 */
function openStreams(
  clients: readonly EchoClient[],
  count: number,
): { results: Promise<StreamResult[]>; started: () => number } {
  let started = 0;
  const results = Promise.all(
    Array.from({ length: streams }, async (_, i) => {
      const r: StreamResult = { instanceId: undefined, received: 0, error: undefined };
      try {
        for await (const m of (clients[i % clients.length] as EchoClient).client.echoServerStream({
          message: `s${i}`,
          count,
          interval: durationFromMs(500),
        })) {
          if (r.instanceId === undefined) {
            r.instanceId = m.instance?.id;
            started++;
          }
          r.received++;
        }
      } catch (err) {
        r.error = Code[ConnectError.from(err).code];
        r.message = ConnectError.from(err).rawMessage;
      }
      return r;
    }),
  );
  return { results, started: () => started };
}

/** Waits until every stream has its first message (setting 1,000 up takes a moment). */
async function allStarted(started: () => number): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (started() < streams && Date.now() < deadline) {
    await sleep(50);
  }
  assert.equal(started(), streams, "every stream is open");
}

async function clientsFor(chain: ProcessChain): Promise<EchoClient[]> {
  return Promise.all(Array.from({ length: streams / 100 + 2 }, () => chain.client()));
}

describe("faults under full load", { concurrency: 1 }, () => {
  describe("a backend killed, another stopped", { concurrency: 1 }, () => {
    let chain: ProcessChain;
    before(async () => {
      chain = await startProcessChain({ servers: 3, logLevel: "warn" });
    });
    after(() => chain.close());

    for (const [signal, index] of [
      ["SIGKILL", 1],
      ["SIGTERM", 2],
    ] as const) {
      it(`${signal}: ${signal === "SIGKILL" ? "only its calls fail, with UNAVAILABLE" : "no call fails"}`, async (t) => {
        const clients = await clientsFor(chain);
        const victim = chain.servers[index];
        assert.ok(victim);
        // The victim's instance id, from the streams that land on it.
        const { results, started } = openStreams(clients, 12);
        let stopped = false;
        const fault = (async () => {
          await allStarted(started);
          await victim.stop(signal);
          stopped = true;
        })();
        const load = await runUnaryLoad(clients, {
          total: 1_000_000,
          concurrency: 16,
          stop: () => stopped,
        });
        await fault;
        const done = await results;
        const failed = done.filter((s) => s.error !== undefined || s.received !== 12);
        t.diagnostic(
          `unary ok ${load.ok}, failed ${totalErrors(load)} ${JSON.stringify(load.errors)} ${load.samples.slice(0, 2).join("; ")}; streams complete ${done.length - failed.length}, failed ${failed.length} ${JSON.stringify([...new Set(failed.map((f) => `${f.error} ${f.message} after ${f.received}`))])}`,
        );
        if (signal === "SIGTERM") {
          assert.equal(totalErrors(load), 0, load.samples.join("; "));
          assert.deepEqual(failed, []);
        } else {
          assert.ok(Object.keys(load.errors).every((c) => c === "Unavailable"));
          assert.ok(totalErrors(load) <= 16);
          const victimIds = new Set(failed.map((f) => f.instanceId));
          assert.equal(victimIds.size, 1, "every failed stream was on the killed backend");
          assert.ok(failed.every((f) => f.error === "Unavailable"));
          // A third of the streams were on it.
          assert.ok(failed.length > 200 && failed.length < 450, `${failed.length} of ${streams}`);
        }
        await victim.start();
      });
    }
  });

  describe("the gateway restarted", { concurrency: 1 }, () => {
    let chain: ProcessChain;
    before(async () => {
      chain = await startProcessChain({ servers: 3, gatewayProcess: true, logLevel: "warn" });
    });
    after(() => chain.close());

    it("drains 1,000 open streams, and the same clients' next calls succeed once it is back", async (t) => {
      const clients = await clientsFor(chain);
      const { results, started } = openStreams(clients, 12);
      await allStarted(started);
      const old = chain.gatewayProc;
      assert.ok(old);
      old.child.kill("SIGTERM");
      assert.equal(await old.exited, 0);
      await chain.startGateway();
      const done = await results;
      const after = await runUnaryLoad(clients, { total: 5000, concurrency: 16 });
      t.diagnostic(
        `streams complete ${done.filter((s) => s.error === undefined && s.received === 12).length} of ${streams}; after the restart ${after.ok} calls ok, ${totalErrors(after)} failed`,
      );
      assert.deepEqual(
        done.filter((s) => s.error !== undefined || s.received !== 12),
        [],
      );
      assert.equal(totalErrors(after), 0, after.samples.join("; "));
    });
  });
});

/**
 * Faults through the whole chain: a backend killed or stopped under load,
 * the issuer's JWKS endpoint and the gateway's metadata server going away,
 * the gateway restarted under a calling client. Servers (and, for the
 * restart, the gateway) run as child processes so that SIGKILL and SIGTERM
 * are real.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { createEchoClient, type EchoClient } from "../../client/echo-client.ts";
import { loadGatewayConfig } from "../../gateway/config.ts";
import { type StartedGateway, startGateway } from "../../gateway/start.ts";
import { createIssuer, type Issuer } from "../../local/issuer.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";
import {
  backendAudience,
  bearer,
  clientEmail,
  defaultApiConfig,
  gatewayAudience,
  gatewayEmail,
} from "../helpers/chain.ts";
import { runUnaryLoad, totalErrors } from "../helpers/load.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";
import { createCaptureLogger, type StartedServer, startServer } from "../helpers/server.ts";
import { startTcpProxy, type TcpProxy } from "../helpers/tcp-proxy.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function code(err: unknown): string {
  return Code[ConnectError.from(err).code] ?? "?";
}

interface StreamResult {
  instanceId: string | undefined;
  received: number;
  error: string | undefined;
}

/** `n` server streams of `count` messages, one every `intervalMs`, spread over `clients`. */
function slowStreams(
  clients: readonly EchoClient[],
  n: number,
  count: number,
  intervalMs: number,
): Promise<StreamResult[]> {
  return Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const result: StreamResult = { instanceId: undefined, received: 0, error: undefined };
      try {
        for await (const r of (clients[i % clients.length] as EchoClient).client.echoServerStream({
          message: `s${i}`,
          count,
          interval: durationFromMs(intervalMs),
        })) {
          result.instanceId ??= r.instance?.id;
          result.received++;
        }
      } catch (err) {
        result.error = code(err);
      }
      return result;
    }),
  );
}

async function instanceIdOf(chain: ProcessChain, index: number): Promise<string> {
  const server = chain.servers[index];
  assert.ok(server);
  const c = createEchoClient({
    address: server.address,
    plaintext: true,
    idleConnectionTimeoutMs: 50,
    interceptors: [bearer(await chain.issuer.mintIdToken(gatewayEmail, backendAudience))],
  });
  try {
    return (await c.client.echo({ message: "who" })).instance?.id ?? "";
  } finally {
    c.close();
  }
}

const timeOf = (l: Record<string, unknown>) => Date.parse(String(l["time"]));

// The suites run side by side (each on its own chain): the JWKS case has to
// wait out a 30 s refetch cooldown, which the others fill.
describe("faults through the chain", { concurrency: true }, () => {
  describe("the issuer's JWKS endpoint down", { concurrency: 1 }, () => {
    let chain: ProcessChain;
    before(async () => {
      chain = await startProcessChain({ servers: 2, logLevel: "warn" });
    });
    after(() => chain.close());

    it("keeps verifying with cached keys at both hops; refuses a new kid cleanly, then accepts it once the endpoint is back", async () => {
      const startedAt = Date.now();
      // The gateway and both servers fetched the keys at start-up, before
      // any call.
      const fetched = () => chain.issuer.requestCount("/oauth2/v3/certs");
      while (fetched() < 3 && Date.now() - startedAt < 5000) {
        await sleep(20);
      }
      assert.equal(fetched(), 3, "each process fetched the keys once");
      chain.issuer.setAvailable(false);
      const known = await chain.client();
      for (let i = 0; i < 6; i++) {
        const res = await known.client.echo({ message: `cached ${i}` });
        assert.equal(res.caller?.endUser?.email, clientEmail, "verified at the gateway");
        assert.equal(res.caller?.principal?.email, gatewayEmail, "and at the server");
      }
      await chain.issuer.rotate();
      const rotated = await chain.client();
      const directToServer = createEchoClient({
        address: chain.servers[0]?.address as string,
        plaintext: true,
        idleConnectionTimeoutMs: 50,
        interceptors: [bearer(await chain.issuer.mintIdToken(gatewayEmail, backendAudience))],
      });
      try {
        const t = performance.now();
        await assert.rejects(rotated.client.echo({ message: "new kid" }), (err) => {
          assert.equal(code(err), "Unauthenticated");
          assert.equal(
            ConnectError.from(err).rawMessage,
            `{"code":401,"message":"Jwks doesn't have key to match kid or alg from Jwt"}`,
          );
          return true;
        });
        await assert.rejects(directToServer.client.echo({ message: "new kid" }), (err) => {
          assert.equal(code(err), "Unauthenticated");
          return true;
        });
        assert.ok(performance.now() - t < 2000, "refused at once");
        assert.equal((await known.client.echo({ message: "still" })).message, "still");

        chain.issuer.setAvailable(true);
        // Accepted at the latest when the 30 s refetch cooldown since the
        // last fetch has passed (lib/jwt-keys.ts), at both doors.
        let acceptedAt: number | undefined;
        while (acceptedAt === undefined && Date.now() - startedAt < 40_000) {
          try {
            await rotated.client.echo({ message: "new kid again" });
            await directToServer.client.echo({ message: "new kid again" });
            acceptedAt = Date.now();
          } catch (err) {
            assert.equal(code(err), "Unauthenticated");
            await sleep(500);
          }
        }
        assert.ok(acceptedAt, "the new kid was accepted after the endpoint returned");
      } finally {
        directToServer.close();
      }
    });
  });

  // One after another: each starts child processes, and the kill measures
  // timing that a concurrent start-up would disturb.
  describe("processes and the metadata server", { concurrency: 1 }, () => {
    describe("the gateway's metadata server down", { concurrency: true }, () => {
      interface MetadataRig {
        issuer: Issuer;
        metadata: MetadataServer;
        proxy: TcpProxy;
        server: StartedServer;
        gateway: StartedGateway;
        client: EchoClient;
        close(): Promise<void>;
      }

      /** Chain whose gateway reaches a metadata server minting 4-second tokens through a proxy. */
      async function startRig(
        proxyMode: TcpProxy["mode"] = "forward",
        lifetime = 4,
      ): Promise<MetadataRig> {
        const issuer = await createIssuer();
        const metadata = await createMetadataServer({
          issuer,
          email: gatewayEmail,
          tokenLifetimeSeconds: lifetime,
        });
        const proxy = await startTcpProxy({
          host: "127.0.0.1",
          port: Number(metadata.host.split(":")[1]),
        });
        proxy.mode = proxyMode;
        const server = await startServer({
          ECHO_AUTH_MODE: "verify",
          ECHO_AUDIENCES: backendAudience,
          ECHO_JWKS_URI: issuer.jwksUri,
          ECHO_ALLOWED_PRINCIPALS: gatewayEmail,
        });
        const dir = mkdtempSync(join(tmpdir(), "echo-metadata-"));
        const configFile = join(dir, "api_config.yaml");
        writeFileSync(
          configFile,
          defaultApiConfig({ backends: `grpc://${server.address}`, jwksUri: issuer.jwksUri }),
        );
        const { logger } = createCaptureLogger();
        const gateway = await startGateway(
          loadGatewayConfig({}, [
            "--config",
            configFile,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metadata-host",
            proxy.host,
          ]),
          { logger },
        );
        const client = createEchoClient({
          address: `127.0.0.1:${gateway.port}`,
          plaintext: true,
          idleConnectionTimeoutMs: 100,
          interceptors: [bearer(await issuer.sign({ aud: gatewayAudience, email: clientEmail }))],
        });
        return {
          issuer,
          metadata,
          proxy,
          server,
          gateway,
          client,
          async close() {
            client.close();
            await gateway.close();
            await server.close();
            await proxy.close();
            await metadata.close();
            await issuer.close();
            rmSync(dir, { recursive: true, force: true });
          },
        };
      }

      /** Calls until `until` ms have passed; each outcome with its latency. */
      async function callFor(rig: MetadataRig, ms: number) {
        const results: { at: number; outcome: string; latencyMs: number; message: string }[] = [];
        const started = Date.now();
        while (Date.now() - started < ms) {
          const t = performance.now();
          try {
            await rig.client.client.echo({ message: "x" });
            results.push({
              at: Date.now(),
              outcome: "OK",
              latencyMs: performance.now() - t,
              message: "",
            });
          } catch (err) {
            results.push({
              at: Date.now(),
              outcome: code(err),
              latencyMs: performance.now() - t,
              message: ConnectError.from(err).rawMessage,
            });
          }
          await sleep(150);
        }
        return results;
      }

      const tokenNotFound = `{"code":500,"message":"Token not found for audience: ${backendAudience}"}`;

      for (const mode of ["reset", "hang"] as const) {
        it(`${mode === "reset" ? "refusing" : "hung"}: the cached token keeps working without delay until it expires, then calls fail with UNKNOWN at once or within the metadata timeout; recovery when it returns`, async () => {
          const rig = await startRig();
          try {
            const mintedAt = Date.now();
            assert.equal((await rig.client.client.echo({ message: "up" })).message, "up");
            rig.proxy.mode = mode;
            rig.proxy.dropAll();
            const results = await callFor(rig, 9000);
            // The token in use was minted around `mintedAt` and lives 4 s;
            // after that a call may still wait out one metadata timeout (3 s).
            const beforeExpiry = results.filter((r) => r.at < mintedAt + 3000);
            const afterExpiry = results.filter(
              (r) => r.at > mintedAt + 4000 + (mode === "hang" ? 3500 : 500),
            );
            assert.ok(beforeExpiry.length > 3);
            for (const r of beforeExpiry) {
              assert.equal(r.outcome, "OK");
              // A refresh waiting on the metadata server would take its 3 s timeout.
              assert.ok(r.latencyMs < 2000, `no wait on the metadata server (${r.latencyMs} ms)`);
            }
            assert.ok(afterExpiry.length > 0);
            for (const r of afterExpiry) {
              assert.deepEqual([r.outcome, r.message], ["Unknown", tokenNotFound]);
              assert.ok(
                r.latencyMs < (mode === "reset" ? 500 : 5500),
                `bounded (${r.latencyMs} ms)`,
              );
            }
            rig.proxy.mode = "forward";
            const t = performance.now();
            let back = false;
            while (!back && performance.now() - t < 8000) {
              back = await rig.client.client.echo({ message: "back" }).then(
                () => true,
                () => false,
              );
            }
            assert.ok(back, "calls succeed again once the metadata server answers");
          } finally {
            await rig.close();
          }
        });
      }

      it("hung from the start: the gateway starts within its timeout and calls fail with UNKNOWN instead of hanging", async () => {
        const t = performance.now();
        const rig = await startRig("hang");
        try {
          assert.ok(performance.now() - t < 12_000, "started");
          const c = performance.now();
          await assert.rejects(rig.client.client.echo({ message: "x" }), (err) => {
            assert.equal(code(err), "Unknown");
            assert.equal(ConnectError.from(err).rawMessage, tokenNotFound);
            return true;
          });
          assert.ok(performance.now() - c < 6000, "within the token timeout");
        } finally {
          await rig.close();
        }
      });
    });

    describe("the gateway restarted while a client keeps calling", { concurrency: 1 }, () => {
      let chain: ProcessChain;
      before(async () => {
        chain = await startProcessChain({ servers: 2, gatewayProcess: true, logLevel: "warn" });
      });
      after(() => chain.close());

      it("drains the calls in flight, and the same client's next calls succeed once it is back", async () => {
        const { client } = await chain.client();
        const log: { phase: string; outcome: string; message?: string }[] = [];
        let phase = "before";
        let stop = false;
        const loop = (async () => {
          let n = 0;
          while (!stop) {
            try {
              await client.echo({ message: `r${n++}` }, { timeoutMs: 5000 });
              log.push({ phase, outcome: "OK" });
            } catch (err) {
              log.push({ phase, outcome: code(err), message: ConnectError.from(err).rawMessage });
              await sleep(20);
            }
          }
        })();
        const stream = (async () => {
          let received = 0;
          for await (const _ of client.echoServerStream({
            message: "through the restart",
            count: 8,
            interval: durationFromMs(100),
          })) {
            received++;
          }
          return received;
        })();
        await sleep(300);
        const old = chain.gatewayProc;
        assert.ok(old);
        phase = "stopping";
        old.child.kill("SIGTERM");
        assert.equal(await old.exited, 0);
        phase = "down";
        await sleep(300);
        phase = "starting";
        await chain.startGateway();
        phase = "after";
        await sleep(1000);
        stop = true;
        await loop;
        assert.equal(await stream, 8, "the stream in flight finished during the drain");
        const byPhase = (p: string) => log.filter((l) => l.phase === p);
        assert.ok(byPhase("before").every((l) => l.outcome === "OK"));
        // While it is away calls fail with UNAVAILABLE (connection refused).
        // A call sent just as its GOAWAY arrived is refused unprocessed
        // (REFUSED_STREAM), which Connect's client reports as INTERNAL.
        const away = [...byPhase("stopping"), ...byPhase("down"), ...byPhase("starting")];
        assert.deepEqual(
          away.filter(
            (l) =>
              l.outcome !== "OK" &&
              l.outcome !== "Unavailable" &&
              !(l.outcome === "Internal" && /REFUSED_STREAM/.test(l.message ?? "")),
          ),
          [],
        );
        const after = byPhase("after");
        assert.ok(after.length > 10);
        assert.ok(
          after.every((l) => l.outcome === "OK"),
          `after: ${JSON.stringify(after.filter((l) => l.outcome !== "OK"))}`,
        );
      });
    });

    describe("a backend killed or stopped under load", { concurrency: 1 }, () => {
      let chain: ProcessChain;
      before(async () => {
        chain = await startProcessChain({ servers: 3, logLevel: "warn" });
      });
      after(() => chain.close());

      it("SIGKILL: only its in-flight calls fail (UNAVAILABLE); it is skipped within a second, and used again once back", async (t) => {
        const victim = chain.servers[1];
        assert.ok(victim && chain.gateway);
        const knownIds = new Set(await Promise.all([0, 1, 2].map((i) => instanceIdOf(chain, i))));
        const victimId = await instanceIdOf(chain, 1);
        const backend = chain.gateway.gateway.pools
          .values()
          .next()
          .value?.backends.find((b) => b.origin === `http://${victim.address}`);
        assert.ok(backend);
        const clients = await Promise.all([0, 1, 2].map(() => chain.client()));

        const streams = slowStreams(clients, 30, 30, 100);
        let killedAt = 0;
        let downAfterMs = Number.NaN;
        let restartedAt = 0;
        const fault = (async () => {
          await sleep(800);
          killedAt = Date.now();
          await victim.stop("SIGKILL");
          while (!backend.isDown()) {
            await sleep(5);
          }
          downAfterMs = Date.now() - killedAt;
          await sleep(2000);
          await victim.start();
          restartedAt = Date.now();
        })();
        const outcomes: { outcome: string; at: number }[] = [];
        let servedAgainAt: number | undefined;
        const load = await runUnaryLoad(clients, {
          total: 1_000_000,
          concurrency: 24,
          // Until the restarted server (a new instance id) answers, or 10 s.
          stop: () =>
            restartedAt > 0 && (servedAgainAt !== undefined || Date.now() - restartedAt > 10_000),
          onResult: (outcome, _at, instanceId) => {
            outcomes.push({ outcome, at: Date.now() });
            if (restartedAt > 0 && instanceId !== undefined && !knownIds.has(instanceId)) {
              servedAgainAt ??= Date.now();
            }
          },
        });
        await fault;
        const streamResults = await streams;

        // Unary calls in flight on the victim had no answer yet: retried elsewhere.
        assert.ok(
          Object.keys(load.errors).every((c) => c === "Unavailable") && totalErrors(load) <= 24,
          `unary failures: ${JSON.stringify(load.errors)} ${load.samples.join("; ")}`,
        );
        // Streams it was serving fail with UNAVAILABLE; every other completes.
        const onVictim = streamResults.filter((s) => s.instanceId === victimId);
        assert.ok(onVictim.length > 0, "some streams were on the victim");
        for (const s of streamResults) {
          if (s.instanceId === victimId) {
            assert.equal(s.error, "Unavailable", "a stream of the killed backend");
          } else {
            assert.deepEqual([s.error, s.received], [undefined, 30], "a stream elsewhere");
          }
        }
        assert.ok(downAfterMs < 1000, `marked down after ${downAfterMs} ms`);

        // After the first second, the dead backend only sees the gateway's
        // probes: one connection attempt each time its backoff ends (1 s,
        // then 2 s, …); the calls picked meanwhile are retried elsewhere.
        // Without the mark-down, a third of all calls would go to it.
        const inWindow = (l: Record<string, unknown>) =>
          timeOf(l) > killedAt + 1000 && timeOf(l) < restartedAt;
        const probes = chain.gatewayLogs.filter(
          (l) =>
            l["message"] === "backend connection error" &&
            l["backend"] === backend.origin &&
            inWindow(l),
        ).length;
        const retriesOffVictim = chain.gatewayLogs.filter(
          (l) =>
            l["message"] === "retrying on another backend" &&
            l["backend"] === backend.origin &&
            inWindow(l),
        ).length;
        const callsInWindow = outcomes.filter(
          (o) => o.at > killedAt + 1000 && o.at < restartedAt,
        ).length;
        assert.ok(probes <= 2, `${probes} connection attempts in ${restartedAt - killedAt} ms`);
        // Back: it serves again at the gateway's next probe, at most the
        // backoff's cap (8 s) after its return.
        assert.ok(servedAgainAt !== undefined, "the restarted backend served calls again");
        t.diagnostic(
          `unary ok ${load.ok}, failed ${totalErrors(load)}; streams on the victim ${onVictim.length} (UNAVAILABLE), elsewhere ${streamResults.length - onVictim.length} complete; marked down after ${downAfterMs} ms; then ${probes} probes took ${retriesOffVictim} of ${callsInWindow} calls; served again ${servedAgainAt - restartedAt} ms after its return`,
        );
        assert.ok(servedAgainAt - restartedAt < 9000, `after ${servedAgainAt - restartedAt} ms`);
      });

      it("SIGTERM: no call fails; refused streams are retried elsewhere while the server drains", async (t) => {
        const victim = chain.servers[2];
        assert.ok(victim);
        const victimId = await instanceIdOf(chain, 2);
        const clients = await Promise.all([0, 1, 2].map(() => chain.client()));
        const streams = slowStreams(clients, 30, 15, 100);
        let exit: number | string | undefined;
        const fault = (async () => {
          await sleep(500);
          exit = await victim.stop("SIGTERM");
        })();
        const load = await runUnaryLoad(clients, {
          total: 1_000_000,
          concurrency: 24,
          stop: () => exit !== undefined,
        });
        await fault;
        const streamResults = await streams;
        assert.equal(exit, 0, "the server drained and exited 0");
        assert.equal(totalErrors(load), 0, `${JSON.stringify(load.errors)} ${load.samples}`);
        assert.ok(load.ok > 100);
        assert.ok(
          streamResults.some((s) => s.instanceId === victimId),
          "it was serving streams",
        );
        const incomplete = streamResults.filter((s) => s.error !== undefined || s.received !== 15);
        if (incomplete.length > 0) {
          const ids = await Promise.all(
            [0, 1].map((i) => instanceIdOf(chain, i).catch((e: unknown) => String(e))),
          );
          assert.fail(
            `incomplete streams ${JSON.stringify(incomplete)}; victim ${victimId}, others ${ids}; server 1 exit ${chain.servers[1]?.proc.child.exitCode} ${chain.servers[1]?.proc.child.signalCode} stderr ${chain.servers[1]?.proc.stderr()} stdout-tail ${chain.servers[1]?.proc.stdout().slice(-1500)}; gateway: ${JSON.stringify(
              chain.gatewayLogs.filter((l) => l["message"] !== "rpc").slice(-30),
            )}`,
          );
        }
        t.diagnostic(`unary ok ${load.ok}, failed 0; ${streamResults.length} streams complete`);
        await victim.start();
      });
    });
  });
});

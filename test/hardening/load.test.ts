/**
 * Load through the whole chain, sized for `npm test`: client → gateway → three
 * servers, each in its own process, verification on at both hops. Every call
 * must succeed and every stream complete. Memory is judged by each
 * process's live heap after a full collection, which a shared, busy CI core
 * does not disturb; the RSS bound (second half within 10 % of the first)
 * needs the full run's warm-up and is checked by `npm run soak`
 * (test/soak/load.soak.ts). RSS figures are reported here all the same.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { describeChainLoad, runChainLoad, totalErrors } from "../helpers/load.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";

/** Every child process reports its live heap after a full GC on SIGUSR2. */
const heapProbe = {
  NODE_OPTIONS: `--expose-gc --import ${new URL("../helpers/heap-probe.ts", import.meta.url).pathname}`,
};

/** The last `heap-probe` line a process wrote: live heap in MiB. */
function liveHeapMiB(stderr: string): number | undefined {
  const lines = stderr.split("\n").filter((l) => l.startsWith("heap-probe "));
  const last = lines[lines.length - 1];
  return last
    ? Math.round((JSON.parse(last.slice("heap-probe ".length)).heapUsed / 2 ** 20) * 10) / 10
    : undefined;
}

describe("load through the chain (npm test size)", () => {
  let chain: ProcessChain;
  before(async () => {
    chain = await startProcessChain({
      servers: 3,
      gatewayProcess: true,
      logLevel: "warn",
      gatewayEnv: heapProbe,
      serverEnv: heapProbe,
    });
  });
  after(() => chain.close());

  it("serves 10,000 unary calls and 2 × 200 concurrent server streams without an error; no live heap grows", async (t) => {
    const clients = await Promise.all(Array.from({ length: 4 }, () => chain.client()));
    const procs = () => ({
      gateway: chain.gatewayProc,
      ...Object.fromEntries(chain.servers.map((s, i) => [`server${i}`, s.proc])),
    });
    const heap: Record<string, { start?: number; end?: number }> = {};
    const report = await runChainLoad(
      clients,
      {
        gateway: () => chain.gatewayProc?.child.pid ?? 0,
        ...Object.fromEntries(chain.servers.map((s, i) => [`server${i}`, () => s.pid()])),
      },
      {
        unary: 10_000,
        streams: 200,
        streamMessages: 50,
        async probe(when) {
          for (const p of Object.values(procs())) {
            p?.child.kill("SIGUSR2");
          }
          await new Promise((r) => setTimeout(r, 500));
          for (const [name, p] of Object.entries(procs())) {
            heap[name] = { ...heap[name], [when]: liveHeapMiB(p?.stderr() ?? "") };
          }
        },
      },
    );
    for (const line of describeChainLoad(report)) {
      t.diagnostic(line);
    }
    for (const [name, h] of Object.entries(heap)) {
      t.diagnostic(`live heap after GC ${name}: ${h.start} MiB before the run, ${h.end} MiB after`);
    }
    for (const r of report.unary) {
      assert.equal(totalErrors(r), 0, r.samples.join("; "));
      assert.equal(r.ok, 5000);
    }
    for (const r of report.streams) {
      assert.equal(totalErrors(r) + r.incomplete, 0, r.samples.join("; "));
      assert.equal(r.ok, 200);
    }
    for (const [name, h] of Object.entries(heap)) {
      assert.ok(h.start !== undefined && h.end !== undefined, `${name} reported its heap`);
      assert.ok(h.end <= h.start * 1.1 + 2, `${name}: live heap ${h.start} → ${h.end} MiB`);
    }
  });
});

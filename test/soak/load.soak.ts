/**
 * The full-size load run (`npm run soak`): 200,000 unary calls and twice
 * 1,000 concurrent server streams through client → gateway → three servers,
 * each in its own process, verification on at both hops. Zero errors, every
 * stream complete, and each process's peak RSS in the second half within
 * 10 % of the first half's. The figures go to docs/reliability.md.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { describeChainLoad, runChainLoad, totalErrors } from "../helpers/load.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";

const unary = Number(process.env["SOAK_UNARY"] ?? 200_000);
const streams = Number(process.env["SOAK_STREAMS"] ?? 1000);
/** Every child process reports its live heap after a full GC on SIGUSR2. */
const heapProbe = {
  NODE_OPTIONS: `--expose-gc --import ${new URL("../helpers/heap-probe.ts", import.meta.url).pathname}`,
};

/** The last `heap-probe` line a process wrote, in MiB. */
function liveHeapMiB(stderr: string): number | undefined {
  const lines = stderr.split("\n").filter((l) => l.startsWith("heap-probe "));
  const last = lines[lines.length - 1];
  return last
    ? Math.round((JSON.parse(last.slice("heap-probe ".length)).heapUsed / 2 ** 20) * 10) / 10
    : undefined;
}

describe("load through the chain (full size)", () => {
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

  it(`serves ${unary} unary calls and 2 × ${streams} concurrent server streams without an error, memory flat`, async (t) => {
    // 100 streams per connection at most (the gateway's limit): enough
    // connections to hold every stream open at once.
    const clients = await Promise.all(
      Array.from({ length: Math.max(4, Math.ceil(streams / 100)) }, () => chain.client()),
    );
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
        unary,
        streams,
        streamMessages: 100,
        // Long enough for V8's heap and the allocator to reach their working
        // size: the measured run starts from a steady state.
        warmup: 20_000,
        warmupStreamBatches: 2,
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
      assert.equal(r.ok, unary / 2);
    }
    for (const r of report.streams) {
      assert.equal(totalErrors(r) + r.incomplete, 0, r.samples.join("; "));
      assert.equal(r.ok, streams);
    }
    for (const [name, r] of Object.entries(report.rss)) {
      assert.ok(r.ratio <= 1.1, `${name}: ${r.firstPeakMiB} → ${r.secondPeakMiB} MiB`);
    }
    // What a leak would show: live objects piling up call after call.
    for (const [name, h] of Object.entries(heap)) {
      assert.ok(h.start !== undefined && h.end !== undefined, `${name} reported its heap`);
      assert.ok(h.end <= h.start * 1.1 + 2, `${name}: live heap ${h.start} → ${h.end} MiB`);
    }
  });
});

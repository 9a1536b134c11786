/**
 * Load through the whole chain, sized for `npm test`: client → gateway → three
 * servers, each in its own process, verification on at both hops. Every call
 * must succeed, every stream complete, and no process may grow from the
 * first half of the run to the second. `npm run soak` runs the full size
 * (test/soak/load.soak.ts).
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { describeChainLoad, runChainLoad, totalErrors } from "../helpers/load.ts";
import { type ProcessChain, startProcessChain } from "../helpers/process-chain.ts";

describe("load through the chain (short)", () => {
  let chain: ProcessChain;
  before(async () => {
    chain = await startProcessChain({ servers: 3, gatewayProcess: true, logLevel: "warn" });
  });
  after(() => chain.close());

  it("serves 10,000 unary calls and 2 × 200 concurrent server streams without an error, memory flat", async (t) => {
    const clients = await Promise.all(Array.from({ length: 4 }, () => chain.client()));
    const report = await runChainLoad(
      clients,
      {
        gateway: () => chain.gatewayProc?.child.pid ?? 0,
        ...Object.fromEntries(chain.servers.map((s, i) => [`server${i}`, () => s.pid()])),
      },
      { unary: 10_000, streams: 200, streamMessages: 50 },
    );
    for (const line of describeChainLoad(report)) {
      t.diagnostic(line);
    }
    for (const r of report.unary) {
      assert.equal(totalErrors(r), 0, r.samples.join("; "));
      assert.equal(r.ok, 5000);
    }
    for (const r of report.streams) {
      assert.equal(totalErrors(r) + r.incomplete, 0, r.samples.join("; "));
      assert.equal(r.ok, 200);
    }
    for (const [name, r] of Object.entries(report.rss)) {
      // The full run (npm run soak) holds the 10 % bound; this short one only
      // catches gross growth.
      assert.ok(r.ratio <= 1.25, `${name}: ${r.firstPeakMiB} → ${r.secondPeakMiB} MiB`);
    }
  });
});

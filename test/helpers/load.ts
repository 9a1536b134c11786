/**
 * Bounded load for the hardening and soak suites: a fixed number of unary
 * RPCs or server streams spread over a few workers, every outcome counted
 * by gRPC code, and per-process RSS sampled while it runs.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { EchoClient } from "../../client/echo-client.ts";
import { rssBytes } from "./process-chain.ts";

export interface LoadResult {
  ok: number;
  /** Failed calls per gRPC code name (e.g. `Unavailable`). */
  errors: Record<string, number>;
  /** First few failure messages, for assertion output. */
  samples: string[];
  durationMs: number;
}

export function totalErrors(result: LoadResult): number {
  return Object.values(result.errors).reduce((a, b) => a + b, 0);
}

function recordError(result: LoadResult, err: unknown): string {
  const e = ConnectError.from(err);
  const name = Code[e.code] ?? String(e.code);
  result.errors[name] = (result.errors[name] ?? 0) + 1;
  if (result.samples.length < 5) {
    result.samples.push(`${name}: ${e.rawMessage}`);
  }
  return name;
}

export interface UnaryLoadOptions {
  /** Total calls. */
  total: number;
  /** Calls in flight at once, spread round robin over `clients`. */
  concurrency: number;
  /** Called after each call with its outcome ("OK" or the code name) and the time it ended. */
  onResult?: (outcome: string, endedAtMs: number, instanceId: string | undefined) => void;
  /** Stops issuing new calls when it returns true. */
  stop?: () => boolean;
  /** Per-call deadline in ms; default 10 000. */
  timeoutMs?: number;
}

/** Runs `total` unary Echo calls with `concurrency` in flight over the given clients. */
export async function runUnaryLoad(
  clients: readonly EchoClient[],
  options: UnaryLoadOptions,
): Promise<LoadResult> {
  const result: LoadResult = { ok: 0, errors: {}, samples: [], durationMs: 0 };
  const started = performance.now();
  let issued = 0;
  const worker = async (w: number) => {
    const { client } = clients[w % clients.length] as EchoClient;
    while (issued < options.total && !options.stop?.()) {
      const n = issued++;
      try {
        const res = await client.echo(
          { message: `u${n}` },
          { timeoutMs: options.timeoutMs ?? 10_000 },
        );
        if (res.message !== `u${n}`) {
          throw new ConnectError(`wrong answer ${res.message} for u${n}`, Code.DataLoss);
        }
        result.ok++;
        options.onResult?.("OK", performance.now(), res.instance?.id);
      } catch (err) {
        const name = recordError(result, err);
        options.onResult?.(name, performance.now(), undefined);
      }
    }
  };
  await Promise.all(Array.from({ length: options.concurrency }, (_, w) => worker(w)));
  result.durationMs = performance.now() - started;
  return result;
}

export interface StreamLoadResult extends LoadResult {
  /** Streams that ended without error but with fewer than `count` messages. */
  incomplete: number;
  messages: number;
}

/**
 * Opens `streams` EchoServerStream calls at once (spread over `clients`),
 * each asking for `count` messages, and checks each arrives complete and in
 * order.
 */
export async function runServerStreams(
  clients: readonly EchoClient[],
  options: { streams: number; count: number; timeoutMs?: number },
): Promise<StreamLoadResult> {
  const result: StreamLoadResult = {
    ok: 0,
    errors: {},
    samples: [],
    durationMs: 0,
    incomplete: 0,
    messages: 0,
  };
  const started = performance.now();
  await Promise.all(
    Array.from({ length: options.streams }, async (_, i) => {
      const { client } = clients[i % clients.length] as EchoClient;
      let next = 0;
      try {
        for await (const r of client.echoServerStream(
          { message: `s${i}`, count: options.count },
          { timeoutMs: options.timeoutMs ?? 60_000 },
        )) {
          if (r.index !== next || r.message !== `s${i}`) {
            throw new ConnectError(`stream ${i}: got ${r.index} expected ${next}`, Code.DataLoss);
          }
          next++;
          result.messages++;
        }
        if (next === options.count) {
          result.ok++;
        } else {
          result.incomplete++;
        }
      } catch (err) {
        recordError(result, err);
      }
    }),
  );
  result.durationMs = performance.now() - started;
  return result;
}

export interface RssSample {
  atMs: number;
  /** RSS in bytes per process name (absent once the process is gone). */
  rss: Record<string, number>;
}

/** Samples the RSS of the named processes every `intervalMs` until stopped. */
export function sampleRss(
  pids: Record<string, () => number>,
  intervalMs = 200,
): { stop(): RssSample[] } {
  const samples: RssSample[] = [];
  const take = () => {
    const rss: Record<string, number> = {};
    for (const [name, pid] of Object.entries(pids)) {
      const bytes = rssBytes(pid());
      if (bytes !== undefined) {
        rss[name] = bytes;
      }
    }
    samples.push({ atMs: performance.now(), rss });
  };
  take();
  const timer = setInterval(take, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      take();
      return samples;
    },
  };
}

export interface RssHalves {
  /** Peak RSS in the first half of the run, in MiB. */
  firstPeakMiB: number;
  secondPeakMiB: number;
  /** second / first. */
  ratio: number;
}

/** Peak RSS per process in the first and the second half of the samples. */
export function rssHalves(samples: readonly RssSample[]): Record<string, RssHalves> {
  const out: Record<string, RssHalves> = {};
  const half = Math.floor(samples.length / 2);
  const names = new Set(samples.flatMap((s) => Object.keys(s.rss)));
  for (const name of names) {
    const peak = (from: number, to: number) =>
      Math.max(0, ...samples.slice(from, to).map((s) => s.rss[name] ?? 0)) / 2 ** 20;
    const firstPeakMiB = peak(0, half);
    const secondPeakMiB = peak(half, samples.length);
    out[name] = {
      firstPeakMiB: Math.round(firstPeakMiB * 10) / 10,
      secondPeakMiB: Math.round(secondPeakMiB * 10) / 10,
      ratio: Math.round((secondPeakMiB / firstPeakMiB) * 1000) / 1000,
    };
  }
  return out;
}

export interface ChainLoadOptions {
  /** Unary calls in all, half in each half of the run. */
  unary: number;
  /** Server streams open at once, once in each half. */
  streams: number;
  /** Messages per server stream. */
  streamMessages: number;
  /** Unary calls in flight at once. Default 64. */
  concurrency?: number;
  /** Client connections. Default enough for the streams at 100 per connection, at least 4. */
  connections?: number;
  /** Unary calls before measuring (JIT, pools, caches). Default 2 000. */
  warmup?: number;
  /** Batches of `streams` streams during the warm-up. Default 1. */
  warmupStreamBatches?: number;
  /**
   * Called after the warm-up and after the run, outside the RSS sampling,
   * e.g. to probe the processes' live heap.
   */
  probe?: (when: "start" | "end") => Promise<void>;
}

export interface ChainLoadReport {
  unary: LoadResult[];
  streams: StreamLoadResult[];
  rss: Record<string, RssHalves>;
  durationMs: number;
}

/**
 * The load of the hardening suites: a warm-up, then two identical halves,
 * each `unary / 2` unary calls with `streams` server streams open alongside,
 * RSS of every process sampled throughout.
 */
export async function runChainLoad(
  clients: readonly EchoClient[],
  pids: Record<string, () => number>,
  options: ChainLoadOptions,
): Promise<ChainLoadReport> {
  const concurrency = options.concurrency ?? 64;
  // Warm-up with the same mix, so that the first half does not include the
  // heap and the allocator growing to their working size.
  const batches = options.warmupStreamBatches ?? 1;
  await Promise.all([
    runUnaryLoad(clients, { total: options.warmup ?? 2000, concurrency }),
    (async () => {
      for (let b = 0; b < batches; b++) {
        await runServerStreams(clients, {
          streams: options.streams,
          count: options.streamMessages,
        });
      }
    })(),
  ]);
  await options.probe?.("start");
  const started = performance.now();
  const sampler = sampleRss(pids);
  const report: ChainLoadReport = { unary: [], streams: [], rss: {}, durationMs: 0 };
  for (let half = 0; half < 2; half++) {
    const [unary, streams] = await Promise.all([
      runUnaryLoad(clients, { total: Math.floor(options.unary / 2), concurrency }),
      runServerStreams(clients, { streams: options.streams, count: options.streamMessages }),
    ]);
    report.unary.push(unary);
    report.streams.push(streams);
  }
  report.rss = rssHalves(sampler.stop());
  report.durationMs = performance.now() - started;
  await options.probe?.("end");
  return report;
}

/** One line per figure, for test diagnostics and docs/reliability.md. */
export function describeChainLoad(report: ChainLoadReport): string[] {
  const unaryOk = report.unary.reduce((a, r) => a + r.ok, 0);
  const unaryErrors = report.unary.reduce((a, r) => a + totalErrors(r), 0);
  const unaryMs = report.unary.reduce((a, r) => a + r.durationMs, 0);
  const streamsOk = report.streams.reduce((a, r) => a + r.ok, 0);
  const streamErrors = report.streams.reduce((a, r) => a + totalErrors(r) + r.incomplete, 0);
  const messages = report.streams.reduce((a, r) => a + r.messages, 0);
  return [
    `unary: ${unaryOk} ok, ${unaryErrors} failed, ${Math.round(unaryOk / (unaryMs / 1000))} calls/s`,
    `server streams: ${streamsOk} complete (${messages} messages), ${streamErrors} failed or incomplete`,
    `run: ${(report.durationMs / 1000).toFixed(1)} s after warm-up`,
    ...Object.entries(report.rss).map(
      ([name, r]) =>
        `rss ${name}: first half peak ${r.firstPeakMiB} MiB, second half peak ${r.secondPeakMiB} MiB (×${r.ratio})`,
    ),
  ];
}

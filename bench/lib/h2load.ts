/**
 * h2load (nghttp2's HTTP/2 load generator) as the bench's load: external to
 * the processes under test, pinned to its own CPU, sending a pre-encoded
 * gRPC request. Results come from its summary and its per-request log.
 */
import { type ChildProcess, execFile, execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { percentileSorted } from "./stats.ts";

export const installHint =
  "h2load not found: install it with `apt-get install nghttp2-client` (Debian/Ubuntu), `brew install nghttp2` (macOS)";

/** h2load's version line, or undefined when it is not installed. */
export function h2loadVersion(): string | undefined {
  try {
    return execFileSync("h2load", ["--version"], { encoding: "utf8" }).split("\n")[0]?.trim();
  } catch {
    return undefined;
  }
}

export interface H2loadOptions {
  url: string;
  /** Request body file content (a gRPC frame). */
  body: Buffer;
  headers: Record<string, string>;
  /** Connections (`-c`). */
  connections: number;
  /** Streams in flight per connection (`-m`). */
  streams: number;
  /** Measured seconds (`-D`). */
  durationS: number;
  /** Unmeasured seconds before (`--warm-up-time`). */
  warmupS: number;
  /** CPU list for taskset, or undefined. */
  cpus: string | undefined;
  /** Scratch directory for the body and the per-request log. */
  dir: string;
}

export interface H2loadResult {
  /** Requests completed in the measured window. */
  done: number;
  succeeded: number;
  /** failed + errored + timeout, as h2load counts them. */
  failed: number;
  /** Responses with a non-2xx HTTP status. */
  non2xx: number;
  /** h2load's own figure: completed requests / measured seconds. */
  rps: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  /** Bytes of response data frames (h2load's "data"). */
  dataBytes: number;
}

/**
 * Runs h2load once. Bounded: h2load stops after warm-up + duration, and is
 * killed 30 s after that if it has not exited.
 */
export async function runH2load(o: H2loadOptions): Promise<H2loadResult> {
  const bodyFile = join(o.dir, "h2load-body.bin");
  const logFile = join(o.dir, "h2load-requests.tsv");
  writeFileSync(bodyFile, o.body);
  rmSync(logFile, { force: true });
  const args = [
    // h2load takes whole numbers with a unit.
    "-D",
    `${Math.round(o.durationS * 1000)}ms`,
    "--warm-up-time",
    `${Math.round(o.warmupS * 1000)}ms`,
    "-c",
    String(o.connections),
    "-m",
    String(o.streams),
    "-t",
    "1",
    "-d",
    bodyFile,
    `--log-file=${logFile}`,
    ...Object.entries(o.headers).flatMap(([k, v]) => ["-H", `${k}: ${v}`]),
    o.url,
  ];
  const [command, argv] = o.cpus
    ? ["taskset", ["-c", o.cpus, "h2load", ...args]]
    : ["h2load", args];
  const stdout = await new Promise<string>((resolve, reject) => {
    running = execFile(
      command as string,
      argv as string[],
      { timeout: Math.round((o.durationS + o.warmupS + 30) * 1000), maxBuffer: 16 * 1024 * 1024 },
      (err, out, errOut) => {
        if (err) {
          reject(new Error(`h2load failed: ${err.message}\n${errOut}`));
        } else {
          resolve(out);
        }
      },
    );
  });
  const result = parseSummary(stdout);
  const latencies = readLatencies(logFile);
  rmSync(logFile, { force: true });
  return {
    ...result,
    p50Ms: percentileSorted(latencies, 50) / 1000,
    p99Ms: percentileSorted(latencies, 99) / 1000,
    meanMs: latencies.length ? latencies.reduce((a, b) => a + b, 0) / latencies.length / 1000 : NaN,
  };
}

/** The h2load process of the run in progress, if any (for interrupts). */
let running: ChildProcess | undefined;

/** Stops a running h2load (by its PID), for SIGINT/SIGTERM handlers. */
export function stopH2load(): void {
  running?.kill("SIGTERM");
}

function parseSummary(out: string): Omit<H2loadResult, "p50Ms" | "p99Ms" | "meanMs"> {
  const num = (re: RegExp) => {
    const m = re.exec(out);
    if (!m) {
      throw new Error(`cannot read h2load output (${re}):\n${out}`);
    }
    return Number(m[1]);
  };
  const failed = num(/(\d+) failed/) + num(/(\d+) errored/) + num(/(\d+) timeout/);
  const non2xx = num(/(\d+) 3xx/) + num(/(\d+) 4xx/) + num(/(\d+) 5xx/);
  return {
    done: num(/(\d+) done/),
    succeeded: num(/(\d+) succeeded/),
    failed,
    non2xx,
    rps: num(/finished in [\d.]+m?s, ([\d.]+) req\/s/),
    dataBytes: num(/\((\d+)\) data/),
  };
}

/** Per-request durations in µs from h2load's log, sorted ascending. */
function readLatencies(logFile: string): Float64Array {
  let text: string;
  try {
    text = readFileSync(logFile, "utf8");
  } catch {
    return new Float64Array(0);
  }
  const lines = text.split("\n");
  const out = new Float64Array(lines.length);
  let n = 0;
  for (const line of lines) {
    const tab = line.lastIndexOf("\t");
    if (tab > 0) {
      out[n++] = Number(line.slice(tab + 1));
    }
  }
  return out.subarray(0, n).sort();
}

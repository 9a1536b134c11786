/**
 * `npm run bench`: the project's server and gateway under load, side by side
 * with reference peers, measured in the same run.
 *
 *   npm run bench                  # ≈ 8 min: 3 rounds, both payloads, cold starts
 *   npm run bench -- --quick       # ≈ 2 min: 3 short rounds, short payload
 *   npm run bench -- --variants    # ≈ 3 min: server variants (what we tried)
 *   npm run bench -- --rounds 5 --duration 10 --update-readme
 *
 * Load comes from h2load (nghttp2-client), a process of its own pinned to
 * one CPU, while every process under test is pinned to the other; the
 * bench's own process (Google stand-ins, status sampler, checks) shares the
 * load generator's CPU. Targets are alternated A B C … A B C … so that
 * drift (thermal, neighbours) spreads over all of them; figures are medians
 * over rounds. h2load counts HTTP 200 as success whatever the grpc-status,
 * so each target is also called with a real client before and after its
 * load, and grpc-status is sampled during the load.
 *
 * Output: tables on the terminal, bench/results/<date>.json, and an SVG
 * chart of the ratios (bench/results/<date>.svg, copied to latest.svg).
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, loadavg, release, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { type EchoClient, createEchoClient } from "../client/echo-client.ts";
import { EchoRequestSchema, EchoServerStreamRequestSchema } from "../gen/echo/v1/echo_pb.ts";
import { bearer, withHeaders } from "./lib/auth-header.ts";
import { buildJs } from "./lib/build.ts";
import { type ColdStartProbe, freePort, measureColdStart, waitForRpc } from "./lib/cold-start.ts";
import {
  echoPath,
  grpcFrame,
  grpcHeaders,
  serverStreamPath,
  type SampleTally,
  startStatusSampler,
} from "./lib/grpc-wire.ts";
import { h2loadVersion, installHint, runH2load, stopH2load } from "./lib/h2load.ts";
import { type JwtCost, measureJwtCost } from "./lib/jwt-cost.ts";
import {
  type Child,
  cpuSeconds,
  hasTaskset,
  logPath,
  machineBusy,
  peakRssMiB,
  pinSelf,
  root,
  spawnChild,
  stopAllChildren,
  stopChild,
  waitForLine,
} from "./lib/procs.ts";
import {
  type ChartInput,
  type LoadFigures,
  type TargetSummary,
  formatMiB,
  formatMs,
  formatRatio,
  formatRps,
  loadRows,
  markdownTable,
  ratioChartSvg,
  textTable,
} from "./lib/report.ts";
import {
  baseEnv,
  clientEmail,
  gatewayEmail,
  type StandIns,
  startStandIns,
} from "./lib/stand-ins.ts";
import { median, ratio, round } from "./lib/stats.ts";

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

const { values: flags } = parseArgs({
  options: {
    quick: { type: "boolean" },
    variants: { type: "boolean" },
    rounds: { type: "string" },
    duration: { type: "string" },
    only: { type: "string" },
    "no-cold-start": { type: "boolean" },
    "cold-start-only": { type: "boolean" },
    "update-readme": { type: "boolean" },
    "server-node-flags": { type: "string" },
    "cpu-prof": { type: "boolean" },
    "wait-quiet": { type: "string" },
    help: { type: "boolean", short: "h" },
  },
  strict: true,
});
if (flags.help) {
  process.stdout.write(`npm run bench -- [--quick] [--variants] [--cold-start-only] [--rounds N]
  [--duration S] [--only id,id] [--no-cold-start] [--update-readme] [--cpu-prof]
  [--wait-quiet S] [--server-node-flags="--flag …"]
Targets: server, chain-1, chain-3, grpc-js, connect-node, raw-h2; extras server-info,
server-verify, gateway-raw; with --variants the server and gateway variants. See bench/README.md.
`);
  process.exit(0);
}

const quick = flags.quick ?? false;
const rounds = Number(flags.rounds ?? 3);
const durationS = Number(flags.duration ?? (quick ? 1.5 : 5));
const warmupS = quick ? 0.5 : 1;
const latencyS = quick ? 1 : 2;
const streamS = quick ? 1 : 3;
if (!Number.isInteger(rounds) || rounds < 1 || !(durationS > 0)) {
  process.stderr.write("--rounds must be a positive integer and --duration a positive number\n");
  process.exit(2);
}

/**
 * Node flags the server and gateway run with: what the container's CMD
 * should use (see bench/README.md, "What we tried"). Overridable to measure
 * another setting.
 */
const defaultNodeFlags: string[] = ["--max-semi-space-size=16"];
const nodeFlags = flags["server-node-flags"]?.split(/\s+/).filter(Boolean) ?? defaultNodeFlags;
/**
 * With --cpu-prof every process under test writes a V8 CPU profile when it
 * exits, into bench/results/profiles/<time>/ (summarise one with
 * `node bench/profile-summary.ts FILE`).
 */
const profileDir = flags["cpu-prof"]
  ? join(
      root,
      "bench/results/profiles",
      new Date()
        .toISOString()
        .replace(/:/g, "-")
        .replace(/\.\d+Z$/, "Z"),
    )
  : undefined;
const profileFlags = profileDir ? ["--cpu-prof", `--cpu-prof-dir=${profileDir}`] : [];
if (profileDir) {
  mkdirSync(profileDir, { recursive: true });
}
/** Node flags of one process under test: the run's, or a variant's own. */
const flagsOf = (override?: readonly string[]) => [...(override ?? nodeFlags), ...profileFlags];

/** 256 requests in flight: 8 connections × 32 streams. */
const load = { connections: 8, streams: 32 };
/** Server stream: 64 calls in flight, each answered with `streamCount` messages. */
const streamLoad = { connections: 4, streams: 16 };
const streamCount = 100;

const payloads = {
  short: grpcFrame(EchoRequestSchema, { message: "hello" }),
  "1KiB": grpcFrame(EchoRequestSchema, { message: "x".repeat(1024) }),
} as const;
type PayloadName = keyof typeof payloads;
const payloadNames: PayloadName[] = quick || flags.variants ? ["short"] : ["short", "1KiB"];
const streamBody = grpcFrame(EchoServerStreamRequestSchema, {
  message: "hello",
  count: streamCount,
});

// ---------------------------------------------------------------------------
// CPUs: processes under test on one, load and bench on another.
// ---------------------------------------------------------------------------

const h2loadVer = h2loadVersion();
if (!h2loadVer) {
  process.stderr.write(`${installHint}\n`);
  process.exit(2);
}
const cpuCount = availableParallelism();
const pinning = hasTaskset() && cpuCount >= 2;
const testCpus = pinning ? "0" : undefined;
const loadCpus = pinning ? String(cpuCount - 1) : undefined;
if (pinning && loadCpus) {
  pinSelf(loadCpus);
} else {
  process.stderr.write(
    "warning: running unpinned (needs taskset from util-linux and at least 2 CPUs); figures will be noisier\n",
  );
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

interface Proc {
  role: string;
  child: Child;
}

interface Started {
  port: number;
  procs: Proc[];
  /** Files the count-verify preload writes at exit, per role. */
  verifyCountFiles: Map<string, string>;
}

interface Target {
  id: string;
  label: string;
  role: TargetSummary["role"];
  /** Whether calls carry the client's token (through the gateway). */
  /**
   * What calls carry: nothing, the client's token (through the gateway), or
   * what the gateway would send a backend (a verifying server, direct).
   */
  token: "none" | "client" | "backend";
  stream: boolean;
  start(ctx: Context, tag: string): Promise<Started>;
  /** Checks a real response of this target. */
  check(res: {
    message: string;
    caller?: { verification: string; principal?: { email: string }; endUser?: { email: string } };
  }): string | undefined;
}

interface Context {
  dir: string;
  standIns: StandIns;
}

const countVerifyUrl = pathToFileURL(join(root, "bench/lib/count-verify.ts")).href;

/** Any gRPC answer means the process is up (a verifying server answers UNAUTHENTICATED). */
const readinessProbe: ColdStartProbe = {
  path: echoPath,
  body: payloads.short,
  headers: grpcHeaders(),
};

async function startServer(
  ctx: Context,
  name: string,
  opts: {
    verify: boolean;
    logLevel?: string;
    script?: string[];
    countFile?: string;
    flags?: readonly string[];
  },
): Promise<{ proc: Proc; port: number }> {
  // At log level warn the server does not log that it listens: pick the
  // port here and wait for an answer on it.
  const port = await freePort();
  const env = {
    ...(opts.verify ? ctx.standIns.serverEnv() : baseEnv(ctx.dir)),
    HOST: "127.0.0.1",
    PORT: String(port),
    ECHO_LOG_LEVEL: opts.logLevel ?? "warn",
    ...(opts.countFile ? { BENCH_VERIFY_COUNT_FILE: opts.countFile } : {}),
  };
  const child = spawnChild({
    name,
    args: opts.script ?? ["server/main.ts"],
    env,
    nodeFlags: [...flagsOf(opts.flags), ...(opts.countFile ? ["--import", countVerifyUrl] : [])],
    cpus: testCpus,
    logFile: logPath(ctx.dir, name),
  });
  try {
    await waitForRpc(child, port, readinessProbe);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  return { proc: { role: name, child }, port };
}

function serverTarget(
  id: string,
  label: string,
  role: Target["role"],
  opts: { logLevel?: string; script?: string[]; flags?: readonly string[]; verify?: boolean } = {},
): Target {
  return {
    id,
    label,
    role,
    token: opts.verify ? "backend" : "none",
    stream: role !== "variant",
    async start(ctx, tag) {
      const { proc, port } = await startServer(ctx, `${id}-${tag}`, {
        ...opts,
        verify: opts.verify ?? false,
      });
      return { port, procs: [{ ...proc, role: "server" }], verifyCountFiles: new Map() };
    },
    check: (res) =>
      (
        opts.verify
          ? res.caller?.principal?.email === gatewayEmail &&
            res.caller.endUser?.email === clientEmail
          : res.caller?.verification === "none"
      )
        ? undefined
        : `caller ${JSON.stringify(res.caller)}`,
  };
}

function chainTarget(
  id: string,
  label: string,
  servers: number,
  backend: "server" | "raw-h2" = "server",
  flags?: readonly string[],
): Target {
  return {
    id,
    label,
    role: backend === "server" ? "ours" : "variant",
    token: "client",
    stream: servers === 1 && backend === "server",
    async start(ctx, tag) {
      const procs: Proc[] = [];
      const verifyCountFiles = new Map<string, string>();
      const ports: number[] = [];
      try {
        for (let i = 1; i <= servers; i++) {
          const role = servers === 1 ? "server" : `server-${i}`;
          if (backend === "raw-h2") {
            const peer = await startPeer(ctx, "raw-h2", `${id}-${tag}-${role}`, flags);
            procs.push({ role, child: peer.child });
            ports.push(peer.port);
            continue;
          }
          const countFile = join(ctx.dir, `${id}-${tag}-${role}.verify-count`);
          const { proc, port } = await startServer(ctx, `${id}-${tag}-${role}`, {
            verify: true,
            countFile,
            ...(flags ? { flags } : {}),
          });
          procs.push({ ...proc, role });
          ports.push(port);
          verifyCountFiles.set(role, countFile);
        }
        const { file } = ctx.standIns.writeApiConfig(`${id}-${tag}`, ports);
        const countFile = join(ctx.dir, `${id}-${tag}-gateway.verify-count`);
        const port = await freePort();
        const child = spawnChild({
          name: `${id}-${tag}-gateway`,
          args: ["gateway/main.ts", "--config", file, "--descriptor", "gen/echo.pb"],
          env: {
            ...ctx.standIns.gatewayEnv(),
            HOST: "127.0.0.1",
            PORT: String(port),
            GATEWAY_LOG_LEVEL: "warn",
            BENCH_VERIFY_COUNT_FILE: countFile,
          },
          nodeFlags: [...flagsOf(flags), "--import", countVerifyUrl],
          cpus: testCpus,
          logFile: logPath(ctx.dir, `${id}-${tag}-gateway`),
        });
        procs.unshift({ role: "gateway", child });
        verifyCountFiles.set("gateway", countFile);
        await waitForRpc(child, port, readinessProbe);
        return { port, procs, verifyCountFiles };
      } catch (err) {
        await Promise.all(procs.map((p) => stopChild(p.child)));
        throw err;
      }
    },
    check: (res) =>
      backend !== "server" ||
      (res.caller?.principal?.email === gatewayEmail && res.caller.endUser?.email === clientEmail)
        ? undefined
        : `caller ${JSON.stringify(res.caller)}`,
  };
}

async function startPeer(
  ctx: Context,
  peer: string,
  name: string,
  flags?: readonly string[],
): Promise<{ child: Child; port: number }> {
  const child = spawnChild({
    name,
    args: [`bench/peers/${peer}.ts`],
    env: { ...baseEnv(ctx.dir), PORT: "0" },
    nodeFlags: flagsOf(flags),
    cpus: testCpus,
    logFile: logPath(ctx.dir, name),
  });
  try {
    const line = await waitForLine(child, "peer listening");
    return { child, port: Number(line["port"]) };
  } catch (err) {
    await stopChild(child);
    throw err;
  }
}

function peerTarget(
  id: string,
  label: string,
  role: Target["role"],
  flags?: readonly string[],
): Target {
  return {
    id,
    label,
    role,
    token: "none",
    stream: true,
    async start(ctx, tag) {
      const { child, port } = await startPeer(ctx, id, `${id}-${tag}`, flags);
      return { port, procs: [{ role: "server", child }], verifyCountFiles: new Map() };
    },
    check: (res) =>
      res.caller?.verification === "none" ? undefined : `caller ${JSON.stringify(res.caller)}`,
  };
}

const references = ["grpc-js", "connect-node", "raw-h2"] as const;
const mainTargets: Target[] = [
  serverTarget("server", "server (direct)", "ours"),
  chainTarget("chain-1", "gateway → 1 server", 1),
  chainTarget("chain-3", "gateway → 3 servers", 3),
  peerTarget("grpc-js", "@grpc/grpc-js", "reference"),
  peerTarget("connect-node", "Connect on node:http2", "reference"),
  peerTarget("raw-h2", "hand-coded node:http2", "ceiling"),
];
const extraTargets: Target[] = [
  serverTarget("server-info", "server, info logs", "variant", { logLevel: "info" }),
  serverTarget("server-verify", "server, verifying, gateway's headers", "variant", {
    verify: true,
  }),
  chainTarget("gateway-raw", "gateway → hand-coded backend", 1, "raw-h2"),
];
/**
 * `--variants`: the server with one change at a time, for the "what we
 * tried" table of bench/README.md. Each is compared with `server` (the
 * current wiring and flags) and with the stock plugin.
 */
const v8Defaults: string[] = [];
const variantTargets: Target[] = [
  serverTarget("server", "server: lean route, semi-space 16 MiB (current)", "ours"),
  serverTarget("stock-plugin", "stock connect-fastify plugin", "variant", {
    script: ["bench/variants/serve.ts", "stock-plugin"],
  }),
  serverTarget("stock-plugin-v8", "stock plugin, V8 default heap", "variant", {
    script: ["bench/variants/serve.ts", "stock-plugin"],
    flags: v8Defaults,
  }),
  serverTarget("server-v8", "lean route, V8 default heap", "variant", { flags: v8Defaults }),
  serverTarget("server-semi-4", "lean route, semi-space 4 MiB", "variant", {
    flags: ["--max-semi-space-size=4"],
  }),
  serverTarget("server-old-96", "lean route, semi 16 + old space 96 MiB", "variant", {
    flags: ["--max-semi-space-size=16", "--max-old-space-size=96"],
  }),
  serverTarget("no-shutdown-signal", "lean route without shutdownSignal", "variant", {
    script: ["bench/variants/serve.ts", "no-shutdown-signal"],
  }),
  serverTarget("no-compression", "lean route, acceptCompression []", "variant", {
    script: ["bench/variants/serve.ts", "no-compression"],
  }),
  peerTarget("connect-node", "Connect on node:http2", "reference"),
  peerTarget("grpc-js", "@grpc/grpc-js", "reference"),
  chainTarget("gateway-raw", "gateway → hand-coded backend, semi 16", 1, "raw-h2"),
  chainTarget(
    "gateway-raw-v8",
    "gateway → hand-coded backend, V8 default heap",
    1,
    "raw-h2",
    v8Defaults,
  ),
  chainTarget("gateway-raw-semi-4", "gateway → hand-coded backend, semi 4", 1, "raw-h2", [
    "--max-semi-space-size=4",
  ]),
];

// --quick leaves the extras out (they are for reading the full run).
let targets: Target[] = flags.variants
  ? variantTargets
  : quick && !flags.only
    ? mainTargets
    : [...mainTargets, ...extraTargets];
if (flags.only) {
  const only = new Set(flags.only.split(","));
  targets = targets.filter((t) => only.has(t.id));
}
if (flags["cold-start-only"]) {
  targets = [];
}

// ---------------------------------------------------------------------------
// One target, one round
// ---------------------------------------------------------------------------

interface RunFigures {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  sampled: number;
  cpuUsPerRequest: number;
  /** The same per process role (gateway, server-1, …). */
  cpuUsByRole: Record<string, number>;
  cpuBusy: number;
}

interface RoundResult {
  load: Partial<Record<PayloadName, RunFigures>>;
  latency: Partial<Record<PayloadName, RunFigures>>;
  streamMessagesPerS?: number;
  peakRssMiB: Record<string, number>;
  checks: { passed: number; made: number; failures: string[] };
  /**
   * Signature verifications per process role: during the first load run
   * (cold verified-token caches, every server's first calls) and in the
   * steady state after it.
   */
  verifications?: Record<string, { first: number; steady: number }>;
  requests: number;
  /** Requests after the first load run (the steady state). */
  steadyRequests: number;
  /** Share of the CPUs other processes kept busy just before this round (0–1). */
  busyBefore?: number | null;
  /** ID-token requests the gateway's metadata server answered during the round. */
  identityRequests?: number;
  jwksRequests?: number;
}

async function checkWithClient(
  target: Target,
  port: number,
  ctx: Context,
): Promise<string | undefined> {
  let client: EchoClient | undefined;
  try {
    client = createEchoClient({
      address: `127.0.0.1:${port}`,
      plaintext: true,
      idleConnectionTimeoutMs: 100,
      defaultTimeoutMs: 5000,
      interceptors:
        target.token === "client"
          ? [bearer(ctx.standIns.clientToken)]
          : target.token === "backend"
            ? [withHeaders(ctx.standIns.backendHeaders)]
            : [],
    });
    const res = await client.client.echo({ message: "bench check" });
    if (res.message !== "bench check") {
      return `answered ${JSON.stringify(res.message)}`;
    }
    return target.check(res);
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  } finally {
    client?.close();
  }
}

async function loadRun(
  started: Started,
  path: string,
  body: Buffer,
  headers: Record<string, string>,
  shape: { connections: number; streams: number },
  seconds: number,
  warmup: number,
  dir: string,
  sample: boolean,
): Promise<RunFigures & { done: number }> {
  const sampler = sample ? startStatusSampler(started.port, path, body, headers) : undefined;
  const cpu0 = started.procs.map((p) => cpuSeconds(p.child.pid));
  const t0 = performance.now();
  const r = await runH2load({
    url: `http://127.0.0.1:${started.port}${path}`,
    body,
    headers,
    ...shape,
    durationS: seconds,
    warmupS: warmup,
    cpus: loadCpus,
    dir,
  });
  const wallS = (performance.now() - t0) / 1000;
  const cpuByProc = started.procs.map((p, i) => cpuSeconds(p.child.pid) - (cpu0[i] ?? 0));
  const cpu = cpuByProc.reduce((a, v) => a + v, 0);
  // Requests during warm-up are not in `done`: scale CPU to the measured window.
  const perRequest = (cpuS: number) =>
    r.done > 0 ? ((cpuS * 1e6) / r.done) * (seconds / wallS) : Number.NaN;
  const tally: SampleTally = sampler ? await sampler.stop() : { calls: 0, notOk: 0, examples: [] };
  if (tally.examples.length > 0) {
    process.stdout.write(`    grpc-status samples not OK: ${tally.examples.join("; ")}\n`);
  }
  return {
    rps: r.rps,
    p50Ms: r.p50Ms,
    p99Ms: r.p99Ms,
    errors: r.failed + r.non2xx + tally.notOk,
    sampled: tally.calls,
    cpuUsPerRequest: perRequest(cpu),
    cpuUsByRole: Object.fromEntries(
      started.procs.map((p, i) => [p.role, perRequest(cpuByProc[i] ?? Number.NaN)]),
    ),
    cpuBusy: cpu / wallS,
    done: r.done,
  };
}

async function runTargetRound(target: Target, ctx: Context, round: number): Promise<RoundResult> {
  const tag = `r${round}`;
  const started = await target.start(ctx, tag);
  const token = ctx.standIns.clientToken;
  const headers = {
    ...grpcHeaders(target.token === "client" ? token : undefined),
    ...(target.token === "backend" ? ctx.standIns.backendHeaders : {}),
  };
  const result: RoundResult = {
    load: {},
    latency: {},
    peakRssMiB: {},
    checks: { passed: 0, made: 0, failures: [] },
    requests: 0,
    steadyRequests: 0,
  };
  const check = async (when: string) => {
    const failure = await checkWithClient(target, started.port, ctx);
    result.checks.made++;
    if (failure) {
      result.checks.failures.push(`${when}: ${failure}`);
      process.stdout.write(`    check ${when} FAILED: ${failure}\n`);
    } else {
      result.checks.passed++;
    }
  };
  // Startup fetches (JWKS, the gateway's first ID token) are done by now;
  // what follows counts only what the load causes.
  const idStart = ctx.standIns.gatewayMetadata.identityRequests();
  const jwksStart = ctx.standIns.issuer.requestCounts()["/oauth2/v3/certs"] ?? 0;
  let firstCounts: Map<string, number> | undefined;
  let steadyFrom = 0;
  try {
    await check("before load");
    // Variants and extras get the short payload only, to keep the run short.
    for (const p of target.role === "variant" ? (["short"] as const) : payloadNames) {
      const r = await loadRun(
        started,
        echoPath,
        payloads[p],
        headers,
        load,
        durationS,
        warmupS,
        ctx.dir,
        true,
      );
      result.load[p] = r;
      result.requests += r.done;
      if (firstCounts === undefined) {
        firstCounts = await snapshotVerifyCounts(started);
        steadyFrom = result.requests;
      }
      const l = await loadRun(
        started,
        echoPath,
        payloads[p],
        headers,
        { connections: 1, streams: 1 },
        latencyS,
        0.3,
        ctx.dir,
        false,
      );
      result.latency[p] = l;
      result.requests += l.done;
    }
    if (target.stream && !flags.variants) {
      const s = await loadRun(
        started,
        serverStreamPath,
        streamBody,
        headers,
        streamLoad,
        streamS,
        0.5,
        ctx.dir,
        true,
      );
      result.streamMessagesPerS = s.rps * streamCount;
      result.requests += s.done;
    }
    await check("after load");
    for (const p of started.procs) {
      result.peakRssMiB[p.role] = peakRssMiB(p.child.pid);
    }
  } finally {
    await Promise.all(started.procs.map((p) => stopChild(p.child)));
  }
  result.steadyRequests = result.requests - steadyFrom;
  if (started.verifyCountFiles.size > 0) {
    result.verifications = {};
    for (const [role, file] of started.verifyCountFiles) {
      const total = readCount(file);
      const first = firstCounts?.get(role) ?? Number.NaN;
      result.verifications[role] = { first, steady: total - first };
    }
    result.identityRequests = ctx.standIns.gatewayMetadata.identityRequests() - idStart;
    result.jwksRequests =
      (ctx.standIns.issuer.requestCounts()["/oauth2/v3/certs"] ?? 0) - jwksStart;
  }
  return result;
}

function readCount(file: string): number {
  try {
    return Number(readFileSync(file, "utf8"));
  } catch {
    return Number.NaN;
  }
}

/**
 * Asks every process running the count-verify preload for its count so far
 * (SIGUSR2 makes it write the file) and reads them.
 */
async function snapshotVerifyCounts(started: Started): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const [role, file] of started.verifyCountFiles) {
    const proc = started.procs.find((p) => p.role === role);
    if (!proc) {
      continue;
    }
    rmSync(file, { force: true });
    proc.child.process.kill("SIGUSR2");
    const deadline = performance.now() + 2000;
    let n = readCount(file);
    while (Number.isNaN(n) && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
      n = readCount(file);
    }
    out.set(role, n);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Cold start
// ---------------------------------------------------------------------------

interface ColdStartResult {
  id: string;
  label: string;
  samplesMs: number[];
  medianMs: number;
}

/**
 * How the processes are started for a cold start: as the repository runs
 * them (Node strips types while loading), with Node's compile cache, and
 * from a tsc build (plain .js), with and without the cache.
 */
interface StartKind {
  id: string;
  label: string;
  /** Build directory (plain JS) or undefined for the sources. */
  buildDir: string | undefined;
  compileCache: string | undefined;
}

async function coldStarts(ctx: Context, n: number, withBuild: boolean): Promise<ColdStartResult[]> {
  const out: ColdStartResult[] = [];
  const probe: ColdStartProbe = { path: echoPath, body: payloads.short, headers: grpcHeaders() };
  const kinds: StartKind[] = [
    { id: "", label: "", buildDir: undefined, compileCache: undefined },
    {
      id: "-compile-cache",
      label: ", NODE_COMPILE_CACHE",
      buildDir: undefined,
      compileCache: join(ctx.dir, "cache-ts"),
    },
  ];
  if (withBuild) {
    const buildDir = join(ctx.dir, "build");
    const ms = await buildJs(buildDir);
    process.stdout.write(`  (tsc build for the .js variants took ${(ms / 1000).toFixed(1)} s)\n`);
    kinds.push(
      { id: "-js", label: ", tsc-built .js", buildDir, compileCache: undefined },
      {
        id: "-js-compile-cache",
        label: ", tsc-built .js + NODE_COMPILE_CACHE",
        buildDir,
        compileCache: join(ctx.dir, "cache-js"),
      },
    );
  }
  const measure = async (
    id: string,
    label: string,
    spec: (port: number, i: number) => Parameters<typeof measureColdStart>[0],
    p: ColdStartProbe,
    prime: boolean,
  ) => {
    if (prime) {
      // Fills the compile cache; not measured (the image build would do this).
      const port = await freePort();
      await measureColdStart(spec(port, -1), port, p);
    }
    const samples: number[] = [];
    for (let i = 0; i < n; i++) {
      const port = await freePort();
      samples.push(await measureColdStart(spec(port, i), port, p));
    }
    const r = { id, label, samplesMs: samples, medianMs: median(samples) };
    process.stdout.write(
      `  ${label}: median ${r.medianMs.toFixed(0)} ms (${samples.map((v) => v.toFixed(0)).join(", ")})\n`,
    );
    out.push(r);
  };
  const script = (kind: StartKind, path: string) =>
    kind.buildDir ? path.replace(/\.ts$/, ".js") : path;
  const envOf = (kind: StartKind): Record<string, string> =>
    kind.compileCache ? { NODE_COMPILE_CACHE: kind.compileCache } : {};

  for (const kind of kinds) {
    await measure(
      `server${kind.id}`,
      `server${kind.label}`,
      (port, i) => ({
        name: `cold-server${kind.id}-${i}`,
        args: [script(kind, "server/main.ts")],
        env: {
          ...baseEnv(ctx.dir),
          HOST: "127.0.0.1",
          PORT: String(port),
          ECHO_LOG_LEVEL: "warn",
          ...envOf(kind),
        },
        nodeFlags: flagsOf(),
        cpus: testCpus,
        logFile: logPath(ctx.dir, `cold-server${kind.id}-${i}`),
        ...(kind.buildDir ? { cwd: kind.buildDir } : {}),
      }),
      probe,
      kind.compileCache !== undefined,
    );
  }

  // The gateway needs a backend and its own token source; one verifying
  // server stays up while the gateway is started again and again.
  const backend = await startServer(ctx, "cold-backend", { verify: true });
  try {
    const { file } = ctx.standIns.writeApiConfig("cold", [backend.port]);
    const gatewayProbe: ColdStartProbe = {
      ...probe,
      headers: grpcHeaders(ctx.standIns.clientToken),
    };
    for (const kind of kinds) {
      await measure(
        `gateway${kind.id}`,
        `gateway${kind.label} (first RPC through it)`,
        (port, i) => ({
          name: `cold-gateway${kind.id}-${i}`,
          args: [
            script(kind, "gateway/main.ts"),
            "--config",
            file,
            "--descriptor",
            join(root, "gen/echo.pb"),
          ],
          env: {
            ...ctx.standIns.gatewayEnv(),
            HOST: "127.0.0.1",
            PORT: String(port),
            GATEWAY_LOG_LEVEL: "warn",
            ...envOf(kind),
          },
          nodeFlags: flagsOf(),
          cpus: testCpus,
          logFile: logPath(ctx.dir, `cold-gateway${kind.id}-${i}`),
          ...(kind.buildDir ? { cwd: kind.buildDir } : {}),
        }),
        gatewayProbe,
        kind.compileCache !== undefined,
      );
    }
  } finally {
    await stopChild(backend.proc.child);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

// Ctrl-C or SIGTERM: stop what we started (servers, gateway, peers, h2load) before leaving.
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    process.stderr.write(`bench: ${signal}, stopping the processes it started\n`);
    stopH2load();
    stopAllChildren();
    setTimeout(() => process.exit(130), 500);
  });
}

const started = new Date();
const dir = mkdtempSync(join(tmpdir(), "echo-bench-"));
const standIns = await startStandIns(dir);
const ctx: Context = { dir, standIns };
const machine = {
  cpu: cpus()[0]?.model ?? "unknown",
  cpus: cpuCount,
  memoryGiB: Math.round(totalmem() / 2 ** 30),
  kernel: release(),
  node: process.version,
  h2load: h2loadVer,
  /** 1-minute load average when the run started. */
  loadAverageAtStart: Math.round((loadavg()[0] ?? 0) * 100) / 100,
  /** Share of all CPUs busy just before the run (0–1): anything but ≈0 is a neighbour. */
  busyAtStart: round(await machineBusy(), 2),
  pinning: pinning
    ? `processes under test on CPU ${testCpus}, h2load and the bench on CPU ${loadCpus}`
    : "none",
};
if ((machine.busyAtStart ?? 0) > 0.15) {
  process.stdout.write(
    `warning: ${Math.round((machine.busyAtStart ?? 0) * 100)}% of the CPUs were busy before the run started: something else runs on this machine, figures will be noisy\n`,
  );
}
process.stdout.write(
  `bench: ${rounds} round(s), ${targets.length} targets, ${durationS}s (+${warmupS}s warm-up) at ${load.connections * load.streams} in flight, payloads ${payloadNames.join(", ")}\n` +
    `machine: ${machine.cpus}× ${machine.cpu}, ${machine.memoryGiB} GiB, Linux ${machine.kernel}, Node ${machine.node}, ${machine.h2load}\n` +
    `pinning: ${machine.pinning}; node flags of processes under test: ${nodeFlags.join(" ") || "(none)"}\n`,
);

const perTarget = new Map<string, RoundResult[]>(targets.map((t) => [t.id, []]));
const failures: string[] = [];
let exitCode = 0;
/**
 * `--wait-quiet S`: before each target round, wait while other processes
 * keep more than 10 % of the CPUs busy (nothing of ours runs between
 * rounds), at most S seconds over the whole run. For shared machines.
 */
let quietBudgetMs = Number(flags["wait-quiet"] ?? 0) * 1000;
async function waitQuiet(): Promise<number> {
  let busy = await machineBusy(500);
  while (busy > 0.1 && quietBudgetMs > 0) {
    const t = performance.now();
    busy = await machineBusy(1000);
    quietBudgetMs -= performance.now() - t;
  }
  return busy;
}

for (let round = 1; round <= rounds; round++) {
  for (const target of targets) {
    const busyBefore = await waitQuiet();
    const t0 = performance.now();
    try {
      const r = await runTargetRound(target, ctx, round);
      r.busyBefore = round2(busyBefore);
      perTarget.get(target.id)?.push(r);
      const s = r.load.short;
      process.stdout.write(
        `  round ${round} ${target.label.padEnd(36)} ${s ? `${formatRps(s.rps).padStart(7)} req/s  p50 ${formatMs(s.p50Ms)} ms` : ""}  (${((performance.now() - t0) / 1000).toFixed(0)} s)\n`,
      );
    } catch (err) {
      // One broken target must not cost the others' figures: report and go on.
      const message = err instanceof Error ? err.message : String(err);
      failures.push(`round ${round} ${target.id}: ${message}`);
      process.stdout.write(`  round ${round} ${target.label}: FAILED ${message}\n`);
      exitCode = 1;
    }
  }
}

// Nothing of ours runs now: anything busy is a neighbour.
const busyAfterRounds = round(await machineBusy(), 2);
if ((busyAfterRounds ?? 0) > 0.15) {
  process.stdout.write(
    `warning: ${Math.round((busyAfterRounds ?? 0) * 100)}% of the CPUs were busy after the rounds: something else ran on this machine, figures are noisy\n`,
  );
}

let cold: ColdStartResult[] = [];
let jwt: JwtCost | undefined;
if (!flags.variants) {
  try {
    if (!flags["no-cold-start"]) {
      process.stdout.write(`cold start (median of ${quick ? 5 : 10}):\n`);
      cold = await coldStarts(ctx, quick ? 5 : 10, !quick);
    }
    jwt = await measureJwtCost(standIns, quick ? 300 : 1000);
  } catch (err) {
    process.stderr.write(
      `bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
    );
    exitCode = 1;
  }
}
await standIns.close();

// ---------------------------------------------------------------------------
// Summaries, ratios, goals
// ---------------------------------------------------------------------------

const summarize = (
  runs: Partial<Record<PayloadName, RunFigures>>[],
  p: PayloadName,
): LoadFigures | undefined => {
  const figs = runs.map((r) => r[p]).filter((f): f is RunFigures => f !== undefined);
  if (figs.length === 0) {
    return undefined;
  }
  return {
    rps: median(figs.map((f) => f.rps)),
    p50Ms: median(figs.map((f) => f.p50Ms)),
    p99Ms: median(figs.map((f) => f.p99Ms)),
    errors: figs.reduce((a, f) => a + f.errors, 0),
    sampled: figs.reduce((a, f) => a + f.sampled, 0),
    cpuUsPerRequest: median(figs.map((f) => f.cpuUsPerRequest)),
    cpuUsByRole: Object.fromEntries(
      Object.keys(figs[0]?.cpuUsByRole ?? {}).map((role) => [
        role,
        median(figs.map((f) => f.cpuUsByRole[role] ?? Number.NaN)),
      ]),
    ),
    cpuBusy: median(figs.map((f) => f.cpuBusy)),
  };
};

const summaries: TargetSummary[] = targets.map((t) => {
  const runs = perTarget.get(t.id) ?? [];
  const load: Record<string, LoadFigures> = {};
  const latency: Record<string, LoadFigures> = {};
  for (const p of payloadNames) {
    const l = summarize(
      runs.map((r) => r.load),
      p,
    );
    if (l) {
      load[p] = l;
    }
    const q = summarize(
      runs.map((r) => r.latency),
      p,
    );
    if (q) {
      latency[p] = q;
    }
  }
  const roles = [...new Set(runs.flatMap((r) => Object.keys(r.peakRssMiB)))];
  const stream = runs.map((r) => r.streamMessagesPerS).filter((v): v is number => v !== undefined);
  return {
    id: t.id,
    label: t.label,
    role: t.role,
    load,
    latency,
    ...(stream.length ? { streamMessagesPerS: median(stream) } : {}),
    peakRssMiB: Object.fromEntries(
      roles.map((role) => [role, median(runs.map((r) => r.peakRssMiB[role] ?? Number.NaN))]),
    ),
    checks: {
      passed: runs.reduce((a, r) => a + r.checks.passed, 0),
      made: runs.reduce((a, r) => a + r.checks.made, 0),
    },
  };
});
const byId = new Map(summaries.map((s) => [s.id, s]));
const rpsOf = (id: string, p: string) => byId.get(id)?.load[p]?.rps ?? Number.NaN;
const ratioOf = (id: string, p: string, ref: string) => ratio(rpsOf(id, p), rpsOf(ref, p));
const presentRefs = references.filter((r) => byId.has(r));

// Verification and token-fetch counts of the chain targets.
const verification = ["chain-1", "chain-3"]
  .filter((id) => byId.has(id))
  .map((id) => {
    const runs = perTarget.get(id) ?? [];
    const requests = runs.reduce((a, r) => a + r.requests, 0);
    const steadyRequests = runs.reduce((a, r) => a + r.steadyRequests, 0);
    const first: Record<string, number> = {};
    const steady: Record<string, number> = {};
    for (const r of runs) {
      for (const [role, n] of Object.entries(r.verifications ?? {})) {
        first[role] = (first[role] ?? 0) + n.first;
        steady[role] = (steady[role] ?? 0) + n.steady;
      }
    }
    return {
      target: id,
      requests,
      steadyRequests,
      /** During each round's first load run: cold caches, concurrent first calls. */
      signatureVerificationsFirstLoad: first,
      /** After it, same token. */
      signatureVerificationsSteady: steady,
      steadyVerificationsPerRpc: Object.fromEntries(
        Object.entries(steady).map(([role, n]) => [
          role,
          steadyRequests > 0 ? n / steadyRequests : Number.NaN,
        ]),
      ),
      identityTokenRequestsDuringLoad: runs.reduce((a, r) => a + (r.identityRequests ?? 0), 0),
      jwksRequestsDuringLoad: runs.reduce((a, r) => a + (r.jwksRequests ?? 0), 0),
    };
  });

const gatewayAdded = payloadNames.map((p) => ({
  payload: p,
  p50Ms:
    (byId.get("chain-1")?.latency[p]?.p50Ms ?? Number.NaN) -
    (byId.get("server")?.latency[p]?.p50Ms ?? Number.NaN),
  p99Ms:
    (byId.get("chain-1")?.latency[p]?.p99Ms ?? Number.NaN) -
    (byId.get("server")?.latency[p]?.p99Ms ?? Number.NaN),
}));

const maxRss = (id: string) =>
  Math.max(...Object.values(byId.get(id)?.peakRssMiB ?? {}).filter(Number.isFinite));
const coldOf = (id: string) => cold.find((c) => c.id === id)?.medianMs ?? Number.NaN;
interface Goal {
  goal: string;
  value: string;
  met: boolean | undefined;
}
const goal = (
  text: string,
  value: number,
  ok: (v: number) => boolean,
  fmt: (v: number) => string,
): Goal => ({
  goal: text,
  value: fmt(value),
  met: Number.isFinite(value) ? ok(value) : undefined,
});
const goals: Goal[] = flags.variants
  ? []
  : [
      goal(
        "server direct ≥ 1.0× @grpc/grpc-js (short)",
        ratioOf("server", "short", "grpc-js"),
        (v) => v >= 1,
        formatRatio,
      ),
      goal(
        "server direct ≥ 0.85× Connect on node:http2 (short)",
        ratioOf("server", "short", "connect-node"),
        (v) => v >= 0.85,
        formatRatio,
      ),
      goal(
        "gateway → 1 server ≥ 0.5× server direct (short)",
        ratio(rpsOf("chain-1", "short"), rpsOf("server", "short")),
        (v) => v >= 0.5,
        formatRatio,
      ),
      goal(
        "gateway p50 added ≤ 0.5 ms (1 in flight, short)",
        gatewayAdded[0]?.p50Ms ?? Number.NaN,
        (v) => v <= 0.5,
        (v) => `${formatMs(v)} ms`,
      ),
      goal(
        "signature verifications per RPC ≈ 0 (chain, one token, steady state)",
        Math.max(...verification.flatMap((v) => Object.values(v.steadyVerificationsPerRpc))),
        (v) => v < 0.001,
        (v) => (Number.isFinite(v) ? v.toExponential(1) : "–"),
      ),
      goal(
        "no ID-token fetch during load (one per audience per hour)",
        verification.some((v) => v.requests > 0)
          ? verification.reduce((a, v) => a + v.identityTokenRequestsDuringLoad, 0)
          : Number.NaN,
        (v) => v === 0,
        (v) => `${v} fetches`,
      ),
      goal(
        "peak RSS ≤ 120 MiB, server",
        maxRss("server"),
        (v) => v <= 120,
        (v) => `${formatMiB(v)} MiB`,
      ),
      goal(
        "peak RSS ≤ 120 MiB, gateway",
        byId.get("chain-3")?.peakRssMiB["gateway"] ??
          byId.get("chain-1")?.peakRssMiB["gateway"] ??
          Number.NaN,
        (v) => v <= 120,
        (v) => `${formatMiB(v)} MiB`,
      ),
      goal(
        "cold start ≤ 300 ms, server",
        coldOf("server"),
        (v) => v <= 300,
        (v) => `${formatMs(v)} ms`,
      ),
      goal(
        "cold start ≤ 400 ms, gateway",
        coldOf("gateway"),
        (v) => v <= 400,
        (v) => `${formatMs(v)} ms`,
      ),
      goal(
        "cold start ≤ 300 ms, server, NODE_COMPILE_CACHE (recommended image)",
        coldOf("server-compile-cache"),
        (v) => v <= 300,
        (v) => `${formatMs(v)} ms`,
      ),
      goal(
        "cold start ≤ 400 ms, gateway, NODE_COMPILE_CACHE",
        coldOf("gateway-compile-cache"),
        (v) => v <= 400,
        (v) => `${formatMs(v)} ms`,
      ),
    ];

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

const header = [
  "target",
  "payload",
  "req/s",
  "p50 ms",
  "p99 ms",
  "errors/sampled",
  "peak RSS MiB",
  "CPU µs/req",
  ...presentRefs.map((r) => `×${r}`),
];
const rows = loadRows(summaries, payloadNames, ratioOf, presentRefs);
const cpuSplitRows = summaries.flatMap((t) =>
  payloadNames.flatMap((p) => {
    const f = t.load[p];
    const roles = Object.entries(f?.cpuUsByRole ?? {});
    return f && roles.length > 1
      ? [[t.label, p, ...[roles.map(([r, v]) => `${r} ${formatRps(v)}`).join(", ")]]]
      : [];
  }),
);
const latencyHeader = ["target (1 in flight)", "payload", "req/s", "p50 ms", "p99 ms"];
const latencyRows = summaries.flatMap((t) =>
  payloadNames.flatMap((p) => {
    const f = t.latency[p];
    return f ? [[t.label, p, formatRps(f.rps), formatMs(f.p50Ms), formatMs(f.p99Ms)]] : [];
  }),
);
const streamRows = summaries
  .filter((t) => t.streamMessagesPerS !== undefined)
  .map((t) => [
    t.label,
    formatRps(t.streamMessagesPerS ?? Number.NaN),
    formatRatio(
      ratio(
        t.streamMessagesPerS ?? Number.NaN,
        byId.get("grpc-js")?.streamMessagesPerS ?? Number.NaN,
      ),
    ),
  ]);
const coldRows = cold.map((c) => [
  c.label,
  formatMs(c.medianMs),
  `${formatMs(Math.min(...c.samplesMs))}–${formatMs(Math.max(...c.samplesMs))}`,
]);
const jwtRows = jwt
  ? [
      ["gateway JWT step", jwt.gatewayCachedUs.toFixed(1), jwt.gatewayUncachedUs.toFixed(1)],
      ["server caller verifier", jwt.serverCachedUs.toFixed(1), jwt.serverUncachedUs.toFixed(1)],
    ]
  : [];
const perRole = (m: Record<string, number>) =>
  Object.entries(m)
    .map(([r, n]) => `${r} ${n}`)
    .join(", ");
const verificationRows = verification.map((v) => [
  v.target,
  perRole(v.signatureVerificationsFirstLoad),
  formatRps(v.steadyRequests),
  perRole(v.signatureVerificationsSteady),
  String(v.identityTokenRequestsDuringLoad),
  String(v.jwksRequestsDuringLoad),
]);
const goalRows = goals.map((g) => [
  g.goal,
  g.value,
  g.met === undefined ? "n/a" : g.met ? "met" : "MISSED",
]);

const sections: { title: string; header: string[]; rows: string[][] }[] = [
  {
    title: `Unary Echo, ${load.connections * load.streams} in flight (medians of ${rounds} rounds)`,
    header,
    rows,
  },
  ...(cpuSplitRows.length
    ? [
        {
          title: "CPU µs per request by process (chains share one CPU), 256 in flight",
          header: ["target", "payload", "µs per request"],
          rows: cpuSplitRows,
        },
      ]
    : []),
  { title: "Unary Echo, 1 in flight (latency)", header: latencyHeader, rows: latencyRows },
  ...(streamRows.length
    ? [
        {
          title: `Server stream (${streamLoad.connections * streamLoad.streams} calls in flight × ${streamCount} messages)`,
          header: ["target", "messages/s", "×grpc-js"],
          rows: streamRows,
        },
      ]
    : []),
  ...(gatewayAdded.some((g) => Number.isFinite(g.p50Ms))
    ? [
        {
          title: "Latency the gateway adds (gateway → 1 server minus server direct, 1 in flight)",
          header: ["payload", "p50 ms", "p99 ms"],
          rows: gatewayAdded.map((g) => [g.payload, formatMs(g.p50Ms), formatMs(g.p99Ms)]),
        },
      ]
    : []),
  ...(jwtRows.length
    ? [
        {
          title: "JWT verification cost, µs per call (bench process)",
          header: ["step", "cache hit", "no cache (signature)"],
          rows: jwtRows,
        },
      ]
    : []),
  ...(verificationRows.length
    ? [
        {
          title:
            "One client token: signature verifications (first load run of each round, then steady state) and token fetches during the loads",
          header: [
            "target",
            "verifications, first run",
            "RPCs after it",
            "verifications after it",
            "ID-token fetches",
            "JWKS fetches",
          ],
          rows: verificationRows,
        },
      ]
    : []),
  ...(coldRows.length
    ? [
        {
          title: "Cold start (spawn → first RPC answered), median",
          header: ["process", "median ms", "range ms"],
          rows: coldRows,
        },
      ]
    : []),
  ...(goalRows.length
    ? [{ title: "Goals", header: ["goal", "measured", ""], rows: goalRows }]
    : []),
];
for (const s of sections) {
  process.stdout.write(`\n${s.title}\n${textTable(s.header, s.rows)}\n`);
}
const checkTotals = summaries.reduce(
  (a, s) => ({ passed: a.passed + s.checks.passed, made: a.made + s.checks.made }),
  { passed: 0, made: 0 },
);
process.stdout.write(`\nreal-client checks passed: ${checkTotals.passed}/${checkTotals.made}\n`);
if (checkTotals.passed !== checkTotals.made) {
  exitCode = 1;
}
for (const f of failures) {
  process.stdout.write(`FAILED ${f}\n`);
}

if (targets.length > 0 && [...perTarget.values()].every((runs) => runs.length === 0)) {
  process.stderr.write("no target completed a round; nothing written\n");
  rmSync(dir, { recursive: true, force: true });
  process.exit(1);
}
const stamp = started
  .toISOString()
  .replace(/:/g, "-")
  .replace(/\.\d+Z$/, "Z");
const resultsDir = join(root, "bench/results");
mkdirSync(resultsDir, { recursive: true });
const name = `${stamp}${flags.variants ? "-variants" : quick ? "-quick" : ""}`;
const command = `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(" ")}` : ""}`;

const chartGroups: ChartInput["groups"] = summaries
  .filter((s) => s.role === "ours" || (flags.variants && s.role === "variant"))
  .flatMap((s) =>
    payloadNames.map((p) => ({
      label: `${s.label} · ${p}`,
      bars: presentRefs.map((r) => ({ reference: r, value: ratioOf(s.id, p, r) })),
    })),
  );
const colors: Record<string, string> = {
  "grpc-js": "#2f6db5",
  "connect-node": "#e08a1e",
  "raw-h2": "#7a7a7a",
};
const svg = ratioChartSvg({
  title: "Throughput relative to the reference peers (unary Echo, 256 in flight)",
  subtitle: `${started.toISOString().slice(0, 10)} · ${machine.cpus}× ${machine.cpu} · Node ${machine.node} · medians of ${rounds} rounds · 1.0× = as fast as the peer`,
  groups: chartGroups,
  references: presentRefs.map((r) => ({
    id: r,
    label: `vs ${byId.get(r)?.label ?? r}`,
    color: colors[r] ?? "#999",
  })),
  goals: flags.variants ? [] : [{ value: 0.85, label: "goal vs Connect 0.85×" }],
});
writeFileSync(join(resultsDir, `${name}.svg`), svg);

const markdown = [
  `Measured ${started.toISOString().slice(0, 16).replace("T", " ")} UTC with \`${command}\` on ${machine.cpus}× ${machine.cpu}, ${machine.memoryGiB} GiB, Linux ${machine.kernel}, Node ${machine.node}, ${machine.h2load}; ${machine.pinning}; node flags \`${nodeFlags.join(" ")}\`. CPUs busy with other work just before the run: ${Math.round((machine.busyAtStart ?? 0) * 100)} %, right after the load rounds: ${Math.round((busyAfterRounds ?? 0) * 100)} % (this machine is shared; anything above a few percent means noisier figures).`,
  "",
  `![Throughput relative to the reference peers](results/latest.svg)`,
  "",
  ...sections.flatMap((s) => [`**${s.title}**`, "", markdownTable(s.header, s.rows), ""]),
].join("\n");

const json = {
  started: started.toISOString(),
  command,
  machine: { ...machine, busyAfterRounds },
  settings: {
    rounds,
    durationS,
    warmupS,
    latencyS,
    streamS,
    load,
    streamLoad,
    streamCount,
    payloads: Object.fromEntries(payloadNames.map((p) => [p, payloads[p].length])),
    nodeFlags,
  },
  targets: summaries.map((s) => ({
    ...s,
    rounds: (perTarget.get(s.id) ?? []).map((r) => ({
      ...r,
      load: Object.fromEntries(Object.entries(r.load).map(([k, v]) => [k, roundFigures(v)])),
      latency: Object.fromEntries(Object.entries(r.latency).map(([k, v]) => [k, roundFigures(v)])),
    })),
  })),
  ratios: summaries.flatMap((s) =>
    payloadNames.flatMap((p) =>
      presentRefs.map((r) => ({
        target: s.id,
        payload: p,
        reference: r,
        value: round(ratioOf(s.id, p, r), 3),
      })),
    ),
  ),
  gatewayAddedLatency: gatewayAdded,
  verification,
  jwtCostUs: jwt,
  coldStart: cold,
  goals,
  failures,
};
writeFileSync(join(resultsDir, `${name}.json`), `${JSON.stringify(json, null, 2)}\n`);
writeFileSync(join(resultsDir, `${name}.md`), `${markdown}\n`);
if (!flags.variants && !quick && !flags.only) {
  copyFileSync(join(resultsDir, `${name}.svg`), join(resultsDir, "latest.svg"));
  copyFileSync(join(resultsDir, `${name}.json`), join(resultsDir, "latest.json"));
  copyFileSync(join(resultsDir, `${name}.md`), join(resultsDir, "latest.md"));
}
/** The "What we tried" table: each variant against its starting point. */
function variantsMarkdown(): string {
  const baselineOf = (id: string) =>
    id.startsWith("gateway-raw") ? "gateway-raw-v8" : "stock-plugin-v8";
  const rows = summaries.map((t) => {
    const f = t.load["short"];
    const base = byId.get(baselineOf(t.id))?.load["short"];
    const cpu = Object.entries(f?.cpuUsByRole ?? {});
    return [
      t.label,
      formatRps(f?.rps ?? Number.NaN),
      formatRatio(ratio(f?.rps ?? Number.NaN, base?.rps ?? Number.NaN)),
      cpu.length > 1
        ? cpu.map(([r, v]) => `${r} ${formatRps(v)}`).join(", ")
        : formatRps(f?.cpuUsPerRequest ?? Number.NaN),
      Object.values(t.peakRssMiB)
        .map((v) => formatMiB(v))
        .join(" / "),
      formatMs(t.latency["short"]?.p50Ms ?? Number.NaN),
      formatMs(t.latency["short"]?.p99Ms ?? Number.NaN),
    ];
  });
  return [
    `Measured ${started.toISOString().slice(0, 16).replace("T", " ")} UTC with \`${command}\` (${machine.cpus}× ${machine.cpu}, Node ${machine.node}). Starting points: the stock plugin with V8's default heap for the server rows, the gateway with V8's default heap for the gateway rows. CPU is per request, per process; RSS is the peak per process (gateway / backend).`,
    "",
    markdownTable(
      [
        "variant",
        "req/s (256 in flight)",
        "vs starting point",
        "CPU µs/req",
        "peak RSS MiB",
        "p50 ms, 1 in flight",
        "p99 ms, 1 in flight",
      ],
      rows,
    ),
  ].join("\n");
}

if (flags["update-readme"]) {
  const readme = join(root, "bench/README.md");
  let text = readFileSync(readme, "utf8");
  const [startMark, endMark, content] = flags.variants
    ? ["<!-- bench:variants:start -->", "<!-- bench:variants:end -->", variantsMarkdown()]
    : ["<!-- bench:latest:start -->", "<!-- bench:latest:end -->", markdown];
  const a = text.indexOf(startMark);
  const b = text.indexOf(endMark);
  if (a >= 0 && b > a) {
    text = `${text.slice(0, a + startMark.length)}\n${content}\n${text.slice(b)}`;
    writeFileSync(readme, text);
    process.stdout.write("bench/README.md updated\n");
  }
}
process.stdout.write(`results: bench/results/${name}.json, .md, .svg\n`);
rmSync(dir, { recursive: true, force: true });
process.exit(exitCode);

function round2(v: number): number | null {
  return round(v, 2);
}

function roundFigures(f: RunFigures | undefined) {
  return f
    ? {
        rps: round(f.rps),
        p50Ms: round(f.p50Ms, 3),
        p99Ms: round(f.p99Ms, 3),
        errors: f.errors,
        sampled: f.sampled,
        cpuUsPerRequest: round(f.cpuUsPerRequest),
        cpuUsByRole: Object.fromEntries(
          Object.entries(f.cpuUsByRole).map(([k, v]) => [k, round(v)]),
        ),
        cpuBusy: round(f.cpuBusy, 2),
      }
    : undefined;
}

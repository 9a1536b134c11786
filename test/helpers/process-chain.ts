/**
 * The chain with every Echo server (and, optionally, the gateway) in its own
 * process, started exactly as `npm start` starts them: for faults that need a
 * real process (SIGKILL, SIGTERM, restart on the same port) and for memory
 * measured per process. The Google stand-ins (issuer, the gateway's metadata
 * server) stay in the test process.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
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
} from "./chain.ts";
import {
  createEchoClient,
  type EchoClient,
  type EchoClientOptions,
} from "../../client/echo-client.ts";
import { createCaptureLogger } from "./server.ts";
import { type Spawned, spawnNode } from "./process.ts";

/**
 * A loopback port that was free a moment ago, below Linux's ephemeral range
 * (32768–60999): connections to a dead server on an ephemeral port can
 * connect to themselves (TCP simultaneous open) when the kernel happens to
 * pick that very port as their source port, and then hold it.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const srv = createServer();
    const ok = await new Promise<boolean>((resolve) => {
      srv.once("error", () => resolve(false));
      srv.listen(port, "127.0.0.1", () => resolve(true));
    });
    if (ok) {
      await new Promise<void>((r) => srv.close(() => r()));
      return port;
    }
  }
}

/** True when a socket listens on 127.0.0.1:`port` (Linux `/proc/net/tcp`). */
function listening(port: number): boolean {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  try {
    return readFileSync("/proc/net/tcp", "utf8")
      .split("\n")
      .some((line) => {
        const fields = line.trim().split(/\s+/);
        return fields[1] === local && fields[3] === "0A";
      });
  } catch {
    return false;
  }
}

/**
 * Resolves once a socket listens on `port` (rejects after `timeoutMs`, or as
 * soon as `proc` exits). Works whatever the log level, and without
 * connecting (see freePort).
 */
export async function waitForPort(port: number, proc: Spawned, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let exited = false;
  void proc.exited.then(() => {
    exited = true;
  });
  for (;;) {
    if (exited) {
      throw new Error(`process exited before listening on ${port}: ${proc.stderr()}`);
    }
    if (listening(port)) {
      return;
    }
    if (Date.now() > deadline) {
      throw new Error(`nothing listens on ${port} after ${timeoutMs} ms: ${proc.stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Resident set size of a process in bytes (Linux `/proc`), or undefined when it is gone. */
export function rssBytes(pid: number): number | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const m = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
    return m?.[1] ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

export interface ServerProcess {
  readonly port: number;
  /** `127.0.0.1:PORT` */
  readonly address: string;
  /** The current process (replaced by `start()` after it ended). */
  proc: Spawned;
  /** PID of the current process. */
  pid(): number;
  /** Starts the server (again) on the same port; resolves when it listens. */
  start(): Promise<void>;
  /** Sends `signal` and resolves with the exit code or signal name. */
  stop(signal: NodeJS.Signals): Promise<number | string>;
}

export interface ProcessChainOptions {
  /** Echo server processes; default 3. */
  servers?: number;
  /** Run the gateway as a child process too (default: in this process, inspectable). */
  gatewayProcess?: boolean;
  /** Extra environment for every server process. */
  serverEnv?: Record<string, string>;
  /** Extra environment for the gateway process. */
  gatewayEnv?: Record<string, string>;
  /** Log level of the child processes; default "info". */
  logLevel?: string;
  /** Skip a backend after a failed connect for this long (in-process gateway only). */
  downBackoffMs?: number;
  /** Logger for the issuer and the gateway's metadata server (default: none). */
  standInLogger?: Logger;
  /** Lifetime of the ID tokens the gateway's metadata server mints; default the issuer's (3600 s). */
  gatewayTokenLifetimeSeconds?: number;
}

export interface ProcessChain {
  issuer: Issuer;
  gatewayMetadata: MetadataServer;
  servers: ServerProcess[];
  /** Set when the gateway runs in this process. */
  gateway: StartedGateway | undefined;
  /** Set when the gateway runs as a child process. */
  gatewayProc: Spawned | undefined;
  /** The gateway's log records when it runs in this process. */
  gatewayLogs: Record<string, unknown>[];
  gatewayPort: number;
  /** `127.0.0.1:PORT` of the gateway. */
  address: string;
  configFile: string;
  clientToken(claims?: Record<string, unknown>): Promise<string>;
  client(options?: Partial<EchoClientOptions> & { token?: string | null }): Promise<EchoClient>;
  /** Starts the gateway process (again) on the same port (process mode only). */
  startGateway(): Promise<void>;
  close(): Promise<void>;
}

export async function startProcessChain(options: ProcessChainOptions = {}): Promise<ProcessChain> {
  const logger = options.standInLogger ? { logger: options.standInLogger } : {};
  const issuer = await createIssuer(logger);
  const gatewayMetadata = await createMetadataServer({
    issuer,
    email: gatewayEmail,
    ...logger,
    ...(options.gatewayTokenLifetimeSeconds === undefined
      ? {}
      : { tokenLifetimeSeconds: options.gatewayTokenLifetimeSeconds }),
  });
  const logLevel = options.logLevel ?? "info";
  const servers: ServerProcess[] = [];
  for (let i = 0; i < (options.servers ?? 3); i++) {
    servers.push(
      createServerProcess(await freePort(), {
        K_SERVICE: "echo",
        K_REVISION: "echo-00001",
        GCE_METADATA_HOST: "",
        ECHO_AUTH_MODE: "verify",
        ECHO_AUDIENCES: backendAudience,
        ECHO_JWKS_URI: issuer.jwksUri,
        ECHO_ALLOWED_PRINCIPALS: gatewayEmail,
        ECHO_LOG_LEVEL: logLevel,
        ...options.serverEnv,
      }),
    );
  }
  await Promise.all(servers.map((s) => s.start()));

  const dir = mkdtempSync(join(tmpdir(), "echo-process-chain-"));
  const configFile = join(dir, "api_config.yaml");
  writeFileSync(
    configFile,
    defaultApiConfig({
      backends: servers.map((s) => `grpc://${s.address}`).join(","),
      jwksUri: issuer.jwksUri,
    }),
  );

  let gateway: StartedGateway | undefined;
  let gatewayProc: Spawned | undefined;
  let gatewayPort: number;
  const capture = createCaptureLogger();
  const gatewayArgs = ["gateway/main.ts", "--config", configFile, "--descriptor", "gen/echo.pb"];
  const startGatewayProcess = async () => {
    const proc = spawnNode(gatewayArgs, {
      PORT: String(gatewayPort),
      HOST: "127.0.0.1",
      GATEWAY_METADATA_HOST: gatewayMetadata.host,
      GATEWAY_LOG_LEVEL: logLevel,
      GCE_METADATA_HOST: "",
      ...options.gatewayEnv,
    });
    gatewayProc = proc;
    await waitForPort(gatewayPort, proc);
  };
  if (options.gatewayProcess) {
    gatewayPort = await freePort();
    await startGatewayProcess();
  } else {
    const config = loadGatewayConfig({}, [
      ...gatewayArgs.slice(1),
      "--host",
      "127.0.0.1",
      "--port",
      "0",
      "--metadata-host",
      gatewayMetadata.host,
    ]);
    gateway = await startGateway(config, {
      logger: capture.logger,
      ...(options.downBackoffMs !== undefined ? { downBackoffMs: options.downBackoffMs } : {}),
    });
    gatewayPort = gateway.port;
  }
  const address = `127.0.0.1:${gatewayPort}`;
  const clientToken = (claims: Record<string, unknown> = {}) =>
    issuer.sign({ aud: gatewayAudience, email: clientEmail, ...claims });
  const clients: EchoClient[] = [];

  return {
    issuer,
    gatewayMetadata,
    servers,
    get gateway() {
      return gateway;
    },
    get gatewayProc() {
      return gatewayProc;
    },
    gatewayLogs: capture.logs,
    gatewayPort,
    address,
    configFile,
    clientToken,
    async client(opts = {}) {
      const token = opts.token === undefined ? await clientToken() : opts.token;
      const { token: _ignored, ...rest } = opts;
      const c = createEchoClient({
        address,
        plaintext: true,
        idleConnectionTimeoutMs: 100,
        ...rest,
        interceptors: [...(token ? [bearer(token)] : []), ...(rest.interceptors ?? [])],
      });
      clients.push(c);
      return c;
    },
    startGateway: startGatewayProcess,
    async close() {
      for (const c of clients) {
        c.close();
      }
      if (gateway) {
        await gateway.close();
      }
      gatewayProc?.kill();
      await gatewayProc?.exited;
      for (const s of servers) {
        s.proc.kill();
      }
      await Promise.all(servers.map((s) => s.proc.exited));
      await gatewayMetadata.close().catch(() => {});
      await issuer.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A server process on a fixed port that can be stopped and started again. */
function createServerProcess(port: number, env: Record<string, string>): ServerProcess {
  const address = `127.0.0.1:${port}`;
  const server: ServerProcess = {
    port,
    address,
    proc: undefined as unknown as Spawned,
    pid: () => server.proc.child.pid ?? 0,
    async start() {
      server.proc = spawnNode(["server/main.ts"], {
        ...env,
        PORT: String(port),
        HOST: "127.0.0.1",
      });
      await waitForPort(port, server.proc);
    },
    stop(signal) {
      server.proc.child.kill(signal);
      return server.proc.exited;
    },
  };
  return server;
}

export { clientEmail, gatewayEmail };

/**
 * `npm start`: the whole chain on one machine.
 *
 *   Google stand-ins (issuer, metadata servers for client-sa and gateway-sa)
 *   → three Echo servers (verification on, only gateway-sa allowed)
 *   → the local gateway (the rendered api_config.yaml + gen/echo.pb)
 *   → the client through the gateway, with a token from client-sa's metadata server.
 *
 * Then it stays up and prints how to call the chain. Ctrl-C or SIGTERM stops
 * every process it started; a process that dies takes the stack down, naming
 * it. Children are started with `node` directly (never `npm run`), so that
 * SIGTERM reaches the process that drains.
 *
 *   npm start -- [--port 8080] [--server-ports 8081,8082,8083] [--issuer-port 8090]
 *                [--client-metadata-port 8091] [--gateway-metadata-port 8092] [--once]
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { ConfigError, exitOnConfigError, splitList, ValueParser } from "../lib/config-error.ts";
import { loadDescriptorSet } from "../gateway/descriptor.ts";
import { renderApiConfig } from "../gateway/render-config.ts";
import { conflictingGoogleEnv, type GoogleStandIns, startGoogleStandIns } from "./google.ts";
import { createMetadataServer, type MetadataServer } from "./metadata-server.ts";

const root = new URL("..", import.meta.url).pathname;
const projectId = "echo-local";

export interface StartOptions {
  gatewayPort: number;
  serverPorts: number[];
  issuerPort: number;
  clientMetadataPort: number;
  gatewayMetadataPort: number;
  /** Run the client once, then stop everything (exit code = the client's). */
  once: boolean;
  pretty: boolean;
}

export function parseStartOptions(argv: string[]): StartOptions {
  let values: ReturnType<typeof parse>;
  try {
    values = parse(argv);
  } catch (err) {
    throw new ConfigError([err instanceof Error ? err.message : String(err)]);
  }
  const p = new ValueParser();
  const serverPorts = splitList(values["server-ports"] ?? "8081,8082,8083").map((s) =>
    p.int(s, "--server-ports", 0, 1, 65535),
  );
  if (serverPorts.length === 0) {
    p.problems.push("--server-ports: give at least one port");
  }
  const options: StartOptions = {
    gatewayPort: p.int(values.port, "--port", 8080, 1, 65535),
    serverPorts,
    issuerPort: p.int(values["issuer-port"], "--issuer-port", 8090, 1, 65535),
    clientMetadataPort: p.int(
      values["client-metadata-port"],
      "--client-metadata-port",
      8091,
      1,
      65535,
    ),
    gatewayMetadataPort: p.int(
      values["gateway-metadata-port"],
      "--gateway-metadata-port",
      8092,
      1,
      65535,
    ),
    once: values.once ?? false,
    pretty: values.json ? false : process.stdout.isTTY === true,
  };
  const all = [
    options.gatewayPort,
    ...options.serverPorts,
    options.issuerPort,
    options.clientMetadataPort,
    options.gatewayMetadataPort,
  ];
  if (new Set(all).size !== all.length) {
    p.problems.push(`ports must all differ (got ${all.join(", ")})`);
  }
  if (p.problems.length > 0) {
    throw new ConfigError(p.problems);
  }
  return options;
}

function parse(argv: string[]) {
  return parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      port: { type: "string" },
      "server-ports": { type: "string" },
      "issuer-port": { type: "string" },
      "client-metadata-port": { type: "string" },
      "gateway-metadata-port": { type: "string" },
      once: { type: "boolean" },
      json: { type: "boolean" },
    },
  }).values;
}

// ---------------------------------------------------------------------------
// Output: one line per event; JSON lines pass through when not on a terminal.
// ---------------------------------------------------------------------------

const colors: Record<string, string> = {
  DEBUG: "\x1b[90m",
  INFO: "\x1b[32m",
  WARNING: "\x1b[33m",
  ERROR: "\x1b[31m",
  CRITICAL: "\x1b[35m",
};

function createOutput(pretty: boolean) {
  const say = (line: string) => process.stdout.write(`${line}\n`);
  return {
    /** A line a child wrote. */
    child(name: string, line: string) {
      let record: Record<string, unknown> | undefined;
      try {
        const parsed: unknown = JSON.parse(line);
        record =
          typeof parsed === "object" && parsed !== null
            ? (parsed as Record<string, unknown>)
            : undefined;
      } catch {
        record = undefined;
      }
      if (!pretty) {
        say(
          record
            ? JSON.stringify({ process: name, ...record })
            : JSON.stringify({ process: name, message: line }),
        );
        return;
      }
      if (!record) {
        say(`${name.padEnd(9)} ${line}`);
        return;
      }
      const { severity, message, time, ...rest } = record;
      const sev = String(severity ?? "INFO");
      const fields = Object.entries(rest)
        .filter(([k]) => k !== "component")
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join(" ");
      const clock = typeof time === "string" ? time.slice(11, 23) : "";
      say(
        `${clock} ${name.padEnd(9)} ${colors[sev] ?? ""}${sev.padEnd(7)}\x1b[0m ${String(message ?? "")}${fields ? ` \x1b[2m${fields}\x1b[0m` : ""}`,
      );
    },
    /** A line of the orchestrator itself. */
    info(message: string, fields: Record<string, unknown> = {}) {
      if (pretty) {
        say(`\x1b[1m${message}\x1b[0m`);
      } else {
        say(JSON.stringify({ process: "start", severity: "INFO", message, ...fields }));
      }
    },
    error(message: string) {
      if (pretty) {
        say(`\x1b[31m${message}\x1b[0m`);
      } else {
        say(JSON.stringify({ process: "start", severity: "ERROR", message }));
      }
    },
    /** Text meant to be read or pasted, as is. */
    text(block: string) {
      if (pretty) {
        process.stdout.write(block);
      } else {
        say(JSON.stringify({ process: "start", severity: "INFO", message: block }));
      }
    },
  };
}

// ---------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------

interface Child {
  name: string;
  process: ChildProcess;
  /** Last stderr lines, for the message when it dies. */
  stderrTail: string[];
  /** Called with every stdout line. */
  lineListeners: Set<(line: string) => void>;
  exited: Promise<number | string>;
}

function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  for (const name of conflictingGoogleEnv) {
    delete env[name];
  }
  return env;
}

async function main(): Promise<void> {
  let options: StartOptions;
  try {
    options = parseStartOptions(process.argv.slice(2));
  } catch (err) {
    exitOnConfigError(err, "start");
  }
  const out = createOutput(options.pretty);
  const children: Child[] = [];
  const extraMetadata: MetadataServer[] = [];
  let standIns: GoogleStandIns | undefined;
  const workDir = mkdtempSync(join(tmpdir(), "echo-local-"));
  // An empty gcloud config dir: a developer's own gcloud credentials must not
  // leak into the local chain.
  const gcloudDir = join(workDir, "gcloud");
  mkdirSync(gcloudDir);
  let stopping = false;

  const stop = async (code: number, reason?: string): Promise<never> => {
    if (!stopping) {
      stopping = true;
      if (reason) {
        out.error(reason);
      }
      out.info("stopping the local chain");
      for (const c of children) {
        if (c.process.exitCode === null && c.process.signalCode === null) {
          c.process.kill("SIGTERM");
        }
      }
      const deadline = setTimeout(() => {
        for (const c of children) {
          if (c.process.exitCode === null && c.process.signalCode === null) {
            c.process.kill("SIGKILL");
          }
        }
      }, 9000);
      await Promise.all(children.map((c) => c.exited));
      clearTimeout(deadline);
      await Promise.all(extraMetadata.map((m) => m.close()));
      await standIns?.close();
      rmSync(workDir, { recursive: true, force: true });
      out.info("stopped");
    }
    process.exit(code);
  };
  process.on("SIGINT", () => void stop(0));
  process.on("SIGTERM", () => void stop(0));

  const spawnChild = (name: string, args: string[], env: Record<string, string>): Child => {
    const child = spawn(process.execPath, args, {
      cwd: root,
      env: childEnv(env),
      stdio: ["ignore", "pipe", "pipe"],
    });
    const entry: Child = {
      name,
      process: child,
      stderrTail: [],
      lineListeners: new Set(),
      exited: new Promise((resolve) => {
        child.once("exit", (code, signal) => resolve(code ?? signal ?? 0));
      }),
    };
    if (child.stdout) {
      createInterface({ input: child.stdout }).on("line", (line) => {
        out.child(name, line);
        for (const listener of entry.lineListeners) {
          listener(line);
        }
      });
    }
    if (child.stderr) {
      createInterface({ input: child.stderr }).on("line", (line) => {
        entry.stderrTail.push(line);
        entry.stderrTail.splice(0, entry.stderrTail.length - 5);
        out.child(name, line);
      });
    }
    children.push(entry);
    out.info(`started ${name}`, { pid: child.pid });
    return entry;
  };

  /** Resolves when the child logs `message`; stops everything if it dies first. */
  const ready = (child: Child, message: string, timeoutMs = 15_000): Promise<void> =>
    new Promise((resolve) => {
      const timer = setTimeout(
        () => void stop(1, `${child.name} did not become ready within ${timeoutMs / 1000} s`),
        timeoutMs,
      );
      const listener = (line: string) => {
        if (line.includes(`"message":"${message}"`)) {
          clearTimeout(timer);
          child.lineListeners.delete(listener);
          resolve();
        }
      };
      child.lineListeners.add(listener);
      void child.exited.then((code) => {
        clearTimeout(timer);
        if (!stopping && !(options.once && child.name === "client")) {
          void stop(
            1,
            `${child.name} exited (${code})${child.stderrTail.length ? `: ${child.stderrTail.at(-1)}` : ""}`,
          );
        }
      });
    });

  // 1. Google stand-ins.
  try {
    standIns = await startGoogleStandIns({
      projectId,
      issuerPort: options.issuerPort,
      metadataPorts: {
        "client-sa": options.clientMetadataPort,
        "gateway-sa": options.gatewayMetadataPort,
      },
    });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { port?: number };
    await stop(
      1,
      e.code === "EADDRINUSE"
        ? `a stand-in port is busy (${e.message}); pick others with --issuer-port, --client-metadata-port, --gateway-metadata-port`
        : `cannot start the Google stand-ins: ${e.message}`,
    );
    return;
  }
  const issuer = standIns.issuer;
  const clientSa = standIns.metadata["client-sa"] as MetadataServer;
  const gatewaySa = standIns.metadata["gateway-sa"] as MetadataServer;
  out.info("Google stand-ins up", {
    issuer: issuer.url,
    "client-sa": clientSa.url,
    "gateway-sa": gatewaySa.url,
  });

  // 2. Echo servers, each with a metadata server of its own (as each Cloud
  // Run instance has), verifying that callers are the gateway.
  const gatewayAddress = `127.0.0.1:${options.gatewayPort}`;
  const backendAudience = "https://echo.local";
  const gatewayAudience = `https://${gatewayAddress.split(":")[0]}`;
  const servers: Child[] = [];
  for (const [i, port] of options.serverPorts.entries()) {
    const metadata = await createMetadataServer({
      issuer,
      email: `echo-sa@${projectId}.iam.gserviceaccount.com`,
      projectId,
    });
    extraMetadata.push(metadata);
    const server = spawnChild(`server-${i + 1}`, ["server/main.ts"], {
      ...metadata.env,
      CLOUDSDK_CONFIG: gcloudDir,
      HOST: "127.0.0.1",
      PORT: String(port),
      K_SERVICE: "echo",
      K_REVISION: "echo-00001-loc",
      ECHO_AUTH_MODE: "verify",
      ECHO_AUDIENCES: backendAudience,
      ECHO_JWKS_URI: issuer.jwksUri,
      ECHO_ALLOWED_PRINCIPALS: gatewaySa.email,
    });
    // K_SERVICE makes google-auth-library believe it runs on Cloud Run; the
    // server does not use it for tokens, so it stays (it names the service).
    servers.push(server);
  }
  await Promise.all(servers.map((s) => ready(s, "echo server listening")));

  // 3. The API config, rendered from the template as for Google, with the
  // local extension of several backend addresses.
  const registry = await loadDescriptorSet(join(root, "gen/echo.pb"));
  const { text } = renderApiConfig({
    template: readFileSync(join(root, "gateway/api_config.yaml.tmpl"), "utf8"),
    registry,
    local: true,
    env: {
      GATEWAY_SERVICE_NAME: "echo.local",
      BACKEND_ADDRESS: options.serverPorts.map((p) => `grpc://127.0.0.1:${p}`).join(","),
      BACKEND_AUDIENCE: backendAudience,
      JWKS_URI: issuer.jwksUri,
      GATEWAY_AUDIENCE: gatewayAudience,
    },
  });
  const configFile = join(workDir, "api_config.yaml");
  writeFileSync(configFile, text);

  // 4. The gateway, as gateway-sa.
  const gateway = spawnChild(
    "gateway",
    ["gateway/main.ts", "--config", configFile, "--descriptor", "gen/echo.pb"],
    {
      ...gatewaySa.env,
      CLOUDSDK_CONFIG: gcloudDir,
      HOST: "127.0.0.1",
      PORT: String(options.gatewayPort),
    },
  );
  await ready(gateway, "gateway listening");

  // 5. The client through the gateway, as client-sa.
  const clientArgs = [
    "client/cli.ts",
    "--address",
    gatewayAddress,
    "--plaintext",
    "--audience",
    gatewayAudience,
    "--count",
    "10",
    "--stream",
  ];
  const clientEnv = { ...clientSa.env, CLOUDSDK_CONFIG: gcloudDir };
  out.info(`calling the gateway: node ${clientArgs.join(" ")}`);
  const client = spawnChild("client", clientArgs, clientEnv);
  const clientCode = await client.exited;
  children.splice(children.indexOf(client), 1);
  if (clientCode !== 0) {
    await stop(
      1,
      `the client failed (${clientCode})${client.stderrTail.length ? `: ${client.stderrTail.at(-1)}` : ""}`,
    );
  }
  if (options.once) {
    await stop(0);
  }

  const tokenCommand = `curl -s -H 'Metadata-Flavor: Google' '${clientSa.url}/computeMetadata/v1/instance/service-accounts/default/identity?audience=${gatewayAudience}'`;
  out.text(`
The local chain is up. Ctrl-C stops it.

  client ──▶ gateway ${gatewayAddress} ──▶ ${options.serverPorts.map((p) => `127.0.0.1:${p}`).join(", ")}
  tokens: issuer ${issuer.url}, client-sa ${clientSa.url}, gateway-sa ${gatewaySa.url}

Call it with the client (as client-sa):

  GCE_METADATA_HOST=${clientSa.host} METADATA_SERVER_DETECTION=assume-present GOOGLE_CLOUD_PROJECT=${projectId} \\
    npm run client -- --address ${gatewayAddress} --plaintext --audience ${gatewayAudience} --count 3 --stream

Call it with buf curl (token from client-sa's metadata server):

  TOKEN=$(${tokenCommand})
  npx buf curl --http2-prior-knowledge --protocol grpc --schema gen/echo.pb#format=binpb \\
    -H "Authorization: Bearer $TOKEN" -d '{"message":"hi"}' \\
    http://${gatewayAddress}/echo.v1.EchoService/Echo

`);
  // Stay up until a signal or a child's death.
  await new Promise(() => {});
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    process.stderr.write(`start: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}

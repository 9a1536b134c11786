/**
 * The Echo command-line client, in the spirit of the original sample:
 *
 *   npm run client -- --address HOST:PORT [--plaintext] [--servername NAME]
 *     [--count N] [--stream] [--audience URL] [--service-account key.json]
 *
 * Prints each reply with the instance that served it. On failure prints one
 * line with the gRPC code and exits 1 (2 for bad usage).
 */
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { Caller, Instance } from "../gen/echo/v1/echo_pb.ts";
import { ConfigError, exitOnConfigError, ValueParser } from "../lib/config-error.ts";
import { createEchoClient, type EchoProtocol } from "./echo-client.ts";

export const cliFlags = {
  address: { type: "string" },
  plaintext: { type: "boolean" },
  servername: { type: "string" },
  ca: { type: "string" },
  protocol: { type: "string" },
  message: { type: "string" },
  count: { type: "string" },
  stream: { type: "boolean" },
  "stream-count": { type: "string" },
  auth: { type: "string" },
  audience: { type: "string" },
  "service-account": { type: "string" },
  "impersonate-service-account": { type: "string" },
  "timeout-ms": { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

export const usage = `Usage: npm run client -- --address HOST:PORT [options]

  --address HOST:PORT        server or gateway to call (required)
  --plaintext                cleartext HTTP/2 (h2c) instead of TLS
  --servername NAME          TLS server name, when it differs from HOST
  --ca FILE                  PEM CA bundle to trust
  --protocol P               grpc (default), grpc-web or connect
  --message TEXT             message to echo (default "hello")
  --count N                  unary Echo calls to make (default 1)
  --stream                   also call EchoServerStream
  --stream-count N           responses to ask the stream for (default 5)
  --auth MODE                auto (default), on or off: send a Google ID token
  --audience URL             token audience (default https://HOST)
  --service-account FILE     mint tokens from a service-account key file
  --impersonate-service-account EMAIL
                             mint tokens for EMAIL via IAM Credentials
  --timeout-ms N             deadline per call (default 10000)
  --json                     print replies as JSON lines
`;

export interface CliOptions {
  address: string;
  plaintext: boolean;
  servername: string | undefined;
  caFile: string | undefined;
  protocol: EchoProtocol;
  message: string;
  count: number;
  stream: boolean;
  streamCount: number;
  auth: "auto" | "on" | "off";
  audience: string;
  keyFile: string | undefined;
  impersonate: string | undefined;
  timeoutMs: number;
  json: boolean;
}

export function parseCliOptions(argv: string[], env: NodeJS.ProcessEnv = process.env): CliOptions {
  let values: ReturnType<typeof parse>;
  try {
    values = parse(argv);
  } catch (err) {
    throw new ConfigError([err instanceof Error ? err.message : String(err)]);
  }
  const p = new ValueParser();
  const address = values.address ?? "";
  if (address === "") {
    p.problems.push("--address HOST:PORT is required");
  }
  const host = address.startsWith("[")
    ? address.slice(0, address.indexOf("]") + 1)
    : address.split(":")[0];
  const options: CliOptions = {
    address,
    plaintext: values.plaintext ?? false,
    servername: values.servername,
    caFile: values.ca,
    protocol: p.oneOf(values.protocol, "--protocol", "grpc", ["grpc", "grpc-web", "connect"]),
    message: values.message ?? "hello",
    count: p.int(values.count, "--count", 1, 0, 1_000_000),
    stream: values.stream ?? false,
    streamCount: p.int(values["stream-count"], "--stream-count", 5, 0, 1_000_000),
    auth: p.oneOf(values.auth, "--auth", "auto", ["auto", "on", "off"]),
    audience: values.audience ?? `https://${values.servername ?? host}`,
    keyFile: values["service-account"] ?? undefined,
    impersonate: values["impersonate-service-account"],
    timeoutMs: p.int(values["timeout-ms"], "--timeout-ms", 10_000, 1, 3_600_000),
    json: values.json ?? false,
  };
  if (options.auth === "off" && (values.audience || options.keyFile || options.impersonate)) {
    p.problems.push(
      "--auth off contradicts --audience/--service-account/--impersonate-service-account",
    );
  }
  if (p.problems.length > 0) {
    throw new ConfigError(p.problems);
  }
  // auto: send a token when some source of one is configured.
  if (options.auth === "auto") {
    const hasSource =
      values.audience !== undefined ||
      options.keyFile !== undefined ||
      options.impersonate !== undefined ||
      Boolean(env["GCE_METADATA_HOST"] || env["GOOGLE_APPLICATION_CREDENTIALS"]);
    options.auth = hasSource ? "on" : "off";
  }
  return options;
}

function parse(argv: string[]) {
  return parseArgs({ args: argv, options: cliFlags, strict: true, allowPositionals: false }).values;
}

/** One human-readable line per reply. */
export function describeReply(
  label: string,
  reply: { message: string; instance?: Instance | undefined; caller?: Caller | undefined },
): string {
  const i = reply.instance;
  const served = i ? `${i.service}/${i.revision}/${i.id}` : "?";
  const parts = [`${label}: "${reply.message}" from ${served}`];
  const c = reply.caller;
  if (c?.principal?.email) {
    parts.push(`caller ${c.principal.email} (${c.verification})`);
  }
  if (c?.endUser?.email) {
    parts.push(`end user ${c.endUser.email}`);
  }
  return parts.join(", ");
}

export async function runCli(options: CliOptions, out: (line: string) => void): Promise<void> {
  const interceptors: Interceptor[] = [];
  if (options.auth === "on") {
    const { createIdTokenSource } = await import("./id-token.ts");
    const { createIdTokenInterceptor } = await import("./id-token-interceptor.ts");
    const source = createIdTokenSource({
      audience: options.audience,
      ...(options.keyFile ? { keyFile: options.keyFile } : {}),
      ...(options.impersonate ? { impersonateServiceAccount: options.impersonate } : {}),
    });
    interceptors.push(createIdTokenInterceptor(source));
  }
  const { client, close } = createEchoClient({
    address: options.address,
    plaintext: options.plaintext,
    protocol: options.protocol,
    interceptors,
    defaultTimeoutMs: options.timeoutMs,
    ...(options.servername ? { servername: options.servername } : {}),
    ...(options.caFile ? { ca: readFileSync(options.caFile) } : {}),
  });
  const print = (label: string, reply: Parameters<typeof describeReply>[1] & object) =>
    out(
      options.json
        ? JSON.stringify({ call: label, ...toPlain(reply) })
        : describeReply(label, reply),
    );
  try {
    for (let n = 1; n <= options.count; n++) {
      print(`Echo #${n}`, await client.echo({ message: options.message }));
    }
    if (options.stream) {
      for await (const reply of client.echoServerStream({
        message: options.message,
        count: options.streamCount,
      })) {
        print(`EchoServerStream[${reply.index}]`, reply);
      }
    }
  } finally {
    close();
  }
}

function toPlain(reply: object): Record<string, unknown> {
  return JSON.parse(JSON.stringify(reply, (k, v) => (k === "$typeName" ? undefined : v))) as Record<
    string,
    unknown
  >;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(usage);
    return;
  }
  let options: CliOptions;
  try {
    options = parseCliOptions(argv);
  } catch (err) {
    exitOnConfigError(err, "echo-client");
  }
  try {
    await runCli(options, (line) => process.stdout.write(`${line}\n`));
  } catch (err) {
    const e = ConnectError.from(err);
    process.stderr.write(`echo-client: ${codeToString(e.code)}: ${e.rawMessage}\n`);
    process.exitCode = 1;
  }
}

if (import.meta.main) {
  await main();
}

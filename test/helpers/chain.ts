/**
 * The whole local chain in one process, for tests: a stand-in issuer, a
 * metadata server for the gateway's service account, N Echo servers with
 * verification on (allow-list = the gateway's account), and the gateway
 * driven by a real API config and gen/echo.pb.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Interceptor } from "@connectrpc/connect";
import type { Logger } from "pino";
import {
  createEchoClient,
  type EchoClient,
  type EchoClientOptions,
} from "../../client/echo-client.ts";
import { loadGatewayConfig } from "../../gateway/config.ts";
import { type StartedGateway, startGateway } from "../../gateway/start.ts";
import { createIssuer, type Issuer } from "../../local/issuer.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";
import { createCaptureLogger, type StartedServer, startServer } from "./server.ts";

export const gatewayAudience = "https://echo-gateway.test";
export const backendAudience = "https://echo-backend.test";
export const clientEmail = "client-sa@echo-test.iam.gserviceaccount.com";
export const gatewayEmail = "gateway-sa@echo-test.iam.gserviceaccount.com";

export interface ChainOptions {
  /** Echo servers behind the gateway; default 3. */
  servers?: number;
  /** Extra backend addresses (e.g. a port nobody listens on). */
  extraBackends?: string[];
  /** Replaces the generated API config (gets `{backends, jwksUri}`). */
  apiConfig?: (vars: { backends: string; jwksUri: string }) => string;
  /** Skip a backend after a failed connect for this long; default 1000 ms. */
  downBackoffMs?: number;
  /** Stop the gateway's metadata server before the gateway starts. */
  gatewayMetadataDown?: boolean;
  /** Idle timeout of client connections, gateway and servers alike; default 5 min. */
  idleSessionTimeoutMs?: number;
}

export interface Chain {
  issuer: Issuer;
  gatewayMetadata: MetadataServer;
  servers: StartedServer[];
  gateway: StartedGateway;
  gatewayLogs: Record<string, unknown>[];
  gatewayLogger: Logger;
  /** `127.0.0.1:PORT` of the gateway. */
  address: string;
  configFile: string;
  /** A token for the gateway, as the client's service account. */
  clientToken(claims?: Record<string, unknown>): Promise<string>;
  /** A client of the gateway sending `token` (default: a fresh client token). */
  client(options?: Partial<EchoClientOptions> & { token?: string | null }): Promise<EchoClient>;
  close(): Promise<void>;
}

export function defaultApiConfig(vars: { backends: string; jwksUri: string }): string {
  return `type: google.api.Service
config_version: 3
name: echo-gateway.apigateway.echo-test.cloud.goog
title: Echo (test)
apis:
  - name: echo.v1.EchoService
usage:
  rules:
    - selector: "*"
      allow_unregistered_calls: true
backend:
  rules:
    - selector: "*"
      address: ${vars.backends}
      jwt_audience: ${backendAudience}
      deadline: 15
authentication:
  providers:
    - id: google_id_token
      issuer: https://accounts.google.com
      jwks_uri: ${vars.jwksUri}
      audiences: ${gatewayAudience}
  rules:
    - selector: echo.v1.EchoService.*
      requirements:
        - provider_id: google_id_token
`;
}

export function bearer(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

export async function startChain(options: ChainOptions = {}): Promise<Chain> {
  const issuer = await createIssuer();
  const gatewayMetadata = await createMetadataServer({ issuer, email: gatewayEmail });
  const servers: StartedServer[] = [];
  for (let i = 0; i < (options.servers ?? 3); i++) {
    const env = {
      K_SERVICE: "echo",
      K_REVISION: "echo-00001",
      ECHO_AUTH_MODE: "verify",
      ECHO_AUDIENCES: backendAudience,
      ECHO_JWKS_URI: issuer.jwksUri,
      ECHO_ALLOWED_PRINCIPALS: gatewayEmail,
    };
    servers.push(
      await startServer(
        env,
        [],
        options.idleSessionTimeoutMs === undefined
          ? {}
          : { idleSessionTimeoutMs: options.idleSessionTimeoutMs },
      ),
    );
  }
  const backends = [
    ...servers.map((s) => `grpc://${s.address}`),
    ...(options.extraBackends ?? []),
  ].join(",");
  const dir = mkdtempSync(join(tmpdir(), "echo-chain-"));
  const configFile = join(dir, "api_config.yaml");
  writeFileSync(
    configFile,
    (options.apiConfig ?? defaultApiConfig)({ backends, jwksUri: issuer.jwksUri }),
  );
  const { logger: gatewayLogger, logs: gatewayLogs } = createCaptureLogger();
  if (options.gatewayMetadataDown) {
    await gatewayMetadata.close();
  }
  const config = loadGatewayConfig({}, [
    "--config",
    configFile,
    "--descriptor",
    "gen/echo.pb",
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--metadata-host",
    gatewayMetadata.host,
  ]);
  const gateway = await startGateway(config, {
    logger: gatewayLogger,
    downBackoffMs: options.downBackoffMs ?? 1000,
    ...(options.idleSessionTimeoutMs === undefined
      ? {}
      : { idleSessionTimeoutMs: options.idleSessionTimeoutMs }),
  });
  const address = `127.0.0.1:${gateway.port}`;
  const clientToken = (claims: Record<string, unknown> = {}) =>
    issuer.sign({ aud: gatewayAudience, email: clientEmail, ...claims });
  const clients: EchoClient[] = [];
  return {
    issuer,
    gatewayMetadata,
    servers,
    gateway,
    gatewayLogs,
    gatewayLogger,
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
    async close() {
      for (const c of clients) {
        c.close();
      }
      await gateway.close();
      await Promise.all(servers.map((s) => s.close()));
      await gatewayMetadata.close().catch(() => {});
      await issuer.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The Google stand-ins the chain needs, in the bench's own process: the
 * issuer (signs the client's token, serves the JWKS both hops verify with)
 * and the gateway service account's metadata server (mints the gateway's ID
 * token toward the backends). The API config is rendered from the real
 * template, as `npm start` does.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { ApiConfigPlan } from "../../gateway/api-config.ts";
import { loadDescriptorSet } from "../../gateway/descriptor.ts";
import { renderApiConfig } from "../../gateway/render-config.ts";
import { conflictingGoogleEnv } from "../../local/google.ts";
import { createIssuer, type Issuer } from "../../local/issuer.ts";
import { createMetadataServer, type MetadataServer } from "../../local/metadata-server.ts";
import { root } from "./procs.ts";

export const gatewayAudience = "https://echo-gateway.bench";
export const backendAudience = "https://echo-backend.bench";
export const clientEmail = "client-sa@echo-bench.iam.gserviceaccount.com";
export const gatewayEmail = "gateway-sa@echo-bench.iam.gserviceaccount.com";

export interface StandIns {
  issuer: Issuer;
  gatewayMetadata: MetadataServer;
  /** A client token for the gateway (aud = gatewayAudience), valid one hour. */
  clientToken: string;
  /**
   * What the gateway sends a backend, for calling a verifying server
   * directly: its own token (aud = backendAudience, gateway's account) and
   * the end user's claims in `x-apigateway-api-userinfo`.
   */
  backendHeaders: Record<string, string>;
  /** Environment of a verifying server (only the gateway's account allowed). */
  serverEnv(): Record<string, string>;
  /** Environment of the gateway process (its metadata server, no gcloud credentials). */
  gatewayEnv(): Record<string, string>;
  /** Writes an API config routing to `backendPorts`; returns its path and plan. */
  writeApiConfig(name: string, backendPorts: number[]): { file: string; plan: ApiConfigPlan };
  close(): Promise<void>;
}

/** The environment every child starts from: no Google credentials of the developer. */
export function baseEnv(dir: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !conflictingGoogleEnv.includes(k) && !k.startsWith("ECHO_")) {
      env[k] = v;
    }
  }
  const gcloudDir = join(dir, "gcloud");
  mkdirSync(gcloudDir, { recursive: true });
  env["CLOUDSDK_CONFIG"] = gcloudDir;
  return env;
}

export async function startStandIns(dir: string): Promise<StandIns> {
  const issuer = await createIssuer();
  const gatewayMetadata = await createMetadataServer({ issuer, email: gatewayEmail });
  const clientToken = await issuer.sign({ aud: gatewayAudience, email: clientEmail });
  const gatewayToken = await issuer.sign({ aud: backendAudience, email: gatewayEmail });
  const backendHeaders = {
    authorization: `Bearer ${gatewayToken}`,
    "x-forwarded-authorization": `Bearer ${clientToken}`,
    "x-apigateway-api-userinfo": clientToken.split(".")[1] ?? "",
  };
  const registry = await loadDescriptorSet(join(root, "gen/echo.pb"));
  const template = readFileSync(join(root, "gateway/api_config.yaml.tmpl"), "utf8");
  return {
    issuer,
    gatewayMetadata,
    clientToken,
    backendHeaders,
    serverEnv: () => ({
      ...baseEnv(dir),
      K_SERVICE: "echo",
      K_REVISION: "echo-bench",
      ECHO_AUTH_MODE: "verify",
      ECHO_AUDIENCES: backendAudience,
      ECHO_JWKS_URI: issuer.jwksUri,
      ECHO_ALLOWED_PRINCIPALS: gatewayEmail,
    }),
    gatewayEnv: () => ({ ...baseEnv(dir), ...gatewayMetadata.env }),
    writeApiConfig(name, backendPorts) {
      const { text, plan } = renderApiConfig({
        template,
        registry,
        local: true,
        env: {
          GATEWAY_SERVICE_NAME: "echo.bench",
          BACKEND_ADDRESS: backendPorts.map((p) => `grpc://127.0.0.1:${p}`).join(","),
          BACKEND_AUDIENCE: backendAudience,
          JWKS_URI: issuer.jwksUri,
          GATEWAY_AUDIENCE: gatewayAudience,
        },
      });
      const file = join(dir, `${name}.api_config.yaml`);
      writeFileSync(file, text);
      return { file, plan };
    },
    async close() {
      await gatewayMetadata.close();
      await issuer.close();
    },
  };
}

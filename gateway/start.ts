/**
 * Starts the local gateway from its process configuration: loads and
 * validates the API config against the descriptor set, resolves JWKS URIs
 * (OpenID discovery where the config leaves them empty), warms key sets and
 * backend tokens, and listens. Used by gateway/main.ts and by tests.
 */
import { readFileSync } from "node:fs";
import type { Logger } from "pino";
import { type ApiConfigPlan, loadApiConfigFiles } from "./api-config.ts";
import { type BackendAuth, createBackendAuth, type IdTokenProvider } from "./backend-auth.ts";
import type { GatewayConfig } from "./config.ts";
import { buildGateway, type Gateway } from "./gateway.ts";
import { createJwtAuthn, type JwtAuthn } from "./jwt-authn.ts";

export interface StartGatewayOptions {
  logger: Logger;
  /**
   * Creates the ID-token provider for one backend audience. Default: the
   * gateway's service account through google-auth-library (the metadata
   * server at `GCE_METADATA_HOST`, or Application Default Credentials).
   */
  createTokenProvider?: (audience: string) => IdTokenProvider;
  /** Skip a backend after a failed connect for this long; default 1000 ms. */
  downBackoffMs?: number;
  /** Close client connections idle this long; default 300 000 (5 min). */
  idleSessionTimeoutMs?: number;
}

export interface StartedGateway {
  gateway: Gateway;
  plan: ApiConfigPlan;
  jwt: JwtAuthn | undefined;
  backendAuth: BackendAuth | undefined;
  port: number;
  close(): Promise<void>;
}

export async function startGateway(
  config: GatewayConfig,
  options: StartGatewayOptions,
): Promise<StartedGateway> {
  const { logger } = options;
  const plan = await loadApiConfigFiles(
    { config: config.configFile, descriptor: config.descriptorFile },
    { local: config.local },
  );
  for (const warning of plan.warnings) {
    logger.warn({ path: warning.path, line: warning.line }, warning.message);
  }

  const usedProviders = new Map(
    plan.methods.flatMap((m) => m.auth?.requirements.map((r) => [r.provider.id, r.provider]) ?? []),
  );
  let jwt: JwtAuthn | undefined;
  if (usedProviders.size > 0) {
    const jwksUris = new Map<string, string>();
    for (const provider of usedProviders.values()) {
      jwksUris.set(provider.id, provider.jwksUri ?? (await discoverJwksUri(provider.discoveryUri)));
    }
    jwt = createJwtAuthn({ providers: [...usedProviders.values()], jwksUris });
    // ESPv2 waits for the first JWKS fetch (success or not) before listening.
    await jwt.warm();
    for (const [id, keys] of jwt.keySets()) {
      const status = keys.status();
      if (!status.hasKeys) {
        logger.warn(
          { provider: id, jwksUri: status.url, error: status.lastError },
          "no JWT keys yet",
        );
      }
    }
  } else {
    logger.info("no authentication rules: JWT checks off");
  }

  const audiences = new Set(
    plan.methods.flatMap((m) => (m.backend.jwtAudience ? [m.backend.jwtAudience] : [])),
  );
  let backendAuth: BackendAuth | undefined;
  if (audiences.size > 0) {
    const createTokenProvider =
      options.createTokenProvider ?? (await defaultTokenProvider(config.metadataHost, logger));
    backendAuth = createBackendAuth({ audiences, createProvider: createTokenProvider });
    const failed = await backendAuth.warm();
    if (failed.length > 0) {
      // ESPv2 would not start; starting lets the rest of a local stack come
      // up, and every call to these audiences says what is missing.
      logger.error(
        { audiences: failed },
        "cannot mint backend ID tokens: set GCE_METADATA_HOST to the gateway's metadata server, or GOOGLE_APPLICATION_CREDENTIALS",
      );
    }
  } else {
    logger.info("no backend audiences: the caller's Authorization is forwarded untouched");
  }

  const gateway = buildGateway({
    plan,
    jwt,
    backendAuth,
    logger,
    headerPrefix: config.headerPrefix,
    retries: config.retries,
    tls: config.tls,
    backendCa: config.backendCaFile ? readFileSync(config.backendCaFile) : undefined,
    projectId: config.projectId,
    ...(options.downBackoffMs !== undefined ? { downBackoffMs: options.downBackoffMs } : {}),
    ...(options.idleSessionTimeoutMs !== undefined
      ? { idleSessionTimeoutMs: options.idleSessionTimeoutMs }
      : {}),
  });
  const port = await gateway.listen(config.port, config.host);
  logger.info(
    {
      port,
      host: config.host,
      tls: config.tls !== undefined,
      service: plan.serviceName,
      methods: plan.methods.length,
      backends: [...gateway.pools.values()].flatMap((p) => p.backends.map((b) => b.origin)),
    },
    "gateway listening",
  );
  return {
    gateway,
    plan,
    jwt,
    backendAuth,
    port,
    close: () => gateway.close(config.shutdownTimeoutMs),
  };
}

async function defaultTokenProvider(
  metadataHost: string | undefined,
  logger: Logger,
): Promise<(audience: string) => IdTokenProvider> {
  const { createIdTokenSource } = await import("../client/id-token.ts");
  // One source for all audiences: it keeps one cached token per audience.
  const source = createIdTokenSource({ ...(metadataHost ? { metadataHost } : {}), logger });
  return (audience) => ({ getToken: () => source.getIdToken(audience) });
}

async function discoverJwksUri(discoveryUri: string | undefined): Promise<string> {
  if (!discoveryUri) {
    throw new Error("provider has neither jwks_uri nor an issuer to discover it from");
  }
  const res = await fetch(discoveryUri, { signal: AbortSignal.timeout(10_000) });
  if (!res.ok) {
    throw new Error(`OpenID discovery at ${discoveryUri} answered ${res.status}`);
  }
  const doc = (await res.json()) as { jwks_uri?: unknown };
  if (typeof doc.jwks_uri !== "string") {
    throw new Error(`OpenID discovery at ${discoveryUri} has no jwks_uri`);
  }
  return doc.jwks_uri;
}

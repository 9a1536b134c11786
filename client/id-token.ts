/**
 * Google ID tokens for outgoing calls, through google-auth-library: from the
 * metadata server (Cloud Run, GCE, or the local stand-in named by
 * `GCE_METADATA_HOST`), from a service-account key file, or by impersonating
 * another service account with either of those as the source.
 *
 * The library caches one token per `IdTokenClient` but does not de-duplicate
 * concurrent refreshes, and `GoogleAuth#getIdTokenClient` fixes the refresh
 * threshold at 5 minutes; so each audience gets its own `IdTokenClient`
 * constructed here, and calls for it share one in-flight fetch.
 */
import { readFile } from "node:fs/promises";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type AuthClient,
  gaxios,
  GoogleAuth,
  IdTokenClient,
  type IdTokenProvider,
  Impersonated,
  JWT,
} from "google-auth-library";

/** Where google-auth-library posts service-account assertions; hard-coded in the library. */
const googleTokenUrl = "https://oauth2.googleapis.com/token";
const cloudPlatformScope = "https://www.googleapis.com/auth/cloud-platform";

export interface IdTokenSourceOptions {
  /** Audience used when `getIdToken()` is called without one (e.g. `https://<gateway host>`). */
  audience?: string;
  /**
   * Path of a service-account key file (JSON). Default: Application Default
   * Credentials, i.e. `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file, or
   * the metadata server (`GCE_METADATA_HOST` or 169.254.169.254).
   */
  keyFile?: string;
  /**
   * Email of a service account to impersonate: tokens come from IAM
   * Credentials `generateIdToken`, authorized by an access token of the
   * source credentials (key file or ADC). The source needs the Service
   * Account Token Creator role on it.
   */
  impersonateServiceAccount?: string;
  /**
   * Base URL of the IAM Credentials API used for impersonation; default
   * `https://iamcredentials.googleapis.com`. The local stand-in is the
   * issuer's URL.
   */
  impersonationEndpoint?: string;
  /**
   * Token endpoint for service-account keys, instead of
   * `https://oauth2.googleapis.com/token`. google-auth-library ignores a key
   * file's `token_uri` and hard-codes Google's URL, so this source gives the
   * library its own gaxios transporter (`JWT`'s `transporter` option, or
   * `GoogleAuth`'s `clientOptions.transporter` for ADC) whose request
   * interceptor rewrites that one URL. Default: the key file's `token_uri`
   * when it points at loopback (the stand-in issuer writes such files), else
   * Google's. Other `token_uri`s are ignored, as the library does: a key file
   * must not be able to send signed assertions to an arbitrary host.
   */
  tokenUrl?: string;
  /**
   * Refresh a cached token when it has less than this left before `exp`, in
   * milliseconds. Default 60 000: Google tokens live 3 600 s, so a token is
   * reused for 59 minutes, and a token sent at the last moment is still valid
   * for a minute of transit plus the receiver's own clock-skew allowance
   * (60 s in this project's verifier and in ESPv2). Passed to the library as
   * `eagerRefreshThresholdMillis`, replacing its default of 5 minutes.
   */
  refreshThresholdMs?: number;
  /**
   * `host:port` of a metadata server to ask directly, bypassing
   * gcp-metadata, which only reads `GCE_METADATA_HOST` from the process
   * environment. For running several identities in one process (tests, an
   * in-process gateway plus client); in production leave it unset. Not
   * combinable with `keyFile` or `impersonateServiceAccount`.
   */
  metadataHost?: string;
  /**
   * Timeout of one direct metadata request (`metadataHost` only), in
   * milliseconds. Default 3 000, gcp-metadata's.
   */
  metadataTimeoutMs?: number;
  /** Told when a refresh fails but a still-valid cached token is used instead. */
  logger?: { warn(obj: object, msg: string): void };
}

/** ID tokens per audience; see {@link createIdTokenSource}. */
export interface IdTokenSource {
  /** The default audience, if configured. */
  readonly audience: string | undefined;
  /**
   * A valid ID token for `audience` (default: the configured one). Throws
   * `ConnectError` with `Code.Unauthenticated` (no or rejected credentials)
   * or `Code.Unavailable` (the token service is unreachable or failing);
   * the message is one line saying what to set, and never holds a token.
   */
  getIdToken(audience?: string): Promise<string>;
}

/** How the source gets tokens; used to word errors. */
interface Origin {
  kind: "metadata" | "key-file" | "impersonation" | "adc";
  /** e.g. `metadata server at 127.0.0.1:8080`, `token endpoint https://…`. */
  where: string;
  /** What to set when this origin fails for configuration reasons. */
  hint: string;
}

interface Provider {
  provider: IdTokenProvider;
  origin: Origin;
}

interface AudienceEntry {
  client?: IdTokenClient;
  inflight?: Promise<string> | undefined;
}

/**
 * Creates an {@link IdTokenSource}. Credentials are resolved on the first
 * call, not here, so a process can start before its metadata server does.
 *
 * - One `IdTokenClient` per audience caches the token until
 *   `refreshThresholdMs` before its `exp`.
 * - Concurrent calls for an audience share one fetch (single-flight).
 * - When a refresh fails while the cached token has not yet expired, the
 *   cached token is returned (and `logger.warn` told), so a brief outage of
 *   the token service near a refresh does not fail calls.
 */
export function createIdTokenSource(options: IdTokenSourceOptions = {}): IdTokenSource {
  const refreshThresholdMs = options.refreshThresholdMs ?? 60_000;
  if (!Number.isFinite(refreshThresholdMs) || refreshThresholdMs < 0) {
    throw new TypeError("IdTokenSourceOptions.refreshThresholdMs must be a non-negative number");
  }
  if (options.metadataHost && (options.keyFile || options.impersonateServiceAccount)) {
    throw new TypeError(
      "IdTokenSourceOptions.metadataHost cannot be combined with keyFile or impersonateServiceAccount",
    );
  }

  let tokenUrl = options.tokenUrl;
  const transporter = new gaxios.Gaxios();
  transporter.interceptors.request.add({
    resolved: async (config) => {
      if (tokenUrl && config.url.href === googleTokenUrl) {
        config.url = new URL(tokenUrl);
      }
      return config;
    },
  });

  let pendingProvider: Promise<Provider> | undefined;
  const entries = new Map<string, AudienceEntry>();

  function getProvider(): Promise<Provider> {
    pendingProvider ??= loadProvider().catch((err: unknown) => {
      // Let a later call retry: the environment (or a file) may be fixed by then.
      pendingProvider = undefined;
      throw err;
    });
    return pendingProvider;
  }

  async function loadProvider(): Promise<Provider> {
    if (options.metadataHost) {
      return {
        provider: directMetadataProvider(options.metadataHost, options.metadataTimeoutMs ?? 3_000),
        origin: {
          kind: "metadata",
          where: `metadata server at ${options.metadataHost}`,
          hint: "check that it is running (metadataHost)",
        },
      };
    }
    const scopes = options.impersonateServiceAccount ? [cloudPlatformScope] : undefined;
    let base: AuthClient;
    let origin: Origin;
    if (options.keyFile) {
      const key = await readServiceAccountKey(options.keyFile);
      tokenUrl ??= loopbackUrl(key.token_uri);
      // The JWT constructor, not GoogleAuth#fromJSON: the library recommends
      // it for service-account keys (fromJSON is deprecated and warns).
      base = new JWT({
        email: key.client_email,
        key: key.private_key,
        ...(key.private_key_id ? { keyId: key.private_key_id } : {}),
        ...(scopes ? { scopes } : {}),
        transporter,
      });
      origin = {
        kind: "key-file",
        where: `token endpoint ${tokenUrl ?? googleTokenUrl} (key ${options.keyFile})`,
        hint: "use a valid service-account key file (--service-account / keyFile)",
      };
    } else {
      const auth = new GoogleAuth({
        clientOptions: { transporter },
        ...(scopes ? { scopes } : {}),
      });
      try {
        base = await auth.getClient();
      } catch (err) {
        throw new ConnectError(
          "no Google credentials for ID tokens: set GOOGLE_APPLICATION_CREDENTIALS (or --service-account) to a service-account key file, or GCE_METADATA_HOST to a metadata server",
          Code.Unauthenticated,
          undefined,
          undefined,
          err,
        );
      }
      const json = (auth as unknown as { jsonContent?: { token_uri?: unknown } | null })
        .jsonContent;
      tokenUrl ??= loopbackUrl(json?.token_uri);
      origin = describeAdc(base, tokenUrl);
    }
    if (options.impersonateServiceAccount) {
      const endpoint = options.impersonationEndpoint ?? "https://iamcredentials.googleapis.com";
      base = new Impersonated({
        sourceClient: base,
        targetPrincipal: options.impersonateServiceAccount,
        endpoint,
        transporter,
      });
      origin = {
        kind: "impersonation",
        where: `IAM Credentials at ${endpoint} (as ${options.impersonateServiceAccount}, source: ${origin.where})`,
        hint: `check that the source credentials may impersonate ${options.impersonateServiceAccount} (roles/iam.serviceAccountTokenCreator)`,
      };
    }
    if (!("fetchIdToken" in base) || typeof base.fetchIdToken !== "function") {
      throw new ConnectError(
        `credentials of type ${base.constructor.name} cannot mint ID tokens: use a service-account key file, a metadata server, or impersonateServiceAccount`,
        Code.Unauthenticated,
      );
    }
    return { provider: base as unknown as IdTokenProvider, origin };
  }

  async function fetchToken(entry: AudienceEntry, audience: string): Promise<string> {
    const { provider, origin } = await getProvider();
    entry.client ??= new IdTokenClient({
      targetAudience: audience,
      idTokenProvider: provider,
      eagerRefreshThresholdMillis: refreshThresholdMs,
    });
    const client = entry.client;
    try {
      const authorization = (await client.getRequestHeaders()).get("authorization") ?? "";
      if (!authorization.startsWith("Bearer ") || authorization.length <= 7) {
        throw new Error("empty token");
      }
      return authorization.slice(7);
    } catch (err) {
      const { id_token: cached, expiry_date: expiresAtMs } = client.credentials;
      if (cached && expiresAtMs && expiresAtMs > Date.now()) {
        options.logger?.warn(
          { audience, expiresInMs: expiresAtMs - Date.now(), reason: errorReason(err) },
          "ID token refresh failed; using the cached token until it expires",
        );
        return cached;
      }
      throw toConnectError(err, origin, audience);
    }
  }

  return {
    audience: options.audience,
    getIdToken(audienceArg?: string): Promise<string> {
      const audience = audienceArg ?? options.audience;
      if (!audience) {
        return Promise.reject(
          new TypeError("getIdToken(): no audience given and IdTokenSourceOptions.audience unset"),
        );
      }
      let entry = entries.get(audience);
      if (!entry) {
        entry = {};
        entries.set(audience, entry);
      }
      const current = entry;
      current.inflight ??= fetchToken(current, audience).finally(() => {
        current.inflight = undefined;
      });
      return current.inflight;
    },
  };
}

interface ServiceAccountKeyFile {
  client_email: string;
  private_key: string;
  private_key_id?: string;
  token_uri?: string;
}

async function readServiceAccountKey(path: string): Promise<ServiceAccountKeyFile> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    throw new ConnectError(
      `cannot read service-account key file ${path} (${typeof code === "string" ? code : "error"}): set --service-account / keyFile to a readable key file`,
      Code.Unauthenticated,
      undefined,
      undefined,
      err,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConnectError(
      `service-account key file ${path} is not JSON: download a JSON key (gcloud iam service-accounts keys create)`,
      Code.Unauthenticated,
      undefined,
      undefined,
      err,
    );
  }
  const key = json as Partial<Record<string, unknown>>;
  if (
    key.type !== "service_account" ||
    typeof key.client_email !== "string" ||
    typeof key.private_key !== "string"
  ) {
    throw new ConnectError(
      `${path} is not a service-account key (needs type "service_account", client_email, private_key): use a service-account key file`,
      Code.Unauthenticated,
    );
  }
  return {
    client_email: key.client_email,
    private_key: key.private_key,
    ...(typeof key.private_key_id === "string" ? { private_key_id: key.private_key_id } : {}),
    ...(typeof key.token_uri === "string" ? { token_uri: key.token_uri } : {}),
  };
}

/** `value` if it is an http(s) URL on loopback, else undefined. */
function loopbackUrl(value: unknown): string | undefined {
  if (typeof value !== "string") {
    return undefined;
  }
  try {
    const url = new URL(value);
    const loopback = ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname);
    return loopback && (url.protocol === "http:" || url.protocol === "https:")
      ? url.href
      : undefined;
  } catch {
    return undefined;
  }
}

function metadataHostFromEnv(): string {
  // What gcp-metadata reads, in its order; only used to word messages.
  return process.env.GCE_METADATA_IP || process.env.GCE_METADATA_HOST || "169.254.169.254";
}

function describeAdc(client: AuthClient, tokenUrl: string | undefined): Origin {
  if (client instanceof JWT) {
    return {
      kind: "key-file",
      where: `token endpoint ${tokenUrl ?? googleTokenUrl} (key from GOOGLE_APPLICATION_CREDENTIALS)`,
      hint: "point GOOGLE_APPLICATION_CREDENTIALS at a valid service-account key file",
    };
  }
  if (client.constructor.name === "Compute") {
    return {
      kind: "metadata",
      where: `metadata server at ${metadataHostFromEnv()}`,
      hint: "set GCE_METADATA_HOST to a running metadata server",
    };
  }
  return {
    kind: "adc",
    where: `${client.constructor.name} credentials`,
    hint: "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file",
  };
}

/**
 * An `IdTokenProvider` that asks one metadata server directly, with the same
 * request gcp-metadata makes (`format=full`, `Metadata-Flavor: Google`) and
 * the same check of the answer's flavor header.
 */
function directMetadataProvider(host: string, timeoutMs: number): IdTokenProvider {
  const base = /^https?:\/\//.test(host) ? host : `http://${host}`;
  return {
    async fetchIdToken(audience: string): Promise<string> {
      const url = new URL("/computeMetadata/v1/instance/service-accounts/default/identity", base);
      url.searchParams.set("audience", audience);
      url.searchParams.set("format", "full");
      const response = await fetch(url, {
        headers: { "metadata-flavor": "Google" },
        signal: AbortSignal.timeout(timeoutMs),
      });
      const body = await response.text();
      if (!response.ok) {
        throw Object.assign(new Error(`metadata server answered HTTP ${response.status}`), {
          status: response.status,
        });
      }
      if (response.headers.get("metadata-flavor") !== "Google") {
        throw new RangeError("incorrect Metadata-Flavor header");
      }
      return body.trim();
    },
  };
}

const unreachableCodes = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "ETIMEDOUT",
  "EPIPE",
  "UND_ERR_SOCKET",
  "UND_ERR_CONNECT_TIMEOUT",
  "TimeoutError",
  "AbortError",
]);

/** A short machine-ish reason for logs and messages: a system error code or an HTTP status. */
function errorReason(err: unknown): string {
  const status = httpStatus(err);
  if (status !== undefined) {
    return `HTTP ${status}`;
  }
  return systemCode(err) ?? (err instanceof Error ? err.name : "error");
}

function httpStatus(err: unknown): number | undefined {
  const e = err as { status?: unknown; response?: { status?: unknown } } | undefined;
  const status = e?.response?.status ?? e?.status;
  return typeof status === "number" ? status : undefined;
}

function systemCode(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e && depth < 4; depth++) {
    const { code, name } = e as { code?: unknown; name?: unknown };
    if (typeof code === "string" && unreachableCodes.has(code)) {
      return code;
    }
    if (typeof name === "string" && unreachableCodes.has(name)) {
      return name;
    }
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** OAuth error code from a token endpoint answer (`{"error":"invalid_grant"}`), if any. */
function oauthError(err: unknown): string | undefined {
  const data = (err as { response?: { data?: unknown } } | undefined)?.response?.data;
  const error = (data as { error?: unknown } | undefined)?.error;
  if (typeof error === "string") {
    return error;
  }
  const status = (error as { status?: unknown } | undefined)?.status;
  return typeof status === "string" ? status : undefined;
}

/**
 * Maps a failure to get a token onto a one-line ConnectError. Built from
 * status codes and error codes only: library messages can embed response
 * bodies, which must not reach callers.
 */
function toConnectError(err: unknown, origin: Origin, audience: string): ConnectError {
  if (err instanceof ConnectError) {
    return err;
  }
  const prefix = `cannot get an ID token for audience ${audience} from ${origin.where}`;
  const status = httpStatus(err);
  if (status !== undefined) {
    const detail = oauthError(err);
    const what = `HTTP ${status}${detail ? ` ${detail}` : ""}`;
    // 408/429/5xx: the service is there but failing; anything else is a refusal.
    if (status === 408 || status === 429 || status >= 500) {
      return new ConnectError(
        `${prefix}: ${what}; retry later or ${origin.hint}`,
        Code.Unavailable,
        undefined,
        undefined,
        err,
      );
    }
    return new ConnectError(
      `${prefix}: refused (${what}); ${origin.hint}`,
      Code.Unauthenticated,
      undefined,
      undefined,
      err,
    );
  }
  const code = systemCode(err);
  if (code) {
    return new ConnectError(
      `${prefix}: unreachable (${code}); ${origin.hint}`,
      Code.Unavailable,
      undefined,
      undefined,
      err,
    );
  }
  if (err instanceof RangeError && /Metadata-Flavor/.test(err.message)) {
    return new ConnectError(
      `${prefix}: the answer lacks "Metadata-Flavor: Google", so it is not a metadata server; ${origin.hint}`,
      Code.Unavailable,
      undefined,
      undefined,
      err,
    );
  }
  return new ConnectError(
    `${prefix}: ${err instanceof Error ? err.name : "error"}; ${origin.hint}`,
    Code.Unauthenticated,
    undefined,
    undefined,
    err,
  );
}

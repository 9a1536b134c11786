/**
 * A local stand-in for the GCE / Cloud Run metadata server, for one service
 * account. google-auth-library (through gcp-metadata) reaches it when
 * `GCE_METADATA_HOST` names its `host`. It answers the paths this project and
 * the library read, with the real server's header contract, and mints
 * identity tokens through the issuer stand-in.
 *
 * Paths, all under `/computeMetadata/v1/` (https://cloud.google.com/compute/docs/metadata/predefined-metadata-keys):
 * `instance/service-accounts/{default|<email>}/{identity,email,token,aliases,scopes}`,
 * `instance/id`, `instance/region`, `instance/zone`, `project/project-id`,
 * `project/numeric-project-id`, and the directory listings above them.
 */
import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { Logger } from "pino";
import { type Issuer, urlHost } from "./issuer.ts";

/** The request and response header of the metadata contract. */
export const metadataFlavorHeader = "metadata-flavor";
export const metadataFlavorValue = "Google";
const basePath = "/computeMetadata/v1";

export interface MetadataServerOptions {
  /** Mints the identity tokens and access tokens. */
  issuer: Issuer;
  /** Email of the service account this "instance" runs as. */
  email: string;
  /** `project/project-id`; default the project named in `email`, else "stand-in-project". */
  projectId?: string;
  /** `project/numeric-project-id`; default "123456789012". */
  numericProjectId?: string;
  /** Region in `instance/region`; default "us-central1". */
  region?: string;
  /** `instance/id`; default 64 random hex digits, like a Cloud Run instance id. */
  instanceId?: string;
  /** Identity-token lifetime in seconds; default the issuer's (3600). */
  tokenLifetimeSeconds?: number;
  /** TCP port; default 0 (any free port). */
  port?: number;
  /** Listen address; default "127.0.0.1". */
  listenHost?: string;
  /** Logs one debug line per request when given. */
  logger?: Logger;
}

export interface MetadataServer {
  /** `127.0.0.1:<port>`: the value `GCE_METADATA_HOST` wants. */
  readonly host: string;
  /** `http://127.0.0.1:<port>`. */
  readonly url: string;
  readonly email: string;
  readonly projectId: string;
  readonly numericProjectId: string;
  readonly region: string;
  readonly instanceId: string;
  /**
   * Environment that points google-auth-library at this server and keeps it
   * from looking elsewhere: `GCE_METADATA_HOST`,
   * `METADATA_SERVER_DETECTION=assume-present` (no ping) and
   * `GOOGLE_CLOUD_PROJECT` (no `gcloud` exec, no project lookup). Add it to a
   * child process's env; see docs in `local/google.ts` for what else to unset.
   */
  readonly env: Readonly<Record<string, string>>;
  /** Identity-token requests answered with a token. */
  identityRequests(): number;
  /** Requests per path (pathname without query), including rejected ones. */
  requestCounts(): Record<string, number>;
  resetCounts(): void;
  /**
   * `false`: connections are still accepted, but every request answers 503.
   * The client then sees the server as broken rather than absent; use
   * `close()` for "connection refused".
   */
  setAvailable(available: boolean): void;
  close(): Promise<void>;
}

/** Starts a metadata server stand-in; resolves once it listens. */
export async function createMetadataServer(
  options: MetadataServerOptions,
): Promise<MetadataServer> {
  const { issuer, email } = options;
  const projectId =
    options.projectId ??
    /^[^@]+@([^.]+)\.iam\.gserviceaccount\.com$/.exec(email)?.[1] ??
    "stand-in-project";
  const numericProjectId = options.numericProjectId ?? "123456789012";
  const region = options.region ?? "us-central1";
  const instanceId = options.instanceId ?? randomBytes(32).toString("hex");
  const logger = options.logger;
  const counts = new Map<string, number>();
  let identityCount = 0;
  let available = true;

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      logger?.error({ err }, "metadata stand-in request failed");
      if (!res.headersSent) {
        send(res, 500, "internal error");
      } else {
        res.destroy();
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, options.listenHost ?? "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const host = `${urlHost(options.listenHost ?? "127.0.0.1")}:${(server.address() as AddressInfo).port}`;

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", `http://${host}`);
    const path = url.pathname;
    counts.set(path, (counts.get(path) ?? 0) + 1);
    logger?.debug({ path }, "metadata stand-in request");

    if (!available) {
      return send(res, 503, "metadata server unavailable (stand-in switched off)");
    }
    if (path === "/") {
      // The root answers without the request header, as the real server does.
      return send(res, 200, "computeMetadata/\n");
    }
    // The real server refuses requests that lack the header (so a browser or
    // an SSRF cannot read tokens) and anything that went through a proxy.
    if (req.headers[metadataFlavorHeader] !== metadataFlavorValue) {
      return send(res, 403, "Missing Metadata-Flavor:Google header.");
    }
    if (req.headers["x-forwarded-for"] !== undefined) {
      return send(res, 403, "Requests with X-Forwarded-For are not allowed.");
    }
    if (req.method !== "GET") {
      return send(res, 405, "Method not allowed.");
    }
    if (path === basePath || path === `${basePath}/`) {
      return send(res, 200, "instance/\nproject/\n");
    }
    if (!path.startsWith(`${basePath}/`)) {
      return send(res, 404, "Not found.");
    }
    const key = path.slice(basePath.length + 1);

    switch (key) {
      case "instance":
      case "instance/":
        // gcp-metadata's availability ping lands here.
        return send(res, 200, "id\nregion\nservice-accounts/\nzone\n");
      case "instance/id":
        return send(res, 200, instanceId);
      case "instance/region":
        return send(res, 200, `projects/${numericProjectId}/regions/${region}`);
      case "instance/zone":
        return send(res, 200, `projects/${numericProjectId}/zones/${region}-1`);
      case "project":
      case "project/":
        return send(res, 200, "numeric-project-id\nproject-id\n");
      case "project/project-id":
        return send(res, 200, projectId);
      case "project/numeric-project-id":
        return send(res, 200, numericProjectId);
      case "instance/service-accounts":
      case "instance/service-accounts/":
        return send(res, 200, `default/\n${email}/\n`);
    }

    const account = /^instance\/service-accounts\/([^/]+)(?:\/(.*))?$/.exec(key);
    const alias = account?.[1] ? decodeURIComponent(account[1]) : undefined;
    if (!account || (alias !== "default" && alias !== email)) {
      return send(res, 404, "Not found.");
    }
    switch (account[2] ?? "") {
      case "":
        return send(res, 200, "aliases\nemail\nidentity\nscopes\ntoken\n");
      case "aliases":
        return send(res, 200, "default\n");
      case "email":
        return send(res, 200, email);
      case "scopes":
        return send(res, 200, "https://www.googleapis.com/auth/cloud-platform\n");
      case "token":
        return send(res, 200, JSON.stringify(issuer.issueAccessToken(email)), "application/json");
      case "identity": {
        const audience = url.searchParams.get("audience");
        if (!audience) {
          return send(res, 400, "non-empty audience parameter required");
        }
        const format = url.searchParams.get("format") ?? "standard";
        if (format !== "standard" && format !== "full") {
          return send(res, 400, "format must be standard or full");
        }
        // Google's `standard` tokens carry no email; `full` adds it (and on
        // GCE a `google.compute_engine` claim, which Cloud Run lacks and this
        // stand-in leaves out).
        const token = await issuer.mintIdToken(email, audience, {
          includeEmail: format === "full",
          ...(options.tokenLifetimeSeconds === undefined
            ? {}
            : { lifetimeSeconds: options.tokenLifetimeSeconds }),
        });
        identityCount++;
        return send(res, 200, token);
      }
      default:
        return send(res, 404, "Not found.");
    }
  }

  return {
    host,
    url: `http://${host}`,
    email,
    projectId,
    numericProjectId,
    region,
    instanceId,
    env: Object.freeze({
      GCE_METADATA_HOST: host,
      METADATA_SERVER_DETECTION: "assume-present",
      GOOGLE_CLOUD_PROJECT: projectId,
    }),
    identityRequests: () => identityCount,
    requestCounts: () => Object.fromEntries(counts),
    resetCounts() {
      counts.clear();
      identityCount = 0;
    },
    setAvailable(value) {
      available = value;
    },
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

function send(
  res: ServerResponse,
  status: number,
  body: string,
  contentType = "application/text",
): void {
  // Every answer carries the flavor header: gcp-metadata rejects responses
  // without it, so a stand-in that forgot it would fail like a hijacked host.
  res.writeHead(status, {
    "metadata-flavor": metadataFlavorValue,
    "content-type": contentType,
    "content-length": Buffer.byteLength(body),
  });
  res.end(body);
}

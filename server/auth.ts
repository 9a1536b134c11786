/**
 * Caller verification for the Echo server: who is on the other end of a call,
 * taken from the Google ID token in `authorization`, and the end user the
 * gateway vouches for in `x-apigateway-api-userinfo`.
 *
 * Only the verifier lives here; wiring it into the Fastify app (a Connect
 * interceptor that stores the Caller in the context values) is the app's job.
 */
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { decodeJwt, decodeProtectedHeader, errors, type JWTPayload, jwtVerify } from "jose";
import type { Logger } from "pino";
import { type Caller, CallerSchema } from "../gen/echo/v1/echo_pb.ts";
import {
  createRemoteKeySet,
  createVerifiedTokenCache,
  isKeySetUnavailable,
  type RemoteKeySet,
} from "../lib/jwt-keys.ts";

/**
 * How the server checks callers. Mirrors the original's
 * `--validateToken --targetAudience` plus Cloud Run's trust mode.
 */
export type ServerAuthConfig = {
  /**
   * - "off" (default): no check; every caller is `verification: "none"`.
   * - "verify": the server verifies the token itself: RS256 signature against
   *   `jwksUri`, `iss` in `issuers`, `aud` in `audiences`, `exp`/`iat`
   *   present, time within `clockSkewSeconds`.
   * - "cloud-run": the server trusts that Cloud Run's IAM invoker check
   *   already verified the token, and only decodes it (Cloud Run replaces
   *   the signature with `SIGNATURE_REMOVED_BY_GOOGLE`, so it cannot be
   *   re-verified); it still requires RS256, and checks `iss`, `aud`, `exp`
   *   and `nbf`. Safe ONLY when the service requires authentication
   *   (invoker IAM check on, no `allUsers` invoker) and ingress is
   *   restricted so that nothing reaches the container except through
   *   Cloud Run's front end. Anywhere else anyone can forge the token.
   */
  mode: "off" | "verify" | "cloud-run";
  /**
   * Accepted `aud` values (the token's `aud`, a string or a list, must contain
   * one). Usually the service URL, e.g. `https://echo-abc-uc.a.run.app`, or
   * the gateway's `jwt_audience`. Required unless mode is "off". Compared
   * exactly: pick one spelling (trailing slash or not) on both sides.
   */
  audiences: string[];
  /** Accepted `iss` values. Default `https://accounts.google.com` and `accounts.google.com`. */
  issuers: string[];
  /**
   * Where signing keys come from, a JWKS or Google's X.509 map. Default
   * `https://www.googleapis.com/oauth2/v3/certs`; the local stand-in's
   * `/oauth2/v3/certs` in development.
   */
  jwksUri: string;
  /**
   * Principals allowed to call, by `email` (only when `email_verified` is
   * true) or numeric `sub`; `serviceAccount:` / `user:` prefixes as in IAM
   * bindings are accepted. Empty (default) allows every verified caller.
   * Behind a gateway, list the gateway's service account: that is also what
   * makes `x-apigateway-api-userinfo` trustworthy, since any caller the
   * server accepts could set that header.
   */
  allowedPrincipals: string[];
  /** Tolerance for `exp` and `nbf`, in seconds. Default 60, as ESPv2's. */
  clockSkewSeconds: number;
};

/** Defaults of {@link ServerAuthConfig}. */
export const defaultServerAuthConfig: Readonly<ServerAuthConfig> = Object.freeze({
  mode: "off",
  audiences: [],
  issuers: ["https://accounts.google.com", "accounts.google.com"],
  jwksUri: "https://www.googleapis.com/oauth2/v3/certs",
  allowedPrincipals: [],
  clockSkewSeconds: 60,
});

/** Header in which API Gateway forwards the verified end-user claims (base64url JSON). */
export const headerApiUserInfo = "x-apigateway-api-userinfo";
/** What Cloud Run puts in place of a token's signature after its IAM check. */
export const signatureRemovedByGoogle = "SIGNATURE_REMOVED_BY_GOOGLE";

export interface CallerVerifierOptions {
  /**
   * Key set to verify with; default one created for `config.jwksUri` with
   * lib/jwt-keys.ts defaults (5 min cache, refetch on unknown `kid` at most
   * every 30 s, keep the last good keys when the key server fails). A key set
   * passed in is not closed by `close()`.
   */
  keySet?: RemoteKeySet;
  /** Verified tokens remembered until they expire; default 1 000 (least recently used dropped). */
  tokenCacheMaxEntries?: number;
  /** Clock in epoch milliseconds; default `Date.now`. For tests. */
  now?: () => number;
  /** Logs the reason of each rejection at debug level (never the token). */
  logger?: Logger;
}

export interface CallerVerifier {
  readonly mode: ServerAuthConfig["mode"];
  /**
   * The caller of a request, from its headers. Throws ConnectError:
   * Unauthenticated for a missing or invalid token (the message names the
   * failed check, e.g. `invalid token: audience mismatch`), PermissionDenied
   * for a valid token whose principal is not allowed, Unavailable when the
   * signing keys cannot be fetched and none are cached.
   */
  verify(headers: Headers): Promise<Caller>;
  /**
   * Fetches the signing keys once ("verify" mode), so the first call does not
   * wait for them; resolves whether keys are cached, never rejects. Other
   * modes need no keys and resolve true.
   */
  warm(): Promise<boolean>;
  /** Stops the key set's background refresh (if the verifier created it). */
  close(): void;
}

type PrincipalInit = { email: string; subject: string; issuer: string };

interface VerifiedPrincipal {
  principal: PrincipalInit;
  /** Whether `email` may be used for the allow-list. */
  emailVerified: boolean;
}

/**
 * Creates the verifier for `config`. Validates the config at once and throws
 * a TypeError naming the field when it cannot work (e.g. mode "verify"
 * without audiences).
 */
export function createCallerVerifier(
  config: ServerAuthConfig,
  options: CallerVerifierOptions = {},
): CallerVerifier {
  validateConfig(config);
  const now = options.now ?? Date.now;
  const logger = options.logger;
  const allowed = normalizeAllowList(config.allowedPrincipals);

  if (config.mode === "off") {
    return {
      mode: "off",
      async verify() {
        return create(CallerSchema, { verification: "none" });
      },
      warm: async () => true,
      close() {},
    };
  }

  const ownsKeySet = config.mode === "verify" && !options.keySet;
  const keySet =
    config.mode === "verify"
      ? (options.keySet ?? createRemoteKeySet({ url: config.jwksUri }))
      : undefined;
  const cache = createVerifiedTokenCache<VerifiedPrincipal>({
    maxEntries: options.tokenCacheMaxEntries ?? 1_000,
  });

  function reject(code: Code, message: string, cause?: unknown): never {
    logger?.debug({ code: Code[code], reason: message }, "caller rejected");
    throw new ConnectError(message, code, undefined, undefined, cause);
  }

  async function verifySignature(token: string): Promise<VerifiedPrincipal> {
    const nowMs = now();
    const hit = cache.get(token, nowMs);
    if (hit) {
      return hit;
    }
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, keySet as RemoteKeySet, {
        algorithms: ["RS256"],
        issuer: config.issuers,
        audience: config.audiences,
        clockTolerance: config.clockSkewSeconds,
        requiredClaims: ["exp", "iat"],
        currentDate: new Date(nowMs),
      }));
    } catch (err) {
      if (isKeySetUnavailable(err)) {
        return reject(Code.Unavailable, "cannot verify token: signing keys unavailable", err);
      }
      if (err instanceof errors.JOSEError) {
        return reject(Code.Unauthenticated, `invalid token: ${describeJoseError(err)}`, err);
      }
      return reject(Code.Internal, "token verification failed", err);
    }
    const verified = toVerifiedPrincipal(payload);
    // Remember until the token would fail the time check: `exp` plus skew.
    cache.set(token, verified, ((payload.exp as number) + config.clockSkewSeconds) * 1000);
    return verified;
  }

  function decodeTrusted(token: string): VerifiedPrincipal {
    const parts = token.split(".");
    if (parts.length !== 3 || parts.some((p) => p === "")) {
      return reject(Code.Unauthenticated, "invalid token: malformed");
    }
    let alg: unknown;
    let payload: JWTPayload;
    try {
      alg = decodeProtectedHeader(token).alg;
      payload = decodeJwt(token);
    } catch (err) {
      return reject(Code.Unauthenticated, "invalid token: malformed", err);
    }
    // Cloud Run only forwards Google-signed tokens: RS256, and a signature
    // segment that is either intact or replaced by its marker.
    if (alg !== "RS256") {
      return reject(Code.Unauthenticated, "invalid token: algorithm not allowed");
    }
    const signature = parts[2] as string;
    if (signature !== signatureRemovedByGoogle && !/^[A-Za-z0-9_-]+$/.test(signature)) {
      return reject(Code.Unauthenticated, "invalid token: malformed");
    }
    const failure = checkClaims(payload, config, now());
    if (failure) {
      return reject(Code.Unauthenticated, `invalid token: ${failure}`);
    }
    return toVerifiedPrincipal(payload);
  }

  return {
    mode: config.mode,
    async verify(headers: Headers): Promise<Caller> {
      const token = bearerToken(headers);
      if (token === undefined) {
        return reject(Code.Unauthenticated, "missing bearer token");
      }
      const { principal, emailVerified } =
        config.mode === "verify" ? await verifySignature(token) : decodeTrusted(token);
      if (allowed && !isAllowed(allowed, principal, emailVerified)) {
        return reject(
          Code.PermissionDenied,
          `principal not allowed: ${principal.email || principal.subject || "(no email or sub)"}`,
        );
      }
      const endUser = readEndUser(headers.get(headerApiUserInfo));
      return create(CallerSchema, {
        principal,
        verification: config.mode === "verify" ? "verified" : "decoded",
        ...(endUser ? { endUser } : {}),
      });
    },
    warm: async () => (keySet ? keySet.warm() : true),
    close() {
      if (ownsKeySet) {
        keySet?.close();
      }
    },
  };
}

function validateConfig(config: ServerAuthConfig): void {
  const problems: string[] = [];
  if (!["off", "verify", "cloud-run"].includes(config.mode)) {
    problems.push(
      `mode must be "off", "verify" or "cloud-run", got ${JSON.stringify(config.mode)}`,
    );
  }
  if (config.mode !== "off") {
    if (config.audiences.length === 0 || config.audiences.some((a) => a === "")) {
      problems.push(
        `audiences must name at least one non-empty audience when mode is "${config.mode}"`,
      );
    }
    if (config.issuers.length === 0) {
      problems.push("issuers must not be empty");
    }
    if (!Number.isFinite(config.clockSkewSeconds) || config.clockSkewSeconds < 0) {
      problems.push("clockSkewSeconds must be a non-negative number");
    }
  }
  if (config.mode === "verify" && !URL.canParse(config.jwksUri)) {
    problems.push(`jwksUri is not a URL: ${JSON.stringify(config.jwksUri)}`);
  }
  if (problems.length > 0) {
    throw new TypeError(`ServerAuthConfig: ${problems.join("; ")}`);
  }
}

/**
 * The token of an `authorization: Bearer <token>` header; undefined when the
 * header is absent, has another scheme, or carries no token.
 */
function bearerToken(headers: Headers): string | undefined {
  const value = headers.get("authorization");
  const match = value ? /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(value) : null;
  return match?.[1];
}

function toVerifiedPrincipal(payload: JWTPayload): VerifiedPrincipal {
  return {
    principal: {
      email: typeof payload.email === "string" ? payload.email : "",
      subject: typeof payload.sub === "string" ? payload.sub : "",
      issuer: typeof payload.iss === "string" ? payload.iss : "",
    },
    emailVerified: payload.email_verified === true,
  };
}

/** Claim checks of "cloud-run" mode, in jose's order; returns the failure or undefined. */
function checkClaims(
  payload: JWTPayload,
  config: ServerAuthConfig,
  nowMs: number,
): string | undefined {
  for (const claim of ["iss", "aud", "iat", "exp"] as const) {
    if (payload[claim] === undefined) {
      return `missing ${claim} claim`;
    }
  }
  if (!config.issuers.includes(payload.iss as string)) {
    return "issuer mismatch";
  }
  const aud = payload.aud;
  const audiences = typeof aud === "string" ? [aud] : Array.isArray(aud) ? aud : [];
  if (!audiences.some((a) => config.audiences.includes(a))) {
    return "audience mismatch";
  }
  const nowSeconds = Math.floor(nowMs / 1000);
  const { exp, nbf, iat } = payload;
  if (
    typeof exp !== "number" ||
    typeof iat !== "number" ||
    (nbf !== undefined && typeof nbf !== "number")
  ) {
    return "time claims are not numbers";
  }
  if (nbf !== undefined && nbf > nowSeconds + config.clockSkewSeconds) {
    return "not yet valid";
  }
  if (exp <= nowSeconds - config.clockSkewSeconds) {
    return "expired";
  }
  return undefined;
}

/** Which check failed, in a few words, from jose's error code and claim. */
function describeJoseError(err: InstanceType<typeof errors.JOSEError>): string {
  switch (err.code) {
    case "ERR_JWT_EXPIRED":
      return "expired";
    case "ERR_JWT_CLAIM_VALIDATION_FAILED": {
      const { claim, reason } = err as InstanceType<typeof errors.JWTClaimValidationFailed>;
      if (reason === "missing") {
        return `missing ${claim} claim`;
      }
      switch (claim) {
        case "aud":
          return "audience mismatch";
        case "iss":
          return "issuer mismatch";
        case "nbf":
          return "not yet valid";
        default:
          return `${claim} claim invalid`;
      }
    }
    case "ERR_JWS_SIGNATURE_VERIFICATION_FAILED":
      return "bad signature";
    case "ERR_JOSE_ALG_NOT_ALLOWED":
      return "algorithm not allowed";
    case "ERR_JWS_INVALID":
    case "ERR_JWT_INVALID":
      return "malformed";
    case "ERR_JWKS_NO_MATCHING_KEY":
      return "no signing key matches kid";
    case "ERR_JWKS_MULTIPLE_MATCHING_KEYS":
      return "several signing keys match";
    case "ERR_JOSE_NOT_SUPPORTED":
    case "ERR_JWK_INVALID":
    case "ERR_JWKS_INVALID":
      return "unusable signing key";
    default:
      return `verification failed (${err.code})`;
  }
}

interface AllowList {
  emails: Set<string>;
  subjects: Set<string>;
}

function normalizeAllowList(entries: string[]): AllowList | undefined {
  if (entries.length === 0) {
    return undefined;
  }
  const list: AllowList = { emails: new Set(), subjects: new Set() };
  for (const raw of entries) {
    const entry = raw.trim().replace(/^(serviceAccount|user):/, "");
    if (entry.includes("@")) {
      list.emails.add(entry.toLowerCase());
    } else if (entry !== "") {
      list.subjects.add(entry);
    }
  }
  return list;
}

function isAllowed(list: AllowList, principal: PrincipalInit, emailVerified: boolean): boolean {
  if (principal.subject !== "" && list.subjects.has(principal.subject)) {
    return true;
  }
  return emailVerified && principal.email !== "" && list.emails.has(principal.email.toLowerCase());
}

/**
 * The end user from `x-apigateway-api-userinfo` (base64url JSON of the JWT
 * payload the gateway verified). Undefined when absent or unreadable: the
 * header is informational, and a broken one must not fail the call.
 */
function readEndUser(value: string | null): PrincipalInit | undefined {
  if (!value) {
    return undefined;
  }
  try {
    // Node's base64 decoder accepts both the URL-safe and the standard
    // alphabet, padded or not; ESPv2 variants differ in that.
    const claims: unknown = JSON.parse(Buffer.from(value.trim(), "base64").toString("utf8"));
    if (typeof claims !== "object" || claims === null || Array.isArray(claims)) {
      return undefined;
    }
    const { email, sub, iss } = claims as Record<string, unknown>;
    return {
      email: typeof email === "string" ? email : "",
      subject: typeof sub === "string" ? sub : "",
      issuer: typeof iss === "string" ? iss : "",
    };
  } catch {
    return undefined;
  }
}

/**
 * JWT authentication as ESPv2 configures Envoy's jwt_authn filter (spec §2):
 * token extraction per provider location, checks in jwt_verify_lib's order
 * (parse → issuer → time → audience → cache → key → signature), the
 * `requires_any` / `allow_missing` semantics, and jwt_verify_lib's status
 * texts, which clients see inside `grpc-message`.
 *
 * Parsing is hand-written because the order and the texts of its failures
 * are what API Gateway callers observe; keys and signatures go through jose
 * and the shared key set (lib/jwt-keys.ts).
 */
import { compactVerify, errors } from "jose";
import {
  createRemoteKeySet,
  createVerifiedTokenCache,
  isKeySetUnavailable,
  isNoMatchingKey,
  type RemoteKeySet,
  type VerifiedTokenCache,
} from "../lib/jwt-keys.ts";
import {
  type AuthPlan,
  audienceMatches,
  type JwtLocation,
  type ProviderPlan,
} from "./api-config.ts";

/** Algorithms jwt_verify_lib implements (`isImplemented`); anything else is "not supported". */
const supportedAlgorithms = [
  "RS256",
  "RS384",
  "RS512",
  "PS256",
  "PS384",
  "PS512",
  "ES256",
  "ES384",
  "ES512",
  "EdDSA",
];
// HS* are in jwt_verify_lib's list too, but only work with an `oct` key in
// the JWKS, which Google never publishes. Accepting them would only open the
// classic "public key as HMAC secret" confusion, so they are refused as
// unsupported: a deliberate difference from ESPv2.

/** jwt_verify_lib's clock skew (`kClockSkewInSecond`). */
export const clockSkewSeconds = 60;

/** A rejection: HTTP status (401/403) and jwt_verify_lib's text. */
export interface JwtFailure {
  ok: false;
  httpStatus: 401 | 403;
  message: string;
  /** Provider whose check produced this failure. */
  provider: string | undefined;
}

export interface JwtSuccess {
  ok: true;
  /** Verified payload, or undefined when allowed without a credential. */
  payload: Record<string, unknown> | undefined;
  /** The payload segment as sent (base64url), for the userinfo header. */
  payloadSegment: string | undefined;
  provider: string | undefined;
}

export type JwtResult = JwtSuccess | JwtFailure;

export const jwtMessages = {
  missing: "Jwt is missing",
  badFormat: "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
  headerBase64: "Jwt header is an invalid Base64url encoded",
  headerJson: "Jwt header is an invalid JSON",
  algMissing: "Jwt header [alg] field is required and must be a string",
  algUnsupported: "Jwt header [alg] is not supported",
  kidType: "Jwt header [kid] field is not a string",
  payloadBase64: "Jwt payload is an invalid Base64url encoded",
  payloadJson: "Jwt payload is an invalid JSON",
  signatureBase64: "Jwt signature is an invalid Base64url encoded",
  unknownIssuer: "Jwt issuer is not configured",
  notYetValid: "Jwt not yet valid",
  expired: "Jwt is expired",
  expMissing: "Jwt payload [exp] field is required",
  audience: "Audiences in Jwt are not allowed",
  jwksFetch: "Jwks remote fetch is failed",
  noKey: "Jwks doesn't have key to match kid or alg from Jwt",
  signature: "Jwt verification fails",
} as const;

const base64urlChars = /^[A-Za-z0-9_-]*={0,2}$/;
/** Valid base64url: its alphabet, and a length a decoder accepts (never 4n+1). */
function isBase64url(segment: string): boolean {
  return base64urlChars.test(segment) && segment.replace(/=+$/, "").length % 4 !== 1;
}
/** Characters a token may consist of, for extraction after a prefix. */
const tokenChars = /[A-Za-z0-9_\-.=]/;

export interface ParsedJwt {
  header: Record<string, unknown>;
  payload: Record<string, unknown>;
  payloadSegment: string;
}

/** Parses a compact JWT as jwt_verify_lib does, or returns its failure text. */
export function parseJwt(token: string): ParsedJwt | string {
  const parts = token.split(".");
  if (parts.length !== 3) {
    return jwtMessages.badFormat;
  }
  const [h, p, s] = parts as [string, string, string];
  if (!isBase64url(h)) {
    return jwtMessages.headerBase64;
  }
  const header = parseJsonObject(h);
  if (!header) {
    return jwtMessages.headerJson;
  }
  if (typeof header["alg"] !== "string") {
    return jwtMessages.algMissing;
  }
  if (!supportedAlgorithms.includes(header["alg"])) {
    return jwtMessages.algUnsupported;
  }
  if (header["kid"] !== undefined && typeof header["kid"] !== "string") {
    return jwtMessages.kidType;
  }
  if (!isBase64url(p)) {
    return jwtMessages.payloadBase64;
  }
  const payload = parseJsonObject(p);
  if (!payload) {
    return jwtMessages.payloadJson;
  }
  for (const claim of ["iss", "sub"]) {
    if (payload[claim] !== undefined && typeof payload[claim] !== "string") {
      return `Jwt payload [${claim}] field is not a string`;
    }
  }
  for (const claim of ["iat", "nbf", "exp"]) {
    const v = payload[claim];
    if (v !== undefined && !(typeof v === "number" && Number.isInteger(v) && v > 0)) {
      return `Jwt payload [${claim}] field is not an integer`;
    }
  }
  const aud = payload["aud"];
  if (
    aud !== undefined &&
    typeof aud !== "string" &&
    !(Array.isArray(aud) && aud.every((a) => typeof a === "string"))
  ) {
    return "Jwt payload [aud] field is not a string or string list";
  }
  if (!isBase64url(s) || s === "") {
    return jwtMessages.signatureBase64;
  }
  return { header, payload, payloadSegment: p };
}

function parseJsonObject(segment: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(Buffer.from(segment, "base64url").toString("utf8"));
    return typeof value === "object" && value !== null && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : undefined;
  } catch {
    return undefined;
  }
}

/** Request data the extractor reads. Header names are lowercase. */
export interface TokenSource {
  header(name: string): string | string[] | undefined;
  query(name: string): string[];
}

/**
 * Every token in the provider's locations (Envoy's extractor): for a header
 * with a prefix, the prefix is searched anywhere in the value and the token
 * runs from there over token characters; a header without the prefix yields
 * nothing, one with the prefix but no token characters after it yields its
 * whole value (which then fails verification, as in Envoy: a junk credential
 * is refused, not ignored). Duplicates are dropped.
 */
export function extractTokens(locations: readonly JwtLocation[], source: TokenSource): string[] {
  const found = new Set<string>();
  for (const location of locations) {
    if ("query" in location) {
      for (const value of source.query(location.query)) {
        if (value !== "") {
          found.add(value);
        }
      }
      continue;
    }
    const raw = source.header(location.header);
    for (const value of Array.isArray(raw) ? raw : raw === undefined ? [] : [raw]) {
      if (location.valuePrefix === "") {
        const token = value.trim();
        if (token !== "") {
          found.add(token);
        }
        continue;
      }
      const at = value.indexOf(location.valuePrefix);
      if (at < 0) {
        continue;
      }
      let start = at + location.valuePrefix.length;
      while (start < value.length && !tokenChars.test(value.charAt(start))) {
        start++;
      }
      let end = start;
      while (end < value.length && tokenChars.test(value.charAt(end))) {
        end++;
      }
      found.add(end > start ? value.slice(start, end) : value);
    }
  }
  return [...found];
}

export interface JwtAuthnOptions {
  /** Providers of the API config; a key set is made for each. */
  providers: readonly ProviderPlan[];
  /** Resolved JWKS URI per provider id (after OIDC discovery where needed). */
  jwksUris: ReadonlyMap<string, string>;
  /** Verified tokens remembered per provider. Default 1 000 (ESPv2's jwt_cache_size). */
  cacheSize?: number;
  /** Refetch the keys when a token names an unknown `kid` (with a cooldown). Default true. */
  refetchOnUnknownKid?: boolean;
  /** Clock, for tests. */
  now?: () => number;
}

interface ProviderState {
  plan: ProviderPlan;
  keys: RemoteKeySet;
  /** token → payload, for tokens whose signature checked out. */
  verified: VerifiedTokenCache<true>;
}

/** The JWT step of the gateway chain. */
export interface JwtAuthn {
  authenticate(auth: AuthPlan, source: TokenSource): Promise<JwtResult>;
  /** Fetches every provider's keys once (ESPv2 waits for the first fetch before listening). */
  warm(): Promise<void>;
  /** Key sets, for status reporting and tests. */
  keySets(): ReadonlyMap<string, RemoteKeySet>;
  close(): void;
}

export function createJwtAuthn(options: JwtAuthnOptions): JwtAuthn {
  const now = options.now ?? (() => Date.now());
  const states = new Map<string, ProviderState>();
  for (const plan of options.providers) {
    const uri = options.jwksUris.get(plan.id) ?? plan.jwksUri;
    if (!uri) {
      throw new TypeError(`provider ${plan.id} has no JWKS URI (run discovery first)`);
    }
    states.set(plan.id, {
      plan,
      keys: createRemoteKeySet({
        url: uri,
        refetchOnUnknownKid: options.refetchOnUnknownKid ?? true,
      }),
      verified: createVerifiedTokenCache<true>({ maxEntries: options.cacheSize ?? 1000 }),
    });
  }

  async function verifyOne(
    state: ProviderState,
    audiences: readonly string[],
    token: string,
  ): Promise<JwtResult> {
    const fail = (httpStatus: 401 | 403, message: string): JwtFailure => ({
      ok: false,
      httpStatus,
      message,
      provider: state.plan.id,
    });
    const parsed = parseJwt(token);
    if (typeof parsed === "string") {
      return fail(401, parsed);
    }
    const { payload } = parsed;
    if (payload["iss"] !== state.plan.issuer) {
      return fail(401, jwtMessages.unknownIssuer);
    }
    const nowSeconds = Math.floor(now() / 1000);
    const nbf = payload["nbf"] as number | undefined;
    const exp = payload["exp"] as number | undefined;
    if (nbf !== undefined && nowSeconds + clockSkewSeconds < nbf) {
      return fail(401, jwtMessages.notYetValid);
    }
    // ESPv2 accepts a token without `exp` (valid forever); we refuse it.
    if (exp === undefined) {
      return fail(401, jwtMessages.expMissing);
    }
    if (nowSeconds > exp + clockSkewSeconds) {
      return fail(401, jwtMessages.expired);
    }
    const aud = payload["aud"] as string | string[] | undefined;
    if (aud === undefined || !audienceMatches(aud, audiences)) {
      return fail(403, jwtMessages.audience);
    }
    const success: JwtSuccess = {
      ok: true,
      payload,
      payloadSegment: parsed.payloadSegment,
      provider: state.plan.id,
    };
    // Issuer, time and audience are checked above on every request; the
    // cache only saves the key lookup and the signature check.
    if (state.verified.get(token, now()) === true) {
      return success;
    }
    try {
      await compactVerify(token, state.keys, { algorithms: supportedAlgorithms });
    } catch (err) {
      if (isKeySetUnavailable(err)) {
        return fail(401, jwtMessages.jwksFetch);
      }
      if (isNoMatchingKey(err) || err instanceof errors.JWKSMultipleMatchingKeys) {
        return fail(401, jwtMessages.noKey);
      }
      return fail(401, jwtMessages.signature);
    }
    state.verified.set(token, true, (exp + clockSkewSeconds) * 1000);
    return success;
  }

  return {
    async authenticate(auth, source) {
      let last: JwtFailure | undefined;
      let anyToken = false;
      for (const requirement of auth.requirements) {
        const state = states.get(requirement.provider.id);
        if (!state) {
          continue;
        }
        const tokens = extractTokens(requirement.provider.locations, source);
        if (tokens.length === 0) {
          last = {
            ok: false,
            httpStatus: 401,
            message: jwtMessages.missing,
            provider: requirement.provider.id,
          };
          continue;
        }
        anyToken = true;
        // Every token found must verify (Envoy's authenticator).
        let result: JwtResult | undefined;
        for (const token of tokens) {
          result = await verifyOne(state, requirement.audiences, token);
          if (!result.ok) {
            break;
          }
        }
        if (result?.ok) {
          return result;
        }
        last = result as JwtFailure;
      }
      if (!anyToken && auth.allowWithoutCredential) {
        return { ok: true, payload: undefined, payloadSegment: undefined, provider: undefined };
      }
      return (
        last ?? { ok: false, httpStatus: 401, message: jwtMessages.missing, provider: undefined }
      );
    },
    async warm() {
      await Promise.all([...states.values()].map((s) => s.keys.warm()));
    },
    keySets() {
      return new Map([...states].map(([id, s]) => [id, s.keys]));
    },
    close() {
      for (const s of states.values()) {
        s.keys.close();
      }
    },
  };
}

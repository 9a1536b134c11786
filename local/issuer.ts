/**
 * A local stand-in for Google's OIDC issuer: it signs Google-shaped ID tokens
 * and serves what verifiers and google-auth-library fetch from Google —
 * discovery, the JWKS (`/oauth2/v3/certs`), the X.509 map (`/oauth2/v1/certs`),
 * the OAuth token endpoint for service-account keys and the IAM Credentials
 * `generateIdToken` endpoint for impersonation. A real HTTP server on loopback;
 * nothing in it is mocked.
 */
import {
  createHash,
  createHmac,
  KeyObject,
  randomBytes,
  sign as rsaSign,
  verify as rsaVerify,
  type webcrypto,
} from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { exportJWK, exportPKCS8, generateKeyPair, type JWK } from "jose";
import type { Logger } from "pino";

/** The `iss` of Google ID tokens, as Cloud Run and API Gateway expect it. */
export const googleIssuer = "https://accounts.google.com";
/** Where google-auth-library posts service-account assertions (hard-coded there). */
export const googleTokenUrl = "https://oauth2.googleapis.com/token";

/** Paths served, matching Google's. */
export const issuerPaths = {
  discovery: "/.well-known/openid-configuration",
  jwks: "/oauth2/v3/certs",
  x509: "/oauth2/v1/certs",
  token: "/token",
} as const;

const jwtBearerGrant = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/** What Cloud Run puts in place of the signature after its IAM check. */
export const signatureRemovedByGoogle = "SIGNATURE_REMOVED_BY_GOOGLE";

export interface IssuerOptions {
  /** TCP port; default 0 (any free port). */
  port?: number;
  /** Listen address; default "127.0.0.1" (loopback only). */
  host?: string;
  /** `iss` of minted tokens and `issuer` in discovery; default {@link googleIssuer}. */
  issuer?: string;
  /** Lifetime of minted ID tokens in seconds; default 3600, as Google's. */
  tokenLifetimeSeconds?: number;
  /** Lifetime of access tokens in seconds; default 3599, as the metadata server reports. */
  accessTokenLifetimeSeconds?: number;
  /** `project_id` written into service-account key files when the email does not name one. */
  projectId?: string;
  /**
   * Whether the holder of an access token for `caller` may mint tokens as
   * `target` through `generateIdToken` (Google's "Service Account Token
   * Creator" role). Default: everyone may.
   */
  canImpersonate?: (caller: string, target: string) => boolean;
  /** Logs one debug line per request when given. */
  logger?: Logger;
}

/**
 * Claims of a token to mint. Missing claims get Google's defaults (see
 * {@link Issuer.sign}); a claim set to `undefined` is left out of the token.
 */
export type TokenClaims = Record<string, unknown>;

/** How to sign a token; every field exists to build a negative test. */
export interface SignOptions {
  /**
   * Signing algorithm. "RS256" (default) with the issuer's key; "HS256" with
   * `hmacSecret` (the classic key-confusion attack); "none" leaves the
   * signature empty.
   */
  alg?: "RS256" | "HS256" | "none";
  /** Which published key signs: "current" (default) or "previous" (after a rotation). */
  key?: "current" | "previous";
  /** HS256 secret. Default: the current public key as SPKI PEM text. */
  hmacSecret?: string | Uint8Array;
  /**
   * Header fields merged over the defaults `{alg, kid, typ: "JWT"}`; a field
   * set to `undefined` is removed (e.g. `{kid: undefined}`), so the header can
   * lie about `alg` or name an unknown `kid`.
   */
  header?: Record<string, unknown>;
  /**
   * What ends up in the signature segment: "valid" (default), "corrupt" (one
   * byte flipped), "removed" (`SIGNATURE_REMOVED_BY_GOOGLE`, as Cloud Run
   * forwards it) or "empty".
   */
  signature?: "valid" | "corrupt" | "removed" | "empty";
  /** `iat` in epoch seconds; default now. */
  nowSeconds?: number;
  /** `exp` − `iat` in seconds; default the issuer's `tokenLifetimeSeconds`. */
  lifetimeSeconds?: number;
}

/** A service-account key file, as google-auth-library and gcloud read it. */
export interface ServiceAccountKey {
  type: "service_account";
  project_id: string;
  private_key_id: string;
  private_key: string;
  client_email: string;
  client_id: string;
  auth_uri: string;
  /**
   * This issuer's token endpoint. google-auth-library ignores the field and
   * always posts to {@link googleTokenUrl}; `client/id-token.ts` reads it.
   */
  token_uri: string;
  auth_provider_x509_cert_url: string;
  client_x509_cert_url: string;
  universe_domain: string;
}

/** An OAuth access token as the metadata server and token endpoint answer it. */
export interface AccessTokenResponse {
  access_token: string;
  /** Seconds until expiry. */
  expires_in: number;
  token_type: "Bearer";
}

export interface Issuer {
  /** Base URL, e.g. `http://127.0.0.1:41234`. */
  readonly url: string;
  /** The `iss` minted tokens carry. */
  readonly issuer: string;
  /** `<url>/oauth2/v3/certs`. */
  readonly jwksUri: string;
  /** `<url>/oauth2/v1/certs`. */
  readonly x509Uri: string;
  /** `<url>/token`. */
  readonly tokenUri: string;
  /** `kid` of the key that signs by default. */
  readonly currentKid: string;
  /** `kid`s published, current first (at most two, as Google publishes). */
  publishedKids(): string[];
  /**
   * Makes a new key current. The previous current key stays published (and
   * can still sign with `{key: "previous"}`); the one before it is dropped.
   * Returns the new `kid`.
   */
  rotate(): Promise<string>;
  /**
   * Mints a token. Defaults, as in Google's service-account ID tokens:
   * `iss` = the issuer, `iat` = now, `exp` = iat + lifetime, and when `email`
   * is given `sub` = its stable numeric id, `azp` = `sub`,
   * `email_verified` = true. `aud` has no default.
   */
  sign(claims: TokenClaims, options?: SignOptions): Promise<string>;
  /**
   * Mints the ID token Google would issue to service account `email` for
   * `audience`. `includeEmail` (default true) adds `email`/`email_verified`;
   * `azp` is the numeric id unless `azp: "email"` (impersonation's
   * `useEmailAzp`, the key-file flow).
   */
  mintIdToken(
    email: string,
    audience: string,
    options?: { includeEmail?: boolean; azp?: "sub" | "email"; lifetimeSeconds?: number },
  ): Promise<string>;
  /** The stable 21-digit numeric id Google would give `email` (`sub`, `client_id`). */
  subjectFor(email: string): string;
  /**
   * Creates a new key for service account `email`, remembers its public half
   * (the token endpoint checks assertions against it) and returns the key file.
   */
  createServiceAccountKey(email: string): Promise<ServiceAccountKey>;
  /** Issues an opaque access token for `email`, accepted by the impersonation endpoint. */
  issueAccessToken(email: string, lifetimeSeconds?: number): AccessTokenResponse;
  /** The account an unexpired access token was issued to, or undefined. */
  accessTokenOwner(accessToken: string): string | undefined;
  /**
   * `false` makes discovery, the JWKS and the X.509 map answer 503 (the token
   * endpoints keep working): for "key server down" tests.
   */
  setAvailable(available: boolean): void;
  /** Requests received on `path` (pathname, no query) since start or `resetCounts()`. */
  requestCount(path: string): number;
  /** Requests received per pathname. */
  requestCounts(): Record<string, number>;
  resetCounts(): void;
  /** Stops listening and drops open connections. */
  close(): Promise<void>;
}

interface SigningKey {
  kid: string;
  privateKey: KeyObject;
  publicKey: KeyObject;
  jwk: JWK;
  certificatePem: string;
}

/** Starts an issuer stand-in; resolves once it listens. */
export async function createIssuer(options: IssuerOptions = {}): Promise<Issuer> {
  const host = options.host ?? "127.0.0.1";
  const issuerId = options.issuer ?? googleIssuer;
  const tokenLifetimeSeconds = options.tokenLifetimeSeconds ?? 3600;
  const accessTokenLifetimeSeconds = options.accessTokenLifetimeSeconds ?? 3599;
  const canImpersonate = options.canImpersonate ?? (() => true);
  const logger = options.logger;

  // Current key first; Google publishes two keys, so at most two are kept.
  const keys: SigningKey[] = [await createSigningKey()];
  const serviceAccountKeys = new Map<string, Map<string, KeyObject>>();
  const accessTokens = new Map<string, { email: string; expiresAtMs: number }>();
  const counts = new Map<string, number>();
  let available = true;

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      logger?.error({ err }, "issuer stand-in request failed");
      if (!res.headersSent) {
        sendJson(res, 500, { error: "internal_error" });
      } else {
        res.destroy();
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const url = `http://${urlHost(host)}:${(server.address() as AddressInfo).port}`;
  const tokenUri = `${url}${issuerPaths.token}`;

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const { pathname } = new URL(req.url ?? "/", url);
    counts.set(pathname, (counts.get(pathname) ?? 0) + 1);
    logger?.debug({ method: req.method, path: pathname }, "issuer stand-in request");

    const isKeyPath =
      pathname === issuerPaths.discovery ||
      pathname === issuerPaths.jwks ||
      pathname === issuerPaths.x509;
    if (isKeyPath) {
      if (req.method !== "GET" && req.method !== "HEAD") {
        return sendJson(res, 405, { error: "method not allowed" });
      }
      if (!available) {
        return sendJson(res, 503, { error: "unavailable (stand-in switched off)" });
      }
      // Google sends a max-age; google-auth-library's verifier refetches on
      // every call without one.
      const cache = { "cache-control": "public, max-age=300" };
      if (pathname === issuerPaths.jwks) {
        return sendJson(res, 200, { keys: keys.map((k) => k.jwk) }, cache);
      }
      if (pathname === issuerPaths.x509) {
        return sendJson(
          res,
          200,
          Object.fromEntries(keys.map((k) => [k.kid, k.certificatePem])),
          cache,
        );
      }
      return sendJson(res, 200, {
        issuer: issuerId,
        jwks_uri: `${url}${issuerPaths.jwks}`,
        token_endpoint: tokenUri,
        id_token_signing_alg_values_supported: ["RS256"],
        response_types_supported: ["id_token"],
        subject_types_supported: ["public"],
        claims_supported: ["aud", "azp", "email", "email_verified", "exp", "iat", "iss", "sub"],
      });
    }
    if (pathname === issuerPaths.token) {
      if (req.method !== "POST") {
        return sendJson(res, 405, { error: "invalid_request", error_description: "POST only" });
      }
      return handleToken(req, res);
    }
    const iam =
      /^\/v1\/projects\/-\/serviceAccounts\/([^/]+):(generateIdToken|generateAccessToken)$/.exec(
        pathname,
      );
    if (iam?.[1] && iam[2]) {
      if (req.method !== "POST") {
        return sendGoogleError(res, 405, "METHOD_NOT_ALLOWED", "POST only");
      }
      return handleImpersonation(req, res, decodeURIComponent(iam[1]), iam[2]);
    }
    return sendJson(res, 404, { error: "not found" });
  }

  /**
   * Google's `POST /token` for the jwt-bearer grant: the assertion must be
   * signed by a key of the account it names (`iss`). With `target_audience`
   * the answer is an ID token, otherwise an access token.
   */
  async function handleToken(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const form = new URLSearchParams(await readBody(req));
    const grantType = form.get("grant_type");
    if (grantType !== jwtBearerGrant) {
      return sendJson(res, 400, {
        error: "unsupported_grant_type",
        error_description: `Invalid grant_type: ${grantType ?? ""}`,
      });
    }
    const assertion = parseAssertion(form.get("assertion") ?? "");
    if (!assertion) {
      return invalidGrant(res, "Invalid JWT: malformed assertion.");
    }
    const { header, claims, signingInput, signature } = assertion;
    const email = typeof claims.iss === "string" ? claims.iss : "";
    const accountKeys = serviceAccountKeys.get(email);
    if (!accountKeys) {
      return invalidGrant(res, "Invalid grant: account not found");
    }
    if (header.alg !== "RS256") {
      return invalidGrant(res, "Invalid JWT: unsupported alg.");
    }
    // google-auth-library sends no `kid`; then any key of the account may match.
    const candidates =
      typeof header.kid === "string"
        ? [accountKeys.get(header.kid)].filter((k): k is KeyObject => k !== undefined)
        : [...accountKeys.values()];
    if (!candidates.some((k) => rsaVerify("sha256", signingInput, k, signature))) {
      return invalidGrant(res, "Invalid JWT Signature.");
    }
    if (claims.aud !== googleTokenUrl && claims.aud !== tokenUri) {
      return invalidGrant(res, "Invalid JWT: Failed audience check.");
    }
    const now = Math.floor(Date.now() / 1000);
    const { iat, exp } = claims;
    if (typeof iat !== "number" || typeof exp !== "number") {
      return invalidGrant(res, "Invalid JWT: iat and exp are required.");
    }
    if (exp <= now || iat > now + 60 || exp - iat > 3600) {
      return invalidGrant(
        res,
        "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
      );
    }
    if (typeof claims.target_audience === "string" && claims.target_audience !== "") {
      const idToken = await mintIdToken(email, claims.target_audience, { azp: "email" });
      return sendJson(res, 200, { id_token: idToken });
    }
    return sendJson(res, 200, issueAccessToken(email));
  }

  /** IAM Credentials `generateIdToken` / `generateAccessToken` for `target`. */
  async function handleImpersonation(
    req: IncomingMessage,
    res: ServerResponse,
    target: string,
    method: string,
  ): Promise<void> {
    const authorization = req.headers.authorization ?? "";
    const caller = /^Bearer\s+(\S+)$/i.exec(authorization)?.[1];
    const callerEmail = caller ? accessTokenOwner(caller) : undefined;
    if (!callerEmail) {
      await readBody(req);
      return sendGoogleError(
        res,
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token.",
      );
    }
    let body: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse((await readBody(req)) || "{}");
      body =
        typeof parsed === "object" && parsed !== null ? (parsed as Record<string, unknown>) : {};
    } catch {
      return sendGoogleError(res, 400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
    }
    if (!canImpersonate(callerEmail, target)) {
      return sendGoogleError(
        res,
        403,
        "PERMISSION_DENIED",
        "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist).",
      );
    }
    if (method === "generateAccessToken") {
      const token = issueAccessToken(target);
      return sendJson(res, 200, {
        accessToken: token.access_token,
        expireTime: new Date(Date.now() + token.expires_in * 1000).toISOString(),
      });
    }
    if (typeof body.audience !== "string" || body.audience === "") {
      return sendGoogleError(res, 400, "INVALID_ARGUMENT", "audience is required");
    }
    const token = await mintIdToken(target, body.audience, {
      includeEmail: body.includeEmail === true,
      azp: body.useEmailAzp === true ? "email" : "sub",
    });
    return sendJson(res, 200, { token });
  }

  function subjectFor(email: string): string {
    // Google's unique ids are 21 decimal digits; derive one so it is stable
    // across restarts and distinct per account.
    const digest = createHash("sha256").update(email).digest();
    return `1${(digest.readBigUInt64BE(0) % 10n ** 20n).toString().padStart(20, "0")}`;
  }

  async function sign(claims: TokenClaims, signOptions: SignOptions = {}): Promise<string> {
    const key = signOptions.key === "previous" ? keys[1] : keys[0];
    if (!key) {
      throw new Error('no previous key: call rotate() before signing with {key: "previous"}');
    }
    const alg = signOptions.alg ?? "RS256";
    const iat = signOptions.nowSeconds ?? Math.floor(Date.now() / 1000);
    const email = typeof claims.email === "string" ? claims.email : undefined;
    const sub = email ? subjectFor(email) : undefined;
    const payload = dropUndefined({
      iss: issuerId,
      azp: sub,
      sub,
      email_verified: email ? true : undefined,
      iat,
      exp: iat + (signOptions.lifetimeSeconds ?? tokenLifetimeSeconds),
      ...claims,
    });
    const header = dropUndefined({
      alg,
      kid: alg === "none" ? undefined : key.kid,
      typ: "JWT",
      ...signOptions.header,
    });
    const signingInput = `${base64url(JSON.stringify(header))}.${base64url(JSON.stringify(payload))}`;
    let signature: Buffer;
    if (alg === "none") {
      signature = Buffer.alloc(0);
    } else if (alg === "HS256") {
      const secret =
        signOptions.hmacSecret ?? key.publicKey.export({ type: "spki", format: "pem" }).toString();
      signature = createHmac("sha256", secret).update(signingInput).digest();
    } else {
      signature = rsaSign("sha256", Buffer.from(signingInput), key.privateKey);
    }
    switch (signOptions.signature ?? "valid") {
      case "corrupt": {
        const corrupted = Buffer.from(signature.length > 0 ? signature : Buffer.alloc(1));
        corrupted[corrupted.length >> 1] = (corrupted[corrupted.length >> 1] ?? 0) ^ 0x01;
        return `${signingInput}.${corrupted.toString("base64url")}`;
      }
      case "removed":
        return `${signingInput}.${signatureRemovedByGoogle}`;
      case "empty":
        return `${signingInput}.`;
      default:
        return `${signingInput}.${signature.toString("base64url")}`;
    }
  }

  function mintIdToken(
    email: string,
    audience: string,
    mintOptions: { includeEmail?: boolean; azp?: "sub" | "email"; lifetimeSeconds?: number } = {},
  ): Promise<string> {
    const includeEmail = mintOptions.includeEmail ?? true;
    const sub = subjectFor(email);
    return sign(
      {
        aud: audience,
        azp: mintOptions.azp === "email" ? email : sub,
        sub,
        email: includeEmail ? email : undefined,
        email_verified: includeEmail ? true : undefined,
      },
      mintOptions.lifetimeSeconds === undefined
        ? {}
        : { lifetimeSeconds: mintOptions.lifetimeSeconds },
    );
  }

  async function createServiceAccountKey(email: string): Promise<ServiceAccountKey> {
    const { privateKey, publicKey } = await generateKeyPair("RS256", { extractable: true });
    const publicKeyObject = toKeyObject(publicKey);
    const keyId = createHash("sha1")
      .update(publicKeyObject.export({ type: "spki", format: "der" }))
      .digest("hex");
    let accountKeys = serviceAccountKeys.get(email);
    if (!accountKeys) {
      accountKeys = new Map();
      serviceAccountKeys.set(email, accountKeys);
    }
    accountKeys.set(keyId, publicKeyObject);
    const projectFromEmail = /^[^@]+@([^.]+)\.iam\.gserviceaccount\.com$/.exec(email)?.[1];
    return {
      type: "service_account",
      project_id: projectFromEmail ?? options.projectId ?? "stand-in-project",
      private_key_id: keyId,
      private_key: await exportPKCS8(privateKey),
      client_email: email,
      client_id: subjectFor(email),
      auth_uri: "https://accounts.google.com/o/oauth2/auth",
      token_uri: tokenUri,
      auth_provider_x509_cert_url: "https://www.googleapis.com/oauth2/v1/certs",
      client_x509_cert_url: `https://www.googleapis.com/robot/v1/metadata/x509/${encodeURIComponent(email)}`,
      universe_domain: "googleapis.com",
    };
  }

  function issueAccessToken(email: string, lifetimeSeconds?: number): AccessTokenResponse {
    const expiresIn = lifetimeSeconds ?? accessTokenLifetimeSeconds;
    const now = Date.now();
    // Drop expired tokens so a long-running stand-in does not grow forever.
    for (const [token, entry] of accessTokens) {
      if (entry.expiresAtMs <= now) {
        accessTokens.delete(token);
      }
    }
    const accessToken = `ya29.stand-in.${randomBytes(24).toString("base64url")}`;
    accessTokens.set(accessToken, { email, expiresAtMs: now + expiresIn * 1000 });
    return { access_token: accessToken, expires_in: expiresIn, token_type: "Bearer" };
  }

  function accessTokenOwner(accessToken: string): string | undefined {
    const entry = accessTokens.get(accessToken);
    return entry && entry.expiresAtMs > Date.now() ? entry.email : undefined;
  }

  return {
    url,
    issuer: issuerId,
    jwksUri: `${url}${issuerPaths.jwks}`,
    x509Uri: `${url}${issuerPaths.x509}`,
    tokenUri,
    get currentKid() {
      return (keys[0] as SigningKey).kid;
    },
    publishedKids: () => keys.map((k) => k.kid),
    async rotate() {
      const key = await createSigningKey();
      keys.unshift(key);
      keys.length = Math.min(keys.length, 2);
      return key.kid;
    },
    sign,
    mintIdToken,
    subjectFor,
    createServiceAccountKey,
    issueAccessToken,
    accessTokenOwner,
    setAvailable(value) {
      available = value;
    },
    requestCount: (path) => counts.get(path) ?? 0,
    requestCounts: () => Object.fromEntries(counts),
    resetCounts() {
      counts.clear();
    },
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

async function createSigningKey(): Promise<SigningKey> {
  const pair = await generateKeyPair("RS256", { extractable: true });
  const privateKey = toKeyObject(pair.privateKey);
  const publicKey = toKeyObject(pair.publicKey);
  const spki = publicKey.export({ type: "spki", format: "der" });
  // Google's kids are 40 hex digits; a SHA-1 of the key gives the same shape.
  const kid = createHash("sha1").update(spki).digest("hex");
  const jwk = { ...(await exportJWK(pair.publicKey)), kid, alg: "RS256", use: "sig" };
  const certificatePem = selfSignedCertificatePem(spki, privateKey);
  return { kid, privateKey, publicKey, jwk, certificatePem };
}

/** jose hands out Web Crypto keys; node:crypto signs with KeyObjects. */
function toKeyObject(key: unknown): KeyObject {
  return KeyObject.from(key as webcrypto.CryptoKey);
}

// --- X.509 ----------------------------------------------------------------
//
// Node can parse certificates (X509Certificate) but not create them, and the
// maintained npm packages that can (@peculiar/x509, node-forge) are large for
// one self-signed certificate. So the DER below is written by hand with a
// minimal ASN.1 writer, following RFC 5280 §4.1: a v3 certificate, signed
// sha256WithRSAEncryption by its own key, with the extensions Google's
// federated-signon certificates carry (CA:FALSE, digitalSignature, clientAuth).

function derLength(length: number): Buffer {
  if (length < 0x80) {
    return Buffer.from([length]);
  }
  const bytes: number[] = [];
  for (let n = length; n > 0; n >>>= 8) {
    bytes.unshift(n & 0xff);
  }
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

function der(tag: number, ...content: Buffer[]): Buffer {
  const body = Buffer.concat(content);
  return Buffer.concat([Buffer.from([tag]), derLength(body.length), body]);
}

const derSequence = (...content: Buffer[]): Buffer => der(0x30, ...content);
const derSet = (...content: Buffer[]): Buffer => der(0x31, ...content);
const derNull = Buffer.from([0x05, 0x00]);
const derTrue = Buffer.from([0x01, 0x01, 0xff]);
const derOctetString = (content: Buffer): Buffer => der(0x04, content);
const derBitString = (content: Buffer, unusedBits = 0): Buffer =>
  der(0x03, Buffer.from([unusedBits]), content);
const derExplicit = (tagNumber: number, content: Buffer): Buffer => der(0xa0 | tagNumber, content);

/** A non-negative INTEGER from its big-endian magnitude. */
function derUnsignedInteger(magnitude: Buffer): Buffer {
  let start = 0;
  while (start < magnitude.length - 1 && magnitude[start] === 0) {
    start++;
  }
  const trimmed = magnitude.subarray(start);
  // A leading 1 bit would make the value negative in two's complement.
  const needsPad = ((trimmed[0] ?? 0) & 0x80) !== 0;
  return der(0x02, needsPad ? Buffer.concat([Buffer.from([0]), trimmed]) : trimmed);
}

function derOid(oid: string): Buffer {
  const [first = 0, second = 0, ...rest] = oid.split(".").map(Number);
  const bytes = [first * 40 + second];
  for (const arc of rest) {
    const chunk = [arc & 0x7f];
    for (let n = arc >>> 7; n > 0; n >>>= 7) {
      chunk.unshift((n & 0x7f) | 0x80);
    }
    bytes.push(...chunk);
  }
  return der(0x06, Buffer.from(bytes));
}

/** UTCTime until 2049, GeneralizedTime after, as RFC 5280 §4.1.2.5 requires. */
function derTime(date: Date): Buffer {
  const iso = date.toISOString(); // 2026-01-02T03:04:05.678Z
  const digits = `${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}${iso.slice(11, 13)}${iso.slice(14, 16)}${iso.slice(17, 19)}Z`;
  return date.getUTCFullYear() < 2050
    ? der(0x17, Buffer.from(digits.slice(2), "ascii"))
    : der(0x18, Buffer.from(digits, "ascii"));
}

function derName(commonName: string): Buffer {
  return derSequence(derSet(derSequence(derOid("2.5.4.3"), der(0x0c, Buffer.from(commonName)))));
}

function derExtension(oid: string, critical: boolean, value: Buffer): Buffer {
  return critical
    ? derSequence(derOid(oid), derTrue, derOctetString(value))
    : derSequence(derOid(oid), derOctetString(value));
}

/** A self-signed certificate for `spki`, PEM-encoded with a trailing newline. */
function selfSignedCertificatePem(spki: Buffer, privateKey: KeyObject): string {
  const sha256WithRsa = derSequence(derOid("1.2.840.113549.1.1.11"), derNull);
  const serial = randomBytes(16);
  serial[0] = ((serial[0] ?? 0) & 0x7f) | 0x01;
  const name = derName("federated-signon.system.gserviceaccount.com");
  const now = Date.now();
  const tbs = derSequence(
    derExplicit(0, der(0x02, Buffer.from([2]))), // version v3
    derUnsignedInteger(serial),
    sha256WithRsa,
    name,
    derSequence(derTime(new Date(now - 3_600_000)), derTime(new Date(now + 14 * 86_400_000))),
    name,
    spki,
    derExplicit(
      3,
      derSequence(
        derExtension("2.5.29.19", true, derSequence()), // basicConstraints: CA false
        derExtension("2.5.29.15", true, derBitString(Buffer.from([0x80]), 7)), // digitalSignature
        derExtension("2.5.29.37", false, derSequence(derOid("1.3.6.1.5.5.7.3.2"))), // clientAuth
      ),
    ),
  );
  const signature = rsaSign("sha256", tbs, privateKey);
  const certificate = derSequence(tbs, sha256WithRsa, derBitString(signature));
  const lines = certificate.toString("base64").match(/.{1,64}/g) ?? [];
  return `-----BEGIN CERTIFICATE-----\n${lines.join("\n")}\n-----END CERTIFICATE-----\n`;
}

// --- HTTP helpers -----------------------------------------------------------

const maxBodyBytes = 1 << 20;

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > maxBodyBytes) {
      throw new Error("request body too large");
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks).toString("utf8");
}

function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

/** Google API error shape (`google.rpc.Status` as JSON). */
function sendGoogleError(res: ServerResponse, code: number, status: string, message: string): void {
  sendJson(res, code, { error: { code, message, status } });
}

function invalidGrant(res: ServerResponse, description: string): void {
  sendJson(res, 400, { error: "invalid_grant", error_description: description });
}

function parseAssertion(assertion: string):
  | {
      header: Record<string, unknown>;
      claims: Record<string, unknown>;
      signingInput: Buffer;
      signature: Buffer;
    }
  | undefined {
  const parts = assertion.split(".");
  if (parts.length !== 3) {
    return undefined;
  }
  const [headerPart = "", payloadPart = "", signaturePart = ""] = parts;
  try {
    const header: unknown = JSON.parse(Buffer.from(headerPart, "base64url").toString("utf8"));
    const claims: unknown = JSON.parse(Buffer.from(payloadPart, "base64url").toString("utf8"));
    if (!isRecord(header) || !isRecord(claims)) {
      return undefined;
    }
    return {
      header,
      claims,
      signingInput: Buffer.from(`${headerPart}.${payloadPart}`),
      signature: Buffer.from(signaturePart, "base64url"),
    };
  } catch {
    return undefined;
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function dropUndefined(record: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(record).filter(([, v]) => v !== undefined));
}

function base64url(text: string): string {
  return Buffer.from(text, "utf8").toString("base64url");
}

/** The host part of a URL for a listen address (wildcards become loopback). */
export function urlHost(host: string): string {
  if (host === "0.0.0.0" || host === "::" || host === "") {
    return "127.0.0.1";
  }
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * Signing keys for Google ID tokens, fetched from a URL and cached: the one
 * key-fetching module shared by the server's verifier and the gateway.
 *
 * jose's `createRemoteJWKSet` almost fits, but it reads only JWKS documents,
 * fails every request once its cache is older than `cacheMaxAge` and the
 * refetch fails (no stale-while-error), and gives no way to tell "the key
 * server is down and nothing is cached" from "no key matches this token". The
 * gateway must tell those apart (ESPv2 answers `Jwks remote fetch is failed`
 * for the first and `Jwks doesn't have key to match kid or alg from Jwt` for
 * the second), and Google publishes its keys in two formats. So fetching and
 * caching are written here, over jose's `createLocalJWKSet` for key selection
 * and import, and node:crypto's X509Certificate for the certificate format.
 */
import { X509Certificate } from "node:crypto";
import {
  createLocalJWKSet,
  type CryptoKey,
  errors,
  type FlattenedJWSInput,
  flattenedVerify,
  type JSONWebKeySet,
  type JWK,
  type JWSHeaderParameters,
} from "jose";

/** Stable error codes raised by a {@link RemoteKeySet}. */
export const keySetErrorCodes = {
  /**
   * No usable keys could be obtained and none are cached: network error,
   * timeout, non-200 answer, or a body that is neither a JWKS nor an X.509 map.
   */
  fetch: "ERR_JWKS_FETCH",
  /** Keys are cached, but none matches the token's `kid` and `alg` (jose's code). */
  noMatchingKey: "ERR_JWKS_NO_MATCHING_KEY",
} as const;

/**
 * The key set could not be fetched and no earlier keys are cached. `cause`
 * holds the underlying error (a `TypeError` from fetch, jose's `JWKSTimeout`
 * or `JWKSInvalid`, …).
 */
export class JWKSFetchFailed extends errors.JOSEError {
  static override code = keySetErrorCodes.fetch;
  override code = keySetErrorCodes.fetch;
  /** The URL that was fetched. */
  readonly url: string;
  /** HTTP status of the failed answer, when there was one. */
  readonly status: number | undefined;

  constructor(message: string, url: string, status?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.url = url;
    this.status = status;
  }
}

/**
 * True when `err` means "no keys to verify with" (the key server is down or
 * broken and nothing is cached): callers answer Unavailable rather than
 * blaming the token.
 */
export function isKeySetUnavailable(err: unknown): boolean {
  return err instanceof errors.JOSEError && err.code === keySetErrorCodes.fetch;
}

/** True when keys are cached but none fits the token's `kid`/`alg`. */
export function isNoMatchingKey(err: unknown): boolean {
  return err instanceof errors.JOSEError && err.code === keySetErrorCodes.noMatchingKey;
}

export interface RemoteKeySetOptions {
  /**
   * URL serving either a JWKS (`{"keys": […]}`, like
   * `https://www.googleapis.com/oauth2/v3/certs`) or Google's X.509 map
   * (`{"<kid>": "-----BEGIN CERTIFICATE-----…"}`, like
   * `https://www.googleapis.com/oauth2/v1/certs`). The format is detected per
   * answer.
   */
  url: string | URL;
  /**
   * How long fetched keys count as fresh, in milliseconds. Default 300 000
   * (5 min), what API Gateway documents ("caches the JWKS for five minutes").
   */
  cacheMaxAgeMs?: number;
  /**
   * How long before the cache expires a background refresh starts, in
   * milliseconds, so requests never wait for a refetch. Default 5 000 (ESPv2
   * refetches every 295 s of a 300 s cache); clamped below `cacheMaxAgeMs`.
   */
  refreshAheadMs?: number;
  /**
   * Minimum time between two refetches caused by a token whose `kid` is not
   * cached, in milliseconds. Default 30 000 (jose's `cooldownDuration`). Keeps a
   * stream of forged `kid`s from turning into a stream of fetches.
   */
  cooldownMs?: number;
  /**
   * Whether an unknown `kid` may trigger a refetch at all. Default true (picks
   * up a rotated key at once). ESPv2 never refetches on an unknown `kid`; the
   * gateway sets false to behave the same.
   */
  refetchOnUnknownKid?: boolean;
  /**
   * Timeout of one fetch, headers and body, in milliseconds. Default 5 000
   * (jose's `timeoutDuration`).
   */
  timeoutMs?: number;
  /**
   * After a failed fetch, wait this long before the next one, in
   * milliseconds; doubles on each further failure up to `cooldownMs`. With
   * nothing cached, requests within this window fail at once with the last
   * error instead of each waiting on the dead server. Default 1 000 (ESPv2
   * retries a failed JWKS fetch after 1 s).
   */
  retryAfterErrorMs?: number;
  /** Extra request headers, e.g. `user-agent`. */
  headers?: Record<string, string>;
}

/** What a {@link RemoteKeySet} currently holds; for logs, health checks and tests. */
export interface KeySetStatus {
  url: string;
  /** Whether any keys are cached (possibly stale). */
  hasKeys: boolean;
  /** `kid`s of the cached keys. */
  kids: string[];
  /** Format of the last good answer. */
  format: "jwks" | "x509" | undefined;
  /** Whether the cached keys are younger than `cacheMaxAgeMs`. */
  fresh: boolean;
  /** `Date.now()` of the last successful fetch. */
  fetchedAtMs: number | undefined;
  /** Code and message of the last failed fetch, cleared by the next success. */
  lastError: { code: string; message: string } | undefined;
  /** Fetches attempted so far, successful or not. */
  fetchCount: number;
}

/**
 * A jose key function (pass it to `jwtVerify`) backed by a cached remote key
 * set. Throws jose's `JWKSNoMatchingKey` (`ERR_JWKS_NO_MATCHING_KEY`) when no
 * cached key fits, and {@link JWKSFetchFailed} (`ERR_JWKS_FETCH`) when keys
 * could not be fetched and none are cached.
 */
export interface RemoteKeySet {
  (protectedHeader?: JWSHeaderParameters, token?: FlattenedJWSInput): Promise<CryptoKey>;
  /** The URL keys are fetched from. */
  readonly url: string;
  /**
   * Fetches now (sharing a fetch already in flight). Rejects with
   * {@link JWKSFetchFailed} on failure; cached keys are kept either way.
   */
  reload(): Promise<void>;
  /**
   * Fetches once if nothing was fetched yet and resolves true when keys are
   * cached afterwards; never rejects. Lets a server warm the cache before it
   * listens, as ESPv2 does.
   */
  warm(): Promise<boolean>;
  status(): KeySetStatus;
  /** Stops background refreshes. The key set keeps answering from its cache. */
  close(): void;
}

type LocalKeySet = ReturnType<typeof createLocalJWKSet>;

interface CachedKeys {
  local: LocalKeySet;
  kids: string[];
  format: "jwks" | "x509";
  fetchedAtMs: number;
}

const certificatePrefix = "-----BEGIN CERTIFICATE-----";

/**
 * Turns one answer body into a JWKS. Google's X.509 map becomes JWKs with the
 * map key as `kid` and no `alg`, as ESPv2 does (jose then allows any `alg`
 * matching the key type). Throws jose's `JWKSInvalid` for anything else.
 */
export function toJsonWebKeySet(body: unknown): { jwks: JSONWebKeySet; format: "jwks" | "x509" } {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new errors.JWKSInvalid("key set is not a JSON object");
  }
  if ("keys" in body) {
    const keys = (body as { keys: unknown }).keys;
    if (!Array.isArray(keys) || keys.some((k) => typeof k !== "object" || k === null)) {
      throw new errors.JWKSInvalid('"keys" is not an array of JWK objects');
    }
    return { jwks: { keys: keys as JWK[] }, format: "jwks" };
  }
  const entries = Object.entries(body);
  // ESPv2's rule: the body is an X.509 map only if every value is a PEM
  // certificate; an empty object is neither format.
  if (
    entries.length === 0 ||
    entries.some(([, v]) => typeof v !== "string" || !v.trimStart().startsWith(certificatePrefix))
  ) {
    throw new errors.JWKSInvalid("body is neither a JWKS nor a map of X.509 certificates");
  }
  const keys: JWK[] = entries.map(([kid, pem]) => {
    try {
      const jwk = new X509Certificate(pem as string).publicKey.export({ format: "jwk" });
      return { ...(jwk as JWK), kid, use: "sig" };
    } catch (cause) {
      throw new errors.JWKSInvalid(`certificate for kid "${kid}" cannot be parsed`, { cause });
    }
  });
  return { jwks: { keys }, format: "x509" };
}

function describeFetchError(err: unknown, timeoutMs: number): string {
  if (err instanceof Error && (err.name === "TimeoutError" || err.name === "AbortError")) {
    return `timed out after ${timeoutMs} ms`;
  }
  // undici puts the system error (ECONNREFUSED, …) in `cause`.
  const cause = err instanceof Error ? (err.cause as { code?: unknown } | undefined) : undefined;
  if (cause && typeof cause.code === "string") {
    return cause.code;
  }
  return err instanceof Error ? err.message : String(err);
}

/**
 * Creates a {@link RemoteKeySet}. Behaviour, in order of a request:
 *
 * - nothing cached: fetch and wait (one fetch shared by concurrent callers);
 *   on failure throw {@link JWKSFetchFailed}, and for `retryAfterErrorMs`
 *   keep throwing it without fetching;
 * - keys cached: answer from the cache, even when stale or when the last
 *   refresh failed (stale-while-error: a key server outage does not stop
 *   verification of tokens signed by known keys);
 * - no cached key fits the token: refetch once (if `refetchOnUnknownKid` and
 *   the last fetch is older than `cooldownMs`), then throw jose's
 *   `JWKSNoMatchingKey`;
 * - several keys fit (a token without `kid`): the one whose signature checks
 *   out is returned, as ESPv2 tries every key.
 *
 * After the first fetch a timer refreshes the keys `refreshAheadMs` before
 * they expire and retries failures with backoff. The timer is unref'd, so it
 * never keeps the process alive; `close()` stops it.
 */
export function createRemoteKeySet(options: RemoteKeySetOptions): RemoteKeySet {
  const url = new URL(options.url).href;
  const cacheMaxAgeMs = nonNegative(options.cacheMaxAgeMs, 300_000, "cacheMaxAgeMs");
  const refreshAheadMs = Math.min(
    nonNegative(options.refreshAheadMs, 5_000, "refreshAheadMs"),
    cacheMaxAgeMs / 2,
  );
  const cooldownMs = nonNegative(options.cooldownMs, 30_000, "cooldownMs");
  const timeoutMs = nonNegative(options.timeoutMs, 5_000, "timeoutMs");
  const retryAfterErrorMs = nonNegative(options.retryAfterErrorMs, 1_000, "retryAfterErrorMs");
  const refetchOnUnknownKid = options.refetchOnUnknownKid ?? true;
  const headers = new Headers(options.headers);
  if (!headers.has("accept")) {
    headers.set("accept", "application/json, application/jwk-set+json");
  }

  let cached: CachedKeys | undefined;
  let inflight: Promise<void> | undefined;
  let lastAttemptAtMs: number | undefined;
  let lastError: JWKSFetchFailed | undefined;
  let consecutiveFailures = 0;
  let fetchCount = 0;
  let timer: NodeJS.Timeout | undefined;
  let closed = false;

  async function fetchOnce(): Promise<CachedKeys> {
    let response: Response;
    try {
      response = await fetch(url, {
        headers,
        // A redirect would move trust to another origin: treat it as a failure.
        redirect: "manual",
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw new JWKSFetchFailed(
        `GET ${url} failed: ${describeFetchError(err, timeoutMs)}`,
        url,
        undefined,
        {
          cause: err,
        },
      );
    }
    if (response.status !== 200) {
      await response.body?.cancel();
      throw new JWKSFetchFailed(
        `GET ${url} answered HTTP ${response.status}`,
        url,
        response.status,
      );
    }
    let body: unknown;
    try {
      body = await response.json();
    } catch (err) {
      const reason =
        err instanceof Error && err.name === "TimeoutError"
          ? `timed out after ${timeoutMs} ms`
          : "body is not JSON";
      throw new JWKSFetchFailed(`GET ${url}: ${reason}`, url, 200, { cause: err });
    }
    try {
      const { jwks, format } = toJsonWebKeySet(body);
      return {
        local: createLocalJWKSet(jwks),
        kids: jwks.keys.map((k) => k.kid).filter((k): k is string => typeof k === "string"),
        format,
        fetchedAtMs: Date.now(),
      };
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      throw new JWKSFetchFailed(`GET ${url}: ${reason}`, url, 200, { cause: err });
    }
  }

  function refresh(): Promise<void> {
    inflight ??= (async () => {
      lastAttemptAtMs = Date.now();
      fetchCount++;
      try {
        cached = await fetchOnce();
        lastError = undefined;
        consecutiveFailures = 0;
      } catch (err) {
        lastError =
          err instanceof JWKSFetchFailed
            ? err
            : new JWKSFetchFailed(`GET ${url} failed`, url, undefined, { cause: err });
        consecutiveFailures++;
        throw lastError;
      } finally {
        inflight = undefined;
        schedule();
      }
    })();
    return inflight;
  }

  function schedule(): void {
    if (closed) {
      return;
    }
    clearTimeout(timer);
    let delayMs: number;
    if (consecutiveFailures > 0) {
      delayMs = Math.min(retryAfterErrorMs * 2 ** (consecutiveFailures - 1), cooldownMs);
    } else if (cached) {
      delayMs = Math.max(0, cached.fetchedAtMs + cacheMaxAgeMs - refreshAheadMs - Date.now());
    } else {
      return;
    }
    timer = setTimeout(
      () => {
        // Failures are recorded in `lastError`; the cache keeps the old keys.
        refresh().catch(() => {});
      },
      // setTimeout fires at once for delays beyond 2^31-1 ms (24.8 days).
      Math.min(delayMs, 2 ** 31 - 1),
    );
    timer.unref();
  }

  function recentlyFailed(now: number): boolean {
    return (
      lastError !== undefined &&
      lastAttemptAtMs !== undefined &&
      now - lastAttemptAtMs < retryAfterErrorMs
    );
  }

  async function select(
    keys: CachedKeys,
    header: JWSHeaderParameters,
    token: FlattenedJWSInput | undefined,
  ): Promise<CryptoKey> {
    try {
      return await keys.local(header, token);
    } catch (err) {
      if (!(err instanceof errors.JWKSMultipleMatchingKeys) || !token) {
        throw err;
      }
      // Several keys fit (a token without `kid`): return the one that
      // verifies, else the first, so the caller reports a bad signature.
      let first: CryptoKey | undefined;
      for await (const candidate of err as unknown as AsyncIterable<CryptoKey>) {
        first ??= candidate;
        try {
          await flattenedVerify(token as Parameters<typeof flattenedVerify>[0], candidate);
          return candidate;
        } catch {
          // Try the next candidate.
        }
      }
      if (first) {
        return first;
      }
      throw new errors.JWKSNoMatchingKey();
    }
  }

  async function getKey(
    protectedHeader: JWSHeaderParameters = {},
    token?: FlattenedJWSInput,
  ): Promise<CryptoKey> {
    const now = Date.now();
    if (!cached) {
      if (recentlyFailed(now) && !inflight && lastError) {
        throw lastError;
      }
      await refresh();
    } else if (now - cached.fetchedAtMs >= cacheMaxAgeMs && !inflight && !recentlyFailed(now)) {
      // Normally the timer refreshes first; this covers a closed key set or a
      // suspended process. Answer from the stale cache meanwhile.
      refresh().catch(() => {});
    }
    const keys = cached as CachedKeys;
    try {
      return await select(keys, protectedHeader, token);
    } catch (err) {
      if (!(err instanceof errors.JWKSNoMatchingKey)) {
        throw err;
      }
      const coolingDown = lastAttemptAtMs !== undefined && now - lastAttemptAtMs < cooldownMs;
      if (inflight) {
        await inflight.catch(() => {});
      } else if (refetchOnUnknownKid && !coolingDown) {
        await refresh().catch(() => {});
      } else {
        throw err;
      }
      if (cached === keys || !cached) {
        throw err;
      }
      return select(cached, protectedHeader, token);
    }
  }

  return Object.defineProperties(getKey, {
    url: { value: url, enumerable: true },
    reload: { value: refresh, enumerable: true },
    warm: {
      value: async (): Promise<boolean> => {
        if (!cached && lastAttemptAtMs === undefined) {
          await refresh().catch(() => {});
        } else if (inflight) {
          await inflight.catch(() => {});
        }
        return cached !== undefined;
      },
      enumerable: true,
    },
    status: {
      value: (): KeySetStatus => ({
        url,
        hasKeys: cached !== undefined,
        kids: cached ? [...cached.kids] : [],
        format: cached?.format,
        fresh: cached !== undefined && Date.now() - cached.fetchedAtMs < cacheMaxAgeMs,
        fetchedAtMs: cached?.fetchedAtMs,
        lastError: lastError ? { code: lastError.code, message: lastError.message } : undefined,
        fetchCount,
      }),
      enumerable: true,
    },
    close: {
      value: (): void => {
        closed = true;
        clearTimeout(timer);
      },
      enumerable: true,
    },
  }) as RemoteKeySet;
}

function nonNegative(value: number | undefined, fallback: number, name: string): number {
  if (value === undefined) {
    return fallback;
  }
  if (!Number.isFinite(value) || value < 0) {
    throw new TypeError(`RemoteKeySetOptions.${name} must be a non-negative number of ms`);
  }
  return value;
}

export interface VerifiedTokenCacheOptions {
  /**
   * Most tokens remembered; the least recently used is dropped first.
   * Default 1 000, ESPv2's `jwt_cache_size` (a few MB at most).
   */
  maxEntries?: number;
}

/**
 * Remembers what was learned from a verified token (its payload, a principal…)
 * until the token expires, so steady traffic with the same token pays one
 * signature check. Keyed by the exact token string: a token differing in any
 * byte is a miss. Only put tokens in here after every check passed, and use
 * one cache per verification policy (issuers, audiences): a hit means "passed
 * that policy".
 */
export interface VerifiedTokenCache<T> {
  /** The value for `token`, or undefined when absent or expired at `nowMs`. */
  get(token: string, nowMs?: number): T | undefined;
  /** Remembers `value` for `token` until `expiresAtMs` (epoch ms). */
  set(token: string, value: T, expiresAtMs: number): void;
  delete(token: string): void;
  clear(): void;
  readonly size: number;
}

/** Creates a bounded, expiring {@link VerifiedTokenCache} (LRU). */
export function createVerifiedTokenCache<T>(
  options: VerifiedTokenCacheOptions = {},
): VerifiedTokenCache<T> {
  const maxEntries = options.maxEntries ?? 1_000;
  if (!Number.isInteger(maxEntries) || maxEntries < 0) {
    throw new TypeError("VerifiedTokenCacheOptions.maxEntries must be a non-negative integer");
  }
  // A Map iterates in insertion order: re-inserting on a hit makes the first
  // key the least recently used.
  const entries = new Map<string, { value: T; expiresAtMs: number }>();
  return {
    get(token, nowMs = Date.now()) {
      const entry = entries.get(token);
      if (!entry) {
        return undefined;
      }
      entries.delete(token);
      if (entry.expiresAtMs <= nowMs) {
        return undefined;
      }
      entries.set(token, entry);
      return entry.value;
    },
    set(token, value, expiresAtMs) {
      if (maxEntries === 0 || !Number.isFinite(expiresAtMs)) {
        return;
      }
      entries.delete(token);
      entries.set(token, { value, expiresAtMs });
      while (entries.size > maxEntries) {
        const oldest = entries.keys().next();
        if (oldest.done) {
          break;
        }
        entries.delete(oldest.value);
      }
    },
    delete(token) {
      entries.delete(token);
    },
    clear() {
      entries.clear();
    },
    get size() {
      return entries.size;
    },
  };
}

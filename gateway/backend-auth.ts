/**
 * The gateway's own identity toward backends (spec §4): one Google ID token
 * per backend `jwt_audience`, minted for the gateway's service account, sent
 * as `Authorization`. ESPv2 fetches them at start-up, refreshes them before
 * they expire, and keeps using the last good token while a refresh fails.
 */

/** Anything that hands out ID tokens for one audience (client/id-token.ts). */
export interface IdTokenProvider {
  getToken(): Promise<string>;
}

export interface BackendAuthOptions {
  /** Every audience a method of the config may need. */
  audiences: Iterable<string>;
  /** Creates the token provider for one audience. */
  createProvider(audience: string): IdTokenProvider;
  /**
   * Longest a request waits for a token before the gateway answers without
   * one. Default 5000 ms: calls fail with a clear status instead of hanging
   * on a dead metadata server.
   */
  timeoutMs?: number;
  /** Clock, for tests. */
  now?: () => number;
}

export interface BackendAuth {
  /**
   * A token for `audience`, or undefined when none can be had: neither a
   * fresh one nor an unexpired earlier one. The gateway then answers as
   * ESPv2 does: `Token not found for audience: <aud>`.
   */
  token(audience: string): Promise<string | undefined>;
  /** Fetches every audience's token once; resolves to the audiences that failed. */
  warm(): Promise<string[]>;
}

interface Entry {
  provider: IdTokenProvider;
  lastGood: string | undefined;
  lastGoodExpMs: number;
  /** The provider call in flight, shared by every request that arrives meanwhile. */
  refreshing: Promise<string | undefined> | undefined;
}

export function createBackendAuth(options: BackendAuthOptions): BackendAuth {
  const now = options.now ?? (() => Date.now());
  const timeoutMs = options.timeoutMs ?? 5000;
  const entries = new Map<string, Entry>();
  for (const audience of options.audiences) {
    entries.set(audience, {
      provider: options.createProvider(audience),
      lastGood: undefined,
      lastGoodExpMs: 0,
      refreshing: undefined,
    });
  }

  /** Asks the provider (which refreshes near expiry); resolves undefined on failure. */
  function refresh(entry: Entry): Promise<string | undefined> {
    entry.refreshing ??= withTimeout(entry.provider.getToken(), timeoutMs)
      .then(
        (fresh) => {
          if (fresh !== entry.lastGood) {
            entry.lastGood = fresh;
            entry.lastGoodExpMs = expiryMs(fresh);
          }
          return fresh;
        },
        () => undefined,
      )
      .finally(() => {
        entry.refreshing = undefined;
      });
    return entry.refreshing;
  }

  async function token(audience: string): Promise<string | undefined> {
    const entry = entries.get(audience);
    if (!entry) {
      return undefined;
    }
    const pending = refresh(entry);
    // While the last token is still valid no request waits for the provider:
    // a refresh against a hung metadata server would otherwise hold every
    // call for the provider's timeout. ESPv2 refreshes in the background too,
    // and keeps using the last token while refreshes fail.
    if (entry.lastGood !== undefined && now() < entry.lastGoodExpMs) {
      return entry.lastGood;
    }
    const fresh = await pending;
    return (
      fresh ??
      (entry.lastGood !== undefined && now() < entry.lastGoodExpMs ? entry.lastGood : undefined)
    );
  }

  return {
    token,
    async warm() {
      const failed: string[] = [];
      await Promise.all(
        [...entries.keys()].map(async (audience) => {
          if ((await token(audience)) === undefined) {
            failed.push(audience);
          }
        }),
      );
      return failed;
    },
  };
}

/** `exp` of a JWT in epoch ms, or 0 when it cannot be read. */
function expiryMs(jwt: string): number {
  try {
    const payload = JSON.parse(
      Buffer.from(jwt.split(".")[1] ?? "", "base64url").toString("utf8"),
    ) as { exp?: unknown };
    return typeof payload.exp === "number" ? payload.exp * 1000 : 0;
  } catch {
    return 0;
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no token after ${ms} ms`)), ms);
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

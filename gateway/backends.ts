/**
 * Backend addresses with pooled HTTP/2 sessions, and the per-RPC round-robin
 * pick across them.
 */
import * as http2 from "node:http2";
import { isIP } from "node:net";
import type { Logger } from "pino";

export interface BackendAddress {
  /** `grpc`/`grpcs` (HTTP/2) or `http`/`https` with `protocol: h2`. */
  scheme: string;
  host: string;
  port: number;
  tls: boolean;
}

export interface BackendOptions {
  /**
   * After a failed connection attempt, skip the backend for this long
   * (doubling per consecutive failure, up to 8×). Default 1000 ms: the
   * gateway stops sending to a dead backend within a second, and tries it
   * again soon after it returns.
   */
  downBackoffMs?: number;
  /** Close a session that carried no stream for this long. Default 5 min. */
  idleSessionTimeoutMs?: number;
  /** Trust this CA for TLS backends, instead of Node's roots. */
  ca?: string | Buffer;
  logger?: Logger;
}

/** One backend address and its HTTP/2 session, created on first use. */
export class Backend {
  readonly address: BackendAddress;
  /** `scheme://host:port` as node:http2 wants it. */
  readonly origin: string;
  /** `:authority` sent upstream: the backend's own host, as ESPv2 rewrites it. */
  readonly authority: string;
  readonly #options: BackendOptions;
  #session: http2.ClientHttp2Session | undefined;
  #downUntil = 0;
  #failures = 0;

  constructor(address: BackendAddress, options: BackendOptions = {}) {
    this.address = address;
    const host = address.host.includes(":") ? `[${address.host}]` : address.host;
    this.origin = `${address.tls ? "https" : "http"}://${host}:${address.port}`;
    const defaultPort = address.tls ? 443 : 80;
    this.authority = address.port === defaultPort ? host : `${host}:${address.port}`;
    this.#options = options;
  }

  /** True while the backend is skipped after a connection failure. */
  isDown(now = Date.now()): boolean {
    return now < this.#downUntil;
  }

  /** Records a failed connection attempt. */
  markDown(): void {
    this.#failures = Math.min(this.#failures + 1, 4);
    const base = this.#options.downBackoffMs ?? 1000;
    this.#downUntil = Date.now() + base * 2 ** (this.#failures - 1);
    this.#drop();
  }

  /** The pooled session, connecting if there is none usable. */
  session(): http2.ClientHttp2Session {
    const current = this.#session;
    if (current && !current.closed && !current.destroyed) {
      return current;
    }
    const session = http2.connect(this.origin, {
      ...(this.address.tls
        ? {
            // SNI carries host names only (RFC 6066); an IP address is still
            // checked against the certificate's IP SANs.
            ...(isIP(this.address.host) ? {} : { servername: this.address.host }),
            ALPNProtocols: ["h2"],
            ...(this.#options.ca ? { ca: this.#options.ca } : {}),
          }
        : {}),
      settings: { enablePush: false },
      // The gateway accepts 60 KB of client headers and adds its own (its
      // token, x-forwarded-authorization, the userinfo payload): node's
      // default of 64 KB would refuse such a request locally, and the
      // refusal would look like a backend failure. The backend decides.
      maxSendHeaderBlockLength: 256 * 1024,
    });
    this.#session = session;
    let connected = false;
    session.once("connect", () => {
      connected = true;
      this.#failures = 0;
      this.#downUntil = 0;
    });
    session.on("error", (err: NodeJS.ErrnoException) => {
      if (!connected) {
        this.markDown();
      }
      this.#options.logger?.warn(
        { backend: this.origin, code: err.code, connected },
        "backend connection error",
      );
      this.#drop(session);
    });
    // After GOAWAY (the backend is draining) new streams must use a new
    // connection; streams in flight on this one still complete.
    session.once("goaway", () => this.#drop(session));
    session.once("close", () => this.#drop(session));
    session.setTimeout(this.#options.idleSessionTimeoutMs ?? 300_000, () => {
      session.close();
    });
    return session;
  }

  /** Closes the session gracefully (in-flight streams finish). */
  close(): void {
    const s = this.#session;
    this.#session = undefined;
    s?.close();
  }

  #drop(session?: http2.ClientHttp2Session): void {
    if (session === undefined || this.#session === session) {
      this.#session = undefined;
    }
  }
}

/** Round robin over backends, skipping those marked down. */
export class BackendPool {
  readonly backends: readonly Backend[];
  #next = 0;

  constructor(backends: readonly Backend[]) {
    if (backends.length === 0) {
      throw new TypeError("a backend pool needs at least one backend");
    }
    this.backends = backends;
  }

  /**
   * The next backend not in `exclude` and not down; if all are down, the
   * next not in `exclude` anyway (one of them may be back). Undefined when
   * every backend was excluded.
   */
  pick(exclude?: ReadonlySet<Backend>): Backend | undefined {
    const n = this.backends.length;
    const now = Date.now();
    let fallback: Backend | undefined;
    for (let i = 0; i < n; i++) {
      const backend = this.backends[(this.#next + i) % n] as Backend;
      if (exclude?.has(backend)) {
        continue;
      }
      if (!backend.isDown(now)) {
        this.#next = (this.#next + i + 1) % n;
        return backend;
      }
      fallback ??= backend;
    }
    if (fallback) {
      this.#next = (this.backends.indexOf(fallback) + 1) % n;
    }
    return fallback;
  }

  close(): void {
    for (const b of this.backends) {
      b.close();
    }
  }
}

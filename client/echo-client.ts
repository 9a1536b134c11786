/**
 * A typed EchoService client over Connect's Node transports: gRPC by
 * default (HTTP/2, TLS or cleartext h2c), gRPC-Web and Connect on request.
 */
import { type Client, createClient, type Interceptor } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { EchoService } from "../gen/echo/v1/echo_pb.ts";

export type EchoProtocol = "grpc" | "grpc-web" | "connect";

export interface EchoClientOptions {
  /** `host:port` of the server or gateway (`[::1]:8080` for IPv6). */
  address: string;
  /** Cleartext HTTP/2 with prior knowledge (h2c). Default false: TLS. */
  plaintext?: boolean;
  /** TLS server name (SNI and certificate check) when it differs from the host. */
  servername?: string;
  /** PEM CA bundle to trust instead of Node's default roots. */
  ca?: string | Buffer;
  /** Wire protocol. Default "grpc". */
  protocol?: EchoProtocol;
  /** Interceptors, outermost first (e.g. the ID-token interceptor). */
  interceptors?: Interceptor[];
  /** Default deadline per call in ms; none by default. */
  defaultTimeoutMs?: number;
  /**
   * Close the HTTP/2 connection after it has been idle this long. Default
   * 15 min, Connect's default; tests use a few ms so nothing dangles.
   */
  idleConnectionTimeoutMs?: number;
}

export interface EchoClient {
  client: Client<typeof EchoService>;
  /** Base URL the transport calls. */
  baseUrl: string;
  /** Closes the HTTP/2 connection; in-flight calls are aborted. */
  close(): void;
}

export function createEchoClient(options: EchoClientOptions): EchoClient {
  const scheme = options.plaintext ? "http" : "https";
  const baseUrl = `${scheme}://${options.address}`;
  // Validate here so a typo gives a clear message, not a transport error.
  const url = new URL(baseUrl);
  if (!url.port && !options.address.includes(":")) {
    throw new TypeError(`address must be host:port, got "${options.address}"`);
  }
  const tlsOptions: { servername?: string; ca?: string | Buffer } = {};
  if (options.servername) {
    tlsOptions.servername = options.servername;
  }
  if (options.ca) {
    tlsOptions.ca = options.ca;
  }
  const sessionManager = new Http2SessionManager(
    baseUrl,
    { idleConnectionTimeoutMs: options.idleConnectionTimeoutMs ?? 15 * 60 * 1000 },
    tlsOptions,
  );
  const common = {
    baseUrl,
    httpVersion: "2" as const,
    sessionManager,
    interceptors: options.interceptors ?? [],
    ...(options.defaultTimeoutMs ? { defaultTimeoutMs: options.defaultTimeoutMs } : {}),
  };
  const protocol = options.protocol ?? "grpc";
  const transport =
    protocol === "grpc"
      ? createGrpcTransport(common)
      : protocol === "grpc-web"
        ? createGrpcWebTransport(common)
        : createConnectTransport(common);
  return {
    client: createClient(EchoService, transport),
    baseUrl,
    close: () => sessionManager.abort(),
  };
}

/**
 * A loopback TCP proxy in front of one server, whose behaviour a test
 * switches at run time: pass connections through, reset them at once
 * (a crashed peer), or accept and never answer (a hung peer).
 */
import { connect, createServer, type Socket } from "node:net";

export type ProxyMode = "forward" | "reset" | "hang";

export interface TcpProxy {
  /** `127.0.0.1:PORT` of the proxy. */
  readonly host: string;
  readonly port: number;
  mode: ProxyMode;
  /** Connections accepted so far. */
  connections(): number;
  /** Destroys every open connection (both sides). */
  dropAll(): void;
  close(): Promise<void>;
}

export async function startTcpProxy(target: { host: string; port: number }): Promise<TcpProxy> {
  const open = new Set<Socket>();
  let accepted = 0;
  const track = (s: Socket) => {
    open.add(s);
    s.once("close", () => open.delete(s));
    s.on("error", () => {});
  };
  const server = createServer((client) => {
    accepted++;
    track(client);
    if (proxy.mode === "reset") {
      client.resetAndDestroy();
      return;
    }
    if (proxy.mode === "hang") {
      // Read and discard, never answer.
      client.resume();
      return;
    }
    const upstream = connect(target.port, target.host);
    track(upstream);
    client.pipe(upstream);
    upstream.pipe(client);
    upstream.once("close", () => client.destroy());
    client.once("close", () => upstream.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  const proxy: TcpProxy = {
    host: `127.0.0.1:${port}`,
    port,
    mode: "forward",
    connections: () => accepted,
    dropAll() {
      for (const s of open) {
        s.destroy();
      }
    },
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        proxy.dropAll();
      });
    },
  };
  return proxy;
}

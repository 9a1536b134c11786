/**
 * Cold start: from spawning the process to the first RPC answered with
 * grpc-status 0, the figure a Cloud Run cold start adds to the first
 * request (plus the platform's own container start, which is not ours).
 * The bench process polls with a real gRPC call every couple of ms.
 */
import type * as http2 from "node:http2";
import { createServer } from "node:net";
import { connectH2c, rawCall } from "./grpc-wire.ts";
import { type Child, type ChildSpec, spawnChild, stopChild } from "./procs.ts";

/** A port that was free a moment ago (the child binds it itself). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const address = s.address();
      const port = typeof address === "object" && address ? address.port : 0;
      s.close(() => resolve(port));
    });
  });
}

export interface ColdStartProbe {
  path: string;
  body: Buffer;
  headers: Record<string, string>;
}

/**
 * Calls `port` until an answer whose grpc-status satisfies `accept` (by
 * default any gRPC answer: the process is up). Rejects when `child` exits
 * first or after `timeoutMs`. Resolves with the milliseconds waited.
 */
export async function waitForRpc(
  child: Child,
  port: number,
  probe: ColdStartProbe,
  options: { timeoutMs?: number; accept?: (grpcStatus: string) => boolean } = {},
): Promise<number> {
  const started = performance.now();
  const timeoutMs = options.timeoutMs ?? 15_000;
  const accept = options.accept ?? ((status) => status !== "");
  let exited: number | string | undefined;
  void child.exited.then((code) => {
    exited = code;
  });
  let session: http2.ClientHttp2Session | undefined;
  try {
    while (performance.now() - started < timeoutMs) {
      if (exited !== undefined) {
        throw new Error(`${child.name} exited (${exited}); see ${child.logFile}`);
      }
      try {
        session ??= await connectH2c(port, 1000);
        const r = await rawCall(session, probe.path, probe.body, probe.headers, 5000);
        if (accept(r.grpcStatus)) {
          return performance.now() - started;
        }
        if (r.error || session.closed || session.destroyed) {
          session.destroy();
          session = undefined;
        }
      } catch {
        session?.destroy();
        session = undefined;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    throw new Error(
      `${child.name}: no answer on port ${port} within ${timeoutMs} ms; see ${child.logFile}`,
    );
  } finally {
    session?.close();
  }
}

/**
 * Spawns `spec` (which must listen on `port`), calls it until the first OK
 * answer, stops it, and returns the milliseconds from spawn to that answer.
 */
export async function measureColdStart(
  spec: ChildSpec,
  port: number,
  probe: ColdStartProbe,
  timeoutMs = 15_000,
): Promise<number> {
  const started = performance.now();
  const child = spawnChild(spec);
  try {
    await waitForRpc(child, port, probe, { timeoutMs, accept: (status) => status === "0" });
    return performance.now() - started;
  } finally {
    await stopChild(child);
  }
}

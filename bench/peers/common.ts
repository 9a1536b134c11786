/**
 * What every reference peer shares: the response it sends (the same bytes
 * the project's server sends with verification off, so the peers differ only
 * in their transport), its port, and the ready line the bench waits for.
 */
import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import {
  CallerSchema,
  EchoResponseSchema,
  EchoServerStreamResponseSchema,
  type EchoResponse,
  type EchoServerStreamResponse,
  InstanceSchema,
} from "../../gen/echo/v1/echo_pb.ts";

const instance = create(InstanceSchema, {
  service: process.env["K_SERVICE"] || "echo",
  revision: process.env["K_REVISION"] || "local",
  id: `local-${randomBytes(6).toString("hex")}`,
});
const caller = create(CallerSchema, { verification: "none" });

/** Largest EchoServerStream `count` a peer serves, as the server's default. */
export const maxStreamCount = 10_000;

export function echoResponse(message: string): EchoResponse {
  return create(EchoResponseSchema, { message, instance, caller });
}

export function streamResponse(message: string, index: number): EchoServerStreamResponse {
  return create(EchoServerStreamResponseSchema, { message, index, instance, caller });
}

/** `PORT` (default 0: any free port). Peers always bind 127.0.0.1. */
export function peerPort(): number {
  const port = Number(process.env["PORT"] ?? "0");
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new TypeError(`PORT must be a port number, got "${process.env["PORT"]}"`);
  }
  return port;
}

/** The line bench/run.ts waits for, in the same shape as the server's. */
export function announce(peer: string, port: number): void {
  process.stdout.write(`${JSON.stringify({ message: "peer listening", peer, port })}\n`);
}

/** Exit on SIGTERM/SIGINT after `close` (the bench stops peers by PID). */
export function exitOnSignal(close: () => void): void {
  const stop = () => {
    close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

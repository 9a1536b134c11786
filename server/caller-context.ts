/**
 * The caller of the current RPC, as established by the verification
 * interceptor, handed to service implementations through Connect's context
 * values so that they never see HTTP or Fastify.
 */
import { create } from "@bufbuild/protobuf";
import { createContextKey } from "@connectrpc/connect";
import { type Caller, CallerSchema } from "../gen/echo/v1/echo_pb.ts";

/** Caller seen when verification is off. */
export const anonymousCaller: Caller = create(CallerSchema, { verification: "none" });

export const callerKey = createContextKey<Caller>(anonymousCaller, {
  description: "verified caller of the current RPC",
});

/**
 * Everything the server serves, as Connect routes. The mounting layer
 * (Fastify today) only receives this function.
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { EchoService, type Instance } from "../gen/echo/v1/echo_pb.ts";
import { Health } from "../gen/grpc/health/v1/health_pb.ts";
import { createEchoService } from "./echo-service.ts";
import { createHealthService, type HealthStatus } from "./health.ts";
import { registerReflection } from "./reflection.ts";

export interface RoutesOptions {
  instance: Instance;
  health: HealthStatus;
  maxStreamCount: number;
}

/** Services that stay open when caller verification is on. */
export const publicServices: ReadonlySet<string> = new Set([
  Health.typeName,
  "grpc.reflection.v1.ServerReflection",
  "grpc.reflection.v1alpha.ServerReflection",
]);

export function createRoutes(options: RoutesOptions): (router: ConnectRouter) => void {
  return (router) => {
    router.service(
      EchoService,
      createEchoService({ instance: options.instance, maxStreamCount: options.maxStreamCount }),
    );
    router.service(Health, createHealthService(options.health));
    registerReflection(router, [EchoService, Health]);
  };
}

/**
 * `grpc.health.v1.Health`, which Cloud Run's gRPC startup and liveness
 * probes call (https://github.com/grpc/grpc/blob/master/doc/health-checking.md).
 * Connect-ES ships no health service, so this small one is ours.
 */
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type Health,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthCheckResponseSchema,
  HealthListResponseSchema,
} from "../gen/grpc/health/v1/health_pb.ts";

type Status = (typeof ServingStatus)[keyof typeof ServingStatus];

/** Serving status per service name; "" is the server as a whole. */
export class HealthStatus {
  readonly #statuses = new Map<string, Status>();
  readonly #watchers = new Set<() => void>();

  constructor(services: Iterable<string>) {
    this.#statuses.set("", ServingStatus.SERVING);
    for (const name of services) {
      this.#statuses.set(name, ServingStatus.SERVING);
    }
  }

  get(service: string): Status | undefined {
    return this.#statuses.get(service);
  }

  /** Marks every service NOT_SERVING, as done on SIGTERM before draining. */
  shutdown(): void {
    for (const name of this.#statuses.keys()) {
      this.#statuses.set(name, ServingStatus.NOT_SERVING);
    }
    this.#notify();
  }

  entries(): IterableIterator<[string, Status]> {
    return this.#statuses.entries();
  }

  /** Resolves at the next status change or when `signal` aborts. */
  changed(signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.#watchers.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      this.#watchers.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  #notify(): void {
    for (const watcher of [...this.#watchers]) {
      watcher();
    }
  }
}

export function createHealthService(status: HealthStatus): ServiceImpl<typeof Health> {
  return {
    check(req) {
      const current = status.get(req.service);
      if (current === undefined) {
        throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      }
      return create(HealthCheckResponseSchema, { status: current });
    },
    list() {
      const statuses: Record<
        string,
        ReturnType<typeof create<typeof HealthCheckResponseSchema>>
      > = {};
      for (const [name, s] of status.entries()) {
        statuses[name] = create(HealthCheckResponseSchema, { status: s });
      }
      return create(HealthListResponseSchema, { statuses });
    },
    async *watch(req, ctx: HandlerContext) {
      let last: Status | undefined;
      while (!ctx.signal.aborted) {
        const current = status.get(req.service) ?? ServingStatus.SERVICE_UNKNOWN;
        if (current !== last) {
          last = current;
          yield create(HealthCheckResponseSchema, { status: current });
        }
        await status.changed(ctx.signal);
      }
    },
  };
}

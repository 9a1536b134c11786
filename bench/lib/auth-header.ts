/** Connect interceptors that add fixed request headers (the bench's tokens). */
import type { Interceptor } from "@connectrpc/connect";

/** Sends `authorization: Bearer <token>`. */
export function bearer(token: string): Interceptor {
  return withHeaders({ authorization: `Bearer ${token}` });
}

/** Sends every header of `headers`. */
export function withHeaders(headers: Record<string, string>): Interceptor {
  return (next) => (req) => {
    for (const [name, value] of Object.entries(headers)) {
      req.header.set(name, value);
    }
    return next(req);
  };
}

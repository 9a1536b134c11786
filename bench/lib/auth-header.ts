/** A Connect interceptor sending a fixed bearer token (the bench's client token). */
import type { Interceptor } from "@connectrpc/connect";

export function bearer(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

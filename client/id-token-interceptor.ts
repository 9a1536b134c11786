/**
 * A Connect interceptor that authenticates every call with a Google ID token.
 */
import type { Interceptor } from "@connectrpc/connect";
import type { IdTokenSource } from "./id-token.ts";

/** Header the token travels in, as API Gateway and Cloud Run read it. */
export const authorizationHeader = "authorization";

export interface IdTokenInterceptorOptions {
  /** Audience to ask for; default the source's own `audience`. */
  audience?: string;
}

/**
 * Sets `authorization: Bearer <ID token>` on every request (unary and
 * streaming), replacing any value already there. The token comes from
 * `source`, which caches it per audience; a failure to get one fails the
 * call with the source's ConnectError (Unauthenticated or Unavailable)
 * before anything is sent.
 */
export function createIdTokenInterceptor(
  source: Pick<IdTokenSource, "getIdToken">,
  options: IdTokenInterceptorOptions = {},
): Interceptor {
  return (next) => async (req) => {
    const token = await source.getIdToken(options.audience);
    req.header.set(authorizationHeader, `Bearer ${token}`);
    return next(req);
  };
}

/**
 * Cost of JWT verification, in the bench's process: the gateway's JWT step
 * and the server's caller verifier, each with its verified-token cache (what
 * steady traffic with one token hits) and without it (a signature check per
 * call, what every new token costs once).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { createJwtAuthn } from "../../gateway/jwt-authn.ts";
import { createCallerVerifier } from "../../server/auth.ts";
import { defaultIssuers } from "../../server/config.ts";
import { backendAudience, gatewayEmail, type StandIns } from "./stand-ins.ts";

export interface JwtCost {
  /** µs per verification, token cached (signature checked once, then remembered). */
  gatewayCachedUs: number;
  /** µs per verification, cache off: parse, claims, key lookup, RSA signature. */
  gatewayUncachedUs: number;
  serverCachedUs: number;
  serverUncachedUs: number;
}

async function timeIt(ms: number, op: () => Promise<unknown>): Promise<number> {
  for (let i = 0; i < 200; i++) {
    await op();
  }
  let n = 0;
  const started = performance.now();
  while (performance.now() - started < ms) {
    for (let i = 0; i < 50; i++) {
      await op();
    }
    n += 50;
  }
  return ((performance.now() - started) * 1000) / n;
}

export async function measureJwtCost(standIns: StandIns, ms: number): Promise<JwtCost> {
  const { plan } = standIns.writeApiConfig("jwt-cost", [1]);
  const method = plan.methods.find((m) => m.auth !== undefined);
  if (!method?.auth) {
    throw new Error("the API config has no method with JWT authentication");
  }
  const auth = method.auth;
  const jwksUris = new Map(plan.providers.map((p) => [p.id, standIns.issuer.jwksUri]));
  const gatewayToken = standIns.clientToken;
  const source = {
    header: (name: string) => (name === "authorization" ? `Bearer ${gatewayToken}` : undefined),
    query: () => [],
  };
  const gateway = async (cacheSize: number) => {
    const jwt = createJwtAuthn({ providers: plan.providers, jwksUris, cacheSize });
    await jwt.warm();
    try {
      return await timeIt(ms, async () => {
        const r = await jwt.authenticate(auth, source);
        if (!r.ok) {
          throw new Error(`gateway rejected the bench token: ${r.message}`);
        }
      });
    } finally {
      jwt.close();
    }
  };

  const serverToken = await standIns.issuer.sign({ aud: backendAudience, email: gatewayEmail });
  const headers = new Headers({ authorization: `Bearer ${serverToken}` });
  const server = async (tokenCacheMaxEntries: number) => {
    const verifier = createCallerVerifier(
      {
        mode: "verify",
        audiences: [backendAudience],
        issuers: defaultIssuers,
        jwksUri: standIns.issuer.jwksUri,
        allowedPrincipals: [gatewayEmail],
        clockSkewSeconds: 60,
      },
      { tokenCacheMaxEntries },
    );
    await verifier.warm();
    try {
      return await timeIt(ms, async () => {
        const caller = await verifier.verify(headers);
        if (caller.principal?.email !== gatewayEmail) {
          throw new ConnectError("server verifier saw the wrong principal", Code.Internal);
        }
      });
    } finally {
      verifier.close();
    }
  };

  return {
    gatewayCachedUs: await gateway(1000),
    gatewayUncachedUs: await gateway(0),
    serverCachedUs: await server(1000),
    serverUncachedUs: await server(0),
  };
}

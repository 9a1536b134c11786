/**
 * Entry point of the Echo server: `node server/main.ts` (what the container
 * runs) or `npm run server`.
 */
import type { AddressInfo } from "node:net";
import { exitOnConfigError } from "../lib/config-error.ts";
import { buildServer } from "./app.ts";
import { createCallerVerifier } from "./auth.ts";
import { loadServerConfig } from "./config.ts";
import { resolveInstanceId } from "./instance.ts";

let config: ReturnType<typeof loadServerConfig>;
try {
  config = loadServerConfig();
} catch (err) {
  exitOnConfigError(err, "echo-server");
}

const verifier = config.auth.mode === "off" ? undefined : createCallerVerifier(config.auth);
const { app, instance } = await buildServer(config, verifier ? { verifier } : {});
const log = app.log;

try {
  await app.listen({ host: config.host, port: config.port });
} catch (err) {
  const code = (err as NodeJS.ErrnoException).code;
  log.fatal(
    { code },
    code === "EADDRINUSE"
      ? `port ${config.port} is already in use; set PORT to a free port`
      : "cannot listen",
  );
  process.exit(1);
}
void resolveInstanceId(instance);
// Fetch the signing keys now rather than on the first call, so that a key
// server outage after start-up finds them cached (ESPv2 does the same).
void verifier?.warm().then((cached) => {
  if (!cached) {
    log.warn({ jwksUri: config.auth.jwksUri }, "no signing keys yet; calls will fetch them");
  }
});
log.info(
  {
    address: app.addresses().map((a) => (typeof a === "string" ? a : formatAddress(a))),
    tls: config.tls !== undefined,
    auth: config.auth.mode,
    service: instance.service,
    revision: instance.revision,
  },
  "echo server listening",
);

function formatAddress(a: AddressInfo): string {
  return `${a.family === "IPv6" ? `[${a.address}]` : a.address}:${a.port}`;
}

let stopping = false;
async function shutdown(signal: NodeJS.Signals) {
  if (stopping) {
    return;
  }
  stopping = true;
  log.info({ signal }, "shutting down: draining in-flight RPCs");
  // Hard stop just past the drain window, still before Cloud Run's SIGKILL at 10 s.
  setTimeout(() => {
    log.error("drain did not finish in time; exiting");
    process.exit(1);
  }, config.shutdownTimeoutMs + 1000).unref();
  await app.close();
  log.info("stopped");
  process.exit(0);
}
process.on("SIGTERM", (s) => void shutdown(s));
process.on("SIGINT", (s) => void shutdown(s));

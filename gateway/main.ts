/**
 * Entry point of the local gateway:
 *
 *   npm run gateway -- --config api_config.yaml --descriptor gen/echo.pb --port 8081
 */
import { ConfigError, exitOnConfigError } from "../lib/config-error.ts";
import { createLogger } from "../lib/logging.ts";
import { ApiConfigError } from "./api-config.ts";
import { loadGatewayConfig } from "./config.ts";
import { startGateway } from "./start.ts";

let config: ReturnType<typeof loadGatewayConfig>;
try {
  config = loadGatewayConfig();
} catch (err) {
  exitOnConfigError(err, "gateway");
}
const logger = createLogger({ level: config.logLevel, base: { component: "gateway" } });

let started: Awaited<ReturnType<typeof startGateway>>;
try {
  started = await startGateway(config, { logger });
} catch (err) {
  if (err instanceof ApiConfigError) {
    exitOnConfigError(new ConfigError(err.message.split("\n")), "gateway");
  }
  const code = (err as NodeJS.ErrnoException).code;
  if (code === "EADDRINUSE") {
    exitOnConfigError(
      new ConfigError([`port ${config.port} is already in use; set PORT (--port) to a free port`]),
      "gateway",
    );
  }
  exitOnConfigError(new ConfigError([err instanceof Error ? err.message : String(err)]), "gateway");
}

let stopping = false;
async function shutdown(signal: NodeJS.Signals) {
  if (stopping) {
    return;
  }
  stopping = true;
  logger.info({ signal }, "shutting down: draining in-flight calls");
  await started.close();
  logger.info("stopped");
  process.exit(0);
}
process.on("SIGTERM", (s) => void shutdown(s));
process.on("SIGINT", (s) => void shutdown(s));

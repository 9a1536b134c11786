/**
 * The README's configuration tables must name exactly the flags and
 * variables the loaders understand, with the loaders' defaults.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { cliFlags, parseCliOptions } from "../../client/cli.ts";
import { gatewayEnvNames, gatewayFlags, loadGatewayConfig } from "../../gateway/config.ts";
import { envNames, loadServerConfig, serverFlags } from "../../server/config.ts";
import { projectRoot } from "../helpers/process.ts";

const readme = readFileSync(`${projectRoot}README.md`, "utf8");

/** Rows of the first table after `heading`, as arrays of cells. */
function table(heading: string): string[][] {
  const start = readme.indexOf(heading);
  assert.ok(start >= 0, `README has "${heading}"`);
  const lines = readme.slice(start).split("\n");
  const first = lines.findIndex((l) => l.startsWith("|"));
  const rows: string[][] = [];
  for (const line of lines.slice(first + 2)) {
    if (!line.startsWith("|")) {
      break;
    }
    rows.push(
      line
        .slice(1, -1)
        .split(" | ")
        .map((c) => c.trim()),
    );
  }
  return rows;
}

/** Every `--flag` or `ENV_NAME` in backticks in a cell. */
function names(cell: string | undefined, re: RegExp): string[] {
  return [...(cell ?? "").matchAll(re)].map((m) => m[1] ?? "");
}
const flagRe = /`--([a-z-]+)`/g;
const envRe = /`([A-Z][A-Z0-9_]+)`/g;

describe("README configuration tables", () => {
  it("lists exactly the server's flags and variables", () => {
    const rows = table("### Server (");
    const flags = new Set(rows.flatMap((r) => names(r[0], flagRe)));
    const env = new Set(rows.flatMap((r) => names(r[1], envRe)));
    assert.deepEqual(flags, new Set(Object.keys(serverFlags).filter((f) => f !== "help")));
    for (const name of Object.values(envNames)) {
      assert.ok(env.has(name), `${name} documented`);
    }
    for (const name of ["K_SERVICE", "K_REVISION", "GOOGLE_CLOUD_PROJECT"]) {
      assert.ok(env.has(name), `${name} documented`);
    }
  });

  it("states the server's defaults", () => {
    const defaults = loadServerConfig({}, []);
    const byFlag = new Map(table("### Server (").map((r) => [names(r[0], flagRe)[0], r[2]]));
    assert.equal(byFlag.get("port"), `\`${defaults.port}\``);
    assert.equal(byFlag.get("host"), `\`${defaults.host}\``);
    assert.equal(byFlag.get("max-stream-count"), `\`${defaults.maxStreamCount}\``);
    assert.equal(byFlag.get("read-max-bytes"), `\`${defaults.readMaxBytes}\``);
    assert.equal(byFlag.get("shutdown-timeout-ms"), `\`${defaults.shutdownTimeoutMs}\``);
    assert.equal(byFlag.get("log-level"), `\`${defaults.logLevel}\``);
    assert.equal(byFlag.get("auth-mode"), `\`${defaults.auth.mode}\``);
    assert.equal(byFlag.get("jwks-uri"), `\`${defaults.auth.jwksUri}\``);
    assert.equal(byFlag.get("issuer"), `\`${defaults.auth.issuers.join(",")}\``);
  });

  it("lists exactly the gateway's flags and variables, with its defaults", () => {
    const rows = table("### Gateway (");
    const flags = new Set(rows.flatMap((r) => names(r[0], flagRe)));
    const env = new Set(rows.flatMap((r) => names(r[1], envRe)));
    assert.deepEqual(flags, new Set(Object.keys(gatewayFlags).filter((f) => f !== "help")));
    assert.deepEqual(env, new Set(Object.values(gatewayEnvNames)));
    const defaults = loadGatewayConfig({ GATEWAY_CONFIG: "x.yaml" }, []);
    const byFlag = new Map(rows.map((r) => [names(r[0], flagRe)[0], r[2]]));
    assert.equal(byFlag.get("port"), `\`${defaults.port}\``);
    assert.equal(byFlag.get("descriptor"), `\`${defaults.descriptorFile}\``);
    assert.equal(byFlag.get("header-prefix"), `\`${defaults.headerPrefix}\``);
    assert.equal(byFlag.get("retries"), `\`${defaults.retries}\``);
    assert.equal(byFlag.get("shutdown-timeout-ms"), `\`${defaults.shutdownTimeoutMs}\``);
  });

  it("lists exactly the client's flags, with its defaults", () => {
    const rows = table("### Client (");
    const flags = new Set(rows.flatMap((r) => names(r[0], flagRe)));
    assert.deepEqual(flags, new Set(Object.keys(cliFlags).filter((f) => f !== "help")));
    const defaults = parseCliOptions(["--address", "h:1"], {});
    const byFlag = new Map(rows.map((r) => [names(r[0], flagRe)[0], r[1]]));
    assert.equal(byFlag.get("count"), `\`${defaults.count}\``);
    assert.equal(byFlag.get("stream-count"), `\`${defaults.streamCount}\``);
    assert.equal(byFlag.get("timeout-ms"), `\`${defaults.timeoutMs}\``);
    assert.equal(byFlag.get("message"), `\`${defaults.message}\``);
    assert.equal(byFlag.get("protocol"), `\`${defaults.protocol}\``);
  });
});

import assert from "node:assert/strict";
import { appendFileSync, cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { projectRoot, spawnNode } from "../helpers/process.ts";

describe("npm run check:gen", () => {
  let copy: string;
  before(() => {
    copy = mkdtempSync(join(tmpdir(), "echo-check-gen-"));
    for (const path of ["proto", "third_party", "gen", "buf.yaml", "buf.gen.yaml"]) {
      cpSync(join(projectRoot, path), join(copy, path), { recursive: true });
    }
  });
  after(() => rmSync(copy, { recursive: true, force: true }));

  it("passes on the committed gen/", async () => {
    const run = spawnNode(["scripts/check-gen.ts", "--root", copy]);
    assert.equal(await run.exited, 0, run.stderr());
  });

  it("fails when a generated file was edited by hand", async () => {
    appendFileSync(join(copy, "gen/echo/v1/echo_pb.ts"), "// edited\n");
    const run = spawnNode(["scripts/check-gen.ts", "--root", copy]);
    assert.equal(await run.exited, 1);
    assert.match(run.stderr(), /gen\/echo\/v1\/echo_pb\.ts differs from what buf generates/);
  });

  it("fails when the descriptor set is stale", async () => {
    const proto = join(copy, "proto/echo/v1/echo.proto");
    writeFileSync(
      proto,
      readFileSync(proto, "utf8").replace(
        "// Echo answers one request",
        "// Echo returns one request",
      ),
    );
    const run = spawnNode(["scripts/check-gen.ts", "--root", copy]);
    assert.equal(await run.exited, 1);
    assert.match(run.stderr(), /gen\/echo\.pb differs/);
  });
});

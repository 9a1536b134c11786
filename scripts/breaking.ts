/**
 * `buf breaking` for the Echo contract (rules FILE). Compares the work tree
 * with HEAD when the protos have uncommitted changes, otherwise HEAD with its
 * parent, so the check means something both before a commit and in CI on a
 * clean clone. Skips, saying so, when there is nothing to compare against.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { join } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const buf = join(root, "node_modules/.bin/buf");
const protoPath = "proto/echo/v1/echo.proto";

function git(...args: string[]): { ok: boolean; out: string } {
  const r = spawnSync("git", args, { cwd: root, encoding: "utf8" });
  return { ok: r.status === 0, out: (r.stdout ?? "").trim() };
}

const dirty = !git("diff", "--quiet", "HEAD", "--", "proto").ok;
const ref = dirty ? "HEAD" : "HEAD~1";
if (!git("cat-file", "-e", `${ref}:${protoPath}`).ok) {
  process.stdout.write(`breaking: no ${protoPath} at ${ref}; nothing to compare against\n`);
  process.exit(0);
}
execFileSync(buf, ["breaking", "--against", `.git#ref=${ref}`], { cwd: root, stdio: "inherit" });
process.stdout.write(`breaking: proto/ is compatible with ${ref}\n`);

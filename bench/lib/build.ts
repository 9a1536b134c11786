/**
 * A plain-JavaScript build of the server and gateway for the cold-start
 * comparison: the same sources compiled by tsc (types erased ahead of time,
 * `.ts` imports rewritten to `.js`), so that Node does not strip types while
 * loading. This is what a build step in the Dockerfile would produce; the
 * bench measures it before anyone adopts it.
 */
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { root } from "./procs.ts";

/** Compiles into `outDir`; resolves with the milliseconds tsc took. */
export async function buildJs(outDir: string): Promise<number> {
  mkdirSync(outDir, { recursive: true });
  const tsconfig = join(outDir, "..", "tsconfig.bench-build.json");
  writeFileSync(
    tsconfig,
    JSON.stringify({
      extends: join(root, "tsconfig.json"),
      compilerOptions: {
        noEmit: false,
        outDir,
        rootDir: root,
        rewriteRelativeImportExtensions: true,
        declaration: false,
        sourceMap: false,
        typeRoots: [join(root, "node_modules/@types")],
      },
      include: ["server", "gateway", "lib", "gen", "client"].map((d) => join(root, d)),
    }),
  );
  const started = performance.now();
  await new Promise<void>((resolve, reject) => {
    execFile(
      join(root, "node_modules/.bin/tsc"),
      ["-p", tsconfig],
      { cwd: root, timeout: 120_000 },
      (err, stdout) => {
        // tsc emits even with type errors (someone else's work in progress);
        // only a missing output is fatal.
        if (err && !existsSync(join(outDir, "server/main.js"))) {
          reject(new Error(`tsc build failed: ${err.message}\n${stdout}`));
        } else {
          resolve();
        }
      },
    );
  });
  const ms = performance.now() - started;
  if (!existsSync(join(outDir, "node_modules"))) {
    symlinkSync(join(root, "node_modules"), join(outDir, "node_modules"));
  }
  writeFileSync(join(outDir, "package.json"), '{"type":"module"}\n');
  return ms;
}

/**
 * The container image, checked without Docker: the Dockerfile is replayed
 * instruction by instruction into temporary directories (one per stage,
 * standing for its file system), with the build context filtered by
 * .dockerignore, `npm ci` run for real, and the final stage's CMD started as
 * the container would start it. The server that comes up is called with the
 * project's client and health-checked. Whatever the image lacks (a file not
 * copied, a dependency installed only for development) fails here.
 *
 * Not covered: the base image itself (its Node is taken to be the Node that
 * runs this test, which must be the same release: checked below), file
 * ownership and the USER switch, which only a real build shows.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { cp, mkdir, mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, posix } from "node:path";
import { after, before, describe, it } from "node:test";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createEchoClient } from "../../client/echo-client.ts";
import {
  Health,
  HealthCheckResponse_ServingStatus as ServingStatus,
} from "../../gen/grpc/health/v1/health_pb.ts";
import { projectRoot } from "../helpers/process.ts";

/** What the final image holds, at its WORKDIR. */
const expectedImageEntries = ["gen", "lib", "node_modules", "package.json", "server"];

interface Instruction {
  readonly keyword: string;
  readonly args: string;
  readonly line: number;
}

/** Splits a Dockerfile into instructions: comments dropped, continuations joined. */
function parseDockerfile(text: string): Instruction[] {
  const out: Instruction[] = [];
  let pending = "";
  let start = 0;
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (pending === "" && (line === "" || line.startsWith("#"))) {
      continue;
    }
    if (pending === "") {
      start = i + 1;
    }
    if (line.endsWith("\\")) {
      pending += `${line.slice(0, -1)} `;
      continue;
    }
    const full = pending + line;
    pending = "";
    const match = /^(\S+)\s*(.*)$/.exec(full);
    if (match) {
      out.push({ keyword: (match[1] ?? "").toUpperCase(), args: match[2] ?? "", line: start });
    }
  }
  return out;
}

/** .dockerignore rules, applied the way Docker does: last matching rule wins, parents count. */
function parseDockerignore(text: string): { pattern: RegExp; exclude: boolean }[] {
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("#"))
    .map((l) => {
      const exclude = !l.startsWith("!");
      const glob = posix.normalize(l.replace(/^!/, "")).replace(/^\/+|\/+$/g, "");
      let re = "";
      for (let i = 0; i < glob.length; i++) {
        const c = glob[i] ?? "";
        if (c === "*" && glob[i + 1] === "*") {
          re += glob[i + 2] === "/" ? "(?:.*/)?" : ".*";
          i += glob[i + 2] === "/" ? 2 : 1;
        } else if (c === "*") {
          re += "[^/]*";
        } else if (c === "?") {
          re += "[^/]";
        } else {
          re += c.replace(/[.+^${}()|[\]\\]/g, "\\$&");
        }
      }
      return { pattern: new RegExp(`^${re}$`), exclude };
    });
}

function ignored(path: string, rules: ReturnType<typeof parseDockerignore>): boolean {
  const parts = path.split("/");
  const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
  let result = false;
  for (const rule of rules) {
    if (prefixes.some((p) => rule.pattern.test(p))) {
      result = rule.exclude;
    }
  }
  return result;
}

/** Copies `src` (file or directory) from the build context, leaving out ignored files. */
async function copyFromContext(
  src: string,
  dest: string,
  rules: ReturnType<typeof parseDockerignore>,
): Promise<number> {
  const full = join(projectRoot, src);
  if ((await stat(full)).isDirectory()) {
    let count = 0;
    for (const entry of await readdir(full)) {
      count += await copyFromContext(posix.join(src, entry), join(dest, entry), rules);
    }
    return count;
  }
  if (ignored(src, rules)) {
    return 0;
  }
  await mkdir(dirname(dest), { recursive: true });
  await cp(full, dest);
  return 1;
}

/** npm's own script, so that it runs on this Node (24), as in the image. */
function npmCli(): string {
  const fromNpm = process.env["npm_execpath"];
  if (fromNpm?.endsWith(".js")) {
    return fromNpm;
  }
  for (const dir of (process.env["PATH"] ?? "").split(delimiter)) {
    const candidate = join(dir, "npm");
    if (dir !== "" && existsSync(candidate)) {
      return realpathSync(candidate);
    }
  }
  throw new Error("npm not found on PATH");
}

/** Runs a command to completion, failing after `timeoutMs`. */
async function run(argv: string[], cwd: string, timeoutMs: number): Promise<void> {
  const [program = "", ...args] = argv;
  const child = spawn(program, args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  const [code, signal] = (await once(child, "close")) as [number | null, string | null];
  clearTimeout(timer);
  assert.equal(code, 0, `${argv.join(" ")} failed (${signal ?? code}):\n${output}`);
}

interface Stage {
  readonly name: string | undefined;
  readonly image: string;
  /** Directory standing for the stage's `/`. */
  readonly root: string;
  workdir: string;
  env: Record<string, string>;
  user: string | undefined;
  cmd: string[] | undefined;
  expose: string[];
}

/**
 * Replays the Dockerfile. Understands exactly the instructions the project's
 * Dockerfile uses; anything else fails, so the replay never silently skips
 * a step the real build would take.
 */
async function replay(instructions: Instruction[], buildRoot: string) {
  const rules = parseDockerignore(readFileSync(join(projectRoot, ".dockerignore"), "utf8"));
  const stages: Stage[] = [];
  const copied: { stage: number; from: string; sources: string[]; dest: string }[] = [];
  const at = (i: Instruction) => `Dockerfile:${i.line} ${i.keyword} ${i.args}`;
  const inStage = (stage: Stage, path: string) =>
    join(stage.root, posix.resolve(stage.workdir, path));
  for (const ins of instructions) {
    const stage = stages.at(-1);
    if (ins.keyword === "FROM") {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
      assert.ok(m, at(ins));
      const root = join(buildRoot, `stage-${stages.length}`);
      await mkdir(root, { recursive: true });
      stages.push({
        name: m[2],
        image: m[1] ?? "",
        root,
        workdir: "/",
        env: {},
        user: undefined,
        cmd: undefined,
        expose: [],
      });
      continue;
    }
    assert.ok(stage, `${at(ins)}: before any FROM`);
    switch (ins.keyword) {
      case "WORKDIR":
        stage.workdir = posix.resolve(stage.workdir, ins.args);
        await mkdir(inStage(stage, "."), { recursive: true });
        break;
      case "ENV":
        for (const pair of ins.args.split(/\s+/)) {
          const [name, ...value] = pair.split("=");
          assert.ok(name && value.length > 0, `${at(ins)}: only NAME=value pairs are replayed`);
          stage.env[name] = value.join("=");
        }
        break;
      case "COPY": {
        const words = ins.args.split(/\s+/);
        let from: string | undefined;
        while (words[0]?.startsWith("--")) {
          const flag = words.shift() ?? "";
          const fromFlag = /^--from=(.+)$/.exec(flag);
          assert.ok(fromFlag, `${at(ins)}: ${flag} is not replayed`);
          from = fromFlag[1];
        }
        const dest = words.pop() ?? "";
        assert.ok(words.length > 0, `${at(ins)}: no source`);
        const intoDir = dest.endsWith("/") || words.length > 1;
        for (const src of words) {
          assert.ok(!/[*?[]/.test(src), `${at(ins)}: wildcards are not replayed`);
          const target = intoDir
            ? join(inStage(stage, dest), posix.basename(src))
            : inStage(stage, dest);
          if (from === undefined) {
            assert.ok(
              !src.startsWith("/") && !posix.normalize(src).startsWith(".."),
              `${at(ins)}: ${src} is outside the build context`,
            );
            const count = await copyFromContext(posix.normalize(src), target, rules);
            assert.ok(count > 0, `${at(ins)}: ${src} is excluded by .dockerignore or empty`);
          } else {
            const source = stages.find((s) => s.name === from);
            assert.ok(source, `${at(ins)}: no stage named ${from}`);
            await cp(join(source.root, posix.resolve(source.workdir, src)), target, {
              recursive: true,
            });
          }
        }
        copied.push({ stage: stages.length - 1, from: from ?? "context", sources: words, dest });
        break;
      }
      case "RUN": {
        // The only RUN the image needs: installing the locked production
        // dependencies. --prefer-offline only lets npm use its cache
        // without asking the registry first; the lockfile fixes the result.
        const words = ins.args.split(/\s+/);
        assert.deepEqual(words.slice(0, 2), ["npm", "ci"], `${at(ins)}: only npm ci is replayed`);
        assert.ok(
          words.every((w) => /^[\w=.-]+$/.test(w)),
          `${at(ins)}: one plain command, no shell syntax`,
        );
        await run(
          [process.execPath, npmCli(), ...words.slice(1), "--prefer-offline"],
          inStage(stage, "."),
          240_000,
        );
        break;
      }
      case "USER":
        stage.user = ins.args;
        break;
      case "EXPOSE":
        stage.expose.push(...ins.args.split(/\s+/));
        break;
      case "CMD":
        assert.ok(ins.args.startsWith("["), `${at(ins)}: CMD must be in exec form (JSON array)`);
        stage.cmd = JSON.parse(ins.args) as string[];
        break;
      default:
        assert.fail(`${at(ins)}: ${ins.keyword} is not replayed; extend this test`);
    }
  }
  const final = stages.at(-1);
  assert.ok(final, "Dockerfile has no FROM");
  return { stages, final, copied, appDir: inStage(final, ".") };
}

const dockerfile = readFileSync(join(projectRoot, "Dockerfile"), "utf8");
const instructions = parseDockerfile(dockerfile);
const packageJson = JSON.parse(readFileSync(join(projectRoot, "package.json"), "utf8")) as {
  devDependencies: Record<string, string>;
};
const lock = JSON.parse(readFileSync(join(projectRoot, "package-lock.json"), "utf8")) as {
  packages: Record<string, { dev?: boolean }>;
};

describe("Dockerfile", () => {
  it("builds on the Node release the project runs on (the node devDependency)", () => {
    const froms = instructions.filter((i) => i.keyword === "FROM").map((i) => i.args);
    assert.ok(froms.length >= 2, "multi-stage: dependencies are installed in a build stage");
    const nodeVersion = packageJson.devDependencies["node"];
    assert.match(nodeVersion ?? "", /^24\./);
    for (const from of froms) {
      const image = from.split(/\s+/)[0] ?? "";
      assert.match(image, /^node:24\.\d+\.\d+-[a-z]+-slim$/, `${image}: Node 24 slim, tag pinned`);
      assert.ok(image.startsWith(`node:${nodeVersion}-`), `${image} is Node ${nodeVersion}`);
    }
    assert.equal(process.versions.node, nodeVersion, "this test runs on the same Node");
  });

  it("runs as a non-root user, starts node directly, listens on 8080", () => {
    const final = instructions.slice(instructions.findLastIndex((i) => i.keyword === "FROM"));
    const user = final.findLast((i) => i.keyword === "USER")?.args;
    assert.ok(user !== undefined && !["root", "0", "0:0"].includes(user), `USER ${user}`);
    const cmd = final.findLast((i) => i.keyword === "CMD");
    assert.deepEqual(JSON.parse(cmd?.args ?? "null"), ["node", "server/main.ts"]);
    assert.ok(!final.some((i) => i.keyword === "ENTRYPOINT"), "no ENTRYPOINT in front of node");
    assert.ok(final.some((i) => i.keyword === "ENV" && /\bPORT=8080\b/.test(i.args)));
    assert.ok(final.some((i) => i.keyword === "EXPOSE" && i.args === "8080"));
    assert.ok(!instructions.some((i) => i.keyword === "HEALTHCHECK"));
  });

  it("installs production dependencies only, from the lockfile", () => {
    const runs = instructions.filter((i) => i.keyword === "RUN").map((i) => i.args);
    assert.equal(runs.length, 1);
    assert.match(runs[0] ?? "", /^npm ci( |$)/);
    assert.match(runs[0] ?? "", / --omit=dev( |$)/);
  });
});

describe("the image, replayed without Docker", () => {
  let buildRoot: string;
  let image: Awaited<ReturnType<typeof replay>>;
  let server: ChildProcess | undefined;
  let stdout = "";
  let stderr = "";
  let address = "";

  before(
    async () => {
      buildRoot = await mkdtemp(join(tmpdir(), "echo-image-"));
      // Module resolution walks up from the app: nothing above it may
      // provide packages the image would not have.
      for (let dir = buildRoot; dir !== dirname(dir); dir = dirname(dir)) {
        assert.ok(!existsSync(join(dirname(dir), "node_modules")), `${dirname(dir)}/node_modules`);
      }
      image = await replay(instructions, buildRoot);
      const cmd = image.final.cmd ?? [];
      assert.equal(cmd[0], "node");
      // As the container starts it: the image's environment, nothing
      // inherited from this test's process, only PORT/HOST changed so that
      // it listens on a free loopback port.
      server = spawn(process.execPath, cmd.slice(1), {
        cwd: image.appDir,
        env: {
          ...image.final.env,
          PATH: "/usr/local/bin:/usr/bin:/bin",
          HOME: image.appDir,
          PORT: "0",
          HOST: "127.0.0.1",
        },
        stdio: ["ignore", "pipe", "pipe"],
      });
      server.stdout?.on("data", (d: Buffer) => (stdout += d.toString()));
      server.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
      address = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no start: ${stdout}${stderr}`)), 15_000);
        server?.once("exit", (code) => reject(new Error(`exited ${code}: ${stdout}${stderr}`)));
        server?.stdout?.on("data", () => {
          const m = /"address":\["([^"]+)"\]/.exec(stdout);
          if (m?.[1]) {
            clearTimeout(timer);
            resolve(m[1]);
          }
        });
      });
    },
    { timeout: 300_000 },
  );

  after(async () => {
    if (server && server.exitCode === null && server.signalCode === null) {
      server.kill("SIGKILL");
    }
    await rm(buildRoot, { recursive: true, force: true });
  });

  it("holds exactly the runtime files", async () => {
    assert.deepEqual((await readdir(image.appDir)).sort(), expectedImageEntries);
    const sources = image.copied.filter((c) => c.from === "context").flatMap((c) => c.sources);
    assert.deepEqual(
      [...new Set(sources)].sort(),
      ["gen", "lib", "package-lock.json", "package.json", "server"],
      "the build context the Dockerfile reads",
    );
  });

  it("has no development dependency installed", () => {
    const devOnly = Object.entries(lock.packages)
      .filter(([path, meta]) => path.startsWith("node_modules/") && meta.dev === true)
      .map(([path]) => path);
    assert.ok(devOnly.includes("node_modules/node") && devOnly.includes("node_modules/typescript"));
    const present = devOnly.filter((path) => existsSync(join(image.appDir, path)));
    assert.deepEqual(present, []);
    assert.ok(existsSync(join(image.appDir, "node_modules/fastify/package.json")));
  });

  it("answers Echo over cleartext HTTP/2, as Cloud Run calls it", async () => {
    const echo = createEchoClient({ address, plaintext: true, idleConnectionTimeoutMs: 50 });
    try {
      const res = await echo.client.echo({ message: "from the image" });
      assert.equal(res.message, "from the image");
      assert.equal(res.instance?.service, "echo");
    } finally {
      echo.close();
    }
  });

  it("answers the gRPC health check Cloud Run's probes make", async () => {
    const transport = createGrpcTransport({
      baseUrl: `http://${address}`,
      idleConnectionTimeoutMs: 50,
    });
    const health = createClient(Health, transport);
    assert.equal((await health.check({ service: "" })).status, ServingStatus.SERVING);
  });

  it("logs JSON lines only, and exits 0 on SIGTERM well within Cloud Run's 10 s", async () => {
    assert.ok(server);
    const exited = once(server, "exit");
    const sent = Date.now();
    server.kill("SIGTERM");
    const [code] = (await exited) as [number | null];
    assert.equal(code, 0);
    assert.ok(Date.now() - sent < 5000);
    assert.equal(stderr, "", "nothing outside the structured log");
    for (const line of stdout.trimEnd().split("\n")) {
      const entry = JSON.parse(line) as { severity?: string };
      assert.ok(entry.severity, line);
    }
  });
});

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ApiConfigError, loadApiConfig } from "../../gateway/api-config.ts";
import { parseDescriptorSet } from "../../gateway/descriptor.ts";
import {
  type Env,
  main,
  renderApiConfig,
  renderTemplate,
  TemplateError,
  templateVariables,
} from "../../gateway/render-config.ts";
import { projectRoot, spawnNode } from "../helpers/process.ts";

const templateFile = "gateway/api_config.yaml.tmpl";
const template = readFileSync(`${projectRoot}${templateFile}`, "utf8");
const registry = parseDescriptorSet(readFileSync(`${projectRoot}gen/echo.pb`));

/** What a deployment to Cloud Run + API Gateway sets. */
const cloudEnv: Env = {
  GATEWAY_SERVICE_NAME: "*.apigateway.my-project.cloud.goog",
  BACKEND_ADDRESS: "grpcs://echo-abc123-uc.a.run.app",
  BACKEND_AUDIENCE: "https://echo-abc123-uc.a.run.app",
  JWKS_URI: "https://www.googleapis.com/oauth2/v3/certs",
  GATEWAY_AUDIENCE: "https://echo-gw-abc123.uc.gateway.dev",
};

/** What the local chain sets: several server instances behind one gateway. */
const localEnv: Env = {
  GATEWAY_SERVICE_NAME: "echo.local",
  BACKEND_ADDRESS: "grpc://127.0.0.1:8081,grpc://127.0.0.1:8082",
  BACKEND_AUDIENCE: "http://127.0.0.1",
  JWKS_URI: "http://127.0.0.1:9000/oauth2/v3/certs",
  GATEWAY_AUDIENCE: "https://gateway.local",
};

function catchError(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  assert.fail("expected an error");
}

describe("renderTemplate()", () => {
  it(`replaces \${NAME} and leaves $NAME alone`, () => {
    assert.equal(
      renderTemplate(`a: \${A}\nb: $A \${B}\${A}\n`, { A: "1", B: "two" }),
      "a: 1\nb: $A two1\n",
    );
  });

  it("names every missing variable at once, unset and empty alike", () => {
    const err = catchError(() =>
      renderTemplate(`x: \${ONE}\ny: \${TWO}\nz: \${ONE} \${THREE} \${FOUR}\n`, {
        TWO: "2",
        THREE: "",
      }),
    );
    assert.ok(err instanceof TemplateError);
    assert.equal(err.code, "ERR_TEMPLATE_INVALID");
    assert.deepEqual(err.missing, ["ONE", "THREE", "FOUR"]);
    assert.deepEqual(err.problems, [
      "ONE: not set (used on line 1)",
      "THREE: set but empty (used on line 3)",
      "FOUR: not set (used on line 3)",
    ]);
  });

  const badCases: { desc: string; text: string; env: Env; problem: string }[] = [
    {
      desc: "malformed reference",
      text: `a: \${A-B}\n`,
      env: {},
      problem: `line 1: "\${A-B}" is not a variable reference (write \${NAME}: letters, digits, _)`,
    },
    {
      desc: "unclosed reference",
      text: `a: \${A\nb: }\n`,
      env: {},
      problem: `line 1: unclosed "\${" (write \${NAME})`,
    },
    {
      desc: "value with a line break",
      text: `a: "\${A}"\n`,
      env: { A: "x\nevil: true" },
      problem: 'A: must be one line without control characters, " or \\ (used on line 1)',
    },
    {
      desc: "value with a quote",
      text: `a: "\${A}"\n`,
      env: { A: 'x"' },
      problem: 'A: must be one line without control characters, " or \\ (used on line 1)',
    },
  ];
  for (const tc of badCases) {
    it(`rejects: ${tc.desc}`, () => {
      const err = catchError(() => renderTemplate(tc.text, tc.env));
      assert.ok(err instanceof TemplateError);
      assert.deepEqual(err.problems, [tc.problem]);
    });
  }
});

describe("gateway/api_config.yaml.tmpl", () => {
  it("uses exactly the documented variables", () => {
    assert.deepEqual(templateVariables(template), [
      "GATEWAY_SERVICE_NAME",
      "BACKEND_ADDRESS",
      "BACKEND_AUDIENCE",
      "JWKS_URI",
      "GATEWAY_AUDIENCE",
    ]);
  });

  it("renders for Cloud Run and validates against gen/echo.pb", () => {
    const { text, plan } = renderApiConfig({ template, registry, env: cloudEnv });
    assert.ok(text.includes('address: "grpcs://echo-abc123-uc.a.run.app"'));
    assert.equal(plan.serviceName, "*.apigateway.my-project.cloud.goog");
    assert.equal(plan.methods.length, 4);
    assert.deepEqual(plan.warnings, []);
    for (const m of plan.methods) {
      assert.equal(m.apiKey, undefined, m.selector);
      assert.deepEqual(m.auth?.requirements[0]?.audiences, [
        "https://echo-gw-abc123.uc.gateway.dev",
      ]);
      assert.equal(m.auth?.requirements[0]?.provider.issuer, "https://accounts.google.com");
      assert.equal(m.backend.jwtAudience, "https://echo-abc123-uc.a.run.app");
      assert.deepEqual(
        m.backend.addresses.map((a) => [a.host, a.port, a.tls]),
        [["echo-abc123-uc.a.run.app", 443, true]],
      );
    }
    // The rendered text is what gcloud uploads; it loads the same way on its own.
    assert.equal(loadApiConfig(text, registry).methods.length, 4);
  });

  it("renders for the local chain with several backends when local", () => {
    const { plan } = renderApiConfig({ template, registry, env: localEnv, local: true });
    const backend = plan.methods[0]?.backend;
    assert.deepEqual(
      backend?.addresses.map((a) => a.port),
      [8081, 8082],
    );
    assert.equal(backend?.jwtAudience, "http://127.0.0.1");
    assert.equal(plan.providers[0]?.jwksUri, "http://127.0.0.1:9000/oauth2/v3/certs");
  });

  it("refuses several backends for API Gateway, pointing at the template line", () => {
    const err = catchError(() =>
      renderApiConfig({ template, registry, env: localEnv, sourceName: templateFile }),
    );
    assert.ok(err instanceof ApiConfigError);
    assert.equal(err.problems.length, 1);
    const [problem] = err.problems;
    assert.equal(problem?.path, "backend.rules[0].address");
    const line = template.split("\n").findIndex((l) => l.includes(`\${BACKEND_ADDRESS}`)) + 1;
    assert.equal(problem?.line, line);
    assert.ok(err.message.startsWith(`${templateFile}:${line}: backend.rules[0].address: several`));
  });
});

describe("main()", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "render-config-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  function capture() {
    const out: string[] = [];
    const err: string[] = [];
    return {
      io: {
        stdout: { write: (s: string) => out.push(s) },
        stderr: { write: (s: string) => err.push(s) },
      },
      out: () => out.join(""),
      err: () => err.join(""),
    };
  }
  const paths = () => [
    "--template",
    `${projectRoot}${templateFile}`,
    "--descriptor",
    `${projectRoot}gen/echo.pb`,
  ];

  it("writes the rendered config to stdout with --out -", async () => {
    const c = capture();
    const code = await main([...paths(), "--out", "-"], cloudEnv, c.io);
    assert.equal(code, 0, c.err());
    assert.equal(c.out(), renderTemplate(template, cloudEnv));
  });

  it("returns 2 for an unknown flag", async () => {
    const c = capture();
    assert.equal(await main(["--outt", "x"], cloudEnv, c.io), 2);
    assert.match(c.err(), /Unknown option '--outt'/);
    assert.match(c.err(), /^usage: /m);
  });

  it("returns 1 and names the descriptor it cannot read", async () => {
    const c = capture();
    const code = await main(
      [
        "--template",
        `${projectRoot}${templateFile}`,
        "--descriptor",
        join(dir, "none.pb"),
        "--out",
        "-",
      ],
      cloudEnv,
      c.io,
    );
    assert.equal(code, 1);
    assert.match(c.err(), /none\.pb: cannot read the descriptor set/);
    assert.equal(c.out(), "");
  });
});

describe("npm run gateway:config (the CLI)", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "render-config-cli-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const cleared = Object.fromEntries(Object.keys(cloudEnv).map((k) => [k, undefined]));

  it("writes api_config.yaml and exits 0", async () => {
    const out = join(dir, "api_config.yaml");
    const child = spawnNode(
      [
        "gateway/render-config.ts",
        "--template",
        templateFile,
        "--descriptor",
        "gen/echo.pb",
        "--out",
        out,
      ],
      { ...cleared, ...cloudEnv },
    );
    assert.equal(await child.exited, 0, child.stderr());
    assert.equal(await readFile(out, "utf8"), renderTemplate(template, cloudEnv));
    assert.match(
      child.stderr(),
      /^wrote .*api_config\.yaml: 4 methods of \*\.apigateway\.my-project\.cloud\.goog\n$/,
    );
  });

  it("exits 1 naming every missing variable, and writes nothing", async () => {
    const out = join(dir, "missing.yaml");
    const child = spawnNode(
      [
        "gateway/render-config.ts",
        "--template",
        templateFile,
        "--descriptor",
        "gen/echo.pb",
        "--out",
        out,
      ],
      { ...cleared, BACKEND_ADDRESS: cloudEnv.BACKEND_ADDRESS, JWKS_URI: "" },
    );
    assert.equal(await child.exited, 1);
    const lines = child.stderr().trimEnd().split("\n");
    assert.deepEqual(
      lines.map((l) => l.replace(/ \(used on line \d+\)$/, "")),
      [
        `${templateFile}: GATEWAY_SERVICE_NAME: not set`,
        `${templateFile}: BACKEND_AUDIENCE: not set`,
        `${templateFile}: JWKS_URI: set but empty`,
        `${templateFile}: GATEWAY_AUDIENCE: not set`,
      ],
    );
    assert.equal(existsSync(out), false);
  });

  it("exits 1 with the YAML path of an invalid value", async () => {
    const out = join(dir, "invalid.yaml");
    const child = spawnNode(
      [
        "gateway/render-config.ts",
        "--template",
        templateFile,
        "--descriptor",
        "gen/echo.pb",
        "--out",
        out,
      ],
      { ...cleared, ...cloudEnv, BACKEND_ADDRESS: "https://echo-abc123-uc.a.run.app" },
    );
    assert.equal(await child.exited, 1);
    assert.match(
      child.stderr(),
      /^gateway\/api_config\.yaml\.tmpl:\d+: backend\.rules\[0\]\.address: .*use grpcs:\/\//,
    );
    assert.equal(existsSync(out), false);
  });

  it("accepts several backends with --local", async () => {
    const out = join(dir, "local.yaml");
    const child = spawnNode(
      [
        "gateway/render-config.ts",
        "--template",
        templateFile,
        "--descriptor",
        "gen/echo.pb",
        "--out",
        out,
        "--local",
      ],
      { ...cleared, ...localEnv },
    );
    assert.equal(await child.exited, 0, child.stderr());
    assert.match(
      await readFile(out, "utf8"),
      /address: "grpc:\/\/127\.0\.0\.1:8081,grpc:\/\/127\.0\.0\.1:8082"/,
    );
  });
});

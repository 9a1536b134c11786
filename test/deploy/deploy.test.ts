/**
 * deploy/deploy.ts: the runbook as data (compared line by line with a
 * literal, so a change to it shows in review), the command line, and real
 * runs against a stand-in `gcloud` on PATH that answers like the real one
 * and records what it was asked.
 */
import assert from "node:assert/strict";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parse } from "yaml";
import {
  type DeployOptions,
  dryRunLines,
  formatCommand,
  main,
  manifestEnv,
  parseDeployArgs,
  planDeployment,
  shellQuote,
  UsageError,
} from "../../deploy/deploy.ts";
import { spawnNode } from "../helpers/process.ts";

const sample: DeployOptions = {
  project: "demo-project",
  region: "us-central1",
  service: "echo",
  gateway: "echo-gw",
  api: "echo-api",
  image: undefined,
  repository: "echo",
  stamp: "20250102-030405",
  workDir: "/tmp/echo-deploy",
};

const sampleArgs = [
  "--project=demo-project",
  "--region=us-central1",
  "--stamp=20250102-030405",
  "--work-dir=/tmp/echo-deploy",
];

/** The first deployment of the sample, as `--dry-run` prints it. */
const expectedDryRun = [
  "gcloud services enable run.googleapis.com iam.googleapis.com iamcredentials.googleapis.com apigateway.googleapis.com servicemanagement.googleapis.com servicecontrol.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com --project=demo-project",
  "gcloud projects describe demo-project '--format=value(projectNumber)'",
  "gcloud iam service-accounts describe echo-server@demo-project.iam.gserviceaccount.com --project=demo-project",
  "gcloud iam service-accounts create echo-server '--display-name=Echo server (Cloud Run runtime)' --project=demo-project",
  "gcloud iam service-accounts describe echo-gateway@demo-project.iam.gserviceaccount.com --project=demo-project",
  "gcloud iam service-accounts create echo-gateway '--display-name=Echo API Gateway backend identity' --project=demo-project",
  "gcloud iam service-accounts describe echo-client@demo-project.iam.gserviceaccount.com --project=demo-project",
  "gcloud iam service-accounts create echo-client '--display-name=Echo client (calls the gateway)' --project=demo-project",
  "gcloud artifacts repositories describe echo --location=us-central1 --project=demo-project",
  "gcloud artifacts repositories create echo --repository-format=docker --location=us-central1 --project=demo-project",
  "gcloud builds submit . --tag=us-central1-docker.pkg.dev/demo-project/echo/echo:20250102-030405 --project=demo-project",
  "SERVICE_NAME=echo IMAGE=us-central1-docker.pkg.dev/demo-project/echo/echo:20250102-030405 SERVICE_URL=https://echo-PROJECT_NUMBER.us-central1.run.app SERVER_SERVICE_ACCOUNT=echo-server@demo-project.iam.gserviceaccount.com GATEWAY_SERVICE_ACCOUNT=echo-gateway@demo-project.iam.gserviceaccount.com PROJECT_ID=demo-project node deploy/deploy.ts render-service --out=/tmp/echo-deploy/service.yaml",
  "gcloud run services replace /tmp/echo-deploy/service.yaml --region=us-central1 --project=demo-project",
  "gcloud run services add-iam-policy-binding echo --member=serviceAccount:echo-gateway@demo-project.iam.gserviceaccount.com --role=roles/run.invoker --region=us-central1 --project=demo-project",
  "gcloud run services describe echo --region=us-central1 --project=demo-project '--format=value(status.url)'",
  "gcloud api-gateway apis describe echo-api --project=demo-project",
  "gcloud api-gateway apis create echo-api --project=demo-project",
  "gcloud api-gateway apis describe echo-api --project=demo-project '--format=value(managedService)'",
  "gcloud services enable MANAGED_SERVICE --project=demo-project",
  "gcloud api-gateway gateways describe echo-gw --location=us-central1 --project=demo-project",
  "GATEWAY_SERVICE_NAME='*.apigateway.demo-project.cloud.goog' BACKEND_ADDRESS=grpcs://echo-PROJECT_NUMBER.us-central1.run.app BACKEND_AUDIENCE=https://echo-PROJECT_NUMBER.us-central1.run.app JWKS_URI=https://www.googleapis.com/oauth2/v3/certs GATEWAY_AUDIENCE=https://echo-gw.pending.invalid node gateway/render-config.ts --template=gateway/api_config.yaml.tmpl --descriptor=gen/echo.pb --out=/tmp/echo-deploy/api_config.init.yaml",
  "gcloud api-gateway api-configs create echo-api-20250102-030405-init --api=echo-api --grpc-files=/tmp/echo-deploy/api_config.init.yaml,gen/echo.pb --backend-auth-service-account=echo-gateway@demo-project.iam.gserviceaccount.com --project=demo-project",
  "gcloud api-gateway api-configs describe echo-api-20250102-030405-init --api=echo-api --project=demo-project '--format=value(state)'",
  "gcloud api-gateway gateways create echo-gw --api=echo-api --api-config=echo-api-20250102-030405-init --location=us-central1 --project=demo-project",
  "gcloud api-gateway gateways describe echo-gw --location=us-central1 --project=demo-project '--format=value(defaultHostname)'",
  "GATEWAY_SERVICE_NAME='*.apigateway.demo-project.cloud.goog' BACKEND_ADDRESS=grpcs://echo-PROJECT_NUMBER.us-central1.run.app BACKEND_AUDIENCE=https://echo-PROJECT_NUMBER.us-central1.run.app JWKS_URI=https://www.googleapis.com/oauth2/v3/certs GATEWAY_AUDIENCE=https://GATEWAY_HOST node gateway/render-config.ts --template=gateway/api_config.yaml.tmpl --descriptor=gen/echo.pb --out=/tmp/echo-deploy/api_config.yaml",
  "gcloud api-gateway api-configs create echo-api-20250102-030405 --api=echo-api --grpc-files=/tmp/echo-deploy/api_config.yaml,gen/echo.pb --backend-auth-service-account=echo-gateway@demo-project.iam.gserviceaccount.com --project=demo-project",
  "gcloud api-gateway api-configs describe echo-api-20250102-030405 --api=echo-api --project=demo-project '--format=value(state)'",
  "gcloud api-gateway gateways update echo-gw --api=echo-api --api-config=echo-api-20250102-030405 --location=us-central1 --project=demo-project",
  "# gateway: https://GATEWAY_HOST",
  "# call it:",
  "#   npm run client -- --address GATEWAY_HOST:443 --audience https://GATEWAY_HOST --impersonate-service-account echo-client@demo-project.iam.gserviceaccount.com",
  "# impersonating echo-client@demo-project.iam.gserviceaccount.com needs roles/iam.serviceAccountTokenCreator on it, e.g.:",
  "#   gcloud iam service-accounts add-iam-policy-binding echo-client@demo-project.iam.gserviceaccount.com --member=user:YOU@example.com --role=roles/iam.serviceAccountTokenCreator --project=demo-project",
];

/** Collects what main() writes. */
function captureIo() {
  let stdout = "";
  let stderr = "";
  return {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: { write: (s: string) => (stderr += s) },
    },
    stdout: () => stdout,
    stderr: () => stderr,
  };
}

describe("planDeployment()", () => {
  it("plans the first deployment of the sample project", () => {
    assert.deepEqual(dryRunLines(sample), expectedDryRun);
  });

  it("describes before it creates, and creates only what is missing", () => {
    const commands = planDeployment(sample);
    for (const [i, command] of commands.entries()) {
      // API configs are immutable and get a new id every run: always created.
      if (command.argv.includes("create") && !command.argv.includes("api-configs")) {
        assert.ok(command.unlessExists, `${formatCommand(command)} must be guarded by a probe`);
        const probe = commands.findIndex((c) => c.probe === command.unlessExists);
        assert.ok(probe >= 0 && probe < i, `probe for ${command.unlessExists} runs first`);
      }
    }
  });

  it("grants run.invoker to the gateway's account and nobody else", () => {
    const grants = planDeployment(sample)
      .map((c) => formatCommand(c))
      .filter((line) => line.includes("add-iam-policy-binding"));
    assert.equal(grants.length, 1);
    assert.match(
      grants[0] ?? "",
      / --member=serviceAccount:echo-gateway@demo-project\.iam\.gserviceaccount\.com --role=roles\/run\.invoker /,
    );
  });

  it("with --image deploys that image and builds nothing", () => {
    const image = "europe-docker.pkg.dev/other/images/echo@sha256:abc";
    const lines = planDeployment({ ...sample, image }).map((c) => formatCommand(c));
    assert.ok(!lines.some((l) => /builds submit|artifacts repositories|cloudbuild/.test(l)));
    assert.ok(lines.some((l) => l.includes(`IMAGE=${image} `)));
    assert.equal(lines.length, expectedDryRun.length - 5 - 3);
  });
});

describe("parseDeployArgs()", () => {
  it("fills the defaults", () => {
    const parsed = parseDeployArgs(
      ["--project", "demo-project", "--region", "us-central1"],
      new Date("2025-01-02T03:04:05.678Z"),
      "/var/tmp",
    );
    assert.deepEqual(parsed.options, {
      ...sample,
      workDir: "/var/tmp/echo-deploy-20250102-030405",
    });
    assert.equal(parsed.dryRun, false);
  });

  it("reports every problem at once", () => {
    assert.throws(
      () => parseDeployArgs(["--service=Echo_Service", "--gateway=-gw"]),
      (err: unknown) => {
        assert.ok(err instanceof UsageError);
        assert.equal(err.problems.length, 4);
        assert.match(err.problems[0] ?? "", /^--project is required/);
        assert.match(err.problems[1] ?? "", /^--region is required/);
        assert.match(err.problems[2] ?? "", /^--service: "Echo_Service"/);
        assert.match(err.problems[3] ?? "", /^--gateway: "-gw"/);
        return true;
      },
    );
  });
});

describe("shellQuote()", () => {
  it("leaves plain words alone and single-quotes the rest", () => {
    assert.equal(shellQuote("--project=demo-project"), "--project=demo-project");
    assert.equal(shellQuote("value(state)"), "'value(state)'");
    assert.equal(shellQuote("*.apigateway.p.cloud.goog"), "'*.apigateway.p.cloud.goog'");
    assert.equal(shellQuote("it's"), "'it'\\''s'");
    assert.equal(shellQuote(""), "''");
  });
});

describe("main()", () => {
  it("without --project prints one line and exits 2", async () => {
    const out = captureIo();
    const code = await main(["--region=us-central1", "--dry-run"], { io: out.io, env: {} });
    assert.equal(code, 2);
    assert.equal(
      out.stderr(),
      "deploy: --project is required: the Google Cloud project id to deploy to\n",
    );
    assert.equal(out.stdout(), "");
  });

  it("without gcloud on PATH prints one line and exits 2, having run nothing", async () => {
    const out = captureIo();
    const code = await main(sampleArgs, { io: out.io, env: { PATH: "/nonexistent" } });
    assert.equal(code, 2);
    assert.match(out.stderr(), /^deploy: gcloud is not on PATH; [^\n]*\n$/);
  });
});

describe("node deploy/deploy.ts", () => {
  it("--dry-run prints the commands and exits 0", async () => {
    const run = spawnNode(["deploy/deploy.ts", ...sampleArgs, "--dry-run"], {
      PATH: "/nonexistent",
    });
    assert.equal(await run.exited, 0, run.stderr());
    assert.deepEqual(run.stdout().trimEnd().split("\n"), expectedDryRun);
  });

  it("without --project exits 2 with one line", async () => {
    const run = spawnNode(["deploy/deploy.ts", "--region=us-central1"]);
    assert.equal(await run.exited, 2);
    assert.equal(
      run.stderr(),
      "deploy: --project is required: the Google Cloud project id to deploy to\n",
    );
  });
});

/**
 * A stand-in for gcloud: answers describes from a state file (what exists),
 * prints the values real gcloud prints for the --format expressions the
 * runbook uses, remembers what create/replace make, and logs every call.
 * Uploaded files are copied next to the log so the test can read them.
 */
const fakeGcloud = `
const fs = require("node:fs");
const path = require("node:path");
const dir = process.env.FAKE_GCLOUD_DIR;
const args = process.argv.slice(2);
fs.appendFileSync(path.join(dir, "calls.jsonl"), JSON.stringify(args) + "\\n");
const statePath = path.join(dir, "state.json");
const state = JSON.parse(fs.readFileSync(statePath, "utf8"));
const words = args.filter((a) => !a.startsWith("--"));
const flag = (name) => args.find((a) => a.startsWith("--" + name + "="))?.split("=").slice(1).join("=");
const key = words.slice(0, -2).join(" ") + " " + words[words.length - 1];
const verb = words[words.length - 2];
const format = flag("format");
const save = () => fs.writeFileSync(statePath, JSON.stringify(state));
if (format === "value(projectNumber)") { console.log(state.projectNumber); process.exit(0); }
if (format === "value(status.url)") { console.log(state.serviceUrl); process.exit(0); }
if (format === "value(managedService)") { console.log("echo-api-0a1b2c3d4e5f6.apigateway.demo-project.cloud.goog"); process.exit(0); }
if (format === "value(defaultHostname)") { console.log("echo-gw-abc123.uc.gateway.dev"); process.exit(0); }
if (format === "value(state)") { console.log("ACTIVE"); process.exit(0); }
if (verb === "describe") {
  if (state.exists.includes(key)) process.exit(0);
  console.error("ERROR: (gcloud) NOT_FOUND: " + key);
  process.exit(1);
}
if (verb === "create") {
  if (state.exists.includes(key)) { console.error("ERROR: ALREADY_EXISTS " + key); process.exit(1); }
  if (flag("service-account-key") === undefined && key.startsWith("iam service-accounts")) {
    state.exists.push("iam service-accounts " + words[words.length - 1] + "@demo-project.iam.gserviceaccount.com");
  } else {
    state.exists.push(key);
  }
  save();
}
if (words.join(" ").startsWith("run services replace")) {
  fs.copyFileSync(words[3], path.join(dir, "service.yaml"));
}
const grpcFiles = flag("grpc-files");
if (grpcFiles) {
  fs.copyFileSync(grpcFiles.split(",")[0], path.join(dir, words[words.length - 1] + ".yaml"));
}
`;

describe("node deploy/deploy.ts against a stand-in gcloud", () => {
  let dir: string;
  let bin: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "echo-deploy-test-"));
    bin = join(dir, "bin");
    await rm(bin, { recursive: true, force: true });
    await import("node:fs/promises").then((fs) => fs.mkdir(bin));
    await writeFile(join(bin, "gcloud"), `#!${process.execPath}\n${fakeGcloud}`);
    await chmod(join(bin, "gcloud"), 0o755);
  });
  after(() => rm(dir, { recursive: true, force: true }));

  /** Runs the script for real with the stand-in first on PATH. */
  async function deploy(state: { exists: string[]; serviceUrl?: string }) {
    const work = await mkdtemp(join(dir, "run-"));
    await writeFile(
      join(work, "state.json"),
      JSON.stringify({
        projectNumber: "123456789012",
        serviceUrl: "https://echo-123456789012.us-central1.run.app",
        ...state,
      }),
    );
    const run = spawnNode(
      ["deploy/deploy.ts", ...sampleArgs.slice(0, 3), `--work-dir=${join(work, "out")}`],
      { PATH: `${bin}:${process.env["PATH"]}`, FAKE_GCLOUD_DIR: work },
    );
    const code = await run.exited;
    const calls = (await readFile(join(work, "calls.jsonl"), "utf8"))
      .trimEnd()
      .split("\n")
      .map((l) => `gcloud ${(JSON.parse(l) as string[]).map(shellQuote).join(" ")}`);
    return { code, run, calls, work };
  }

  /** The dry run's gcloud lines, with the stand-in's answers in place of the placeholders. */
  function expectedCalls(lines: readonly string[], work: string): string[] {
    return lines
      .filter((l) => l.startsWith("gcloud "))
      .map((l) =>
        l
          .replaceAll("/tmp/echo-deploy/", `${join(work, "out")}/`)
          .replaceAll("PROJECT_NUMBER", "123456789012")
          .replaceAll(
            "MANAGED_SERVICE",
            "echo-api-0a1b2c3d4e5f6.apigateway.demo-project.cloud.goog",
          ),
      );
  }

  it("first deployment: runs exactly the dry run's commands and prints how to call the gateway", async () => {
    const { code, run, calls, work } = await deploy({ exists: [] });
    assert.equal(code, 0, run.stderr());
    assert.deepEqual(calls, expectedCalls(expectedDryRun, work));

    const service = parse(await readFile(join(work, "service.yaml"), "utf8"));
    const env = manifestEnv(service);
    assert.equal(env["ECHO_AUDIENCES"], "https://echo-123456789012.us-central1.run.app");
    assert.equal(
      env["ECHO_ALLOWED_PRINCIPALS"],
      "echo-gateway@demo-project.iam.gserviceaccount.com",
    );

    const bootstrap = await readFile(join(work, "echo-api-20250102-030405-init.yaml"), "utf8");
    assert.match(bootstrap, /audiences: "https:\/\/echo-gw\.pending\.invalid"/);
    const config = await readFile(join(work, "echo-api-20250102-030405.yaml"), "utf8");
    assert.match(config, /address: "grpcs:\/\/echo-123456789012\.us-central1\.run\.app"/);
    assert.match(config, /jwt_audience: "https:\/\/echo-123456789012\.us-central1\.run\.app"/);
    assert.match(config, /audiences: "https:\/\/echo-gw-abc123\.uc\.gateway\.dev"/);

    assert.equal(
      run.stdout(),
      [
        "gateway: https://echo-gw-abc123.uc.gateway.dev",
        "call it:",
        "  npm run client -- --address echo-gw-abc123.uc.gateway.dev:443 --audience https://echo-gw-abc123.uc.gateway.dev --impersonate-service-account echo-client@demo-project.iam.gserviceaccount.com",
        "impersonating echo-client@demo-project.iam.gserviceaccount.com needs roles/iam.serviceAccountTokenCreator on it, e.g.:",
        "  gcloud iam service-accounts add-iam-policy-binding echo-client@demo-project.iam.gserviceaccount.com --member=user:YOU@example.com --role=roles/iam.serviceAccountTokenCreator --project=demo-project",
        "",
      ].join("\n"),
    );
  });

  it("redeployment: creates nothing, rolls a new config out to the existing gateway", async () => {
    const { code, run, calls, work } = await deploy({
      exists: [
        "iam service-accounts echo-server@demo-project.iam.gserviceaccount.com",
        "iam service-accounts echo-gateway@demo-project.iam.gserviceaccount.com",
        "iam service-accounts echo-client@demo-project.iam.gserviceaccount.com",
        "artifacts repositories echo",
        "api-gateway apis echo-api",
        "api-gateway gateways echo-gw",
      ],
    });
    assert.equal(code, 0, run.stderr());
    const skipped = (l: string) =>
      /(service-accounts|repositories|apis|gateways) create /.test(l) || l.includes("-init");
    assert.deepEqual(
      calls,
      expectedCalls(expectedDryRun, work).filter((l) => !skipped(l)),
    );
    assert.ok(calls.at(-1)?.startsWith("gcloud api-gateway gateways update echo-gw "));
  });

  it("stops before the gateway when Cloud Run reports another URL than the server expects", async () => {
    const { code, run, calls } = await deploy({
      exists: [],
      serviceUrl: "https://echo-x7y8z9-uc.a.run.app",
    });
    assert.equal(code, 1);
    assert.match(
      run.stderr(),
      /deploy: failed: read the service URL .*: Cloud Run reports https:\/\/echo-x7y8z9-uc\.a\.run\.app, but the server was configured for https:\/\/echo-123456789012\.us-central1\.run\.app/,
    );
    assert.ok(calls.at(-1)?.startsWith("gcloud run services describe echo "));
  });
});

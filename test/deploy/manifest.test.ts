/**
 * deploy/service.yaml, the Cloud Run service: parsed as Cloud Run would read
 * it, and its environment fed to the server's real configuration loader.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { parse } from "yaml";
import { manifestEnv, manifestVariables, renderServiceManifest } from "../../deploy/deploy.ts";
import { renderTemplate, TemplateError, templateVariables } from "../../gateway/render-config.ts";
import { ConfigError } from "../../lib/config-error.ts";
import { loadServerConfig } from "../../server/config.ts";
import { projectRoot } from "../helpers/process.ts";

const template = readFileSync(`${projectRoot}deploy/service.yaml`, "utf8");

/** What deploy/deploy.ts fills in for a sample project. */
const sample = {
  SERVICE_NAME: "echo",
  IMAGE: "us-central1-docker.pkg.dev/demo-project/echo/echo:20250102-030405",
  SERVICE_URL: "https://echo-123456789012.us-central1.run.app",
  SERVER_SERVICE_ACCOUNT: "echo-server@demo-project.iam.gserviceaccount.com",
  GATEWAY_SERVICE_ACCOUNT: "echo-gateway@demo-project.iam.gserviceaccount.com",
  PROJECT_ID: "demo-project",
};

interface Probe {
  grpc?: { port?: number; service?: string };
  httpGet?: unknown;
  tcpSocket?: unknown;
  periodSeconds?: number;
  timeoutSeconds?: number;
  failureThreshold?: number;
}

/** The parts of a Knative Service this test reads. */
interface KnativeService {
  apiVersion: string;
  kind: string;
  metadata: { name: string; annotations: Record<string, string> };
  spec: {
    template: {
      metadata: { annotations: Record<string, string> };
      spec: {
        serviceAccountName: string;
        containerConcurrency: number;
        timeoutSeconds: number;
        containers: {
          image: string;
          ports: { name: string; containerPort: number }[];
          env: { name: string; value: string }[];
          resources: { limits: { cpu: string; memory: string } };
          startupProbe: Probe;
          livenessProbe: Probe;
        }[];
      };
    };
  };
}

const rendered = renderTemplate(template, sample);
const service = parse(rendered) as KnativeService;
const revision = service.spec.template;
const container = revision.spec.containers[0];

describe("deploy/service.yaml", () => {
  it("uses exactly the variables deploy.ts fills", () => {
    assert.deepEqual(templateVariables(template).sort(), [...manifestVariables].sort());
  });

  it("is a Knative Service with one container", () => {
    assert.equal(service.apiVersion, "serving.knative.dev/v1");
    assert.equal(service.kind, "Service");
    assert.equal(service.metadata.name, "echo");
    assert.equal(revision.spec.containers.length, 1);
    assert.equal(container?.image, sample.IMAGE);
    assert.equal(revision.spec.serviceAccountName, sample.SERVER_SERVICE_ACCOUNT);
  });

  it("names the container port h2c, so Cloud Run forwards HTTP/2 end to end", () => {
    assert.deepEqual(container?.ports, [{ name: "h2c", containerPort: 8080 }]);
  });

  it("probes grpc.health.v1 on the serving port, at start-up and while live", () => {
    for (const probe of [container?.startupProbe, container?.livenessProbe]) {
      assert.deepEqual(probe?.grpc, { port: 8080, service: "" });
      assert.equal(probe?.httpGet, undefined);
      assert.equal(probe?.tcpSocket, undefined);
      // Cloud Run rejects a timeout longer than the period.
      assert.ok((probe?.timeoutSeconds ?? 1) <= (probe?.periodSeconds ?? 10));
    }
  });

  it("sets concurrency, request timeout, scaling, resources and ingress", () => {
    assert.equal(revision.spec.containerConcurrency, 80);
    assert.ok(revision.spec.timeoutSeconds > 0 && revision.spec.timeoutSeconds <= 3600);
    const annotations = revision.metadata.annotations;
    assert.equal(annotations["autoscaling.knative.dev/minScale"], "0");
    assert.equal(annotations["autoscaling.knative.dev/maxScale"], "10");
    assert.deepEqual(container?.resources.limits, { cpu: "1", memory: "512Mi" });
    assert.equal(service.metadata.annotations["run.googleapis.com/ingress"], "all");
  });

  it("keeps Cloud Run's invoker check on (cloud-run auth mode depends on it)", () => {
    for (const annotations of [service.metadata.annotations, revision.metadata.annotations]) {
      assert.equal(annotations["run.googleapis.com/invoker-iam-disabled"], undefined);
    }
  });

  it("sets no variable Cloud Run reserves", () => {
    const names = Object.keys(manifestEnv(service));
    for (const reserved of ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"]) {
      assert.ok(!names.includes(reserved), `${reserved} is set by Cloud Run`);
    }
  });

  it("gives the server an environment loadServerConfig accepts, trusting Cloud Run's check", () => {
    // As Cloud Run starts the container: the manifest's env, PORT from the
    // container port, K_SERVICE/K_REVISION from the platform.
    const config = loadServerConfig(
      { ...manifestEnv(service), PORT: "8080", K_SERVICE: "echo", K_REVISION: "echo-00001-abc" },
      [],
    );
    assert.equal(config.port, 8080);
    assert.equal(config.host, "0.0.0.0");
    assert.equal(config.tls, undefined, "cleartext h2c: Cloud Run terminates TLS");
    assert.equal(config.auth.mode, "cloud-run");
    assert.deepEqual(config.auth.audiences, [sample.SERVICE_URL]);
    assert.deepEqual(config.auth.allowedPrincipals, [sample.GATEWAY_SERVICE_ACCOUNT]);
    assert.deepEqual(config.auth.issuers, ["https://accounts.google.com", "accounts.google.com"]);
    assert.equal(config.projectId, "demo-project");
    assert.ok(config.shutdownTimeoutMs < 10_000, "drains before Cloud Run's SIGKILL at 10 s");
    assert.equal(config.logLevel, "info");
  });
});

describe("renderServiceManifest()", () => {
  it("returns the filled manifest", () => {
    assert.equal(renderServiceManifest(template, sample), rendered);
  });

  it("names every variable that is missing", () => {
    assert.throws(
      () => renderServiceManifest(template, { ...sample, SERVICE_URL: "", IMAGE: undefined }),
      (err: unknown) => {
        assert.ok(err instanceof TemplateError);
        assert.deepEqual([...err.missing].sort(), ["IMAGE", "SERVICE_URL"]);
        return true;
      },
    );
  });

  it("rejects a manifest whose environment the server would refuse at start", () => {
    const broken = template.replace("value: cloud-run", "value: trust-me");
    assert.throws(
      () => renderServiceManifest(broken, sample),
      (err: unknown) => {
        assert.ok(err instanceof ConfigError);
        assert.match(err.problems.join("\n"), /ECHO_AUTH_MODE: "trust-me"/);
        return true;
      },
    );
  });
});

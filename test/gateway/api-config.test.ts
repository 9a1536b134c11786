import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import {
  type ApiConfigPlan,
  ApiConfigError,
  audienceMatches,
  defaultApiKeyLocations,
  defaultJwtLocations,
  loadApiConfig,
  loadApiConfigFiles,
  type LoadApiConfigOptions,
  type MethodPlan,
  normalizeAudience,
} from "../../gateway/api-config.ts";
import { DescriptorError, listMethods, parseDescriptorSet } from "../../gateway/descriptor.ts";
import { projectRoot } from "../helpers/process.ts";

const descriptorFile = `${projectRoot}gen/echo.pb`;
const registry = parseDescriptorSet(readFileSync(descriptorFile), descriptorFile);

const echo = "echo.v1.EchoService.Echo";
const serverStream = "echo.v1.EchoService.EchoServerStream";
const clientStream = "echo.v1.EchoService.EchoClientStream";
const bidi = "echo.v1.EchoService.EchoBidiStream";

type Config = Record<string, unknown>;

/** A complete, valid config as the YAML would parse; each test changes a copy. */
function baseConfig(): Config {
  return {
    type: "google.api.Service",
    config_version: 3,
    name: "echo.example.com",
    title: "Echo",
    apis: [{ name: "echo.v1.EchoService" }],
    usage: { rules: [{ selector: "*", allow_unregistered_calls: true }] },
    backend: {
      rules: [{ selector: "*", address: "grpcs://echo-xyz.a.run.app" }],
    },
    authentication: {
      providers: [
        {
          id: "google_id_token",
          issuer: "https://accounts.google.com",
          jwks_uri: "https://www.googleapis.com/oauth2/v3/certs",
          audiences: "https://gw.example.com",
        },
      ],
      rules: [
        { selector: "echo.v1.EchoService.*", requirements: [{ provider_id: "google_id_token" }] },
      ],
    },
  };
}

function load(config: Config | string, options: LoadApiConfigOptions = {}): ApiConfigPlan {
  return loadApiConfig(config, registry, options);
}

function method(plan: ApiConfigPlan, selector: string): MethodPlan {
  const found = plan.methods.find((m) => m.selector === selector);
  assert.ok(found, `no method ${selector}`);
  return found;
}

/** The problems loadApiConfig throws, or a failure when it does not throw. */
function problemsOf(config: Config | string, options: LoadApiConfigOptions = {}) {
  try {
    load(config, options);
  } catch (err) {
    assert.ok(err instanceof ApiConfigError, `unexpected ${String(err)}`);
    assert.equal(err.code, "ERR_API_CONFIG_INVALID");
    return err.problems;
  }
  assert.fail("expected ApiConfigError");
}

describe("listMethods()", () => {
  it("lists the EchoService methods with paths and streaming flags", () => {
    const methods = listMethods(registry, ["echo.v1.EchoService"]);
    assert.deepEqual(
      methods.map((m) => [m.selector, m.path, m.requestStreaming, m.responseStreaming]),
      [
        [echo, "/echo.v1.EchoService/Echo", false, false],
        [serverStream, "/echo.v1.EchoService/EchoServerStream", false, true],
        [clientStream, "/echo.v1.EchoService/EchoClientStream", true, false],
        [bidi, "/echo.v1.EchoService/EchoBidiStream", true, true],
      ],
    );
    assert.equal(methods[0]?.service, "echo.v1.EchoService");
    assert.equal(methods[0]?.name, "Echo");
    assert.equal(methods[0]?.requestType, "echo.v1.EchoRequest");
  });

  it("lists every service when none is named", () => {
    assert.equal(listMethods(registry).length, 4);
  });
});

describe("parseDescriptorSet()", () => {
  it("rejects bytes that are not a descriptor set", () => {
    assert.throws(
      () => parseDescriptorSet(new TextEncoder().encode("type: google.api.Service\n"), "x.pb"),
      (err: unknown) =>
        err instanceof DescriptorError &&
        err.code === "ERR_DESCRIPTOR_INVALID" &&
        err.message.startsWith("x.pb: "),
    );
  });
});

describe("loadApiConfig()", () => {
  it("plans every method of the listed services", () => {
    const plan = load(baseConfig());
    assert.equal(plan.serviceName, "echo.example.com");
    assert.equal(plan.title, "Echo");
    assert.equal(plan.local, false);
    assert.deepEqual(
      plan.methods.map((m) => m.selector),
      [echo, serverStream, clientStream, bidi],
    );
    assert.equal(plan.methodsByPath.get("/echo.v1.EchoService/Echo"), method(plan, echo));
    assert.equal(plan.methodsByPath.get("/echo.v1.EchoService/Nope"), undefined);
    assert.deepEqual(plan.warnings, []);

    const unary = method(plan, echo);
    assert.deepEqual(unary.backend.addresses, [
      {
        scheme: "grpcs",
        host: "echo-xyz.a.run.app",
        port: 443,
        tls: true,
        authority: "echo-xyz.a.run.app",
        address: "grpcs://echo-xyz.a.run.app",
      },
    ]);
    assert.equal(unary.apiKey, undefined);
    const provider = plan.providers[0];
    assert.ok(provider);
    assert.deepEqual(unary.auth, {
      requirements: [{ provider, audiences: ["https://gw.example.com"] }],
      allowWithoutCredential: false,
    });
    assert.equal(provider.jwksUri, "https://www.googleapis.com/oauth2/v3/certs");
    assert.equal(provider.discoveryUri, undefined);
    assert.equal(provider.locations, defaultJwtLocations);
  });

  it("returns a deeply frozen plan", () => {
    const plan = load(baseConfig());
    const unary = method(plan, echo);
    assert.ok(Object.isFrozen(plan));
    assert.ok(Object.isFrozen(plan.methods));
    assert.ok(Object.isFrozen(unary.backend.addresses[0]));
    assert.ok(Object.isFrozen(plan.providers[0]?.audiences));
    assert.throws(() => {
      (unary.backend as { deadlineMs: number | undefined }).deadlineMs = 1;
    }, TypeError);
  });

  it("reads YAML text and agrees with the parsed form", () => {
    const text = [
      "type: google.api.Service",
      "config_version: 3",
      "name: echo.example.com",
      "apis:",
      "  - name: echo.v1.EchoService",
      "backend:",
      "  rules:",
      '    - selector: "*"',
      "      address: grpc://127.0.0.1:9000",
      "      deadline: 2.5",
      "",
    ].join("\n");
    const plan = load(text);
    assert.equal(method(plan, echo).backend.deadlineMs, 2500);
    assert.equal(method(plan, echo).auth, undefined);
  });

  it("expands selectors, the last matching rule winning per method", () => {
    const config = baseConfig();
    config.backend = {
      rules: [
        { selector: "*", address: "grpc://a.internal:1" },
        { selector: echo, address: "grpc://b.internal:2" },
        { selector: `${bidi}, ${echo}`, address: "grpc://c.internal:3" },
        { selector: "echo.v1.*", address: "grpc://d.internal:4", deadline: 5 },
        { selector: serverStream, address: "grpc://e.internal:5" },
      ],
    };
    config.authentication = {
      providers: [{ id: "p", issuer: "https://issuer.example" }],
      rules: [
        { selector: "*", requirements: [{ provider_id: "p" }] },
        { selector: echo, requirements: [] },
        {
          selector: clientStream,
          allow_without_credential: true,
          requirements: [{ provider_id: "p" }],
        },
      ],
    };
    const plan = load(config);
    const hostOf = (selector: string) => method(plan, selector).backend.addresses[0]?.host;
    assert.equal(hostOf(echo), "d.internal");
    assert.equal(hostOf(bidi), "d.internal");
    assert.equal(hostOf(clientStream), "d.internal");
    assert.equal(hostOf(serverStream), "e.internal");
    assert.equal(method(plan, echo).backend.deadlineMs, 5000);

    assert.equal(
      method(plan, echo).auth,
      undefined,
      "an empty requirements list switches auth off",
    );
    assert.equal(method(plan, clientStream).auth?.allowWithoutCredential, true);
    assert.equal(method(plan, bidi).auth?.allowWithoutCredential, false);
    assert.equal(method(plan, bidi).auth?.requirements[0]?.provider.id, "p");
  });

  it("defaults audiences to https://<service name>, and lets a requirement override them", () => {
    const config = baseConfig();
    config.authentication = {
      providers: [
        { id: "default", issuer: "https://accounts.google.com" },
        { id: "listed", issuer: "https://issuer.example", audiences: " a , https://b/ ,, " },
      ],
      rules: [
        {
          selector: "*",
          requirements: [{ provider_id: "default" }, { provider_id: "listed" }],
        },
        {
          selector: echo,
          requirements: [{ provider_id: "listed", audiences: "https://only.example" }],
        },
      ],
    };
    const plan = load(config);
    assert.deepEqual(
      plan.providers.map((p) => [p.id, p.audiences]),
      [
        ["default", ["https://echo.example.com"]],
        ["listed", ["a", "https://b/"]],
      ],
    );
    assert.deepEqual(
      method(plan, bidi).auth?.requirements.map((r) => [r.provider.id, r.audiences]),
      [
        ["default", ["https://echo.example.com"]],
        ["listed", ["a", "https://b/"]],
      ],
    );
    assert.deepEqual(
      method(plan, echo).auth?.requirements.map((r) => [r.provider.id, r.audiences]),
      [["listed", ["https://only.example"]]],
    );
  });

  it("warns when the default audience is built from API Gateway's wildcard name", () => {
    const config = baseConfig();
    config.name = "*.apigateway.my-project.cloud.goog";
    config.authentication = {
      providers: [{ id: "g", issuer: "https://accounts.google.com" }],
      rules: [{ selector: "*", requirements: [{ provider_id: "g" }] }],
    };
    const plan = load(config);
    assert.deepEqual(plan.providers[0]?.audiences, ["https://*.apigateway.my-project.cloud.goog"]);
    assert.equal(plan.warnings[0]?.path, "authentication.providers[0].audiences");
  });

  it("flags OpenID discovery when jwks_uri is empty, and reads jwt_locations", () => {
    const config = baseConfig();
    config.authentication = {
      providers: [
        { id: "a", issuer: "issuer.example/", jwks_uri: "" },
        {
          id: "b",
          issuer: "https://issuer.example",
          jwks_uri: "http://127.0.0.1:5555/oauth2/v3/certs",
          jwt_locations: [
            { header: "X-Token", value_prefix: "Token " },
            { header: "X-Raw" },
            { query: "jwt" },
          ],
        },
      ],
    };
    const plan = load(config);
    const [a, b] = plan.providers;
    assert.equal(a?.jwksUri, undefined);
    assert.equal(a?.discoveryUri, "https://issuer.example/.well-known/openid-configuration");
    assert.equal(b?.jwksUri, "http://127.0.0.1:5555/oauth2/v3/certs");
    assert.equal(b?.discoveryUri, undefined);
    assert.deepEqual(b?.locations, [
      { header: "x-token", valuePrefix: "Token " },
      { header: "x-raw", valuePrefix: "" },
      { query: "jwt" },
    ]);
    assert.equal(method(plan, echo).auth, undefined, "no authentication rules: no JWT check");
  });

  const audienceCases: {
    desc: string;
    rule: Record<string, unknown>;
    jwtAudience: string | undefined;
    port: number;
  }[] = [
    {
      desc: "grpcs derives https://<host>",
      rule: { address: "grpcs://echo-xyz.a.run.app" },
      jwtAudience: "https://echo-xyz.a.run.app",
      port: 443,
    },
    {
      desc: "grpc derives http://<host> without the port",
      rule: { address: "grpc://127.0.0.1:8081" },
      jwtAudience: "http://127.0.0.1",
      port: 8081,
    },
    {
      desc: "no scheme means https (which needs protocol h2 for gRPC)",
      rule: { address: "echo-xyz.a.run.app", protocol: "h2" },
      jwtAudience: "https://echo-xyz.a.run.app",
      port: 443,
    },
    {
      desc: "https with protocol h2",
      rule: { address: "HTTPS://echo.example.com:8443/", protocol: "h2" },
      jwtAudience: "https://echo.example.com",
      port: 8443,
    },
    {
      desc: "IPv6 literal keeps its brackets in the audience",
      rule: { address: "grpc://[::1]:9000" },
      jwtAudience: "http://[::1]",
      port: 9000,
    },
    {
      desc: "jwt_audience is taken verbatim",
      rule: { address: "grpcs://echo-xyz.a.run.app", jwt_audience: "custom-aud" },
      jwtAudience: "custom-aud",
      port: 443,
    },
    {
      desc: "disable_auth: true means no backend token",
      rule: { address: "grpcs://echo-xyz.a.run.app", disable_auth: true },
      jwtAudience: undefined,
      port: 443,
    },
    {
      desc: "disable_auth: false still derives",
      rule: { address: "grpc://echo.internal", disable_auth: false },
      jwtAudience: "http://echo.internal",
      port: 80,
    },
  ];
  for (const tc of audienceCases) {
    it(`backend jwt_audience: ${tc.desc}`, () => {
      const config = baseConfig();
      config.backend = { rules: [{ selector: "*", ...tc.rule }] };
      const backend = method(load(config), echo).backend;
      assert.equal(backend.jwtAudience, tc.jwtAudience);
      assert.equal(backend.addresses[0]?.port, tc.port);
    });
  }

  const deadlineCases: {
    desc: string;
    deadline?: number;
    expect: Record<string, [number | undefined, number]>;
  }[] = [
    {
      desc: "defaults: 15 s unary, no total limit and 5 min idle for streams",
      expect: {
        [echo]: [15_000, 300_000],
        [serverStream]: [undefined, 300_000],
        [clientStream]: [undefined, 300_000],
        [bidi]: [undefined, 300_000],
      },
    },
    {
      desc: "deadline 30.5 s",
      deadline: 30.5,
      expect: { [echo]: [30_500, 300_000], [bidi]: [undefined, 30_500] },
    },
    {
      desc: "deadline 600 s: unary idle is deadline + 1 s",
      deadline: 600,
      expect: { [echo]: [600_000, 601_000], [serverStream]: [undefined, 600_000] },
    },
  ];
  for (const tc of deadlineCases) {
    it(`deadlines: ${tc.desc}`, () => {
      const config = baseConfig();
      config.backend = {
        rules: [{ selector: "*", address: "grpc://127.0.0.1:1", deadline: tc.deadline }],
      };
      const plan = load(config);
      for (const [selector, [deadlineMs, idleTimeoutMs]] of Object.entries(tc.expect)) {
        const { backend } = method(plan, selector);
        assert.deepEqual(
          [backend.deadlineMs, backend.idleTimeoutMs],
          [deadlineMs, idleTimeoutMs],
          selector,
        );
      }
    });
  }

  it("accepts several addresses only with the local option (round robin)", () => {
    const config = baseConfig();
    config.backend = {
      rules: [{ selector: "*", address: "grpc://127.0.0.1:8081, grpc://127.0.0.1:8082" }],
    };
    const plan = load(config, { local: true });
    assert.equal(plan.local, true);
    const backend = method(plan, echo).backend;
    assert.deepEqual(
      backend.addresses.map((a) => a.port),
      [8081, 8082],
    );
    assert.equal(backend.poolKey, "grpc://127.0.0.1:8081,grpc://127.0.0.1:8082");
    assert.equal(backend.jwtAudience, "http://127.0.0.1");
    assert.equal(method(plan, bidi).backend.addresses, backend.addresses, "one list per rule");

    const problems = problemsOf(config);
    assert.equal(problems.length, 1);
    assert.equal(problems[0]?.path, "backend.rules[0].address");
    assert.match(
      problems[0]?.message ?? "",
      /local-gateway extension; API Gateway takes exactly one address/,
    );
  });

  it("requires an API key where no usage rule allows unregistered calls", () => {
    const config = baseConfig();
    config.usage = {
      rules: [
        { selector: echo, allow_unregistered_calls: true },
        { selector: bidi, skip_service_control: true },
      ],
    };
    config.system_parameters = {
      rules: [
        {
          selector: clientStream,
          parameters: [{ name: "api_key", http_header: "X-My-Key", url_query_parameter: "k" }],
        },
      ],
    };
    const plan = load(config);
    assert.equal(method(plan, echo).apiKey, undefined);
    assert.equal(method(plan, bidi).apiKey, undefined);
    assert.equal(method(plan, serverStream).apiKey?.locations, defaultApiKeyLocations);
    assert.deepEqual(method(plan, clientStream).apiKey?.locations, [
      { header: "x-my-key" },
      { query: "k" },
    ]);
    assert.equal(plan.warnings.length, 1);
    assert.equal(plan.warnings[0]?.path, "usage.rules");
    assert.match(
      plan.warnings[0]?.message ?? "",
      /API key required for echo\.v1\.EchoService\.EchoServerStream, echo\.v1\.EchoService\.EchoClientStream/,
    );
  });

  const brokenCases: {
    desc: string;
    change: (config: Config) => void;
    path: string;
    message: RegExp;
    local?: boolean;
  }[] = [
    {
      desc: "unknown top-level field",
      change: (c) => {
        c.backends = {};
      },
      path: "backends",
      message: /^unknown field \(expected one of: type, config_version, /,
    },
    {
      desc: "camelCase spelling",
      change: (c) => {
        c.configVersion = 3;
        delete c.config_version;
      },
      path: "configVersion",
      message: /^unknown field; write it in snake_case: config_version$/,
    },
    {
      desc: "field ESPv2 ignores",
      change: (c) => {
        c.documentation = { summary: "x" };
      },
      path: "documentation",
      message:
        /^unknown field: google\.api\.Service defines it, but API Gateway \(ESPv2\) ignores it/,
    },
    {
      desc: "unknown backend rule field",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1", min_deadline: 1 };
      },
      path: "backend.rules[0].min_deadline",
      message: /^unknown field/,
    },
    {
      desc: "wrong type",
      change: (c) => {
        c.type = "google.api.Services";
      },
      path: "type",
      message: /^must be "google\.api\.Service", got "google\.api\.Services"$/,
    },
    {
      desc: "missing config_version",
      change: (c) => {
        delete c.config_version;
      },
      path: "config_version",
      message: /^required: 3$/,
    },
    {
      desc: "config_version 2",
      change: (c) => {
        c.config_version = 2;
      },
      path: "config_version",
      message: /^must be 3, got 2$/,
    },
    {
      desc: "missing name",
      change: (c) => {
        delete c.name;
      },
      path: "name",
      message: /^required$/,
    },
    {
      desc: "api not in the descriptor",
      change: (c) => {
        c.apis = [{ name: "echo.v1.EchoServce" }];
      },
      path: "apis[0].name",
      message:
        /^service "echo\.v1\.EchoServce" is not in the descriptor set \(it has: echo\.v1\.EchoService\)$/,
    },
    {
      desc: "apis[].methods are filled from the descriptor",
      change: (c) => {
        c.apis = [{ name: "echo.v1.EchoService", methods: [{ name: "Echo" }] }];
      },
      path: "apis[0].methods",
      message: /^unknown field/,
    },
    {
      desc: "wildcard inside a component",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "echo.v1.Echo*", address: "grpc://a:1" };
      },
      path: "backend.rules[0].selector",
      message: /^invalid selector "echo\.v1\.Echo\*"/,
    },
    {
      desc: "wildcard in the middle",
      change: (c) => {
        rules(c, "usage")[0] = { selector: "echo.*.Echo", allow_unregistered_calls: true };
      },
      path: "usage.rules[0].selector",
      message: /^invalid selector "echo\.\*\.Echo"/,
    },
    {
      desc: "selector matching no method",
      change: (c) => {
        rules(c, "backend").push({ selector: "echo.v1.EchoService.Ecko", address: "grpc://a:1" });
      },
      path: "backend.rules[1].selector",
      message:
        /^selector "echo\.v1\.EchoService\.Ecko" matches no method of the services in apis\[\]/,
    },
    {
      desc: "service name without wildcard is not a method",
      change: (c) => {
        rules(c, "authentication")[0] = {
          selector: "echo.v1.EchoService",
          requirements: [{ provider_id: "google_id_token" }],
        };
      },
      path: "authentication.rules[0].selector",
      message: /matches no method/,
    },
    {
      desc: "empty selector",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "", address: "grpc://a:1" };
      },
      path: "backend.rules[0].selector",
      message: /^required$/,
    },
    {
      desc: "unknown backend scheme",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "tcp://a:1" };
      },
      path: "backend.rules[0].address",
      message: /^unknown backend scheme \[tcp\], should be one of "http\(s\)" or "grpc\(s\)"$/,
    },
    {
      desc: "https backend without protocol h2",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "https://echo-xyz.a.run.app" };
      },
      path: "backend.rules[0].address",
      message: /gRPC needs HTTP\/2; use grpcs:\/\//,
    },
    {
      desc: "address with a path",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1/prefix" };
      },
      path: "backend.rules[0].address",
      message: /takes no path \(found "\/prefix"\)/,
    },
    {
      desc: "address port out of range",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:70000" };
      },
      path: "backend.rules[0].address",
      message: /port 70000 is out of range/,
    },
    {
      desc: "missing address",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*" };
      },
      path: "backend.rules[0].address",
      message: /^required$/,
    },
    {
      desc: "local address list with different derived audiences",
      local: true,
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1,grpcs://b" };
      },
      path: "backend.rules[0].address",
      message:
        /derive different backend audiences \(http:\/\/a, https:\/\/b\); set jwt_audience or disable_auth$/,
    },
    {
      desc: "method without a backend rule",
      change: (c) => {
        rules(c, "backend")[0] = { selector: echo, address: "grpc://a:1" };
      },
      path: "backend.rules",
      message: /^no backend rule for echo\.v1\.EchoService\.EchoServerStream, /,
    },
    {
      desc: "deadline zero",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1", deadline: 0 };
      },
      path: "backend.rules[0].deadline",
      message: /^must be more than 0 and at most 3600 seconds, got 0$/,
    },
    {
      desc: "deadline above 3600",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1", deadline: 3601 };
      },
      path: "backend.rules[0].deadline",
      message: /at most 3600 seconds, got 3601$/,
    },
    {
      desc: "deadline as a string",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1", deadline: "15s" };
      },
      path: "backend.rules[0].deadline",
      message: /^must be a number of seconds, got "15s"$/,
    },
    {
      desc: "jwt_audience with disable_auth",
      change: (c) => {
        rules(c, "backend")[0] = {
          selector: "*",
          address: "grpc://a:1",
          jwt_audience: "x",
          disable_auth: false,
        };
      },
      path: "backend.rules[0].jwt_audience",
      message: /mutually exclusive/,
    },
    {
      desc: "empty jwt_audience",
      change: (c) => {
        rules(c, "backend")[0] = { selector: "*", address: "grpc://a:1", jwt_audience: " " };
      },
      path: "backend.rules[0].jwt_audience",
      message: /^must not be empty; leave it out to derive it from the address$/,
    },
    {
      desc: "undefined provider",
      change: (c) => {
        rules(c, "authentication")[0] = { selector: "*", requirements: [{ provider_id: "gogle" }] };
      },
      path: "authentication.rules[0].requirements[0].provider_id",
      message:
        /^provider "gogle" is not defined in authentication\.providers \(defined: google_id_token\)$/,
    },
    {
      desc: "provider without issuer",
      change: (c) => {
        providers(c)[0] = { id: "google_id_token" };
      },
      path: "authentication.providers[0].issuer",
      message: /^required$/,
    },
    {
      desc: "duplicate provider id",
      change: (c) => {
        providers(c).push({ id: "google_id_token", issuer: "https://x" });
      },
      path: "authentication.providers[1].id",
      message: /defined twice/,
    },
    {
      desc: "jwks_uri not a URL",
      change: (c) => {
        providers(c)[0] = { id: "google_id_token", issuer: "https://x", jwks_uri: "certs.json" };
      },
      path: "authentication.providers[0].jwks_uri",
      message: /is not an http\(s\) URL$/,
    },
    {
      desc: "query location with value_prefix",
      change: (c) => {
        providers(c)[0] = {
          id: "google_id_token",
          issuer: "https://x",
          jwt_locations: [{ query: "t", value_prefix: "Bearer " }],
        };
      },
      path: "authentication.providers[0].jwt_locations[0].value_prefix",
      message: /^not allowed with query/,
    },
    {
      desc: "cookie location",
      change: (c) => {
        providers(c)[0] = {
          id: "google_id_token",
          issuer: "https://x",
          jwt_locations: [{ cookie: "session" }],
        };
      },
      path: "authentication.providers[0].jwt_locations[0].cookie",
      message: /ESPv2\) ignores it/,
    },
    {
      desc: "location with header and query",
      change: (c) => {
        providers(c)[0] = {
          id: "google_id_token",
          issuer: "https://x",
          jwt_locations: [{ header: "a", query: "b" }],
        };
      },
      path: "authentication.providers[0].jwt_locations[0]",
      message: /^set exactly one of header or query$/,
    },
    {
      desc: "boolean written as a string",
      change: (c) => {
        rules(c, "usage")[0] = { selector: "*", allow_unregistered_calls: "yes" };
      },
      path: "usage.rules[0].allow_unregistered_calls",
      message: /^must be true or false, got "yes"$/,
    },
    {
      desc: "rules not a list",
      change: (c) => {
        c.backend = { rules: { selector: "*" } };
      },
      path: "backend.rules",
      message: /^must be a list$/,
    },
  ];

  for (const tc of brokenCases) {
    it(`rejects: ${tc.desc}`, () => {
      const config = baseConfig();
      tc.change(config);
      const problems = problemsOf(config, { local: tc.local ?? false });
      const problem = problems.find((p) => p.path === tc.path);
      assert.ok(problem, `no problem at ${tc.path}; got ${JSON.stringify(problems)}`);
      assert.match(problem.message, tc.message);
    });
  }

  it("reports every problem at once, with YAML lines", () => {
    const text = [
      "type: google.api.Service", // 1
      "config_version: 3", // 2
      "name: echo.example.com", // 3
      "apis:", // 4
      "  - name: echo.v1.EchoService", // 5
      "backend:", // 6
      "  rules:", // 7
      '    - selector: "*"', // 8
      "      address: ftp://x", // 9
      "      deadline: -1", // 10
      "authentication:", // 11
      "  providers:", // 12
      "    - id: p", // 13
      "  rules:", // 14
      "    - selector: echo.v1.EchoService.*", // 15
      "      requirements:", // 16
      "        - provider_id: q", // 17
      "",
    ].join("\n");
    let caught: unknown;
    try {
      load(text, { sourceName: "api_config.yaml" });
    } catch (err) {
      caught = err;
    }
    assert.ok(caught instanceof ApiConfigError);
    assert.deepEqual(
      caught.problems.map((p) => [p.line, p.path]),
      [
        [9, "backend.rules[0].address"],
        [10, "backend.rules[0].deadline"],
        [13, "authentication.providers[0].issuer"],
        [17, "authentication.rules[0].requirements[0].provider_id"],
      ],
    );
    assert.equal(
      caught.message.split("\n")[0],
      'api_config.yaml:9: backend.rules[0].address: unknown backend scheme [ftp], should be one of "http(s)" or "grpc(s)"',
    );
  });

  it("reports YAML syntax errors with their line", () => {
    const problems = problemsOf("type: google.api.Service\ntype: again\n");
    assert.equal(problems.length, 1);
    assert.equal(problems[0]?.line, 2);
    assert.match(problems[0]?.message ?? "", /^invalid YAML: Map keys must be unique/);
  });

  it("rejects an empty document", () => {
    const problems = problemsOf("");
    assert.deepEqual(
      problems.map((p) => p.message),
      ["the API config is empty"],
    );
  });
});

describe("loadApiConfigFiles()", () => {
  it("names the file it cannot read", async () => {
    await assert.rejects(
      loadApiConfigFiles({ config: "/nonexistent/api_config.yaml", descriptor: descriptorFile }),
      (err: unknown) =>
        err instanceof ApiConfigError &&
        err.message.startsWith("/nonexistent/api_config.yaml: cannot read"),
    );
  });
});

describe("audienceMatches()", () => {
  const cases: { desc: string; aud: string | string[]; allowed: string[]; want: boolean }[] = [
    { desc: "identical", aud: "https://svc", allowed: ["https://svc"], want: true },
    { desc: "http vs https", aud: "http://svc", allowed: ["https://svc"], want: true },
    { desc: "no scheme", aud: "svc", allowed: ["https://svc"], want: true },
    { desc: "trailing slash", aud: "https://svc/", allowed: ["https://svc"], want: true },
    { desc: "allowed has the slash", aud: "https://svc", allowed: ["svc/"], want: true },
    { desc: "one of a list", aud: ["x", "https://svc"], allowed: ["https://svc"], want: true },
    { desc: "case matters", aud: "https://SVC", allowed: ["https://svc"], want: false },
    {
      desc: "only one slash is stripped",
      aud: "https://svc//",
      allowed: ["https://svc"],
      want: false,
    },
    { desc: "path differs", aud: "https://svc/api", allowed: ["https://svc"], want: false },
    { desc: "empty list", aud: [], allowed: ["https://svc"], want: false },
  ];
  for (const tc of cases) {
    it(tc.desc, () => {
      assert.equal(audienceMatches(tc.aud, tc.allowed), tc.want);
    });
  }

  it("normalizeAudience strips one scheme and one trailing slash", () => {
    assert.equal(normalizeAudience("https://http://x/"), "http://x");
  });
});

function rules(config: Config, section: "backend" | "usage" | "authentication"): unknown[] {
  return (config[section] as { rules: unknown[] }).rules;
}

function providers(config: Config): unknown[] {
  return (config.authentication as { providers: unknown[] }).providers;
}

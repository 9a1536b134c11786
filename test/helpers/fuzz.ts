/**
 * Seeded fuzzing of the two front doors, written by hand (the project has no
 * property-testing dependency): request cases (well-formed HTTP/2 carrying
 * hostile gRPC, headers and tokens) and frame cases (raw HTTP/2 frames), each
 * a plain JSON-able value so that a failure can be printed, shrunk and pasted
 * into a regression test.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { EchoRequestSchema } from "../../gen/echo/v1/echo_pb.ts";
import {
  clientPreface,
  flag,
  frame,
  frameType,
  grpcRequestHeaders,
  headerBlock,
} from "./h2-frames.ts";
import type { Prng } from "./prng.ts";

/** Tokens a case may carry, by role; `valid` ones must be let through, the rest never. */
export interface TokenPool {
  valid: string[];
  /** Tokens that verify nowhere: expired, wrong audience, unknown key, alg confusion… */
  invalid: string[];
}

export interface TokenUse {
  /** Where: "authorization" (with "Bearer "), "x-goog-iap-jwt-assertion", or "query". */
  location: "authorization" | "x-goog-iap-jwt-assertion" | "query";
  token: string;
  /** Known to verify (true), known not to (false), or not decidable (undefined). */
  valid: boolean | undefined;
}

export interface EnvelopeSpec {
  flags: number;
  /** Length written in the prefix; the payload's when absent. */
  declaredLength?: number;
  /** Hex of the payload. */
  payloadHex: string;
}

export interface RequestCase {
  path: string;
  method: string;
  contentType?: string;
  te?: string;
  grpcEncoding?: string;
  grpcTimeout?: string;
  tokens: TokenUse[];
  /** Other headers, name → value. */
  extra: Record<string, string>;
  envelopes: EnvelopeSpec[];
  /** Bytes appended after the envelopes (hex). */
  trailingHex?: string;
  ending: "end" | "reset" | "open";
}

const echoMethods = [
  "/echo.v1.EchoService/Echo",
  "/echo.v1.EchoService/EchoServerStream",
  "/echo.v1.EchoService/EchoClientStream",
  "/echo.v1.EchoService/EchoBidiStream",
];
const otherPaths = [
  "/grpc.health.v1.Health/Check",
  "/echo.v1.EchoService/Nope",
  "/evil.v1.Admin/Delete",
  "/",
  "/echo.v1.EchoService",
  "/echo.v1.EchoService/Echo/../Echo",
  "/echo.v1.EchoService%2FEcho",
  "//echo.v1.EchoService/Echo",
  "/echo.v1.EchoService/Echo?x=1",
  "*",
];
const contentTypes = [
  "application/grpc",
  "application/grpc+proto",
  "application/grpc+json",
  "application/grpc-web",
  "application/grpc-web+proto",
  "application/connect+proto",
  "application/proto",
  "application/json",
  "text/plain",
  "application/grpcx",
];
const b64url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const headerNameChars = "abcdefghijklmnopqrstuvwxyz0123456789-";
const printable = Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i)).join("");

/** Is `path` one of the JWT-protected methods, as the gateway routes it? */
export function isProtectedPath(path: string): boolean {
  const bare = path.split("?")[0] ?? "";
  return echoMethods.includes(bare) || echoMethods.some((m) => bare === `${m}/`);
}

/** One char of a base64url segment replaced; validity decided by the decoded bytes. */
function mutateToken(prng: Prng, token: string): { token: string; valid: boolean | undefined } {
  const parts = token.split(".");
  const which = prng.int(3);
  const seg = parts[which] ?? "";
  if (seg.length === 0) {
    return { token: `${token}x`, valid: false };
  }
  const at = prng.int(seg.length);
  let replacement = prng.pick([...b64url]);
  while (replacement === seg.charAt(at)) {
    replacement = prng.pick([...b64url]);
  }
  const mutated = seg.slice(0, at) + replacement + seg.slice(at + 1);
  parts[which] = mutated;
  // Header and payload are signed as text: any change breaks the signature.
  // A signature char whose changed bits are unused decodes to the same bytes.
  const valid =
    which === 2 &&
    Buffer.from(mutated, "base64url").equals(Buffer.from(seg, "base64url")) &&
    mutated.length % 4 !== 1
      ? undefined
      : false;
  return { token: parts.join("."), valid };
}

function randomToken(prng: Prng): string {
  const seg = () => prng.string(prng.range(0, 60), b64url);
  switch (prng.int(5)) {
    case 0:
      return `${seg()}.${seg()}.${seg()}`;
    case 1:
      return `${seg()}.${seg()}`;
    case 2:
      return `eyJhbGciOiJub25lIn0.${seg()}.`;
    case 3:
      return prng.string(prng.range(1, 80), printable.replace(/[\s,]/g, ""));
    default:
      return `${seg()}..${seg()}`;
  }
}

function pickToken(prng: Prng, pool: TokenPool): { token: string; valid: boolean | undefined } {
  const r = prng.next();
  if (r < 0.45) {
    return { token: prng.pick(pool.valid), valid: true };
  }
  if (r < 0.65) {
    return mutateToken(prng, prng.pick(pool.valid));
  }
  if (r < 0.85) {
    return { token: prng.pick(pool.invalid), valid: false };
  }
  return { token: randomToken(prng), valid: false };
}

function echoPayload(prng: Prng): Uint8Array {
  return toBinary(
    EchoRequestSchema,
    create(EchoRequestSchema, { message: prng.string(prng.range(0, 40), printable) }),
  );
}

function randomEnvelope(prng: Prng): EnvelopeSpec {
  const valid = prng.bool(0.6);
  const payload = valid ? Buffer.from(echoPayload(prng)) : prng.bytes(prng.range(0, 64));
  const r = prng.next();
  const spec: EnvelopeSpec = {
    flags: r < 0.8 ? 0 : r < 0.9 ? 1 : prng.int(256),
    payloadHex: payload.toString("hex"),
  };
  const l = prng.next();
  if (l < 0.1) {
    spec.declaredLength = payload.length + prng.range(1, 100);
  } else if (l < 0.15) {
    spec.declaredLength = Math.max(0, payload.length - prng.range(1, 10));
  } else if (l < 0.2) {
    spec.declaredLength = prng.pick([0xffffffff, 0x7fffffff, 4 * 2 ** 20 + 1]);
  }
  return spec;
}

/** A request case: mostly plausible gRPC calls, each with a few things wrong. */
export function randomRequestCase(prng: Prng, pool: TokenPool): RequestCase {
  const c: RequestCase = {
    path: prng.bool(0.8) ? prng.pick(echoMethods) : prng.pick(otherPaths),
    method: prng.bool(0.95) ? "POST" : prng.pick(["GET", "PUT", "DELETE", "OPTIONS", "PRI"]),
    tokens: [],
    extra: {},
    envelopes: [],
    ending: prng.bool(0.93) ? "end" : prng.bool(0.5) ? "reset" : "open",
  };
  if (prng.bool(0.93)) {
    c.contentType = prng.bool(0.7) ? "application/grpc" : prng.pick(contentTypes);
  }
  if (prng.bool(0.85)) {
    c.te = "trailers";
  }
  if (prng.bool(0.1)) {
    c.grpcEncoding = prng.pick(["gzip", "identity", "br", "deflate", "snappy", ""]);
  }
  if (prng.bool(0.1)) {
    c.grpcTimeout = prng.pick(["1S", "100m", "0n", "99999999H", "abc", "-1S", "1"]);
  }
  const tokenCount = prng.pick([0, 1, 1, 1, 1, 2, 3]);
  for (let i = 0; i < tokenCount; i++) {
    const location = prng.pick([
      "authorization",
      "authorization",
      "x-goog-iap-jwt-assertion",
      "query",
    ] as const);
    c.tokens.push({ location, ...pickToken(prng, pool) });
  }
  const extras = prng.pick([0, 0, 1, 2, 5]);
  for (let i = 0; i < extras; i++) {
    const name = prng.bool(0.3)
      ? prng.pick([
          "x-forwarded-authorization",
          "x-apigateway-api-userinfo",
          "x-endpoint-api-userinfo",
          "grpc-accept-encoding",
          "traceparent",
          "x-cloud-trace-context",
          "content-length",
          "host",
        ])
      : `x-${prng.string(prng.range(1, 12), headerNameChars)}`;
    c.extra[name] = prng.string(prng.range(0, 200), printable);
  }
  const envelopes = prng.pick([0, 1, 1, 1, 1, 2, 3]);
  for (let i = 0; i < envelopes; i++) {
    c.envelopes.push(randomEnvelope(prng));
  }
  if (prng.bool(0.1)) {
    c.trailingHex = prng.bytes(prng.range(1, 8)).toString("hex");
  }
  return c;
}

/** Does the case carry at least one token, and is every token known to verify? */
export function caseAuthorized(c: RequestCase): boolean | undefined {
  if (c.tokens.length === 0) {
    return false;
  }
  if (c.tokens.some((t) => t.valid === false)) {
    return false;
  }
  return c.tokens.every((t) => t.valid === true) ? true : undefined;
}

/** Raw header list and body of a case (node:http2 raw-array form). */
export function requestOf(c: RequestCase, caseId: string): { headers: string[]; body: Buffer } {
  const query = c.tokens
    .filter((t) => t.location === "query")
    .map((t) => `access_token=${encodeURIComponent(t.token)}`);
  const path =
    query.length === 0 ? c.path : `${c.path}${c.path.includes("?") ? "&" : "?"}${query.join("&")}`;
  const headers = [":method", c.method, ":path", path];
  const add = (name: string, value: string | undefined) => {
    if (value !== undefined) {
      headers.push(name, value);
    }
  };
  add("content-type", c.contentType);
  add("te", c.te);
  add("grpc-encoding", c.grpcEncoding);
  add("grpc-timeout", c.grpcTimeout);
  for (const t of c.tokens) {
    if (t.location === "authorization") {
      add("authorization", `Bearer ${t.token}`);
    } else if (t.location === "x-goog-iap-jwt-assertion") {
      add("x-goog-iap-jwt-assertion", t.token);
    }
  }
  for (const [name, value] of Object.entries(c.extra)) {
    add(name, value);
  }
  add("x-fuzz-case", caseId);
  const body = Buffer.concat([
    ...c.envelopes.map((e) => {
      const payload = Buffer.from(e.payloadHex, "hex");
      const out = Buffer.alloc(5 + payload.length);
      out[0] = e.flags;
      out.writeUInt32BE((e.declaredLength ?? payload.length) >>> 0, 1);
      payload.copy(out, 5);
      return out;
    }),
    Buffer.from(c.trailingHex ?? "", "hex"),
  ]);
  return { headers, body };
}

/**
 * Smaller variants of a case, simplest first: fields dropped or reset one at
 * a time. A shrinker keeps the first variant that still fails, and repeats.
 */
export function* shrinkRequestCase(c: RequestCase): Generator<RequestCase> {
  for (let i = 0; i < c.tokens.length; i++) {
    yield { ...c, tokens: c.tokens.filter((_, j) => j !== i) };
  }
  for (const name of Object.keys(c.extra)) {
    const { [name]: _dropped, ...extra } = c.extra;
    yield { ...c, extra };
  }
  for (let i = 0; i < c.envelopes.length; i++) {
    yield { ...c, envelopes: c.envelopes.filter((_, j) => j !== i) };
  }
  for (const key of ["grpcEncoding", "grpcTimeout", "trailingHex"] as const) {
    if (c[key] !== undefined) {
      const { [key]: _dropped, ...rest } = c;
      yield rest;
    }
  }
  if (c.ending !== "end") {
    yield { ...c, ending: "end" };
  }
  if (c.method !== "POST") {
    yield { ...c, method: "POST" };
  }
}

/** Greedy shrinking: the smallest case (by repeated one-step shrinks) for which `fails` holds. */
export async function shrink<T>(
  start: T,
  candidates: (c: T) => Iterable<T>,
  fails: (c: T) => Promise<boolean>,
  maxSteps = 200,
): Promise<T> {
  let current = start;
  for (let step = 0; step < maxSteps; step++) {
    let progressed = false;
    for (const candidate of candidates(current)) {
      if (await fails(candidate)) {
        current = candidate;
        progressed = true;
        break;
      }
    }
    if (!progressed) {
      break;
    }
  }
  return current;
}

/** A frame case: the bytes written after connecting, as a list of hex chunks (one per frame). */
export interface FrameCase {
  chunks: string[];
}

const settingIds = [1, 2, 3, 4, 5, 6, 0, 7, 9, 0xff];

/** A sequence of frames around a valid request, with things broken at random. */
export function randomFrameCase(prng: Prng, authority: string, authorization: string): FrameCase {
  const chunks: Buffer[] = [];
  chunks.push(
    prng.bool(0.97)
      ? clientPreface
      : Buffer.concat([clientPreface.subarray(0, prng.int(24)), prng.bytes(4)]),
  );
  const validHeaders = (path: string) =>
    headerBlock(grpcRequestHeaders(path, authority, [["authorization", authorization]]));
  let streamId = 1;
  const n = prng.range(1, 8);
  for (let i = 0; i < n; i++) {
    const r = prng.int(16);
    const sid = prng.bool(0.8)
      ? streamId
      : prng.pick([0, 2, streamId + 2, 0x7fffffff, streamId - 2]);
    switch (r) {
      case 0:
      case 1:
      case 2: {
        const block = prng.bool(0.85)
          ? validHeaders(prng.pick(echoMethods))
          : prng.bytes(prng.range(0, 64));
        chunks.push(
          frame(
            frameType.headers,
            prng.pick([flag.endHeaders, flag.endHeaders | flag.endStream, 0, prng.int(256)]),
            sid,
            block,
          ),
        );
        streamId += 2;
        break;
      }
      case 3:
      case 4: {
        const payload = prng.bool(0.5)
          ? Buffer.concat([Buffer.from([0, 0, 0, 0, 4]), Buffer.from([0x0a, 0x02, 0x68, 0x69])])
          : prng.bytes(prng.range(0, 100));
        chunks.push(
          frame(
            frameType.data,
            prng.pick([0, flag.endStream, flag.padded, prng.int(256)]),
            sid,
            payload,
          ),
        );
        break;
      }
      case 5:
        chunks.push(
          frame(
            frameType.continuation,
            prng.pick([0, flag.endHeaders]),
            sid,
            prng.bytes(prng.range(0, 32)),
          ),
        );
        break;
      case 6: {
        const values = Array.from({ length: prng.range(0, 4) }, () => {
          const id = prng.pick(settingIds);
          const value = prng.pick([
            0,
            1,
            2,
            16_383,
            16_384,
            2 ** 24,
            2 ** 31,
            0xffffffff,
            prng.int(100_000),
          ]);
          return [id, value] as const;
        });
        const payload = Buffer.alloc(values.length * 6);
        values.forEach(([id, value], k) => {
          payload.writeUInt16BE(id, k * 6);
          payload.writeUInt32BE(value >>> 0, k * 6 + 2);
        });
        chunks.push(
          frame(frameType.settings, prng.pick([0, 0, flag.ack]), prng.bool(0.9) ? 0 : sid, payload),
        );
        break;
      }
      case 7:
        chunks.push(
          frame(
            frameType.ping,
            prng.pick([0, flag.ack]),
            prng.bool(0.9) ? 0 : sid,
            prng.bytes(prng.pick([8, 8, 0, 9])),
          ),
        );
        break;
      case 8: {
        const payload = Buffer.alloc(4);
        payload.writeUInt32BE(prng.pick([0, 1, 0x7fffffff, 0x80000000, prng.int(1 << 20)]) >>> 0);
        chunks.push(
          frame(
            frameType.windowUpdate,
            0,
            prng.bool(0.5) ? 0 : sid,
            prng.bool(0.9) ? payload : prng.bytes(prng.int(8)),
          ),
        );
        break;
      }
      case 9: {
        const payload = Buffer.alloc(4);
        payload.writeUInt32BE(prng.pick([0, 1, 2, 7, 8, 11, 0xffffffff]) >>> 0);
        chunks.push(
          frame(frameType.rstStream, 0, sid, prng.bool(0.9) ? payload : prng.bytes(prng.int(8))),
        );
        break;
      }
      case 10:
        chunks.push(
          frame(
            frameType.priority,
            0,
            sid,
            prng.bool(0.7) ? Buffer.from([0, 0, 0, sid & 0xff, 16]) : prng.bytes(prng.int(10)),
          ),
        );
        break;
      case 11: {
        const payload = Buffer.alloc(8);
        payload.writeUInt32BE(prng.int(1000), 0);
        payload.writeUInt32BE(prng.pick([0, 1, 2, 11]), 4);
        chunks.push(frame(frameType.goaway, 0, prng.bool(0.9) ? 0 : sid, payload));
        break;
      }
      case 12:
        chunks.push(
          frame(frameType.pushPromise, flag.endHeaders, sid, prng.bytes(prng.range(4, 32))),
        );
        break;
      case 13:
        // Unknown frame type (must be ignored).
        chunks.push(frame(prng.range(10, 255), prng.int(256), sid, prng.bytes(prng.range(0, 32))));
        break;
      case 14: {
        // A frame whose declared length lies (longer: the rest never comes; or shorter).
        const payload = prng.bytes(prng.range(0, 32));
        chunks.push(
          frame(
            prng.pick([0, 1, 4, 8]),
            0,
            sid,
            payload,
            payload.length + prng.pick([-1, 1, 1000, 16_384, 0xffffff - payload.length]),
          ),
        );
        break;
      }
      default:
        // An oversized DATA frame (beyond the default 16 KiB max frame size).
        chunks.push(frame(frameType.data, 0, sid, prng.bytes(16_385 + prng.int(100))));
    }
  }
  return { chunks: chunks.map((c) => c.toString("hex")) };
}

export function* shrinkFrameCase(c: FrameCase): Generator<FrameCase> {
  for (let i = c.chunks.length - 1; i >= 1; i--) {
    yield { chunks: c.chunks.filter((_, j) => j !== i) };
  }
}

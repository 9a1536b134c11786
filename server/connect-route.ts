/**
 * Connect routes mounted on Fastify as plain routes over Connect's public
 * handler API (`createConnectRouter` → `router.handlers`), in place of
 * `@connectrpc/connect-fastify`'s plugin. Every request is still served by
 * Connect's protocol handlers (gRPC, gRPC-Web, Connect), interceptors
 * included; only the glue between Fastify and those handlers is ours.
 *
 * Why not the stock plugin: under concurrent load it spent a visible share
 * of the server's CPU in glue, not in Connect (see bench/README.md for the
 * profile and the measurements):
 *
 * - every request's AbortSignal was aborted when the stream closed, also
 *   after a normal completion, and an abort without a reason builds a
 *   DOMException (a stack trace) per request;
 * - the request body went through an async generator created per request
 *   (each such closure gets its own hidden class in V8's old space, which
 *   keeps the whole request graph alive past the next scavenge);
 * - the request URL was parsed with `new URL()` per request, and each
 *   response chunk waited on a promise of its own.
 *
 * Here, over HTTP/2, the body is read from the HTTP/2 stream by a small
 * iterator, the request signal is aborted only when the stream ends before
 * the response did (client cancel, reset, connection loss), and the
 * response is written through the compatibility API Fastify hands us, so
 * its state stays consistent. HTTP/1.1 requests (gRPC-Web and Connect over
 * TLS with ALPN http/1.1) take Connect's own Node helpers unchanged.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse, ServerHttp2Stream } from "node:http2";
import { constants as h2 } from "node:http2";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  type ConnectRouterOptions,
  type ContextValues,
  createConnectRouter,
} from "@connectrpc/connect";
import type {
  UniversalHandler,
  UniversalServerRequest,
  UniversalServerResponse,
} from "@connectrpc/connect/protocol";
import * as protoConnect from "@connectrpc/connect/protocol-connect";
import * as protoGrpc from "@connectrpc/connect/protocol-grpc";
import * as protoGrpcWeb from "@connectrpc/connect/protocol-grpc-web";
import {
  compressionBrotli,
  compressionGzip,
  universalRequestFromNodeRequest,
  universalResponseToNodeResponse,
} from "@connectrpc/connect-node";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";

export interface ConnectRouteOptions extends ConnectRouterOptions {
  /** Registers the services, as for `fastifyConnectPlugin`. */
  routes: (router: ConnectRouter) => void;
  /** Per-request context values, as for `fastifyConnectPlugin`. */
  contextValues?: (req: FastifyRequest) => ContextValues;
  /**
   * Called when a handler fails outside the RPC (a write error other than
   * the client going away). Default: nothing; the RPC is over either way.
   */
  onHandlerError?: (err: unknown, rpc: string) => void;
}

/**
 * Registers one Fastify route per RPC of `options.routes`, on every HTTP
 * method (Connect answers 405 itself), and content-type parsers that leave
 * the body to Connect. Call it inside an encapsulated plugin (as
 * `app.register`) so the parsers do not apply to other routes.
 */
export function registerConnectRoutes(app: FastifyInstance, options: ConnectRouteOptions): void {
  const { routes, contextValues, onHandlerError, ...routerOptions } = options;
  const router = createConnectRouter({
    ...routerOptions,
    acceptCompression: routerOptions.acceptCompression ?? [compressionGzip, compressionBrotli],
  });
  routes(router);
  if (router.handlers.length === 0) {
    return;
  }
  addNoopContentTypeParsers(app);
  for (const uHandler of router.handlers) {
    const rpc = `${uHandler.service.typeName}/${uHandler.method.name}`;
    app.all(uHandler.requestPath, (req: FastifyRequest, reply: FastifyReply) => {
      // Connect writes the response itself; Fastify must not send one.
      reply.hijack();
      const values = contextValues?.(req);
      const raw = req.raw as Http2ServerRequest | IncomingMessage;
      const res = reply.raw as Http2ServerResponse | ServerResponse;
      const done =
        "stream" in raw
          ? serveHttp2(uHandler, raw, res as Http2ServerResponse, reply, values)
          : serveHttp1(uHandler, raw, res as ServerResponse, reply, values);
      done.catch((err: unknown) => {
        if (ConnectError.from(err).code !== Code.Aborted) {
          onHandlerError?.(err, rpc);
        }
      });
    });
  }
}

/** HTTP/1.1: Connect's own Node helpers, as the stock plugin uses them. */
async function serveHttp1(
  uHandler: UniversalHandler,
  req: IncomingMessage,
  res: ServerResponse,
  reply: FastifyReply,
  contextValues: ContextValues | undefined,
): Promise<void> {
  const uRes = await uHandler(universalRequestFromNodeRequest(req, res, undefined, contextValues));
  copyReplyHeaders(reply, res);
  await universalResponseToNodeResponse(uRes, res);
}

async function serveHttp2(
  uHandler: UniversalHandler,
  req: Http2ServerRequest,
  res: Http2ServerResponse,
  reply: FastifyReply,
  contextValues: ContextValues | undefined,
): Promise<void> {
  const stream = req.stream;
  const controller = new AbortController();
  const body = new Http2Body(stream);
  let responded = false;
  const onClose = () => {
    body.close();
    if (!responded) {
      controller.abort(
        resetError(stream.rstCode) ??
          new ConnectError("http/2 stream closed before the response", Code.Canceled),
      );
    }
  };
  if (stream.closed) {
    onClose();
  } else {
    stream.once("close", onClose);
  }
  const headers = req.headers;
  const uReq: UniversalServerRequest = {
    httpVersion: "2.0",
    method: headers[":method"] ?? "",
    url: `${headers[":scheme"] ?? "http"}://${headers[":authority"] ?? ""}${headers[":path"] ?? ""}`,
    header: webHeaders(headers),
    body,
    signal: controller.signal,
    ...(contextValues ? { contextValues } : {}),
  };
  const uRes = await uHandler(uReq);
  copyReplyHeaders(reply, res);
  try {
    await writeResponse(uRes, res, stream);
  } finally {
    responded = true;
    stream.off("close", onClose);
    body.close();
  }
}

/**
 * Writes a universal response: headers once the first body chunk is there
 * (so handlers may still set headers), chunks with backpressure, trailers.
 */
async function writeResponse(
  uRes: UniversalServerResponse,
  res: Http2ServerResponse,
  stream: ServerHttp2Stream,
): Promise<void> {
  const it = uRes.body?.[Symbol.asyncIterator]();
  let writing = false;
  try {
    let chunk = it ? await it.next() : undefined;
    if (stream.closed) {
      throw new ConnectError("http/2 stream closed before the response", Code.Aborted);
    }
    res.writeHead(uRes.status, nodeHeaders(uRes.header));
    while (chunk && chunk.done !== true) {
      writing = true;
      if (!res.write(chunk.value)) {
        await drained(stream);
      }
      writing = false;
      chunk = await (it as AsyncIterator<Uint8Array>).next();
    }
    if (uRes.trailer) {
      res.addTrailers(nodeHeaders(uRes.trailer) ?? {});
    }
    res.end();
  } catch (err) {
    // A write error is the handler's business too (Connect's own adapter
    // reports it the same way), so that it can stop producing.
    if (writing) {
      it?.throw?.(err).catch(() => {});
    }
    throw err;
  } finally {
    it?.return?.().catch(() => {});
  }
}

/** Resolves on "drain", rejects when the stream closes first. */
function drained(stream: ServerHttp2Stream): Promise<void> {
  return new Promise((resolve, reject) => {
    const onDrain = () => {
      stream.off("close", onClose);
      resolve();
    };
    const onClose = () => {
      stream.off("drain", onDrain);
      reject(new ConnectError("http/2 stream closed while writing", Code.Aborted));
    };
    stream.once("drain", onDrain);
    stream.once("close", onClose);
  });
}

/**
 * The request body as an async iterable of chunks, read straight from the
 * HTTP/2 stream with backpressure: the stream is paused while
 * `highWaterMark` chunks wait to be read. A class rather than an async
 * generator: one shape for every request.
 */
class Http2Body implements AsyncIterable<Uint8Array>, AsyncIterator<Uint8Array> {
  static readonly highWaterMark = 16;
  readonly #stream: ServerHttp2Stream;
  readonly #chunks: Buffer[] = [];
  #ended = false;
  #error: unknown;
  #waiting: ((result: IteratorResult<Uint8Array>) => void) | undefined;
  #failing: ((err: unknown) => void) | undefined;
  #listening = false;

  constructor(stream: ServerHttp2Stream) {
    this.#stream = stream;
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return this;
  }

  next(): Promise<IteratorResult<Uint8Array>> {
    if (!this.#listening) {
      this.#listen();
    }
    const chunk = this.#chunks.shift();
    if (chunk !== undefined) {
      if (this.#chunks.length < Http2Body.highWaterMark && this.#stream.isPaused()) {
        this.#stream.resume();
      }
      return Promise.resolve({ done: false, value: chunk });
    }
    if (this.#error !== undefined) {
      return Promise.reject(this.#error);
    }
    if (this.#ended) {
      return Promise.resolve({ done: true, value: undefined });
    }
    return new Promise((resolve, reject) => {
      this.#waiting = resolve;
      this.#failing = reject;
    });
  }

  return(): Promise<IteratorResult<Uint8Array>> {
    this.close();
    return Promise.resolve({ done: true, value: undefined });
  }

  /** Stops listening; later reads see the end (or the error) already recorded. */
  close(): void {
    if (this.#listening) {
      this.#listening = false;
      this.#stream.off("data", this.#onData);
      this.#stream.off("end", this.#onEnd);
      this.#stream.off("aborted", this.#onAborted);
    }
    if (!this.#ended && this.#error === undefined) {
      this.#fail(new ConnectError("http/2 stream closed before the request ended", Code.Aborted));
    }
  }

  #listen(): void {
    this.#listening = true;
    const stream = this.#stream;
    if (stream.readableEnded) {
      this.#ended = true;
      return;
    }
    stream.on("data", this.#onData);
    stream.on("end", this.#onEnd);
    stream.on("aborted", this.#onAborted);
    stream.resume();
  }

  readonly #onData = (chunk: Buffer) => {
    const waiting = this.#waiting;
    if (waiting) {
      this.#waiting = undefined;
      this.#failing = undefined;
      waiting({ done: false, value: chunk });
      return;
    }
    this.#chunks.push(chunk);
    if (this.#chunks.length >= Http2Body.highWaterMark) {
      this.#stream.pause();
    }
  };

  readonly #onEnd = () => {
    this.#ended = true;
    const waiting = this.#waiting;
    this.#waiting = undefined;
    this.#failing = undefined;
    waiting?.({ done: true, value: undefined });
  };

  readonly #onAborted = () => {
    this.#fail(new ConnectError("the client aborted the request", Code.Aborted));
  };

  #fail(err: ConnectError): void {
    this.#error = err;
    const failing = this.#failing;
    this.#waiting = undefined;
    this.#failing = undefined;
    failing?.(err);
  }
}

/** Request headers as fetch Headers, pseudo-headers left out. */
function webHeaders(headers: Http2ServerRequest["headers"]): Headers {
  const out = new Headers();
  for (const name in headers) {
    if (name.charCodeAt(0) === 58 /* ":" */) {
      continue;
    }
    const value = headers[name];
    if (typeof value === "string") {
      out.append(name, value);
    } else if (Array.isArray(value)) {
      for (const v of value) {
        out.append(name, v);
      }
    }
  }
  return out;
}

/** fetch Headers as a Node header object (`set-cookie` and repeats as arrays). */
function nodeHeaders(headers: Headers | undefined): Record<string, string | string[]> | undefined {
  if (headers === undefined) {
    return undefined;
  }
  const out: Record<string, string | string[]> = Object.create(null);
  headers.forEach((value, name) => {
    const prev = out[name];
    out[name] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [prev, value];
  });
  return out;
}

/**
 * Headers a Fastify hook may have set on the reply are kept on the reply
 * object until it sends; Connect writes to the raw response, so they are
 * copied over first (the stock plugin does the same).
 */
function copyReplyHeaders(reply: FastifyReply, res: ServerResponse | Http2ServerResponse): void {
  const headers = reply.getHeaders();
  for (const name in headers) {
    const value = headers[name];
    if (value !== undefined) {
      res.setHeader(name, value);
    }
  }
}

/** Connect's code for an HTTP/2 reset, as its Node adapter maps them; undefined for none. */
function resetError(rstCode: number | undefined): ConnectError | undefined {
  if (rstCode === undefined || rstCode === h2.NGHTTP2_NO_ERROR) {
    return undefined;
  }
  const message = `http/2 stream closed with error code 0x${rstCode.toString(16)}`;
  switch (rstCode) {
    case h2.NGHTTP2_REFUSED_STREAM:
      return new ConnectError(message, Code.Unavailable);
    case h2.NGHTTP2_CANCEL:
      return new ConnectError(message, Code.Canceled);
    case h2.NGHTTP2_ENHANCE_YOUR_CALM:
      return new ConnectError(message, Code.ResourceExhausted);
    case h2.NGHTTP2_INADEQUATE_SECURITY:
      return new ConnectError(message, Code.PermissionDenied);
    case h2.NGHTTP2_HTTP_1_1_REQUIRED:
      return new ConnectError(message, Code.Internal);
    default:
      return new ConnectError(message, Code.Internal);
  }
}

/**
 * Content-type parsers that leave the body unread for every type Connect
 * serves, as the stock plugin registers them.
 */
function addNoopContentTypeParsers(app: FastifyInstance): void {
  const noop = (_req: unknown, _payload: unknown, done: (err: null, body?: undefined) => void) =>
    done(null, undefined);
  app.addContentTypeParser(
    [
      protoConnect.contentTypeUnaryJson,
      protoConnect.contentTypeStreamJson,
      protoGrpcWeb.contentTypeProto,
      protoGrpcWeb.contentTypeJson,
      protoGrpc.contentTypeProto,
      protoGrpc.contentTypeJson,
    ],
    noop,
  );
  app.addContentTypeParser(protoGrpc.contentTypeRegExp, noop);
  app.addContentTypeParser(protoGrpcWeb.contentTypeRegExp, noop);
  app.addContentTypeParser(protoConnect.contentTypeRegExp, noop);
}

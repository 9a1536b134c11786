/**
 * HTTP/2 at the frame level, for hostile-input tests: a client that writes
 * exactly the bytes it is given (frames node:http2 would refuse to send,
 * wrong stream ids, no SETTINGS ACK, truncated frames) and records every
 * frame the peer sends back. Header blocks are encoded with HPACK literals
 * only (RFC 7541 §6.2.3, no Huffman, no table), which every decoder must
 * accept. Responses are not HPACK-decoded: tests look at frame types, flags,
 * error codes, and whether the connection is still alive.
 */
import { connect, type Socket } from "node:net";

export const frameType = {
  data: 0x0,
  headers: 0x1,
  priority: 0x2,
  rstStream: 0x3,
  settings: 0x4,
  pushPromise: 0x5,
  ping: 0x6,
  goaway: 0x7,
  windowUpdate: 0x8,
  continuation: 0x9,
} as const;

export const flag = {
  endStream: 0x1,
  ack: 0x1,
  endHeaders: 0x4,
  padded: 0x8,
  priority: 0x20,
} as const;

/** RST_STREAM / GOAWAY error codes (RFC 9113 §7). */
export const h2Error = {
  noError: 0x0,
  protocolError: 0x1,
  internalError: 0x2,
  flowControlError: 0x3,
  frameSizeError: 0x6,
  refusedStream: 0x7,
  cancel: 0x8,
  compressionError: 0x9,
  enhanceYourCalm: 0xb,
} as const;

export const clientPreface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** One frame: 9-byte header (length, type, flags, stream id) and payload. */
export function frame(
  type: number,
  flags: number,
  streamId: number,
  payload: Uint8Array = new Uint8Array(0),
  /** Length written in the header; default the payload's (lie to build truncated frames). */
  declaredLength = payload.length,
): Buffer {
  const out = Buffer.alloc(9 + payload.length);
  out.writeUIntBE(declaredLength & 0xffffff, 0, 3);
  out[3] = type & 0xff;
  out[4] = flags & 0xff;
  out.writeUInt32BE(streamId >>> 0, 5);
  out.set(payload, 9);
  return out;
}

/** HPACK integer with an N-bit prefix (RFC 7541 §5.1). */
function hpackInt(value: number, prefixBits: number, firstByte: number): number[] {
  const max = (1 << prefixBits) - 1;
  if (value < max) {
    return [firstByte | value];
  }
  const out = [firstByte | max];
  let rest = value - max;
  while (rest >= 128) {
    out.push((rest % 128) + 128);
    rest = Math.floor(rest / 128);
  }
  out.push(rest);
  return out;
}

function hpackString(s: string | Uint8Array): Buffer {
  const bytes = typeof s === "string" ? Buffer.from(s, "latin1") : Buffer.from(s);
  return Buffer.concat([Buffer.from(hpackInt(bytes.length, 7, 0)), bytes]);
}

/**
 * A header block of "literal header field never indexed, new name" entries
 * (0x10), in the given order, duplicates allowed.
 */
export function headerBlock(headers: ReadonlyArray<readonly [string, string]>): Buffer {
  return Buffer.concat(
    headers.map(([name, value]) =>
      Buffer.concat([Buffer.from([0x10]), hpackString(name), hpackString(value)]),
    ),
  );
}

export function settingsFrame(values: ReadonlyArray<readonly [number, number]> = []): Buffer {
  const payload = Buffer.alloc(values.length * 6);
  values.forEach(([id, value], i) => {
    payload.writeUInt16BE(id, i * 6);
    payload.writeUInt32BE(value >>> 0, i * 6 + 2);
  });
  return frame(frameType.settings, 0, 0, payload);
}

export function rstStreamFrame(streamId: number, code: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(code >>> 0);
  return frame(frameType.rstStream, 0, streamId, payload);
}

export function windowUpdateFrame(streamId: number, increment: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(increment >>> 0);
  return frame(frameType.windowUpdate, 0, streamId, payload);
}

/** A gRPC length-prefixed message (flag byte, 4-byte length, payload). */
export function grpcMessage(payload: Uint8Array, compressed = 0, declaredLength?: number): Buffer {
  const out = Buffer.alloc(5 + payload.length);
  out[0] = compressed;
  out.writeUInt32BE((declaredLength ?? payload.length) >>> 0, 1);
  out.set(payload, 5);
  return out;
}

/** Request headers of a gRPC call to `path`, pseudo-headers first. */
export function grpcRequestHeaders(
  path: string,
  authority: string,
  extra: ReadonlyArray<readonly [string, string]> = [],
): Array<[string, string]> {
  return [
    [":method", "POST"],
    [":scheme", "http"],
    [":path", path],
    [":authority", authority],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
    ...extra.map(([n, v]) => [n, v] as [string, string]),
  ];
}

export interface ReceivedFrame {
  type: number;
  flags: number;
  streamId: number;
  payload: Buffer;
}

export interface RawH2Connection {
  socket: Socket;
  /** Frames received so far, in order. */
  frames: ReceivedFrame[];
  /** True once the peer (or we) closed the TCP connection. */
  closed: boolean;
  write(bytes: Uint8Array): void;
  /** Resolves with the first received frame (from index `from`) matching `match`, or undefined on timeout/close. */
  waitForFrame(
    match: (f: ReceivedFrame) => boolean,
    timeoutMs: number,
    from?: number,
  ): Promise<ReceivedFrame | undefined>;
  /** Resolves true when the connection closes within `timeoutMs`. */
  waitForClose(timeoutMs: number): Promise<boolean>;
  /** RST_STREAM error code for `streamId`, if one was received. */
  resetCode(streamId: number): number | undefined;
  /** GOAWAY error code, if one was received. */
  goawayCode(): number | undefined;
  destroy(): void;
}

export interface RawH2Options {
  /** Send the client preface and an empty SETTINGS frame first. Default true. */
  preface?: boolean;
  /** Acknowledge the peer's SETTINGS frames. Default true. */
  ackSettings?: boolean;
  /** Answer PINGs. Default true. */
  ackPings?: boolean;
}

/** Opens a TCP connection to 127.0.0.1:`port` and speaks raw HTTP/2 (h2c, prior knowledge). */
export function rawH2Connect(port: number, options: RawH2Options = {}): Promise<RawH2Connection> {
  const socket = connect(port, "127.0.0.1");
  socket.setNoDelay(true);
  const frames: ReceivedFrame[] = [];
  let buffer: Buffer = Buffer.alloc(0);
  const listeners = new Set<() => void>();
  const notify = () => {
    for (const l of [...listeners]) l();
  };
  const conn: RawH2Connection = {
    socket,
    frames,
    closed: false,
    write(bytes) {
      if (!socket.destroyed) {
        socket.write(bytes);
      }
    },
    waitForFrame(match, timeoutMs, from = 0) {
      return new Promise((resolve) => {
        const check = () => {
          const found = frames.slice(from).find(match);
          if (found || conn.closed) {
            done(found);
          }
        };
        const timer = setTimeout(() => done(undefined), timeoutMs);
        const done = (f: ReceivedFrame | undefined) => {
          clearTimeout(timer);
          listeners.delete(check);
          resolve(f);
        };
        listeners.add(check);
        check();
      });
    },
    waitForClose(timeoutMs) {
      return new Promise((resolve) => {
        const check = () => {
          if (conn.closed) {
            done(true);
          }
        };
        const timer = setTimeout(() => done(false), timeoutMs);
        const done = (v: boolean) => {
          clearTimeout(timer);
          listeners.delete(check);
          resolve(v);
        };
        listeners.add(check);
        check();
      });
    },
    resetCode(streamId) {
      const f = frames.find((x) => x.type === frameType.rstStream && x.streamId === streamId);
      return f && f.payload.length >= 4 ? f.payload.readUInt32BE(0) : undefined;
    },
    goawayCode() {
      const f = frames.find((x) => x.type === frameType.goaway);
      return f && f.payload.length >= 8 ? f.payload.readUInt32BE(4) : undefined;
    },
    destroy() {
      socket.destroy();
    },
  };
  socket.on("data", (chunk: Buffer) => {
    buffer = buffer.length === 0 ? chunk : Buffer.concat([buffer, chunk]);
    while (buffer.length >= 9) {
      const length = buffer.readUIntBE(0, 3);
      if (buffer.length < 9 + length) {
        break;
      }
      const f: ReceivedFrame = {
        type: buffer[3] as number,
        flags: buffer[4] as number,
        streamId: buffer.readUInt32BE(5) & 0x7fffffff,
        payload: buffer.subarray(9, 9 + length),
      };
      buffer = buffer.subarray(9 + length);
      frames.push(f);
      if (
        f.type === frameType.settings &&
        (f.flags & flag.ack) === 0 &&
        options.ackSettings !== false
      ) {
        conn.write(frame(frameType.settings, flag.ack, 0));
      }
      if (f.type === frameType.ping && (f.flags & flag.ack) === 0 && options.ackPings !== false) {
        conn.write(frame(frameType.ping, flag.ack, 0, f.payload));
      }
    }
    notify();
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    conn.closed = true;
    notify();
  });
  return new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.once("connect", () => {
      socket.off("error", reject);
      if (options.preface !== false) {
        socket.write(Buffer.concat([clientPreface, settingsFrame()]));
      }
      resolve(conn);
    });
  });
}

/** True when any frame on `streamId` ended it (END_STREAM or RST_STREAM) or the connection went away. */
export function streamAnswered(conn: RawH2Connection, streamId: number): boolean {
  return (
    conn.closed ||
    conn.frames.some(
      (f) =>
        (f.streamId === streamId &&
          (f.type === frameType.rstStream ||
            ((f.type === frameType.headers || f.type === frameType.data) &&
              (f.flags & flag.endStream) !== 0))) ||
        f.type === frameType.goaway,
    )
  );
}

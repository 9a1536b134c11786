/**
 * The protobuf descriptor set the gateway runs on: the same file that is
 * uploaded to API Gateway (`gcloud api-gateway api-configs create
 * --grpc-files=gen/echo.pb,api_config.yaml`), a `FileDescriptorSet` with
 * imports and source info, as `buf build --as-file-descriptor-set` writes it.
 *
 * Service Management fills `apis[].methods[]` of the service config from this
 * file; {@link listMethods} gives the same list for the local gateway.
 */
import { readFile } from "node:fs/promises";
import {
  createFileRegistry,
  type FileRegistry,
  fromBinary,
  type Registry,
} from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

/** One RPC of a service in the descriptor set, named the way service config rules name it. */
export interface DescriptorMethod {
  /** Operation name used by service config selectors: `echo.v1.EchoService.Echo`. */
  readonly selector: string;
  /** HTTP/2 `:path` of the gRPC call: `/echo.v1.EchoService/Echo`. */
  readonly path: string;
  /** Fully qualified service name: `echo.v1.EchoService`. */
  readonly service: string;
  /** Method name as declared in the proto: `Echo`. */
  readonly name: string;
  /** The client sends a stream of messages (client or bidi streaming). */
  readonly requestStreaming: boolean;
  /** The server answers with a stream of messages (server or bidi streaming). */
  readonly responseStreaming: boolean;
  /** Fully qualified request message name: `echo.v1.EchoRequest`. */
  readonly requestType: string;
  /** Fully qualified response message name: `echo.v1.EchoResponse`. */
  readonly responseType: string;
}

/**
 * A descriptor set that cannot be read or decoded. `code` is stable:
 * `ERR_DESCRIPTOR_INVALID`.
 */
export class DescriptorError extends Error {
  override name = "DescriptorError";
  readonly code = "ERR_DESCRIPTOR_INVALID";
}

/**
 * Decodes a binary `FileDescriptorSet` into a registry. Throws
 * {@link DescriptorError} naming `source` when the bytes are not a complete
 * descriptor set (for example a single `FileDescriptorProto` without its
 * imports, or a text file).
 */
export function parseDescriptorSet(bytes: Uint8Array, source = "descriptor set"): FileRegistry {
  try {
    const set = fromBinary(FileDescriptorSetSchema, bytes);
    if (set.file.length === 0) {
      throw new Error("it contains no files");
    }
    return createFileRegistry(set);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new DescriptorError(
      `${source}: not a FileDescriptorSet with imports (build it with \`buf build --as-file-descriptor-set\` or \`protoc --include_imports\`): ${reason}`,
      { cause: err },
    );
  }
}

/** Reads and decodes a descriptor set file; see {@link parseDescriptorSet}. */
export async function loadDescriptorSet(file: string): Promise<FileRegistry> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(file);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new DescriptorError(`${file}: cannot read the descriptor set: ${reason}`, {
      cause: err,
    });
  }
  return parseDescriptorSet(bytes, file);
}

/**
 * The methods of the named services, in service then declaration order; all
 * services of the registry when `services` is omitted. A service name missing
 * from the registry is skipped (use {@link hasService} to check first).
 */
export function listMethods(registry: Registry, services?: readonly string[]): DescriptorMethod[] {
  const names =
    services ?? [...registry].flatMap((desc) => (desc.kind === "service" ? [desc.typeName] : []));
  const methods: DescriptorMethod[] = [];
  for (const serviceName of names) {
    const service = registry.getService(serviceName);
    if (service === undefined) {
      continue;
    }
    for (const method of service.methods) {
      methods.push(
        Object.freeze({
          selector: `${service.typeName}.${method.name}`,
          path: `/${service.typeName}/${method.name}`,
          service: service.typeName,
          name: method.name,
          requestStreaming:
            method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
          responseStreaming:
            method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
          requestType: method.input.typeName,
          responseType: method.output.typeName,
        }),
      );
    }
  }
  return methods;
}

/** Whether the registry declares the fully qualified service `name`. */
export function hasService(registry: Registry, name: string): boolean {
  return registry.getService(name) !== undefined;
}

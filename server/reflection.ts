/**
 * gRPC server reflection (`grpc.reflection.v1` and the older `v1alpha`,
 * which grpcurl still tries first), so `buf curl` and grpcurl can call the
 * server without a schema. Connect-ES has no reflection service, so this one
 * is ours; it answers from the embedded descriptors of the generated code.
 */
import {
  create,
  type DescFile,
  type DescMessage,
  type DescService,
  fromBinary,
  toBinary,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type { ConnectRouter } from "@connectrpc/connect";
import * as v1 from "../gen/grpc/reflection/v1/reflection_pb.ts";
import * as v1alpha from "../gen/grpc/reflection/v1alpha/reflection_pb.ts";

/** gRPC status codes used in `error_response` (grpc::StatusCode). */
const statusNotFound = 5;
const statusUnimplemented = 12;

interface Index {
  services: string[];
  byFilename: Map<string, DescFile>;
  bySymbol: Map<string, DescFile>;
}

/**
 * Registers both reflection versions on `router`, describing `services`
 * (reflection itself included, as grpc-go does).
 */
export function registerReflection(router: ConnectRouter, services: DescService[]): void {
  const all = [...services, v1.ServerReflection, v1alpha.ServerReflection];
  const index = buildIndex(all);
  router.service(v1.ServerReflection, {
    serverReflectionInfo: (requests) => answerV1(index, requests),
  });
  router.service(v1alpha.ServerReflection, {
    serverReflectionInfo: (requests) => answerV1alpha(index, requests),
  });
}

/**
 * Answers one request. v1alpha messages are converted to v1 and back through
 * their wire format, which is identical in both versions.
 */
function respond(index: Index, req: v1.ServerReflectionRequest): v1.ServerReflectionResponse {
  const r = req.messageRequest;
  let messageResponse: v1.ServerReflectionResponse["messageResponse"];
  switch (r.case) {
    case "listServices":
      messageResponse = {
        case: "listServicesResponse",
        value: create(v1.ListServiceResponseSchema, {
          service: index.services.map((name) => ({ name })),
        }),
      };
      break;
    case "fileByFilename":
      messageResponse = filesResponse(index.byFilename.get(r.value), `file ${r.value}`);
      break;
    case "fileContainingSymbol":
      messageResponse = filesResponse(index.bySymbol.get(r.value), `symbol ${r.value}`);
      break;
    case "fileContainingExtension":
      messageResponse = errorResponse(
        statusNotFound,
        `extension ${r.value.containingType}:${r.value.extensionNumber} not found`,
      );
      break;
    case "allExtensionNumbersOfType":
      messageResponse = index.bySymbol.has(r.value)
        ? {
            case: "allExtensionNumbersResponse",
            value: create(v1.ExtensionNumberResponseSchema, { baseTypeName: r.value }),
          }
        : errorResponse(statusNotFound, `type ${r.value} not found`);
      break;
    default:
      messageResponse = errorResponse(statusUnimplemented, "request kind not supported");
  }
  return create(v1.ServerReflectionResponseSchema, {
    validHost: req.host,
    originalRequest: req,
    messageResponse,
  });
}

async function* answerV1(index: Index, requests: AsyncIterable<v1.ServerReflectionRequest>) {
  for await (const req of requests) {
    yield respond(index, req);
  }
}

async function* answerV1alpha(
  index: Index,
  requests: AsyncIterable<v1alpha.ServerReflectionRequest>,
) {
  for await (const req of requests) {
    const asV1 = fromBinary(
      v1.ServerReflectionRequestSchema,
      toBinary(v1alpha.ServerReflectionRequestSchema, req),
    );
    yield fromBinary(
      v1alpha.ServerReflectionResponseSchema,
      toBinary(v1.ServerReflectionResponseSchema, respond(index, asV1)),
    );
  }
}

function filesResponse(
  file: DescFile | undefined,
  what: string,
): v1.ServerReflectionResponse["messageResponse"] {
  if (!file) {
    return errorResponse(statusNotFound, `${what} not found`);
  }
  // The file and everything it imports, transitively, so the client can
  // build a complete schema from one answer.
  const files: DescFile[] = [];
  const seen = new Set<string>();
  const visit = (f: DescFile) => {
    if (seen.has(f.name)) {
      return;
    }
    seen.add(f.name);
    files.push(f);
    for (const dep of f.dependencies) {
      visit(dep);
    }
  };
  visit(file);
  return {
    case: "fileDescriptorResponse",
    value: create(v1.FileDescriptorResponseSchema, {
      fileDescriptorProto: files.map((f) => toBinary(FileDescriptorProtoSchema, f.proto)),
    }),
  };
}

function errorResponse(
  errorCode: number,
  errorMessage: string,
): v1.ServerReflectionResponse["messageResponse"] {
  return {
    case: "errorResponse",
    value: create(v1.ErrorResponseSchema, { errorCode, errorMessage }),
  };
}

function buildIndex(services: DescService[]): Index {
  const index: Index = {
    services: services.map((s) => s.typeName),
    byFilename: new Map(),
    bySymbol: new Map(),
  };
  const addFile = (file: DescFile) => {
    if (index.byFilename.has(file.name)) {
      return;
    }
    index.byFilename.set(`${file.name}.proto`, file);
    index.byFilename.set(file.name, file);
    for (const service of file.services) {
      index.bySymbol.set(service.typeName, file);
      for (const method of service.methods) {
        index.bySymbol.set(`${service.typeName}.${method.name}`, file);
      }
    }
    const addMessage = (message: DescMessage) => {
      index.bySymbol.set(message.typeName, file);
      for (const nested of message.nestedMessages) {
        addMessage(nested);
      }
      for (const nested of message.nestedEnums) {
        index.bySymbol.set(nested.typeName, file);
      }
    };
    for (const message of file.messages) {
      addMessage(message);
    }
    for (const e of file.enums) {
      index.bySymbol.set(e.typeName, file);
    }
    for (const ext of file.extensions) {
      index.bySymbol.set(ext.typeName, file);
    }
    for (const dep of file.dependencies) {
      addFile(dep);
    }
  };
  for (const service of services) {
    addFile(service.file);
  }
  return index;
}

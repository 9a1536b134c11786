/**
 * Which process is answering: Cloud Run's service and revision, and the
 * container instance id from the metadata server.
 */
import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { type Instance, InstanceSchema } from "../gen/echo/v1/echo_pb.ts";

/**
 * Creates the instance identity with a random per-process id. The id is
 * replaced by the metadata server's `instance/id` once
 * {@link resolveInstanceId} gets an answer; the object is shared, so
 * responses pick the new id up without restarting anything.
 */
export function createInstance(service: string, revision: string): Instance {
  return create(InstanceSchema, {
    service,
    revision,
    id: `local-${randomBytes(6).toString("hex")}`,
  });
}

export interface ResolveInstanceIdOptions {
  /** Give up after this long. Default 1000 ms. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

/**
 * Asks the metadata server for the instance id (`GCE_METADATA_HOST` when set,
 * the real one otherwise) and stores it in `instance`. Never throws: without
 * a metadata server the random id stays. Meant to run in the background
 * after the server listens, so start-up never waits on it.
 *
 * Written against the documented HTTP contract instead of `gcp-metadata`:
 * one GET with `Metadata-Flavor: Google`, and importing gaxios here would add
 * to every cold start for a single string.
 */
export async function resolveInstanceId(
  instance: Instance,
  options: ResolveInstanceIdOptions = {},
): Promise<boolean> {
  const env = options.env ?? process.env;
  const configured = env["GCE_METADATA_HOST"] ?? env["GCE_METADATA_IP"];
  // Off Google Cloud and with no stand-in configured there is nothing to ask;
  // probing 169.254.169.254 would only delay the answer "no".
  if (!configured && !env["K_SERVICE"]) {
    return false;
  }
  const host = configured ?? "169.254.169.254";
  const base = /^https?:\/\//.test(host) ? host : `http://${host}`;
  try {
    const res = await fetch(`${base}/computeMetadata/v1/instance/id`, {
      headers: { "Metadata-Flavor": "Google" },
      signal: AbortSignal.timeout(options.timeoutMs ?? 1000),
    });
    if (!res.ok || res.headers.get("metadata-flavor") !== "Google") {
      return false;
    }
    const id = (await res.text()).trim();
    if (id === "" || id.length > 256) {
      return false;
    }
    instance.id = id;
    return true;
  } catch {
    return false;
  }
}

/**
 * Processes under test: spawned with `node` directly (never `npm run`),
 * pinned to a CPU with taskset, output to a log file, stopped by PID.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync } from "node:fs";
import { join } from "node:path";

export const root = new URL("../..", import.meta.url).pathname;

export interface ChildSpec {
  /** Short name for logs and errors, e.g. "server" or "gateway". */
  name: string;
  /** Script and arguments after `node` and `nodeFlags`. */
  args: string[];
  env: Record<string, string>;
  /** Extra `node` flags (e.g. `--max-semi-space-size=16`). */
  nodeFlags?: string[];
  /** CPU list for taskset (e.g. "0"); unpinned when undefined. */
  cpus: string | undefined;
  /** Where stdout and stderr go. */
  logFile: string;
  /** Working directory; default the project root. */
  cwd?: string;
}

export interface Child {
  name: string;
  pid: number;
  process: ChildProcess;
  logFile: string;
  exited: Promise<number | string>;
}

/** Whether `taskset` (util-linux) is on the PATH. */
export function hasTaskset(): boolean {
  try {
    execFileSync("taskset", ["-V"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** Pins the current process (the bench itself: stand-ins, samplers) to `cpus`. */
export function pinSelf(cpus: string): void {
  execFileSync("taskset", ["-pc", cpus, String(process.pid)], { stdio: "ignore" });
}

/** Every child still running, so that an interrupted bench stops them. */
const live = new Set<ChildProcess>();
let stopping = false;

/**
 * Sends SIGTERM to every child this process started and has not seen exit
 * (by PID, nothing else). For SIGINT/SIGTERM handlers.
 */
export function stopAllChildren(): void {
  // From now on nothing new is started: the bench's loop may still be
  // between two targets while it exits.
  stopping = true;
  for (const child of live) {
    child.kill("SIGTERM");
  }
}

export function spawnChild(spec: ChildSpec): Child {
  if (stopping) {
    throw new Error(`${spec.name}: not started, the bench is stopping`);
  }
  const fd = openSync(spec.logFile, "w");
  const flags = spec.nodeFlags ?? [];
  // Name CPU profiles after the process, so a gateway's is told from a server's.
  const profileName = flags.includes("--cpu-prof")
    ? [`--cpu-prof-name=${spec.name}.cpuprofile`]
    : [];
  const nodeArgs = [...flags, ...profileName, ...spec.args];
  // taskset execs node: the PID is node's own, so peak RSS and signals reach it.
  const [command, args] = spec.cpus
    ? ["taskset", ["-c", spec.cpus, process.execPath, ...nodeArgs]]
    : [process.execPath, nodeArgs];
  const child = spawn(command as string, args as string[], {
    cwd: spec.cwd ?? root,
    env: spec.env,
    stdio: ["ignore", fd, fd],
  });
  closeSync(fd);
  if (child.pid === undefined) {
    throw new Error(`${spec.name}: could not spawn ${command}`);
  }
  live.add(child);
  child.once("exit", () => live.delete(child));
  return {
    name: spec.name,
    pid: child.pid,
    process: child,
    logFile: spec.logFile,
    exited: new Promise((resolve) => {
      child.once("exit", (code, signal) => resolve(code ?? signal ?? 0));
    }),
  };
}

/**
 * Waits until the child's log has a JSON line whose `message` is `message`,
 * and returns that record. Rejects when the child exits first or after
 * `timeoutMs`, quoting the end of its log.
 */
export async function waitForLine(
  child: Child,
  message: string,
  timeoutMs = 15_000,
): Promise<Record<string, unknown>> {
  let exitedWith: number | string | undefined;
  void child.exited.then((c) => {
    exitedWith = c;
  });
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const text = existsSync(child.logFile) ? readFileSync(child.logFile, "utf8") : "";
    for (const line of text.split("\n")) {
      if (!line.includes(message)) {
        continue;
      }
      try {
        const record = JSON.parse(line) as Record<string, unknown>;
        if (record["message"] === message) {
          return record;
        }
      } catch {
        // A line that merely mentions the message; keep looking.
      }
    }
    if (exitedWith !== undefined) {
      throw new Error(`${child.name} exited (${exitedWith}) before "${message}":\n${tail(child)}`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`${child.name}: no "${message}" within ${timeoutMs} ms:\n${tail(child)}`);
}

function tail(child: Child): string {
  const text = existsSync(child.logFile) ? readFileSync(child.logFile, "utf8") : "";
  return text.split("\n").slice(-8).join("\n");
}

/** Peak resident set (VmHWM) of a live process, in MiB; NaN when unreadable. */
export function peakRssMiB(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** CPU time (user + system) a live process has used so far, in seconds; NaN when unreadable. */
export function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name, which may contain spaces, in parentheses.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / clockTicks;
  } catch {
    return Number.NaN;
  }
}

const clockTicks = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone. */
export async function stopChild(child: Child, graceMs = 10_000): Promise<void> {
  if (child.process.exitCode !== null || child.process.signalCode !== null) {
    return;
  }
  child.process.kill("SIGTERM");
  const timer = setTimeout(() => child.process.kill("SIGKILL"), graceMs);
  await child.exited;
  clearTimeout(timer);
}

/** A log file path in `dir` for `name`. */
export function logPath(dir: string, name: string): string {
  return join(dir, `${name.replace(/[^a-z0-9-]+/gi, "_")}.log`);
}

/**
 * Share of all CPUs busy over the next `ms` (from /proc/stat), 0–1; NaN off
 * Linux. The bench reports it before and after a run: this machine may be
 * shared, and a busy neighbour makes every figure noisier.
 */
export async function machineBusy(ms = 500): Promise<number> {
  const read = () => {
    try {
      const fields =
        readFileSync("/proc/stat", "utf8")
          .split("\n")[0]
          ?.trim()
          .split(/\s+/)
          .slice(1)
          .map(Number) ?? [];
      const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
      return { idle, total: fields.reduce((a, b) => a + b, 0) };
    } catch {
      return undefined;
    }
  };
  const a = read();
  await new Promise((r) => setTimeout(r, ms));
  const b = read();
  if (!a || !b || b.total === a.total) {
    return Number.NaN;
  }
  return 1 - (b.idle - a.idle) / (b.total - a.total);
}

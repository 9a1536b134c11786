/**
 * Start-up configuration errors, shared by every entry point (server, gateway,
 * client CLI, local tools). A loader collects every problem it finds and
 * throws them together, so a misconfigured deployment is fixed in one round.
 */
export class ConfigError extends Error {
  override name = "ConfigError";
  /** Stable machine-readable code. */
  readonly code = "ERR_CONFIG_INVALID";
  /** One line per problem, each naming the variable or flag and the fix. */
  readonly problems: readonly string[];

  constructor(problems: readonly string[]) {
    super(problems.join("; "));
    this.problems = problems;
  }
}

/**
 * Prints a ConfigError as one line per problem on stderr and exits with
 * status 2, without a stack trace; rethrows anything else.
 */
export function exitOnConfigError(err: unknown, program: string): never {
  if (err instanceof ConfigError) {
    for (const problem of err.problems) {
      process.stderr.write(`${program}: ${problem}\n`);
    }
    process.exit(2);
  }
  throw err;
}

/** Helpers that turn strings from env or flags into typed values, recording problems. */
export class ValueParser {
  readonly problems: string[] = [];

  /** An integer in [min, max]; `source` names the variable/flag in the message. */
  int(raw: string | undefined, source: string, fallback: number, min: number, max: number): number {
    if (raw === undefined || raw === "") {
      return fallback;
    }
    const value = Number(raw);
    if (!/^-?\d+$/.test(raw.trim()) || !Number.isSafeInteger(value) || value < min || value > max) {
      this.problems.push(`${source}: "${raw}" is not an integer between ${min} and ${max}`);
      return fallback;
    }
    return value;
  }

  /** One of `choices`. */
  oneOf<T extends string>(
    raw: string | undefined,
    source: string,
    fallback: T,
    choices: readonly T[],
  ): T {
    if (raw === undefined || raw === "") {
      return fallback;
    }
    if (!(choices as readonly string[]).includes(raw)) {
      this.problems.push(`${source}: "${raw}" is not one of ${choices.join(", ")}`);
      return fallback;
    }
    return raw as T;
  }

  /** "true"/"false"/"1"/"0"; a bare flag arrives as true. */
  bool(raw: string | boolean | undefined, source: string, fallback: boolean): boolean {
    if (raw === undefined || raw === "") {
      return fallback;
    }
    if (typeof raw === "boolean") {
      return raw;
    }
    if (["true", "1", "yes"].includes(raw.toLowerCase())) {
      return true;
    }
    if (["false", "0", "no"].includes(raw.toLowerCase())) {
      return false;
    }
    this.problems.push(`${source}: "${raw}" is not a boolean (true or false)`);
    return fallback;
  }

  /** An absolute http(s) URL. */
  url(raw: string | undefined, source: string, fallback: string): string {
    if (raw === undefined || raw === "") {
      return fallback;
    }
    let parsed: URL | undefined;
    try {
      parsed = new URL(raw);
    } catch {
      parsed = undefined;
    }
    if (!parsed || (parsed.protocol !== "http:" && parsed.protocol !== "https:")) {
      this.problems.push(`${source}: "${raw}" is not an http(s) URL`);
      return fallback;
    }
    return raw;
  }
}

/** Splits a comma-separated list, trimming entries and dropping empty ones. */
export function splitList(raw: string | undefined): string[] {
  if (!raw) {
    return [];
  }
  return raw
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/**
 * A small seeded PRNG (sfc32, seeded through splitmix32) for reproducible
 * fuzzing: the same seed gives the same cases on every machine. Written by
 * hand because the project has no property-testing dependency.
 */
export interface Prng {
  readonly seed: number;
  /** Uniform in [0, 1). */
  next(): number;
  /** Integer in [0, n). */
  int(n: number): number;
  /** Integer in [min, max] inclusive. */
  range(min: number, max: number): number;
  bool(p?: number): boolean;
  pick<T>(items: readonly T[]): T;
  bytes(n: number): Buffer;
  /** A string of `n` characters drawn from `alphabet`. */
  string(n: number, alphabet: string): string;
}

export function createPrng(seed: number): Prng {
  let s = seed >>> 0;
  const splitmix = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = splitmix();
  let b = splitmix();
  let c = splitmix();
  let d = splitmix();
  const next32 = () => {
    const t = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) >>> 0;
    return t;
  };
  for (let i = 0; i < 12; i++) {
    next32();
  }
  const prng: Prng = {
    seed,
    next: () => next32() / 2 ** 32,
    int: (n) => Math.floor(prng.next() * n),
    range: (min, max) => min + prng.int(max - min + 1),
    bool: (p = 0.5) => prng.next() < p,
    pick: (items) => items[prng.int(items.length)] as (typeof items)[number],
    bytes(n) {
      const out = Buffer.alloc(n);
      for (let i = 0; i < n; i++) {
        out[i] = next32() & 0xff;
      }
      return out;
    },
    string(n, alphabet) {
      let out = "";
      for (let i = 0; i < n; i++) {
        out += alphabet.charAt(prng.int(alphabet.length));
      }
      return out;
    },
  };
  return prng;
}

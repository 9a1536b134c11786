/**
 * Summarises a V8 CPU profile (`node --cpu-prof`, or `npm run bench --
 * --cpu-prof`): the functions with the most self time, and the most
 * inclusive time, so that "where does the time go" fits on a screen.
 *
 *   node bench/profile-summary.ts FILE.cpuprofile [--top 30] [--filter text]
 */
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { top: { type: "string" }, filter: { type: "string" } },
});
const file = positionals[0];
if (!file) {
  process.stderr.write(
    "usage: node bench/profile-summary.ts FILE.cpuprofile [--top N] [--filter text]\n",
  );
  process.exit(2);
}
const top = Number(values.top ?? 30);
const profile = JSON.parse(readFileSync(file, "utf8")) as Profile;
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of profile.nodes) {
  for (const c of n.children ?? []) {
    parent.set(c, n.id);
  }
}
const name = (cf: CallFrame) =>
  `${cf.functionName || "(anonymous)"} ${cf.url.replace(/^.*node_modules\//, "").replace(/^file:\/\/.*?\/(server|gateway|lib|bench|gen)\//, "$1/")}:${cf.lineNumber + 1}`;

const timeOf = new Map<number, number>();
let total = 0;
let idle = 0;
profile.samples.forEach((id, i) => {
  const dt = profile.timeDeltas[i] ?? 0;
  timeOf.set(id, (timeOf.get(id) ?? 0) + dt);
  total += dt;
  if (byId.get(id)?.callFrame.functionName === "(idle)") {
    idle += dt;
  }
});
const self = new Map<string, number>();
const inclusive = new Map<string, number>();
for (const [id, t] of timeOf) {
  const node = byId.get(id);
  if (!node) {
    continue;
  }
  const key = name(node.callFrame);
  self.set(key, (self.get(key) ?? 0) + t);
  const seen = new Set<string>();
  for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
    const k = name((byId.get(cur) as ProfileNode).callFrame);
    if (!seen.has(k)) {
      seen.add(k);
      inclusive.set(k, (inclusive.get(k) ?? 0) + t);
    }
  }
}
const busy = total - idle;
const list = (m: Map<string, number>) =>
  [...m]
    .filter(([k]) => !values.filter || k.includes(values.filter))
    .filter(([k]) => !k.startsWith("(idle)") && !k.startsWith("(root)"))
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([k, v]) => `${((100 * v) / busy).toFixed(1).padStart(5)}%  ${k}`)
    .join("\n");
process.stdout.write(
  `${file}\n${(total / 1e6).toFixed(1)} s sampled, ${((100 * idle) / total).toFixed(0)}% idle; shares below are of busy time\n\nself time\n${list(self)}\n\ninclusive time\n${list(inclusive)}\n`,
);

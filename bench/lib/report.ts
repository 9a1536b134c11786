/**
 * The bench's output: the terminal tables, the Markdown for bench/README.md,
 * and the SVG chart of the ratios to the reference peers.
 */

/** Figures of one target and payload, medians over the rounds. */
export interface LoadFigures {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  /** h2load failures + non-2xx + sampled calls whose grpc-status was not 0, summed over rounds. */
  errors: number;
  /** Sampled calls (grpc-status checked), summed over rounds. */
  sampled: number;
  /** CPU time of the processes under test per request, µs (all processes of the target). */
  cpuUsPerRequest: number;
  /** The same per process role (gateway, server-1, …). */
  cpuUsByRole: Record<string, number>;
  /** Share of one CPU the target used during the run (1 = one core busy). */
  cpuBusy: number;
}

export interface TargetSummary {
  id: string;
  label: string;
  role: "ours" | "reference" | "ceiling" | "variant";
  /** payload name → figures at 256 in flight. */
  load: Record<string, LoadFigures>;
  /** payload name → figures at 1 in flight. */
  latency: Record<string, LoadFigures>;
  /** Server-stream messages per second, median; absent when not measured. */
  streamMessagesPerS?: number;
  /** Peak RSS per process role (e.g. gateway, server-1), MiB, median over rounds. */
  peakRssMiB: Record<string, number>;
  /** Real client calls before and after each load: passed / made. */
  checks: { passed: number; made: number };
}

export interface Ratio {
  target: string;
  payload: string;
  reference: string;
  value: number;
}

const num = (v: number, digits = 0) =>
  Number.isFinite(v)
    ? v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits })
    : "–";

/** A fixed-width text table: header row, rule, rows; numbers right-aligned. */
export function textTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const isNum = (s: string) => /^[-+×~≈–\d.,%]+( ms| µs| MiB)?$/.test(s) || s === "–";
  const fmt = (r: string[]) =>
    r
      .map((c, i) => (isNum(c) && i > 0 ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  return [fmt(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(fmt)].join("\n");
}

/** A Markdown table; the first column left-aligned, the others right-aligned. */
export function markdownTable(header: string[], rows: string[][]): string {
  const line = (r: string[]) => `| ${r.join(" | ")} |`;
  return [
    line(header),
    `|${header.map((_, i) => (i === 0 ? " --- " : " ---: ")).join("|")}|`,
    ...rows.map(line),
  ].join("\n");
}

export function formatRps(v: number): string {
  return num(v);
}

export function formatMs(v: number): string {
  return Number.isFinite(v) ? `${num(v, v < 10 ? 2 : 1)}` : "–";
}

export function formatRatio(v: number): string {
  return Number.isFinite(v) ? `${num(v, 2)}×` : "–";
}

export function formatMiB(v: number): string {
  return num(v);
}

/** Rows of the main table: one per target and payload. */
export function loadRows(
  targets: readonly TargetSummary[],
  payloads: readonly string[],
  ratioOf: (target: string, payload: string, reference: string) => number,
  references: readonly string[],
): string[][] {
  const rows: string[][] = [];
  for (const t of targets) {
    for (const p of payloads) {
      const f = t.load[p];
      if (!f) {
        continue;
      }
      const rss = Object.entries(t.peakRssMiB)
        .map(([role, v]) => (Object.keys(t.peakRssMiB).length > 1 ? `${role} ${num(v)}` : num(v)))
        .join(", ");
      rows.push([
        t.label,
        p,
        formatRps(f.rps),
        formatMs(f.p50Ms),
        formatMs(f.p99Ms),
        `${num(f.errors)}/${num(f.sampled)}`,
        rss,
        num(f.cpuUsPerRequest),
        ...references.map((r) => (t.id === r ? "1.00×" : formatRatio(ratioOf(t.id, p, r)))),
      ]);
    }
  }
  return rows;
}

export interface ChartInput {
  title: string;
  subtitle: string;
  /** One group per (target, payload); bars: one per reference. */
  groups: { label: string; bars: { reference: string; value: number }[] }[];
  /** Reference id → colour and legend text. */
  references: { id: string; label: string; color: string }[];
  /** Goal lines: ratio value and text. */
  goals: { value: number; label: string }[];
}

const escapeXml = (s: string) =>
  s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

/**
 * A horizontal grouped bar chart of ratios (1.0 = as fast as the
 * reference), hand-written SVG so that it renders on GitHub without tools.
 */
export function ratioChartSvg(input: ChartInput): string {
  const barH = 14;
  const barGap = 3;
  const groupGap = 16;
  // Room for the longest group label (≈ 6.6 px per character at 12 px).
  const left = Math.round(
    Math.max(160, 20 + Math.max(...input.groups.map((g) => g.label.length)) * 6.6),
  );
  const plotW = 520;
  const top = 78;
  const groupH = input.references.length * (barH + barGap) - barGap;
  const height = top + input.groups.length * (groupH + groupGap) + 40;
  const width = left + plotW + 90;
  const maxValue = Math.max(
    1.2,
    ...input.groups.flatMap((g) => g.bars.map((b) => (Number.isFinite(b.value) ? b.value : 0))),
  );
  const scaleMax = Math.ceil(maxValue * 5) / 5;
  const x = (v: number) =>
    Math.round((left + (Math.min(v, scaleMax) / scaleMax) * plotW) * 10) / 10;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="#ffffff"/>`,
    `<text x="12" y="22" font-size="15" font-weight="bold">${escapeXml(input.title)}</text>`,
    `<text x="12" y="40" fill="#555">${escapeXml(input.subtitle)}</text>`,
  );
  // Legend.
  let lx = 12;
  for (const r of input.references) {
    out.push(
      `<rect x="${lx}" y="52" width="12" height="12" fill="${r.color}"/>`,
      `<text x="${lx + 16}" y="62">${escapeXml(r.label)}</text>`,
    );
    lx += 22 + r.label.length * 6.5;
  }
  // Grid.
  const plotBottom = height - 34;
  for (let v = 0; v <= scaleMax + 1e-9; v += 0.2) {
    const gx = x(v);
    out.push(
      `<line x1="${gx}" y1="${top - 6}" x2="${gx}" y2="${plotBottom}" stroke="${Math.abs(v - 1) < 1e-9 ? "#333" : "#e3e3e3"}" stroke-width="${Math.abs(v - 1) < 1e-9 ? 1.5 : 1}"/>`,
      `<text x="${gx}" y="${plotBottom + 14}" text-anchor="middle" fill="#555">${v.toFixed(1)}×</text>`,
    );
  }
  for (const goal of input.goals) {
    const gx = x(goal.value);
    out.push(
      `<line x1="${gx}" y1="${top - 6}" x2="${gx}" y2="${plotBottom}" stroke="#c0392b" stroke-dasharray="4 3"/>`,
      `<text x="${gx + 3}" y="${plotBottom + 28}" fill="#c0392b">${escapeXml(goal.label)}</text>`,
    );
  }
  // Bars.
  let y = top;
  for (const g of input.groups) {
    out.push(
      `<text x="${left - 8}" y="${y + groupH / 2 + 4}" text-anchor="end">${escapeXml(g.label)}</text>`,
    );
    for (const r of input.references) {
      const bar = g.bars.find((b) => b.reference === r.id);
      const v = bar?.value ?? Number.NaN;
      const w = Number.isFinite(v) ? Math.max(1, x(v) - left) : 0;
      out.push(
        `<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barH}" fill="${r.color}"/>`,
        `<text x="${left + w + 4}" y="${y + barH - 3}" fill="#222">${Number.isFinite(v) ? `${v.toFixed(2)}×` : "n/a"}</text>`,
      );
      y += barH + barGap;
    }
    y += groupGap - barGap;
  }
  out.push("</svg>");
  return `${out.join("\n")}\n`;
}

/**
 * Preloaded into a child process (`NODE_OPTIONS="--expose-gc --import
 * <this file>"`) by the soak runs: on SIGUSR2 it collects garbage and writes
 * the live heap to stderr as one `heap-probe {...}` JSON line. RSS alone
 * cannot tell a leak from a heap that V8 keeps committed; the live heap
 * after a full collection can.
 */
process.on("SIGUSR2", () => {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  gc?.();
  const m = process.memoryUsage();
  process.stderr.write(
    `heap-probe ${JSON.stringify({ heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, rss: m.rss })}\n`,
  );
});

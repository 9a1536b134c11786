/**
 * Preload for processes under test (`node --import ./bench/lib/count-verify.ts …`):
 * counts signature verifications. jose verifies through WebCrypto's
 * `crypto.subtle.verify`, so wrapping that one method counts every JWT
 * signature check of the gateway and the server without touching their
 * code. The count is written to `BENCH_VERIFY_COUNT_FILE` when the process
 * exits (SIGTERM makes both servers exit through process.exit), and on
 * SIGUSR2 at any time.
 */
import { writeFileSync } from "node:fs";

const file = process.env["BENCH_VERIFY_COUNT_FILE"];
if (file) {
  const subtle = globalThis.crypto.subtle;
  const verify = subtle.verify.bind(subtle);
  let count = 0;
  subtle.verify = ((...args: Parameters<typeof verify>) => {
    count++;
    return verify(...args);
  }) as typeof subtle.verify;
  const write = () => writeFileSync(file, String(count));
  process.on("exit", write);
  process.on("SIGUSR2", write);
}

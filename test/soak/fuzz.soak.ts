/**
 * The fuzz run of test/hardening/fuzz.test.ts at ten times its size, with a
 * seed of its own (FUZZ_SEED and FUZZ_SCALE still override): about 30,000
 * hostile requests and frame sequences against both front doors.
 */
process.env["FUZZ_SEED"] ??= "4242";
process.env["FUZZ_SCALE"] ??= "10";
await import("../hardening/fuzz.test.ts");

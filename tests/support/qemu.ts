/**
 * QEMU for our tests: the test kit's (src/testing/qemu.ts), so that there is
 * one copy. Our own skip reason points at the setup script.
 */
import { qemuSkipReason as kitSkipReason } from "../../src/testing/qemu.ts";
export { QEMU, QemuProcess, qemuArgs, type QemuOptions, type VhostUserBlkOptions } from "../../src/testing/qemu.ts";

/** Why QEMU tests cannot run here, or null. */
export function qemuSkipReason(): string | null {
  const r = kitSkipReason();
  return r && `${r}; or run \`bun scripts/setup_tests.ts\` as root`;
}

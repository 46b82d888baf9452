/**
 * bunvhost/testing: the test kit for device authors, the same code our own
 * tests use. A driver that speaks vhost-user to any device (no VM), a way to
 * start a device on a socket, and a Linux-guest runner.
 */
export * from "./start.ts";
export * from "./driver.ts";
export * from "./guest.ts";

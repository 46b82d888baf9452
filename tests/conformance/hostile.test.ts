/**
 * A hostile front-end against our server (a child process): malformed
 * messages, wrong fd counts, bad memory regions, rings outside guest memory,
 * bad indexes, hostile descriptor chains. For each: the server logs an error
 * naming the problem, ends that connection, releases every fd and mapping
 * (counted in /proc/PID/fd and /proc/PID/maps), and then serves the next
 * front-end correctly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import * as sys from "../../ffi/sys.ts";
import {
  BackendReq, DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, DEVICE_STATE_SAVE, HDR_SIZE, Req, type Message,
} from "../../src/protocol/messages.ts";
import { encodeMessage } from "../../src/protocol/encode.ts";
import { bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1 } from "../../src/protocol/features.ts";
import {
  BLK_DRIVER_PROTOCOL_FEATURES, BlkDriver, GuestRam, VhostUserFrontend, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT,
} from "../../src/frontend/index.ts";
import { VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from "../../src/virtq/split.ts";
import { backendKinds, type Backend } from "../support/backends.ts";

const kind = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = kind.skipReason();
let be: Backend;
let baseFds = 0;
let baseMaps = 0;
const RAM_NAME = "hostile-guest-ram";

const fdCount = () => readdirSync(`/proc/${be.pid}/fd`).length;
const ramMaps = () => readFileSync(`/proc/${be.pid}/maps`, "utf8").split("\n").filter((l) => l.includes(RAM_NAME)).length;

/** One good front-end: set up, write and read back 4 KiB. */
function goodFrontend(): void {
  using d = BlkDriver.connect(be.socket, { timeoutMs: 5000 });
  const data = crypto.getRandomValues(new Uint8Array(4096));
  expect(d.write(64, data)).toBe(VIRTIO_BLK_S_OK);
  const r = new Uint8Array(4096);
  expect(d.read(64, r)).toBe(VIRTIO_BLK_S_OK);
  expect(Buffer.compare(r, data)).toBe(0);
}

/** Waits until the server has released what the connection held. */
async function settled(): Promise<void> {
  for (let i = 0; i < 100 && (fdCount() !== baseFds || ramMaps() !== baseMaps); i++) await Bun.sleep(20);
}

/**
 * The back-end's log from `before` on, once it matches `re` (or after 2 s). A
 * line logged by an I/O thread can reach the file after the connection's end
 * is visible here, so the assertion waits for it instead of racing it.
 */
async function expectLog(before: number, re: RegExp): Promise<void> {
  for (let i = 0; i < 100 && !re.test(be.stderr().slice(before)); i++) await Bun.sleep(20);
  expect(be.stderr().slice(before)).toMatch(re);
}

function raw(request: number, flags: number, payload: Uint8Array, sizeField = payload.length): Uint8Array {
  const b = new Uint8Array(HDR_SIZE + payload.length);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, sizeField, true);
  b.set(payload, HDR_SIZE);
  return b;
}

function encode(m: Message): Uint8Array {
  const b = new Uint8Array(HDR_SIZE + 4096);
  const n = encodeMessage(m, new DataView(b.buffer));
  return b.subarray(0, n);
}

const msg = (request: number, fields: Partial<Message> = {}): Message => ({ request, flags: 0, fds: [], ...fields });

const BASE_PROTOCOL = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG);
const INBAND = bit(ProtocolFeature.INBAND_NOTIFICATIONS) | bit(ProtocolFeature.BACKEND_REQ);
const DEVICE_STATE = bit(ProtocolFeature.DEVICE_STATE);

/** A front-end that has negotiated and shared memory, ready for a hostile message. */
function prepared(ram?: GuestRam, protocol = BASE_PROTOCOL): VhostUserFrontend {
  const fe = VhostUserFrontend.connect(be.socket, { timeoutMs: 3000 });
  const f = fe.getFeatures();
  fe.getProtocolFeatures();
  fe.setProtocolFeatures(protocol);
  fe.replyAck = true;
  fe.setOwner();
  fe.setFeatures(f & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)));
  if (ram) fe.setMemTable(ram.memRegions(), ram.memRegions().map(() => ram.fd));
  return fe;
}

interface Case {
  name: string;
  /** Text the server's log must contain for this connection. */
  log: RegExp;
  run(fe: VhostUserFrontend, ram: GuestRam): void;
  /** Set up memory before the hostile part (default true). */
  memory?: boolean;
  /** Protocol features to negotiate (default REPLY_ACK, MQ, CONFIG). */
  protocol?: bigint;
}

const efd = () => sys.eventfd();

const cases: Case[] = [
  { name: "a header with version 2", log: /flags/, run: (fe) => fe.sendRaw(raw(Req.GET_FEATURES, 0x2, new Uint8Array(0))) },
  { name: "reserved header flag bits", log: /flags/, run: (fe) => fe.sendRaw(raw(Req.GET_FEATURES, 0x1 | 0x40, new Uint8Array(0))) },
  { name: "a size field over 4096", log: /size/, run: (fe) => fe.sendRaw(raw(Req.SET_FEATURES, 1, new Uint8Array(8), 0x10000)) },
  { name: "an unknown request id", log: /UNKNOWN\(99\)|request/, run: (fe) => fe.sendRaw(raw(99, 1, new Uint8Array(0))) },
  { name: "SET_FEATURES with a 4-byte payload", log: /SET_FEATURES/, run: (fe) => fe.sendRaw(raw(Req.SET_FEATURES, 1, new Uint8Array(4))) },
  {
    name: "SET_FEATURES with a bit that was not offered", log: /SET_FEATURES.*not offered/,
    run: (fe) => fe.send(msg(Req.SET_FEATURES, { u64: 1n << 63n })),
  },
  {
    name: "GET_FEATURES carrying 3 fds (fds closed)", log: /GET_FEATURES.*fds/,
    run: (fe) => { const fds = [efd(), efd(), efd()]; fe.sendRaw(raw(Req.GET_FEATURES, 1, new Uint8Array(0)), fds); fds.forEach(sys.close); },
  },
  {
    name: "SET_MEM_TABLE with 2 regions and 1 fd", log: /SET_MEM_TABLE/, memory: false,
    run: (fe, ram) => fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions: ram.memRegions() })), [ram.fd]),
  },
  {
    name: "SET_MEM_TABLE with 9 regions", log: /SET_MEM_TABLE.*nregions|SET_MEM_TABLE.*9/, memory: false,
    run: (fe, ram) => {
      const r = ram.memRegions()[0]!;
      const regions = Array.from({ length: 9 }, (_, i) => ({ ...r, guestPhysAddr: i * 2 ** 30, memorySize: 4096 }));
      fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions })), Array(9).fill(ram.fd));
    },
  },
  {
    name: "a region larger than its memfd (would SIGBUS)", log: /SET_MEM_TABLE.*fd holds/, memory: false,
    run: (fe, ram) => {
      const r = ram.memRegions()[0]!;
      fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions: [{ ...r, memorySize: 1 << 30 }] })), [ram.fd]);
    },
  },
  {
    name: "a region whose mmap offset points past the memfd", log: /SET_MEM_TABLE.*fd holds/, memory: false,
    run: (fe, ram) => {
      const r = ram.memRegions()[0]!;
      fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions: [{ ...r, mmapOffset: ram.size }] })), [ram.fd]);
    },
  },
  {
    name: "overlapping regions", log: /SET_MEM_TABLE.*overlaps/, memory: false,
    run: (fe, ram) => {
      const r = ram.memRegions()[0]!;
      const regions = [r, { ...r, userAddr: r.userAddr + 2 * ram.size, guestPhysAddr: r.guestPhysAddr + 4096 }];
      fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions })), [ram.fd, ram.fd]);
    },
  },
  {
    name: "a region whose gpa + size overflows", log: /SET_MEM_TABLE/, memory: false,
    run: (fe, ram) => {
      const r = ram.memRegions()[0]!;
      fe.sendRaw(encode(msg(Req.SET_MEM_TABLE, { regions: [{ ...r, guestPhysAddr: 2 ** 53 - 4096 }] })), [ram.fd]);
    },
  },
  {
    name: "SET_VRING_NUM for queue 7 of 1", log: /SET_VRING_NUM.*index/,
    run: (fe) => fe.send(msg(Req.SET_VRING_NUM, { state: { index: 7, num: 128 } })),
  },
  {
    name: "SET_VRING_NUM of 1000 (not a power of 2)", log: /SET_VRING_NUM.*num/,
    run: (fe) => fe.send(msg(Req.SET_VRING_NUM, { state: { index: 0, num: 1000 } })),
  },
  {
    name: "ring addresses outside guest memory", log: /SET_VRING_ADDR/,
    run: (fe) => {
      fe.setVringNum(0, 128);
      fe.send(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: 0x1000, avail: 0x2000, used: 0x3000, log: 0 } }));
    },
  },
  {
    name: "a used ring running past the end of a region", log: /SET_VRING_ADDR/,
    run: (fe, ram) => {
      fe.setVringNum(0, 128);
      const r = ram.regions[0]!;
      const end = r.userAddr + r.size;
      fe.send(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: r.userAddr, avail: r.userAddr + 4096, used: end - 64, log: 0 } }));
    },
  },
  {
    name: "SET_VRING_KICK with 2 fds", log: /SET_VRING_KICK.*fds/,
    run: (fe) => { const fds = [efd(), efd()]; fe.sendRaw(encode(msg(Req.SET_VRING_KICK, { vring: { index: 0, noFd: false } })), fds); fds.forEach(sys.close); },
  },
  {
    name: "SET_VRING_CALL without an fd and without the no-fd flag", log: /SET_VRING_CALL.*fds/,
    run: (fe) => fe.sendRaw(encode(msg(Req.SET_VRING_CALL, { vring: { index: 0, noFd: false } }))),
  },
  {
    name: "SET_INFLIGHT_FD with a buffer smaller than it claims (would SIGBUS)", log: /SET_INFLIGHT_FD.*fd/,
    run: (fe) => {
      const fd = sys.memfdCreate("small-inflight");
      sys.ftruncate(fd, 4096);
      fe.sendRaw(encode(msg(Req.SET_INFLIGHT_FD, { inflight: { mmapSize: 1 << 20, mmapOffset: 0, numQueues: 1, queueSize: 128 } })), [fd]);
      sys.close(fd);
    },
  },
  {
    name: "SET_INFLIGHT_FD whose size cannot hold its queues", log: /SET_INFLIGHT_FD.*inflight/,
    run: (fe) => {
      const fd = sys.memfdCreate("short-inflight");
      sys.ftruncate(fd, 1 << 20);
      fe.sendRaw(encode(msg(Req.SET_INFLIGHT_FD, { inflight: { mmapSize: 4096, mmapOffset: 0, numQueues: 4, queueSize: 1024 } })), [fd]);
      sys.close(fd);
    },
  },
  {
    name: "SET_INFLIGHT_FD with an eventfd instead of a memory fd", log: /SET_INFLIGHT_FD.*fd/,
    run: (fe) => {
      const fd = efd();
      fe.sendRaw(encode(msg(Req.SET_INFLIGHT_FD, { inflight: { mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128 } })), [fd]);
      sys.close(fd);
    },
  },
  {
    name: "SET_LOG_BASE with a log larger than its fd (would SIGBUS)", log: /SET_LOG_BASE.*fd holds/,
    run: (fe) => {
      const fd = sys.memfdCreate("small-log");
      sys.ftruncate(fd, 4096);
      fe.sendRaw(encode(msg(Req.SET_LOG_BASE, { log: { size: 1 << 20, offset: 0 } })), [fd]);
      sys.close(fd);
    },
  },
  {
    name: "VRING_KICK with a 4-byte payload", log: /VRING_KICK.*size/, protocol: BASE_PROTOCOL | INBAND,
    run: (fe) => fe.sendRaw(raw(Req.VRING_KICK, 1, new Uint8Array(4))),
  },
  {
    name: "VRING_KICK carrying an eventfd (fd closed)", log: /VRING_KICK.*fds/, protocol: BASE_PROTOCOL | INBAND,
    run: (fe) => { const fd = efd(); fe.sendRaw(encode(msg(Req.VRING_KICK, { state: { index: 0, num: 0 } })), [fd]); sys.close(fd); },
  },
  {
    name: "VRING_KICK for queue 7 of 1", log: /VRING_KICK.*index/, protocol: BASE_PROTOCOL | INBAND,
    run: (fe) => fe.send(msg(Req.VRING_KICK, { state: { index: 7, num: 0 } })),
  },
  {
    name: "INBAND_NOTIFICATIONS without BACKEND_REQ (spec: the back-end closes)", log: /SET_PROTOCOL_FEATURES.*INBAND_NOTIFICATIONS without/,
    memory: false, protocol: BASE_PROTOCOL, run: (fe) => fe.send(msg(Req.SET_PROTOCOL_FEATURES, { u64: BASE_PROTOCOL | bit(ProtocolFeature.INBAND_NOTIFICATIONS) })),
  },
  {
    name: "SET_DEVICE_STATE_FD without its fd", log: /SET_DEVICE_STATE_FD.*fds/, protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => fe.sendRaw(encode(msg(Req.SET_DEVICE_STATE_FD, { deviceState: { direction: 0, phase: 0 } }))),
  },
  {
    name: "SET_DEVICE_STATE_FD with a 12-byte payload and a pipe", log: /SET_DEVICE_STATE_FD.*size/, protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => { const [x, y] = sys.socketpair(); fe.sendRaw(raw(Req.SET_DEVICE_STATE_FD, 1, new Uint8Array(12)), [x]); sys.close(x); sys.close(y); },
  },
  {
    name: "CHECK_DEVICE_STATE with a payload", log: /CHECK_DEVICE_STATE.*size/, protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => fe.sendRaw(raw(Req.CHECK_DEVICE_STATE, 1, new Uint8Array(8))),
  },
  {
    name: "a message cut short by a disconnect, with fds attached", log: /disconnected/,
    run: (fe) => {
      const m = encode(msg(Req.SET_VRING_KICK, { vring: { index: 0, noFd: false } }));
      const fds = [efd()];
      fe.sendRaw(m.subarray(0, 10), fds);
      fds.forEach(sys.close);
      fe.close();
    },
  },
];

/** Well-formed requests the server must refuse (REPLY_ACK status or an error u64) while keeping the connection. */
interface Refusal {
  name: string;
  log: RegExp;
  protocol?: bigint;
  /** Sends the request and checks the refusal the front-end sees. */
  run(fe: VhostUserFrontend, ram: GuestRam): void;
}

const nack = (f: () => void) => expect(f).toThrow(/NACK: status 1/);
/** A ring with a size and addresses inside guest RAM (nothing available in it). */
function ringIn(fe: VhostUserFrontend, ram: GuestRam): void {
  const u = ram.regions[0]!.userAddr;
  fe.setVringNum(0, 128);
  fe.setVringAddr({ index: 0, flags: 0, desc: u, avail: u + 4096, used: u + 8192, log: 0 });
}
/** SET_DEVICE_STATE_FD with `fd` (closed here after sending); returns the reply's status byte. */
function stateFd(fe: VhostUserFrontend, direction: number, phase: number, fd: number): number {
  try {
    return fe.setDeviceStateFd(direction, phase, fd).status;
  } finally {
    sys.close(fd);
  }
}
function socketEnd(): number {
  const [x, y] = sys.socketpair();
  sys.close(y);
  return x;
}

const refusals: Refusal[] = [
  {
    name: "VRING_KICK without INBAND_NOTIFICATIONS", log: /VRING_KICK refused: .*INBAND_NOTIFICATIONS was not negotiated/,
    run: (fe) => nack(() => fe.vringKick(0)),
  },
  {
    name: "VRING_KICK for a ring that has no size or addresses", log: /VRING_KICK refused: .*queue 0 has no size or ring addresses/,
    protocol: BASE_PROTOCOL | INBAND, run: (fe) => nack(() => fe.vringKick(0)),
  },
  {
    name: "VRING_KICK for a ring kicked through an eventfd", log: /VRING_KICK refused: .*queue 0 runs on a kick eventfd/,
    protocol: BASE_PROTOCOL | INBAND,
    run: (fe, ram) => {
      ringIn(fe, ram);
      const k = efd();
      fe.setVringKick(0, k);
      sys.close(k);
      nack(() => fe.vringKick(0));
    },
  },
  {
    name: "SET_VRING_CALL in band without a back-end channel", log: /SET_VRING_CALL refused: .*need the back-end channel/,
    protocol: BASE_PROTOCOL | INBAND, run: (fe) => nack(() => fe.setVringCall(0, null)),
  },
  {
    name: "SET_DEVICE_STATE_FD without DEVICE_STATE negotiated", log: /SET_DEVICE_STATE_FD refused: DEVICE_STATE was not negotiated/,
    run: (fe) => expect(stateFd(fe, DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, socketEnd())).toBe(1),
  },
  {
    name: "SET_DEVICE_STATE_FD with an eventfd (not a pipe)", log: /SET_DEVICE_STATE_FD refused: fd is not a pipe or socket/,
    protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => {
      expect(stateFd(fe, DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, efd())).toBe(1);
      expect(fe.checkDeviceState()).toBe(1);
    },
  },
  {
    name: "SET_DEVICE_STATE_FD with a memfd (not a pipe)", log: /SET_DEVICE_STATE_FD refused: fd is not a pipe or socket/,
    protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => expect(stateFd(fe, DEVICE_STATE_SAVE, DEVICE_STATE_PHASE_STOPPED, sys.memfdCreate("not-a-pipe"))).toBe(1),
  },
  {
    name: "SET_DEVICE_STATE_FD with direction 2", log: /SET_DEVICE_STATE_FD refused: direction 2 is not 0 \(save\) or 1 \(load\)/,
    protocol: BASE_PROTOCOL | DEVICE_STATE, run: (fe) => expect(stateFd(fe, 2, DEVICE_STATE_PHASE_STOPPED, socketEnd())).toBe(1),
  },
  {
    name: "SET_DEVICE_STATE_FD with phase 1", log: /SET_DEVICE_STATE_FD refused: phase 1 is not 0 \(stopped\)/,
    protocol: BASE_PROTOCOL | DEVICE_STATE, run: (fe) => expect(stateFd(fe, DEVICE_STATE_LOAD, 1, socketEnd())).toBe(1),
  },
  {
    name: "CHECK_DEVICE_STATE without a transfer", log: /CHECK_DEVICE_STATE: no state transfer/,
    protocol: BASE_PROTOCOL | DEVICE_STATE, run: (fe) => expect(fe.checkDeviceState()).toBe(1),
  },
  {
    name: "SET_DEVICE_STATE_FD load, then a disconnect mid-transfer (fd and timers released)", log: /device state load started/,
    protocol: BASE_PROTOCOL | DEVICE_STATE,
    run: (fe) => {
      const [x, y] = sys.socketpair();
      try {
        expect(stateFd(fe, DEVICE_STATE_LOAD, DEVICE_STATE_PHASE_STOPPED, x)).toBe(0);
        sys.write(y, new Uint8Array(5)); // a partial state; the front-end goes away without closing y first
      } finally {
        sys.close(y);
      }
    },
  },
];

describe.skipIf(skip !== null)(`hostile front-end against bunvhost${skip ? ` [skipped: ${skip}]` : ""}`, () => {
  beforeAll(async () => {
    be = await kind.start({ size: 16 << 20 });
    goodFrontend(); // first connection: the server's lazily created state (poller, buffers) exists now
    await Bun.sleep(100);
    baseFds = fdCount();
    baseMaps = ramMaps();
  });
  afterAll(async () => {
    await be?.stop();
  });

  for (const c of cases) {
    test(`${c.name}: logged, connection ended, nothing leaked, next front-end served`, async () => {
      const before = be.stderr().length;
      const ram = new GuestRam({ size: 4 << 20, name: RAM_NAME });
      let fe: VhostUserFrontend | null = null;
      try {
        fe = prepared(c.memory === false ? undefined : ram, c.protocol);
        c.run(fe, ram);
        expect(fe.waitClosed(3000)).toBe(true);
      } finally {
        fe?.close();
        ram.close();
      }
      await settled();
      await expectLog(before, c.log);
      expect(be.stderr().slice(before)).toMatch(/error|disconnected/);
      expect(fdCount()).toBe(baseFds);
      expect(ramMaps()).toBe(baseMaps);
      goodFrontend();
    });
  }

  for (const c of refusals) {
    test(`${c.name}: answered and logged, connection kept, nothing leaked, next front-end served`, async () => {
      const before = be.stderr().length;
      const ram = new GuestRam({ size: 4 << 20, name: RAM_NAME });
      let fe: VhostUserFrontend | null = null;
      try {
        fe = prepared(ram, c.protocol);
        c.run(fe, ram);
        // Still in step: a request with a reply answers.
        expect(fe.getQueueNum()).toBe(1);
        expect(fe.alive()).toBe(true);
      } finally {
        fe?.close();
        ram.close();
      }
      await settled();
      await expectLog(before, c.log);
      expect(fdCount()).toBe(baseFds);
      expect(ramMaps()).toBe(baseMaps);
      goodFrontend();
    });
  }

  test("in-band calls to a front-end that closed its back-end channel: logged, ring keeps serving, nothing leaked", async () => {
    const before = be.stderr().length;
    {
      using d = BlkDriver.connect(be.socket, { timeoutMs: 3000, protocolFeatures: BLK_DRIVER_PROTOCOL_FEATURES | INBAND });
      d.fe.openBackendChannel();
      d.fe.setVringBase(0, d.fe.getVringBase(0));
      d.fe.setVringCall(0, null);
      d.fe.setVringKick(0, null);
      d.fe.closeBackendChannel();
      for (let i = 0; i < 3; i++) {
        d.enqueue(VIRTIO_BLK_T_OUT, 8 * i, 4096, {}, new Uint8Array(4096).fill(i));
        d.publish(0);
        d.fe.vringKick(0);
        const deadline = performance.now() + 3000;
        while (d.poll(0) === 0) {
          expect(performance.now()).toBeLessThan(deadline);
          Bun.sleepSync(2);
        }
      }
      expect(d.fe.alive()).toBe(true);
    }
    await settled();
    await expectLog(before, /queue 0: VRING_CALL not sent: sendmsg: (EPIPE|ECONNRESET)/);
    expect(fdCount()).toBe(baseFds);
    goodFrontend();
  });

  test("a broken ring whose errors go in band: BACKEND_VRING_ERR on the back-end channel, then the connection ends", async () => {
    const before = be.stderr().length;
    {
      using d = BlkDriver.connect(be.socket, { timeoutMs: 1000, protocolFeatures: BLK_DRIVER_PROTOCOL_FEATURES | INBAND });
      d.fe.openBackendChannel();
      d.fe.setVringErr(0, null);
      const h = d.ram.alloc(16);
      const st = d.ram.alloc(1);
      const r = d.submitRaw([
        { addr: h, len: 16, flags: VRING_DESC_F_NEXT, next: 1 },
        { addr: st, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next: 0 },
      ], { statusGpa: st });
      expect(r.outcome).toBe("disconnected");
      const m = d.fe.recvBackend(2000);
      expect(m?.request).toBe(BackendReq.VRING_ERR);
      expect(m?.state).toEqual({ index: 0, num: 0 });
    }
    await settled();
    await expectLog(before, /virtqueue broken: queue 0: ORDER/);
    expect(fdCount()).toBe(baseFds);
    goodFrontend();
  });

  test("hostile descriptor chains (loop, huge length, out-of-range head) break the queue and end the connection", async () => {
    const chains: [string, (d: BlkDriver, h: number, st: number) => { descs: any[]; availEntry?: number }][] = [
      ["a loop", (_d, h, st) => ({ descs: [{ addr: h, len: 16, flags: VRING_DESC_F_NEXT, next: 1 }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next: 2 }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next: 1 }] })],
      ["a 4 GiB - 1 length", (_d, h, st) => ({ descs: [{ addr: h, len: 16 }, { addr: h, len: 0xffffffff, flags: VRING_DESC_F_WRITE }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }] })],
      ["a head past the ring", (_d, h, st) => ({ descs: [{ addr: h, len: 16 }, { addr: st, len: 1, flags: VRING_DESC_F_WRITE }], availEntry: 4000 })],
    ];
    for (const [name, make] of chains) {
      const before = be.stderr().length;
      {
        using d = BlkDriver.connect(be.socket, { timeoutMs: 1000 });
        const h = d.ram.alloc(16);
        const st = d.ram.alloc(1);
        const { descs, availEntry } = make(d, h, st);
        const r = d.submitRaw(descs, { availEntry, statusGpa: st });
        expect(`${name}: ${r.outcome}`).toBe(`${name}: disconnected`);
      }
      await settled();
      await expectLog(before, /virtqueue broken: queue 0: (LOOP|BAD_ADDR|TOTAL_LEN|HEAD_RANGE)/);
      expect(fdCount()).toBe(baseFds);
      goodFrontend();
    }
  });

  test("the server process is still the same one after all of the above", () => {
    expect(readFileSync(`/proc/${be.pid}/status`, "utf8")).toMatch(/State:\s+[SR]/);
  });
});

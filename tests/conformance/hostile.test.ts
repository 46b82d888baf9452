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
import { HDR_SIZE, Req, type Message } from "../../src/protocol/messages.ts";
import { encodeMessage } from "../../src/protocol/encode.ts";
import { bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1 } from "../../src/protocol/features.ts";
import { BlkDriver, GuestRam, VhostUserFrontend, VIRTIO_BLK_S_OK } from "../../src/frontend/index.ts";
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

/** A front-end that has negotiated and shared memory, ready for a hostile message. */
function prepared(ram?: GuestRam): VhostUserFrontend {
  const fe = VhostUserFrontend.connect(be.socket, { timeoutMs: 3000 });
  const f = fe.getFeatures();
  fe.getProtocolFeatures();
  fe.setProtocolFeatures(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG));
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
        fe = prepared(c.memory === false ? undefined : ram);
        c.run(fe, ram);
        expect(fe.waitClosed(3000)).toBe(true);
      } finally {
        fe?.close();
        ram.close();
      }
      await settled();
      const log = be.stderr().slice(before);
      expect(log).toMatch(/error|disconnected/);
      expect(log).toMatch(c.log);
      expect(fdCount()).toBe(baseFds);
      expect(ramMaps()).toBe(baseMaps);
      goodFrontend();
    });
  }

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
      expect(be.stderr().slice(before)).toMatch(/virtqueue broken: queue 0: (LOOP|BAD_ADDR|TOTAL_LEN|HEAD_RANGE)/);
      expect(fdCount()).toBe(baseFds);
      goodFrontend();
    }
  });

  test("the server process is still the same one after all of the above", () => {
    expect(readFileSync(`/proc/${be.pid}/status`, "utf8")).toMatch(/State:\s+[SR]/);
  });
});

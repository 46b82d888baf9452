import { describe, expect, test } from "bun:test";
import { ProtocolError } from "../../src/errors.ts";
import {
  decodeBackendReply, decodeBackendRequest, decodeHeader, decodeReply, decodeRequest, type DecodeOptions, type Header,
} from "../../src/protocol/decode.ts";
import { encodeBackendMessage, encodeMessage } from "../../src/protocol/encode.ts";
import {
  bit, ProtocolFeature, protocolFeatureNames, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, virtioFeatureNames,
} from "../../src/protocol/features.ts";
import {
  BackendReq, backendRequestName, FLAG_NEED_REPLY, FLAG_REPLY, HDR_SIZE, MAX_PAYLOAD, Req, requestName,
  type MemRegion, type Message,
} from "../../src/protocol/messages.ts";

// One buffer, reused like a connection's send/receive buffer.
const buf = new DataView(new ArrayBuffer(HDR_SIZE + MAX_PAYLOAD + 1024));

type Body = Omit<Message, "request" | "flags" | "fds"> & { fds?: number[]; flags?: number };

function msg(request: number, body: Body = {}): Message {
  const { fds = [], flags = 0, ...payload } = body;
  return { request, flags, fds, ...payload };
}

/** Encodes `m` into `buf`; returns the header and a view of exactly the payload. */
function wire(m: Message, backend = false): { h: Header; p: DataView } {
  if (backend) encodeBackendMessage(m, buf);
  else encodeMessage(m, buf);
  const h = decodeHeader(buf, 0, backend);
  return { h, p: new DataView(buf.buffer, HDR_SIZE, h.size) };
}

function request(m: Message, opts?: DecodeOptions): Message {
  const { h, p } = wire(m);
  return decodeRequest(h, p, m.fds, opts);
}

function reply(m: Message, expected = m.request): Message {
  const { h, p } = wire({ ...m, flags: m.flags | FLAG_REPLY });
  return decodeReply(h, p, m.fds, expected);
}

function backend(m: Message): Message {
  const { h, p } = wire(m, true);
  return decodeBackendRequest(h, p, m.fds);
}

/** Runs `fn` and returns what it threw (undefined when it did not throw). */
function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return undefined;
}

/** Asserts `fn` throws a ProtocolError for `req`.`field`, with the message naming both. */
function rejects(fn: () => unknown, req: string, field: string, detail?: string | RegExp): ProtocolError {
  const e = thrown(fn);
  expect(e).toBeInstanceOf(ProtocolError);
  const pe = e as ProtocolError;
  expect(pe.request).toBe(req);
  expect(pe.field).toBe(field);
  expect(pe.message.startsWith(`${req}.${field}: `)).toBe(true);
  if (detail !== undefined) expect(pe.detail).toMatch(detail);
  return pe;
}

/** Writes a raw u64 into the payload of the message currently in `buf`. */
function patch64(payloadOff: number, v: bigint): void {
  buf.setBigUint64(HDR_SIZE + payloadOff, v, true);
}

/** Encodes `m`, lets `edit` change payload bytes, then decodes it as a front-end request. */
function requestPatched(m: Message, edit: () => void, opts?: DecodeOptions): Message {
  const { h } = wire(m);
  edit();
  return decodeRequest(h, new DataView(buf.buffer, HDR_SIZE, h.size), m.fds, opts);
}

const region = (i = 0): MemRegion => ({
  guestPhysAddr: 0x1_0000_0000 * i, memorySize: 0x4000_0000, userAddr: 0x7f00_0000_0000 + 0x1_0000_0000 * i, mmapOffset: 0x1000 * i,
});
const bytes = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

// Every front-end request with a representative payload and its payload size on the wire.
const REQUESTS: Array<[keyof typeof Req, Body, number]> = [
  ["GET_FEATURES", {}, 0],
  ["SET_FEATURES", { u64: bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) }, 8],
  ["SET_OWNER", {}, 0],
  ["RESET_OWNER", {}, 0],
  ["SET_MEM_TABLE", { regions: [region(0), region(1)], fds: [10, 11] }, 8 + 2 * 32],
  ["SET_LOG_BASE", { log: { size: 0x2_0000, offset: 0x1000 }, fds: [12] }, 16],
  ["SET_LOG_FD", { fds: [13] }, 0],
  ["SET_VRING_NUM", { state: { index: 0, num: 256 } }, 8],
  ["SET_VRING_ADDR", { addr: { index: 1, flags: 1, desc: 0x1_0000_0000, used: 0x1_0000_2004, avail: 0x1_0000_1002, log: 0x2000 } }, 40],
  ["SET_VRING_BASE", { state: { index: 1, num: 0x8000_8000 } }, 8],
  ["GET_VRING_BASE", { state: { index: 1, num: 0 } }, 8],
  ["SET_VRING_KICK", { vring: { index: 1, noFd: false }, fds: [14] }, 8],
  ["SET_VRING_CALL", { vring: { index: 255, noFd: true } }, 8],
  ["SET_VRING_ERR", { vring: { index: 0, noFd: false }, fds: [15] }, 8],
  ["GET_PROTOCOL_FEATURES", {}, 0],
  ["SET_PROTOCOL_FEATURES", { u64: bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) }, 8],
  ["GET_QUEUE_NUM", {}, 0],
  ["SET_VRING_ENABLE", { state: { index: 3, num: 1 } }, 8],
  ["SEND_RARP", { u64: 0x5634_1200_5452n }, 8],
  ["NET_SET_MTU", { u64: 1500n }, 8],
  ["SET_BACKEND_REQ_FD", { fds: [16] }, 0],
  ["IOTLB_MSG", { iotlb: { iova: 0x1000, size: 0x2000, uaddr: 0x7f00_0000_0000, perm: 3, type: 2 } }, 32],
  ["SET_VRING_ENDIAN", { state: { index: 0, num: 1 } }, 8],
  ["GET_CONFIG", { config: { offset: 0, size: 60, flags: 0, data: new Uint8Array(60) } }, 12 + 60],
  ["SET_CONFIG", { config: { offset: 20, size: 4, flags: 1, data: bytes(4) } }, 12 + 4],
  ["CREATE_CRYPTO_SESSION", { raw: bytes(100) }, 100],
  ["CLOSE_CRYPTO_SESSION", { u64: 7n }, 8],
  ["POSTCOPY_ADVISE", {}, 0],
  ["POSTCOPY_LISTEN", {}, 0],
  ["POSTCOPY_END", {}, 0],
  ["GET_INFLIGHT_FD", { inflight: { mmapSize: 0, mmapOffset: 0, numQueues: 2, queueSize: 128 } }, 24],
  ["SET_INFLIGHT_FD", { inflight: { mmapSize: 0x3000, mmapOffset: 0x1000, numQueues: 2, queueSize: 128 }, fds: [17] }, 24],
  ["GPU_SET_SOCKET", { fds: [18] }, 0],
  ["RESET_DEVICE", {}, 0],
  ["VRING_KICK", { state: { index: 2, num: 0 } }, 8],
  ["GET_MAX_MEM_SLOTS", {}, 0],
  ["ADD_MEM_REG", { region: region(2), fds: [19] }, 40],
  ["REM_MEM_REG", { region: { ...region(2), mmapOffset: 0 } }, 40],
  ["SET_STATUS", { u64: 0xfn }, 8],
  ["GET_STATUS", {}, 0],
  ["GET_SHARED_OBJECT", { uuid: bytes(16) }, 16],
  ["SET_DEVICE_STATE_FD", { deviceState: { direction: 1, phase: 0 }, fds: [20] }, 8],
  ["CHECK_DEVICE_STATE", {}, 0],
  ["GET_SHMEM_CONFIG", {}, 0],
];

describe("requestName()", () => {
  test("requestName() names ids by the spec and unknown ids as UNKNOWN(n)", () => {
    expect(requestName(9)).toBe("SET_VRING_ADDR");
    expect(requestName(99)).toBe("UNKNOWN(99)");
    expect(requestName(0)).toBe("UNKNOWN(0)");
    expect(requestName(44)).toBe("GET_SHMEM_CONFIG");
  });

  test("backendRequestName() names back-end ids including SHMEM_MAP/UNMAP", () => {
    expect(backendRequestName(3)).toBe("VRING_HOST_NOTIFIER_MSG");
    expect(backendRequestName(9)).toBe("SHMEM_MAP");
    expect(backendRequestName(10)).toBe("SHMEM_UNMAP");
    expect(backendRequestName(11)).toBe("UNKNOWN(11)");
  });
});

describe("decodeRequest() round-trips every request from encodeMessage()", () => {
  test("the table covers every Req id exactly once", () => {
    const ids = REQUESTS.map(([k]) => Req[k]).sort((a, b) => a - b);
    expect(ids).toEqual(Object.values(Req).sort((a, b) => a - b));
  });

  for (const [key, body, size] of REQUESTS) {
    test(`decodeRequest() round-trips ${key} (${size}-byte payload)`, () => {
      const m = msg(Req[key], body);
      expect(encodeMessage(m, buf)).toBe(HDR_SIZE + size);
      expect(buf.getUint32(8, true)).toBe(size);
      const d = request(m);
      expect(d).toEqual({ ...m, flags: 1 });
      expect(d.fds).toBe(m.fds); // the caller's array, untouched
    });
  }

  test("decodeRequest() keeps NEED_REPLY in flags", () => {
    expect(request(msg(Req.SET_FEATURES, { u64: 1n, flags: FLAG_NEED_REPLY })).flags).toBe(1 | FLAG_NEED_REPLY);
  });
});

describe("decodeHeader()", () => {
  function header(request: number, flags: number, size: number): DataView {
    const dv = new DataView(new ArrayBuffer(16));
    dv.setUint32(4, request, true);
    dv.setUint32(8, flags, true);
    dv.setUint32(12, size, true);
    return dv;
  }

  test("decodeHeader() reads the three fields at an offset", () => {
    expect(decodeHeader(header(Req.SET_VRING_ADDR, 1 | FLAG_NEED_REPLY, 40), 4)).toEqual({ request: 9, flags: 9, size: 40 });
  });

  test("decodeHeader() rejects version 2", () => {
    rejects(() => decodeHeader(header(Req.GET_FEATURES, 2, 0), 4), "GET_FEATURES", "flags", /version 2/);
  });

  test("decodeHeader() rejects version 0", () => {
    rejects(() => decodeHeader(header(Req.SET_OWNER, 0, 0), 4), "SET_OWNER", "flags", /version 0/);
  });

  test("decodeHeader() rejects reserved flag bits", () => {
    rejects(() => decodeHeader(header(Req.SET_OWNER, 0x11, 0), 4), "SET_OWNER", "flags", /0x10/);
    rejects(() => decodeHeader(header(Req.SET_OWNER, 0x8000_0001, 0), 4), "SET_OWNER", "flags", /0x80000000/);
  });

  test("decodeHeader() rejects size > MAX_PAYLOAD and accepts MAX_PAYLOAD", () => {
    rejects(() => decodeHeader(header(Req.SET_CONFIG, 1, MAX_PAYLOAD + 1), 4), "SET_CONFIG", "size", /4097/);
    expect(decodeHeader(header(Req.SET_CONFIG, 1, MAX_PAYLOAD), 4).size).toBe(MAX_PAYLOAD);
  });

  test("decodeHeader() names back-end requests from the back-end table", () => {
    rejects(() => decodeHeader(header(BackendReq.SHMEM_MAP, 2, 0), 4, true), "SHMEM_MAP", "flags");
  });
});

describe("decodeRequest() rejects malformed requests", () => {
  test("decodeRequest() rejects unknown request id 99", () => {
    rejects(() => request(msg(99)), "UNKNOWN(99)", "request", /99/);
  });

  test("decodeRequest() rejects request id 0", () => {
    rejects(() => request(msg(0)), "UNKNOWN(0)", "request");
  });

  test("decodeRequest() rejects a request carrying the reply flag", () => {
    rejects(() => request(msg(Req.GET_FEATURES, { flags: FLAG_REPLY })), "GET_FEATURES", "flags", /reply/);
  });

  test("decodeRequest() refuses a payload view that disagrees with the header (caller bug)", () => {
    encodeMessage(msg(Req.SET_FEATURES, { u64: 1n }), buf);
    const e = thrown(() => decodeRequest(decodeHeader(buf), new DataView(buf.buffer, HDR_SIZE, 4), []));
    expect(e).toBeInstanceOf(RangeError);
  });

  // Fixed-size layouts: one byte short (where possible) and eight bytes long are both refused.
  for (const [key, body, size] of REQUESTS) {
    if (key === "SET_MEM_TABLE" || key === "GET_CONFIG" || key === "SET_CONFIG" || key === "CREATE_CRYPTO_SESSION") continue;
    const lengths = size === 0 ? [8] : [size - 1, size + 8];
    test(`decodeRequest() rejects ${key} with a payload of ${lengths.join(" or ")} bytes`, () => {
      for (const len of lengths) rejects(() => request(msg(Req[key], { raw: new Uint8Array(len), fds: body.fds })), key, "size");
    });
  }

  test("decodeRequest() rejects SET_MEM_TABLE whose size disagrees with nregions", () => {
    rejects(() => requestPatched(msg(Req.SET_MEM_TABLE, { regions: [region(0)], fds: [3] }), () => buf.setUint32(HDR_SIZE, 2, true)),
      "SET_MEM_TABLE", "size", /expected 72/);
  });

  test("decodeRequest() rejects SET_MEM_TABLE shorter than its 8-byte header", () => {
    rejects(() => request(msg(Req.SET_MEM_TABLE, { raw: new Uint8Array(4) })), "SET_MEM_TABLE", "size");
  });

  test("decodeRequest() rejects SET_MEM_TABLE with 9 regions", () => {
    const regions = Array.from({ length: 9 }, (_, i) => region(i));
    rejects(() => request(msg(Req.SET_MEM_TABLE, { regions, fds: regions.map((_, i) => 10 + i) })), "SET_MEM_TABLE", "nregions", /9 regions, at most 8/);
  });

  test("decodeRequest() accepts SET_MEM_TABLE with 8 regions", () => {
    const regions = Array.from({ length: 8 }, (_, i) => region(i));
    expect(request(msg(Req.SET_MEM_TABLE, { regions, fds: regions.map((_, i) => 10 + i) })).regions).toEqual(regions);
  });

  test("decodeRequest() rejects SET_MEM_TABLE with fewer fds than regions", () => {
    rejects(() => request(msg(Req.SET_MEM_TABLE, { regions: [region(0), region(1)], fds: [3] })), "SET_MEM_TABLE", "fds", /1 fds for 2 regions/);
  });

  test("decodeRequest() rejects SET_MEM_TABLE with more fds than regions", () => {
    rejects(() => request(msg(Req.SET_MEM_TABLE, { regions: [region(0)], fds: [3, 4] })), "SET_MEM_TABLE", "fds");
  });

  test("decodeRequest() rejects a region of size 0", () => {
    rejects(() => request(msg(Req.SET_MEM_TABLE, { regions: [region(0), { ...region(1), memorySize: 0 }], fds: [3, 4] })),
      "SET_MEM_TABLE", "regions[1].memorySize", /zero/);
    rejects(() => request(msg(Req.ADD_MEM_REG, { region: { ...region(0), memorySize: 0 }, fds: [3] })), "ADD_MEM_REG", "region.memorySize");
  });

  test("decodeRequest() rejects a region whose gpa + size overflows u64", () => {
    rejects(() => requestPatched(msg(Req.SET_MEM_TABLE, { regions: [region(0)], fds: [3] }), () => patch64(8, 0xffff_ffff_ffff_f000n)),
      "SET_MEM_TABLE", "regions[0].guestPhysAddr", /overflows u64/);
  });

  test("decodeRequest() rejects a region whose userspace address + size overflows u64", () => {
    rejects(() => requestPatched(msg(Req.ADD_MEM_REG, { region: region(0), fds: [3] }), () => patch64(8 + 16, 0xffff_ffff_c000_0001n)),
      "ADD_MEM_REG", "region.userAddr", /overflows u64/);
  });

  test("decodeRequest() rejects a region whose mmap offset + size overflows u64", () => {
    rejects(() => requestPatched(msg(Req.SET_MEM_TABLE, { regions: [region(0)], fds: [3] }), () => patch64(8 + 24, 0xffff_ffff_ffff_ffffn)),
      "SET_MEM_TABLE", "regions[0].mmapOffset", /overflows u64/);
  });

  test("decodeRequest() rejects a region address ≥ 2^53", () => {
    rejects(() => requestPatched(msg(Req.SET_MEM_TABLE, { regions: [region(0)], fds: [3] }), () => patch64(8, 1n << 53n)),
      "SET_MEM_TABLE", "regions[0].guestPhysAddr", /0x20000000000000 is not below 2\^53/);
  });

  test("decodeRequest() rejects a region size ≥ 2^53", () => {
    rejects(() => requestPatched(msg(Req.ADD_MEM_REG, { region: region(0), fds: [3] }), () => patch64(8 + 8, 1n << 60n)),
      "ADD_MEM_REG", "region.memorySize", /not below 2\^53/);
  });

  test("decodeRequest() rejects a region that ends past 2^53", () => {
    const r = { ...region(0), guestPhysAddr: 2 ** 53 - 0x1000, memorySize: 0x2000 };
    rejects(() => request(msg(Req.ADD_MEM_REG, { region: r, fds: [3] })), "ADD_MEM_REG", "region.guestPhysAddr", /past 2\^53/);
  });

  test("decodeRequest() accepts a region that ends exactly at 2^53", () => {
    const r = { ...region(0), guestPhysAddr: 2 ** 53 - 0x2000, memorySize: 0x2000 };
    expect(request(msg(Req.ADD_MEM_REG, { region: r, fds: [3] })).region).toEqual(r);
  });

  test("decodeRequest() rejects ADD_MEM_REG without its fd", () => {
    rejects(() => request(msg(Req.ADD_MEM_REG, { region: region(0) })), "ADD_MEM_REG", "fds", /0 fds, expected 1/);
  });

  test("decodeRequest() accepts REM_MEM_REG with 0 or 1 fd and rejects 2", () => {
    expect(request(msg(Req.REM_MEM_REG, { region: region(0), fds: [3] })).fds).toEqual([3]);
    rejects(() => request(msg(Req.REM_MEM_REG, { region: region(0), fds: [3, 4] })), "REM_MEM_REG", "fds");
  });

  test("decodeRequest() rejects SET_CONFIG with config size 257", () => {
    rejects(() => request(msg(Req.SET_CONFIG, { config: { offset: 0, size: 257, flags: 0, data: new Uint8Array(257) } })),
      "SET_CONFIG", "config.size", /257 exceeds 256/);
  });

  test("decodeRequest() accepts GET_CONFIG with config size 256", () => {
    expect(request(msg(Req.GET_CONFIG, { config: { offset: 0, size: 256, flags: 0, data: new Uint8Array(256) } })).config?.size).toBe(256);
  });

  test("decodeRequest() rejects GET_CONFIG whose size field disagrees with the payload", () => {
    rejects(() => request(msg(Req.GET_CONFIG, { config: { offset: 0, size: 8, flags: 0, data: new Uint8Array(4) } })),
      "GET_CONFIG", "config.size", /8, but the payload carries 4/);
  });

  test("decodeRequest() rejects SET_CONFIG shorter than its 12-byte header", () => {
    rejects(() => request(msg(Req.SET_CONFIG, { raw: new Uint8Array(11) })), "SET_CONFIG", "size");
  });

  test("decodeRequest() rejects SET_CONFIG with offset + size past 256", () => {
    rejects(() => request(msg(Req.SET_CONFIG, { config: { offset: 250, size: 8, flags: 0, data: new Uint8Array(8) } })), "SET_CONFIG", "config.offset");
  });

  test("decodeRequest() rejects SET_CONFIG with undefined flags", () => {
    rejects(() => request(msg(Req.SET_CONFIG, { config: { offset: 0, size: 1, flags: 2, data: new Uint8Array(1) } })), "SET_CONFIG", "config.flags");
  });

  test("decodeRequest() copies config data out of the receive buffer", () => {
    const d = request(msg(Req.SET_CONFIG, { config: { offset: 0, size: 4, flags: 0, data: bytes(4) } }));
    buf.setUint32(HDR_SIZE + 12, 0, true);
    expect(d.config?.data).toEqual(bytes(4));
  });

  test("decodeRequest() rejects SET_VRING_KICK with stray bits above bit 8", () => {
    rejects(() => request(msg(Req.SET_VRING_KICK, { u64: 0x201n, fds: [3] })), "SET_VRING_KICK", "vring", /0x201/);
    rejects(() => request(msg(Req.SET_VRING_CALL, { u64: (1n << 32n) | 0x100n })), "SET_VRING_CALL", "vring");
  });

  test("decodeRequest() rejects SET_VRING_KICK without an fd", () => {
    rejects(() => request(msg(Req.SET_VRING_KICK, { vring: { index: 0, noFd: false } })), "SET_VRING_KICK", "fds", /0 fds, expected 1/);
  });

  test("decodeRequest() rejects SET_VRING_KICK with 2 fds", () => {
    rejects(() => request(msg(Req.SET_VRING_KICK, { vring: { index: 0, noFd: false }, fds: [3, 4] })), "SET_VRING_KICK", "fds", /2 fds, expected 1/);
  });

  test("decodeRequest() rejects SET_VRING_CALL with the no-fd bit and an fd", () => {
    rejects(() => request(msg(Req.SET_VRING_CALL, { vring: { index: 0, noFd: true }, fds: [3] })), "SET_VRING_CALL", "fds", /expected 0/);
  });

  test("decodeRequest() rejects an fd on a request that carries none", () => {
    rejects(() => request(msg(Req.SET_FEATURES, { u64: 0n, fds: [3] })), "SET_FEATURES", "fds");
    rejects(() => request(msg(Req.GET_FEATURES, { fds: [3] })), "GET_FEATURES", "fds");
    rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: 0, used: 0, avail: 0, log: 0 }, fds: [3] })), "SET_VRING_ADDR", "fds");
  });

  test("decodeRequest() rejects fd-carrying requests without their fd", () => {
    for (const key of ["SET_LOG_FD", "SET_BACKEND_REQ_FD", "GPU_SET_SOCKET"] as const) rejects(() => request(msg(Req[key])), key, "fds");
    rejects(() => request(msg(Req.SET_LOG_BASE, { log: { size: 0x1000, offset: 0 } })), "SET_LOG_BASE", "fds");
    rejects(() => request(msg(Req.SET_INFLIGHT_FD, { inflight: { mmapSize: 0x1000, mmapOffset: 0, numQueues: 1, queueSize: 8 } })), "SET_INFLIGHT_FD", "fds");
    rejects(() => request(msg(Req.SET_DEVICE_STATE_FD, { deviceState: { direction: 0, phase: 0 } })), "SET_DEVICE_STATE_FD", "fds");
  });

  test("decodeRequest() rejects SET_VRING_ADDR with reserved flag bits", () => {
    rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 3, desc: 0, used: 0, avail: 0, log: 0 } })), "SET_VRING_ADDR", "addr.flags", /0x3/);
  });

  test("decodeRequest() rejects SET_VRING_ADDR with a misaligned ring", () => {
    const a = { index: 0, flags: 0, desc: 0x1000, used: 0x3000, avail: 0x2000, log: 0 };
    const e = rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { ...a, desc: 0x1008 } })), "SET_VRING_ADDR", "addr.desc");
    expect(e.message).toBe("SET_VRING_ADDR.addr.desc: not 16-byte aligned (0x1008)");
    rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { ...a, used: 0x3002 } })), "SET_VRING_ADDR", "addr.used");
    rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { ...a, avail: 0x2001 } })), "SET_VRING_ADDR", "addr.avail");
  });

  test("decodeRequest() rejects a ring address ≥ 2^53", () => {
    rejects(() => requestPatched(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: 0, used: 0, avail: 0, log: 0 } }), () => patch64(8, 1n << 53n)),
      "SET_VRING_ADDR", "addr.desc", /not below 2\^53/);
    rejects(() => requestPatched(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: 0, used: 0, avail: 0, log: 0 } }), () => patch64(32, 0xffff_ffff_ffff_ffffn)),
      "SET_VRING_ADDR", "addr.log");
  });

  test("decodeRequest() rejects vring indices at or past opts.queues", () => {
    const opts = { queues: 2 };
    expect(request(msg(Req.SET_VRING_NUM, { state: { index: 1, num: 8 } }), opts).state).toEqual({ index: 1, num: 8 });
    rejects(() => request(msg(Req.SET_VRING_NUM, { state: { index: 2, num: 8 } }), opts), "SET_VRING_NUM", "state.index", /2 is not below 2/);
    rejects(() => request(msg(Req.SET_VRING_KICK, { vring: { index: 5, noFd: true } }), opts), "SET_VRING_KICK", "vring.index");
    rejects(() => request(msg(Req.SET_VRING_ADDR, { addr: { index: 2, flags: 0, desc: 0, used: 0, avail: 0, log: 0 } }), opts), "SET_VRING_ADDR", "addr.index");
  });

  test("decodeRequest() rejects a vring state index of 256 by default", () => {
    rejects(() => request(msg(Req.GET_VRING_BASE, { state: { index: 256, num: 0 } })), "GET_VRING_BASE", "state.index");
  });

  test("decodeRequest() rejects SET_VRING_ENABLE and SET_VRING_ENDIAN with num 2", () => {
    rejects(() => request(msg(Req.SET_VRING_ENABLE, { state: { index: 0, num: 2 } })), "SET_VRING_ENABLE", "state.num");
    rejects(() => request(msg(Req.SET_VRING_ENDIAN, { state: { index: 0, num: 2 } })), "SET_VRING_ENDIAN", "state.num");
  });

  test("decodeRequest() rejects SET_LOG_BASE whose area ends past 2^53", () => {
    rejects(() => request(msg(Req.SET_LOG_BASE, { log: { size: 2 ** 52, offset: 2 ** 52 + 1 }, fds: [3] })), "SET_LOG_BASE", "log.offset");
  });

  test("decodeRequest() rejects inflight requests with zero queues or queue size", () => {
    rejects(() => request(msg(Req.GET_INFLIGHT_FD, { inflight: { mmapSize: 0, mmapOffset: 0, numQueues: 0, queueSize: 8 } })), "GET_INFLIGHT_FD", "inflight.numQueues");
    rejects(() => request(msg(Req.GET_INFLIGHT_FD, { inflight: { mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 0 } })), "GET_INFLIGHT_FD", "inflight.queueSize");
  });

  test("decodeRequest() rejects IOTLB_MSG with a back-end-only type or bad permissions", () => {
    const t = { iova: 0x1000, size: 0x1000, uaddr: 0x1000, perm: 3, type: 2 };
    rejects(() => request(msg(Req.IOTLB_MSG, { iotlb: { ...t, type: 1 } })), "IOTLB_MSG", "iotlb.type");
    rejects(() => request(msg(Req.IOTLB_MSG, { iotlb: { ...t, type: 9 } })), "IOTLB_MSG", "iotlb.type");
    rejects(() => request(msg(Req.IOTLB_MSG, { iotlb: { ...t, perm: 4 } })), "IOTLB_MSG", "iotlb.perm");
  });

  test("decodeRequest() rejects an IOTLB update of size ≥ 2^53 but clamps such an invalidation", () => {
    const t = { iova: 0x1000, size: 0x1000, uaddr: 0x1000, perm: 3, type: 2 };
    rejects(() => requestPatched(msg(Req.IOTLB_MSG, { iotlb: t }), () => patch64(8, 0xffff_ffff_ffff_ffffn)), "IOTLB_MSG", "iotlb.size");
    const d = requestPatched(msg(Req.IOTLB_MSG, { iotlb: { ...t, type: 3 } }), () => patch64(8, 0xffff_ffff_ffff_ffffn));
    expect(d.iotlb).toEqual({ ...t, type: 3, size: 2 ** 53 - 0x1000 });
  });

  test("decodeRequest() accepts QEMU's GET_SHARED_OBJECT without payload", () => {
    const d = request(msg(Req.GET_SHARED_OBJECT));
    expect(d.uuid).toBeUndefined();
    expect(d.request).toBe(Req.GET_SHARED_OBJECT);
  });

  test("decodeRequest() rejects an empty CREATE_CRYPTO_SESSION", () => {
    rejects(() => request(msg(Req.CREATE_CRYPTO_SESSION)), "CREATE_CRYPTO_SESSION", "size");
  });
});

describe("decodeReply()", () => {
  const REPLIES: Array<[keyof typeof Req, Body]> = [
    ["GET_FEATURES", { u64: bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) }],
    ["GET_PROTOCOL_FEATURES", { u64: 0x1_ffffn }],
    ["GET_QUEUE_NUM", { u64: 4n }],
    ["GET_VRING_BASE", { state: { index: 1, num: 0x1234 } }],
    ["GET_CONFIG", { config: { offset: 0, size: 8, flags: 0, data: bytes(8) } }],
    ["GET_INFLIGHT_FD", { inflight: { mmapSize: 0x2000, mmapOffset: 0, numQueues: 1, queueSize: 256 }, fds: [7] }],
    ["GET_MAX_MEM_SLOTS", { u64: 32n }],
    ["GET_STATUS", { u64: 0xfn }],
    ["CHECK_DEVICE_STATE", { u64: 0n }],
    ["SET_DEVICE_STATE_FD", { u64: 0n, fds: [8] }],
    ["POSTCOPY_ADVISE", { fds: [9] }],
    ["POSTCOPY_END", { u64: 0n }],
    ["GET_SHARED_OBJECT", { u64: 0n, fds: [10] }],
    ["CREATE_CRYPTO_SESSION", { raw: bytes(48) }],
    ["SET_MEM_TABLE", { regions: [region(0), region(1)] }],
    ["ADD_MEM_REG", { region: region(3) }],
    ["GET_SHMEM_CONFIG", { shmem: { nregions: 2, sizes: Array.from({ length: 256 }, (_, i) => (i < 2 ? 0x10_0000 * (i + 1) : 0)) } }],
    ["SET_VRING_ADDR", { u64: 0n }],
    ["SET_LOG_BASE", { u64: 0n }],
  ];

  for (const [key, body] of REPLIES) {
    test(`decodeReply() round-trips the ${key} reply`, () => {
      const m = msg(Req[key], body);
      expect(reply(m)).toEqual({ ...m, flags: 1 | FLAG_REPLY });
    });
  }

  test("decodeReply() takes the GET_SHMEM_CONFIG reply as 2056 bytes", () => {
    const m = msg(Req.GET_SHMEM_CONFIG, { flags: FLAG_REPLY, shmem: { nregions: 1, sizes: [0x1000] } });
    expect(encodeMessage(m, buf)).toBe(HDR_SIZE + 2056);
  });

  test("decodeReply() takes SET_MEM_TABLE and ADD_MEM_REG REPLY_ACK statuses", () => {
    expect(reply(msg(Req.SET_MEM_TABLE, { u64: 1n })).u64).toBe(1n);
    expect(reply(msg(Req.ADD_MEM_REG, { u64: 0n })).u64).toBe(0n);
  });

  test("decodeReply() accepts SET_DEVICE_STATE_FD without an fd when bit 8 is set", () => {
    expect(reply(msg(Req.SET_DEVICE_STATE_FD, { u64: 0x100n })).u64).toBe(0x100n);
    rejects(() => reply(msg(Req.SET_DEVICE_STATE_FD, { u64: 0x100n, fds: [3] })), "SET_DEVICE_STATE_FD", "fds");
  });

  test("decodeReply() rejects SET_DEVICE_STATE_FD reporting an error while offering an fd", () => {
    rejects(() => reply(msg(Req.SET_DEVICE_STATE_FD, { u64: 0x1n, fds: [3] })), "SET_DEVICE_STATE_FD", "u64");
  });

  test("decodeReply() accepts a GET_CONFIG error reply of zero length", () => {
    expect(reply(msg(Req.GET_CONFIG)).config).toBeUndefined();
  });

  test("decodeReply() accepts GET_INFLIGHT_FD with mmap size 0 and no fd", () => {
    expect(reply(msg(Req.GET_INFLIGHT_FD, { inflight: { mmapSize: 0, mmapOffset: 0, numQueues: 0, queueSize: 0 } })).fds).toEqual([]);
  });

  test("decodeReply() rejects GET_INFLIGHT_FD with an area but no fd", () => {
    rejects(() => reply(msg(Req.GET_INFLIGHT_FD, { inflight: { mmapSize: 0x1000, mmapOffset: 0, numQueues: 1, queueSize: 8 } })), "GET_INFLIGHT_FD", "fds");
  });

  test("decodeReply() rejects an fd on a reply whose layout carries none", () => {
    rejects(() => reply(msg(Req.GET_FEATURES, { u64: 0n, fds: [3] })), "GET_FEATURES", "fds");
    rejects(() => reply(msg(Req.GET_VRING_BASE, { state: { index: 0, num: 0 }, fds: [3] })), "GET_VRING_BASE", "fds");
  });

  test("decodeReply() rejects POSTCOPY_ADVISE with a payload or without its fd", () => {
    rejects(() => reply(msg(Req.POSTCOPY_ADVISE, { u64: 0n, fds: [3] })), "POSTCOPY_ADVISE", "size");
    rejects(() => reply(msg(Req.POSTCOPY_ADVISE)), "POSTCOPY_ADVISE", "fds");
  });

  test("decodeReply() rejects a reply without FLAG_REPLY", () => {
    const { h, p } = wire(msg(Req.GET_FEATURES, { u64: 0n }));
    rejects(() => decodeReply(h, p, [], Req.GET_FEATURES), "GET_FEATURES", "flags", /reply bit clear/);
  });

  test("decodeReply() rejects a reply with FLAG_NEED_REPLY", () => {
    rejects(() => reply(msg(Req.GET_FEATURES, { u64: 0n, flags: FLAG_NEED_REPLY })), "GET_FEATURES", "flags", /need_reply/);
  });

  test("decodeReply() rejects a reply to another request", () => {
    rejects(() => reply(msg(Req.GET_PROTOCOL_FEATURES, { u64: 0n }), Req.GET_FEATURES), "GET_FEATURES", "request", /GET_PROTOCOL_FEATURES/);
  });

  test("decodeReply() rejects a u64 reply of the wrong size", () => {
    rejects(() => reply(msg(Req.GET_QUEUE_NUM, { raw: new Uint8Array(4) })), "GET_QUEUE_NUM", "size", /4 bytes, expected 8/);
  });

  test("decodeReply() rejects GET_SHMEM_CONFIG with more than 256 regions", () => {
    const m = msg(Req.GET_SHMEM_CONFIG, { shmem: { nregions: 257, sizes: [] } });
    rejects(() => reply(m), "GET_SHMEM_CONFIG", "shmem.nregions");
  });

  test("decodeReply() rejects an unknown expected request", () => {
    rejects(() => reply(msg(77, { u64: 0n })), "UNKNOWN(77)", "request");
  });
});

describe("decodeBackendRequest()", () => {
  const BACKEND: Array<[keyof typeof BackendReq, Body]> = [
    ["IOTLB_MSG", { iotlb: { iova: 0x4000, size: 0, uaddr: 0, perm: 1, type: 1 } }],
    ["CONFIG_CHANGE_MSG", {}],
    ["VRING_HOST_NOTIFIER_MSG", { area: { index: 1, noFd: false, size: 0x1000, offset: 0x3000 }, fds: [5] }],
    ["VRING_CALL", { state: { index: 2, num: 0 } }],
    ["VRING_ERR", { state: { index: 0, num: 0 } }],
    ["SHARED_OBJECT_ADD", { uuid: bytes(16, 3) }],
    ["SHARED_OBJECT_REMOVE", { uuid: bytes(16, 4) }],
    ["SHARED_OBJECT_LOOKUP", { uuid: bytes(16, 5) }],
    ["SHMEM_MAP", { mmap: { shmid: 2, fdOffset: 0x1000, shmOffset: 0x20_0000, len: 0x1000, flags: 1 }, fds: [6] }],
    ["SHMEM_UNMAP", { mmap: { shmid: 2, fdOffset: 0, shmOffset: 0x20_0000, len: 0x1000, flags: 0 } }],
  ];

  test("the table covers every BackendReq id", () => {
    expect(BACKEND.map(([k]) => BackendReq[k]).sort((a, b) => a - b)).toEqual(Object.values(BackendReq).sort((a, b) => a - b));
  });

  for (const [key, body] of BACKEND) {
    test(`decodeBackendRequest() round-trips ${key}`, () => {
      const m = msg(BackendReq[key], body);
      expect(backend(m)).toEqual({ ...m, flags: 1 });
    });
  }

  test("decodeBackendRequest() rejects unknown back-end request id 99", () => {
    rejects(() => backend(msg(99)), "UNKNOWN(99)", "request");
  });

  test("decodeBackendRequest() rejects a request carrying the reply flag", () => {
    rejects(() => backend(msg(BackendReq.CONFIG_CHANGE_MSG, { flags: FLAG_REPLY })), "CONFIG_CHANGE_MSG", "flags");
  });

  test("decodeBackendRequest() rejects VRING_HOST_NOTIFIER_MSG without its fd or with stray bits", () => {
    rejects(() => backend(msg(BackendReq.VRING_HOST_NOTIFIER_MSG, { area: { index: 1, noFd: false, size: 0x1000, offset: 0 } })), "VRING_HOST_NOTIFIER_MSG", "fds");
    expect(backend(msg(BackendReq.VRING_HOST_NOTIFIER_MSG, { area: { index: 1, noFd: true, size: 0, offset: 0 } })).area?.noFd).toBe(true);
    const { h } = wire(msg(BackendReq.VRING_HOST_NOTIFIER_MSG, { area: { index: 1, noFd: true, size: 0, offset: 0 } }), true);
    patch64(0, 0x401n);
    rejects(() => decodeBackendRequest(h, new DataView(buf.buffer, HDR_SIZE, h.size), []), "VRING_HOST_NOTIFIER_MSG", "area");
  });

  test("decodeBackendRequest() rejects SHMEM_MAP with reserved flags, zero length or no fd", () => {
    const p = { shmid: 0, fdOffset: 0, shmOffset: 0, len: 0x1000, flags: 0 };
    rejects(() => backend(msg(BackendReq.SHMEM_MAP, { mmap: { ...p, flags: 2 }, fds: [3] })), "SHMEM_MAP", "mmap.flags");
    rejects(() => backend(msg(BackendReq.SHMEM_MAP, { mmap: { ...p, len: 0 }, fds: [3] })), "SHMEM_MAP", "mmap.len");
    rejects(() => backend(msg(BackendReq.SHMEM_MAP, { mmap: p })), "SHMEM_MAP", "fds");
  });

  test("decodeBackendRequest() rejects a front-end IOTLB type (update) from the back-end", () => {
    rejects(() => backend(msg(BackendReq.IOTLB_MSG, { iotlb: { iova: 0, size: 0x1000, uaddr: 0, perm: 3, type: 2 } })), "IOTLB_MSG", "iotlb.type");
  });

  test("decodeBackendRequest() rejects a wrong-size SHARED_OBJECT_ADD", () => {
    rejects(() => backend(msg(BackendReq.SHARED_OBJECT_ADD, { raw: new Uint8Array(15) })), "SHARED_OBJECT_ADD", "size");
  });
});

describe("decodeBackendReply()", () => {
  function breply(m: Message, expected = m.request): Message {
    const { h, p } = wire({ ...m, flags: m.flags | FLAG_REPLY }, true);
    return decodeBackendReply(h, p, m.fds, expected);
  }

  test("decodeBackendReply() takes SHARED_OBJECT_LOOKUP's status and dma-buf fd", () => {
    expect(breply(msg(BackendReq.SHARED_OBJECT_LOOKUP, { u64: 0n, fds: [4] }))).toEqual(msg(BackendReq.SHARED_OBJECT_LOOKUP, { u64: 0n, fds: [4], flags: 5 }));
  });

  test("decodeBackendReply() rejects an fd with a failed SHARED_OBJECT_LOOKUP", () => {
    rejects(() => breply(msg(BackendReq.SHARED_OBJECT_LOOKUP, { u64: 22n, fds: [4] })), "SHARED_OBJECT_LOOKUP", "fds");
  });

  test("decodeBackendReply() rejects an fd on a REPLY_ACK status", () => {
    expect(breply(msg(BackendReq.IOTLB_MSG, { u64: 0n })).u64).toBe(0n);
    rejects(() => breply(msg(BackendReq.IOTLB_MSG, { u64: 0n, fds: [4] })), "IOTLB_MSG", "fds");
  });

  test("decodeBackendReply() rejects a reply to another back-end request", () => {
    rejects(() => breply(msg(BackendReq.VRING_CALL, { u64: 0n }), BackendReq.VRING_ERR), "VRING_ERR", "request", /VRING_CALL/);
  });
});

describe("encodeMessage()", () => {
  test("encodeMessage() sets the version bits and keeps the others", () => {
    encodeMessage(msg(Req.GET_FEATURES, { flags: 0x3 | FLAG_REPLY }), buf);
    expect(buf.getUint32(4, true)).toBe(0x5);
    encodeMessage(msg(Req.SET_OWNER), buf);
    expect(buf.getUint32(4, true)).toBe(0x1);
  });

  test("encodeMessage() writes little-endian u64s and zeroes padding", () => {
    new Uint8Array(buf.buffer).fill(0xff);
    const n = encodeMessage(msg(Req.ADD_MEM_REG, { region: { guestPhysAddr: 0x1_0000_0002, memorySize: 0x1000, userAddr: 0, mmapOffset: 0 }, fds: [3] }), buf);
    expect(n).toBe(HDR_SIZE + 40);
    expect(buf.getBigUint64(HDR_SIZE, true)).toBe(0n); // u64 padding before the region
    expect(buf.getBigUint64(HDR_SIZE + 8, true)).toBe(0x1_0000_0002n);
    new Uint8Array(buf.buffer).fill(0xff);
    encodeMessage(msg(Req.IOTLB_MSG, { iotlb: { iova: 0, size: 0, uaddr: 0, perm: 1, type: 2 } }), buf);
    expect(Array.from(new Uint8Array(buf.buffer, HDR_SIZE + 24, 8))).toEqual([1, 2, 0, 0, 0, 0, 0, 0]);
    new Uint8Array(buf.buffer).fill(0xff);
    encodeMessage(msg(Req.GET_INFLIGHT_FD, { inflight: { mmapSize: 0, mmapOffset: 0, numQueues: 2, queueSize: 0x100 } }), buf);
    expect(Array.from(new Uint8Array(buf.buffer, HDR_SIZE + 16, 8))).toEqual([2, 0, 0, 1, 0, 0, 0, 0]);
  });

  test("encodeMessage() writes the kick u64 with index and no-fd bit", () => {
    encodeMessage(msg(Req.SET_VRING_CALL, { vring: { index: 5, noFd: true } }), buf);
    expect(buf.getBigUint64(HDR_SIZE, true)).toBe(0x105n);
  });

  test("encodeMessage() throws RangeError with two payload fields set", () => {
    expect(thrown(() => encodeMessage(msg(Req.SET_FEATURES, { u64: 1n, state: { index: 0, num: 0 } }), buf))).toBeInstanceOf(RangeError);
  });

  test("encodeMessage() throws RangeError for values it cannot represent", () => {
    const a = { index: 0, flags: 0, desc: 0, used: 0, avail: 0, log: 0 };
    expect(thrown(() => encodeMessage(msg(Req.SET_VRING_ADDR, { addr: { ...a, desc: 2 ** 53 } }), buf))).toBeInstanceOf(RangeError);
    expect(thrown(() => encodeMessage(msg(Req.SET_VRING_ADDR, { addr: { ...a, used: -4 } }), buf))).toBeInstanceOf(RangeError);
    expect(thrown(() => encodeMessage(msg(Req.SET_VRING_KICK, { vring: { index: 256, noFd: true } }), buf))).toBeInstanceOf(RangeError);
    expect(thrown(() => encodeMessage(msg(Req.SET_FEATURES, { u64: -1n }), buf))).toBeInstanceOf(RangeError);
    expect(thrown(() => encodeMessage(msg(Req.CREATE_CRYPTO_SESSION, { raw: new Uint8Array(MAX_PAYLOAD + 1) }), buf))).toBeInstanceOf(RangeError);
  });

  test("encodeMessage() throws RangeError when the output buffer is too small", () => {
    expect(thrown(() => encodeMessage(msg(Req.SET_VRING_ADDR, { addr: { index: 0, flags: 0, desc: 0, used: 0, avail: 0, log: 0 } }), new DataView(new ArrayBuffer(20))))).toBeInstanceOf(RangeError);
  });
});

describe("features", () => {
  test("bit() makes a bigint mask from a bit number", () => {
    expect(bit(VIRTIO_F_VERSION_1)).toBe(0x1_0000_0000n);
    expect(bit(0)).toBe(1n);
  });

  test("ProtocolFeature numbers follow the spec through SHMEM (20)", () => {
    expect(ProtocolFeature.REPLY_ACK).toBe(3);
    expect(ProtocolFeature.CONFIGURE_MEM_SLOTS).toBe(15);
    expect(ProtocolFeature.DEVICE_STATE).toBe(19);
    expect(ProtocolFeature.SHMEM).toBe(20);
  });

  test("protocolFeatureNames() lists set bits lowest first and marks unknown ones", () => {
    expect(protocolFeatureNames(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(40))).toEqual(["MQ", "REPLY_ACK", "UNKNOWN(40)"]);
    expect(protocolFeatureNames(0n)).toEqual([]);
  });

  test("virtioFeatureNames() names ring/transport bits and skips device bits", () => {
    const mask = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_F_RING_PACKED) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | 0b111n;
    expect(virtioFeatureNames(mask)).toEqual(["VIRTIO_RING_F_EVENT_IDX", "VHOST_USER_F_PROTOCOL_FEATURES", "VIRTIO_F_VERSION_1", "VIRTIO_F_RING_PACKED"]);
  });
});

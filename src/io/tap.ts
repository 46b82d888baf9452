/**
 * Host tap devices: the host end of a virtio-net back-end.
 *
 * Theory of operation. `Tap.open` opens /dev/net/tun (O_RDWR | O_NONBLOCK |
 * O_CLOEXEC) and attaches the fd to the tap NAME with TUNSETIFF (IFF_TAP |
 * IFF_NO_PI, plus IFF_VNET_HDR), creating the interface if it does not exist;
 * a tap created this way lives as long as the fd. With IFF_VNET_HDR every
 * frame in either direction is preceded by a virtio_net_hdr of `vnetHdrSize`
 * bytes (TUNSETVNETHDRSZ: 12 for the virtio 1.x header with num_buffers), so
 * a virtio-net device can pass the guest's header through unchanged. The
 * offload flags (TUNSETOFFLOAD) say what the kernel may hand us: partial
 * checksums (TUN_F_CSUM), unsegmented TCP (TUN_F_TSO*), UFO.
 *
 * One read or readv returns one whole frame; one write or writev sends one
 * whole frame. Both are non-blocking and allocate nothing: the caller watches
 * `fd` for readability; a read that finds nothing returns 0, a write the
 * kernel cannot take now returns false (drop and count, as a NIC would).
 *
 * Link settings (up, MTU) go through an AF_UNIX datagram socket by interface
 * name, so they reach the tap only while it is in this process's network
 * namespace; the fd itself keeps working after `ip link set NAME netns NS`.
 *
 * @example
 * const tap = Tap.open("vm0", { offloads: TUN_F_CSUM, up: true });
 * const frame = new Uint8Array(12 + 65536);
 * const n = tap.read(frame);            // 0: nothing waiting; watch tap.fd
 * if (n > 0) tap.write(frame, n);       // echo it back
 * tap.close();
 */
import * as sys from "../../ffi/sys.ts";
import { IOVEC_SIZE, Pinned } from "../../ffi/structs.ts";
import { EACCES, EAGAIN, EBADF, EBUSY, EINVAL, EIO, ENODEV, ENOENT, EPERM, ErrnoError, errnoName } from "../../ffi/errno.ts";
import * as C from "../../ffi/constants.ts";

/** You can hand me unchecksummed packets (virtio_net_hdr NEEDS_CSUM). */
export const TUN_F_CSUM = C.TUN_F_CSUM;
/** TSO for IPv4 (needs TUN_F_CSUM). */
export const TUN_F_TSO4 = C.TUN_F_TSO4;
/** TSO for IPv6 (needs TUN_F_CSUM). */
export const TUN_F_TSO6 = C.TUN_F_TSO6;
/** TSO with ECN bits (needs TUN_F_CSUM). */
export const TUN_F_TSO_ECN = C.TUN_F_TSO_ECN;
/** UDP fragmentation offload (needs TUN_F_CSUM). */
export const TUN_F_UFO = C.TUN_F_UFO;

/** Not (yet) in ffi/errno.ts. */
const ENOBUFS = 105, EBADFD = 77;
const ETH_HLEN = 14;
/** The kernel's UIO_MAXIOV: readv/writev take at most this many pieces. */
const IOV_MAX = 1024;

/** Options of `Tap.open`. */
export interface TapOptions {
  /** IFF_VNET_HDR: each frame is preceded by a virtio_net_hdr (default true). */
  vnetHdr?: boolean;
  /** TUNSETVNETHDRSZ: 10 or 12 (default 12, the virtio 1.x header with num_buffers). */
  vnetHdrSize?: number;
  /** TUNSETOFFLOAD flags: what the kernel may hand us unsegmented / with partial checksums (default 0). */
  offloads?: number;
  /** Bring the link up (SIOCSIFFLAGS IFF_UP via an AF_UNIX datagram socket) (default false). */
  up?: boolean;
}

/** What went wrong: an errno name when a system call failed, else a check of ours. */
export type TapCode = "BAD_NAME" | "BAD_OPTION" | "BAD_LENGTH" | "CLOSED" | `E${string}`;

/**
 * A tap operation failed. `op` names it ("open", "TUNSETIFF", "write", ...),
 * `code` is the errno name (`errno` its number) or one of our own checks
 * (`errno` 0); the message adds the likely cause.
 * @example
 * try { Tap.open("tap0") } catch (e) {
 *   // "TUNSETIFF tap0: EPERM (1) — needs CAP_NET_ADMIN (or a tap created for this user: ...)"
 *   if (e instanceof TapError && e.code === "EPERM") console.error(e.message);
 * }
 */
export class TapError extends Error {
  override name = "TapError";
  constructor(readonly code: TapCode, readonly op: string, message: string, readonly errno = 0, options?: ErrorOptions) {
    super(message, options);
  }
}

/** Why a call may have failed, for the error message. */
function hint(op: string, e: number, name: string): string {
  switch (op) {
    case "open":
      if (e === ENOENT || e === ENODEV) return "no tun driver (modprobe tun)";
      if (e === EACCES || e === EPERM) return "no read-write access to /dev/net/tun (in a container: --device /dev/net/tun)";
      break;
    case "TUNSETIFF":
      if (e === EPERM) return `needs CAP_NET_ADMIN (or a tap created for this user: ip tuntap add ${name} mode tap user $USER)`;
      if (e === EBUSY) return `${name} is attached to another file already (a single-queue tap has one)`;
      if (e === EINVAL) return `${name} exists but is not a tap with these flags (a tun, another kind of link, or other IFF_* flags)`;
      break;
    case "TUNSETOFFLOAD":
      if (e === EINVAL) return "unknown flag, or TSO/UFO without TUN_F_CSUM";
      break;
    case "SIOCGIFFLAGS": case "SIOCSIFFLAGS": case "SIOCGIFMTU": case "SIOCSIFMTU":
      if (e === EPERM) return "needs CAP_NET_ADMIN";
      if (e === ENODEV) return `${name} is not in this process's network namespace (moved, or gone)`;
      if (e === EINVAL && op === "SIOCSIFMTU") return "MTU outside the tap's 68..65521";
      break;
    case "read": case "write": case "readv": case "writev":
      if (e === EINVAL) return "malformed frame or buffer (shorter than the vnet header or an Ethernet header, or a vnet header the kernel refuses)";
      if (e === EBADFD) return "the tap was detached from this file";
      break;
  }
  if (e === EBADF) return "the fd was closed elsewhere";
  return "";
}

function sysError(op: string, e: number, name: string, cause?: unknown, what = `${op} ${name}`): TapError {
  const h = hint(op, e, name);
  const code = (e === ENOBUFS ? "ENOBUFS" : e === EBADFD ? "EBADFD" : errnoName(e)) as TapCode;
  return new TapError(code, op, `${what}: ${code} (${e})${h ? ` — ${h}` : ""}`, e, cause ? { cause } : undefined);
}

/** Runs one ioctl step of `op`, turning an ErrnoError into a TapError with a hint. */
function step<T>(op: string, name: string, f: () => T): T {
  try {
    return f();
  } catch (err) {
    if (err instanceof ErrnoError) throw sysError(op, err.errno, name, err);
    throw err;
  }
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/** dev_valid_name() without the syscall: ≤ IFNAMSIZ - 1 bytes, no '/', ':' or whitespace, not "." or "..". */
function checkName(name: string): Uint8Array {
  const b = enc.encode(name);
  const bad = b.length > C.IFNAMSIZ - 1 ? `longer than ${C.IFNAMSIZ - 1} bytes (${b.length})`
    : /[\s/:\0]/.test(name) ? "contains '/', ':', NUL or whitespace"
    : name === "." || name === ".." ? "is . or .."
    : "";
  if (bad) throw new TapError("BAD_NAME", "open", `tap name ${JSON.stringify(name)} ${bad}`);
  return b;
}

/**
 * A tap interface opened for frames: one fd, non-blocking, in this process.
 * @example
 * const tap = Tap.open("bv%d", { vnetHdrSize: 12 });
 * console.log(tap.name, tap.fd, tap.mtu());   // "bv0" 7 1500
 * tap.close();                                // a non-persistent tap disappears
 */
export class Tap {
  private _fd: number;
  /** struct ifreq for TUNGETIFF and SIOC*: one per tap, reused. */
  private readonly ifr = new Uint8Array(C.IFREQ_SIZE);
  private readonly ifrDv = new DataView(this.ifr.buffer);
  /** iovec table for readv/writev (IOV_MAX entries), mapped on first use. */
  private iov: Pinned | null = null;
  private iov32: Uint32Array | null = null;

  private constructor(
    fd: number,
    /** The kernel's name for the interface at open time (a `%d` in the requested name is resolved). */
    readonly name: string,
    /** Bytes of virtio_net_hdr before each frame: 10 or 12, 0 without vnetHdr. */
    readonly vnetHdrSize: number,
  ) {
    this._fd = fd;
  }

  /**
   * Opens (creating if needed) the tap NAME: /dev/net/tun with O_RDWR |
   * O_NONBLOCK | O_CLOEXEC, TUNSETIFF with IFF_TAP | IFF_NO_PI (| IFF_VNET_HDR),
   * TUNSETVNETHDRSZ, TUNSETOFFLOAD, and SIOCSIFFLAGS IFF_UP when `up`.
   * NAME may hold one `%d` (the kernel picks a number); "" means `tap%d`.
   * On any failure the fd is closed (a tap created here disappears again).
   * @param name at most 15 bytes, no '/', ':' or whitespace
   * @returns the open tap
   * @throws TapError: BAD_NAME / BAD_OPTION before any system call, else the errno name
   * @example
   * const tap = Tap.open("vm0", { offloads: TUN_F_CSUM | TUN_F_TSO4, up: true });
   * tap.vnetHdrSize === 12;
   */
  static open(name: string, o: TapOptions = {}): Tap {
    const nameBytes = checkName(name);
    const vnetHdr = o.vnetHdr ?? true;
    if (o.vnetHdrSize !== undefined && (!vnetHdr || (o.vnetHdrSize !== 10 && o.vnetHdrSize !== 12))) {
      throw new TapError("BAD_OPTION", "open", `vnetHdrSize ${o.vnetHdrSize}: must be 10 or 12, with vnetHdr`);
    }
    const offloads = o.offloads ?? 0;
    checkOffloads(offloads, vnetHdr);
    const hdr = vnetHdr ? o.vnetHdrSize ?? 12 : 0;

    let fd: number;
    try {
      fd = sys.open("/dev/net/tun", C.O_RDWR | C.O_NONBLOCK | C.O_CLOEXEC);
    } catch (err) {
      if (err instanceof ErrnoError) throw sysError("open", err.errno, "", err, "cannot open /dev/net/tun");
      throw err;
    }
    try {
      const ifr = new Uint8Array(C.IFREQ_SIZE);
      ifr.set(nameBytes);
      new DataView(ifr.buffer).setUint16(C.IFREQ_UNION, C.IFF_TAP | C.IFF_NO_PI | (vnetHdr ? C.IFF_VNET_HDR : 0), true);
      step("TUNSETIFF", name, () => sys.ioctl(fd, C.TUNSETIFF, ifr, `TUNSETIFF ${name}`));
      const end = ifr.indexOf(0);
      const tap = new Tap(fd, dec.decode(ifr.subarray(0, end < 0 ? C.IFNAMSIZ : Math.min(end, C.IFNAMSIZ))), hdr);
      if (vnetHdr) {
        step("TUNSETVNETHDRSZ", tap.name, () => sys.ioctl(fd, C.TUNSETVNETHDRSZ, new Int32Array([hdr]), "TUNSETVNETHDRSZ"));
      }
      if (vnetHdr) tap.setOffloads(offloads);
      if (o.up) tap.setUp();
      return tap;
    } catch (err) {
      sys.closeQuiet(fd);
      throw err;
    }
  }

  /** The tap's file descriptor (watch it for readability); -1 once closed. */
  get fd(): number {
    return this._fd;
  }

  private need(op: string): number {
    if (this._fd < 0) throw new TapError("CLOSED", op, `${op} ${this.name}: the tap is closed`);
    return this._fd;
  }

  /**
   * Reads one frame (vnet header + Ethernet frame) into `buf`.
   * @returns the frame's length; 0 when none is waiting (EAGAIN). A frame
   *   longer than `buf` is cut to `buf.length` bytes and the result is
   *   `buf.length` (read(2) on a tap clamps; the rest of the frame is lost),
   *   so size `buf` for the largest frame: vnet header + 14 + 4 (VLAN) + MTU,
   *   or 65550 with TSO/UFO offloads.
   * @throws TapError BAD_LENGTH when `buf` cannot hold the vnet header; the errno name otherwise
   * @example
   * const buf = new Uint8Array(tap.vnetHdrSize + 18 + tap.mtu());
   * const n = tap.read(buf);
   * if (n > 0) deliver(buf.subarray(0, n));
   */
  read(buf: Uint8Array): number {
    const fd = this.need("read");
    if (buf.length <= this.vnetHdrSize) {
      throw new TapError("BAD_LENGTH", "read", `read ${this.name}: buffer of ${buf.length} bytes leaves no room after the ${this.vnetHdrSize}-byte vnet header`);
    }
    const r = sys.readRaw(fd, sys.ptrOf(buf), buf.length);
    if (r >= 0) return r;
    if (r === -EAGAIN) return 0;
    throw sysError("read", -r, this.name);
  }

  /**
   * Reads one frame straight into up to `count` pieces (readv, e.g. a guest's
   * RX buffers): piece i is `lens[i]` bytes at host address `ptrs[i]`.
   * Same result as `read` (at most the pieces' sum: a longer frame is cut).
   * @throws TapError BAD_LENGTH for count outside 1..1024
   * @example
   * const n = tap.readv([addr0, addr1], [12, 1514], 2);
   */
  readv(ptrs: ArrayLike<number>, lens: ArrayLike<number>, count: number): number {
    const fd = this.need("readv");
    const iov = this.fillIov("readv", ptrs, lens, count);
    const r = sys.readvRaw(fd, iov, count);
    if (r >= 0) return r;
    if (r === -EAGAIN) return 0;
    throw sysError("readv", -r, this.name);
  }

  /**
   * Writes one frame (vnet header + Ethernet frame) of `len` bytes from `buf`.
   * @returns true when sent, false when the tap cannot take it now (EAGAIN,
   *   ENOBUFS, or EIO: the link is down): the caller drops the frame and counts it
   * @throws TapError BAD_LENGTH when `len` is shorter than vnet header + 14-byte
   *   Ethernet header or longer than `buf` (checked here; the kernel would say
   *   EINVAL); the errno name for other failures (EINVAL for a vnet header it refuses)
   * @example
   * const f = new Uint8Array(12 + 60);   // zero vnet header: no offload
   * f.set(ethernetFrame, 12);
   * if (!tap.write(f)) txDropped++;
   */
  write(buf: Uint8Array, len: number = buf.length): boolean {
    const fd = this.need("write");
    if (!(len >= this.vnetHdrSize + ETH_HLEN && len <= buf.length)) this.badLength("write", len, buf.length);
    const r = sys.writeRaw(fd, sys.ptrOf(buf), len);
    if (r >= 0) return true;
    if (r === -EAGAIN || r === -ENOBUFS || r === -EIO) return false;
    throw sysError("write", -r, this.name);
  }

  /**
   * Writes one frame gathered from `count` pieces (writev); as `write`.
   * @example
   * tap.writev([hdrAddr, frameAddr], [12, 60], 2);
   */
  writev(ptrs: ArrayLike<number>, lens: ArrayLike<number>, count: number): boolean {
    const fd = this.need("writev");
    const iov = this.fillIov("writev", ptrs, lens, count);
    let total = 0;
    for (let i = 0; i < count; i++) total += lens[i]!;
    if (total < this.vnetHdrSize + ETH_HLEN) this.badLength("writev", total, Infinity);
    const r = sys.writevRaw(fd, iov, count);
    if (r >= 0) return true;
    if (r === -EAGAIN || r === -ENOBUFS || r === -EIO) return false;
    throw sysError("writev", -r, this.name);
  }

  private badLength(op: string, len: number, max: number): never {
    throw new TapError("BAD_LENGTH", op, `${op} ${this.name}: frame of ${len} bytes` + (len > max
      ? ` exceeds its buffer of ${max}`
      : ` is shorter than the ${this.vnetHdrSize}-byte vnet header + ${ETH_HLEN}-byte Ethernet header`));
  }

  /** Fills the iovec table; returns its address. No allocation after the first call. */
  private fillIov(op: string, ptrs: ArrayLike<number>, lens: ArrayLike<number>, count: number): number {
    if (!(count >= 1 && count <= IOV_MAX && count <= ptrs.length && count <= lens.length)) {
      throw new TapError("BAD_LENGTH", op, `${op} ${this.name}: count ${count} must be 1..${IOV_MAX} and ≤ the pieces given`);
    }
    if (this.iov === null) {
      this.iov = Pinned.alloc(IOV_MAX * IOVEC_SIZE);
      this.iov32 = new Uint32Array(this.iov.u8.buffer);
    }
    const t = this.iov32!;
    for (let i = 0, j = 0; i < count; i++, j += 4) {
      // struct iovec { void *iov_base; size_t iov_len; } as u32 halves, no BigInt.
      const p = ptrs[i]!;
      const lo = p >>> 0;
      t[j] = lo;
      t[j + 1] = (p - lo) / 4294967296;
      t[j + 2] = lens[i]! >>> 0;
      t[j + 3] = 0;
    }
    return this.iov.ptr;
  }

  /**
   * TUNSETOFFLOAD: which offloads the kernel may use in frames it hands us.
   * The kernel refuses (EINVAL) unknown bits and TSO/UFO without TUN_F_CSUM.
   * @example tap.setOffloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
   */
  setOffloads(flags: number): void {
    const fd = this.need("TUNSETOFFLOAD");
    checkOffloads(flags, this.vnetHdrSize > 0);
    // The argument is the flag word itself, passed by value.
    step("TUNSETOFFLOAD", this.name, () => sys.ioctl(fd, C.TUNSETOFFLOAD, flags, `TUNSETOFFLOAD 0x${flags.toString(16)}`));
  }

  /**
   * The interface's MTU (SIOCGIFMTU).
   * @example tap.mtu() === 1500
   */
  mtu(): number {
    this.ifreq("SIOCGIFMTU", C.SIOCGIFMTU, null);
    return this.ifrDv.getInt32(C.IFREQ_UNION, true);
  }

  /**
   * Sets the interface's MTU (SIOCSIFMTU; 68..65521 for a tap).
   * @example tap.setMtu(9000);
   */
  setMtu(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > 0x7fffffff) {
      throw new TapError("BAD_OPTION", "SIOCSIFMTU", `setMtu ${this.name}: ${n} is not an MTU`);
    }
    this.ifreq("SIOCSIFMTU", C.SIOCSIFMTU, n);
  }

  /** SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP added. */
  private setUp(): void {
    this.ifreq("SIOCGIFFLAGS", C.SIOCGIFFLAGS, null);
    const flags = this.ifrDv.getUint16(C.IFREQ_UNION, true);
    if (flags & C.IFF_UP) return;
    this.ifreq("SIOCSIFFLAGS", C.SIOCSIFFLAGS, flags | C.IFF_UP);
  }

  /**
   * One SIOC* ioctl on the interface through a short-lived AF_UNIX datagram
   * socket (any family reaches dev_ioctl; AF_UNIX exists on every kernel).
   * `set` fills the union's first int (ifr_mtu; ifr_flags is its low short).
   */
  private ifreq(op: string, req: number, set: number | null): void {
    const fd = this.need(op);
    const ifr = this.ifr;
    // TUNGETIFF: the current name, even if the link was renamed since open.
    ifr.fill(0);
    step("TUNGETIFF", this.name, () => sys.ioctl(fd, C.TUNGETIFF, ifr, "TUNGETIFF"));
    const cur = dec.decode(ifr.subarray(0, Math.max(0, ifr.indexOf(0))));
    ifr.fill(0, C.IFREQ_UNION);
    if (set !== null) this.ifrDv.setInt32(C.IFREQ_UNION, set, true);
    const s = step("socket", cur, () => sys.socketDgram(C.AF_UNIX));
    try {
      step(op, cur, () => sys.ioctl(s, req, ifr, `${op} ${cur}`));
    } finally {
      sys.closeQuiet(s);
    }
  }

  /**
   * Closes the fd (idempotent). A tap that is not persistent disappears.
   * @example tap.close(); tap.close(); tap.fd === -1
   */
  close(): void {
    const fd = this._fd;
    if (fd < 0) return;
    this._fd = -1;
    this.iov?.free();
    this.iov = null;
    this.iov32 = null;
    sys.closeQuiet(fd);
  }
}

function checkOffloads(flags: number, vnetHdr: boolean): void {
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffffffff) {
    throw new TapError("BAD_OPTION", "TUNSETOFFLOAD", `offloads ${flags}: not a flag word`);
  }
  if (flags !== 0 && !vnetHdr) {
    throw new TapError("BAD_OPTION", "TUNSETOFFLOAD",
      `offloads 0x${flags.toString(16)} need vnetHdr: without the header a frame cannot say its checksum is partial`);
  }
}

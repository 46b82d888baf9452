/**
 * A virtio-pci (modern, VIRTIO 1.x §4.1) driver that runs in the test
 * process and reaches the device only through qtest: port I/O for PCI
 * configuration, MMIO for the BAR, memory reads and writes for the rings.
 *
 * Theory of operation. No firmware ran (see qtest.ts), so the driver assigns
 * BAR4 itself, turns on memory decoding and bus mastering, and walks the
 * capability list for the four virtio structures (common, notify, ISR,
 * device config). Bring-up is the §3.1.1 sequence: reset, ACKNOWLEDGE,
 * DRIVER, features, FEATURES_OK (read back), queues, DRIVER_OK. With
 * vhost-user behind the device, QEMU starts the back-end while it handles the
 * DRIVER_OK write, so the rings must be complete by then.
 *
 * Queues are split rings (§2.7) in guest RAM handed out by `GuestAlloc`.
 * The driver keeps a shadow of everything it wrote (free list, avail index)
 * and reads back only used.idx, used elements and avail_event. Completions
 * are found by polling used.idx (the back-end stores it after the used
 * element, §2.7.8); interrupts are not needed, though the ISR register shows
 * whether the back-end signalled its call eventfd (MSI-X stays disabled, so
 * QEMU turns the signal into INTx). Every ring update is published element
 * first, index second (§2.7.13); qtest runs commands in order, so that order
 * is what the back-end sees. Notifications honour EVENT_IDX and NO_NOTIFY
 * as a real driver would, so a back-end that forgets to ask for kicks
 * stalls here as it would under Linux.
 *
 * With VIRTIO_F_RING_PACKED negotiated, `setupPackedQueue` programs a packed
 * ring (§2.8) instead, driven by `PackedQueue` (wrap counters, buffer ids,
 * indirect tables, both event suppression areas; see its comment).
 * `BlkQueue` runs virtio-blk requests over either kind.
 */
import type { Qtest } from "./qtest.ts";

export const VIRTIO_PCI_VENDOR = 0x1af4;
/** Transitional virtio-blk (what QEMU gives on q35's root bus) and modern-only virtio-blk. */
export const VIRTIO_BLK_DEVICE_IDS = [0x1001, 0x1042];

// PCI configuration header.
const PCI_VENDOR_ID = 0x00, PCI_COMMAND = 0x04, PCI_STATUS = 0x06, PCI_CAPABILITY_LIST = 0x34, PCI_BAR0 = 0x10;
const PCI_COMMAND_MEMORY = 0x2, PCI_COMMAND_MASTER = 0x4, PCI_STATUS_CAP_LIST = 0x10;
const PCI_CAP_ID_VNDR = 0x09;

// virtio_pci_cap.cfg_type (§4.1.4).
export const VIRTIO_PCI_CAP_COMMON_CFG = 1, VIRTIO_PCI_CAP_NOTIFY_CFG = 2, VIRTIO_PCI_CAP_ISR_CFG = 3,
  VIRTIO_PCI_CAP_DEVICE_CFG = 4, VIRTIO_PCI_CAP_PCI_CFG = 5;

// Common configuration offsets (§4.1.4.3).
const COMMON_DFSELECT = 0x00, COMMON_DF = 0x04, COMMON_GFSELECT = 0x08, COMMON_GF = 0x0c, COMMON_NUMQ = 0x12,
  COMMON_STATUS = 0x14, COMMON_CFGGENERATION = 0x15, COMMON_Q_SELECT = 0x16, COMMON_Q_SIZE = 0x18,
  COMMON_Q_ENABLE = 0x1c, COMMON_Q_NOFF = 0x1e, COMMON_Q_DESC = 0x20, COMMON_Q_AVAIL = 0x28, COMMON_Q_USED = 0x30;

// Device status bits (§2.1).
export const VIRTIO_STATUS_ACKNOWLEDGE = 1, VIRTIO_STATUS_DRIVER = 2, VIRTIO_STATUS_DRIVER_OK = 4,
  VIRTIO_STATUS_FEATURES_OK = 8, VIRTIO_STATUS_DEVICE_NEEDS_RESET = 0x40, VIRTIO_STATUS_FAILED = 0x80;

// Descriptor flags (§2.7.5).
export const VRING_DESC_F_NEXT = 1, VRING_DESC_F_WRITE = 2, VRING_DESC_F_INDIRECT = 4;
// Ring flags (§2.7.7, §2.7.10).
export const VRING_AVAIL_F_NO_INTERRUPT = 1, VRING_USED_F_NO_NOTIFY = 1;

export const VIRTIO_F_VERSION_1 = 32, VIRTIO_RING_F_INDIRECT_DESC = 28, VIRTIO_RING_F_EVENT_IDX = 29,
  VIRTIO_F_RING_PACKED = 34;

const bit = (n: number) => 1n << BigInt(n);
const hex = (n: number | bigint) => `0x${n.toString(16)}`;

/** An error from the driver's side of the protocol: a device that refuses, times out or answers nonsense. */
export class VirtioPciError extends Error {
  override name = "VirtioPciError";
}

/**
 * Bump allocator over a window of guest RAM. The rings and buffers of a test
 * never need freeing one by one: `mark`/`release` drop a whole batch.
 */
export class GuestAlloc {
  private next: number;
  constructor(readonly base: number, readonly limit: number) {
    this.next = base;
  }
  alloc(len: number, align = 16): number {
    const at = Math.ceil(this.next / align) * align;
    if (at + len > this.limit) {
      throw new VirtioPciError(`guest RAM window ${hex(this.base)}..${hex(this.limit)} exhausted (asked ${len} bytes)`);
    }
    this.next = at + len;
    return at;
  }
  mark(): number {
    return this.next;
  }
  release(mark: number): void {
    this.next = mark;
  }
}

/** One function's PCI configuration space, reached through ports 0xCF8/0xCFC (configuration mechanism #1). */
export class PciFunction {
  constructor(readonly qt: Qtest, readonly bus: number, readonly dev: number, readonly fn: number) {}

  private select(reg: number): Promise<void> {
    return this.qt.outl(0xcf8, (0x80000000 | (this.bus << 16) | (this.dev << 11) | (this.fn << 8) | (reg & 0xfc)) >>> 0);
  }
  async read32(reg: number): Promise<number> {
    await this.select(reg);
    return this.qt.inl(0xcfc);
  }
  async read16(reg: number): Promise<number> {
    await this.select(reg);
    return this.qt.inw(0xcfc + (reg & 2));
  }
  async read8(reg: number): Promise<number> {
    await this.select(reg);
    return this.qt.inb(0xcfc + (reg & 3));
  }
  async write32(reg: number, v: number): Promise<void> {
    await this.select(reg);
    await this.qt.outl(0xcfc, v);
  }
  async write16(reg: number, v: number): Promise<void> {
    await this.select(reg);
    await this.qt.outw(0xcfc + (reg & 2), v);
  }

  toString(): string {
    return `${this.bus.toString(16).padStart(2, "0")}:${this.dev.toString(16).padStart(2, "0")}.${this.fn}`;
  }
}

/** Scans bus 0 for virtio functions whose device id is in `deviceIds`, in slot order. */
export async function findVirtioPci(qt: Qtest, deviceIds = VIRTIO_BLK_DEVICE_IDS): Promise<PciFunction[]> {
  const found: PciFunction[] = [];
  for (let dev = 0; dev < 32; dev++) {
    const f = new PciFunction(qt, 0, dev, 0);
    const id = await f.read32(PCI_VENDOR_ID);
    if ((id & 0xffff) === VIRTIO_PCI_VENDOR && deviceIds.includes(id >>> 16)) found.push(f);
  }
  return found;
}

interface CapLocation {
  bar: number;
  offset: number;
  length: number;
}

/** Where the virtio structures are once BAR4 (or whichever BAR the capabilities name) is mapped. */
export interface VirtioLayout {
  common: number;
  notify: number;
  notifyMultiplier: number;
  isr: number;
  device: number;
  deviceLength: number;
  /** Every virtio capability found, in list order, as [cfg_type, bar, offset, length]. */
  caps: [number, number, number, number][];
  /** Every capability id in the list, in order (0x09 vendor, 0x11 MSI-X, ...). */
  capIds: number[];
}

export interface SplitQueueOptions {
  /** Ring size (a power of two, at most what the device reports); default the device's maximum. */
  size?: number;
  /** Entries per preallocated indirect table (one table per descriptor index); 0 disables indirect. */
  indirectMax?: number;
}

/** A modern virtio-pci device driven over qtest. */
export class VirtioPciDevice {
  layout!: VirtioLayout;
  /** Features accepted by the last `negotiate`. */
  features = 0n;
  readonly queues: Virtqueue[] = [];

  private constructor(readonly qt: Qtest, readonly pci: PciFunction) {}

  /**
   * Maps the function's 64-bit BAR (the one the virtio capabilities use,
   * BAR4 in QEMU) at `barAddress`, enables memory decoding and bus mastering,
   * and reads the capability list.
   */
  static async open(qt: Qtest, pci: PciFunction, barAddress = 0xe0000000): Promise<VirtioPciDevice> {
    const d = new VirtioPciDevice(qt, pci);
    const status = await pci.read16(PCI_STATUS);
    if (!(status & PCI_STATUS_CAP_LIST)) throw new VirtioPciError(`${pci}: no capability list (status ${hex(status)})`);
    const caps: [number, number, number, number][] = [];
    const capIds: number[] = [];
    let notifyMultiplier = -1;
    // Capability pointers are dword-aligned (the low two bits are reserved); 48 hops is the most a 256-byte space holds.
    let ptr = (await pci.read8(PCI_CAPABILITY_LIST)) & 0xfc;
    for (let hops = 0; ptr !== 0; hops++) {
      if (hops > 48) throw new VirtioPciError(`${pci}: capability list loops`);
      const head = await pci.read32(ptr);
      const id = head & 0xff, next = (head >>> 8) & 0xfc;
      capIds.push(id);
      if (id === PCI_CAP_ID_VNDR) {
        const cfgType = (head >>> 24) & 0xff;
        const bar = (await pci.read32(ptr + 4)) & 0xff;
        const offset = await pci.read32(ptr + 8), length = await pci.read32(ptr + 12);
        caps.push([cfgType, bar, offset, length]);
        if (cfgType === VIRTIO_PCI_CAP_NOTIFY_CFG && notifyMultiplier < 0) notifyMultiplier = await pci.read32(ptr + 16);
      }
      ptr = next;
    }
    // §4.1.4.1: the driver uses the first capability of each type it understands.
    const first = (t: number): CapLocation => {
      const c = caps.find((c) => c[0] === t);
      if (!c) throw new VirtioPciError(`${pci}: no virtio capability of type ${t}`);
      return { bar: c[1], offset: c[2], length: c[3] };
    };
    const common = first(VIRTIO_PCI_CAP_COMMON_CFG), notify = first(VIRTIO_PCI_CAP_NOTIFY_CFG),
      isr = first(VIRTIO_PCI_CAP_ISR_CFG), device = first(VIRTIO_PCI_CAP_DEVICE_CFG);
    const bars = new Set([common.bar, notify.bar, isr.bar, device.bar]);
    if (bars.size !== 1) throw new VirtioPciError(`${pci}: virtio structures spread over BARs ${[...bars]}`);
    const barIndex = common.bar;
    const barReg = PCI_BAR0 + 4 * barIndex;
    const low = await pci.read32(barReg);
    if ((low & 0x7) !== 0x4) throw new VirtioPciError(`${pci}: BAR${barIndex} is not a 64-bit memory BAR (${hex(low)})`);
    await pci.write32(barReg, barAddress % 2 ** 32);
    await pci.write32(barReg + 4, Math.floor(barAddress / 2 ** 32));
    const cmd = await pci.read16(PCI_COMMAND);
    await pci.write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    d.layout = {
      common: barAddress + common.offset, notify: barAddress + notify.offset, notifyMultiplier,
      isr: barAddress + isr.offset, device: barAddress + device.offset, deviceLength: device.length, caps, capIds,
    };
    return d;
  }

  // ---- common configuration ----

  async status(): Promise<number> {
    return this.qt.readb(this.layout.common + COMMON_STATUS);
  }
  async setStatus(v: number): Promise<void> {
    await this.qt.writeb(this.layout.common + COMMON_STATUS, v);
  }
  async numQueues(): Promise<number> {
    return this.qt.readw(this.layout.common + COMMON_NUMQ);
  }
  /** Reads (and so clears) the ISR status: bit 0 is "a queue was used", bit 1 "configuration changed" (§4.1.4.5). */
  async isr(): Promise<number> {
    return this.qt.readb(this.layout.isr);
  }
  async configGeneration(): Promise<number> {
    return this.qt.readb(this.layout.common + COMMON_CFGGENERATION);
  }

  /** §4.1.4.3.2: writing 0 resets; the driver waits until status reads back 0. Forgets all queues. */
  async reset(timeoutMs = 5000): Promise<void> {
    await this.setStatus(0);
    const deadline = Date.now() + timeoutMs;
    let s: number;
    while ((s = await this.status()) !== 0) {
      if (Date.now() > deadline) throw new VirtioPciError(`${this.pci}: status still ${hex(s)} after reset`);
      await Bun.sleep(1);
    }
    this.queues.length = 0;
    this.features = 0n;
  }

  async deviceFeatures(): Promise<bigint> {
    const c = this.layout.common;
    await this.qt.writel(c + COMMON_DFSELECT, 0);
    const lo = await this.qt.readl(c + COMMON_DF);
    await this.qt.writel(c + COMMON_DFSELECT, 1);
    const hi = await this.qt.readl(c + COMMON_DF);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /**
   * Reset, ACKNOWLEDGE, DRIVER, write `deviceFeatures & wanted` (VERSION_1 is
   * required), FEATURES_OK, and check that the device kept FEATURES_OK.
   * Returns the accepted features.
   */
  async negotiate(wanted: bigint): Promise<bigint> {
    await this.reset();
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE);
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    const offered = await this.deviceFeatures();
    const f = offered & wanted;
    if (!(f & bit(VIRTIO_F_VERSION_1))) throw new VirtioPciError(`${this.pci}: device does not offer VERSION_1 (${hex(offered)})`);
    const c = this.layout.common;
    await this.qt.writel(c + COMMON_GFSELECT, 0);
    await this.qt.writel(c + COMMON_GF, Number(f & 0xffffffffn));
    await this.qt.writel(c + COMMON_GFSELECT, 1);
    await this.qt.writel(c + COMMON_GF, Number(f >> 32n));
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    const s = await this.status();
    if (!(s & VIRTIO_STATUS_FEATURES_OK)) {
      throw new VirtioPciError(`${this.pci}: device cleared FEATURES_OK for features ${hex(f)} (status ${hex(s)})`);
    }
    this.features = f;
    return f;
  }

  /**
   * Selects queue `index` and programs a packed ring (§2.8) for it in `ram`;
   * needs VIRTIO_F_RING_PACKED negotiated. Enabled, not yet started.
   */
  async setupPackedQueue(index: number, ram: GuestAlloc, o: SplitQueueOptions = {}): Promise<PackedQueue> {
    if (!(this.features & bit(VIRTIO_F_RING_PACKED))) throw new VirtioPciError(`${this.pci}: RING_PACKED not negotiated`);
    const c = this.layout.common;
    await this.qt.writew(c + COMMON_Q_SELECT, index);
    const max = await this.qt.readw(c + COMMON_Q_SIZE);
    if (max === 0) throw new VirtioPciError(`${this.pci}: queue ${index} does not exist`);
    // §2.8.10.1: a packed ring's size need not be a power of 2.
    const size = o.size ?? max;
    if (size < 1 || size > max) throw new VirtioPciError(`${this.pci}: queue ${index}: size ${size} (max ${max})`);
    const indirectMax = this.features & bit(VIRTIO_RING_F_INDIRECT_DESC) ? (o.indirectMax ?? 0) : 0;
    // §2.8.10.1: descriptors 16-aligned, the two event suppression areas 4-aligned.
    const desc = ram.alloc(16 * size, 4096), driver = ram.alloc(4, 64), device = ram.alloc(4, 64);
    const indirect = indirectMax ? ram.alloc(16 * indirectMax * size, 4096) : 0;
    await this.qt.memset(desc, 16 * size, 0);
    await this.qt.memset(driver, 4, 0);
    await this.qt.memset(device, 4, 0);
    await this.qt.writew(c + COMMON_Q_SIZE, size);
    await this.qt.writeq(c + COMMON_Q_DESC, BigInt(desc));
    await this.qt.writeq(c + COMMON_Q_AVAIL, BigInt(driver));
    await this.qt.writeq(c + COMMON_Q_USED, BigInt(device));
    const noff = await this.qt.readw(c + COMMON_Q_NOFF);
    await this.qt.writew(c + COMMON_Q_ENABLE, 1);
    const notify = this.layout.notify + noff * this.layout.notifyMultiplier;
    const eventIdx = (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
    const q = new PackedQueue(this.qt, index, size, desc, driver, device, notify, indirect, indirectMax, eventIdx);
    this.queues[index] = q;
    return q;
  }

  /** Selects queue `index` and programs a split ring for it in `ram`; the queue is enabled, not yet started. */
  async setupQueue(index: number, ram: GuestAlloc, o: SplitQueueOptions = {}): Promise<SplitQueue> {
    const c = this.layout.common;
    await this.qt.writew(c + COMMON_Q_SELECT, index);
    const max = await this.qt.readw(c + COMMON_Q_SIZE);
    if (max === 0) throw new VirtioPciError(`${this.pci}: queue ${index} does not exist`);
    const size = o.size ?? max;
    if (size > max || size & (size - 1)) throw new VirtioPciError(`${this.pci}: queue ${index}: size ${size} (max ${max})`);
    const indirectMax = this.features & bit(VIRTIO_RING_F_INDIRECT_DESC) ? (o.indirectMax ?? 0) : 0;
    // §2.7: descriptor table 16-aligned, avail 2-aligned, used 4-aligned; page-aligning each is allowed and simpler to read in dumps.
    const desc = ram.alloc(16 * size, 4096), avail = ram.alloc(6 + 2 * size, 4096), used = ram.alloc(6 + 8 * size, 4096);
    const indirect = indirectMax ? ram.alloc(16 * indirectMax * size, 4096) : 0;
    await this.qt.memset(desc, 16 * size, 0);
    await this.qt.memset(avail, 6 + 2 * size, 0);
    await this.qt.memset(used, 6 + 8 * size, 0);
    await this.qt.writew(c + COMMON_Q_SIZE, size);
    await this.qt.writeq(c + COMMON_Q_DESC, BigInt(desc));
    await this.qt.writeq(c + COMMON_Q_AVAIL, BigInt(avail));
    await this.qt.writeq(c + COMMON_Q_USED, BigInt(used));
    const noff = await this.qt.readw(c + COMMON_Q_NOFF);
    await this.qt.writew(c + COMMON_Q_ENABLE, 1);
    const notify = this.layout.notify + noff * this.layout.notifyMultiplier;
    const eventIdx = (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
    const q = new SplitQueue(this.qt, index, size, desc, avail, used, notify, indirect, indirectMax, eventIdx);
    this.queues[index] = q;
    return q;
  }

  /** Sets DRIVER_OK (on top of ACKNOWLEDGE | DRIVER | FEATURES_OK) and checks the device did not fail. */
  async driverOk(): Promise<void> {
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
    const s = await this.status();
    if (s & (VIRTIO_STATUS_FAILED | VIRTIO_STATUS_DEVICE_NEEDS_RESET) || !(s & VIRTIO_STATUS_DRIVER_OK)) {
      throw new VirtioPciError(`${this.pci}: status ${hex(s)} after DRIVER_OK`);
    }
  }

  // ---- device configuration (§4.1.4.6) ----

  async config8(off: number): Promise<number> {
    return this.qt.readb(this.layout.device + off);
  }
  async config16(off: number): Promise<number> {
    return this.qt.readw(this.layout.device + off);
  }
  async config32(off: number): Promise<number> {
    return this.qt.readl(this.layout.device + off);
  }
  /** A 64-bit field as two 32-bit reads, retried until config_generation is stable (§4.1.4.3.1). */
  async config64(off: number): Promise<number> {
    for (let tries = 0; tries < 10; tries++) {
      const g = await this.configGeneration();
      const lo = await this.config32(off), hi = await this.config32(off + 4);
      if ((await this.configGeneration()) === g) return lo + hi * 2 ** 32;
    }
    throw new VirtioPciError(`${this.pci}: config_generation keeps changing`);
  }
}

/** One buffer of a chain: guest address, length, and whether the device writes it. */
export interface VirtqBuffer {
  addr: number;
  len: number;
  write: boolean;
}

export interface UsedElem {
  id: number;
  len: number;
}

/** The driver side of one split virtqueue in guest RAM, over qtest. */
export class SplitQueue implements Virtqueue {
  /** Free descriptor indexes; a chain takes from the end. */
  private readonly free: number[] = [];
  /** Descriptor indexes held by each in-flight head (the head itself first). */
  private readonly chains = new Map<number, number[]>();
  private availIdx = 0;
  private lastUsed = 0;
  /** avail.idx at the last notification decision (the "old" of §2.7.10's vring_need_event). */
  private kickedIdx = 0;
  /** Notifications sent, and skipped because the device asked for none. */
  kicks = 0;
  suppressed = 0;
  /** Used elements reaped but not yet taken by `waitFor`. */
  private readonly done = new Map<number, number>();

  constructor(readonly qt: Qtest, readonly index: number, readonly size: number, readonly desc: number,
    readonly avail: number, readonly used: number, readonly notifyAddr: number, private readonly indirect: number,
    readonly indirectMax: number, readonly eventIdx: boolean) {
    for (let i = size - 1; i >= 0; i--) this.free.push(i);
  }

  get inFlight(): number {
    return this.chains.size;
  }

  /**
   * Writes `bufs` as one chain (direct, or as an indirect table when
   * `indirect` is set) and puts its head in the avail ring. Does not notify.
   * Returns the head index.
   */
  async add(bufs: VirtqBuffer[], o: { indirect?: boolean } = {}): Promise<number> {
    const head = await this.writeChain(bufs, o);
    await this.qt.writew(this.avail + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    // §2.7.13: the ring entry is visible before the index that publishes it.
    await this.qt.writew(this.avail + 2, this.availIdx);
    return head;
  }

  /** Takes descriptors for `bufs` and writes the chain, without making it available. */
  private async writeChain(bufs: VirtqBuffer[], o: { indirect?: boolean }): Promise<number> {
    if (bufs.length === 0) throw new VirtioPciError(`queue ${this.index}: empty chain`);
    if (o.indirect) {
      if (bufs.length > this.indirectMax) {
        throw new VirtioPciError(`queue ${this.index}: ${bufs.length} buffers, indirect tables hold ${this.indirectMax}`);
      }
      if (this.free.length < 1) throw new VirtioPciError(`queue ${this.index}: ring full`);
      const head = this.free.pop()!;
      const table = this.indirect + head * 16 * this.indirectMax;
      await this.qt.memwrite(table, encodeChain(bufs, bufs.map((_, i) => i)));
      await this.qt.memwrite(this.desc + 16 * head, encodeDesc(table, 16 * bufs.length, VRING_DESC_F_INDIRECT, 0));
      this.chains.set(head, [head]);
      return head;
    }
    if (this.free.length < bufs.length) throw new VirtioPciError(`queue ${this.index}: ring full`);
    const ids = this.free.splice(this.free.length - bufs.length).reverse();
    const table = encodeChain(bufs, ids);
    // One qtest write per run of consecutive indexes (a fresh queue hands them out in order).
    for (let i = 0; i < ids.length;) {
      let j = i + 1;
      while (j < ids.length && ids[j] === ids[j - 1]! + 1) j++;
      await this.qt.memwrite(this.desc + 16 * ids[i]!, table.subarray(16 * i, 16 * j));
      i = j;
    }
    this.chains.set(ids[0]!, ids);
    return ids[0]!;
  }

  /**
   * Notifies the device (§4.1.5.2: the queue index written to its notify
   * address) unless it asked not to be: under EVENT_IDX when avail.idx has
   * not passed avail_event since the last decision, otherwise when used.flags
   * has NO_NOTIFY (§2.7.10). `force` always notifies. Returns whether it did.
   */
  async kick(o: { force?: boolean } = {}): Promise<boolean> {
    const old = this.kickedIdx, now = this.availIdx;
    this.kickedIdx = now;
    if (!o.force) {
      // Our avail.idx store came before this read (qtest runs commands in order), as §2.7.13 requires.
      const skip = this.eventIdx
        ? !needEvent(await this.availEvent(), now, old)
        : ((await this.qt.readw(this.used)) & VRING_USED_F_NO_NOTIFY) !== 0;
      if (skip) {
        this.suppressed++;
        return false;
      }
    }
    await this.qt.writew(this.notifyAddr, this.index);
    this.kicks++;
    return true;
  }

  /** avail_event, the device's word at the end of the used ring (EVENT_IDX). */
  async availEvent(): Promise<number> {
    return this.qt.readw(this.used + 4 + 8 * this.size);
  }
  /** used_event, the driver's word at the end of the avail ring: "notify me when used.idx passes this" (EVENT_IDX). */
  async setUsedEvent(v: number): Promise<void> {
    await this.qt.writew(this.avail + 4 + 2 * this.size, v & 0xffff);
  }
  /** avail.flags (NO_INTERRUPT is the only flag, and is ignored under EVENT_IDX). */
  async setAvailFlags(v: number): Promise<void> {
    await this.qt.writew(this.avail, v);
  }
  get availIndex(): number {
    return this.availIdx;
  }

  async usedIdx(): Promise<number> {
    return this.qt.readw(this.used + 2);
  }
  async availIdxInRam(): Promise<number> {
    return this.qt.readw(this.avail + 2);
  }

  /** Reads any new used elements, frees their descriptors and returns them. */
  async reap(): Promise<UsedElem[]> {
    const idx = await this.usedIdx();
    const n = (idx - this.lastUsed) & 0xffff;
    if (n === 0) return [];
    if (n > this.chains.size) {
      throw new VirtioPciError(`queue ${this.index}: used.idx moved from ${this.lastUsed} to ${idx} with ${this.chains.size} chains in flight`);
    }
    const out: UsedElem[] = [];
    // The used elements may wrap past the end of the ring: read them in at most two pieces.
    for (let k = 0; k < n;) {
      const slot = (this.lastUsed + k) % this.size;
      const count = Math.min(n - k, this.size - slot);
      const raw = await this.qt.memread(this.used + 4 + 8 * slot, 8 * count);
      const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      for (let e = 0; e < count; e++) out.push({ id: dv.getUint32(8 * e, true), len: dv.getUint32(8 * e + 4, true) });
      k += count;
    }
    this.lastUsed = idx;
    for (const u of out) {
      const ids = this.chains.get(u.id);
      if (!ids) throw new VirtioPciError(`queue ${this.index}: used id ${u.id} is not the head of a chain in flight`);
      this.chains.delete(u.id);
      for (let i = ids.length - 1; i >= 0; i--) this.free.push(ids[i]!);
      this.done.set(u.id, u.len);
    }
    return out;
  }

  /**
   * Makes `count` requests out of one fixed chain shape, cheaply enough to
   * run the 16-bit ring indexes past 65535: it writes as many copies of
   * `bufs` as the ring holds once (each copy in an indirect table when
   * `indirect`), then per batch only publishes avail entries, kicks and
   * polls used.idx. The device writes into the same buffers every time, so
   * `bufs` should be a request whose result does not matter (FLUSH, GET_ID).
   * Needs an idle queue; returns the used elements of the last batch.
   */
  async flood(bufs: VirtqBuffer[], count: number, o: { indirect?: boolean; timeoutMs?: number } = {}): Promise<UsedElem[]> {
    if (this.chains.size) throw new VirtioPciError(`queue ${this.index}: flood needs an idle queue (${this.chains.size} in flight)`);
    const heads: number[] = [];
    while (this.free.length >= (o.indirect ? 1 : bufs.length)) heads.push(await this.writeChain(bufs, o));
    let last: UsedElem[] = [];
    try {
      for (let done = 0; done < count;) {
        const n = Math.min(heads.length, count - done);
        const ring = new Uint8Array(2 * this.size);
        const slots = new DataView(ring.buffer);
        const first = this.availIdx % this.size;
        for (let i = 0; i < n; i++) slots.setUint16(2 * ((first + i) % this.size), heads[i]!, true);
        // The entries may wrap past the end of the ring: at most two writes.
        const tail = Math.min(n, this.size - first);
        await this.qt.memwrite(this.avail + 4 + 2 * first, ring.subarray(2 * first, 2 * (first + tail)));
        if (n > tail) await this.qt.memwrite(this.avail + 4, ring.subarray(0, 2 * (n - tail)));
        this.availIdx = (this.availIdx + n) & 0xffff;
        await this.qt.writew(this.avail + 2, this.availIdx);
        await this.kick();
        const deadline = Date.now() + (o.timeoutMs ?? 5000);
        let used: number;
        while ((used = await this.usedIdx()) !== this.availIdx) {
          if (Date.now() > deadline) {
            throw new VirtioPciError(`queue ${this.index}: flood stalled at used.idx ${used}, avail.idx ${this.availIdx} (${done} done)`);
          }
        }
        if (done + n >= count) {
          const raw = new Uint8Array(8 * n);
          for (let k = 0; k < n; k++) raw.set(await this.qt.memread(this.used + 4 + 8 * ((this.lastUsed + k) % this.size), 8), 8 * k);
          const dv = new DataView(raw.buffer);
          last = Array.from({ length: n }, (_, k) => ({ id: dv.getUint32(8 * k, true), len: dv.getUint32(8 * k + 4, true) }));
        }
        this.lastUsed = this.availIdx;
        done += n;
      }
    } finally {
      for (const h of heads) {
        const ids = this.chains.get(h)!;
        this.chains.delete(h);
        for (let i = ids.length - 1; i >= 0; i--) this.free.push(ids[i]!);
      }
    }
    return last;
  }

  /** Polls used.idx until `head` has been used; returns its used length. */
  async waitFor(head: number, timeoutMs = 5000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (let spins = 0; ; spins++) {
      const len = this.done.get(head);
      if (len !== undefined) {
        this.done.delete(head);
        return len;
      }
      if (Date.now() > deadline) {
        throw new VirtioPciError(
          `queue ${this.index}: head ${head} not used within ${timeoutMs} ms (avail.idx ${this.availIdx}, used.idx ${await this.usedIdx()}, last seen ${this.lastUsed})`,
        );
      }
      await this.reap();
      // Back off a little after the first few polls so a slow back-end does not meet a storm of qtest reads.
      if (spins > 20 && !this.done.has(head)) await Bun.sleep(1);
    }
  }
}

/** What BlkQueue needs from a ring, split or packed. */
export interface Virtqueue {
  readonly qt: Qtest;
  readonly index: number;
  readonly size: number;
  /** Makes `bufs` available as one buffer (no notification); returns its id (split: head index). */
  add(bufs: VirtqBuffer[], o?: { indirect?: boolean }): Promise<number>;
  /** Notifies the device unless it asked not to be (or `force`); returns whether it did. */
  kick(o?: { force?: boolean }): Promise<boolean>;
  /** Polls until buffer `id` has been used; returns its used length. */
  waitFor(id: number, timeoutMs?: number): Promise<number>;
}

// Packed ring descriptor flags (§2.8.1) and event suppression flags (§2.8.10).
export const VRING_PACKED_DESC_F_AVAIL = 1 << 7, VRING_PACKED_DESC_F_USED = 1 << 15;
export const VRING_PACKED_EVENT_FLAG_ENABLE = 0, VRING_PACKED_EVENT_FLAG_DISABLE = 1, VRING_PACKED_EVENT_FLAG_DESC = 2;

/** One packed descriptor: addr, len, buffer id, flags (§2.8.13). */
function encodePackedDesc(out: DataView, at: number, addr: number, len: number, id: number, flags: number): void {
  out.setUint32(at, addr % 2 ** 32, true);
  out.setUint32(at + 4, Math.floor(addr / 2 ** 32), true);
  out.setUint32(at + 8, len, true);
  out.setUint16(at + 12, id, true);
  out.setUint16(at + 14, flags, true);
}

/**
 * The driver side of one packed virtqueue (VIRTIO 1.2 §2.8) in guest RAM,
 * over qtest. One ring of descriptors serves both directions: the driver
 * marks a descriptor available by setting AVAIL to its wrap counter and USED
 * to the inverse; the device writes one used descriptor per buffer (id, len,
 * AVAIL = USED = its wrap counter) at its own next position, which moves on
 * by the number of descriptors the buffer took. Buffer ids are ours (a free
 * list of 0..size-1), so completions may come in any order. A chain's head
 * flags are stored last (§2.8.21.1), in a separate 16-bit write, so the
 * device never sees a head before the rest of its chain. Event suppression:
 * the device area's flags (ENABLE, DISABLE, or DESC with EVENT_IDX) decide
 * kicks as Linux's virtqueue_kick_prepare_packed does; the driver area is
 * left at ENABLE (0) unless a test changes it.
 */
export class PackedQueue implements Virtqueue {
  private readonly freeIds: number[] = [];
  /** Descriptors (ring slots) each in-flight buffer id takes. */
  private readonly slots = new Map<number, number>();
  private slotsInFlight = 0;
  private nextAvail = 0;
  private availWrap = 1;
  private nextUsed = 0;
  private usedWrap = 1;
  /** Descriptors made available in all, and that count at the last kick decision. */
  private availCount = 0;
  private kickedCount = 0;
  kicks = 0;
  suppressed = 0;
  private readonly done = new Map<number, number>();

  constructor(readonly qt: Qtest, readonly index: number, readonly size: number, readonly desc: number,
    readonly driverArea: number, readonly deviceArea: number, readonly notifyAddr: number,
    private readonly indirect: number, readonly indirectMax: number, readonly eventIdx: boolean) {
    for (let i = size - 1; i >= 0; i--) this.freeIds.push(i);
  }

  get inFlight(): number {
    return this.slots.size;
  }
  /** The driver's next descriptor position and wrap counter (what SET_VRING_BASE carries in packed form). */
  get availPosition(): { index: number; wrap: number } {
    return { index: this.nextAvail, wrap: this.availWrap };
  }
  get usedPosition(): { index: number; wrap: number } {
    return { index: this.nextUsed, wrap: this.usedWrap };
  }

  /** AVAIL/USED bits that mean "available" under driver wrap counter `wrap` (§2.8.1). */
  private availFlags(wrap: number): number {
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
  }

  /**
   * Encodes the ring slots for `bufs` starting at the driver's position (the
   * head's flags included), and advances the position. Returns the bytes of
   * each contiguous run of slots and the head's flags.
   */
  private layChain(id: number, bufs: VirtqBuffer[], indirect: boolean): { runs: { at: number; bytes: Uint8Array }[]; headFlags: number; headAt: number } {
    const n = indirect ? 1 : bufs.length;
    const runs: { at: number; bytes: Uint8Array }[] = [];
    const headAt = this.nextAvail;
    let runStart = this.nextAvail, headFlags = 0;
    let runBytes: number[] = [];
    for (let i = 0; i < n; i++) {
      const d = new Uint8Array(16);
      const dv = new DataView(d.buffer);
      let flags = this.availFlags(this.availWrap);
      if (indirect) {
        flags |= VRING_DESC_F_INDIRECT;
        encodePackedDesc(dv, 0, this.indirect + id * 16 * this.indirectMax, 16 * bufs.length, id, flags);
      } else {
        const b = bufs[i]!;
        flags |= (b.write ? VRING_DESC_F_WRITE : 0) | (i < n - 1 ? VRING_DESC_F_NEXT : 0);
        encodePackedDesc(dv, 0, b.addr, b.len, id, flags);
      }
      if (i === 0) headFlags = flags;
      runBytes.push(...d);
      if (++this.nextAvail === this.size) {
        // The ring wraps: the rest of the chain goes at slot 0 with the other wrap counter.
        runs.push({ at: this.desc + 16 * runStart, bytes: Uint8Array.from(runBytes) });
        runBytes = [];
        runStart = 0;
        this.nextAvail = 0;
        this.availWrap ^= 1;
      }
    }
    if (runBytes.length) runs.push({ at: this.desc + 16 * runStart, bytes: Uint8Array.from(runBytes) });
    this.availCount += n;
    return { runs, headFlags, headAt };
  }

  async add(bufs: VirtqBuffer[], o: { indirect?: boolean } = {}): Promise<number> {
    if (bufs.length === 0) throw new VirtioPciError(`queue ${this.index}: empty chain`);
    const indirect = o.indirect ?? false;
    if (indirect && bufs.length > this.indirectMax) {
      throw new VirtioPciError(`queue ${this.index}: ${bufs.length} buffers, indirect tables hold ${this.indirectMax}`);
    }
    const n = indirect ? 1 : bufs.length;
    if (this.freeIds.length === 0 || this.slotsInFlight + n > this.size) throw new VirtioPciError(`queue ${this.index}: ring full`);
    const id = this.freeIds.pop()!;
    if (indirect) {
      // §2.8.19: an indirect table holds packed descriptors in order; only WRITE counts in their flags.
      const t = new Uint8Array(16 * bufs.length);
      const dv = new DataView(t.buffer);
      bufs.forEach((b, i) => encodePackedDesc(dv, 16 * i, b.addr, b.len, 0, b.write ? VRING_DESC_F_WRITE : 0));
      await this.qt.memwrite(this.indirect + id * 16 * this.indirectMax, t);
    }
    const { runs, headFlags, headAt } = this.layChain(id, bufs, indirect);
    // Everything but the head's flags first, then those flags: the device sees a whole chain or none.
    const headAddr = this.desc + 16 * headAt;
    for (const r of runs) {
      if (r.at !== headAddr) {
        await this.qt.memwrite(r.at, r.bytes);
        continue;
      }
      await this.qt.memwrite(r.at, r.bytes.subarray(0, 14));
      if (r.bytes.length > 16) await this.qt.memwrite(r.at + 16, r.bytes.subarray(16));
    }
    await this.qt.writew(headAddr + 14, headFlags);
    this.slots.set(id, n);
    this.slotsInFlight += n;
    return id;
  }

  /** The device's event suppression area: [off_wrap, flags]. */
  async deviceEvent(): Promise<{ offWrap: number; flags: number }> {
    const v = await this.qt.readl(this.deviceArea);
    return { offWrap: v & 0xffff, flags: v >>> 16 };
  }
  /** The driver's event suppression area (flags ENABLE, DISABLE, or DESC with `offWrap` under EVENT_IDX). */
  async setDriverEvent(flags: number, offWrap = 0): Promise<void> {
    await this.qt.writel(this.driverArea, ((flags << 16) | (offWrap & 0xffff)) >>> 0);
  }

  async kick(o: { force?: boolean } = {}): Promise<boolean> {
    const added = this.availCount - this.kickedCount;
    this.kickedCount = this.availCount;
    if (!o.force) {
      const ev = await this.deviceEvent();
      let need: boolean;
      if (ev.flags === VRING_PACKED_EVENT_FLAG_DESC && this.eventIdx) {
        // As Linux's virtqueue_kick_prepare_packed: an offset from the other lap counts one ring earlier.
        let event = ev.offWrap & 0x7fff;
        if (ev.offWrap >>> 15 !== this.availWrap) event -= this.size;
        const now = this.nextAvail;
        need = needEvent(event & 0xffff, now, (now - added) & 0xffff);
      } else {
        need = ev.flags !== VRING_PACKED_EVENT_FLAG_DISABLE;
      }
      if (!need) {
        this.suppressed++;
        return false;
      }
    }
    await this.qt.writew(this.notifyAddr, this.index);
    this.kicks++;
    return true;
  }

  private isUsed(flags: number, wrap: number): boolean {
    const a = (flags & VRING_PACKED_DESC_F_AVAIL) !== 0, u = (flags & VRING_PACKED_DESC_F_USED) !== 0;
    return a === u && u === (wrap === 1);
  }

  /** Reads the used descriptors the device has written since the last call, frees their ids and returns them. */
  async reap(): Promise<UsedElem[]> {
    if (this.slots.size === 0) return [];
    const ring = await this.qt.memread(this.desc, 16 * this.size);
    let dv = new DataView(ring.buffer, ring.byteOffset, ring.byteLength);
    // Walk the snapshot for used flags; then read those descriptors again, since a snapshot may have
    // caught a descriptor's flags after the device stored them but its id and len from before.
    let pos = this.nextUsed, wrap = this.usedWrap, found = 0;
    const seen: number[] = [];
    while (found < this.slots.size && this.isUsed(dv.getUint16(16 * pos + 14, true), wrap)) {
      seen.push(pos);
      const id = dv.getUint16(16 * pos + 12, true);
      const n = this.slots.get(id) ?? 1;
      found++;
      pos += n;
      if (pos >= this.size) pos -= this.size, wrap ^= 1;
    }
    if (found === 0) return [];
    const again = await this.qt.memread(this.desc, 16 * this.size);
    dv = new DataView(again.buffer, again.byteOffset, again.byteLength);
    const out: UsedElem[] = [];
    for (const p of seen) {
      const id = dv.getUint16(16 * p + 12, true), len = dv.getUint32(16 * p + 8, true);
      const n = this.slots.get(id);
      if (n === undefined) throw new VirtioPciError(`queue ${this.index}: used id ${id} at slot ${p} is not a buffer in flight`);
      if (!this.isUsed(dv.getUint16(16 * p + 14, true), this.usedWrap)) {
        throw new VirtioPciError(`queue ${this.index}: used descriptor at slot ${p} changed under the driver`);
      }
      this.slots.delete(id);
      this.slotsInFlight -= n;
      this.freeIds.push(id);
      this.nextUsed += n;
      if (this.nextUsed >= this.size) this.nextUsed -= this.size, this.usedWrap ^= 1;
      this.done.set(id, len);
      out.push({ id, len });
    }
    return out;
  }

  async waitFor(id: number, timeoutMs = 5000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (let spins = 0; ; spins++) {
      const len = this.done.get(id);
      if (len !== undefined) {
        this.done.delete(id);
        return len;
      }
      if (Date.now() > deadline) {
        throw new VirtioPciError(
          `queue ${this.index}: buffer ${id} not used within ${timeoutMs} ms (next avail ${this.nextAvail}/${this.availWrap}, next used ${this.nextUsed}/${this.usedWrap}, ${this.slots.size} in flight)`,
        );
      }
      await this.reap();
      if (spins > 20 && !this.done.has(id)) await Bun.sleep(1);
    }
  }

  /**
   * `count` buffers of one fixed shape, a ring's worth per batch: each batch
   * is written with at most three qtest writes (its first head's flags last),
   * kicked, and complete when the used descriptor of every chain has
   * appeared, read in ring order. Cheap enough
   * for thousands of requests across many wraps. The device writes into the
   * same buffers every time (use FLUSH or GET_ID). Needs an idle queue;
   * returns the used descriptors of the last batch.
   */
  async flood(bufs: VirtqBuffer[], count: number, o: { indirect?: boolean; timeoutMs?: number } = {}): Promise<UsedElem[]> {
    if (this.slots.size) throw new VirtioPciError(`queue ${this.index}: flood needs an idle queue (${this.slots.size} in flight)`);
    const indirect = o.indirect ?? false;
    const per = indirect ? 1 : bufs.length;
    const chains = Math.min(Math.floor(this.size / per), this.freeIds.length);
    if (chains === 0) throw new VirtioPciError(`queue ${this.index}: a chain of ${per} does not fit a ring of ${this.size}`);
    if (indirect) {
      const t = new Uint8Array(16 * bufs.length);
      const dv = new DataView(t.buffer);
      bufs.forEach((b, i) => encodePackedDesc(dv, 16 * i, b.addr, b.len, 0, b.write ? VRING_DESC_F_WRITE : 0));
      for (let id = 0; id < chains; id++) await this.qt.memwrite(this.indirect + id * 16 * this.indirectMax, t);
    }
    let last: UsedElem[] = [];
    for (let done = 0; done < count;) {
      const n = Math.min(chains, count - done);
      const ring = new Uint8Array(16 * this.size);
      const dv = new DataView(ring.buffer);
      const start = this.nextAvail, startWrap = this.availWrap;
      let firstFlags = 0;
      for (let c = 0; c < n; c++) {
        for (let i = 0; i < per; i++) {
          let flags = this.availFlags(this.availWrap);
          if (indirect) {
            flags |= VRING_DESC_F_INDIRECT;
            encodePackedDesc(dv, 16 * this.nextAvail, this.indirect + c * 16 * this.indirectMax, 16 * bufs.length, c, flags);
          } else {
            const b = bufs[i]!;
            flags |= (b.write ? VRING_DESC_F_WRITE : 0) | (i < per - 1 ? VRING_DESC_F_NEXT : 0);
            encodePackedDesc(dv, 16 * this.nextAvail, b.addr, b.len, c, flags);
          }
          if (c === 0 && i === 0) firstFlags = flags;
          if (++this.nextAvail === this.size) this.nextAvail = 0, this.availWrap ^= 1;
        }
      }
      // The first head stays unavailable until the rest is written: the bits the slot has from the last
      // lap (used, other wrap) or from the memset (0) never read as available with this lap's counter.
      dv.setUint16(16 * start + 14, startWrap ? 0 : VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED, true);
      const total = n * per;
      const tail = Math.min(total, this.size - start);
      await this.qt.memwrite(this.desc + 16 * start, ring.subarray(16 * start, 16 * (start + tail)));
      if (total > tail) await this.qt.memwrite(this.desc, ring.subarray(0, 16 * (total - tail)));
      await this.qt.writew(this.desc + 16 * start + 14, firstFlags);
      this.availCount += total;
      await this.kick();
      // Every chain's used descriptor, in ring order as a driver must read them: a device may publish a batch
      // with its first descriptor's flags last (ours does), so seeing the last one used says nothing about the
      // first, and overwriting that slot before the device's flag store lands would lose the next batch.
      const deadline = Date.now() + (o.timeoutMs ?? 5000);
      for (let c = 0, p = start, w = startWrap; c < n; c++) {
        while (!this.isUsed(await this.qt.readw(this.desc + 16 * p + 14), w)) {
          if (Date.now() > deadline) {
            throw new VirtioPciError(`queue ${this.index}: flood stalled: slot ${p} not used (${done} done, batch of ${n})`);
          }
        }
        p += per;
        if (p >= this.size) p -= this.size, w ^= 1;
      }
      if (done + n >= count) {
        const raw = await this.qt.memread(this.desc, 16 * this.size);
        const rv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
        last = [];
        for (let c = 0, p = start; c < n; c++, p = (p + per) % this.size) {
          last.push({ id: rv.getUint16(16 * p + 12, true), len: rv.getUint32(16 * p + 8, true) });
        }
      }
      this.nextUsed = this.nextAvail;
      this.usedWrap = this.availWrap;
      done += n;
    }
    return last;
  }
}

/**
 * §2.7.10's vring_need_event: has moving an index from `oldIdx` to `newIdx` passed `event`?
 * @example needEvent(0, 1, 0) // true: the first entry after a fresh start
 */
export function needEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - event - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

function encodeDesc(addr: number, len: number, flags: number, next: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, addr % 2 ** 32, true);
  dv.setUint32(4, Math.floor(addr / 2 ** 32), true);
  dv.setUint32(8, len, true);
  dv.setUint16(12, flags, true);
  dv.setUint16(14, next, true);
  return b;
}

/** Descriptors for `bufs` at table positions `ids`, each linked to the next. */
function encodeChain(bufs: VirtqBuffer[], ids: number[]): Uint8Array {
  const t = new Uint8Array(16 * bufs.length);
  bufs.forEach((b, i) => {
    const last = i === bufs.length - 1;
    const flags = (b.write ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT);
    t.set(encodeDesc(b.addr, b.len, flags, last ? 0 : ids[i + 1]!), 16 * i);
  });
  return t;
}

// ---- virtio-blk requests (§5.2.6) ----

export const VIRTIO_BLK_T_IN = 0, VIRTIO_BLK_T_OUT = 1, VIRTIO_BLK_T_FLUSH = 4, VIRTIO_BLK_T_GET_ID = 8,
  VIRTIO_BLK_T_DISCARD = 11, VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_S_OK = 0, VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2;

export interface BlkRequest {
  type: number;
  sector?: number;
  /** Device-readable payload after the header (OUT data, discard/write-zeroes segments). */
  data?: Uint8Array;
  /** Device-writable payload length before the status byte (IN data, GET_ID's 20 bytes). */
  inLen?: number;
  /** Split the payload into this many descriptors (default 1). */
  pieces?: number;
  /** Put the chain in an indirect table. */
  indirect?: boolean;
}

export interface BlkResult {
  status: number;
  /** Used length reported by the device. */
  usedLen: number;
  /** The device-writable payload (without the status byte). */
  data: Uint8Array;
}

interface BlkPending {
  head: number;
  inAddr: number;
  inLen: number;
  statusAddr: number;
}

/** Splits `len` bytes at `addr` into `pieces` buffers whose lengths are multiples of 512 where possible. */
function split(addr: number, len: number, pieces: number, write: boolean): VirtqBuffer[] {
  if (pieces <= 1 || len === 0) return len ? [{ addr, len, write }] : [];
  const unit = len % (512 * pieces) === 0 ? len / pieces : Math.ceil(len / pieces);
  const out: VirtqBuffer[] = [];
  for (let off = 0; off < len; off += unit) out.push({ addr: addr + off, len: Math.min(unit, len - off), write });
  return out;
}

/**
 * virtio-blk requests over one queue: header, payload and status in guest
 * RAM from `ram` (released when nothing is in flight any more).
 */
export class BlkQueue<Q extends Virtqueue = SplitQueue> {
  private readonly pending = new Map<number, BlkPending>();
  private readonly base: number;

  constructor(readonly vq: Q, private readonly ram: GuestAlloc) {
    this.base = ram.mark();
  }

  /** Writes one request and makes it available; call `vq.kick()` then `complete`. */
  async submit(r: BlkRequest): Promise<number> {
    const data = r.data ?? new Uint8Array(0), inLen = r.inLen ?? 0, pieces = r.pieces ?? 1;
    const hdr = this.ram.alloc(16, 16);
    const h = new Uint8Array(16);
    const dv = new DataView(h.buffer);
    dv.setUint32(0, r.type, true);
    dv.setUint32(8, (r.sector ?? 0) % 2 ** 32, true);
    dv.setUint32(12, Math.floor((r.sector ?? 0) / 2 ** 32), true);
    await this.vq.qt.memwrite(hdr, h);
    const outAddr = data.length ? this.ram.alloc(data.length, 4096) : 0;
    if (data.length) await this.vq.qt.memwrite(outAddr, data);
    const inAddr = inLen ? this.ram.alloc(inLen, 4096) : 0;
    const statusAddr = this.ram.alloc(1, 1);
    // Poison the device-writable bytes so a device that skips them is caught.
    if (inLen) await this.vq.qt.memset(inAddr, inLen, 0xa5);
    await this.vq.qt.memset(statusAddr, 1, 0xff);
    const bufs: VirtqBuffer[] = [
      { addr: hdr, len: 16, write: false },
      ...split(outAddr, data.length, pieces, false),
      ...split(inAddr, inLen, pieces, true),
      { addr: statusAddr, len: 1, write: true },
    ];
    const head = await this.vq.add(bufs, { indirect: r.indirect });
    this.pending.set(head, { head, inAddr, inLen, statusAddr });
    return head;
  }

  async complete(head: number, timeoutMs = 5000): Promise<BlkResult> {
    const p = this.pending.get(head);
    if (!p) throw new VirtioPciError(`queue ${this.vq.index}: no request with head ${head}`);
    const usedLen = await this.vq.waitFor(head, timeoutMs);
    this.pending.delete(head);
    const status = (await this.vq.qt.memread(p.statusAddr, 1))[0]!;
    const data = await this.vq.qt.memread(p.inAddr, p.inLen);
    if (this.pending.size === 0) this.ram.release(this.base);
    return { status, usedLen, data };
  }

  /** submit + kick + complete. */
  async run(r: BlkRequest, timeoutMs = 5000): Promise<BlkResult> {
    const head = await this.submit(r);
    await this.vq.kick();
    return this.complete(head, timeoutMs);
  }

  async write(sector: number, data: Uint8Array, o: { pieces?: number; indirect?: boolean } = {}): Promise<BlkResult> {
    return this.run({ type: VIRTIO_BLK_T_OUT, sector, data, ...o });
  }
  async read(sector: number, len: number, o: { pieces?: number; indirect?: boolean } = {}): Promise<BlkResult> {
    return this.run({ type: VIRTIO_BLK_T_IN, sector, inLen: len, ...o });
  }
}

/** Encodes discard / write-zeroes segments (§5.2.6: sector u64, num_sectors u32, flags u32). */
export function blkSegments(segs: { sector: number; count: number; unmap?: boolean }[]): Uint8Array {
  const b = new Uint8Array(16 * segs.length);
  const dv = new DataView(b.buffer);
  segs.forEach((s, i) => {
    dv.setUint32(16 * i, s.sector % 2 ** 32, true);
    dv.setUint32(16 * i + 4, Math.floor(s.sector / 2 ** 32), true);
    dv.setUint32(16 * i + 8, s.count, true);
    dv.setUint32(16 * i + 12, s.unmap ? 1 : 0, true);
  });
  return b;
}

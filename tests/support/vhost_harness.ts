/**
 * A minimal vhost-user driver for device tests, on src/frontend: connects
 * to a device served in another process (the front-end blocks while it
 * waits for replies and used buffers), negotiates VERSION_1 and the
 * protocol features, maps 16 MiB of guest RAM, starts every queue, and
 * posts chains of readable bytes and writable buffers. A stopgap until the
 * test kit's driver (src/testing/driver.ts) takes its place.
 */
import { GuestRam, SplitDriver, VhostUserFrontend } from "../../src/frontend/index.ts";
import { bit, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1 } from "../../src/protocol/features.ts";

export interface Posted {
  head: number;
  writable: { gpa: number; len: number }[];
}

export interface Completion {
  head: number;
  len: number;
  /** The writable buffers' bytes, up to the used length. */
  data: Uint8Array;
}

export class VhostHarness {
  readonly ram = new GuestRam({ size: 16 << 20 });
  readonly vqs: SplitDriver[] = [];
  private readonly posted = new Map<string, Posted>();

  private constructor(readonly fe: VhostUserFrontend, readonly features: bigint, readonly protocolFeatures: bigint) {}

  /** Connects and starts `queues` queues of `size` entries. */
  static connect(socket: string, o: { queues: number; size?: number }): VhostHarness {
    const fe = VhostUserFrontend.connect(socket);
    try {
      const offered = fe.getFeatures();
      let proto = 0n;
      if (offered & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
        proto = fe.getProtocolFeatures() & (bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ));
        fe.setProtocolFeatures(proto);
      }
      fe.setOwner();
      const features = offered & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES));
      fe.setFeatures(features);
      const h = new VhostHarness(fe, features, proto);
      fe.setMemTable(h.ram.memRegions(), h.ram.fileOrder.map(() => h.ram.fd));
      for (let q = 0; q < o.queues; q++) {
        const vq = new SplitDriver(h.ram, { size: o.size ?? 16, index: q });
        h.vqs.push(vq);
        fe.setVringNum(q, vq.size);
        fe.setVringBase(q, vq.vringBase);
        fe.setVringAddr({ index: q, flags: 0, desc: h.ram.uva(vq.descGpa), used: h.ram.uva(vq.usedGpa), avail: h.ram.uva(vq.availGpa), log: 0 });
        fe.setVringCall(q, vq.callFd);
        fe.setVringKick(q, vq.kickFd);
        if (features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) fe.setVringEnable(q, true);
      }
      return h;
    } catch (e) {
      fe.close();
      throw e;
    }
  }

  /** Makes a chain available and kicks: readable buffers with these bytes, then writable buffers of these sizes. */
  post(queue: number, c: { readable?: Uint8Array[]; writable?: number[] }): number {
    const vq = this.vqs[queue]!;
    vq.begin();
    for (const bytes of c.readable ?? []) {
      const gpa = this.ram.alloc(bytes.length, 8);
      this.ram.write(gpa, bytes);
      vq.add(gpa, bytes.length, false);
    }
    const writable = (c.writable ?? []).map((len) => {
      const gpa = this.ram.alloc(len, 8);
      this.ram.fill(gpa, len, 0);
      vq.add(gpa, len, true);
      return { gpa, len };
    });
    const head = vq.commit();
    vq.kick(true);
    this.posted.set(`${queue}:${head}`, { head, writable });
    return head;
  }

  /** Waits (blocking, at most `timeoutMs` in all) for `n` used buffers of `queue`; fewer on timeout. */
  completions(queue: number, n: number, timeoutMs = 5000): Completion[] {
    const vq = this.vqs[queue]!;
    const out: Completion[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < n) {
      if (!vq.reap()) {
        const left = deadline - Date.now();
        if (left <= 0 || vq.wait(left) === "timeout") break;
        continue;
      }
      const p = this.posted.get(`${queue}:${vq.usedId}`)!;
      this.posted.delete(`${queue}:${vq.usedId}`);
      const data = new Uint8Array(vq.usedLen);
      let at = 0;
      for (const w of p.writable) {
        if (at >= data.length) break;
        const take = Math.min(w.len, data.length - at);
        this.ram.read(w.gpa, data.subarray(at, at + take));
        at += take;
      }
      out.push({ head: vq.usedId, len: vq.usedLen, data });
    }
    return out;
  }

  close(): void {
    for (const vq of this.vqs) vq.close();
    this.fe.close();
    this.ram.close();
  }
}

/**
 * In-band notifications (INBAND_NOTIFICATIONS): our front-end negotiates it
 * with BACKEND_REQ and REPLY_ACK, opens the back-end channel, restarts its
 * rings with the no-fd flag on SET_VRING_KICK and SET_VRING_CALL, then does
 * checksummed I/O on two queues where every kick is a VRING_KICK message and
 * every completion is noticed through BACKEND_VRING_CALL messages on the
 * back-end channel (never through the old call eventfds). On the main loop
 * and with an I/O thread; split and packed rings. qemu-storage-daemon does
 * not offer the feature, and QEMU 7.2 does not speak it, so our front-end is
 * the only peer here.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as sys from "../../ffi/sys.ts";
import { BackendReq } from "../../src/protocol/messages.ts";
import { bit, ProtocolFeature } from "../../src/protocol/features.ts";
import {
  BLK_DRIVER_PROTOCOL_FEATURES, BlkDriver, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
} from "../../src/frontend/index.ts";
import { backendKinds, bunvhostMainLoop, type Backend, type BackendKind } from "../support/backends.ts";
import { fillRandom, rng } from "../support/random.ts";

const bunvhost = backendKinds.find((k) => k.name === "bunvhost")!;
const skip = bunvhost.skipReason();
const INBAND = bit(ProtocolFeature.INBAND_NOTIFICATIONS);
const QUEUES = 2;
const now = () => performance.now();

/** Reaps until nothing is in flight on any queue, sleeping on the back-end channel; counts VRING_CALLs per queue. */
function drain(d: BlkDriver, calls: number[]): void {
  const deadline = now() + 10_000;
  const inFlight = () => { let n = 0; for (let q = 0; q < QUEUES; q++) n += d.inFlight(q); return n; };
  while (inFlight() > 0) {
    let reaped = 0;
    for (let q = 0; q < QUEUES; q++) reaped += d.poll(q);
    // A reap re-armed the driver's event index, so anything published after this re-check is notified.
    if (reaped > 0) continue;
    const m = d.fe.recvBackend(Math.max(1, deadline - now()));
    if (m === null) throw new Error(`no BACKEND_VRING_CALL within 10 s with ${inFlight()} requests in flight`);
    expect(m.request).toBe(BackendReq.VRING_CALL);
    expect(m.state!.index).toBeLessThan(QUEUES);
    expect(m.state!.num).toBe(0);
    calls[m.state!.index]!++;
  }
}

/** Takes whatever VRING_CALLs are still queued (coalesced late ones), without waiting long. */
function drainCalls(d: BlkDriver, calls: number[]): void {
  for (let m = d.fe.recvBackend(50); m !== null; m = d.fe.recvBackend(50)) calls[m.state!.index]!++;
}

const variants: { kind: BackendKind; where: string }[] = [
  { kind: bunvhostMainLoop, where: "main loop" },
  { kind: bunvhost, where: "--threads 1" },
];

for (const { kind, where } of variants) {
  for (const packed of [false, true]) {
    const label = `${where}, ${packed ? "packed" : "split"}`;
    describe.skipIf(skip !== null)(`INBAND_NOTIFICATIONS (${label})${skip ? ` [skipped: ${skip}]` : ""}`, () => {
      let be: Backend;
      beforeAll(async () => {
        be = await kind.start({ size: 16 << 20, queues: QUEUES });
      });
      afterAll(async () => {
        await be?.stop();
      });

      test("VRING_KICK messages drive the rings and BACKEND_VRING_CALL reports completions; checksummed I/O on 2 queues", () => {
        using d = BlkDriver.connect(be.socket, {
          queues: QUEUES, packed, queueSize: 64, depth: 16,
          protocolFeatures: BLK_DRIVER_PROTOCOL_FEATURES | INBAND | bit(ProtocolFeature.BACKEND_REQ),
        });
        expect(d.protocolFeatures & INBAND).toBe(INBAND);
        const fe = d.fe;
        fe.openBackendChannel();
        // Restart every ring at its position with the no-fd flag: in band from here on.
        for (let q = 0; q < QUEUES; q++) {
          const base = fe.getVringBase(q);
          fe.setVringBase(q, base);
          fe.setVringCall(q, null);
          fe.setVringKick(q, null);
        }
        // Acknowledged: the back-end dropped its copies of the call eventfds; forget any signal from before.
        for (const vq of d.vqs) sys.eventfdRead(vq.callFd);
        const calls = [0, 0];
        const next = rng(0x1b4d);

        // Nothing but a VRING_KICK wakes the ring: a published request waits until one comes.
        const data0 = fillRandom(new Uint8Array(4096), next);
        let done0 = -1;
        d.onComplete = (_slot, status) => { done0 = status; };
        d.enqueue(VIRTIO_BLK_T_OUT, 0, data0.length, { queue: 0 }, data0);
        d.publish(0);
        Bun.sleepSync(200);
        expect(d.poll(0)).toBe(0);
        fe.vringKick(0);
        drain(d, calls);
        expect(done0).toBe(VIRTIO_BLK_S_OK);

        // Rounds of writes then reads on both queues at once, every buffer checksummed.
        const ROUNDS = 20, PER_QUEUE = 12;
        let bad = 0, ios = 1;
        for (let r = 0; r < ROUNDS; r++) {
          const written = new Map<number, Uint8Array>();
          const statuses: number[] = [];
          d.onComplete = (_slot, status) => { statuses.push(status); };
          for (let q = 0; q < QUEUES; q++) {
            for (let i = 0; i < PER_QUEUE; i++) {
              const sector = 8 + (q * PER_QUEUE + i) * 64 + (r % 8) * 8;
              const len = 512 * (1 + (next() % 32));
              const buf = fillRandom(new Uint8Array(len), next);
              written.set(sector, buf);
              d.enqueue(VIRTIO_BLK_T_OUT, sector, len, { queue: q }, buf);
            }
            d.publish(q);
            fe.vringKick(q);
          }
          drain(d, calls);
          const readBack = new Map<number, Uint8Array>();
          const slotSector = new Map<number, number>();
          d.onComplete = (slot, status) => {
            statuses.push(status);
            const out = new Uint8Array(d.slotLength(slot));
            d.slotRead(slot, out);
            readBack.set(slotSector.get(slot)!, out);
          };
          let k = 0;
          for (const [sector, buf] of written) {
            const q = k++ % QUEUES;
            slotSector.set(d.enqueue(VIRTIO_BLK_T_IN, sector, buf.length, { queue: q }), sector);
            if (k % PER_QUEUE === 0) {
              d.publish(q);
              fe.vringKick(q);
            }
          }
          for (let q = 0; q < QUEUES; q++) {
            d.publish(q);
            fe.vringKick(q);
          }
          drain(d, calls);
          expect(statuses.filter((s) => s !== VIRTIO_BLK_S_OK)).toEqual([]);
          for (const [sector, buf] of written) if (Buffer.compare(readBack.get(sector)!, buf) !== 0) bad++;
          ios += statuses.length;
        }
        drainCalls(d, calls);
        expect(bad).toBe(0);
        expect(ios).toBe(1 + ROUNDS * QUEUES * PER_QUEUE * 2);
        // Both queues were notified in band, and never through the call eventfds set at start.
        expect(calls[0]).toBeGreaterThan(0);
        expect(calls[1]).toBeGreaterThan(0);
        for (const vq of d.vqs) expect(sys.eventfdRead(vq.callFd)).toBeNull();
        expect(be.stderr()).toMatch(/queue 1: kicks in band \(VRING_KICK\)/);
        expect(be.stderr()).toMatch(/queue 1: calls in band \(BACKEND_VRING_CALL\)/);
        console.log(`inband ${label}: ${ios} requests, ${calls[0]} + ${calls[1]} VRING_CALLs`);

        // After GET_VRING_BASE the ring is stopped; a VRING_KICK starts it again where it stopped.
        const base1 = fe.getVringBase(1);
        fe.setVringBase(1, base1);
        const data1 = fillRandom(new Uint8Array(8192), next);
        const got = new Uint8Array(data1.length);
        const st: number[] = [];
        d.onComplete = (slot, status) => { st.push(status); if (d.slotLength(slot) === got.length) d.slotRead(slot, got); };
        d.enqueue(VIRTIO_BLK_T_OUT, 4000, data1.length, { queue: 1 }, data1);
        d.publish(1);
        fe.vringKick(1);
        drain(d, calls);
        d.enqueue(VIRTIO_BLK_T_IN, 4000, got.length, { queue: 1 });
        d.publish(1);
        fe.vringKick(1);
        drain(d, calls);
        expect(st).toEqual([VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]);
        expect(Buffer.compare(got, data1)).toBe(0);
        expect(fe.alive()).toBe(true);
      }, 60_000);
    });
  }
}

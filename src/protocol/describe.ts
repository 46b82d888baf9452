/** One-line descriptions of messages for --trace and debug logs. */
import { backendRequestName, requestName, type Message } from "./messages.ts";

const hex = (n: number | bigint) => `0x${n.toString(16)}`;
/** struct vhost_iotlb_msg `type` (1-4) and `perm` (0-3), as the spec names them. */
const IOTLB_TYPES = ["?", "miss", "update", "invalidate", "access-fail"];
const IOTLB_PERMS = ["none", "ro", "wo", "rw"];

/**
 * A front-end request (or our reply to one), decoded, on one line.
 * @example describeMessage(m); // "GET_VRING_BASE flags=0x1 index=0 num=0"
 */
export function describeMessage(m: Message): string {
  return describe(requestName(m.request), m);
}

/** A back-end request (on the back-end channel), decoded, on one line. */
export function describeBackendMessage(m: Message): string {
  return describe(backendRequestName(m.request), m);
}

function describe(name: string, m: Message): string {
  const parts: string[] = [name, `flags=${hex(m.flags)}`];
  if (m.u64 !== undefined) parts.push(`u64=${hex(m.u64)}`);
  if (m.state) parts.push(`index=${m.state.index} num=${m.state.num}`);
  if (m.vring) parts.push(`index=${m.vring.index}${m.vring.noFd ? " nofd" : ""}`);
  if (m.addr) parts.push(`index=${m.addr.index} desc=${hex(m.addr.desc)} avail=${hex(m.addr.avail)} used=${hex(m.addr.used)} flags=${hex(m.addr.flags)}`);
  const reg = (r: { guestPhysAddr: number; memorySize: number; userAddr: number; mmapOffset: number }) =>
    `[gpa=${hex(r.guestPhysAddr)} size=${hex(r.memorySize)} uva=${hex(r.userAddr)} off=${hex(r.mmapOffset)}]`;
  if (m.regions) parts.push(`regions=${m.regions.map(reg).join("")}`);
  if (m.region) parts.push(`region=${reg(m.region)}`);
  if (m.config) parts.push(`config offset=${m.config.offset} size=${m.config.size} flags=${m.config.flags}`);
  if (m.inflight) parts.push(`inflight size=${m.inflight.mmapSize} queues=${m.inflight.numQueues} qsize=${m.inflight.queueSize}`);
  if (m.log) parts.push(`log size=${m.log.size} offset=${m.log.offset}`);
  if (m.iotlb) {
    const t = m.iotlb;
    parts.push(`iotlb type=${IOTLB_TYPES[t.type] ?? t.type} iova=${hex(t.iova)} size=${hex(t.size)} uaddr=${hex(t.uaddr)} perm=${IOTLB_PERMS[t.perm] ?? t.perm}`);
  }
  if (m.fds.length) parts.push(`fds=[${m.fds.join(",")}]`);
  return parts.join(" ");
}

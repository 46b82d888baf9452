/**
 * Sends the back-end's IOTLB requests (IOTLB_MSG MISS / ACCESS_FAIL) on the
 * back-end channel (SET_BACKEND_REQ_FD). Any thread may call it: each message
 * is one 44-byte sendmsg on a unix stream socket, which the kernel queues
 * whole, so threads never interleave bytes. No NEED_REPLY: the answer to a
 * miss is an UPDATE on the main channel, and the front-end's acknowledgement
 * would arrive on a socket nobody here reads. Device layer: the memory layer
 * only throws IotlbMiss / IotlbAccessError; the rings (vring.ts, through
 * VringHost.iotlbReport) decide to ask.
 */
import * as sys from "../../ffi/sys.ts";
import { encodeBackendMessage } from "../protocol/encode.ts";
import { BackendReq, HDR_SIZE, Size, type Message } from "../protocol/messages.ts";
import { describeBackendMessage } from "../protocol/describe.ts";

let buf: sys.MsgBuf | null = null;

/**
 * Sends one back-end IOTLB_MSG of `type` (1 miss, 4 access failure) for `iova` and `perm`.
 * Returns false when it could not be sent now (socket full or gone); the caller asks again later.
 * @example sendIotlbReport(backendFd, 1, 0x1000_0000, 1); // MISS, read access
 */
export function sendIotlbReport(fd: number, type: number, iova: number, perm: number, trace?: (line: string) => void): boolean {
  if (fd < 0) return false;
  const b = (buf ??= new sys.MsgBuf(HDR_SIZE + Size.IOTLB));
  const m: Message = { request: BackendReq.IOTLB_MSG, flags: 0, fds: [], iotlb: { iova, size: 0, uaddr: 0, perm, type } };
  const n = encodeBackendMessage(m, b.dataView);
  trace?.(`=> ${describeBackendMessage(m)}`);
  try {
    return b.send(fd, 0, n) === n;
  } catch {
    return false;
  }
}

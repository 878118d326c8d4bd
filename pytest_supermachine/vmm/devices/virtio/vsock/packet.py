"""The virtio-vsock wire format (virtio 1.x, section 5.10.6): header layout, codes, packet codec.

Everything here is pure data: no sockets, no queues, no state. The device
decodes what the guest puts in the tx queue with `VsockPacket.decode` and
encodes what the backend answers with `VsockPacket.header`; the numbers are
the ones Linux's ``virtio_vsock.h`` defines, so both guests (the microguest's
driver and Linux's ``virtio_transport``) read them unchanged.

``op`` and ``type`` stay plain ints on a `VsockPacket`: a guest may send any
value, and the backend must be able to hold (and answer with RST) codes this
module does not name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# struct virtio_vsock_hdr, 44 bytes, packed, little endian.
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
assert HDR_SIZE == 44

HOST_CID = 2
VSOCK_TYPE_STREAM = 1
VSOCK_TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {
    OP_REQUEST: "REQUEST",
    OP_RESPONSE: "RESPONSE",
    OP_RST: "RST",
    OP_SHUTDOWN: "SHUTDOWN",
    OP_RW: "RW",
    OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

#: SHUTDOWN flags: the sender will receive (RCV) / send (SEND) no more.
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

#: The one event the device puts in the event queue (struct virtio_vsock_event).
EVENT_TRANSPORT_RESET = 0

#: Largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_DATA = 64 * 1024

#: The credit counters (``buf_alloc``, ``fwd_cnt``) are le32 on the wire and wrap.
U32_MASK = 0xFFFFFFFF


@dataclass(slots=True)
class VsockPacket:
    """One vsock packet: the header fields (``len`` is ``len(data)``) and the payload."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    type: int = VSOCK_TYPE_STREAM
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    data: bytes = b""

    def header(self) -> bytes:
        """The 44-byte header; ``len`` is taken from `data`, the counters are wrapped to 32 bits."""
        return HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            len(self.data),
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & U32_MASK,
            self.fwd_cnt & U32_MASK,
        )

    def encode(self) -> bytes:
        return self.header() + self.data

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> tuple[VsockPacket, int]:
        """Parse a header (and the payload after it); returns (packet, header len field).

        The payload is ``raw[44:44+len]`` clipped to what `raw` holds; the
        caller compares the returned ``len`` with ``len(packet.data)``.
        Raises ValueError if `raw` is shorter than a header.
        """
        if len(raw) < HDR_SIZE:
            raise ValueError(f"{len(raw)} bytes cannot hold a {HDR_SIZE}-byte vsock header")
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt) = (
            HDR.unpack_from(raw)
        )
        data = bytes(raw[HDR_SIZE : HDR_SIZE + length])
        pkt = cls(src_cid, dst_cid, src_port, dst_port, op, type_, flags, buf_alloc, fwd_cnt, data)
        return pkt, length

    def __repr__(self) -> str:
        op = OP_NAMES.get(self.op, f"op{self.op}")
        return (
            f"VsockPacket({op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
            f"len={len(self.data)} flags={self.flags} buf_alloc={self.buf_alloc} "
            f"fwd_cnt={self.fwd_cnt})"
        )


__all__ = [
    "EVENT_TRANSPORT_RESET",
    "HDR",
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PKT_DATA",
    "OP_CREDIT_REQUEST",
    "OP_CREDIT_UPDATE",
    "OP_INVALID",
    "OP_NAMES",
    "OP_REQUEST",
    "OP_RESPONSE",
    "OP_RST",
    "OP_RW",
    "OP_SHUTDOWN",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "U32_MASK",
    "VSOCK_TYPE_SEQPACKET",
    "VSOCK_TYPE_STREAM",
    "VsockPacket",
]

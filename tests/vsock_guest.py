"""The guest's side of virtio-vsock, in Python, for tests: a driver plus a tiny socket layer.

`GuestVsock` plays what the microguest (and Linux's virtio_transport) does
against a `VirtioVsock` device over a bytearray guest memory, through the
real virtio-mmio transport (`tests.virtio_driver`): it keeps rx buffers
posted, sends packets on the tx queue, and runs the stream protocol
(REQUEST/RESPONSE, RW with credit, CREDIT_UPDATE/REQUEST, SHUTDOWN, RST) for
its connections. Everything is driven by hand (`pump`), single-threaded, so
tests can stop at any point and inspect or inject raw packets.

It is also the reference for the microguest's vsock driver: the packets it
sends are the ones a guest must send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from pytest_supermachine.vmm.devices.virtio.vsock import VirtioVsock, VsockMuxer
from pytest_supermachine.vmm.devices.virtio.vsock import packet as P
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

RX_BUF = 4096  # bytes per rx buffer, header included (like Linux)


@dataclass
class GuestConn:
    """One guest-side stream connection and its credit counters."""

    local_port: int
    host_port: int
    state: str = "connecting"  # connecting, established, closed
    buf_alloc: int = 64 * 1024  # guest receive buffer advertised to the host
    fwd_cnt: int = 0  # bytes the guest application consumed
    rx_cnt: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    inbox: bytearray = field(default_factory=bytearray)
    peer_shut: int = 0  # SHUTDOWN flags received from the host
    reset: bool = False  # got RST

    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class GuestVsock:
    """A guest vsock driver and socket layer over a fresh `VirtioVsock` device."""

    def __init__(
        self,
        guest_cid: int = 3,
        *,
        rx_buffers: int = 32,
        mem_size: int = 8 << 20,
        auto_credit: bool = True,
    ) -> None:
        self.cid = guest_cid
        self.mem = GuestMemory.from_bytearray(bytearray(mem_size))
        self.muxer = VsockMuxer(guest_cid)
        self.device = VirtioVsock(guest_cid, backend=self.muxer)
        self.transport = VirtioMmioTransport(self.device, self.mem)
        self.driver = VirtioMmioDriver(self.transport, self.mem)
        self.driver.init()
        self.rxq = self.driver.setup_queue(0, 64)
        self.txq = self.driver.setup_queue(1, 64)
        self.evq = self.driver.setup_queue(2, 16)
        self.driver.driver_ok()
        self.auto_credit = auto_credit
        self.listening: set[int] = set()
        self.conns: dict[tuple[int, int], GuestConn] = {}  # (local port, host port)
        self.accepted: list[GuestConn] = []
        self.received: list[P.VsockPacket] = []  # every packet, for protocol-level tests
        self.events: list[int] = []
        self._next_port = 1024
        self._rx_bufs: dict[int, int] = {}
        for i in range(rx_buffers):
            gpa = self.driver.alloc.alloc(RX_BUF)
            self._rx_bufs[i] = gpa
            self.rxq.write_desc(i, gpa, RX_BUF, VIRTQ_DESC_F_WRITE)
            self.rxq.publish(i)
        self.rxq.free = [i for i in self.rxq.free if i not in self._rx_bufs]
        self._ev_gpa = self.driver.alloc.alloc(4)
        self.evq.write_desc(0, self._ev_gpa, 4, VIRTQ_DESC_F_WRITE)
        self.evq.publish(0)
        self.evq.free = [i for i in self.evq.free if i != 0]
        self._heap = self.driver.alloc.checkpoint()
        self.rxq.kick()

    def close(self) -> None:
        """Release the device's host resources (epoll fd, sockets)."""
        self.device.close()

    # -- raw packets -------------------------------------------------------------------
    def send_raw(self, readable: list[bytes]) -> None:
        """Put one tx chain of these readable buffers and kick (hostile tests shape it freely)."""
        self.txq.submit(readable, [])
        self.txq.kick()
        self.txq.used()
        self.driver.alloc.rewind(self._heap)

    def send_packet(self, pkt: P.VsockPacket) -> None:
        self.send_raw([pkt.encode()])

    def packet(self, conn: GuestConn, op: int, flags: int = 0, data: bytes = b"") -> P.VsockPacket:
        return P.VsockPacket(
            self.cid,
            P.HOST_CID,
            conn.local_port,
            conn.host_port,
            op,
            P.VSOCK_TYPE_STREAM,
            flags,
            conn.buf_alloc,
            conn.fwd_cnt & 0xFFFFFFFF,
            data,
        )

    def host_kicks(self) -> None:
        """What the VMM event thread does when the device's fd is readable."""
        self.device.service(self.transport)

    def take_rx(self) -> list[P.VsockPacket]:
        """Packets the device put in the rx ring since last time; their buffers are re-posted."""
        pkts = []
        events = 0
        for head, _ in self.evq.used():  # events first, as real drivers order them
            self.events.append(self.mem.read_u32(self._ev_gpa))
            self.evq.publish(head)
            events += 1
        if events:  # re-posting the buffer is how a driver says it handled the event
            self.evq.kick()
        for head, length in self.rxq.used():
            raw = self.mem.read(self._rx_bufs[head], length)
            pkts.append(P.VsockPacket.decode(raw)[0])
            self.rxq.publish(head)
        if pkts:
            self.rxq.kick()
        self.received.extend(pkts)
        return pkts

    # -- the stream protocol --------------------------------------------------------------
    def listen(self, port: int) -> None:
        self.listening.add(port)

    def connect(self, host_port: int) -> GuestConn:
        conn = GuestConn(self._next_port, host_port)
        self._next_port += 1
        self.conns[(conn.local_port, host_port)] = conn
        self.send_packet(self.packet(conn, P.OP_REQUEST))
        return conn

    def send(self, conn: GuestConn, data: bytes) -> int:
        """Send as much of `data` as host credit allows (in ≤ 4 KiB packets); returns bytes sent."""
        sent = 0
        while sent < len(data) and conn.peer_credit() > 0 and conn.state == "established":
            n = min(len(data) - sent, conn.peer_credit(), 4096)
            self.send_packet(self.packet(conn, P.OP_RW, 0, data[sent : sent + n]))
            conn.tx_cnt += n
            sent += n
        return sent

    def recv(self, conn: GuestConn) -> bytes:
        """Consume the inbox (the application read it): fwd_cnt grows, credit is returned."""
        data = bytes(conn.inbox)
        conn.inbox.clear()
        conn.fwd_cnt += len(data)
        if data and self.auto_credit and conn.state == "established":
            self.send_packet(self.packet(conn, P.OP_CREDIT_UPDATE))
        return data

    def shutdown(self, conn: GuestConn, flags: int = P.SHUTDOWN_RCV | P.SHUTDOWN_SEND) -> None:
        self.send_packet(self.packet(conn, P.OP_SHUTDOWN, flags))

    def rst(self, conn: GuestConn) -> None:
        self.send_packet(self.packet(conn, P.OP_RST))
        conn.state = "closed"
        self.conns.pop((conn.local_port, conn.host_port), None)

    def pump(self, rounds: int = 50) -> int:
        """Run the host side and handle rx until nothing moves; returns packets handled."""
        total = 0
        for _ in range(rounds):
            self.host_kicks()
            pkts = self.take_rx()
            for pkt in pkts:
                self._handle(pkt)
            total += len(pkts)
            if not pkts:
                break
        return total

    def _handle(self, pkt: P.VsockPacket) -> None:
        if pkt.dst_cid != self.cid or pkt.src_cid != P.HOST_CID:
            return
        key = (pkt.dst_port, pkt.src_port)
        conn = self.conns.get(key)
        if conn is None:
            if pkt.op == P.OP_REQUEST and pkt.dst_port in self.listening:
                conn = GuestConn(pkt.dst_port, pkt.src_port, "established")
                conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
                self.conns[key] = conn
                self.accepted.append(conn)
                self.send_packet(self.packet(conn, P.OP_RESPONSE))
            elif pkt.op != P.OP_RST:
                self.send_packet(
                    P.VsockPacket(self.cid, P.HOST_CID, pkt.dst_port, pkt.src_port, P.OP_RST)
                )
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        if pkt.op == P.OP_RESPONSE and conn.state == "connecting":
            conn.state = "established"
        elif pkt.op == P.OP_RW:
            conn.rx_cnt += len(pkt.data)
            conn.inbox += pkt.data
        elif pkt.op == P.OP_CREDIT_REQUEST:
            self.send_packet(self.packet(conn, P.OP_CREDIT_UPDATE))
        elif pkt.op == P.OP_SHUTDOWN:
            conn.peer_shut |= pkt.flags
            if conn.peer_shut == P.SHUTDOWN_RCV | P.SHUTDOWN_SEND and not conn.inbox:
                self.rst(conn)  # what Linux does when the peer closes and nothing is unread
        elif pkt.op == P.OP_RST:
            conn.state = "closed"
            conn.reset = True
            self.conns.pop(key, None)

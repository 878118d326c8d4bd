"""A guest for the NIC tests: the virtio driver plus a tiny TCP/IP stack, no KVM.

`NetGuest` plays what a guest kernel does with a virtio-net card: it brings
the device up through the MMIO registers (`tests.virtio_driver`), keeps rx
buffers posted, transmits frames with a ``virtio_net_hdr_v1`` in front, and
answers the backend's ARP requests for its address. `TcpClient` is just
enough TCP (handshake, in-order data, ACKs, FIN/RST) to talk to real host
servers through libslirp, which checks every header and checksum it is sent.

Waiting is on the device's eventfd (what the VMM's event thread selects on),
bounded by a deadline: a condition, never a sleep.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.devices.virtio.net import SLIRP_ADDRESSING, VirtioNet
from pytest_supermachine.vmm.devices.virtio.net import packets as pk
from pytest_supermachine.vmm.devices.virtio.net.device import (
    MAX_FRAME_LEN,
    NET_HDR,
    NET_HDR_SIZE,
    RX_QUEUE,
    TX_QUEUE,
)
from pytest_supermachine.vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

GUEST_IP = SLIRP_ADDRESSING.guest
GATEWAY_IP = SLIRP_ADDRESSING.gateway
DNS_IP = SLIRP_ADDRESSING.dns
RX_BUFFER = NET_HDR_SIZE + MAX_FRAME_LEN
RX_BUFFERS = 64
TX_SLOTS = 64


class NetGuest:
    """The driver side of a `VirtioNet` behind its MMIO transport, plus ARP."""

    def __init__(self, device: VirtioNet, *, rx_buffer: int = RX_BUFFER) -> None:
        self.device = device
        self.mem = GuestMemory.from_bytearray(bytearray(4 << 20))
        self.transport = VirtioMmioTransport(device, self.mem)
        self.driver = VirtioMmioDriver(self.transport, self.mem)
        self.mac = device.mac
        self.gateway_mac: bytes | None = None
        self.inbox: list[bytes] = []
        self.driver.init()
        self.rxq = self.driver.setup_queue(RX_QUEUE)
        self.txq = self.driver.setup_queue(TX_QUEUE)
        self.driver.driver_ok()
        alloc = self.driver.alloc
        self._rx_gpa = [alloc.alloc(rx_buffer) for _ in range(RX_BUFFERS)]
        self._rx_len = rx_buffer
        self._tx_gpa = [alloc.alloc(NET_HDR_SIZE + MAX_FRAME_LEN + 64) for _ in range(TX_SLOTS)]
        self._tx_next = 0
        for i in range(RX_BUFFERS):
            self.post_rx(i)
        self.rxq.kick()

    # -- the driver -----------------------------------------------------------------------
    def post_rx(self, i: int) -> None:
        self.rxq.write_desc(i, self._rx_gpa[i], self._rx_len, VIRTQ_DESC_F_WRITE)
        self.rxq.publish(i)

    def transmit(self, frame: bytes, header: bytes | None = None) -> None:
        """One tx chain: `header` (default: an all-zero virtio_net_hdr_v1) then `frame`."""
        data = (NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) if header is None else header) + frame
        slot = self._tx_next % TX_SLOTS
        self._tx_next += 1
        self.mem.write(self._tx_gpa[slot], data)
        self.txq.write_desc(slot, self._tx_gpa[slot], max(len(data), 1))
        self.txq.publish(slot)
        self.txq.kick()
        self.txq.used()

    def _collect(self) -> None:
        for head, length in self.rxq.used():
            data = self.mem.read(self._rx_gpa[head], length)
            self.post_rx(head)
            frame = data[NET_HDR_SIZE:]
            if not self._answer_arp(frame):
                self.inbox.append(frame)
        self.rxq.kick()

    def _answer_arp(self, frame: bytes) -> bool:
        eth = pk.parse_ethernet(frame)
        req = pk.parse_arp(eth.payload) if eth and eth.ethertype == pk.ETHERTYPE_ARP else None
        if req is None or req.op != 1 or req.target_ip != GUEST_IP:
            return False
        reply = pk.arp(2, self.mac, GUEST_IP, req.sender_mac, req.sender_ip)
        self.transmit(pk.ethernet(req.sender_mac, self.mac, pk.ETHERTYPE_ARP, reply))
        return True

    def wait_for(self, match: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
        """The first received frame `match` accepts (removed from the inbox)."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            for i, frame in enumerate(self.inbox):
                if match(frame):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching frame within {timeout}s; inbox: {self.inbox!r}")
            if select.select([self.device.fileno()], [], [], left)[0]:
                self.device.service(self.transport)

    # -- IPv4 ----------------------------------------------------------------------------------
    def resolve_gateway(self) -> bytes:
        """ARP for the gateway; its MAC (also kept for later frames)."""
        request = pk.arp(1, self.mac, GUEST_IP, bytes(6), GATEWAY_IP)
        self.transmit(pk.ethernet(b"\xff" * 6, self.mac, pk.ETHERTYPE_ARP, request))
        frame = self.wait_for(lambda f: arp_reply_from(f, GATEWAY_IP) is not None)
        self.gateway_mac = arp_reply_from(frame, GATEWAY_IP).sender_mac  # type: ignore[union-attr]
        return self.gateway_mac

    def send_ip(self, packet: bytes) -> None:
        gateway = self.gateway_mac or self.resolve_gateway()
        self.transmit(pk.ethernet(gateway, self.mac, pk.ETHERTYPE_IPV4, packet))


def arp_reply_from(frame: bytes, ip: str) -> pk.ArpPacket | None:
    eth = pk.parse_ethernet(frame)
    if eth is None or eth.ethertype != pk.ETHERTYPE_ARP:
        return None
    reply = pk.parse_arp(eth.payload)
    return reply if reply is not None and reply.op == 2 and reply.sender_ip == ip else None


def ipv4_of(frame: bytes) -> pk.Ipv4Packet | None:
    eth = pk.parse_ethernet(frame)
    if eth is None or eth.ethertype != pk.ETHERTYPE_IPV4:
        return None
    return pk.parse_ipv4(eth.payload)


def tcp_of(frame: bytes) -> tuple[pk.Ipv4Packet, pk.TcpSegment] | None:
    ip = ipv4_of(frame)
    seg = pk.parse_tcp(ip) if ip is not None else None
    return (ip, seg) if seg is not None else None


class TcpClient:
    """One TCP connection from the guest (active or passive open), in-order data only."""

    def __init__(self, guest: NetGuest, local_port: int, remote_ip: str, remote_port: int) -> None:
        self.guest = guest
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.snd_nxt = 1000
        self.rcv_nxt = 0
        self.received = bytearray()
        self.fin = False

    def _segment(self, flags: int, payload: bytes = b"") -> None:
        self.guest.send_ip(
            pk.tcp(
                GUEST_IP,
                self.remote_ip,
                self.local_port,
                self.remote_port,
                seq=self.snd_nxt,
                ack=self.rcv_nxt,
                flags=flags,
                payload=payload,
            )
        )
        self.snd_nxt += len(payload) + (1 if flags & (pk.TCP_SYN | pk.TCP_FIN) else 0)

    def _mine(self, frame: bytes) -> bool:
        got = tcp_of(frame)
        if got is None:
            return False
        ip, seg = got
        return (ip.src, seg.src_port, seg.dst_port) == (
            self.remote_ip,
            self.remote_port,
            self.local_port,
        )

    def next_segment(self, timeout: float = 10.0) -> pk.TcpSegment:
        return tcp_of(self.guest.wait_for(self._mine, timeout))[1]  # type: ignore[index]

    def connect(self) -> pk.TcpSegment:
        """SYN; returns the answer (SYN-ACK, then ACKed here, or RST)."""
        self._segment(pk.TCP_SYN)
        answer = self.next_segment()
        if answer.flags & pk.TCP_SYN and answer.flags & pk.TCP_ACK:
            self.rcv_nxt = answer.seq + 1
            self._segment(pk.TCP_ACK)
        return answer

    def accept(self, syn: pk.TcpSegment) -> None:
        """Answer a SYN the network sent to a guest port (passive open)."""
        self.rcv_nxt = syn.seq + 1
        self._segment(pk.TCP_SYN | pk.TCP_ACK)
        self.next_ack()

    def next_ack(self) -> pk.TcpSegment:
        seg = self.next_segment()
        if seg.flags & pk.TCP_RST:
            raise ConnectionResetError("the network reset the connection")
        return seg

    def ack(self) -> None:
        """A bare ACK of everything received so far."""
        self._segment(pk.TCP_ACK)

    def send(self, data: bytes) -> None:
        self._segment(pk.TCP_ACK | pk.TCP_PSH, data)

    def read_until_fin(self, timeout: float = 10.0) -> bytes:
        """Collect data (ACKing it) until the remote FINs; then FIN back."""
        while not self.fin:
            seg = self.next_segment(timeout)
            if seg.flags & pk.TCP_RST:
                raise ConnectionResetError("the network reset the connection")
            if seg.seq == self.rcv_nxt and seg.payload:
                self.received += seg.payload
                self.rcv_nxt += len(seg.payload)
            if seg.flags & pk.TCP_FIN and seg.seq + len(seg.payload) == self.rcv_nxt:
                self.rcv_nxt += 1
                self.fin = True
            self._segment(pk.TCP_ACK)
        self._segment(pk.TCP_FIN | pk.TCP_ACK)
        return bytes(self.received)

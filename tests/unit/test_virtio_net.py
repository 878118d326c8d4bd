"""virtio-net with the libslirp backend and the egress allow-list. No KVM, loopback only.

The guest is `tests.net_guest`: the virtio driver plus a tiny TCP/IP stack
whose frames go through the MMIO registers, the rings, the device, the
egress filter and libslirp to real sockets on 127.0.0.1, and back.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import pytest

from pytest_supermachine.vmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pytest_supermachine.vmm.devices.virtio.mmio import REG_DEVICE_ID
from pytest_supermachine.vmm.devices.virtio.net import (
    VIRTIO_ID_NET,
    EgressFilter,
    EgressPolicy,
    SlirpBackend,
    VirtioNet,
    kernel_ip_argument,
)
from pytest_supermachine.vmm.devices.virtio.net import packets as pk
from pytest_supermachine.vmm.devices.virtio.net.device import (
    MAX_FRAME_LEN,
    NET_HDR,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
)
from tests.host_http import HOST_PAGE as PAGE
from tests.host_http import host_http_server
from tests.net_guest import (
    DNS_IP,
    GATEWAY_IP,
    GUEST_IP,
    NetGuest,
    TcpClient,
    arp_reply_from,
    ipv4_of,
    tcp_of,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def http_port() -> Iterator[int]:
    """An HTTP server on the host's loopback; its port."""
    with host_http_server() as port:
        yield port


class Nic:
    """A NIC with a running libslirp backend under `network`, its guest and its log."""

    def __init__(self, network: bool | list[str]) -> None:
        policy = EgressPolicy.from_setting(network)
        assert policy is not None
        self.log: list[str] = []
        self.backend = SlirpBackend()
        self.device = VirtioNet(self.backend, EgressFilter(policy), on_refusal=self.log.append)
        self.backend.start()
        self.guest = NetGuest(self.device)

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def nic_factory() -> Iterator:
    made: list[Nic] = []

    def make(network: bool | list[str]) -> Nic:
        made.append(Nic(network))
        return made[-1]

    yield make
    for nic in made:
        nic.close()


def http_get(guest: NetGuest, port: int, local_port: int = 40000) -> bytes:
    conn = TcpClient(guest, local_port, GATEWAY_IP, port)
    answer = conn.connect()
    assert answer.flags & pk.TCP_SYN and answer.flags & pk.TCP_ACK, answer
    conn.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    return conn.read_until_fin()


# ------------------------------------------------------------------------------ the device


def test_the_device_is_a_network_card_with_a_mac_and_link_up(nic_factory) -> None:
    nic = nic_factory(True)
    drv = nic.guest.driver
    assert drv.read32(REG_DEVICE_ID) == VIRTIO_ID_NET == 1
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS):
        assert drv.has_feature(bit)
    mac, status = struct.unpack("<6sH", drv.read_config(0, 8))
    assert mac == pk.mac_bytes("52:54:00:12:34:56")
    assert status == VIRTIO_NET_S_LINK_UP


def test_the_kernel_is_told_the_slirp_addressing() -> None:
    assert kernel_ip_argument() == "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"


def test_arp_for_the_gateway_is_answered_by_the_backend(nic_factory) -> None:
    nic = nic_factory(True)
    assert nic.guest.resolve_gateway() == bytes.fromhex("52550a000202")


# ------------------------------------------------------------------------------ egress


def test_an_allowed_host_server_is_reached_and_data_flows(nic_factory, http_port) -> None:
    nic = nic_factory([f"127.0.0.1:{http_port}"])
    response = http_get(nic.guest, http_port)
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(PAGE)
    assert nic.log == []


def test_allow_all_reaches_any_host_server(nic_factory, http_port) -> None:
    nic = nic_factory(True)
    assert http_get(nic.guest, http_port).endswith(PAGE)


def test_a_server_not_in_the_allow_list_is_refused_with_rst_and_a_log_line(
    nic_factory, http_port
) -> None:
    nic = nic_factory(["192.0.2.1:80"])
    nic.guest.resolve_gateway()
    sent_before = nic.backend.frames_from_guest
    conn = TcpClient(nic.guest, 40001, GATEWAY_IP, http_port)
    answer = conn.connect()
    assert answer.flags & pk.TCP_RST and answer.flags & pk.TCP_ACK
    assert answer.ack == 1001  # the SYN's sequence number (1000) plus one
    assert nic.backend.frames_from_guest == sent_before  # the SYN never left the device
    assert len(nic.log) == 1
    assert f"refused TCP connection to 10.0.2.2 (the host's 127.0.0.1):{http_port}" in nic.log[0]


def test_a_hostname_rule_allows_the_addresses_it_resolves_to(nic_factory, http_port) -> None:
    nic = nic_factory([f"localhost:{http_port}"])
    assert http_get(nic.guest, http_port).endswith(PAGE)


def test_a_cidr_rule_allows_the_addresses_inside_it(nic_factory, http_port) -> None:
    nic = nic_factory([f"127.0.0.0/8:{http_port}"])
    assert http_get(nic.guest, http_port).endswith(PAGE)


def test_udp_not_in_the_allow_list_is_answered_port_unreachable(nic_factory) -> None:
    nic = nic_factory(["127.0.0.1:1"])
    nic.guest.send_ip(pk.udp(GUEST_IP, GATEWAY_IP, 5555, 9999, b"ping"))
    frame = nic.guest.wait_for(
        lambda f: (ip := ipv4_of(f)) is not None and ip.proto == pk.IPPROTO_ICMP
    )
    icmp = ipv4_of(frame).payload  # type: ignore[union-attr]
    assert (icmp[0], icmp[1]) == (pk.ICMP_DEST_UNREACH, pk.ICMP_PORT_UNREACH)
    assert pk.checksum(icmp) == 0
    quoted = pk.parse_ipv4(icmp[8:] + bytes(64))
    assert quoted is not None and (quoted.src, quoted.dst) == (GUEST_IP, GATEWAY_IP)
    assert "refused UDP datagram" in nic.log[0]


def _dns(nic, name: str) -> tuple[int, list[str]]:
    nic.guest.send_ip(pk.udp(GUEST_IP, DNS_IP, 5353, 53, pk.dns_query(0x1234, name)))
    frame = nic.guest.wait_for(lambda f: (ip := ipv4_of(f)) is not None and ip.src == DNS_IP)
    answer = pk.parse_udp(ipv4_of(frame)).payload  # type: ignore[arg-type, union-attr]
    ident, flags, _, ancount, _, _ = struct.unpack_from("!HHHHHH", answer)
    assert ident == 0x1234 and flags & 0x8000
    addresses = [
        socket.inet_ntoa(answer[-4 - 16 * i : len(answer) - 16 * i]) for i in range(ancount)
    ][::-1]
    return flags & 0xF, addresses


def test_dns_answers_allowed_names_with_the_guest_view_of_their_addresses(nic_factory) -> None:
    nic = nic_factory(["localhost:5432"])
    assert _dns(nic, "localhost") == (0, [GATEWAY_IP])  # the host's loopback, as the guest sees it


def test_dns_refuses_names_not_in_the_allow_list(nic_factory) -> None:
    nic = nic_factory(["localhost:5432"])
    assert _dns(nic, "example.com") == (pk.DNS_RCODE_NXDOMAIN, [])
    assert "refused DNS lookup of 'example.com'" in nic.log[0]


def test_refusal_lines_stop_at_a_limit_and_refusals_are_still_counted(nic_factory) -> None:
    nic = nic_factory([])
    nic.device.max_logged_refusals = 3
    for port in range(1, 6):
        TcpClient(nic.guest, 40000 + port, GATEWAY_IP, port).connect()
    assert nic.device.refused == 5
    assert len(nic.log) == 4
    assert nic.log[-1] == "network: further refusals are counted, not logged"


def test_the_hermetic_default_asks_for_no_nic_at_all() -> None:
    assert EgressPolicy.from_setting(False) is None


# ------------------------------------------------------------------------------ exposed ports


def test_an_exposed_port_reaches_a_guest_listener(nic_factory) -> None:
    nic = nic_factory([])  # an allow-list that allows no egress: inbound still works
    host, port = nic.backend.expose(8080)
    assert host == "127.0.0.1"
    with socket.create_connection((host, port), timeout=10) as client:
        ip, syn = tcp_of(nic.guest.wait_for(is_syn_to(8080)))  # type: ignore[misc]
        assert ip.dst == GUEST_IP
        server = TcpClient(nic.guest, 8080, ip.src, syn.src_port)
        server.accept(syn)
        server.send(b"hello from the guest")
        client.settimeout(10)
        assert client.recv(100) == b"hello from the guest"
    assert nic.log == []


def is_syn_to(port: int):
    def match(frame: bytes) -> bool:
        got = tcp_of(frame)
        return got is not None and got[1].dst_port == port and got[1].flags == pk.TCP_SYN

    return match


# ------------------------------------------------------------------------------ snapshots


def test_restore_resets_open_connections_and_keeps_exposed_ports(nic_factory, http_port) -> None:
    nic = nic_factory(True)
    host, port = nic.backend.expose(8080)
    conn = TcpClient(nic.guest, 40002, GATEWAY_IP, http_port)
    assert conn.connect().flags & pk.TCP_ACK
    assert nic.device.flows() == [(GUEST_IP, 40002, GATEWAY_IP, http_port)]
    snapshot = json.loads(json.dumps(nic.guest.transport.state()))  # what a snapshot keeps
    nic.guest.transport.restore_state(snapshot)
    nic.device.reset_connections()
    # The stray segment the device injects makes the guest answer (a duplicate ACK)...
    assert conn.next_segment().flags == pk.TCP_ACK
    conn.ack()
    # ...which the fresh backend, knowing no such connection, answers with an RST.
    assert conn.next_segment().flags & pk.TCP_RST
    assert nic.device.flows() == []
    with socket.create_connection((host, port), timeout=10):
        nic.guest.wait_for(is_syn_to(8080))


def test_state_keeps_the_mac_and_the_open_flows(nic_factory, http_port) -> None:
    nic = nic_factory(True)
    TcpClient(nic.guest, 40003, GATEWAY_IP, http_port).connect()
    state = json.loads(json.dumps(nic.device.state()))
    other = VirtioNet(SlirpBackend(), nic.device.egress, mac="52:54:00:00:00:01")
    try:
        other.restore_state(state)
        assert other.flows() == [(GUEST_IP, 40003, GATEWAY_IP, http_port)]
        assert other.mac == nic.device.mac
        assert other.acked_features == nic.device.acked_features
    finally:
        other.close()


# ------------------------------------------------------------------------------ bad frames


def test_a_frame_split_across_descriptors_is_sent_whole(nic_factory) -> None:
    nic = nic_factory(True)
    guest = nic.guest
    request = pk.arp(1, guest.mac, GUEST_IP, bytes(6), GATEWAY_IP)
    frame = pk.ethernet(b"\xff" * 6, guest.mac, pk.ETHERTYPE_ARP, request)
    guest.txq.submit([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), frame[:6], frame[6:]], [])
    guest.txq.kick()
    assert guest.wait_for(lambda f: arp_reply_from(f, GATEWAY_IP) is not None)


def test_a_frame_with_offload_flags_is_dropped(nic_factory) -> None:
    nic = nic_factory(True)
    frame = pk.ethernet(b"\xff" * 6, nic.guest.mac, pk.ETHERTYPE_ARP, bytes(28))
    nic.guest.transmit(frame, header=NET_HDR.pack(1, 0, 0, 0, 0, 0, 0))
    assert nic.device.tx_dropped == 1
    assert nic.backend.frames_from_guest == 0


def test_truncated_and_oversized_frames_are_dropped(nic_factory) -> None:
    nic = nic_factory(True)
    nic.guest.transmit(b"\x00" * 13)
    nic.guest.transmit(b"\x00" * (MAX_FRAME_LEN + 1))
    assert nic.device.tx_dropped == 2
    assert nic.backend.frames_from_guest == 0
    assert not nic.guest.transport.needs_reset


def test_frames_wait_for_rx_buffers_in_a_bounded_backlog(nic_factory) -> None:
    nic = nic_factory(True)
    device = nic.device
    device.rx_backlog = 4
    for i in range(10):
        device.receive(bytes([i]) * 60)  # more than the backlog, faster than anyone drains it
    assert device.pending_rx() == 4
    assert device.rx_dropped == 6


def test_a_frame_larger_than_the_posted_buffer_is_dropped(nic_factory) -> None:
    nic = nic_factory(True)
    small = NetGuest(VirtioNet(SlirpBackend(), nic.device.egress), rx_buffer=100)
    try:
        small.device.receive(bytes(200))
        small.device.receive(bytes(60))
        assert len(small.wait_for(lambda f: True)) == 60
        assert small.device.rx_dropped == 1
    finally:
        small.device.close()

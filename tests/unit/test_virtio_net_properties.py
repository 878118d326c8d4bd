"""Hostile frames on the NIC's queues: dropped or refused, counted, never a host exception. No KVM.

Every frame the guest transmits ends up in exactly one of three places —
dropped by the device (`tx_dropped`), kept back by the egress filter
(`filtered`) or handed to libslirp (`tx_frames`) — and the device never
needs a reset for anything a frame contains.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.devices.virtio.net import (
    EgressFilter,
    EgressPolicy,
    SlirpBackend,
    VirtioNet,
)
from pytest_supermachine.vmm.devices.virtio.net import packets as pk
from pytest_supermachine.vmm.devices.virtio.net.device import MAX_FRAME_LEN, NET_HDR, NET_HDR_SIZE
from pytest_supermachine.vmm.devices.virtio.net.policy import tcp_without_syn
from tests.net_guest import DNS_IP, GATEWAY_IP, GUEST_IP, NetGuest

pytestmark = pytest.mark.unit

FAST = settings(
    max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

GUEST_MAC = pk.mac_bytes("52:54:00:12:34:56")
GATEWAY_MAC = pk.mac_bytes("52:55:0a:00:02:02")


def _eth(packet: bytes) -> bytes:
    return pk.ethernet(GATEWAY_MAC, GUEST_MAC, pk.ETHERTYPE_IPV4, packet)


#: Well-formed frames of every kind the filter reads, to be mutated.
SEEDS = [
    _eth(pk.tcp(GUEST_IP, GATEWAY_IP, 40000, 80, seq=1, flags=pk.TCP_SYN)),
    _eth(pk.tcp(GUEST_IP, "192.0.2.1", 40000, 443, seq=1, flags=pk.TCP_SYN, payload=b"x" * 40)),
    _eth(pk.udp(GUEST_IP, "192.0.2.1", 5000, 9, b"datagram")),
    _eth(pk.udp(GUEST_IP, DNS_IP, 5353, 53, pk.dns_query(1, "localhost"))),
    _eth(pk.udp(GUEST_IP, DNS_IP, 5353, 53, pk.dns_query(2, "example.com"))),
    _eth(pk.icmp(GUEST_IP, GATEWAY_IP, pk.ICMP_ECHO_REQUEST, 0, b"\0\1\0\1")),
    pk.ethernet(
        b"\xff" * 6,
        GUEST_MAC,
        pk.ETHERTYPE_ARP,
        pk.arp(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY_IP),
    ),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[: draw(st.integers(0, len(frame)))])


frames = st.one_of(mutated(), st.binary(max_size=MAX_FRAME_LEN + 64))
headers = st.one_of(
    st.just(NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)),
    st.binary(min_size=0, max_size=NET_HDR_SIZE).map(lambda b: b.ljust(NET_HDR_SIZE, b"\0")),
    st.binary(max_size=NET_HDR_SIZE - 1),  # a header cut short (the frame slides into it)
)


@pytest.fixture(scope="module", params=["allow-list", "allow-all"])
def guest(request: pytest.FixtureRequest) -> Iterator[NetGuest]:
    setting = ["localhost:80", "10.0.0.0/8:*"] if request.param == "allow-list" else True
    backend = SlirpBackend()
    device = VirtioNet(backend, EgressFilter(EgressPolicy.from_setting(setting)))  # type: ignore[arg-type]
    backend.start()
    guest = NetGuest(device)
    yield guest
    device.close()


@FAST
@given(frame=frames, header=headers)
def test_any_transmitted_frame_is_dropped_filtered_or_sent(
    guest: NetGuest, frame: bytes, header: bytes
) -> None:
    dev = guest.device
    before = dev.tx_dropped + dev.filtered + dev.tx_frames
    guest.transmit(frame, header=header)
    assert dev.tx_dropped + dev.filtered + dev.tx_frames == before + 1
    assert not guest.transport.needs_reset


@FAST
@given(frame=frames)
def test_the_filter_answers_any_frame_with_a_verdict_and_well_formed_replies(frame: bytes) -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["localhost:80"]))  # type: ignore[arg-type]
    verdict = egress.check(frame)
    if verdict.reply is not None:
        eth = pk.parse_ethernet(verdict.reply)
        assert eth is not None and eth.dst == frame[6:12]
        ip = pk.parse_ipv4(eth.payload)
        assert ip is not None and pk.checksum(ip.raw[: ip.header_len]) == 0


@FAST
@given(sizes=st.lists(st.integers(0, 4 * MAX_FRAME_LEN), max_size=20))
def test_frames_from_the_network_of_any_size_are_delivered_or_dropped(
    guest: NetGuest, sizes: list[int]
) -> None:
    dev = guest.device
    before = dev.rx_frames + dev.rx_dropped
    for n in sizes:
        dev.receive(bytes(n))
    guest.device.service(guest.transport)
    guest._collect()
    assert dev.rx_frames + dev.rx_dropped >= before + len(sizes)
    assert not guest.transport.needs_reset


@FAST
@given(frame=frames)
def test_the_filters_fast_path_passes_only_unfragmentedtcp_without_syn(frame: bytes) -> None:
    if not tcp_without_syn(frame):
        return
    eth = pk.parse_ethernet(frame)
    assert eth is not None and eth.ethertype == pk.ETHERTYPE_IPV4
    ip = pk.parse_ipv4(eth.payload)
    assert ip is not None and not ip.fragment
    seg = pk.parse_tcp(ip)
    assert seg is None or not seg.flags & pk.TCP_SYN

"""The network= setting: parsing and validation, and what an allow-list lets through. No KVM."""

from __future__ import annotations

import ipaddress

import pytest

from pytest_supermachine.vmm.devices.virtio.net import EgressFilter, EgressPolicy, EgressPolicyError
from pytest_supermachine.vmm.devices.virtio.net import packets as pk
from tests.net_guest import DNS_IP, GATEWAY_IP, GUEST_IP

pytestmark = pytest.mark.unit

GUEST_MAC = pk.mac_bytes("52:54:00:12:34:56")
GATEWAY_MAC = pk.mac_bytes("52:55:0a:00:02:02")


def test_false_means_no_nic_and_true_means_anything() -> None:
    assert EgressPolicy.from_setting(False) is None
    assert EgressPolicy.from_setting(True) == EgressPolicy(allow_all=True)


def test_an_allow_list_parses_addresses_networks_hostnames_and_any_port() -> None:
    policy = EgressPolicy.from_setting(["127.0.0.1:5432", "10.1.0.0/16:443", "DB.Example.test.:*"])
    assert policy is not None and not policy.allow_all
    addr, net, name = policy.rules
    assert (addr.network, addr.port) == (ipaddress.IPv4Network("127.0.0.1/32"), 5432)
    assert (net.network, net.port) == (ipaddress.IPv4Network("10.1.0.0/16"), 443)
    assert (name.hostname, name.port) == ("db.example.test", None)


def test_an_empty_allow_list_is_a_nic_that_reaches_nothing() -> None:
    policy = EgressPolicy.from_setting([])
    assert policy is not None
    assert not EgressFilter(policy).allows(GATEWAY_IP, 80)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["127.0.0.1"], "is not 'host:port'"),
        ([":80"], "is not 'host:port'"),
        (["127.0.0.1:0"], "is not 1..65535"),
        (["127.0.0.1:65536"], "is not 1..65535"),
        (["127.0.0.1:http"], "is not 1..65535"),
        (["300.1.2.3:80"], "is not an IPv4 address or CIDR"),
        (["10.1.2.3/8:80"], "has host bits set"),
        (["bad_host!:80"], "is not a hostname"),
        ("127.0.0.1:80", "must be False, True or a list"),
        ([80], "'host:port' strings"),
    ],
)
def test_a_malformed_setting_is_refused_with_a_clear_error(setting: object, message: str) -> None:
    with pytest.raises(EgressPolicyError, match=message):
        EgressPolicy.from_setting(setting)  # type: ignore[arg-type]


def test_the_gateway_is_the_hosts_loopback_for_the_allow_list() -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["127.0.0.1:8080"]))  # type: ignore[arg-type]
    assert egress.allows(GATEWAY_IP, 8080)
    assert not egress.allows(GATEWAY_IP, 8081)
    assert not egress.allows("93.184.216.34", 8080)


def test_every_address_the_backend_maps_to_the_hosts_loopback_is_checked_as_loopback() -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["127.0.0.1:8080"]))  # type: ignore[arg-type]
    assert egress.allows("10.0.2.77", 8080)
    assert egress.allows("127.0.0.1", 8080)  # a crafted frame: the same host endpoint
    assert not egress.allows("10.0.2.77", 8081)


def test_the_dns_address_is_reached_only_through_the_filters_dns_answers() -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["10.0.0.0/8:*"]))  # type: ignore[arg-type]
    assert not egress.allows(DNS_IP, 53)
    assert not egress.allows(DNS_IP, 8080)


def test_a_hostname_rule_is_resolved_on_the_host_when_the_filter_is_built() -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["localhost:5432"]))  # type: ignore[arg-type]
    assert egress.names == {"localhost": [GATEWAY_IP]}
    assert egress.allows(GATEWAY_IP, 5432)


def _syn(dst: str, port: int) -> bytes:
    segment = pk.tcp(GUEST_IP, dst, 40000, port, seq=7, flags=pk.TCP_SYN)
    return pk.ethernet(GATEWAY_MAC, GUEST_MAC, pk.ETHERTYPE_IPV4, segment)


def test_a_refused_syn_is_answered_by_an_rst_from_its_destination() -> None:
    egress = EgressFilter(EgressPolicy.from_setting(["127.0.0.1:1"]))  # type: ignore[arg-type]
    verdict = egress.check(_syn("192.0.2.1", 443))
    assert not verdict.allowed and verdict.reply is not None
    eth = pk.parse_ethernet(verdict.reply)
    assert (eth.dst, eth.src) == (GUEST_MAC, GATEWAY_MAC)  # type: ignore[union-attr]
    ip = pk.parse_ipv4(eth.payload)  # type: ignore[union-attr]
    seg = pk.parse_tcp(ip)  # type: ignore[arg-type]
    assert (ip.src, ip.dst, seg.src_port, seg.dst_port) == ("192.0.2.1", GUEST_IP, 443, 40000)
    assert seg.flags == pk.TCP_RST | pk.TCP_ACK and seg.ack == 8
    assert (
        verdict.refusal
        == "network: refused TCP connection to 192.0.2.1:443 (not in the allow-list)"
    )


def test_allow_all_passes_every_frame_unread() -> None:
    egress = EgressFilter(EgressPolicy(allow_all=True))
    assert egress.check(_syn("192.0.2.1", 443)).allowed
    assert egress.check(b"not even ethernet").allowed


def test_fragments_and_foreign_icmp_are_dropped_with_a_log_line() -> None:
    egress = EgressFilter(EgressPolicy.from_setting([]))  # type: ignore[arg-type]
    fragment = bytearray(pk.udp(GUEST_IP, "192.0.2.1", 1, 2, b"x"))
    fragment[6] |= 0x20  # more fragments
    verdict = egress.check(pk.ethernet(GATEWAY_MAC, GUEST_MAC, pk.ETHERTYPE_IPV4, bytes(fragment)))
    assert not verdict.allowed and "fragment" in (verdict.refusal or "")
    ping = pk.icmp(GUEST_IP, "192.0.2.1", pk.ICMP_ECHO_REQUEST, 0, b"\0\1\0\1")
    verdict = egress.check(pk.ethernet(GATEWAY_MAC, GUEST_MAC, pk.ETHERTYPE_IPV4, ping))
    assert not verdict.allowed and "protocol 1" in (verdict.refusal or "")
    gateway_ping = pk.icmp(GUEST_IP, GATEWAY_IP, pk.ICMP_ECHO_REQUEST, 0, b"\0\1\0\1")
    assert egress.check(
        pk.ethernet(GATEWAY_MAC, GUEST_MAC, pk.ETHERTYPE_IPV4, gateway_ping)
    ).allowed

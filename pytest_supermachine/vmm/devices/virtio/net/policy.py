"""The guest's egress policy: which host endpoints its NIC may reach, enforced on the host.

A test says ``network=False`` (no NIC at all: hermetic, the default),
``network=True`` (egress to anything the host reaches) or an allow-list of
``host:port`` / ``cidr:port`` patterns (``port`` may be ``*``)::

    network=["127.0.0.1:5432", "10.1.0.0/16:443", "db.example.test:5432"]

`EgressPolicy.from_setting` parses and validates that value (clear errors,
nothing resolved yet); `EgressFilter` is the policy at work for one NIC:
hostnames are resolved on the host when it is built, then every frame the
guest sends is checked *before* it reaches the backend, in the device's tx
path, where the guest cannot change anything.

What is checked, and how a refusal looks to the guest (never silence: each
refusal is also one line through the ``on_refusal`` callback, the VM's log):

* a TCP segment with SYN to a destination not allowed: dropped, answered
  with a TCP RST from that destination (the guest's ``connect`` fails with
  ECONNREFUSED). Segments without SYN need no check: the backend has no
  connection for them and answers RST itself;
* a UDP datagram to a destination not allowed: dropped, answered with ICMP
  port unreachable (a connected UDP socket sees ECONNREFUSED);
* DNS (UDP to the backend's DNS address, port 53) is answered here: names
  in the allow-list get their host-resolved addresses (loopback addresses
  as the gateway, which the backend maps to the host's loopback), every
  other name (and an allowed one the host cannot resolve) NXDOMAIN. DNS over TCP is refused like any other TCP;
* ICMP to anything but the gateway and DNS addresses is dropped (ping
  sockets would otherwise reach the world), and logged;
* IP fragments are dropped and logged (a later fragment carries no port, and a tiny
  first fragment could hide one); the guest's stack never fragments TCP at
  MTU 1500 and sets DF;
* every other ethertype than IPv4 and ARP is dropped (the backend has IPv6
  disabled).

The backend maps the gateway address (in fact every address of the guest
network but the DNS one) to the host's loopback, so the rule
``127.0.0.1:8080`` is what allows the guest's connection to ``10.0.2.2:8080``;
the DNS address is reachable only through the DNS answers made here.
With ``network=True`` frames pass unchecked (DNS is then the backend's, which
forwards to the host's resolver).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import packets as pk
from .backend import SLIRP_ADDRESSING, GuestAddressing

DNS_PORT = 53


class EgressPolicyError(ValueError):
    """A ``network=`` setting that is not False, True or a list of ``host:port`` patterns."""


@dataclass(frozen=True)
class EgressRule:
    """One allow-list entry: a network (an address is a /32) or a hostname, and a port."""

    pattern: str
    network: ipaddress.IPv4Network | None
    hostname: str | None
    #: None: any port.
    port: int | None

    @classmethod
    def parse(cls, pattern: str) -> EgressRule:
        if not isinstance(pattern, str):
            raise EgressPolicyError(f"allow-list entries are 'host:port' strings, got {pattern!r}")
        host, sep, port_s = pattern.strip().rpartition(":")
        if not sep or not host:
            raise EgressPolicyError(
                f"allow-list entry {pattern!r} is not 'host:port' or 'cidr:port' (port may be *)"
            )
        if port_s == "*":
            port = None
        elif port_s.isdigit() and 1 <= int(port_s) <= 65535:
            port = int(port_s)
        else:
            raise EgressPolicyError(
                f"allow-list entry {pattern!r}: port {port_s!r} is not 1..65535 or *"
            )
        if host[0].isdigit() or "/" in host:
            try:
                network = ipaddress.IPv4Network(host, strict=True)
            except ValueError as e:
                raise EgressPolicyError(
                    f"allow-list entry {pattern!r}: {host!r} is not an IPv4 address or CIDR ({e})"
                ) from None
            return cls(pattern, network, None, port)
        name = host.rstrip(".").lower()
        labels = name.split(".")
        if len(name) > 253 or not all(
            0 < len(lab) <= 63 and lab.replace("-", "").isalnum() and lab.isascii()
            for lab in labels
        ):
            raise EgressPolicyError(f"allow-list entry {pattern!r}: {host!r} is not a hostname")
        return cls(pattern, None, name, port)


@dataclass(frozen=True)
class EgressPolicy:
    """A parsed ``network=`` setting that asks for a NIC (False asks for none)."""

    allow_all: bool
    rules: tuple[EgressRule, ...] = ()

    @classmethod
    def from_setting(cls, setting: bool | Sequence[str]) -> EgressPolicy | None:
        """None for ``False`` (no NIC), allow-all for ``True``, else the parsed allow-list."""
        if setting is False or setting is None:
            return None
        if setting is True:
            return cls(allow_all=True)
        if isinstance(setting, (str, bytes)) or not isinstance(setting, Sequence):
            raise EgressPolicyError(
                f"network= must be False, True or a list of 'host:port' patterns, got {setting!r}"
            )
        return cls(allow_all=False, rules=tuple(EgressRule.parse(p) for p in setting))


Resolver = Callable[[str], list[str]]


def resolve_ipv4(name: str) -> list[str]:
    """The host's IPv4 addresses for `name` (empty if it does not resolve)."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Verdict:
    """What to do with one guest frame: pass it on, or drop it (answering with `reply`)."""

    allowed: bool
    #: A frame for the guest instead (RST, ICMP unreachable, DNS answer), if any.
    reply: bytes | None = None
    #: One line for the VM's log when a connection is refused.
    refusal: str | None = None


_PASS = Verdict(True)
_DROP = Verdict(False)


class EgressFilter:
    """An `EgressPolicy` applied to one NIC's outgoing frames (see the module docstring)."""

    def __init__(
        self,
        policy: EgressPolicy,
        addressing: GuestAddressing = SLIRP_ADDRESSING,
        *,
        resolver: Resolver = resolve_ipv4,
    ) -> None:
        self.policy = policy
        self.addressing = addressing
        #: (network, port or None) pairs in host terms (the host's loopback, not the gateway).
        self._allowed: list[tuple[ipaddress.IPv4Network, int | None]] = []
        #: hostname -> addresses as the guest must see them (DNS answers).
        self.names: dict[str, list[str]] = {}
        for rule in policy.rules:
            if rule.network is not None:
                self._allowed.append((rule.network, rule.port))
                continue
            assert rule.hostname is not None
            addresses = resolver(rule.hostname)
            self.names.setdefault(rule.hostname, [])
            for a in addresses:
                self._allowed.append((ipaddress.IPv4Network(a), rule.port))
                guest_view = self._guest_address(a)
                if guest_view not in self.names[rule.hostname]:
                    self.names[rule.hostname].append(guest_view)

    def _guest_address(self, host_address: str) -> str:
        """How the guest reaches a host address: loopback is behind the gateway."""
        return (
            self.addressing.gateway
            if ipaddress.IPv4Address(host_address).is_loopback
            else host_address
        )

    def _host_address(self, guest_dst: str) -> ipaddress.IPv4Address | None:
        """The host endpoint the backend connects to for `guest_dst` (None: the host's
        DNS server, which only the DNS answers here may use). slirp maps every address
        of the guest network but the DNS one to the host's loopback."""
        address = ipaddress.IPv4Address(guest_dst)
        if guest_dst == self.addressing.dns:
            return None
        if address in self.addressing.network:
            return ipaddress.IPv4Address("127.0.0.1")
        return address

    def allows(self, guest_dst: str, port: int) -> bool:
        """May the guest open a connection to `guest_dst`:`port` (its view of the address)?"""
        if self.policy.allow_all:
            return True
        host = self._host_address(guest_dst)
        if host is None:
            return False
        return any(host in net and (p is None or p == port) for net, p in self._allowed)

    def check(self, frame: bytes) -> Verdict:
        """The verdict on one Ethernet frame from the guest. Never raises for any input."""
        if self.policy.allow_all or tcp_without_syn(frame):
            return _PASS
        eth = pk.parse_ethernet(frame)
        if eth is None:
            return _DROP
        if eth.ethertype == pk.ETHERTYPE_ARP:
            return _PASS
        if eth.ethertype != pk.ETHERTYPE_IPV4:
            return _DROP
        ip = pk.parse_ipv4(eth.payload)
        if ip is None:
            return _DROP
        if ip.fragment:
            return Verdict(
                False,
                None,
                f"network: dropped an IP fragment to {ip.dst} "
                "(fragments cannot be checked against the allow-list)",
            )
        if ip.proto == pk.IPPROTO_TCP:
            return self._check_tcp(eth, ip)
        if ip.proto == pk.IPPROTO_UDP:
            return self._check_udp(eth, ip)
        if ip.proto == pk.IPPROTO_ICMP and ip.dst in (self.addressing.gateway, self.addressing.dns):
            return _PASS
        return Verdict(
            False,
            None,
            f"network: dropped IP protocol {ip.proto} packet to {ip.dst} "
            "(only TCP and UDP can be allowed)",
        )

    def _check_tcp(self, eth: pk.EthernetFrame, ip: pk.Ipv4Packet) -> Verdict:
        seg = pk.parse_tcp(ip)
        if seg is None:
            return _DROP
        if not seg.flags & pk.TCP_SYN or seg.flags & pk.TCP_ACK:
            # Not a connection attempt (a SYN-ACK answers a forwarded port's connection).
            return _PASS
        if self.allows(ip.dst, seg.dst_port):
            return _PASS
        ack = seg.seq + 1 + len(seg.payload)
        rst = pk.tcp(
            ip.dst,
            ip.src,
            seg.dst_port,
            seg.src_port,
            seq=0,
            ack=ack,
            flags=pk.TCP_RST | pk.TCP_ACK,
            window=0,
        )
        return Verdict(
            False,
            pk.ethernet(eth.src, eth.dst, pk.ETHERTYPE_IPV4, rst),
            f"network: refused TCP connection to {self._describe(ip.dst)}:{seg.dst_port} "
            "(not in the allow-list)",
        )

    def _check_udp(self, eth: pk.EthernetFrame, ip: pk.Ipv4Packet) -> Verdict:
        dgram = pk.parse_udp(ip)
        if dgram is None:
            return _DROP
        if ip.dst == self.addressing.dns and dgram.dst_port == DNS_PORT:
            return self._answer_dns(eth, ip, dgram)
        if self.allows(ip.dst, dgram.dst_port):
            return _PASS
        # ICMP port unreachable quotes the IP header and the first 8 bytes of the datagram.
        quoted = ip.raw[: ip.header_len + 8]
        unreachable = pk.icmp(
            ip.dst, ip.src, pk.ICMP_DEST_UNREACH, pk.ICMP_PORT_UNREACH, b"\0\0\0\0" + quoted
        )
        return Verdict(
            False,
            pk.ethernet(eth.src, eth.dst, pk.ETHERTYPE_IPV4, unreachable),
            f"network: refused UDP datagram to {self._describe(ip.dst)}:{dgram.dst_port} "
            "(not in the allow-list)",
        )

    def _answer_dns(
        self, eth: pk.EthernetFrame, ip: pk.Ipv4Packet, dgram: pk.UdpDatagram
    ) -> Verdict:
        question = pk.parse_dns_query(dgram.payload)
        if question is None:
            return _DROP
        addresses = self.names.get(question.name)
        refusal = None
        if not addresses:
            rcode, answer = pk.DNS_RCODE_NXDOMAIN, []
            refusal = f"network: refused DNS lookup of {question.name!r} (not in the allow-list)"
        else:
            # Names without an A answer for other query types (AAAA...): NOERROR, no records.
            rcode, answer = 0, addresses if question.qtype == pk.DNS_TYPE_A else []
        reply = pk.udp(
            ip.dst, ip.src, DNS_PORT, dgram.src_port, pk.dns_answer(question, rcode, answer)
        )
        return Verdict(False, pk.ethernet(eth.src, eth.dst, pk.ETHERTYPE_IPV4, reply), refusal)

    def _describe(self, guest_dst: str) -> str:
        if self._host_address(guest_dst) == ipaddress.IPv4Address("127.0.0.1"):
            return f"{guest_dst} (the host's 127.0.0.1)"
        return guest_dst


def tcp_without_syn(frame: bytes) -> bool:
    """Is `frame` an unfragmented IPv4 TCP segment without SYN? (The bulk of traffic,
    which needs no check: read from the bytes, without building any header object.)"""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != pk.IPPROTO_TCP:
        return False
    if frame[14] >> 4 != 4 or (frame[20] & 0x3F) or frame[21]:  # version, MF, offset
        return False
    header_len = (frame[14] & 0xF) * 4
    total = int.from_bytes(frame[16:18], "big")
    flags_at = pk.ETH_HEADER + header_len + 13
    if header_len < 20 or not header_len + 20 <= total <= len(frame) - pk.ETH_HEADER:
        return False
    return not frame[flags_at] & pk.TCP_SYN

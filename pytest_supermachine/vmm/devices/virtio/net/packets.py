"""Ethernet, ARP, IPv4, TCP, UDP, ICMP and DNS: the few header fields the NIC must read or write.

The egress policy reads the guest's outgoing frames (hostile input: every
parser here returns None for anything short, truncated or inconsistent,
never raises) and answers refused ones with frames it builds (a TCP RST, an
ICMP port unreachable, a DNS answer). Tests use the same builders to play a
guest's TCP/IP stack against libslirp, which checks every checksum itself.

Only what is needed is modelled: no IPv6, no IP options written, no TCP
options parsed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_PORT_UNREACH = 3
ICMP_ECHO_REQUEST = 8

DNS_RCODE_NXDOMAIN = 3
DNS_TYPE_A = 1

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_DNS_HEADER = struct.Struct("!HHHHHH")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`, ready to store in a header."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(memoryview(data).cast("H"))  # native order; byte-swapped once at the end
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    return int.from_bytes(total.to_bytes(2, "little"), "big")


def mac_bytes(mac: str) -> bytes:
    """``"52:54:00:12:34:56"`` → 6 bytes; ValueError if malformed."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {mac!r} is not six colon-separated hex bytes")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# ------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Ipv4Packet:
    """An IPv4 packet inside an Ethernet frame, as far as the policy needs it."""

    src: str
    dst: str
    proto: int
    header_len: int
    #: The whole IP packet (header + payload, trimmed to the header's total length).
    raw: bytes
    fragment: bool

    @property
    def payload(self) -> bytes:
        return self.raw[self.header_len :]


@dataclass(frozen=True)
class EthernetFrame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes


def parse_ethernet(frame: bytes) -> EthernetFrame | None:
    if len(frame) < ETH_HEADER:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    return EthernetFrame(dst, src, ethertype, frame[ETH_HEADER:])


def parse_ipv4(payload: bytes) -> Ipv4Packet | None:
    """The IPv4 packet in an Ethernet payload; None if the header is not a sane one."""
    if len(payload) < _IPV4.size:
        return None
    ver_ihl, _, total, _, frag, _, proto, _, src, dst = _IPV4.unpack_from(payload)
    header_len = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or header_len < _IPV4.size or not header_len <= total <= len(payload):
        return None
    return Ipv4Packet(
        src=str(ipaddress.IPv4Address(src)),
        dst=str(ipaddress.IPv4Address(dst)),
        proto=proto,
        header_len=header_len,
        raw=bytes(payload[:total]),
        fragment=bool(frag & 0x3FFF),  # more-fragments flag or a non-zero offset
    )


@dataclass(frozen=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes


def parse_tcp(packet: Ipv4Packet) -> TcpSegment | None:
    data = packet.payload
    if packet.proto != IPPROTO_TCP or len(data) < _TCP.size:
        return None
    sport, dport, seq, ack, offset, flags, window, _, _ = _TCP.unpack_from(data)
    data_off = (offset >> 4) * 4
    if not _TCP.size <= data_off <= len(data):
        return None
    return TcpSegment(sport, dport, seq, ack, flags, window, data[data_off:])


@dataclass(frozen=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes


def parse_udp(packet: Ipv4Packet) -> UdpDatagram | None:
    data = packet.payload
    if packet.proto != IPPROTO_UDP or len(data) < _UDP.size:
        return None
    sport, dport, length, _ = _UDP.unpack_from(data)
    if not _UDP.size <= length <= len(data):
        return None
    return UdpDatagram(sport, dport, data[_UDP.size : length])


@dataclass(frozen=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


def parse_arp(payload: bytes) -> ArpPacket | None:
    if len(payload) < _ARP.size:
        return None
    htype, ptype, hlen, plen, op, smac, sip, tmac, tip = _ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        return None
    return ArpPacket(
        op, smac, str(ipaddress.IPv4Address(sip)), tmac, str(ipaddress.IPv4Address(tip))
    )


@dataclass(frozen=True)
class DnsQuestion:
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    #: The question section as sent (echoed in answers).
    raw_question: bytes


def parse_dns_query(message: bytes) -> DnsQuestion | None:
    """The single question of a standard DNS query; None for anything else (no compression
    pointers are accepted in a question, as no resolver sends them there)."""
    if len(message) < _DNS_HEADER.size:
        return None
    ident, flags, qdcount, _, _, _ = _DNS_HEADER.unpack_from(message)
    if flags & 0x8000 or (flags >> 11) & 0xF or qdcount != 1:
        return None
    pos, labels = _DNS_HEADER.size, []
    while True:
        if pos >= len(message):
            return None
        n = message[pos]
        pos += 1
        if n == 0:
            break
        if n > 63 or pos + n > len(message):
            return None
        labels.append(message[pos : pos + n].decode("ascii", "replace"))
        pos += n
    if pos + 4 > len(message):
        return None
    qtype, qclass = struct.unpack_from("!HH", message, pos)
    return DnsQuestion(
        ident, flags, ".".join(labels).lower(), qtype, qclass, message[_DNS_HEADER.size : pos + 4]
    )


# ------------------------------------------------------------------------------ building


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 packet with DF set and a correct header checksum."""
    header = bytearray(
        _IPV4.pack(
            0x45,
            0,
            _IPV4.size + len(payload),
            ident,
            0x4000,
            ttl,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header) + payload


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!BBH", 0, proto, length)
    )


def tcp(
    src: str,
    dst: str,
    src_port: int,
    dst_port: int,
    *,
    seq: int,
    ack: int = 0,
    flags: int,
    window: int = 65535,
    payload: bytes = b"",
) -> bytes:
    """A TCP segment (no options) in an IPv4 packet, both checksums correct."""
    segment = bytearray(
        _TCP.pack(
            src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0
        )
        + payload
    )
    pseudo = _pseudo_header(src, dst, IPPROTO_TCP, len(segment))
    struct.pack_into("!H", segment, 16, checksum(pseudo + segment))
    return ipv4(src, dst, IPPROTO_TCP, bytes(segment))


def udp(src: str, dst: str, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """A UDP datagram in an IPv4 packet, both checksums correct."""
    datagram = bytearray(_UDP.pack(src_port, dst_port, _UDP.size + len(payload), 0) + payload)
    pseudo = _pseudo_header(src, dst, IPPROTO_UDP, len(datagram))
    struct.pack_into("!H", datagram, 6, checksum(pseudo + datagram) or 0xFFFF)
    return ipv4(src, dst, IPPROTO_UDP, bytes(datagram))


def icmp(src: str, dst: str, icmp_type: int, code: int, body: bytes) -> bytes:
    """An ICMP message (`body` follows the 4-byte type/code/checksum) in an IPv4 packet."""
    message = bytearray(struct.pack("!BBH", icmp_type, code, 0) + body)
    struct.pack_into("!H", message, 2, checksum(message))
    return ipv4(src, dst, IPPROTO_ICMP, bytes(message))


def arp(op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    return _ARP.pack(
        1,
        ETHERTYPE_IPV4,
        6,
        4,
        op,
        sender_mac,
        ipaddress.IPv4Address(sender_ip).packed,
        target_mac,
        ipaddress.IPv4Address(target_ip).packed,
    )


def dns_answer(question: DnsQuestion, rcode: int, addresses: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """A response to `question`: `rcode`, and one A record (TTL 60) per address."""
    flags = 0x8000 | (question.flags & 0x0100) | 0x0080 | (rcode & 0xF)  # QR, RD echoed, RA
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, DNS_TYPE_A, 1, 60, 4) + ipaddress.IPv4Address(a).packed
        for a in addresses
    )
    header = _DNS_HEADER.pack(question.id, flags, 1, len(addresses), 0, 0)
    return header + question.raw_question + answers


def dns_query(ident: int, name: str, qtype: int = DNS_TYPE_A) -> bytes:
    """A standard recursive query for `name` (what a guest's resolver sends)."""
    labels = b"".join(bytes((len(p),)) + p.encode() for p in name.rstrip(".").split(".") if p)
    return (
        _DNS_HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)
    )

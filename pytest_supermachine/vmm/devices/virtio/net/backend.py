"""What the virtio-net device needs from a network backend, and the guest's addressing.

The device (`device.VirtioNet`) moves Ethernet frames between the guest's
queues and a `NetBackend`; the backend is the network: a user-mode TCP/IP
stack (`slirp.SlirpBackend`) that turns the guest's connections into host
sockets, with no root, no tap and no bridge.

`GuestAddressing` is the one description of the guest's IPv4 configuration:
the backend serves it (gateway, DNS) and the guest kernel is configured with
it on its command line (`kernel_ip_argument`), so the guest needs no DHCP
client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GuestAddressing:
    """The guest's IPv4 network as the backend presents it.

    `host_loopback` is the gateway address behind which the backend puts the
    host's ``127.0.0.1`` (slirp's convention), so a guest reaches a host
    server on the loopback at ``gateway:port``.
    """

    guest: str = "10.0.2.15"
    gateway: str = "10.0.2.2"
    dns: str = "10.0.2.3"
    prefix_len: int = 24

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.guest}/{self.prefix_len}", strict=False)

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)


#: libslirp's defaults, which `SlirpBackend` uses.
SLIRP_ADDRESSING = GuestAddressing()


def kernel_ip_argument(addressing: GuestAddressing = SLIRP_ADDRESSING, device: str = "eth0") -> str:
    """The kernel command-line fragment that configures the guest's interface at boot.

    ``ip=<client>::<gateway>:<netmask>::<device>:off`` (CONFIG_IP_PNP, no
    autoconfiguration protocol); DNS comes from the guest's resolv.conf,
    which should name ``addressing.dns``.
    """
    return f"ip={addressing.guest}::{addressing.gateway}:{addressing.netmask}::{device}:off"


class NetBackend(Protocol):
    """A network the NIC sends frames into and receives frames from.

    Threading contract: `send` may be called from the device's thread while
    the backend's own loop (`run_once`) runs in another; the backend
    serialises access to its state. Frames for the guest are handed to the
    receiver set with `set_receiver`, from whichever thread produced them
    (inside `send` or inside `run_once`); the receiver must only queue them.
    """

    addressing: GuestAddressing

    def set_receiver(self, receiver: Callable[[bytes], None]) -> None:
        """Where frames for the guest go (one Ethernet frame per call, no virtio header)."""

    def send(self, frame: bytes) -> None:
        """One Ethernet frame from the guest into the network."""

    def run_once(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for host sockets or timers and serve them."""

    def reset(self) -> None:
        """Drop every connection (snapshot restore, in-place reset); exposed ports stay."""

    def close(self) -> None:
        """Release every host resource; the backend is unusable afterwards."""

"""The network card: virtio-net device, egress policy and the libslirp user-mode backend.

`device.VirtioNet` moves frames between the guest's queues and a
`backend.NetBackend`; `policy.EgressFilter` decides, on the host, which of
the guest's frames may reach it; `slirp.SlirpBackend` is the network
(libslirp, no root); `packets` holds the header codecs they share.
"""

from .backend import SLIRP_ADDRESSING, GuestAddressing, NetBackend, kernel_ip_argument
from .device import VIRTIO_ID_NET, VirtioNet
from .policy import EgressFilter, EgressPolicy, EgressPolicyError
from .slirp import SlirpBackend, SlirpUnavailableError

__all__ = [
    "SLIRP_ADDRESSING",
    "VIRTIO_ID_NET",
    "EgressFilter",
    "EgressPolicy",
    "EgressPolicyError",
    "GuestAddressing",
    "NetBackend",
    "SlirpBackend",
    "SlirpUnavailableError",
    "VirtioNet",
    "kernel_ip_argument",
]

"""virtio-vsock: the device, and the host end of the guest's stream connections.

One module per concern, layered so that each imports only those above it:

* `packet`     — the wire format: header codec, ops, flags, limits;
* `errors`     — what the host API raises;
* `connection` — one connection: its state machine and its credit accounting;
* `listener`   — a host port guest connections are accepted on;
* `backend`    — the device ↔ backend contract (`VsockBackend`, a Protocol);
* `muxer`      — the backend: routes packets, schedules, polls host sockets;
* `device`     — the virtio device: virtqueues ↔ packets ↔ backend.

The names below are what the rest of the VMM (and tests) use.
"""

from .backend import VsockBackend
from .connection import ConnectionState, PendingConnection, VsockConnection
from .device import VirtioVsock
from .errors import VsockConnectionRefused, VsockError, VsockTimeout
from .listener import VsockListener
from .muxer import VsockMuxer
from .packet import EVENT_TRANSPORT_RESET, HDR_SIZE, HOST_CID, MAX_PKT_DATA, VsockPacket

__all__ = [
    "EVENT_TRANSPORT_RESET",
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PKT_DATA",
    "ConnectionState",
    "PendingConnection",
    "VirtioVsock",
    "VsockBackend",
    "VsockConnection",
    "VsockConnectionRefused",
    "VsockError",
    "VsockListener",
    "VsockMuxer",
    "VsockPacket",
    "VsockTimeout",
]

"""The contract between the virtio-vsock device and the host end of its connections.

`device.VirtioVsock` moves packets between virtqueues and a `VsockBackend`;
the backend never sees a virtqueue and the device never sees a host socket.
`muxer.VsockMuxer` is the one implementation (Firecracker calls the same
seam ``VsockBackend``: a channel of packets plus an fd to poll).

Threading: the device calls the data-path and lifecycle methods under its
transport lock; ``connect``, ``connect_nowait`` and ``listen`` may be called
from any thread and must wake the event loop (make `fileno` readable).
"""

from __future__ import annotations

import socket
from typing import Protocol

from .carried import CarriedConnection, CarriedState, OwnerState
from .connection import PendingConnection
from .listener import VsockListener
from .packet import VsockPacket


class VsockBackend(Protocol):
    """What `VirtioVsock` needs from its host side."""

    #: The guest's CID: packets from any other CID are dropped; the device sets it on restore.
    guest_cid: int

    # -- polled by the VMM's event loop -----------------------------------------------------
    def fileno(self) -> int:
        """An fd that is readable (level-triggered) whenever `poll_host` has work."""
        ...

    def poll_host(self) -> None:
        """Collect host-side readiness (sockets, wake-ups, timers); never blocks."""
        ...

    # -- guest → host ----------------------------------------------------------------------
    def from_guest(self, pkt: VsockPacket) -> None:
        """A packet the guest sent whose payload length the device has checked."""
        ...

    def reject(self, pkt: VsockPacket) -> None:
        """A malformed packet: reset its connection if it names one of ours, else drop it."""
        ...

    # -- host → guest ----------------------------------------------------------------------
    def has_pending(self) -> bool:
        """Might `next_packet` return something? (False means: do not take an rx buffer.)"""
        ...

    def next_packet(self, max_data: int) -> VsockPacket | None:
        """The next packet for the guest, with at most ``max_data`` payload bytes."""
        ...

    def rx_available(self) -> None:
        """The driver posted rx buffers."""
        ...

    def rx_starved(self) -> None:
        """No rx buffer left: stop reading host sockets until `rx_available`."""
        ...

    # -- lifecycle -------------------------------------------------------------------------
    def set_active(self, active: bool) -> None:
        """The driver activated (True) or reset (False) the device."""
        ...

    def drop_all(self) -> None:
        """Forget every connection without telling the guest; listeners stay."""
        ...

    @property
    def next_host_port(self) -> int:
        """The host port the next host-initiated connection will try first (settable):
        carried by snapshots so a restored VM never reuses a port its guest may still
        hold a connection on."""
        ...

    def close(self) -> None:
        """Release every host resource; the backend is unusable afterwards."""
        ...

    # -- connections that are part of the machine's state (carried.py) -------------------------
    def carry(self, host_port: int, guest_port: int, owner: OwnerState) -> None:
        """Snapshots record this live connection while it is quiet and ``owner()`` has a state."""
        ...

    def capture_connections(self) -> tuple[list[CarriedState], list[tuple[int, int]]]:
        """The quiet carried connections, and the (host, guest) ports of every other live one."""
        ...

    def restore_connections(self, states: list[CarriedState], stale: list[tuple[int, int]]) -> None:
        """Drop every connection, continue `states`, reset (RST to the guest) `stale` ones."""
        ...

    def take_carried(self) -> list[CarriedConnection]:
        """The carried connections restored since the last call: their owners' socket ends."""
        ...

    # -- the host API the device forwards ------------------------------------------------------
    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """A stream socket connected to the guest listener on ``port`` (blocks)."""
        ...

    def connect_nowait(self, port: int) -> PendingConnection:
        """Start connecting to guest ``port``."""
        ...

    def listen(self, port: int, backlog: int = 16) -> VsockListener:
        """Accept guest connections to host CID 2, ``port``."""
        ...


__all__ = ["VsockBackend"]

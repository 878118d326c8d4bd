"""virtio-vsock device model (virtio 1.x, section 5.10): queues in, packets out.

Layering (rust-vmm style): the transport (`mmio.VirtioMmioTransport`) owns
registers, feature negotiation and the `VirtQueue` objects; this device turns
descriptor chains into `VsockPacket` objects and back; the host side of every
connection — sockets, credit, the per-connection state machine — lives behind
the `backend.VsockBackend` contract (`muxer.VsockMuxer`), which knows nothing
about virtqueues. Modelled on Firecracker's ``virtio/vsock/device.rs``.

Queues: 0 = rx (device → driver), 1 = tx (driver → device), 2 = event.
Configuration space: ``le64 guest_cid``.

Guarantees:

* Every guest byte is read and written through the queue's `DescriptorChain`
  helpers, i.e. through `DeviceMemory`/`GuestMemory`: nothing here indexes a
  host buffer with a guest number.
* A tx packet that is too short for its header, or whose ``len`` is larger
  than the bytes the chain holds or than `MAX_PKT_DATA`, is dropped and
  answered with RST (if its addresses are ours); wrong CIDs are dropped
  silently; the backend answers unknown ops and types with RST. None of these
  raise. An rx buffer too small for a header is a broken driver:
  `VirtQueueError` → ``DEVICE_NEEDS_RESET`` (the transport's job).
* Packets are consumed from tx as fast as the guest posts them (credit bounds
  what the backend must buffer); rx buffers are filled only when the backend has
  something to say, so an idle connection costs nothing.

What a guest driver must do (the microguest's and Linux's both do; the
reference is ``tests/vsock_guest.py``): keep rx buffers of at least 44 bytes
posted (4 KiB is usual); put every packet in one tx chain (header and payload
may span descriptors); send at most the host's credit
(``buf_alloc - (tx_cnt - fwd_cnt)`` from the host's latest header); answer
CREDIT_REQUEST with CREDIT_UPDATE and send CREDIT_UPDATE after consuming
data; answer a full SHUTDOWN with RST; drop every connection (keep
listeners) on a TRANSPORT_RESET event, which follows a snapshot restore.

Event loop integration (see `VirtioVsock.fileno`): the VMM's event thread
selects on the rx/tx/event ioeventfds (→ ``transport.notify(i)``) and on
``vsock.fileno()`` (→ ``vsock.service(transport)``).
Both paths run under the transport lock, so device and queues are never used
concurrently; `connect`/`listen` may be called from any thread.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from ....memory import DeviceMemory
from ..device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_VSOCK,
    DeviceStateError,
    Interrupt,
    VirtioDevice,
)
from ..queue import DescriptorChain, VirtQueue, VirtQueueError
from .backend import VsockBackend
from .carried import CarriedConnection, CarriedState, OwnerState, port_pair
from .connection import PendingConnection
from .listener import VsockListener
from .muxer import EPHEMERAL_FIRST, VsockMuxer
from .packet import EVENT_TRANSPORT_RESET, HDR_SIZE, MAX_PKT_DATA, U32_MASK, VsockPacket

log = logging.getLogger(__name__)

MIN_GUEST_CID = 3  # 0-2 are the hypervisor, local and host addresses
MAX_GUEST_CID = 0xFFFF_FFFE  # 0xFFFFFFFF is VMADDR_CID_ANY

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZES = (256, 256, 16)
#: How long packets wait for a driver to acknowledge a TRANSPORT_RESET (see `_fill_rx`).
RESET_ACK_TIMEOUT = 2.0

_EVENT = struct.Struct("<I")
_CONFIG = struct.Struct("<Q")


class _Transport(Protocol):
    def process_device(self, action: Callable[[], None]) -> None: ...


class VirtioVsock(VirtioDevice):
    """The virtio-vsock device (id 19) with a host backend behind it.

    ``guest_cid`` is what the guest reads from configuration space (≥ 3).
    `backend` is the host side (a `VsockMuxer` unless one is given):
    ``vsock.connect(port)`` gives a stream socket to a guest listener,
    ``vsock.listen(port)`` accepts guest connections to host CID 2.
    """

    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = QUEUE_SIZES

    def __init__(self, guest_cid: int = 3, *, backend: VsockBackend | None = None) -> None:
        super().__init__()
        if type(guest_cid) is not int or not MIN_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(
                f"guest CID must be in {MIN_GUEST_CID}..{MAX_GUEST_CID:#x}, got {guest_cid!r}"
            )
        self.guest_cid = guest_cid
        self.backend: VsockBackend = backend if backend is not None else VsockMuxer(guest_cid)
        self._reset_event_pending = False
        #: When the last TRANSPORT_RESET was delivered and the driver has not yet re-posted
        #: an event buffer (i.e. not yet handled it); see `_fill_rx`.
        self._reset_unacked_since: float | None = None
        #: Counters for tests and diagnostics.
        self.dropped_packets = 0

    # -- wiring for the VMM --------------------------------------------------------
    def fileno(self) -> int:
        """An fd that is readable whenever `process_host` has work (host sockets, connect calls).

        Register it in the VMM's selector and call ``vsock.service(transport)``
        when it is readable.
        """
        return self.backend.fileno()

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """Blocking connect to guest ``port``; needs the event loop running. See `VsockBackend.connect`."""
        return self.backend.connect(port, timeout)

    def connect_nowait(self, port: int) -> PendingConnection:
        return self.backend.connect_nowait(port)

    def listen(self, port: int, backlog: int = 16) -> VsockListener:
        return self.backend.listen(port, backlog)

    def close(self) -> None:
        """Release host resources (epoll fd, sockets); the device is unusable afterwards."""
        self.backend.close()

    def carry(self, host_port: int, guest_port: int, owner: OwnerState) -> None:
        """Make a live connection part of the machine's state; see `VsockBackend.carry`."""
        self.backend.carry(host_port, guest_port, owner)

    def take_carried(self) -> list[CarriedConnection]:
        """Carried connections brought back by the last restore or reset (owners' ends)."""
        return self.backend.take_carried()

    # -- negotiation and config ------------------------------------------------------
    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    # -- lifecycle ---------------------------------------------------------------------
    def activate(self, queues: list[VirtQueue], memory: DeviceMemory, interrupt: Interrupt) -> None:
        super().activate(queues, memory, interrupt)
        self.backend.set_active(True)

    def reset(self) -> None:
        """Driver reset, in-place VM reset or restore: every connection is dropped.

        Host sockets of dropped connections see EOF; host listeners stay (the
        VMM registered them, not the guest). The guest's listeners live in
        guest RAM, so the host simply connects again.
        """
        self.backend.drop_all()
        self.backend.set_active(False)
        super().reset()

    def state(self) -> dict[str, Any]:
        st = super().state()
        st["guest_cid"] = self.guest_cid
        st["next_host_port"] = self.backend.next_host_port
        kept, stale = self.backend.capture_connections()
        st["carried"] = [c.to_dict() for c in kept]
        st["stale"] = [list(key) for key in stale]
        return st

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load `state()`: the guest's connections continue where the snapshot left them.

        Carried connections (carried.py) are re-established on the host side with
        their recorded counters, every other connection the guest holds is reset
        with RST. A state from before connections were recorded (no ``carried``
        key) tells the guest with a TRANSPORT_RESET event to forget all it had.

        Until the guest has seen those resets it still holds the connections of the
        snapshot, so host ports carry on from the snapshot's: a new connection never
        lands on a stale one (the guest would answer its REQUEST with RST)."""
        super().restore_state(state)
        cid = state.get("guest_cid", self.guest_cid)
        if type(cid) is not int or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise DeviceStateError(
                f"guest_cid={cid!r} is not a guest CID ({MIN_GUEST_CID}..{MAX_GUEST_CID:#x})"
            )
        saved_port = state.get("next_host_port", EPHEMERAL_FIRST)
        if type(saved_port) is not int or not EPHEMERAL_FIRST <= saved_port < U32_MASK:
            raise DeviceStateError(
                f"next_host_port={saved_port!r} is not a host vsock port "
                f"({EPHEMERAL_FIRST}..{U32_MASK - 1})"
            )
        connections = carried_connections(state)
        self.guest_cid = cid
        self.backend.guest_cid = cid
        if saved_port > self.backend.next_host_port:
            self.backend.next_host_port = saved_port
        self.rewind_connections(connections)

    def rewind_connections(
        self, connections: tuple[list[CarriedState], list[tuple[int, int]]] | None
    ) -> None:
        """Return the host side of the connections to a snapshot's (from `carried_connections`).

        None (a snapshot that recorded none) falls back to `transport_reset`."""
        if connections is None:
            self.transport_reset()
            return
        self._reset_event_pending = False
        self._reset_unacked_since = None
        self.backend.restore_connections(*connections)

    def transport_reset(self) -> None:
        """Drop all connections and tell the guest (event queue) to drop its side too."""
        self.backend.drop_all()
        self._reset_event_pending = True
        if self.active:
            self._deliver_events()

    @property
    def reset_unacknowledged(self) -> bool:
        """A TRANSPORT_RESET was delivered and the driver has not re-posted its buffer yet
        (packets for the guest are held meanwhile, at most RESET_ACK_TIMEOUT)."""
        return self._reset_unacked_since is not None

    # -- data path ---------------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        """The driver kicked queue ``index``; True if tx chains are still waiting."""
        if index == EVENT_QUEUE:
            self._reset_unacked_since = None  # it handled the reset and re-posted the buffer
        more = False
        if index == TX_QUEUE:
            more = self._drain_tx()
        elif index == RX_QUEUE:
            self.backend.rx_available()
        self._deliver_events()
        self._fill_rx()
        return more

    def service(self, transport: _Transport) -> None:
        """What the VMM's event thread calls whenever `fileno` is readable.

        Host-side readiness is always consumed (so a level-triggered loop never
        spins, even while the driver is not up or the device needs a reset);
        queue work runs under the transport's lock and error handling.
        """
        self.backend.poll_host()
        transport.process_device(self.process_host)

    def process_host(self) -> None:
        """Host sockets or API calls have work: move what can be moved. Call under the
        transport lock (``transport.process_device(vsock.process_host)``)."""
        self.backend.poll_host()
        if self.active:
            self._deliver_events()
            self._fill_rx()

    def _drain_tx(self) -> bool:
        """Take at most one queue's worth of packets; True if more are waiting."""
        queue = self.queues[TX_QUEUE]
        served = 0
        while served < queue.size and (chain := queue.pop()) is not None:
            # Read the packet before publishing the slot: once it is in the used ring the
            # driver may reuse the buffer, and we would read its next packet instead.
            self._handle_tx(chain)
            queue.add_used(chain.head, 0)
            served += 1
        if served:
            self.signal_used(queue)
        return served == queue.size and queue.pending() > 0

    def _handle_tx(self, chain: DescriptorChain) -> None:
        if chain.readable_len < HDR_SIZE:
            log.debug("vsock: tx chain of %d bytes has no room for a header", chain.readable_len)
            self.dropped_packets += 1
            return
        head = chain.read(0, min(chain.readable_len, HDR_SIZE + MAX_PKT_DATA))
        pkt, length = VsockPacket.decode(head)
        if length > MAX_PKT_DATA or length != len(pkt.data):
            log.debug(
                "vsock: tx %r announces %d payload bytes, chain holds %d",
                pkt,
                length,
                chain.readable_len - HDR_SIZE,
            )
            self.dropped_packets += 1
            self.backend.reject(pkt)
            return
        self.backend.from_guest(pkt)

    def _fill_rx(self) -> None:
        if not self.backend.has_pending():
            return
        if self._reset_unacked_since is not None:
            # Hold packets of new connections until the driver has handled the reset:
            # Linux handles events and rx in separate work items, so a REQUEST that
            # overtook the reset would be established, then torn down by it, and the
            # host would wait for an answer that never comes. Drivers re-post the event
            # buffer (a kick of the event queue) once they handled it; a driver that
            # never does is released after RESET_ACK_TIMEOUT.
            if time.monotonic() - self._reset_unacked_since < RESET_ACK_TIMEOUT:
                return
            self._reset_unacked_since = None
        queue = self.queues[RX_QUEUE]
        added = False
        # At most one queue's worth per call; the event thread calls again for the rest.
        for _ in range(queue.size):
            if not self.backend.has_pending():
                break
            chain = queue.pop()
            if chain is None:
                self.backend.rx_starved()
                break
            if chain.writable_len < HDR_SIZE:
                raise VirtQueueError(
                    f"vsock rx buffer of {chain.writable_len} bytes cannot hold a "
                    f"{HDR_SIZE}-byte header"
                )
            pkt = self.backend.next_packet(min(chain.writable_len - HDR_SIZE, MAX_PKT_DATA))
            if pkt is None:
                queue.undo_pop()
                break
            chain.write(0, pkt.header())
            if pkt.data:
                chain.write(HDR_SIZE, pkt.data)
            queue.add_used(chain.head, HDR_SIZE + len(pkt.data))
            added = True
        if added:
            self.signal_used(queue)

    def _deliver_events(self) -> None:
        if not self._reset_event_pending or len(self.queues) <= EVENT_QUEUE:
            return
        queue = self.queues[EVENT_QUEUE]
        if not queue.active:
            return
        chain = queue.pop()
        if chain is None:
            return  # delivered when the driver posts an event buffer
        if chain.writable_len < _EVENT.size:
            raise VirtQueueError(f"vsock event buffer of {chain.writable_len} bytes is too small")
        chain.write(0, _EVENT.pack(EVENT_TRANSPORT_RESET))
        queue.add_used(chain.head, _EVENT.size)
        # The driver re-posts the buffer once it handled the reset: that kick is the ack.
        # Linux keeps several event buffers posted, so the ring is not empty and `pop`
        # did not ask for it; without asking, the ack never comes and every held packet
        # waits out RESET_ACK_TIMEOUT.
        reposted = queue.request_kick()
        self._reset_event_pending = False
        self._reset_unacked_since = None if reposted else time.monotonic()
        self.signal_used(queue)


def carried_connections(
    state: dict[str, Any],
) -> tuple[list[CarriedState], list[tuple[int, int]]] | None:
    """The connections a device state records, checked; None if it records none."""
    if "carried" not in state:
        return None
    kept, stale = state.get("carried"), state.get("stale")
    if not isinstance(kept, list) or not isinstance(stale, list):
        raise DeviceStateError("carried/stale connections are not lists")
    try:
        states = [CarriedState.from_dict(c) for c in kept]
        ports = [port_pair(p) for p in stale]
    except ValueError as e:
        raise DeviceStateError(f"vsock connection: {e}") from None
    keys = [(s.host_port, s.guest_port) for s in states] + ports
    if len(set(keys)) != len(keys):
        raise DeviceStateError("vsock connections recorded twice")
    return states, ports


__all__ = [
    "MAX_GUEST_CID",
    "MIN_GUEST_CID",
    "QUEUE_SIZES",
    "RESET_ACK_TIMEOUT",
    "VirtioVsock",
    "carried_connections",
]

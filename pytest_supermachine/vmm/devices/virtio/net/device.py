"""virtio-net device model (virtio 1.x, section 5.1): Ethernet frames between queues and a backend.

Queues: 0 = receiveq (device → driver), 1 = transmitq (driver → device); no
control queue, one queue pair. Features: ``VIRTIO_NET_F_MAC`` (the MAC in
configuration space), ``VIRTIO_NET_F_STATUS`` (link always up), no checksum
or segmentation offloads, no mergeable rx buffers. Every frame in either
direction is preceded by the 12-byte ``virtio_net_hdr_v1`` (VERSION_1).

Guarantees:

* Every guest byte is read and written through the queue's `DescriptorChain`
  helpers (bounds-checked `GuestMemory`).
* A tx chain that is truncated (shorter than the header plus an Ethernet
  header), oversized (more than `MAX_FRAME_LEN` after the header) or whose
  header asks for an offload that was not negotiated is dropped and counted
  (`tx_dropped`), never an exception; the buffer goes back to the driver.
* Every transmitted frame passes the `EgressFilter` before the backend sees
  it (`filtered` counts what it keeps back; each refusal is counted in
  `refused`, answered with a frame for the guest and logged in one line).
* Frames from the backend are delivered as soon as the driver has posted rx
  buffers, queued meanwhile up to `rx_backlog` frames (the oldest beyond
  that are dropped and counted in `rx_dropped`: the guest's TCP
  retransmits). A frame larger than a posted buffer is dropped likewise.

Threading, as for vsock: the VMM's event thread calls `process_queue`
(doorbells) and `service(transport)` when `fileno()` is readable (frames
from the backend's thread are waiting), both under the transport's lock.

Snapshots: `state()` holds acked features, the MAC and the TCP flows the
guest had open; the queues are the transport's. The backend keeps no state
across a restore (see `slirp`), so after `restore_state` and after an
in-place reset the machine calls `reset_connections()`: the backend starts
afresh and every remembered flow gets one stray segment, which the guest
answers and the backend, having no such connection, answers with an RST, so
the guest's sockets fail at once instead of hanging.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioDevice
from ..queue import DescriptorChain
from . import packets as pk
from .backend import NetBackend
from .policy import EgressFilter

log = logging.getLogger(__name__)

#: virtio device id of a network card (virtio 1.x, 5).
VIRTIO_ID_NET = 1

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

#: ``virtio_net_hdr_v1``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size
#: Largest frame (no FCS) either way: MTU 1500 + Ethernet header + one VLAN tag.
MAX_FRAME_LEN = 1518
DEFAULT_MAC = "52:54:00:12:34:56"
#: Flows remembered for `reset_connections` (the oldest are forgotten beyond this).
MAX_TRACKED_FLOWS = 4096

#: Refusal lines logged per device; a guest hammering a closed port must not flood the log.
MAX_LOGGED_REFUSALS = 1000

_CONFIG = struct.Struct("<6sH")

#: (guest address, guest port, remote address, remote port)
Flow = tuple[str, int, str, int]


class _Transport(Protocol):
    def process_device(self, action: Callable[[], None]) -> None: ...


class VirtioNet(VirtioDevice):
    """The virtio-net device (id 1) in front of a `NetBackend`, behind an `EgressFilter`.

    The device owns `backend` (`close` closes it) but does not run it: the
    machine starts the backend's loop (``SlirpBackend.start``). `mac` is the
    guest's address (locally administered by default); `on_refusal` receives
    one line per refused connection (the VM's log), at most
    `max_logged_refusals` of them; `rx_backlog` bounds the frames waiting
    for rx buffers.
    """

    device_type = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        backend: NetBackend,
        egress: EgressFilter,
        *,
        mac: str = DEFAULT_MAC,
        on_refusal: Callable[[str], None] | None = None,
        rx_backlog: int = 256,
    ) -> None:
        super().__init__()
        self.mac = pk.mac_bytes(mac)
        if self.mac[0] & 1:
            raise ValueError(f"MAC address {mac} is a multicast address")
        self.backend = backend
        self.egress = egress
        self.on_refusal = on_refusal
        self._rx_lock = threading.Lock()
        self._rx: collections.deque[bytes] = collections.deque()
        self.rx_backlog = rx_backlog
        self.max_logged_refusals = MAX_LOGGED_REFUSALS
        self._rx_ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._flows: dict[Flow, None] = {}
        self._gateway_mac: bytes | None = None
        #: Counters for tests and diagnostics.
        self.tx_frames = 0
        self.tx_dropped = 0
        #: Frames the egress filter kept from the backend (refusals among them).
        self.filtered = 0
        self.refused = 0
        self.rx_frames = 0
        self.rx_dropped = 0
        backend.set_receiver(self.receive)

    # -- wiring for the VMM ---------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when frames from the backend wait: call ``service(transport)`` then."""
        return self._rx_ready

    def service(self, transport: _Transport) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._rx_ready)
        transport.process_device(self._fill_rx)

    def receive(self, frame: bytes) -> None:
        """A frame for the guest (the backend's receiver; any thread): queue it, wake the VMM."""
        with self._rx_lock:
            if len(self._rx) >= self.rx_backlog:
                self._rx.popleft()
                self.rx_dropped += 1
            self._rx.append(frame)
        os.eventfd_write(self._rx_ready, 1)

    def pending_rx(self) -> int:
        with self._rx_lock:
            return len(self._rx)

    def close(self) -> None:
        self.backend.close()
        with contextlib.suppress(OSError):
            os.close(self._rx_ready)

    # -- negotiation and config ----------------------------------------------------------------
    def device_features(self) -> int:
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
        )

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP)

    # -- data path ------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._drain_tx()
        self._fill_rx()

    def _drain_tx(self) -> None:
        queue = self.queues[TX_QUEUE]
        added = False
        while (chain := queue.pop()) is not None:
            # Read the frame before the slot is published: the driver may reuse it at once.
            frame = self._read_tx(chain)
            queue.add_used(chain.head, 0)
            added = True
            if frame is not None:
                self._transmit(frame)
        if added:
            self.signal_used(queue)

    def _read_tx(self, chain: DescriptorChain) -> bytes | None:
        length = chain.readable_len - NET_HDR_SIZE
        if length < pk.ETH_HEADER or length > MAX_FRAME_LEN:
            log.debug("virtio-net: tx chain of %d bytes dropped", chain.readable_len)
            self.tx_dropped += 1
            return None
        flags, gso_type, *_ = NET_HDR.unpack(chain.read(0, NET_HDR_SIZE))
        if flags or gso_type:
            log.debug(
                "virtio-net: tx header asks for offloads (flags %#x gso %#x)", flags, gso_type
            )
            self.tx_dropped += 1
            return None
        return chain.read(NET_HDR_SIZE, length)

    def _transmit(self, frame: bytes) -> None:
        verdict = self.egress.check(frame)
        if not verdict.allowed:
            self.filtered += 1
            if verdict.refusal is not None:
                self.refused += 1
                if self.on_refusal is not None and self.refused <= self.max_logged_refusals:
                    self.on_refusal(verdict.refusal)
                    if self.refused == self.max_logged_refusals:
                        self.on_refusal("network: further refusals are counted, not logged")
            if verdict.reply is not None:
                self.receive(verdict.reply)
            return
        self.tx_frames += 1
        self._track(frame)
        self.backend.send(frame)

    def _track(self, frame: bytes) -> None:
        """Remember the guest's TCP connections (SYN or SYN-ACK out, until RST)."""
        if len(frame) < 48 or frame[12:14] != b"\x08\x00" or frame[23] != pk.IPPROTO_TCP:
            return
        eth = pk.parse_ethernet(frame)
        ip = pk.parse_ipv4(eth.payload) if eth is not None else None
        seg = pk.parse_tcp(ip) if ip is not None else None
        if eth is None or ip is None or seg is None:
            return
        flow = (ip.src, seg.src_port, ip.dst, seg.dst_port)
        if seg.flags & pk.TCP_RST:
            self._flows.pop(flow, None)
        elif seg.flags & pk.TCP_SYN:
            self._gateway_mac = eth.dst
            self._flows[flow] = None
            if len(self._flows) > MAX_TRACKED_FLOWS:
                del self._flows[next(iter(self._flows))]

    def _fill_rx(self) -> None:
        if not self.active:
            return
        queue = self.queues[RX_QUEUE]
        added = False
        while True:
            with self._rx_lock:
                if not self._rx:
                    break
                frame = self._rx[0]
            chain = queue.pop()
            if chain is None:
                break  # delivered when the driver posts buffers (it kicks the rx queue)
            with self._rx_lock:
                self._rx.popleft()
            if chain.writable_len < NET_HDR_SIZE + len(frame):
                log.debug(
                    "virtio-net: %d-byte frame does not fit a %d-byte rx buffer",
                    len(frame),
                    chain.writable_len,
                )
                self.rx_dropped += 1
                queue.undo_pop()
                continue
            chain.write(0, NET_HDR.pack(0, 0, 0, 0, 0, 0, 1))
            chain.write(NET_HDR_SIZE, frame)
            queue.add_used(chain.head, NET_HDR_SIZE + len(frame))
            self.rx_frames += 1
            added = True
        if added:
            self.signal_used(queue)

    # -- snapshots and reset ---------------------------------------------------------------------
    def flows(self) -> list[Flow]:
        """The guest's TCP connections the device has seen open (oldest first)."""
        return list(self._flows)

    def reset_connections(self) -> None:
        """After a restore or an in-place reset: a fresh backend, and every flow the
        guest believes open is provoked into an RST (see the module docstring)."""
        self.backend.reset()
        with self._rx_lock:
            self._rx.clear()
        gateway_mac = self._gateway_mac or b"\x52\x55\x0a\x00\x02\x02"
        for guest_ip, guest_port, remote_ip, remote_port in self._flows:
            # An ACK far outside the guest's window: it answers with a duplicate ACK.
            stray = pk.tcp(
                remote_ip,
                guest_ip,
                remote_port,
                guest_port,
                seq=0x7FFF_0000,
                ack=0,
                flags=pk.TCP_ACK,
            )
            self.receive(pk.ethernet(self.mac, gateway_mac, pk.ETHERTYPE_IPV4, stray))
        self._flows.clear()

    def reset(self) -> None:
        """Driver reset: queues and features go; pending frames for the guest too."""
        with self._rx_lock:
            self._rx.clear()
        super().reset()

    def state(self) -> dict[str, Any]:
        st = super().state()
        st["mac"] = pk.mac_str(self.mac)
        st["flows"] = [list(f) for f in self._flows]
        st["gateway_mac"] = pk.mac_str(self._gateway_mac) if self._gateway_mac else None
        return st

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        if state.get("mac"):
            self.mac = pk.mac_bytes(state["mac"])
        self._flows = {
            (str(a), int(b), str(c), int(d)): None for a, b, c, d in state.get("flows", [])
        }
        gw = state.get("gateway_mac")
        self._gateway_mac = pk.mac_bytes(gw) if gw else None

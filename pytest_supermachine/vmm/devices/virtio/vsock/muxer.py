"""The vsock muxer: the `backend.VsockBackend` that routes between the guest and host sockets.

The muxer owns the tables and the fds, never a connection's decisions
(those are `connection.VsockConnection`'s). It

* routes each guest packet by (host port, guest port) to its connection,
  answers a REQUEST to a listened port by creating one (`VsockListener`),
  and answers packets for nobody with RST;
* schedules connections that have something to send in a round robin, ahead
  of which go the connection-less control packets (RSTs);
* watches every host socket with one epoll set (plus an eventfd that wakes
  the event loop when another thread connects), in the events each
  connection asks for;
* resets connections that killed themselves: sends their RST, drops them.

Modelled on Firecracker's ``unix/muxer.rs``. Each connection is bridged to a
host stream socket, one end of a ``socket.socketpair()``; the user gets the
other end from `connect` or `VsockListener.accept` and uses it like any
socket.

Threading: all state is guarded by one lock. `connect`, `connect_nowait`,
`listen`, `VsockListener.accept` and `PendingConnection.result` may be called
from any thread; they wake the event thread through the eventfd. Everything
else is called by the device, under the transport lock, on the event thread
or a vCPU thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections import deque

from . import carried
from .carried import CarriedConnection, CarriedState, OwnerState
from .connection import ConnectionState, PendingConnection, VsockConnection
from .errors import VsockConnectionRefused, VsockError
from .listener import VsockListener
from .packet import (
    HOST_CID,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    U32_MASK,
    VSOCK_TYPE_STREAM,
    VsockPacket,
)

log = logging.getLogger(__name__)

#: Host ports of host-initiated connections start here (Linux's ephemeral range).
EPHEMERAL_FIRST = 49152
#: At most this many connection-less control packets (RSTs) wait for rx buffers.
MAX_CONTROL_BACKLOG = 1024


class VsockMuxer:
    """Host side of every vsock connection of one VM (see the module docstring)."""

    def __init__(self, guest_cid: int = 3, *, buf_alloc: int = 256 * 1024) -> None:
        self._guest_cid = guest_cid
        #: The receive buffer every connection advertises to the guest.
        self.buf_alloc = buf_alloc
        self._lock = threading.RLock()
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._conns: dict[tuple[int, int], VsockConnection] = {}
        self._by_fd: dict[int, VsockConnection] = {}
        #: Connections whose socket is in the epoll set, with the events it is watched for.
        self._interest: dict[VsockConnection, int] = {}
        self._listeners: dict[int, VsockListener] = {}
        self._control: deque[VsockPacket] = deque(maxlen=MAX_CONTROL_BACKLOG)
        self._ready: dict[VsockConnection, None] = {}  # insertion-ordered set, for round robin
        self._starved = False
        self._next_port = EPHEMERAL_FIRST
        self._closed = False
        #: Connections snapshots carry (see carried.py), with their owner's state callback.
        self._carry: dict[VsockConnection, OwnerState] = {}
        #: Carried connections brought back by `restore_connections`, not yet taken.
        self._revived: list[CarriedConnection] = []
        #: Diagnostics: packets dropped (wrong CID), RSTs sent, credit violations.
        self.stats = {"dropped": 0, "rst_sent": 0, "credit_violations": 0}

    @property
    def guest_cid(self) -> int:
        return self._guest_cid

    @guest_cid.setter
    def guest_cid(self, cid: int) -> None:
        with self._lock:
            self._guest_cid = cid
            for conn in self._conns.values():
                conn.guest_cid = cid

    # ------------------------------------------------------------------ any thread

    def fileno(self) -> int:
        """The epoll fd: readable when `poll_host` has work. Level-triggered."""
        return self._epoll.fileno()

    def listen(self, port: int, backlog: int = 16) -> VsockListener:
        """Accept guest connections to host CID 2, ``port``."""
        with self._lock:
            if port in self._listeners:
                raise VsockError(f"host vsock port {port} already has a listener")
            listener = VsockListener(port, backlog, on_close=self._unlisten)
            self._listeners[port] = listener
            return listener

    def connect_nowait(self, port: int) -> PendingConnection:
        """Start connecting to guest ``port``; the REQUEST goes out on the next device run."""
        with self._lock:
            if self._closed:
                raise VsockError("the vsock device is closed")
            host_port = self._alloc_port(port)
            ours, user = socket.socketpair()
            ours.setblocking(False)
            conn = self._new_connection(host_port, port, ours, ConnectionState.CONNECTING)
            pending = PendingConnection(
                user,
                guest_cid=self._guest_cid,
                guest_port=port,
                host_port=host_port,
                cancel=lambda: self._cancel(conn),
            )
            conn.pending = pending
            self._register(conn)
            conn.queue_control(OP_REQUEST)
            self._settle(conn)
        self._wake()
        return pending

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """A stream socket connected to the guest listener on ``port``.

        Blocks until the guest answers, so the VMM's event loop must be running.
        Raises `VsockConnectionRefused` (nobody listens) or `VsockTimeout`.
        """
        return self.connect_nowait(port).result(timeout)

    def close(self) -> None:
        """Drop everything and release the epoll fd and eventfd."""
        with self._lock:
            if self._closed:
                return
            self.drop_all()
            for listener in list(self._listeners.values()):
                listener.closed = True
                listener.discard_queued()
            self._listeners.clear()
            self._closed = True
            self._epoll.close()
            os.close(self._wake_fd)

    # ------------------------------------------------------------------ device side

    def set_active(self, active: bool) -> None:
        with self._lock:
            self._starved = False

    def drop_all(self) -> None:
        """Forget every connection without telling the guest (reset, restore, teardown).

        Host sockets see EOF, pending connects fail, queued accepts are closed;
        listeners stay.
        """
        with self._lock:
            for conn in list(self._conns.values()):
                self._drop(conn, VsockError("the VM was reset: vsock connections were dropped"))
            self._control.clear()
            self._ready.clear()
            for listener in self._listeners.values():
                listener.discard_queued()
            for revived in self._revived:
                revived.socket.close()
            self._revived = []

    # ------------------------------------------------------------------ carried connections

    def carry(self, host_port: int, guest_port: int, owner: OwnerState) -> None:
        """Make the live connection (host port, guest port) part of the machine's state.

        Snapshots record it while it is quiet and ``owner()`` returns a state (see
        carried.py); after restore the owner takes it back with `take_carried`.
        Raises VsockError if no such connection is live.
        """
        with self._lock:
            conn = self._conns.get((host_port, guest_port))
            if conn is None:
                raise VsockError(f"no live vsock connection host:{host_port} guest:{guest_port}")
            self._carry[conn] = owner

    def capture_connections(self) -> tuple[list[CarriedState], list[tuple[int, int]]]:
        """The carried connections that are quiet now, and the ports of every other live one."""
        with self._lock:
            kept, stale = [], []
            for conn in self._conns.values():
                owner = self._carry.get(conn)
                state = None if owner is None else carried.capture(conn, owner)
                if state is not None:
                    kept.append(state)
                else:
                    stale.append(conn.key)
            return kept, stale

    def restore_connections(self, states: list[CarriedState], stale: list[tuple[int, int]]) -> None:
        """Forget every connection, then continue `states` and reset (RST) `stale` ones.

        The guest's side of each is in the RAM restored with this state: carried ones
        go on where they were (their owners `take_carried` the new host sockets), stale
        ones are reset so the guest does not wait on a peer the host no longer has.
        """
        with self._lock:
            self.drop_all()
            for state in states:
                ours, user = socket.socketpair()
                ours.setblocking(False)
                conn = carried.revive(state, ours, self._guest_cid)
                self._register(conn)
                self._settle(conn)
                self._revived.append(
                    CarriedConnection(user, state.host_port, state.guest_port, state.owner)
                )
            for host_port, guest_port in stale:
                self._control.append(
                    VsockPacket(HOST_CID, self._guest_cid, host_port, guest_port, OP_RST)
                )
        self._wake()

    def take_carried(self) -> list[CarriedConnection]:
        """The carried connections restored since the last call (their owners' ends)."""
        with self._lock:
            revived, self._revived = self._revived, []
            return revived

    def rx_available(self) -> None:
        """The driver posted rx buffers."""
        with self._lock:
            if self._starved:
                self._starved = False
                for conn in self._conns.values():
                    self._update_interest(conn)

    def rx_starved(self) -> None:
        """No rx buffers: stop watching host sockets until the driver posts some."""
        with self._lock:
            if not self._starved:
                self._starved = True
                for conn in self._conns.values():
                    self._update_interest(conn)

    def has_pending(self) -> bool:
        """Might `next_packet` return something?"""
        return bool(self._control or self._ready)

    def next_packet(self, max_data: int) -> VsockPacket | None:
        """The next packet for the guest, with at most ``max_data`` payload bytes."""
        with self._lock:
            if self._control:
                self.stats["rst_sent"] += self._control[0].op == OP_RST
                return self._control.popleft()
            while self._ready:
                conn = next(iter(self._ready))
                del self._ready[conn]
                pkt = conn.next_packet(max_data, self._starved)
                self._update_interest(conn)
                if pkt is None:
                    continue
                if self._is_live(conn) and conn.has_work(self._starved):
                    self._ready[conn] = None  # to the back: round robin
                return pkt
            return None

    def from_guest(self, pkt: VsockPacket) -> None:
        """A packet the guest sent (header already validated for length by the device)."""
        with self._lock:
            if pkt.src_cid != self._guest_cid or pkt.dst_cid != HOST_CID:
                log.debug("vsock: dropped %r (wrong CID)", pkt)
                self.stats["dropped"] += 1
                return
            if pkt.type != VSOCK_TYPE_STREAM:
                self._rst_reply(pkt)
                return
            conn = self._conns.get((pkt.dst_port, pkt.src_port))
            if pkt.op == OP_RST:
                if conn is not None:
                    self._drop(
                        conn,
                        VsockConnectionRefused(
                            f"guest CID {self._guest_cid} port {conn.guest_port}: connection "
                            "refused (nobody listens there yet)"
                        ),
                    )
                return
            if conn is None:
                if pkt.op == OP_REQUEST:
                    self._guest_connect(pkt)
                else:
                    self._rst_reply(pkt)
                return
            conn.from_guest(pkt)
            self._settle(conn)

    def reject(self, pkt: VsockPacket) -> None:
        """A malformed packet: RST its connection (if the addresses are ours), else drop it."""
        with self._lock:
            if pkt.src_cid != self._guest_cid or pkt.dst_cid != HOST_CID:
                self.stats["dropped"] += 1
                return
            conn = self._conns.get((pkt.dst_port, pkt.src_port))
            if conn is not None:
                conn.kill(f"malformed packet {pkt!r}")
                self._settle(conn)
            else:
                self._rst_reply(pkt)

    def poll_host(self) -> None:
        """Collect host-side readiness (sockets, wakeups, close deadlines); never blocks."""
        with self._lock:
            if self._closed:
                return
            for fd, ev in self._epoll.poll(0):
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                    continue
                conn = self._by_fd.get(fd)
                if conn is None:
                    continue
                if ev & (select.EPOLLHUP | select.EPOLLERR):
                    self._unregister_fd(conn)
                    conn.host_hung_up()
                    self._settle(conn)
                    continue
                if ev & select.EPOLLOUT:
                    conn.flush()
                    self._settle(conn)
                if ev & select.EPOLLIN and self._is_live(conn):
                    conn.host_readable()
                    self._settle(conn)
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if conn.deadline is not None:
                    conn.check_deadline(now)
                    self._settle(conn)

    @property
    def next_host_port(self) -> int:
        """The host port the next host-initiated connection will try first."""
        return self._next_port

    @next_host_port.setter
    def next_host_port(self, port: int) -> None:
        if not EPHEMERAL_FIRST <= port < U32_MASK:
            raise ValueError(f"host vsock port {port} is outside {EPHEMERAL_FIRST}..{U32_MASK - 1}")
        with self._lock:
            self._next_port = port

    def connections(self) -> list[tuple[int, int, ConnectionState]]:
        """(host port, guest port, state) of every live connection, for tests and diagnostics."""
        with self._lock:
            return [(c.host_port, c.guest_port, c.state) for c in self._conns.values()]

    # ------------------------------------------------------------------ internals

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _alloc_port(self, guest_port: int) -> int:
        for _ in range(1 << 16):
            port = self._next_port
            self._next_port = port + 1 if port < U32_MASK - 1 else EPHEMERAL_FIRST
            if (port, guest_port) not in self._conns and port not in self._listeners:
                return port
        raise VsockError("no free host vsock port")

    def _new_connection(
        self, host_port: int, guest_port: int, sock: socket.socket, state: ConnectionState
    ) -> VsockConnection:
        return VsockConnection(
            host_port, guest_port, sock, state, guest_cid=self._guest_cid, buf_alloc=self.buf_alloc
        )

    def _is_live(self, conn: VsockConnection) -> bool:
        return self._conns.get(conn.key) is conn

    def _register(self, conn: VsockConnection) -> None:
        self._conns[conn.key] = conn
        self._by_fd[conn.fd] = conn
        self._epoll.register(conn.fd, 0)
        self._interest[conn] = 0

    def _unregister_fd(self, conn: VsockConnection) -> None:
        if self._interest.pop(conn, None) is not None:
            self._by_fd.pop(conn.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(conn.fd)

    def _update_interest(self, conn: VsockConnection) -> None:
        interest = self._interest.get(conn)
        if interest is None:
            return
        want = conn.wanted_events(self._starved)
        if want != interest:
            self._epoll.modify(conn.fd, want)
            self._interest[conn] = want

    def _settle(self, conn: VsockConnection) -> None:
        """Follow up on what ``conn`` decided: reset it, schedule it, re-aim its epoll events."""
        if conn.state is ConnectionState.KILLED:
            self.stats["credit_violations"] += conn.credit_violated
            if conn.rst is not None:
                self._control.append(conn.rst)
            assert conn.error is not None
            self._drop(conn, conn.error)
            return
        if conn.take_rx_request():
            self._ready[conn] = None
        self._update_interest(conn)

    def _guest_connect(self, pkt: VsockPacket) -> None:
        listener = self._listeners.get(pkt.dst_port)
        if listener is None or listener.full():
            self._rst_reply(pkt)
            return
        ours, user = socket.socketpair()
        ours.setblocking(False)
        conn = self._new_connection(pkt.dst_port, pkt.src_port, ours, ConnectionState.ESTABLISHED)
        conn.learn_peer_credit(pkt)
        self._register(conn)
        conn.queue_control(OP_RESPONSE)
        self._settle(conn)
        listener.push(user, pkt.src_port)

    def _rst_reply(self, pkt: VsockPacket) -> None:
        if pkt.op == OP_RST:
            return  # never answer RST with RST
        self._control.append(
            VsockPacket(HOST_CID, self._guest_cid, pkt.dst_port, pkt.src_port, OP_RST)
        )

    def _drop(self, conn: VsockConnection, error: VsockError) -> None:
        if not self._is_live(conn):
            return
        del self._conns[conn.key]
        self._carry.pop(conn, None)
        self._unregister_fd(conn)
        self._ready.pop(conn, None)
        conn.close(error)

    def _cancel(self, conn: VsockConnection) -> None:
        """A connect timed out on the host side: withdraw it (RST if the REQUEST went out)."""
        with self._lock:
            if conn.state is ConnectionState.CONNECTING and self._is_live(conn):
                conn.kill("connect timed out")
                self._settle(conn)
        self._wake()

    def _unlisten(self, listener: VsockListener) -> None:
        with self._lock:
            if self._listeners.get(listener.port) is listener:
                del self._listeners[listener.port]


__all__ = ["EPHEMERAL_FIRST", "MAX_CONTROL_BACKLOG", "VsockMuxer"]

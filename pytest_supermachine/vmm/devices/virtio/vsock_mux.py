"""vsock packets and the host muxer: the host end of every guest vsock connection.

The muxer is the backend of `vsock.VirtioVsock` and knows nothing about
virtqueues: the device hands it each packet the guest sent (`from_guest`) and
asks it for packets to give the guest (`has_pending` / `next_packet`). Each
connection is bridged to a host stream socket — one end of a
``socket.socketpair()``; the user gets the other end from `connect` or
`VsockListener.accept` and uses it like any socket.

Per connection (key: host port, guest port) the muxer runs the virtio-vsock
stream state machine::

    host connect:   CONNECTING --RESPONSE--> ESTABLISHED        (RST: refused)
    guest connect:  REQUEST to a listened port --> ESTABLISHED  (else RST)
    ESTABLISHED --guest SHUTDOWN(both) or RST, host socket closed--> dropped

Flow control is virtio-vsock credit, both ways:

* host → guest: at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes
  are read from the host socket and sent; with no credit the socket is simply
  not read (the user's sends block on its socket buffer) and one
  CREDIT_REQUEST is sent.
* guest → host: the muxer advertises `buf_alloc` and ``fwd_cnt`` (bytes
  written to the host socket). Data the host socket cannot take yet waits in a
  per-connection buffer, which credit bounds by `buf_alloc`: a guest that
  sends beyond its credit gets RST, so a hostile guest cannot make the host
  buffer more than ``buf_alloc`` per connection. CREDIT_UPDATE goes out once a
  quarter of the buffer has been forwarded since the guest last heard.

Threading: all state is guarded by one lock. `connect`, `connect_nowait`,
`listen`, `VsockListener.accept` and `PendingConnection.result` may be called
from any thread; they wake the event thread through an eventfd that is part of
the epoll set behind `fileno`. Everything else is called by the device, under
the transport lock, on the event thread or a vCPU thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

from ....errors import SupermachineError

log = logging.getLogger(__name__)

# struct virtio_vsock_hdr, 44 bytes, packed, little endian.
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
assert HDR_SIZE == 44

HOST_CID = 2
VSOCK_TYPE_STREAM = 1
VSOCK_TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {
    OP_REQUEST: "REQUEST",
    OP_RESPONSE: "RESPONSE",
    OP_RST: "RST",
    OP_SHUTDOWN: "SHUTDOWN",
    OP_RW: "RW",
    OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

EVENT_TRANSPORT_RESET = 0

#: Largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_DATA = 64 * 1024


@dataclass(slots=True)
class VsockPacket:
    """One vsock packet: the header fields (``len`` is ``len(data)``) and the payload."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    type: int = VSOCK_TYPE_STREAM
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    data: bytes = b""

    def header(self) -> bytes:
        return HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            len(self.data),
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & 0xFFFFFFFF,
            self.fwd_cnt & 0xFFFFFFFF,
        )

    def encode(self) -> bytes:
        return self.header() + self.data

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> tuple[VsockPacket, int]:
        """Parse a header (and the payload after it); returns (packet, header len field).

        The payload is ``raw[44:44+len]`` clipped to what `raw` holds; the
        caller compares the returned ``len`` with ``len(packet.data)``.
        Raises ValueError if `raw` is shorter than a header.
        """
        if len(raw) < HDR_SIZE:
            raise ValueError(f"{len(raw)} bytes cannot hold a {HDR_SIZE}-byte vsock header")
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt) = (
            HDR.unpack_from(raw)
        )
        data = bytes(raw[HDR_SIZE : HDR_SIZE + length])
        pkt = cls(src_cid, dst_cid, src_port, dst_port, op, type_, flags, buf_alloc, fwd_cnt, data)
        return pkt, length

    def __repr__(self) -> str:
        op = OP_NAMES.get(self.op, f"op{self.op}")
        return (
            f"VsockPacket({op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
            f"len={len(self.data)} flags={self.flags} buf_alloc={self.buf_alloc} "
            f"fwd_cnt={self.fwd_cnt})"
        )


# ----------------------------------------------------------------------------- errors


class VsockError(SupermachineError):
    """A host-side vsock operation failed: the message says which port and why."""


class VsockConnectionRefused(VsockError, ConnectionRefusedError):
    """The guest answered a connect with RST: nobody listens on that port (yet)."""


class VsockTimeout(VsockError, TimeoutError):
    """A connect or accept did not complete in time."""


# ----------------------------------------------------------------------------- connections

CONNECTING, ESTABLISHED, CLOSING = "connecting", "established", "closing"
EPHEMERAL_FIRST = 49152
#: How long a connection the host closed waits for the guest's RST before the host sends one.
CLOSE_TIMEOUT = 5.0
#: At most this many connection-less control packets (RSTs) wait for rx buffers.
MAX_CONTROL_BACKLOG = 1024
_U32 = 0xFFFFFFFF


class _Conn:
    """One stream connection: the host socket (our end) and the virtio-vsock counters."""

    __slots__ = (
        "credit_requested",
        "ctrl",
        "deadline",
        "fd",
        "fwd_cnt",
        "guest_port",
        "guest_shut",
        "host_eof",
        "host_port",
        "interest",
        "last_fwd_sent",
        "out",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "pending",
        "registered",
        "rx_cnt",
        "sock",
        "state",
        "tx_cnt",
        "user_gone",
        "wr_shut",
    )

    def __init__(self, host_port: int, guest_port: int, sock: socket.socket, state: str) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # bytes sent to the guest
        self.rx_cnt = 0  # bytes received from the guest
        self.fwd_cnt = 0  # bytes of those written to the host socket
        self.last_fwd_sent = 0  # fwd_cnt as the guest last heard it
        self.out = bytearray()  # guest data the host socket has not taken yet
        self.ctrl: deque[tuple[int, int]] = deque()  # (op, flags) to send, in order
        self.host_eof = False
        self.user_gone = False
        self.wr_shut = False
        self.guest_shut = 0
        self.credit_requested = False
        self.interest = 0
        self.registered = False
        self.pending: PendingConnection | None = None
        self.deadline: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_credit(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def __repr__(self) -> str:
        return f"<vsock conn host:{self.host_port} <-> guest:{self.guest_port} {self.state}>"


class PendingConnection:
    """A host-initiated connection on its way: `result` waits for the guest's answer.

    ``socket`` is the user's end from the start (data written to it before
    the guest answers is sent once the connection is established).
    """

    def __init__(self, muxer: VsockMuxer, conn: _Conn, user: socket.socket) -> None:
        self._muxer = muxer
        self._conn = conn
        self.socket = user
        self.guest_port = conn.guest_port
        self.host_port = conn.host_port
        self._event = threading.Event()
        self._error: VsockError | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> socket.socket:
        """The connected socket; `VsockConnectionRefused` on RST, `VsockTimeout` if no answer."""
        if not self._event.wait(timeout):
            self._muxer._cancel(self._conn)
            if not self._event.is_set() or self._error is not None:
                self.socket.close()
                raise VsockTimeout(
                    f"connecting to guest CID {self._muxer.guest_cid} port {self.guest_port}: "
                    f"no answer within {timeout}s (is the guest running and its driver up?)"
                )
        if self._error is not None:
            self.socket.close()
            raise self._error
        return self.socket

    def _complete(self, error: VsockError | None) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()


class VsockListener:
    """Guest-initiated connections to one host port; `accept` hands them out."""

    def __init__(self, muxer: VsockMuxer, port: int, backlog: int) -> None:
        self._muxer = muxer
        self.port = port
        self.backlog = backlog
        self._queue: deque[tuple[socket.socket, int]] = deque()
        self._cv = threading.Condition()
        self.closed = False

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        """The next connection: (host socket, guest port). `VsockTimeout` if none in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._queue:
                if self.closed:
                    raise VsockError(f"listener on host port {self.port} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise VsockTimeout(f"no guest connected to host port {self.port} in {timeout}s")
                self._cv.wait(remaining)
            return self._queue.popleft()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def _full(self) -> bool:
        with self._cv:
            return self.closed or len(self._queue) >= self.backlog

    def _push(self, sock: socket.socket, guest_port: int) -> None:
        with self._cv:
            self._queue.append((sock, guest_port))
            self._cv.notify()

    def _discard_queued(self) -> None:
        with self._cv:
            while self._queue:
                self._queue.popleft()[0].close()

    def close(self) -> None:
        """Stop listening: later guest REQUESTs get RST; queued connections are closed."""
        self._muxer._unlisten(self)
        with self._cv:
            self.closed = True
            self._cv.notify_all()
        self._discard_queued()

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the muxer


class VsockMuxer:
    """Host side of every vsock connection of one VM (see the module docstring)."""

    def __init__(self, guest_cid: int = 3, *, buf_alloc: int = 256 * 1024) -> None:
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self._lock = threading.RLock()
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        self._listeners: dict[int, VsockListener] = {}
        self._control: deque[VsockPacket] = deque(maxlen=MAX_CONTROL_BACKLOG)
        self._ready: dict[_Conn, None] = {}  # insertion-ordered set, for round robin
        self._readable: set[_Conn] = set()
        self._starved = False
        self._next_port = EPHEMERAL_FIRST
        self._closed = False
        #: Diagnostics: packets dropped (wrong CID), RSTs sent, credit violations.
        self.stats = {"dropped": 0, "rst_sent": 0, "credit_violations": 0}

    # ------------------------------------------------------------------ any thread

    def fileno(self) -> int:
        """The epoll fd: readable when `poll_host` has work. Level-triggered."""
        return self._epoll.fileno()

    def listen(self, port: int, backlog: int = 16) -> VsockListener:
        """Accept guest connections to host CID 2, ``port``."""
        with self._lock:
            if port in self._listeners:
                raise VsockError(f"host vsock port {port} already has a listener")
            listener = VsockListener(self, port, backlog)
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
            conn = _Conn(host_port, port, ours, CONNECTING)
            conn.pending = PendingConnection(self, conn, user)
            self._register(conn)
            self._queue_ctrl(conn, OP_REQUEST)
            pending = conn.pending
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
                listener._discard_queued()
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
            self._readable.clear()
            for listener in self._listeners.values():
                listener._discard_queued()

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
                pkt = self._conn_packet(conn, max_data)
                if pkt is None:
                    continue
                if conn.key in self._conns and self._has_work(conn):
                    self._ready[conn] = None  # to the back: round robin
                return pkt
            return None

    def from_guest(self, pkt: VsockPacket) -> None:
        """A packet the guest sent (header already validated for length by the device)."""
        with self._lock:
            if pkt.src_cid != self.guest_cid or pkt.dst_cid != HOST_CID:
                log.debug("vsock: dropped %r (wrong CID)", pkt)
                self.stats["dropped"] += 1
                return
            if pkt.type != VSOCK_TYPE_STREAM:
                self._rst_reply(pkt)
                return
            conn = self._conns.get((pkt.dst_port, pkt.src_port))
            op = pkt.op
            if op == OP_RST:
                if conn is not None:
                    self._drop(
                        conn,
                        VsockConnectionRefused(
                            f"guest CID {self.guest_cid} port {conn.guest_port}: connection "
                            "refused (nobody listens there yet)"
                        ),
                    )
                return
            if conn is None:
                if op == OP_REQUEST:
                    self._guest_connect(pkt)
                else:
                    self._rst_reply(pkt)
                return
            conn.peer_buf_alloc = pkt.buf_alloc
            conn.peer_fwd_cnt = pkt.fwd_cnt
            if conn.state == CONNECTING:
                if op == OP_RESPONSE:
                    conn.state = ESTABLISHED
                    if conn.pending is not None:
                        conn.pending._complete(None)
                    self._update_interest(conn)
                else:
                    self._reset(conn, f"expected RESPONSE, got {pkt!r}")
                return
            if op == OP_RW:
                self._guest_data(conn, pkt.data)
            elif op == OP_CREDIT_UPDATE:
                pass
            elif op == OP_CREDIT_REQUEST:
                self._queue_ctrl(conn, OP_CREDIT_UPDATE)
            elif op == OP_SHUTDOWN:
                self._guest_shutdown(conn, pkt.flags)
            else:
                self._reset(conn, f"unexpected {pkt!r} on an open connection")
                return
            if conn.key in self._conns:
                self._credit_changed(conn)

    def reject(self, pkt: VsockPacket) -> None:
        """A malformed packet: RST its connection (if the addresses are ours), else drop it."""
        with self._lock:
            if pkt.src_cid != self.guest_cid or pkt.dst_cid != HOST_CID:
                self.stats["dropped"] += 1
                return
            conn = self._conns.get((pkt.dst_port, pkt.src_port))
            if conn is not None:
                self._reset(conn, f"malformed packet {pkt!r}")
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
                    self._user_gone(conn)
                    continue
                if ev & select.EPOLLOUT:
                    self._flush(conn)
                if ev & select.EPOLLIN and conn.key in self._conns:
                    self._readable.add(conn)
                    self._ready[conn] = None
                    self._update_interest(conn)
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if conn.deadline is not None and now >= conn.deadline:
                    self._reset(conn, "the guest did not finish closing in time")

    def connections(self) -> list[tuple[int, int, str]]:
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
            self._next_port = port + 1 if port < _U32 - 1 else EPHEMERAL_FIRST
            if (port, guest_port) not in self._conns and port not in self._listeners:
                return port
        raise VsockError("no free host vsock port")

    def _register(self, conn: _Conn) -> None:
        self._conns[conn.key] = conn
        self._by_fd[conn.fd] = conn
        self._epoll.register(conn.fd, 0)
        conn.registered = True
        self._update_interest(conn)

    def _unregister_fd(self, conn: _Conn) -> None:
        if conn.registered:
            conn.registered = False
            self._by_fd.pop(conn.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(conn.fd)

    def _update_interest(self, conn: _Conn) -> None:
        if not conn.registered:
            return
        want = 0
        if (
            conn.state == ESTABLISHED
            and not conn.host_eof
            and not conn.guest_shut & SHUTDOWN_RCV
            and conn not in self._readable
            and not self._starved
            and conn.peer_credit() > 0
        ):
            want |= select.EPOLLIN
        if conn.out:
            want |= select.EPOLLOUT
        if want != conn.interest:
            self._epoll.modify(conn.fd, want)
            conn.interest = want

    def _has_work(self, conn: _Conn) -> bool:
        if conn.ctrl:
            return True
        return (
            conn.state == ESTABLISHED
            and conn in self._readable
            and not self._starved
            and (conn.peer_credit() > 0 or not conn.credit_requested)
        )

    def _credit_changed(self, conn: _Conn) -> None:
        if conn.peer_credit() > 0:
            conn.credit_requested = False
            if conn in self._readable:
                self._ready[conn] = None
        self._update_interest(conn)

    def _queue_ctrl(self, conn: _Conn, op: int, flags: int = 0) -> None:
        if op == OP_CREDIT_UPDATE and (OP_CREDIT_UPDATE, 0) in conn.ctrl:
            return
        conn.ctrl.append((op, flags))
        self._ready[conn] = None

    def _pkt(self, conn: _Conn, op: int, flags: int = 0, data: bytes = b"") -> VsockPacket:
        conn.last_fwd_sent = conn.fwd_cnt
        return VsockPacket(
            HOST_CID,
            self.guest_cid,
            conn.host_port,
            conn.guest_port,
            op,
            VSOCK_TYPE_STREAM,
            flags,
            self.buf_alloc,
            conn.fwd_cnt & _U32,
            data,
        )

    def _conn_packet(self, conn: _Conn, max_data: int) -> VsockPacket | None:
        if conn.ctrl:
            op, flags = conn.ctrl.popleft()
            return self._pkt(conn, op, flags)
        if not (conn.state == ESTABLISHED and conn in self._readable and not self._starved):
            return None
        if conn.guest_shut & SHUTDOWN_RCV or conn.host_eof:
            self._readable.discard(conn)
            return None
        credit = conn.peer_credit()
        if credit == 0:
            self._update_interest(conn)
            if conn.credit_requested:
                return None
            conn.credit_requested = True
            return self._pkt(conn, OP_CREDIT_REQUEST)
        try:
            data = conn.sock.recv(min(max_data, credit, MAX_PKT_DATA))
        except (BlockingIOError, InterruptedError):
            self._readable.discard(conn)
            self._update_interest(conn)
            return None
        except OSError:
            data = b""
            conn.user_gone = True
        if data:
            conn.tx_cnt += len(data)
            return self._pkt(conn, OP_RW, 0, data)
        # EOF from the host side: tell the guest we will send no more.
        conn.host_eof = True
        self._readable.discard(conn)
        flags = SHUTDOWN_SEND
        if conn.user_gone or _peer_closed(conn.sock):
            flags |= SHUTDOWN_RCV
            conn.state = CLOSING
            conn.deadline = time.monotonic() + CLOSE_TIMEOUT
        self._update_interest(conn)
        return self._pkt(conn, OP_SHUTDOWN, flags)

    def _guest_connect(self, pkt: VsockPacket) -> None:
        listener = self._listeners.get(pkt.dst_port)
        if listener is None or listener._full():
            self._rst_reply(pkt)
            return
        ours, user = socket.socketpair()
        ours.setblocking(False)
        conn = _Conn(pkt.dst_port, pkt.src_port, ours, ESTABLISHED)
        conn.peer_buf_alloc = pkt.buf_alloc
        conn.peer_fwd_cnt = pkt.fwd_cnt
        self._register(conn)
        self._queue_ctrl(conn, OP_RESPONSE)
        listener._push(user, pkt.src_port)

    def _guest_data(self, conn: _Conn, data: bytes) -> None:
        if not data:
            return
        if conn.guest_shut & SHUTDOWN_SEND:
            self._reset(conn, "guest sent data after SHUTDOWN(SEND)")
            return
        if conn.rx_cnt - conn.fwd_cnt + len(data) > self.buf_alloc:
            self.stats["credit_violations"] += 1
            self._reset(conn, "guest sent more than its credit")
            return
        conn.rx_cnt += len(data)
        conn.out += data
        self._flush(conn)

    def _guest_shutdown(self, conn: _Conn, flags: int) -> None:
        if conn.state == CLOSING:
            self._reset(conn, "close complete")
            return
        conn.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        if conn.guest_shut & SHUTDOWN_RCV:
            self._readable.discard(conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write buffered guest data to the host socket; finish shutdowns it was holding up."""
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._reset(conn, f"host socket closed ({errno.errorcode.get(exc.errno or 0)})")
                return
            del conn.out[:n]
            conn.fwd_cnt += n
        if not conn.out:
            if conn.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
                self._reset(conn, "guest closed the connection")  # the RST that completes it
                return
            if conn.guest_shut & SHUTDOWN_SEND and not conn.wr_shut:
                conn.wr_shut = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
        if conn.fwd_cnt - conn.last_fwd_sent >= self.buf_alloc // 4:
            self._queue_ctrl(conn, OP_CREDIT_UPDATE)
        self._update_interest(conn)

    def _user_gone(self, conn: _Conn) -> None:
        """The host user closed its socket (HUP): drain what it wrote, then close towards the guest."""
        conn.user_gone = True
        self._unregister_fd(conn)
        conn.out.clear()
        if conn.state == ESTABLISHED and not conn.host_eof and not conn.guest_shut & SHUTDOWN_RCV:
            self._readable.add(conn)
            self._ready[conn] = None
        elif conn.state == ESTABLISHED:
            self._reset(conn, "host closed the connection")
        elif conn.state == CONNECTING:
            self._reset(conn, "host gave up before the guest answered")

    def _rst_reply(self, pkt: VsockPacket) -> None:
        if pkt.op == OP_RST:
            return  # never answer RST with RST
        self._control.append(
            VsockPacket(HOST_CID, self.guest_cid, pkt.dst_port, pkt.src_port, OP_RST)
        )

    def _reset(self, conn: _Conn, why: str) -> None:
        """Send RST for ``conn`` (unless the REQUEST never left) and drop it."""
        log.debug("vsock: reset %r: %s", conn, why)
        never_sent = conn.state == CONNECTING and (OP_REQUEST, 0) in conn.ctrl
        if not never_sent:
            self._control.append(self._pkt(conn, OP_RST))
        self._drop(conn, VsockError(f"guest port {conn.guest_port}: {why}"))

    def _drop(self, conn: _Conn, error: VsockError) -> None:
        if self._conns.get(conn.key) is not conn:
            return
        del self._conns[conn.key]
        self._unregister_fd(conn)
        self._ready.pop(conn, None)
        self._readable.discard(conn)
        conn.ctrl.clear()
        conn.sock.close()
        if conn.pending is not None:
            conn.pending._complete(error)

    def _cancel(self, conn: _Conn) -> None:
        """A connect timed out on the host side: withdraw it (RST if the REQUEST went out)."""
        with self._lock:
            if conn.state == CONNECTING and self._conns.get(conn.key) is conn:
                self._reset(conn, "connect timed out")
        self._wake()

    def _unlisten(self, listener: VsockListener) -> None:
        with self._lock:
            if self._listeners.get(listener.port) is listener:
                del self._listeners[listener.port]


def _peer_closed(sock: socket.socket) -> bool:
    """Did the user close its end completely (not just shut down writing)?"""
    p = select.poll()
    p.register(sock, select.POLLOUT)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


__all__ = [
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PKT_DATA",
    "PendingConnection",
    "VsockConnectionRefused",
    "VsockError",
    "VsockListener",
    "VsockMuxer",
    "VsockPacket",
    "VsockTimeout",
]

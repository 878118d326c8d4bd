"""One vsock stream connection: its state machine, its credit accounting, its host socket.

A `VsockConnection` bridges one guest stream connection (key: host port,
guest port) to a host stream socket, one end of a ``socket.socketpair()``
whose other end the user holds. It decides everything that concerns only
itself; the muxer (`muxer.VsockMuxer`) routes packets to it, asks it for
packets to send, and watches its socket. Modelled on Firecracker's
``csm/connection.rs``.

State machine (`ConnectionState`)::

    host connect:   CONNECTING --RESPONSE--> ESTABLISHED        (anything else: KILLED)
    guest connect:  created ESTABLISHED (the muxer answers the REQUEST with RESPONSE)
    ESTABLISHED --host EOF, user gone: SHUTDOWN(both) sent--> CLOSING
    ESTABLISHED --guest SHUTDOWN(both), guest data delivered--> KILLED
    CLOSING --guest SHUTDOWN, or no answer in CLOSE_TIMEOUT--> KILLED
    any --protocol violation, host socket error--> KILLED

KILLED means "reset": the muxer sends `rst` (if the guest knows the
connection) and drops it, failing a pending connect with `error`. A guest RST
and a device reset drop a connection without any reply; the muxer does that
directly (`close`).

Credit, both ways (virtio 1.x, section 5.10.6):

* host → guest: at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes
  are read from the host socket and sent; with no credit the socket is simply
  not read (the user's sends block on its socket buffer) and one
  CREDIT_REQUEST is sent.
* guest → host: the connection advertises `buf_alloc` and ``fwd_cnt`` (bytes
  written to the host socket). Data the host socket cannot take yet waits in
  `out`, which credit bounds by `buf_alloc`: a guest that sends beyond its
  credit is reset, so a hostile guest cannot make the host buffer more than
  ``buf_alloc`` per connection. CREDIT_UPDATE goes out once a quarter of the
  buffer has been forwarded since the guest last heard.

Not thread-safe on its own: the muxer calls it under its lock. `PendingConnection`
is the exception, made for the thread that called ``connect``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import VsockError, VsockTimeout
from .packet import (
    HOST_CID,
    MAX_PKT_DATA,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    U32_MASK,
    VSOCK_TYPE_STREAM,
    VsockPacket,
)

log = logging.getLogger(__name__)

#: How long a connection the host closed waits for the guest's RST before the host sends one.
CLOSE_TIMEOUT = 5.0


class ConnectionState(enum.Enum):
    """Where a connection is in its life (see the module docstring for the transitions)."""

    #: The host asked (REQUEST queued or sent) and waits for the guest's RESPONSE.
    CONNECTING = "connecting"
    #: Data flows both ways, within credit.
    ESTABLISHED = "established"
    #: The host side is gone and the guest was told (SHUTDOWN both); waiting for its answer.
    CLOSING = "closing"
    #: Must be reset: the muxer sends `VsockConnection.rst` and drops the connection.
    KILLED = "killed"


class PendingConnection:
    """A host-initiated connection on its way: `result` waits for the guest's answer.

    ``socket`` is the user's end from the start (data written to it before
    the guest answers is sent once the connection is established). May be
    used from any thread; `cancel` withdraws the connection from the muxer.
    """

    def __init__(
        self,
        user: socket.socket,
        *,
        guest_cid: int,
        guest_port: int,
        host_port: int,
        cancel: Callable[[], None],
    ) -> None:
        self.socket = user
        self.guest_cid = guest_cid
        self.guest_port = guest_port
        self.host_port = host_port
        self._cancel = cancel
        self._event = threading.Event()
        self._error: VsockError | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> socket.socket:
        """The connected socket; `VsockConnectionRefused` on RST, `VsockTimeout` if no answer."""
        if not self._event.wait(timeout):
            self._cancel()
            if not self._event.is_set() or self._error is not None:
                self.socket.close()
                raise VsockTimeout(
                    f"connecting to guest CID {self.guest_cid} port {self.guest_port}: "
                    f"no answer within {timeout}s (is the guest running and its driver up?)"
                )
        if self._error is not None:
            self.socket.close()
            raise self._error
        return self.socket

    def complete(self, error: VsockError | None) -> None:
        """The guest answered (``error`` None) or the connection failed; the first call wins."""
        if not self._event.is_set():
            self._error = error
            self._event.set()


class VsockConnection:
    """One stream connection: the host socket (our end), the state, the credit counters."""

    __slots__ = (
        "buf_alloc",
        "credit_requested",
        "credit_violated",
        "ctrl",
        "deadline",
        "error",
        "fd",
        "fwd_cnt",
        "guest_cid",
        "guest_port",
        "guest_shut",
        "host_eof",
        "host_port",
        "last_fwd_sent",
        "out",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "pending",
        "readable",
        "rst",
        "rx_cnt",
        "rx_requested",
        "sock",
        "state",
        "tx_cnt",
        "user_gone",
        "wr_shut",
    )

    def __init__(
        self,
        host_port: int,
        guest_port: int,
        sock: socket.socket,
        state: ConnectionState,
        *,
        guest_cid: int,
        buf_alloc: int,
    ) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.guest_cid = guest_cid
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.buf_alloc = buf_alloc  # our receive buffer, advertised to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # bytes sent to the guest
        self.rx_cnt = 0  # bytes received from the guest
        self.fwd_cnt = 0  # bytes of those written to the host socket
        self.last_fwd_sent = 0  # fwd_cnt as the guest last heard it
        self.credit_requested = False
        self.credit_violated = False
        self.out = bytearray()  # guest data the host socket has not taken yet
        self.ctrl: deque[tuple[int, int]] = deque()  # (op, flags) to send, in order
        self.readable = False  # the host socket has data we have not read yet
        self.rx_requested = False  # see `take_rx_request`
        self.host_eof = False
        self.user_gone = False
        self.wr_shut = False
        self.guest_shut = 0
        self.deadline: float | None = None
        self.pending: PendingConnection | None = None
        self.rst: VsockPacket | None = None  # set by `kill`
        self.error: VsockError | None = None  # set by `kill`

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def __repr__(self) -> str:
        return f"<vsock conn host:{self.host_port} <-> guest:{self.guest_port} {self.state.value}>"

    # ------------------------------------------------------------------ what the muxer asks

    def peer_credit(self) -> int:
        """Bytes the guest can take now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def take_rx_request(self) -> bool:
        """True once after the connection got something new to send the guest (a control
        packet, host data, credit to send data with): the muxer then queues it for rx."""
        requested, self.rx_requested = self.rx_requested, False
        return requested

    def has_work(self, rx_starved: bool) -> bool:
        """Would `next_packet` return a packet?"""
        if self.ctrl:
            return True
        return (
            self.state is ConnectionState.ESTABLISHED
            and self.readable
            and not rx_starved
            and (self.peer_credit() > 0 or not self.credit_requested)
        )

    def wanted_events(self, rx_starved: bool) -> int:
        """The epoll events to watch the host socket for: in only when data could be sent on."""
        want = 0
        if (
            self.state is ConnectionState.ESTABLISHED
            and not self.host_eof
            and not self.guest_shut & SHUTDOWN_RCV
            and not self.readable
            and not rx_starved
            and self.peer_credit() > 0
        ):
            want |= select.EPOLLIN
        if self.out:
            want |= select.EPOLLOUT
        return want

    # ------------------------------------------------------------------ from the guest

    def learn_peer_credit(self, pkt: VsockPacket) -> None:
        """Every guest header carries its receive buffer and consumed count."""
        self.peer_buf_alloc = pkt.buf_alloc
        self.peer_fwd_cnt = pkt.fwd_cnt

    def from_guest(self, pkt: VsockPacket) -> None:
        """A packet of this connection other than RST (the muxer drops on RST)."""
        self.learn_peer_credit(pkt)
        op = pkt.op
        if self.state is ConnectionState.CONNECTING:
            if op == OP_RESPONSE:
                self.state = ConnectionState.ESTABLISHED
                if self.pending is not None:
                    self.pending.complete(None)
            else:
                self.kill(f"expected RESPONSE, got {pkt!r}")
            return
        if op == OP_RW:
            self._guest_data(pkt.data)
        elif op == OP_CREDIT_UPDATE:
            pass
        elif op == OP_CREDIT_REQUEST:
            self.queue_control(OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(pkt.flags)
        else:
            self.kill(f"unexpected {pkt!r} on an open connection")
            return
        if self.state is not ConnectionState.KILLED and self.peer_credit() > 0:
            self.credit_requested = False
            if self.readable:
                self.rx_requested = True

    def _guest_data(self, data: bytes) -> None:
        if not data:
            return
        if self.guest_shut & SHUTDOWN_SEND:
            self.kill("guest sent data after SHUTDOWN(SEND)")
            return
        if self.rx_cnt - self.fwd_cnt + len(data) > self.buf_alloc:
            self.credit_violated = True
            self.kill("guest sent more than its credit")
            return
        self.rx_cnt += len(data)
        self.out += data
        self.flush()

    def _guest_shutdown(self, flags: int) -> None:
        if self.state is ConnectionState.CLOSING:
            self.kill("close complete")
            return
        self.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        if self.guest_shut & SHUTDOWN_RCV:
            self.readable = False
        self.flush()

    # ------------------------------------------------------------------ from the host socket

    def flush(self) -> None:
        """Write buffered guest data to the host socket; finish shutdowns it was holding up."""
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.kill(f"host socket closed ({errno.errorcode.get(exc.errno or 0)})")
                return
            del self.out[:n]
            self.fwd_cnt += n
        if not self.out:
            if self.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
                self.kill("guest closed the connection")  # the RST that completes it
                return
            if self.guest_shut & SHUTDOWN_SEND and not self.wr_shut:
                self.wr_shut = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
        if self.fwd_cnt - self.last_fwd_sent >= self.buf_alloc // 4:
            self.queue_control(OP_CREDIT_UPDATE)

    def host_readable(self) -> None:
        """The host socket has data (or EOF) to send the guest."""
        self.readable = True
        self.rx_requested = True

    def host_hung_up(self) -> None:
        """The user closed its socket (HUP): drain what it wrote, then close towards the guest.

        The muxer has stopped watching the socket already.
        """
        self.user_gone = True
        self.out.clear()
        if self.state is ConnectionState.ESTABLISHED:
            if not self.host_eof and not self.guest_shut & SHUTDOWN_RCV:
                self.host_readable()
            else:
                self.kill("host closed the connection")
        elif self.state is ConnectionState.CONNECTING:
            self.kill("host gave up before the guest answered")

    def check_deadline(self, now: float) -> None:
        """Reset a closing connection the guest did not answer in `CLOSE_TIMEOUT`."""
        if self.deadline is not None and now >= self.deadline:
            self.kill("the guest did not finish closing in time")

    # ------------------------------------------------------------------ to the guest

    def queue_control(self, op: int, flags: int = 0) -> None:
        """Send ``op`` (no payload) at the next opportunity, after those already queued."""
        if op == OP_CREDIT_UPDATE and (OP_CREDIT_UPDATE, 0) in self.ctrl:
            return
        self.ctrl.append((op, flags))
        self.rx_requested = True

    def next_packet(self, max_data: int, rx_starved: bool) -> VsockPacket | None:
        """The next packet for the guest (at most ``max_data`` payload bytes), if any."""
        if self.ctrl:
            op, flags = self.ctrl.popleft()
            return self._packet(op, flags)
        if not (self.state is ConnectionState.ESTABLISHED and self.readable and not rx_starved):
            return None
        if self.guest_shut & SHUTDOWN_RCV or self.host_eof:
            self.readable = False
            return None
        credit = self.peer_credit()
        if credit == 0:
            if self.credit_requested:
                return None
            self.credit_requested = True
            return self._packet(OP_CREDIT_REQUEST)
        try:
            data = self.sock.recv(min(max_data, credit, MAX_PKT_DATA))
        except (BlockingIOError, InterruptedError):
            self.readable = False
            return None
        except OSError:
            data = b""
            self.user_gone = True
        if data:
            self.tx_cnt += len(data)
            return self._packet(OP_RW, 0, data)
        # EOF from the host side: tell the guest we will send no more.
        self.host_eof = True
        self.readable = False
        flags = SHUTDOWN_SEND
        if self.user_gone or _peer_closed(self.sock):
            flags |= SHUTDOWN_RCV
            self.state = ConnectionState.CLOSING
            self.deadline = time.monotonic() + CLOSE_TIMEOUT
        return self._packet(OP_SHUTDOWN, flags)

    def _packet(self, op: int, flags: int = 0, data: bytes = b"") -> VsockPacket:
        self.last_fwd_sent = self.fwd_cnt
        return VsockPacket(
            HOST_CID,
            self.guest_cid,
            self.host_port,
            self.guest_port,
            op,
            VSOCK_TYPE_STREAM,
            flags,
            self.buf_alloc,
            self.fwd_cnt & U32_MASK,
            data,
        )

    # ------------------------------------------------------------------ the end

    def kill(self, why: str) -> None:
        """Mark the connection for reset: RST to the guest unless the REQUEST never left."""
        if self.state is ConnectionState.KILLED:
            return
        log.debug("vsock: reset %r: %s", self, why)
        never_sent = self.state is ConnectionState.CONNECTING and (OP_REQUEST, 0) in self.ctrl
        self.rst = None if never_sent else self._packet(OP_RST)
        self.error = VsockError(f"guest port {self.guest_port}: {why}")
        self.state = ConnectionState.KILLED

    def close(self, error: VsockError) -> None:
        """Release the host socket (the user sees EOF) and fail a pending connect with ``error``.

        The muxer calls this once it has stopped watching the socket.
        """
        self.readable = False
        self.ctrl.clear()
        self.sock.close()
        if self.pending is not None:
            self.pending.complete(error)


def _peer_closed(sock: socket.socket) -> bool:
    """Did the user close its end completely (not just shut down writing)?"""
    p = select.poll()
    p.register(sock, select.POLLOUT)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


__all__ = ["CLOSE_TIMEOUT", "ConnectionState", "PendingConnection", "VsockConnection"]

"""A byte stream to a guest TCP port through the agent (TCP_CONNECT, docs/agent-protocol.md §4).

`open_tcp_stream` takes a freshly connected agent socket (a vsock connection
to the agent's port), exchanges HELLOs, sends one TCP_CONNECT and, once the
agent answers OK, returns the same socket: from then on it carries the guest
TCP connection's bytes unframed, both ways, with each direction's EOF passed
on as a half-close (``shutdown(SHUT_WR)`` here is a FIN to the guest server).

Why a connection of its own rather than a request on the shared agent
connection: a stream has no frame boundaries and its own flow control, so a
slow reader of one stream never stalls ``run`` on another; and the caller gets
an ordinary socket, usable with anything that takes one (``ssl``, ``http.client``).

Every byte read before OK is read exactly (header, then payload), so stream
bytes the guest server sends at once (a banner) stay in the socket for the caller.
"""

from __future__ import annotations

import math
import socket
import time

from .errors import AgentError, AgentProtocolError, AgentRemoteError, AgentTimeout
from .messages import Error, Hello, Ok, TcpConnect, decode_message
from .protocol import (
    CAP_ALL,
    CAP_TCP,
    HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    TYPE_NAMES,
    Frame,
)

#: What the host says it is in its HELLO on a stream connection.
HOST_SOFTWARE = b"pytest-supermachine host (tcp)"
#: Largest answer frame accepted before the stream starts (HELLO or ERROR are small).
_MAX_ANSWER = 4096


class AgentNoTcp(AgentError):
    """The guest's agent cannot open TCP connections (the microguest has no TCP/IP stack)."""


def open_tcp_stream(sock: socket.socket, port: int, timeout: float) -> socket.socket:
    """`sock`, an agent connection, turned into a stream to the guest's 127.0.0.1:`port`.

    Raises `AgentRemoteError` (errno ECONNREFUSED when nothing listens),
    `AgentNoTcp` for an agent without ``CAP_TCP``, `AgentTimeout` past
    `timeout` seconds, `AgentProtocolError` for a peer that is not an agent.
    On any error `sock` is closed. The returned socket is blocking.
    """
    if not 1 <= port <= 65535:
        sock.close()
        raise ValueError(f"port must be 1..65535, got {port}")
    deadline = None if timeout == math.inf else time.monotonic() + timeout
    try:
        _send(
            sock, Hello(capabilities=CAP_ALL | CAP_TCP, software=HOST_SOFTWARE).frame(0), deadline
        )
        hello = decode_message(_recv_frame(sock, deadline, "the agent's HELLO"))
        if isinstance(hello, Error):
            raise AgentProtocolError(f"the guest agent refused the handshake: {hello.text}")
        if not isinstance(hello, Hello) or hello.version != PROTOCOL_VERSION:
            raise AgentProtocolError(
                f"expected a version {PROTOCOL_VERSION} HELLO from the guest agent, got {hello!r}"
            )
        if not hello.capabilities & CAP_TCP:
            raise AgentNoTcp(
                f"the guest agent {hello.name!r} cannot connect to guest TCP ports "
                "(connect_tcp and expose need an image with a TCP/IP stack: the Linux guest; "
                "the microguest has none)"
            )
        _send(sock, TcpConnect(port).frame(1), deadline)
        answer = decode_message(_recv_frame(sock, deadline, "the answer to TCP_CONNECT"))
        if isinstance(answer, Error):
            raise AgentRemoteError(f"connect to guest port {port}", answer.errno, answer.text)
        if not isinstance(answer, Ok):
            raise AgentProtocolError(f"expected OK or ERROR for TCP_CONNECT, got {answer!r}")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _left(deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise AgentTimeout(f"the guest agent did not send {what} in time")
    return left


def _send(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    sock.settimeout(_left(deadline, "its answer"))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise AgentTimeout("the guest agent did not take the request in time") from None
    except OSError as e:
        raise AgentError(f"the guest agent connection failed: {e}") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(_left(deadline, what))
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise AgentTimeout(f"the guest agent did not send {what} in time") from None
        except OSError as e:
            raise AgentError(f"the guest agent connection failed: {e}") from None
        if not chunk:
            raise AgentError(f"the guest agent closed the connection before {what}")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, deadline: float | None, what: str) -> Frame:
    length, type_, flags, rid = HEADER.unpack(_recv_exact(sock, HEADER_SIZE, deadline, what))
    if length > _MAX_ANSWER or flags or type_ not in TYPE_NAMES:
        raise AgentProtocolError(
            f"bad frame header while waiting for {what} "
            f"(type {type_:#x}, flags {flags:#x}, {length} bytes)"
        )
    return Frame(type_, rid, _recv_exact(sock, length, deadline, what))

"""Guest TCP ports exposed on the host's loopback: ``Machine.expose(port, tls=False)``.

A `PortForward` listens on ``127.0.0.1:<free port>``; every connection it
accepts gets its own stream into the guest, opened by a callable (the
machine's ``connect_tcp``: through the agent over vsock, so no NIC is needed),
and one thread that copies bytes both ways until both directions have ended.
With TLS the host side is terminated here with the session's certificate
(`tls.session_certificates`) and plaintext goes into the guest.

Guarantees:

* the listener lives as long as the forward (until `close`, which the machine
  calls when it stops); the guest side is opened per connection, so a forward
  keeps working across ``reset()`` and restore: connections open during a reset
  are cut, later ones reach the reset guest;
* a connection the guest refuses (nothing listening) is closed at once (the
  client sees EOF or a reset), and counted in `refused`;
* EOF in either direction is passed on as a half-close, so request/response
  protocols that close their sending side work; with TLS, the guest's EOF ends
  the connection (TLS has no half-close a client could rely on).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
from collections.abc import Callable

from ..errors import SupermachineError

log = logging.getLogger(__name__)

#: How long a client may take for its TLS handshake.
TLS_HANDSHAKE_TIMEOUT = 30.0
#: How long opening the guest side of one forwarded connection may take (the machine's
#: ``connect_tcp`` timeout). The client waiting on it has its own timeout; this one only
#: stops a guest that never answers. Generous because the guest kernel may be emulated:
#: on nested PVM a restored guest's first TCP connection took 3.4 s on a quiet host.
GUEST_OPEN_TIMEOUT = 120.0
_CHUNK = 256 * 1024
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class PortForward:
    """One exposed guest port: a host listener and a thread per forwarded connection."""

    def __init__(
        self,
        guest_port: int,
        open_guest: Callable[[int], socket.socket],
        *,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not 1 <= guest_port <= 65535:
            raise ValueError(f"guest port must be 1..65535, got {guest_port}")
        self.guest_port = guest_port
        self._open_guest = open_guest
        self._tls = tls
        self.tls = tls is not None
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = False
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        #: Connections forwarded, and those the guest refused (nothing listening, guest gone).
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"supermachine-expose-{guest_port}", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _peer = self._listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            threading.Thread(
                target=self._serve,
                args=(client,),
                name=f"supermachine-expose-{self.guest_port}-conn",
                daemon=True,
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self._tls is not None:
                client.settimeout(TLS_HANDSHAKE_TIMEOUT)
                client = self._tls.wrap_socket(client, server_side=True)
        except OSError as e:  # a client that does not speak TLS, or gave up
            log.info("expose: TLS handshake for guest port %d failed: %s", self.guest_port, e)
            client.close()
            return
        try:
            guest = self._open_guest(self.guest_port)
        except (OSError, SupermachineError) as e:
            self.refused += 1
            log.info("expose: guest port %d: %s", self.guest_port, e)
            client.close()
            return
        with self._lock:
            if self._closed:
                client.close()
                guest.close()
                return
            self._open.update((client, guest))
        try:
            pump(client, guest)
        finally:
            with self._lock:
                self._open.difference_update((client, guest))
            for s in (client, guest):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        with self._lock:
            self._closed = True
            open_now, self._open = list(self._open), set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in open_now:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways between `a` and `b` (either may be TLS) until both directions end.

    One thread, non-blocking sockets and a bounded buffer per direction: a side
    that stops reading stops the other side being read, never memory growth. An
    error on either side ends both.
    """
    for s in (a, b):
        s.setblocking(False)
    pending: dict[socket.socket, bytes] = {a: b"", b: b""}  # bytes waiting to be written TO key
    ended: dict[socket.socket, bool] = {a: False, b: False}  # EOF read FROM key
    with selectors.DefaultSelector() as sel:
        while not (ended[a] and ended[b] and not pending[a] and not pending[b]):
            try:
                progressed = _step(a, b, pending, ended) | _step(b, a, pending, ended)
            except OSError:
                return
            if progressed or _tls_pending(a, b, pending, ended):
                continue
            wanted: dict[socket.socket, int] = {}
            for src, dst in ((a, b), (b, a)):
                if not pending[dst] and not ended[src]:
                    wanted[src] = wanted.get(src, 0) | selectors.EVENT_READ
                if pending[dst]:
                    wanted[dst] = wanted.get(dst, 0) | selectors.EVENT_WRITE
            for s in (a, b):
                with contextlib.suppress(KeyError):
                    sel.unregister(s)
                if wanted.get(s):
                    sel.register(s, wanted[s])
            if wanted:
                sel.select(timeout=5.0)


def _step(
    src: socket.socket,
    dst: socket.socket,
    pending: dict[socket.socket, bytes],
    ended: dict[socket.socket, bool],
) -> bool:
    """Read from `src` into the buffer for `dst` and write it on; True if anything moved."""
    moved = False
    if not pending[dst] and not ended[src]:
        try:
            data = src.recv(_CHUNK)
        except _WOULD_BLOCK:
            data = None
        if data == b"":
            ended[src] = True
            moved = True
            if isinstance(dst, ssl.SSLSocket):
                # SSLSocket.shutdown drops the TLS layer: end the connection once flushed.
                ended[dst] = True
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # EOF onwards; the other way stays open
        elif data:
            pending[dst] = data
            moved = True
    if pending[dst]:
        try:
            sent = dst.send(pending[dst])
        except _WOULD_BLOCK:
            sent = 0
        if sent:
            pending[dst] = pending[dst][sent:]
            moved = True
    return moved


def _tls_pending(
    a: socket.socket,
    b: socket.socket,
    pending: dict[socket.socket, bytes],
    ended: dict[socket.socket, bool],
) -> bool:
    """Decrypted bytes a TLS socket holds are invisible to select: read them first."""
    return any(
        isinstance(s, ssl.SSLSocket) and s.pending() and not ended[s] and not pending[d]
        for s, d in ((a, b), (b, a))
    )

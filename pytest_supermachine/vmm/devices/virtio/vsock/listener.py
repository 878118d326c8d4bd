"""A host listener: the guest-initiated connections to one host port, waiting to be accepted.

The muxer pushes each connection it accepted on the guest's REQUEST (the
user's end of its socket pair); `VsockListener.accept` hands them out, from
any thread. The muxer answers a REQUEST with RST while the backlog is full.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import VsockError, VsockTimeout


class VsockListener:
    """Guest-initiated connections to one host port; `accept` hands them out.

    ``on_close`` is called by `close` (the muxer forgets the port there).
    """

    def __init__(
        self, port: int, backlog: int, *, on_close: Callable[[VsockListener], None]
    ) -> None:
        self.port = port
        self.backlog = backlog
        self._on_close = on_close
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

    def full(self) -> bool:
        """Closed or at its backlog: the muxer refuses new guest connections."""
        with self._cv:
            return self.closed or len(self._queue) >= self.backlog

    def push(self, sock: socket.socket, guest_port: int) -> None:
        """A new connection from guest ``guest_port``; ``sock`` is the user's end."""
        with self._cv:
            self._queue.append((sock, guest_port))
            self._cv.notify()

    def discard_queued(self) -> None:
        """Close the connections nobody accepted yet (device reset, muxer closed)."""
        with self._cv:
            while self._queue:
                self._queue.popleft()[0].close()

    def close(self) -> None:
        """Stop listening: later guest REQUESTs get RST; queued connections are closed."""
        self._on_close(self)
        with self._cv:
            self.closed = True
            self._cv.notify_all()
        self.discard_queued()

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VsockListener"]

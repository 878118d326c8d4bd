"""How much of a guest command's output the host keeps, and where the rest goes.

A command's output is the guest's to choose, so the host never keeps an
unbounded amount of it: each stream is kept up to a limit and the rest is read
and dropped (the result says it was truncated), or it is streamed to a sink
the caller gave (a binary file or a callable), which then decides.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import IO

#: Bytes of stdout, and separately of stderr, that `AgentClient.run` keeps by default.
DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024

#: Where `AgentClient.run` can send a stream instead of keeping it: a binary
#: file (anything with ``write(bytes)``) or a callable taking each chunk.
OutputSink = IO[bytes] | Callable[[bytes], object]


class DefaultLimit(enum.Enum):
    """Type of `DEFAULT`: "not given, use the configured value" where ``None`` means unlimited."""

    TOKEN = 0


#: Passed for a limit: use the client's (or the machine's, or the session's) configured value.
DEFAULT = DefaultLimit.TOKEN


def check_output_limit(limit: int | None) -> None:
    """Refuse a limit that is not ``None`` or a non-negative int, naming what is accepted."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(
            f"an output limit must be a number of bytes >= 0 or None (no limit), got {limit!r}"
        )


class OutputCapture:
    """One stream of a running command: kept up to ``limit`` bytes, or fed to ``sink``."""

    __slots__ = ("_buffer", "_limit", "_write", "truncated")

    def __init__(self, sink: OutputSink | None, limit: int | None) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self.truncated = False
        if sink is None:
            self._write: Callable[[bytes], object] | None = None
        elif hasattr(sink, "write"):
            self._write = sink.write
        elif callable(sink):
            self._write = sink
        else:
            raise TypeError(
                f"an output sink must be a binary file or a callable taking bytes, got {sink!r}"
            )

    def take(self, data: bytes) -> None:
        """One chunk as it arrived from the guest."""
        if self._write is not None:
            self._write(data)
            return
        if self._limit is not None:
            room = self._limit - len(self._buffer)
            if len(data) > room:
                self.truncated = True
                data = data[: max(room, 0)]
        self._buffer += data

    def value(self) -> bytes:
        """What was kept (empty for a stream sent to a sink)."""
        return bytes(self._buffer)

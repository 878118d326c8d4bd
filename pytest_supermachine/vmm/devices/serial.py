"""The 16550 UART on COM1: the guest's console.

The register model lives in the C core (`_core.c`), because every console byte
is a port-I/O exit and must not cost a trip into Python. This class is the
host's handle on it: the bounded console log, an optional live stream, input
for the guest, and the register state that snapshots carry.
"""

from __future__ import annotations

import os
from typing import IO, Any

from .._native import ffi, lib

DEFAULT_CONSOLE_LOG_BYTES = 1 << 20


class Serial:
    """Host side of COM1 (IRQ 4): console log, live stream, input, snapshot state."""

    def __init__(self, vm: Any):
        self._vm = vm
        self._stream: IO[bytes] | int | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes the guest has written since boot (the log keeps only the newest)."""
        return int(lib.sm_serial_log_total(self._vm))

    def log(self, max_bytes: int = DEFAULT_CONSOLE_LOG_BYTES) -> bytes:
        """The newest `max_bytes` of console output (at most the log's capacity)."""
        buf = ffi.new("uint8_t[]", max_bytes)
        n = lib.sm_serial_log_read(self._vm, buf, max_bytes)
        return bytes(ffi.buffer(buf, n))

    def tail(self, lines: int = 40) -> str:
        """The last `lines` console lines as text, for error messages."""
        text = self.log(64 * 1024).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def feed(self, data: bytes) -> int:
        """Queue bytes for the guest to read from the UART; returns how many fit."""
        return int(lib.sm_serial_feed(self._vm, data, len(data)))

    def attach_stream(self, stream: IO[bytes] | int | None) -> None:
        """Also copy every console byte, as it is written, to a file object or fd (None: stop)."""
        self._stream = stream
        fd = -1 if stream is None else (stream if isinstance(stream, int) else stream.fileno())
        if isinstance(stream, int):
            os.fstat(fd)  # fail here, not silently in the run loop, on a bad fd
        lib.sm_vm_set_console_stream(self._vm, fd)

    def get_state(self) -> bytes:
        """Register state and unread input, for snapshots (the log is not state)."""
        st = ffi.new("struct sm_serial_state *")
        lib.sm_serial_get_state(self._vm, st)
        size = ffi.offsetof("struct sm_serial_state", "rx") + st.rx_count
        return bytes(ffi.buffer(st, size))

    def set_state(self, data: bytes) -> None:
        head = ffi.offsetof("struct sm_serial_state", "rx")
        if len(data) < head or len(data) - head > lib.SM_SERIAL_RX_MAX:
            raise ValueError(f"serial state of {len(data)} bytes is malformed")
        st = ffi.new("struct sm_serial_state *")
        ffi.memmove(st, data, len(data))
        st.rx_count = len(data) - head
        lib.sm_serial_set_state(self._vm, st)

"""The base of the errors pytest-supermachine raises on purpose, and the errors shared across modules.

Each message names the problem and what to do about it. Every error about the
host, the machine, the guest or an image derives from `SupermachineError`, so a
caller can catch that one class; two kinds do not: a bad argument in a call is
a plain `ValueError` or `TypeError`, and a bad setting (`SettingsError`) is a
`pytest.UsageError` so that pytest reports it as a usage error.

This module holds the errors that several modules raise or that
`pytest_supermachine` exports. An error that belongs to one concern (the agent,
snapshots, virtqueues, vsock, image references, layers, the snapshot store) is
defined next to the code that raises it and derives from a class here.

Errors that carry the guest console's last lines derive from `ConsoleTailError`,
the one place that formats the tail into the message.
"""

from __future__ import annotations

CONSOLE_TAIL_HEADER = "--- console tail ---"


class SupermachineError(Exception):
    """Base class of every error raised on purpose by pytest-supermachine."""


class ConsoleTailError(SupermachineError):
    """Mixin for errors that carry the guest console's last lines.

    Put it before the category base (``class GuestTimeout(ConsoleTailError,
    MachineError)``). The tail is appended to the message under
    `CONSOLE_TAIL_HEADER` when there is one, and kept as `console_tail` for
    callers that want it without the message.
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n{CONSOLE_TAIL_HEADER}\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class KvmUnavailableError(SupermachineError):
    """/dev/kvm is missing, not accessible, or speaks an API we do not know."""


class KvmError(SupermachineError):
    """A KVM ioctl failed; the message names the ioctl and the errno."""


class GuestMemoryError(SupermachineError):
    """A guest-physical address range is not backed by guest RAM."""


class MachineError(SupermachineError):
    """A VM lifecycle operation was used in the wrong state or failed."""


class GuestCrashed(ConsoleTailError, MachineError):
    """The guest stopped in a way nobody asked for (triple fault, emulation failure)."""


class GuestTimeout(ConsoleTailError, MachineError):
    """The guest did not reach the awaited state in time."""


class DeviceLayoutError(SupermachineError):
    """Devices asked for overlapping MMIO windows or more IRQ lines than exist."""


class GuestBuildError(SupermachineError):
    """A guest (microguest, agent, kernel) failed to build; the compiler output is attached."""

"""Every error pytest-supermachine raises on purpose.

Each message names the problem and what to do about it; callers may catch the
base class `SupermachineError` to handle all of them.
"""

from __future__ import annotations


class SupermachineError(Exception):
    """Base class of every error raised on purpose by pytest-supermachine."""


class KvmUnavailableError(SupermachineError):
    """/dev/kvm is missing, not accessible, or speaks an API we do not know."""


class KvmError(SupermachineError):
    """A KVM ioctl failed; the message names the ioctl and the errno."""


class GuestMemoryError(SupermachineError):
    """A guest-physical address range is not backed by guest RAM."""


class MachineError(SupermachineError):
    """A VM lifecycle operation was used in the wrong state or failed."""


class GuestCrashed(MachineError):
    """The guest stopped in a way nobody asked for (triple fault, emulation failure)."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class GuestTimeout(MachineError):
    """The guest did not reach the awaited state in time; carries the console tail."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class DeviceLayoutError(SupermachineError):
    """Devices asked for overlapping MMIO windows or more IRQ lines than exist."""


class GuestBuildError(SupermachineError):
    """A guest (microguest, agent, kernel) failed to build; the compiler output is attached."""

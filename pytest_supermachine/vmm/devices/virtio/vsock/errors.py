"""What the host side of vsock raises: one base class, and the two failures callers handle."""

from __future__ import annotations

from .....errors import SupermachineError


class VsockError(SupermachineError):
    """A host-side vsock operation failed: the message says which port and why."""


class VsockConnectionRefused(VsockError, ConnectionRefusedError):
    """The guest answered a connect with RST: nobody listens on that port (yet)."""


class VsockTimeout(VsockError, TimeoutError):
    """A connect or accept did not complete in time."""


__all__ = ["VsockConnectionRefused", "VsockError", "VsockTimeout"]

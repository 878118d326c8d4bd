"""pytest-supermachine: every test gets its own KVM microVM, by snapshot reset instead of boot.

Public API only; see README.md. The VMM lives in `pytest_supermachine.vmm` and
never imports pytest.
"""

from __future__ import annotations

from .errors import (
    GuestCrashed,
    GuestTimeout,
    KvmError,
    KvmUnavailableError,
    MachineError,
    SupermachineError,
)

__version__ = "0.1.0"

__all__ = [
    "GuestCrashed",
    "GuestTimeout",
    "KvmError",
    "KvmUnavailableError",
    "MachineError",
    "SupermachineError",
    "__version__",
]

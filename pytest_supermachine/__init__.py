"""pytest-supermachine: every test gets its own KVM microVM, by snapshot reset instead of boot.

Public API only; see README.md and docs/plugin.md. The VMM lives in
`pytest_supermachine.vmm` and never imports pytest.

Every name here is loaded on first access (``layer`` too, as it needs pytest), so importing
this package loads no C extension, opens no device and stays cheap for the ``supermachine``
command and for pytest, which imports it with the plugin in every session (issue 13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import (
        GuestCrashed,
        GuestTimeout,
        KvmError,
        KvmUnavailableError,
        MachineError,
        SupermachineError,
    )
    from .fixtures.factory import MicrovmFactory, SnapshotInfo
    from .fixtures.layers import LayerError, layer
    from .images.image import Image
    from .images.registry import register_image
    from .mounts import Mount
    from .vmm.agent import (
        AgentError,
        AgentFileTooLarge,
        AgentGuestStopped,
        AgentRemoteError,
        AgentTimeout,
        CommandFailed,
        RunResult,
    )
    from .vmm.machine import Machine
    from .vmm.snapshot import SnapshotError

__version__ = "0.1.0"

_LAZY = {
    "SupermachineError": ".errors",
    "KvmError": ".errors",
    "KvmUnavailableError": ".errors",
    "MachineError": ".errors",
    "GuestCrashed": ".errors",
    "GuestTimeout": ".errors",
    "Mount": ".mounts",
    "layer": ".fixtures.layers",
    "LayerError": ".fixtures.layers",
    "Machine": ".vmm.machine",
    "RunResult": ".vmm.agent",
    "AgentError": ".vmm.agent",
    "AgentTimeout": ".vmm.agent",
    "AgentRemoteError": ".vmm.agent",
    "AgentGuestStopped": ".vmm.agent",
    "AgentFileTooLarge": ".vmm.agent",
    "CommandFailed": ".vmm.agent",
    "SnapshotError": ".vmm.snapshot",
    "MicrovmFactory": ".fixtures.factory",
    "SnapshotInfo": ".fixtures.factory",
    "Image": ".images.image",
    "register_image": ".images.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    # Not cached in globals(): a reloaded submodule (pytester's in-process runs drop the
    # modules a run imported) must not leave us handing out its stale classes.
    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "AgentError",
    "AgentFileTooLarge",
    "AgentGuestStopped",
    "AgentRemoteError",
    "AgentTimeout",
    "CommandFailed",
    "GuestCrashed",
    "GuestTimeout",
    "Image",
    "KvmError",
    "KvmUnavailableError",
    "LayerError",
    "Machine",
    "MachineError",
    "MicrovmFactory",
    "Mount",
    "RunResult",
    "SnapshotError",
    "SnapshotInfo",
    "SupermachineError",
    "__version__",
    "layer",
    "register_image",
]

"""The microguest as a plugin image: always available, boots in milliseconds even under PVM.

Its base snapshot is the guest booted in AGENT mode, taken once the agent
listens (the guest's READY on the control port), with a virtio-vsock device
for the agent and a small empty scratch disk (copy-on-write, so its writes are
part of each VM's state and discarded by reset).

Until the microguest's agent mode exists the guest panics with AGENT_NOT_BUILT;
the image then boots COUNT mode instead (a guest that keeps running at CPL3), so
everything that does not talk to the agent (snapshots, layers, pool, reset,
capsules) works and is tested. `agent_available` says which one was booted; the
ELF's bytes are part of the cache key, so the base is rebuilt by itself when the
agent lands.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GuestCrashed
from .registry import Image

if TYPE_CHECKING:
    from ..vmm.machine import Machine

#: Size of the scratch disk each microguest VM gets (its base is empty; writes stay per VM).
SCRATCH_DISK_BYTES = 1 << 20


class MicroguestImage(Image):
    """The bundled freestanding test guest (see guest/microguest)."""

    name = "microguest"
    description = "freestanding test guest: agent over vsock with built-in commands, 1 MiB scratch disk"
    default_vcpus = 1
    default_mem_mib = 64

    def __init__(self) -> None:
        self.agent_available: bool | None = None  # known after the first boot

    def elf(self) -> Path:
        from ..guest.microguest import build_microguest

        return build_microguest()

    def build(self) -> str:
        return f"{self.elf()} ({self.elf().stat().st_size} bytes)"

    def _disks(self) -> tuple:
        from ..vmm.devices.hub import DiskSpec

        return (DiskSpec(path=None, size=SCRATCH_DISK_BYTES, serial="scratch"),)

    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        from ..vmm.devices.hub import spec_to_dict

        return {
            "elf": self.elf().read_bytes(),
            "cmdline": "mode=agent",
            "devices": repr([spec_to_dict(d) for d in self._disks()]) + "+vsock",
        }

    def boot(self, vcpus: int, mem_mib: int, *, timeout: float) -> Machine:
        from ..guest.microguest import GuestMode, PanicCode
        from ..vmm.machine import Machine

        elf = self.elf()
        m = Machine(vcpus=vcpus, mem_mib=mem_mib, disks=self._disks())
        try:
            m.boot_direct64(elf, mode=GuestMode.AGENT)
            m.start()
            m.wait_ready(timeout)
            self.agent_available = True
            return m
        except GuestCrashed:
            if f"code {int(PanicCode.AGENT_NOT_BUILT):#x}" not in m.exit_info().describe():
                m.stop()
                raise
            m.stop()
        # Stand-in until the agent mode lands: a guest that runs forever at CPL3.
        self.agent_available = False
        m = Machine(vcpus=vcpus, mem_mib=mem_mib, disks=self._disks())
        try:
            m.boot_direct64(elf, mode=GuestMode.COUNT)
            m.start()
            m.wait_console(r"microguest: counter at [0-9a-fx]+\n", timeout)
            return m
        except BaseException:
            m.stop()
            raise

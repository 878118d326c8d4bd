"""The microguest as a plugin image: always available, boots in milliseconds even under PVM.

Its base snapshot is the guest booted in AGENT mode, taken once the agent
listens (the guest's READY on the control port), with a virtio-vsock device
for the agent and a small empty scratch disk (copy-on-write, so its writes are
part of each VM's state and discarded by reset). The ELF's bytes are part of the
cache key, so an edit of the guest gives a new base snapshot by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SupermachineError
from ..guest.microguest import GuestMode, build_microguest
from .image import Image

if TYPE_CHECKING:
    from ..vmm.machine import Machine

#: Size of the scratch disk each microguest VM gets (its base is empty; writes stay per VM).
SCRATCH_DISK_BYTES = 1 << 20


class MicroguestImage(Image):
    """The bundled freestanding test guest (see guest/microguest)."""

    name = "microguest"
    description = (
        "freestanding test guest: agent over vsock with built-in commands, 1 MiB scratch disk"
    )
    default_vcpus = 1
    default_mem_mib = 64

    def elf(self) -> Path:
        return build_microguest()

    def build(self) -> str:
        return f"{self.elf()} ({self.elf().stat().st_size} bytes)"

    def _disks(self) -> tuple:
        from ..vmm.devices.hub import DiskSpec  # lazy: the VMM is loaded only to run VMs

        return (DiskSpec(path=None, size=SCRATCH_DISK_BYTES, serial="scratch"),)

    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        from ..vmm.devices.hub import spec_to_dict  # lazy: the VMM is loaded only to run VMs

        return {
            "elf": self.elf().read_bytes(),
            "cmdline": "mode=agent",
            "devices": repr([spec_to_dict(d) for d in self._disks()]) + "+vsock",
        }

    def prepare(self, machine: Machine) -> None:
        """The microguest's page tables are the identity map the host built: never rewritten.

        So a reset need not make KVM drop its translations (`Machine.guest_writes_page_tables`).
        """
        machine.guest_writes_page_tables = False

    def boot(
        self, vcpus: int, mem_mib: int, *, timeout: float, network: bool | Sequence[str] = False
    ) -> Machine:
        from ..vmm.machine import Machine  # lazy: the VMM is loaded only to run VMs

        if network:
            raise SupermachineError(
                "the microguest has no TCP/IP stack: network= needs the Linux image "
                "(connect_tcp and expose need one too)"
            )
        machine = Machine(vcpus=vcpus, mem_mib=mem_mib, disks=self._disks())
        self.prepare(machine)
        try:
            machine.boot_direct64(self.elf(), mode=GuestMode.AGENT)
            machine.start()
            machine.wait_ready(timeout)
        except BaseException:
            machine.stop()
            raise
        return machine

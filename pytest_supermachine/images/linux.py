"""The Linux guest as a plugin image: Debian's 6.1 kernel with our recipe, busybox and the agent.

Base snapshot = the kernel booted through its PVH entry with the initramfs
(busybox-static + the static C agent as /init), a virtio-vsock device for the
agent and a virtio-balloon with free page reporting (`LinuxImage.balloon`), taken
once the agent says READY. Built artifacts are cached by content
(kernel: recipe + source version + variant; initramfs: its bytes), and both are
part of the cache key, so a change in either gives a new base snapshot.

Under nested PVM the guest kernel runs in KVM's instruction emulator: the boot
takes minutes here (hardware KVM: well under a second), which is why tests get
a Linux VM by restoring or resetting this snapshot, never by booting.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import progress
from ..errors import GuestTimeout
from ..guest.agent.initramfs import build_initramfs
from .image import Image
from .kernel import KernelArtifacts, guest_kernel

if TYPE_CHECKING:
    from ..vmm.devices.hub import BalloonSpec, FsSpec
    from ..vmm.machine import Machine

#: Kernel arguments every variant gets. `panic=-1`: a panic reboots at once, which the
#: VMM reports (reset via i8042), instead of hanging a test until its timeout.
BASE_CMDLINE = ("panic=-1", "reboot=k", "quiet", "loglevel=4")
#: Under PVM the guest kernel runs ~1000x slower: RCU stall warnings are false alarms there,
#: and printing their stack dumps over the emulated UART stalls the guest for seconds.
PVM_CMDLINE = ("rcupdate.rcu_cpu_stall_suppress=1",)


def _progress(phase: str, elapsed: float, lines: int) -> None:
    """Kernel build progress (a build takes minutes; silence looks like a hang)."""
    detail = f"{lines} make steps" if phase == "compile" else ""
    progress.report("guest kernel build", phase, elapsed, detail)


def _wait_ready_reporting(machine: Machine, timeout: float) -> None:
    """`Machine.wait_ready`, reporting the boot's elapsed time (minutes under PVM)."""
    start = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        try:
            machine.wait_ready(max(min(progress.INTERVAL_S, left), 0.0))
            break
        except GuestTimeout as e:
            if left <= progress.INTERVAL_S:
                raise GuestTimeout(f"guest not ready after {timeout:g} s", e.console_tail) from None
            progress.report("Linux guest boot", "booting", time.monotonic() - start)
    progress.report("Linux guest boot", "done", time.monotonic() - start)


class LinuxImage(Image):
    """The bundled Linux guest (kernel recipe in images/kernel_recipe, agent in guest/agent)."""

    name = "linux"
    description = "Linux 6.1 (Debian source, our config) + busybox + the agent, in an initramfs"
    default_vcpus = 1
    default_mem_mib = 128
    supports_mounts = True

    def kernel(self) -> KernelArtifacts:
        return guest_kernel(progress=_progress)

    def initramfs(self) -> Path:
        return build_initramfs()

    def cmdline(self) -> str:
        from ..vmm.kvm import is_nested_pvm  # lazy: the VMM is loaded only to run VMs

        pvm = PVM_CMDLINE if is_nested_pvm() else ()
        return " ".join([*self.kernel().cmdline_extra, *BASE_CMDLINE, *pvm])

    def build(self) -> str:
        k = self.kernel()
        return f"kernel {k.key} ({k.variant.value}), initramfs {self.initramfs()}"

    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        return {
            "kernel": self.kernel().key,
            "initramfs": self.initramfs().read_bytes(),
            "cmdline": self.cmdline(),
            "devices": "vsock,balloon" if self.balloon() is not None else "vsock",
        }

    def seed_guest(self, machine: Machine, seed: bytes, wall_ns: int) -> str:
        """Seed the kernel's CRNG in guest RAM, then send the agent its SEED (clock, $RANDOM).

        See images/kernel_rng.py for why the host writes the CRNG key itself: the
        kernel's own reseed mixes in the TSC, so only this makes ``/dev/urandom`` and
        ``getrandom()`` repeat on replay. A kernel whose layout is not known there is
        reseeded by the agent instead: distinct per test, not reproducible
        (``"agent-reseed"``).
        """
        from ..vmm.agent import CAP_SEED  # lazy: the VMM is loaded only to run VMs
        from .kernel_rng import kernel_rng_symbols, seed_kernel_crng

        if not hasattr(self, "_rng_symbols"):  # kernel() hashes the recipe: once per image
            self._rng_symbols = kernel_rng_symbols(self.kernel().vmlinux)
        symbols = self._rng_symbols
        kernel = False
        if symbols is not None:
            with machine.parked():
                kernel = seed_kernel_crng(machine, symbols, seed)
        agent = machine.agent()
        if not agent.agent.capabilities & CAP_SEED:
            return "kernel" if kernel else "none"
        agent.seed(seed, wall_ns, reseed=not kernel, wait=False)  # see Image.seed_guest
        return "kernel+agent" if kernel else "agent-reseed"

    def disks(self) -> tuple:
        """The virtio-blk disks the guest boots with (none; images with a root disk add theirs)."""
        return ()

    def balloon(self) -> BalloonSpec | None:
        """The virtio-balloon the guest boots with: one, with free page reporting.

        Attached by default because it is cheap and pays for itself: one MMIO slot and
        three queues, no host work while the guest is idle, and memory a test freed goes
        back to the host (a pooled VM parks at about a fresh restore's footprint) instead
        of staying resident until the machine is reset or stopped. `Machine.balloon`
        needs it. Override and return None for a guest without one.
        """
        from ..vmm.devices.hub import BalloonSpec  # lazy: the VMM is loaded only to run VMs

        return BalloonSpec()

    def boot(
        self,
        vcpus: int,
        mem_mib: int,
        *,
        timeout: float,
        network: bool | Sequence[str] = False,
        mounts: Sequence[FsSpec] = (),
    ) -> Machine:
        """Boot to READY; `mounts` are mounted by the guest's init before it says READY."""
        from ..vmm.machine import Machine

        kernel, initrd = self.kernel(), self.initramfs()
        # With a NIC, boot_linux adds the ip= that configures it (no DHCP client needed).
        machine = Machine(
            vcpus=vcpus,
            mem_mib=mem_mib,
            disks=self.disks(),
            balloon=self.balloon(),
            network=network,
            mounts=tuple(mounts),
        )
        try:
            # fresh host randomness per boot, not part of the key (cmdline() is): the agent
            # seeds the guest's random pool with it (guest/agent/init.c, seed_entropy)
            cmdline = f"{self.cmdline()} sm.entropy={secrets.token_hex(32)}"
            machine.boot_linux(kernel.vmlinux, cmdline=cmdline, initrd=initrd)
            t0 = time.monotonic()
            machine.start()
            _wait_ready_reporting(machine, timeout)
            machine.timings.marks.append((0, time.monotonic() - t0))  # boot-to-ready
        except BaseException:
            machine.stop()
            raise
        return machine

"""The microguest: a freestanding C test guest, built on first use (see build.py).

Boot contract: bootinfo.h. The constants below mirror the C sources
(`enum sm_guest_mode` in bootinfo.h, the MG_* defines in microguest.h);
tests/kvm/test_microguest_build.py parses the headers so they cannot drift.

Console lines the guest prints (COM1), for host-side matching:

    microguest: boot vcpus=<n> mem=<MiB>MiB mode=<GuestMode name, lower case> arg=<arg>
    microguest: halting                                   HALT
    microguest: triple fault                              TRIPLE_FAULT
    microguest: spinning                                  SPIN
    microguest: dirtied <n> pages                         DIRTY
    microguest: cpu <apic id> online / all <n> cpus online SMP
    microguest: counter at 0x<hex> / count <n>            COUNT
    microguest: agent mode not built yet                  AGENT
    microguest: exception <vec> rip=0x<hex> err=0x<hex>   any CPU exception (then PANIC)

Numbers are decimal, addresses hex with 0x.
"""

from __future__ import annotations

from enum import IntEnum

from .build import build_microguest


class GuestMode(IntEnum):
    """`sm_boot_info.mode`: what the microguest does after its banner."""

    HALT = 0  # power off with status 0
    TRIPLE_FAULT = 1  # empty IDT + ud2: KVM_EXIT_SHUTDOWN
    SPIN = 2  # cli; jmp . at CPL0 forever (force-exit tests)
    DIRTY = 3  # add 1 to the first byte of `arg` pages from free_start at CPL3, power off 0
    SMP = 4  # INIT-SIPI-SIPI all APs, each prints, power off 0 when all are online
    COUNT = 5  # count forever at CPL3 in the u64 at free_start (rounded up to 8)
    OUT_LOOP = 6  # `arg` control-port NOPs between MARK 1 and MARK 2, power off 0
    AGENT = 7  # not built yet: PANIC AGENT_NOT_BUILT

    @property
    def banner_name(self) -> str:
        """How the banner line spells this mode (`mode=<banner_name>`)."""
        return self.name.lower()


class PanicCode(IntEnum):
    """Arguments of SM_CTL_PANIC besides CPU exception vectors (0-31)."""

    AGENT_NOT_BUILT = 0xA6
    BAD_BOOT_INFO = 0xB1
    UNKNOWN_MODE = 0xB2
    TOO_MANY_CPUS = 0xB3
    BAD_SYSCALL = 0xB4


class Mark(IntEnum):
    """Arguments of SM_CTL_MARK the microguest sends (timestamps for benchmarks)."""

    OUT_LOOP_START = 1
    OUT_LOOP_END = 2
    SMP_START = 3
    SMP_ALL_ONLINE = 4


#: Page the AP trampoline is copied to (SIPI vector 0x08): the VMM must leave it free.
TRAMPOLINE_ADDR = 0x8000
#: SMP mode refuses more vCPUs than this (PanicCode.TOO_MANY_CPUS).
MAX_CPUS = 64
#: COUNT prints a line every 2**COUNT_PRINT_SHIFT increments.
COUNT_PRINT_SHIFT = 28

__all__ = [
    "COUNT_PRINT_SHIFT",
    "MAX_CPUS",
    "TRAMPOLINE_ADDR",
    "GuestMode",
    "Mark",
    "PanicCode",
    "build_microguest",
]

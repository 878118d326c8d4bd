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
    microguest: agent listening on vsock port 5253 cid <cid> tsc_khz <khz>   AGENT
    microguest: agent: <why>                              AGENT giving up (then PANIC)
    microguest: exception <vec> rip=0x<hex> err=0x<hex>   any CPU exception (then PANIC)

Numbers are decimal, addresses hex with 0x.

AGENT mode is a test guest for the VMM's devices and the agent protocol
(docs/agent-protocol.md): it drives virtio-vsock (and virtio-blk if the boot
info lists one) itself, listens on vsock port 5253, writes SM_CTL_READY to the
control port, sends READY to host port 5254, and serves HELLO, EXEC (with
stdin, env, cwd, timeouts, KILL), PUT_FILE, GET_FILE, SEED and PING on up to 8
connections at once, each with up to 16 requests in flight. Commands are
built-ins, looked up by argv[0]'s basename (or the EXEC_SHELL line split at
white space)::

    echo ARGS / err ARGS   ARGS joined by spaces + newline on stdout / stderr
    true / false / exit N  exit 0 / 1 / N
    signal N               end as if killed by signal N
    cat [PATH...]          files (or stdin) to stdout
    write PATH             stdin into the RAM file store
    sleep MS               halt-based wait; KILL and timeouts end it
    rand [N]               N (1..64) numbers of the generator SEED set, 16 hex digits a line
    clock                  the wall clock SEED set, advanced by the TSC, in ns (0: none)
    emit N                 N bytes 0,1,..,255,0,1,.. on stdout
    dirty PAGES            +1 to the first byte of PAGES scratch pages, prints PAGES
    crash                  invalid opcode (ud2) at CPL3: exception report, PANIC 6
    hang                   cli; hlt forever: nothing answers any more
    blk-read SECTOR N      the raw bytes of N sectors on stdout
    blk-write SECTOR HEX   write the bytes HEX spells at SECTOR (rest of a sector kept)
    blk-flush / blk-id / blk-size   FLUSH, the serial (GET_ID), capacity in sectors
    env / pwd / info / help         the EXEC's env, its cwd, key=value facts, this list

An unknown command is ``ERROR ENOENT`` for an argv (like a failed execve) and
exit 127 with ``sh: NAME: not found`` on stderr for a command line (like
/bin/sh). Bad arguments exit 2 with a message on stderr. The file store is
flat (a path is just bytes; cwd is only reported by ``pwd``): 64 files of at
most 16 MiB in a heap of up to 64 MiB (half the free RAM); beyond that ENOSPC.
`dirty` uses the RAM above the heap (``info`` prints ``scratch_pages``).
It needs a TSC-deadline LAPIC timer and about 14 MiB of RAM for itself (32 MiB or
more leaves room for files and `dirty`).
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
    AGENT = 7  # serve the agent protocol over virtio-vsock (see the module docstring)

    @property
    def banner_name(self) -> str:
        """How the banner line spells this mode (`mode=<banner_name>`)."""
        return self.name.lower()


class PanicCode(IntEnum):
    """Arguments of SM_CTL_PANIC besides CPU exception vectors (0-31)."""

    AGENT_NO_VSOCK = 0xA6
    AGENT_NO_MEMORY = 0xA7
    AGENT_DEVICE = 0xA8
    AGENT_NO_TIMER = 0xA9
    AGENT_STACK = 0xAA
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
    AGENT_DEVICES = 5


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

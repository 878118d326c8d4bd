"""Seed the Linux guest kernel's CRNG from the host: the only way its output repeats on replay.

Why the host writes guest RAM instead of letting the agent reseed: Linux 6.1's
``crng_reseed`` (drivers/char/random.c) derives the new key by hashing the input
pool together with 32 bytes of RDSEED, else RDRAND, else the TSC
(``extract_entropy``); under PVM RDRAND/RDSEED are hidden from the guest
(vmm/cpuid.py), so every reseed mixes in a cycle counter, and the pool itself
holds interrupt timings. ``RNDADDENTROPY`` + ``RNDRESEEDCRNG`` therefore give two
tests different random state, never the same state twice. What *is* a function
of the machine's state is everything between reseeds: ``/dev/urandom``,
``getrandom()`` and the kernel's batched ``get_random_u32/u64`` (stack canaries,
ASLR) all expand ``base_crng.key`` by fast key erasure, per CPU, and a per-CPU
CRNG or batch whose ``generation`` differs from ``base_crng.generation``
re-derives itself from the base key on its next use.

So, with the vCPUs parked, `seed_kernel_crng` writes into the guest:

* ``base_crng.key`` = BLAKE2b(seed) (32 bytes), and ``base_crng.generation`` + 1,
  so every per-CPU CRNG and batch starts over from the seeded key;
* ``base_crng.birth`` = ``jiffies`` + `RESEED_HOLD_TICKS` (centuries), so the
  time-based reseed (which would mix the TSC in) never comes during the test. Not
  "an hour from now": the ``jiffies`` read here is the snapshot's, and the guest's
  clock (TSC) jumps ahead by the snapshot's real age at its first tick after the
  restore, so a base snapshot more than an hour old reseeded at the test's first
  read and no replay of it ever repeated a value;
* ``crng_init`` = ``CRNG_READY`` if the guest had not got there yet (a quiet
  guest without RDRAND collects entropy slowly): otherwise reads would take the
  not-ready path, which extracts from the pool (TSC again), makes ``urandom``
  gather jitter entropy and ``getrandom()`` block.

The guest then produces the same bytes for the same seed as long as it runs the
same processes in the same order on one vCPU (which CPU a process runs on, and
so which per-CPU CRNG it draws from, is up to the scheduler with more vCPUs).
No CPUID change is needed for this: RDRAND/RDSEED (hidden on PVM anyway, visible
on hardware KVM) enter the kernel's randomness only at a reseed, which is held
off; a guest program that executes RDRAND itself is not made repeatable.

Where: symbol addresses from the vmlinux symbol table (the bundled kernel is not
relocatable and has no KASLR: virtual = physical + ``__START_KERNEL_map``), and
only for the kernel versions whose layout is checked here (the ``linux_banner``
in guest RAM says ``Linux version 6.1``); for any other kernel `kernel_rng_symbols`
gives None and the agent's SEED reseeds instead (distinct, not reproducible).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vmm.machine import Machine
    from ..vmm.memory import DeviceMemory

#: x86-64 ``__START_KERNEL_map``: kernel image virtual address = physical + this.
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: ``enum crng_init``'s CRNG_READY.
CRNG_READY = 2
#: ``base_crng``: u8 key[32]; unsigned long birth; unsigned long generation; spinlock_t lock.
KEY_OFFSET, BIRTH_OFFSET, GENERATION_OFFSET = 0, 32, 40
#: How far ahead of the handout's ``jiffies`` the kernel's time-based reseed is put: 2**40
#: ticks (~350 years at HZ=100, ~35 at HZ=1000), beyond any snapshot's age, and far from
#: the sign flip of the kernel's wrap-safe ``time_after`` (2**63).
RESEED_HOLD_TICKS = 1 << 40
#: The kernel versions whose ``base_crng`` layout and ``crng_init`` this module knows.
KNOWN_BANNERS = (b"Linux version 6.1.",)
_SYMBOLS = ("base_crng", "crng_init", "jiffies", "linux_banner")


@dataclass(frozen=True)
class KernelRngSymbols:
    """Guest-physical addresses of what `seed_kernel_crng` reads and writes."""

    base_crng: int
    crng_init: int
    jiffies: int
    linux_banner: int
    hz: int = 100


def _elf_symbols(path: Path, wanted: tuple[str, ...]) -> dict[str, int]:
    """Values of the `wanted` symbols in an ELF64 little-endian file's .symtab (others ignored)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    found: dict[str, int] = {}
    for _name, sh_type, _fl, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != 2 or not entsize:  # SHT_SYMTAB
            continue
        strtab = sections[link]
        str_off, str_size = strtab[4], strtab[5]
        names = data[str_off : str_off + str_size]
        targets = {name.encode(): name for name in wanted}
        for pos in range(offset, offset + size, entsize):
            (st_name,) = struct.unpack_from("<I", data, pos)
            end = names.find(b"\0", st_name)
            name = names[st_name:end]
            if name in targets and targets[name] not in found:
                (found[targets[name]],) = struct.unpack_from("<Q", data, pos + 8)
    return found


@functools.lru_cache(maxsize=8)
def kernel_rng_symbols(vmlinux: Path, hz: int = 100) -> KernelRngSymbols | None:
    """The CRNG's symbols in `vmlinux` as guest-physical addresses, or None if any is missing."""
    try:
        found = _elf_symbols(vmlinux, _SYMBOLS)
    except (OSError, struct.error, IndexError):
        return None
    if set(found) != set(_SYMBOLS) or any(v < START_KERNEL_MAP for v in found.values()):
        return None
    return KernelRngSymbols(**{k: v - START_KERNEL_MAP for k, v in found.items()}, hz=hz)


def crng_key(seed: bytes) -> bytes:
    """The 32-byte ``base_crng.key`` a seed gives."""
    return hashlib.blake2b(seed, digest_size=32, person=b"sm-linux-crng").digest()


def _tracked_memory(machine: Machine) -> DeviceMemory:
    """Write-tracked guest memory for `machine`: host writes must reach diff snapshots and reset.

    KVM's dirty log does not see host writes, so the pages go through a `DeviceMemory`
    registered once as one of the machine's page writers.
    """
    from ..vmm.memory import DeviceMemory  # lazy: the VMM is loaded only to run VMs

    writer = getattr(machine, "_kernel_rng_memory", None)
    if writer is None:
        assert machine.memory is not None
        writer = DeviceMemory(machine.memory)
        machine.page_writers.append(writer)
        machine._kernel_rng_memory = writer  # type: ignore[attr-defined]
    return writer


def seed_kernel_crng(machine: Machine, symbols: KernelRngSymbols, seed: bytes) -> bool:
    """Make the guest kernel's CRNG a function of `seed` (see the module docstring).

    The vCPUs must be parked (the machine paused, or not started). False, with
    nothing written, if the guest's kernel is not one whose layout is known.
    """
    return write_crng_state(_tracked_memory(machine), symbols, seed)


def write_crng_state(mem: DeviceMemory, symbols: KernelRngSymbols, seed: bytes) -> bool:
    """`seed_kernel_crng` on guest memory: the writes themselves, recorded as host writes."""
    banner = mem.read(symbols.linux_banner, 32)
    if not banner.startswith(KNOWN_BANNERS):
        return False
    base = symbols.base_crng
    generation = mem.guest.read_u64(base + GENERATION_OFFSET) + 1
    if generation >= (1 << 64) - 1:  # ULONG_MAX marks a per-CPU CRNG never seeded
        generation = 0
    jiffies = mem.guest.read_u64(symbols.jiffies)
    birth = (jiffies + RESEED_HOLD_TICKS) & ((1 << 64) - 1)
    mem.write(base + KEY_OFFSET, crng_key(seed))
    mem.write(base + BIRTH_OFFSET, struct.pack("<QQ", birth, generation))
    if mem.guest.read_u32(symbols.crng_init) < CRNG_READY:
        mem.write(symbols.crng_init, struct.pack("<I", CRNG_READY))
    return True

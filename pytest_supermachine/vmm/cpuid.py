"""CPUID policy: what a guest is given on this host, and which of its bits a host must offer.

Two kinds of knowledge live here and nowhere else. What we give a guest: KVM's
supported CPUID, masked on nested PVM where the guest kernel runs in KVM's instruction
emulator (PVM_CPUID_MASK), with each vCPU's APIC id filled in. And which guest-visible
bits are features a restore host must have (the feature registers, less the bits the
VMM sets or the CPU reflects at run time), with names for the error message.
Model: Firecracker's cpu_config/x86_64/cpuid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import KvmError
from ._native import ffi, lib


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as KVM describes it."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


# (leaf, subleaf or None for all, register, bits to clear, bits to set, why)
# Under nested PVM the guest's CPL0 code runs in KVM's instruction emulator, which
# lacks XSAVE/XRSTOR, CMPXCHG16B, AVX and friends: a guest kernel that sees these
# features uses them in its own code and dies with an emulation failure.
PVM_CPUID_MASK: tuple[tuple[int, int | None, str, int, int, str], ...] = (
    (
        1,
        None,
        "ecx",
        _bit(12, 13, 17, 22, 23, 26, 27, 28, 29, 30),
        _bit(24),
        "FMA, CX16, PCID, MOVBE, POPCNT, XSAVE, OSXSAVE, AVX, F16C, RDRAND: not emulated; "
        "TSC-deadline on so the LAPIC timer needs no calibration against the PIT",
    ),
    (
        7,
        0,
        "ebx",
        _bit(0, 3, 4, 5, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 26, 27, 28, 29, 30, 31),
        0,
        "FSGSBASE, BMI1/2, HLE, RTM, AVX2, SMEP, ERMS (rep stosb emulated byte by byte), "
        "INVPCID, AVX-512*, RDSEED, ADX, SMAP, SHA: not emulated at CPL0",
    ),
    (
        7,
        0,
        "ecx",
        _bit(1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 16, 22),
        0,
        "AVX-512 VBMI*, UMIP, PKU, OSPKE, WAITPKG, GFNI, VAES, VPCLMULQDQ, LA57, RDPID",
    ),
    (
        7,
        0,
        "edx",
        _bit(2, 3, 4, 8, 14, 16, 22, 23, 24, 25, 29),
        0,
        "AVX-512 4x/VP2INTERSECT/FP16, FSRM, AMX, ARCH_CAPABILITIES",
    ),
    (7, 1, "eax", 0xFFFFFFFF, 0, "AVX-VNNI, AVX512-BF16 and later extensions"),
    (0xD, None, "eax", 0xFFFFFFFF, 0, "XSAVE state components: XSAVE is hidden"),
    (0xD, None, "ebx", 0xFFFFFFFF, 0, "XSAVE area sizes"),
    (0xD, None, "ecx", 0xFFFFFFFF, 0, "XSAVE area sizes"),
    (0xD, None, "edx", 0xFFFFFFFF, 0, "XSAVE state components"),
    (0x80000001, None, "ecx", _bit(5, 6, 11, 16, 21), 0, "ABM/LZCNT, SSE4A, XOP, FMA4, TBM"),
    (
        0x80000008,
        None,
        "ebx",
        0,
        _bit(2),
        "XSAVEERPTR set: Linux's AMD FXSAVE-leak workaround would run FNCLEX, which is not emulated",
    ),
)


class CpuidTable:
    """The CPUID leaves given to a guest (a copy; KVM never sees changes until `set_cpuid`)."""

    def __init__(self, entries: Iterable[CpuidEntry]):
        self.entries: list[CpuidEntry] = list(entries)

    def find(self, function: int, index: int = 0) -> CpuidEntry | None:
        for e in self.entries:
            if e.function == function and (
                e.index == index or not (e.flags & lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            ):
                return e
        return None

    def masked(self, rules: Sequence[tuple[int, int | None, str, int, int, str]]) -> CpuidTable:
        """A copy with each rule's bits cleared and set (see PVM_CPUID_MASK)."""
        out = []
        for e in self.entries:
            for leaf, sub, reg, clear, setbits, _why in rules:
                if e.function == leaf and (sub is None or e.index == sub):
                    value = (getattr(e, reg) & ~clear) | setbits
                    e = replace(e, **{reg: value & 0xFFFFFFFF})
            out.append(e)
        return CpuidTable(out)

    def for_guest(self, pvm: bool) -> CpuidTable:
        """What to give a guest on this host: everything on hardware KVM, masked on nested PVM."""
        return self.masked(PVM_CPUID_MASK) if pvm else CpuidTable(self.entries)

    def for_vcpu(self, index: int, count: int) -> CpuidTable:
        """A copy naming vCPU `index` of `count`: its APIC id in leaves 1, 0xB and 0x1F."""
        out = []
        for e in self.entries:
            if e.function == 1:
                ebx = (e.ebx & 0x0000FFFF) | ((min(count, 255)) << 16) | ((index & 0xFF) << 24)
                e = replace(e, ebx=ebx)
            elif e.function in (0xB, 0x1F):
                e = replace(e, edx=index)
            out.append(e)
        return CpuidTable(out)

    def rows(self) -> list[list[int]]:
        """[[function, index, eax, ebx, ecx, edx], ...]: the JSON form host facts record."""
        return [[e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] for e in self.entries]

    def to_bytes(self) -> bytes:
        """KVM's `struct kvm_cpuid2` with its entries (what snapshots record)."""
        return bytes(ffi.buffer(self.to_cdata()))

    @classmethod
    def from_cdata(cls, p: Any) -> CpuidTable:
        return cls(
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (p.entries[i] for i in range(p.nent))
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CpuidTable:
        header = ffi.sizeof("struct kvm_cpuid2")
        entry = ffi.sizeof("struct kvm_cpuid_entry2")
        if len(data) < header or (len(data) - header) % entry:
            raise KvmError(f"CPUID blob of {len(data)} bytes is not a kvm_cpuid2")
        n = (len(data) - header) // entry
        p = ffi.new("struct kvm_cpuid2 *", {"entries": n})
        ffi.memmove(p, data, len(data))
        if p.nent != n:
            raise KvmError(f"CPUID blob says {p.nent} entries but holds {n}")
        return cls.from_cdata(p)

    def to_cdata(self) -> Any:
        """A fresh `struct kvm_cpuid2 *` holding these entries (what KVM_SET_CPUID2 takes)."""
        p = ffi.new("struct kvm_cpuid2 *", {"entries": len(self.entries)})
        p.nent = len(self.entries)
        for i, e in enumerate(self.entries):
            d = p.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        return p

    def vendor(self) -> str:
        e = self.find(0)
        if e is None:
            return "unknown"
        return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
            "ascii", "replace"
        )

    def signature(self) -> tuple[int, int, int]:
        """(family, model, stepping) from leaf 1, with the extended fields folded in."""
        e = self.find(1)
        if e is None:
            return (0, 0, 0)
        eax = e.eax
        family = (eax >> 8) & 0xF
        model = (eax >> 4) & 0xF
        if family == 0xF:
            family += (eax >> 20) & 0xFF
        if family >= 6:
            model += ((eax >> 16) & 0xF) << 4
        return (family, model, eax & 0xF)


# ----------------------------------------------------------------------------- restore checks

FEATURE_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"),
    (0x7, 0): ("ebx", "ecx", "edx"),
    (0x7, 1): ("eax",),
    (0xD, 0): ("eax", "edx"),  # XCR0 state components
    (0xD, 1): ("eax",),
    (0x80000001, 0): ("ecx", "edx"),
    (0x80000008, 0): ("ebx",),
}
"""CPUID registers that are feature bit masks: a guest bit the host lacks cannot be restored."""

_CPUID_DYNAMIC_BITS: dict[tuple[int, int, str], int] = {
    # TSC-deadline (a KVM capability, set by the VMM), OSXSAVE (mirrors CR4), hypervisor
    (0x1, 0, "ecx"): (1 << 24) | (1 << 27) | (1 << 31),
    (0x1, 0, "edx"): 1 << 9,  # APIC: mirrors the APIC enable bit
    (0x7, 0, "ecx"): 1 << 4,  # OSPKE mirrors CR4.PKE
    (0x80000008, 0, "ebx"): 1 << 2,  # XSAVEERPTR: set by the VMM on PVM (PVM_CPUID_MASK)
}
"""Bits the VMM sets or the CPU reflects at run time; KVM_GET_SUPPORTED_CPUID need not list them."""

_CPUID_BIT_NAMES: dict[tuple[int, int, str], dict[int, str]] = {
    (0x1, 0, "ecx"): {
        0: "sse3",
        1: "pclmulqdq",
        9: "ssse3",
        12: "fma",
        13: "cx16",
        19: "sse4_1",
        20: "sse4_2",
        21: "x2apic",
        22: "movbe",
        23: "popcnt",
        25: "aes",
        26: "xsave",
        28: "avx",
        29: "f16c",
        30: "rdrand",
    },
    (0x1, 0, "edx"): {
        0: "fpu",
        4: "tsc",
        5: "msr",
        8: "cx8",
        15: "cmov",
        19: "clflush",
        23: "mmx",
        24: "fxsr",
        25: "sse",
        26: "sse2",
    },
    (0x7, 0, "ebx"): {
        0: "fsgsbase",
        3: "bmi1",
        4: "hle",
        5: "avx2",
        7: "smep",
        8: "bmi2",
        9: "erms",
        10: "invpcid",
        11: "rtm",
        16: "avx512f",
        18: "rdseed",
        19: "adx",
        20: "smap",
        23: "clflushopt",
        24: "clwb",
        29: "sha",
    },
    (0x7, 0, "ecx"): {
        1: "avx512vbmi",
        2: "umip",
        3: "pku",
        8: "gfni",
        9: "vaes",
        10: "vpclmulqdq",
        22: "rdpid",
    },
    (0x7, 0, "edx"): {
        4: "fsrm",
        10: "md_clear",
        26: "ibrs",
        27: "stibp",
        29: "arch_capabilities",
        31: "ssbd",
    },
    (0xD, 0, "eax"): {
        0: "x87",
        1: "sse",
        2: "avx",
        5: "opmask",
        6: "zmm_hi256",
        7: "hi16_zmm",
        9: "pkru",
    },
    (0xD, 1, "eax"): {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    (0x80000001, 0, "ecx"): {0: "lahf_lm", 5: "abm", 8: "prefetchw"},
    (0x80000001, 0, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}

_REGISTERS = ("eax", "ebx", "ecx", "edx")


CpuidRegisters = dict[tuple[int, int], tuple[int, int, int, int]]
"""{(function, index): (eax, ebx, ecx, edx)}: CPUID rows as a lookup table."""


def parse_rows(entries: object) -> CpuidRegisters | None:
    """[[function, index, eax, ebx, ecx, edx], ...] -> {(function, index): regs}, None if malformed.

    The rows are what host facts record (`CpuidTable.rows()`); they come from a file, so
    every value is checked to be a 32-bit unsigned int.
    """
    if not isinstance(entries, list):
        return None
    table = {}
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 6
            or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 32 for x in entry
            )
        ):
            return None
        table[(entry[0], entry[1])] = (entry[2], entry[3], entry[4], entry[5])
    return table


def missing_features(guest: CpuidRegisters, supported: CpuidRegisters) -> list[str]:
    """One line per feature register where the guest saw bits `supported` lacks (named)."""
    lines = []
    for (function, index), registers in FEATURE_REGISTERS.items():
        guest_regs = guest.get((function, index))
        if guest_regs is None:
            continue
        host_regs = supported.get((function, index), (0, 0, 0, 0))
        for reg in registers:
            r = _REGISTERS.index(reg)
            missing = (
                guest_regs[r] & ~host_regs[r] & ~_CPUID_DYNAMIC_BITS.get((function, index, reg), 0)
            )
            if missing:
                names = _CPUID_BIT_NAMES.get((function, index, reg), {})
                bits = [
                    f"{names[b]} (bit {b})" if b in names else f"bit {b}"
                    for b in range(32)
                    if missing >> b & 1
                ]
                lines.append(
                    f"guest CPUID {function:#x}.{index} {reg}: {', '.join(bits)} not offered by this host"
                )
    return lines

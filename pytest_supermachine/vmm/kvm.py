"""The KVM API: the system fd, VMs, vCPUs, and the CPUID we give the guest.

Thin, typed wrappers over the ioctls in <linux/kvm.h>; struct layouts come from
the kernel header through cffi (see _build.py), so nothing here re-declares a
kernel struct by hand. Every failing ioctl raises `KvmError` naming the call.
Opaque state (FPU, XSAVE, LAPIC, irqchips, ...) is handed out as `bytes` in the
kernel's own layout: that is what snapshots store and give back.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import KvmError, KvmUnavailableError
from ._native import ffi, lib

DEFAULT_KVM_DEVICE = "/dev/kvm"
KVM_DEVICE_ENV = "SUPERMACHINE_KVM_DEVICE"
PVM_MODULE_PATH = Path("/sys/module/kvm_pvm")

UDEV_FIX = (
    "give your user access to it, e.g. add yourself to the 'kvm' group "
    "(sudo usermod -aG kvm $USER, then log in again), or install the udev rule "
    "KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0666\" in /etc/udev/rules.d/99-kvm.rules "
    "and run: sudo udevadm control --reload-rules && sudo udevadm trigger"
)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KvmError(f"{what} failed: {os.strerror(-rc)} (errno {-rc})")
    return rc


def _new(ctype: str, data: bytes | None = None) -> Any:
    p = ffi.new(ctype)
    if data is not None:
        size = ffi.sizeof(p[0])
        if len(data) != size:
            raise KvmError(f"{ctype}: expected {size} bytes of state, got {len(data)}")
        ffi.memmove(p, data, size)
    return p


def _bytes(p: Any) -> bytes:
    return bytes(ffi.buffer(p))


def kvm_device_path() -> str:
    """The KVM device to open: `$SUPERMACHINE_KVM_DEVICE` or /dev/kvm."""
    return os.environ.get(KVM_DEVICE_ENV) or DEFAULT_KVM_DEVICE


def is_nested_pvm() -> bool:
    """True when /dev/kvm is provided by kvm_pvm (guest CPL0 emulated, see DESIGN.md §7)."""
    return PVM_MODULE_PATH.exists()


# ----------------------------------------------------------------------------- CPUID


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
    (1, None, "ecx", _bit(12, 13, 17, 22, 23, 26, 27, 28, 29, 30), _bit(24),
     "FMA, CX16, PCID, MOVBE, POPCNT, XSAVE, OSXSAVE, AVX, F16C, RDRAND: not emulated; "
     "TSC-deadline on so the LAPIC timer needs no calibration against the PIT"),
    (7, 0, "ebx", _bit(0, 3, 4, 5, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 26, 27, 28, 29, 30, 31),
     0, "FSGSBASE, BMI1/2, HLE, RTM, AVX2, SMEP, ERMS (rep stosb emulated byte by byte), "
     "INVPCID, AVX-512*, RDSEED, ADX, SMAP, SHA: not emulated at CPL0"),
    (7, 0, "ecx", _bit(1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 16, 22), 0,
     "AVX-512 VBMI*, UMIP, PKU, OSPKE, WAITPKG, GFNI, VAES, VPCLMULQDQ, LA57, RDPID"),
    (7, 0, "edx", _bit(2, 3, 4, 8, 14, 16, 22, 23, 24, 25, 29), 0,
     "AVX-512 4x/VP2INTERSECT/FP16, FSRM, AMX, ARCH_CAPABILITIES"),
    (7, 1, "eax", 0xFFFFFFFF, 0, "AVX-VNNI, AVX512-BF16 and later extensions"),
    (0xD, None, "eax", 0xFFFFFFFF, 0, "XSAVE state components: XSAVE is hidden"),
    (0xD, None, "ebx", 0xFFFFFFFF, 0, "XSAVE area sizes"),
    (0xD, None, "ecx", 0xFFFFFFFF, 0, "XSAVE area sizes"),
    (0xD, None, "edx", 0xFFFFFFFF, 0, "XSAVE state components"),
    (0x80000001, None, "ecx", _bit(5, 6, 11, 16, 21), 0, "ABM/LZCNT, SSE4A, XOP, FMA4, TBM"),
    (0x80000008, None, "ebx", 0, _bit(2),
     "XSAVEERPTR set: Linux's AMD FXSAVE-leak workaround would run FNCLEX, which is not emulated"),
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

    def to_bytes(self) -> bytes:
        """KVM's `struct kvm_cpuid2` with its entries (what snapshots record)."""
        return _bytes(self._cdata())

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

    def _cdata(self) -> Any:
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


# ----------------------------------------------------------------------------- system


class Kvm:
    """The open KVM system device: capabilities, supported CPUID, and VM creation."""

    def __init__(self, path: str | None = None):
        self.path = path or kvm_device_path()
        self.fd = _open_kvm_device(self.path)
        try:
            self.api_version = _check(
                lib.sm_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION"
            )
            if self.api_version != lib.KVM_API_VERSION:
                raise KvmUnavailableError(
                    f"{self.path} speaks KVM API version {self.api_version}, but this VMM needs "
                    f"version {lib.KVM_API_VERSION}: update the host kernel"
                )
            for cap, name in (
                (lib.KVM_CAP_IRQCHIP, "IRQCHIP"),
                (lib.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
                (lib.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
            ):
                if not self.check_extension(cap):
                    raise KvmUnavailableError(
                        f"{self.path} lacks KVM_CAP_{name}, which this VMM needs: "
                        "use a newer host kernel"
                    )
            self.vcpu_mmap_size = _check(
                lib.sm_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE"
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.pvm = is_nested_pvm()
        self._cpuid: CpuidTable | None = None
        self._msr_indices: list[int] | None = None

    def check_extension(self, cap: int) -> int:
        return max(lib.sm_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap), 0)

    def supported_cpuid(self) -> CpuidTable:
        """Everything this KVM can give a guest (cached; callers get the same table)."""
        if self._cpuid is None:
            n = 128
            while True:
                p = ffi.new("struct kvm_cpuid2 *", {"entries": n})
                p.nent = n
                rc = lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, p)
                if rc == -errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                _check(rc, "KVM_GET_SUPPORTED_CPUID")
                break
            self._cpuid = CpuidTable.from_cdata(p)
        return self._cpuid

    def guest_cpuid(self) -> CpuidTable:
        """The CPUID we give guests on this host (masked on nested PVM)."""
        return self.supported_cpuid().for_guest(self.pvm)

    def msr_indices(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        if self._msr_indices is None:
            n = 64
            while True:
                p = ffi.new("struct kvm_msr_list *", {"indices": n})
                p.nmsrs = n
                rc = lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, p)
                if rc == -errno.E2BIG and n < 8192:
                    n = max(n * 2, p.nmsrs)
                    continue
                _check(rc, "KVM_GET_MSR_INDEX_LIST")
                break
            self._msr_indices = [p.indices[i] for i in range(p.nmsrs)]
        return list(self._msr_indices)

    def create_vm(self) -> Vm:
        fd = _check(lib.sm_ioctl_int(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_kvm_device(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KvmUnavailableError(
            f"{path} does not exist: this machine has no KVM. Enable virtualization "
            "(VT-x/AMD-V) in the firmware and load the module (sudo modprobe kvm_intel or "
            "kvm_amd); in a cloud VM pick an instance type with nested virtualization"
        ) from None
    except PermissionError:
        raise KvmUnavailableError(f"permission denied looking at {path}: {UDEV_FIX}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise KvmUnavailableError(f"{path} is not a character device: it cannot be KVM")
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise KvmUnavailableError(
            f"permission denied opening {path} (owner uid {st.st_uid}, gid {st.st_gid}, "
            f"mode {stat.S_IMODE(st.st_mode):o}): {UDEV_FIX}"
        ) from None
    except OSError as e:
        raise KvmUnavailableError(f"cannot open {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- VM


class Vm:
    """A KVM virtual machine: memory slots, in-kernel irqchip and PIT, eventfds, dirty log."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, *, log_dirty: bool = False
    ) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, gpa, size, host_address
        r.flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r),
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, {size >> 20} MiB at {gpa:#x})")

    def set_tss_addr(self, addr: int) -> None:
        _check(lib.sm_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        _check(lib.sm_ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        p = ffi.new("struct kvm_pit_config *")
        p.flags = lib.KVM_PIT_SPEAKER_DUMMY
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, p), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        p = ffi.new("struct kvm_irq_level *")
        p.irq, p.level = irq, level
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, p), f"KVM_IRQ_LINE({irq})")

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        p = ffi.new("struct kvm_irqfd *")
        p.fd, p.gsi = eventfd, gsi
        p.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_IRQFD, p), f"KVM_IRQFD(gsi {gsi})")

    def ioeventfd(
        self, eventfd: int, addr: int, length: int, *, datamatch: int | None = None,
        pio: bool = False, deassign: bool = False,
    ) -> None:
        p = ffi.new("struct kvm_ioeventfd *")
        p.fd, p.addr, p.len = eventfd, addr, length
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            p.datamatch = datamatch
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        p.flags = flags
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, p), f"KVM_IOEVENTFD({addr:#x})")

    def get_irqchip(self, chip_id: int) -> bytes:
        p = ffi.new("struct kvm_irqchip *")
        p.chip_id = chip_id
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, p), f"KVM_GET_IRQCHIP({chip_id})")
        return _bytes(p)

    def set_irqchip(self, data: bytes) -> None:
        p = _new("struct kvm_irqchip *", data)
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_IRQCHIP, p), "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        p = ffi.new("struct kvm_pit_state2 *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_PIT2, p), "KVM_GET_PIT2")
        return _bytes(p)

    def set_pit2(self, data: bytes) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_PIT2, _new("struct kvm_pit_state2 *", data)),
               "KVM_SET_PIT2")

    def get_clock(self) -> bytes:
        p = ffi.new("struct kvm_clock_data *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_CLOCK, p), "KVM_GET_CLOCK")
        return _bytes(p)

    def set_clock(self, data: bytes) -> None:
        p = _new("struct kvm_clock_data *", data)
        p.flags = 0  # only the clock value is settable; the other flags are read-only facts
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_CLOCK, p), "KVM_SET_CLOCK")

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty bitmap (bit n = page n written by the guest since the last call)."""
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        p = ffi.new("struct kvm_dirty_log *")
        p.slot = slot
        p.dirty_bitmap = bitmap
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, p), f"KVM_GET_DIRTY_LOG({slot})")
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _check(lib.sm_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index), f"KVM_CREATE_VCPU({index})")
        try:
            return Vcpu(self, index, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ----------------------------------------------------------------------------- vCPU


class Vcpu:
    """One vCPU: its fd, its shared `kvm_run` page, and get/set of every piece of its state."""

    def __init__(self, vm: Vm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_map)
        self.run = ffi.cast("struct kvm_run *", self._run_buf)

    # --- registers
    def get_regs(self) -> Any:
        p = ffi.new("struct kvm_regs *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_REGS, p), "KVM_GET_REGS")
        return p

    def set_regs(self, p: Any) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_REGS, p), "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        p = ffi.new("struct kvm_sregs *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_SREGS, p), "KVM_GET_SREGS")
        return p

    def set_sregs(self, p: Any) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_SREGS, p), "KVM_SET_SREGS")

    # --- opaque state blobs, in the kernel's layout
    def _get(self, ctype: str, request: int, name: str) -> bytes:
        p = ffi.new(ctype)
        _check(lib.sm_ioctl_ptr(self.fd, request, p), name)
        return _bytes(p)

    def _set(self, ctype: str, request: int, name: str, data: bytes) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, request, _new(ctype, data)), name)

    def get_regs_bytes(self) -> bytes:
        return _bytes(self.get_regs())

    def set_regs_bytes(self, data: bytes) -> None:
        self.set_regs(_new("struct kvm_regs *", data))

    def get_sregs_bytes(self) -> bytes:
        return _bytes(self.get_sregs())

    def set_sregs_bytes(self, data: bytes) -> None:
        self.set_sregs(_new("struct kvm_sregs *", data))

    def get_fpu(self) -> bytes:
        return self._get("struct kvm_fpu *", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        self._set("struct kvm_fpu *", lib.KVM_SET_FPU, "KVM_SET_FPU", data)

    def xsave_size(self) -> int:
        return self.vm.kvm.check_extension(lib.KVM_CAP_XSAVE2) or 4096

    def get_xsave(self) -> bytes:
        size = self.xsave_size()
        buf = ffi.new("char[]", max(size, 4096))
        request = lib.KVM_GET_XSAVE2 if self.vm.kvm.check_extension(lib.KVM_CAP_XSAVE2) else lib.KVM_GET_XSAVE
        _check(lib.sm_ioctl_ptr(self.fd, request, buf), "KVM_GET_XSAVE")
        return bytes(ffi.buffer(buf))

    def set_xsave(self, data: bytes) -> None:
        buf = ffi.new("char[]", max(len(data), 4096))
        ffi.memmove(buf, data, len(data))
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_XSAVE, buf), "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        return self._get("struct kvm_xcrs *", lib.KVM_GET_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        self._set("struct kvm_xcrs *", lib.KVM_SET_XCRS, "KVM_SET_XCRS", data)

    def get_lapic(self) -> bytes:
        return self._get("struct kvm_lapic_state *", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, data: bytes) -> None:
        self._set("struct kvm_lapic_state *", lib.KVM_SET_LAPIC, "KVM_SET_LAPIC", data)

    def get_mp_state(self) -> int:
        p = ffi.new("struct kvm_mp_state *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, p), "KVM_GET_MP_STATE")
        return int(p.mp_state)

    def set_mp_state(self, state: int) -> None:
        p = ffi.new("struct kvm_mp_state *")
        p.mp_state = state
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, p), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> bytes:
        return self._get("struct kvm_vcpu_events *", lib.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        self._set("struct kvm_vcpu_events *", lib.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", data)

    def get_debugregs(self) -> bytes:
        return self._get("struct kvm_debugregs *", lib.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        self._set("struct kvm_debugregs *", lib.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", data)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        p = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        p.nmsrs = len(indices)
        for i, index in enumerate(indices):
            p.entries[i].index = index
        n = _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, p), "KVM_GET_MSRS")
        # KVM stops at the first MSR it cannot read; return what it read.
        return {p.entries[i].index: p.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        p = ffi.new("struct kvm_msrs *", {"entries": len(values)})
        p.nmsrs = len(values)
        for i, (index, value) in enumerate(values.items()):
            p.entries[i].index, p.entries[i].data = index, value
        n = _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, p), "KVM_SET_MSRS")
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(f"KVM_SET_MSRS stopped at MSR {bad:#x} ({n} of {len(values)} set)")

    def get_cpuid(self) -> CpuidTable:
        """The CPUID this vCPU currently presents (what the guest sees)."""
        p = ffi.new("struct kvm_cpuid2 *", {"entries": 256})
        p.nent = 256
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_CPUID2, p), "KVM_GET_CPUID2")
        return CpuidTable.from_cdata(p)

    def set_cpuid(self, table: CpuidTable) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, table._cdata()), "KVM_SET_CPUID2")

    def close(self) -> None:
        if self.fd >= 0:
            ffi.release(self._run_buf)
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

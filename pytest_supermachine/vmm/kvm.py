"""The KVM API: the system fd, VMs and vCPUs (ioctls only; CPUID policy is in cpuid.py).

Thin, typed wrappers over the ioctls in <linux/kvm.h>; struct layouts come from
the kernel header through cffi (see _build.py), so nothing here re-declares a
kernel struct by hand. Every failing ioctl raises `KvmError` naming the call.
Opaque state (FPU, XSAVE, LAPIC, irqchips, ...) is read as `bytes` in the kernel's
own layout (`read_struct`): that is what snapshots store and give back.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import KvmError, KvmUnavailableError
from ._native import ffi, lib
from .cpuid import CpuidTable
from .kvm_device import (  # the device as a file (no cffi); re-exported
    is_nested_pvm,
    kvm_device_path,
    open_kvm_device,
)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KvmError(f"{what} failed: {os.strerror(-rc)} (errno {-rc})")
    return rc


#: Offset of the Interrupt Request Register (8 x 32 bits, 16 bytes apart) in the LAPIC page.
_LAPIC_IRR = 0x200


def read_struct(
    fd: int, ctype: str, request: int, what: str, fields: Mapping[str, int] | None = None
) -> bytes:
    """GET one fixed-size kernel struct from a VM or vCPU fd, in the kernel's layout.

    `fields` are set before the call (e.g. which irqchip to read). This is how vmstate
    captures every fixed-size piece of state; the SET side is its ioctl batch.
    """
    p = ffi.new(ctype + " *", dict(fields or {}))
    _check(lib.sm_ioctl_ptr(fd, request, p), what)
    return bytes(ffi.buffer(p))


# ----------------------------------------------------------------------------- system


class Kvm:
    """The open KVM system device: capabilities, supported CPUID, and VM creation."""

    def __init__(self, path: str | None = None):
        self.path = path or kvm_device_path()
        self.fd = open_kvm_device(self.path)
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
        self._saveable_msrs: list[int] | None = None

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

    def saveable_msrs(self, vcpu: Vcpu) -> list[int]:
        """The MSRs of the index list a vCPU can actually read (probed once, on the first vCPU asked).

        KVM_GET_MSR_INDEX_LIST names MSRs that KVM_GET_MSRS then refuses on some hosts
        (nested PVM among them); a snapshot records only the ones that read back.
        """
        if self._saveable_msrs is None:
            self._saveable_msrs = [i for i in self.msr_indices() if i in vcpu.get_msrs([i])]
        return list(self._saveable_msrs)

    def create_vm(self) -> Vm:
        fd = _check(lib.sm_ioctl_int(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ----------------------------------------------------------------------------- VM


class Vm:
    """A KVM virtual machine: memory slots, in-kernel irqchip and PIT, eventfds, dirty log."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        size: int,
        host_address: int,
        *,
        log_dirty: bool = False,
        read_only: bool = False,
    ) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, gpa, size, host_address
        r.flags = (lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0) | (
            lib.KVM_MEM_READONLY if read_only else 0
        )
        _check(
            lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r),
            f"KVM_SET_USER_MEMORY_REGION(slot {slot}, {size >> 20} MiB at {gpa:#x})",
        )

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
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
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

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty bitmap (bit n = page n written by the guest since the last call)."""
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        p = ffi.new("struct kvm_dirty_log *")
        p.slot = slot
        p.dirty_bitmap = bitmap
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, p), f"KVM_GET_DIRTY_LOG({slot})")
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _check(
            lib.sm_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index), f"KVM_CREATE_VCPU({index})"
        )
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
    """One vCPU: its fd, its shared `kvm_run` page, its registers and CPUID.

    Saving and restoring the rest of its state is vmstate's job (read_struct for the GETs,
    one ioctl batch for the SETs); only what has a variable layout is read here.
    """

    def __init__(self, vm: Vm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        self._run_map = mmap.mmap(
            fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
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

    def is_idle(self) -> bool:
        """Halted with no interrupt waiting in its LAPIC (IRR): nothing to do until an event.

        Ask only while the vCPU is parked (`Machine.pause`)."""
        mp_state = ffi.new("struct kvm_mp_state *")
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, mp_state), "KVM_GET_MP_STATE")
        if mp_state.mp_state != lib.KVM_MP_STATE_HALTED:
            return False
        lapic = read_struct(self.fd, "struct kvm_lapic_state", lib.KVM_GET_LAPIC, "KVM_GET_LAPIC")
        return not any(
            lapic[_LAPIC_IRR + 0x10 * i : _LAPIC_IRR + 0x10 * i + 4] != bytes(4) for i in range(8)
        )

    # --- state KVM hands out in a variable layout (fixed structs: see read_struct)
    def xsave_size(self) -> int:
        return self.vm.kvm.check_extension(lib.KVM_CAP_XSAVE2) or 4096

    def get_xsave(self) -> bytes:
        size = self.xsave_size()
        buf = ffi.new("char[]", max(size, 4096))
        request = (
            lib.KVM_GET_XSAVE2
            if self.vm.kvm.check_extension(lib.KVM_CAP_XSAVE2)
            else lib.KVM_GET_XSAVE
        )
        _check(lib.sm_ioctl_ptr(self.fd, request, buf), "KVM_GET_XSAVE")
        return bytes(ffi.buffer(buf))

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        p = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        p.nmsrs = len(indices)
        for i, index in enumerate(indices):
            p.entries[i].index = index
        n = _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, p), "KVM_GET_MSRS")
        # KVM stops at the first MSR it cannot read; return what it read.
        return {p.entries[i].index: p.entries[i].data for i in range(n)}

    def get_cpuid(self) -> CpuidTable:
        """The CPUID this vCPU currently presents (what the guest sees)."""
        p = ffi.new("struct kvm_cpuid2 *", {"entries": 256})
        p.nent = 256
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_GET_CPUID2, p), "KVM_GET_CPUID2")
        return CpuidTable.from_cdata(p)

    def set_cpuid(self, table: CpuidTable) -> None:
        _check(lib.sm_ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, table.to_cdata()), "KVM_SET_CPUID2")

    def close(self) -> None:
        if self.fd >= 0:
            ffi.release(self._run_buf)
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

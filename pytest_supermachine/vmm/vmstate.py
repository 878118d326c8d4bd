"""Everything about a VM that is not RAM: capture it as named sections, put it back.

A snapshot stores these sections opaquely (see snapshot.py); this module is
the one place that knows which KVM state exists, in which order it must be
restored, and how it is encoded. Sections (all little endian, KVM's own struct
layouts where KVM defines one):

    machine                JSON: vcpus, mem_bytes, format of this module
    vcpu/<i>/cpuid         struct kvm_cpuid2 + entries (what the guest was given)
    vcpu/<i>/regs|sregs|fpu|xsave|xcrs|lapic|events|debugregs   KVM structs
    vcpu/<i>/mp_state      u32
    vcpu/<i>/msrs          (u32 index, u32 pad, u64 value) * n
    irqchip/pic_master|pic_slave|ioapic, pit, clock             KVM structs
    serial                 struct sm_serial_state (registers + unread input)

Restoring applies them in the order KVM needs (sregs before the LAPIC because
APIC_BASE lives in sregs; MSRs after the LAPIC for TSC-deadline; events last)
with one C call per restore (`sm_ioctl_batch`), so an in-place reset pays for
ioctls, not for Python.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MachineError
from ._native import ffi, lib
from .kvm import CpuidTable, Kvm, KvmError, Vcpu

if TYPE_CHECKING:
    from .machine import Machine

STATE_FORMAT = 1
_MSR = struct.Struct("<IIQ")

_VCPU_BLOBS = (  # (section suffix, C type, GET, SET)
    ("regs", "struct kvm_regs", "KVM_GET_REGS", "KVM_SET_REGS"),
    ("sregs", "struct kvm_sregs", "KVM_GET_SREGS", "KVM_SET_SREGS"),
    ("fpu", "struct kvm_fpu", "KVM_GET_FPU", "KVM_SET_FPU"),
    ("xcrs", "struct kvm_xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS"),
    ("lapic", "struct kvm_lapic_state", "KVM_GET_LAPIC", "KVM_SET_LAPIC"),
    ("debugregs", "struct kvm_debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS"),
    ("events", "struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS"),
)
_IRQCHIPS = (("pic_master", 0), ("pic_slave", 1), ("ioapic", 2))


def host_facts(kvm: Kvm, guest_cpuid: CpuidTable | None = None) -> dict[str, Any]:
    """What a snapshot must record about this host, and what a restore compares it with.

    `guest_cpuid` (recorded in snapshots) is what the guest was given; `supported_cpuid`
    (current facts only) is what this host's KVM can give; see snapshot.check_host.
    """
    from .snapshot import host_cpu_facts

    def table(t: CpuidTable) -> list[list[int]]:
        return [[e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] for e in t.entries]

    facts = host_cpu_facts()
    # for_vcpu(0, 1): KVM reports the APIC id of whichever host CPU answered; a fact must not
    # change from one process to the next.
    facts.update(kvm_api_version=kvm.api_version, pvm=kvm.pvm,
                 supported_cpuid=table(kvm.supported_cpuid().for_vcpu(0, 1)))
    if guest_cpuid is not None:
        facts["guest_cpuid"] = table(guest_cpuid)
        del facts["supported_cpuid"]
    return facts


def saveable_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """The MSRs of KVM's index list this vCPU can actually read (probed once per process)."""
    cached = getattr(kvm, "_saveable_msrs", None)
    if cached is not None:
        return list(cached)
    indices = kvm.msr_indices()
    readable = [i for i in indices if i in vcpu.get_msrs([i])]
    kvm._saveable_msrs = readable  # type: ignore[attr-defined]
    return list(readable)


def capture(machine: Machine) -> dict[str, bytes]:
    """All non-RAM state of a machine whose vCPUs are parked or stopped at a clean boundary."""
    kvm, vm = machine.kvm, machine.vm
    sections: dict[str, bytes] = {
        "machine": json.dumps({
            "format": STATE_FORMAT, "vcpus": len(machine.vcpus),
            "mem_bytes": machine.config.mem_mib << 20, "devices": machine.devices.specs(),
        }, sort_keys=True).encode(),
    }
    for name, chip in _IRQCHIPS:
        sections[f"irqchip/{name}"] = vm.get_irqchip(chip)
    sections["pit"] = vm.get_pit2()
    sections["clock"] = vm.get_clock()
    msrs = saveable_msrs(kvm, machine.vcpus[0])
    for vcpu in machine.vcpus:
        p = f"vcpu/{vcpu.index}/"
        sections[p + "cpuid"] = machine.vcpu_cpuid[vcpu.index].to_bytes()
        sections[p + "mp_state"] = struct.pack("<I", vcpu.get_mp_state())
        sections[p + "regs"] = vcpu.get_regs_bytes()
        sections[p + "sregs"] = vcpu.get_sregs_bytes()
        sections[p + "fpu"] = vcpu.get_fpu()
        sections[p + "xsave"] = vcpu.get_xsave()
        sections[p + "xcrs"] = vcpu.get_xcrs()
        sections[p + "lapic"] = vcpu.get_lapic()
        sections[p + "debugregs"] = vcpu.get_debugregs()
        sections[p + "events"] = vcpu.get_vcpu_events()
        values = vcpu.get_msrs(msrs)
        sections[p + "msrs"] = b"".join(_MSR.pack(i, 0, v) for i, v in values.items())
    sections["serial"] = machine.serial.get_state()
    return sections


def machine_shape(sections: Mapping[str, bytes]) -> tuple[int, int]:
    """(vcpus, mem_bytes) recorded in a snapshot, checked for sanity."""
    try:
        meta = json.loads(sections["machine"])
        vcpus, mem_bytes = int(meta["vcpus"]), int(meta["mem_bytes"])
        fmt = int(meta["format"])
    except (KeyError, ValueError, TypeError) as e:
        raise MachineError(f"snapshot has no usable 'machine' section: {e}") from None
    if fmt != STATE_FORMAT:
        raise MachineError(f"snapshot VM state format {fmt} is not the supported {STATE_FORMAT}")
    return vcpus, mem_bytes


def machine_devices(sections: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """The device specs recorded in a snapshot's 'machine' section (slot order)."""
    devices = json.loads(sections["machine"]).get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise MachineError("snapshot's 'machine' section has a malformed device list")
    return devices


@dataclass
class PreparedState:
    """State decoded once into KVM-ready buffers, so it can be applied again and again cheaply.

    `apply()` is what restore and every in-place reset run: one C call issuing
    every SET ioctl in order, then the serial registers.
    """

    machine: Machine
    batch_fds: Any
    batch_requests: Any
    batch_args: Any
    count: int
    serial: bytes
    keep: list[Any]
    cpuids: list[CpuidTable]

    def apply(self) -> None:
        failed = ffi.new("int *")
        rc = lib.sm_ioctl_batch(self.count, self.batch_fds, self.batch_requests, self.batch_args,
                                failed)
        if rc < 0:
            raise KvmError(f"restoring VM state failed at step {failed[0]}: "
                           f"{_describe_step(self, failed[0])} ({-rc})")
        self.machine.serial.set_state(self.serial)


def _describe_step(state: PreparedState, index: int) -> str:
    names = state.keep[-1]
    return names[index] if 0 <= index < len(names) else "?"


def prepare(machine: Machine, sections: Mapping[str, bytes]) -> PreparedState:
    """Decode and validate every section against this machine; build the SET ioctl batch."""
    vcpus, _mem = machine_shape(sections)
    if vcpus != len(machine.vcpus):
        raise MachineError(f"snapshot has {vcpus} vCPUs, machine has {len(machine.vcpus)}")

    def need(name: str) -> bytes:
        try:
            return sections[name]
        except KeyError:
            raise MachineError(f"snapshot lacks the '{name}' section") from None

    steps: list[tuple[int, int, Any, str]] = []
    keep: list[Any] = []

    def blob(fd: int, request: int, ctype: str, data: bytes, name: str) -> Any:
        p = ffi.new(ctype + " *")
        size = ffi.sizeof(p[0])
        if len(data) != size:
            raise MachineError(f"snapshot section '{name}' has {len(data)} bytes, "
                               f"this host's {ctype} has {size}: snapshot from another KVM ABI")
        ffi.memmove(p, data, size)
        keep.append(p)
        steps.append((fd, request, p, name))
        return p

    vm = machine.vm
    blob(vm.fd, lib.KVM_SET_PIT2, "struct kvm_pit_state2", need("pit"), "pit")
    clock = blob(vm.fd, lib.KVM_SET_CLOCK, "struct kvm_clock_data", need("clock"), "clock")
    clock.flags = 0
    for name, _chip in _IRQCHIPS:
        blob(vm.fd, lib.KVM_SET_IRQCHIP, "struct kvm_irqchip", need(f"irqchip/{name}"),
             f"irqchip/{name}")
    cpuids: list[CpuidTable] = []
    for vcpu in machine.vcpus:
        p = f"vcpu/{vcpu.index}/"
        cpuids.append(CpuidTable.from_bytes(need(p + "cpuid")))
        mp = ffi.new("struct kvm_mp_state *")
        mp_data = need(p + "mp_state")
        if len(mp_data) != 4:
            raise MachineError(f"snapshot section '{p}mp_state' is malformed")
        mp.mp_state = struct.unpack("<I", mp_data)[0]
        keep.append(mp)
        by_name = {suffix: (ctype, getattr(lib, set_)) for suffix, ctype, _g, set_ in _VCPU_BLOBS}
        for suffix in ("regs", "sregs", "fpu"):
            ctype, req = by_name[suffix]
            blob(vcpu.fd, req, ctype, need(p + suffix), p + suffix)
        xsave_data = need(p + "xsave")
        xsave = ffi.new("char[]", max(len(xsave_data), 4096))
        ffi.memmove(xsave, xsave_data, len(xsave_data))
        keep.append(xsave)
        steps.append((vcpu.fd, lib.KVM_SET_XSAVE, xsave, p + "xsave"))
        for suffix in ("xcrs", "debugregs", "lapic"):
            ctype, req = by_name[suffix]
            blob(vcpu.fd, req, ctype, need(p + suffix), p + suffix)
        msr_data = need(p + "msrs")
        if len(msr_data) % _MSR.size:
            raise MachineError(f"snapshot section '{p}msrs' is malformed")
        n = len(msr_data) // _MSR.size
        msrs = ffi.new("struct kvm_msrs *", {"entries": n})
        msrs.nmsrs = n
        for i, (index, _pad, value) in enumerate(_MSR.iter_unpack(msr_data)):
            msrs.entries[i].index, msrs.entries[i].data = index, value
        keep.append(msrs)
        steps.append((vcpu.fd, lib.KVM_SET_MSRS, msrs, p + "msrs"))
        steps.append((vcpu.fd, lib.KVM_SET_MP_STATE, mp, p + "mp_state"))
        ctype, req = by_name["events"]
        blob(vcpu.fd, req, ctype, need(p + "events"), p + "events")

    count = len(steps)
    fds = ffi.new("int[]", count)
    requests = ffi.new("unsigned long[]", count)
    args = ffi.new("void *[]", count)
    for i, (fd, request, arg, _name) in enumerate(steps):
        fds[i], requests[i], args[i] = fd, request, arg
    keep.append([name for *_rest, name in steps])
    return PreparedState(machine, fds, requests, args, count, need("serial"), keep, cpuids)

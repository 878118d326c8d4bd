"""Everything about a VM that is not RAM: capture it as named sections, put it back.

A snapshot stores these sections opaquely (see the snapshot package); this module is
the one place that knows which KVM state exists, in which order it must be restored,
and how it is encoded. Sections (all little endian, KVM's own struct layouts where KVM
defines one):

    machine                JSON: vcpus, mem_bytes, device specs, format of this module
    vcpu/<i>/cpuid         struct kvm_cpuid2 + entries (what the guest was given)
    vcpu/<i>/regs|sregs|fpu|xsave|xcrs|lapic|events|debugregs|mp_state   KVM structs
    vcpu/<i>/msrs          (u32 index, u32 pad, u64 value) * n
    irqchip/pic_master|pic_slave|ioapic, pit, clock                     KVM structs
    serial                 struct sm_serial_state (registers + unread input)

One table per level (`VM_STATE`, `VCPU_STATE`: section, C type, GET, SET) drives both
capture and restore, in the order KVM needs on restore (sregs before the LAPIC because
APIC_BASE lives in sregs; MSRs after the LAPIC for TSC-deadline; events last). Restore is
one C call (`sm_ioctl_batch`), so an in-place reset pays for ioctls, not for Python.
Model: Firecracker's arch/x86_64/vcpu.rs save_state/restore_state.

This module takes the VM, its vCPUs and its serial port, never the `Machine`: the
machine depends on it, not the other way round.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MachineError
from ._native import ffi, lib
from .cpuid import CpuidTable
from .kvm import KvmError, Vcpu, Vm, read_struct
from .snapshot.errors import SnapshotInvalid

if TYPE_CHECKING:
    from .devices.serial import Serial

STATE_FORMAT = 1
_MSR = struct.Struct("<IIQ")


@dataclass(frozen=True)
class StructState:
    """One piece of KVM state held in one fixed-size kernel struct.

    `get_fields` are set in the struct before the GET (which irqchip to read);
    `restore_fields` are overwritten before the SET (fields KVM reports but refuses back).
    """

    section: str
    ctype: str
    get: int
    set: int
    get_fields: Mapping[str, int] = field(default_factory=dict)
    restore_fields: Mapping[str, int] = field(default_factory=dict)

    def capture(self, owner: Vm | Vcpu) -> bytes:
        return read_struct(
            owner.fd,
            self.ctype,
            self.get,
            f"reading {self.section} ({self.ctype})",
            self.get_fields,
        )

    def prepare(self, data: bytes, name: str) -> Any:
        p = ffi.new(self.ctype + " *")
        size = ffi.sizeof(p[0])
        if len(data) != size:
            raise MachineError(
                f"snapshot section '{name}' has {len(data)} bytes, "
                f"this host's {self.ctype} has {size}: snapshot from another KVM ABI"
            )
        ffi.memmove(p, data, size)
        for name_, value in self.restore_fields.items():
            setattr(p, name_, value)
        return p


@dataclass(frozen=True)
class XsaveState:
    """The XSAVE area: its size is the CPU's (KVM_CAP_XSAVE2), at least the legacy 4 KiB."""

    section: str = "xsave"

    def capture(self, vcpu: Vcpu) -> bytes:
        return vcpu.get_xsave()

    def prepare(self, data: bytes, name: str) -> Any:
        buf = ffi.new("char[]", max(len(data), 4096))
        ffi.memmove(buf, data, len(data))
        return buf

    @property
    def set(self) -> int:
        return lib.KVM_SET_XSAVE


@dataclass(frozen=True)
class MsrState:
    """The MSRs this vCPU can save (`Kvm.saveable_msrs`), as (index, pad, value) records."""

    section: str = "msrs"

    def capture(self, vcpu: Vcpu) -> bytes:
        values = vcpu.get_msrs(vcpu.vm.kvm.saveable_msrs(vcpu))
        return b"".join(_MSR.pack(i, 0, v) for i, v in values.items())

    def prepare(self, data: bytes, name: str) -> Any:
        if len(data) % _MSR.size:
            raise MachineError(f"snapshot section '{name}' is malformed")
        n = len(data) // _MSR.size
        msrs = ffi.new("struct kvm_msrs *", {"entries": n})
        msrs.nmsrs = n
        for i, (index, _pad, value) in enumerate(_MSR.iter_unpack(data)):
            msrs.entries[i].index, msrs.entries[i].data = index, value
        return msrs

    @property
    def set(self) -> int:
        return lib.KVM_SET_MSRS


def _struct(section: str, ctype: str, name: str, **kwargs: Mapping[str, int]) -> StructState:
    return StructState(
        section, ctype, getattr(lib, f"KVM_GET_{name}"), getattr(lib, f"KVM_SET_{name}"), **kwargs
    )


VM_STATE: tuple[StructState, ...] = (  # restore order
    _struct("pit", "struct kvm_pit_state2", "PIT2"),
    # only the clock value is settable; KVM reports flags it refuses back
    _struct("clock", "struct kvm_clock_data", "CLOCK", restore_fields={"flags": 0}),
    _struct("irqchip/pic_master", "struct kvm_irqchip", "IRQCHIP", get_fields={"chip_id": 0}),
    _struct("irqchip/pic_slave", "struct kvm_irqchip", "IRQCHIP", get_fields={"chip_id": 1}),
    _struct("irqchip/ioapic", "struct kvm_irqchip", "IRQCHIP", get_fields={"chip_id": 2}),
)
"""State of the VM as a whole, in the order it is restored."""

VCPU_STATE: tuple[StructState | XsaveState | MsrState, ...] = (  # restore order
    _struct("regs", "struct kvm_regs", "REGS"),
    _struct("sregs", "struct kvm_sregs", "SREGS"),
    _struct("fpu", "struct kvm_fpu", "FPU"),
    XsaveState(),
    _struct("xcrs", "struct kvm_xcrs", "XCRS"),
    _struct("debugregs", "struct kvm_debugregs", "DEBUGREGS"),
    _struct("lapic", "struct kvm_lapic_state", "LAPIC"),  # after sregs (APIC_BASE)
    MsrState(),  # after the LAPIC (TSC-deadline)
    _struct("mp_state", "struct kvm_mp_state", "MP_STATE"),
    _struct("events", "struct kvm_vcpu_events", "VCPU_EVENTS"),  # last
)
"""State of each vCPU (sections `vcpu/<i>/<section>`), in the order it is restored."""


def capture(
    vm: Vm,
    vcpus: Sequence[Vcpu],
    cpuids: Sequence[CpuidTable],
    serial: Serial,
    *,
    mem_bytes: int,
    device_specs: list[dict[str, Any]],
) -> dict[str, bytes]:
    """All non-RAM, non-device state of a VM whose vCPUs are parked or stopped at a clean boundary.

    `cpuids[i]` is the table vCPU i was given, recorded so its restored twin gets the same;
    `device_specs` describe the devices so a restore can rebuild them in slot order.
    """
    sections: dict[str, bytes] = {
        "machine": json.dumps(
            {
                "format": STATE_FORMAT,
                "vcpus": len(vcpus),
                "mem_bytes": mem_bytes,
                "devices": device_specs,
            },
            sort_keys=True,
        ).encode(),
    }
    for state in VM_STATE:
        sections[state.section] = state.capture(vm)
    for vcpu in vcpus:
        prefix = f"vcpu/{vcpu.index}/"
        sections[prefix + "cpuid"] = cpuids[vcpu.index].to_bytes()
        for vstate in VCPU_STATE:
            sections[prefix + vstate.section] = vstate.capture(vcpu)
    sections["serial"] = serial.get_state()
    return sections


def machine_meta(sections: Mapping[str, bytes]) -> dict[str, Any]:
    """The 'machine' section as a JSON object of this module's format; `SnapshotInvalid` if not."""
    try:
        meta = json.loads(sections["machine"])
    except KeyError:
        raise SnapshotInvalid("machine", "the section is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotInvalid("machine", f"not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SnapshotInvalid("machine", "not a JSON object")
    if meta.get("format") != STATE_FORMAT:
        raise SnapshotInvalid(
            "machine", f"VM state format {meta.get('format')!r} is not the supported {STATE_FORMAT}"
        )
    return meta


def machine_shape(sections: Mapping[str, bytes]) -> tuple[int, int]:
    """(vcpus, mem_bytes) recorded in a snapshot (range-checked by restore_validation)."""
    meta = machine_meta(sections)
    vcpus, mem_bytes = meta.get("vcpus"), meta.get("mem_bytes")
    if type(vcpus) is not int or type(mem_bytes) is not int:
        raise SnapshotInvalid("machine", f"vcpus={vcpus!r}, mem_bytes={mem_bytes!r}")
    return vcpus, mem_bytes


def check_sections(sections: Mapping[str, bytes], vcpus: int, *, xsave_size: int) -> None:
    """Every VM, vCPU and serial section present and exactly the size it is loaded as.

    `xsave_size` is the host's XSAVE area size: KVM reads that many bytes on restore,
    so a shorter section would let it read past the buffer. Raises `SnapshotInvalid`.
    """
    expected: dict[str, int | None] = {s.section: ffi.sizeof(s.ctype) for s in VM_STATE}
    for i in range(vcpus):
        for vstate in VCPU_STATE:
            name = f"vcpu/{i}/{vstate.section}"
            if isinstance(vstate, StructState):
                expected[name] = ffi.sizeof(vstate.ctype)
            elif isinstance(vstate, XsaveState):
                expected[name] = xsave_size
            else:
                expected[name] = None
    for name, size in expected.items():
        data = sections.get(name)
        if data is None:
            raise SnapshotInvalid(name, "the section is missing")
        if size is not None and len(data) != size:
            raise SnapshotInvalid(
                name, f"{len(data)} bytes, this host loads {size}: snapshot from another KVM ABI"
            )
        if size is None and len(data) % _MSR.size:
            raise SnapshotInvalid(name, f"{len(data)} bytes is not whole MSR records")
    serial = sections.get("serial")
    head = ffi.offsetof("struct sm_serial_state", "rx")
    if serial is None or not head <= len(serial) <= head + lib.SM_SERIAL_RX_MAX:
        raise SnapshotInvalid(
            "serial",
            f"{'no section' if serial is None else f'{len(serial)} bytes'}, "
            f"expected {head}..{head + lib.SM_SERIAL_RX_MAX}",
        )


def _need(sections: Mapping[str, bytes], name: str) -> bytes:
    try:
        return sections[name]
    except KeyError:
        raise MachineError(f"snapshot lacks the '{name}' section") from None


@dataclass
class PreparedState:
    """State decoded once into KVM-ready buffers, so it can be applied again and again cheaply.

    `apply()` is what restore and every in-place reset run: one C call issuing
    every SET ioctl in order, then the serial registers.
    """

    serial: Serial
    serial_state: bytes
    step_names: list[str]
    batch_fds: Any
    batch_requests: Any
    batch_args: Any
    keep: list[Any]  # the cffi buffers the batch points into

    def apply(self) -> None:
        failed = ffi.new("int *")
        rc = lib.sm_ioctl_batch(
            len(self.step_names), self.batch_fds, self.batch_requests, self.batch_args, failed
        )
        if rc < 0:
            index = failed[0]
            name = self.step_names[index] if 0 <= index < len(self.step_names) else "?"
            raise KvmError(f"restoring VM state failed at step {index}: {name} ({-rc})")
        self.serial.set_state(self.serial_state)


def prepare(
    vm: Vm, vcpus: Sequence[Vcpu], serial: Serial, sections: Mapping[str, bytes]
) -> PreparedState:
    """Decode and validate every section against this VM; build the SET ioctl batch."""
    recorded, _mem = machine_shape(sections)
    if recorded != len(vcpus):
        raise MachineError(f"snapshot has {recorded} vCPUs, machine has {len(vcpus)}")
    steps: list[tuple[int, int, Any, str]] = []
    for state in VM_STATE:
        steps.append(
            (
                vm.fd,
                state.set,
                state.prepare(_need(sections, state.section), state.section),
                state.section,
            )
        )
    for vcpu in vcpus:
        for vstate in VCPU_STATE:
            name = f"vcpu/{vcpu.index}/{vstate.section}"
            steps.append((vcpu.fd, vstate.set, vstate.prepare(_need(sections, name), name), name))
    count = len(steps)
    fds = ffi.new("int[]", count)
    requests = ffi.new("unsigned long[]", count)
    args = ffi.new("void *[]", count)
    for i, (fd, request, arg, _name) in enumerate(steps):
        fds[i], requests[i], args[i] = fd, request, arg
    return PreparedState(
        serial,
        _need(sections, "serial"),
        [name for *_rest, name in steps],
        fds,
        requests,
        args,
        [arg for _fd, _req, arg, _name in steps],
    )

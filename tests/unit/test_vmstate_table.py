"""The VM state table: one entry per piece of KVM state, in the order KVM needs on restore."""

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.vmm._native import ffi, lib
from pytest_supermachine.vmm.vmstate import VCPU_STATE, VM_STATE, StructState

pytestmark = pytest.mark.unit

VCPU_ORDER = [state.section for state in VCPU_STATE]


def test_sregs_are_restored_before_the_lapic_because_apic_base_lives_in_sregs():
    assert VCPU_ORDER.index("sregs") < VCPU_ORDER.index("lapic")


def test_msrs_are_restored_after_the_lapic_for_the_tsc_deadline_timer():
    assert VCPU_ORDER.index("lapic") < VCPU_ORDER.index("msrs")


def test_pending_events_are_restored_last():
    assert VCPU_ORDER[-1] == "events"


def test_every_section_is_named_once():
    sections = [state.section for state in VM_STATE] + VCPU_ORDER
    assert len(sections) == len(set(sections))


def test_each_struct_entry_pairs_the_get_and_set_of_the_same_state():
    for state in (*VM_STATE, *VCPU_STATE):
        if isinstance(state, StructState):
            get = next(
                n for n in dir(lib) if n.startswith("KVM_GET_") and getattr(lib, n) == state.get
            )
            assert getattr(lib, get.replace("KVM_GET_", "KVM_SET_")) == state.set


def test_a_section_of_another_size_is_refused_as_another_kvm_abi():
    regs = next(s for s in VCPU_STATE if s.section == "regs")
    with pytest.raises(MachineError, match="another KVM ABI"):
        regs.prepare(b"\0" * 3, "vcpu/0/regs")


def test_the_clock_is_restored_without_the_flags_kvm_refuses_back():
    clock = next(s for s in VM_STATE if s.section == "clock")
    prepared = clock.prepare(b"\xff" * ffi.sizeof("struct kvm_clock_data"), "clock")
    assert prepared.flags == 0
    assert prepared.clock == (1 << 64) - 1

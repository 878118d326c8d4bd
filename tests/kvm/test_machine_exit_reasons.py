"""The two ends of a guest the microguest never takes: a reset request and a KVM failure.

Each guest here is a few hand-assembled instructions at CPL0 in a one-segment ELF,
booted like the microguest (long mode, identity paging).
"""

from __future__ import annotations

from pathlib import Path

from pytest_supermachine.vmm.machine import ExitReason, Machine, MachineState
from tests.unit.test_elf_loading import make_elf

LOAD_ADDR = 0x200000  # above the boot page tables, like the microguest
I8042_RESET = bytes.fromhex("b0fee664f4")  # mov al, 0xfe; out 0x64, al; hlt
FETCH_FROM_MMIO = bytes.fromhex("b8000000d0ffe0")  # mov eax, 0xd0000000; jmp rax


def run_code(code: bytes, tmp_path: Path) -> Machine:
    machine = Machine(mem_mib=64, vsock=False)
    machine.boot_direct64(make_elf(tmp_path / "guest.elf", paddr=LOAD_ADDR, payload=code))
    machine.start()
    return machine


def test_a_keyboard_controller_reset_ends_the_run_with_reset(tmp_path: Path) -> None:
    with run_code(I8042_RESET, tmp_path) as m:
        exit_ = m.wait(timeout=30)
        assert exit_.reason is ExitReason.RESET
        assert exit_.describe() == "guest requested a reset (vCPU 0)"
        assert m.state is MachineState.EXITED


def test_code_kvm_cannot_run_ends_the_run_with_error_and_says_why(tmp_path: Path) -> None:
    # Executing from the MMIO hole: there is no memory to fetch from, nothing to emulate.
    with run_code(FETCH_FROM_MMIO, tmp_path) as m:
        exit_ = m.wait(timeout=30)
        assert exit_.reason is ExitReason.ERROR
        assert exit_.describe().startswith(
            "KVM could not run the guest on vCPU 0: exit INTERNAL_ERROR (emulation failure)"
        )
        assert m.state is MachineState.EXITED

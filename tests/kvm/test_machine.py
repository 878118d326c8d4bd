"""Machine lifecycle on the microguest: console, exits, force-exit, SMP, pause barrier."""

from __future__ import annotations

import os
import re
import time

import pytest

from pytest_supermachine.errors import GuestTimeout, MachineError
from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm.machine import ExitReason, MachineState


def test_banner_names_vcpus_memory_and_mode(make_machine):
    m = make_machine(GuestMode.HALT, mem_mib=96)
    m.run_until_exit(timeout=30)
    assert "microguest: boot vcpus=1 mem=96MiB mode=halt arg=0\n" in m.console


def test_halting_guest_exits_with_halt_and_status_zero(make_machine):
    m = make_machine(GuestMode.HALT)
    m.start()
    exit_ = m.wait(timeout=30)
    assert exit_.reason is ExitReason.HALT
    assert exit_.code == 0
    assert m.state is MachineState.EXITED


def test_triple_fault_exits_with_shutdown(make_machine):
    m = make_machine(GuestMode.TRIPLE_FAULT)
    m.start()
    assert m.wait(timeout=30).reason is ExitReason.SHUTDOWN
    assert "triple fault" in m.console


def test_spinning_guest_is_stopped(make_machine):
    m = make_machine(GuestMode.SPIN, vcpus=2)
    m.start()
    m.wait_console("spinning", timeout=30)
    m.stop()  # how fast: bench/bench_snapshot.py
    assert m.exit_info().reason is ExitReason.CANCELED
    assert m.state is MachineState.STOPPED


def test_wait_timeout_raises_with_the_console_tail(make_machine):
    m = make_machine(GuestMode.SPIN)
    m.start()
    with pytest.raises(GuestTimeout, match=r"(?s)still running after 0.3 s.*microguest: spinning"):
        m.wait_console("spinning", timeout=30)
        m.wait(timeout=0.3)


@pytest.mark.parametrize("vcpus", [2, 4])
def test_every_vcpu_comes_online_and_prints(make_machine, vcpus):
    m = make_machine(GuestMode.SMP, vcpus=vcpus)
    m.run_until_exit(timeout=60)
    for apic_id in range(1, vcpus):
        assert f"microguest: cpu {apic_id} online\n" in m.console
    assert f"microguest: all {vcpus} cpus online" in m.console


def test_guest_dirties_pages_at_cpl3(make_machine):
    m = make_machine(GuestMode.DIRTY, 500)
    m.run_until_exit(timeout=60)
    assert "microguest: dirtied 500 pages" in m.console


def counter_address(m) -> int:
    return int(m.wait_console(r"counter at 0x([0-9a-f]+)\n", timeout=30).group(1), 16)


def test_paused_guest_does_not_run_and_resumes_where_it_was(make_machine):
    m = make_machine(GuestMode.COUNT)
    m.start()
    addr = counter_address(m)
    m.wait_console(r"microguest: count \d+\n", timeout=30)
    with m.paused():
        before = m.memory.read_u64(addr)
        time.sleep(0.05)  # time passing is the point: a parked guest must not count
        assert m.memory.read_u64(addr) == before
    deadline = time.monotonic() + 10
    while m.memory.read_u64(addr) == before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert m.memory.read_u64(addr) > before


def test_pause_and_resume_many_times_in_a_row(make_machine):
    m = make_machine(GuestMode.COUNT, vcpus=2)
    m.start()
    addr = counter_address(m)
    values = []
    for _ in range(50):
        with m.paused():
            values.append(m.memory.read_u64(addr))
        deadline = time.monotonic() + 10
        while m.memory.read_u64(addr) == values[-1]:  # counting again: it resumed
            assert time.monotonic() < deadline, f"no count after resume {len(values)}"
            time.sleep(0.001)
    assert values == sorted(values) and len(set(values)) == 50
    assert m.state is MachineState.RUNNING


def test_pausing_a_stopped_guest_says_why(make_machine):
    m = make_machine(GuestMode.HALT)
    m.start()
    m.wait(timeout=30)
    with pytest.raises(MachineError, match="cannot pause a machine that is exited"):
        m.pause()


def test_console_is_streamed_live_to_a_file_descriptor(make_machine):
    read_end, write_end = os.pipe()
    try:
        m = make_machine(GuestMode.HALT, console_stream=write_end)
        m.run_until_exit(timeout=30)
        os.set_blocking(read_end, False)
        assert b"microguest: halting" in os.read(read_end, 65536)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_console_survives_stop(make_machine):
    m = make_machine(GuestMode.HALT)
    m.run_until_exit(timeout=30)
    m.stop()
    assert "microguest: halting" in m.console


def test_out_loop_exits_are_handled_in_c_without_python(make_machine):
    m = make_machine(GuestMode.OUT_LOOP, 2000)
    m.run_until_exit(timeout=60)
    stats = m.stats()
    assert stats["control_nops"] == 2000
    assert stats["python_calls"] == 0
    assert [mark for mark, _ in m.marks()] == [1, 2]


def test_machine_cannot_start_twice(make_machine):
    m = make_machine(GuestMode.HALT)
    m.start()
    with pytest.raises(MachineError, match="cannot start a machine that is"):
        m.start()


def test_cpuid_given_to_the_guest_hides_what_the_pvm_emulator_cannot_run(make_machine):
    # kvm_pvm then ORs the host's bits back in (CPL3 CPUID runs natively, so it keeps the two
    # consistent): on PVM the Linux guest also needs `noxsave clearcpuid=...` on its cmdline.
    m = make_machine(GuestMode.HALT)
    leaf1 = m.cpuid.find(1)
    if m.kvm.pvm:
        assert leaf1.ecx & ((1 << 26) | (1 << 28) | (1 << 13)) == 0  # XSAVE, AVX, CX16
        assert m.cpuid.find(0xD).eax == 0
    else:
        assert m.cpuid.entries == m.kvm.supported_cpuid().entries


def test_guest_image_that_does_not_fit_in_ram_is_refused(microguest_elf):
    from pytest_supermachine.vmm.machine import Machine

    with Machine(mem_mib=4) as m, pytest.raises(MachineError, match=re.escape("more memory")):
        # 4 MiB is enough for the guest image, but not for a segment linked past it
        from pytest_supermachine.vmm.boot import ElfImage, ElfSegment

        m.boot_direct64(
            ElfImage(microguest_elf, 0x100000, [ElfSegment(0x3FF000, 0, 0x2000, 0x2000)])
        )


def test_boot_info_lists_the_attached_virtio_devices(make_machine, tmp_path):
    from pytest_supermachine.vmm._native import ffi
    from pytest_supermachine.vmm.devices.hub import DiskSpec
    from pytest_supermachine.vmm.layout import BOOT_INFO_ADDR

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    m = make_machine(GuestMode.HALT, disks=(DiskSpec(str(disk)),))
    raw = m.memory.read(BOOT_INFO_ADDR, ffi.sizeof("struct sm_boot_info"))
    info = ffi.cast("struct sm_boot_info *", ffi.from_buffer(raw))
    devices = [
        (d.type, d.irq, d.mmio_base) for d in (info.devices[i] for i in range(info.ndevices))
    ]
    assert devices == [(19, 5, 0xD0000000), (2, 6, 0xD0001000)]


def test_guest_reading_a_device_window_sees_virtio_mmio_magic(make_machine):
    m = make_machine(GuestMode.HALT)
    transport = m.buses.mmio.find(0xD0000000).device
    assert transport.read(0, 4) == b"virt"
    assert int.from_bytes(transport.read(8, 4), "little") == 19  # device id: vsock

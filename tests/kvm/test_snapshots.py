"""Snapshots of microguest machines: restore, live snapshot, diff chains, in-place reset."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm._native import ffi
from pytest_supermachine.vmm.machine import ExitReason, Machine, MachineState, ResetStrategy
from pytest_supermachine.vmm.snapshot import SnapshotChain


def ram(m: Machine) -> bytes:
    return b"".join(m.memory.read(r.gpa, r.size) for r in m.memory.regions)


def registers(m: Machine) -> list[tuple[bytes, bytes]]:
    return [(bytes(ffi.buffer(v.get_regs())), bytes(ffi.buffer(v.get_sregs()))) for v in m.vcpus]


def counter_address(m: Machine) -> int:
    return int(m.wait_console(r"counter at 0x([0-9a-f]+)\n", timeout=30).group(1), 16)


def let_it_count(m: Machine, addr: int, timeout: float = 30) -> None:
    """Wait (polling guest RAM) until the COUNT guest's counter has moved."""
    start = m.memory.read_u64(addr)
    deadline = time.monotonic() + timeout
    while m.memory.read_u64(addr) == start:
        assert time.monotonic() < deadline, "the guest did not count"
        time.sleep(0.001)


@pytest.fixture
def counting_snapshot(make_machine, tmp_path):
    """A COUNT guest snapshotted while counting: (path, counter address, RAM, registers)."""
    m = make_machine(GuestMode.COUNT)
    m.start()
    addr = counter_address(m)
    m.wait_console(r"microguest: count \d+\n", timeout=30)
    m.pause()
    path = tmp_path / "count.snap"
    m.snapshot(path)
    return path, addr, ram(m), registers(m)


def test_restored_guest_has_identical_memory_and_registers(counting_snapshot):
    path, _addr, memory, regs = counting_snapshot
    with Machine.restore(path, start=False) as r:
        assert ram(r) == memory
        assert registers(r) == regs


def test_restored_guest_resumes_counting_from_the_snapshot(counting_snapshot):
    path, addr, memory, _regs = counting_snapshot
    at_snapshot = int.from_bytes(memory[addr : addr + 8], "little")
    with Machine.restore(path) as r:
        let_it_count(r, addr)
        with r.paused():
            assert r.memory.read_u64(addr) > at_snapshot


def test_two_restores_of_one_file_run_independently(counting_snapshot):
    path, addr, memory, _regs = counting_snapshot
    with Machine.restore(path) as a, Machine.restore(path, start=False) as b:
        let_it_count(a, addr)
        with a.paused():
            assert a.memory.read_u64(addr) != b.memory.read_u64(addr)
        assert ram(b) == memory  # a's writes never reach b


def test_live_snapshot_then_continue_agrees_with_the_restored_path(make_machine, tmp_path):
    # A deterministic guest: N control-port writes, then power-off. Snapshot it mid-way while
    # it runs; the original finishes, and so does a machine restored from the snapshot.
    m = make_machine(GuestMode.OUT_LOOP, 50_000)
    m.start()
    deadline = time.monotonic() + 30
    while m.stats()["control_nops"] == 0:  # the loop has begun: mid-way is now
        assert time.monotonic() < deadline, "the guest never started its loop"
        time.sleep(0.001)
    m.snapshot(tmp_path / "mid.snap")
    assert m.state is MachineState.RUNNING
    assert m.wait(timeout=120).reason is ExitReason.HALT
    with Machine.restore(tmp_path / "mid.snap") as r:
        assert r.wait(timeout=120).reason is ExitReason.HALT
        assert 0 < r.stats()["control_nops"] < 50_000
        assert ram(r) == ram(m)
        assert [regs for regs, _ in registers(r)] == [regs for regs, _ in registers(m)]


def test_chain_of_four_diffs_restores_every_level_to_its_bytes(counting_snapshot, tmp_path):
    path, addr, base_ram, _regs = counting_snapshot
    expected = {path: base_ram}
    parent = path
    for level in range(1, 5):
        with Machine.restore(parent) as r:
            let_it_count(r, addr)
            r.pause()
            leaf = tmp_path / f"d{level}.snap"
            r.snapshot(leaf)
            expected[leaf] = ram(r)
        parent = leaf
    with SnapshotChain.open(parent) as chain:
        assert chain.depth == 5
        assert chain.leaf.is_diff and not chain.base.is_diff
    for snap, memory in expected.items():
        with Machine.restore(snap, start=False) as r:
            assert ram(r) == memory, f"{snap.name} restored to different bytes"


def test_diff_holds_only_the_pages_changed_since_its_parent(counting_snapshot, tmp_path):
    path, addr, *_ = counting_snapshot
    with Machine.restore(path) as r:
        let_it_count(r, addr)
        r.pause()
        changed = r.dirty_pages()
        r.snapshot(tmp_path / "d.snap")
    with SnapshotChain.open(tmp_path / "d.snap") as chain:
        assert 0 < chain.leaf.stored_pages <= changed


@pytest.fixture
def dirtying_snapshot(make_machine, tmp_path):
    """A loaded, never-started guest that will dirty 10 000 pages and power off."""
    m = make_machine(GuestMode.DIRTY, 10_000, mem_mib=128)
    path = tmp_path / "dirty.snap"
    m.snapshot(path)
    return path


@pytest.mark.parametrize("strategy", list(ResetStrategy))
def test_reset_after_10000_dirty_pages_gives_identical_ram_and_registers(
    dirtying_snapshot, strategy
):
    with Machine.restore(dirtying_snapshot, start=False) as r:
        memory, regs = ram(r), registers(r)
        r.start()
        assert r.wait(timeout=120).reason is ExitReason.HALT
        assert "dirtied 10000 pages" in r.console
        assert r.dirty_pages() >= 10_000
        r.reset(resume=False, strategy=strategy)
        assert ram(r) == memory
        assert registers(r) == regs


@pytest.mark.parametrize("strategy", list(ResetStrategy))
def test_reset_of_a_machine_restored_from_a_diff_chain(counting_snapshot, tmp_path, strategy):
    path, addr, *_ = counting_snapshot
    with Machine.restore(path) as r:
        let_it_count(r, addr)
        r.pause()
        r.snapshot(tmp_path / "layer.snap")
    with Machine.restore(tmp_path / "layer.snap", start=False) as r:
        memory, regs = ram(r), registers(r)
        r.reset(resume=False, strategy=strategy)  # nothing ran: the overlay must be intact
        assert ram(r) == memory
        r.resume()
        let_it_count(r, addr)  # dirty the diff's own pages (the counter), then go back
        r.reset(resume=False, strategy=strategy)
        assert ram(r) == memory
        assert registers(r) == regs


def test_reset_runs_the_guest_again_after_it_powered_off(dirtying_snapshot):
    with Machine.restore(dirtying_snapshot) as r:
        for _ in range(3):
            assert r.wait(timeout=120).reason is ExitReason.HALT
            assert r.console.count("dirtied 10000 pages") == 1
            r.reset()


def test_reset_needs_a_restored_machine(make_machine):
    from pytest_supermachine.errors import MachineError

    m = make_machine(GuestMode.HALT)
    m.start()
    with pytest.raises(MachineError, match="restored from a snapshot"):
        m.reset()


def test_1000_resets_in_a_row_leave_fds_threads_and_rss_flat(counting_snapshot):
    path, addr, memory, _regs = counting_snapshot
    at_snapshot = int.from_bytes(memory[addr : addr + 8], "little")
    with Machine.restore(path) as r:
        for _ in range(50):  # warm up, including the lazily mapped snapshot view COPY uses
            let_it_count(r, addr)
            r.reset()
        reaper.drain()
        before = (
            len(os.listdir("/proc/self/fd")),
            threading.active_count(),
            psutil.Process().memory_info().rss,
        )
        for _ in range(1000):
            r.reset()
        after = (
            len(os.listdir("/proc/self/fd")),
            threading.active_count(),
            psutil.Process().memory_info().rss,
        )
        with r.paused():
            assert r.memory.read_u64(addr) >= at_snapshot
    assert after[:2] == before[:2]
    assert after[2] - before[2] < 8 << 20

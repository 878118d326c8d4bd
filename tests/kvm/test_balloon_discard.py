"""A restored machine giving guest pages back (what its balloon does): memory, dirty pages, reset.

`Machine.discard` is the balloon's `PageDiscarder` on a real machine restored from a
real snapshot; the microguest's DIRTY mode writes a known run of pages (one byte of
each page goes up by one), so the tests know exactly which pages changed. The guest
drivers of the balloon itself are Linux's (tests/linux) and the test driver (tests/unit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm.devices.hub import BalloonSpec
from pytest_supermachine.vmm.machine import ExitReason, Machine, ResetStrategy

PAGES = 4096  # 16 MiB
MEM_MIB = 64


def ram(m: Machine) -> bytes:
    return b"".join(m.memory.read(r.gpa, r.size) for r in m.memory.regions)


def changed_run(before: bytes, after: bytes) -> tuple[int, int]:
    """(gpa, length) of the run of PAGES pages the DIRTY guest changed (its stack and
    page tables change too, elsewhere)."""
    pages = [p for p in range(len(before) // 4096) if before[p * 4096] != after[p * 4096]]
    runs = [p for p in pages if p - 1 not in pages]
    starts = [p for p in runs if all(q in pages for q in range(p, p + PAGES))]
    assert len(starts) == 1, f"changed pages {pages[:8]}... hold no single run of {PAGES}"
    return starts[0] * 4096, PAGES * 4096


@pytest.fixture
def dirty_snapshot(make_machine, tmp_path: Path) -> Path:
    m = make_machine(GuestMode.DIRTY, PAGES, mem_mib=MEM_MIB, balloon=BalloonSpec())
    path = tmp_path / "dirty.snap"
    m.snapshot(path, durable=False)
    return path


@pytest.fixture
def ran(dirty_snapshot: Path):
    """A machine restored from the snapshot after its guest dirtied its pages, and the run."""
    with Machine.restore(dirty_snapshot, start=False) as m:
        pristine = ram(m)
        m.start()
        assert m.wait(timeout=120).reason is ExitReason.HALT
        yield m, pristine, changed_run(pristine, ram(m))


def test_discarded_pages_read_as_the_snapshot_and_leave_the_dirty_set(ran):
    m, pristine, (gpa, length) = ran
    before = m.dirty_pages()
    m.discard([(gpa, length)])
    assert before - m.dirty_pages() == PAGES
    assert m.memory.read(gpa, length) == pristine[gpa : gpa + length]


def test_discarded_pages_are_no_longer_held_by_the_host(ran):
    m, _pristine, (gpa, length) = ran
    held = m.memory.host_usage().anonymous
    m.discard([(gpa, length)])
    assert held - m.memory.host_usage().anonymous >= length - (1 << 20)


def test_a_copy_reset_after_a_discard_does_not_bring_the_pages_back(ran):
    m, pristine, (gpa, length) = ran
    m.discard([(gpa, length)])
    m.reset(resume=False, strategy=ResetStrategy.COPY)
    assert ram(m) == pristine
    assert m.memory.host_usage().anonymous < length // 2


def test_pages_a_diff_changed_come_back_as_the_diff_after_discard_and_reset(ran, tmp_path):
    m, _pristine, (gpa, length) = ran
    layer = tmp_path / "layer.snap"
    m.snapshot(layer, durable=False)
    layered = ram(m)
    with Machine.restore(layer, start=False) as r:
        r.discard([(gpa, length)])
        assert r.dirty_pages() >= PAGES  # they read as the base now: still not the layer
        r.reset(resume=False)
        assert ram(r) == layered


def test_the_balloon_target_is_part_of_a_snapshot_and_of_reset(make_machine, tmp_path):
    m = make_machine(GuestMode.HALT, mem_mib=MEM_MIB, balloon=BalloonSpec())
    m.balloon(8, timeout=None)  # the microguest has no balloon driver: nobody answers
    path = tmp_path / "ballooned.snap"
    m.snapshot(path, durable=False)
    with Machine.restore(path, start=False) as r:
        assert r.balloon_stats().target_pages == 8 * 256
        r.balloon(0, timeout=None)
        r.reset(resume=False)
        assert r.balloon_stats().target_pages == 8 * 256


def test_a_machine_without_a_balloon_says_so(make_machine):
    m = make_machine(GuestMode.HALT, mem_mib=MEM_MIB)
    with pytest.raises(Exception, match="no balloon device"):
        m.balloon(8)

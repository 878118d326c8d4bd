"""Counters and their summary; worker totals merge into the controller's."""

from __future__ import annotations

from pytest_supermachine.session.stats import Stats


def test_handouts_and_mean():
    s = Stats()
    s.record_handout("restore", 0.010)
    s.record_handout("reset", 0.002)
    s.record_handout("reset", 0.003)
    assert (s.handouts, s.restored, s.reset) == (3, 1, 2)
    assert abs(s.mean_handout_ms - 5.0) < 1e-9


def test_merge_sums_workers_through_json():
    a, b = Stats(), Stats()
    a.record_handout("reset", 0.001)
    a.record_snapshot(built=True, seconds=1.0)
    b.record_snapshot(built=False)
    b.capsules.append("/c/1")
    total = Stats(processes=0)
    for worker in (a, b):
        total.merge(Stats.from_dict(worker.to_dict()))
    assert (total.handouts, total.snapshots_built, total.snapshots_reused) == (1, 1, 1)
    assert total.capsules == ["/c/1"] and total.processes == 2


def test_summary_lines():
    s = Stats()
    assert not s.active and s.summary_lines() == []
    s.record_handout("restore", 0.01)
    s.record_snapshot(built=True, seconds=0.5)
    s.processes = 2
    text = "\n".join(s.summary_lines())
    assert (
        "VMs handed out: 1 (0 reset in place, 1 restored from a snapshot), mean handout 10.00 ms"
        in text
    )
    assert "snapshots: 1 built in 0.50 s, 0 reused from the cache" in text
    assert "(totals of 2 processes)" in text


def test_summary_accounts_for_what_was_built_before_the_first_vm():
    """A first run's minutes of kernel build and boot show in the summary, not only snapshots."""
    s = Stats(guest_builds=["guest kernel build (504 s)", "Linux guest boot (57 s)"])
    assert s.active
    assert "before the first VM: guest kernel build (504 s), Linux guest boot (57 s)" in (
        s.summary_lines()
    )

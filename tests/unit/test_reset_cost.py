"""The reset cost model: the whole cost (reset + the next run's faults) decides the way back."""

from __future__ import annotations

import pytest

from pytest_supermachine.vmm.reset_cost import ResetChoice, ResetCostModel, RetouchEstimate

pytestmark = pytest.mark.unit

MODEL = ResetCostModel()


def test_pages_the_next_run_writes_again_are_copied_back():
    assert MODEL.choose(50_000, retouch=1.0) is ResetChoice.COPY


def test_pages_no_run_writes_again_are_dropped():
    assert MODEL.choose(10_000, retouch=0.0) is ResetChoice.DISCARD


def test_past_a_restore_s_worth_of_drops_a_fresh_restore_is_cheaper():
    assert MODEL.choose(100_000, retouch=0.0) is ResetChoice.RESTORE


def test_a_clean_machine_is_reset_in_place():
    assert MODEL.choose(0) in (ResetChoice.COPY, ResetChoice.DISCARD)


def test_a_fresh_restore_wins_when_it_is_cheap_and_the_pages_are_not_written_again():
    cheap_restore = ResetCostModel(restore_s=1e-3, rewarm_s=0.0)
    assert cheap_restore.choose(100_000, retouch=0.0) is ResetChoice.RESTORE
    assert cheap_restore.choose(100_000, retouch=0.0, restore=False) is ResetChoice.DISCARD


@pytest.mark.parametrize("choice", [ResetChoice.DISCARD, ResetChoice.RESTORE])
@pytest.mark.parametrize("retouch", [0.0, 0.01, 0.5, 1.0])
def test_the_crossover_is_where_the_choice_starts_to_cost_less_than_copy(choice, retouch):
    model = ResetCostModel(restore_s=1e-3, rewarm_s=2e-3)
    at = model.crossover(choice, retouch)
    if at is None:
        assert model.cost(choice, 10**9, retouch) >= model.cost(ResetChoice.COPY, 10**9, retouch)
        return
    assert model.cost(choice, at, retouch) < model.cost(ResetChoice.COPY, at, retouch)
    assert model.cost(choice, at - 1, retouch) >= model.cost(ResetChoice.COPY, at - 1, retouch)


def test_a_machine_whose_runs_write_the_same_pages_keeps_a_retouch_of_one():
    estimate = RetouchEstimate()
    for _ in range(5):
        estimate.observe([0b1111_0000, 0b1])
    assert estimate.value == 1.0


def test_runs_that_write_other_pages_each_time_drive_the_retouch_towards_zero():
    estimate = RetouchEstimate()
    for run in range(8):
        estimate.observe([0xFF << (8 * run)])
    assert estimate.value < 0.01
    assert MODEL.choose(10_000, estimate.value) is ResetChoice.DISCARD

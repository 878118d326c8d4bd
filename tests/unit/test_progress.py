"""Progress of long work: every phase change shown, repeats rate-limited, cache hits silent."""

from __future__ import annotations

import pytest

from pytest_supermachine.progress import Progress

pytestmark = pytest.mark.unit


@pytest.fixture
def shown() -> list[str]:
    return []


@pytest.fixture
def board(shown: list[str]) -> Progress:
    return Progress(shown.append)


def test_each_phase_change_is_shown_with_its_elapsed_time(
    board: Progress, shown: list[str]
) -> None:
    board.report("test build a", "extract", 0.0)
    board.report("test build a", "compile", 12.4, "10 make steps")
    board.report("test build a", "done", 30.0)
    assert shown == [
        "supermachine: test build a: extract (0 s)",
        "supermachine: test build a: compile (12 s, 10 make steps)",
        "supermachine: test build a: done (30 s)",
    ]


def test_a_running_phase_is_not_repeated_within_the_interval(
    board: Progress, shown: list[str]
) -> None:
    board.report("test build b", "compile", 1.0)
    board.report("test build b", "compile", 1.5)
    assert len(shown) == 1


def test_done_without_work_is_silent_and_not_counted(board: Progress, shown: list[str]) -> None:
    board.report("test build c", "done", 0.0)
    assert shown == [] and "test build c" not in board.finished()


def test_finished_work_is_kept_for_the_summary(board: Progress, shown: list[str]) -> None:
    board.report("test build d", "compile", 0.0)
    board.report("test build d", "done", 42.0)
    assert board.finished()["test build d"] == 42.0

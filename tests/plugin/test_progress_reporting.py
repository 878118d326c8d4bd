"""Progress of long work reaches the terminal during a fixture's setup, and no test's report."""

from __future__ import annotations

import pytest

SLOW_FIXTURE = """
import pytest
from pytest_supermachine import progress

@pytest.fixture
def built():
    progress.report("guest kernel build", "compile", 12.0, "100 make steps")
    progress.report("guest kernel build", "done", 30.0)

def test_fails_after_the_build(built):
    assert False
"""


def test_progress_is_shown_live_and_not_captured_into_a_failure_report(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_progress=SLOW_FIXTURE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "supermachine: guest kernel build: compile (12 s, 100 make steps)",
            "supermachine: guest kernel build: done (30 s)",
            "*before the first VM: guest kernel build (30 s)",
        ]
    )
    assert "Captured stderr setup" not in result.stdout.str()
    assert "Captured stdout setup" not in result.stdout.str()


def test_a_session_reports_only_the_builds_it_waited_for(pytester: pytest.Pytester) -> None:
    # Module names of their own: in-process runs share sys.modules with this test session.
    pytester.makepyfile(test_session_that_builds=SLOW_FIXTURE)
    first = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_session_that_builds.py")
    first.stdout.fnmatch_lines(["*before the first VM: guest kernel build (30 s)"])
    pytester.makepyfile(test_session_after_it="def test_nothing_to_build():\n    pass\n")
    second = pytester.runpytest_inprocess(  # the same process
        "-p", "no:cacheprovider", "test_session_after_it.py"
    )
    second.assert_outcomes(passed=1)
    assert "before the first VM" not in second.stdout.str()

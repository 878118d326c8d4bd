"""The session's run timeout and output limit reach the machines tests get (marker > CLI > env > ini)."""

from __future__ import annotations


def test_output_limit_from_the_command_line_and_the_marker_reach_the_machine(project):
    project.write(
        "test_a.py",
        """
import pytest

def test_cli_limit(microvm):
    r = microvm.run("emit 5000")
    assert (len(r.stdout), r.stdout_truncated) == (1000, True)

@pytest.mark.microvm(output_limit="2K")
def test_marker_limit(microvm):
    r = microvm.run("emit 5000")
    assert (len(r.stdout), r.stdout_truncated) == (2048, True)

@pytest.mark.microvm(output_limit=None)
def test_marker_unlimited(microvm):
    r = microvm.run("emit 5000")
    assert (len(r.stdout), r.truncated) == (5000, False)

def test_cli_limit_again_on_the_reused_machine(microvm):
    assert len(microvm.run("emit 5000").stdout) == 1000
""",
    )
    project.run("--supermachine-output-limit=1000").assert_outcomes(passed=4)


def test_run_timeout_from_the_environment_bounds_a_run_without_timeout(project):
    project.monkeypatch.setenv("SUPERMACHINE_RUN_TIMEOUT", "0.5")
    project.write(
        "test_a.py",
        """
def test_sleep_is_killed(microvm):
    assert microvm.run_timeout == 0.5
    assert microvm.run("sleep 600000").timed_out
""",
    )
    project.run().assert_outcomes(passed=1)

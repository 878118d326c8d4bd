"""Guest randomness per test: seeded at every handout, recorded in capsules, repeated by replay.

On the microguest, whose ``rand`` built-in draws from the generator the agent's
SEED sets. The Linux guest's ``/dev/urandom`` and ``$RANDOM``:
test_guest_replay_linux.py.
"""

from __future__ import annotations

import json

import pytest

from tests.guest_random import SOURCES, fails_on_a_repeated_value, two_tests_drawing

FAILS_ON_A_REPEATED_RANDOM_VALUE = fails_on_a_repeated_value(SOURCES["microguest rand"][1])

#: Two tests that record what their guest drew.
TWO_TESTS_DRAW = two_tests_drawing(SOURCES["microguest rand"][1])


def drawn(project) -> dict[str, str]:
    return json.loads((project.path / "drawn.json").read_text())


def test_replay_repeats_the_guest_random_values_of_the_failing_run(project):
    project.write("test_rand.py", FAILS_ON_A_REPEATED_RANDOM_VALUE)
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    result = project.cli("replay", str(capsule), "--runs", "5")
    result.stdout.fnmatch_lines(["supermachine replay: 5/5 runs failed (reproduced)"])
    first, *replays = json.loads((project.path / "seen.json").read_text())
    assert replays == [first] * 5


def test_two_tests_draw_different_values(project):
    project.write("test_two.py", TWO_TESTS_DRAW)
    project.run("--supermachine-pool-size=1").assert_outcomes(passed=2)
    values = drawn(project)
    assert values["one"] != values["two"]


def test_the_same_session_seed_gives_the_same_values(project):
    project.write("test_two.py", TWO_TESTS_DRAW)
    project.run("--supermachine-seed=1234").assert_outcomes(passed=2)
    first = drawn(project)
    project.run("--supermachine-seed=1234").assert_outcomes(passed=2)
    assert drawn(project) == first
    project.run("--supermachine-seed=1235").assert_outcomes(passed=2)
    assert drawn(project)["one"] != first["one"]


def test_the_header_names_the_session_seed(project):
    project.write("test_two.py", TWO_TESTS_DRAW)
    result = project.run("--supermachine-seed=77")
    result.stdout.fnmatch_lines(
        ["supermachine: guest seed 77 (from command line (--supermachine-seed)*"]
    )


def test_the_capsule_records_the_seed_and_clock_of_each_handout(project):
    project.write("test_rand.py", FAILS_ON_A_REPEATED_RANDOM_VALUE)
    project.run("--supermachine-seed=99").assert_outcomes(failed=1)
    [capsule] = project.capsules()
    manifest = project.manifest(capsule)
    assert manifest["seeds"]["supermachine_seed"] == 99
    [vm] = manifest["vms"]
    assert vm["seed"]["session_seed"] == 99
    assert vm["seed"]["handout"] == 1
    assert vm["seed"]["applied"] == "agent"
    assert len(bytes.fromhex(vm["seed"]["seed"])) == 32
    assert vm["seed"]["wall_ns"] > 0


def test_the_guest_clock_is_the_handouts_wall_clock(project):
    project.write(
        "test_clock.py",
        """
import time

def test_clock(microvm):
    before = time.time_ns()
    guest = int(microvm.run("clock", check=True).stdout)
    assert before - 60 * 10**9 < guest <= time.time_ns()
""",
    )
    project.run().assert_outcomes(passed=1)


def test_the_session_seed_follows_pytest_randomly(project):
    pytest.importorskip("pytest_randomly", reason="pytest-randomly is not installed")
    project.write("test_two.py", TWO_TESTS_DRAW)
    result = project.run("-p", "randomly", "--randomly-seed=4321")
    result.stdout.fnmatch_lines(["supermachine: guest seed 4321 (from pytest-randomly*"])
    result.assert_outcomes(passed=2)

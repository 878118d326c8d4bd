"""Replay repeats the Linux guest's randomness: ``/dev/urandom`` and busybox ``$RANDOM``.

The plugin tier's other tests run on the microguest; these need the product's
guest, because what they check is the kernel's CRNG (seeded by the host in guest
RAM, images/kernel_rng.py) and busybox ash's ``$RANDOM`` (seeded by the agent per
command). The base snapshot goes to the user cache dir, so only the first session
pays the boot; each replay run is a restore, an agent connection and one exec.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from smhelpers import USER_CACHE, Project

from tests.guest_random import SOURCES, fails_on_a_repeated_value, two_tests_drawing

#: Short names (they name the pytester modules, which must be unique per process).
LINUX_SOURCES = {
    "urandom": SOURCES["linux /dev/urandom"][1],
    "RANDOM": SOURCES["linux $RANDOM"][1],
}

TWO_TESTS_READ_URANDOM = two_tests_drawing(LINUX_SOURCES["urandom"])


@pytest.fixture
def linux_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A pytester project on the `linux` image, its snapshots in the user cache."""
    project = Project(pytester, USER_CACHE, monkeypatch)
    project.ini("supermachine_image = linux")
    yield project


@pytest.mark.parametrize("source", sorted(LINUX_SOURCES))
def test_replay_repeats_the_linux_guests_random_values(linux_project: Project, source: str):
    project = linux_project
    project.write(
        f"test_{source.lower()}_replay.py",
        fails_on_a_repeated_value(LINUX_SOURCES[source]),
    )
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    [vm] = project.manifest(capsule)["vms"]
    assert vm["seed"]["applied"] == "kernel+agent"
    result = project.cli("replay", str(capsule), "--runs", "5", timeout=900)
    result.stdout.fnmatch_lines(["supermachine replay: 5/5 runs failed (reproduced)"])
    first, *replays = json.loads((project.path / "seen.json").read_text())
    assert replays == [first] * 5


def test_two_tests_read_different_urandom_bytes(linux_project: Project):
    project = linux_project
    project.write("test_two_linux.py", TWO_TESTS_READ_URANDOM)
    project.run("--supermachine-pool-size=1").assert_outcomes(passed=2)
    drawn = json.loads((project.path / "drawn.json").read_text())
    assert drawn["one"] != drawn["two"]

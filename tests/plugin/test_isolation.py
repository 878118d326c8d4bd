"""What one test does to its VM is never seen by the next: RAM, disk, file store, devices."""

from __future__ import annotations

from smhelpers import summary_numbers

# The tests of each project run in order, on one process's pool: the second test
# gets the very machine the first one used, reset in place.


def test_file_store_writes_do_not_leak(project):
    project.write(
        "test_a.py",
        """
def test_writes(microvm):
    microvm.write_file("/leak", b"from the first test")
    assert microvm.read_file("/leak") == b"from the first test"

def test_does_not_see_it(microvm):
    r = microvm.run("cat /leak")
    assert r.returncode != 0, r
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    assert summary_numbers(result)["reset"] == 1


def test_disk_writes_do_not_leak(project):
    project.write(
        "test_a.py",
        """
def test_writes(microvm):
    assert microvm.run("blk-write 7 deadbeef").ok
    assert microvm.run("blk-read 7 1").stdout[:4] == bytes.fromhex("deadbeef")

def test_does_not_see_it(microvm):
    assert microvm.run("blk-read 7 1").stdout == bytes(512)
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    assert summary_numbers(result)["reset"] == 1


def test_ram_writes_do_not_leak(project):
    project.write(
        "test_a.py",
        """
PAGE = 4096
SEEN = {}

def scratch_pages_bumped(before, after):
    # `dirty` adds one to the first byte of each scratch page and touches nothing else there
    return [p for p in range(len(before) // PAGE)
            if after[p * PAGE] == (before[p * PAGE] + 1) % 256
            and after[p * PAGE + 1:(p + 1) * PAGE] == before[p * PAGE + 1:(p + 1) * PAGE]]

def test_dirties_ram(microvm):
    SEEN["before"] = microvm.memory.read(0, microvm.memory.size)
    assert microvm.run("dirty 200").ok
    assert microvm.dirty_pages() >= 200
    SEEN["after"] = microvm.memory.read(0, microvm.memory.size)
    SEEN["bumped"] = scratch_pages_bumped(SEEN["before"], SEEN["after"])
    assert len(SEEN["bumped"]) >= 200

def test_starts_clean(microvm):
    # right after the reset only the pages the handout itself touched are dirty
    assert microvm.dirty_pages() < 50
    now = microvm.memory.read(0, microvm.memory.size)
    leaked = [p for p in SEEN["bumped"] if now[p * PAGE] != SEEN["before"][p * PAGE]]
    assert leaked == []
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    assert summary_numbers(result)["reset"] == 1


def test_a_crashed_guest_is_reset_for_the_next_test(project):
    project.write(
        "test_a.py",
        """
import pytest
from pytest_supermachine import SupermachineError

def test_crashes_it(microvm):
    microvm.agent().kill_grace = 1  # the host notices the dead guest by its silence
    with pytest.raises(SupermachineError):
        microvm.run("crash", timeout=1)
    assert "exception" in microvm.console

def test_gets_a_working_vm(microvm):
    assert microvm.run("echo alive").stdout == b"alive\\n"
""",
    )
    project.run("--supermachine-capsule-retention=none").assert_outcomes(passed=2)


def test_a_test_that_stops_its_vm_does_not_break_the_pool(project):
    project.write(
        "test_a.py",
        """
def test_stops_it(microvm):
    microvm.stop()

def test_gets_a_working_vm(microvm):
    assert microvm.run("true").ok
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    assert summary_numbers(result)["restored"] == 2  # the stopped one was not reused


def test_two_fixtures_in_one_test_are_two_machines(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def other(vm):
    vm.write_file("/mark", b"other")

def test_both(microvm, other):
    assert microvm is not other
    microvm.write_file("/mark", b"microvm")
    assert other.read_file("/mark") == b"other"
""",
    )
    project.run().assert_outcomes(passed=1)

"""What docs/plugin.md offers a user's conftest, used as a user would: hooks and register_image."""

from __future__ import annotations

import fcntl

from smhelpers import summary_numbers

USES_A_VM = "def test_x(microvm):\n    assert microvm.run('true').ok\n"


def test_cache_key_hook_adds_what_the_guest_depends_on_to_the_key(project, monkeypatch):
    project.conftest("""
def pytest_supermachine_cache_key(config, kind, name, parts):
    if kind == "base":
        return {"app_release": os.environ["APP_RELEASE"]}
""")
    project.cold_cache()
    project.write("test_a.py", USES_A_VM)
    monkeypatch.setenv("APP_RELEASE", "1")
    project.run().assert_outcomes(passed=1)
    [first] = project.builds()
    project.clear_builds()
    project.run().assert_outcomes(passed=1)
    assert project.builds() == []  # same value: the cached base is reused
    monkeypatch.setenv("APP_RELEASE", "2")
    project.run().assert_outcomes(passed=1)
    [second] = project.builds()  # another value: another key, a new base
    assert first.split()[:2] == second.split()[:2] == ["base", "microguest"]
    assert first.split()[-1] != second.split()[-1]  # "<kind> <label> <key>"


def test_cache_key_hook_reaches_layers_too(project, monkeypatch):
    project.conftest("""
def pytest_supermachine_cache_key(config, kind, name, parts):
    if kind == "layer" and name == "configured":
        return {"seed": os.environ["SEED"]}
""")
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/seed", os.environ["SEED"].encode())

def test_x(configured):
    assert configured.read_file("/seed") == os.environ["SEED"].encode()
""".replace("from pytest_supermachine", "import os\nfrom pytest_supermachine"),
    )
    monkeypatch.setenv("SEED", "a")
    project.run().assert_outcomes(passed=1)
    monkeypatch.setenv("SEED", "b")
    project.clear_builds()
    project.run().assert_outcomes(passed=1)  # a stale layer would still hold "a"
    assert [line.split()[:2] for line in project.builds()] == [["layer", "configured"]]


def test_capsule_written_hook_is_told_the_capsule_and_its_manifest(project):
    project.conftest("""
import json

def pytest_supermachine_capsule_written(item, path, manifest):
    with open(os.environ["SM_CAPSULES_SEEN"], "a") as f:
        f.write(json.dumps([item.nodeid, str(path), manifest["nodeid"]]) + "\\n")
""")
    seen = project.path / "capsules-seen.jsonl"
    project.monkeypatch.setenv("SM_CAPSULES_SEEN", str(seen))
    project.write("test_a.py", USES_A_VM + "\ndef test_fails(microvm):\n    assert False\n")
    project.run().assert_outcomes(passed=1, failed=1)
    [capsule] = project.capsules()
    assert seen.read_text().splitlines() == [
        f'["test_a.py::test_fails", "{capsule}", "test_a.py::test_fails"]'
    ]


def test_register_image_gives_tests_a_users_own_image(project):
    project.conftest("""
from pytest_supermachine import register_image
from pytest_supermachine.images.microguest import MicroguestImage

class SmallGuest(MicroguestImage):
    name = "small"
    description = "the microguest in 32 MiB"
    default_mem_mib = 32

register_image("small", SmallGuest)
""")
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.microvm(image="small")
def test_on_the_users_image(microvm):
    info = dict(l.split("=", 1) for l in microvm.run("info").stdout.decode().splitlines())
    assert int(info["mem_bytes"]) == 32 << 20
""",
    )
    result = project.run_subprocess()  # a fresh process: the image registry is per process
    result.assert_outcomes(passed=1)
    assert [line.split()[:2] for line in project.builds()] == [["base", "small"]]


def test_mem_mib_option_sizes_the_guest(project):
    project.write(
        "test_a.py",
        """
def test_guest_memory(microvm):
    info = dict(l.split("=", 1) for l in microvm.run("info").stdout.decode().splitlines())
    assert int(info["mem_bytes"]) == 96 << 20
    assert microvm.config.mem_mib == 96
""",
    )
    project.run("--supermachine-mem-mib=96").assert_outcomes(passed=1)


def test_ready_timeout_option_bounds_the_wait_for_a_booting_guest(project):
    project.cold_cache()  # the base must be booted in this run
    project.write("test_a.py", USES_A_VM)
    result = project.run("--supermachine-ready-timeout=0.001")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*guest not ready after 0.001 s"
            " (ready_timeout 0.001 s, command line (--supermachine-ready-timeout))*"
        ]
    )
    project.run("--supermachine-ready-timeout=60").assert_outcomes(passed=1)


def test_lock_timeout_option_bounds_the_wait_for_another_builder(project):
    cache = project.cold_cache()
    project.write("test_a.py", USES_A_VM)
    project.run().assert_outcomes(passed=1)
    [built] = project.builds()
    key = built.split()[-1]
    (cache / "snapshots" / f"{key}.snap").unlink()  # missing again: the next run must build it
    with open(cache / "snapshots" / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" is building it and never finishes
        result = project.run("--supermachine-lock-timeout=1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*waited 1 s for another process building snapshot {key}*"])
    assert summary_numbers(project.run()).get("built") == 1  # lock released: built normally

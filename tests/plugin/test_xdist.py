"""Under pytest-xdist: builds happen once across workers, every --dist mode works, totals add up."""

from __future__ import annotations

from collections import Counter

import pytest
from smhelpers import summary_numbers

MANY_TESTS = """
import pytest
from pytest_supermachine import layer

@layer
def prepared(vm):
    vm.write_file("/prepared", b"yes")

@layer(base=prepared)
def more(vm):
    vm.write_file("/more", b"yes")

@pytest.mark.parametrize("i", range(6))
def test_base(microvm, i):
    assert microvm.run("cat /prepared").returncode != 0

@pytest.mark.parametrize("i", range(6))
def test_more(more, i):
    assert more.read_file("/prepared") == more.read_file("/more") == b"yes"
"""


@pytest.mark.parametrize("workers", [2, 4])
def test_cold_cache_is_built_once_by_all_workers(project, workers):
    project.cold_cache()
    project.write("test_a.py", MANY_TESTS)
    result = project.run_subprocess("-n", str(workers))
    result.assert_outcomes(passed=12)
    built = Counter(line.split()[0] + " " + line.split()[1] for line in project.builds())
    assert built == {"base microguest": 1, "layer prepared": 1, "layer more": 1}
    numbers = summary_numbers(result)
    assert numbers["handouts"] == 12  # totals from every worker
    assert numbers["built"] == 3
    result.stdout.fnmatch_lines([f"(totals of {workers} processes)"])


@pytest.mark.parametrize(
    "mode", ["load", "loadscope", "loadfile", "loadgroup", "worksteal", "each"]
)
def test_every_dist_mode(project, mode):
    project.write("test_a.py", MANY_TESTS)
    result = project.run_subprocess("-n", "2", "--dist", mode)
    result.assert_outcomes(passed=24 if mode == "each" else 12)
    assert summary_numbers(result)["handouts"] == (24 if mode == "each" else 12)


def test_worker_killed_while_building_leaves_the_cache_usable(project):
    project.cold_cache()
    project.write(
        "test_a.py",
        """
import os, signal
import pytest
from pytest_supermachine import layer

@layer
def fragile(vm):
    vm.write_file("/fragile", b"built")
    marker = os.path.join(os.environ["SM_PROJECT"], "killed-once")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)  # the first builder dies in the middle of the build

@pytest.mark.parametrize("i", range(4))
def test_it(fragile, i):
    assert fragile.read_file("/fragile") == b"built"
""",
    )
    project.monkeypatch.setenv("SM_PROJECT", str(project.path))
    result = project.run_subprocess("-n", "2")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*"])
    assert [line.split()[1] for line in project.builds() if line.startswith("layer")] == ["fragile"]
    project.clear_builds()
    again = project.run()
    again.assert_outcomes(passed=4)
    assert project.builds() == []  # the surviving build is a complete, reusable entry


def test_collect_only_does_no_vm_work(project):
    project.cold_cache()
    project.conftest("""
import pytest_supermachine.vmm.machine as machine

def _refuse(*args, **kwargs):
    raise AssertionError("a VM was created during --collect-only")

machine.Machine.__init__ = _refuse
""")
    project.write("test_a.py", MANY_TESTS)
    for args in (["--collect-only"], ["--collect-only", "-n", "2"]):
        result = project.run_subprocess(*args)
        assert result.ret == 0, result.stdout.str()
        assert not project.cache.exists()  # no snapshot was looked up, let alone built
        assert "VMs handed out" not in result.stdout.str()

"""@layer: built once, cached by content, rebuilt exactly when it or a parent changes."""

from __future__ import annotations

from smhelpers import summary_numbers

CHAIN = """
from pytest_supermachine import layer

@layer
def first(vm):
    vm.write_file("/first", b"1")

@layer(base=first)
def second(vm):
    vm.write_file("/second", b"SECOND")

@layer(base=second)
def third(vm):
    vm.write_file("/third", b"3")

def test_first(first):
    assert first.run("cat /second").returncode != 0

def test_third(third):
    assert [third.read_file(p) for p in ("/first", "/second", "/third")] == [b"1", b"SECOND", b"3"]
"""


def layers_built(project) -> list[str]:
    return sorted(line.split()[1] for line in project.builds() if line.startswith("layer"))


def test_layer_state_is_what_tests_get_and_test_changes_do_not_leak(project):
    project.write(
        "test_a.py",
        """
import pytest
from pytest_supermachine import layer

@layer
def with_config(vm):
    vm.write_file("/etc/app.conf", b"mode=test\\n")

@pytest.mark.parametrize("i", range(3))
def test_app(with_config, i):
    assert with_config.read_file("/etc/app.conf") == b"mode=test\\n"
    with_config.write_file("/etc/app.conf", b"changed by a test")
""",
    )
    result = project.run()
    result.assert_outcomes(passed=3)
    assert layers_built(project) == ["with_config"]
    assert summary_numbers(result)["reset"] == 2


def test_second_run_reuses_every_layer(project):
    project.write("test_a.py", CHAIN)
    project.cold_cache()
    project.run().assert_outcomes(passed=2)
    assert layers_built(project) == ["first", "second", "third"]
    project.clear_builds()
    result = project.run()
    result.assert_outcomes(passed=2)
    assert project.builds() == []
    assert summary_numbers(result)["built"] == 0


def test_changed_layer_rebuilds_only_it_and_its_children(project):
    project.cold_cache()
    project.write("test_a.py", CHAIN)
    project.run().assert_outcomes(passed=2)
    project.clear_builds()
    project.write("test_a.py", CHAIN.replace("SECOND", "Second"))  # the layer and its check
    project.run().assert_outcomes(passed=2)
    assert layers_built(project) == ["second", "third"]
    assert not any(line.startswith("base") for line in project.builds())


def test_layers_stack_five_deep(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def l1(vm):
    vm.write_file("/1", b"1")

@layer(base=l1)
def l2(vm):
    vm.write_file("/2", b"2")

@layer(base=l2)
def l3(vm):
    vm.write_file("/3", b"3")

@layer(base=l3)
def l4(vm):
    vm.write_file("/4", b"4")
    vm.run("blk-write 0 0404", check=True)

@layer(base=l4)
def l5(vm):
    vm.write_file("/1", b"one")

def test_deep(l5):
    assert [l5.read_file(f"/{i}") for i in range(1, 5)] == [b"one", b"2", b"3", b"4"]
    assert l5.run("blk-read 0 1").stdout[:2] == b"\\x04\\x04"
""",
    )
    project.run().assert_outcomes(passed=1)


def test_failing_layer_is_a_setup_error_naming_the_layer(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def broken(vm):
    raise RuntimeError("the setup step failed")

def test_one(broken):
    pass

def test_two(broken):
    pass

def test_unaffected(microvm):
    pass
""",
    )
    result = project.run()
    result.assert_outcomes(errors=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*LayerError: layer 'broken' (*test_a.py:4) failed while building its snapshot: "
            "RuntimeError: the setup step failed*",
        ]
    )
    assert "RuntimeError: the setup step failed" in result.stdout.str()  # the cause's traceback
    assert "failed earlier in this process; not retried" in result.stdout.str()
    assert project.builds() == [line for line in project.builds() if line.startswith("base")]


def test_layer_failing_guest_command_names_the_layer(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def needs_tool(vm):
    vm.run("no-such-command", check=True)

def test_it(needs_tool):
    pass
""",
    )
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*LayerError: layer 'needs_tool' (*) failed while building*"])


def test_parametrized_layer_is_one_snapshot_per_parameter(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer(params=["a", "b"])
def flavour(vm, param):
    vm.write_file("/flavour", param.encode())

@layer(base=flavour)
def on_top(vm):
    vm.write_file("/top", vm.read_file("/flavour") * 2)

def test_flavour(flavour, request):
    assert flavour.read_file("/flavour").decode() in request.node.name

def test_on_top(on_top, request):
    assert on_top.read_file("/top").decode() in ("aa", "bb")
""",
    )
    result = project.run("-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_flavour?a? PASSED*", "*test_on_top?b? PASSED*"])
    assert layers_built(project) == ["flavour['a']", "flavour['b']", "on_top", "on_top"]


def test_layer_with_a_bad_signature_fails_at_collection(project):
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def takes_nothing():
    pass
""",
    )
    result = project.run()
    result.stdout.fnmatch_lines(["*LayerError: layer takes_nothing must take (vm)*"])
    assert result.ret == 2


def test_rebuild_rebuilds_each_snapshot_once_even_under_xdist(project):
    project.cold_cache()
    project.write("test_a.py", CHAIN)
    project.run().assert_outcomes(passed=2)
    project.clear_builds()
    result = project.run_subprocess("--supermachine-rebuild", "-n", "2")
    result.assert_outcomes(passed=2)
    assert sorted(line.split()[1] for line in project.builds()) == [
        "first",
        "microguest",
        "second",
        "third",
    ]
    project.clear_builds()
    project.run().assert_outcomes(passed=2)
    assert project.builds() == []


def test_cache_list_shows_bases_and_layers(project):
    project.cold_cache()
    project.write("test_a.py", CHAIN)
    project.run().assert_outcomes(passed=2)
    result = project.cli("cache", "list", "--cache-dir", str(project.cache))
    result.stdout.fnmatch_lines(
        [
            "snapshot cache: * (4 entries, *",
            "* base  microguest  (1 vCPU 64 MiB*",
            "* layer first on microguest  (*",
            "* layer second on first  (*",
            "* layer third on second  (*",
        ]
    )

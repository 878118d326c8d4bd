"""Fixture basics: microvm, microvm_factory, microvm_image, the marker, options, reporting."""

from __future__ import annotations

from smhelpers import summary_numbers


def test_microvm_is_a_running_machine_that_runs_commands(project):
    project.write(
        "test_a.py",
        """
def test_echo(microvm):
    assert microvm.state.value == "running"
    r = microvm.run("echo hello")
    assert r.ok and r.stdout == b"hello\\n"
""",
    )
    project.run().assert_outcomes(passed=1)


def test_second_test_gets_a_reset_vm_not_a_new_one(project):
    project.write(
        "test_a.py",
        """
ids = []

def test_one(microvm):
    ids.append(id(microvm))

def test_two(microvm):
    ids.append(id(microvm))
    assert ids[0] == ids[1]  # the same Machine, reset in place
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    numbers = summary_numbers(result)
    assert (numbers["handouts"], numbers["restored"], numbers["reset"]) == (2, 1, 1)


def test_pool_size_zero_restores_a_fresh_vm_for_every_test(project):
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_it(microvm, i):
    assert microvm.run("true").ok
""",
    )
    result = project.run("--supermachine-pool-size=0")
    result.assert_outcomes(passed=3)
    assert summary_numbers(result)["restored"] == 3


def test_marker_sets_vcpus_and_memory(project):
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.microvm(vcpus=2, mem_mib=96)
def test_shape(microvm):
    info = dict(line.split("=", 1) for line in microvm.run("info").stdout.decode().splitlines())
    assert info["vcpus"] == "2"
    assert int(info["mem_bytes"]) == 96 << 20

def test_default_shape(microvm):
    assert len(microvm.vcpus) == 1 and microvm.config.mem_mib == 64
""",
    )
    project.run().assert_outcomes(passed=2)


def test_marker_beats_the_command_line(project):
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.microvm(vcpus=2)
def test_marked(microvm):
    assert len(microvm.vcpus) == 2

def test_unmarked(microvm):
    assert len(microvm.vcpus) == 3
""",
    )
    project.run("--supermachine-vcpus=3").assert_outcomes(passed=2)


def test_marker_with_an_unknown_argument_is_a_clear_error(project):
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.microvm(cpus=2)
def test_marked(microvm):
    pass
""",
    )
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*microvm*unknown argument(s) cpus*takes image, vcpus, mem_mib*"])


def test_unknown_image_names_the_available_ones(project):
    project.write("test_a.py", "def test_x(microvm):\n    pass\n")
    result = project.run("--supermachine-image=nope")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*no guest image named 'nope'; available: default, linux, microguest*"]
    )


def test_bad_option_value_is_a_usage_error_naming_its_source(project, monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_POOL_SIZE", "many")
    project.write("test_a.py", "def test_x():\n    pass\n")
    result = project.run_subprocess()
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*pool_size from environment (SUPERMACHINE_POOL_SIZE)*"])


def test_microvm_image_can_be_overridden_and_images_added_by_hook(project):
    project.conftest("""
import pytest
from pytest_supermachine.images.microguest import MicroguestImage

class Roomy(MicroguestImage):
    name = "roomy"
    default_mem_mib = 80

def pytest_supermachine_image(config, name):
    return Roomy() if name == "roomy" else None

@pytest.fixture(scope="session")
def microvm_image():
    return "roomy"
""")
    project.write(
        "test_a.py",
        """
import pytest

def test_overridden(microvm):
    assert microvm.config.mem_mib == 80

@pytest.mark.microvm(image="microguest")
def test_marker_wins(microvm):
    assert microvm.config.mem_mib == 64
""",
    )
    project.run().assert_outcomes(passed=2)


def test_factory_boots_restores_and_snapshots(project):
    project.write(
        "test_a.py",
        """
def test_factory(microvm_factory, tmp_path):
    vm = microvm_factory.boot()
    assert vm.run("echo booted").stdout == b"booted\\n"
    vm.write_file("/f", b"kept")
    vm.snapshot(tmp_path / "s.snap")
    again = microvm_factory.restore(tmp_path / "s.snap")
    assert again.read_file("/f") == b"kept"
    base = microvm_factory.base()
    assert base.kind == "base" and base.path.exists()
""",
    )
    project.run().assert_outcomes(passed=1)


def test_header_and_summary_lines(project):
    project.write("test_a.py", "def test_x(microvm):\n    pass\n")
    result = project.run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "supermachine: /dev/kvm*",
            f"supermachine: image microguest, cache {project.cache}, pool 4",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*- supermachine -*",
            "VMs handed out: 1 *mean handout * ms*",
            "snapshots: * built*, * reused from the cache",
        ]
    )


def test_no_summary_section_when_no_vm_was_used(project):
    project.write("test_a.py", "def test_x():\n    pass\n")
    result = project.run()
    result.assert_outcomes(passed=1)
    assert "VMs handed out" not in result.stdout.str()


def test_ini_settings_apply_and_the_command_line_beats_them(project):
    project.ini("supermachine_pool_size = 0", "supermachine_vcpus = 2")
    project.write(
        "test_a.py",
        """
import pytest

@pytest.mark.parametrize("i", range(2))
def test_it(microvm, i):
    assert len(microvm.vcpus) == 2
""",
    )
    result = project.run()
    result.assert_outcomes(passed=2)
    assert summary_numbers(result)["restored"] == 2
    result = project.run("--supermachine-pool-size=1")
    assert summary_numbers(result)["reset"] == 1

"""Failure capsules: written on failure, reported, kept by policy, replayable."""

from __future__ import annotations

from smhelpers import summary_numbers

FAILING = """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/conf", b"expected")

def test_fails(configured):
    configured.write_file("/conf", b"broken by the test")
    configured.run("echo about to fail")
    assert configured.read_file("/conf") == b"expected"

def test_passes(microvm):
    assert microvm.run("true").ok
"""


def test_failed_test_writes_a_capsule_and_reports_it(project):
    project.write("test_a.py", FAILING)
    result = project.run()
    result.assert_outcomes(passed=1, failed=1)
    [capsule] = project.capsules()
    assert capsule.name == "test_a.py__test_fails"
    assert sorted(p.name for p in capsule.iterdir()) == [
        "configured.console.log",
        "configured.snap",
        "manifest.json",
    ]
    manifest = project.manifest(capsule)
    assert manifest["nodeid"] == "test_a.py::test_fails"
    assert manifest["when"] == "call" and manifest["duration"] > 0
    assert "AssertionError" in manifest["error"]
    [vm] = manifest["vms"]
    assert [(s["kind"], s["name"]) for s in vm["chain"]] == [
        ("base", "microguest"),
        ("layer", "configured"),
    ]
    assert all(len(s["key"]) == 24 for s in vm["chain"])
    assert {"pytest-supermachine", "pytest", "python"} <= set(manifest["versions"])
    assert manifest["host"]["kvm_api_version"] == 12
    assert "PYTHONHASHSEED" in manifest["seeds"]
    result.stdout.fnmatch_lines(
        [
            "*- supermachine failure capsule -*",
            f"capsule: {capsule}",
            "replay:  * -m pytest_supermachine replay * --runs 5*",
            "--- configured: microguest (base) > configured; guest running",
            "console tail (configured):",
        ]
    )
    assert summary_numbers(result)["capsules"] == 1


def test_capsule_snapshot_holds_the_vm_at_the_failure(project):
    project.write("test_a.py", FAILING)
    project.run()
    [capsule] = project.capsules()
    project.write(
        "test_restore.py",
        f"""
from pytest_supermachine import Machine

def test_restore():
    with Machine.restore({str(capsule / "configured.snap")!r}) as vm:
        assert vm.read_file("/conf") == b"broken by the test"
""",
    )
    project.run("test_restore.py").assert_outcomes(passed=1)


def test_capsule_is_removed_once_the_test_passes(project):
    project.write("test_a.py", FAILING)
    project.run()
    assert len(project.capsules()) == 1
    project.write("test_a.py", FAILING.replace('b"broken by the test"', 'b"expected"'))
    project.run().assert_outcomes(passed=2)
    assert project.capsules() == []


def test_retention_all_keeps_capsules_of_passing_tests(project):
    project.write("test_a.py", FAILING)
    project.run()
    project.write("test_a.py", FAILING.replace('b"broken by the test"', 'b"expected"'))
    project.run("--supermachine-capsule-retention=all").assert_outcomes(passed=2)
    assert len(project.capsules()) == 1


def test_retention_none_writes_no_capsule(project):
    project.write("test_a.py", FAILING)
    result = project.run("--supermachine-capsule-retention=none")
    result.assert_outcomes(passed=1, failed=1)
    assert project.capsules() == []
    assert "supermachine failure capsule" not in result.stdout.str()


def test_capsule_dir_option(project):
    project.write("test_a.py", FAILING)
    project.run("--supermachine-capsule-dir=elsewhere").assert_outcomes(passed=1, failed=1)
    assert (project.path / "elsewhere" / "test_a.py__test_fails" / "manifest.json").is_file()


def test_a_stopped_vm_still_gets_its_console_kept_and_the_failure_is_not_masked(project):
    project.write(
        "test_a.py",
        """
def test_stops_then_fails(microvm):
    microvm.run("echo last words")
    microvm.stop()
    assert False, "the real failure"
""",
    )
    result = project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*AssertionError: the real failure*", "snapshot not taken: the test stopped the machine*"]
    )
    [capsule] = project.capsules()
    assert project.manifest(capsule)["vms"][0]["snapshot"] is None


#: Fails only on the layer's pristine state, and leaves the VM changed: a replay that ran
#: on the post-failure VM, or did not reset between runs, would see it pass.
FAILS_ON_THE_PRE_TEST_STATE = """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/conf", b"expected")

def test_fails(configured):
    seen = configured.read_file("/conf")
    configured.write_file("/conf", b"changed by the test")
    assert seen != b"expected"
"""


def test_replay_reruns_from_the_pre_test_state(project):
    project.write("test_a.py", FAILS_ON_THE_PRE_TEST_STATE)
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    result = project.cli("replay", str(capsule), "--runs", "5")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "replay of test_a.py::test_fails: 5/5 runs failed*",
            "snapshot chain: same cache keys as when the capsule was written",
            "supermachine replay: 5/5 runs failed (reproduced)",
        ]
    )
    assert len(project.capsules()) == 1  # replaying writes no capsules


def test_replay_of_a_test_that_now_passes_reports_zero(project):
    project.write("test_a.py", FAILS_ON_THE_PRE_TEST_STATE)
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    # passes only on the pre-test state: a replay on the post-failure VM would fail
    project.write("test_a.py", FAILS_ON_THE_PRE_TEST_STATE.replace("seen != ", "seen == "))
    result = project.cli("replay", str(capsule), "--runs", "3")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["supermachine replay: 0/3 runs failed (did not reproduce)"])


def test_replay_shell_runs_commands_in_the_post_failure_vm(project):
    project.write("test_a.py", FAILING)
    project.run()
    [capsule] = project.capsules()
    result = project.cli(
        "replay", str(capsule), "--shell", stdin="cat /conf\n:console\nexit 7\n:quit\n"
    )
    assert result.ret == 0, result.stderr.str()
    out = result.stdout.str()
    assert "restored the VM of test_a.py::test_fails (configured)" in out
    assert "broken by the test" in out
    assert "[exit 7]" in out

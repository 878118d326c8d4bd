"""The `supermachine` command's subcommands, run as a user runs them (a subprocess)."""

from __future__ import annotations

import os
import time

from smhelpers import summary_numbers

FAILS_WITH_TWO_VMS = """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/conf", b"from the layer")

def test_fails(microvm, configured):
    microvm.write_file("/mine", b"plain vm")
    configured.write_file("/conf", b"broken by the test")
    assert False
"""


def test_doctor_says_kvm_is_usable_here(project):
    result = project.cli("doctor")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "[[]ok] open /dev/kvm: KVM API version 12",
            "[[]ok] boot the microguest: *",
            "KVM is usable.",
        ]
    )


def test_doctor_without_kvm_fails_and_says_how_to_fix_it(project):
    project.monkeypatch.setenv("SUPERMACHINE_KVM_DEVICE", str(project.path / "no-kvm"))
    result = project.cli("doctor")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        ["[[]FAIL] open */no-kvm: *does not exist*Enable virtualization*", "KVM is NOT usable: *"]
    )


def test_demo_boots_the_guests_and_exits_zero(project):
    result = project.cli("demo", "--vcpus", "2")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            "--- boot and halt: guest powered off (status 0, vCPU 0)",
            "microguest: all 2 cpus online",
            "microguest: dirtied 1000 pages",
            "*reset_ms(median of 20, 1000 dirty pages)=*",
        ]
    )


def test_image_build_builds_the_base_snapshot_tests_then_reuse(project):
    cache = project.cold_cache()
    result = project.cli("image", "build", "microguest", "--cache-dir", str(cache))
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            "microguest: */microguest.elf (* bytes)",
            "microguest: base snapshot built (1 vCPU, 64 MiB) in * s: *.snap",
        ]
    )
    again = project.cli("image", "build", "microguest", "--cache-dir", str(cache))
    again.stdout.fnmatch_lines(["microguest: base snapshot already cached *"])
    project.write("test_a.py", "def test_x(microvm):\n    assert microvm.run('true').ok\n")
    result = project.run()
    result.assert_outcomes(passed=1)
    assert summary_numbers(result)["built"] == 0 and project.builds() == []


def test_replay_shell_vm_picks_which_fixtures_vm_to_open(project):
    project.write("test_a.py", FAILS_WITH_TWO_VMS)
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    layer_vm = project.cli(
        "replay", str(capsule), "--shell", "--vm", "configured", stdin="cat /conf\n:quit\n"
    )
    assert layer_vm.ret == 0, layer_vm.stderr.str()
    assert "(configured) as it was after the failure" in layer_vm.stdout.str()
    assert "broken by the test" in layer_vm.stdout.str()
    plain_vm = project.cli(
        "replay", str(capsule), "--shell", "--vm", "microvm", stdin="cat /mine\n:quit\n"
    )
    assert plain_vm.ret == 0, plain_vm.stderr.str()
    assert "(microvm) as it was after the failure" in plain_vm.stdout.str()
    assert "plain vm" in plain_vm.stdout.str()
    unknown = project.cli("replay", str(capsule), "--shell", "--vm", "nosuch", stdin=":quit\n")
    assert unknown.ret == 1
    assert "has no VM snapshot for fixture 'nosuch'" in unknown.stderr.str()


def test_replay_shell_timeout_ends_a_command_that_runs_too_long(project):
    project.write("test_a.py", FAILS_WITH_TWO_VMS)
    project.run().assert_outcomes(failed=1)
    [capsule] = project.capsules()
    # the shell's default is 60 s: a replay still waiting then is killed by this deadline
    result = project.cli(
        "replay",
        str(capsule),
        "--shell",
        "--timeout",
        "1",
        stdin="sleep 600000\necho after\n:quit\n",
        timeout=45,
    )
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["[[]exit -9, timed out]", "after"])


def test_cache_prune_unused_days_and_dry_run(project):
    cache = project.cold_cache()
    project.write(
        "test_a.py",
        """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/conf", b"x")

def test_x(configured):
    pass
""",
    )
    project.run().assert_outcomes(passed=1)
    keys = {line.split()[0]: line.split()[-1] for line in project.builds()}
    layer_meta = cache / "snapshots" / f"{keys['layer']}.json"
    ten_days_ago = time.time() - 10 * 86400
    os.utime(layer_meta, (ten_days_ago, ten_days_ago))
    args = ("cache", "prune", "--cache-dir", str(cache), "--unused-days", "5")

    dry = project.cli(*args, "--dry-run")
    assert dry.ret == 0, dry.stderr.str()
    dry.stdout.fnmatch_lines(
        [
            f"would remove {keys['layer']}.snap: unused for 10.0 days",
            "would remove 1 item(s) from *",
        ]
    )
    assert (cache / "snapshots" / f"{keys['layer']}.snap").exists()

    real = project.cli(*args)
    assert real.ret == 0, real.stderr.str()
    real.stdout.fnmatch_lines(
        [f"removed {keys['layer']}.snap: unused for 10.0 days", "removed 1 item(s) from *"]
    )
    assert not (cache / "snapshots" / f"{keys['layer']}.snap").exists()
    assert (cache / "snapshots" / f"{keys['base']}.snap").exists()  # used recently: kept

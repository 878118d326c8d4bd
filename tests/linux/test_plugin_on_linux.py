"""The plugin on the product's default image: `microvm`, a `@layer`, a failure capsule, a replay.

The plugin tier runs on the microguest (milliseconds per VM); this is the same path
on the Linux guest, through the factory (`LinuxImage.key_parts` and `boot`). The base
snapshot goes to the user cache dir, so only the first session pays the boot (about a
minute here); every exec costs about a second, so the project is kept small.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_supermachine.images.linux import LinuxImage
from tests.plugin.smhelpers import USER_CACHE, Project

ON_LINUX = """
from pytest_supermachine import layer

@layer
def configured(vm):
    vm.write_file("/etc/app.conf", b"mode=test\\n")

def test_kernel(microvm):
    r = microvm.run("uname -r")
    assert r.ok and r.stdout.startswith(b"6.1."), r

def test_layer(configured):
    assert configured.read_file("/etc/app.conf") == b"mode=test\\n"

def test_fails(configured):
    configured.write_file("/etc/app.conf", b"broken\\n")
    assert configured.read_file("/etc/app.conf") == b"mode=test\\n"
"""


@pytest.fixture
def linux_project(
    linux_image: LinuxImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    """A pytester project on the `linux` image, its snapshots in the user cache."""
    project = Project(pytester, USER_CACHE, monkeypatch)
    project.ini("supermachine_image = linux")
    yield project


def test_microvm_layer_capsule_and_replay_on_the_linux_image(linux_project: Project) -> None:
    project = linux_project
    project.write("test_app.py", ON_LINUX)
    result = project.run()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["supermachine: image linux, cache *, pool 4"])

    [capsule] = project.capsules()
    [vm] = project.manifest(capsule)["vms"]
    assert [(s["kind"], s["name"]) for s in vm["chain"]] == [
        ("base", "linux"),
        ("layer", "configured"),
    ]
    assert (capsule / "configured.snap").is_file()
    assert (capsule / "configured.console.log").is_file()

    replay = project.cli("replay", str(capsule), "--runs", "1", timeout=900)
    assert replay.ret == 1, replay.stdout.str() + replay.stderr.str()
    replay.stdout.fnmatch_lines(["supermachine replay: 1/1 runs failed (reproduced)"])

"""The wheel, installed the way a user installs it, runs tests with nothing else reachable.

The wheel, built the standard way (``python -m build``: an sdist, then the wheel from
it; setup.py stages the guests), goes into a fresh venv in a temporary directory
outside the checkout; every command then runs with a PATH of only that venv's bin and
a directory of the few host tools a run needs (no gcc, ld or make), with
``$SUPERMACHINE_KERNEL_SOURCE`` naming an empty directory (no kernel source) and
``$SUPERMACHINE_BUSYBOX`` a missing file (no busybox for an initramfs), from a working
directory outside the checkout. So each guest must come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_supermachine import progress

REPO = Path(__file__).resolve().parents[2]
#: Host tools a test run may use: the plugin shells out to none of the build tools.
RUNTIME_TOOLS = ("sh", "env", "uname", "cat", "ls")

MICROGUEST_TEST = """
from pytest_supermachine import layer


def test_runs(microvm):
    assert microvm.run("echo hi").stdout == b"hi\\n"


@layer
def with_file(vm):
    vm.write_file("/tmp/f", b"x")


def test_layer(with_file):
    assert with_file.read_file("/tmp/f") == b"x"
"""

LINUX_TEST = """
def test_runs(microvm):
    result = microvm.run("uname -s")
    assert result.ok and result.stdout == b"Linux\\n"
"""


@dataclass(frozen=True)
class Dist:
    """What ``python -m build`` made: the sdist and the wheel."""

    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """``python -m build`` of the checkout; its guest-kernel progress goes to the terminal
    (a kernel missing from the user cache is built first: minutes)."""
    out = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("bundle: "):
            progress.report("wheel build", "staging guests", time.monotonic() - start, line[8:-1])
    rc = proc.wait()
    progress.report("wheel build", "done", time.monotonic() - start)
    assert rc == 0, "".join(lines[-80:])
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(sdist, wheel)


@dataclass
class InstalledWheel:
    """A venv holding only the wheel (and its dependencies), and how to run in it."""

    venv: Path
    project: Path
    env: dict[str, str]
    install_seconds: float

    def run(self, *argv: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / argv[0]), *argv[1:]],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, dist: Dist) -> Iterator[InstalledWheel]:
    root = tmp_path_factory.mktemp("packaging")
    assert not root.resolve().is_relative_to(REPO), "the install must live outside the checkout"
    wheel = dist.wheel
    start = time.monotonic()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    tools = root / "tools"
    tools.mkdir()
    for tool in RUNTIME_TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (tools / tool).symlink_to(found)
    no_source = root / "no-kernel-source"
    no_source.mkdir()
    project = root / "project"
    project.mkdir()
    env = {
        "HOME": os.environ.get("HOME", str(root)),
        "PATH": f"{venv / 'bin'}:{tools}",
        "SUPERMACHINE_KERNEL_SOURCE": str(no_source),
        "SUPERMACHINE_BUSYBOX": str(root / "no-busybox"),
        "LANG": "C.UTF-8",
    }
    for passed in ("SUPERMACHINE_KVM_DEVICE", "XDG_CACHE_HOME", "SUPERMACHINE_CACHE_DIR"):
        if passed in os.environ:
            env[passed] = os.environ[passed]
    yield InstalledWheel(venv, project, env, time.monotonic() - start)


def test_the_wheel_serves_every_cpython_from_3_10_on_linux_x86_64(dist: Dist) -> None:
    """One wheel per platform: the C core uses only the stable ABI."""
    assert dist.wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), dist.wheel.name


def test_the_wheel_is_manylinux_compatible(dist: Dist) -> None:
    """auditwheel finds nothing but glibc symbols in it (the guests are static ELF files)."""
    done = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(dist.wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert 'consistent with the following platform tag: "manylinux_2_' in out, out


def test_the_wheel_carries_the_kernel_of_both_variants(dist: Dist) -> None:
    """pvm for kvm_pvm hosts, kvm for hardware KVM: the same wheel boots on either."""
    with zipfile.ZipFile(dist.wheel) as whl:
        names = whl.namelist()
        manifests = [
            json.loads(whl.read(n))
            for n in names
            if n.startswith("pytest_supermachine/bundled/kernel/") and n.endswith("/manifest.json")
        ]
    assert sorted(m["variant"] for m in manifests) == ["kvm", "pvm"]
    kernels = [n for n in names if n.startswith("pytest_supermachine/bundled/kernel/")]
    assert sum(n.endswith("/vmlinux") for n in kernels) == 2
    assert not any(n.endswith("/bzImage") for n in kernels), "vmlinux boots; bzImage is dead weight"


def test_the_sdist_carries_sources_and_recipe_but_no_built_guest(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = [n.split("/", 1)[1] for n in sdist.getnames() if "/" in n]
    for source in (
        "setup.py",
        "pytest_supermachine/vmm/_core.c",
        "pytest_supermachine/guest/agent/agent.c",
        "pytest_supermachine/guest/microguest/entry.S",
        "pytest_supermachine/images/kernel_recipe/pvh.config",
        "pytest_supermachine/images/kernel_recipe/pvm/6.12/0002-user-mode-syscall-fault.patch",
    ):
        assert source in names, source
    assert not [n for n in names if "/bundled/" in n or n.endswith((".so", "vmlinux"))]


def test_no_compiler_is_reachable(installed: InstalledWheel) -> None:
    """The premise of this tier: what the tests below use cannot come from a build here."""
    for tool in ("gcc", "cc", "ld", "make"):
        assert shutil.which(tool, path=installed.env["PATH"]) is None, tool


def test_the_wheel_carries_its_guests(installed: InstalledWheel) -> None:
    (site,) = installed.venv.glob("lib/python*/site-packages/pytest_supermachine")
    for kind in ("microguest", "agent", "initramfs", "kernel"):
        assert list((site / "bundled" / kind).glob("*/manifest.json")), kind
    assert (site / "images" / "kernel_recipe" / "pvh.config").is_file()


def test_doctor_runs_from_the_installed_wheel(installed: InstalledWheel) -> None:
    done = installed.run("supermachine", "doctor")
    assert done.returncode == 0, done.stdout + done.stderr


def test_microguest_session_with_an_empty_cache(
    installed: InstalledWheel, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    """A fresh cache and no compiler: the microguest can only be the wheel's."""
    (installed.project / "test_micro.py").write_text(MICROGUEST_TEST)
    env = {**installed.env, "SUPERMACHINE_CACHE_DIR": str(tmp_path / "cache")}
    start = time.monotonic()
    done = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--supermachine-image=microguest",
            "test_micro.py",
        ],
        cwd=installed.project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    first_test = installed.install_seconds + time.monotonic() - start
    record_property("install_to_first_test_seconds", round(first_test, 1))
    print(f"install to first test (microguest, empty cache): {first_test:.1f} s")


def test_linux_session_without_kernel_source(installed: InstalledWheel) -> None:
    """No kernel source, no busybox, no compiler: the kernel and initramfs are the wheel's
    (the user cache may hold the base snapshot booted from them, keyed by their content)."""
    (installed.project / "test_linux.py").write_text(LINUX_TEST)
    done = installed.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--supermachine-image=linux",
        "test_linux.py",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout

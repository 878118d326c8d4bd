"""The Linux tier: the real guest (kernel from Debian source, busybox, our agent) on our VMM.

Slow here (nested PVM emulates the guest kernel: ~2 min to boot), so the guest is
booted once per session and snapshotted; every test restores that snapshot.
Timings (boot to ready, restore to first exec) are printed in the terminal summary.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.machine import Machine

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def linux_image() -> LinuxImage:
    image = LinuxImage()
    t0 = time.monotonic()
    image.build()  # kernel (cached by content; minutes on a cold cache) and initramfs
    TIMINGS["kernel + initramfs ready (built or cached), s"] = time.monotonic() - t0
    return image


@pytest.fixture(scope="session")
def linux_snapshot(linux_image: LinuxImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Linux guest booted to its agent's READY, snapshotted."""
    path = tmp_path_factory.mktemp("linux") / "base.snap"
    t0 = time.monotonic()
    machine = linux_image.boot(1, linux_image.default_mem_mib, timeout=900)
    TIMINGS["boot to agent ready, s"] = time.monotonic() - t0
    try:
        machine.snapshot(path)
    finally:
        machine.stop()
    return path


@pytest.fixture
def linux(linux_snapshot: Path) -> Iterator[Machine]:
    """A Linux machine restored from the session's snapshot."""
    with Machine.restore(linux_snapshot) as machine:
        yield machine


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    """Named durations, printed in the terminal summary."""
    return TIMINGS


@pytest.fixture(scope="session")
def busybox() -> Path:
    found = shutil.which("busybox") or "/bin/busybox"
    return Path(found)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("supermachine linux tier timings")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name:<52} {value:10.3f}")

"""Fixtures for the microguest tier: the built guest, and machines that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_supermachine.vmm.machine import Machine


@pytest.fixture(scope="session")
def microguest_elf() -> Path:
    from pytest_supermachine.guest.microguest import build_microguest

    return build_microguest()


@pytest.fixture
def make_machine(microguest_elf: Path) -> Iterator[Callable[..., Machine]]:
    """Build microguest machines: make_machine(mode, arg=0, vcpus=1, mem_mib=64)."""
    machines: list[Machine] = []

    def make(
        mode: int, arg: int = 0, *, vcpus: int = 1, mem_mib: int = 64, **cfg: object
    ) -> Machine:
        m = Machine(vcpus=vcpus, mem_mib=mem_mib, **cfg)
        machines.append(m)
        m.boot_direct64(microguest_elf, mode=mode, arg=arg)
        return m

    yield make
    for m in machines:
        m.stop()


@pytest.fixture
def booted(make_machine: Callable[..., Machine]) -> Machine:
    """A running microguest whose agent is up."""
    from pytest_supermachine.guest.microguest import GuestMode

    m = make_machine(GuestMode.AGENT)
    m.start()
    m.wait_ready(60)
    return m


@pytest.fixture
def session_snapshot(booted: Machine, tmp_path: Path) -> Path:
    """A snapshot taken with the agent connected and the guest idle (`Machine.wait_idle`)."""
    assert booted.run("true").ok
    assert booted.wait_idle(timeout=5)
    booted.snapshot(tmp_path / "session.snap")
    return tmp_path / "session.snap"


@pytest.fixture
def restored(session_snapshot: Path) -> Iterator[Machine]:
    """A machine restored from `session_snapshot` (stopped after the test)."""
    with Machine.restore(session_snapshot) as m:
        yield m
